//! The paged attention template (split over the sequence, as in flash-decoding): the keys
//! of each token are cut into partitions of `part` positions; one block of `warps` warps per
//! (partition, key/value head, token) runs an online softmax over its partition for all the
//! query heads that share the key/value head (GQA: each key and value row is read once for
//! them), a warp per key with the lanes splitting the head dim (vector loads of D / 32
//! elements, dot products summed across the warp by shuffles), `unroll` keys a step with
//! their loads issued together. The block's warps are merged through shared memory
//! into one partial result per query head (running max, sum and weighted values) in an f32
//! workspace; a second kernel merges the partitions of each (token, head) in order and
//! stores the output. Keys are read through the block table; a token with a negative
//! sequence (padding) gets zeros.
//!
//! Two designs of the first kernel (`PagedTuning::tile`): the register design above, and
//! the staged design of the long-context kernel: the partition's keys in tiles of `tile`
//! keys whose key and value rows the block copies into shared memory with 16-byte
//! `cp.async` chunks, `stages - 1` tiles ahead of the tile it computes (one barrier a tile;
//! the bytes in flight cost no registers and overlap the math; keys past the end are
//! zero-fill copies that read neither the block table nor the cache). The warps score
//! their keys of a tile from shared memory in lane groups of `lanes` lanes, each group a
//! key (D / lanes elements a lane: 8 bf16, one 16-byte shared load, at 16 lanes and D 128),
//! so a score takes log2(lanes) shuffles; the warp keeps one running max (a shuffle max
//! across the groups a step), each group its own sums, added across the warp after the
//! loop. The short-context variant keeps the register design.

use super::mma_gemm::i32c;
use super::{mul_size, size_of_dims, Body, Workspace};
use crate::emit::{EResult, Emitter};
use crate::PagedTuning;
use kiln_ir::{DType, Dim, Op, Value};
use kiln_kir::{Access, BinOp, Expr, SizeExpr, Special, Stmt, Ty, UnOp, VarId};

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
        };
        let (kt, vt) = (
            e.g.ty(inst.operands[1]).dtype,
            e.g.ty(inst.operands[2]).dtype,
        );
        let staged = tuning.tile > 0
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
    start: Expr,
    end: Expr,
    block_size: Expr,
    qv: Vec<Vec<Expr>>,
    m: Vec<VarId>,
    l: Vec<VarId>,
    acc: Vec<Vec<VarId>>,
}

/// The first kernel's prologue: coordinates, key range, query rows, zeroed state.
fn prologue(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
) -> EResult<Partial> {
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
    let col = e.bind(body, "col", ity, in_key * e.ix(per_lane as i64));
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
        context.min(start.clone() + e.ix(shape.part as i64)),
    );
    let block_size = e.dim(&g.shape(k_cache)[2]);
    // The query rows of the group, this lane's columns, in registers.
    let mut qv: Vec<Vec<Expr>> = Vec::with_capacity(group);
    for gi in 0..group {
        let head = kvh.clone() * e.ix(group as i64) + e.ix(gi as i64);
        let head = e.bind(body, "head", ity, head);
        e.push_scope();
        let vals = e.elem(body, q, &[token.clone(), head, col.clone()], per_lane)?;
        e.pop_scope();
        let regs = vals
            .into_iter()
            .map(|v| e.bind(body, "q", Ty::F32, v))
            .collect();
        qv.push(regs);
    }
    // Running max, weight sum and weighted values per query head (per warp).
    let m: Vec<VarId> = (0..group).map(|_| e.var("m", Ty::F32)).collect();
    let l: Vec<VarId> = (0..group).map(|_| e.var("l", Ty::F32)).collect();
    let acc: Vec<Vec<VarId>> = (0..group)
        .map(|_| (0..per_lane).map(|_| e.var("acc", Ty::F32)).collect())
        .collect();
    for gi in 0..group {
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
        start,
        end,
        block_size,
        qv,
        m,
        l,
        acc,
    })
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

