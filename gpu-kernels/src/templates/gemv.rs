//! The GEMV template: bf16 and f16 matmuls of at most [`GEMV_ROWS`] rows (decode) of
//! `linear` weights (`x @ w.T`, `w` stored `[N, K]`, K contiguous), with f32 accumulation.
//!
//! Every output column (a row of `w`) belongs to one warp; a block is [`WARPS`] warps, so
//! [`WARPS`] consecutive columns, and the grid has `ceil(N / WARPS)` blocks: no split of K
//! across blocks, no workspace and no sum kernel (the decode grids of the tensor-core
//! template needed both to keep enough weight bytes in flight; here the columns alone make
//! thousands of warps). Each K step a lane loads `unroll` 16-byte vectors of the weight row
//! (consecutive lanes consecutive vectors, the loads issued together before any is used),
//! then for each vector the matching vectors of the (at most four) activation rows, which
//! every warp of the GPU reads (cache hits after the first), and multiply-adds in f32. A
//! K that is not a multiple of the step ends with a guarded tail of vectors (K must be a
//! multiple of 8). The lanes' sums meet by a `ShuffleXor` tree and lane 0 runs the
//! matmul templates' epilogue (`matmul::epilogue_at`: bias, activation, residual, cast,
//! every stored value of the group).
//!
//! Horizontally fused matmuls of one width (gate and up) share the warp: each step loads a
//! vector of every weight, the activations once, and the epilogue sees all accumulators of
//! the column (`silu(gate) * up`). Matmuls of different widths (GQA's q/k/v) get a grid of
//! segments as in the tensor-core template (`mma_gemm::segments`, [`WARPS`]-column block
//! columns): block column x belongs to the matmul whose run of blocks holds it (a
//! block-uniform choice), when every stored value comes from one matmul. A segment whose
//! values only a `kv_write` reads writes its rows into the cache itself (`gemv_kv`,
//! `templates::KvWrites`): with RoPE, a warp of that segment owns a rotary pair of columns.
//!
//! With `GemmTuning::gemv_blocks` below the column groups of a grid that is not one of
//! segments, the grid is that many blocks and each block loops over the groups
//! `blockIdx.x, blockIdx.x + grid, ...` (a `For` with the constant grid as its stride):
//! the norm's statistic, the prefetch and the first step's loads run once a block, for its
//! first group (which is peeled from the loop when its first weights are loaded early),
//! the epilogue once a group.
//!
//! With `GemmTuning::preload`, where every weight is a checkpoint tensor (no kernel writes
//! it: `kiln_kir::Access::Constant`) and K holds a whole step, a block issues its first
//! step's weight loads, into one set of registers every segment shares, before its
//! `GridDependencyWait`; the activations (and a norm's statistic) come after the wait. Both
//! options are off by default: neither made the 1.1B decode step faster on the H100.
//!
//! With a norm whose rows are A (`norm_gemv`, `GemmTuning::norm_prologue`) each warp
//! issues its first step's weight loads the same way (after the wait unless preloaded),
//! then computes the rows' statistic itself, and the main loop computes each A vector from
//! the norm's element-wise expressions instead of loading it: no shared memory, no
//! barrier.
//!
//! Columns past N load row N - 1 (no guard in the loop) and store nothing. A symbolic M
//! (the GEMV variant of a plan that picks it at run time for M at most [`GEMV_ROWS`]) is
//! held as four rows whose work past M is skipped by a branch every thread takes alike.

use super::gemv_kv::{pair_columns, write_columns, GemvWrites};
use super::matmul::{epilogue_at, kernel_name, OutputElement};
use super::mma_gemm::{
    by_segment, i32c, matmuls_of, segment_of_block, segments, transposed_weight, Segment,
};
use super::{Body, Variant};
use crate::emit::{add, lt, mul, EResult, Emitter};
use crate::partition::Group;
use kiln_ir::{DType, Dim, Op, Value};
use kiln_kir::{Buf, Expr, SizeExpr, Special, Stmt, Ty, VarId};

/// The most rows (M) the template takes: every row's accumulators live in each lane.
pub const GEMV_ROWS: u64 = 4;

/// Warps of a block (one output column each).
pub const WARPS: u32 = 4;

/// Weight registers (f32) a lane's step may hold across its fused matmuls; the unroll is
/// cut to stay within it.
const MAX_WEIGHT_REGISTERS: u32 = 64;

/// Weight registers a step of a warp may hold when it computes a norm's rows: the rows'
/// elements take registers of their own, and ptxas spilled the pair at 64 with the first
/// step held over the statistic (sm_80 to sm_120);
/// in a grid of blocks looping over the column groups (`GemmTuning::gemv_blocks`) it
/// spilled at 48 (sm_89 to sm_120), so there [`NORM_WEIGHT_REGISTERS_LOOPED`].
const NORM_WEIGHT_REGISTERS: u32 = 48;

