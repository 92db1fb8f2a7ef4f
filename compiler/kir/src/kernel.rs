//! The kernel IR: one GPU kernel as a per-thread program (SIMT) with structured control flow,
//! typed registers, explicit memory spaces, barriers and warp collectives.
//!
//! Both backends consume exactly this: the PTX emitter writes it as PTX for an SM target;
//! the Cranelift backend runs it on the CPU, executing the threads of a block in lock step
//! between barriers. The semantics below are the contract between them.
//!
//! Semantics:
//! - A launch runs `grid` blocks of `block_dim` threads (1-D). `Special::ThreadIdx` is the
//!   thread's index in its block, `BlockIdx(axis)` the block's coordinate in the 3-D grid.
//! - Registers ([`VarId`]) are per thread, mutable, typed ([`Ty`]); every variable is
//!   assigned before it is read on every path (the verifier checks declaration, not paths:
//!   a read before any write yields 0).
//! - Arithmetic happens in `I32`, `I64`, `F32` or `Pred`. Memory holds any [`DType`]: a load
//!   converts the stored element to its compute type ([`Ty::compute_type_of`]: floats → F32,
//!   i8/i32 → I32, i64 → I64, bool → Pred) and a store converts back (round to nearest even;
//!   f8 saturating to ±max finite, NaN kept; float → int truncates toward zero).
//! - Integer arithmetic wraps; integer division by zero is undefined (templates never do it).
//! - Float transcendental ops (`Exp`, `Exp2`, `Log`, `Sin`, `Cos`, `Tanh`, `Erf`, `Sigmoid`, `Pow`,
//!   `Rsqrt`, `Sqrt`, `Div`) are accurate to within 4 ulp of the exact f32 result on every
//!   backend (the differential tests state their tolerances from that).
//! - `Barrier` synchronizes all threads of the block and orders shared-memory accesses; it
//!   must only appear under block-uniform control flow. `ShuffleXor` exchanges a register
//!   between the lanes of a warp (`lane ^ mask`); every lane of the warp must execute it
//!   (warp-uniform control flow) — the verifier requires block-uniform control flow for both.
//! - Global buffers are kernel parameters; indices are element indices (not bytes). A
//!   vector access of `width` elements needs an index that is a multiple of `width`.
//!
//! Tensor cores (the SM80 warp-level path; every kiln target has it, FP8 needs sm_89):
//! - Half-precision operands live in `I32` registers as *packed pairs*: the 16-bit value
//!   with the lower row/column index in bits 0..16, the other in bits 16..32 (f16 or bf16
//!   bit patterns; the statement that reads them says which). FP8 operands are *packed
//!   quads*: four 8-bit values, the lowest index in bits 0..8.
//! - `Mma` is `mma.sync.m16n8k16.row.col` (16-bit inputs) or `mma.sync.m16n8k32.row.col`
//!   (e4m3/e5m2 inputs) with f32 accumulators: the 32 lanes of a warp together hold A
//!   (16×K), B (K×8) and C, D (16×8), in the fragment layout of [`crate::tensor`]. With
//!   g = lane / 4, t = lane % 4 and p the values a register holds (2 or 4): A register 0
//!   holds row g, k p·t .. p·t+p-1; 1 row g+8, the same k; 2 row g, k p·t+4p ..; 3 row g+8,
//!   k p·t+4p ..; B register 0 holds k p·t .. p·t+p-1 of column g, 1 k p·t+4p ..; C/D
//!   element j is row g + 8·(j / 2), column 2t + j % 2 — in bytes the two shapes are the
//!   same layout. `D = A·B + C`. The reference (interpreter and Cranelift) computes
//!   each element as `fma` over k = 0..K-1 in order starting from C, which is exact for the
//!   products and rounds each partial sum once; tensor cores add in another order and
//!   precision, so GPU results may differ by a few ulp of the sum of |products| + |C|.
//! - `LdMatrix` loads `n` (1, 2 or 4) 8×8 matrices of 16-bit elements from shared memory:
//!   lane `8·i + r` supplies the element index of row `r` of matrix `i` (8 consecutive
//!   elements, 16-byte aligned; the indices of lanes `8·n..32` are evaluated but unused).
//!   Destination `i` of lane `l` receives the packed pair at row `l / 4`, columns
//!   `2·(l % 4)` and `+1` of matrix `i`; with `trans`, the pair at rows `2·(l % 4)` and `+1`,
//!   column `l / 4` (the transposed matrix). On an array of 8-bit elements (no `trans`) it
//!   moves the same bytes: a row is 16 elements and lane `l` receives the packed quad of
//!   row `l / 4`, columns `4·(l % 4)` .. `+3` — the FP8 `Mma` fragments of a row-major tile.
//! - `CpAsync` copies 16 bytes from global to shared memory without passing through
//!   registers: the first `src_len` elements (0 ..= 16 / element size) come from the source,
//!   the rest of the 16 bytes are zero (so an out-of-range chunk is `src_len = 0`, which
//!   reads nothing). Both indices are multiples of 16 bytes' worth of elements. The copy is
//!   asynchronous: it belongs to the issuing thread's open group, `CpAsyncCommit` closes that
//!   group, and `CpAsyncWait(n)` waits until at most `n` of the thread's committed groups
//!   are incomplete; only then are the bytes in shared memory, for the issuing thread, and
//!   for the others after a following `Barrier`. Touching the destination before that is a
//!   race (the interpreter reports a read or write of a pending element as an error; the
//!   CPU backend copies at once). Copies still pending when the block ends are dropped.
//! - `PackHalves` rounds two `F32` values to f16 or bf16 (nearest even, as a store does) and
//!   packs them into one `I32` register, low index in bits 0..16: a product computed in
//!   registers (attention's probabilities) becomes an `Mma` A fragment without memory.
//! - `Mma` and `LdMatrix` are warp collectives like `ShuffleXor` (block-uniform control
//!   flow); the `CpAsync` statements are per thread.
//!
//! - `Wgmma` is Hopper's warpgroup matrix multiply (sm_90a only; the PTX emitter rejects it
//!   elsewhere and the CPU backend has none): its semantics are in [`crate::wgmma`].
//!
//! Programmatic dependent launch (sm_90 and later; elsewhere these are no-ops):
//! - A kernel waits for the kernel launched before it to finish (and its writes to become
//!   visible) before its first statement, or, when its body holds a top-level
//!   `GridDependencyWait`, there. The statements before that marker may touch no memory
//!   that a kernel writes: they are address arithmetic, loads of [`Access::Constant`]
//!   and [`Access::Settled`] buffers (`Assign`s and `LoadVec`s that load nothing else,
//!   `If` and `For` of such) and `PrefetchL2` hints, so they may run while the previous
//!   kernel still runs.
//! - `PrefetchL2` asks L2 to fetch `bytes` bytes of a global buffer from element `index`:
//!   only a hint (L2 is the coherence point, so a later load after the wait still sees
//!   the previous kernel's writes). `bytes` is a positive multiple of 16, the start 16-byte
//!   aligned (`index` a multiple of 16 bytes' worth of elements), the range inside the
//!   buffer (the interpreter checks all three; the CPU backend does nothing).
//! - `LaunchDependents` lets the kernel launched after this one start once every block
//!   has executed it or exited (by default, once every block has exited): that kernel
//!   still waits for this one's completion at its own wait, so it changes timing only.
//!
//! Communication between the blocks of one launch (a "last block" reduction):
//! - `AtomicAdd` adds an `I32` value to an element of an `I32` global buffer and gives the
//!   thread the element's value before the add: one indivisible read-modify-write at GPU
//!   scope (relaxed: it orders nothing else), whatever other blocks do at the same time.
//! - `Fence` (per thread, at GPU scope, acquire and release) orders the thread's memory
//!   operations before it against those after it for every block: a block that stores,
//!   has its threads meet at a `Barrier`, and lets one thread execute `Fence` then
//!   `AtomicAdd` publishes its stores to the block whose `AtomicAdd` reads that add's
//!   result and which then executes `Fence` (and a `Barrier` before its other threads read).

