//! The reduction templates. Row reduction: reductions over the innermost axes with their
//! element-wise prologue, several reductions in sequence over the same rows (softmax's max
//! then sum), and the element-wise epilogue over the same rows, in one kernel: a warp per
//! row for constant rows of at most 1024 elements, a block of 256 threads per row
//! otherwise; f32 accumulation, `ShuffleXor` trees within a warp and shared memory across
//! warps. Loop reduction: any other axes, a thread per output element looping over the
//! reduced elements (correct, not fast).

use super::pointwise::lanes_for;
use super::{ceil_div_size, one, size_of_dims, Body};
use crate::emit::{add, and, bin, lt, min_e, mul, sub, Binding, EResult, Emitter};
use crate::partition::Group;
use kiln_ir::{DType, Dim, Op, ReduceOp, Value};
use kiln_kir::{BinOp, Const, Expr, Special, Stmt, Ty, UnOp, VarId};

const WARP: u32 = 32;
pub(crate) const ROW_BLOCK: u32 = 256;
const WARPS_PER_BLOCK: u32 = 4;
/// The longest constant row a warp reduces alone (longer ones take a block of
/// [`ROW_BLOCK`] threads).
pub(crate) const WARP_ROW_MAX: u64 = 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Red {
    Sum,
    Mean,
    Prod,
    Max,
    Min,
    ArgMax,
    ArgMin,
}

impl Red {
    pub(crate) fn of(op: &Op) -> Red {
        match op {
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => Red::Sum,
                ReduceOp::Mean => Red::Mean,
                ReduceOp::Prod => Red::Prod,
                ReduceOp::Max => Red::Max,
                ReduceOp::Min => Red::Min,
            },
            Op::ArgMax { .. } => Red::ArgMax,
            _ => Red::ArgMin,
        }
    }

    pub(crate) fn is_arg(self) -> bool {
        matches!(self, Red::ArgMax | Red::ArgMin)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Red::Sum => "sum",
            Red::Mean => "mean",
            Red::Prod => "prod",
            Red::Max => "max",
            Red::Min => "min",
            Red::ArgMax => "argmax",
            Red::ArgMin => "argmin",
        }
    }
}

/// The accumulator of one reduction: a value register and, for arg-reductions, an index.
pub(crate) struct Acc {
    red: Red,
    ty: Ty,
    dtype: DType,
    val: VarId,
    idx: Option<VarId>,
}

impl Acc {
    pub(crate) fn new(e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, red: Red, dtype: DType) -> Acc {
        let ty = Ty::compute_type_of(dtype);
        let val = e.var(red.name(), ty);
        out.push(Stmt::Assign(val, Expr::Const(identity(red, dtype))));
        let idx = red.is_arg().then(|| {
            let i = e.var("at", Ty::I64);
            out.push(Stmt::Assign(i, Expr::Const(Const::I64(-1))));
            i
        });
        Acc {
            red,
            ty,
            dtype,
            val,
            idx,
        }
    }

    /// Folds the candidate `x` (at position `at`, an I64 expression, for arg-reductions;
    /// a negative position means "no candidate") into the accumulator.
    pub(crate) fn fold(
        &self,
        e: &mut Emitter<'_, '_>,
        out: &mut Vec<Stmt>,
        x: Expr,
        at: Option<Expr>,
    ) {
        let acc = Expr::Var(self.val);
        let value = match self.red {
            Red::Sum | Red::Mean => bin(BinOp::Add, acc, x),
            Red::Prod => bin(BinOp::Mul, acc, x),
            Red::Max => bin(BinOp::Max, acc, x),
            Red::Min => bin(BinOp::Min, acc, x),
            Red::ArgMax | Red::ArgMin => {
                let at = at.expect("arg-reductions fold positions");
                let idx = Expr::Var(self.idx.expect("arg index"));
                let x = e.bind(out, "cand", self.ty, x);
                let at = e.bind(out, "cand_at", Ty::I64, at);
                let strictly = if self.red == Red::ArgMax {
                    BinOp::Gt
                } else {
                    BinOp::Lt
                };
                let mut better = bin(strictly, x.clone(), acc.clone());
                let earlier_tie = and(
                    bin(BinOp::Eq, x.clone(), acc.clone()),
                    bin(BinOp::Lt, at.clone(), idx.clone()),
                );
                better = bin(BinOp::Or, better, earlier_tie);
                if self.ty == Ty::F32 {
                    // NaN counts as the best; among NaNs the first wins.
                    let x_nan = bin(BinOp::Ne, x.clone(), x.clone());
                    let acc_nan = bin(BinOp::Ne, acc.clone(), acc.clone());
                    let nan_wins = and(
                        x_nan,
                        bin(
                            BinOp::Or,
                            Expr::Unary(UnOp::Not, Box::new(acc_nan.clone())),
                            bin(BinOp::Lt, at.clone(), idx.clone()),
                        ),
                    );
                    better = bin(
                        BinOp::Or,
                        nan_wins,
                        and(Expr::Unary(UnOp::Not, Box::new(acc_nan)), better),
                    );
                }
                let present = bin(BinOp::Ge, at.clone(), Expr::Const(Const::I64(0)));
                let none_yet = bin(BinOp::Lt, idx.clone(), Expr::Const(Const::I64(0)));
                let take = and(present, bin(BinOp::Or, none_yet, better));
                let take = e.bind(out, "take", Ty::Pred, take);
                out.push(Stmt::Assign(
                    self.idx.expect("arg index"),
                    Expr::Select(Box::new(take.clone()), Box::new(at), Box::new(idx)),
                ));
                Expr::Select(Box::new(take), Box::new(x), Box::new(acc))
            }
        };
        out.push(Stmt::Assign(self.val, value));
    }

