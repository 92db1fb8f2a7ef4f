//! The paged attention template (split over the sequence, as in flash-decoding): the keys
//! of each token are cut into partitions of `part` positions; one block of `warps` warps per
//! (partition, key/value head, token) runs an online softmax over its partition for all the
//! query heads that share the key/value head (GQA: each key and value row is read once for
//! them), a warp per key with the lanes splitting the head dim (vector loads of D / 32
//! elements, dot products summed across the warp by shuffles), `unroll` keys a step with
//! their loads issued together. The block's warps are merged through shared memory
//! into one partial result per query head (running max, sum and weighted values) in an f32
//! workspace; a second kernel merges the partitions of each (token, head) in order and
//! stores the output. With `PagedTuning::fused_merge` (off by default: no faster on the H100)
//! there is no second kernel: the block that finishes last among a (token, key/value
//! head)'s partitions, found with an atomic counter, merges them the same way
//! ([`last_block_merge`]). Keys are read through
//! the block table; a token with a negative sequence (padding) gets zeros.
//!
//! With `PagedTuning::preload` the register design's partial kernel loads its first key
//! step (the sequence, position, block-table entries and this lane's key and value
//! columns) before its grid-dependency wait, so that with programmatic dependent launch
//! the cache's latency overlaps the q/k/v kernel before it; the query rows come after the
//! wait, and the rows of the step's own tokens (positions `j > p - T`, which that kernel
//! may still be writing) are loaded again ([`preloaded_step`]; `kiln_kir::Access::Settled`).
//!
//! Short block tables (the variant of at most `PagedTuning::short_context` positions) take
//! one pass instead (`PagedTuning::one_pass`, [`PagedShape::one_pass`]): one block per
//! (key/value head, token) over the whole table in the register design, the table's row
//! copied into shared memory first (each key step's block is then a shared load, not a
//! global one before the key loads), the block's warps merged through shared memory as
//! above and the output stored as the merge kernel stores it: no workspace, no merge
//! kernel and its launch.
//!
//! Designs of the first kernel (`PagedTuning::tile`): the register design above, and the
//! staged designs of the long-context kernel: the partition's keys in tiles of `tile` keys
//! whose key and value rows the block copies into shared memory with 16-byte `cp.async`
//! chunks, `stages - 1` tiles ahead of the tile it computes (one barrier a tile; the bytes
//! in flight cost no registers and overlap the math; keys past the end are zero-fill copies
//! that read neither the block table nor the cache). In the CUDA-core staged design the
//! warps score their keys of a tile from shared memory in lane groups of `lanes` lanes,
//! each group a key (D / lanes elements a lane: 8 bf16, one 16-byte shared load, at 16
//! lanes and D 128), so a score takes log2(lanes) shuffles; the warp keeps one running max
//! (a shuffle max across the groups a step), each group its own sums, added across the warp
//! after the loop. The tensor-core staged design (`PagedTuning::mma_warps`, the default of
//! the long-context kernel where it applies: bf16/f16, head dims 64 and 128, groups of at
//! most 16) holds the group's query heads as the rows of one m16 tile of A fragments and
//! gives each warp whole 16-key slabs of a tile, copied into swizzled shared memory: `S = Q
//! Kᵀ` by `mma.sync`, the online softmax on the accumulator fragments, `P V` by `mma.sync`
//! (`mma_softmax.rs`, shared with the flash template), the warps merged as above. The
//! short-context variant keeps the register design.

use super::mma_gemm::{and_mask, i32c, shr};
use super::mma_softmax::{
    kv_addresses, online_softmax, pack_probabilities, quad_sum, scores, weigh_values, Rows,
};
use super::{mul_size, size_of_dims, Body, Workspace};
use crate::emit::{EResult, Emitter};
use crate::PagedTuning;
use kiln_ir::{DType, Dim, Op, Value};
use kiln_kir::{Access, BinOp, Buf, Expr, MmaInput, SizeExpr, Special, Stmt, Ty, UnOp, VarId};

/// The shape the template handles: the head dim a multiple of 32 of at most 256, constant
/// head counts.
pub(crate) struct PagedShape {
    /// Head dim.
    d: usize,
    /// Query heads per key/value head.
    group: usize,
    kv_heads: usize,
    layer: usize,
    scale: f32,
    /// Key positions of one partition (one block of the first kernel).
    part: u64,
    /// Keys one warp takes per loop step.
    unroll: usize,
    warps: u32,
    /// Keys of one shared-memory tile of the staged design (0: the register design).
    tile: usize,
    /// Tiles in flight of the staged design.
    stages: usize,
    /// The staged kernel's `Kernel::blocks_per_sm`.
    blocks_per_sm: u32,
    /// Lanes that split one key's head dim (32: a warp per key; fewer: 32 / lanes keys of
    /// a warp at once, the scores summed over fewer shuffles; staged design only).
    lanes: usize,
    /// The tensor-core staged design's operand type (`None`: the CUDA-core designs).
    mma: Option<MmaInput>,
    /// The one-pass kernel's block-table entries held in shared memory (0: the partial
    /// and merge kernels). See [`PagedShape::one_pass`].
    table: usize,
    /// Whether the partial kernel's last block of a (token, key/value head) merges the
    /// partitions ([`last_block_merge`]; `PagedTuning::fused_merge`): no merge kernel.
    fused_merge: bool,
    /// Whether the register design loads its first key step before the grid-dependency
    /// wait (`PagedTuning::preload`; the sequences, positions and block tables are step
    /// inputs).
    preload: bool,
}

impl PagedShape {
    pub(crate) fn of(e: &Emitter<'_, '_>, out: Value, tuning: &PagedTuning) -> Option<PagedShape> {
        let inst = e.g.inst(out)?;
        let Op::PagedAttention { layer, scale } = inst.op else {
            return None;
        };
        let (q, k) = (e.g.shape(inst.operands[0]), e.g.shape(inst.operands[1]));
        let d = q[2].as_const()? as usize;
        let (h, kv) = (q[1].as_const()? as usize, k[3].as_const()? as usize);
        if !(d.is_multiple_of(32) && d <= 256 && kv > 0 && h % kv == 0) {
            return None;
        }
        let mut shape = PagedShape {
            d,
            group: h / kv,
            kv_heads: kv,
            layer,
            scale: scale as f32,
            part: tuning.part.max(1),
            unroll: tuning.unroll.max(1),
            warps: tuning.warps.clamp(1, 32),
            tile: 0,
            stages: 0,
            blocks_per_sm: tuning.blocks_per_sm.max(1),
            lanes: 32,
            mma: None,
            table: 0,
            fused_merge: tuning.fused_merge,
            preload: tuning.preload
                && [3, 4, 5]
                    .iter()
                    .all(|&i| e.g.is_step_input(inst.operands[i])),
        };
        let (kt, vt) = (
            e.g.ty(inst.operands[1]).dtype,
            e.g.ty(inst.operands[2]).dtype,
        );
        if let Some(input) = mma_input(e, out, &shape, tuning) {
            // Whole 16-key slabs a warp; as many stages as fit beside the block merge.
            let warps = tuning.mma_warps.clamp(1, 16).next_power_of_two();
            let tile = (tuning.tile as usize).next_multiple_of(16 * warps as usize);
            let merge = warps as usize * (2 + d) * shape.group * 4;
            let stage = 2 * tile * d * kt.size_bytes();
            let budget = (kiln_kir::verify::MAX_SHARED_BYTES as usize).saturating_sub(merge);
            let stages = (tuning.stages as usize).min(budget / stage);
            if stages >= 2 {
                shape.warps = warps;
                shape.tile = tile;
                shape.stages = stages;
                shape.mma = Some(input);
                shape.part = shape.part.next_multiple_of(tile as u64);
                return Some(shape);
            }
        }
        // Where the tensor-core design was asked for but does not apply, the register
        // design runs (the CUDA-core staged one measured slower on the H100).
        let staged = tuning.mma_warps == 0
            && tuning.tile > 0
            && tuning.stages >= 2
            && kt == vt
            && 16 % kt.size_bytes() == 0
            && e.g.shape(inst.operands[2]) == k;
        if staged {
            // Lanes a key: a power of two up to 32 (dividing the head dim, a multiple of
            // 32) with at most 16 elements a lane.
            let lanes = (tuning.lanes as usize).clamp(1, 32).next_power_of_two();
            let lanes = lanes.max((d / 16).next_power_of_two()).min(32);
            // Whole tiles: a warp takes tile / warps keys of each, 32 / lanes at once,
            // partitions are whole tiles; as many stages as fit the shared memory beside
            // the block merge.
            let per_step = shape.warps as usize * (32 / lanes);
            let tile = (tuning.tile as usize).next_multiple_of(per_step);
            let merge = shape.warps as usize * (2 + d) * shape.group * 4;
            let stage = 2 * tile * d * kt.size_bytes();
            let budget = (kiln_kir::verify::MAX_SHARED_BYTES as usize).saturating_sub(merge);
            let stages = (tuning.stages as usize).min(budget / stage);
            if stages >= 2 {
                shape.tile = tile;
                shape.stages = stages;
                shape.lanes = lanes;
                shape.part = shape.part.next_multiple_of(tile as u64);
            }
        }
        Some(shape)
    }

    /// Whether the kernel stages key/value tiles in shared memory.
    pub(crate) fn staged(&self) -> bool {
        self.tile > 0
    }