use kiln_ir::DType;
use std::fmt;

/// The type of a register or an expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ty {
    Pred,
    I32,
    I64,
    F32,
}

impl Ty {
    /// The register type a memory element of `dtype` is loaded as.
    pub fn compute_type_of(dtype: DType) -> Ty {
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2 => Ty::F32,
            DType::I8 | DType::I32 => Ty::I32,
            DType::I64 => Ty::I64,
            DType::Bool => Ty::Pred,
        }
    }

    pub fn is_int(self) -> bool {
        matches!(self, Ty::I32 | Ty::I64)
    }

    pub fn name(self) -> &'static str {
        match self {
            Ty::Pred => "pred",
            Ty::I32 => "i32",
            Ty::I64 => "i64",
            Ty::F32 => "f32",
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A register of the kernel (index into [`Kernel::vars`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarId(pub u32);

/// A constant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Const {
    Pred(bool),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Const {
    pub fn ty(self) -> Ty {
        match self {
            Const::Pred(_) => Ty::Pred,
            Const::I32(_) => Ty::I32,
            Const::I64(_) => Ty::I64,
            Const::F32(_) => Ty::F32,
        }
    }
}

/// Hardware indices (all `I32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Special {
    /// Index of the thread in its block, `0..block_dim`.
    ThreadIdx,
    /// Coordinate of the block in the grid along axis 0, 1 or 2.
    BlockIdx(u8),
    /// Threads per block.
    BlockDim,
    /// `ThreadIdx % 32`.
    LaneId,
    /// `ThreadIdx / 32`.
    WarpId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Sin,
    Cos,
    Tanh,
    Sigmoid,
    Erf,
    Floor,
    Ceil,
    Recip,
    /// `2^x`: the fast base-2 exponential of online softmax (`ex2.approx.ftz.f32` on the GPU,
    /// within 2 ulp): subnormal inputs count as zero and subnormal results flush to zero
    /// ([`exp2_ftz`]; a softmax term below 2^-126 of its row's largest is negligible, and the
    /// flush makes it one instruction instead of four).
    Exp2,
    /// `x` rounded to bf16 (nearest even, as a store of a bf16 element rounds it) and back:
    /// a value computed in registers with the bits another kernel would read from a bf16
    /// buffer.
    RoundBf16,
    /// `x` rounded to f16 (nearest even, as a store of an f16 element rounds it) and back.
    RoundF16,
    /// Logical not of a `Pred`, bitwise not of an integer.
    Not,
}

impl UnOp {
    /// Every arithmetic operator that takes an `F32` (all but `Not` and the roundings to a
    /// 16-bit type, [`UnOp::ROUNDINGS`]), in declaration order.
    pub const FLOAT: [UnOp; 15] = [
        UnOp::Neg,
        UnOp::Abs,
        UnOp::Exp,
        UnOp::Log,
        UnOp::Sqrt,
        UnOp::Rsqrt,
        UnOp::Sin,
        UnOp::Cos,
        UnOp::Tanh,
        UnOp::Sigmoid,
        UnOp::Erf,
        UnOp::Floor,
        UnOp::Ceil,
        UnOp::Recip,
        UnOp::Exp2,
    ];

    /// The roundings of an `F32` to a 16-bit float type and back.
    pub const ROUNDINGS: [UnOp; 2] = [UnOp::RoundBf16, UnOp::RoundF16];
}

/// Binary operators. Operands share one type; comparisons give `Pred`; `And`/`Or`/`Xor`
/// take `Pred` or integers; `Shl`/`Shr` take integers (arithmetic shift right); `Div` and
/// `Rem` on integers truncate toward zero (C semantics, unlike the graph IR's floor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Min,
    Max,
    Pow,
    And,
    Or,
    Xor,
    Shl,
    Shr,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl BinOp {
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
        )
    }
}