    /// Combines the accumulators of all lanes of each warp (every lane gets the result).
    pub(crate) fn warp_reduce(&self, e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>) {
        let other = e.var("other", self.ty);
        let other_at = self.idx.map(|_| e.var("other_at", Ty::I64));
        for mask in [16u32, 8, 4, 2, 1] {
            out.push(Stmt::ShuffleXor {
                dst: other,
                src: self.val,
                mask,
            });
            if let (Some(dst), Some(src)) = (other_at, self.idx) {
                out.push(Stmt::ShuffleXor { dst, src, mask });
            }
            self.fold(e, out, Expr::Var(other), other_at.map(Expr::Var));
        }
    }

    /// Combines the warps of a block through shared memory (after `warp_reduce`).
    fn block_reduce(&self, e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, warps: u32) {
        let vals = e.shared_array(
            &format!("{}_partial", self.red.name()),
            storage_dtype(self.dtype),
            warps,
        );
        let idxs = self
            .idx
            .map(|_| e.shared_array("at_partial", DType::I64, warps));
        let lane = Expr::Special(Special::LaneId);
        let warp = Expr::Special(Special::WarpId);
        let mut write = vec![Stmt::Store {
            buf: vals,
            index: warp.clone(),
            value: Expr::Var(self.val),
        }];
        if let (Some(buf), Some(i)) = (idxs, self.idx) {
            write.push(Stmt::Store {
                buf,
                index: warp,
                value: Expr::Var(i),
            });
        }
        out.push(Stmt::If {
            cond: bin(BinOp::Eq, lane, Expr::Const(Const::I32(0))),
            then: write,
            otherwise: Vec::new(),
        });
        out.push(Stmt::Barrier);
        out.push(Stmt::Assign(
            self.val,
            Expr::Load {
                buf: vals,
                index: Box::new(Expr::Const(Const::I32(0))),
            },
        ));
        if let (Some(buf), Some(i)) = (idxs, self.idx) {
            out.push(Stmt::Assign(
                i,
                Expr::Load {
                    buf,
                    index: Box::new(Expr::Const(Const::I32(0))),
                },
            ));
        }
        let w = e.var("w", Ty::I32);
        let mut body = Vec::new();
        let x = Expr::Load {
            buf: vals,
            index: Box::new(Expr::Var(w)),
        };
        let at = idxs.map(|buf| Expr::Load {
            buf,
            index: Box::new(Expr::Var(w)),
        });
        self.fold(e, &mut body, x, at);
        out.push(Stmt::For {
            var: w,
            start: Expr::Const(Const::I32(1)),
            end: Expr::Const(Const::I32(warps as i32)),
            step: Expr::Const(Const::I32(1)),
            body,
        });
    }

    /// The reduction's value: the mean divides by the count; arg-reductions give the index.
    pub(crate) fn result(&self, count: Expr) -> Expr {
        match self.red {
            Red::Mean => bin(
                BinOp::Div,
                Expr::Var(self.val),
                Expr::Cast(Ty::F32, Box::new(count)),
            ),
            Red::ArgMax | Red::ArgMin => Expr::Var(self.idx.expect("arg index")),
            _ => Expr::Var(self.val),
        }
    }
}

