//! kiln's CUDA runtime: finds an NVIDIA GPU without ever panicking when there is none,
//! loads a compiled kiln package (`manifest.json` + `kernels.fatbin`) and runs its plans.
//!
//! - [`probe`]: the driver library, then the device ([`DeviceInfo`]), or a clear
//!   [`CudaError::NoDriver`] / [`CudaError::NoDevice`]. cudarc (dynamic loading, CUDA 13.0
//!   bindings) is only touched after the probe succeeded.
//! - [`CudaDevice`]: a context and the one stream everything is ordered on; buffers.
//! - [`CudaPackage`]: the manifest and the loaded module, one handle per kernel; single
//!   kernel launches and timings on caller-owned buffers.
//! - [`CudaProgram`]: one plan with its device memory (weights, inputs/outputs, the temp
//!   arena): [`CudaProgram::run`], CUDA graph capture/replay with
//!   [`CudaProgram::run_graph`], and [`CudaProgram::time_launches`] for benchmarks.
//! - Plain-Rust checks shared by all of them, testable without a GPU: symbol binding
//!   ([`bind_symbols`]), plan validation ([`check_plan`]), buffer placement ([`place`]),
//!   launch shapes ([`LaunchShape`]).
//!
//! Invariant: `unsafe` code lives only in the private `ffi` module, which documents why
//! each block is sound.

pub mod binding;
pub mod device;
pub mod error;
#[allow(unsafe_code)]
mod ffi;
pub mod launch;
pub mod layout;
pub mod package;
pub mod probe;
pub mod program;
pub mod timing;
pub mod validate;

pub use binding::{bind_symbols, SymbolValues};
pub use device::{CudaDevice, DeviceBuffer, DeviceTensor};
pub use error::{CudaError, DriverFailure};
pub use launch::LaunchShape;
pub use layout::{place, working_bytes, Placement, Storage};
pub use package::{CudaPackage, KernelArg};
pub use probe::{
    device_count, driver_library, driver_library_candidates, locate_driver_library, probe,
    probe_device, DeviceInfo, DriverLibrary, DriverVersion,
};
pub use program::{
    CudaProgram, FedInput, KeptRunTimes, PendingRun, ProgramOptions, DEPENDENT_LAUNCH_ENV,
    GRAPHS_ENV, SYNC_LAUNCHES_ENV,
};
pub use timing::{Timing, WARMUP_RUNS};
pub use validate::check_plan;