/// The input type of an `Mma` (both A and B), which also fixes its shape: m16n8k16 for the
/// 16-bit types, m16n8k32 for the 8-bit (FP8, sm_89 and later) ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MmaInput {
    F16,
    Bf16,
    /// OCP FP8 e4m3 (`DType::F8E4M3`).
    E4M3,
    /// OCP FP8 e5m2 (`DType::F8E5M2`).
    E5M2,
}

impl MmaInput {
    pub fn name(self) -> &'static str {
        match self {
            MmaInput::F16 => "f16",
            MmaInput::Bf16 => "bf16",
            MmaInput::E4M3 => "e4m3",
            MmaInput::E5M2 => "e5m2",
        }
    }

    /// The memory dtype whose bits the packed registers hold.
    pub fn dtype(self) -> DType {
        match self {
            MmaInput::F16 => DType::F16,
            MmaInput::Bf16 => DType::BF16,
            MmaInput::E4M3 => DType::F8E4M3,
            MmaInput::E5M2 => DType::F8E5M2,
        }
    }

    /// The input type whose bits `dtype` holds, if an `Mma` takes it.
    pub fn of_dtype(dtype: DType) -> Option<MmaInput> {
        match dtype {
            DType::F16 => Some(MmaInput::F16),
            DType::BF16 => Some(MmaInput::Bf16),
            DType::F8E4M3 => Some(MmaInput::E4M3),
            DType::F8E5M2 => Some(MmaInput::E5M2),
            _ => None,
        }
    }

    /// Whether this is an 8-bit (FP8) type: an m16n8k32 product.
    pub fn is_fp8(self) -> bool {
        matches!(self, MmaInput::E4M3 | MmaInput::E5M2)
    }

    /// Bits of one element (16 or 8).
    pub fn bits(self) -> usize {
        if self.is_fp8() {
            8
        } else {
            16
        }
    }

    /// Elements one 32-bit register holds (2 or 4).
    pub fn per_register(self) -> usize {
        32 / self.bits()
    }

    /// The k extent of one product: 16 (16-bit types) or 32 (FP8).
    pub fn k(self) -> usize {
        8 * self.per_register()
    }
}

