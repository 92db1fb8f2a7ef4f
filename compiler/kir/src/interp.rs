//! The reference interpreter of kernel IR: the executable definition of its semantics (see
//! the `kernel` module's documentation), against which both backends are tested. Clarity
//! over speed.
//!
//! A launch runs the blocks one after another (x fastest, then y, then z). Within a block
//! all threads run in lock step, one statement at a time, under an *active mask*:
//! - every statement first evaluates its expressions for every active thread, then writes
//!   (registers or memory, stores in thread order), so a statement never sees a write of
//!   the same statement by another thread;
//! - `If` runs its `then` branch for the active threads whose condition holds and then its
//!   `else` branch for the others (a branch no thread takes is skipped);
//! - `For` evaluates start, end and step once per thread on entry, then runs the body for
//!   the threads whose register is below their end, adding each one's step, until no
//!   thread is left (a step that is not positive, or a register that would overflow, is an
//!   error);
//! - `Barrier` is a no-op under lock step; it is an error unless every thread of the block
//!   is active;
//! - `ShuffleXor` gives each active thread the value its source register had in lane
//!   `lane ^ mask` of its warp before the statement; it is an error unless every lane of
//!   each warp that executes it is active;
//! - `Mma` and `LdMatrix` compute each warp's result from all of its lanes' registers (or
//!   indices) before the statement, like `ShuffleXor`, with the same rule about partially
//!   active warps; `Mma` uses [`crate::tensor::mma`]; `LdMatrix` checks the rows
//!   it reads (alignment, bounds, written) and ignores the indices of the unused lanes;
//! - `CpAsync` reads its source when issued and keeps the bytes with the thread's open
//!   group; the destination elements are *pending* until a `CpAsyncWait` of that thread
//!   completes the group, and any load or store of a pending element is an error (a race
//!   on real hardware); copies still pending at the end of the block are dropped;
//! - `Wgmma` statements (the `wgmma` submodule) compute a warpgroup's product from its
//!   shared tiles when issued, and track the async proxy: an `Mma` reading an element
//!   whose writer has not executed `FenceProxyAsync` since the write, a write to an
//!   element a batch not yet waited for reads, or any other statement touching an
//!   accumulator of such a batch, is an error;
//! - `Select` evaluates both arms (as a GPU's `selp` does): a load in the arm not chosen
//!   must be in bounds too.
//!
//! Registers start at 0 in every thread of every block; shared memory starts unwritten,
//! and reading an element that no thread of the block has written is an error.
//! Loads and stores convert between the memory dtype and the compute type: f16 and bf16 as
//! IEEE/bfloat16 bits (via `half`, round to nearest even), f8 as OCP bits (`kiln_ir::fp8`:
//! round to nearest even, saturating, NaN kept), i8 sign-extended on load and wrapped on
//! store, bool as a byte (nonzero is true, stores 0 or 1). Memory is little-endian bytes.
//!
//! Arithmetic: integers wrap; integer division or remainder by zero is an error (the IR
//! leaves it undefined); shifts by an amount that, read as unsigned, is at least the width
//! give 0 (`Shl`) or the sign (`Shr`, arithmetic), like PTX's clamped shifts. Floats are
//! IEEE f32: `Div`, `Sqrt`, `Recip` correctly rounded; `Rem` is C's `fmodf` (truncated,
//! exact); `Min`/`Max` return the other operand when one is NaN; `Ne` is true when an
//! operand is NaN (the other comparisons false); `Fma` rounds once; `Exp`, `Log`, `Sin`,
//! `Cos`, `Tanh`, `Erf`, `Pow` come from `libm`, `Rsqrt` and `Sigmoid` are computed in f64
//! and rounded. `Cast`: float → int truncates toward zero and saturates (NaN gives 0),
//! int → float rounds to nearest even, i64 → i32 wraps, anything → pred is `!= 0`
//! (NaN is true), pred → number is 0 or 1.
//!
//! Every failure (out-of-bounds or misaligned access, a bad launch argument, …) is a
//! [`KirError`] naming the kernel, the statement, the block and thread and, for memory, the
//! buffer and the index — never a panic.

use crate::error::KirError;
use crate::kernel::{BinOp, Buf, Const, Expr, Kernel, Param, Special, Stmt, Ty, UnOp, VarId};
use crate::print::Names;
use crate::tensor::{self, WARP};
use crate::verify::verify_kernel;
use half::{bf16, f16};
use kiln_ir::fp8::{E4M3, E5M2};
use kiln_ir::DType;
use std::collections::VecDeque;

mod wgmma;

/// Evaluates the kernel's grid with the given symbol values.
pub fn launch_grid(
    kernel: &Kernel,
    symbols: &dyn Fn(&str) -> Option<u64>,
) -> Result<[u64; 3], KirError> {
    let mut grid = [0; 3];
    for (axis, size) in kernel.grid.iter().enumerate() {
        grid[axis] = size.eval(symbols).ok_or_else(|| {
            KirError::new(
                &kernel.name,
                "launch",
                format!("grid axis {axis} `{size}` cannot be evaluated (an unbound symbol, an overflow or a division by zero)"),
            )
        })?;
    }
    Ok(grid)
}

/// Runs `kernel` on `grid` blocks after verifying it.
///
/// `buffers` holds the memory of each `Param::Buffer` in parameter order (little-endian
/// elements of the parameter's dtype; the length must be a multiple of the element size),
/// `scalars` the value of each `Param::Scalar` in parameter order (of the declared type).
pub fn run_kernel(
    kernel: &Kernel,
    grid: [u64; 3],
    buffers: &mut [&mut [u8]],
    scalars: &[Const],
) -> Result<(), KirError> {
    run_kernel_prefetching(kernel, grid, buffers, scalars).map(|_| ())
}

/// One `PrefetchL2` a run issued: the block, the buffer's parameter index, and the byte
/// range from the buffer's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefetch {
    pub block: [u64; 3],
    pub param: u32,
    pub first_byte: u64,
    pub bytes: u64,
}

/// [`run_kernel`], also returning every L2 prefetch the threads issued, in order (for tests
/// of what a kernel asks L2 for; the run itself ignores them).
pub fn run_kernel_prefetching(
    kernel: &Kernel,
    grid: [u64; 3],
    buffers: &mut [&mut [u8]],
    scalars: &[Const],
) -> Result<Vec<Prefetch>, KirError> {
    let mut interpreter = Interpreter::new(kernel, grid, buffers, scalars)?;
    for block in blocks(grid) {
        interpreter.begin_block(block);
        interpreter.run_body(0..kernel.body.len())?;
    }
    Ok(interpreter.prefetches)
}