/// [`NORM_WEIGHT_REGISTERS`] in a grid of looping blocks.
const NORM_WEIGHT_REGISTERS_LOOPED: u32 = 32;

/// The most vectors of one weight stream a warp computing a norm's rows loads a step:
/// ptxas spilled the one-row q/k/v grid with the norm at 6 and the LM head at 8 (sm_90a).
const NORM_STREAM_VECTORS: u32 = 4;

/// What the template needs to know about a matmul group it takes.
pub(crate) struct GemvPlan {
    /// The stored value holding A (`[M, K]` row-major, through reshapes).
    a_source: Value,
    /// Per matmul: the `[N, K]` weight, the permute read through, N.
    b: Vec<(Value, Value, u64)>,
    k: u64,
    /// Rows the lanes accumulate: M when constant, else [`GEMV_ROWS`].
    rows: u64,
    /// 16-byte weight vectors a lane loads per step.
    unroll: u32,
    /// The grid's segments, one per matmul, when the widths differ.
    segments: Vec<Segment>,
    /// The elements at the start of each weight row a warp asks L2 for before the
    /// grid-dependency wait (`GemmTuning::prefetch`; `None`: no prefetch).
    prefetch: Option<u64>,
    /// Whether a block lets the next kernel launch after its last weight loads
    /// (`GemmTuning::trigger`).
    trigger: bool,
    /// Whether a block loads its first step of weights before the grid-dependency wait
    /// (`GemmTuning::preload`, where every weight is a checkpoint tensor, which no kernel
    /// writes; only where K holds a whole step).
    preload: bool,
    /// The row kernel whose normalized rows (A) each warp computes itself
    /// (`super::NormPrologues`).
    norm: Option<super::norm_gemv::NormPrologue>,
    /// The `kv_write`s its segments perform (`templates::KvWrites`, [`GemvPlan::write_kv`]).
    writes: Option<GemvWrites>,
    /// The most blocks of a grid that is not one of segments (`GemmTuning::gemv_blocks`;
    /// 0: a block a column group).
    max_blocks: u64,
    /// The blocks an SM ptxas must fit (`GemmTuning::gemv_occupancy`).
    blocks_per_sm: u32,
}

/// Elements of a 16-byte vector.
const VECTOR: u64 = 8;

/// What the loop over K of a warp's matmuls needs: the columns, and per stream (a matmul's
/// column, or one of a rotary pair's two) its weight row and buffer.
struct Columns {
    /// N of the matmuls.
    n: i64,
    /// The warp's output columns (one, or a rotary pair's two).
    cols: Vec<Expr>,
    w_rows: Vec<Expr>,
    w_bufs: Vec<kiln_kir::Buf>,
    /// 16-byte weight vectors a lane loads per step.
    unroll: i64,
    /// The lane's first element of a step.
    lane_k: Expr,
    /// Per vector of the first step and stream, the registers holding its weights, when
    /// they were loaded before the grid-dependency wait.
    first: Option<Vec<Vec<Vec<VarId>>>>,
}

/// The plan for `group` when the GEMV applies in `variant`: `linear` matmuls of bf16 or f16
/// operands of one dtype, `[M, K] @ [N, K].T` without batch dims, A read straight from a
/// buffer (through reshapes), K a constant multiple of 8, every N constant, M a constant of
/// at most [`GEMV_ROWS`] or symbolic in a GEMV variant ([`Variant::gemv_rows`]), and for matmuls of
/// different widths every stored value computed from one of them. Only with tensor cores
/// and [`crate::GemmTuning::gemv`] on (it replaces the tensor-core decode tile).
pub(crate) fn plan(
    e: &Emitter<'_, '_>,
    group: &Group,
    variant: Variant,
    options: &crate::Options,
) -> Option<GemvPlan> {
    if !options.tensor_cores || !options.gemm.gemv {
        return None;
    }
    let g = e.g;
    let first = *group.roots.first()?;
    let out_shape = g.shape(first);
    let [m, _] = out_shape else {
        return None;
    };
    let rows = match m {
        Dim::Const(m) if *m <= GEMV_ROWS => *m,
        Dim::Sym(_) => variant.gemv_rows()?,
        _ => return None,
    };
    let a = g.inst(first)?.operands[0];
    let dtype = g.ty(a).dtype;
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return None;
    }
    let (a_source, k, b) = linear_operands(e, group, a)?;
    let one_width = b.iter().all(|s| s.2 == b[0].2);
    let segments = if one_width {
        Vec::new()
    } else {
        let single = group
            .roots
            .iter()
            .chain(&group.outputs)
            .all(|&v| matmuls_of(e, group, v).len() == 1);
        if !single {
            return None;
        }
        let widths: Vec<u64> = b.iter().map(|s| s.2).collect();
        segments(&widths, WARPS)
    };
    let sets = if segments.is_empty() { b.len() } else { 1 } as u32;
    let per_vector = VECTOR as u32 * sets;
    // At least one whole step where K allows: a K shorter than the step would leave every
    // vector to the guarded tail.
    let vectors = u32::try_from(k / (32 * VECTOR)).unwrap_or(u32::MAX);
    let wanted = if rows == 1 {
        options.gemm.gemv_unroll_one
    } else {
        options.gemm.gemv_unroll
    };
    let unroll = wanted
        .min(MAX_WEIGHT_REGISTERS / per_vector)
        .min(vectors)
        .max(1);
    let widths: Vec<u64> = b.iter().map(|s| s.2).collect();
    let prefetch = prefetch_share(&options.gemm, &widths, k, dtype);
    // A whole step needs K of at least one vector a lane (the unroll is cut to K).
    let preload =
        options.gemm.preload && k >= 32 * VECTOR && b.iter().all(|w| g.is_checkpoint(w.0));
    Some(GemvPlan {
        a_source,
        b,
        k,
        rows,
        unroll,
        segments,
        prefetch,
        trigger: options.gemm.trigger,
        preload,
        norm: None,
        writes: None,
        max_blocks: u64::from(options.gemm.gemv_blocks),
        blocks_per_sm: options.gemm.gemv_occupancy,
    })
}

