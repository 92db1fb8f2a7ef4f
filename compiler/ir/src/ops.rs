//! The op table: the one place where every graph-IR operation is defined — its name in the
//! text form, its operands and attributes, its shape and dtype rule, and (in `interp`) its
//! meaning.
//!
//! Conventions shared by all ops:
//! - The IR is strictly typed: element-wise binary ops take operands of one dtype (the
//!   front end inserts `cast`s following docs/dtypes.md); shapes broadcast numpy-style
//!   (right-aligned; a dim broadcasts when it is `1`; symbolic dims match only the same
//!   symbol).
//! - Axes in attributes are non-negative (the front end resolves negative axes).
//! - A type rule failure is an [`IrError`] whose message names the op and every operand type
//!   involved, e.g. "add: cannot broadcast f32[S, 64] with f32[S, 32]".
//!
//! Layout of this file: the [`Op`] enum (each variant's doc is its semantics); the names of
//! the sub-operations (`op_names!`) and the dtypes they accept; the table proper,
//! [`Op::spec`], one row per op with its name, operand count and region count; the type
//! rules ([`Op::infer`] dispatching to one method per op); and the attributes that the
//! text form shows ([`Op::attrs`] / [`Op::from_parts`]). The interpreter's `eval_op`
//! matches the same enum.

use crate::func::RegionSignature;
use crate::types::{DType, Dim, Shape};
use crate::{IrError, TensorType};
use std::fmt;

/// Element-wise operations of one operand. Result dtype = operand dtype, except `not`
/// (bool → bool). Float-only: everything but `neg`, `abs` (any number) and `not` (bool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
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
    Not,
}

/// Element-wise operations of two operands (broadcasting). Arithmetic ops keep the dtype;
/// comparisons return bool; `and`/`or` take bools. `rem` is floored for floats and ints
/// alike (the sign of the divisor, like Python's `%`); integer `div` is floor division.
///
/// Operand classes: `add sub mul div rem max min` take any number (not bool); `pow` takes
/// floats; `lt le gt ge` take numbers; `eq ne` take any dtype (bool included); `and or`
/// take bools. Float `max`/`min` return NaN when either operand is NaN. Integer arithmetic
/// wraps at the dtype's width; integer `div`/`rem` by zero is a run-time error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Pow,
    Max,
    Min,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// Reductions over a set of axes. Float reductions accumulate in f64 in the interpreter;
/// float `max`/`min` give NaN when any reduced element is NaN. Integer `sum`/`prod` wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
}

/// Every operation of the graph IR.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A checkpoint tensor, looked up by `name` when the function runs. No operands.
    Param {
        name: String,
        ty: TensorType,
    },
    /// A tensor of `shape` filled with `value` converted to `dtype` (as `cast` converts).
    /// No operands. Symbolic dims in `shape` are bound from the function's inputs at run
    /// time.
    Full {
        value: f64,
        dtype: DType,
        shape: Shape,
    },
    /// `[0, 1, ..., len-1]` as a 1-d tensor of a numeric `dtype`. No operands.
    Arange {
        len: Dim,
        dtype: DType,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// `select(cond: bool, a, b)`: broadcasting over all three; a and b share a dtype.
    Select,
    /// Converts every element to `to` (round to nearest even; floats to ints truncate toward
    /// zero and saturate to the int's range, NaN becoming 0; ints to narrower ints wrap;
    /// f16/bf16 overflow to inf; f8 saturates to the largest finite value and keeps NaN;
    /// bool is 0/1 and anything nonzero, NaN included, casts to true).
    Cast {
        to: DType,
    },
    /// Reduces `axes` (sorted, unique, possibly none); `keep` leaves them as dims of size 1.
    /// Dtypes: `mean` floats, the others any number. An empty reduction gives 0 (`sum`), 1
    /// (`prod`), -inf / the int's minimum (`max`), +inf / the int's maximum (`min`), NaN
    /// (`mean`).
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keep: bool,
    },
    /// Index (i64) of the largest element along `axis`, the lowest index on ties; NaN counts
    /// as the largest.
    ArgMax {
        axis: usize,
        keep: bool,
    },
    /// Index (i64) of the smallest element along `axis`, the lowest index on ties; NaN
    /// counts as the smallest (like numpy, both arg-reductions pick the first NaN).
    ArgMin {
        axis: usize,
        keep: bool,
    },
    /// The operand with every line along `axis` sorted ascending (numpy's `np.sort` with
    /// `kind="stable"`): same shape and dtype, numbers only. Floats order by value with NaN
    /// after everything (as numpy); equal values (including -0.0 and +0.0, which compare
    /// equal) keep their input order in the interpreter. Compiled kernels give the same
    /// values: they may order a -0.0 and a +0.0 of one line differently, which no
    /// comparison can see.
    Sort {
        axis: usize,
    },
    /// `a[..., M, K] @ b[..., K, N] -> [..., M, N]` with broadcast batch dims; both operands
    /// of rank >= 2 and one dtype; floats accumulate in f64 in the interpreter.
    MatMul,
    /// Same elements in row-major order, new shape (equal element count; symbolic dims must
    /// match as a multiset).
    Reshape {
        shape: Shape,
    },
    /// `out.dims[i] = in.dims[perm[i]]`.
    Permute {
        perm: Vec<usize>,
    },
    /// Broadcasts to `shape` (numpy rules; the operand's rank may be lower).
    BroadcastTo {
        shape: Shape,
    },
    /// Elements `start, start+step, ...` below `end` along `axis` (0 <= start <= end <= dim,
    /// step >= 1; `end` may be symbolic only when it is the whole dim, and then start = 0 and
    /// step = 1). A constant `end` on a symbolic dim is checked when the dim is bound.
    Slice {
        axis: usize,
        start: u64,
        end: Dim,
        step: u64,
    },
    /// Joins operands (at least one, same dtype and rank) along `axis`; the other dims must
    /// be equal. The joined dim must end up constant.
    Concat {
        axis: usize,
    },
    /// `gather(table, indices)` along `axis`, numpy `take`: the result shape is
    /// `table[..axis] ++ indices.shape ++ table[axis+1..]`. Indices are integers; an index
    /// out of range is a run-time error in the interpreter.
    Gather {
        axis: usize,
    },
    /// Scaled dot-product attention, the built-in fused op: `attention(q, k, v, allow)` with
    /// q `[B, S, H, D]`, k and v `[B, T, KV, D]` (one float dtype; H a multiple of KV: query
    /// head h reads key/value head h / (H / KV)), `allow` bool broadcastable to
    /// `[B, H, S, T]`. For each (b, h, i): s_j = round(q·k_j) · scale where allowed, else
    /// -inf; p = softmax(s) in f32; out = Σ_j p_j v_j, in q's dtype `[B, S, H, D]`. Dot
    /// products and sums accumulate in f64 in the interpreter and round like `matmul`.
    Attention {
        scale: f64,
    },
    /// Stores new key (or value) rows in a paged KV cache: `kv_write(cache, x, slots)` with
    /// cache `[L, NB, BS, KV, D]` (L layers of NB blocks of BS token slots), x `[N, KV, D]`
    /// (one float dtype with the cache) and integer slots `[N]`. The result is `cache` with
    /// `x[n]` stored at `[layer, slots[n] / BS, slots[n] % BS]`; a negative slot stores
    /// nothing (a padding token); a slot past the cache is a run-time error in the
    /// interpreter and stores nothing in compiled kernels.
    ///
    /// Compiled plans update the cache in place: the result shares the cache operand's
    /// memory, so nothing may read the operand after the write (the verifier checks that
    /// every other use of it comes before, by data dependence).
    KvWrite {
        layer: usize,
    },
    /// Attention of N query tokens over a paged KV cache:
    /// `paged_attention(q, k_cache, v_cache, block_tables, seq, pos)` with q `[N, H, D]`,
    /// caches `[L, NB, BS, KV, D]` (H a multiple of KV), integer block tables `[B, MB]`,
    /// and per token the sequence `seq[n]` (its row of the block table) and position
    /// `pos[n]`. Token n attends causally to its sequence's positions `0..=pos[n]`; position
    /// p lives at `[layer, block_tables[seq[n], p / BS], p % BS]`. Scores, softmax and sums
    /// round as in `attention` (one row of it). A token with a negative `seq` (padding) gets
    /// zeros. Block or table entries out of range are run-time errors in the interpreter;
    /// compiled kernels must only be given valid tables. Compiled kernels also assume what
    /// a serving step guarantees: a sequence's tokens in one call hold consecutive
    /// positions, and the call's `kv_write`s store only its own tokens' rows, so a key
    /// position `j ≤ pos[n] - N` was written before the call (the paged kernel may load
    /// those rows before the `kv_write` before it has finished).
    PagedAttention {
        layer: usize,
        scale: f64,
    },
    /// A fixed-count loop. Operands: `count` (an integer scalar) then the initial values of
    /// the carried state. One region with arguments `(i: i64[], carried...)` that yields
    /// the next carried state (same types). Results: the final carried state.
    Loop,
}

