use crate::DType;

/// Everything that can go wrong in the kernel layer. Ops never panic on bad input: they
/// return one of these with the op's name and the offending shapes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },
    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType {
        op: &'static str,
        expected: DType,
        got: DType,
    },
    #[error("{op}: {message}")]
    Invalid { op: &'static str, message: String },
    #[error("device {0} is not available: {1}")]
    DeviceUnavailable(String, String),
    /// A CUDA driver call failed (after the device was opened).
    #[error("{op} on CUDA: {message}")]
    Cuda { op: &'static str, message: String },
    #[error("{path}: {message}")]
    SafeTensors { path: String, message: String },
    #[error("{path}: no tensor named `{name}`")]
    MissingTensor { path: String, name: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn shape_err<T>(op: &'static str, message: impl Into<String>) -> Result<T> {
    Err(Error::Shape {
        op,
        message: message.into(),
    })
}

pub(crate) fn invalid<T>(op: &'static str, message: impl Into<String>) -> Result<T> {
    Err(Error::Invalid {
        op,
        message: message.into(),
    })
}
