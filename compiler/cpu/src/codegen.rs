//! Cranelift IR for one block of a kernel: the block program of [`crate::fission`] lowered
//! to a native function
//!
//! ```text
//! extern "C" fn(block_x: u32, block_y: u32, block_z: u32,
//!               params: *const u64, shared: *mut u8, scratch: *mut u8,
//!               fault: *mut u64) -> u32
//! ```
//!
//! - `params` holds two words per kernel parameter: a buffer's address and its element
//!   count, or a scalar's bits (zero-extended) and 0.
//! - `shared` is the block's shared memory ([`FrameLayout::shared_offsets`]), `scratch` its
//!   register file ([`FrameLayout::scratch_bytes`]); the caller zeroes both before each
//!   block (a register read before any write yields 0).
//! - The result is 0, or a [`FaultCode`] after the function wrote a [`FaultRecord`] to
//!   `fault` and stopped: every load and store checks its index against the buffer's
//!   element count (and vector accesses their alignment) before touching memory.
//!
//! Numeric semantics follow `kiln_kir::interp`, the reference: integer arithmetic wraps,
//! shifts clamp their amount like PTX, float→int conversions truncate and saturate (NaN →
//! 0), f16/bf16/f8 go through the helpers of [`crate::helpers`]. What the IR leaves
//! undefined and the interpreter reports — integer division by zero, a loop step that is
//! not positive, a loop register that overflows — stops the block with a fault too, so the
//! native code never traps or hangs. `For` evaluates its end and step once, on entry.

use crate::error::CpuError;
use crate::fission::{BlockItem, Fission, Segment};
use crate::helpers::{Helper, HelperType};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, AtomicRmwOp, Block, BlockArg, Endianness, FuncRef, InstBuilder, MemFlagsData,
    Type, Value,
};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use kiln_ir::DType;
use kiln_kir::{BinOp, Buf, Const, Expr, Kernel, MmaInput, Param, Special, Stmt, Ty, UnOp, VarId};
use std::collections::BTreeMap;

mod tensor;

/// Bytes of one register slot in scratch memory.
pub(crate) const SLOT_BYTES: usize = 8;
/// Words of a [`FaultRecord`].
pub(crate) const FAULT_WORDS: usize = 5;
/// Set in a fault record's buffer word for a shared array (clear for a global buffer).
pub(crate) const FAULT_SHARED_FLAG: u64 = 1 << 32;

/// Why a block function stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum FaultCode {
    OutOfBounds = 1,
    Misaligned = 2,
    /// `index` holds the dividend.
    DivisionByZero = 3,
    /// `index` holds the step.
    NonPositiveStep = 4,
    /// `index` holds the loop register's value before the step.
    LoopOverflow = 5,
}

impl FaultCode {
    pub(crate) fn from_raw(raw: u32) -> Option<FaultCode> {
        match raw {
            1 => Some(FaultCode::OutOfBounds),
            2 => Some(FaultCode::Misaligned),
            3 => Some(FaultCode::DivisionByZero),
            4 => Some(FaultCode::NonPositiveStep),
            5 => Some(FaultCode::LoopOverflow),
            _ => None,
        }
    }
}

/// What a faulting block function writes to its `fault` words, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FaultRecord {
    pub code: u64,
    /// The parameter index of a global buffer, or [`FAULT_SHARED_FLAG`] | the shared array.
    pub buffer: u64,
    pub index: i64,
    pub width: u64,
    pub thread: u64,
}

impl FaultRecord {
    pub(crate) fn from_words(words: &[u64; FAULT_WORDS]) -> FaultRecord {
        FaultRecord {
            code: words[0],
            buffer: words[1],
            index: words[2] as i64,
            width: words[3],
            thread: words[4],
        }
    }
}

/// The per-block memory a block function needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FrameLayout {
    /// Byte offset of each shared array (16-byte aligned).
    pub shared_offsets: Vec<usize>,
    pub shared_bytes: usize,
    pub slot_count: u32,
    /// Where the shuffle staging area (one slot per thread) starts in scratch memory.
    pub shuffle_offset: usize,
    pub scratch_bytes: usize,
}

impl FrameLayout {
    pub(crate) fn new(kernel: &Kernel, slot_count: u32) -> FrameLayout {
        let mut shared_offsets = Vec::with_capacity(kernel.shared.len());
        let mut shared_bytes = 0usize;
        for array in &kernel.shared {
            shared_bytes = shared_bytes.next_multiple_of(16);
            shared_offsets.push(shared_bytes);
            shared_bytes += array.len as usize * array.dtype.size_bytes();
        }
        let threads = kernel.block_dim as usize;
        let shuffle_offset = threads * slot_count as usize * SLOT_BYTES;
        FrameLayout {
            shared_offsets,
            shared_bytes,
            slot_count,
            shuffle_offset,
            scratch_bytes: shuffle_offset + threads * SLOT_BYTES,
        }
    }
}

/// A kernel compiled and finalized in a JIT module of its own.
pub(crate) struct CompiledModule {
    pub module: JITModule,
    pub block_function: FuncId,
    pub layout: FrameLayout,
}