// ---------------------------------------------------------------------------------------
// Names of the sub-operations.
// ---------------------------------------------------------------------------------------

/// Gives an enum of sub-operations its text-form names: `name`, `from_name` and `ALL`.
macro_rules! op_names {
    ($ty:ident { $($variant:ident => $name:literal,)* }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),*];

            /// The op's name in the text form.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)*
                }
            }

            /// The variant whose text-form name is `name`.
            pub fn from_name(name: &str) -> Option<$ty> {
                Self::ALL.iter().copied().find(|v| v.name() == name)
            }
        }
    };
}

op_names!(UnaryOp {
    Neg => "neg",
    Abs => "abs",
    Exp => "exp",
    Log => "log",
    Sqrt => "sqrt",
    Rsqrt => "rsqrt",
    Sin => "sin",
    Cos => "cos",
    Tanh => "tanh",
    Sigmoid => "sigmoid",
    Erf => "erf",
    Floor => "floor",
    Ceil => "ceil",
    Recip => "recip",
    Not => "not",
});

op_names!(BinaryOp {
    Add => "add",
    Sub => "sub",
    Mul => "mul",
    Div => "div",
    Rem => "rem",
    Pow => "pow",
    Max => "max",
    Min => "min",
    Eq => "eq",
    Ne => "ne",
    Lt => "lt",
    Le => "le",
    Gt => "gt",
    Ge => "ge",
    And => "and",
    Or => "or",
});

op_names!(ReduceOp {
    Sum => "reduce_sum",
    Mean => "reduce_mean",
    Max => "reduce_max",
    Min => "reduce_min",
    Prod => "reduce_prod",
});

/// A set of element types that an operand may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DTypeClass {
    Any,
    /// Floats and integers, not bool.
    Number,
    Float,
    Integer,
    Bool,
}

impl DTypeClass {
    pub fn admits(self, dtype: DType) -> bool {
        match self {
            DTypeClass::Any => true,
            DTypeClass::Number => dtype != DType::Bool,
            DTypeClass::Float => dtype.is_float(),
            DTypeClass::Integer => dtype.is_int(),
            DTypeClass::Bool => dtype == DType::Bool,
        }
    }

    /// How an error message names the class: "expects {} operand".
    pub fn describe(self) -> &'static str {
        match self {
            DTypeClass::Any => "any",
            DTypeClass::Number => "a numeric (non-bool)",
            DTypeClass::Float => "a float",
            DTypeClass::Integer => "an integer",
            DTypeClass::Bool => "a bool",
        }
    }
}