/// The value folding leaves unchanged: 0 for sums, 1 for products, the far end of the
/// range for max and min.
fn identity(red: Red, dtype: DType) -> Const {
    let ty = Ty::compute_type_of(dtype);
    match red {
        Red::Sum | Red::Mean => crate::emit::zero_of(ty),
        Red::Prod => crate::emit::one_of(ty),
        Red::Max | Red::ArgMax => extreme(dtype, false),
        Red::Min | Red::ArgMin => extreme(dtype, true),
    }
}

/// The dtype shared memory holds a compute type in.
fn storage_dtype(dtype: DType) -> DType {
    match Ty::compute_type_of(dtype) {
        Ty::F32 => DType::F32,
        Ty::I32 => DType::I32,
        Ty::I64 => DType::I64,
        Ty::Pred => DType::Bool,
    }
}

/// The identity of max (`smallest`) or min: ±inf for floats, the dtype's range for ints.
fn extreme(dtype: DType, largest: bool) -> Const {
    if dtype.is_float() {
        return Const::F32(if largest {
            f32::INFINITY
        } else {
            f32::NEG_INFINITY
        });
    }
    let (lo, hi) = kiln_ir::tensor::int_range(dtype);
    let n = if largest { hi } else { lo };
    match Ty::compute_type_of(dtype) {
        Ty::I64 => Const::I64(n),
        _ => Const::I32(n as i32),
    }
}

pub(crate) fn to_i64(e: &Emitter<'_, '_>, x: Expr) -> Expr {
    if e.index_ty == Ty::I64 {
        x
    } else {
        Expr::Cast(Ty::I64, Box::new(x))
    }
}

/// The index at which a row-shaped value (`outer`, or `outer` then 1s) is read for `row`.
fn row_index(e: &Emitter<'_, '_>, v: Value, outer: usize, row: &[Expr]) -> Vec<Expr> {
    let rank = e.g.shape(v).len();
    let mut idx = row.to_vec();
    idx.extend((outer..rank).map(|_| e.ix(0)));
    idx
}

/// The most row elements a thread keeps in registers between the passes over its row.
const MAX_RESIDENT: u64 = 32;

/// How a thread visits its share of a row: a strided loop that recomputes the row's
/// elements (prologue included) in every pass, or a fixed set of chunks whose elements are
/// computed once, kept in registers and reused by every later pass and the epilogue.
enum Walk {
    Strided,
    Resident(Vec<Chunk>),
}

/// `lanes` contiguous row elements one thread owns in the register-resident walk.
struct Chunk {
    /// Flat position in the row of the first lane (clamped into the row, see `valid`).
    j: Expr,
    /// The full index of the first lane.
    at: Vec<Expr>,
    /// Whether this thread's chunk lies in the row; `None` when it always does. A chunk
    /// past the end is read at a clamped position and left out of folds and stores.
    valid: Option<Expr>,
}

