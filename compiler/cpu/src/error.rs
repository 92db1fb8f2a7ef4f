//! The error of this crate: a kernel that cannot be compiled, a launch whose arguments do
//! not fit the kernel, a fault inside a running kernel, or a plan step that cannot run.

use std::fmt;

/// Which memory operand of a kernel a fault hit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultBuffer {
    /// A global buffer parameter: its index in the kernel's parameters and its name.
    Global { param: u32, name: String },
    /// A shared-memory array: its index and name.
    Shared { array: u32, name: String },
}

impl fmt::Display for FaultBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultBuffer::Global { param, name } => write!(f, "buffer `{name}` (param {param})"),
            FaultBuffer::Shared { array, name } => {
                write!(f, "shared array `{name}` (shared {array})")
            }
        }
    }
}

/// Everything that can go wrong in the CPU backend.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The kernel breaks a rule of the kernel IR (found by the verifier or while lowering).
    #[error("kernel `{kernel}` is invalid: {message}")]
    InvalidKernel { kernel: String, message: String },
    /// Cranelift could not compile or link the kernel.
    #[error("kernel `{kernel}`: code generation failed: {message}")]
    Codegen { kernel: String, message: String },
    /// The arguments or the grid of a launch do not fit the kernel.
    #[error("kernel `{kernel}`: bad launch: {message}")]
    BadLaunch { kernel: String, message: String },
    /// A load or store outside its buffer (the access was not performed).
    #[error(
        "kernel `{kernel}`: block {block:?} thread {thread}: index {index} is out of bounds \
         for {buffer} of {len} elements (an access of {width})"
    )]
    OutOfBounds {
        kernel: String,
        buffer: FaultBuffer,
        index: i64,
        /// Elements accessed at once (1, or the vector width).
        width: u32,
        len: u64,
        block: [u64; 3],
        thread: u32,
    },
    /// A vector access at an index that is not a multiple of its width.
    #[error(
        "kernel `{kernel}`: block {block:?} thread {thread}: vector access of {width} \
         elements at index {index} of {buffer} is not aligned to {width}"
    )]
    Misaligned {
        kernel: String,
        buffer: FaultBuffer,
        index: i64,
        width: u32,
        block: [u64; 3],
        thread: u32,
    },
    /// The kernel did what the IR leaves undefined (integer division by zero, a loop step
    /// that is not positive, a loop register that overflows); the block stopped there.
    #[error("kernel `{kernel}`: block {block:?} thread {thread}: {reason}")]
    KernelFault {
        kernel: String,
        block: [u64; 3],
        thread: u32,
        reason: String,
    },
    /// A plan step that cannot run (a missing input or weight, a size that does not
    /// evaluate, a mismatched copy, ...).
    #[error("plan `{plan}`, {step}: {message}")]
    Plan {
        plan: String,
        step: String,
        message: String,
    },
    /// A kernel launched by a plan step failed.
    #[error("plan `{plan}`, {step}: {source}")]
    Step {
        plan: String,
        step: String,
        #[source]
        source: Box<CpuError>,
    },
}