impl UnaryOp {
    /// The dtypes the operand may have.
    pub fn operand_class(self) -> DTypeClass {
        match self {
            UnaryOp::Neg | UnaryOp::Abs => DTypeClass::Number,
            UnaryOp::Not => DTypeClass::Bool,
            _ => DTypeClass::Float,
        }
    }
}

impl BinaryOp {
    /// The dtypes the (equal-dtype) operands may have.
    pub fn operand_class(self) -> DTypeClass {
        use BinaryOp::*;
        match self {
            Add | Sub | Mul | Div | Rem | Max | Min | Lt | Le | Gt | Ge => DTypeClass::Number,
            Pow => DTypeClass::Float,
            Eq | Ne => DTypeClass::Any,
            And | Or => DTypeClass::Bool,
        }
    }

    /// Comparisons return bool; every other binary op keeps the operand dtype.
    pub fn is_comparison(self) -> bool {
        use BinaryOp::*;
        matches!(self, Eq | Ne | Lt | Le | Gt | Ge)
    }
}

impl ReduceOp {
    /// The dtypes the operand may have (`mean` needs a float; the others any number).
    pub fn operand_class(self) -> DTypeClass {
        match self {
            ReduceOp::Mean => DTypeClass::Float,
            _ => DTypeClass::Number,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The table: one row per op with its name, operand count and region count. The type rule
// of each op follows in `infer`, its attributes in `attrs`/`from_parts`, its meaning in
// `interp::eval_op`.
// ---------------------------------------------------------------------------------------

/// How many operands an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    Exactly(usize),
    AtLeast(usize),
}

impl Arity {
    pub fn admits(self, n: usize) -> bool {
        match self {
            Arity::Exactly(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

impl fmt::Display for Arity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, n) = match *self {
            Arity::Exactly(n) => ("", n),
            Arity::AtLeast(n) => ("at least ", n),
        };
        let plural = if n == 1 { "" } else { "s" };
        write!(f, "{prefix}{n} operand{plural}")
    }
}

/// The facts of the op table that do not depend on operand types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpSpec {
    /// The name in the text form (and in error messages).
    pub name: &'static str,
    pub operands: Arity,
    /// The number of regions the op owns.
    pub regions: usize,
}

const fn spec(name: &'static str, operands: Arity, regions: usize) -> OpSpec {
    OpSpec {
        name,
        operands,
        regions,
    }
}

impl Op {
    /// The op's row in the table.
    pub fn spec(&self) -> OpSpec {
        use Arity::{AtLeast, Exactly};
        match self {
            Op::Param { .. } => spec("param", Exactly(0), 0),
            Op::Full { .. } => spec("full", Exactly(0), 0),
            Op::Arange { .. } => spec("arange", Exactly(0), 0),
            Op::Unary(u) => spec(u.name(), Exactly(1), 0),
            Op::Binary(b) => spec(b.name(), Exactly(2), 0),
            Op::Select => spec("select", Exactly(3), 0),
            Op::Cast { .. } => spec("cast", Exactly(1), 0),
            Op::Reduce { op, .. } => spec(op.name(), Exactly(1), 0),
            Op::ArgMax { .. } => spec("argmax", Exactly(1), 0),
            Op::ArgMin { .. } => spec("argmin", Exactly(1), 0),
            Op::Sort { .. } => spec("sort", Exactly(1), 0),
            Op::MatMul => spec("matmul", Exactly(2), 0),
            Op::Reshape { .. } => spec("reshape", Exactly(1), 0),
            Op::Permute { .. } => spec("permute", Exactly(1), 0),
            Op::BroadcastTo { .. } => spec("broadcast_to", Exactly(1), 0),
            Op::Slice { .. } => spec("slice", Exactly(1), 0),
            Op::Concat { .. } => spec("concat", AtLeast(1), 0),
            Op::Gather { .. } => spec("gather", Exactly(2), 0),
            Op::Attention { .. } => spec("attention", Exactly(4), 0),
            Op::KvWrite { .. } => spec("kv_write", Exactly(3), 0),
            Op::PagedAttention { .. } => spec("paged_attention", Exactly(6), 0),
            Op::Loop => spec("loop", AtLeast(1), 1),
        }
    }

    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    /// The result types of this op applied to operands of the given types.
    ///
    /// Checks the operand and region counts of the table, then the op's shape and dtype
    /// rule. Errors name the op and show the operand types involved.
    pub fn infer(
        &self,
        operands: &[&TensorType],
        regions: &[RegionSignature],
    ) -> Result<Vec<TensorType>, IrError> {
        let spec = self.spec();
        if !spec.operands.admits(operands.len()) {
            return Err(self.error(format!("expects {}, got {}", spec.operands, operands.len())));
        }
        if regions.len() != spec.regions {
            let plural = if spec.regions == 1 { "" } else { "s" };
            return Err(self.error(format!(
                "expects {} region{plural}, got {}",
                spec.regions,
                regions.len()
            )));
        }
        let rule = TypeRule { operands };
        match self {
            Op::Param { ty, .. } => Ok(vec![ty.clone()]),
            Op::Full { dtype, shape, .. } => Ok(vec![TensorType::new(*dtype, shape.clone())]),
            Op::Arange { len, dtype } => rule.arange(len, *dtype),
            Op::Unary(u) => rule.unary(*u),
            Op::Binary(b) => rule.binary(*b),
            Op::Select => rule.select(),
            Op::Cast { to } => Ok(vec![TensorType::new(*to, operands[0].shape.clone())]),
            Op::Reduce { op, axes, keep } => rule.reduce(*op, axes, *keep),
            Op::ArgMax { axis, keep } | Op::ArgMin { axis, keep } => rule.arg_reduce(*axis, *keep),
            Op::Sort { axis } => rule.sort(*axis),
            Op::MatMul => rule.matmul(),
            Op::Reshape { shape } => rule.reshape(shape),
            Op::Permute { perm } => rule.permute(perm),
            Op::BroadcastTo { shape } => rule.broadcast_to(shape),
            Op::Slice {
                axis,
                start,
                end,
                step,
            } => rule.slice(*axis, *start, end, *step),
            Op::Concat { axis } => rule.concat(*axis),
            Op::Gather { axis } => rule.gather(*axis),
            Op::Attention { .. } => rule.attention(),
            Op::KvWrite { layer } => rule.kv_write(*layer),
            Op::PagedAttention { layer, .. } => rule.paged_attention(*layer),
            Op::Loop => rule.loop_(&regions[0]),
        }
        .map_err(|message| self.error(message))
    }

    /// An error about this op: "`name`: `message`".
    pub fn error(&self, message: impl fmt::Display) -> IrError {
        let message = message.to_string();
        let prefix = format!("{}: ", self.name());
        if message.starts_with(&prefix) {
            IrError::new(message)
        } else {
            IrError::new(format!("{prefix}{message}"))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shape and dtype rules. Each returns the result types, or the error message without the
// op's name (which `Op::infer` prefixes).
// ---------------------------------------------------------------------------------------

type RuleResult = Result<Vec<TensorType>, String>;

/// One op's operands, as its type rule sees them.
struct TypeRule<'a> {
    operands: &'a [&'a TensorType],
}

/// `f32[4], f16[4]`: types for an error message.
fn list_types(types: &[&TensorType]) -> String {
    types
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Broadcasts two dims: equal dims, or a constant `1` against anything.
fn broadcast_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    if a == b {
        Some(a.clone())
    } else if *a == Dim::Const(1) {
        Some(b.clone())
    } else if *b == Dim::Const(1) {
        Some(a.clone())
    } else {
        None
    }
}

/// Broadcasts two shapes numpy-style (right-aligned), or `None` when a pair of dims clashes.
pub fn broadcast_shapes(a: &Shape, b: &Shape) -> Option<Shape> {
    let rank = a.rank().max(b.rank());
    let one = Dim::Const(1);
    let dim_at = |s: &Shape, i: usize| -> Dim {
        // `i` counts from the left of the result; shorter shapes are padded with 1 on the left.
        let pad = rank - s.rank();
        if i < pad {
            one.clone()
        } else {
            s.0[i - pad].clone()
        }
    };
    (0..rank)
        .map(|i| broadcast_dim(&dim_at(a, i), &dim_at(b, i)))
        .collect::<Option<Vec<Dim>>>()
        .map(Shape)
}

/// Whether `from` broadcasts to exactly `to` (the operand's dims are equal or `1`).
pub fn broadcasts_to(from: &Shape, to: &Shape) -> bool {
    if from.rank() > to.rank() {
        return false;
    }
    let pad = to.rank() - from.rank();
    from.0
        .iter()
        .zip(&to.0[pad..])
        .all(|(f, t)| f == t || *f == Dim::Const(1))
}

/// The element count of a shape as (product of the constant dims, sorted symbols), or
/// `None` when the constant product overflows.
fn element_count(shape: &Shape) -> Option<(u64, Vec<&str>)> {
    let mut product: u64 = 1;
    let mut symbols = Vec::new();
    for d in &shape.0 {
        match d {
            Dim::Const(n) => product = product.checked_mul(*n)?,
            Dim::Sym(s) => symbols.push(s.as_str()),
        }
    }
    symbols.sort_unstable();
    Some((product, symbols))
}

impl TypeRule<'_> {
    /// Checks that operand `index` has a dtype of `class`.
    fn require_class(&self, index: usize, class: DTypeClass) -> Result<(), String> {
        let ty = self.operands[index];
        if class.admits(ty.dtype) {
            Ok(())
        } else {
            Err(format!("expects {} operand, got {ty}", class.describe()))
        }
    }

    /// Checks that an axis attribute names a dim of operand `index`.
    fn require_axis(&self, index: usize, axis: usize) -> Result<(), String> {
        let ty = self.operands[index];
        if axis < ty.rank() {
            Ok(())
        } else {
            Err(format!("axis {axis} out of range for {ty}"))
        }
    }

    fn arange(&self, len: &Dim, dtype: DType) -> RuleResult {
        if !DTypeClass::Number.admits(dtype) {
            return Err(format!("expects a numeric dtype, got {dtype}"));
        }
        Ok(vec![TensorType::new(dtype, vec![len.clone()])])
    }

    fn unary(&self, op: UnaryOp) -> RuleResult {
        self.require_class(0, op.operand_class())?;
        Ok(vec![self.operands[0].clone()])
    }

    fn binary(&self, op: BinaryOp) -> RuleResult {
        let (a, b) = (self.operands[0], self.operands[1]);
        if a.dtype != b.dtype {
            return Err(format!("operand dtypes differ: {a} and {b}"));
        }
        let class = op.operand_class();
        if !class.admits(a.dtype) {
            return Err(format!(
                "expects {} operands, got {a} and {b}",
                class.describe()
            ));
        }
        let shape = broadcast_shapes(&a.shape, &b.shape)
            .ok_or_else(|| format!("cannot broadcast {a} with {b}"))?;
        let dtype = if op.is_comparison() {
            DType::Bool
        } else {
            a.dtype
        };
        Ok(vec![TensorType::new(dtype, shape)])
    }

    fn select(&self) -> RuleResult {
        let (cond, a, b) = (self.operands[0], self.operands[1], self.operands[2]);
        if cond.dtype != DType::Bool {
            return Err(format!("condition must be bool, got {cond}"));
        }
        if a.dtype != b.dtype {
            return Err(format!("branch dtypes differ: {a} and {b}"));
        }
        let shape = broadcast_shapes(&cond.shape, &a.shape)
            .and_then(|s| broadcast_shapes(&s, &b.shape))
            .ok_or_else(|| format!("cannot broadcast {cond} with {a} and {b}"))?;
        Ok(vec![TensorType::new(a.dtype, shape)])
    }

    /// The shape left after reducing `axes` (all in range, sorted, unique).
    fn reduced_shape(&self, axes: &[usize], keep: bool) -> Result<Shape, String> {
        let x = self.operands[0];
        if let Some(&bad) = axes.iter().find(|&&a| a >= x.rank()) {
            return Err(format!("axis {bad} out of range for {x}"));
        }
        if axes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("axes must be sorted and unique, got {axes:?}"));
        }
        let dims = x.shape.0.iter().enumerate().filter_map(|(i, d)| {
            if !axes.contains(&i) {
                Some(d.clone())
            } else if keep {
                Some(Dim::Const(1))
            } else {
                None
            }
        });
        Ok(Shape(dims.collect()))
    }