impl GemvPlan {
    /// Whether the grid is one of segments (matmuls of different widths).
    pub(crate) fn segmented(&self) -> bool {
        !self.segments.is_empty()
    }

    /// Has the segments perform `writes` (a paired segment's warps each owning a rotary
    /// pair of columns: half its block columns).
    pub(crate) fn write_kv(&mut self, writes: GemvWrites) {
        let widths: Vec<u64> = self.b.iter().map(|s| s.2).collect();
        self.segments = writes.segments(&widths, WARPS);
        self.writes = Some(writes);
        // The rotary pairs' two weight streams and the cache writes leave no registers for
        // a preloaded step: ptxas spilled on sm_90a with it.
        self.preload = false;
    }

    /// `gemv_w4_u8_m1` (4 warps, 8 vectors a step, one row held; `_m4` for up to four),
    /// `gemv_w4_u8_m1_seg` for a grid of segments, `_norm` with a norm prologue, `_g528`
    /// for 528 blocks looping over the column groups.
    fn name(&self) -> String {
        let seg = if self.segments.is_empty() { "" } else { "_seg" };
        let norm = if self.norm.is_some() { "_norm" } else { "" };
        let looped = self
            .looped_grid()
            .map(|grid| format!("_g{grid}"))
            .unwrap_or_default();
        format!(
            "gemv_w{WARPS}_u{}_m{}{seg}{norm}{looped}",
            self.unroll, self.rows
        )
    }

    /// The blocks of a grid that is not one of segments when they loop over column groups
    /// (fewer than the groups); `None`: a block a group, or a grid of segments.
    fn looped_grid(&self) -> Option<u64> {
        let groups = self.b[0].2.div_ceil(u64::from(WARPS));
        (self.segments.is_empty() && self.max_blocks > 0 && self.max_blocks < groups)
            .then_some(self.max_blocks)
    }

    /// Whether a block loads its first step of weights into registers before anything
    /// else: before the grid-dependency wait where preloaded, else, with a norm to compute,
    /// right after it (where K holds a whole step).
    fn first_loads(&self) -> bool {
        // A grid writing the caches holds no weights over the statistic (ptxas spilled).
        self.preload || (self.norm.is_some() && self.k >= 32 * VECTOR && self.writes.is_none())
    }

    /// The plan computing A from the rows of `norm`'s row kernel.
    /// A warp holds at most [`NORM_STREAM_VECTORS`] vectors of a weight stream a step and
    /// [`NORM_WEIGHT_REGISTERS`] weight registers in all ([`NORM_WEIGHT_REGISTERS_LOOPED`]
    /// in a grid of looping blocks).
    pub(crate) fn with_norm(self, norm: Option<super::norm_gemv::NormPrologue>) -> GemvPlan {
        let sets = if self.segments.is_empty() {
            self.b.len()
        } else {
            1
        } as u32;
        let cap = if self.looped_grid().is_some() {
            NORM_WEIGHT_REGISTERS_LOOPED
        } else {
            NORM_WEIGHT_REGISTERS
        };
        let unroll = if norm.is_some() {
            self.unroll
                .min(NORM_STREAM_VECTORS)
                .min(cap / (VECTOR as u32 * sets))
                .max(1)
        } else {
            self.unroll
        };
        GemvPlan {
            norm,
            unroll,
            ..self
        }
    }
}

