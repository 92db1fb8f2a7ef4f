//! The Cranelift CPU backend for kernel IR: kernels compiled to native code that runs one
//! block at a time ([`CpuKernel`]), grids spread over the machine's cores, and whole
//! execution plans run over host buffers ([`CpuExecutor`]).
//!
//! This is the twin of the reference interpreter in `kiln_kir::interp` and the default
//! device when there is no GPU. How a block's threads run in lock step on one CPU thread
//! is described in the `fission` module; the native calling convention in `codegen`.

mod codegen;
mod error;
mod executor;
mod fission;
mod helpers;
mod launch;
mod native;

pub use error::{CpuError, FaultBuffer};
pub use executor::{CpuExecutor, KeptInput};
pub use launch::{CpuKernel, KernelArg};