    fn reduce(&self, op: ReduceOp, axes: &[usize], keep: bool) -> RuleResult {
        self.require_class(0, op.operand_class())?;
        let shape = self.reduced_shape(axes, keep)?;
        Ok(vec![TensorType::new(self.operands[0].dtype, shape)])
    }

    fn arg_reduce(&self, axis: usize, keep: bool) -> RuleResult {
        self.require_class(0, DTypeClass::Number)?;
        self.require_axis(0, axis)?;
        let shape = self.reduced_shape(&[axis], keep)?;
        Ok(vec![TensorType::new(DType::I64, shape)])
    }

    fn sort(&self, axis: usize) -> RuleResult {
        self.require_class(0, DTypeClass::Number)?;
        self.require_axis(0, axis)?;
        Ok(vec![self.operands[0].clone()])
    }

    fn matmul(&self) -> RuleResult {
        let (a, b) = (self.operands[0], self.operands[1]);
        if a.rank() < 2 || b.rank() < 2 {
            return Err(format!("operands must have rank >= 2: {a} @ {b}"));
        }
        if a.dtype != b.dtype {
            return Err(format!("operand dtypes differ: {a} @ {b}"));
        }
        if !DTypeClass::Number.admits(a.dtype) {
            return Err(format!(
                "expects numeric (non-bool) operands, got {a} @ {b}"
            ));
        }
        let (ra, rb) = (a.rank(), b.rank());
        let (m, k) = (&a.shape.0[ra - 2], &a.shape.0[ra - 1]);
        let (k2, n) = (&b.shape.0[rb - 2], &b.shape.0[rb - 1]);
        if k != k2 {
            return Err(format!("inner dims differ: {a} @ {b}"));
        }
        let batch_a = Shape(a.shape.0[..ra - 2].to_vec());
        let batch_b = Shape(b.shape.0[..rb - 2].to_vec());
        let mut dims = broadcast_shapes(&batch_a, &batch_b)
            .ok_or_else(|| format!("cannot broadcast batch dims of {a} @ {b}"))?
            .0;
        dims.push(m.clone());
        dims.push(n.clone());
        Ok(vec![TensorType::new(a.dtype, dims)])
    }