    /// Makes this the one-pass kernel of block tables of at most `entries` entries
    /// (`part` covers them all: one partition): one block of `warps` warps per (token,
    /// key/value head), the table row in shared memory, the warps merged in shared memory
    /// and the output stored, no workspace and no merge kernel. The register design only;
    /// fewer warps where the block merge would not fit the shared memory. Whether it
    /// applies.
    pub(crate) fn one_pass(&mut self, warps: u32, entries: u64) -> bool {
        let entries = entries as usize;
        if self.staged() || warps == 0 || entries == 0 {
            return false;
        }
        let row = (2 + self.d) * self.group * 4;
        // Beside the table (entries of at most 8 bytes).
        let budget = (kiln_kir::verify::MAX_SHARED_BYTES as usize).saturating_sub(8 * entries);
        let warps = warps.clamp(1, 32).min((budget / row) as u32);
        if warps == 0 {
            return false;
        }
        self.warps = warps;
        self.table = entries;
        true
    }

    /// Whether this is the one-pass kernel ([`PagedShape::one_pass`]).
    pub(crate) fn whole(&self) -> bool {
        self.table > 0
    }

    /// Whether the kernel loads its first key step before its grid-dependency wait: the
    /// register design's partial kernel (not the one-pass one) with `preload`.
    pub(crate) fn preloads(&self) -> bool {
        self.preload && !self.staged() && self.mma.is_none() && !self.whole()
    }

    /// Whether the partial kernel merges the partitions itself (no merge kernel).
    pub(crate) fn merges(&self) -> bool {
        self.fused_merge && !self.whole()
    }

    fn threads(&self) -> u32 {
        self.warps * 32
    }

    /// Elements of a row each lane holds.
    fn per_lane(&self) -> usize {
        self.d / self.lanes
    }

    /// Keys a warp scores at once (lane groups).
    fn slots(&self) -> usize {
        32 / self.lanes
    }

    /// The shuffle masks across the lane groups (none for a warp per key).
    fn slot_masks(&self) -> Vec<u32> {
        (0..5)
            .map(|b| 1u32 << b)
            .filter(|&m| m as usize >= self.lanes)
            .collect()
    }
}

/// The operand type of the tensor-core staged design, when `tuning` asks for it and it
/// applies: q, k and v of one 16-bit float type, head dim 64 or 128, at most 16 query heads
/// a key/value head, a positive scale, equal cache shapes.
fn mma_input(
    e: &Emitter<'_, '_>,
    out: Value,
    shape: &PagedShape,
    tuning: &PagedTuning,
) -> Option<MmaInput> {
    let inst = e.g.inst(out)?;
    let [q, k, v] = [0, 1, 2].map(|i| inst.operands[i]);
    let dtype = e.g.ty(k).dtype;
    let input = match dtype {
        DType::BF16 => MmaInput::Bf16,
        DType::F16 => MmaInput::F16,
        _ => return None,
    };
    let ok = tuning.mma_warps > 0
        && tuning.tile > 0
        && tuning.stages >= 2
        && e.g.ty(q).dtype == dtype
        && e.g.ty(v).dtype == dtype
        && e.g.shape(k) == e.g.shape(v)
        && matches!(shape.d, 64 | 128)
        && shape.group <= 16
        && shape.scale.is_finite()
        && shape.scale > 0.0;
    ok.then_some(input)
}

/// The partition count: ceil(MB · BS / part), the most positions a block-table row holds.
fn partitions(e: &Emitter<'_, '_>, out: Value, part: u64) -> SizeExpr {
    let inst = e.g.inst(out).expect("paged_attention");
    let (tables, cache) = (e.g.shape(inst.operands[3]), e.g.shape(inst.operands[1]));
    let positions = mul_size(size_of_dims(&tables[1..2]), size_of_dims(&cache[2..3]));
    match positions {
        SizeExpr::Const(n) => SizeExpr::Const(n.div_ceil(part)),
        p => SizeExpr::CeilDiv(Box::new(p), Box::new(SizeExpr::Const(part))),
    }
}

/// [`partitions`] as a run-time value of the index type.
fn partitions_expr(e: &mut Emitter<'_, '_>, out: Value, part: u64) -> Expr {
    let inst = e.g.inst(out).expect("paged_attention");
    let (tables, cache) = (e.g.shape(inst.operands[3]), e.g.shape(inst.operands[1]));
    let positions = e.dim(&tables[1]) * e.dim(&cache[2]);
    (positions + e.ix(part as i64 - 1)) / e.ix(part as i64)
}

/// The workspace: per (token, query head, partition) the D weighted value sums, then the
/// running max and the sum of the weights.
pub(crate) fn workspace(e: &Emitter<'_, '_>, out: Value, shape: &PagedShape) -> Workspace {
    let q =
        e.g.shape(e.g.inst(out).expect("paged_attention").operands[0]);
    Workspace {
        dtype: DType::F32,
        shape: vec![
            size_of_dims(&q[0..1]),
            size_of_dims(&q[1..2]),
            partitions(e, out, shape.part),
            SizeExpr::Const(shape.d as u64 + 2),
        ],
    }
}

/// `x` as a 32-bit integer (a shared-memory offset).
fn i32_of(x: Expr) -> Expr {
    Expr::Cast(Ty::I32, Box::new(x))
}

/// `x` converted to the index type.
fn index(e: &Emitter<'_, '_>, x: Expr) -> Expr {
    Expr::Cast(e.index_ty, Box::new(x))
}

fn f(x: f32) -> Expr {
    Expr::f32(x)
}

/// What both designs of the first kernel share: the block's coordinates, its key range,
/// the group's query rows (this lane's columns) and the per-warp softmax state.
struct Partial {
    part: Expr,
    kvh: Expr,
    token: Expr,
    lane: Expr,
    warp: Expr,
    col: Expr,
    /// This lane's key of the warp's `slots` keys at once.
    slot: Expr,
    /// The token's sequence (negative: padding).
    seq: Expr,
    /// The token's keys: its position + 1 (0 for padding).
    context: Expr,
    start: Expr,
    end: Expr,
    block_size: Expr,
    /// The one-pass kernel's block-table row in shared memory.
    table: Option<Buf>,
    /// The loads of `qv` when the caller places them (after the grid-dependency wait of a
    /// preloading kernel); empty when the prologue emitted them.
    query_loads: Vec<Stmt>,
    qv: Vec<Vec<Expr>>,
    m: Vec<VarId>,
    l: Vec<VarId>,
    acc: Vec<Vec<VarId>>,
}

/// The first kernel's prologue: coordinates, key range, and for the CUDA-core designs
/// (`registers`) the query rows and zeroed state. A preloading kernel's query loads are
/// left in [`Partial::query_loads`] for after its grid-dependency wait.
fn prologue(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    registers: bool,
) -> EResult<Partial> {
    let mut query_loads = Vec::new();
    let g = e.g;
    let inst = g.inst(out).expect("paged_attention");
    let [q, k_cache, seq, pos] = [0, 1, 4, 5].map(|i| inst.operands[i]);
    let ity = e.index_ty;
    let (group, per_lane) = (shape.group, shape.per_lane());
    let part = e.special(Special::BlockIdx(0));
    let part = e.bind(body, "part", ity, part);
    let kvh = e.special(Special::BlockIdx(1));
    let kvh = e.bind(body, "kv_head", ity, kvh);
    let token = e.special(Special::BlockIdx(2));
    let token = e.bind(body, "token", ity, token);
    let lane = e.special(Special::LaneId);
    let lane = e.bind(body, "lane", ity, lane);
    let warp = e.special(Special::WarpId);
    let warp = e.bind(body, "warp", ity, warp);
    // A warp per key: every lane in slot 0; else lane group `slot` of `lanes` lanes.
    let (in_key, slot) = if shape.lanes == 32 {
        (lane.clone(), e.ix(0))
    } else {
        let slot = lane.clone() / e.ix(shape.lanes as i64);
        (
            lane.clone() % e.ix(shape.lanes as i64),
            e.bind(body, "slot", ity, slot),
        )
    };
    let col = if registers {
        e.bind(body, "col", ity, in_key * e.ix(per_lane as i64))
    } else {
        e.ix(0)
    };
    // The token's sequence and key count, and this partition's key range.
    let s = e
        .elem(body, seq, std::slice::from_ref(&token), 1)?
        .remove(0);
    let s = e.bind(body, "seq", ity, index(e, s));
    let p = e
        .elem(body, pos, std::slice::from_ref(&token), 1)?
        .remove(0);
    let context = Expr::select(s.clone().lt(e.ix(0)), e.ix(0), index(e, p) + e.ix(1));
    let context = e.bind(body, "context", ity, context);
    let start = e.bind(body, "start", ity, part.clone() * e.ix(shape.part as i64));
    let end = e.bind(
        body,
        "end",
        ity,
        context.clone().min(start.clone() + e.ix(shape.part as i64)),
    );
    let block_size = e.dim(&g.shape(k_cache)[2]);
    // The query rows of the group, this lane's columns, in registers (the tensor-core
    // design keeps them in fragments and its softmax state itself: none here).
    let held = if registers { group } else { 0 };
    let mut qv: Vec<Vec<Expr>> = Vec::with_capacity(held);
    for gi in 0..held {
        let head = kvh.clone() * e.ix(group as i64) + e.ix(gi as i64);
        let head = e.bind(&mut query_loads, "head", ity, head);
        e.push_scope();
        let vals = e.elem(
            &mut query_loads,
            q,
            &[token.clone(), head, col.clone()],
            per_lane,
        )?;
        e.pop_scope();
        let regs = vals
            .into_iter()
            .map(|v| e.bind(&mut query_loads, "q", Ty::F32, v))
            .collect();
        qv.push(regs);
    }
    if !shape.preloads() {
        body.append(&mut query_loads);
    }
    // The one-pass kernel's table row, its loads in flight with the query rows'.
    let table = if shape.whole() {
        Some(table_row(e, body, out, shape, &s)?)
    } else {
        None
    };
    // Running max, weight sum and weighted values per query head (per warp).
    let m: Vec<VarId> = (0..held).map(|_| e.var("m", Ty::F32)).collect();
    let l: Vec<VarId> = (0..held).map(|_| e.var("l", Ty::F32)).collect();
    let acc: Vec<Vec<VarId>> = (0..held)
        .map(|_| (0..per_lane).map(|_| e.var("acc", Ty::F32)).collect())
        .collect();
    for gi in 0..held {
        body.push(Stmt::Assign(m[gi], f(f32::NEG_INFINITY)));
        body.push(Stmt::Assign(l[gi], f(0.0)));
        for a in &acc[gi] {
            body.push(Stmt::Assign(*a, f(0.0)));
        }
    }
    Ok(Partial {
        part,
        kvh,
        token,
        lane,
        warp,
        col,
        slot,
        seq: s,
        context,
        start,
        end,
        block_size,
        table,
        query_loads,
        qv,
        m,
        l,
        acc,
    })
}

