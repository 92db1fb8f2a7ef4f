//! The tensor-core attention prefill template (the FlashAttention-2 design, SM80
//! `mma.sync` path) for the built-in `attention` op with bf16 or f16 q/k/v read straight
//! from their buffers and head dims of 64 or 128.
//!
//! With one m16 row tile a warp, a block of 4 or 8 warps (`AttentionTuning::warps`)
//! takes 64 or 128 query rows of one (batch, head), each warp 16 of them:
//! - the Q tile is copied once (`cp.async`; a q computed in the kernel, RoPE's, is
//!   computed 8 elements a thread at a time and stored) into XOR-swizzled shared memory
//!   and its A fragments are loaded with `ldmatrix` into registers, where they stay;
//! - keys and values are visited in tiles of 64, each staged in swizzled shared memory by
//!   `cp.async` (16-byte chunks; rows past the sequence are zero-filled). With one stage
//!   (`AttentionTuning::stages`) a K and a V buffer alternate: V of a tile is copied while
//!   the warps compute its scores, K of the next tile while they weigh the values. With
//!   two (the default) each has two buffers: after one barrier a tile, the next tile's K
//!   and V are copied into the other pair while this tile is computed. Shared arrays
//!   beyond 48 KiB (D 128: 8 warps and 2 stages take 96 KiB) live in the kernel's dynamic
//!   shared memory, within the 99 KiB every target offers;
//! - `S = Q Kᵀ` by `mma.sync` m16n8k16 with f32 accumulators (K fragments by `ldmatrix`);
//!   the mask is applied only to tiles that need it (the diagonal tile of causal
//!   attention, the last tile of a ragged key count, every tile of a general mask), tiles
//!   that causal attention masks entirely are never visited;
//! - an online softmax in base 2 per row, in registers: the row maximum over the four
//!   lanes of a quad by shuffles, `exp2(s · scale · log2 e − m)`, running sums kept per
//!   lane and added across the quad once at the end;
//! - the probabilities are packed to the input type in registers (`PackHalves`): the
//!   accumulator layout of S is the A fragment layout of `P V`, so no shared memory is
//!   involved; V fragments come from `ldmatrix.trans`;
//! - the output is divided by the row sum and stored, rows past the sequence skipped.
//!
//! Two m16 row tiles a warp (`AttentionTuning::m_tiles`, the default with 4 warps): a
//! block of 4 warps takes 128 rows (8 warps 256), each warp 32, and every K or V fragment read from
//! shared memory feeds the `mma`s of both tiles (`mma_warp_tiles.rs`), halving the shared
//! memory read per row of math, which bounds the one-tile loop. The Q fragments are then
//! loaded again from the Q tile for each 16 columns of the head dim instead of held in
//! registers; at D 128 the block takes one stage (FlashAttention-2's: V during the scores,
//! the next K during `P V`) and a general mask keeps one row tile, which keeps ptxas
//! within 255 registers without spills on every target.
//!
//! GQA: query head h reads key/value head `h / (H / KV)`. Query and key counts need not
//! be multiples of the tile. The mask (`allow`) is recognised as all-true (`causal:
//! false`), as causal (`arange(S)[:, None] >= arange(S)[None, :]`, the stdlib's `causal:
//! true`), or else evaluated per score through its index expression, like the reference
//! template does (`attention_padded`).
//!
//! What it does not take (the reference template in `attention.rs` does): the stdlib
//! `softmax(q kᵀ) v` pattern and `paged_attention` (serving's prefill runs through the
//! paged cache), f32 or f8 operands, other head dims, k or v computed in the kernel or
//! read through a permute or a slice (the partition gives computed keys and values a
//! buffer), and non-positive scales.

use super::mma_gemm::{and_mask, i32c, shr, swizzle, CHUNK};
use super::mma_softmax::{
    chunk_at, online_softmax, pack_probabilities, quad_sum, scores, weigh_values, Rows,
};
use super::mma_warp_tiles::{scores_from_shared, weigh_values_tiles};
use super::{ceil_div_size, size_of_dims, Body};
use crate::emit::{add, lt, min_e, mul, EResult, Emitter};
use crate::AttentionTuning;
use kiln_ir::{BinaryOp, DType, Dim, Op, Value};
use kiln_kir::{Access, BinOp, Buf, Expr, MmaInput, SizeExpr, Special, Stmt, Ty, VarId};