/// Runs `kernel` as programmatic dependent launch may run it on the GPU: the statements of
/// every block before its `GridDependencyWait` read `before` (the memory as the kernel
/// launched before this one may still find it), then the rest of every block runs on
/// `buffers` (that kernel's writes done). A kernel whose early loads read memory the
/// previous kernel writes reads the stale values here, as it may on the GPU. `before`
/// holds the buffers in `buffers`' order; the early statements write no memory.
pub fn run_kernel_across_wait(
    kernel: &Kernel,
    grid: [u64; 3],
    before: &[&[u8]],
    buffers: &mut [&mut [u8]],
    scalars: &[Const],
) -> Result<(), KirError> {
    let wait = kernel
        .body
        .iter()
        .position(|s| *s == Stmt::GridDependencyWait)
        .unwrap_or(0);
    let mut early: Vec<Vec<u8>> = before.iter().map(|b| b.to_vec()).collect();
    let mut early: Vec<&mut [u8]> = early.iter_mut().map(|b| b.as_mut_slice()).collect();
    let mut saved = Vec::new();
    {
        let mut interpreter = Interpreter::new(kernel, grid, &mut early, scalars)?;
        for block in blocks(grid) {
            interpreter.begin_block(block);
            interpreter.run_body(0..wait)?;
            saved.push(interpreter.take_block());
        }
    }
    let mut interpreter = Interpreter::new(kernel, grid, buffers, scalars)?;
    for (block, state) in blocks(grid).zip(saved) {
        interpreter.resume_block(block, state);
        interpreter.run_body(wait..kernel.body.len())?;
    }
    Ok(())
}

/// The blocks of `grid` in launch order (x fastest).
fn blocks(grid: [u64; 3]) -> impl Iterator<Item = [u64; 3]> {
    (0..grid[2])
        .flat_map(move |z| (0..grid[1]).flat_map(move |y| (0..grid[0]).map(move |x| [x, y, z])))
}

/// What a block holds between statements: registers, shared memory, copies in flight.
struct BlockState {
    shared: Vec<SharedArray>,
    registers: Vec<Vec<Const>>,
    copies: Vec<AsyncCopies>,
    proxy: wgmma::AsyncProxy,
}

impl<'k: 'b, 'b> Interpreter<'k, 'b> {
    /// Checks the kernel and its arguments and binds them.
    fn new(
        kernel: &'k Kernel,
        grid: [u64; 3],
        buffers: &'b mut [&mut [u8]],
        scalars: &[Const],
    ) -> Result<Interpreter<'k, 'b>, KirError> {
        verify_kernel(kernel)?;
        let launch_error = |message: String| KirError::new(&kernel.name, "launch", message);

        let buffer_params = kernel
            .params
            .iter()
            .filter(|p| matches!(p, Param::Buffer { .. }))
            .count();
        let scalar_params = kernel.params.len() - buffer_params;
        if buffers.len() != buffer_params {
            return Err(launch_error(format!(
                "{} buffers given for {buffer_params} buffer parameters",
                buffers.len()
            )));
        }
        if scalars.len() != scalar_params {
            return Err(launch_error(format!(
                "{} scalars given for {scalar_params} scalar parameters",
                scalars.len()
            )));
        }
        for (axis, &blocks) in grid.iter().enumerate() {
            if blocks > i32::MAX as u64 {
                return Err(launch_error(format!(
                    "{blocks} blocks along axis {axis}: block indices are i32"
                )));
            }
        }

        let mut globals: Vec<Option<GlobalBuffer<'_>>> = Vec::with_capacity(kernel.params.len());
        let mut scalar_values: Vec<Option<Const>> = Vec::with_capacity(kernel.params.len());
        let mut buffer_slots = buffers.iter_mut();
        let mut scalar_slots = scalars.iter();
        for param in &kernel.params {
            match param {
                Param::Buffer { name, dtype, .. } => {
                    let bytes: &mut [u8] = buffer_slots.next().expect("counted above");
                    if !bytes.len().is_multiple_of(dtype.size_bytes()) {
                        return Err(launch_error(format!(
                            "buffer `{name}` has {} bytes, not a whole number of {dtype} elements",
                            bytes.len()
                        )));
                    }
                    globals.push(Some(GlobalBuffer {
                        name,
                        dtype: *dtype,
                        bytes,
                    }));
                    scalar_values.push(None);
                }
                Param::Scalar { name, ty } => {
                    let value = *scalar_slots.next().expect("counted above");
                    if value.ty() != *ty {
                        return Err(launch_error(format!(
                            "scalar `{name}` is {ty}, but a {} value was given",
                            value.ty()
                        )));
                    }
                    globals.push(None);
                    scalar_values.push(Some(value));
                }
            }
        }
        Ok(Interpreter {
            kernel,
            names: Names::new(kernel),
            scalars: scalar_values,
            globals,
            shared: Vec::new(),
            registers: Vec::new(),
            copies: Vec::new(),
            block: [0; 3],
            prefetches: Vec::new(),
            proxy: wgmma::AsyncProxy::default(),
        })
    }
}

/// A global buffer argument.
struct GlobalBuffer<'b> {
    name: &'b str,
    dtype: DType,
    bytes: &'b mut [u8],
}

/// One shared-memory array of the running block.
struct SharedArray {
    dtype: DType,
    bytes: Vec<u8>,
    written: Vec<bool>,
    /// Elements a `CpAsync` will write when its group completes.
    pending: Vec<bool>,
}

/// A `CpAsync` in flight: the shared array, its first element, and the 16 bytes (source
/// elements, then zeros) read when it was issued.
struct PendingCopy {
    array: usize,
    first: usize,
    bytes: Vec<u8>,
}

/// One thread's asynchronous copies: the open group and the committed ones, oldest first.
#[derive(Default)]
struct AsyncCopies {
    open: Vec<PendingCopy>,
    committed: VecDeque<Vec<PendingCopy>>,
}

/// Which list of statements a path step goes into.
#[derive(Clone, Copy)]
enum Branch {
    Body,
    Then,
    Else,
}

/// The position of a statement, outermost first: `body[2].then[0]`.
type Path = Vec<(Branch, usize)>;

fn format_path(path: &Path) -> String {
    path.iter()
        .map(|(branch, i)| {
            let name = match branch {
                Branch::Body => "body",
                Branch::Then => "then",
                Branch::Else => "else",
            };
            format!("{name}[{i}]")
        })
        .collect::<Vec<_>>()
        .join(".")
}

struct Interpreter<'k, 'b> {
    kernel: &'k Kernel,
    names: Names<'k>,
    /// The value of each scalar parameter, by parameter index.
    scalars: Vec<Option<Const>>,
    /// The memory of each buffer parameter, by parameter index.
    globals: Vec<Option<GlobalBuffer<'b>>>,
    shared: Vec<SharedArray>,
    /// `registers[thread][var]`.
    registers: Vec<Vec<Const>>,
    /// `copies[thread]`.
    copies: Vec<AsyncCopies>,
    block: [u64; 3],
    /// The L2 prefetches issued so far.
    prefetches: Vec<Prefetch>,
    /// The async proxy's view of shared memory (`Wgmma`).
    proxy: wgmma::AsyncProxy,
}

