use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Where a tensor lives and its ops run. The CUDA device arrives with the GPU layer; until
/// then `cuda:N` parses to a clear "not available" error instead of a silent CPU fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "cpu" => Ok(Device::Cpu),
            cuda if cuda.starts_with("cuda") => Err(Error::DeviceUnavailable(
                cuda.to_string(),
                "this build has no CUDA device layer yet; use `cpu`".into(),
            )),
            other => Err(Error::DeviceUnavailable(
                other.to_string(),
                "unknown device; expected `cpu` or `cuda:N`".into(),
            )),
        }
    }
}