/// The one-pass kernel's copy of the token's block-table row in shared memory (entries
/// past the row's width, and all of a padding token's, are never written nor read), then
/// a barrier: each key step then reads its cache block from shared memory, one global
/// load fewer in the chain of each step.
fn table_row(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    seq: &Expr,
) -> EResult<Buf> {
    let g = e.g;
    let tables = g.inst(out).expect("paged_attention").operands[3];
    let ity = e.index_ty;
    let entries = shape.table;
    let held = e.shared_array("table", g.ty(tables).dtype, entries as u32);
    let width = e.dim(&g.shape(tables)[1]);
    let width = e.bind(body, "table_width", ity, width.min(e.ix(entries as i64)));
    let tid = e.special(Special::ThreadIdx);
    let threads = shape.threads() as usize;
    for first in (0..entries).step_by(threads) {
        let i = e.bind(body, "entry", ity, tid.clone() + e.ix(first as i64));
        let mut read = Vec::new();
        e.push_scope();
        let at = [seq.clone(), i.clone()];
        let block = e.elem(&mut read, tables, &at, 1)?.remove(0);
        e.pop_scope();
        read.push(Stmt::store(held, i32_of(i.clone()), block));
        let ok = Expr::binary(BinOp::And, i.lt(width.clone()), seq.clone().ge(e.ix(0)));
        body.push(Stmt::if_then(ok, read));
    }
    // The block's only communication besides the warp merge: `bar.sync` makes the shared
    // stores above visible to every thread of the block after it (a CTA barrier orders
    // the memory accesses of the threads that reach it). No other block reads what this
    // one writes, so no fence or atomic is needed.
    body.push(Stmt::Barrier);
    Ok(held)
}

/// The cache block of key position `j` of the token's sequence: from the block table, or
/// from the one-pass kernel's copy of its row.
fn cache_block(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    tables: Value,
    st: &Partial,
    j: Expr,
) -> EResult<Expr> {
    let entry = j / st.block_size.clone();
    let block = match st.table {
        Some(held) => Expr::load(held, i32_of(entry)),
        None => e.elem(out, tables, &[st.seq.clone(), entry], 1)?.remove(0),
    };
    Ok(index(e, block))
}

/// One online-softmax step of a warp over its keys (`valid`: the key is in range; this
/// lane's columns of each key and value row): per query head, the scores summed across
/// the warp by shuffles, the new max, the rescaled sums and weighted values.
fn online_step(
    e: &mut Emitter<'_, '_>,
    step: &mut Vec<Stmt>,
    shape: &PagedShape,
    st: &Partial,
    valid: &[Expr],
    keys: &[Vec<Expr>],
    values: &[Vec<Expr>],
) {
    let (m, l, acc, qv) = (&st.m, &st.l, &st.acc, &st.qv);
    for gi in 0..shape.group {
        // Scores of the keys: lane partial dot products summed across the warp.
        let mut scores = Vec::with_capacity(keys.len());
        for (u, key) in keys.iter().enumerate() {
            let dot = e.var("dot", Ty::F32);
            let mut sum = qv[gi][0].clone() * key[0].clone();
            for c in 1..shape.per_lane() {
                sum = Expr::fma(qv[gi][c].clone(), key[c].clone(), sum);
            }
            step.push(Stmt::Assign(dot, sum));
            let other = e.var("other", Ty::F32);
            for mask in [16u32, 8, 4, 2, 1]
                .into_iter()
                .filter(|&m| (m as usize) < shape.lanes)
            {
                step.push(Stmt::ShuffleXor {
                    dst: other,
                    src: dot,
                    mask,
                });
                step.push(Stmt::Assign(dot, Expr::var(dot) + Expr::var(other)));
            }
            let score = Expr::select(
                valid[u].clone(),
                Expr::var(dot) * f(shape.scale),
                f(f32::NEG_INFINITY),
            );
            scores.push(e.bind(step, "score", Ty::F32, score));
        }
        let mut most = Expr::var(m[gi]);
        for sc in &scores {
            most = most.max(sc.clone());
        }
        let m_new = e.var("m_new", Ty::F32);
        step.push(Stmt::Assign(m_new, most));
        // Lane groups score different keys: one max across the warp.
        for mask in shape.slot_masks() {
            let other = e.var("other", Ty::F32);
            step.push(Stmt::ShuffleXor {
                dst: other,
                src: m_new,
                mask,
            });
            step.push(Stmt::Assign(m_new, Expr::var(m_new).max(Expr::var(other))));
        }
        let m_new = Expr::var(m_new);
        // While every key so far is masked the max is -inf: keep the sums at 0.
        let live = e.bind(
            step,
            "live",
            Ty::Pred,
            m_new.clone().gt(f(f32::NEG_INFINITY)),
        );
        let alpha = Expr::select(
            live.clone(),
            (Expr::var(m[gi]) - m_new.clone()).apply(UnOp::Exp),
            f(1.0),
        );
        let alpha = e.bind(step, "alpha", Ty::F32, alpha);
        let weights: Vec<Expr> = scores
            .iter()
            .map(|sc| {
                let w = Expr::select(
                    live.clone(),
                    (sc.clone() - m_new.clone()).apply(UnOp::Exp),
                    f(0.0),
                );
                e.bind(step, "w", Ty::F32, w)
            })
            .collect();
        let mut total = Expr::var(l[gi]) * alpha.clone();
        for w in &weights {
            total = total + w.clone();
        }
        step.push(Stmt::Assign(l[gi], total));
        for c in 0..shape.per_lane() {
            let mut a = Expr::var(acc[gi][c]) * alpha.clone();
            for (u, w) in weights.iter().enumerate() {
                a = Expr::fma(w.clone(), values[u][c].clone(), a);
            }
            step.push(Stmt::Assign(acc[gi][c], a));
        }
        step.push(Stmt::Assign(m[gi], m_new));
    }
}

/// One key step's loads of a warp in the register design: its `unroll` keys from `j0 +
/// warp · unroll`, each key's validity, and this lane's columns of its key and value rows.
struct KeyStep {
    valid: Vec<Expr>,
    /// The keys' positions.
    keys_at: Vec<Expr>,
    /// The cache coordinates of each key's rows.
    rows: Vec<[Expr; 5]>,
    keys: Vec<Vec<Expr>>,
    values: Vec<Vec<Expr>>,
}

/// The loads of the key step at `j0` into `step` (see [`KeyStep`]).
fn key_step(
    e: &mut Emitter<'_, '_>,
    step: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    st: &Partial,
    j0: Expr,
) -> EResult<KeyStep> {
    let g = e.g;
    let inst = g.inst(out).expect("paged_attention");
    let [k_cache, v_cache, tables] = [1, 2, 3].map(|i| inst.operands[i]);
    let ity = e.index_ty;
    let (per_lane, unroll) = (shape.per_lane(), shape.unroll);
    let (start, end, warp) = (st.start.clone(), st.end.clone(), st.warp.clone());
    let block_size = st.block_size.clone();
    let mut loaded = KeyStep {
        valid: Vec::with_capacity(unroll),
        keys_at: Vec::with_capacity(unroll),
        rows: Vec::with_capacity(unroll),
        keys: Vec::with_capacity(unroll),
        values: Vec::with_capacity(unroll),
    };
    // With a constant block size that `unroll` divides (and partitions that start at
    // multiples of it), a warp's keys of a step lie in one cache block: one block-table
    // read per warp and step, no division per key. A warp whose first key is past the end
    // reads the partition's first block instead (valid memory, weight 0).
    let warp_block = match g.shape(k_cache)[2] {
        Dim::Const(bs)
            if bs.is_multiple_of(unroll as u64) && shape.part.is_multiple_of(unroll as u64) =>
        {
            let first = j0.clone() + warp.clone() * e.ix(unroll as i64);
            let first = Expr::select(first.clone().lt(end.clone()), first, start.clone());
            let first = e.bind(step, "first", ity, first);
            let block = cache_block(e, step, tables, st, first.clone())?;
            let block = e.bind(step, "block", ity, block);
            let slot = first % block_size.clone();
            Some((block, e.bind(step, "slot", ity, slot)))
        }
        _ => None,
    };
    for u in 0..unroll {
        let j = j0.clone() + warp.clone() * e.ix(unroll as i64) + e.ix(u as i64);
        let j = e.bind(step, "j", ity, j);
        let ok = e.bind(step, "key_ok", Ty::Pred, j.clone().lt(end.clone()));
        loaded.valid.push(ok.clone());
        loaded.keys_at.push(j.clone());
        let (block, slot) = match &warp_block {
            // Keys past the end stay inside the warp's block (weight 0).
            Some((block, first)) => (block.clone(), first.clone() + e.ix(u as i64)),
            None => {
                // Out-of-range keys read the partition's first key (valid memory, weight 0).
                let jc = Expr::select(ok, j, start.clone());
                let jc = e.bind(step, "key", ity, jc);
                let block = cache_block(e, step, tables, st, jc.clone())?;
                let block = e.bind(step, "block", ity, block);
                (block, jc % block_size.clone())
            }
        };
        let row = [
            e.ix(shape.layer as i64),
            block,
            slot,
            st.kvh.clone(),
            st.col.clone(),
        ];
        let kx = e.elem(step, k_cache, &row, per_lane)?;
        let vx = e.elem(step, v_cache, &row, per_lane)?;
        loaded.keys.push(
            kx.into_iter()
                .map(|x| e.bind(step, "k", Ty::F32, x))
                .collect(),
        );
        loaded.values.push(
            vx.into_iter()
                .map(|x| e.bind(step, "v", Ty::F32, x))
                .collect(),
        );
        loaded.rows.push(row);
    }
    Ok(loaded)
}

