//! The persistent loop template: a graph `loop` over a batch of independent instances (the
//! games of a batched solver) becomes one kernel that runs every iteration itself, instead of
//! a plan loop that launches the body's kernels from the host once per iteration.
//!
//! Mechanism: a block per instance. Each value the body reads or computes lives in a static
//! shared-memory array for the whole kernel, one instance's slice of it: the loop-invariant
//! operands (a game's payoffs `A[g]` and `-A[g]`), the carried state and the body's
//! temporaries. The prologue copies the invariant operands and the initial state in from
//! global memory once; a `For` over the iterations then runs the body's ops in program order,
//! each one a *pass* over the instance's elements of its result; the epilogue writes the
//! final state to the loop's results.
//!
//! - Element-wise ops: a block-strided loop, a thread per element. An element-wise op read
//!   once per element (by one element-wise reader of its shape, or a reduction), an
//!   expression of at most four cheap ops (a scalar compared or clamped and broadcast: each
//!   reader recomputes it), movement ops and constants are no passes: the shared
//!   [`Emitter`] inlines them into their readers (its element expressions read these shared
//!   arrays instead of buffers).
//! - Reductions: a thread per output element folding its elements in row-major order (the
//!   interpreter's order), in f32; with at least 32 elements per output and at most a few
//!   outputs, a warp per output whose lanes fold every 32nd element in order (a constant
//!   number of rounds when the count is constant) and combine by `ShuffleXor` (the same
//!   order on every backend). Shuffles are block-uniform, so every warp executes each tree:
//!   the warp reductions of one barrier interval with the same accumulator kind, on
//!   different warps, share one tree ([`WarpTree`]).
//! - Matmuls: a thread per output element, an in-order `fma` loop over the reduced axis. A
//!   matrix-vector product (a game's `A @ y` and `x @ B`) with a reduced length that is a
//!   multiple of four reads four elements a step ([`SharedMatVec`]): the vector and, for
//!   `W @ v`, the matrix row as 16-byte vector loads. With `matrix_registers`, a product of a
//!   loop-invariant f32 matrix keeps the matrix in registers for the whole kernel instead: a
//!   few consecutive lanes per output element each hold a segment of its row (or column),
//!   fold it against the vector and add their sums by `ShuffleXor`; such kernels take 256
//!   threads (16 registers per matrix for a 64 × 64 game).
//! - A loop-invariant operand that is the negation of another buffer (a zero-sum game's `-A`)
//!   gets no array: its reads negate the other's (one copy of the payoffs in shared memory).
//! - Passes run by dependency level (see [`schedule`]), not in program order, so independent
//!   ones share a barrier interval; barriers separate passes only where one reads or
//!   overwrites an array that another pass since the last barrier wrote or read; small
//!   passes in one interval start at different warps. Arrays of rows that are a multiple of
//!   32 elements (or of symbolic length) get one element of padding per row, so a column
//!   read by neighbouring threads hits every bank once; four for rows read four at a time.
//! - The kernel asks for eight blocks an SM (`Kernel::blocks_per_sm` caps the registers to
//!   fit them; the PTX emitter cuts the request to what the target's shared memory holds).
//! - A yield computed element by element from the state it replaces, at the same index and
//!   after every other read of that state, is written straight into the state's array; the
//!   other yields are copied in at the end of the iteration.
//!
//! Eligibility (anything else keeps the plan-loop path): every carried value of rank ≥ 1 has
//! the same leading dim G (the batch axis; the others are 0-d); a value whose leading dim is
//! G is *batched* and each of its ops keeps instances apart (element-wise ops and broadcasts
//! align G with G, reshapes and permutes keep it leading, reductions, arg-reductions, slices
//! and concats work on other axes, matmuls have it as a batch dim); unbatched values are
//! computed whole by every block. The body has no nested region and only element-wise,
//! movement (reshape, permute, broadcast, slice, concat), constant, reduction and matmul ops;
//! the whole working set fits in [`SHARED_BUDGET`] bytes of static shared memory (the kir
//! limit of a block). Dims besides G may be symbolic: the kernel is then built for the
//! largest power-of-two bound (at most 1024) on them at which the working set fits, and the
//! plan runs it under `Step::BySize` branches when every such dim is within the bound,
//! the plan loop otherwise.
//!
//! Cost model (for reading profiles): per iteration a pass costs its longest per-thread
//! chain plus a barrier; a matmul pass from shared memory reads its matrix once per
//! iteration (a `[64, 64]` one moves 16 KiB through the shared-memory pipe), a register
//! matrix-vector product only its vector. The invariant operands are copied to shared
//! memory even when only register products read them (the bound on symbolic dims counts
//! them).

use super::reduce::{to_i64, Acc, Red};
use super::Built;
use crate::emit::{add, lt, mul, Binding, Emitter, LocalArray};
use crate::error::{EmitError, FusionError};
use crate::graph::FuncGraph;
use crate::partition::Partition;
use crate::plan::dim_size;
use kiln_ir::{Dim, Inst, Op, UnaryOp, Value};
use kiln_kir::{Access, Buf, Expr, SizeExpr, Special, Stmt, Ty};
use std::collections::{BTreeMap, BTreeSet};

/// The static shared memory one block may declare (48 KiB, the kir verifier's limit).
pub(crate) const SHARED_BUDGET: u64 = 48 * 1024;
/// The most threads per block (the largest pass has at most this many per round).
const MAX_THREADS: u32 = 256;
/// The fewest threads per block (so that small passes of one interval spread over warps).
const MIN_THREADS: u32 = 128;

/// How a loop runs as a persistent kernel.
#[derive(Clone, Debug)]
pub(crate) struct LoopPlan {
    /// The batch axis G: a block per index.
    batch: Dim,
    /// Loop-invariant values the body reads, in order of first use.
    outer: Vec<Value>,
    /// Body values computed by a pass of their own into a shared array, in program order.
    passes: Vec<Value>,
    /// Body values computed inline where they are read.
    inlined: BTreeSet<Value>,
    /// Per carried slot: whether its yield is computed straight into the state's array.
    in_place: Vec<bool>,
    pub block_dim: u32,
    /// Symbolic dims besides G: the kernel holds at most `bound` along each, and the plan
    /// launches it only when every one of them is at most `bound`.
    pub symbols: BTreeSet<String>,
    pub bound: u64,
    /// Matrix-vector products whose matrix (loop-invariant) threads keep in registers.
    matvecs: BTreeMap<Value, MatVec>,
    /// The other matrix-vector products that read four reduced elements at a time.
    shared_matvecs: BTreeMap<Value, SharedMatVec>,
    /// Arrays whose rows a [`SharedMatVec`] reads four elements at a time (rows padded to a
    /// multiple of four elements).
    wide_rows: BTreeSet<Value>,
}

/// A matrix-vector product read from shared memory four reduced elements at a time: the
/// vector by `LoadVec`s of four; the matrix by `LoadVec`s along its rows for `W @ v` (each
/// thread reads its own row: rows padded to four more than a multiple of 32 elements, so
/// the eight threads of a 16-byte wavefront fall in distinct banks), or by four loads of
/// neighbouring threads' column elements for `v @ W`. The fold is the plain in-order `fma`
/// chain, so the result is the same bits.
#[derive(Clone, Debug)]
struct SharedMatVec {
    left: bool,
    /// The array the matrix's elements are read from, and whether the matrix is its
    /// negation (an inlined `-A`).
    array: Value,
    negate: bool,
    vector: Value,
    reduced: u64,
}

/// A matrix-vector product `W @ v` (`left`) or `v @ W` of a loop-invariant matrix `W`: each
/// output element gets `split` consecutive lanes, lane `s` holding `W`'s elements
/// `s·seg .. (s+1)·seg` of the output's row (or column) in registers for the whole kernel;
/// per iteration a lane folds its segment against the vector in order (`fma`), and the
/// lanes add their partial sums by `ShuffleXor` (a tree over `split`).
#[derive(Clone, Debug)]
struct MatVec {
    matrix: Value,
    left: bool,
    /// The array holding the vector's elements contiguously (the operand, or what it is a
    /// reshape of).
    vector: Value,
    outputs: Dim,
    reduced: Dim,
    split: u32,
    seg: u64,
    /// Elements per vector load of the vector (4 when the segments allow, else 1).
    lanes: u64,
}

/// The most registers per thread that matrices kept in registers may take.
const MATRIX_REGISTERS: u64 = 72;