    /// A paged cache `[L, NB, BS, KV, D]` with a float dtype and `layer < L`.
    fn paged_cache(what: &str, cache: &TensorType, layer: usize) -> Result<(), String> {
        if cache.rank() != 5 || !cache.dtype.is_float() {
            return Err(format!(
                "the {what} must be a float [L, NB, BS, KV, D] tensor, got {cache}"
            ));
        }
        if let Some(layers) = cache.shape.0[0].as_const() {
            if layer as u64 >= layers {
                return Err(format!(
                    "layer {layer} is out of range for the {what} {cache} of {layers} layers"
                ));
            }
        }
        Ok(())
    }

    fn kv_write(&self, layer: usize) -> RuleResult {
        let (cache, x, slots) = (self.operands[0], self.operands[1], self.operands[2]);
        Self::paged_cache("cache", cache, layer)?;
        let cd = &cache.shape.0;
        if x.rank() != 3 || x.dtype != cache.dtype || x.shape.0[1..] != cd[3..] {
            return Err(format!(
                "the rows must be [N, {}, {}] {} to fit the cache {cache}, got {x}",
                cd[3], cd[4], cache.dtype
            ));
        }
        if !slots.dtype.is_int() || slots.rank() != 1 || slots.shape.0[0] != x.shape.0[0] {
            return Err(format!(
                "slots must be integers [{}], one per row, got {slots}",
                x.shape.0[0]
            ));
        }
        Ok(vec![cache.clone()])
    }

    fn paged_attention(&self, layer: usize) -> RuleResult {
        let [q, k, v, tables, seq, pos] = [0, 1, 2, 3, 4, 5].map(|i| self.operands[i]);
        Self::paged_cache("key cache", k, layer)?;
        if k != v {
            return Err(format!("the key and value caches differ: {k} and {v}"));
        }
        if q.rank() != 3 || q.dtype != k.dtype || q.shape.0[2] != k.shape.0[4] {
            return Err(format!(
                "q must be [N, H, {}] {} to match the caches, got {q}",
                k.shape.0[4], k.dtype
            ));
        }
        match (q.shape.0[1].as_const(), k.shape.0[3].as_const()) {
            (Some(h), Some(kv)) if kv > 0 && h % kv == 0 => {}
            _ => {
                return Err(format!(
                    "query heads must be a constant multiple of key/value heads: {q}, {k}"
                ))
            }
        }
        if !tables.dtype.is_int() || tables.rank() != 2 {
            return Err(format!(
                "block tables must be integers [B, MB], got {tables}"
            ));
        }
        for (what, t) in [("seq", seq), ("pos", pos)] {
            if !t.dtype.is_int() || t.rank() != 1 || t.shape.0[0] != q.shape.0[0] {
                return Err(format!(
                    "`{what}` must be integers [{}], one per query token, got {t}",
                    q.shape.0[0]
                ));
            }
        }
        Ok(vec![q.clone()])
    }

