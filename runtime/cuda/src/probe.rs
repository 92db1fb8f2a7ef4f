//! Finding the GPU without tripping cudarc: cudarc loads `libcuda` on its first call and
//! panics when it is missing (or lacks a function), so [`probe`] first opens the library
//! under the same names cudarc tries, checks that it exports every function kiln uses, and
//! only then initialises the driver and reads the device's properties. On a machine without
//! an NVIDIA driver the answer is [`CudaError::NoDriver`], never a panic.

use std::fmt;
use std::sync::OnceLock;

use cudarc::driver::sys::{CUdevice_attribute, CUresult};
use cudarc::driver::DriverError;

use crate::error::CudaError;
use crate::ffi;

/// A CUDA version as the driver reports it (`cuDriverGetVersion`), e.g. 13.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DriverVersion {
    pub major: u32,
    pub minor: u32,
}

impl DriverVersion {
    /// From the driver's encoding, `1000 * major + 10 * minor` (13000 is 13.0).
    pub fn from_raw(raw: i32) -> DriverVersion {
        let raw = raw.max(0) as u32;
        DriverVersion {
            major: raw / 1000,
            minor: (raw % 1000) / 10,
        }
    }
}

impl fmt::Display for DriverVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What [`probe`] found out about one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The CUDA device ordinal.
    pub ordinal: usize,
    /// The marketing name, `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// `(major, minor)`, `(9, 0)` for Hopper.
    pub compute_capability: (u32, u32),
    /// Bytes of device memory.
    pub total_memory: u64,
    /// The newest CUDA version the installed driver supports.
    pub driver_version: DriverVersion,
    /// Streaming multiprocessors.
    pub sm_count: u32,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "device {}: {} (sm_{major}{minor}, {} SMs, {:.1} GiB), driver for CUDA {}",
            self.ordinal,
            self.name,
            self.sm_count,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.driver_version
        )
    }
}

/// The driver library that loaded, under the name it loaded by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverLibrary {
    pub name: String,
}

/// The file names cudarc tries for the driver library, in its order (`libcuda.so`,
/// ..., `libcuda.so.1` on Linux).
pub fn driver_library_candidates() -> Vec<String> {
    let mut names = cudarc::get_lib_name_candidates("cuda");
    if cfg!(windows) {
        names.extend(cudarc::get_lib_name_candidates("nvcuda"));
    }
    names
}

/// Opens the first of `candidates` that the dynamic loader accepts and checks that it
/// exports every driver function kiln calls.
pub fn locate_driver_library(candidates: &[String]) -> Result<DriverLibrary, CudaError> {
    let mut last_error = None;
    for name in candidates {
        match ffi::open_library(name) {
            Ok(library) => {
                let missing = ffi::missing_symbols(&library, ffi::REQUIRED_DRIVER_SYMBOLS);
                if missing.is_empty() {
                    return Ok(DriverLibrary { name: name.clone() });
                }
                return Err(CudaError::DriverTooOld {
                    library: name.clone(),
                    version: None,
                    missing,
                });
            }
            Err(message) => last_error = Some(message),
        }
    }
    let tried = tried_names(candidates);
    Err(CudaError::NoDriver {
        reason: format!(
            "the NVIDIA driver library (libcuda) could not be loaded; tried {tried}{}. \
             Install the NVIDIA driver, or add the directory holding libcuda.so.1 to \
             LD_LIBRARY_PATH",
            last_error
                .map(|message| format!(" (last error: {message})"))
                .unwrap_or_default()
        ),
    })
}

/// The names tried, for messages: all of them when few, else the usual Linux and Windows
/// names and how many others.
fn tried_names(candidates: &[String]) -> String {
    let mut unique: Vec<&str> = Vec::new();
    for name in candidates {
        if !unique.contains(&name.as_str()) {
            unique.push(name);
        }
    }
    const USUAL: [&str; 3] = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"];
    let usual: Vec<&str> = unique
        .iter()
        .copied()
        .filter(|name| USUAL.contains(name))
        .collect();
    match unique.len() {
        0 => "no library names".to_string(),
        1..=4 => unique.join(", "),
        total if !usual.is_empty() => {
            format!(
                "{} and {} other names",
                usual.join(", "),
                total - usual.len()
            )
        }
        total => format!("{} and {} other names", unique[..3].join(", "), total - 3),
    }
}

/// The outcome of looking for the driver library, kept for the life of the process.
#[derive(Clone, Debug)]
enum LibrarySearch {
    Found(DriverLibrary),
    NotFound(String),
    TooOld {
        library: String,
        missing: Vec<String>,
    },
}