/// A preloading kernel's first key step (`PagedShape::preloads`): its loads before the
/// grid-dependency wait, then the query rows, then, for keys of the step's own tokens
/// (positions `j ≥ context − T` of a step of `T` tokens: the q/k/v kernel before this one
/// may still be writing their rows when the early loads run), the rows loaded again,
/// then the online step. A block whose partition holds no key (past the token's end, a
/// padding token) does none of it.
fn preloaded_step(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    st: &mut Partial,
) -> EResult<()> {
    let g = e.g;
    let inst = g.inst(out).expect("paged_attention");
    let [q, k_cache, v_cache] = [0, 1, 2].map(|i| inst.operands[i]);
    let ity = e.index_ty;
    let any = e.bind(
        body,
        "any_key",
        Ty::Pred,
        st.start.clone().lt(st.end.clone()),
    );
    let mut early = Vec::new();
    e.push_scope();
    let loaded = key_step(e, &mut early, out, shape, st, st.start.clone())?;
    e.pop_scope();
    body.push(Stmt::if_then(any.clone(), early));
    body.push(Stmt::GridDependencyWait);
    body.append(&mut st.query_loads);
    let mut late = Vec::new();
    let tokens = e.dim(&g.shape(q)[0]);
    let fresh = e.bind(&mut late, "fresh", ity, st.context.clone() - tokens);
    for u in 0..shape.unroll {
        let again = Expr::binary(
            BinOp::And,
            loaded.valid[u].clone(),
            loaded.keys_at[u].clone().ge(fresh.clone()),
        );
        let mut reload = Vec::new();
        e.push_scope();
        let kx = e.elem(&mut reload, k_cache, &loaded.rows[u], shape.per_lane())?;
        let vx = e.elem(&mut reload, v_cache, &loaded.rows[u], shape.per_lane())?;
        e.pop_scope();
        for (held, x) in loaded.keys[u]
            .iter()
            .zip(kx)
            .chain(loaded.values[u].iter().zip(vx))
        {
            let Expr::Var(reg) = held else {
                unreachable!("a loaded key or value is bound to a register")
            };
            reload.push(Stmt::Assign(*reg, x));
        }
        late.push(Stmt::if_then(again, reload));
    }
    online_step(
        e,
        &mut late,
        shape,
        st,
        &loaded.valid,
        &loaded.keys,
        &loaded.values,
    );
    body.push(Stmt::if_then(any, late));
    Ok(())
}

/// The first kernel: one partition of one token for the query heads of one key/value head.
pub(crate) fn emit_partial(
    e: &mut Emitter<'_, '_>,
    out: Value,
    shape: &PagedShape,
) -> EResult<Body> {
    let g = e.g;
    let inst = g.inst(out).expect("paged_attention");
    let ity = e.index_ty;
    let mut body = Vec::new();
    if let Some(input) = shape.mma {
        return mma_partial(e, out, shape, input);
    }
    if shape.preloads() {
        // What the early loads read: step inputs, and the caches' rows of earlier steps.
        for i in 1..6 {
            e.buffer(inst.operands[i], Access::Settled);
        }
    }
    let mut st = prologue(e, &mut body, out, shape, true)?;
    if shape.staged() {
        e.blocks_per_sm = shape.blocks_per_sm;
        staged_loop(e, &mut body, out, shape, &st)?;
        return epilogue(e, body, out, shape, &st);
    }
    // The loop over key steps: block-uniform bounds; warp w takes keys
    // j0 + w·unroll .. + unroll of each step.
    let stride = e.ix(i64::from(shape.warps) * shape.unroll as i64);
    let first = if shape.preloads() {
        preloaded_step(e, &mut body, out, shape, &mut st)?;
        st.start.clone() + stride.clone()
    } else {
        st.start.clone()
    };
    let j0 = e.var("j0", ity);
    let mut step = Vec::new();
    e.push_scope();
    let loaded = key_step(e, &mut step, out, shape, &st, Expr::var(j0))?;
    e.pop_scope();
    online_step(
        e,
        &mut step,
        shape,
        &st,
        &loaded.valid,
        &loaded.keys,
        &loaded.values,
    );
    body.push(Stmt::For {
        var: j0,
        start: first,
        end: st.end.clone(),
        step: stride,
        body: step,
    });
    epilogue(e, body, out, shape, &st)
}

/// One 16-byte chunk a thread copies of each tile (key and value rows alike).
struct Copy {
    /// The chunk's row of the tile and first column.
    row: Expr,
    col: Expr,
    /// Its offset in a stage of the shared tiles.
    dst: Expr,
    /// When a tile lies in whole cache blocks (or in one): which of them holds the chunk
    /// and its offset in the cache from that block's first row of the tile.
    src: Option<(usize, Expr)>,
    /// Whether some threads have no chunk here (the tile has fewer chunks left).
    partial: bool,
}

/// The copy plan of swizzled tiles (rows of 8 chunks or more): thread t copies chunks of
/// the tile rows ≡ t (mod 8) only. Chunk c of row 8j + x lies at chunk position c ^ x, so
/// each chunk column of a thread has one base offset in shared memory (and in the cache,
/// where a tile lies in `tile_blocks` whole blocks, or one), its rows of the other eights
/// at constant offsets from it: few registers live across the loop and no address
/// arithmetic a tile.
fn swizzled_plan(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    shape: &PagedShape,
    tid: &Expr,
    cache_dims: &[Dim],
    tile_blocks: usize,
) -> Vec<Copy> {
    let ity = e.index_ty;
    let (d, tile, threads) = (shape.d, shape.tile, shape.threads() as usize);
    let chunk = 8;
    let row_chunks = d / chunk;
    // (row mod 8, chunk) pairs; with more threads than pairs, threads also split the
    // eights of rows.
    let pairs = 8 * row_chunks;
    let (columns, stride) = if threads <= pairs {
        (pairs / threads, 1)
    } else {
        (1, threads / pairs)
    };
    let x = e.bind(body, "copy_x", ity, tid.clone() % e.ix(8));
    let row0 = if stride > 1 {
        x.clone() + tid.clone() / e.ix(pairs as i64) * e.ix(8)
    } else {
        x.clone()
    };
    let row0 = e.bind(body, "copy_row", ity, row0);
    let octets = tile / 8;
    let mut plan = Vec::new();
    for b in 0..columns {
        let c = (tid.clone() + e.ix((b * threads) as i64)) / e.ix(8) % e.ix(row_chunks as i64);
        let c = e.bind(body, "copy_col", ity, c * e.ix(chunk as i64));
        let position = Expr::binary(
            BinOp::Xor,
            i32_of(c.clone()) / i32c(chunk as i64),
            i32_of(x.clone()),
        );
        let dst = i32_of(row0.clone()) * i32c(d as i64) + position * i32c(chunk as i64);
        let dst = e.bind(body, "copy_dst", Ty::I32, dst);
        let src = (tile_blocks > 0).then(|| {
            let zero = e.ix(0);
            let at = [zero.clone(), zero.clone(), row0.clone(), zero, c.clone()];
            let at = e.linear(cache_dims, &at);
            e.bind(body, "copy_src", ity, at)
        });
        // Rows per block of the tile (one block: the tile's rows).
        let block_rows = (tile / tile_blocks.max(1)) as i64;
        for i in 0..octets.div_ceil(stride) {
            let rows = (8 * stride * i) as i64;
            let src = src.as_ref().map(|base| {
                let (block, within) = (rows / block_rows, rows % block_rows);
                let zero = e.ix(0);
                let at = [zero.clone(), zero.clone(), e.ix(within), zero.clone(), zero];
                (block as usize, base.clone() + e.linear(cache_dims, &at))
            });
            plan.push(Copy {
                row: row0.clone() + e.ix(rows),
                col: c.clone(),
                dst: dst.clone() + i32c(rows * d as i64),
                src,
                partial: (i + 1) * stride > octets,
            });
        }
    }
    plan
}

/// What the computation of one tile of the staged pipeline reads.
struct Tile {
    /// The tile's number in the partition (the loop variable).
    t: Expr,
    /// The element offset of its stage in `k_tiles` and `v_tiles` (32 bits).
    stage: Expr,
    k_tiles: Buf,
    v_tiles: Buf,
}