    fn attention(&self) -> RuleResult {
        let (q, k, v, allow) = (
            self.operands[0],
            self.operands[1],
            self.operands[2],
            self.operands[3],
        );
        if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
            return Err(format!(
                "q, k and v must be [B, S, H, D] and [B, T, KV, D], got {q}, {k}, {v}"
            ));
        }
        if !q.dtype.is_float() || q.dtype != k.dtype || q.dtype != v.dtype {
            return Err(format!(
                "q, k and v must share one float dtype, got {q}, {k}, {v}"
            ));
        }
        let (qd, kd, vd) = (&q.shape.0, &k.shape.0, &v.shape.0);
        if kd != vd {
            return Err(format!("k and v must have one shape, got {k} and {v}"));
        }
        if qd[0] != kd[0] || qd[3] != kd[3] {
            return Err(format!("q and k differ in batch or head dim: {q}, {k}"));
        }
        match (qd[2].as_const(), kd[2].as_const()) {
            (Some(h), Some(kv)) if kv > 0 && h % kv == 0 => {}
            _ => {
                return Err(format!(
                    "query heads must be a constant multiple of key/value heads: {q}, {k}"
                ))
            }
        }
        if allow.dtype != DType::Bool {
            return Err(format!("the mask must be bool, got {allow}"));
        }
        let scores = Shape(vec![
            qd[0].clone(),
            qd[2].clone(),
            qd[1].clone(),
            kd[1].clone(),
        ]);
        if !broadcasts_to(&allow.shape, &scores) {
            return Err(format!(
                "the mask {allow} does not broadcast to the scores {scores}"
            ));
        }
        Ok(vec![q.clone()])
    }

    fn reshape(&self, shape: &Shape) -> RuleResult {
        let x = self.operands[0];
        let same_count = match (element_count(&x.shape), element_count(shape)) {
            (Some((0, _)), Some((0, _))) => true,
            (Some(from), Some(to)) => from == to,
            _ => false,
        };
        if !same_count {
            return Err(format!("{x} has a different element count than {shape}"));
        }
        Ok(vec![TensorType::new(x.dtype, shape.clone())])
    }

    fn permute(&self, perm: &[usize]) -> RuleResult {
        let x = self.operands[0];
        let mut seen = vec![false; x.rank()];
        let is_permutation = perm.len() == x.rank()
            && perm
                .iter()
                .all(|&p| p < x.rank() && !std::mem::replace(&mut seen[p], true));
        if !is_permutation {
            return Err(format!(
                "{perm:?} is not a permutation of the {} dims of {x}",
                x.rank()
            ));
        }
        let dims = perm
            .iter()
            .map(|&p| x.shape.0[p].clone())
            .collect::<Vec<_>>();
        Ok(vec![TensorType::new(x.dtype, dims)])
    }

    fn broadcast_to(&self, shape: &Shape) -> RuleResult {
        let x = self.operands[0];
        if !broadcasts_to(&x.shape, shape) {
            return Err(format!("cannot broadcast {x} to {shape}"));
        }
        Ok(vec![TensorType::new(x.dtype, shape.clone())])
    }

    fn slice(&self, axis: usize, start: u64, end: &Dim, step: u64) -> RuleResult {
        let x = self.operands[0];
        self.require_axis(0, axis)?;
        let dim = &x.shape.0[axis];
        let range = format!("[{start}:{end}:{step}]");
        if step == 0 {
            return Err(format!("step must be >= 1, got {range} of {x}"));
        }
        let len = match end {
            Dim::Const(end) => {
                if start > *end {
                    return Err(format!("start > end in {range} of axis {axis} of {x}"));
                }
                if let Dim::Const(size) = dim {
                    if end > size {
                        return Err(format!("{range} is out of range for axis {axis} of {x}"));
                    }
                }
                // A constant end on a symbolic dim is checked when the dim is bound.
                Dim::Const((end - start).div_ceil(step))
            }
            Dim::Sym(_) => {
                if end != dim {
                    return Err(format!(
                        "a symbolic end must be the whole dim: {range} of axis {axis} of {x}"
                    ));
                }
                if start != 0 || step != 1 {
                    return Err(format!(
                        "{range} of axis {axis} of {x} has a symbolic length"
                    ));
                }
                dim.clone()
            }
        };
        let mut dims = x.shape.0.clone();
        dims[axis] = len;
        Ok(vec![TensorType::new(x.dtype, dims)])
    }

    fn concat(&self, axis: usize) -> RuleResult {
        let first = self.operands[0];
        let all = list_types(self.operands);
        if axis >= first.rank() {
            return Err(format!("axis {axis} out of range for {all}"));
        }
        let mut joined: u64 = 0;
        for ty in self.operands {
            if ty.dtype != first.dtype {
                return Err(format!("operand dtypes differ: {all}"));
            }
            if ty.rank() != first.rank() {
                return Err(format!("operand ranks differ: {all}"));
            }
            for (i, (d, d0)) in ty.shape.0.iter().zip(&first.shape.0).enumerate() {
                if i != axis && d != d0 {
                    return Err(format!("dim {i} differs between operands: {all}"));
                }
            }
            match &ty.shape.0[axis] {
                Dim::Const(n) => joined += n,
                Dim::Sym(_) => {
                    return Err(format!("the joined dim {axis} must be constant: {all}"));
                }
            }
        }
        let mut dims = first.shape.0.clone();
        dims[axis] = Dim::Const(joined);
        Ok(vec![TensorType::new(first.dtype, dims)])
    }

    fn gather(&self, axis: usize) -> RuleResult {
        let (table, indices) = (self.operands[0], self.operands[1]);
        if !indices.dtype.is_int() {
            return Err(format!("indices must be integers: {table}, {indices}"));
        }
        if axis >= table.rank() {
            return Err(format!("axis {axis} out of range for table {table}"));
        }
        let mut dims = table.shape.0[..axis].to_vec();
        dims.extend(indices.shape.0.iter().cloned());
        dims.extend(table.shape.0[axis + 1..].iter().cloned());
        Ok(vec![TensorType::new(table.dtype, dims)])
    }

    fn loop_(&self, body: &RegionSignature) -> RuleResult {
        let count = self.operands[0];
        if !(count.dtype.is_int() && count.rank() == 0) {
            return Err(format!("count must be an integer scalar, got {count}"));
        }
        let carried = &self.operands[1..];
        if body.args.len() != carried.len() + 1 {
            return Err(format!(
                "the body takes {} arguments, expected {} (the i64[] index and {} carried)",
                body.args.len(),
                carried.len() + 1,
                carried.len()
            ));
        }
        let index_type = TensorType::scalar(DType::I64);
        if body.args[0] != index_type {
            return Err(format!(
                "the body's first argument (the index) must be {index_type}, got {}",
                body.args[0]
            ));
        }
        for (i, (arg, init)) in body.args[1..].iter().zip(carried).enumerate() {
            if arg != *init {
                return Err(format!(
                    "body argument {} has type {arg}, but carried value {i} is {init}",
                    i + 1
                ));
            }
        }
        if body.yields.len() != carried.len() {
            return Err(format!(
                "the body yields {} values, expected {} (the carried state)",
                body.yields.len(),
                carried.len()
            ));
        }
        for (i, (yielded, init)) in body.yields.iter().zip(carried).enumerate() {
            if yielded != *init {
                return Err(format!(
                    "the body yields {yielded} for carried value {i} of type {init}"
                ));
            }
        }
        Ok(carried.iter().map(|t| (*t).clone()).collect())
    }
}

