//! Compiled kernels and their launches: [`CpuKernel`] compiles a kernel once and runs its
//! grid with the blocks spread over worker threads.
//!
//! Workers take chunks of consecutive blocks (linear order, x fastest) from a shared
//! counter, each with its own shared memory and register file. Blocks of one launch run
//! concurrently, so like on the GPU they must not depend on each other's writes; blocks
//! that write the same element race (the last write wins). A fault stops the launch: the
//! workers finish their current block and take no more, and the fault of the lowest block
//! index seen is reported.

use crate::codegen::{self, FaultCode, FaultRecord, FAULT_SHARED_FLAG};
use crate::error::{CpuError, FaultBuffer};
use crate::native::{ArgWord, BlockFrame, NativeKernel, ParamWords, RawBuffer};
use kiln_kir::{Kernel, Param, Ty};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// One argument of a launch, in the order of the kernel's parameters.
#[derive(Debug)]
pub enum KernelArg<'a> {
    /// A global buffer in memory form: little-endian elements of the parameter's dtype,
    /// `dtype.size_bytes()` each (bool as one byte 0/1). Its element count is
    /// `len / size_bytes`; every access beyond it is reported as an error.
    Buffer(&'a mut [u8]),
    I32(i32),
    I64(i64),
    F32(f32),
    Pred(bool),
}

impl KernelArg<'_> {
    /// The scalar's type, or `None` for a buffer.
    fn scalar_ty(&self) -> Option<Ty> {
        match self {
            KernelArg::Buffer(_) => None,
            KernelArg::I32(_) => Some(Ty::I32),
            KernelArg::I64(_) => Some(Ty::I64),
            KernelArg::F32(_) => Some(Ty::F32),
            KernelArg::Pred(_) => Some(Ty::Pred),
        }
    }

    /// The scalar's bits, zero-extended to 64.
    fn scalar_bits(&self) -> u64 {
        match self {
            KernelArg::Buffer(_) => 0,
            KernelArg::I32(v) => u64::from(*v as u32),
            KernelArg::I64(v) => *v as u64,
            KernelArg::F32(v) => u64::from(v.to_bits()),
            KernelArg::Pred(v) => u64::from(*v),
        }
    }
}

/// A kernel compiled to native code for this CPU; compile once, launch many times (also
/// from several threads at once).
pub struct CpuKernel {
    kernel: Kernel,
    native: NativeKernel,
    workers: usize,
}