/// The staged design's loop: the partition's keys in tiles of `tile` keys; the block
/// copies each tile's key and value rows into shared memory with 16-byte `cp.async`
/// chunks, `stages - 1` tiles ahead of the one it computes (the copies cost no registers
/// and overlap the math); `compute` emits the math of a tile from shared memory. Keys
/// past the end are zero-filled copies that read nothing (weight 0), so a padding token or
/// an empty partition reads no block table and no cache row. `swizzled`: chunk `c` of
/// tile row `r` lies at chunk position `c ^ swizzle(r)` (the `ldmatrix` layout of the
/// tensor-core design); else rows are plain.
fn pipeline(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    st: &Partial,
    swizzled: bool,
    compute: impl FnOnce(&mut Emitter<'_, '_>, &mut Vec<Stmt>, &Tile) -> EResult<()>,
) -> EResult<()> {
    let g = e.g;
    let inst = g.inst(out).expect("paged_attention");
    let [k_cache, v_cache, tables] = [1, 2, 3].map(|i| inst.operands[i]);
    let ity = e.index_ty;
    let (d, tile, stages) = (shape.d, shape.tile, shape.stages);
    let threads = shape.threads() as usize;
    let dtype = g.ty(k_cache).dtype;
    let chunk = 16 / dtype.size_bytes();
    let row_chunks = d / chunk;
    let tile_chunks = tile * row_chunks;
    let stage_len = (tile * d) as i64;
    let k_buf = e.buffer(k_cache, Access::Read);
    let v_buf = e.buffer(v_cache, Access::Read);
    let k_tiles = e.shared_array("k_tiles", dtype, (stages * tile * d) as u32);
    let v_tiles = e.shared_array("v_tiles", dtype, (stages * tile * d) as u32);
    let cache_dims = g.shape(k_cache).to_vec();
    let tid = e.special(Special::ThreadIdx);
    let tid = e.bind(body, "tid", ity, tid);
    let (start, end) = (st.start.clone(), st.end.clone());
    let tiles = (end.clone() - start.clone() + e.ix(tile as i64 - 1)) / e.ix(tile as i64);
    let tiles = e.bind(body, "tiles", ity, tiles);
    // This thread's chunks of a tile: chunk i·threads + tid is row (i·threads + tid) /
    // row_chunks, columns (… % row_chunks)·chunk ..; the key and value rows alike.
    // With a constant block size that the tile divides (tiles start at multiples of it), a
    // tile lies in one cache block: one block-table read a tile, each chunk at a fixed
    // offset from the tile's first row.
    let one_block = matches!(cache_dims[2], Dim::Const(bs) if bs.is_multiple_of(tile as u64));
    // A swizzled tile of whole blocks of a multiple of 8 rows, where a thread's rows lie in
    // one eight of each: one block-table read a block of the tile.
    let tile_blocks = match cache_dims[2] {
        _ if one_block => 1,
        Dim::Const(bs)
            if swizzled
                && bs.is_multiple_of(8)
                && (tile as u64).is_multiple_of(bs)
                && threads <= 8 * row_chunks =>
        {
            tile / bs as usize
        }
        _ => 0,
    };
    let copy_plan: Vec<Copy> = if swizzled {
        swizzled_plan(e, body, shape, &tid, &cache_dims, tile_blocks)
    } else {
        (0..tile_chunks.div_ceil(threads))
            .map(|i| {
                let flat = tid.clone() + e.ix((i * threads) as i64);
                let row = e.bind(
                    body,
                    "copy_row",
                    ity,
                    flat.clone() / e.ix(row_chunks as i64),
                );
                let c = flat.clone() % e.ix(row_chunks as i64);
                let c = e.bind(body, "copy_col", ity, c * e.ix(chunk as i64));
                let dst = i32_of(row.clone()) * i32c(d as i64) + i32_of(c.clone());
                let dst = e.bind(body, "copy_dst", Ty::I32, dst);
                let src = one_block.then(|| {
                    let zero = e.ix(0);
                    let at = [zero.clone(), zero.clone(), row.clone(), zero, c.clone()];
                    let at = e.linear(&cache_dims, &at);
                    (0, e.bind(body, "copy_src", ity, at))
                });
                Copy {
                    row,
                    col: c,
                    dst,
                    src,
                    partial: (i + 1) * threads > tile_chunks,
                }
            })
            .collect()
    };
    let load_tile = |e: &mut Emitter<'_, '_>, stage: Expr, t: Expr| -> EResult<Vec<Stmt>> {
        let mut out = Vec::new();
        let stage = e.bind(
            &mut out,
            "stage_at",
            Ty::I32,
            i32_of(stage) * i32c(stage_len),
        );
        let first = e.bind(
            &mut out,
            "tile_first",
            ity,
            start.clone() + t * e.ix(tile as i64),
        );
        // The block table is read only for keys in range: the source index of row `j`
        // (its column `col`), 0 when out of range.
        let row_at = |e: &mut Emitter<'_, '_>,
                      out: &mut Vec<Stmt>,
                      j: &Expr,
                      col: Expr,
                      name: &str|
         -> EResult<Expr> {
            let ok = j.clone().lt(end.clone());
            let src = e.var(name, ity);
            let mut read = Vec::new();
            e.push_scope();
            let at = [st.seq.clone(), j.clone() / st.block_size.clone()];
            let block = e.elem(&mut read, tables, &at, 1)?.remove(0);
            e.pop_scope();
            let block = e.bind(&mut read, "block", ity, index(e, block));
            let idx = [
                e.ix(shape.layer as i64),
                block,
                j.clone() % st.block_size.clone(),
                st.kvh.clone(),
                col,
            ];
            let at = e.linear(&cache_dims, &idx);
            read.push(Stmt::Assign(src, at));
            out.push(Stmt::If {
                cond: ok,
                then: read,
                otherwise: vec![Stmt::Assign(src, e.ix(0))],
            });
            Ok(Expr::var(src))
        };
        // The first row of each cache block of the tile (0 past the end).
        let mut tile_src = Vec::with_capacity(tile_blocks);
        for b in 0..tile_blocks {
            let row = match b {
                0 => first.clone(),
                _ => {
                    let at = first.clone() + st.block_size.clone() * e.ix(b as i64);
                    e.bind(&mut out, "block_first", ity, at)
                }
            };
            tile_src.push(row_at(e, &mut out, &row, e.ix(0), "tile_src")?);
        }
        for cp in &copy_plan {
            let (row, c, partial) = (&cp.row, &cp.col, &cp.partial);
            let mut copy = Vec::new();
            let j = e.bind(&mut copy, "j", ity, first.clone() + row.clone());
            let ok = e.bind(&mut copy, "key_ok", Ty::Pred, j.clone().lt(end.clone()));
            let src = match &cp.src {
                Some((b, offset)) if *b < tile_src.len() => {
                    let base = tile_src[*b].clone();
                    let at = Expr::select(ok.clone(), base + offset.clone(), e.ix(0));
                    e.bind(&mut copy, "src", ity, at)
                }
                _ => row_at(e, &mut copy, &j, c.clone(), "src")?,
            };
            let dst = e.bind(&mut copy, "dst", Ty::I32, stage.clone() + cp.dst.clone());
            let len = Expr::select(
                ok,
                Expr::Const(kiln_kir::Const::I32(chunk as i32)),
                Expr::Const(kiln_kir::Const::I32(0)),
            );
            let len = e.bind(&mut copy, "len", Ty::I32, len);
            for (dst_buf, src_buf) in [(k_tiles, k_buf), (v_tiles, v_buf)] {
                copy.push(Stmt::CpAsync {
                    dst: dst_buf,
                    dst_index: dst.clone(),
                    src: src_buf,
                    src_index: src.clone(),
                    src_len: len.clone(),
                });
            }
            if *partial {
                out.push(Stmt::If {
                    cond: row.clone().lt(e.ix(tile as i64)),
                    then: copy,
                    otherwise: Vec::new(),
                });
            } else {
                out.extend(copy);
            }
        }
        Ok(out)
    };
    // The pipeline: stages - 1 tiles ahead, one barrier a tile (the stage refilled is the
    // one every warp finished before it).
    for s in 0..stages - 1 {
        let copies = load_tile(e, e.ix(s as i64), e.ix(s as i64))?;
        body.extend(copies);
        body.push(Stmt::CpAsyncCommit);
    }
    let t = e.var("t", ity);
    let mut step = vec![Stmt::CpAsyncWait((stages - 2) as u32), Stmt::Barrier];
    e.push_scope();
    let next = Expr::var(t) + e.ix(stages as i64 - 1);
    let next_stage = Expr::binary(BinOp::Rem, next.clone(), e.ix(stages as i64));
    let copies = load_tile(e, next_stage, next)?;
    step.extend(copies);
    step.push(Stmt::CpAsyncCommit);
    let stage = Expr::binary(BinOp::Rem, Expr::var(t), e.ix(stages as i64));
    let at = Tile {
        t: Expr::var(t),
        stage: i32_of(stage) * i32c(stage_len),
        k_tiles,
        v_tiles,
    };
    compute(e, &mut step, &at)?;
    e.pop_scope();
    body.push(Stmt::For {
        var: t,
        start: e.ix(0),
        end: tiles,
        step: e.ix(1),
        body: step,
    });
    // Copies still in flight are of tiles past the end (zero fills): drained here so that
    // none outlives the loop.
    body.push(Stmt::CpAsyncWait(0));
    Ok(())
}