/// A memory operand: a global buffer parameter or a shared-memory array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buf {
    /// Index into [`Kernel::params`] (a `Param::Buffer`).
    Global(u32),
    /// Index into [`Kernel::shared`].
    Shared(u32),
}

/// A side-effect-free expression tree.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Const(Const),
    Var(VarId),
    /// A scalar kernel parameter (index into [`Kernel::params`]).
    Param(u32),
    Special(Special),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `a * b + c` in one rounding (floats) or wrapping (integers).
    Fma(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `cond ? a : b`.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Numeric conversion (float → int truncates toward zero; Pred → 0/1).
    Cast(Ty, Box<Expr>),
    /// One element of a buffer, converted to its compute type. The index is I32 or I64.
    Load {
        buf: Buf,
        index: Box<Expr>,
    },
}

/// A statement.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Assign(VarId, Expr),
    /// `dsts.len()` consecutive elements from `index` (a multiple of `dsts.len()`, which is
    /// 2, 4 or 8 and at most 16 bytes of memory). With `I32` destinations from a bf16 or
    /// f16 buffer ([`loads_raw_pairs`]) the elements' raw bits instead: `2 * dsts.len()`
    /// elements (1, 2 or 4 destinations; `index` a multiple of that count), destination i
    /// holding elements `2i` (bits 0..16) and `2i + 1`, as `PackHalves` packs them (an
    /// `Mma` operand without conversions).
    LoadVec {
        dsts: Vec<VarId>,
        buf: Buf,
        index: Expr,
    },
    /// Converts `value` to the buffer's dtype and writes one element.
    Store {
        buf: Buf,
        index: Expr,
        value: Expr,
    },
    /// `values.len()` consecutive elements (same alignment rules as `LoadVec`).
    StoreVec {
        buf: Buf,
        index: Expr,
        values: Vec<Expr>,
    },
    /// `for var = start; var < end; var += step` (all of `var`'s type, step > 0).
    For {
        var: VarId,
        start: Expr,
        end: Expr,
        step: Expr,
        body: Vec<Stmt>,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        otherwise: Vec<Stmt>,
    },
    /// Block-wide barrier (`bar.sync 0`).
    Barrier,
    /// `dst = value of src in lane (lane ^ mask)` across the 32 lanes of the warp.
    ShuffleXor {
        dst: VarId,
        src: VarId,
        mask: u32,
    },
    /// `d = a · b + c`, one m16n8k16 (m16n8k32 for FP8 `input`) tensor-core product across
    /// the warp: `a` (4) and `b` (2) are `I32` registers of packed `input` pairs (quads), `c` and `d` (4 each) are `F32` (`d`
    /// may be `c`). Fragment layout in the module documentation.
    Mma {
        input: MmaInput,
        d: [VarId; 4],
        a: [VarId; 4],
        b: [VarId; 2],
        c: [VarId; 4],
    },
    /// `dsts.len()` (1, 2 or 4) 8×8 matrices of 16-bit elements (8×16 of 8-bit elements,
    /// no `trans`) from a shared array into
    /// packed `I32` registers across the warp (`ldmatrix.sync.m8n8`); `index` is this
    /// lane's row start.
    LdMatrix {
        dsts: Vec<VarId>,
        trans: bool,
        buf: Buf,
        index: Expr,
    },
    /// An asynchronous 16-byte copy from the global buffer `src` to the shared array `dst`
    /// (same dtype): `src_len` (`I32`) elements, then zeros.
    CpAsync {
        dst: Buf,
        dst_index: Expr,
        src: Buf,
        src_index: Expr,
        src_len: Expr,
    },
    /// Closes this thread's open group of `CpAsync` copies (an empty group is fine).
    CpAsyncCommit,
    /// Waits until at most `n` of this thread's committed groups are pending.
    CpAsyncWait(u32),
    /// `dst` (`I32`) = the packed pair of `lo` and `hi` (`F32`) each rounded to `input`'s
    /// 16-bit type (nearest even; `lo` in bits 0..16): an `Mma` operand made in registers
    /// (`cvt.rn.{bf16,f16}x2.f32`). Per thread.
    PackHalves {
        dst: VarId,
        input: MmaInput,
        lo: Expr,
        hi: Expr,
    },
    /// Where the kernel waits for the kernel launched before it (`griddepcontrol.wait`):
    /// at most one, at the top level of the body; without one the wait precedes the body.
    /// The statements before it touch no memory but `PrefetchL2` (module documentation).
    GridDependencyWait,
    /// An L2 prefetch hint of `bytes` (`I32`, a positive multiple of 16) bytes of the
    /// global buffer `buf` from element `index` (16-byte aligned): per thread, no effect
    /// on values (`cp.async.bulk.prefetch.L2`).
    PrefetchL2 {
        buf: Buf,
        index: Expr,
        bytes: Expr,
    },
    /// Lets the next kernel launch before this one finishes
    /// (`griddepcontrol.launch_dependents`; module documentation).
    LaunchDependents,
    /// A warpgroup matrix-multiply statement (sm_90a; [`crate::wgmma`]).
    Wgmma(crate::wgmma::WgmmaOp),
    /// `dst` (`I32`) = element `index` of the `I32` global buffer `buf`, which gets `value`
    /// (`I32`) added in the same indivisible step (module documentation; per thread).
    AtomicAdd {
        dst: VarId,
        buf: Buf,
        index: Expr,
        value: Expr,
    },
    /// A GPU-scope acquire-release fence (module documentation; per thread).
    Fence,
}