fn zero_of(ty: Ty) -> Const {
    match ty {
        Ty::Pred => Const::Pred(false),
        Ty::I32 => Const::I32(0),
        Ty::I64 => Const::I64(0),
        Ty::F32 => Const::F32(0.0),
    }
}

impl Interpreter<'_, '_> {
    fn threads(&self) -> usize {
        self.kernel.block_dim as usize
    }

    /// Starts `block`: zeroed registers and shared memory, no copies in flight.
    fn begin_block(&mut self, block: [u64; 3]) {
        self.block = block;
        let zeros: Vec<Const> = self.kernel.vars.iter().map(|v| zero_of(v.ty)).collect();
        self.registers = vec![zeros; self.threads()];
        self.shared = self
            .kernel
            .shared
            .iter()
            .map(|s| SharedArray {
                dtype: s.dtype,
                bytes: vec![0; s.len as usize * s.dtype.size_bytes()],
                written: vec![false; s.len as usize],
                pending: vec![false; s.len as usize],
            })
            .collect();
        self.copies = (0..self.threads())
            .map(|_| AsyncCopies::default())
            .collect();
        let lens: Vec<usize> = self.kernel.shared.iter().map(|s| s.len as usize).collect();
        self.proxy = wgmma::AsyncProxy::new(&lens, self.threads());
    }

    /// The running block's state, to resume it later ([`Interpreter::resume_block`]).
    fn take_block(&mut self) -> BlockState {
        BlockState {
            shared: std::mem::take(&mut self.shared),
            registers: std::mem::take(&mut self.registers),
            copies: std::mem::take(&mut self.copies),
            proxy: std::mem::take(&mut self.proxy),
        }
    }

    fn resume_block(&mut self, block: [u64; 3], state: BlockState) {
        self.block = block;
        self.shared = state.shared;
        self.registers = state.registers;
        self.copies = state.copies;
        self.proxy = state.proxy;
    }

    /// Runs the top-level statements `range` of the body in every thread of the block.
    fn run_body(&mut self, range: std::ops::Range<usize>) -> Result<(), KirError> {
        let all_active = vec![true; self.threads()];
        let mut path = Path::new();
        let body = &self.kernel.body;
        for i in range {
            path.push((Branch::Body, i));
            let result = self.run_stmt(&body[i], &all_active, &mut path);
            path.pop();
            result?;
        }
        Ok(())
    }

    /// An error at the statement at `path`, in `thread` of the running block when given.
    fn error(&self, stmt: &Stmt, path: &Path, thread: Option<usize>, message: &str) -> KirError {
        let [x, y, z] = self.block;
        let who = match thread {
            Some(t) => format!("block ({x}, {y}, {z}) thread {t}"),
            None => format!("block ({x}, {y}, {z})"),
        };
        KirError::new(
            &self.kernel.name,
            format!(
                "statement {} `{}`",
                format_path(path),
                self.names.stmt_head(stmt)
            ),
            format!("{who}: {message}"),
        )
    }

    fn run_stmts(
        &mut self,
        stmts: &[Stmt],
        branch: Branch,
        mask: &[bool],
        path: &mut Path,
    ) -> Result<(), KirError> {
        for (i, stmt) in stmts.iter().enumerate() {
            path.push((branch, i));
            let result = self.run_stmt(stmt, mask, path);
            path.pop();
            result?;
        }
        Ok(())
    }