/// The staged CUDA-core design's loop ([`pipeline`]): lane group g of warp w scores keys
/// w·tile/warps + g + u·slots of each tile from shared memory; the lane groups' sums are
/// added across the warp after the loop.
fn staged_loop(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    st: &Partial,
) -> EResult<()> {
    let ity = e.index_ty;
    let (d, tile) = (shape.d, shape.tile);
    let per_warp = tile / shape.warps as usize;
    let dtype =
        e.g.ty(e.g.inst(out).expect("paged_attention").operands[1])
            .dtype;
    let chunk = 16 / dtype.size_bytes();
    let (start, end) = (st.start.clone(), st.end.clone());
    let compute = |e: &mut Emitter<'_, '_>, step: &mut Vec<Stmt>, at: &Tile| -> EResult<()> {
        let (k_tiles, v_tiles) = (at.k_tiles, at.v_tiles);
        // Lane group g of warp w takes the tile's keys w·per_warp + g + u·slots.
        let slots = shape.slots();
        let row0 = st.warp.clone() * e.ix(per_warp as i64) + st.slot.clone();
        let first = e.bind(
            step,
            "first",
            ity,
            start.clone() + at.t.clone() * e.ix(tile as i64) + row0.clone(),
        );
        // Shared-memory offsets in 32 bits.
        let base = at.stage.clone() + i32_of(row0) * i32c(d as i64) + i32_of(st.col.clone());
        let base = e.bind(step, "base", Ty::I32, base);
        let per_lane = shape.per_lane();
        // Vectors of the largest power of two dividing a lane's share (at most 16 bytes, 8
        // elements): head dim 96 at 16 lanes a key loads pairs.
        let width = (1usize << per_lane.trailing_zeros()).min(chunk).min(8);
        let mut valid = Vec::with_capacity(per_warp);
        let mut keys = Vec::with_capacity(per_warp);
        let mut values = Vec::with_capacity(per_warp);
        for u in 0..per_warp / slots {
            let ok = (first.clone() + e.ix((u * slots) as i64)).lt(end.clone());
            valid.push(e.bind(step, "key_ok", Ty::Pred, ok));
            for (buf, rows, name) in [(k_tiles, &mut keys, "k"), (v_tiles, &mut values, "v")] {
                let regs: Vec<VarId> = (0..per_lane).map(|_| e.var(name, Ty::F32)).collect();
                for (c, part) in regs.chunks(width).enumerate() {
                    let index = base.clone() + i32c((u * slots * d + c * width) as i64);
                    if part.len() == 1 {
                        step.push(Stmt::Assign(part[0], Expr::load(buf, index)));
                    } else {
                        step.push(Stmt::LoadVec {
                            dsts: part.to_vec(),
                            buf,
                            index,
                        });
                    }
                }
                rows.push(regs.into_iter().map(Expr::var).collect::<Vec<_>>());
            }
        }
        online_step(e, step, shape, st, &valid, &keys, &values);
        Ok(())
    };
    pipeline(e, body, out, shape, st, false, compute)?;
    // The lane groups' sums (under the warp's common max) added across the warp.
    for mask in shape.slot_masks() {
        let other = e.var("other", Ty::F32);
        for var in st.l.iter().chain(st.acc.iter().flatten()) {
            body.push(Stmt::ShuffleXor {
                dst: other,
                src: *var,
                mask,
            });
            body.push(Stmt::Assign(*var, Expr::var(*var) + Expr::var(other)));
        }
    }
    Ok(())
}

/// Merges the block's warps through shared memory into one partial result per query head
/// and stores it in the workspace.
fn epilogue(
    e: &mut Emitter<'_, '_>,
    mut body: Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    st: &Partial,
) -> EResult<Body> {
    let (d, group, warps) = (shape.d, shape.group, shape.warps);
    let (m, l, acc) = (&st.m, &st.l, &st.acc);
    let (lane, warp, col) = (st.lane.clone(), st.warp.clone(), st.col.clone());
    // Merge the warps: each warp's max, sum and columns to shared memory, then thread t
    // merges entries t, t + threads, ... of the group's (head, column) pairs.
    let stats = e.shared_array("warp_stats", DType::F32, warps * 2 * group as u32);
    let sums = e.shared_array("warp_acc", DType::F32, warps * (group * d) as u32);
    let lane0 = lane.clone().equals(e.ix(0));
    for gi in 0..group {
        let at = warp.clone() * e.ix(2 * group as i64) + e.ix(2 * gi as i64);
        body.push(Stmt::If {
            cond: lane0.clone(),
            then: vec![
                Stmt::store(stats, at.clone(), Expr::var(m[gi])),
                Stmt::store(stats, at + e.ix(1), Expr::var(l[gi])),
            ],
            otherwise: Vec::new(),
        });
        // Lane groups hold equal sums after the warp's shuffles: the first stores them.
        let mut stores = Vec::new();
        for (c, a) in acc[gi].iter().enumerate() {
            let at = warp.clone() * e.ix((group * d) as i64)
                + e.ix((gi * d) as i64)
                + col.clone()
                + e.ix(c as i64);
            stores.push(Stmt::store(sums, at, Expr::var(*a)));
        }
        if shape.lanes < 32 {
            body.push(Stmt::If {
                cond: lane.clone().lt(e.ix(shape.lanes as i64)),
                then: stores,
                otherwise: Vec::new(),
            });
        } else {
            body.extend(stores);
        }
    }
    merge_block(e, body, out, shape, st, stats, sums)
}

/// The block merge of [`epilogue`] once every warp's max and sum per query head
/// (`stats`: warp, head, 2) and weighted values (`sums`: warp, head, D) are in shared
/// memory: thread t merges entries t, t + threads, ... of the group's (head, column) pairs
/// and stores them in the workspace.
fn merge_block(
    e: &mut Emitter<'_, '_>,
    mut body: Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    st: &Partial,
    stats: Buf,
    sums: Buf,
) -> EResult<Body> {
    let g = e.g;
    let ity = e.index_ty;
    let (d, group, warps, threads) = (shape.d, shape.group, shape.warps, shape.threads());
    let (kvh, token, part) = (st.kvh.clone(), st.token.clone(), st.part.clone());
    body.push(Stmt::Barrier);
    // The one-pass kernel stores the output; the partial kernel its partition's state.
    // Read back by the last block when the partial kernel merges.
    let access = if shape.merges() {
        Access::ReadWrite
    } else {
        Access::Write
    };
    let ws = (!shape.whole()).then(|| e.workspace(0, DType::F32, access));
    let parts = if shape.whole() {
        e.ix(1)
    } else {
        partitions_expr(e, out, shape.part)
    };
    let heads = e.ix((shape.kv_heads * group) as i64);
    let tid = e.special(Special::ThreadIdx);
    for first in (0..group * d).step_by(threads as usize) {
        let item = e.bind(&mut body, "item", ity, tid.clone() + e.ix(first as i64));
        let mut merge = Vec::new();
        let gi = e.bind(&mut merge, "g", ity, item.clone() / e.ix(d as i64));
        let c = e.bind(&mut merge, "c", ity, item.clone() % e.ix(d as i64));
        let stat = |w: u32, which: i64, e: &Emitter<'_, '_>| {
            Expr::load(
                stats,
                e.ix(i64::from(w) * 2 * group as i64) + gi.clone() * e.ix(2) + e.ix(which),
            )
        };
        let mut most = stat(0, 0, e);
        for w in 1..warps {
            most = most.max(stat(w, 0, e));
        }
        let most = e.bind(&mut merge, "most", Ty::F32, most);
        let live = e.bind(
            &mut merge,
            "live",
            Ty::Pred,
            most.clone().gt(f(f32::NEG_INFINITY)),
        );
        let (mut total, mut weighted) = (f(0.0), f(0.0));
        for w in 0..warps {
            let scale = Expr::select(
                live.clone(),
                (stat(w, 0, e) - most.clone()).apply(UnOp::Exp),
                f(0.0),
            );
            let scale = e.bind(&mut merge, "scale", Ty::F32, scale);
            total = Expr::fma(stat(w, 1, e), scale.clone(), total);
            let at =
                e.ix(i64::from(w) * (group * d) as i64) + gi.clone() * e.ix(d as i64) + c.clone();
            weighted = Expr::fma(Expr::load(sums, at), scale, weighted);
        }
        let head = kvh.clone() * e.ix(group as i64) + gi.clone();
        if let Some(ws) = ws {
            let base = ((token.clone() * heads.clone() + head) * parts.clone() + part.clone())
                * e.ix(d as i64 + 2);
            let base = e.bind(&mut merge, "slot", ity, base);
            merge.push(Stmt::store(ws, base.clone() + c.clone(), weighted));
            merge.push(Stmt::If {
                cond: c.equals(e.ix(0)),
                then: vec![
                    Stmt::store(ws, base.clone() + e.ix(d as i64), most),
                    Stmt::store(ws, base + e.ix(d as i64 + 1), total),
                ],
                otherwise: Vec::new(),
            });
        } else {
            // As the merge kernel stores a (token, head) of one partition.
            let total = e.bind(&mut merge, "total", Ty::F32, total);
            let value = Expr::select(
                total.clone().gt(f(0.0)),
                Expr::binary(BinOp::Div, weighted, total),
                f(0.0),
            );
            let head = e.bind(&mut merge, "head", ity, head);
            e.store(
                &mut merge,
                out,
                &[token.clone(), head, c.clone()],
                vec![value],
            );
        }
        if (first + threads as usize) <= group * d {
            body.extend(merge);
        } else {
            body.push(Stmt::If {
                cond: item.lt(e.ix((group * d) as i64)),
                then: merge,
                otherwise: Vec::new(),
            });
        }
    }
    let q_shape = g.shape(g.inst(out).expect("paged_attention").operands[0]);
    if let (Some(ws), true) = (ws, shape.merges()) {
        last_block_merge(e, &mut body, out, shape, st, ws, stats)?;
    }
    let (what, parts) = if shape.whole() {
        e.fused.insert(out);
        ("paged_attention_one_pass", super::one())
    } else if shape.merges() {
        e.fused.insert(out);
        (
            "paged_attention_partial_merge",
            partitions(e, out, shape.part),
        )
    } else {
        ("paged_attention_partial", partitions(e, out, shape.part))
    };
    Ok(Body {
        what: what.into(),
        block_dim: threads,
        grid: [
            parts,
            SizeExpr::Const(shape.kv_heads as u64),
            size_of_dims(&q_shape[0..1]),
        ],
        stmts: body,
    })
}