/// How a kernel may touch a global buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    /// Read only, and written by no kernel of the program (a checkpoint tensor): its loads
    /// may precede the `GridDependencyWait`, since the kernel still running before this
    /// one cannot be writing it.
    Constant,
    /// Read only, and the elements this kernel loads before its `GridDependencyWait` are
    /// written by no kernel that may still be running: a step's inputs (copied in before
    /// its first kernel) and, by the paged attention template's contract, the KV-cache rows
    /// of positions before the step's tokens (written by earlier steps; the rows the step
    /// writes are loaded again after the wait). Unlike [`Access::Constant`], kernels may
    /// write other elements of it, so its loads move across nothing else, and a backend
    /// with incoherent caches reads it around them (the PTX emitter loads it with
    /// `ld.global.cg`, L2 only: no line an early load brought in stale serves a later one).
    Settled,
}

impl Access {
    /// Whether the kernel may read the buffer.
    pub fn reads(self) -> bool {
        !matches!(self, Access::Write)
    }

    /// Whether the kernel may write the buffer.
    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }

    /// The access of a buffer used both as `self` and as `other` by one kernel.
    pub fn and(self, other: Access) -> Access {
        match (self, other) {
            _ if self == other => self,
            // A template declares a buffer settled for its loads before the wait; its other
            // loads of it, after the wait, keep that.
            (Access::Settled, Access::Read | Access::Constant)
            | (Access::Read | Access::Constant, Access::Settled) => Access::Settled,
            (Access::Read | Access::Constant, Access::Read | Access::Constant) => Access::Read,
            _ => Access::ReadWrite,
        }
    }
}