/// Lowers `kernel` (already verified) to a block function in a fresh JIT module.
pub(crate) fn compile(kernel: &Kernel) -> Result<CompiledModule, CpuError> {
    let codegen_error = |message: String| CpuError::Codegen {
        kernel: kernel.name.clone(),
        message,
    };
    if kiln_kir::wgmma::uses_wgmma(&kernel.body) {
        return Err(invalid(
            kernel,
            "Hopper's wgmma has no CPU lowering (the fusion selects it only for sm_90a builds)",
        ));
    }
    if kernel.block_dim == 0 || !kernel.block_dim.is_multiple_of(32) || kernel.block_dim > 1024 {
        return Err(invalid(
            kernel,
            format!(
                "block_dim {} is not a multiple of 32 in 32..=1024",
                kernel.block_dim
            ),
        ));
    }
    let fission = Fission::of(kernel);
    let layout = FrameLayout::new(kernel, fission.slot_count);

    let mut jit_builder =
        JITBuilder::with_flags(&[("opt_level", "speed")], default_libcall_names())
            .map_err(|e| codegen_error(e.to_string()))?;
    for helper in Helper::ALL {
        jit_builder.symbol(helper.symbol(), helper.address());
    }
    let mut module = JITModule::new(jit_builder);
    let target_config = module.target_config();
    let pointer = target_config.pointer_type();

    let mut helper_ids = BTreeMap::new();
    for helper in Helper::ALL {
        let mut signature = module.make_signature();
        let (params, result) = helper.signature();
        for param in params {
            signature.params.push(AbiParam::new(helper_type(*param)));
        }
        signature.returns.push(AbiParam::new(helper_type(result)));
        let id = module
            .declare_function(helper.symbol(), Linkage::Import, &signature)
            .map_err(|e| codegen_error(e.to_string()))?;
        helper_ids.insert(helper, id);
    }

    let mut signature = module.make_signature();
    for _ in 0..3 {
        signature.params.push(AbiParam::new(types::I32));
    }
    for _ in 0..4 {
        signature.params.push(AbiParam::new(pointer));
    }
    signature.returns.push(AbiParam::new(types::I32));
    let block_function = module
        .declare_function(
            &format!("{}_block", kernel.name),
            Linkage::Local,
            &signature,
        )
        .map_err(|e| codegen_error(e.to_string()))?;

    let mut context = module.make_context();
    context.func.signature = signature;
    let mut builder_context = FunctionBuilderContext::new();
    {
        let mut builder = FunctionBuilder::new(&mut context.func, &mut builder_context);
        let mut helpers = BTreeMap::new();
        for (helper, id) in &helper_ids {
            helpers.insert(*helper, module.declare_func_in_func(*id, builder.func));
        }
        let entry = builder.create_block();
        builder.append_block_params_for_function_params(entry);
        builder.switch_to_block(entry);
        builder.seal_block(entry);
        let args = builder.block_params(entry).to_vec();
        let fault_block = builder.create_block();
        for _ in 0..FAULT_WORDS {
            builder.append_block_param(fault_block, types::I64);
        }
        builder.set_cold_block(fault_block);
        let vars = kernel
            .vars
            .iter()
            .map(|var| builder.declare_var(clif_type(var.ty)))
            .collect();
        let thread_counter = builder.declare_var(types::I32);
        let mut emitter = Emitter {
            builder,
            kernel,
            slots: &fission.slots,
            layout: &layout,
            pointer,
            block_idx: [args[0], args[1], args[2]],
            shared_base: args[4],
            scratch_base: args[5],
            fault_base: args[6],
            globals: Vec::new(),
            scalars: Vec::new(),
            helpers,
            vars,
            thread_counter,
            fault_block,
        };
        emitter.load_params(args[3]);
        emitter.block_items(&fission.items)?;
        let ok = emitter.builder.ins().iconst(types::I32, 0);
        emitter.builder.ins().return_(&[ok]);
        emitter.emit_fault_block();
        emitter.builder.seal_all_blocks();
        emitter.builder.finalize(target_config);
    }
    module
        .define_function(block_function, &mut context)
        .map_err(|e| codegen_error(format!("{e:?}")))?;
    module.clear_context(&mut context);
    module
        .finalize_definitions()
        .map_err(|e| codegen_error(e.to_string()))?;
    Ok(CompiledModule {
        module,
        block_function,
        layout,
    })
}

fn invalid(kernel: &Kernel, message: impl Into<String>) -> CpuError {
    CpuError::InvalidKernel {
        kernel: kernel.name.clone(),
        message: message.into(),
    }
}

fn clif_type(ty: Ty) -> Type {
    match ty {
        Ty::Pred => types::I8,
        Ty::I32 => types::I32,
        Ty::I64 => types::I64,
        Ty::F32 => types::F32,
    }
}

fn helper_type(ty: HelperType) -> Type {
    match ty {
        HelperType::F32 => types::F32,
        HelperType::U32 => types::I32,
    }
}

/// Flags for accesses to kernel memory: bounds are checked beforehand, alignment is not
/// promised (buffers are byte slices), and memory is little-endian.
fn data_flags() -> MemFlagsData {
    MemFlagsData::new()
        .with_notrap()
        .with_endianness(Endianness::Little)
}

/// Flags for the backend's own words (params, scratch, fault record): native and aligned.
fn own_flags() -> MemFlagsData {
    MemFlagsData::trusted()
}

/// Whose registers an expression reads.
#[derive(Clone, Copy, Debug)]
enum Lane {
    /// One thread's, inside a thread loop: `thread` is its index (`I32`).
    Thread(Value),
    /// Thread 0's, from scratch memory, for block-uniform bounds and conditions.
    Uniform,
}

/// A global buffer parameter's address and element count, loaded once on entry.
#[derive(Clone, Copy, Debug)]
struct GlobalBuffer {
    base: Value,
    len: Value,
    dtype: DType,
}

/// The memory operand of one access, resolved.
#[derive(Clone, Copy, Debug)]
struct Operand {
    base: Value,
    /// Element count (`I64`).
    len: Value,
    dtype: DType,
    /// The fault record's buffer word.
    fault_id: u64,
}

struct Emitter<'a, 'k> {
    builder: FunctionBuilder<'a>,
    kernel: &'k Kernel,
    slots: &'a [Option<u32>],
    layout: &'a FrameLayout,
    pointer: Type,
    block_idx: [Value; 3],
    shared_base: Value,
    scratch_base: Value,
    fault_base: Value,
    globals: Vec<Option<GlobalBuffer>>,
    scalars: Vec<Option<(Value, Ty)>>,
    helpers: BTreeMap<Helper, FuncRef>,
    vars: Vec<Variable>,
    thread_counter: Variable,
    fault_block: Block,
}

impl Emitter<'_, '_> {
    fn invalid(&self, message: impl Into<String>) -> CpuError {
        invalid(self.kernel, message)
    }

    /// Loads every parameter's word(s) in the entry block.
    fn load_params(&mut self, params: Value) {
        for (index, param) in self.kernel.params.iter().enumerate() {
            let offset = (index * 2 * 8) as i32;
            match param {
                Param::Buffer { dtype, .. } => {
                    let base = self
                        .builder
                        .ins()
                        .load(self.pointer, own_flags(), params, offset);
                    let len = self
                        .builder
                        .ins()
                        .load(types::I64, own_flags(), params, offset + 8);
                    self.globals.push(Some(GlobalBuffer {
                        base,
                        len,
                        dtype: *dtype,
                    }));
                    self.scalars.push(None);
                }
                Param::Scalar { ty, .. } => {
                    let word = self
                        .builder
                        .ins()
                        .load(types::I64, own_flags(), params, offset);
                    let value = match ty {
                        Ty::I64 => word,
                        Ty::I32 => self.builder.ins().ireduce(types::I32, word),
                        Ty::Pred => {
                            let low = self.builder.ins().ireduce(types::I8, word);
                            self.builder.ins().icmp_imm_s(IntCC::NotEqual, low, 0)
                        }
                        Ty::F32 => {
                            let low = self.builder.ins().ireduce(types::I32, word);
                            self.builder
                                .ins()
                                .bitcast(types::F32, MemFlagsData::new(), low)
                        }
                    };
                    self.globals.push(None);
                    self.scalars.push(Some((value, *ty)));
                }
            }
        }
    }

    /// The fault exit: stores the record and returns its code.
    fn emit_fault_block(&mut self) {
        self.builder.switch_to_block(self.fault_block);
        let words = self.builder.block_params(self.fault_block).to_vec();
        for (position, word) in words.iter().enumerate() {
            self.builder
                .ins()
                .store(own_flags(), *word, self.fault_base, (position * 8) as i32);
        }
        let code = self.builder.ins().ireduce(types::I32, words[0]);
        self.builder.ins().return_(&[code]);
    }

