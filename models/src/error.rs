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
