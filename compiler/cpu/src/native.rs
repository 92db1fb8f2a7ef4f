//! The one module that touches JIT'd code: it turns a finalized Cranelift module into a
//! callable block function, owns (and frees) its code memory, and calls it with memory
//! whose shape it has validated itself.
//!
//! Safety rests on three facts established here and nowhere else:
//! - a [`ParamWords`] is only built from exclusive borrows of byte slices ([`RawBuffer`])
//!   in the kernel's parameter order, so every address the code receives is valid for the
//!   element count it receives with it, for as long as the borrow lives;
//! - the block function bounds-checks every access against those counts (and the shared
//!   arrays against their declared lengths) before performing it (see `codegen`);
//! - a [`BlockFrame`] is allocated from the kernel's own [`FrameLayout`], and a call checks
//!   that frame and parameters belong to this kernel.
#![allow(unsafe_code)]

use crate::codegen::{CompiledModule, FaultRecord, FrameLayout, FAULT_WORDS};
use cranelift_jit::JITModule;
use kiln_ir::DType;
use kiln_kir::{Kernel, Param};
use std::marker::PhantomData;

/// The ABI of a block function (see `codegen`).
type BlockFn = unsafe extern "C" fn(
    block_x: u32,
    block_y: u32,
    block_z: u32,
    params: *const u64,
    shared: *mut u8,
    scratch: *mut u8,
    fault: *mut u64,
) -> u32;

/// A finalized block function and the JIT module that owns its code.
pub(crate) struct NativeKernel {
    /// `Some` until dropped; taken by `Drop` to free the code memory.
    module: Option<JITModule>,
    entry: BlockFn,
    layout: FrameLayout,
    /// For each parameter: the dtype of a buffer, or `None` for a scalar.
    param_kinds: Vec<Option<DType>>,
}

// SAFETY: after `finalize_definitions` the module's code and data are immutable, and the
// module itself is only used again by `Drop`, which has exclusive access. Calling the block
// function from several threads at once is sound: it keeps no state outside the frame,
// parameters and fault words each call is given.
unsafe impl Send for NativeKernel {}
// SAFETY: see `Send`; `&NativeKernel` only allows calling the immutable code.
unsafe impl Sync for NativeKernel {}

impl NativeKernel {
    /// Takes ownership of the finalized module that `codegen::compile` made from `kernel`.
    pub(crate) fn new(compiled: CompiledModule, kernel: &Kernel) -> NativeKernel {
        let param_kinds = kernel
            .params
            .iter()
            .map(|param| match param {
                Param::Buffer { dtype, .. } => Some(*dtype),
                Param::Scalar { .. } => None,
            })
            .collect();
        let CompiledModule {
            module,
            block_function,
            layout,
        } = compiled;
        let address = module.get_finalized_function(block_function);
        // SAFETY: `codegen::compile` defined `block_function` with exactly the signature of
        // `BlockFn` (three I32, four pointers, an I32 result, the host's default calling
        // convention, which is `extern "C"`) and finalized the module, so `address` points to
        // executable code of that type; it stays valid until `Drop` frees the module.
        let entry = unsafe { std::mem::transmute::<*const u8, BlockFn>(address) };
        NativeKernel {
            module: Some(module),
            entry,
            layout,
            param_kinds,
        }
    }

    pub(crate) fn layout(&self) -> &FrameLayout {
        &self.layout
    }

    /// Runs block `block_idx` in `frame` with `params`; returns the fault record when the
    /// block stopped on a fault.
    pub(crate) fn run_block(
        &self,
        block_idx: [u32; 3],
        params: &ParamWords<'_>,
        frame: &mut BlockFrame,
    ) -> Result<(), FaultRecord> {
        assert_eq!(
            params.kernel_entry, self.entry as usize,
            "parameters built for another kernel"
        );
        assert!(
            frame.shared.len() * 8 >= self.layout.shared_bytes
                && frame.scratch.len() * 8 >= self.layout.scratch_bytes,
            "frame smaller than the kernel's layout"
        );
        frame.shared.fill(0);
        frame.scratch.fill(0);
        frame.fault = [0; FAULT_WORDS];
        // SAFETY: `params` was built by `ParamWords::new` for this kernel (checked above), so
        // every buffer word is the address of memory borrowed for the launch, valid for the
        // element count beside it, which the code checks each index against; the frame
        // holds at least the shared and scratch bytes of this kernel's layout (checked
        // above), and `fault` has the `FAULT_WORDS` words the code writes on a fault.
        let code = unsafe {
            (self.entry)(
                block_idx[0],
                block_idx[1],
                block_idx[2],
                params.words.as_ptr(),
                frame.shared.as_mut_ptr().cast::<u8>(),
                frame.scratch.as_mut_ptr().cast::<u8>(),
                frame.fault.as_mut_ptr(),
            )
        };
        if code == 0 {
            Ok(())
        } else {
            Err(FaultRecord::from_words(&frame.fault))
        }
    }
}