pub(crate) fn emit_rows(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    outer: &[Dim],
    inner: &[Dim],
    stores: &[Value],
) -> EResult<Body> {
    let g = e.g;
    let const_len: Option<u64> = inner.iter().map(Dim::as_const).product();
    let per_warp = matches!(const_len, Some(n) if n <= WARP_ROW_MAX);
    let mut body = Vec::new();
    let ity = e.index_ty;
    let rows = e.numel(outer);
    let len = e.numel(inner);
    let (row, valid, tid, stride, block_dim, grid_x) = if per_warp {
        let block = e.special(Special::BlockIdx(0));
        let warp = e.special(Special::WarpId);
        let row = add(mul(block, e.ix(i64::from(WARPS_PER_BLOCK))), warp);
        let row = e.bind(&mut body, "row", ity, row);
        let valid = e.bind(&mut body, "valid", Ty::Pred, lt(row.clone(), rows.clone()));
        let last = sub(rows.clone(), e.ix(1));
        let row = e.bind(&mut body, "row", ity, min_e(row, last));
        let grid = ceil_div_size(size_of_dims(outer), u64::from(WARPS_PER_BLOCK));
        (
            row,
            Some(valid),
            e.special(Special::LaneId),
            WARP,
            WARP * WARPS_PER_BLOCK,
            grid,
        )
    } else {
        let row = e.special(Special::BlockIdx(0));
        let row = e.bind(&mut body, "row", ity, row);
        (
            row,
            None,
            e.special(Special::ThreadIdx),
            ROW_BLOCK,
            ROW_BLOCK,
            size_of_dims(outer),
        )
    };
    let lanes = row_lanes(inner.last(), const_len, stride);
    let row_idx = e.delinearize(&mut body, row, outer);
    // Everything computed for the row stays visible to the later passes of this kernel.
    e.push_scope();
    let walk = match const_len {
        Some(n) => resident_chunks(e, &mut body, n, &tid, stride, lanes, &row_idx, inner),
        None => Walk::Strided,
    };
    let strided = StridedPass {
        row_idx: &row_idx,
        inner,
        tid: &tid,
        len: &len,
        step: i64::from(stride) * lanes as i64,
        lanes,
    };
    let mut names = Vec::new();
    for &r in &group.roots {
        let inst = g.inst(r).expect("a reduction");
        let input = inst.operands[0];
        let red = Red::of(&inst.op);
        names.push(red);
        let acc = Acc::new(e, &mut body, red, g.ty(input).dtype);
        match &walk {
            Walk::Strided => body.push(strided.fold_pass(e, &acc, input)?),
            Walk::Resident(chunks) => {
                for c in chunks {
                    let valid = c.valid.as_ref();
                    fold_lanes(e, &mut body, &acc, input, &c.at, &c.j, valid, lanes)?;
                }
            }
        }
        acc.warp_reduce(e, &mut body);
        if !per_warp {
            acc.block_reduce(e, &mut body, ROW_BLOCK / WARP);
        }
        let result = acc.result(len.clone());
        let ty = Ty::compute_type_of(g.ty(r).dtype);
        let result = e.bind(&mut body, red.name(), ty, result);
        let index = row_index(e, r, outer.len(), &row_idx);
        e.bindings.push(Binding {
            value: r,
            index,
            expr: result,
        });
    }
    // Epilogue over the row: every stored value of the full row shape.
    let full: Vec<Dim> = outer.iter().chain(inner).cloned().collect();
    let (full_outputs, row_outputs): (Vec<Value>, Vec<Value>) = stores
        .iter()
        .copied()
        .partition(|v| g.shape(*v) == full.as_slice());
    let mut epilogue = Vec::new();
    e.push_scope();
    if !full_outputs.is_empty() {
        match &walk {
            Walk::Strided => {
                let pass = strided.pass(e, &mut |e, pass, at, _| {
                    store_lanes(e, pass, &full_outputs, at, lanes)
                })?;
                epilogue.push(pass);
            }
            Walk::Resident(chunks) => {
                for c in chunks {
                    match &c.valid {
                        None => store_lanes(e, &mut epilogue, &full_outputs, &c.at, lanes)?,
                        Some(valid) => {
                            let mut then = Vec::new();
                            e.push_scope();
                            store_lanes(e, &mut then, &full_outputs, &c.at, lanes)?;
                            e.pop_scope();
                            epilogue.push(Stmt::If {
                                cond: valid.clone(),
                                then,
                                otherwise: Vec::new(),
                            });
                        }
                    }
                }
            }
        }
    }
    if !row_outputs.is_empty() {
        let mut once = Vec::new();
        e.push_scope();
        for &o in &row_outputs {
            let at = row_index(e, o, outer.len(), &row_idx);
            let vals = e.elem(&mut once, o, &at, 1)?;
            e.store(&mut once, o, &at, vals);
        }
        e.pop_scope();
        epilogue.push(Stmt::If {
            cond: bin(BinOp::Eq, tid.clone(), e.ix(0)),
            then: once,
            otherwise: Vec::new(),
        });
    }
    e.pop_scope();
    e.pop_scope();
    match valid {
        Some(valid) => body.push(Stmt::If {
            cond: valid,
            then: epilogue,
            otherwise: Vec::new(),
        }),
        None => body.extend(epilogue),
    }
    // The epilogue's weights (a norm's gain and bias) load with the row, not after its
    // reduction.
    e.hoist_constant_loads(&mut body);
    let mut what = describe(&names, g, group);
    for sum in &e.split_sums {
        what = format!("{what}_splitk{}_sum", sum.splits);
    }
    Ok(Body {
        what,
        block_dim,
        grid: [grid_x, one(), one()],
        stmts: body,
    })
}