/// The partial kernel's merge of the partitions ([`PagedShape::merges`]), after the block
/// stored its partition's state in the workspace: the block's threads meet at a barrier
/// (every store of the block done), then thread 0 executes a GPU-scope fence and adds 1 to
/// the (token, key/value head)'s counter; the add that returns `partitions - 1` is the
/// last, and its fence after the add makes every other block's stores (published by their
/// fence before their add) visible to it (kir `AtomicAdd`/`Fence`: release, atomic,
/// acquire). Thread 0 tells the block through shared memory (`stats`, free once the warps
/// are merged) across a barrier; in the last block thread t merges entries t, t + threads,
/// ... of the group's (head, column) pairs from the workspace exactly as [`emit_merge`]'s
/// thread does (the same loads, order and operations: the same bits) and stores the
/// output, and thread 0 sets the counter back to zero: every block has counted, and the
/// next launch that uses the counter runs after this one ends.
fn last_block_merge(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    st: &Partial,
    ws: Buf,
    stats: Buf,
) -> EResult<()> {
    let g = e.g;
    let ity = e.index_ty;
    let (d, group, threads) = (shape.d, shape.group, shape.threads());
    let (kvh, token) = (st.kvh.clone(), st.token.clone());
    let q_shape = g.shape(g.inst(out).expect("paged_attention").operands[0]);
    let count = super::mul_size(
        size_of_dims(&q_shape[0..1]),
        SizeExpr::Const(shape.kv_heads as u64),
    );
    let counters = e.counters(count);
    let parts = partitions_expr(e, out, shape.part);
    let parts = e.bind(body, "parts", ity, parts);
    let slot = token.clone() * e.ix(shape.kv_heads as i64) + kvh.clone();
    let slot = e.bind(body, "counter", ity, slot);
    let tid = e.special(Special::ThreadIdx);
    let thread0 = tid.clone().equals(e.ix(0));
    let arrived = e.var("arrived", Ty::I32);
    body.push(Stmt::Barrier);
    body.push(Stmt::If {
        cond: thread0.clone(),
        then: vec![
            Stmt::Fence,
            Stmt::AtomicAdd {
                dst: arrived,
                buf: counters,
                index: slot.clone(),
                value: Expr::i32(1),
            },
            Stmt::Fence,
            Stmt::store(
                stats,
                e.ix(0),
                Expr::select(
                    Expr::var(arrived).equals(i32_of(parts.clone() - e.ix(1))),
                    f(1.0),
                    f(0.0),
                ),
            ),
        ],
        otherwise: Vec::new(),
    });
    body.push(Stmt::Barrier);
    let mut merge = Vec::new();
    let heads = e.ix((shape.kv_heads * group) as i64);
    for first in (0..group * d).step_by(threads as usize) {
        let mut item_body = Vec::new();
        let item = e.bind(&mut merge, "item", ity, tid.clone() + e.ix(first as i64));
        let gi = e.bind(&mut item_body, "g", ity, item.clone() / e.ix(d as i64));
        let c = e.bind(&mut item_body, "c", ity, item.clone() % e.ix(d as i64));
        let head = kvh.clone() * e.ix(group as i64) + gi;
        let head = e.bind(&mut item_body, "head", ity, head);
        // As the merge kernel's thread c of block (token, head).
        let row =
            (token.clone() * heads.clone() + head.clone()) * parts.clone() * e.ix(d as i64 + 2);
        let row = e.bind(&mut item_body, "first", ity, row);
        let value = merged(e, &mut item_body, ws, &row, &parts, d, &c);
        e.store(&mut item_body, out, &[token.clone(), head, c], vec![value]);
        if first + threads as usize <= group * d {
            merge.extend(item_body);
        } else {
            merge.push(Stmt::If {
                cond: item.lt(e.ix((group * d) as i64)),
                then: item_body,
                otherwise: Vec::new(),
            });
        }
    }
    merge.push(Stmt::If {
        cond: thread0,
        then: vec![Stmt::store(counters, slot, Expr::i32(0))],
        otherwise: Vec::new(),
    });
    body.push(Stmt::If {
        cond: Expr::load(stats, e.ix(0)).gt(f(0.5)),
        then: merge,
        otherwise: Vec::new(),
    });
    Ok(())
}

/// Partitions whose states [`merged`] loads together: one round trip to memory for up to
/// this many partitions, where a loop of one partition a step waited for each in turn.
const MERGE_CHUNK: usize = 8;

/// The merged output element `c` of the partitions' states at `row` of the workspace `ws`
/// (`parts` states of `d + 2` floats: the weighted values, the maximum, the sum): the
/// largest maximum, then the states rescaled to it and added in partition order. Shared by
/// the merge kernel and the partial kernel's last block, so both give the same bits.
///
/// Both passes walk the partitions [`MERGE_CHUNK`] at a time, every load of a chunk issued
/// before any is used. A chunk's positions past the last partition read the last one
/// (clamped): the maximum of a repeated state is unchanged, and the sums leave them out, so
/// the operations and their order are those of one partition a step.
fn merged(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    ws: Buf,
    row: &Expr,
    parts: &Expr,
    d: usize,
    c: &Expr,
) -> Expr {
    let ity = e.index_ty;
    let stride = d as i64 + 2;
    let chunk = MERGE_CHUNK as i64;
    // The row offset of chunk position `u` from the chunk at `k` (clamped to the last
    // partition).
    let position = |e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, k: VarId, u: usize| {
        let clamped = (Expr::var(k) + e.ix(u as i64)).min(parts.clone() - e.ix(1));
        e.bind(out, "at", ity, row.clone() + clamped * e.ix(stride))
    };
    let most = e.var("most", Ty::F32);
    body.push(Stmt::Assign(most, f(f32::NEG_INFINITY)));
    let k_max = e.var("p", ity);
    let mut max_step = Vec::new();
    let mut maxima = Vec::with_capacity(MERGE_CHUNK);
    for u in 0..MERGE_CHUNK {
        let at = position(e, &mut max_step, k_max, u);
        maxima.push(e.bind(
            &mut max_step,
            "m",
            Ty::F32,
            Expr::load(ws, at + e.ix(d as i64)),
        ));
    }
    for m in maxima {
        max_step.push(Stmt::Assign(most, Expr::var(most).max(m)));
    }
    body.push(Stmt::For {
        var: k_max,
        start: e.ix(0),
        end: parts.clone(),
        step: e.ix(chunk),
        body: max_step,
    });
    let (total, weighted) = (e.var("total", Ty::F32), e.var("weighted", Ty::F32));
    body.push(Stmt::Assign(total, f(0.0)));
    body.push(Stmt::Assign(weighted, f(0.0)));
    let k_sum = e.var("p", ity);
    let mut sum_step = Vec::new();
    let mut states = Vec::with_capacity(MERGE_CHUNK);
    for u in 0..MERGE_CHUNK {
        let in_range = Expr::var(k_sum) + e.ix(u as i64);
        let in_range = e.bind(
            &mut sum_step,
            "in_range",
            Ty::Pred,
            in_range.lt(parts.clone()),
        );
        let at = position(e, &mut sum_step, k_sum, u);
        let m = Expr::load(ws, at.clone() + e.ix(d as i64));
        let m = e.bind(&mut sum_step, "m", Ty::F32, m);
        let l = Expr::load(ws, at.clone() + e.ix(d as i64 + 1));
        let l = e.bind(&mut sum_step, "l", Ty::F32, l);
        let v = e.bind(&mut sum_step, "v", Ty::F32, Expr::load(ws, at + c.clone()));
        states.push((in_range, m, l, v));
    }
    let scale = e.var("scale", Ty::F32);
    for (in_range, m, l, v) in states {
        sum_step.push(Stmt::Assign(
            scale,
            Expr::select(
                Expr::var(most).gt(f(f32::NEG_INFINITY)),
                (m - Expr::var(most)).apply(UnOp::Exp),
                f(0.0),
            ),
        ));
        let keep = |acc: VarId, next: Expr| {
            Stmt::Assign(acc, Expr::select(in_range.clone(), next, Expr::var(acc)))
        };
        sum_step.push(keep(
            total,
            Expr::fma(l, Expr::var(scale), Expr::var(total)),
        ));
        sum_step.push(keep(
            weighted,
            Expr::fma(v, Expr::var(scale), Expr::var(weighted)),
        ));
    }
    body.push(Stmt::For {
        var: k_sum,
        start: e.ix(0),
        end: parts.clone(),
        step: e.ix(chunk),
        body: sum_step,
    });
    Expr::select(
        Expr::var(total).gt(f(0.0)),
        Expr::binary(BinOp::Div, Expr::var(weighted), Expr::var(total)),
        f(0.0),
    )
}

/// The second kernel: one block of D threads per (token, head) merges the partitions in
/// order and stores the output.
pub(crate) fn emit_merge(e: &mut Emitter<'_, '_>, out: Value, shape: &PagedShape) -> EResult<Body> {
    let g = e.g;
    let ity = e.index_ty;
    let d = shape.d;
    let heads = (shape.kv_heads * shape.group) as i64;
    let mut body = Vec::new();
    let flat = e.special(Special::BlockIdx(0));
    let flat = e.bind(&mut body, "row", ity, flat);
    let token = e.bind(&mut body, "token", ity, flat.clone() / e.ix(heads));
    let head = e.bind(&mut body, "head", ity, flat.clone() % e.ix(heads));
    let c = e.special(Special::ThreadIdx);
    let c = e.bind(&mut body, "c", ity, c);
    let ws = e.workspace(0, DType::F32, Access::Read);
    let parts = partitions_expr(e, out, shape.part);
    let parts = e.bind(&mut body, "parts", ity, parts);
    let row = e.bind(
        &mut body,
        "first",
        ity,
        flat * parts.clone() * e.ix(d as i64 + 2),
    );
    let value = merged(e, &mut body, ws, &row, &parts, d, &c);
    e.store(&mut body, out, &[token, head, c], vec![value]);
    e.fused.insert(out);
    let q_shape = g.shape(out).to_vec();
    Ok(Body {
        what: "paged_attention_merge".into(),
        block_dim: d as u32,
        grid: [
            size_of_dims(&[q_shape[0].clone(), Dim::Const(heads as u64)]),
            super::one(),
            super::one(),
        ],
        stmts: body,
    })
}