impl Drop for NativeKernel {
    fn drop(&mut self) {
        if let Some(module) = self.module.take() {
            // SAFETY: `drop` has exclusive access, so no call of `entry` is running (every
            // call borrows `self`), and `entry` is never called again.
            unsafe { module.free_memory() };
        }
    }
}

/// An exclusively borrowed byte buffer, as an address and a length that may be shared with
/// other `RawBuffer`s of the same borrow (kernel arguments may alias: a buffer and a view
/// of it, or one buffer passed twice).
#[derive(Debug)]
pub(crate) struct RawBuffer<'a> {
    address: *mut u8,
    len_bytes: usize,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> RawBuffer<'a> {
    pub(crate) fn new(bytes: &'a mut [u8]) -> RawBuffer<'a> {
        RawBuffer {
            address: bytes.as_mut_ptr(),
            len_bytes: bytes.len(),
            _borrow: PhantomData,
        }
    }

    /// The first `len_bytes` bytes of the same memory, or `None` when there are fewer.
    pub(crate) fn prefix(&self, len_bytes: usize) -> Option<RawBuffer<'a>> {
        (len_bytes <= self.len_bytes).then_some(RawBuffer {
            address: self.address,
            len_bytes,
            _borrow: PhantomData,
        })
    }
}

/// One kernel argument on its way into the parameter words.
#[derive(Debug)]
pub(crate) enum ArgWord<'a> {
    Buffer(RawBuffer<'a>),
    /// A scalar's bits, zero-extended.
    Scalar(u64),
}

/// The `params` words of a launch: for each parameter, an address and an element count,
/// or a scalar's bits and 0. Built only by [`ParamWords::new`], which checks them against
/// the kernel.
#[derive(Debug)]
pub(crate) struct ParamWords<'a> {
    words: Vec<u64>,
    kernel_entry: usize,
    _buffers: PhantomData<&'a mut [u8]>,
}

impl<'a> ParamWords<'a> {
    /// The parameter words for `kernel`, or a message saying which argument does not fit
    /// its parameter.
    pub(crate) fn new(kernel: &NativeKernel, args: Vec<ArgWord<'a>>) -> Result<Self, String> {
        if args.len() != kernel.param_kinds.len() {
            return Err(format!(
                "{} arguments for {} parameters",
                args.len(),
                kernel.param_kinds.len()
            ));
        }
        let mut words = Vec::with_capacity(2 * args.len());
        for (position, (arg, kind)) in args.into_iter().zip(&kernel.param_kinds).enumerate() {
            match (arg, kind) {
                (ArgWord::Buffer(buffer), Some(dtype)) => {
                    if !buffer.len_bytes.is_multiple_of(dtype.size_bytes()) {
                        return Err(format!(
                            "argument {position} has {} bytes, not a whole number of {dtype} \
                             elements",
                            buffer.len_bytes
                        ));
                    }
                    let element_count = buffer.len_bytes / dtype.size_bytes();
                    words.push(buffer.address as usize as u64);
                    words.push(element_count as u64);
                }
                (ArgWord::Scalar(bits), None) => {
                    words.push(bits);
                    words.push(0);
                }
                (ArgWord::Buffer(_), None) => {
                    return Err(format!("argument {position} is a buffer for a scalar"));
                }
                (ArgWord::Scalar(_), Some(_)) => {
                    return Err(format!("argument {position} is a scalar for a buffer"));
                }
            }
        }
        Ok(ParamWords {
            words,
            kernel_entry: kernel.entry as usize,
            _buffers: PhantomData,
        })
    }

    /// The element count passed for parameter `param` (0 for a scalar).
    pub(crate) fn element_count(&self, param: usize) -> u64 {
        self.words.get(2 * param + 1).copied().unwrap_or(0)
    }
}

/// One worker's per-block memory: shared arrays, the register file and the fault record
/// (8-byte aligned words).
#[derive(Debug)]
pub(crate) struct BlockFrame {
    shared: Vec<u64>,
    scratch: Vec<u64>,
    fault: [u64; FAULT_WORDS],
}

impl BlockFrame {
    pub(crate) fn new(layout: &FrameLayout) -> BlockFrame {
        BlockFrame {
            shared: vec![0; layout.shared_bytes.div_ceil(8)],
            scratch: vec![0; layout.scratch_bytes.div_ceil(8)],
            fault: [0; FAULT_WORDS],
        }
    }
}