/// Decides whether the `loop` instruction `inst` runs as a persistent kernel; the error
/// says why not.
pub(crate) fn plan(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    inst: &Inst,
    options: &crate::Options,
) -> Result<LoopPlan, String> {
    let region = inst.regions.first().ok_or("a loop without a body")?;
    let carried = &region.args[1..];
    let batch = carried
        .iter()
        .find_map(|a| g.shape(*a).first().cloned())
        .ok_or("no carried value has a batch axis")?;
    if carried
        .iter()
        .any(|a| g.shape(*a).first().is_some_and(|d| *d != batch))
    {
        return Err("carried values disagree on the leading dim".into());
    }
    let batched = |v: Value| g.shape(v).first() == Some(&batch);
    let local_dims = |v: Value| -> Vec<Dim> {
        let s = g.shape(v);
        if batched(v) {
            s[1..].to_vec()
        } else {
            s.to_vec()
        }
    };
    let mut symbols = BTreeSet::new();
    let mut note_symbols = |v: Value| {
        for d in local_dims(v) {
            if let Dim::Sym(s) = d {
                symbols.insert(s);
            }
        }
    };

    let mut inside: BTreeSet<Value> = region.args.iter().copied().collect();
    for i in &region.insts {
        inside.extend(i.results.iter().copied());
    }
    // Readers of each body value (an operand used twice counts twice; a yield counts).
    let mut readers: BTreeMap<Value, Vec<Option<&Inst>>> = BTreeMap::new();
    let mut outer = Vec::new();
    let note_outer = |v: Value, outer: &mut Vec<Value>| {
        if !inside.contains(&v) && !outer.contains(&v) {
            outer.push(v);
        }
    };
    for i in &region.insts {
        if !i.regions.is_empty() {
            return Err("a nested loop".into());
        }
        if i.results.len() != 1 {
            return Err(format!("`{}` has several results", i.op.name()));
        }
        let r = i.results[0];
        check_op(g, i, &batched)?;
        note_symbols(r);
        for &o in &i.operands {
            readers.entry(o).or_default().push(Some(i));
            note_outer(o, &mut outer);
        }
    }
    for &y in &region.yields {
        readers.entry(y).or_default().push(None);
        note_outer(y, &mut outer);
    }
    for (k, &y) in region.yields.iter().enumerate() {
        if region.args.contains(&y) && y != region.args[k + 1] {
            return Err("a yield is another region argument".into());
        }
    }
    for &o in outer.iter().chain(&inst.operands) {
        let has_buffer =
            g.is_source(o) || part.stored[o.0 as usize] || part.view_of.contains_key(&o);
        if !has_buffer {
            return Err(format!("{o:?} is read by the loop but has no buffer"));
        }
        note_symbols(o);
    }
    for &a in carried {
        note_symbols(a);
    }

    // Which body values get a pass; the rest are inlined into their one reader.
    let mut passes = Vec::new();
    let mut inlined = BTreeSet::new();
    // An invariant operand that negates another buffer of its shape (a zero-sum game's
    // `-A` beside `A`) is read as the negation of that buffer's array: one shared copy of
    // the payoffs instead of two (a negated operand of an `fma` costs no instruction).
    for o in outer.clone() {
        let Some(i) = g
            .inst(o)
            .filter(|i| matches!(i.op, Op::Unary(UnaryOp::Neg)))
        else {
            continue;
        };
        let negated = i.operands[0];
        let has_buffer = g.is_source(negated) || part.stored[negated.0 as usize];
        if has_buffer && g.shape(negated) == g.shape(o) && g.ty(negated).dtype == g.ty(o).dtype {
            outer.retain(|v| *v != o);
            if !outer.contains(&negated) {
                outer.push(negated);
            }
            inlined.insert(o);
        }
    }
    // Arithmetic ops of each inlined value's expression (recomputed per read; `u32::MAX`
    // when it computes a transcendental function).
    let mut cost: BTreeMap<Value, u32> = BTreeMap::new();
    for i in &region.insts {
        let r = i.results[0];
        let reads = readers.get(&r).map(Vec::as_slice).unwrap_or(&[]);
        let operand_cost = i
            .operands
            .iter()
            .filter_map(|o| cost.get(o))
            .fold(0u32, |a, c| a.saturating_add(*c));
        let own_pass = match &i.op {
            _ if g.is_heavy(r) || g.yielded[r.0 as usize] => true,
            Op::Full { .. } | Op::Arange { .. } => {
                cost.insert(r, 0);
                false
            }
            op if is_movement(op) => {
                cost.insert(r, operand_cost);
                false
            }
            op => {
                // One reader that reads each element once (an element-wise op of the same
                // shape, or a reduction), or a few cheap ops that every reader recomputes
                // (a scalar compared or clamped and broadcast) rather than a pass and a
                // barrier; never recomputed inside a matmul's inner loop.
                let once = matches!(reads, [Some(user)] if (is_computing(&user.op)
                    && g.shape(user.results[0]) == g.shape(r))
                    || matches!(user.op, Op::Reduce { .. } | Op::ArgMax { .. } | Op::ArgMin { .. }));
                let c = if crate::graph::op_cost(op).transcendental > 0 {
                    u32::MAX
                } else {
                    operand_cost.saturating_add(1)
                };
                let into_matmul = read_by_matmul(r, &readers);
                let cheap = c <= MAX_RECOMPUTED && !into_matmul;
                if once || cheap {
                    cost.insert(r, c);
                }
                !(once || cheap)
            }
        };
        if reads.is_empty() && !own_pass {
            continue;
        }
        if own_pass {
            passes.push(r);
        } else {
            inlined.insert(r);
        }
    }

    // Yields written in place: computed element-wise from their state at the same index,
    // after the last pass that reads the state.
    let reads_of = |v: Value| transitive_reads(g, v, &inlined);
    let mut in_place = vec![false; carried.len()];
    for (k, &y) in region.yields.iter().enumerate() {
        let state = carried[k];
        let Some(pos) = passes.iter().position(|p| *p == y) else {
            continue;
        };
        let once = region.yields.iter().filter(|z| **z == y).count() == 1;
        let elementwise = g.inst(y).is_some_and(|i| is_computing(&i.op));
        let later_reads = passes[pos + 1..]
            .iter()
            .any(|p| reads_of(*p).contains(&state));
        if once
            && elementwise
            && g.shape(y) == g.shape(state)
            && g.ty(y).dtype == g.ty(state).dtype
            && !later_reads
            && same_index_only(g, y, state, &inlined)
        {
            in_place[k] = true;
        }
    }

    // Matrix-vector products read from shared memory four elements at a time, and the
    // arrays whose rows they read that way (padded to keep each row 16-byte aligned).
    let mut shared_matvecs = BTreeMap::new();
    for &v in &passes {
        if let Some(m) = shared_matvec(g, v, &inlined, &batched) {
            shared_matvecs.insert(v, m);
        }
    }
    let wide_rows: BTreeSet<Value> = shared_matvecs
        .values()
        .filter(|m| m.left)
        .map(|m| m.array)
        .collect();
    let array_bytes = |v: Value, bound: u64| -> u64 {
        let dims = local_dims(v);
        let n = padded_numel(&dims, row_pad(&dims, wide_rows.contains(&v)), bound);
        (n * g.ty(v).dtype.size_bytes() as u64).next_multiple_of(16)
    };
    let in_place_yields: BTreeSet<Value> = region
        .yields
        .iter()
        .zip(&in_place)
        .filter(|(_, p)| **p)
        .map(|(y, _)| *y)
        .collect();
    let shared_bytes = |bound: u64| -> u64 {
        outer
            .iter()
            .chain(carried)
            .chain(passes.iter().filter(|p| !in_place_yields.contains(p)))
            .map(|v| array_bytes(*v, bound))
            .sum()
    };
    // Symbolic dims besides G get the largest bound (a power of two) at which the working
    // set fits; the plan runs this kernel only when they are within it.
    let bound = if symbols.is_empty() {
        1
    } else {
        BOUNDS
            .iter()
            .copied()
            .find(|b| shared_bytes(*b) <= SHARED_BUDGET)
            .ok_or("the working set exceeds shared memory at every bound")?
    };
    let bytes = shared_bytes(bound);
    if bytes > SHARED_BUDGET {
        return Err(format!(
            "the working set ({bytes} bytes) exceeds {SHARED_BUDGET} bytes of shared memory"
        ));
    }
    let widest = passes
        .iter()
        .chain(carried)
        .map(|v| numel_at(&local_dims(*v), bound))
        .max()
        .unwrap_or(1);
    let mut block_dim = (widest.next_multiple_of(32) as u32).clamp(MIN_THREADS, MAX_THREADS);
    // Matrices kept in registers take a quarter of the registers each at the most threads.
    let registers_allowed = options.persistent.matrix_registers;
    if registers_allowed
        && passes
            .iter()
            .any(|v| matvec(g, *v, &outer, &inlined, &batched, MAX_THREADS, bound).is_some())
    {
        block_dim = MAX_THREADS;
    }
    let mut matvecs = BTreeMap::new();
    let mut registers: BTreeMap<(Value, bool), u64> = BTreeMap::new();
    for &v in passes.iter().filter(|_| registers_allowed) {
        let Some(mv) = matvec(g, v, &outer, &inlined, &batched, block_dim, bound) else {
            continue;
        };
        // One register copy per matrix and side, shared by its products, within a budget.
        let total: u64 = registers.values().sum();
        let held = match registers.entry((mv.matrix, mv.left)) {
            std::collections::btree_map::Entry::Occupied(o) => *o.get() == mv.seg,
            std::collections::btree_map::Entry::Vacant(slot) => {
                let fits = total + mv.seg <= MATRIX_REGISTERS;
                if fits {
                    slot.insert(mv.seg);
                }
                fits
            }
        };
        if held {
            shared_matvecs.remove(&v);
            matvecs.insert(v, mv);
        }
    }
    Ok(LoopPlan {
        batch,
        outer,
        passes,
        inlined,
        in_place,
        block_dim,
        symbols,
        bound,
        matvecs,
        shared_matvecs,
        wide_rows,
    })
}

