//! The tensor-core GEMV template: bf16 and f16 matmuls of at most [`MMA_GEMV_ROWS`] rows
//! (decode batches of 5 to 16 rows; fewer where the GEMV does not take them) of `linear`
//! weights (`x @ w.T`, `w` stored `[N, K]`, K contiguous), f32 accumulation, on
//! `mma.sync` m16n8k16 products whose B fragments come straight from global memory.
//!
//! Every weight element is used once, so the weights skip shared memory: a block owns
//! `tiles` n8 tiles (`GemmTuning::mma_gemv_tiles`, 1, 2 or 4; 1 by default), `8 * tiles`
//! consecutive output columns, and is `warps` warps (`GemmTuning::mma_gemv_warps`, 4 by
//! default) that split K among them (warp w takes the 32-wide k chunks `w, w + warps, ..`);
//! a lane loads 16-byte vectors of weight row `n = lane / 4` of each tile (8 consecutive k:
//! `8t .. 8t + 7` of a chunk, `t = lane % 4`), `unroll` chunks in flight before any is used,
//! then a chunk's A registers once for all tiles and one `mma` pair a tile into the tile's
//! accumulators. More tiles read A (from L2) fewer times: every block reads all of A, so
//! at 4096 columns one tile a block reads 512 × 128 KiB of A for 32 MiB of weights, two
//! tiles half that. The weight registers a lane's step holds stay within the budget
//! (`unroll` is cut by the tiles). A tile's products and the warps' sums run in the same
//! order whatever the tiles, so the results are the same bits. No split of K across
//! blocks, no workspace and no sum kernel.
//!
//! Why the registers as loaded are B fragments: m16n8k16 gives thread `(g, t)` (`g = lane /
//! 4`) the B elements of column g at logical k `2t, 2t+1` (b0) and `2t+8, 2t+9` (b1), and
//! the A elements of rows g and g+8 at the same logical k (a0, a1: `2t, 2t+1`; a2, a3:
//! `2t+8, 2t+9`), and sums over the 16 logical k. Map logical k of the first product to
//! physical k of the chunk by `2t + i ↦ 8t + i`, `2t + 8 + i ↦ 8t + 2 + i` (i in 0, 1), and of
//! the second by the same plus 4: over the four t these are bijections onto `8t + 0..3` and
//! `8t + 4..7`, together the 32 k of the chunk. A dot product is a sum over k, invariant
//! under any permutation of k applied to both operands alike, so when A's registers are
//! read with the same map (row g: `A[g][8t .. 8t+3]` for the first product, `A[g][8t+4 ..
//! 8t+7]` for the second; row g+8 likewise) the two products add exactly the chunk's 32
//! terms of every output element: the weight vector's four registers are b0, b1 of the
//! first product and b0, b1 of the second, with no shuffle.
//!
//! A (at most 16 activation rows, padded to 16) is read from global memory, the same 16-byte
//! vectors in every block (cache hits after the first), not staged in shared memory: a
//! block reads all of K, 128 KiB of A at K = 4096 and 16 rows, more than a block's shared
//! memory, and each A element is read by one lane of a warp, twice the weight bytes of one
//! tile a warp step (`2 / tiles` times for `tiles` tiles; the GEMV reads four times). Rows past M read row M - 1 (their products land in
//! accumulator rows that are never stored: an output row depends on its A row alone), so
//! no lane branches; a constant M of at most 8 reads no second row at all (zero
//! registers). Every 16-byte vector (A and B) is loaded as four raw 32-bit registers of
//! element pairs (a `LoadVec` of `I32` destinations, `kiln_kir::loads_raw_pairs`): the
//! bits are the `mma` operands as they are, no conversion to f32 and back.
//!
//! A K that is not a multiple of the step ends with guarded chunks: a lane's vector outside
//! K (K is a multiple of 8, so a vector is wholly in or out) leaves its A and B registers 0,
//! and the products run in every lane (an `mma` needs the whole warp). The warps' partial
//! sums (of every tile) meet through shared memory in warp order; warp 0 runs the matmul
//! templates' epilogue (`matmul::epilogue_lanes`: bias, activation, residual, gate/up,
//! cast) on its accumulators (rows g and g+8, columns 2t and 2t+1 of each tile). Horizontally fused
//! matmuls of one width (gate and up) share the block (a weight vector of each per chunk,
//! A once); matmuls of different widths (q/k/v) get a grid of segments as in the other
//! decode templates (`mma_gemm::segments`, `8 * tiles`-column block columns). Columns past
//! N load row N - 1 and store
//! nothing. A symbolic M (the decode variant of a plan, `Step::BySize`, at most
//! [`MMA_GEMV_ROWS`] rows) is held as 16 rows.
//!
//! Where every weight is a checkpoint tensor (`kiln_kir::Access::Constant`, which no kernel
//! writes) and K holds a whole step, a warp loads its first step of weight vectors before
//! the grid-dependency wait (`GemmTuning::preload`), after the L2 prefetch if there is one,
//! into one set of registers that every segment shares; the A loads (activations, which the
//! kernel before may still be writing) and the products follow the wait.