/// The strided walk over a row: thread `tid` visits `lanes` elements at `tid * lanes`, then
/// every `step` elements up to `len`.
struct StridedPass<'a> {
    row_idx: &'a [Expr],
    inner: &'a [Dim],
    tid: &'a Expr,
    len: &'a Expr,
    step: i64,
    lanes: usize,
}

/// What a pass does at one position: the full index and the flat row position of its first
/// lane.
type PassBody<'b> =
    dyn FnMut(&mut Emitter<'_, '_>, &mut Vec<Stmt>, &[Expr], &Expr) -> EResult<()> + 'b;

impl StridedPass<'_> {
    /// The loop running `visit` at each of this thread's positions (its own scope, so that
    /// nothing it computes is reused outside the loop).
    fn pass(&self, e: &mut Emitter<'_, '_>, visit: &mut PassBody<'_>) -> EResult<Stmt> {
        let j = e.var("j", e.index_ty);
        let mut body = Vec::new();
        e.push_scope();
        let mut at = self.row_idx.to_vec();
        at.extend(e.delinearize(&mut body, Expr::Var(j), self.inner));
        let visited = visit(e, &mut body, &at, &Expr::Var(j));
        e.pop_scope();
        visited?;
        Ok(Stmt::For {
            var: j,
            start: mul(self.tid.clone(), e.ix(self.lanes as i64)),
            end: self.len.clone(),
            step: e.ix(self.step),
            body,
        })
    }

    /// The loop folding `input` into `acc`, [`strided_unroll`] positions a step: the
    /// step's loads first, then its folds in position order (the order of one position a
    /// step). A position past the row's end reads the row's last `lanes` elements and
    /// folds them as the identity ([`clamped_chunk`]).
    fn fold_pass(&self, e: &mut Emitter<'_, '_>, acc: &Acc, input: Value) -> EResult<Stmt> {
        let unroll = strided_unroll(self.lanes);
        let j = e.var("j", e.index_ty);
        let mut body = Vec::new();
        e.push_scope();
        let folded = self.fold_step(e, &mut body, j, unroll, acc, input);
        e.pop_scope();
        folded?;
        Ok(Stmt::For {
            var: j,
            start: mul(self.tid.clone(), e.ix(self.lanes as i64)),
            end: self.len.clone(),
            step: e.ix(self.step * unroll as i64),
            body,
        })
    }

    /// One step of [`StridedPass::fold_pass`] from position `j`.
    fn fold_step(
        &self,
        e: &mut Emitter<'_, '_>,
        body: &mut Vec<Stmt>,
        j: VarId,
        unroll: usize,
        acc: &Acc,
        input: Value,
    ) -> EResult<()> {
        let mut loaded = Vec::with_capacity(unroll);
        for u in 0..unroll {
            let (at_j, valid) = if u == 0 {
                (Expr::Var(j), None)
            } else {
                let start = add(Expr::Var(j), e.ix(self.step * u as i64));
                let (at_j, valid) = clamped_chunk(e, body, start, self.len.clone(), self.lanes);
                (at_j, Some(valid))
            };
            let mut at = self.row_idx.to_vec();
            at.extend(e.delinearize(body, at_j.clone(), self.inner));
            let vals = e.elem(body, input, &at, self.lanes)?;
            loaded.push((at_j, valid, vals));
        }
        for (at_j, valid, vals) in loaded {
            fold_values(e, body, acc, vals, &at_j, valid.as_ref());
        }
        Ok(())
    }
}

/// The chunk of `lanes` elements at flat position `start`, which may lie past the end of a
/// row of `len` elements: the position clamped to the row's last `lanes` elements (always
/// readable) and whether the chunk lies in the row (else it is read but neither folded nor
/// stored).
fn clamped_chunk(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    start: Expr,
    len: Expr,
    lanes: usize,
) -> (Expr, Expr) {
    let valid = e.bind(body, "in_row", Ty::Pred, lt(start.clone(), len.clone()));
    let last = sub(len, e.ix(lanes as i64));
    (e.bind(body, "j", e.index_ty, min_e(start, last)), valid)
}