/// A kernel parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    /// A pointer to global memory holding elements of `dtype`.
    Buffer {
        name: String,
        dtype: DType,
        access: Access,
    },
    /// A scalar passed by value (sizes are `I64`).
    Scalar { name: String, ty: Ty },
}

impl Param {
    pub fn name(&self) -> &str {
        match self {
            Param::Buffer { name, .. } | Param::Scalar { name, .. } => name,
        }
    }
}

/// A shared-memory array (per block).
#[derive(Clone, Debug, PartialEq)]
pub struct Shared {
    pub name: String,
    pub dtype: DType,
    pub len: u32,
}

/// A register declaration.
#[derive(Clone, Debug, PartialEq)]
pub struct Var {
    pub name: String,
    pub ty: Ty,
}

/// A size known at launch time: a function of the program's symbolic dims.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SizeExpr {
    Const(u64),
    /// A symbolic dim of the program (`S`, `B`), bound from the inputs at run time.
    Sym(String),
    Add(Box<SizeExpr>, Box<SizeExpr>),
    Mul(Box<SizeExpr>, Box<SizeExpr>),
    /// `ceil(a / b)`.
    CeilDiv(Box<SizeExpr>, Box<SizeExpr>),
    Min(Box<SizeExpr>, Box<SizeExpr>),
    Max(Box<SizeExpr>, Box<SizeExpr>),
}

impl SizeExpr {
    /// Evaluates with the given symbol values; `None` when a symbol is unbound.
    pub fn eval(&self, sym: &dyn Fn(&str) -> Option<u64>) -> Option<u64> {
        Some(match self {
            SizeExpr::Const(n) => *n,
            SizeExpr::Sym(s) => sym(s)?,
            SizeExpr::Add(a, b) => a.eval(sym)?.checked_add(b.eval(sym)?)?,
            SizeExpr::Mul(a, b) => a.eval(sym)?.checked_mul(b.eval(sym)?)?,
            SizeExpr::CeilDiv(a, b) => {
                let d = b.eval(sym)?;
                if d == 0 {
                    return None;
                }
                a.eval(sym)?.div_ceil(d)
            }
            SizeExpr::Min(a, b) => a.eval(sym)?.min(b.eval(sym)?),
            SizeExpr::Max(a, b) => a.eval(sym)?.max(b.eval(sym)?),
        })
    }
}