/// Query rows of a warp.
const WARP_ROWS: i64 = 16;
/// Keys of a tile.
const BN: i64 = 64;

/// The block shape a tuning asks for at head dim `d`: 4 or 8 warps (at least 128 threads,
/// so a copy pass covers a multiple of 8 rows and keeps every row's swizzle), 1 or 2
/// stages, 1 or 2 m16 row tiles a warp. Two row tiles at D 128 take one stage: their
/// 128 output and 64 score accumulators leave too few registers for the addresses of a
/// prefetch of K and V during the scores (ptxas spills), and one stage (V copied during
/// the scores, the next K during `P V`) is FlashAttention-2's design at that shape; a
/// general mask at D 128 (evaluated per score) takes one row tile, for the same reason,
/// and 8 warps. Every shape fits 96 KiB of shared memory.
fn block_shape(tuning: &AttentionTuning, d: i64, mask: Mask) -> (i64, i64, i64) {
    let mut warps = if tuning.warps < 8 { 4 } else { 8 };
    let mut m_tiles = i64::from(tuning.m_tiles.clamp(1, 2));
    if m_tiles == 2 && mask == Mask::General && d == 128 {
        (warps, m_tiles) = (8, 1);
    }
    let stages = if m_tiles == 2 && d == 128 {
        1
    } else {
        i64::from(tuning.stages.clamp(1, 2))
    };
    (warps, stages, m_tiles)
}

/// How the `allow` operand masks the scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mask {
    /// Every key is allowed.
    Full,
    /// Query i sees keys `0..=i`.
    Causal,
    /// Evaluated per score from the operand's index expression.
    General,
}

/// What the template needs to know about an attention it can take.
pub(crate) struct FlashPlan {
    input: MmaInput,
    out: Value,
    /// The stored values whose buffers hold q, k and v (the operands themselves or the
    /// values they reshape: a reshape keeps the row-major order); `None` for a q the
    /// kernel computes (a fused prologue such as RoPE), staged through registers.
    q: Option<Value>,
    k: Value,
    v: Value,
    head_dim: i64,
    /// Query heads per key/value head.
    group: i64,
    scale: f32,
    mask: Mask,
    /// The values of a recognised mask's expression (for the kernel's op list).
    mask_values: Vec<Value>,
}

/// The stored value behind `v` through reshapes, if `v` is read from a buffer.
fn stored_source(e: &Emitter<'_, '_>, v: Value) -> Option<Value> {
    let mut x = v;
    while !e.is_loaded(x) {
        let Some(Op::Reshape { .. }) = e.g.op(x) else {
            return None;
        };
        x = e.g.inst(x)?.operands[0];
    }
    Some(x)
}

/// The plan for the `attention` op `out`, when the template applies.
pub(crate) fn plan(e: &Emitter<'_, '_>, out: Value) -> Option<FlashPlan> {
    let g = e.g;
    let inst = g.inst(out)?;
    let Op::Attention { scale } = inst.op else {
        return None;
    };
    let scale = scale as f32;
    if !(scale.is_finite() && scale > 0.0) {
        return None;
    }
    let (q, k, v, allow) = (
        inst.operands[0],
        inst.operands[1],
        inst.operands[2],
        inst.operands[3],
    );
    let input = match g.ty(q).dtype {
        DType::BF16 => MmaInput::Bf16,
        DType::F16 => MmaInput::F16,
        _ => return None,
    };
    let qs = g.shape(q);
    let head_dim = qs[3].as_const()? as i64;
    if head_dim != 64 && head_dim != 128 {
        return None;
    }
    let heads = qs[2].as_const()? as i64;
    let kv_heads = g.shape(k)[2].as_const()? as i64;
    if kv_heads == 0 || heads % kv_heads != 0 {
        return None;
    }
    let (mask, mask_values) = classify_mask(e, allow, &qs[1], &g.shape(k)[1]);
    Some(FlashPlan {
        input,
        out,
        q: stored_source(e, q),
        k: stored_source(e, k)?,
        v: stored_source(e, v)?,
        head_dim,
        group: heads / kv_heads,
        scale,
        mask,
        mask_values,
    })
}