impl std::fmt::Debug for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuKernel")
            .field("kernel", &self.kernel.name)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl CpuKernel {
    /// Verifies `kernel` and compiles it with Cranelift.
    pub fn compile(kernel: &Kernel) -> Result<CpuKernel, CpuError> {
        kiln_kir::verify_kernel(kernel).map_err(|e| CpuError::InvalidKernel {
            kernel: kernel.name.clone(),
            message: e.to_string(),
        })?;
        let compiled = codegen::compile(kernel)?;
        Ok(CpuKernel {
            kernel: kernel.clone(),
            native: NativeKernel::new(compiled, kernel),
            workers: default_workers(),
        })
    }

    /// The kernel this was compiled from.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The same kernel launching its blocks on at most `workers` threads (at least 1).
    pub fn with_workers(mut self, workers: usize) -> CpuKernel {
        self.workers = workers.max(1);
        self
    }

    /// Runs `grid` blocks (x, y, z) with `args`, one per kernel parameter.
    pub fn launch(&self, grid: [u64; 3], args: &mut [KernelArg<'_>]) -> Result<(), CpuError> {
        let mut words = Vec::with_capacity(args.len());
        for (position, arg) in args.iter_mut().enumerate() {
            if let (Some(ty), Some(Param::Scalar { ty: expected, name })) =
                (arg.scalar_ty(), self.kernel.params.get(position))
            {
                if ty != *expected {
                    return Err(self.bad_launch(format!(
                        "argument {position} (`{name}`) is {ty}, the parameter is {expected}"
                    )));
                }
            }
            words.push(match arg {
                KernelArg::Buffer(bytes) => ArgWord::Buffer(RawBuffer::new(bytes)),
                scalar => ArgWord::Scalar(scalar.scalar_bits()),
            });
        }
        self.launch_words(grid, words)
    }

    /// Runs `grid` blocks with arguments already in word form (buffers may alias).
    pub(crate) fn launch_words(
        &self,
        grid: [u64; 3],
        args: Vec<ArgWord<'_>>,
    ) -> Result<(), CpuError> {
        for (axis, &blocks) in grid.iter().enumerate() {
            if blocks > i32::MAX as u64 {
                return Err(self.bad_launch(format!(
                    "grid axis {axis} has {blocks} blocks, more than 2^31 - 1"
                )));
            }
        }
        let total = grid[0]
            .checked_mul(grid[1])
            .and_then(|n| n.checked_mul(grid[2]))
            .ok_or_else(|| self.bad_launch(format!("grid {grid:?} has too many blocks")))?;
        let params = ParamWords::new(&self.native, args).map_err(|m| self.bad_launch(m))?;
        if total == 0 {
            return Ok(());
        }
        let workers = (self.workers as u64).min(total) as usize;
        let chunk = (total / (workers as u64 * 8)).max(1);
        let next_block = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let first_fault: Mutex<Option<(u64, FaultRecord)>> = Mutex::new(None);
        let work = || {
            let mut frame = BlockFrame::new(self.native.layout());
            while !stop.load(Ordering::Relaxed) {
                let start = next_block.fetch_add(chunk, Ordering::Relaxed);
                if start >= total {
                    break;
                }
                for linear in start..(start + chunk).min(total) {
                    let block = [
                        (linear % grid[0]) as u32,
                        (linear / grid[0] % grid[1]) as u32,
                        (linear / (grid[0] * grid[1])) as u32,
                    ];
                    if let Err(fault) = self.native.run_block(block, &params, &mut frame) {
                        stop.store(true, Ordering::Relaxed);
                        let mut first = first_fault.lock().unwrap_or_else(|e| e.into_inner());
                        if first.as_ref().is_none_or(|(seen, _)| linear < *seen) {
                            *first = Some((linear, fault));
                        }
                        return;
                    }
                }
            }
        };
        if workers == 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(work);
                }
            });
        }
        let fault = first_fault.into_inner().unwrap_or_else(|e| e.into_inner());
        match fault {
            None => Ok(()),
            Some((linear, record)) => {
                let block = [
                    linear % grid[0],
                    linear / grid[0] % grid[1],
                    linear / (grid[0] * grid[1]),
                ];
                Err(self.fault_error(block, &record, &params))
            }
        }
    }

    fn bad_launch(&self, message: impl Into<String>) -> CpuError {
        CpuError::BadLaunch {
            kernel: self.kernel.name.clone(),
            message: message.into(),
        }
    }

    fn fault_error(
        &self,
        block: [u64; 3],
        record: &FaultRecord,
        params: &ParamWords<'_>,
    ) -> CpuError {
        let kernel = self.kernel.name.clone();
        let thread = record.thread as u32;
        let index = record.index;
        let reason = match FaultCode::from_raw(record.code as u32) {
            Some(FaultCode::OutOfBounds | FaultCode::Misaligned) | None => {
                let (buffer, len) = self.fault_buffer(record.buffer, params);
                let width = record.width as u32;
                return if record.code == FaultCode::Misaligned as u64 {
                    CpuError::Misaligned {
                        kernel,
                        buffer,
                        index,
                        width,
                        block,
                        thread,
                    }
                } else {
                    CpuError::OutOfBounds {
                        kernel,
                        buffer,
                        index,
                        width,
                        len,
                        block,
                        thread,
                    }
                };
            }
            Some(FaultCode::DivisionByZero) => format!("integer division of {index} by zero"),
            Some(FaultCode::NonPositiveStep) => {
                format!("the loop's step is {index}, not positive")
            }
            Some(FaultCode::LoopOverflow) => {
                format!("the loop register overflows its type (stepping from {index})")
            }
        };
        CpuError::KernelFault {
            kernel,
            block,
            thread,
            reason,
        }
    }

    /// The buffer a fault record's buffer word names, and its element count.
    fn fault_buffer(&self, word: u64, params: &ParamWords<'_>) -> (FaultBuffer, u64) {
        if word & FAULT_SHARED_FLAG != 0 {
            let array = (word & !FAULT_SHARED_FLAG) as u32;
            let decl = &self.kernel.shared[array as usize];
            (
                FaultBuffer::Shared {
                    array,
                    name: decl.name.clone(),
                },
                u64::from(decl.len),
            )
        } else {
            let param = word as u32;
            (
                FaultBuffer::Global {
                    param,
                    name: self.kernel.params[param as usize].name().to_string(),
                },
                params.element_count(param as usize),
            )
        }
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