    fn active(mask: &[bool]) -> impl Iterator<Item = usize> + '_ {
        mask.iter()
            .enumerate()
            .filter(|(_, &on)| on)
            .map(|(t, _)| t)
    }

    /// Evaluates `expr` in every active thread: `(thread, value)` pairs.
    fn eval_all(
        &self,
        expr: &Expr,
        mask: &[bool],
        stmt: &Stmt,
        path: &Path,
    ) -> Result<Vec<(usize, Const)>, KirError> {
        Self::active(mask)
            .map(|t| {
                self.eval(expr, t)
                    .map(|v| (t, v))
                    .map_err(|m| self.error(stmt, path, Some(t), &m))
            })
            .collect()
    }

    fn run_stmt(&mut self, stmt: &Stmt, mask: &[bool], path: &mut Path) -> Result<(), KirError> {
        let fail = |this: &Self, t: usize, m: String| this.error(stmt, path, Some(t), &m);
        self.check_accumulators(stmt, mask, path)?;
        match stmt {
            Stmt::Assign(var, value) => {
                for (t, v) in self.eval_all(value, mask, stmt, path)? {
                    self.set_register(t, *var, v);
                }
            }
            Stmt::LoadVec { dsts, buf, index } => {
                let mut loaded = Vec::new();
                // Raw pairs: two 16-bit elements' bits a register (`loads_raw_pairs`).
                let raw = self.raw_pairs(*buf, dsts);
                let per_dst = if raw { 2 } else { 1 };
                for (t, start) in self.eval_all(index, mask, stmt, path)? {
                    let start = self
                        .vector_start(start, dsts.len() * per_dst)
                        .map_err(|m| fail(self, t, m))?;
                    for (lane, &dst) in dsts.iter().enumerate() {
                        let value = if raw {
                            let at = start + 2 * lane as i64;
                            let half = |i: i64| -> Result<u32, String> {
                                let b = self.element_bytes(*buf, at + i)?;
                                Ok(u32::from(u16::from_le_bytes([b[0], b[1]])))
                            };
                            let lo = half(0).map_err(|m| fail(self, t, m))?;
                            let hi = half(1).map_err(|m| fail(self, t, m))?;
                            Const::I32((lo | hi << 16) as i32)
                        } else {
                            self.read(*buf, start + lane as i64)
                                .map_err(|m| fail(self, t, m))?
                        };
                        loaded.push((t, dst, value));
                    }
                }
                for (t, dst, value) in loaded {
                    self.set_register(t, dst, value);
                }
            }
            Stmt::Store { buf, index, value } => {
                let mut writes = Vec::new();
                for t in Self::active(mask) {
                    let i = self.eval_index(index, t).map_err(|m| fail(self, t, m))?;
                    let v = self.eval(value, t).map_err(|m| fail(self, t, m))?;
                    writes.push((t, i, v));
                }
                for (t, i, v) in writes {
                    self.write(*buf, i, v).map_err(|m| fail(self, t, m))?;
                    self.written_by(t, *buf, i).map_err(|m| fail(self, t, m))?;
                }
            }
            Stmt::StoreVec { buf, index, values } => {
                let mut writes = Vec::new();
                for t in Self::active(mask) {
                    let start = self.eval(index, t).map_err(|m| fail(self, t, m))?;
                    let start = self
                        .vector_start(start, values.len())
                        .map_err(|m| fail(self, t, m))?;
                    for (lane, value) in values.iter().enumerate() {
                        let v = self.eval(value, t).map_err(|m| fail(self, t, m))?;
                        writes.push((t, start + lane as i64, v));
                    }
                }
                for (t, i, v) in writes {
                    self.write(*buf, i, v).map_err(|m| fail(self, t, m))?;
                    self.written_by(t, *buf, i).map_err(|m| fail(self, t, m))?;
                }
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => self.run_for(stmt, *var, [start, end, step], body, mask, path)?,
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let mut then_mask = vec![false; mask.len()];
                let mut else_mask = vec![false; mask.len()];
                for (t, c) in self.eval_all(cond, mask, stmt, path)? {
                    match c {
                        Const::Pred(true) => then_mask[t] = true,
                        Const::Pred(false) => else_mask[t] = true,
                        other => {
                            return Err(fail(self, t, format!("condition is {other:?}, not pred")))
                        }
                    }
                }
                if then_mask.contains(&true) {
                    self.run_stmts(then, Branch::Then, &then_mask, path)?;
                }
                if else_mask.contains(&true) {
                    self.run_stmts(otherwise, Branch::Else, &else_mask, path)?;
                }
            }
            Stmt::Barrier => {
                let active = Self::active(mask).count();
                if active != mask.len() {
                    return Err(self.error(
                        stmt,
                        path,
                        None,
                        &format!(
                            "a barrier reached by {active} of the block's {} threads",
                            mask.len()
                        ),
                    ));
                }
            }
            Stmt::ShuffleXor {
                dst,
                src,
                mask: lane_mask,
            } => {
                self.require_whole_warps(stmt, path, mask)?;
                let shuffled: Vec<(usize, Const)> = Self::active(mask)
                    .map(|t| {
                        let source = (t & !31) | ((t & 31) ^ (*lane_mask as usize & 31));
                        (t, self.register(source, *src))
                    })
                    .collect();
                for (t, v) in shuffled {
                    self.set_register(t, *dst, v);
                }
            }
            Stmt::PackHalves { dst, input, lo, hi } => {
                let lows = self.eval_all(lo, mask, stmt, path)?;
                let highs = self.eval_all(hi, mask, stmt, path)?;
                for ((t, l), (_, h)) in lows.into_iter().zip(highs) {
                    let (Const::F32(l), Const::F32(h)) = (l, h) else {
                        return Err(fail(self, t, "pack of non-f32 values".into()));
                    };
                    let word = tensor::pack_halves(*input, l, h);
                    self.set_register(t, *dst, Const::I32(word as i32));
                }
            }
            Stmt::Mma { input, d, a, b, c } => {
                self.require_whole_warps(stmt, path, mask)?;
                for first in (0..mask.len()).step_by(WARP) {
                    if !mask[first] {
                        continue;
                    }
                    let mut a_words = [[0u32; 4]; WARP];
                    let mut b_words = [[0u32; 2]; WARP];
                    let mut c_values = [[0f32; 4]; WARP];
                    for lane in 0..WARP {
                        let t = first + lane;
                        for (word, var) in a_words[lane].iter_mut().zip(a) {
                            *word = self.word_register(t, *var);
                        }
                        for (word, var) in b_words[lane].iter_mut().zip(b) {
                            *word = self.word_register(t, *var);
                        }
                        for (value, var) in c_values[lane].iter_mut().zip(c) {
                            *value = match self.register(t, *var) {
                                Const::F32(x) => x,
                                other => return Err(fail(self, t, format!("mma c is {other:?}"))),
                            };
                        }
                    }
                    let result = tensor::mma(*input, &a_words, &b_words, &c_values);
                    for (lane, values) in result.iter().enumerate() {
                        for (var, value) in d.iter().zip(values) {
                            self.set_register(first + lane, *var, Const::F32(*value));
                        }
                    }
                }
            }
            Stmt::LdMatrix {
                dsts,
                trans,
                buf,
                index,
            } => {
                self.require_whole_warps(stmt, path, mask)?;
                let rows = self.eval_all(index, mask, stmt, path)?;
                let mut row_start = vec![0i64; mask.len()];
                for (t, value) in rows {
                    row_start[t] = int_value(value)
                        .ok_or_else(|| fail(self, t, "the index is not an integer".into()))?;
                }
                // A 16-bit position of the row is `per_half` elements (2 for 8-bit arrays).
                let per_half = match buf {
                    Buf::Shared(i) => {
                        (2 / self.shared[*i as usize].dtype.size_bytes().clamp(1, 2)) as i64
                    }
                    Buf::Global(_) => 1,
                };
                let row_elements = 8 * per_half;
                let mut loaded = Vec::new();
                for t in Self::active(mask) {
                    let (first, lane) = (t - t % WARP, t % WARP);
                    for (matrix, dst) in dsts.iter().enumerate() {
                        let mut halves = [0u16; 2];
                        for (half, (source, offset)) in
                            tensor::ldmatrix_source(lane, matrix, *trans)
                                .into_iter()
                                .enumerate()
                        {
                            let start = row_start[first + source];
                            if start.rem_euclid(row_elements) != 0 {
                                return Err(fail(
                                    self,
                                    first + source,
                                    format!(
                                        "ldmatrix row at index {start}, not a multiple of \
                                         {row_elements}"
                                    ),
                                ));
                            }
                            let mut bits = Vec::with_capacity(2);
                            for e in 0..per_half {
                                let at = start + offset as i64 * per_half + e;
                                let bytes = self
                                    .element_bytes(*buf, at)
                                    .map_err(|m| fail(self, first + source, m))?;
                                bits.extend_from_slice(&bytes[..(2 / per_half) as usize]);
                            }
                            halves[half] = u16::from_le_bytes([bits[0], bits[1]]);
                        }
                        let word = tensor::pack(halves[0], halves[1]);
                        loaded.push((t, *dst, Const::I32(word as i32)));
                    }
                }
                for (t, dst, value) in loaded {
                    self.set_register(t, dst, value);
                }
            }
            Stmt::CpAsync {
                dst,
                dst_index,
                src,
                src_index,
                src_len,
            } => {
                let mut issued = Vec::new();
                for t in Self::active(mask) {
                    let copy = self
                        .issue_copy(*dst, dst_index, *src, src_index, src_len, t)
                        .map_err(|m| fail(self, t, m))?;
                    issued.push((t, copy));
                }
                for (t, copy) in issued {
                    let size = self.shared[copy.array].dtype.size_bytes();
                    let elements = copy.first..copy.first + copy.bytes.len() / size;
                    let pending = &self.shared[copy.array].pending;
                    if let Some(element) = elements.clone().find(|&i| pending[i]) {
                        return Err(fail(
                            self,
                            t,
                            format!("cp.async to element {element}, which a copy already targets"),
                        ));
                    }
                    for element in elements {
                        self.proxy
                            .check_write(copy.array, element)
                            .map_err(|m| fail(self, t, m))?;
                        self.shared[copy.array].pending[element] = true;
                    }
                    self.copies[t].open.push(copy);
                }
            }
            Stmt::GridDependencyWait | Stmt::LaunchDependents | Stmt::Fence => {}
            Stmt::AtomicAdd {
                dst,
                buf,
                index,
                value,
            } => {
                // Blocks run one after another and the active threads in order: each
                // add sees every add before it.
                for t in Self::active(mask) {
                    let i = self.eval_index(index, t).map_err(|m| fail(self, t, m))?;
                    let add = self.eval(value, t).map_err(|m| fail(self, t, m))?;
                    let old = self.read(*buf, i).map_err(|m| fail(self, t, m))?;
                    let (Const::I32(a), Const::I32(b)) = (old, add) else {
                        return Err(fail(
                            self,
                            t,
                            format!("an atomic add of {add:?} to {old:?}"),
                        ));
                    };
                    self.write(*buf, i, Const::I32(a.wrapping_add(b)))
                        .map_err(|m| fail(self, t, m))?;
                    self.set_register(t, *dst, old);
                }
            }
            Stmt::Wgmma(op) => self.run_wgmma(stmt, op, mask, path)?,
            Stmt::PrefetchL2 { buf, index, bytes } => {
                for t in Self::active(mask) {
                    let prefetch = self
                        .check_prefetch(*buf, index, bytes, t)
                        .map_err(|m| fail(self, t, m))?;
                    self.prefetches.push(prefetch);
                }
            }
            Stmt::CpAsyncCommit => {
                for t in Self::active(mask) {
                    let group = std::mem::take(&mut self.copies[t].open);
                    self.copies[t].committed.push_back(group);
                }
            }
            Stmt::CpAsyncWait(n) => {
                for t in Self::active(mask) {
                    while self.copies[t].committed.len() > *n as usize {
                        let group = self.copies[t]
                            .committed
                            .pop_front()
                            .expect("more groups than n");
                        for copy in group {
                            let array = &mut self.shared[copy.array];
                            let size = array.dtype.size_bytes();
                            let at = copy.first * size;
                            array.bytes[at..at + copy.bytes.len()].copy_from_slice(&copy.bytes);
                            for element in copy.first..copy.first + copy.bytes.len() / size {
                                array.pending[element] = false;
                                array.written[element] = true;
                                self.proxy.written(t, copy.array, element);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Records a completed store of element `index` of `buf` by `thread` for the async
    /// proxy (an error when a pending `Wgmma` reads it).
    fn written_by(&mut self, thread: usize, buf: Buf, index: i64) -> Result<(), String> {
        if let Buf::Shared(array) = buf {
            let (array, element) = (array as usize, index as usize);
            self.proxy.check_write(array, element)?;
            self.proxy.written(thread, array, element);
        }
        Ok(())
    }

    /// An error unless each warp has all of its lanes active or none.
    fn require_whole_warps(&self, stmt: &Stmt, path: &Path, mask: &[bool]) -> Result<(), KirError> {
        for (w, lanes) in mask.chunks(WARP).enumerate() {
            let active = lanes.iter().filter(|&&on| on).count();
            if active != 0 && active != lanes.len() {
                return Err(self.error(
                    stmt,
                    path,
                    None,
                    &format!(
                        "a warp collective in warp {w} with {active} of its {} lanes active",
                        lanes.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The bits of an `I32` register (packed halves).
    fn word_register(&self, thread: usize, var: VarId) -> u32 {
        match self.register(thread, var) {
            Const::I32(v) => v as u32,
            _ => 0,
        }
    }

    /// Checks one `PrefetchL2` of `thread`: a positive multiple of 16 bytes from a 16-byte
    /// aligned element, inside the global buffer (it reads nothing).
    fn check_prefetch(
        &self,
        buf: Buf,
        index: &Expr,
        bytes: &Expr,
        thread: usize,
    ) -> Result<Prefetch, String> {
        let Buf::Global(p) = buf else {
            return Err("an L2 prefetch of shared memory".into());
        };
        let g = self
            .globals
            .get(p as usize)
            .and_then(Option::as_ref)
            .ok_or(format!("parameter {p} is not a buffer"))?;
        let size = g.dtype.size_bytes() as i64;
        let first = self.eval_index(index, thread)?;
        let bytes = match self.eval(bytes, thread)? {
            Const::I32(n) => i64::from(n),
            other => return Err(format!("the prefetch size is {other:?}, not i32")),
        };
        if bytes <= 0 || bytes % 16 != 0 {
            return Err(format!(
                "an L2 prefetch of {bytes} bytes (a positive multiple of 16)"
            ));
        }
        if (first * size).rem_euclid(16) != 0 {
            return Err(format!(
                "L2 prefetch start index {first} is not 16-byte aligned"
            ));
        }
        let len = g.bytes.len() as i64;
        if first < 0 || first * size + bytes > len {
            return Err(format!(
                "an L2 prefetch of bytes {}..{} of buffer `{}` ({len} bytes)",
                first * size,
                first * size + bytes,
                g.name
            ));
        }
        Ok(Prefetch {
            block: self.block,
            param: p,
            first_byte: (first * size) as u64,
            bytes: bytes as u64,
        })
    }

    /// Checks one `CpAsync` of `thread` and reads its source bytes.
    fn issue_copy(
        &self,
        dst: Buf,
        dst_index: &Expr,
        src: Buf,
        src_index: &Expr,
        src_len: &Expr,
        thread: usize,
    ) -> Result<PendingCopy, String> {
        let Buf::Shared(array) = dst else {
            return Err("the cp.async destination is not shared memory".into());
        };
        let dtype = self
            .shared
            .get(array as usize)
            .ok_or(format!("shared array {array} is not declared"))?
            .dtype;
        let size = dtype.size_bytes();
        let width = (16 / size) as i64;
        let first = self.eval_index(dst_index, thread)?;
        let source = self.eval_index(src_index, thread)?;
        let len = match self.eval(src_len, thread)? {
            Const::I32(n) => i64::from(n),
            other => return Err(format!("the source length is {other:?}, not i32")),
        };
        if !(0..=width).contains(&len) {
            return Err(format!("a cp.async of {len} elements (0..={width})"));
        }
        for (what, at) in [("destination", first), ("source", source)] {
            if at.rem_euclid(width) != 0 {
                return Err(format!(
                    "cp.async {what} index {at} is not a multiple of {width} (16 bytes)"
                ));
            }
        }
        let name = &self.kernel.shared[array as usize].name;
        let array_len = self.shared[array as usize].written.len() as i64;
        if first < 0 || first + width > array_len {
            return Err(format!(
                "cp.async to elements {first}..{} of shared array `{name}` ({array_len} elements)",
                first + width
            ));
        }
        let mut bytes = vec![0u8; 16];
        for element in 0..len {
            let raw = self.element_bytes(src, source + element)?;
            let at = element as usize * size;
            bytes[at..at + size].copy_from_slice(raw);
        }
        Ok(PendingCopy {
            array: array as usize,
            first: first as usize,
            bytes,
        })
    }

    fn run_for(
        &mut self,
        stmt: &Stmt,
        var: VarId,
        [start, end, step]: [&Expr; 3],
        body: &[Stmt],
        mask: &[bool],
        path: &mut Path,
    ) -> Result<(), KirError> {
        // Each thread's end and step, fixed on entry.
        let mut bounds: Vec<Option<(i64, i64)>> = vec![None; mask.len()];
        for t in Self::active(mask) {
            let fail = |m: String| self.error(stmt, path, Some(t), &m);
            let first = self.eval(start, t).map_err(fail)?;
            let last = self.eval(end, t).map_err(fail)?;
            let stride = self.eval(step, t).map_err(fail)?;
            let (Some(last), Some(stride)) = (int_value(last), int_value(stride)) else {
                return Err(fail("loop bounds are not integers".to_string()));
            };
            if stride <= 0 {
                return Err(fail(format!("the loop's step is {stride}, not positive")));
            }
            bounds[t] = Some((last, stride));
            self.set_register(t, var, first);
        }
        loop {
            let mut iterating = vec![false; mask.len()];
            for (t, bound) in bounds.iter().enumerate() {
                if let Some((last, _)) = bound {
                    let current = int_value(self.register(t, var)).unwrap_or(i64::MAX);
                    iterating[t] = current < *last;
                }
            }
            if !iterating.contains(&true) {
                return Ok(());
            }
            self.run_stmts(body, Branch::Body, &iterating, path)?;
            for t in Self::active(&iterating) {
                let (_, stride) = bounds[t].expect("iterating threads have bounds");
                let next = match self.register(t, var) {
                    Const::I32(v) => i32::try_from(stride)
                        .ok()
                        .and_then(|s| v.checked_add(s))
                        .map(Const::I32),
                    Const::I64(v) => v.checked_add(stride).map(Const::I64),
                    _ => None,
                };
                let Some(next) = next else {
                    return Err(self.error(
                        stmt,
                        path,
                        Some(t),
                        "the loop register overflows its type",
                    ));
                };
                self.set_register(t, var, next);
            }
        }
    }

    fn register(&self, thread: usize, var: VarId) -> Const {
        self.registers[thread][var.0 as usize]
    }

    fn set_register(&mut self, thread: usize, var: VarId, value: Const) {
        self.registers[thread][var.0 as usize] = value;
    }

    /// The first element of a vector access of `width` elements at `start`.
    fn vector_start(&self, start: Const, width: usize) -> Result<i64, String> {
        let start = int_value(start).ok_or("the index is not an integer")?;
        if start.rem_euclid(width as i64) != 0 {
            return Err(format!(
                "vector access of {width} elements at index {start}, not a multiple of {width}"
            ));
        }
        Ok(start)
    }

    fn eval_index(&self, index: &Expr, thread: usize) -> Result<i64, String> {
        let value = self.eval(index, thread)?;
        int_value(value).ok_or_else(|| format!("index {value:?} is not an integer"))
    }

    /// Whether a `LoadVec` of `buf` into `dsts` loads raw element pairs
    /// ([`crate::kernel::loads_raw_pairs`]).
    fn raw_pairs(&self, buf: Buf, dsts: &[VarId]) -> bool {
        let dtype = match buf {
            Buf::Global(p) => self
                .globals
                .get(p as usize)
                .and_then(Option::as_ref)
                .map(|g| g.dtype),
            Buf::Shared(s) => self.shared.get(s as usize).map(|a| a.dtype),
        };
        match (dtype, dsts.first()) {
            (Some(dtype), Some(&d)) => crate::kernel::loads_raw_pairs(dtype, self.kernel.var_ty(d)),
            _ => false,
        }
    }

    /// The element at `index` of `buf` as a load sees it: bounds and, for shared memory,
    /// that some thread has written it and no copy to it is pending.
    fn read(&self, buf: Buf, index: i64) -> Result<Const, String> {
        let dtype = match buf {
            Buf::Global(p) => {
                self.globals
                    .get(p as usize)
                    .and_then(Option::as_ref)
                    .ok_or(format!("parameter {p} is not a buffer"))?
                    .dtype
            }
            Buf::Shared(s) => {
                self.shared
                    .get(s as usize)
                    .ok_or(format!("shared array {s} is not declared"))?
                    .dtype
            }
        };
        Ok(decode(dtype, self.element_bytes(buf, index)?))
    }

    /// The bytes of the element at `index` of `buf`, checked as [`Self::read`] says.
    fn element_bytes(&self, buf: Buf, index: i64) -> Result<&[u8], String> {
        let (name, dtype, bytes, shared) = match buf {
            Buf::Global(p) => {
                let g = self
                    .globals
                    .get(p as usize)
                    .and_then(Option::as_ref)
                    .ok_or(format!("parameter {p} is not a buffer"))?;
                (format!("buffer `{}`", g.name), g.dtype, &*g.bytes, None)
            }
            Buf::Shared(s) => {
                let array = self
                    .shared
                    .get(s as usize)
                    .ok_or(format!("shared array {s} is not declared"))?;
                let name = &self.kernel.shared[s as usize].name;
                (
                    format!("shared array `{name}`"),
                    array.dtype,
                    &array.bytes[..],
                    Some(array),
                )
            }
        };
        let at = element_offset(&name, dtype, bytes.len(), index)?;
        if let Some(array) = shared {
            if array.pending[index as usize] {
                return Err(format!(
                    "reads element {index} of {name} while a cp.async copy to it is pending"
                ));
            }
            if !array.written[index as usize] {
                return Err(format!(
                    "reads element {index} of {name} before any thread of the block wrote it"
                ));
            }
        }
        Ok(&bytes[at..at + dtype.size_bytes()])
    }

    fn write(&mut self, buf: Buf, index: i64, value: Const) -> Result<(), String> {
        let (name, dtype, bytes, written) = match buf {
            Buf::Global(p) => {
                let g = self
                    .globals
                    .get_mut(p as usize)
                    .and_then(Option::as_mut)
                    .ok_or(format!("parameter {p} is not a buffer"))?;
                (format!("buffer `{}`", g.name), g.dtype, &mut *g.bytes, None)
            }
            Buf::Shared(s) => {
                let array = self
                    .shared
                    .get_mut(s as usize)
                    .ok_or(format!("shared array {s} is not declared"))?;
                let name = &self.kernel.shared[s as usize].name;
                if array.pending.get(index as usize).copied().unwrap_or(false) {
                    return Err(format!(
                        "writes element {index} of shared array `{name}` while a cp.async copy to it is pending"
                    ));
                }
                (
                    format!("shared array `{name}`"),
                    array.dtype,
                    &mut array.bytes[..],
                    Some(&mut array.written[..]),
                )
            }
        };
        let at = element_offset(&name, dtype, bytes.len(), index)?;
        encode(dtype, value, &mut bytes[at..at + dtype.size_bytes()])
            .map_err(|m| format!("storing to {name}: {m}"))?;
        if let Some(written) = written {
            written[index as usize] = true;
        }
        Ok(())
    }

    fn eval(&self, expr: &Expr, thread: usize) -> Result<Const, String> {
        Ok(match expr {
            Expr::Const(value) => *value,
            Expr::Var(var) => self.register(thread, *var),
            Expr::Param(p) => self
                .scalars
                .get(*p as usize)
                .copied()
                .flatten()
                .ok_or(format!("parameter {p} is not a scalar"))?,
            Expr::Special(special) => Const::I32(match special {
                Special::ThreadIdx => thread as i32,
                Special::BlockIdx(axis) => self.block[usize::from(*axis).min(2)] as i32,
                Special::BlockDim => self.kernel.block_dim as i32,
                Special::LaneId => (thread % 32) as i32,
                Special::WarpId => (thread / 32) as i32,
            }),
            Expr::Unary(op, a) => unary(*op, self.eval(a, thread)?)?,
            Expr::Binary(op, a, b) => binary(*op, self.eval(a, thread)?, self.eval(b, thread)?)?,
            Expr::Fma(a, b, c) => {
                match (
                    self.eval(a, thread)?,
                    self.eval(b, thread)?,
                    self.eval(c, thread)?,
                ) {
                    (Const::F32(a), Const::F32(b), Const::F32(c)) => {
                        Const::F32(libm::fmaf(a, b, c))
                    }
                    (Const::I32(a), Const::I32(b), Const::I32(c)) => {
                        Const::I32(a.wrapping_mul(b).wrapping_add(c))
                    }
                    (Const::I64(a), Const::I64(b), Const::I64(c)) => {
                        Const::I64(a.wrapping_mul(b).wrapping_add(c))
                    }
                    other => return Err(format!("fma of {other:?}")),
                }
            }
            Expr::Select(cond, a, b) => {
                let cond = self.eval(cond, thread)?;
                let (a, b) = (self.eval(a, thread)?, self.eval(b, thread)?);
                match cond {
                    Const::Pred(c) => {
                        if c {
                            a
                        } else {
                            b
                        }
                    }
                    other => return Err(format!("select on {other:?}")),
                }
            }
            Expr::Cast(ty, a) => cast(*ty, self.eval(a, thread)?),
            Expr::Load { buf, index } => {
                let index = self.eval_index(index, thread)?;
                self.read(*buf, index)?
            }
        })
    }
}

/// The byte offset of element `index` in `byte_len` bytes of `dtype` elements, or an error
/// naming the memory (`name`) when it is out of bounds.
fn element_offset(name: &str, dtype: DType, byte_len: usize, index: i64) -> Result<usize, String> {
    let len = byte_len / dtype.size_bytes();
    if index < 0 || index as u64 >= len as u64 {
        return Err(format!(
            "index {index} is out of bounds of {name} ({len} elements of {dtype})"
        ));
    }
    Ok(index as usize * dtype.size_bytes())
}

/// An integer value as i64 (`None` for floats and preds).
fn int_value(value: Const) -> Option<i64> {
    match value {
        Const::I32(v) => Some(i64::from(v)),
        Const::I64(v) => Some(v),
        Const::Pred(_) | Const::F32(_) => None,
    }
}

/// One memory element converted to its compute type.
fn decode(dtype: DType, bytes: &[u8]) -> Const {
    let byte = |i: usize| bytes[i];
    match dtype {
        DType::F32 => Const::F32(f32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)])),
        DType::F16 => Const::F32(f16::from_le_bytes([byte(0), byte(1)]).to_f32()),
        DType::BF16 => Const::F32(bf16::from_le_bytes([byte(0), byte(1)]).to_f32()),
        DType::F8E4M3 => Const::F32(E4M3.decode(byte(0))),
        DType::F8E5M2 => Const::F32(E5M2.decode(byte(0))),
        DType::I8 => Const::I32(i32::from(byte(0) as i8)),
        DType::I32 => Const::I32(i32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)])),
        DType::I64 => {
            let mut b = [0; 8];
            b.copy_from_slice(&bytes[..8]);
            Const::I64(i64::from_le_bytes(b))
        }
        DType::Bool => Const::Pred(byte(0) != 0),
    }
}

/// A value of `dtype`'s compute type converted to `dtype` and written to `out`.
fn encode(dtype: DType, value: Const, out: &mut [u8]) -> Result<(), String> {
    match (dtype, value) {
        (DType::F32, Const::F32(x)) => out.copy_from_slice(&x.to_le_bytes()),
        (DType::F16, Const::F32(x)) => out.copy_from_slice(&f16::from_f32(x).to_le_bytes()),
        (DType::BF16, Const::F32(x)) => out.copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
        (DType::F8E4M3, Const::F32(x)) => out[0] = E4M3.encode(x),
        (DType::F8E5M2, Const::F32(x)) => out[0] = E5M2.encode(x),
        (DType::I8, Const::I32(x)) => out[0] = x as u8,
        (DType::I32, Const::I32(x)) => out.copy_from_slice(&x.to_le_bytes()),
        (DType::I64, Const::I64(x)) => out.copy_from_slice(&x.to_le_bytes()),
        (DType::Bool, Const::Pred(b)) => out[0] = u8::from(b),
        (dtype, value) => return Err(format!("a {} value is not stored as {dtype}", value.ty())),
    }
    Ok(())
}

/// `value` converted to `ty` (the semantics of `Expr::Cast`).
pub fn cast(ty: Ty, value: Const) -> Const {
    match (ty, value) {
        (Ty::Pred, Const::Pred(b)) => Const::Pred(b),
        (Ty::Pred, Const::I32(v)) => Const::Pred(v != 0),
        (Ty::Pred, Const::I64(v)) => Const::Pred(v != 0),
        (Ty::Pred, Const::F32(x)) => Const::Pred(x != 0.0),
        (Ty::I32, Const::Pred(b)) => Const::I32(i32::from(b)),
        (Ty::I32, Const::I32(v)) => Const::I32(v),
        (Ty::I32, Const::I64(v)) => Const::I32(v as i32),
        // `as` truncates toward zero, saturates and maps NaN to 0.
        (Ty::I32, Const::F32(x)) => Const::I32(x as i32),
        (Ty::I64, Const::Pred(b)) => Const::I64(i64::from(b)),
        (Ty::I64, Const::I32(v)) => Const::I64(i64::from(v)),
        (Ty::I64, Const::I64(v)) => Const::I64(v),
        (Ty::I64, Const::F32(x)) => Const::I64(x as i64),
        (Ty::F32, Const::Pred(b)) => Const::F32(f32::from(u8::from(b))),
        // `as` rounds integers to the nearest f32, ties to even.
        (Ty::F32, Const::I32(v)) => Const::F32(v as f32),
        (Ty::F32, Const::I64(v)) => Const::F32(v as f32),
        (Ty::F32, Const::F32(x)) => Const::F32(x),
    }
}

/// `1 / (1 + e^-x)`, computed in f64 and rounded once.
fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + libm::exp(-f64::from(x)))) as f32
}

/// `op a` (the semantics of `Expr::Unary`).
pub fn unary(op: UnOp, a: Const) -> Result<Const, String> {
    Ok(match (op, a) {
        (UnOp::Neg, Const::F32(x)) => Const::F32(-x),
        (UnOp::Neg, Const::I32(v)) => Const::I32(v.wrapping_neg()),
        (UnOp::Neg, Const::I64(v)) => Const::I64(v.wrapping_neg()),
        (UnOp::Abs, Const::F32(x)) => Const::F32(x.abs()),
        (UnOp::Abs, Const::I32(v)) => Const::I32(v.wrapping_abs()),
        (UnOp::Abs, Const::I64(v)) => Const::I64(v.wrapping_abs()),
        (UnOp::Not, Const::Pred(b)) => Const::Pred(!b),
        (UnOp::Not, Const::I32(v)) => Const::I32(!v),
        (UnOp::Not, Const::I64(v)) => Const::I64(!v),
        (UnOp::Exp, Const::F32(x)) => Const::F32(libm::expf(x)),
        (UnOp::Exp2, Const::F32(x)) => Const::F32(crate::kernel::exp2_ftz(x)),
        (UnOp::Log, Const::F32(x)) => Const::F32(libm::logf(x)),
        (UnOp::Sqrt, Const::F32(x)) => Const::F32(libm::sqrtf(x)),
        (UnOp::Rsqrt, Const::F32(x)) => Const::F32((1.0 / libm::sqrt(f64::from(x))) as f32),
        (UnOp::Sin, Const::F32(x)) => Const::F32(libm::sinf(x)),
        (UnOp::Cos, Const::F32(x)) => Const::F32(libm::cosf(x)),
        (UnOp::Tanh, Const::F32(x)) => Const::F32(libm::tanhf(x)),
        (UnOp::Sigmoid, Const::F32(x)) => Const::F32(sigmoid(x)),
        (UnOp::Erf, Const::F32(x)) => Const::F32(libm::erff(x)),
        (UnOp::Floor, Const::F32(x)) => Const::F32(libm::floorf(x)),
        (UnOp::Ceil, Const::F32(x)) => Const::F32(libm::ceilf(x)),
        (UnOp::Recip, Const::F32(x)) => Const::F32(1.0 / x),
        (UnOp::RoundBf16, Const::F32(x)) => Const::F32(bf16::from_f32(x).to_f32()),
        (UnOp::RoundF16, Const::F32(x)) => Const::F32(f16::from_f32(x).to_f32()),
        (op, a) => return Err(format!("{op:?} does not apply to {a:?}")),
    })
}

/// `a << amount` or `a >> amount` (arithmetic) on a `width`-bit integer held in i64, with
/// PTX's clamping: an amount that as unsigned is at least `width` shifts everything out.
fn shift(op: BinOp, a: i64, amount: u64, width: u32) -> i64 {
    let clamped = amount.min(u64::from(width)) as u32;
    match op {
        BinOp::Shl if clamped >= width => 0,
        BinOp::Shl => a << clamped,
        _ if clamped >= width => {
            if a < 0 {
                -1
            } else {
                0
            }
        }
        _ => a >> clamped,
    }
}

/// The result of a comparison, given `a.partial_cmp(b)`.
fn compare(op: BinOp, ordering: Option<std::cmp::Ordering>) -> bool {
    use std::cmp::Ordering::{Equal, Greater, Less};
    match op {
        BinOp::Eq => ordering == Some(Equal),
        BinOp::Ne => ordering != Some(Equal),
        BinOp::Lt => ordering == Some(Less),
        BinOp::Le => matches!(ordering, Some(Less | Equal)),
        BinOp::Gt => ordering == Some(Greater),
        BinOp::Ge => matches!(ordering, Some(Greater | Equal)),
        _ => unreachable!("compare is only called for comparisons"),
    }
}

/// Integer arithmetic on 32- or 64-bit values held in i64, wrapping to `width`.
fn integer_binary(op: BinOp, a: i64, b: i64, width: u32) -> Result<i64, String> {
    let wrap = |v: i64| if width == 32 { i64::from(v as i32) } else { v };
    let amount = if width == 32 {
        u64::from(b as i32 as u32)
    } else {
        b as u64
    };
    Ok(match op {
        BinOp::Add => wrap(a.wrapping_add(b)),
        BinOp::Sub => wrap(a.wrapping_sub(b)),
        BinOp::Mul => wrap(a.wrapping_mul(b)),
        BinOp::Div | BinOp::Rem if b == 0 => {
            return Err(format!("integer division of {a} by zero"))
        }
        BinOp::Div => wrap(a.wrapping_div(b)),
        BinOp::Rem => wrap(a.wrapping_rem(b)),
        BinOp::Min => a.min(b),
        BinOp::Max => a.max(b),
        BinOp::And => a & b,
        BinOp::Or => a | b,
        BinOp::Xor => a ^ b,
        BinOp::Shl | BinOp::Shr => wrap(shift(op, a, amount, width)),
        op => return Err(format!("{op:?} does not apply to integers")),
    })
}

/// `a op b` (the semantics of `Expr::Binary`).
pub fn binary(op: BinOp, a: Const, b: Const) -> Result<Const, String> {
    if op.is_comparison() {
        let ordering = match (a, b) {
            (Const::Pred(a), Const::Pred(b)) => a.partial_cmp(&b),
            (Const::I32(a), Const::I32(b)) => a.partial_cmp(&b),
            (Const::I64(a), Const::I64(b)) => a.partial_cmp(&b),
            (Const::F32(a), Const::F32(b)) => a.partial_cmp(&b),
            _ => return Err(format!("{op:?} of {a:?} and {b:?}")),
        };
        return Ok(Const::Pred(compare(op, ordering)));
    }
    Ok(match (a, b) {
        (Const::F32(a), Const::F32(b)) => Const::F32(match op {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Rem => libm::fmodf(a, b),
            BinOp::Min => a.min(b),
            BinOp::Max => a.max(b),
            BinOp::Pow => libm::powf(a, b),
            op => return Err(format!("{op:?} does not apply to f32")),
        }),
        (Const::I32(a), Const::I32(b)) => {
            Const::I32(integer_binary(op, i64::from(a), i64::from(b), 32)? as i32)
        }
        (Const::I64(a), Const::I64(b)) => Const::I64(integer_binary(op, a, b, 64)?),
        (Const::Pred(a), Const::Pred(b)) => Const::Pred(match op {
            BinOp::And => a & b,
            BinOp::Or => a | b,
            BinOp::Xor => a ^ b,
            op => return Err(format!("{op:?} does not apply to pred")),
        }),
        (a, b) => return Err(format!("{op:?} of {a:?} and {b:?}")),
    })
}