/// The mask `allow` computes, with the values of its expression when recognised.
fn classify_mask(e: &Emitter<'_, '_>, allow: Value, s: &Dim, t: &Dim) -> (Mask, Vec<Value>) {
    let g = e.g;
    if let Some(Op::Full { value, .. }) = g.op(allow) {
        if *value != 0.0 && !e.is_loaded(allow) {
            return (Mask::Full, vec![allow]);
        }
    }
    // ge(arange(S).view(S, 1), arange(S).view(1, S)) or le with the operands swapped:
    // rows are queries, columns keys.
    let causal = (|| {
        if e.is_loaded(allow) || s != t || g.shape(allow) != [s.clone(), s.clone()] {
            return None;
        }
        let inst = g.inst(allow)?;
        let (row, col) = match inst.op {
            Op::Binary(BinaryOp::Ge) => (inst.operands[0], inst.operands[1]),
            Op::Binary(BinaryOp::Le) => (inst.operands[1], inst.operands[0]),
            _ => return None,
        };
        let arange_of = |x: Value, shape: [Dim; 2]| -> Option<(Value, Value)> {
            if e.is_loaded(x) || g.shape(x) != shape {
                return None;
            }
            let Some(Op::Reshape { .. }) = g.op(x) else {
                return None;
            };
            let a = g.inst(x)?.operands[0];
            match g.op(a)? {
                Op::Arange { len, .. } if len == s && !e.is_loaded(a) => Some((x, a)),
                _ => None,
            }
        };
        let (row_view, row_range) = arange_of(row, [s.clone(), Dim::Const(1)])?;
        let (col_view, col_range) = arange_of(col, [Dim::Const(1), s.clone()])?;
        Some(vec![allow, row_view, row_range, col_view, col_range])
    })();
    match causal {
        Some(values) => (Mask::Causal, values),
        None => (Mask::General, Vec::new()),
    }
}

pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    p: &FlashPlan,
    tuning: &AttentionTuning,
) -> EResult<Body> {
    let (warps, stages, m_tiles) = block_shape(tuning, p.head_dim, p.mask);
    let threads = 32 * warps;
    // Query rows of a warp, `m_tiles` m16 tiles.
    let warp_rows = WARP_ROWS * m_tiles;
    let bm = warp_rows * warps;
    let g = e.g;
    let inst = g.inst(p.out).expect("attention");
    let (q_op, k_op, allow) = (inst.operands[0], inst.operands[1], inst.operands[3]);
    let q_shape = g.shape(q_op).to_vec();
    let k_shape = g.shape(k_op).to_vec();
    let dtype = g.ty(q_op).dtype;
    let ity = e.index_ty;
    let index = |x: Expr| -> Expr {
        if ity == Ty::I64 {
            Expr::Cast(Ty::I64, Box::new(x))
        } else {
            x
        }
    };
    let d = p.head_dim;
    let chunks = d / CHUNK;
    let rows_per_pass = threads / chunks;
    // Copies of Q tiles of `bm` rows and K/V tiles of `BN`, `rows_per_pass` rows a pass.
    let q_passes = bm / rows_per_pass;
    let kv_passes = BN / rows_per_pass;
    // Elements of one K or V tile: the offset of the second stage.
    let stage_elems = BN * d;
    let k16 = (d / 16) as usize;
    let causal = p.mask == Mask::Causal;
    let scale2 = (f64::from(p.scale) * std::f64::consts::LOG2_E) as f32;
    let neg_inf = Expr::f32(f32::NEG_INFINITY);
    let mut body = Vec::new();

    // ---- the block's (batch, head) and query tile.
    let tid = Expr::Special(Special::ThreadIdx);
    let lane = e.bind(&mut body, "lane", Ty::I32, Expr::Special(Special::LaneId));
    let warp = e.bind(&mut body, "warp", Ty::I32, Expr::Special(Special::WarpId));
    let bz = e.special(Special::BlockIdx(2));
    let bh = e.delinearize(&mut body, bz, &[q_shape[0].clone(), q_shape[2].clone()]);
    let (b, h) = (bh[0].clone(), bh[1].clone());
    let kvh = e.bind(
        &mut body,
        "kv_head",
        ity,
        Expr::binary(BinOp::Div, h.clone(), e.ix(p.group)),
    );
    let s_len = e.dim(&q_shape[1]);
    let t_len = e.dim(&k_shape[1]);
    // Causal blocks with the most key tiles start first.
    let first_row = |e: &mut Emitter<'_, '_>| {
        let bx = e.special(Special::BlockIdx(0));
        let q_tile = if causal {
            let tiles = Expr::binary(BinOp::Div, s_len.clone() + e.ix(bm - 1), e.ix(bm));
            tiles - e.ix(1) - bx
        } else {
            bx
        };
        q_tile * e.ix(bm)
    };
    let m0 = first_row(e);
    let m0 = e.bind(&mut body, "m0", ity, m0);
    // Keys the block visits: all, or those up to its last query row (causal).
    let n_end = if causal {
        min_e(t_len.clone(), m0.clone() + e.ix(bm))
    } else {
        t_len.clone()
    };
    let n_end = e.bind(&mut body, "n_end", ity, n_end);

    // ---- shared tiles and the copies: thread tid copies chunk `tid % chunks` of rows
    // `tid / chunks + rows_per_pass · pass`.
    let q_tile_buf = e.shared_array("q_tile", dtype, (bm * d) as u32);
    let k_tile_buf = e.shared_array("k_tile", dtype, (stages * stage_elems) as u32);
    let v_tile_buf = e.shared_array("v_tile", dtype, (stages * stage_elems) as u32);
    let q_buf = p.q.map(|q| e.buffer(q, Access::Read));
    let k_buf = e.buffer(p.k, Access::Read);
    let v_buf = e.buffer(p.v, Access::Read);
    let col = e.bind(
        &mut body,
        "copy_col",
        Ty::I32,
        and_mask(tid.clone(), chunks - 1) * i32c(CHUNK),
    );
    let row0 = e.bind(
        &mut body,
        "copy_row",
        Ty::I32,
        shr(tid.clone(), chunks.trailing_zeros()),
    );
    let dst0 = row0.clone() * i32c(d)
        + Expr::binary(
            BinOp::Xor,
            shr(col.clone(), 3),
            swizzle(row0.clone(), chunks as u32),
        ) * i32c(CHUNK);
    let dst0 = e.bind(&mut body, "copy_dst", Ty::I32, dst0);
    let kv_src = e.linear(
        &k_shape,
        &[
            b.clone(),
            index(row0.clone()),
            kvh.clone(),
            index(col.clone()),
        ],
    );
    let kv_src = e.bind(&mut body, "kv_src", ity, kv_src);
    let q_row_stride = mul_dims(e, &q_shape[2..]);
    let kv_row_stride = mul_dims(e, &k_shape[2..]);
    // The copies of `passes` passes of rows from `src` (the element of row `row0` at the
    // tile's first row), of which `rows_left` (counted from `row0`) exist, to `dst` at
    // `dst_off` (the stage of a double-buffered tile).
    let copies = |e: &mut Emitter<'_, '_>,
                  out: &mut Vec<Stmt>,
                  dst: Buf,
                  dst_off: Option<&Expr>,
                  passes: i64,
                  src_buf: Buf,
                  src: Expr,
                  stride: &Expr,
                  rows_left: Expr| {
        let rows_left = e.bind(out, "rows_left", ity, rows_left);
        let dst_at = match dst_off {
            Some(off) => e.bind(out, "copy_at", Ty::I32, dst0.clone() + off.clone()),
            None => dst0.clone(),
        };
        for pass in 0..passes {
            let row = pass * rows_per_pass;
            let valid = lt(e.ix(row), rows_left.clone());
            let at = add(src.clone(), mul(e.ix(row), stride.clone()));
            out.push(Stmt::CpAsync {
                dst,
                dst_index: add(dst_at.clone(), i32c(row * d)),
                src: src_buf,
                src_index: Expr::select(valid.clone(), at, e.ix(0)),
                src_len: Expr::select(valid, i32c(CHUNK), i32c(0)),
            });
        }
    };
    let kv_copies = |e: &mut Emitter<'_, '_>,
                     out: &mut Vec<Stmt>,
                     dst: Buf,
                     dst_off: Option<&Expr>,
                     src: Buf,
                     n0: Expr| {
        let from = e.bind(
            out,
            "kv_at",
            ity,
            add(kv_src.clone(), mul(n0.clone(), kv_row_stride.clone())),
        );
        let left = t_len.clone() - n0 - index(row0.clone());
        copies(
            e,
            out,
            dst,
            dst_off,
            kv_passes,
            src,
            from,
            &kv_row_stride,
            left,
        );
    };

    // ---- fragment addresses. Lane 8q + r gives row r of matrix q of an ldmatrix x4.
    let lr = e.bind(&mut body, "ld_row", Ty::I32, and_mask(lane.clone(), 7));
    let lq = e.bind(
        &mut body,
        "ld_q",
        Ty::I32,
        and_mask(shr(lane.clone(), 3), 1),
    );
    let lh = e.bind(&mut body, "ld_h", Ty::I32, shr(lane.clone(), 4));
    // Rows are multiples of 8 plus `lr`, so every swizzle below is `^ lr`; chunk `2c + x`
    // (x of 0 or 1) swizzles to `2c ^ (x ^ lr)`.
    let q_row = warp.clone() * i32c(warp_rows) + lq.clone() * i32c(8) + lr.clone();
    let q_base = e.bind(&mut body, "q_ld", Ty::I32, q_row * i32c(d));
    let q_x = e.bind(
        &mut body,
        "q_x",
        Ty::I32,
        Expr::binary(BinOp::Xor, lh.clone(), lr.clone()),
    );
    let k_base = e.bind(
        &mut body,
        "k_ld",
        Ty::I32,
        (lh.clone() * i32c(8) + lr.clone()) * i32c(d),
    );
    let k_x = e.bind(
        &mut body,
        "k_x",
        Ty::I32,
        Expr::binary(BinOp::Xor, lq.clone(), lr.clone()),
    );
    let v_base = e.bind(
        &mut body,
        "v_ld",
        Ty::I32,
        (lq.clone() * i32c(8) + lr.clone()) * i32c(d),
    );
    let v_x = e.bind(
        &mut body,
        "v_x",
        Ty::I32,
        Expr::binary(BinOp::Xor, lh.clone(), lr.clone()),
    );

    // ---- Q and the first K tile, then the Q fragments into registers.
    match q_buf {
        Some(q_buf) => {
            let q_src = e.linear(
                &q_shape,
                &[
                    b.clone(),
                    m0.clone() + index(row0.clone()),
                    h.clone(),
                    index(col.clone()),
                ],
            );
            let q_src = e.bind(&mut body, "q_src", ity, q_src);
            let q_left = s_len.clone() - m0.clone() - index(row0.clone());
            copies(
                e,
                &mut body,
                q_tile_buf,
                None,
                q_passes,
                q_buf,
                q_src,
                &q_row_stride,
                q_left,
            );
        }
        None => {
            // Rows past the sequence are zeros; their (clamped) elements are computed.
            for pass in 0..q_passes {
                let row = e.bind(
                    &mut body,
                    "q_row",
                    ity,
                    m0.clone() + index(row0.clone()) + e.ix(pass * rows_per_pass),
                );
                let ok = e.bind(&mut body, "q_ok", Ty::Pred, lt(row.clone(), s_len.clone()));
                let at = [
                    b.clone(),
                    min_e(row, s_len.clone() - e.ix(1)),
                    h.clone(),
                    index(col.clone()),
                ];
                e.push_scope();
                let values = e.elem(&mut body, q_op, &at, CHUNK as usize)?;
                e.pop_scope();
                body.push(Stmt::StoreVec {
                    buf: q_tile_buf,
                    index: dst0.clone() + i32c(pass * rows_per_pass * d),
                    values: values
                        .into_iter()
                        .map(|x| Expr::select(ok.clone(), x, Expr::f32(0.0)))
                        .collect(),
                });
            }
        }
    }
    kv_copies(e, &mut body, k_tile_buf, None, k_buf, e.ix(0));
    if stages == 2 {
        kv_copies(e, &mut body, v_tile_buf, None, v_buf, e.ix(0));
    }
    body.push(Stmt::CpAsyncCommit);
    body.push(Stmt::CpAsyncWait(0));
    body.push(Stmt::Barrier);
    // One m16 tile a warp: its Q fragments stay in registers. Two: a slice's fragments of
    // both tiles are loaded for each 16 columns of the head dim (`scores_from_shared`).
    let q_frag: Vec<[VarId; 4]> = if m_tiles == 1 {
        let q_frag: Vec<[VarId; 4]> = (0..k16)
            .map(|_| [0; 4].map(|_| e.var("fq", Ty::I32)))
            .collect();
        for (kk, frag) in q_frag.iter().enumerate() {
            body.push(Stmt::LdMatrix {
                dsts: frag.to_vec(),
                trans: false,
                buf: q_tile_buf,
                index: q_base.clone() + chunk_at(kk as i64, &q_x),
            });
        }
        q_frag
    } else {
        (0..m_tiles)
            .map(|_| [0; 4].map(|_| e.var("fq", Ty::I32)))
            .collect()
    };

    // ---- per-row state of each m16 tile `mt` of the warp: rows g and g + 8 of its 16
    // (g = lane / 4, t = lane % 4).
    let mut rows = Vec::new();
    let mut o_acc: Vec<Vec<[VarId; 4]>> = Vec::new();
    for _ in 0..m_tiles {
        rows.push(Rows::new(e, &mut body));
        let acc: Vec<[VarId; 4]> = (0..d / 8)
            .map(|_| [0; 4].map(|_| e.var("o", Ty::F32)))
            .collect();
        for cells in &acc {
            for &c in cells {
                body.push(Stmt::Assign(c, Expr::f32(0.0)));
            }
        }
        o_acc.push(acc);
    }
    let quad_g = shr(lane.clone(), 2);
    let quad_t = and_mask(lane.clone(), 3);
    // The query of the thread's first row; its key within a tile at column 2t.
    let q_first = m0.clone() + index(warp.clone() * i32c(warp_rows) + quad_g);
    let q_first = e.bind(&mut body, "query", ity, q_first);
    let key_col = e.bind(&mut body, "key_col", ity, index(quad_t * i32c(2)));

    // ---- the key tiles.
    let n0v = e.var("n0", ity);
    let n0 = Expr::Var(n0v);
    let mut tile = vec![Stmt::CpAsyncWait(0), Stmt::Barrier];
    // With two stages, the element offset of this tile's stage (0 or `stage_elems`), and
    // the next tile's K and V stream into the other stage while this one is computed:
    // every warp is past the barrier, so done with the tile that stage held.
    let stage = (stages == 2).then(|| e.var("stage", Ty::I32));
    let (k_at, v_at) = match stage {
        Some(stage) => {
            body.push(Stmt::Assign(stage, i32c(0)));
            let other = e.bind(
                &mut tile,
                "other_stage",
                Ty::I32,
                i32c(stage_elems) - Expr::var(stage),
            );
            let next = e.bind(&mut tile, "next", ity, n0.clone() + e.ix(BN));
            let mut prefetch = Vec::new();
            kv_copies(
                e,
                &mut prefetch,
                k_tile_buf,
                Some(&other),
                k_buf,
                next.clone(),
            );
            kv_copies(
                e,
                &mut prefetch,
                v_tile_buf,
                Some(&other),
                v_buf,
                next.clone(),
            );
            tile.push(Stmt::if_then(lt(next, n_end.clone()), prefetch));
            tile.push(Stmt::CpAsyncCommit);
            let k_at = e.bind(
                &mut tile,
                "k_at",
                Ty::I32,
                k_base.clone() + Expr::var(stage),
            );
            let v_at = e.bind(
                &mut tile,
                "v_at",
                Ty::I32,
                v_base.clone() + Expr::var(stage),
            );
            (k_at, v_at)
        }
        None => {
            // V of this tile streams in while the scores are computed.
            kv_copies(e, &mut tile, v_tile_buf, None, v_buf, n0.clone());
            tile.push(Stmt::CpAsyncCommit);
            (k_base.clone(), v_base.clone())
        }
    };
    let mut s_acc: Vec<Vec<[VarId; 4]>> = Vec::new();
    for _ in 0..m_tiles {
        let acc: Vec<[VarId; 4]> = (0..BN / 8)
            .map(|_| [0; 4].map(|_| e.var("s", Ty::F32)))
            .collect();
        for cells in &acc {
            for &c in cells {
                tile.push(Stmt::Assign(c, Expr::f32(0.0)));
            }
        }
        s_acc.push(acc);
    }
    let kb: [VarId; 4] = [0; 4].map(|_| e.var("fk", Ty::I32));
    if m_tiles == 1 {
        scores(
            &mut tile, p.input, &q_frag, &s_acc[0], kb, k_tile_buf, &k_at, &k_x, d,
        );
    } else {
        scores_from_shared(
            &mut tile, p.input, q_tile_buf, &q_base, &q_x, &q_frag, &s_acc, kb, k_tile_buf, &k_at,
            &k_x, d,
        );
    }
    // The mask, where the tile needs one.
    let key0 = e.bind(&mut tile, "key0", ity, n0.clone() + key_col.clone());
    let mut masked = Vec::new();
    let keys_left = e.bind(&mut masked, "keys_left", ity, t_len.clone() - key0.clone());
    let ahead = if causal {
        Some(e.bind(&mut masked, "ahead", ity, key0.clone() - q_first.clone()))
    } else {
        None
    };
    for (ni, cells) in s_acc.iter().flatten().enumerate() {
        // Tile `mt` of the warp's rows, 8-key column block `nk`.
        let (mt, nk) = (ni as i64 / (BN / 8), ni as i64 % (BN / 8));
        for (j, &cell) in cells.iter().enumerate() {
            let (key_off, row_off) = (8 * nk + (j % 2) as i64, 16 * mt + 8 * (j / 2) as i64);
            let mut ok = lt(e.ix(key_off), keys_left.clone());
            if let Some(ahead) = &ahead {
                // key0 + key_off <= query + row_off
                ok = Expr::binary(
                    BinOp::And,
                    ok,
                    Expr::binary(BinOp::Le, ahead.clone(), e.ix(row_off - key_off)),
                );
            }
            if p.mask == Mask::General {
                let key = min_e(key0.clone() + e.ix(key_off), t_len.clone() - e.ix(1));
                let query = min_e(q_first.clone() + e.ix(row_off), s_len.clone() - e.ix(1));
                let full = [b.clone(), h.clone(), query, key];
                let shape = g.shape(allow);
                let pad = 4 - shape.len();
                let at: Vec<Expr> = shape
                    .iter()
                    .enumerate()
                    .map(|(a, dim)| {
                        if *dim == Dim::Const(1) {
                            e.ix(0)
                        } else {
                            full[a + pad].clone()
                        }
                    })
                    .collect();
                e.push_scope();
                let allowed = e.elem(&mut masked, allow, &at, 1)?.remove(0);
                e.pop_scope();
                ok = Expr::binary(BinOp::And, ok, allowed);
            }
            masked.push(Stmt::Assign(
                cell,
                Expr::select(ok, Expr::var(cell), neg_inf.clone()),
            ));
        }
    }
    let needs_mask = match p.mask {
        Mask::General => Expr::pred(true),
        Mask::Full => lt(t_len.clone(), n0.clone() + e.ix(BN)),
        Mask::Causal => Expr::binary(
            BinOp::Or,
            lt(t_len.clone(), n0.clone() + e.ix(BN)),
            lt(m0.clone(), n0.clone() + e.ix(BN - 1)),
        ),
    };
    if p.mask == Mask::General {
        tile.extend(masked);
    } else {
        tile.push(Stmt::if_then(needs_mask, masked));
    }
    // Online softmax (base 2) of the thread's two rows; P as the A fragments of P V.
    let other = e.var("other", Ty::F32);
    let red = e.var("red", Ty::F32);
    let mut p_frag = Vec::new();
    for ((s, r), o) in s_acc.iter().zip(&rows).zip(&o_acc) {
        online_softmax(e, &mut tile, s, r, o, scale2, other, red);
        p_frag.push(pack_probabilities(e, &mut tile, s, p.input));
    }
    if stage.is_none() {
        // V has landed and every warp is done with K: the next K tile streams in while
        // the values are weighed.
        tile.push(Stmt::CpAsyncWait(0));
        tile.push(Stmt::Barrier);
        let next = e.bind(&mut tile, "next", ity, n0.clone() + e.ix(BN));
        let mut prefetch = Vec::new();
        kv_copies(e, &mut prefetch, k_tile_buf, None, k_buf, next.clone());
        tile.push(Stmt::if_then(lt(next, n_end.clone()), prefetch));
        tile.push(Stmt::CpAsyncCommit);
    }
    let vb: [VarId; 4] = [0; 4].map(|_| e.var("fv", Ty::I32));
    if m_tiles == 1 {
        weigh_values(
            &mut tile, p.input, &p_frag[0], &o_acc[0], vb, v_tile_buf, &v_at, &v_x, d,
        );
    } else {
        weigh_values_tiles(
            &mut tile, p.input, &p_frag, &o_acc, vb, v_tile_buf, &v_at, &v_x, d,
        );
    }
    if let Some(stage) = stage {
        tile.push(Stmt::Assign(stage, i32c(stage_elems) - Expr::var(stage)));
    }
    body.push(Stmt::For {
        var: n0v,
        start: e.ix(0),
        end: n_end,
        step: e.ix(BN),
        body: tile,
    });
    body.push(Stmt::CpAsyncWait(0));

    // ---- the row sums over the quad, the division and the store.
    let (b, h, q_first, key_col) = if m_tiles == 1 {
        (b, h, q_first, key_col)
    } else {
        // Two row tiles leave few registers: the store's coordinates are computed again
        // from the special registers rather than kept across the key loop.
        let lane = e.bind(&mut body, "lane", Ty::I32, Expr::Special(Special::LaneId));
        let warp = e.bind(&mut body, "warp", Ty::I32, Expr::Special(Special::WarpId));
        let bz = e.special(Special::BlockIdx(2));
        let bh = e.delinearize(&mut body, bz, &[q_shape[0].clone(), q_shape[2].clone()]);
        let m0 = first_row(e);
        let q_first = m0 + index(warp * i32c(warp_rows) + shr(lane.clone(), 2));
        let q_first = e.bind(&mut body, "query", ity, q_first);
        let key_col = index(and_mask(lane, 3) * i32c(2));
        let key_col = e.bind(&mut body, "key_col", ity, key_col);
        (bh[0].clone(), bh[1].clone(), q_first, key_col)
    };
    for (mt, (rows, o_acc)) in rows.iter().zip(&o_acc).enumerate() {
        for r in 0..2 {
            quad_sum(&mut body, rows.sum[r], other);
            let inv = e.bind(
                &mut body,
                "inv",
                Ty::F32,
                Expr::f32(1.0) / Expr::var(rows.sum[r]),
            );
            let query = e.bind(
                &mut body,
                "out_row",
                ity,
                q_first.clone() + e.ix(16 * mt as i64 + 8 * r as i64),
            );
            let mut store = Vec::new();
            for (nd, cells) in o_acc.iter().enumerate() {
                let col = key_col.clone() + e.ix(8 * nd as i64);
                let idx = [b.clone(), query.clone(), h.clone(), col];
                let values = vec![
                    Expr::var(cells[2 * r]) * inv.clone(),
                    Expr::var(cells[2 * r + 1]) * inv.clone(),
                ];
                e.store(&mut store, p.out, &idx, values);
            }
            body.push(Stmt::if_then(lt(query, s_len.clone()), store));
        }
    }

    e.fused.insert(p.out);
    e.fused.extend(p.mask_values.iter().copied());
    let batch_heads = size_of_dims(&[q_shape[0].clone(), q_shape[2].clone()]);
    let what = format!(
        "flash_attention_{bm}x{BN}{}{}_d{d}{}",
        if stages == 2 { "x2" } else { "" },
        if m_tiles == 2 { "_m2" } else { "" },
        match p.mask {
            Mask::Full => "",
            Mask::Causal => "_causal",
            Mask::General => "_masked",
        }
    );
    Ok(Body {
        what,
        block_dim: threads as u32,
        grid: [
            ceil_div_size(size_of_dims(&q_shape[1..2]), bm as u64),
            SizeExpr::Const(1),
            batch_heads,
        ],
        stmts: body,
    })
}

/// The product of `dims` in the index type.
fn mul_dims(e: &mut Emitter<'_, '_>, dims: &[Dim]) -> Expr {
    let mut acc: Option<Expr> = None;
    for dim in dims {
        let x = e.dim(dim);
        acc = Some(match acc {
            Some(a) => mul(a, x),
            None => x,
        });
    }
    acc.unwrap_or_else(|| e.ix(1))
}