/// The first kernel: one partition of one token for the query heads of one key/value head.
pub(crate) fn emit_partial(
    e: &mut Emitter<'_, '_>,
    out: Value,
    shape: &PagedShape,
) -> EResult<Body> {
    let g = e.g;
    let inst = g.inst(out).expect("paged_attention");
    let [k_cache, v_cache, tables] = [1, 2, 3].map(|i| inst.operands[i]);
    let ity = e.index_ty;
    let mut body = Vec::new();
    let st = prologue(e, &mut body, out, shape)?;
    if shape.staged() {
        e.blocks_per_sm = shape.blocks_per_sm;
        staged_loop(e, &mut body, out, shape, &st)?;
        return epilogue(e, body, out, shape, &st);
    }
    let per_lane = shape.per_lane();
    let (warps, unroll) = (shape.warps, shape.unroll);
    let (s, start, end, warp, kvh, col) = (
        st.seq.clone(),
        st.start.clone(),
        st.end.clone(),
        st.warp.clone(),
        st.kvh.clone(),
        st.col.clone(),
    );
    let block_size = st.block_size.clone();
    // The loop over key steps: block-uniform bounds; warp w takes keys
    // j0 + w·unroll .. + unroll of each step.
    let j0 = e.var("j0", ity);
    let mut step = Vec::new();
    e.push_scope();
    let mut valid = Vec::with_capacity(unroll);
    let mut keys: Vec<Vec<Expr>> = Vec::with_capacity(unroll);
    let mut values: Vec<Vec<Expr>> = Vec::with_capacity(unroll);
    // With a constant block size that `unroll` divides (and partitions that start at
    // multiples of it), a warp's keys of a step lie in one cache block: one block-table
    // read per warp and step, no division per key. A warp whose first key is past the end
    // reads the partition's first block instead (valid memory, weight 0).
    let warp_block = match g.shape(k_cache)[2] {
        Dim::Const(bs)
            if bs.is_multiple_of(unroll as u64) && shape.part.is_multiple_of(unroll as u64) =>
        {
            let first = Expr::var(j0) + warp.clone() * e.ix(unroll as i64);
            let first = Expr::select(first.clone().lt(end.clone()), first, start.clone());
            let first = e.bind(&mut step, "first", ity, first);
            let at = [s.clone(), first.clone() / block_size.clone()];
            let block = e.elem(&mut step, tables, &at, 1)?.remove(0);
            let block = e.bind(&mut step, "block", ity, index(e, block));
            let slot = first % block_size.clone();
            Some((block, e.bind(&mut step, "slot", ity, slot)))
        }
        _ => None,
    };
    for u in 0..unroll {
        let j = Expr::var(j0) + warp.clone() * e.ix(unroll as i64) + e.ix(u as i64);
        let j = e.bind(&mut step, "j", ity, j);
        let ok = e.bind(&mut step, "key_ok", Ty::Pred, j.clone().lt(end.clone()));
        valid.push(ok);
        let (block, slot) = match &warp_block {
            // Keys past the end stay inside the warp's block (weight 0).
            Some((block, first)) => (block.clone(), first.clone() + e.ix(u as i64)),
            None => {
                // Out-of-range keys read the partition's first key (valid memory, weight 0).
                let jc = Expr::select(valid[u].clone(), j, start.clone());
                let jc = e.bind(&mut step, "key", ity, jc);
                let at = [s.clone(), jc.clone() / block_size.clone()];
                let block = e.elem(&mut step, tables, &at, 1)?.remove(0);
                let block = e.bind(&mut step, "block", ity, index(e, block));
                (block, jc % block_size.clone())
            }
        };
        let row = [
            e.ix(shape.layer as i64),
            block,
            slot,
            kvh.clone(),
            col.clone(),
        ];
        let kx = e.elem(&mut step, k_cache, &row, per_lane)?;
        let vx = e.elem(&mut step, v_cache, &row, per_lane)?;
        keys.push(
            kx.into_iter()
                .map(|x| e.bind(&mut step, "k", Ty::F32, x))
                .collect(),
        );
        values.push(
            vx.into_iter()
                .map(|x| e.bind(&mut step, "v", Ty::F32, x))
                .collect(),
        );
    }
    e.pop_scope();
    online_step(e, &mut step, shape, &st, &valid, &keys, &values);
    body.push(Stmt::For {
        var: j0,
        start: start.clone(),
        end: end.clone(),
        step: e.ix(i64::from(warps) * unroll as i64),
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
    /// Its offset in the cache from the tile's first row, when a tile lies in one block.
    src: Option<Expr>,
    /// Whether some threads have no chunk here (the tile has fewer chunks left).
    partial: bool,
}

/// The staged design's loop: the partition's keys in tiles of `tile` keys; the block
/// copies each tile's key and value rows into shared memory with 16-byte `cp.async`
/// chunks, `stages - 1` tiles ahead of the one it computes (the copies cost no registers
/// and overlap the math); warp w scores keys w·tile/warps .. of each tile from shared
/// memory. Keys past the end are zero-filled copies that read nothing (weight 0), so a
/// padding token or an empty partition reads no block table and no cache row.
fn staged_loop(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    out: Value,
    shape: &PagedShape,
    st: &Partial,
) -> EResult<()> {
    let g = e.g;
    let inst = g.inst(out).expect("paged_attention");
    let [k_cache, v_cache, tables] = [1, 2, 3].map(|i| inst.operands[i]);
    let ity = e.index_ty;
    let (d, tile, stages) = (shape.d, shape.tile, shape.stages);
    let threads = shape.threads() as usize;
    let per_warp = tile / shape.warps as usize;
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
    let copy_plan: Vec<Copy> = (0..tile_chunks.div_ceil(threads))
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
                e.bind(body, "copy_src", ity, at)
            });
            Copy {
                row,
                col: c,
                dst,
                src,
                partial: (i + 1) * threads > tile_chunks,
            }
        })
        .collect();
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
        let tile_src = if one_block {
            Some(row_at(e, &mut out, &first, e.ix(0), "tile_src")?)
        } else {
            None
        };
        for cp in &copy_plan {
            let (row, c, partial) = (&cp.row, &cp.col, &cp.partial);
            let mut copy = Vec::new();
            let j = e.bind(&mut copy, "j", ity, first.clone() + row.clone());
            let ok = e.bind(&mut copy, "key_ok", Ty::Pred, j.clone().lt(end.clone()));
            let src = match (&tile_src, &cp.src) {
                (Some(base), Some(offset)) => {
                    let at = Expr::select(ok.clone(), base.clone() + offset.clone(), e.ix(0));
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
    // Lane group g of warp w takes the tile's keys w·per_warp + g + u·slots.
    let slots = shape.slots();
    let row0 = st.warp.clone() * e.ix(per_warp as i64) + st.slot.clone();
    let first = e.bind(
        &mut step,
        "first",
        ity,
        start.clone() + Expr::var(t) * e.ix(tile as i64) + row0.clone(),
    );
    // Shared-memory offsets in 32 bits.
    let base =
        i32_of(stage) * i32c(stage_len) + i32_of(row0) * i32c(d as i64) + i32_of(st.col.clone());
    let base = e.bind(&mut step, "base", Ty::I32, base);
    let per_lane = shape.per_lane();
    // Vectors of the largest power of two dividing a lane's share (at most 16 bytes, 8
    // elements): head dim 96 at 16 lanes a key loads pairs.
    let width = (1usize << per_lane.trailing_zeros()).min(chunk).min(8);
    let mut valid = Vec::with_capacity(per_warp);
    let mut keys = Vec::with_capacity(per_warp);
    let mut values = Vec::with_capacity(per_warp);
    for u in 0..per_warp / slots {
        let ok = (first.clone() + e.ix((u * slots) as i64)).lt(end.clone());
        valid.push(e.bind(&mut step, "key_ok", Ty::Pred, ok));
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
    e.pop_scope();
    online_step(e, &mut step, shape, st, &valid, &keys, &values);
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
    let g = e.g;
    let ity = e.index_ty;
    let (d, group, warps, threads) = (shape.d, shape.group, shape.warps, shape.threads());
    let (m, l, acc) = (&st.m, &st.l, &st.acc);
    let (lane, warp, col, kvh, token, part) = (
        st.lane.clone(),
        st.warp.clone(),
        st.col.clone(),
        st.kvh.clone(),
        st.token.clone(),
        st.part.clone(),
    );
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
    body.push(Stmt::Barrier);
    let ws = e.workspace(0, DType::F32, Access::Write);
    let parts = partitions_expr(e, out, shape.part);
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
    Ok(Body {
        what: "paged_attention_partial".into(),
        block_dim: threads,
        grid: [
            partitions(e, out, shape.part),
            SizeExpr::Const(shape.kv_heads as u64),
            size_of_dims(&q_shape[0..1]),
        ],
        stmts: body,
    })
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
    let most = e.var("most", Ty::F32);
    body.push(Stmt::Assign(most, f(f32::NEG_INFINITY)));
    let pv = e.var("p", ity);
    body.push(Stmt::For {
        var: pv,
        start: e.ix(0),
        end: parts.clone(),
        step: e.ix(1),
        body: vec![Stmt::Assign(
            most,
            Expr::var(most).max(Expr::load(
                ws,
                row.clone() + Expr::var(pv) * e.ix(d as i64 + 2) + e.ix(d as i64),
            )),
        )],
    });
    let (total, weighted) = (e.var("total", Ty::F32), e.var("weighted", Ty::F32));
    body.push(Stmt::Assign(total, f(0.0)));
    body.push(Stmt::Assign(weighted, f(0.0)));
    let pw = e.var("p", ity);
    let at = e.var("at", ity);
    let scale = e.var("scale", Ty::F32);
    body.push(Stmt::For {
        var: pw,
        start: e.ix(0),
        end: parts,
        step: e.ix(1),
        body: vec![
            Stmt::Assign(at, row + Expr::var(pw) * e.ix(d as i64 + 2)),
            Stmt::Assign(
                scale,
                Expr::select(
                    Expr::var(most).gt(f(f32::NEG_INFINITY)),
                    (Expr::load(ws, Expr::var(at) + e.ix(d as i64)) - Expr::var(most))
                        .apply(UnOp::Exp),
                    f(0.0),
                ),
            ),
            Stmt::Assign(
                total,
                Expr::fma(
                    Expr::load(ws, Expr::var(at) + e.ix(d as i64 + 1)),
                    Expr::var(scale),
                    Expr::var(total),
                ),
            ),
            Stmt::Assign(
                weighted,
                Expr::fma(
                    Expr::load(ws, Expr::var(at) + c.clone()),
                    Expr::var(scale),
                    Expr::var(weighted),
                ),
            ),
        ],
    });
    let value = Expr::select(
        Expr::var(total).gt(f(0.0)),
        Expr::binary(BinOp::Div, Expr::var(weighted), Expr::var(total)),
        f(0.0),
    );
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