/// [`locate_driver_library`] over [`driver_library_candidates`], done once per process.
pub fn driver_library() -> Result<DriverLibrary, CudaError> {
    static SEARCH: OnceLock<LibrarySearch> = OnceLock::new();
    let search = SEARCH.get_or_init(
        || match locate_driver_library(&driver_library_candidates()) {
            Ok(library) => LibrarySearch::Found(library),
            Err(CudaError::DriverTooOld {
                library, missing, ..
            }) => LibrarySearch::TooOld { library, missing },
            Err(error) => LibrarySearch::NotFound(match error {
                CudaError::NoDriver { reason } => reason,
                other => other.to_string(),
            }),
        },
    );
    match search.clone() {
        LibrarySearch::Found(library) => Ok(library),
        LibrarySearch::NotFound(reason) => Err(CudaError::NoDriver { reason }),
        LibrarySearch::TooOld { library, missing } => {
            // cuDriverGetVersion is safe to call through cudarc when the library has it.
            let version = if missing.iter().any(|name| name == "cuDriverGetVersion") {
                None
            } else {
                ffi::driver_version().ok().map(DriverVersion::from_raw)
            };
            Err(CudaError::DriverTooOld {
                library,
                version,
                missing,
            })
        }
    }
}

/// Checks the library, then runs `cuInit`, mapping "no device" answers to
/// [`CudaError::NoDevice`] and stub libraries to [`CudaError::NoDriver`].
pub(crate) fn init_driver() -> Result<DriverLibrary, CudaError> {
    let library = driver_library()?;
    match cudarc::driver::result::init() {
        Ok(()) => Ok(library),
        Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => Err(CudaError::NoDevice {
            reason: format!(
                "the driver (`{}`) found no CUDA-capable device (CUDA_ERROR_NO_DEVICE)",
                library.name
            ),
        }),
        Err(DriverError(CUresult::CUDA_ERROR_STUB_LIBRARY)) => Err(CudaError::NoDriver {
            reason: format!(
                "`{}` is the CUDA toolkit's stub library, not a driver; put the real \
                 driver's libcuda.so.1 first on the library path",
                library.name
            ),
        }),
        Err(error) => Err(CudaError::driver(
            format!("initialising the CUDA driver (`{}`, cuInit)", library.name),
            error,
        )),
    }
}

/// The number of CUDA devices (after checking the driver).
pub fn device_count() -> Result<usize, CudaError> {
    init_driver()?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|error| CudaError::driver("counting CUDA devices", error))?;
    Ok(count.max(0) as usize)
}

/// Describes device 0; see [`probe_device`].
pub fn probe() -> Result<DeviceInfo, CudaError> {
    probe_device(0)
}

/// Describes device `ordinal`: a clear [`CudaError::NoDriver`] or [`CudaError::NoDevice`]
/// when there is none, never a panic.
pub fn probe_device(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    let count = device_count()?;
    if count == 0 {
        return Err(CudaError::NoDevice {
            reason: "the driver reports 0 CUDA devices".to_string(),
        });
    }
    if ordinal >= count {
        return Err(CudaError::NoDevice {
            reason: format!("device {ordinal} was asked for, but there are only {count}"),
        });
    }
    let reading = |what: &str| format!("reading the {what} of CUDA device {ordinal}");
    let device = ffi::RawDevice::get(ordinal)
        .map_err(|error| CudaError::driver(reading("handle"), error))?;
    let attribute = |attribute: CUdevice_attribute, what: &str| {
        device
            .attribute(attribute)
            .map(|value| value.max(0) as u32)
            .map_err(|error| CudaError::driver(reading(what), error))
    };
    let major = attribute(
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        "compute capability",
    )?;
    let minor = attribute(
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        "compute capability",
    )?;
    let sm_count = attribute(
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        "multiprocessor count",
    )?;
    let name = device
        .name()
        .map_err(|error| CudaError::driver(reading("name"), error))?;
    let total_memory = device
        .total_memory()
        .map_err(|error| CudaError::driver(reading("memory size"), error))?;
    let driver_version = ffi::driver_version()
        .map(DriverVersion::from_raw)
        .map_err(|error| CudaError::driver("reading the driver version", error))?;
    Ok(DeviceInfo {
        ordinal,
        name,
        compute_capability: (major, minor),
        total_memory: total_memory as u64,
        driver_version,
        sm_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_versions_decode() {
        assert_eq!(DriverVersion::from_raw(13000).to_string(), "13.0");
        assert_eq!(DriverVersion::from_raw(12080).to_string(), "12.8");
        assert_eq!(DriverVersion::from_raw(-1).to_string(), "0.0");
    }

    #[test]
    fn long_candidate_lists_are_summarized() {
        let names: Vec<String> = [
            "libcuda.so",
            "libcuda64.so",
            "libcuda64_13.so",
            "libcuda.so.13",
            "libcuda.so.1",
            "libcuda.so",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            tried_names(&names),
            "libcuda.so, libcuda.so.1 and 3 other names"
        );
        assert_eq!(tried_names(&["a".into(), "b".into(), "a".into()]), "a, b");
    }

    #[test]
    fn candidates_include_the_names_a_linux_driver_installs() {
        let names = driver_library_candidates();
        if cfg!(target_os = "linux") {
            assert!(names.iter().any(|n| n == "libcuda.so.1"), "{names:?}");
            assert!(names.iter().any(|n| n == "libcuda.so"), "{names:?}");
        }
    }
}