/// A batched f32 matrix-vector product `W @ v` (`left`) or `v @ W`: its matrix operand,
/// the array holding the vector's elements along its last axis, and the dims.
struct Product {
    left: bool,
    matrix: Value,
    vector: Value,
    outputs: Dim,
    reduced: Dim,
}

/// Whether pass `v` is a batched f32 matrix-vector product whose vector is an array of the
/// loop (through reshapes).
fn product(
    g: &FuncGraph<'_>,
    v: Value,
    inlined: &BTreeSet<Value>,
    batched: &dyn Fn(Value) -> bool,
) -> Option<Product> {
    let inst = g.inst(v)?;
    if !matches!(inst.op, Op::MatMul) || !batched(v) || g.ty(v).dtype != kiln_ir::DType::F32 {
        return None;
    }
    let (a, b) = (inst.operands[0], inst.operands[1]);
    let shape = g.shape(v);
    let (left, matrix, other) = match shape {
        [_, _, Dim::Const(1)] => (true, a, b),
        [_, Dim::Const(1), _] => (false, b, a),
        _ => return None,
    };
    let ms = g.shape(matrix);
    if !batched(matrix) || ms.len() != 3 {
        return None;
    }
    let (outputs, reduced) = if left {
        (ms[1].clone(), ms[2].clone())
    } else {
        (ms[2].clone(), ms[1].clone())
    };
    let out_dim = if left { &shape[1] } else { &shape[2] };
    if *out_dim != outputs {
        return None;
    }
    // The vector: the other operand, through reshapes, down to an array holding its elements
    // along its last axis.
    let mut vector = other;
    while inlined.contains(&vector) {
        let i = g.inst(vector)?;
        if !matches!(i.op, Op::Reshape { .. }) {
            return None;
        }
        vector = i.operands[0];
    }
    let vs = g.shape(vector);
    let local: Vec<&Dim> = vs[usize::from(batched(vector))..].iter().collect();
    let (last, rest) = local.split_last()?;
    if **last != reduced || rest.iter().any(|d| **d != Dim::Const(1)) || !batched(vector) {
        return None;
    }
    Some(Product {
        left,
        matrix,
        vector,
        outputs,
        reduced,
    })
}

/// Whether pass `v` is a matrix-vector product of a batched loop-invariant matrix that
/// can be kept in registers (see [`MatVec`]).
fn matvec(
    g: &FuncGraph<'_>,
    v: Value,
    outer: &[Value],
    inlined: &BTreeSet<Value>,
    batched: &dyn Fn(Value) -> bool,
    threads: u32,
    bound: u64,
) -> Option<MatVec> {
    let Product {
        left,
        matrix,
        vector,
        outputs,
        reduced,
    } = product(g, v, inlined, batched)?;
    if !outer.contains(&matrix) {
        return None;
    }
    let out_most = outputs.as_const().unwrap_or(bound);
    let red_most = reduced.as_const().unwrap_or(bound);
    // Lanes per output: at most a warp, no more than the reduced elements (rounded up to a
    // power of two), as many as the threads allow.
    let mut split = red_most.next_power_of_two().min(32) as u32;
    while split > 1 && out_most * u64::from(split) > u64::from(threads) {
        split /= 2;
    }
    if out_most * u64::from(split) > u64::from(threads) {
        return None;
    }
    let seg = red_most.div_ceil(u64::from(split));
    let lanes = if seg % 4 == 0 && reduced.as_const() == Some(seg * u64::from(split)) {
        4
    } else {
        1
    };
    Some(MatVec {
        matrix,
        left,
        vector,
        outputs,
        reduced,
        split,
        seg,
        lanes,
    })
}

/// Whether pass `v` is a matrix-vector product [`SharedMatVec`] can take: a reduced
/// length that is a multiple of four, and a matrix that is an array of the loop or the
/// inlined negation of one.
fn shared_matvec(
    g: &FuncGraph<'_>,
    v: Value,
    inlined: &BTreeSet<Value>,
    batched: &dyn Fn(Value) -> bool,
) -> Option<SharedMatVec> {
    let Product {
        left,
        matrix,
        vector,
        reduced,
        ..
    } = product(g, v, inlined, batched)?;
    let reduced = reduced.as_const().filter(|k| k % 4 == 0)?;
    let (array, negate) = if inlined.contains(&matrix) {
        let i = g.inst(matrix)?;
        let base = *i.operands.first()?;
        if !matches!(i.op, Op::Unary(UnaryOp::Neg))
            || inlined.contains(&base)
            || g.shape(base) != g.shape(matrix)
        {
            return None;
        }
        (base, true)
    } else {
        (matrix, false)
    };
    Some(SharedMatVec {
        left,
        array,
        negate,
        vector,
        reduced,
    })
}

/// Whether a matmul reads `v`, directly or through movement ops (it would recompute an
/// inlined `v` for every output element).
fn read_by_matmul(v: Value, readers: &BTreeMap<Value, Vec<Option<&Inst>>>) -> bool {
    readers.get(&v).is_some_and(|users| {
        users.iter().flatten().any(|u| {
            matches!(u.op, Op::MatMul)
                || (is_movement(&u.op) && read_by_matmul(u.results[0], readers))
        })
    })
}

/// Element-wise ops that compute something (as opposed to moving elements).
fn is_computing(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. }
    )
}

fn is_movement(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::BroadcastTo { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
    )
}

