use std::path::PathBuf;

/// Errors of the model layer. Loading errors name the file and, for weights, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernel(#[from] retouch_kernels::Error),
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: missing weight `{name}`", path.display())]
    MissingWeight { path: PathBuf, name: String },
    #[error("{}: weight `{name}` has shape {got:?}, expected {expected:?}", path.display())]
    WeightShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// A step's UNet prediction held a NaN or an infinity: the computation failed (an f16
    /// overflow, a corrupt cache or weight), not the request.
    #[error(
        "step {step}: the UNet's prediction holds a non-finite value ({value}); with f16 \
         products (`--gemm kernels-f16`, `cublas-f16`) try the f32 GEMMs"
    )]
    NonFinite { step: usize, value: f32 },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Error {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