use super::matmul::{epilogue_lanes, kernel_name, OutputElement};
use super::mma_gemm::{and_mask, i32c, matmuls_of, segment_of_block, segments, shr, Segment};
use super::{Body, Variant};
use crate::emit::{add, lt, min_e, mul, EResult, Emitter};
use crate::partition::Group;
use kiln_ir::{DType, Dim, Value};
use kiln_kir::{Buf, Expr, MmaInput, SizeExpr, Special, Stmt, Ty, VarId};

/// The most rows (M) the template takes: one m16 tile.
pub const MMA_GEMV_ROWS: u64 = 16;

/// Output columns of an n8 tile (a block has `tiles` of them; every warp of the block has
/// the same).
pub const COLUMNS: u32 = 8;

/// Packed weight registers a lane's step may hold across its fused matmuls and tiles.
const MAX_WEIGHT_REGISTERS: u32 = 32;

/// [`MAX_WEIGHT_REGISTERS`] for horizontally fused matmuls of one width (gate/up): with raw
/// loads ptxas keeps more loads in flight across steps, and 32 or 24 (steps of 4 or 3
/// chunks) spill on sm_80 under the 128 registers of four blocks an SM; 16 (2 chunks)
/// take 126 to 128 on every target without spills. A step holds one chunk at least: gate/up
/// at four tiles a block hold 32 (one chunk of 8 vectors), which still take 128 registers
/// without spills on every target.
const MAX_FUSED_WEIGHT_REGISTERS: u32 = 16;

/// Elements of a 16-byte vector.
const VECTOR: u64 = 8;

/// k of one chunk: four lanes' vectors.
const CHUNK: u64 = 4 * VECTOR;

/// What the template needs to know about a matmul group it takes.
pub(crate) struct MmaGemvPlan {
    input: MmaInput,
    /// The stored value holding A (`[M, K]` row-major, through reshapes).
    a_source: Value,
    /// Per matmul: the `[N, K]` weight, the permute read through, N.
    b: Vec<(Value, Value, u64)>,
    k: u64,
    /// M when constant, else [`MMA_GEMV_ROWS`].
    rows: u64,
    /// Chunks a warp loads per step.
    unroll: u32,
    /// Warps of a block, splitting K.
    warps: u32,
    /// n8 tiles of a block (`GemmTuning::mma_gemv_tiles`: 1, 2 or 4), every warp computing
    /// all of them from one load of its A registers a chunk.
    tiles: u32,
    /// The grid's segments, one per matmul, when the widths differ.
    segments: Vec<Segment>,
    /// The k elements of each weight row a block prefetches into L2 before its
    /// grid-dependency wait (`GemmTuning::prefetch`; `None`: no prefetch).
    prefetch: Option<u64>,
    /// Whether a block lets the next kernel launch after its last weight loads
    /// (`GemmTuning::trigger`).
    trigger: bool,
    /// Whether a warp loads its first step of weights before the grid-dependency wait
    /// (`GemmTuning::preload`, where every weight is a checkpoint tensor; only where K holds
    /// a whole step).
    preload: bool,
}

