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
        (d.is_multiple_of(32) && d <= 256 && kv > 0 && h % kv == 0).then_some(PagedShape {
            d,
            group: h / kv,
            kv_heads: kv,
            layer,
            scale: scale as f32,
            part: tuning.part.max(1),
            unroll: tuning.unroll.max(1),
            warps: tuning.warps.clamp(1, 32),
        })
    }

    fn threads(&self) -> u32 {
        self.warps * 32
    }

    /// Elements of a row each lane holds.
    fn per_lane(&self) -> usize {
        self.d / 32
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

/// `x` converted to the index type.
fn index(e: &Emitter<'_, '_>, x: Expr) -> Expr {
    Expr::Cast(e.index_ty, Box::new(x))
}

fn f(x: f32) -> Expr {
    Expr::f32(x)
}

/// The first kernel: one partition of one token for the query heads of one key/value head.
pub(crate) fn emit_partial(
    e: &mut Emitter<'_, '_>,
    out: Value,
    shape: &PagedShape,
) -> EResult<Body> {
    let g = e.g;
    let inst = g.inst(out).expect("paged_attention");
    let [q, k_cache, v_cache, tables, seq, pos] = [0, 1, 2, 3, 4, 5].map(|i| inst.operands[i]);
    let ity = e.index_ty;
    let (d, group, per_lane) = (shape.d, shape.group, shape.per_lane());
    let (warps, unroll, threads) = (shape.warps, shape.unroll, shape.threads());
    let mut body = Vec::new();
    let part = e.special(Special::BlockIdx(0));
    let part = e.bind(&mut body, "part", ity, part);
    let kvh = e.special(Special::BlockIdx(1));
    let kvh = e.bind(&mut body, "kv_head", ity, kvh);
    let token = e.special(Special::BlockIdx(2));
    let token = e.bind(&mut body, "token", ity, token);
    let lane = e.special(Special::LaneId);
    let lane = e.bind(&mut body, "lane", ity, lane);
    let warp = e.special(Special::WarpId);
    let warp = e.bind(&mut body, "warp", ity, warp);
    let col = e.bind(&mut body, "col", ity, lane.clone() * e.ix(per_lane as i64));
    // The token's sequence and key count, and this partition's key range.
    let s = e
        .elem(&mut body, seq, std::slice::from_ref(&token), 1)?
        .remove(0);
    let s = e.bind(&mut body, "seq", ity, index(e, s));
    let p = e
        .elem(&mut body, pos, std::slice::from_ref(&token), 1)?
        .remove(0);
    let context = Expr::select(s.clone().lt(e.ix(0)), e.ix(0), index(e, p) + e.ix(1));
    let context = e.bind(&mut body, "context", ity, context);
    let start = e.bind(
        &mut body,
        "start",
        ity,
        part.clone() * e.ix(shape.part as i64),
    );
    let end = e.bind(
        &mut body,
        "end",
        ity,
        context.min(start.clone() + e.ix(shape.part as i64)),
    );
    let block_size = e.dim(&g.shape(k_cache)[2]);
    // The query rows of the group, this lane's columns, in registers.
    let mut qv: Vec<Vec<Expr>> = Vec::with_capacity(group);
    for gi in 0..group {
        let head = kvh.clone() * e.ix(group as i64) + e.ix(gi as i64);
        let head = e.bind(&mut body, "head", ity, head);
        e.push_scope();
        let vals = e.elem(&mut body, q, &[token.clone(), head, col.clone()], per_lane)?;
        e.pop_scope();
        let regs = vals
            .into_iter()
            .map(|v| e.bind(&mut body, "q", Ty::F32, v))
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
    for gi in 0..group {
        // Scores of the `unroll` keys: lane partial dot products summed across the warp.
        let mut scores = Vec::with_capacity(unroll);
        for u in 0..unroll {
            let dot = e.var("dot", Ty::F32);
            let mut sum = qv[gi][0].clone() * keys[u][0].clone();
            for c in 1..per_lane {
                sum = Expr::fma(qv[gi][c].clone(), keys[u][c].clone(), sum);
            }
            step.push(Stmt::Assign(dot, sum));
            let other = e.var("other", Ty::F32);
            for mask in [16u32, 8, 4, 2, 1] {
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
            scores.push(e.bind(&mut step, "score", Ty::F32, score));
        }
        let mut most = Expr::var(m[gi]);
        for sc in &scores {
            most = most.max(sc.clone());
        }
        let m_new = e.bind(&mut step, "m_new", Ty::F32, most);
        // While every key so far is masked the max is -inf: keep the sums at 0.
        let live = e.bind(
            &mut step,
            "live",
            Ty::Pred,
            m_new.clone().gt(f(f32::NEG_INFINITY)),
        );
        let alpha = Expr::select(
            live.clone(),
            (Expr::var(m[gi]) - m_new.clone()).apply(UnOp::Exp),
            f(1.0),
        );
        let alpha = e.bind(&mut step, "alpha", Ty::F32, alpha);
        let weights: Vec<Expr> = scores
            .iter()
            .map(|sc| {
                let w = Expr::select(
                    live.clone(),
                    (sc.clone() - m_new.clone()).apply(UnOp::Exp),
                    f(0.0),
                );
                e.bind(&mut step, "w", Ty::F32, w)
            })
            .collect();
        let mut total = Expr::var(l[gi]) * alpha.clone();
        for w in &weights {
            total = total + w.clone();
        }
        step.push(Stmt::Assign(l[gi], total));
        for c in 0..per_lane {
            let mut a = Expr::var(acc[gi][c]) * alpha.clone();
            for (u, w) in weights.iter().enumerate() {
                a = Expr::fma(w.clone(), values[u][c].clone(), a);
            }
            step.push(Stmt::Assign(acc[gi][c], a));
        }
        step.push(Stmt::Assign(m[gi], m_new));
    }
    body.push(Stmt::For {
        var: j0,
        start: start.clone(),
        end: end.clone(),
        step: e.ix(i64::from(warps) * unroll as i64),
        body: step,
    });
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
        for (c, a) in acc[gi].iter().enumerate() {
            let at = warp.clone() * e.ix((group * d) as i64)
                + e.ix((gi * d) as i64)
                + col.clone()
                + e.ix(c as i64);
            body.push(Stmt::store(sums, at, Expr::var(*a)));
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
    let q_shape = g.shape(q);
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
