use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Where a tensor lives and its ops run: the CPU, or CUDA device `N` (`cuda:N`).
///
/// [`crate::Tensor`] lives in host memory; device memory is [`crate::cuda::CudaTensor`],
/// moved with its `upload`/`download`. Parsing `cuda:N` never touches the driver: opening
/// the device ([`crate::cuda::CudaDevice::open`]) is where a missing driver is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let unknown = || {
            Error::DeviceUnavailable(
                s.to_string(),
                "unknown device; expected `cpu` or `cuda:N`".into(),
            )
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(unknown)?;
                n.parse().map(Device::Cuda).map_err(|_| unknown())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn parses_and_prints() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda0"] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
    }
}