/// Whether op `i` keeps the instances of the batch apart (see the module documentation).
fn check_op(g: &FuncGraph<'_>, i: &Inst, batched: &dyn Fn(Value) -> bool) -> Result<(), String> {
    let r = i.results[0];
    let rank = g.shape(r).len();
    let rb = batched(r);
    let aligned = |o: Value| -> bool {
        // An operand broadcast against the result: a batched one must line up with G.
        let s = g.shape(o);
        if batched(o) {
            rb && s.len() == rank
        } else {
            !(rb && s.len() == rank && s[0] != Dim::Const(1))
        }
    };
    let ok = match &i.op {
        Op::Full { .. } | Op::Arange { .. } => true,
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } | Op::BroadcastTo { .. } => {
            i.operands.iter().all(|o| aligned(*o))
        }
        Op::Reshape { .. } => batched(i.operands[0]) == rb,
        Op::Permute { perm } => {
            let ob = batched(i.operands[0]);
            ob == rb && (!ob || perm[0] == 0)
        }
        Op::Slice { axis, .. } | Op::Concat { axis } => {
            i.operands.iter().all(|o| batched(*o) == rb) && (!rb || *axis != 0)
        }
        Op::Reduce { axes, .. } => {
            let ob = batched(i.operands[0]);
            ob == rb && (!ob || !axes.contains(&0))
        }
        Op::ArgMax { axis, .. } | Op::ArgMin { axis, .. } => {
            let ob = batched(i.operands[0]);
            ob == rb && (!ob || *axis != 0)
        }
        Op::MatMul => (!rb || rank >= 3) && i.operands.iter().all(|o| aligned(*o)),
        other => return Err(format!("`{}` has no block-local form", other.name())),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` mixes the batch axis with another",
            i.op.name()
        ))
    }
}

/// The values held in arrays (not inlined) that computing `v` reads.
fn transitive_reads(g: &FuncGraph<'_>, v: Value, inlined: &BTreeSet<Value>) -> BTreeSet<Value> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<Value> = g.inst(v).map(|i| i.operands.clone()).unwrap_or_default();
    while let Some(o) = stack.pop() {
        if inlined.contains(&o) {
            if let Some(i) = g.inst(o) {
                stack.extend(i.operands.iter().copied());
            }
        } else {
            out.insert(o);
        }
    }
    out
}

/// Whether the element-wise value `v` reads `state` only at its own index: through
/// computing ops whose operands on the way have `v`'s shape.
fn same_index_only(g: &FuncGraph<'_>, v: Value, state: Value, inlined: &BTreeSet<Value>) -> bool {
    let shape = g.shape(v);
    let Some(i) = g.inst(v) else {
        return true;
    };
    i.operands.iter().all(|&o| {
        if o == state {
            return g.shape(o) == shape;
        }
        if !inlined.contains(&o) {
            return true;
        }
        let reaches = transitive_reads(g, o, inlined).contains(&state);
        if !reaches {
            return true;
        }
        g.shape(o) == shape
            && g.inst(o).is_some_and(|oi| is_computing(&oi.op))
            && same_index_only(g, o, state, inlined)
    })
}

/// The most arithmetic ops an inlined expression read by several elements may have.
const MAX_RECOMPUTED: u32 = 4;

/// The bounds tried for symbolic dims besides G, largest first.
const BOUNDS: [u64; 7] = [1024, 512, 256, 128, 64, 32, 16];

/// The passes in the order they run: by level (one more than the highest level of a pass
/// they read, and for a yield written in place one more than every other reader of its
/// state), then in program order. Passes of one level do not depend on each other, so they
/// share barrier intervals; the hazard check in [`emit`] places the barriers.
fn schedule(g: &FuncGraph<'_>, p: &LoopPlan, yields: &[Value], carried: &[Value]) -> Vec<Value> {
    let in_place: BTreeMap<Value, Value> = yields
        .iter()
        .zip(carried)
        .zip(&p.in_place)
        .filter(|(_, here)| **here)
        .map(|((y, state), _)| (*y, *state))
        .collect();
    let reads: Vec<BTreeSet<Value>> = p
        .passes
        .iter()
        .map(|v| transitive_reads(g, *v, &p.inlined))
        .collect();
    let mut level: BTreeMap<Value, usize> = BTreeMap::new();
    for (i, &v) in p.passes.iter().enumerate() {
        let mut l = reads[i]
            .iter()
            .filter_map(|r| level.get(r).map(|lr| lr + 1))
            .max()
            .unwrap_or(0);
        if let Some(state) = in_place.get(&v) {
            for (j, &u) in p.passes[..i].iter().enumerate() {
                if reads[j].contains(state) {
                    l = l.max(level[&u] + 1);
                }
            }
        }
        level.insert(v, l);
    }
    let mut order: Vec<(usize, usize, Value)> = p
        .passes
        .iter()
        .enumerate()
        .map(|(i, v)| (level[v], i, *v))
        .collect();
    order.sort();
    order.into_iter().map(|(_, _, v)| v).collect()
}

/// Padding after each innermost row of a shared array: one element when rows may be a
/// multiple of 32 elements long (a column read by neighbouring threads then spans every
/// bank instead of one); four for `wide` rows read four elements at a time (each row stays
/// 16-byte aligned, and the rows of eight neighbouring threads start in distinct banks).
fn row_pad(dims: &[Dim], wide: bool) -> u64 {
    match dims {
        [.., _, Dim::Const(n)] if n % 32 == 0 => {
            if wide {
                4
            } else {
                1
            }
        }
        [.., _, Dim::Sym(_)] => 1,
        _ => 0,
    }
}

/// The elements of `dims` with every symbolic dim at `bound`.
fn numel_at(dims: &[Dim], bound: u64) -> u64 {
    dims.iter().map(|d| d.as_const().unwrap_or(bound)).product()
}

/// The length of a shared array holding `dims` (symbolic dims at `bound`), rows padded.
fn padded_numel(dims: &[Dim], pad: u64, bound: u64) -> u64 {
    let mut n = 1;
    for (k, d) in dims.iter().enumerate() {
        let size = d.as_const().unwrap_or(bound);
        n *= if k + 1 == dims.len() {
            size + pad
        } else {
            size
        };
    }
    n
}

/// Which shared arrays a pass reads and writes, for placing barriers.
struct Hazards {
    read: BTreeSet<u32>,
    written: BTreeSet<u32>,
    /// Threads already given to passes since the last barrier (the next pass starts there).
    base: u32,
    /// The warp reductions of the interval, their shuffle trees not yet emitted.
    trees: Vec<WarpTree>,
}

/// Warp reductions of one barrier interval that share an accumulator kind and one shuffle
/// tree: each runs on warps of its own, folds its elements into the same accumulator
/// registers, and one tree (executed by every thread, as shuffles must be) combines every
/// warp's lanes at once instead of one tree per reduction.
struct WarpTree {
    red: Red,
    dtype: kiln_ir::DType,
    acc: Acc,
    /// The accumulator's initialization, the reductions' folds and their stores.
    init: Vec<Stmt>,
    folds: Vec<Stmt>,
    stores: Vec<Stmt>,
    /// The warps the reductions occupy.
    warps: BTreeSet<u32>,
}

impl Hazards {
    /// Whether a barrier must come before a pass reading `reads` and writing `writes`.
    fn conflicts(&self, reads: &BTreeSet<u32>, writes: &BTreeSet<u32>) -> bool {
        reads.iter().any(|r| self.written.contains(r))
            || writes
                .iter()
                .any(|w| self.written.contains(w) || self.read.contains(w))
    }

    /// Emits the interval's pending shuffle trees, then the barrier.
    fn barrier(&mut self, e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>) {
        for tree in self.trees.drain(..) {
            out.extend(tree.init);
            out.extend(tree.folds);
            tree.acc.warp_reduce(e, out);
            out.extend(tree.stores);
        }
        out.push(Stmt::Barrier);
        self.read.clear();
        self.written.clear();
        self.base = 0;
    }
}

fn shared_index(buf: Buf) -> u32 {
    match buf {
        Buf::Shared(i) => i,
        Buf::Global(_) => unreachable!("local arrays are shared"),
    }
}

/// Emits the kernel of a loop that [`plan`] accepted.
pub(crate) fn emit(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    inst: &Inst,
    p: &LoopPlan,
    options: &crate::Options,
) -> Result<Built, FusionError> {
    let region = &inst.regions[0];
    let carried = &region.args[1..];
    let index_ty = index_type(g, inst, p, options);
    let mut e = Emitter::new(g, &part.stored, index_ty);
    e.owned = p.inlined.clone();
    let batched = |v: Value| g.shape(v).first() == Some(&p.batch);
    let t = p.block_dim;

    // The shared arrays.
    let declare = |e: &mut Emitter<'_, '_>, v: Value, name: &str| {
        let s = g.shape(v);
        let b = batched(v);
        let dims: Vec<Dim> = if b { s[1..].to_vec() } else { s.to_vec() };
        let pad = row_pad(&dims, p.wide_rows.contains(&v));
        let len = padded_numel(&dims, pad, p.bound) as u32;
        let buf = e.shared_array(name, g.ty(v).dtype, len);
        e.local.insert(
            v,
            LocalArray {
                buf,
                batched: b,
                dims,
                pad,
            },
        );
    };
    for (n, &v) in p.outer.iter().enumerate() {
        declare(&mut e, v, &format!("invariant{n}"));
    }
    for (k, &a) in carried.iter().enumerate() {
        declare(&mut e, a, &format!("state{k}"));
    }
    for (k, &y) in region.yields.iter().enumerate() {
        if p.in_place[k] {
            let state = e.local[&carried[k]].clone();
            e.local.insert(y, state);
        }
    }
    for (n, &v) in p.passes.iter().enumerate() {
        if !e.local.contains_key(&v) {
            declare(&mut e, v, &format!("temp{n}"));
        }
    }

    let instance = e.special(Special::BlockIdx(0));
    let full_index = |v: Value, local: Vec<Expr>| -> Vec<Expr> {
        if batched(v) {
            let mut idx = vec![instance.clone()];
            idx.extend(local);
            idx
        } else {
            local
        }
    };
    let fatal = |err: EmitError| match err {
        EmitError::Fatal(f) => f,
        EmitError::NotFusable(v) => FusionError::Internal {
            function: g.func.name.clone(),
            value: v,
            message: "a persistent loop read a value at an element it does not hold".into(),
        },
    };

    let mut body = Vec::new();
    // Prologue: invariant operands and the initial state from global memory.
    let mut copies: Vec<(Value, Value)> = p.outer.iter().map(|&v| (v, v)).collect();
    copies.extend(
        carried
            .iter()
            .zip(&inst.operands[1..])
            .map(|(&a, &i)| (i, a)),
    );
    for (src, dst) in copies {
        let dims = e.local[&dst].dims.clone();
        let n = Count::of(&mut e, &dims, p.bound);
        let buf = e.buffer(src, Access::Read);
        let shape = g.shape(src);
        strided(&mut e, &mut body, n, t, 0, |e, out, j| {
            let local = e.delinearize(out, j, &dims);
            let idx = full_index(src, local);
            let at = e.linear(shape, &idx);
            let value = Expr::Load {
                buf,
                index: Box::new(at),
            };
            let dst_buf = e.local[&dst].buf;
            let index = e.local_offset(dst, &idx);
            out.push(Stmt::Store {
                buf: dst_buf,
                index,
                value,
            });
            Ok(())
        })
        .map_err(fatal)?;
    }
    body.push(Stmt::Barrier);
    // Matrices kept in registers, loaded once.
    let mut held: BTreeMap<(Value, bool), Vec<kiln_kir::VarId>> = BTreeMap::new();
    for mv in p.matvecs.values() {
        if held.contains_key(&(mv.matrix, mv.left)) {
            continue;
        }
        let regs = load_matrix(&mut e, &mut body, mv, &instance);
        held.insert((mv.matrix, mv.left), regs);
    }

    // The iterations.
    let count_v = inst.operands[0];
    let count_buf = e.buffer(count_v, Access::Read);
    let count = e.var("count", Ty::I32);
    let count_load = Expr::Load {
        buf: count_buf,
        index: Box::new(e.ix(0)),
    };
    let count_load = if e.cty(count_v) == Ty::I32 {
        count_load
    } else {
        Expr::Cast(Ty::I32, Box::new(count_load))
    };
    body.push(Stmt::Assign(count, count_load));
    let it = e.var("iter", Ty::I32);
    let counter = region.args[0];
    let counter_ty = e.cty(counter);
    e.bindings.push(Binding {
        value: counter,
        index: Vec::new(),
        expr: Expr::Cast(counter_ty, Box::new(Expr::Var(it))),
    });
    let mut iteration = Vec::new();
    let mut hz = Hazards {
        read: BTreeSet::new(),
        written: BTreeSet::new(),
        base: 0,
        trees: Vec::new(),
    };
    let buf_of = |e: &Emitter<'_, '_>, v: Value| shared_index(e.local[&v].buf);
    for v in schedule(g, p, &region.yields, carried) {
        let reads: BTreeSet<u32> = transitive_reads(g, v, &p.inlined)
            .into_iter()
            .filter(|o| *o != counter)
            .map(|o| buf_of(&e, o))
            .collect();
        let writes: BTreeSet<u32> = [buf_of(&e, v)].into();
        if hz.conflicts(&reads, &writes) {
            hz.barrier(&mut e, &mut iteration);
        }
        let dims = e.local[&v].dims.clone();
        let n = Count::of(&mut e, &dims, p.bound);
        let base = hz.base;
        if let Some(mv) = p.matvecs.get(&v) {
            let regs = held[&(mv.matrix, mv.left)].clone();
            matvec_pass(&mut e, &mut iteration, v, mv, &regs, &instance);
            let used = mv.outputs.as_const().unwrap_or(p.bound) * u64::from(mv.split);
            hz.base = ((used.min(u64::from(t)) as u32).next_multiple_of(32)) % t;
            hz.read.extend(reads);
            hz.written.extend(writes);
            continue;
        }
        if let Some(outputs) = warp_reduction(&e, v, &dims, t, base, p.bound) {
            // A warp per output element, its lanes striding over the reduced elements.
            let first = full_index(v, vec![e.ix(0); dims.len()]);
            warp_reduce_pass(
                &mut e,
                &mut hz.trees,
                v,
                &dims,
                outputs,
                t,
                base,
                &first[..usize::from(batched(v))],
            )
            .map_err(fatal)?;
            hz.base = (base + 32 * outputs as u32) % t;
            hz.read.extend(reads);
            hz.written.extend(writes);
            continue;
        }
        hz.base = store_pass(
            &mut e,
            &mut iteration,
            v,
            &dims,
            n,
            (t, base),
            &full_index,
            |e, out, idx| match p.shared_matvecs.get(&v) {
                Some(m) => Ok(shared_matvec_fold(e, out, m, idx)),
                None => compute(e, out, v, idx),
            },
        )
        .map_err(fatal)?;
        hz.read.extend(reads);
        hz.written.extend(writes);
    }
    // Yields not written in place are copied into the state.
    for (k, &y) in region.yields.iter().enumerate() {
        let state = carried[k];
        if p.in_place[k] || y == state {
            continue;
        }
        let reads: BTreeSet<u32> = [buf_of(&e, y)].into();
        let writes: BTreeSet<u32> = [buf_of(&e, state)].into();
        if hz.conflicts(&reads, &writes) {
            hz.barrier(&mut e, &mut iteration);
        }
        let dims = e.local[&state].dims.clone();
        let n = Count::of(&mut e, &dims, p.bound);
        hz.base = store_pass(
            &mut e,
            &mut iteration,
            state,
            &dims,
            n,
            (t, hz.base),
            &full_index,
            |e, out, idx| Ok(e.elem(out, y, idx, 1)?.remove(0)),
        )
        .map_err(fatal)?;
        hz.read.extend(reads);
        hz.written.extend(writes);
    }
    hz.barrier(&mut e, &mut iteration);
    body.push(Stmt::For {
        var: it,
        start: Expr::Const(kiln_kir::Const::I32(0)),
        end: Expr::Var(count),
        step: Expr::Const(kiln_kir::Const::I32(1)),
        body: iteration,
    });

    // Epilogue: the final state to the loop's results (unbatched ones by block 0 only).
    for (k, &state) in carried.iter().enumerate() {
        let result = inst.results[k];
        let dims = e.local[&state].dims.clone();
        let n = Count::of(&mut e, &dims, p.bound);
        let buf = e.buffer(result, Access::Write);
        let shape = g.shape(result);
        let mut stores = Vec::new();
        strided(&mut e, &mut stores, n, t, 0, |e, out, j| {
            let local = e.delinearize(out, j, &dims);
            let idx = full_index(state, local);
            let value = e.elem(out, state, &idx, 1)?.remove(0);
            let index = e.linear(shape, &idx);
            out.push(Stmt::Store { buf, index, value });
            Ok(())
        })
        .map_err(fatal)?;
        if batched(state) {
            body.extend(stores);
        } else {
            body.push(Stmt::If {
                cond: Expr::Binary(
                    kiln_kir::BinOp::Eq,
                    Box::new(instance.clone()),
                    Box::new(e.ix(0)),
                ),
                then: stores,
                otherwise: Vec::new(),
            });
        }
    }

    let grid = [dim_size(&p.batch), SizeExpr::Const(1), SizeExpr::Const(1)];
    let dtype = inst
        .results
        .first()
        .map(|r| g.ty(*r).dtype)
        .unwrap_or(kiln_ir::DType::F32);
    e.blocks_per_sm = blocks_per_sm(t, options.persistent.blocks_per_sm);
    let (kernel, args, mut fused) = e.finish(String::new(), t, grid, body);
    fused.extend(p.passes.iter().copied());
    fused.insert(inst.results[0]);
    Ok(Built {
        kernel,
        args,
        fused,
        what: format!("persistent_loop_{}", dtype.name()),
    })
}

/// The most blocks an SM a persistent kernel asks for by default.
const MOST_BLOCKS_PER_SM: u32 = 8;

/// The blocks an SM a persistent kernel asks ptxas to fit (`Kernel::blocks_per_sm`, which
/// caps its registers): `tuning` when set, else [`MOST_BLOCKS_PER_SM`] within the fewest
/// threads an SM of the targets holds (sm_89 and sm_120: 1536). The PTX emitter cuts the
/// request to the blocks whose shared memory the target's SM holds. The solver loops are
/// bound by latency and the shared-memory pipe, so resident games matter more than
/// registers: RM+ on 10,000 games of 64 × 64 took 0.0695 ms an iteration at eight blocks an
/// SM (64 registers) against 0.0722 ms with ptxas's 68 registers (seven blocks).
fn blocks_per_sm(threads: u32, tuning: u32) -> u32 {
    if tuning > 0 {
        return tuning;
    }
    (1536 / threads).clamp(1, MOST_BLOCKS_PER_SM)
}

/// How many elements a pass covers: an expression and its largest value.
struct Count {
    expr: Expr,
    most: u64,
    constant: bool,
}

impl Count {
    fn of(e: &mut Emitter<'_, '_>, dims: &[Dim], bound: u64) -> Count {
        Count {
            expr: e.numel(dims),
            most: numel_at(dims, bound),
            constant: dims.iter().all(|d| d.as_const().is_some()),
        }
    }
}

/// A pass storing every element of `target` (of shape `dims`, `n` elements) that `value`
/// computes from its full index, block-strided over `threads` threads rotated by `base`;
/// returns the rotation the next pass of the barrier interval starts at.
#[allow(clippy::too_many_arguments)]
fn store_pass(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    target: Value,
    dims: &[Dim],
    n: Count,
    (threads, base): (u32, u32),
    full_index: &dyn Fn(Value, Vec<Expr>) -> Vec<Expr>,
    mut value: impl FnMut(&mut Emitter<'_, '_>, &mut Vec<Stmt>, &[Expr]) -> Result<Expr, EmitError>,
) -> Result<u32, EmitError> {
    let most = n.most;
    strided(e, out, n, threads, base, |e, out, j| {
        let local = e.delinearize(out, j, dims);
        let idx = full_index(target, local);
        let value = value(e, out, &idx)?;
        let buf = e.local[&target].buf;
        let index = e.local_offset(target, &idx);
        out.push(Stmt::Store { buf, index, value });
        Ok(())
    })?;
    Ok((base + (most.min(u64::from(threads)) as u32).next_multiple_of(32)) % threads)
}

/// A block-strided loop over `n` elements (`f` emits the work of element `j`), its threads
/// rotated by `base` so that passes sharing a barrier interval start at different warps.
fn strided(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    n: Count,
    threads: u32,
    base: u32,
    mut f: impl FnMut(&mut Emitter<'_, '_>, &mut Vec<Stmt>, Expr) -> Result<(), EmitError>,
) -> Result<(), EmitError> {
    let ity = e.index_ty;
    let tid = e.special(Special::ThreadIdx);
    let lane = if base == 0 {
        tid
    } else {
        crate::emit::rem(
            add(tid, e.ix(i64::from(threads - base))),
            e.ix(i64::from(threads)),
        )
    };
    let j = e.var("j", ity);
    e.set_range(j, 0, n.most as i64 - 1);
    let mut inner = Vec::new();
    e.push_scope();
    f(e, &mut inner, Expr::Var(j))?;
    e.pop_scope();
    if n.most <= u64::from(threads) {
        let mut then = vec![Stmt::Assign(j, lane.clone())];
        then.extend(inner);
        let cond = if n.constant && n.most == u64::from(threads) {
            Expr::Const(kiln_kir::Const::Pred(true))
        } else {
            lt(lane, n.expr)
        };
        out.push(Stmt::If {
            cond,
            then,
            otherwise: Vec::new(),
        });
    } else {
        out.push(Stmt::For {
            var: j,
            start: lane,
            end: n.expr,
            step: e.ix(i64::from(threads)),
            body: inner,
        });
    }
    Ok(())
}

/// The registers of a [`MatVec`]'s matrix: element `k` of this lane's segment of its
/// output's row (or column), 0 outside the matrix.
fn load_matrix(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    mv: &MatVec,
    instance: &Expr,
) -> Vec<kiln_kir::VarId> {
    let ity = e.index_ty;
    let tid = e.special(Special::ThreadIdx);
    let split = e.ix(i64::from(mv.split));
    let o = e.bind(
        out,
        "row",
        ity,
        crate::emit::div(tid.clone(), split.clone()),
    );
    let s = e.bind(out, "seg", ity, crate::emit::rem(tid, split));
    let outputs = e.dim(&mv.outputs);
    let reduced = e.dim(&mv.reduced);
    let buf = e.buffer(mv.matrix, Access::Read);
    let shape = e.g.shape(mv.matrix);
    let one = e.ix(1);
    let o_c = e.bind(
        out,
        "row",
        ity,
        crate::emit::min_e(o.clone(), crate::emit::sub(outputs.clone(), one.clone())),
    );
    let mut regs = Vec::new();
    for k in 0..mv.seg {
        let at = add(mul(s.clone(), e.ix(mv.seg as i64)), e.ix(k as i64));
        let at = e.bind(out, "k", ity, at);
        let at_c = crate::emit::min_e(at.clone(), crate::emit::sub(reduced.clone(), one.clone()));
        let idx = if mv.left {
            vec![instance.clone(), o_c.clone(), at_c]
        } else {
            vec![instance.clone(), at_c, o_c.clone()]
        };
        let lin = e.linear(shape, &idx);
        let valid = crate::emit::and(lt(o.clone(), outputs.clone()), lt(at, reduced.clone()));
        let r = e.var("w", Ty::F32);
        out.push(Stmt::Assign(
            r,
            Expr::Select(
                Box::new(valid),
                Box::new(Expr::Load {
                    buf,
                    index: Box::new(lin),
                }),
                Box::new(Expr::Const(kiln_kir::Const::F32(0.0))),
            ),
        ));
        regs.push(r);
    }
    regs
}

/// A [`MatVec`] pass: each lane folds its segment of the vector against its registers, the
/// `split` lanes of an output combine by `ShuffleXor` (every thread takes part: block-uniform)
/// and the first stores.
fn matvec_pass(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    v: Value,
    mv: &MatVec,
    regs: &[kiln_kir::VarId],
    instance: &Expr,
) {
    let ity = e.index_ty;
    let tid = e.special(Special::ThreadIdx);
    let split = e.ix(i64::from(mv.split));
    e.push_scope();
    let o = e.bind(
        out,
        "row",
        ity,
        crate::emit::div(tid.clone(), split.clone()),
    );
    let s = e.bind(out, "seg", ity, crate::emit::rem(tid, split));
    let outputs = e.dim(&mv.outputs);
    let reduced = e.dim(&mv.reduced);
    let exact = mv.reduced.as_const() == Some(mv.seg * u64::from(mv.split));
    let acc = e.var("dot", Ty::F32);
    out.push(Stmt::Assign(acc, Expr::Const(kiln_kir::Const::F32(0.0))));
    let vbuf = e.local[&mv.vector].buf;
    let vrank = e.g.shape(mv.vector).len();
    let mut fold = Vec::new();
    let mut k = 0;
    while k < mv.seg {
        let at = add(mul(s.clone(), e.ix(mv.seg as i64)), e.ix(k as i64));
        let at = e.bind(&mut fold, "k", ity, at);
        let mut idx = vec![e.ix(0); vrank];
        idx[0] = instance.clone();
        // Segments may run past the vector's length (symbolic, or not a multiple of the
        // split): such reads are clamped into it and their products masked.
        let read_at = if exact {
            at.clone()
        } else {
            crate::emit::min_e(at.clone(), crate::emit::sub(reduced.clone(), e.ix(1)))
        };
        idx[vrank - 1] = read_at;
        let index = e.local_offset(mv.vector, &idx);
        let vals: Vec<Expr> = if mv.lanes > 1 {
            let dsts: Vec<kiln_kir::VarId> = (0..mv.lanes).map(|_| e.var("x", Ty::F32)).collect();
            fold.push(Stmt::LoadVec {
                dsts: dsts.clone(),
                buf: vbuf,
                index,
            });
            dsts.into_iter().map(Expr::Var).collect()
        } else {
            vec![e.bind(
                &mut fold,
                "x",
                Ty::F32,
                Expr::Load {
                    buf: vbuf,
                    index: Box::new(index),
                },
            )]
        };
        for (q, x) in vals.into_iter().enumerate() {
            let w = Expr::Var(regs[k as usize + q]);
            let next = Expr::Fma(Box::new(w), Box::new(x), Box::new(Expr::Var(acc)));
            let next = if exact {
                next
            } else {
                let inside = lt(add(at.clone(), e.ix(q as i64)), reduced.clone());
                Expr::Select(Box::new(inside), Box::new(next), Box::new(Expr::Var(acc)))
            };
            fold.push(Stmt::Assign(acc, next));
        }
        k += mv.lanes;
    }
    let mine = lt(o.clone(), outputs);
    out.push(Stmt::If {
        cond: mine.clone(),
        then: fold,
        otherwise: Vec::new(),
    });
    let other = e.var("other", Ty::F32);
    let mut mask = mv.split / 2;
    while mask >= 1 {
        out.push(Stmt::ShuffleXor {
            dst: other,
            src: acc,
            mask,
        });
        out.push(Stmt::Assign(acc, add(Expr::Var(acc), Expr::Var(other))));
        mask /= 2;
    }
    let idx = if mv.left {
        vec![instance.clone(), o, e.ix(0)]
    } else {
        vec![instance.clone(), e.ix(0), o]
    };
    let buf = e.local[&v].buf;
    let index = e.local_offset(v, &idx);
    let first = Expr::Binary(kiln_kir::BinOp::Eq, Box::new(s), Box::new(e.ix(0)));
    out.push(Stmt::If {
        cond: crate::emit::and(mine, first),
        then: vec![Stmt::Store {
            buf,
            index,
            value: Expr::Var(acc),
        }],
        otherwise: Vec::new(),
    });
    e.pop_scope();
}

/// Output element `idx` (`[instance, row, col]`) of a [`SharedMatVec`]: the in-order `fma`
/// fold over the reduced axis, four elements a step.
fn shared_matvec_fold(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    m: &SharedMatVec,
    idx: &[Expr],
) -> Expr {
    let ity = e.index_ty;
    let o = if m.left {
        idx[1].clone()
    } else {
        idx[2].clone()
    };
    let acc = e.var("dot", Ty::F32);
    out.push(Stmt::Assign(acc, Expr::Const(kiln_kir::Const::F32(0.0))));
    let p = e.var("p", ity);
    let mut step = Vec::new();
    let vrank = e.g.shape(m.vector).len();
    let mut vidx = vec![e.ix(0); vrank];
    vidx[0] = idx[0].clone();
    vidx[vrank - 1] = Expr::Var(p);
    let xs: Vec<kiln_kir::VarId> = (0..4).map(|_| e.var("x", Ty::F32)).collect();
    step.push(Stmt::LoadVec {
        dsts: xs.clone(),
        buf: e.local[&m.vector].buf,
        index: e.local_offset(m.vector, &vidx),
    });
    let wbuf = e.local[&m.array].buf;
    let ws: Vec<Expr> = if m.left {
        let ws: Vec<kiln_kir::VarId> = (0..4).map(|_| e.var("w", Ty::F32)).collect();
        let at = [idx[0].clone(), o, Expr::Var(p)];
        step.push(Stmt::LoadVec {
            dsts: ws.clone(),
            buf: wbuf,
            index: e.local_offset(m.array, &at),
        });
        ws.into_iter().map(Expr::Var).collect()
    } else {
        (0..4)
            .map(|q| {
                let at = [idx[0].clone(), add(Expr::Var(p), e.ix(q)), o.clone()];
                Expr::Load {
                    buf: wbuf,
                    index: Box::new(e.local_offset(m.array, &at)),
                }
            })
            .collect()
    };
    for (w, x) in ws.into_iter().zip(xs) {
        let w = if m.negate {
            Expr::Unary(kiln_kir::UnOp::Neg, Box::new(w))
        } else {
            w
        };
        // The plain fold's operand order: the left operand's element first.
        let (first, second) = if m.left {
            (w, Expr::Var(x))
        } else {
            (Expr::Var(x), w)
        };
        step.push(Stmt::Assign(
            acc,
            Expr::Fma(Box::new(first), Box::new(second), Box::new(Expr::Var(acc))),
        ));
    }
    out.push(Stmt::For {
        var: p,
        start: e.ix(0),
        end: e.ix(m.reduced as i64),
        step: e.ix(4),
        body: step,
    });
    Expr::Var(acc)
}

/// The reduced axes of a reduction or arg-reduction, and whether it keeps them.
fn reduced_axes(op: &Op) -> (Vec<usize>, bool) {
    match op {
        Op::Reduce { axes, keep, .. } => (axes.clone(), *keep),
        Op::ArgMax { axis, keep } | Op::ArgMin { axis, keep } => (vec![*axis], *keep),
        _ => unreachable!("a reduction"),
    }
}

/// The input index of output element `idx` of a reduction over `axes` (the reduced
/// positions 0, filled in by [`fold_loop`]).
fn input_index(
    e: &Emitter<'_, '_>,
    rank: usize,
    axes: &[usize],
    keep: bool,
    idx: &[Expr],
) -> Vec<Expr> {
    let kept: Vec<usize> = (0..rank).filter(|d| !axes.contains(d)).collect();
    let mut at = vec![e.ix(0); rank];
    for (k, &d) in kept.iter().enumerate() {
        at[d] = if keep { idx[d].clone() } else { idx[k].clone() };
    }
    at
}

/// The loop folding the reduced elements `start, start + step, ..` of `input` at `at` (the
/// output element's input index) into `acc`, in that order. With a constant count of
/// reduced elements the loop runs a constant number of rounds (`start` below `step`, a
/// lane of a warp), so that ptxas unrolls it straight instead of guarding an unknown trip
/// count.
#[allow(clippy::too_many_arguments)]
fn fold_loop(
    e: &mut Emitter<'_, '_>,
    acc: &Acc,
    input: Value,
    axes: &[usize],
    mut at: Vec<Expr>,
    red: Red,
    start: Expr,
    step: i64,
) -> Result<Stmt, EmitError> {
    let in_shape = e.g.shape(input).to_vec();
    let red_dims: Vec<Dim> = axes.iter().map(|&d| in_shape[d].clone()).collect();
    let count = e.numel(&red_dims);
    let constant: Option<i64> = red_dims
        .iter()
        .map(|d| d.as_const().map(|n| n as i64))
        .product();
    let ity = e.index_ty;
    let mut body = Vec::new();
    e.push_scope();
    let (var, r, rounds) = match constant {
        Some(n) if step > 1 => {
            let q = e.var("q", ity);
            let r = e.bind(
                &mut body,
                "r",
                ity,
                add(start.clone(), mul(Expr::Var(q), e.ix(step))),
            );
            (q, r, Some((n + step - 1) / step))
        }
        _ => {
            let r = e.var("r", ity);
            (r, Expr::Var(r), None)
        }
    };
    let mut fold = Vec::new();
    let red_idx = e.delinearize(&mut fold, r.clone(), &red_dims);
    for (k, &d) in axes.iter().enumerate() {
        at[d] = red_idx[k].clone();
    }
    let x = e.elem(&mut fold, input, &at, 1)?.remove(0);
    let pos = red.is_arg().then(|| to_i64(e, r.clone()));
    acc.fold(e, &mut fold, x, pos);
    e.pop_scope();
    Ok(match rounds {
        Some(rounds) => {
            // The last round's lanes past the count skip it (none when it divides).
            if constant.is_some_and(|n| n % step != 0) {
                body.push(Stmt::If {
                    cond: lt(r, count),
                    then: fold,
                    otherwise: Vec::new(),
                });
            } else {
                body.extend(fold);
            }
            Stmt::For {
                var,
                start: e.ix(0),
                end: e.ix(rounds),
                step: e.ix(1),
                body,
            }
        }
        None => {
            body.extend(fold);
            Stmt::For {
                var,
                start,
                end: count,
                step: e.ix(step),
                body,
            }
        }
    })
}

/// For a reduction pass whose few output elements each reduce at least a warp's worth of
/// elements: how many outputs (each gets a warp of the block, from warp `base / 32` on).
fn warp_reduction(
    e: &Emitter<'_, '_>,
    v: Value,
    dims: &[Dim],
    threads: u32,
    base: u32,
    bound: u64,
) -> Option<u64> {
    let inst = e.g.inst(v)?;
    let axes: Vec<usize> = match &inst.op {
        Op::Reduce { axes, .. } => axes.clone(),
        Op::ArgMax { axis, .. } | Op::ArgMin { axis, .. } => vec![*axis],
        _ => return None,
    };
    let in_shape = e.g.shape(inst.operands[0]);
    let reduced: Vec<Dim> = axes.iter().map(|&d| in_shape[d].clone()).collect();
    let outputs = dims.iter().map(Dim::as_const).product::<Option<u64>>()?;
    let free_warps = u64::from((threads - base) / 32);
    (numel_at(&reduced, bound) >= 32 && outputs <= free_warps).then_some(outputs)
}

/// A reduction pass with a warp per output element (see [`warp_reduction`]): each lane
/// folds the elements `lane, lane + 32, ...` of its output's reduced axes in order, then
/// the lanes combine by `ShuffleXor` and lane 0 stores. The combining is left to the
/// interval's [`WarpTree`] of the same accumulator kind on other warps (a new one if none
/// is free), emitted at the next barrier. `batch` is the instance index when `v` is
/// batched (else empty).
#[allow(clippy::too_many_arguments)]
fn warp_reduce_pass(
    e: &mut Emitter<'_, '_>,
    trees: &mut Vec<WarpTree>,
    v: Value,
    dims: &[Dim],
    outputs: u64,
    threads: u32,
    base: u32,
    batch: &[Expr],
) -> Result<(), EmitError> {
    let g = e.g;
    let inst = g.inst(v).expect("a reduction");
    let input = inst.operands[0];
    let in_shape = g.shape(input).to_vec();
    let (axes, keep) = reduced_axes(&inst.op);
    let red = Red::of(&inst.op);
    let dtype = g.ty(input).dtype;
    let ity = e.index_ty;
    let warps = threads / 32;
    let mine_warps: BTreeSet<u32> = (0..outputs as u32)
        .map(|k| (base / 32 + k) % warps)
        .collect();
    let tree = match trees
        .iter()
        .position(|t| t.red == red && t.dtype == dtype && t.warps.is_disjoint(&mine_warps))
    {
        Some(k) => k,
        None => {
            let mut init = Vec::new();
            let acc = Acc::new(e, &mut init, red, dtype);
            trees.push(WarpTree {
                red,
                dtype,
                acc,
                init,
                folds: Vec::new(),
                stores: Vec::new(),
                warps: BTreeSet::new(),
            });
            trees.len() - 1
        }
    };
    let tree = &mut trees[tree];
    tree.warps.extend(&mine_warps);
    let warp = e.special(Special::WarpId);
    let lane = e.special(Special::LaneId);
    let rotated = crate::emit::rem(
        add(warp, e.ix(i64::from(warps) - i64::from(base / 32))),
        e.ix(i64::from(warps)),
    );
    let o = e.bind(&mut tree.folds, "o", ity, rotated);
    let mine = lt(o.clone(), e.ix(outputs as i64));
    let index_of = |e: &mut Emitter<'_, '_>, stmts: &mut Vec<Stmt>| -> Vec<Expr> {
        let mut idx = batch.to_vec();
        idx.extend(e.delinearize(stmts, o.clone(), dims));
        idx
    };
    let red_dims: Vec<Dim> = axes.iter().map(|&d| in_shape[d].clone()).collect();
    let count = e.numel(&red_dims);
    let mut gather = Vec::new();
    e.push_scope();
    let idx = index_of(e, &mut gather);
    let at = input_index(e, in_shape.len(), &axes, keep, &idx);
    let fold = fold_loop(e, &tree.acc, input, &axes, at, red, lane.clone(), 32)?;
    gather.push(fold);
    e.pop_scope();
    tree.folds.push(Stmt::If {
        cond: mine.clone(),
        then: gather,
        otherwise: Vec::new(),
    });
    let mut store = Vec::new();
    e.push_scope();
    let idx = index_of(e, &mut store);
    let buf = e.local[&v].buf;
    let index = e.local_offset(v, &idx);
    store.push(Stmt::Store {
        buf,
        index,
        value: tree.acc.result(count),
    });
    e.pop_scope();
    let first_lane = Expr::Binary(kiln_kir::BinOp::Eq, Box::new(lane), Box::new(e.ix(0)));
    tree.stores.push(Stmt::If {
        cond: crate::emit::and(mine, first_lane),
        then: store,
        otherwise: Vec::new(),
    });
    Ok(())
}

/// The element of pass value `v` at `idx`: an element-wise op through the emitter, a
/// reduction or a matmul by a loop over its reduced axis in row-major order.
fn compute(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    v: Value,
    idx: &[Expr],
) -> Result<Expr, EmitError> {
    let g = e.g;
    let inst = g.inst(v).expect("a pass value has an instruction");
    let ity = e.index_ty;
    match &inst.op {
        Op::Reduce { .. } | Op::ArgMax { .. } | Op::ArgMin { .. } => {
            let input = inst.operands[0];
            let in_shape = g.shape(input).to_vec();
            let (axes, keep) = reduced_axes(&inst.op);
            let red = Red::of(&inst.op);
            let red_dims: Vec<Dim> = axes.iter().map(|&d| in_shape[d].clone()).collect();
            let at = input_index(e, in_shape.len(), &axes, keep, idx);
            let acc = Acc::new(e, out, red, g.ty(input).dtype);
            let count = e.numel(&red_dims);
            let fold = fold_loop(e, &acc, input, &axes, at, red, e.ix(0), 1)?;
            out.push(fold);
            Ok(acc.result(count))
        }
        Op::MatMul => {
            let (a, b) = (inst.operands[0], inst.operands[1]);
            let rank = idx.len();
            let (i, j) = (idx[rank - 2].clone(), idx[rank - 1].clone());
            let operand_index = |x: Value, row: Expr, col: Expr| -> Vec<Expr> {
                let s = g.shape(x);
                let batch = s.len() - 2;
                let mut xi: Vec<Expr> = (0..batch)
                    .map(|d| {
                        let od = d + (rank - 2 - batch);
                        if s[d] == Dim::Const(1) && g.shape(v)[od] != Dim::Const(1) {
                            Expr::Const(crate::emit::zero_of(ity))
                        } else {
                            idx[od].clone()
                        }
                    })
                    .collect();
                xi.push(row);
                xi.push(col);
                xi
            };
            let k_dim = g.shape(a)[g.shape(a).len() - 1].clone();
            let ty = e.cty(v);
            let acc = e.var("dot", ty);
            out.push(Stmt::Assign(acc, Expr::Const(crate::emit::zero_of(ty))));
            let p = e.var("p", ity);
            let mut step = Vec::new();
            e.push_scope();
            let x = e
                .elem(&mut step, a, &operand_index(a, i, Expr::Var(p)), 1)?
                .remove(0);
            let y = e
                .elem(&mut step, b, &operand_index(b, Expr::Var(p), j), 1)?
                .remove(0);
            let next = if ty == Ty::F32 {
                Expr::Fma(Box::new(x), Box::new(y), Box::new(Expr::Var(acc)))
            } else {
                add(Expr::Var(acc), mul(x, y))
            };
            step.push(Stmt::Assign(acc, next));
            e.pop_scope();
            let k = e.dim(&k_dim);
            out.push(Stmt::For {
                var: p,
                start: e.ix(0),
                end: k,
                step: e.ix(1),
                body: step,
            });
            Ok(Expr::Var(acc))
        }
        _ => {
            e.fused.insert(v);
            Ok(e.compute(out, v, idx, 1)?.remove(0))
        }
    }
}

/// I32 index arithmetic when every buffer the kernel touches stays below 2^31 elements
/// with the batch axis at most `options.symbol_bound`; I64 otherwise.
fn index_type(g: &FuncGraph<'_>, inst: &Inst, p: &LoopPlan, options: &crate::Options) -> Ty {
    match options.index_width {
        crate::IndexWidth::I32 => return Ty::I32,
        crate::IndexWidth::I64 => return Ty::I64,
        crate::IndexWidth::Auto => {}
    }
    let limit = (1u128 << 31) - 1;
    let fits = p
        .outer
        .iter()
        .chain(&inst.operands)
        .chain(&inst.results)
        .all(|v| {
            g.shape(*v).iter().fold(1u128, |acc, d| {
                acc.saturating_mul(match d {
                    Dim::Const(n) => u128::from(*n),
                    Dim::Sym(_) => u128::from(options.symbol_bound),
                })
            }) <= limit
        });
    if fits {
        Ty::I32
    } else {
        Ty::I64
    }
}