impl fmt::Display for SizeExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeExpr::Const(n) => write!(f, "{n}"),
            SizeExpr::Sym(s) => f.write_str(s),
            SizeExpr::Add(a, b) => write!(f, "({a} + {b})"),
            SizeExpr::Mul(a, b) => write!(f, "({a} * {b})"),
            SizeExpr::CeilDiv(a, b) => write!(f, "ceil_div({a}, {b})"),
            SizeExpr::Min(a, b) => write!(f, "min({a}, {b})"),
            SizeExpr::Max(a, b) => write!(f, "max({a}, {b})"),
        }
    }
}

/// One kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// A valid PTX identifier, unique within a package.
    pub name: String,
    pub params: Vec<Param>,
    /// Threads per block (a multiple of 32, at most 1024).
    pub block_dim: u32,
    /// How many blocks of this kernel should fit on an SM at once (at least 1): a
    /// performance hint, not semantics. The PTX backend declares it as `.minnctapersm`,
    /// making ptxas fit the registers of that many blocks (1 sets no register cap); the
    /// interpreter and the CPU backend ignore it.
    pub blocks_per_sm: u32,
    /// Blocks along each grid axis, as functions of the program's symbolic dims.
    pub grid: [SizeExpr; 3],
    pub shared: Vec<Shared>,
    pub vars: Vec<Var>,
    pub body: Vec<Stmt>,
}

impl Kernel {
    pub fn var_ty(&self, v: VarId) -> Ty {
        self.vars[v.0 as usize].ty
    }
}

/// How `buf` is declared among `params`: its access when it is a buffer parameter.
fn buffer_access(params: &[Param], buf: Buf) -> Option<Access> {
    let Buf::Global(i) = buf else {
        return None;
    };
    match params.get(i as usize)? {
        Param::Buffer { access, .. } => Some(*access),
        Param::Scalar { .. } => None,
    }
}

/// Whether `buf` is a buffer parameter of `params` declared [`Access::Constant`] (a
/// checkpoint tensor, which no kernel writes).
pub fn constant_buffer(params: &[Param], buf: Buf) -> bool {
    buffer_access(params, buf) == Some(Access::Constant)
}

/// Whether a kernel may load `buf` before its `GridDependencyWait`: a buffer parameter of
/// `params` declared [`Access::Constant`] or [`Access::Settled`].
pub fn settled_buffer(params: &[Param], buf: Buf) -> bool {
    matches!(
        buffer_access(params, buf),
        Some(Access::Constant | Access::Settled)
    )
}

/// Whether a `LoadVec` of a `dtype` buffer into registers of type `ty` loads raw element
/// pairs: `I32` registers from bf16 or f16 memory, two elements a register.
pub fn loads_raw_pairs(dtype: DType, ty: Ty) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && ty == Ty::I32
}

/// [`UnOp::Exp2`]'s meaning on every backend: `2^x` with subnormal inputs read as zero and
/// subnormal results flushed to zero, as `ex2.approx.ftz.f32` computes it.
pub fn exp2_ftz(x: f32) -> f32 {
    let x = if x.is_subnormal() { 0.0 } else { x };
    let r = libm::exp2(f64::from(x)) as f32;
    if r.is_subnormal() {
        0.0
    } else {
        r
    }
}

#[cfg(test)]
mod exp2_tests {
    use super::exp2_ftz;

    #[test]
    fn exp2_flushes_subnormal_inputs_and_results_to_zero() {
        assert_eq!(exp2_ftz(3.0), 8.0);
        assert_eq!(exp2_ftz(-126.0), f32::MIN_POSITIVE);
        // 2^-127 is subnormal: flushed.
        assert_eq!(exp2_ftz(-127.0), 0.0);
        // A subnormal input counts as 0.
        assert_eq!(exp2_ftz(f32::from_bits(1)), 1.0);
        assert_eq!(exp2_ftz(f32::NEG_INFINITY), 0.0);
    }
}