/// Positions of `lanes` elements a thread folds per step of the strided walk, their loads
/// issued before any is folded: a loop of one position a step waits for each load in
/// turn (on the H100 the argmax over 32000 logits by one block took 11.5 µs that way).
fn strided_unroll(lanes: usize) -> usize {
    (32 / lanes).clamp(1, 8)
}

/// Contiguous elements per thread and step: 8 (16-byte loads of 16-bit data) when the row
/// is long enough to give every thread of the row a full step, else 4, 2 or 1.
pub(crate) fn row_lanes(last: Option<&Dim>, const_len: Option<u64>, stride: u32) -> usize {
    let wide = lanes_for(last, 2);
    match const_len {
        Some(n) if wide == 8 && n >= u64::from(stride) * 8 => 8,
        _ => lanes_for(last, 4),
    }
}

/// The register-resident walk when a thread's share of a constant row is at most
/// `MAX_RESIDENT` elements; the strided walk otherwise. Chunk `c` of a thread starts at
/// `tid * lanes + c * stride * lanes`; only the last chunk can run past the row's end.
#[allow(clippy::too_many_arguments)]
fn resident_chunks(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    len: u64,
    tid: &Expr,
    stride: u32,
    lanes: usize,
    row_idx: &[Expr],
    inner: &[Dim],
) -> Walk {
    let step = u64::from(stride) * lanes as u64;
    let count = len.div_ceil(step);
    if count * lanes as u64 > MAX_RESIDENT || len < lanes as u64 {
        return Walk::Strided;
    }
    let ity = e.index_ty;
    let first = e.bind(body, "j", ity, mul(tid.clone(), e.ix(lanes as i64)));
    let mut chunks = Vec::with_capacity(count as usize);
    for c in 0..count {
        let start = add(first.clone(), e.ix((c * step) as i64));
        let partial = (c + 1) * step > len;
        let (j, valid) = if partial {
            let (j, valid) = clamped_chunk(e, body, start, e.ix(len as i64), lanes);
            (j, Some(valid))
        } else {
            (e.bind(body, "j", ity, start), None)
        };
        let mut at = row_idx.to_vec();
        at.extend(e.delinearize(body, j.clone(), inner));
        chunks.push(Chunk { j, at, valid });
    }
    Walk::Resident(chunks)
}

/// Folds `lanes` elements of `input` from `at` (flat row position `j`) into `acc`; where
/// `valid` is false the elements count as the reduction's identity (no candidate for
/// arg-reductions).
#[allow(clippy::too_many_arguments)]
fn fold_lanes(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    acc: &Acc,
    input: Value,
    at: &[Expr],
    j: &Expr,
    valid: Option<&Expr>,
    lanes: usize,
) -> EResult<()> {
    let vals = e.elem(out, input, at, lanes)?;
    fold_values(e, out, acc, vals, j, valid);
    Ok(())
}

/// [`fold_lanes`] of values already loaded.
fn fold_values(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    acc: &Acc,
    vals: Vec<Expr>,
    j: &Expr,
    valid: Option<&Expr>,
) {
    for (k, x) in vals.into_iter().enumerate() {
        let mut pos = acc
            .red
            .is_arg()
            .then(|| to_i64(e, add(j.clone(), e.ix(k as i64))));
        let mut x = x;
        if let Some(valid) = valid {
            let none = Expr::Const(identity(acc.red, acc.dtype));
            x = Expr::Select(Box::new(valid.clone()), Box::new(x), Box::new(none));
            pos = pos.map(|p| {
                Expr::Select(
                    Box::new(valid.clone()),
                    Box::new(p),
                    Box::new(Expr::Const(Const::I64(-1))),
                )
            });
        }
        acc.fold(e, out, x, pos);
    }
}

/// Stores `lanes` elements of each of `outputs` at `at`.
fn store_lanes(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    outputs: &[Value],
    at: &[Expr],
    lanes: usize,
) -> EResult<()> {
    for &o in outputs {
        let vals = e.elem(out, o, at, lanes)?;
        // A value computed from split-K partial sums was stored when it was computed.
        if !e.sourced.contains_key(&o) {
            e.store(out, o, at, vals);
        }
    }
    Ok(())
}