// ---------------------------------------------------------------------------------------
// Attributes: the op's fields as the text form shows them, `{axis = 0, keep = true}`.
// ---------------------------------------------------------------------------------------

/// An attribute value of the text form.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    DType(DType),
    Dim(Dim),
    /// A list of dims: a shape, or (all constant) a list of axes.
    Dims(Vec<Dim>),
    Type(TensorType),
    /// A bare identifier as the parser reads it, before the op says what it means (a dtype,
    /// `true`/`false`, a symbolic dim, `inf`/`nan`). Never produced by [`Op::attrs`].
    Ident(String),
}

fn axes_attr(axes: &[usize]) -> Attr {
    Attr::Dims(axes.iter().map(|&a| Dim::Const(a as u64)).collect())
}

impl Op {
    /// The op's attributes in the order the text form prints them (its fields; the
    /// sub-operation of `Unary`, `Binary` and `Reduce` is part of the name instead).
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        match self {
            Op::Param { name, ty } => vec![
                ("name", Attr::Str(name.clone())),
                ("ty", Attr::Type(ty.clone())),
            ],
            Op::Full {
                value,
                dtype,
                shape,
            } => vec![
                ("value", Attr::Float(*value)),
                ("dtype", Attr::DType(*dtype)),
                ("shape", Attr::Dims(shape.0.clone())),
            ],
            Op::Arange { len, dtype } => vec![
                ("len", Attr::Dim(len.clone())),
                ("dtype", Attr::DType(*dtype)),
            ],
            Op::Unary(_) | Op::Binary(_) | Op::Select | Op::MatMul | Op::Loop => vec![],
            Op::Cast { to } => vec![("to", Attr::DType(*to))],
            Op::Reduce { axes, keep, .. } => {
                vec![("axes", axes_attr(axes)), ("keep", Attr::Bool(*keep))]
            }
            Op::ArgMax { axis, keep } | Op::ArgMin { axis, keep } => vec![
                ("axis", Attr::Int(*axis as u64)),
                ("keep", Attr::Bool(*keep)),
            ],
            Op::Reshape { shape } | Op::BroadcastTo { shape } => {
                vec![("shape", Attr::Dims(shape.0.clone()))]
            }
            Op::Permute { perm } => vec![("perm", axes_attr(perm))],
            Op::Slice {
                axis,
                start,
                end,
                step,
            } => vec![
                ("axis", Attr::Int(*axis as u64)),
                ("start", Attr::Int(*start)),
                ("end", Attr::Dim(end.clone())),
                ("step", Attr::Int(*step)),
            ],
            Op::Concat { axis } | Op::Gather { axis } | Op::Sort { axis } => {
                vec![("axis", Attr::Int(*axis as u64))]
            }
            Op::Attention { scale } => vec![("scale", Attr::Float(*scale))],
            Op::KvWrite { layer } => vec![("layer", Attr::Int(*layer as u64))],
            Op::PagedAttention { layer, scale } => vec![
                ("layer", Attr::Int(*layer as u64)),
                ("scale", Attr::Float(*scale)),
            ],
        }
    }

    /// The op called `name` with the given attributes (the inverse of `name` + `attrs`).
    /// Errors name the op and the offending attribute.
    pub fn from_parts(name: &str, attrs: Vec<(String, Attr)>) -> Result<Op, IrError> {
        let mut a = AttrReader::new(name, attrs)?;
        let op = match name {
            "param" => Op::Param {
                name: a.string("name")?,
                ty: a.tensor_type("ty")?,
            },
            "full" => Op::Full {
                value: a.float("value")?,
                dtype: a.dtype("dtype")?,
                shape: a.shape("shape")?,
            },
            "arange" => Op::Arange {
                len: a.dim("len")?,
                dtype: a.dtype("dtype")?,
            },
            "select" => Op::Select,
            "cast" => Op::Cast { to: a.dtype("to")? },
            "argmax" => Op::ArgMax {
                axis: a.index("axis")?,
                keep: a.bool("keep")?,
            },
            "argmin" => Op::ArgMin {
                axis: a.index("axis")?,
                keep: a.bool("keep")?,
            },
            "sort" => Op::Sort {
                axis: a.index("axis")?,
            },
            "matmul" => Op::MatMul,
            "reshape" => Op::Reshape {
                shape: a.shape("shape")?,
            },
            "permute" => Op::Permute {
                perm: a.indices("perm")?,
            },
            "broadcast_to" => Op::BroadcastTo {
                shape: a.shape("shape")?,
            },
            "slice" => Op::Slice {
                axis: a.index("axis")?,
                start: a.uint("start")?,
                end: a.dim("end")?,
                step: a.uint("step")?,
            },
            "concat" => Op::Concat {
                axis: a.index("axis")?,
            },
            "gather" => Op::Gather {
                axis: a.index("axis")?,
            },
            "attention" => Op::Attention {
                scale: a.float("scale")?,
            },
            "kv_write" => Op::KvWrite {
                layer: a.index("layer")?,
            },
            "paged_attention" => Op::PagedAttention {
                layer: a.index("layer")?,
                scale: a.float("scale")?,
            },
            "loop" => Op::Loop,
            _ => {
                if let Some(u) = UnaryOp::from_name(name) {
                    Op::Unary(u)
                } else if let Some(b) = BinaryOp::from_name(name) {
                    Op::Binary(b)
                } else if let Some(r) = ReduceOp::from_name(name) {
                    Op::Reduce {
                        op: r,
                        axes: a.indices("axes")?,
                        keep: a.bool("keep")?,
                    }
                } else {
                    return Err(IrError::new(format!("unknown op `{name}`")));
                }
            }
        };
        a.finish()?;
        Ok(op)
    }
}