/// A warp's weight rows for the matmuls of a block (all, or one segment's), and the
/// registers of its first step when they were loaded before the grid-dependency wait.
struct Weights {
    /// Per tile, the offset of the lane's weight row (row `col0 + 8 * tile + g`, clamped
    /// to N - 1).
    w_rows: Vec<Expr>,
    w_bufs: Vec<kiln_kir::Buf>,
    /// Per chunk of the first step and stream (matmul-major, then tile), the four packed
    /// registers of its vector.
    first: Option<Vec<Vec<Vec<VarId>>>>,
}

impl Weights {
    /// The weight streams of a chunk, matmul-major then tile: stream `set * tiles + tile`
    /// feeds accumulator set `set * tiles + tile`.
    fn streams(&self) -> Vec<(Buf, Expr)> {
        self.w_bufs
            .iter()
            .flat_map(|&buf| self.w_rows.iter().map(move |row| (buf, row.clone())))
            .collect()
    }
}

/// The plan for `group` when the template applies in `variant`: `linear` matmuls of bf16
/// or f16 operands of one dtype, `[M, K] @ [N, K].T` without batch dims, A read straight
/// from a buffer (through reshapes), K a constant multiple of 8, every N constant, M a
/// constant of at most [`MMA_GEMV_ROWS`] or symbolic in a small variant, and for matmuls of
/// different widths every stored value computed from one of them. Only with tensor cores
/// and [`crate::GemmTuning::mma_gemv`] on; the GEMV (M at most 4) is asked first.
pub(crate) fn plan(
    e: &Emitter<'_, '_>,
    group: &Group,
    variant: Variant,
    options: &crate::Options,
) -> Option<MmaGemvPlan> {
    if !options.tensor_cores || !options.gemm.mma_gemv {
        return None;
    }
    let g = e.g;
    let first = *group.roots.first()?;
    let [m, _] = g.shape(first) else {
        return None;
    };
    let rows = match m {
        Dim::Const(m) if (1..=MMA_GEMV_ROWS).contains(m) => *m,
        Dim::Sym(_) if variant.small() => MMA_GEMV_ROWS,
        _ => return None,
    };
    let a = g.inst(first)?.operands[0];
    let dtype = g.ty(a).dtype;
    let input = match dtype {
        DType::BF16 => MmaInput::Bf16,
        DType::F16 => MmaInput::F16,
        _ => return None,
    };
    let (a_source, k, b) = super::gemv::linear_operands(e, group, a)?;
    let widths: Vec<u64> = b.iter().map(|s| s.2).collect();
    let one_width = b.iter().all(|s| s.2 == b[0].2);
    let tiles = match options.gemm.mma_gemv_tiles {
        0 | 1 => 1,
        2 | 3 => 2,
        _ => 4,
    };
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
        segments(&widths, COLUMNS * tiles)
    };
    let sets = if segments.is_empty() { b.len() } else { 1 } as u32;
    // At least one whole step where K allows (a shorter K leaves every chunk to the guarded
    // tail), and four packed registers a weight vector.
    let warps = options.gemm.mma_gemv_warps.clamp(1, 16);
    let chunks = u32::try_from(k / (CHUNK * u64::from(warps))).unwrap_or(u32::MAX);
    let unroll = options
        .gemm
        .mma_gemv_unroll
        .min(
            if sets > 1 {
                MAX_FUSED_WEIGHT_REGISTERS
            } else {
                MAX_WEIGHT_REGISTERS
            } / (4 * sets * tiles),
        )
        .min(chunks)
        .max(1);
    // Checkpoint tensors only: no kernel writes them, so they may be read before the wait.
    let preload = options.gemm.preload
        && k >= CHUNK * u64::from(warps)
        && b.iter().all(|w| g.is_checkpoint(w.0));
    Some(MmaGemvPlan {
        input,
        a_source,
        b,
        k,
        rows,
        unroll,
        warps,
        tiles,
        segments,
        prefetch: super::gemv::prefetch_share(&options.gemm, &widths, k, dtype),
        trigger: options.gemm.trigger,
        preload,
    })
}