/// A name for a row kernel from its reductions: softmax, rms_norm, layer_norm or the list.
fn describe(reds: &[Red], g: &crate::graph::FuncGraph<'_>, group: &Group) -> String {
    let has_rsqrt = group
        .owned
        .iter()
        .any(|v| matches!(g.op(*v), Some(Op::Unary(kiln_ir::UnaryOp::Rsqrt))))
        || group.outputs.iter().any(|v| uses_rsqrt(g, *v, 6));
    match reds {
        [Red::Max, Red::Sum] => "softmax".into(),
        [Red::Mean] if has_rsqrt => "rms_norm".into(),
        [Red::Mean, Red::Mean] if has_rsqrt => "layer_norm".into(),
        _ => {
            let parts: Vec<&str> = reds.iter().map(|r| r.name()).collect();
            format!("reduce_{}", parts.join("_"))
        }
    }
}

fn uses_rsqrt(g: &crate::graph::FuncGraph<'_>, v: Value, depth: u32) -> bool {
    if depth == 0 || g.is_heavy(v) || g.is_source(v) {
        return false;
    }
    match g.inst(v) {
        Some(inst) => {
            matches!(inst.op, Op::Unary(kiln_ir::UnaryOp::Rsqrt))
                || inst.operands.iter().any(|o| uses_rsqrt(g, *o, depth - 1))
        }
        None => false,
    }
}

/// A reduction over any axes: a thread per output element looping over the reduced ones.
pub(crate) fn emit_loop(e: &mut Emitter<'_, '_>, r: Value) -> EResult<Body> {
    let g = e.g;
    let inst = g.inst(r).expect("a reduction");
    let input = inst.operands[0];
    let in_shape = g.shape(input).to_vec();
    let (axes, keep): (Vec<usize>, bool) = match &inst.op {
        Op::Reduce { axes, keep, .. } => (axes.clone(), *keep),
        Op::ArgMax { axis, keep } | Op::ArgMin { axis, keep } => (vec![*axis], *keep),
        _ => return Err(e.internal(r, "not a reduction")),
    };
    let red = Red::of(&inst.op);
    let kept: Vec<usize> = (0..in_shape.len()).filter(|d| !axes.contains(d)).collect();
    let kept_dims: Vec<Dim> = kept.iter().map(|&d| in_shape[d].clone()).collect();
    let red_dims: Vec<Dim> = axes.iter().map(|&d| in_shape[d].clone()).collect();
    let ity = e.index_ty;
    let mut body = Vec::new();
    let block = e.special(Special::BlockIdx(0));
    let thread = e.special(Special::ThreadIdx);
    let gid = e.bind(&mut body, "gid", ity, add(mul(block, e.ix(256)), thread));
    let total = e.numel(&kept_dims);
    let mut then = Vec::new();
    e.push_scope();
    let kept_idx = e.delinearize(&mut then, gid.clone(), &kept_dims);
    let acc = Acc::new(e, &mut then, red, g.ty(input).dtype);
    let count = e.numel(&red_dims);
    let j = e.var("j", ity);
    let mut pass = Vec::new();
    e.push_scope();
    let red_idx = e.delinearize(&mut pass, Expr::Var(j), &red_dims);
    let mut at = vec![e.ix(0); in_shape.len()];
    for (k, &d) in kept.iter().enumerate() {
        at[d] = kept_idx[k].clone();
    }
    for (k, &d) in axes.iter().enumerate() {
        at[d] = red_idx[k].clone();
    }
    let x = e.elem(&mut pass, input, &at, 1)?.remove(0);
    let pos = red.is_arg().then(|| to_i64(e, Expr::Var(j)));
    acc.fold(e, &mut pass, x, pos);
    e.pop_scope();
    then.push(Stmt::For {
        var: j,
        start: e.ix(0),
        end: count.clone(),
        step: e.ix(1),
        body: pass,
    });
    let result = acc.result(count);
    let out_idx: Vec<Expr> = if keep {
        let mut idx = at.clone();
        for &d in &axes {
            idx[d] = e.ix(0);
        }
        for (k, &d) in kept.iter().enumerate() {
            idx[d] = kept_idx[k].clone();
        }
        idx
    } else {
        kept_idx.clone()
    };
    e.fused.insert(r);
    e.store(&mut then, r, &out_idx, vec![result]);
    e.pop_scope();
    body.push(Stmt::If {
        cond: lt(gid, total),
        then,
        otherwise: Vec::new(),
    });
    Ok(Body {
        what: format!("reduce_{}_axes", red.name()),
        block_dim: 256,
        grid: [ceil_div_size(size_of_dims(&kept_dims), 256), one(), one()],
        stmts: body,
    })
}