/// The k elements of every `[N, K]` weight row (N of `widths`, K `k`) a GEMV block prefetches into L2 before its grid-dependency wait under `tuning`:
/// all of K while the weights take at most the prefetch budget, else that share of it, in
/// whole 16-byte vectors; `None` with `GemmTuning::prefetch` off or nothing to prefetch.
/// Shared by the GEMV and the tensor-core GEMV.
pub(super) fn prefetch_share(
    tuning: &crate::GemmTuning,
    widths: &[u64],
    k: u64,
    dtype: DType,
) -> Option<u64> {
    let weight_bytes: u64 = widths
        .iter()
        .map(|n| n * k * dtype.size_bytes() as u64)
        .sum();
    let budget = super::mma_gemm::prefetch_budget(tuning);
    let share = if weight_bytes <= budget {
        k
    } else {
        (u128::from(k) * u128::from(budget) / u128::from(weight_bytes)) as u64 / VECTOR * VECTOR
    };
    (tuning.prefetch && share > 0).then_some(share)
}
/// A matmul's `[N, K]` weight, the permute that transposes it, and N.
pub(crate) type WeightOperand = (Value, Value, u64);

/// The operands of a group of `linear` matmuls sharing their A (bf16 or f16) that the GEMV
/// templates take: A's stored source (through reshapes), K (a positive multiple of 8) and,
/// per matmul, its `[N, K]` weight, the permute that transposes it and N. `None` where a
/// matmul reads another A, a weight of another type or rank, or a symbolic size.
pub(crate) fn linear_operands(
    e: &Emitter<'_, '_>,
    group: &Group,
    a: Value,
) -> Option<(Value, u64, Vec<WeightOperand>)> {
    let g = e.g;
    let dtype = g.ty(a).dtype;
    let mut a_source = a;
    while !e.is_loaded(a_source) {
        let Some(Op::Reshape { .. }) = g.op(a_source) else {
            return None;
        };
        a_source = g.inst(a_source)?.operands[0];
    }
    let k = g.shape(a).last()?.as_const()?;
    if k == 0 || k % VECTOR != 0 {
        return None;
    }
    let mut b = Vec::new();
    for &mm in &group.roots {
        let inst = g.inst(mm)?;
        if inst.operands[0] != a {
            return None;
        }
        let (permute, weight, _) = transposed_weight(e, inst.operands[1], false)?;
        if g.ty(weight).dtype != dtype || g.shape(weight).len() != 2 {
            return None;
        }
        let n = g.shape(mm)[1].as_const()?;
        b.push((weight, permute, n));
    }
    Some((a_source, k, b))
}

/// Emits `column` once per matmul of a grid of segments (each in its own scope, the branch
/// chosen by `segment`) or once over all of them, then marks the matmuls and their weight
/// permutes `b` fused: the column loop the GEMV templates share.
pub(crate) fn emit_columns(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    segment: Option<&Expr>,
    b: &[(Value, Value, u64)],
    matmuls: &[Value],
    mut column: impl FnMut(&mut Emitter<'_, '_>, &mut Vec<Stmt>, &[usize]) -> EResult<()>,
) -> EResult<()> {
    match segment {
        Some(which) => {
            let mut branches = Vec::new();
            for i in 0..b.len() {
                let mut branch = Vec::new();
                e.push_scope();
                column(e, &mut branch, &[i])?;
                e.pop_scope();
                branches.push(branch);
            }
            body.extend(by_segment(which, branches));
        }
        None => {
            let all: Vec<usize> = (0..b.len()).collect();
            column(e, body, &all)?;
        }
    }
    for &m in matmuls {
        e.fused.insert(m);
    }
    for &(_, permute, _) in b {
        e.fused.insert(permute);
    }
    Ok(())
}

/// The statements `matmuls(e, these)` makes for the block's matmuls: one matmul's in each
/// branch of a grid of segments (`segment` the block's), or all `n` at once.
pub(crate) fn per_segment(
    e: &mut Emitter<'_, '_>,
    segment: Option<&Expr>,
    n: usize,
    mut matmuls: impl FnMut(&mut Emitter<'_, '_>, &[usize]) -> Vec<Stmt>,
) -> Vec<Stmt> {
    match segment {
        Some(which) => {
            let branches = (0..n).map(|i| matmuls(e, &[i])).collect();
            by_segment(which, branches)
        }
        None => {
            let all: Vec<usize> = (0..n).collect();
            matmuls(e, &all)
        }
    }
}

/// A preload's first step: for each of `offsets` and each `(buffer, row)` stream, one
/// `width`-element vector at `row + offset` into the next registers of `pool`, which every
/// segment of a grid shares. Returns the registers by offset and stream.
pub(crate) fn load_into_pool(
    out: &mut Vec<Stmt>,
    pool: &[VarId],
    width: usize,
    offsets: &[Expr],
    streams: &[(Buf, Expr)],
) -> Vec<Vec<Vec<VarId>>> {
    let mut regs = pool.chunks(width);
    offsets
        .iter()
        .map(|at| {
            streams
                .iter()
                .map(|(buf, row)| {
                    let dsts = regs.next().expect("the step fits the pool").to_vec();
                    out.push(Stmt::LoadVec {
                        dsts: dsts.clone(),
                        buf: *buf,
                        index: add(row.clone(), at.clone()),
                    });
                    dsts
                })
                .collect()
        })
        .collect()
}