impl MmaGemvPlan {
    /// `mma_gemv_n8_w4_u8`, `mma_gemv_n8_w4_u8_seg` for a grid of segments, `_t2` after
    /// the unroll for two n8 tiles a block.
    fn name(&self) -> String {
        let seg = if self.segments.is_empty() { "" } else { "_seg" };
        let tiles = if self.tiles > 1 {
            format!("_t{}", self.tiles)
        } else {
            String::new()
        };
        format!(
            "mma_gemv_n{COLUMNS}_w{}_u{}{tiles}{seg}",
            self.warps, self.unroll
        )
    }

    /// Output columns of a block.
    fn block_columns(&self) -> u32 {
        COLUMNS * self.tiles
    }
}

pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    stores: &[Value],
    plan: &MmaGemvPlan,
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
    // Four blocks an SM at least (ptxas keeps to 128 registers).
    let warps = plan.warps;
    e.blocks_per_sm = (65536 / (128 * 32 * warps)).max(1);
    let mut body = Vec::new();
    let lane = e.bind(&mut body, "lane", Ty::I32, Expr::Special(Special::LaneId));
    let warp = e.bind(&mut body, "warp", Ty::I32, Expr::Special(Special::WarpId));
    let gid = e.bind(&mut body, "g", Ty::I32, shr(lane.clone(), 2));
    let tig = e.bind(&mut body, "t", Ty::I32, and_mask(lane.clone(), 3));
    let m_size = e.dim(&out_shape[0]);
    let symbolic_rows = out_shape[0].as_const().is_none();
    let k = plan.k as i64;
    let a_buf = e.buffer(plan.a_source, kiln_kir::Access::Read);
    // This lane's A rows g and g + 8 (rows past M read row M - 1; none for a constant M of
    // at most 8).
    let last_row = if symbolic_rows {
        crate::emit::sub(m_size.clone(), e.ix(1))
    } else {
        e.ix(plan.rows as i64 - 1)
    };
    let mut a_rows = Vec::new();
    for half in 0..2i64 {
        if half == 1 && !symbolic_rows && plan.rows <= 8 {
            break;
        }
        let row = index(gid.clone() + i32c(8 * half));
        let row = if !symbolic_rows && plan.rows == MMA_GEMV_ROWS {
            row
        } else {
            min_e(row, last_row.clone())
        };
        a_rows.push(row);
    }
    let segmented = !plan.segments.is_empty();
    let (segment, block) = if segmented {
        let (which, block) = segment_of_block(e, &mut body, &plan.segments);
        (Some(which), block)
    } else {
        (None, Expr::Special(Special::BlockIdx(0)))
    };
    let col0 = e.bind(
        &mut body,
        "col0",
        ity,
        index(block * i32c(i64::from(plan.block_columns()))),
    );
    let tiles = plan.tiles as usize;
    // The lane's weight row `g` of tile `tile` (before the clamp to N - 1).
    let tile_row = |tile: usize| -> Expr {
        if tile == 0 {
            add(col0.clone(), index(gid.clone()))
        } else {
            add(
                col0.clone(),
                index(gid.clone() + i32c(i64::from(COLUMNS) * tile as i64)),
            )
        }
    };
    // Before the grid-dependency wait (address arithmetic and prefetches only, so the
    // previous kernel may still run): the eight lanes `t = 0` of warp 0 ask L2 for the
    // start of the block's `8 * tiles` weight rows (row `g` of each tile; all of K while the
    // weights fit the budget), which stream from HBM while the previous kernel finishes.
    if let Some(len) = plan.prefetch {
        let bytes = i32c((len * g.ty(plan.b[0].0).dtype.size_bytes() as u64) as i64);
        let rows = |e: &mut Emitter<'_, '_>, these: &[usize]| -> Vec<Stmt> {
            let mut prefetches = Vec::new();
            for tile in 0..tiles {
                let row = tile_row(tile);
                for &i in these {
                    let (weight, _, n) = plan.b[i];
                    // Rows past N (clamped to N - 1 by the loads) are not asked for again.
                    let fetch = Stmt::PrefetchL2 {
                        buf: e.buffer(weight, kiln_kir::Access::Read),
                        index: mul(row.clone(), e.ix(k)),
                        bytes: bytes.clone(),
                    };
                    prefetches.push(Stmt::if_then(lt(row.clone(), e.ix(n as i64)), vec![fetch]));
                }
            }
            let lanes = Stmt::if_then(tig.clone().equals(i32c(0)), prefetches);
            vec![Stmt::if_then(warp.clone().equals(i32c(0)), vec![lanes])]
        };
        let stmts = super::gemv::per_segment(e, segment.as_ref(), plan.b.len(), rows);
        body.extend(stmts);
    }
    // The lane's k in the chunks `base + (j * warps) * 32` (j in `0..chunks`).
    let chunk_offsets =
        |e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, base: Expr, chunks: i64| -> Vec<Expr> {
            let lane_k = add(
                index(warp.clone() * i32c(CHUNK as i64) + tig.clone() * i32c(VECTOR as i64)),
                base,
            );
            let lane_k = e.bind(out, "k0", ity, lane_k);
            (0..chunks)
                .map(|j| {
                    let at = add(lane_k.clone(), e.ix(j * i64::from(warps) * CHUNK as i64));
                    e.bind(out, "kj", ity, at)
                })
                .collect()
        };
    // The warp's weight rows and buffers for the matmuls `these` (all, or one segment's).
    let setup = |e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, these: &[usize]| -> Weights {
        let n = plan.b[these[0]].2 as i64;
        let w_rows = (0..tiles)
            .map(|tile| {
                let row = min_e(tile_row(tile), e.ix(n - 1));
                e.bind(out, "w_row", ity, mul(row, e.ix(k)))
            })
            .collect();
        let w_bufs = these
            .iter()
            .map(|&i| e.buffer(plan.b[i].0, kiln_kir::Access::Read))
            .collect();
        Weights {
            w_rows,
            w_bufs,
            first: None,
        }
    };
    let unroll = i64::from(plan.unroll);
    let step = i64::from(warps) * CHUNK as i64 * unroll;
    let full = k / step;
    // Before the wait, where K holds a whole step: the first step's weight vectors, into
    // one set of registers that every segment shares (so that the branches leave no more
    // registers live than one of them).
    let mut ready: Vec<Option<Weights>> = (0..plan.b.len()).map(|_| None).collect();
    let preload = plan.preload;
    if preload {
        let sets = if segmented { 1 } else { plan.b.len() as u32 };
        let pool_size = MAX_WEIGHT_REGISTERS.max(plan.unroll * 4 * sets * plan.tiles);
        let pool: Vec<VarId> = (0..pool_size).map(|_| e.var("p", Ty::I32)).collect();
        let load_first = |e: &mut Emitter<'_, '_>, these: &[usize]| -> Vec<Stmt> {
            let mut out = Vec::new();
            let mut weights = setup(e, &mut out, these);
            let offsets = chunk_offsets(e, &mut out, e.ix(0), unroll);
            let streams = weights.streams();
            let first = super::gemv::load_into_pool(
                &mut out,
                &pool,
                VECTOR as usize / 2,
                &offsets,
                &streams,
            );
            weights.first = Some(first);
            ready[these[0]] = Some(weights);
            out
        };
        let stmts = super::gemv::per_segment(e, segment.as_ref(), plan.b.len(), load_first);
        body.extend(stmts);
    }
    if plan.prefetch.is_some() || preload {
        body.push(Stmt::GridDependencyWait);
    }
    // What runs before here stays outside the branch on a symbolic M below.
    let prelude = body.len();
    let column = |e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, these: &[usize]| -> EResult<()> {
        let weights = match ready[these[0]].take() {
            Some(weights) => weights,
            None => setup(e, out, these),
        };
        let streams = weights.streams();
        let first = weights.first;
        let a_at: Vec<Expr> = a_rows
            .iter()
            .map(|r| {
                let at = mul(r.clone(), e.ix(k));
                e.bind(out, "a_row", ity, at)
            })
            .collect();
        // Per matmul and tile (matmul-major), the four accumulators of the lane.
        let acc: Vec<[VarId; 4]> = streams
            .iter()
            .map(|_| std::array::from_fn(|_| e.var("acc", Ty::F32)))
            .collect();
        for &a in acc.iter().flatten() {
            out.push(Stmt::Assign(a, Expr::f32(0.0)));
        }
        let zero_pack = e.var("zero", Ty::I32);
        out.push(Stmt::Assign(zero_pack, Expr::i32(0)));
        let input = plan.input;
        // Chunks `base + (j * warps) * 32` (j in `chunks`) of this warp and lane, each
        // lane's vector under `k < K` when `guarded`; with `loaded`, the weight vectors
        // already in those registers.
        let fold = |e: &mut Emitter<'_, '_>,
                    out: &mut Vec<Stmt>,
                    base: Expr,
                    chunks: i64,
                    guarded: bool,
                    loaded: Option<&Vec<Vec<Vec<VarId>>>>| {
            let offsets = chunk_offsets(e, out, base, chunks);
            // Each chunk's loads: a 16-byte vector as four raw 32-bit registers (element
            // pairs, already `Mma` operands), zero outside K when guarded.
            let load = |e: &mut Emitter<'_, '_>,
                        out: &mut Vec<Stmt>,
                        buf: kiln_kir::Buf,
                        at: Expr,
                        j: usize|
             -> Vec<VarId> {
                let dsts: Vec<VarId> = (0..VECTOR / 2).map(|_| e.var("p", Ty::I32)).collect();
                let stmt = Stmt::LoadVec {
                    dsts: dsts.clone(),
                    buf,
                    index: add(at, offsets[j].clone()),
                };
                if guarded {
                    for &d in &dsts {
                        out.push(Stmt::Assign(d, Expr::i32(0)));
                    }
                    let inside = lt(offsets[j].clone(), e.ix(k));
                    out.push(Stmt::if_then(inside, vec![stmt]));
                } else {
                    out.push(stmt);
                }
                dsts
            };
            // The weight vectors first, all in flight before any product.
            let weights: Vec<Vec<Vec<VarId>>> = match loaded {
                Some(loaded) => loaded.clone(),
                None => (0..chunks as usize)
                    .map(|j| {
                        streams
                            .iter()
                            .map(|(buf, row)| load(e, out, *buf, row.clone(), j))
                            .collect()
                    })
                    .collect(),
            };
            for (j, vectors) in weights.iter().enumerate() {
                // A rows g and g + 8 at this lane's 8 k, packed: registers 0, 1 are the
                // first product's `a0/a2` (row g) and `a1/a3` (row g + 8) pairs, 2, 3 the
                // second's.
                let mut packed_a = Vec::new();
                for at in &a_at {
                    packed_a.push(load(e, out, a_buf, at.clone(), j));
                }
                let hi = |i: usize| packed_a.get(1).map_or(zero_pack, |p| p[i]);
                let lo = |i: usize| packed_a[0][i];
                for (set, w) in vectors.iter().enumerate() {
                    for half in 0..2 {
                        let c = acc[set];
                        out.push(Stmt::Mma {
                            input,
                            d: c,
                            a: [
                                lo(2 * half),
                                hi(2 * half),
                                lo(2 * half + 1),
                                hi(2 * half + 1),
                            ],
                            b: [w[2 * half], w[2 * half + 1]],
                            c,
                        });
                    }
                }
            }
        };
        // Whole steps (the first from the registers loaded before the wait), then the
        // guarded rest.
        let mut start = 0;
        if let Some(first) = &first {
            fold(e, out, e.ix(0), unroll, false, Some(first));
            start = step;
        }
        if full * step > start {
            let s = e.var("kstep", ity);
            let mut inner = Vec::new();
            fold(e, &mut inner, Expr::var(s), unroll, false, None);
            out.push(Stmt::For {
                var: s,
                start: e.ix(start),
                end: e.ix(full * step),
                step: e.ix(step),
                body: inner,
            });
        }
        let rest = k - full * step;
        if rest > 0 {
            let per_round = i64::from(warps) * CHUNK as i64;
            let chunks = (rest + per_round - 1) / per_round;
            fold(e, out, e.ix(full * step), chunks, true, None);
        }
        // Every weight load is issued: the next kernel may launch.
        if plan.trigger {
            out.push(Stmt::LaunchDependents);
        }
        // Warps 1.. leave their sums, warp 0 adds them in warp order.
        let sums: Vec<VarId> = acc.iter().flatten().copied().collect();
        let count = sums.len() as i64;
        let first_warp = warp.clone().equals(i32c(0));
        let mut gather = Vec::new();
        if warps > 1 {
            let partials = e.shared_array(
                "partials",
                DType::F32,
                (i64::from(warps - 1) * 32 * count) as u32,
            );
            let own = e.bind(
                out,
                "partial",
                Ty::I32,
                (warp.clone() - i32c(1)) * i32c(32 * count) + lane.clone(),
            );
            // Sum i of every lane side by side (consecutive words, no bank conflicts).
            let leave = sums
                .iter()
                .enumerate()
                .map(|(i, &v)| Stmt::store(partials, own.clone() + i32c(32 * i as i64), v))
                .collect();
            out.push(Stmt::if_then(warp.clone().gt(i32c(0)), leave));
            out.push(Stmt::Barrier);
            for w in 1..i64::from(warps) {
                let at = i32c((w - 1) * 32 * count) + lane.clone();
                let at = e.bind(&mut gather, "partial", Ty::I32, at);
                for (i, &v) in sums.iter().enumerate() {
                    gather.push(Stmt::assign(
                        v,
                        Expr::var(v) + Expr::load(partials, at.clone() + i32c(32 * i as i64)),
                    ));
                }
            }
        }
        // The epilogue: accumulators 0, 1 are row g, columns 2t and 2t + 1 of the tile, 2, 3
        // row g + 8 (none past a constant M of at most 8).
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
        // Two columns a store where every stored width is even (2t + 1 < N when 2t < N).
        let paired = stored
            .iter()
            .all(|&o| matches!(g.shape(o).last(), Some(Dim::Const(n)) if n % 2 == 0));
        let halves = if !symbolic_rows && plan.rows <= 8 {
            1
        } else {
            2
        };
        for tile in 0..tiles {
            // This tile's accumulators, one set a matmul.
            let tile_acc: Vec<[VarId; 4]> = (0..these.len())
                .map(|set| acc[set * tiles + tile])
                .collect();
            let first_col = if tile == 0 {
                index(tig.clone() * i32c(2))
            } else {
                index(tig.clone() * i32c(2) + i32c(i64::from(COLUMNS) * tile as i64))
            };
            let col = e.bind(&mut gather, "col", ity, add(col0.clone(), first_col));
            for half in 0..halves {
                let row = e.bind(
                    &mut gather,
                    "row",
                    ity,
                    index(gid.clone() + i32c(8 * half as i64)),
                );
                let at = OutputElement {
                    batch: &[],
                    row: &row,
                    col: &col,
                    rows: &m_size,
                };
                if paired {
                    let accs: Vec<Vec<VarId>> = tile_acc
                        .iter()
                        .map(|a| a[2 * half..2 * half + 2].to_vec())
                        .collect();
                    epilogue_lanes(e, &mut gather, &these_values, &accs, &at, None, &stored)?;
                } else {
                    for j in 0..2 {
                        let col_j = e.bind(&mut gather, "col", ity, add(col.clone(), e.ix(j)));
                        let at = OutputElement { col: &col_j, ..at };
                        let accs: Vec<Vec<VarId>> = tile_acc
                            .iter()
                            .map(|a| vec![a[2 * half + j as usize]])
                            .collect();
                        epilogue_lanes(e, &mut gather, &these_values, &accs, &at, None, &stored)?;
                    }
                }
            }
        }
        out.push(Stmt::if_then(first_warp, gather));
        Ok(())
    };
    super::gemv::emit_columns(e, &mut body, segment.as_ref(), &plan.b, &matmuls, column)?;
    if symbolic_rows {
        // Row M - 1 would be outside A.
        super::gemv::guard_rows(e, &mut body, prelude, m_size);
    }
    let what = kernel_name(&plan.name(), &matmuls, stores);
    let blocks = if segmented {
        plan.segments.iter().map(|s| s.blocks).sum()
    } else {
        plan.b[0].2.div_ceil(u64::from(plan.block_columns()))
    };
    Ok(Body {
        what,
        block_dim: 32 * warps,
        grid: [SizeExpr::Const(blocks), super::one(), super::one()],
        stmts: body,
    })
}