    fn iconst(&mut self, ty: Type, value: i64) -> Value {
        let masked = if ty.bits() >= 64 {
            value
        } else {
            value & ((1i64 << ty.bits()) - 1)
        };
        self.builder.ins().iconst(ty, masked)
    }

    fn const_i64(&mut self, value: i64) -> Value {
        self.iconst(types::I64, value)
    }

    /// An `I64` converted to a pointer-sized integer.
    fn pointer_sized(&mut self, value: Value) -> Value {
        if self.pointer == types::I64 {
            value
        } else {
            self.builder.ins().ireduce(self.pointer, value)
        }
    }

    fn call_helper(&mut self, helper: Helper, args: &[Value]) -> Value {
        let func = self.helpers[&helper];
        let call = self.builder.ins().call(func, args);
        self.builder.inst_results(call)[0]
    }

    // ---------------------------------------------------------------------------------
    // Block level.
    // ---------------------------------------------------------------------------------

    fn block_items(&mut self, items: &[BlockItem<'_>]) -> Result<(), CpuError> {
        for item in items {
            match item {
                BlockItem::ThreadLoop(segment) => self.thread_loop(segment)?,
                BlockItem::Shuffle { dst, src, mask } => self.shuffle(*dst, *src, *mask)?,
                BlockItem::Mma(stmt) => self.mma(stmt)?,
                BlockItem::LdMatrix(stmt) => self.ldmatrix(stmt)?,
                BlockItem::For {
                    var,
                    start,
                    end,
                    step,
                    body,
                } => self.uniform_for(*var, start, end, step, body)?,
                BlockItem::If {
                    cond,
                    then,
                    otherwise,
                } => {
                    let condition = self.expr_of_type(Lane::Uniform, cond, Ty::Pred)?;
                    let then_block = self.builder.create_block();
                    let else_block = self.builder.create_block();
                    let merge = self.builder.create_block();
                    self.builder
                        .ins()
                        .brif(condition, then_block, &[], else_block, &[]);
                    self.builder.seal_block(then_block);
                    self.builder.seal_block(else_block);
                    self.builder.switch_to_block(then_block);
                    self.block_items(then)?;
                    self.builder.ins().jump(merge, &[]);
                    self.builder.switch_to_block(else_block);
                    self.block_items(otherwise)?;
                    self.builder.ins().jump(merge, &[]);
                    self.builder.seal_block(merge);
                    self.builder.switch_to_block(merge);
                }
            }
        }
        Ok(())
    }

    /// Emits `for thread in 0..block_dim { body(thread) }`; `body` gets the thread index
    /// (`I32`) and its scratch row address.
    fn for_each_thread(
        &mut self,
        body: &mut dyn FnMut(&mut Self, Value, Value) -> Result<(), CpuError>,
    ) -> Result<(), CpuError> {
        let header = self.builder.create_block();
        let body_block = self.builder.create_block();
        let exit = self.builder.create_block();
        let zero = self.builder.ins().iconst(types::I32, 0);
        self.builder.def_var(self.thread_counter, zero);
        self.builder.ins().jump(header, &[]);
        self.builder.switch_to_block(header);
        let thread = self.builder.use_var(self.thread_counter);
        let in_block = self.builder.ins().icmp_imm_s(
            IntCC::UnsignedLessThan,
            thread,
            i64::from(self.kernel.block_dim),
        );
        self.builder
            .ins()
            .brif(in_block, body_block, &[], exit, &[]);
        self.builder.seal_block(body_block);
        self.builder.switch_to_block(body_block);
        let row = self.scratch_row(thread);
        body(self, thread, row)?;
        let next = self.builder.ins().iadd_imm_s(thread, 1);
        self.builder.def_var(self.thread_counter, next);
        self.builder.ins().jump(header, &[]);
        self.builder.seal_block(header);
        self.builder.seal_block(exit);
        self.builder.switch_to_block(exit);
        Ok(())
    }

    /// The address of `thread`'s register slots.
    fn scratch_row(&mut self, thread: Value) -> Value {
        let wide = self.builder.ins().uextend(self.pointer, thread);
        let row_bytes = i64::from(self.layout.slot_count) * SLOT_BYTES as i64;
        let offset = self.builder.ins().imul_imm_s(wide, row_bytes);
        self.builder.ins().iadd(self.scratch_base, offset)
    }

    fn slot_offset(&self, var: VarId) -> Result<i32, CpuError> {
        match self.slots.get(var.0 as usize) {
            Some(Some(slot)) => Ok((*slot as usize * SLOT_BYTES) as i32),
            _ => Err(self.invalid(format!(
                "register {} is used at block level but has no scratch slot",
                var.0
            ))),
        }
    }

    fn var_ty(&self, var: VarId) -> Result<Ty, CpuError> {
        self.kernel
            .vars
            .get(var.0 as usize)
            .map(|v| v.ty)
            .ok_or_else(|| self.invalid(format!("register {} is not declared", var.0)))
    }

    fn thread_loop(&mut self, segment: &Segment<'_>) -> Result<(), CpuError> {
        self.for_each_thread(&mut |this: &mut Self, thread, row| {
            for &var in &segment.touched {
                let ty = this.var_ty(var)?;
                let value = match this.slots[var.0 as usize] {
                    Some(slot) => this.builder.ins().load(
                        clif_type(ty),
                        own_flags(),
                        row,
                        (slot as usize * SLOT_BYTES) as i32,
                    ),
                    None => this.zero(ty),
                };
                this.builder.def_var(this.vars[var.0 as usize], value);
            }
            for stmt in segment.stmts {
                this.stmt(thread, stmt)?;
            }
            for &var in &segment.written {
                if let Some(slot) = this.slots[var.0 as usize] {
                    let value = this.builder.use_var(this.vars[var.0 as usize]);
                    this.builder.ins().store(
                        own_flags(),
                        value,
                        row,
                        (slot as usize * SLOT_BYTES) as i32,
                    );
                }
            }
            Ok(())
        })
    }

    fn zero(&mut self, ty: Ty) -> Value {
        match ty {
            Ty::F32 => self.builder.ins().f32const(0.0),
            other => self.builder.ins().iconst(clif_type(other), 0),
        }
    }

    /// `dst = src of thread (t ^ mask)` for every thread: stage every thread's `src` slot,
    /// then read the partners' staged words.
    fn shuffle(&mut self, dst: VarId, src: VarId, mask: u32) -> Result<(), CpuError> {
        if self.var_ty(dst)? != self.var_ty(src)? {
            return Err(self.invalid(format!(
                "shuffle between registers {} and {} of different types",
                dst.0, src.0
            )));
        }
        let src_offset = self.slot_offset(src)?;
        let dst_offset = self.slot_offset(dst)?;
        let staging = self.layout.shuffle_offset as i64;
        self.for_each_thread(&mut |this: &mut Self, thread, row| {
            let word = this
                .builder
                .ins()
                .load(types::I64, own_flags(), row, src_offset);
            let stage = this.staging_address(thread, staging);
            this.builder.ins().store(own_flags(), word, stage, 0);
            Ok(())
        })?;
        self.for_each_thread(&mut |this: &mut Self, thread, row| {
            // Lanes exchange within their warp: the partner differs in the low 5 bits only.
            let partner = this.builder.ins().bxor_imm_s(thread, i64::from(mask & 31));
            let stage = this.staging_address(partner, staging);
            let word = this.builder.ins().load(types::I64, own_flags(), stage, 0);
            this.builder.ins().store(own_flags(), word, row, dst_offset);
            Ok(())
        })
    }

    fn staging_address(&mut self, thread: Value, staging: i64) -> Value {
        let wide = self.builder.ins().uextend(self.pointer, thread);
        let offset = self.builder.ins().imul_imm_s(wide, SLOT_BYTES as i64);
        let offset = self.builder.ins().iadd_imm_s(offset, staging);
        self.builder.ins().iadd(self.scratch_base, offset)
    }

    /// Writes `value` to `var`'s slot in every thread.
    fn store_all_threads(&mut self, var: VarId, value: Value) -> Result<(), CpuError> {
        let offset = self.slot_offset(var)?;
        self.for_each_thread(&mut |this: &mut Self, _thread, row| {
            this.builder.ins().store(own_flags(), value, row, offset);
            Ok(())
        })
    }

    fn uniform_for(
        &mut self,
        var: VarId,
        start: &Expr,
        end: &Expr,
        step: &Expr,
        body: &[BlockItem<'_>],
    ) -> Result<(), CpuError> {
        let ty = self.var_ty(var)?;
        if !ty.is_int() {
            return Err(self.invalid("a loop register must be an integer"));
        }
        let offset = self.slot_offset(var)?;
        let lane = Lane::Uniform;
        let first = self.expr_of_type(lane, start, ty)?;
        let bound = self.expr_of_type(lane, end, ty)?;
        let increment = self.expr_of_type(lane, step, ty)?;
        self.check_step(lane, increment);
        self.store_all_threads(var, first)?;
        let header = self.builder.create_block();
        let body_block = self.builder.create_block();
        let exit = self.builder.create_block();
        self.builder.ins().jump(header, &[]);
        self.builder.switch_to_block(header);
        let current =
            self.builder
                .ins()
                .load(clif_type(ty), own_flags(), self.scratch_base, offset);
        let more = self
            .builder
            .ins()
            .icmp(IntCC::SignedLessThan, current, bound);
        self.builder.ins().brif(more, body_block, &[], exit, &[]);
        self.builder.seal_block(body_block);
        self.builder.switch_to_block(body_block);
        self.block_items(body)?;
        let current =
            self.builder
                .ins()
                .load(clif_type(ty), own_flags(), self.scratch_base, offset);
        let next = self.step_register(lane, current, increment);
        self.store_all_threads(var, next)?;
        self.builder.ins().jump(header, &[]);
        self.builder.seal_block(header);
        self.builder.seal_block(exit);
        self.builder.switch_to_block(exit);
        Ok(())
    }

    /// Faults unless a loop's `step` is positive.
    fn check_step(&mut self, lane: Lane, step: Value) {
        let positive = self
            .builder
            .ins()
            .icmp_imm_s(IntCC::SignedGreaterThan, step, 0);
        let wide = self.widen(step);
        self.guard_value(lane, positive, FaultCode::NonPositiveStep, wide);
    }

    /// `current + step`, faulting when it overflows the register's type.
    fn step_register(&mut self, lane: Lane, current: Value, step: Value) -> Value {
        let (next, overflow) = self.builder.ins().sadd_overflow(current, step);
        let fits = self.builder.ins().icmp_imm_s(IntCC::Equal, overflow, 0);
        let wide = self.widen(current);
        self.guard_value(lane, fits, FaultCode::LoopOverflow, wide);
        next
    }

    /// An integer sign-extended to `I64`.
    fn widen(&mut self, value: Value) -> Value {
        if self.builder.func.dfg.value_type(value) == types::I64 {
            value
        } else {
            self.builder.ins().sextend(types::I64, value)
        }
    }

    /// The fault record's thread word for `lane`.
    fn thread_word(&mut self, lane: Lane) -> Value {
        match lane {
            Lane::Thread(thread) => self.builder.ins().uextend(types::I64, thread),
            Lane::Uniform => self.const_i64(0),
        }
    }

    /// Continues when `ok`, otherwise faults with `code` and `value` in the index word.
    fn guard_value(&mut self, lane: Lane, ok: Value, code: FaultCode, value: Value) {
        let thread = self.thread_word(lane);
        let code = self.const_i64(code as i64);
        let zero = self.const_i64(0);
        self.guard(ok, [code, zero, value, zero, thread]);
    }

    // ---------------------------------------------------------------------------------
    // Statements of one thread.
    // ---------------------------------------------------------------------------------

    fn stmt(&mut self, thread: Value, stmt: &Stmt) -> Result<(), CpuError> {
        let lane = Lane::Thread(thread);
        match stmt {
            Stmt::Assign(var, value) => {
                let ty = self.var_ty(*var)?;
                let value = self.expr_of_type(lane, value, ty)?;
                self.builder.def_var(self.vars[var.0 as usize], value);
            }
            Stmt::LoadVec { dsts, buf, index }
                if self.operand(*buf).is_ok_and(|o| {
                    dsts.first().is_some_and(|&d| {
                        self.var_ty(d)
                            .is_ok_and(|ty| kiln_kir::loads_raw_pairs(o.dtype, ty))
                    })
                }) =>
            {
                // Raw 16-bit element pairs: one little-endian 32-bit word a register.
                let operand = self.operand(*buf)?;
                for dst in dsts {
                    if self.var_ty(*dst)? != Ty::I32 {
                        return Err(self
                            .invalid(format!("register {} of a raw pair load is not i32", dst.0)));
                    }
                }
                let first = self.checked_index(lane, &operand, index, 2 * dsts.len())?;
                let mut loaded = Vec::with_capacity(dsts.len());
                for pair in 0..dsts.len() {
                    let index = self.builder.ins().iadd_imm_s(first, 2 * pair as i64);
                    let address = self.element_address(&operand, index);
                    let flags = data_flags();
                    loaded.push(self.builder.ins().load(types::I32, flags, address, 0));
                }
                for (dst, value) in dsts.iter().zip(loaded) {
                    self.builder.def_var(self.vars[dst.0 as usize], value);
                }
            }
            Stmt::LoadVec { dsts, buf, index } => {
                let width = dsts.len();
                let operand = self.operand(*buf)?;
                let element_ty = Ty::compute_type_of(operand.dtype);
                for dst in dsts {
                    if self.var_ty(*dst)? != element_ty {
                        return Err(self.invalid(format!(
                            "register {} of a vector load is not {element_ty}",
                            dst.0
                        )));
                    }
                }
                let first = self.checked_index(lane, &operand, index, width)?;
                let mut loaded = Vec::with_capacity(width);
                for lane_offset in 0..width {
                    let index = self.builder.ins().iadd_imm_s(first, lane_offset as i64);
                    loaded.push(self.load_element(&operand, index));
                }
                for (dst, value) in dsts.iter().zip(loaded) {
                    self.builder.def_var(self.vars[dst.0 as usize], value);
                }
            }
            Stmt::Store { buf, index, value } => {
                let operand = self.operand(*buf)?;
                let first = self.checked_index(lane, &operand, index, 1)?;
                let (value, ty) = self.expr(lane, value)?;
                self.store_element(&operand, first, value, ty);
            }
            Stmt::StoreVec { buf, index, values } => {
                let operand = self.operand(*buf)?;
                let first = self.checked_index(lane, &operand, index, values.len())?;
                let mut computed = Vec::with_capacity(values.len());
                for value in values {
                    computed.push(self.expr(lane, value)?);
                }
                for (lane_offset, (value, ty)) in computed.into_iter().enumerate() {
                    let index = self.builder.ins().iadd_imm_s(first, lane_offset as i64);
                    self.store_element(&operand, index, value, ty);
                }
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => {
                let ty = self.var_ty(*var)?;
                if !ty.is_int() {
                    return Err(self.invalid("a loop register must be an integer"));
                }
                let variable = self.vars[var.0 as usize];
                let first = self.expr_of_type(lane, start, ty)?;
                let bound = self.expr_of_type(lane, end, ty)?;
                let increment = self.expr_of_type(lane, step, ty)?;
                self.check_step(lane, increment);
                self.builder.def_var(variable, first);
                let header = self.builder.create_block();
                let body_block = self.builder.create_block();
                let exit = self.builder.create_block();
                self.builder.ins().jump(header, &[]);
                self.builder.switch_to_block(header);
                let current = self.builder.use_var(variable);
                let more = self
                    .builder
                    .ins()
                    .icmp(IntCC::SignedLessThan, current, bound);
                self.builder.ins().brif(more, body_block, &[], exit, &[]);
                self.builder.seal_block(body_block);
                self.builder.switch_to_block(body_block);
                for inner in body {
                    self.stmt(thread, inner)?;
                }
                let current = self.builder.use_var(variable);
                let next = self.step_register(lane, current, increment);
                self.builder.def_var(variable, next);
                self.builder.ins().jump(header, &[]);
                self.builder.seal_block(header);
                self.builder.seal_block(exit);
                self.builder.switch_to_block(exit);
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let condition = self.expr_of_type(lane, cond, Ty::Pred)?;
                let then_block = self.builder.create_block();
                let else_block = self.builder.create_block();
                let merge = self.builder.create_block();
                self.builder
                    .ins()
                    .brif(condition, then_block, &[], else_block, &[]);
                self.builder.seal_block(then_block);
                self.builder.seal_block(else_block);
                self.builder.switch_to_block(then_block);
                for inner in then {
                    self.stmt(thread, inner)?;
                }
                self.builder.ins().jump(merge, &[]);
                self.builder.switch_to_block(else_block);
                for inner in otherwise {
                    self.stmt(thread, inner)?;
                }
                self.builder.ins().jump(merge, &[]);
                self.builder.seal_block(merge);
                self.builder.switch_to_block(merge);
            }
            Stmt::CpAsync {
                dst,
                dst_index,
                src,
                src_index,
                src_len,
            } => self.cp_async(lane, [*dst, *src], dst_index, src_index, src_len)?,
            Stmt::PackHalves { dst, input, lo, hi } => {
                let helper = match input {
                    MmaInput::F16 => Helper::F32ToF16,
                    MmaInput::Bf16 => Helper::F32ToBf16,
                    MmaInput::E4M3 | MmaInput::E5M2 => {
                        return Err(self.invalid("PackHalves packs f16 or bf16 halves only"));
                    }
                };
                let lo = self.expr_of_type(lane, lo, Ty::F32)?;
                let hi = self.expr_of_type(lane, hi, Ty::F32)?;
                let lo = self.call_helper(helper, &[lo]);
                let hi = self.call_helper(helper, &[hi]);
                let hi = self.builder.ins().ishl_imm_u(hi, 16);
                let word = self.builder.ins().bor(lo, hi);
                self.builder.def_var(self.vars[dst.0 as usize], word);
            }
            // Copies complete when issued.
            Stmt::CpAsyncCommit | Stmt::CpAsyncWait(_) => {}
            Stmt::Wgmma(_) => return Err(self.invalid("wgmma has no CPU lowering")),
            // Kernels run one after another, and the CPU has no L2 to hint.
            Stmt::GridDependencyWait | Stmt::PrefetchL2 { .. } | Stmt::LaunchDependents => {}
            // Blocks run on several OS threads at once: a real (sequentially consistent)
            // read-modify-write, whose release/acquire ordering covers the stores before it.
            // The element is 4-byte aligned: buffers come from the allocator (16-byte
            // aligned) and the index is of `I32` elements.
            Stmt::AtomicAdd {
                dst,
                buf,
                index,
                value,
            } => {
                let operand = self.operand(*buf)?;
                if operand.dtype != DType::I32 {
                    return Err(self.invalid("an atomic add to a buffer that is not i32"));
                }
                let at = self.checked_index(lane, &operand, index, 1)?;
                let address = self.element_address(&operand, at);
                let (add, _) = self.expr(lane, value)?;
                let old = self.builder.ins().atomic_rmw(
                    types::I32,
                    MemFlagsData::trusted().with_endianness(Endianness::Little),
                    AtomicRmwOp::Add,
                    address,
                    add,
                );
                self.builder.def_var(self.vars[dst.0 as usize], old);
            }
            Stmt::Fence => {
                self.builder.ins().fence();
            }
            Stmt::Barrier | Stmt::ShuffleXor { .. } | Stmt::Mma { .. } | Stmt::LdMatrix { .. } => {
                return Err(self.invalid(
                    "a barrier or warp collective under thread-dependent control flow \
                     (the verifier requires block-uniform control flow)",
                ));
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Memory.
    // ---------------------------------------------------------------------------------

    fn operand(&mut self, buf: Buf) -> Result<Operand, CpuError> {
        match buf {
            Buf::Global(param) => match self.globals.get(param as usize) {
                Some(Some(global)) => Ok(Operand {
                    base: global.base,
                    len: global.len,
                    dtype: global.dtype,
                    fault_id: u64::from(param),
                }),
                _ => Err(self.invalid(format!("param {param} is not a buffer"))),
            },
            Buf::Shared(array) => {
                let Some(decl) = self.kernel.shared.get(array as usize) else {
                    return Err(self.invalid(format!("shared array {array} is not declared")));
                };
                let dtype = decl.dtype;
                let len = i64::from(decl.len);
                let offset = self.layout.shared_offsets[array as usize] as i64;
                let base = self.builder.ins().iadd_imm_s(self.shared_base, offset);
                let len = self.const_i64(len);
                Ok(Operand {
                    base,
                    len,
                    dtype,
                    fault_id: FAULT_SHARED_FLAG | u64::from(array),
                })
            }
        }
    }

    /// Evaluates an index, checks `index .. index + width` against the operand (and the
    /// alignment of a vector access), and returns it as `I64`.
    fn checked_index(
        &mut self,
        lane: Lane,
        operand: &Operand,
        index: &Expr,
        width: usize,
    ) -> Result<Value, CpuError> {
        let (value, ty) = self.expr(lane, index)?;
        let index = match ty {
            Ty::I64 => value,
            Ty::I32 => self.builder.ins().sextend(types::I64, value),
            other => return Err(self.invalid(format!("an index of type {other}"))),
        };
        let thread = self.thread_word(lane);
        let buffer = self.iconst(types::I64, operand.fault_id as i64);
        let width_word = self.const_i64(width as i64);
        if width > 1 {
            let misaligned = self.builder.ins().band_imm_s(index, width as i64 - 1);
            let aligned = self.builder.ins().icmp_imm_s(IntCC::Equal, misaligned, 0);
            let code = self.const_i64(FaultCode::Misaligned as i64);
            self.guard(aligned, [code, buffer, index, width_word, thread]);
        }
        let last = self.builder.ins().iadd_imm_s(index, width as i64 - 1);
        let first_in = self
            .builder
            .ins()
            .icmp(IntCC::UnsignedLessThan, index, operand.len);
        let last_in = self
            .builder
            .ins()
            .icmp(IntCC::UnsignedLessThan, last, operand.len);
        let in_bounds = self.builder.ins().band(first_in, last_in);
        let code = self.const_i64(FaultCode::OutOfBounds as i64);
        self.guard(in_bounds, [code, buffer, index, width_word, thread]);
        Ok(index)
    }

    /// Continues when `ok`, otherwise leaves through the fault block with `record`.
    fn guard(&mut self, ok: Value, record: [Value; FAULT_WORDS]) {
        let continue_block = self.builder.create_block();
        let args: Vec<BlockArg> = record.iter().map(|&v| BlockArg::from(v)).collect();
        self.builder
            .ins()
            .brif(ok, continue_block, &[], self.fault_block, &args);
        self.builder.seal_block(continue_block);
        self.builder.switch_to_block(continue_block);
    }

    fn element_address(&mut self, operand: &Operand, index: Value) -> Value {
        let bytes = self
            .builder
            .ins()
            .imul_imm_s(index, operand.dtype.size_bytes() as i64);
        let bytes = self.pointer_sized(bytes);
        self.builder.ins().iadd(operand.base, bytes)
    }

    /// Loads element `index` (checked) and converts it to its compute type.
    fn load_element(&mut self, operand: &Operand, index: Value) -> Value {
        let address = self.element_address(operand, index);
        let flags = data_flags();
        match operand.dtype {
            DType::F32 => self.builder.ins().load(types::F32, flags, address, 0),
            DType::I32 => self.builder.ins().load(types::I32, flags, address, 0),
            DType::I64 => self.builder.ins().load(types::I64, flags, address, 0),
            DType::I8 => self.builder.ins().sload8(types::I32, flags, address, 0),
            DType::Bool => {
                let byte = self.builder.ins().load(types::I8, flags, address, 0);
                self.builder.ins().icmp_imm_s(IntCC::NotEqual, byte, 0)
            }
            DType::F16 | DType::BF16 => {
                let bits = self.builder.ins().uload16(types::I32, flags, address, 0);
                let helper = if operand.dtype == DType::F16 {
                    Helper::F16ToF32
                } else {
                    Helper::Bf16ToF32
                };
                self.call_helper(helper, &[bits])
            }
            DType::F8E4M3 | DType::F8E5M2 => {
                let bits = self.builder.ins().uload8(types::I32, flags, address, 0);
                let helper = if operand.dtype == DType::F8E4M3 {
                    Helper::E4m3ToF32
                } else {
                    Helper::E5m2ToF32
                };
                self.call_helper(helper, &[bits])
            }
        }
    }

    /// Converts `value` (of `ty`) to the operand's dtype and stores it at `index` (checked).
    fn store_element(&mut self, operand: &Operand, index: Value, value: Value, ty: Ty) {
        let address = self.element_address(operand, index);
        let flags = data_flags();
        let dtype = operand.dtype;
        if dtype.is_float() {
            let float = self.convert(value, ty, Ty::F32);
            let narrow_helper = match dtype {
                DType::F32 => {
                    self.builder.ins().store(flags, float, address, 0);
                    return;
                }
                DType::F16 => Helper::F32ToF16,
                DType::BF16 => Helper::F32ToBf16,
                DType::F8E4M3 => Helper::F32ToE4m3,
                _ => Helper::F32ToE5m2,
            };
            let bits = self.call_helper(narrow_helper, &[float]);
            if dtype.size_bytes() == 2 {
                self.builder.ins().istore16(flags, bits, address, 0);
            } else {
                self.builder.ins().istore8(flags, bits, address, 0);
            }
        } else if dtype == DType::Bool {
            let truth = self.convert(value, ty, Ty::Pred);
            self.builder.ins().store(flags, truth, address, 0);
        } else if dtype == DType::I64 {
            let wide = self.convert(value, ty, Ty::I64);
            self.builder.ins().store(flags, wide, address, 0);
        } else {
            let narrow = self.convert(value, ty, Ty::I32);
            if dtype == DType::I8 {
                self.builder.ins().istore8(flags, narrow, address, 0);
            } else {
                self.builder.ins().store(flags, narrow, address, 0);
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Expressions.
    // ---------------------------------------------------------------------------------

    fn expr_of_type(&mut self, lane: Lane, expr: &Expr, want: Ty) -> Result<Value, CpuError> {
        let (value, ty) = self.expr(lane, expr)?;
        if ty != want {
            return Err(self.invalid(format!("expected a {want} expression, found {ty}")));
        }
        Ok(value)
    }

    fn expr(&mut self, lane: Lane, expr: &Expr) -> Result<(Value, Ty), CpuError> {
        Ok(match expr {
            Expr::Const(constant) => (self.constant(*constant), constant.ty()),
            Expr::Var(var) => {
                let ty = self.var_ty(*var)?;
                let value = match lane {
                    Lane::Thread(_) => self.builder.use_var(self.vars[var.0 as usize]),
                    Lane::Uniform => {
                        let offset = self.slot_offset(*var)?;
                        self.builder.ins().load(
                            clif_type(ty),
                            own_flags(),
                            self.scratch_base,
                            offset,
                        )
                    }
                };
                (value, ty)
            }
            Expr::Param(index) => match self.scalars.get(*index as usize) {
                Some(Some(scalar)) => *scalar,
                _ => return Err(self.invalid(format!("param {index} is not a scalar"))),
            },
            Expr::Special(special) => (self.special(lane, *special)?, Ty::I32),
            Expr::Unary(op, operand) => {
                let (value, ty) = self.expr(lane, operand)?;
                self.unary(*op, value, ty)?
            }
            Expr::Binary(op, a, b) => {
                let (a, a_ty) = self.expr(lane, a)?;
                let (b, b_ty) = self.expr(lane, b)?;
                if a_ty != b_ty {
                    return Err(self.invalid(format!(
                        "operands of {op:?} have different types: {a_ty} and {b_ty}"
                    )));
                }
                self.binary(lane, *op, a, b, a_ty)?
            }
            Expr::Fma(a, b, c) => {
                let (a, ty) = self.expr(lane, a)?;
                let b = self.expr_of_type(lane, b, ty)?;
                let c = self.expr_of_type(lane, c, ty)?;
                let value = match ty {
                    Ty::F32 => self.builder.ins().fma(a, b, c),
                    Ty::I32 | Ty::I64 => {
                        let product = self.builder.ins().imul(a, b);
                        self.builder.ins().iadd(product, c)
                    }
                    Ty::Pred => return Err(self.invalid("fma of predicates")),
                };
                (value, ty)
            }
            Expr::Select(cond, a, b) => {
                let cond = self.expr_of_type(lane, cond, Ty::Pred)?;
                let (a, ty) = self.expr(lane, a)?;
                let b = self.expr_of_type(lane, b, ty)?;
                (self.builder.ins().select(cond, a, b), ty)
            }
            Expr::Cast(to, operand) => {
                let (value, from) = self.expr(lane, operand)?;
                (self.convert(value, from, *to), *to)
            }
            Expr::Load { buf, index } => {
                let operand = self.operand(*buf)?;
                let index = self.checked_index(lane, &operand, index, 1)?;
                let value = self.load_element(&operand, index);
                (value, Ty::compute_type_of(operand.dtype))
            }
        })
    }

    fn constant(&mut self, constant: Const) -> Value {
        match constant {
            Const::Pred(b) => self.builder.ins().iconst(types::I8, i64::from(b)),
            Const::I32(v) => self.iconst(types::I32, i64::from(v)),
            Const::I64(v) => self.builder.ins().iconst(types::I64, v),
            Const::F32(v) => self.builder.ins().f32const(v),
        }
    }

    fn special(&mut self, lane: Lane, special: Special) -> Result<Value, CpuError> {
        let thread = match lane {
            Lane::Thread(thread) => thread,
            Lane::Uniform => self.builder.ins().iconst(types::I32, 0),
        };
        Ok(match special {
            Special::ThreadIdx => thread,
            Special::BlockIdx(axis) => match self.block_idx.get(usize::from(axis)) {
                Some(value) => *value,
                None => return Err(self.invalid(format!("block index axis {axis}"))),
            },
            Special::BlockDim => self
                .builder
                .ins()
                .iconst(types::I32, i64::from(self.kernel.block_dim)),
            Special::LaneId => self.builder.ins().band_imm_s(thread, 31),
            Special::WarpId => self.builder.ins().ushr_imm_s(thread, 5),
        })
    }

    /// A numeric conversion with the semantics of `Expr::Cast`.
    fn convert(&mut self, value: Value, from: Ty, to: Ty) -> Value {
        match (from, to) {
            _ if from == to => value,
            (Ty::I32, Ty::I64) => self.builder.ins().sextend(types::I64, value),
            (Ty::I64, Ty::I32) => self.builder.ins().ireduce(types::I32, value),
            (Ty::I32 | Ty::I64, Ty::F32) => self.builder.ins().fcvt_from_sint(types::F32, value),
            (Ty::F32, Ty::I32 | Ty::I64) => {
                self.builder.ins().fcvt_to_sint_sat(clif_type(to), value)
            }
            (Ty::Pred, Ty::I32 | Ty::I64) => self.builder.ins().uextend(clif_type(to), value),
            (Ty::Pred, Ty::F32) => {
                let wide = self.builder.ins().uextend(types::I32, value);
                self.builder.ins().fcvt_from_sint(types::F32, wide)
            }
            (Ty::I32 | Ty::I64, Ty::Pred) => {
                self.builder.ins().icmp_imm_s(IntCC::NotEqual, value, 0)
            }
            (Ty::F32, Ty::Pred) => {
                let zero = self.builder.ins().f32const(0.0);
                self.builder.ins().fcmp(FloatCC::NotEqual, value, zero)
            }
            _ => unreachable!("every pair of types is covered above"),
        }
    }

    fn unary(&mut self, op: UnOp, x: Value, ty: Ty) -> Result<(Value, Ty), CpuError> {
        let float_helper = match op {
            UnOp::Exp => Some(Helper::Exp),
            UnOp::Exp2 => Some(Helper::Exp2),
            UnOp::Log => Some(Helper::Log),
            UnOp::Sin => Some(Helper::Sin),
            UnOp::Cos => Some(Helper::Cos),
            UnOp::Tanh => Some(Helper::Tanh),
            UnOp::Erf => Some(Helper::Erf),
            UnOp::Sigmoid => Some(Helper::Sigmoid),
            UnOp::Rsqrt => Some(Helper::Rsqrt),
            _ => None,
        };
        let value = match (op, ty) {
            (_, Ty::F32) if float_helper.is_some() => {
                let helper = float_helper.expect("checked above");
                self.call_helper(helper, &[x])
            }
            (UnOp::Neg, Ty::F32) => self.builder.ins().fneg(x),
            (UnOp::Neg, Ty::I32 | Ty::I64) => self.builder.ins().ineg(x),
            (UnOp::Abs, Ty::F32) => self.builder.ins().fabs(x),
            (UnOp::Abs, Ty::I32 | Ty::I64) => self.builder.ins().iabs(x),
            (UnOp::Sqrt, Ty::F32) => self.builder.ins().sqrt(x),
            (UnOp::Floor, Ty::F32) => self.builder.ins().floor(x),
            (UnOp::Ceil, Ty::F32) => self.builder.ins().ceil(x),
            (UnOp::Recip, Ty::F32) => {
                let one = self.builder.ins().f32const(1.0);
                self.builder.ins().fdiv(one, x)
            }
            (UnOp::RoundBf16 | UnOp::RoundF16, Ty::F32) => {
                let (to, back) = if op == UnOp::RoundBf16 {
                    (Helper::F32ToBf16, Helper::Bf16ToF32)
                } else {
                    (Helper::F32ToF16, Helper::F16ToF32)
                };
                let bits = self.call_helper(to, &[x]);
                self.call_helper(back, &[bits])
            }
            (UnOp::Not, Ty::Pred) => self.builder.ins().bxor_imm_s(x, 1),
            (UnOp::Not, Ty::I32 | Ty::I64) => self.builder.ins().bnot(x),
            _ => return Err(self.invalid(format!("{op:?} of a {ty} operand"))),
        };
        Ok((value, ty))
    }

    fn binary(
        &mut self,
        lane: Lane,
        op: BinOp,
        a: Value,
        b: Value,
        ty: Ty,
    ) -> Result<(Value, Ty), CpuError> {
        if op.is_comparison() {
            let value = if ty == Ty::F32 {
                let cc = match op {
                    BinOp::Eq => FloatCC::Equal,
                    BinOp::Ne => FloatCC::NotEqual,
                    BinOp::Lt => FloatCC::LessThan,
                    BinOp::Le => FloatCC::LessThanOrEqual,
                    BinOp::Gt => FloatCC::GreaterThan,
                    _ => FloatCC::GreaterThanOrEqual,
                };
                self.builder.ins().fcmp(cc, a, b)
            } else {
                let signed = ty != Ty::Pred;
                let cc = match (op, signed) {
                    (BinOp::Eq, _) => IntCC::Equal,
                    (BinOp::Ne, _) => IntCC::NotEqual,
                    (BinOp::Lt, true) => IntCC::SignedLessThan,
                    (BinOp::Le, true) => IntCC::SignedLessThanOrEqual,
                    (BinOp::Gt, true) => IntCC::SignedGreaterThan,
                    (BinOp::Ge, true) => IntCC::SignedGreaterThanOrEqual,
                    (BinOp::Lt, false) => IntCC::UnsignedLessThan,
                    (BinOp::Le, false) => IntCC::UnsignedLessThanOrEqual,
                    (BinOp::Gt, false) => IntCC::UnsignedGreaterThan,
                    _ => IntCC::UnsignedGreaterThanOrEqual,
                };
                self.builder.ins().icmp(cc, a, b)
            };
            return Ok((value, Ty::Pred));
        }
        let value = match (op, ty) {
            (BinOp::Add, Ty::F32) => self.builder.ins().fadd(a, b),
            (BinOp::Sub, Ty::F32) => self.builder.ins().fsub(a, b),
            (BinOp::Mul, Ty::F32) => self.builder.ins().fmul(a, b),
            (BinOp::Div, Ty::F32) => self.builder.ins().fdiv(a, b),
            (BinOp::Rem, Ty::F32) => self.call_helper(Helper::Fmod, &[a, b]),
            (BinOp::Min, Ty::F32) => self.float_min_max(a, b, true),
            (BinOp::Max, Ty::F32) => self.float_min_max(a, b, false),
            (BinOp::Pow, Ty::F32) => self.call_helper(Helper::Pow, &[a, b]),
            (BinOp::Add, Ty::I32 | Ty::I64) => self.builder.ins().iadd(a, b),
            (BinOp::Sub, Ty::I32 | Ty::I64) => self.builder.ins().isub(a, b),
            (BinOp::Mul, Ty::I32 | Ty::I64) => self.builder.ins().imul(a, b),
            (BinOp::Div, Ty::I32 | Ty::I64) => self.integer_division(lane, a, b, ty, false),
            (BinOp::Rem, Ty::I32 | Ty::I64) => self.integer_division(lane, a, b, ty, true),
            (BinOp::Min, Ty::I32 | Ty::I64) => self.builder.ins().smin(a, b),
            (BinOp::Max, Ty::I32 | Ty::I64) => self.builder.ins().smax(a, b),
            (BinOp::And, Ty::I32 | Ty::I64 | Ty::Pred) => self.builder.ins().band(a, b),
            (BinOp::Or, Ty::I32 | Ty::I64 | Ty::Pred) => self.builder.ins().bor(a, b),
            (BinOp::Xor, Ty::I32 | Ty::I64 | Ty::Pred) => self.builder.ins().bxor(a, b),
            (BinOp::Shl, Ty::I32 | Ty::I64) => self.clamped_shift(a, b, ty, true),
            (BinOp::Shr, Ty::I32 | Ty::I64) => self.clamped_shift(a, b, ty, false),
            _ => return Err(self.invalid(format!("{op:?} of {ty} operands"))),
        };
        Ok((value, ty))
    }

    /// `a / b` or `a % b` truncating toward zero and wrapping for `MIN / -1`; a zero
    /// divisor faults (never a hardware trap).
    fn integer_division(
        &mut self,
        lane: Lane,
        a: Value,
        b: Value,
        ty: Ty,
        remainder: bool,
    ) -> Value {
        let cl = clif_type(ty);
        let nonzero = self.builder.ins().icmp_imm_s(IntCC::NotEqual, b, 0);
        let dividend = self.widen(a);
        self.guard_value(lane, nonzero, FaultCode::DivisionByZero, dividend);
        // `MIN / -1` traps in hardware: divide by 1 instead and negate (wrapping).
        let is_minus_one = self.builder.ins().icmp_imm_s(IntCC::Equal, b, -1);
        let one = self.builder.ins().iconst(cl, 1);
        let safe_divisor = self.builder.ins().select(is_minus_one, one, b);
        if remainder {
            let r = self.builder.ins().srem(a, safe_divisor);
            let zero = self.builder.ins().iconst(cl, 0);
            self.builder.ins().select(is_minus_one, zero, r)
        } else {
            let q = self.builder.ins().sdiv(a, safe_divisor);
            let negated = self.builder.ins().ineg(a);
            self.builder.ins().select(is_minus_one, negated, q)
        }
    }

    /// `a << b` or `a >> b` (arithmetic) with PTX's clamping: an amount that, read as
    /// unsigned, is at least the width shifts every bit out.
    fn clamped_shift(&mut self, a: Value, b: Value, ty: Ty, left: bool) -> Value {
        let width = if ty == Ty::I32 { 32 } else { 64 };
        let too_far = self
            .builder
            .ins()
            .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, b, width);
        if left {
            let shifted = self.builder.ins().ishl(a, b);
            let zero = self.builder.ins().iconst(clif_type(ty), 0);
            self.builder.ins().select(too_far, zero, shifted)
        } else {
            let shifted = self.builder.ins().sshr(a, b);
            let sign = self.builder.ins().sshr_imm_s(a, width - 1);
            self.builder.ins().select(too_far, sign, shifted)
        }
    }

    /// Min/max ignoring a NaN operand (the other is returned), with -0 < +0.
    fn float_min_max(&mut self, a: Value, b: Value, minimum: bool) -> Value {
        let both = if minimum {
            self.builder.ins().fmin(a, b)
        } else {
            self.builder.ins().fmax(a, b)
        };
        let a_nan = self.builder.ins().fcmp(FloatCC::Unordered, a, a);
        let b_nan = self.builder.ins().fcmp(FloatCC::Unordered, b, b);
        let prefer_b = self.builder.ins().select(a_nan, b, both);
        self.builder.ins().select(b_nan, a, prefer_b)
    }
}