/// Puts the statements of `body` after `prelude` under `0 < m_size`: a symbolic row count of
/// 0 reads no row.
pub(crate) fn guard_rows(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    prelude: usize,
    m_size: Expr,
) {
    let zero = e.ix(0);
    let rest = body.split_off(prelude);
    body.push(Stmt::if_then(lt(zero, m_size), rest));
}

pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    stores: &[Value],
    plan: &GemvPlan,
) -> EResult<Body> {
    let g = e.g;
    let matmuls = group.roots.clone();
    let out_shape = g.shape(matmuls[0]).to_vec();
    let ity = e.index_ty;
    let index = |x: Expr| -> Expr {
        if ity == Ty::I64 {
            Expr::Cast(Ty::I64, Box::new(x))
        } else {
            x
        }
    };
    // `GemmTuning::gemv_occupancy` blocks an SM (4: 16 warps, each with `unroll` 16-byte
    // loads a lane in flight, ptxas keeping to 128 registers).
    e.blocks_per_sm = plan.blocks_per_sm;
    let mut body = Vec::new();
    let lane = e.bind(&mut body, "lane", Ty::I32, Expr::Special(Special::LaneId));
    let warp = e.bind(&mut body, "warp", Ty::I32, Expr::Special(Special::WarpId));
    let m_size = e.dim(&out_shape[0]);
    let symbolic_rows = out_shape[0].as_const().is_none();
    let k = plan.k as i64;
    // The rows of A each lane reads (rows past a symbolic M are skipped).
    let mut a_rows = Vec::new();
    for r in 0..plan.rows as i64 {
        let at = mul(e.ix(r), e.ix(k));
        a_rows.push(e.bind(&mut body, "a_row", ity, at));
    }
    // Block column x: the matmul whose segment holds it and x's offset in that segment.
    let segmented = !plan.segments.is_empty();
    let (segment, block) = if segmented {
        let (which, block) = segment_of_block(e, &mut body, &plan.segments);
        (Some(which), block)
    } else {
        (None, Expr::Special(Special::BlockIdx(0)))
    };
    let col = index(block * i32c(i64::from(WARPS)) + warp.clone());
    let col = e.bind(&mut body, "col", ity, col);
    // The columns of matmul i a warp computes: `col`, or the rotary pair `col` numbers in a
    // segment whose `kv_write` reads partners (`gemv_kv`).
    let write_of = |i: usize| {
        let writes = plan.writes.as_ref()?;
        writes.by_matmul[i].as_ref()
    };
    let warp_columns =
        |e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, i: usize, col: &Expr| match write_of(i) {
            Some(w) if w.paired => pair_columns(e, out, col, w.dim),
            _ => vec![col.clone()],
        };
    // Before the grid-dependency wait (address arithmetic and prefetches only, so the
    // previous kernel may still run): lane 0 asks L2 for the start of the warp's weight
    // rows, which stream from HBM while the previous kernel finishes.
    if let Some(len) = plan.prefetch {
        let bytes = i32c((len * g.ty(plan.b[0].0).dtype.size_bytes() as u64) as i64);
        let first_lane = lane.clone().equals(i32c(0));
        let rows = |e: &mut Emitter<'_, '_>, these: &[usize]| -> Vec<Stmt> {
            let mut stmts = Vec::new();
            let mut prefetches = Vec::new();
            for &i in these {
                let (weight, _, n) = plan.b[i];
                for c in warp_columns(e, &mut stmts, i, &col) {
                    prefetches.push(Stmt::PrefetchL2 {
                        buf: e.buffer(weight, kiln_kir::Access::Read),
                        index: mul(crate::emit::min_e(c, e.ix(n as i64 - 1)), e.ix(k)),
                        bytes: bytes.clone(),
                    });
                }
            }
            stmts.push(Stmt::if_then(first_lane.clone(), prefetches));
            stmts
        };
        let stmts = per_segment(e, segment.as_ref(), plan.b.len(), rows);
        body.extend(stmts);
    }
    // The warp's columns, weight rows and unroll for the matmuls `these` (all, or one
    // segment's).
    let vector = VECTOR as i64;
    let setup = |e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, these: &[usize], col: &Expr| {
        let n = plan.b[these[0]].2 as i64;
        // The dot products of the warp: each matmul's at `col`, or a rotary pair's two.
        let cols = warp_columns(e, out, these[0], col);
        let streams: Vec<(usize, Expr)> = if cols.len() > 1 {
            cols.iter().map(|c| (these[0], c.clone())).collect()
        } else {
            these.iter().map(|&i| (i, col.clone())).collect()
        };
        let w_rows: Vec<Expr> = streams
            .iter()
            .map(|(_, c)| {
                let at = mul(crate::emit::min_e(c.clone(), e.ix(n - 1)), e.ix(k));
                e.bind(out, "w_row", ity, at)
            })
            .collect();
        let w_bufs: Vec<_> = streams
            .iter()
            .map(|&(i, _)| e.buffer(plan.b[i].0, kiln_kir::Access::Read))
            .collect();
        let per_step = VECTOR as u32 * streams.len() as u32;
        let unroll = plan.unroll.min(MAX_WEIGHT_REGISTERS / per_step).max(1);
        let lane_k = e.bind(out, "lane_k", ity, index(lane.clone() * i32c(vector)));
        Columns {
            n,
            cols,
            w_rows,
            w_bufs,
            unroll: i64::from(unroll),
            lane_k,
            first: None,
        }
    };
    // The first step's weight vectors, into one set of registers that every segment shares
    // (so that the branches leave no more registers live than one of them): before the
    // wait where preloaded, else right after it where the block computes a norm's rows,
    // so that their DRAM latency overlaps the rows' statistic.
    let mut ready: Vec<Option<Columns>> = (0..plan.b.len()).map(|_| None).collect();
    let preload = plan.preload;
    let loads_first = plan.first_loads();
    let mut load_first = |e: &mut Emitter<'_, '_>, body: &mut Vec<Stmt>| {
        let pool: Vec<VarId> = (0..MAX_WEIGHT_REGISTERS)
            .map(|_| e.var("w", Ty::F32))
            .collect();
        let load = |e: &mut Emitter<'_, '_>, these: &[usize]| -> Vec<Stmt> {
            let mut out = Vec::new();
            let mut columns = setup(e, &mut out, these, &col);
            let offsets: Vec<Expr> = (0..columns.unroll)
                .map(|u| {
                    let at = add(columns.lane_k.clone(), e.ix(u * 32 * vector));
                    e.bind(&mut out, "k0", ity, at)
                })
                .collect();
            let streams: Vec<(Buf, Expr)> = columns
                .w_bufs
                .iter()
                .copied()
                .zip(columns.w_rows.iter().cloned())
                .collect();
            let first = load_into_pool(&mut out, &pool, VECTOR as usize, &offsets, &streams);
            columns.first = Some(first);
            ready[these[0]] = Some(columns);
            out
        };
        let stmts = per_segment(e, segment.as_ref(), plan.b.len(), load);
        body.extend(stmts);
    };
    if preload {
        load_first(e, &mut body);
    }
    if plan.prefetch.is_some() || preload {
        body.push(Stmt::GridDependencyWait);
    }
    if loads_first && !preload {
        load_first(e, &mut body);
    }
    // What runs before the wait (and the first weights) stays outside the branch on a
    // symbolic M below.
    let prelude = body.len();
    // A: the stored rows, or the rows of a norm whose statistic each warp computes here
    // and whose elements the main loop computes in registers.
    let a_buf = match &plan.norm {
        Some(norm) => {
            super::norm_gemv::emit(e, &mut body, norm, plan.rows, &m_size, symbolic_rows)?;
            None
        }
        None => Some(e.buffer(plan.a_source, kiln_kir::Access::Read)),
    };
    // The matmuls of this block (all, or one segment's), their column and loop.
    let looped = plan.looped_grid();
    let mut column = |e: &mut Emitter<'_, '_>,
                      out: &mut Vec<Stmt>,
                      these: &[usize],
                      col: &Expr|
     -> EResult<()> {
        let columns = match ready[these[0]].take() {
            Some(columns) => columns,
            None => setup(e, out, these, col),
        };
        let Columns {
            n,
            cols,
            w_rows,
            w_bufs,
            unroll,
            lane_k,
            first,
        } = columns;
        let rows = plan.rows as usize;
        // Two accumulators a row (even and odd vectors): two dependent chains of FMAs.
        let chains = if unroll > 1 { 2 } else { 1 };
        let acc: Vec<Vec<Vec<VarId>>> = w_rows
            .iter()
            .map(|_| {
                (0..rows)
                    .map(|_| (0..chains).map(|_| e.var("acc", Ty::F32)).collect())
                    .collect()
            })
            .collect();
        for &a in acc.iter().flatten().flatten() {
            out.push(Stmt::Assign(a, Expr::f32(0.0)));
        }
        let step = 32 * vector * unroll;
        // The vectors at `k0 + u * 32 * 8` (u in `vectors`), each under `ok(u)` if given;
        // with `loaded`, the weight vectors already in those registers.
        let fold = |e: &mut Emitter<'_, '_>,
                    out: &mut Vec<Stmt>,
                    k0: Expr,
                    vectors: i64,
                    ok: &dyn Fn(i64) -> Option<Expr>,
                    loaded: Option<&Vec<Vec<Vec<VarId>>>>|
         -> EResult<()> {
            let k0 = e.bind(out, "k0", ity, k0);
            let offsets: Vec<Expr> = (0..vectors)
                .map(|u| add(k0.clone(), e.ix(u * 32 * vector)))
                .collect();
            let offset = |u: i64| offsets[u as usize].clone();
            let mut weights = Vec::new();
            let mut guarded: Vec<Vec<Stmt>> = (0..vectors).map(|_| Vec::new()).collect();
            if let Some(loaded) = loaded {
                weights.clone_from(loaded);
            }
            for u in 0..vectors {
                if loaded.is_some() {
                    break;
                }
                let regs: Vec<Vec<VarId>> = w_bufs
                    .iter()
                    .map(|_| (0..vector).map(|_| e.var("w", Ty::F32)).collect())
                    .collect();
                for ((buf, row), dsts) in w_bufs.iter().zip(&w_rows).zip(&regs) {
                    let load = Stmt::LoadVec {
                        dsts: dsts.clone(),
                        buf: *buf,
                        index: add(row.clone(), offset(u)),
                    };
                    if ok(u).is_some() {
                        guarded[u as usize].push(load);
                    } else {
                        out.push(load);
                    }
                }
                weights.push(regs);
            }
            for (u, regs) in weights.iter().enumerate() {
                let target = if ok(u as i64).is_some() {
                    &mut guarded[u]
                } else {
                    &mut *out
                };
                for (r, a_row) in a_rows.iter().enumerate() {
                    let mut row_stmts = Vec::new();
                    let x: Vec<VarId> = (0..vector).map(|_| e.var("x", Ty::F32)).collect();
                    match (a_buf, &plan.norm) {
                        (Some(buf), _) => row_stmts.push(Stmt::LoadVec {
                            dsts: x.clone(),
                            buf,
                            index: add(a_row.clone(), offset(u as i64)),
                        }),
                        (None, Some(norm)) => {
                            // A row of the norm, as its row kernel would have stored it.
                            // Rows after the first in scopes of their own (a row past a
                            // symbolic M is skipped); they reuse the first row's weight of
                            // the norm.
                            if r > 0 {
                                e.push_scope();
                            }
                            let vals = super::norm_gemv::elements(
                                e,
                                &mut row_stmts,
                                norm,
                                r as u64,
                                offset(u as i64),
                                vector as usize,
                            );
                            if r > 0 {
                                e.pop_scope();
                            }
                            for (&xj, v) in x.iter().zip(vals?) {
                                row_stmts.push(Stmt::Assign(xj, v));
                            }
                        }
                        (None, None) => unreachable!("A is a buffer or a norm's rows"),
                    }
                    for (set, w) in regs.iter().enumerate() {
                        let cell = acc[set][r][u % chains];
                        for (wj, xj) in w.iter().zip(&x) {
                            let fma = Expr::Fma(
                                Box::new(Expr::var(*wj)),
                                Box::new(Expr::var(*xj)),
                                Box::new(Expr::var(cell)),
                            );
                            row_stmts.push(Stmt::assign(cell, fma));
                        }
                    }
                    if symbolic_rows && r > 0 {
                        // Rows past a symbolic M: skipped (the same branch in every
                        // thread), so one row costs one row's work.
                        let inside = lt(e.ix(r as i64), m_size.clone());
                        target.push(Stmt::if_then(inside, row_stmts));
                    } else {
                        target.extend(row_stmts);
                    }
                }
            }
            for (u, stmts) in guarded.into_iter().enumerate() {
                if let Some(cond) = ok(u as i64) {
                    out.push(Stmt::if_then(cond, stmts));
                }
            }
            Ok(())
        };
        // Whole steps (the first from the registers loaded before the wait), then the tail
        // of `tail` vectors over the lanes.
        let full = k / step;
        let mut start = 0;
        if let Some(first) = &first {
            fold(e, out, lane_k.clone(), unroll, &|_| None, Some(first))?;
            start = step;
        }
        if full * step > start {
            let s = e.var("kstep", ity);
            let mut inner = Vec::new();
            fold(
                e,
                &mut inner,
                add(Expr::var(s), lane_k.clone()),
                unroll,
                &|_| None,
                None,
            )?;
            out.push(Stmt::For {
                var: s,
                start: e.ix(start),
                end: e.ix(full * step),
                step: e.ix(step),
                body: inner,
            });
        }
        let tail = (k - full * step) / vector;
        if tail > 0 {
            let k0 = add(e.ix(full * step), lane_k.clone());
            let lane_e = lane.clone();
            fold(
                e,
                out,
                k0,
                (tail + 31) / 32,
                &|u| Some(lt(lane_e.clone() + i32c(u * 32), i32c(tail))),
                None,
            )?;
        }
        // Every weight load is issued: the next kernel may launch (and prefetch). A block
        // looping over column groups lets it launch after its last group.
        if plan.trigger && looped.is_none() {
            out.push(Stmt::LaunchDependents);
        }
        // The chains added, then the lanes' sums: every lane ends with the total.
        let acc: Vec<Vec<VarId>> = acc
            .iter()
            .map(|set| {
                set.iter()
                    .map(|cells| {
                        for &c in &cells[1..] {
                            out.push(Stmt::assign(cells[0], Expr::var(cells[0]) + Expr::var(c)));
                        }
                        cells[0]
                    })
                    .collect()
            })
            .collect();
        let other = e.var("other", Ty::F32);
        for &a in acc.iter().flatten() {
            for mask in [16, 8, 4, 2, 1] {
                out.push(Stmt::ShuffleXor {
                    dst: other,
                    src: a,
                    mask,
                });
                out.push(Stmt::assign(a, Expr::var(a) + Expr::var(other)));
            }
        }
        let first_lane = lane.clone().equals(i32c(0));
        let these_values: Vec<Value> = these.iter().map(|&i| matmuls[i]).collect();
        let stored: Vec<Value> = if segmented {
            stores
                .iter()
                .copied()
                .filter(|&v| matmuls_of(e, group, v).contains(&these[0]))
                .collect()
        } else {
            stores.to_vec()
        };
        for r in 0..rows {
            let accs: Vec<VarId> = acc.iter().map(|a| a[r]).collect();
            let row = e.ix(r as i64);
            // A rotary pair's two columns each take the epilogue.
            let per_column: Vec<(&Expr, &[VarId])> = if cols.len() > 1 {
                cols.iter().zip(accs.chunks(1)).collect()
            } else {
                vec![(col, &accs[..])]
            };
            for (c, accs) in per_column {
                let at = OutputElement {
                    batch: &[],
                    row: &row,
                    col: c,
                    rows: &m_size,
                };
                epilogue_at(e, out, &these_values, accs, &at, Some(&first_lane), &stored)?;
            }
        }
        if let Some(write) = write_of(these[0]).filter(|_| segmented) {
            let owned = &plan.writes.as_ref().expect("writes").owned;
            let m = symbolic_rows.then_some(&m_size);
            write_columns(
                e,
                out,
                write,
                owned,
                &stored,
                &cols,
                plan.rows,
                m,
                &first_lane,
                n as u64,
            )?;
        }
        Ok(())
    };
    match looped {
        None => emit_columns(
            e,
            &mut body,
            segment.as_ref(),
            &plan.b,
            &matmuls,
            |e, out, these| column(e, out, these, &col),
        )?,
        Some(grid) => {
            // The block's groups: the first (peeled where its first weights are already in
            // registers), then every `grid`-th after it, below the groups.
            let groups = plan.b[0].2.div_ceil(u64::from(WARPS)) as i64;
            let mut start = e.special(Special::BlockIdx(0));
            if loads_first {
                e.push_scope();
                emit_columns(e, &mut body, None, &plan.b, &matmuls, |e, out, these| {
                    column(e, out, these, &col)
                })?;
                e.pop_scope();
                start = add(start, e.ix(grid as i64));
            }
            let group_var = e.var("group", ity);
            e.set_range(group_var, 0, groups - 1);
            let mut inner = Vec::new();
            e.push_scope();
            let at = add(
                mul(Expr::var(group_var), e.ix(i64::from(WARPS))),
                index(warp.clone()),
            );
            let group_col = e.bind(&mut inner, "col", ity, at);
            emit_columns(e, &mut inner, None, &plan.b, &matmuls, |e, out, these| {
                column(e, out, these, &group_col)
            })?;
            e.pop_scope();
            body.push(Stmt::For {
                var: group_var,
                start,
                end: e.ix(groups),
                step: e.ix(grid as i64),
                body: inner,
            });
            if plan.trigger {
                body.push(Stmt::LaunchDependents);
            }
        }
    }
    if symbolic_rows {
        guard_rows(e, &mut body, prelude, m_size);
    }
    let mut what = kernel_name(&plan.name(), &matmuls, stores);
    if plan.writes.is_some() {
        what = format!("{what}_kv_write");
    }
    let blocks = if segmented {
        plan.segments.iter().map(|s| s.blocks).sum()
    } else {
        looped.unwrap_or_else(|| plan.b[0].2.div_ceil(u64::from(WARPS)))
    };
    Ok(Body {
        what,
        block_dim: 32 * WARPS,
        grid: [SizeExpr::Const(blocks), super::one(), super::one()],
        stmts: body,
    })
}
