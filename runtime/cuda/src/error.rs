//! The errors of the CUDA runtime. Every failure is a [`CudaError`] that names what it was
//! doing (the kernel and its launch shape, the weight, the input, the plan step), so that a
//! person can act on it without a debugger. Nothing in this crate panics on a missing
//! driver or GPU.

use std::fmt;
use std::path::PathBuf;

use cudarc::driver::DriverError;

use crate::launch::LaunchShape;
use crate::probe::DriverVersion;

/// A failed CUDA driver call: the driver's code, its name and its description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverFailure {
    /// The `CUresult` value (`1` is `CUDA_ERROR_INVALID_VALUE`, ...).
    pub code: u32,
    /// The code's name, `CUDA_ERROR_INVALID_VALUE`.
    pub name: String,
    /// The driver's description of the code.
    pub description: String,
}

impl DriverFailure {
    /// Asks the driver for the name and description of `error`.
    pub(crate) fn from_driver(error: DriverError) -> DriverFailure {
        let code = error.0 as u32;
        let name = error
            .error_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", error.0));
        let description = error
            .error_string()
            .map(|text| text.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "no description from the driver".to_string());
        DriverFailure {
            code,
            name,
            description,
        }
    }

    /// Whether this failure is the driver code `code`.
    pub fn is(&self, code: cudarc::driver::sys::CUresult) -> bool {
        self.code == code as u32
    }
}

impl From<DriverError> for DriverFailure {
    fn from(error: DriverError) -> Self {
        DriverFailure::from_driver(error)
    }
}

impl fmt::Display for DriverFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.name, self.code, self.description)
    }
}

impl std::error::Error for DriverFailure {}

/// Everything that can go wrong finding the GPU, loading a package and running it.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver library cannot be loaded (no NVIDIA driver on this machine).
    #[error("no CUDA driver: {reason}")]
    NoDriver { reason: String },
    /// The driver loaded but reports no usable device.
    #[error("no CUDA device: {reason}")]
    NoDevice { reason: String },
    /// The driver library lacks functions that kiln calls (a driver older than CUDA 13.0).
    #[error(
        "the CUDA driver `{library}`{} lacks {}; install an NVIDIA driver for CUDA 13.0 or newer",
        .version.map(|v| format!(" (CUDA {v})")).unwrap_or_default(),
        .missing.join(", ")
    )]
    DriverTooOld {
        library: String,
        version: Option<DriverVersion>,
        missing: Vec<String>,
    },
    /// A driver call failed; `action` says which and on what.
    #[error("{action} failed: {source}")]
    Driver {
        action: String,
        #[source]
        source: DriverFailure,
    },
    #[error("could not read `{}`: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not JSON of the expected shape, or of another format version.
    #[error("`{}` is not a kiln package manifest kiln-cuda can read: {detail}", .path.display())]
    BadManifest { path: PathBuf, detail: String },
    /// `cuModuleLoadData` rejected the package's fatbin.
    #[error("the driver could not load the kernels of `{package}`: {source}{notes}")]
    ModuleLoad {
        package: String,
        #[source]
        source: DriverFailure,
        /// What the code usually means for a kiln package, then the driver's JIT log (each
        /// on its own lines; empty when there is neither).
        notes: String,
    },
    /// A kernel the manifest lists is not in the loaded module.
    #[error("kernel `{kernel}` of package `{package}` is not in its fatbin: {source}")]
    MissingKernel {
        package: String,
        kernel: String,
        #[source]
        source: DriverFailure,
    },
    /// The device refused a kernel's dynamic shared memory (more than a block may use).
    #[error(
        "kernel `{kernel}` of package `{package}` needs {bytes} bytes of shared memory a block, \
         more than this device gives: {source}"
    )]
    SharedMemory {
        package: String,
        kernel: String,
        bytes: u64,
        #[source]
        source: DriverFailure,
    },
    #[error("package `{package}` has no kernel named `{kernel}`")]
    UnknownKernel { package: String, kernel: String },
    #[error("package `{package}` has no plan for function `{function}` (it has: {available})")]
    UnknownPlan {
        package: String,
        function: String,
        available: String,
    },
    /// The plan contradicts itself or the manifest's kernels (a compiler bug).
    #[error("plan `{plan}`: {detail}")]
    BadPlan { plan: String, detail: String },
    /// Arguments given to a single-kernel launch do not fit the kernel's parameters.
    #[error("kernel `{kernel}`: {detail}")]
    BadArguments { kernel: String, detail: String },
    /// A launch shape the hardware cannot run.
    #[error("kernel `{kernel}`: {detail}")]
    BadLaunchShape { kernel: String, detail: String },
    /// `cuLaunchKernel` failed, or a kernel faulted while `sync_after_each_launch` was on.
    #[error("kernel `{kernel}` with {shape} failed: {source}")]
    Launch {
        kernel: String,
        shape: LaunchShape,
        #[source]
        source: DriverFailure,
    },
    #[error("plan `{plan}` reads weight `{name}`, which was not bound (call bind_weights first)")]
    WeightNotBound { plan: String, name: String },
    #[error("weight `{name}` was not given to bind_weights")]
    MissingWeight { name: String },
    #[error("weight `{name}` is {found}, but the package expects {expected}")]
    WeightMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error("input {index} of `{plan}`: {detail}")]
    BadInput {
        plan: String,
        index: usize,
        detail: String,
    },
    /// A copy that would leave its buffer.
    #[error("out of bounds: {detail}")]
    OutOfBounds { detail: String },
    /// A device buffer given to a launch belongs to another `CudaDevice` (another stream).
    #[error("kernel `{kernel}`: argument {index} is a buffer of another CudaDevice")]
    ForeignBuffer { kernel: String, index: usize },
}

impl CudaError {
    /// A [`CudaError::Driver`] for `action`.
    pub(crate) fn driver(action: impl Into<String>, error: DriverError) -> CudaError {
        CudaError::Driver {
            action: action.into(),
            source: DriverFailure::from_driver(error),
        }
    }

    /// Whether this error says that there is no GPU to run on (no driver or no device), as
    /// opposed to a GPU that failed.
    pub fn is_no_gpu(&self) -> bool {
        matches!(
            self,
            CudaError::NoDriver { .. } | CudaError::NoDevice { .. }
        )
    }
}