/// Takes typed attributes out of a parsed attribute list, by key.
struct AttrReader<'a> {
    op: &'a str,
    attrs: Vec<(String, Attr)>,
}

impl<'a> AttrReader<'a> {
    fn new(op: &'a str, attrs: Vec<(String, Attr)>) -> Result<AttrReader<'a>, IrError> {
        for (i, (key, _)) in attrs.iter().enumerate() {
            if attrs[..i].iter().any(|(k, _)| k == key) {
                return Err(IrError::new(format!("{op}: attribute `{key}` given twice")));
            }
        }
        Ok(AttrReader { op, attrs })
    }

    fn error(&self, key: &str, expected: &str, found: &Attr) -> IrError {
        IrError::new(format!(
            "{}: attribute `{key}` must be {expected}, got {found:?}",
            self.op
        ))
    }

    fn take(&mut self, key: &str) -> Result<Attr, IrError> {
        let at = self
            .attrs
            .iter()
            .position(|(k, _)| k == key)
            .ok_or_else(|| IrError::new(format!("{}: missing attribute `{key}`", self.op)))?;
        Ok(self.attrs.remove(at).1)
    }

    /// Fails on any attribute the op does not have.
    fn finish(self) -> Result<(), IrError> {
        match self.attrs.first() {
            Some((key, _)) => Err(IrError::new(format!(
                "{}: unknown attribute `{key}`",
                self.op
            ))),
            None => Ok(()),
        }
    }

    fn uint(&mut self, key: &str) -> Result<u64, IrError> {
        match self.take(key)? {
            Attr::Int(n) => Ok(n),
            other => Err(self.error(key, "an unsigned integer", &other)),
        }
    }

    fn index(&mut self, key: &str) -> Result<usize, IrError> {
        let n = self.uint(key)?;
        usize::try_from(n).map_err(|_| self.error(key, "an axis", &Attr::Int(n)))
    }

    fn float(&mut self, key: &str) -> Result<f64, IrError> {
        match self.take(key)? {
            Attr::Float(x) => Ok(x),
            Attr::Int(n) => Ok(n as f64),
            Attr::Ident(s) if s == "inf" => Ok(f64::INFINITY),
            Attr::Ident(s) if s == "nan" => Ok(f64::NAN),
            other => Err(self.error(key, "a number", &other)),
        }
    }

    fn bool(&mut self, key: &str) -> Result<bool, IrError> {
        match self.take(key)? {
            Attr::Bool(b) => Ok(b),
            Attr::Ident(s) if s == "true" => Ok(true),
            Attr::Ident(s) if s == "false" => Ok(false),
            other => Err(self.error(key, "true or false", &other)),
        }
    }

    fn string(&mut self, key: &str) -> Result<String, IrError> {
        match self.take(key)? {
            Attr::Str(s) => Ok(s),
            other => Err(self.error(key, "a string", &other)),
        }
    }

    fn dtype(&mut self, key: &str) -> Result<DType, IrError> {
        match self.take(key)? {
            Attr::DType(d) => Ok(d),
            Attr::Ident(s) if DType::from_name(&s).is_some() => {
                Ok(DType::from_name(&s).expect("checked"))
            }
            other => Err(self.error(key, "a dtype", &other)),
        }
    }

    fn dim(&mut self, key: &str) -> Result<Dim, IrError> {
        match self.take(key)? {
            Attr::Dim(d) => Ok(d),
            Attr::Int(n) => Ok(Dim::Const(n)),
            Attr::Ident(s) => Ok(Dim::Sym(s)),
            other => Err(self.error(key, "a dim", &other)),
        }
    }

    fn shape(&mut self, key: &str) -> Result<Shape, IrError> {
        match self.take(key)? {
            Attr::Dims(dims) => Ok(Shape(dims)),
            other => Err(self.error(key, "a shape", &other)),
        }
    }

    fn indices(&mut self, key: &str) -> Result<Vec<usize>, IrError> {
        let attr = self.take(key)?;
        let as_indices = match &attr {
            Attr::Dims(dims) => dims
                .iter()
                .map(|d| d.as_const().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<usize>>>(),
            _ => None,
        };
        as_indices.ok_or_else(|| self.error(key, "a list of axes", &attr))
    }

    fn tensor_type(&mut self, key: &str) -> Result<TensorType, IrError> {
        match self.take(key)? {
            Attr::Type(t) => Ok(t),
            other => Err(self.error(key, "a tensor type", &other)),
        }
    }
}