/// The first kernel of the tensor-core staged design: the group's query heads as the rows
/// of one m16 tile (rows past the group are zeros, never stored), held as A fragments;
/// each tile of the [`pipeline`] (swizzled rows) gives warp w its keys w·tile/warps ..,
/// whole 16-key slabs: `S = Q Kᵀ` by `mma.sync` (K fragments by `ldmatrix`), keys past the
/// end at -inf, an online softmax (base 2) on the accumulator fragments, P packed to A
/// fragments and `P V` (V fragments by `ldmatrix.trans`). The warps' rows are then merged
/// through shared memory as in the CUDA-core designs (maxima converted to base e).
fn mma_partial(
    e: &mut Emitter<'_, '_>,
    out: Value,
    shape: &PagedShape,
    input: MmaInput,
) -> EResult<Body> {
    let g = e.g;
    let q = g.inst(out).expect("paged_attention").operands[0];
    let ity = e.index_ty;
    let (d, group, tile) = (shape.d as i64, shape.group, shape.tile as i64);
    let per_warp = tile / i64::from(shape.warps);
    let mut body = Vec::new();
    let st = prologue(e, &mut body, out, shape, false)?;
    e.blocks_per_sm = shape.blocks_per_sm;
    let lane = e.bind(&mut body, "lane32", Ty::I32, Expr::Special(Special::LaneId));
    let warp = e.bind(&mut body, "warp32", Ty::I32, Expr::Special(Special::WarpId));
    let quad_g = e.bind(&mut body, "quad_g", Ty::I32, shr(lane.clone(), 2));
    let quad_t = e.bind(&mut body, "quad_t", Ty::I32, and_mask(lane.clone(), 3));
    // Rows g and g + 8 of the tile: all, some or none of each eight are query heads.
    let some_rows = |r: usize| group > 8 * r;
    let all_rows = |r: usize| group >= 8 * r + 8;
    let row_of = |r: usize| quad_g.clone() + i32c(8 * r as i64);
    let mut row_ok = Vec::with_capacity(2);
    let mut heads = Vec::with_capacity(2);
    for r in 0..2 {
        let ok = e.bind(
            &mut body,
            "row_ok",
            Ty::Pred,
            row_of(r).lt(i32c(group as i64)),
        );
        row_ok.push(ok);
        // Rows past the group read its last head (valid memory, replaced by zeros).
        let head =
            st.kvh.clone() * e.ix(group as i64) + index(e, row_of(r).min(i32c(group as i64 - 1)));
        heads.push(if some_rows(r) {
            e.bind(&mut body, "head", ity, head)
        } else {
            e.ix(0)
        });
    }
    // Q's A fragments: registers (row g, k 2t), (row g + 8, k 2t), (row g, k 2t + 8),
    // (row g + 8, k 2t + 8) of each 16 columns.
    let q_frag: Vec<[VarId; 4]> = (0..d / 16)
        .map(|_| [0; 4].map(|_| e.var("fq", Ty::I32)))
        .collect();
    for (kk, frag) in q_frag.iter().enumerate() {
        for (reg, (r, off)) in [(0, 0), (1, 0), (0, 8), (1, 8)].into_iter().enumerate() {
            if !some_rows(r) {
                body.push(Stmt::Assign(frag[reg], i32c(0)));
                continue;
            }
            let col = index(e, quad_t.clone() * i32c(2) + i32c(kk as i64 * 16 + off));
            e.push_scope();
            let at = [st.token.clone(), heads[r].clone(), col];
            let x = e.elem(&mut body, q, &at, 2)?;
            e.pop_scope();
            let x: Vec<Expr> = if all_rows(r) {
                x
            } else {
                x.into_iter()
                    .map(|v| Expr::select(row_ok[r].clone(), v, f(0.0)))
                    .collect()
            };
            body.push(Stmt::PackHalves {
                dst: frag[reg],
                input,
                lo: x[0].clone(),
                hi: x[1].clone(),
            });
        }
    }
    let rows = Rows::new(e, &mut body);
    let o_acc: Vec<[VarId; 4]> = (0..d / 8)
        .map(|_| [0; 4].map(|_| e.var("o", Ty::F32)))
        .collect();
    for &c in o_acc.iter().flatten() {
        body.push(Stmt::Assign(c, f(0.0)));
    }
    let [k_base, k_x, v_base, v_x] = kv_addresses(e, &mut body, &lane, d);
    let warp_rows = e.bind(
        &mut body,
        "warp_rows",
        Ty::I32,
        warp.clone() * i32c(per_warp * d),
    );
    let warp_first = e.bind(
        &mut body,
        "warp_first",
        ity,
        st.start.clone() + index(e, warp.clone() * i32c(per_warp)),
    );
    let key_col = e.bind(
        &mut body,
        "key_col",
        ity,
        index(e, quad_t.clone() * i32c(2)),
    );
    let scale2 = (f64::from(shape.scale) * std::f64::consts::LOG2_E) as f32;
    let other = e.var("other", Ty::F32);
    let red = e.var("red", Ty::F32);
    let end = st.end.clone();
    let compute = |e: &mut Emitter<'_, '_>, step: &mut Vec<Stmt>, at: &Tile| -> EResult<()> {
        let s_acc: Vec<[VarId; 4]> = (0..per_warp / 8)
            .map(|_| [0; 4].map(|_| e.var("s", Ty::F32)))
            .collect();
        for &c in s_acc.iter().flatten() {
            step.push(Stmt::Assign(c, f(0.0)));
        }
        let kb: [VarId; 4] = [0; 4].map(|_| e.var("fk", Ty::I32));
        let rows_at = e.bind(
            step,
            "rows_at",
            Ty::I32,
            at.stage.clone() + warp_rows.clone(),
        );
        let k_at = e.bind(step, "k_at", Ty::I32, rows_at.clone() + k_base.clone());
        scores(step, input, &q_frag, &s_acc, kb, at.k_tiles, &k_at, &k_x, d);
        // Keys past the end (zero-filled rows) at -inf, where the warp's keys reach it.
        let first = e.bind(
            step,
            "first",
            ity,
            warp_first.clone() + at.t.clone() * e.ix(tile),
        );
        let mut masked = Vec::new();
        let left = end.clone() - first.clone() - key_col.clone();
        let left = e.bind(&mut masked, "keys_left", ity, left);
        for (ni, cells) in s_acc.iter().enumerate() {
            for (j, &cell) in cells.iter().enumerate() {
                let key = e.ix(8 * ni as i64 + (j % 2) as i64);
                masked.push(Stmt::Assign(
                    cell,
                    Expr::select(key.lt(left.clone()), Expr::var(cell), f(f32::NEG_INFINITY)),
                ));
            }
        }
        let short = end.clone().lt(first + e.ix(per_warp));
        step.push(Stmt::if_then(short, masked));
        online_softmax(e, step, &s_acc, &rows, &o_acc, scale2, other, red);
        let p_frag = pack_probabilities(e, step, &s_acc, input);
        let vb: [VarId; 4] = [0; 4].map(|_| e.var("fv", Ty::I32));
        let v_at = e.bind(step, "v_at", Ty::I32, rows_at + v_base.clone());
        weigh_values(step, input, &p_frag, &o_acc, vb, at.v_tiles, &v_at, &v_x, d);
        Ok(())
    };
    pipeline(e, &mut body, out, shape, &st, true, compute)?;
    // Each warp's rows to shared memory: the max in base e (`m · ln 2`), the row sum over
    // the quad (lane t = 0 stores both), the weighted values of columns 8n + 2t, + 1.
    let (warps, du) = (shape.warps, shape.d);
    let stats = e.shared_array("warp_stats", DType::F32, warps * 2 * group as u32);
    let sums = e.shared_array("warp_acc", DType::F32, warps * (group * du) as u32);
    let warp_ix = index(e, warp.clone());
    for r in (0..2).filter(|&r| some_rows(r)) {
        quad_sum(&mut body, rows.sum[r], other);
        let row = index(e, row_of(r));
        let mut store = Vec::new();
        let at = e.bind(
            &mut store,
            "stat_at",
            ity,
            warp_ix.clone() * e.ix(2 * group as i64) + row.clone() * e.ix(2),
        );
        let ln2 = std::f32::consts::LN_2;
        store.push(Stmt::if_then(
            quad_t.clone().equals(i32c(0)),
            vec![
                Stmt::store(stats, at.clone(), Expr::var(rows.max[r]) * f(ln2)),
                Stmt::store(stats, at + e.ix(1), Expr::var(rows.sum[r])),
            ],
        ));
        let base = warp_ix.clone() * e.ix(group as i64 * d) + row * e.ix(d) + key_col.clone();
        let base = e.bind(&mut store, "acc_at", ity, base);
        for (nd, cells) in o_acc.iter().enumerate() {
            for x in 0..2 {
                let at = base.clone() + e.ix(8 * nd as i64 + x as i64);
                store.push(Stmt::store(sums, at, Expr::var(cells[2 * r + x])));
            }
        }
        if all_rows(r) {
            body.extend(store);
        } else {
            body.push(Stmt::if_then(row_ok[r].clone(), store));
        }
    }
    merge_block(e, body, out, shape, &st, stats, sums)
}
