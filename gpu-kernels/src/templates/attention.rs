//! The attention template (reference, correctness first): one block of 128 threads per
//! (batch, head, query row). The query row is staged in shared memory; keys are visited in
//! chunks of 128, one key per thread: the score is `q · k` followed by the graph's own
//! element-wise prologue (scale, mask) inlined through index expressions, then an online
//! softmax (running max and sum, block-wide through shuffles and shared memory) weighs the
//! value rows into per-thread output accumulators. q/k/v prologues (rope, bias, the GQA
//! head broadcast) are inlined into their loads.
//!
//! The same kernel serves `paged_attention`: one block per (token, head), its keys are the
//! token's sequence positions `0..=pos`, each read through the block table from the paged
//! caches.

use super::matmul::batch_index;
use super::{size_of_dims, Body};
use crate::emit::{add, bin, lt, min_e, sub, Binding, EResult, Emitter};
use crate::error::EmitError;
use crate::partition::AttentionParts;
use kiln_ir::{DType, Dim};
use kiln_ir::{Op, Value};
use kiln_kir::{BinOp, Buf, Const, Expr, Special, Stmt, Ty, UnOp, VarId};

const THREADS: u32 = 128;
const WARPS: u32 = THREADS / 32;

/// Which attention the kernel computes.
pub(crate) enum Source<'p> {
    /// The stdlib pattern `softmax(prologue(q @ kᵀ)) @ v`.
    Pattern(&'p AttentionParts),
    /// The built-in op `attention(q [B, S, H, D], k, v [B, T, KV, D], allow)`.
    Builtin(Value),
    /// The built-in op `paged_attention(q [N, H, D], k_cache, v_cache [L, NB, BS, KV, D],
    /// block_tables, seq, pos)`.
    Paged(Value),
}

impl Source<'_> {
    /// The value the kernel stores.
    fn out(&self) -> Value {
        match self {
            Source::Pattern(p) => p.pv,
            Source::Builtin(v) | Source::Paged(v) => *v,
        }
    }
}

/// Where a paged kernel finds its keys: the cache layer, the token's block-table row and
/// the caches' block size.
struct PagedKeys {
    layer: i64,
    tables: Value,
    /// The token's sequence (row of the block tables), in the index type.
    seq: Expr,
    block_size: Expr,
}

/// Where the pieces of one (batch, head) live: the operands and their indices.
struct Layout {
    q: Value,
    k: Value,
    v: Value,
    /// Dims of the grid's z axis (batch and heads).
    batch_dims: Vec<Dim>,
    /// The key count, the same for every query row (`None`: per token, paged).
    sk: Option<Dim>,
    head: i64,
    dv: i64,
}

impl Layout {
    fn of(e: &Emitter<'_, '_>, source: &Source<'_>) -> EResult<Layout> {
        let g = e.g;
        match source {
            Source::Pattern(p) => {
                let qk_inst = g.inst(p.qk).expect("matmul");
                let qk_shape = g.shape(p.qk);
                let rank = qk_shape.len();
                if g.shape(p.pv)[..rank - 2] != qk_shape[..rank - 2] {
                    return Err(e.internal(p.pv, "attention batch dims differ between its matmuls"));
                }
                Ok(Layout {
                    q: qk_inst.operands[0],
                    k: qk_inst.operands[1],
                    v: g.inst(p.pv).expect("matmul").operands[1],
                    batch_dims: qk_shape[..rank - 2].to_vec(),
                    sk: Some(qk_shape[rank - 1].clone()),
                    head: g.shape(qk_inst.operands[0])[rank - 1]
                        .as_const()
                        .expect("checked by the pattern") as i64,
                    dv: g.shape(p.pv)[rank - 1]
                        .as_const()
                        .expect("checked by the pattern") as i64,
                })
            }
            Source::Builtin(out) => {
                let ops = &g.inst(*out).expect("attention").operands;
                let (qs, ks) = (g.shape(ops[0]), g.shape(ops[1]));
                let (Some(head), Some(dv)) = (qs[3].as_const(), g.shape(ops[2])[3].as_const())
                else {
                    return Err(EmitError::Fatal(crate::FusionError::Unsupported {
                        function: g.func.name.clone(),
                        value: *out,
                        op: "attention".into(),
                        reason: "the head dim must be a constant".into(),
                    }));
                };
                Ok(Layout {
                    q: ops[0],
                    k: ops[1],
                    v: ops[2],
                    batch_dims: vec![qs[0].clone(), qs[2].clone()],
                    sk: Some(ks[1].clone()),
                    head: head as i64,
                    dv: dv as i64,
                })
            }
            Source::Paged(out) => {
                let ops = &g.inst(*out).expect("paged_attention").operands;
                let qs = g.shape(ops[0]);
                let Some(head) = qs[2].as_const() else {
                    return Err(EmitError::Fatal(crate::FusionError::Unsupported {
                        function: g.func.name.clone(),
                        value: *out,
                        op: "paged_attention".into(),
                        reason: "the head dim must be a constant".into(),
                    }));
                };
                Ok(Layout {
                    q: ops[0],
                    k: ops[1],
                    v: ops[2],
                    batch_dims: vec![qs[0].clone(), qs[1].clone()],
                    sk: None,
                    head: head as i64,
                    dv: head as i64,
                })
            }
        }
    }
}

/// The query heads per key/value head of the built-in ops (heads are axis 2 of the
/// attention operands, axis 1 of paged q and axis 3 of the caches).
fn group_size(e: &Emitter<'_, '_>, out: Value) -> i64 {
    let inst = e.g.inst(out).expect("attention");
    let (q_axis, kv_axis) = match inst.op {
        Op::PagedAttention { .. } => (1, 3),
        _ => (2, 2),
    };
    let h = e.g.shape(inst.operands[0])[q_axis].as_const().unwrap_or(1);
    let kv = e.g.shape(inst.operands[1])[kv_axis]
        .as_const()
        .unwrap_or(1)
        .max(1);
    (h / kv) as i64
}

/// Index of q (`Q`), kᵀ or k (`K`), v (`V`) for a batch index and two positions.
#[derive(Clone, Copy, PartialEq)]
enum Operand {
    Q,
    K,
    V,
}

#[allow(clippy::too_many_arguments)]
fn operand_index(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    source: &Source<'_>,
    lay: &Layout,
    paged: Option<&PagedKeys>,
    which: Operand,
    batch: &[Expr],
    a: Expr,
    b: Expr,
) -> EResult<(Value, Vec<Expr>)> {
    let value = match which {
        Operand::Q => lay.q,
        Operand::K => lay.k,
        Operand::V => lay.v,
    };
    match source {
        Source::Pattern(_) => {
            let mut idx = batch_index(e, value, &lay.batch_dims, batch);
            idx.extend([a, b]);
            Ok((value, idx))
        }
        Source::Builtin(res) => {
            // batch = [b, h]; q [b, i, h, d]; k and v [b, j, h / group, d].
            let head = if which == Operand::Q {
                batch[1].clone()
            } else {
                crate::emit::div(batch[1].clone(), e.ix(group_size(e, *res)))
            };
            Ok((value, vec![batch[0].clone(), a, head, b]))
        }
        Source::Paged(res) => {
            // batch = [n, h]; q [n, h, d]; position a of the token's sequence lives at
            // [layer, block_tables[seq, a / BS], a % BS, h / group, d] of the caches.
            if which == Operand::Q {
                return Ok((value, vec![batch[0].clone(), batch[1].clone(), b]));
            }
            let keys = paged.expect("paged keys for a paged source");
            let ity = e.index_ty;
            let at = [
                keys.seq.clone(),
                crate::emit::div(a.clone(), keys.block_size.clone()),
            ];
            let block = e.elem(out, keys.tables, &at, 1)?.remove(0);
            let block = e.bind(out, "block", ity, Expr::Cast(ity, Box::new(block)));
            let head = crate::emit::div(batch[1].clone(), e.ix(group_size(e, *res)));
            let slot = crate::emit::rem(a, keys.block_size.clone());
            Ok((value, vec![e.ix(keys.layer), block, slot, head, b]))
        }
    }
}

pub(crate) fn emit(e: &mut Emitter<'_, '_>, source: &Source<'_>) -> EResult<Body> {
    let g = e.g;
    let lay = Layout::of(e, source)?;
    let batch_dims = lay.batch_dims.clone();
    let (head, dv) = (lay.head, lay.dv);
    let ity = e.index_ty;
    let f = |x: f32| Expr::Const(Const::F32(x));
    let mut body = Vec::new();
    let tid = e.special(Special::ThreadIdx);
    let i = e.special(Special::BlockIdx(0));
    let i = e.bind(&mut body, "qrow", ity, i);
    let bz = e.special(Special::BlockIdx(2));
    let batch = e.delinearize(&mut body, bz, &batch_dims);
    let paged = paged_keys(e, &mut body, source, &batch)?;
    let sk = match (&lay.sk, &paged) {
        (Some(d), _) => e.dim(d),
        (None, Some((_, context))) => context.clone(),
        (None, None) => return Err(e.internal(source.out(), "no key count")),
    };
    let paged = paged.map(|(keys, _)| keys);
    // Stage the query row.
    let q_row = e.shared_array("q_row", DType::F32, head as u32);
    let d = e.var("d", ity);
    let mut stage = Vec::new();
    e.push_scope();
    let (q, qi) = operand_index(
        e,
        &mut stage,
        source,
        &lay,
        paged.as_ref(),
        Operand::Q,
        &batch,
        i.clone(),
        Expr::Var(d),
    )?;
    let qv = e.elem(&mut stage, q, &qi, 1)?.remove(0);
    e.pop_scope();
    stage.push(Stmt::Store {
        buf: q_row,
        index: Expr::Var(d),
        value: qv,
    });
    body.push(Stmt::For {
        var: d,
        start: tid.clone(),
        end: e.ix(head),
        step: e.ix(i64::from(THREADS)),
        body: stage,
    });
    body.push(Stmt::Barrier);
    let m = e.var("m", Ty::F32);
    let l = e.var("l", Ty::F32);
    body.push(Stmt::Assign(m, f(f32::NEG_INFINITY)));
    body.push(Stmt::Assign(l, f(0.0)));
    let n_acc = (dv as usize).div_ceil(THREADS as usize);
    let accs: Vec<VarId> = (0..n_acc).map(|_| e.var("o", Ty::F32)).collect();
    for a in &accs {
        body.push(Stmt::Assign(*a, f(0.0)));
    }
    let probs = e.shared_array("p", DType::F32, THREADS);
    let max_part = e.shared_array("max_partial", DType::F32, WARPS);
    let sum_part = e.shared_array("sum_partial", DType::F32, WARPS);
    let j0 = e.var("j0", ity);
    let mut chunk = Vec::new();
    let j = e.bind(&mut chunk, "j", ity, add(Expr::Var(j0), tid.clone()));
    let in_range = e.bind(&mut chunk, "key_ok", Ty::Pred, lt(j.clone(), sk.clone()));
    let jc = min_e(j, sub(sk.clone(), e.ix(1)));
    let jc = e.bind(&mut chunk, "key", ity, jc);
    // Score of key jc: q · k, then the graph's prologue.
    let dot = e.var("dot", Ty::F32);
    chunk.push(Stmt::Assign(dot, f(0.0)));
    let dd = e.var("d", ity);
    let mut dloop = Vec::new();
    e.push_scope();
    // (Block-table loads of a paged key go before the dot-product loop.)
    let (kt, ki) = match source {
        Source::Pattern(_) => operand_index(
            e,
            &mut chunk,
            source,
            &lay,
            None,
            Operand::K,
            &batch,
            Expr::Var(dd),
            jc.clone(),
        )?,
        Source::Builtin(_) | Source::Paged(_) => operand_index(
            e,
            &mut chunk,
            source,
            &lay,
            paged.as_ref(),
            Operand::K,
            &batch,
            jc.clone(),
            Expr::Var(dd),
        )?,
    };
    let kv = e.elem(&mut dloop, kt, &ki, 1)?.remove(0);
    e.pop_scope();
    let qd = Expr::Load {
        buf: q_row,
        index: Box::new(Expr::Var(dd)),
    };
    dloop.push(Stmt::Assign(
        dot,
        Expr::Fma(Box::new(qd), Box::new(kv), Box::new(Expr::Var(dot))),
    ));
    chunk.push(Stmt::For {
        var: dd,
        start: e.ix(0),
        end: e.ix(head),
        step: e.ix(1),
        body: dloop,
    });
    let s = match source {
        Source::Pattern(p) => {
            let mut idx = batch.clone();
            idx.extend([i.clone(), jc.clone()]);
            e.bindings.push(Binding {
                value: p.qk,
                index: idx.clone(),
                expr: Expr::Var(dot),
            });
            e.push_scope();
            let s = e.elem(&mut chunk, p.scores, &idx, 1)?.remove(0);
            e.pop_scope();
            e.bindings.clear();
            s
        }
        Source::Builtin(out) => {
            let inst = g.inst(*out).expect("attention");
            let scale = match inst.op {
                Op::Attention { scale } => scale as f32,
                _ => 1.0,
            };
            let allow = inst.operands[3];
            let full = [batch[0].clone(), batch[1].clone(), i.clone(), jc.clone()];
            let shape = g.shape(allow);
            let pad = 4 - shape.len();
            let at: Vec<Expr> = shape
                .iter()
                .enumerate()
                .map(|(k, d)| {
                    if *d == Dim::Const(1) {
                        e.ix(0)
                    } else {
                        full[k + pad].clone()
                    }
                })
                .collect();
            e.push_scope();
            let ok = e.elem(&mut chunk, allow, &at, 1)?.remove(0);
            e.pop_scope();
            Expr::Select(
                Box::new(ok),
                Box::new(bin(BinOp::Mul, Expr::Var(dot), f(scale))),
                Box::new(f(f32::NEG_INFINITY)),
            )
        }
        Source::Paged(out) => {
            let scale = match g.inst(*out).expect("paged_attention").op {
                Op::PagedAttention { scale, .. } => scale as f32,
                _ => 1.0,
            };
            bin(BinOp::Mul, Expr::Var(dot), f(scale))
        }
    };
    let s = Expr::Select(
        Box::new(in_range),
        Box::new(s),
        Box::new(f(f32::NEG_INFINITY)),
    );
    let s = e.bind(&mut chunk, "score", Ty::F32, s);
    // Chunk maximum, new running maximum, rescale factor.
    let cmax = block_combine(e, &mut chunk, s.clone(), BinOp::Max, max_part);
    let m_new = e.bind(
        &mut chunk,
        "m_new",
        Ty::F32,
        bin(BinOp::Max, Expr::Var(m), cmax),
    );
    let dead = e.bind(
        &mut chunk,
        "all_masked",
        Ty::Pred,
        bin(BinOp::Eq, m_new.clone(), f(f32::NEG_INFINITY)),
    );
    let exp = |x: Expr| Expr::Unary(UnOp::Exp, Box::new(x));
    let scale = Expr::Select(
        Box::new(dead.clone()),
        Box::new(f(1.0)),
        Box::new(exp(bin(BinOp::Sub, Expr::Var(m), m_new.clone()))),
    );
    let scale = e.bind(&mut chunk, "scale", Ty::F32, scale);
    let pj = Expr::Select(
        Box::new(dead),
        Box::new(f(0.0)),
        Box::new(exp(bin(BinOp::Sub, s, m_new.clone()))),
    );
    let pj = e.bind(&mut chunk, "pj", Ty::F32, pj);
    let csum = block_combine(e, &mut chunk, pj.clone(), BinOp::Add, sum_part);
    chunk.push(Stmt::Assign(
        l,
        Expr::Fma(
            Box::new(Expr::Var(l)),
            Box::new(scale.clone()),
            Box::new(csum),
        ),
    ));
    chunk.push(Stmt::Store {
        buf: probs,
        index: tid.clone(),
        value: pj,
    });
    chunk.push(Stmt::Barrier);
    let keys = min_e(e.ix(i64::from(THREADS)), sub(sk.clone(), Expr::Var(j0)));
    let keys = e.bind(&mut chunk, "keys", ity, keys);
    for (c, acc) in accs.iter().enumerate() {
        let col = add(tid.clone(), e.ix(c as i64 * i64::from(THREADS)));
        let col = e.bind(&mut chunk, "col", ity, col);
        let mut then = vec![Stmt::Assign(
            *acc,
            bin(BinOp::Mul, Expr::Var(*acc), scale.clone()),
        )];
        let t = e.var("t", ity);
        let mut tloop = Vec::new();
        e.push_scope();
        let (v, vi) = operand_index(
            e,
            &mut tloop,
            source,
            &lay,
            paged.as_ref(),
            Operand::V,
            &batch,
            add(Expr::Var(j0), Expr::Var(t)),
            col.clone(),
        )?;
        let vv = e.elem(&mut tloop, v, &vi, 1)?.remove(0);
        e.pop_scope();
        let pt = Expr::Load {
            buf: probs,
            index: Box::new(Expr::Var(t)),
        };
        tloop.push(Stmt::Assign(
            *acc,
            Expr::Fma(Box::new(pt), Box::new(vv), Box::new(Expr::Var(*acc))),
        ));
        then.push(Stmt::For {
            var: t,
            start: e.ix(0),
            end: keys.clone(),
            step: e.ix(1),
            body: tloop,
        });
        chunk.push(Stmt::If {
            cond: lt(col, e.ix(dv)),
            then,
            otherwise: Vec::new(),
        });
    }
    chunk.push(Stmt::Barrier);
    chunk.push(Stmt::Assign(m, m_new));
    body.push(Stmt::For {
        var: j0,
        start: e.ix(0),
        end: sk,
        step: e.ix(i64::from(THREADS)),
        body: chunk,
    });
    for (c, acc) in accs.iter().enumerate() {
        let col = add(tid.clone(), e.ix(c as i64 * i64::from(THREADS)));
        let col = e.bind(&mut body, "col", ity, col);
        let out_idx = match source {
            Source::Pattern(_) => {
                let mut idx = batch.clone();
                idx.extend([i.clone(), col.clone()]);
                idx
            }
            Source::Builtin(_) => vec![batch[0].clone(), i.clone(), batch[1].clone(), col.clone()],
            Source::Paged(_) => vec![batch[0].clone(), batch[1].clone(), col.clone()],
        };
        let mut then = Vec::new();
        let value = bin(BinOp::Div, Expr::Var(*acc), Expr::Var(l));
        // A paged padding token has no keys: zeros rather than 0 / 0.
        let value = match source {
            Source::Paged(_) => Expr::Select(
                Box::new(bin(BinOp::Gt, Expr::Var(l), f(0.0))),
                Box::new(value),
                Box::new(f(0.0)),
            ),
            _ => value,
        };
        e.store(&mut then, source.out(), &out_idx, vec![value]);
        body.push(Stmt::If {
            cond: lt(col, e.ix(dv)),
            then,
            otherwise: Vec::new(),
        });
    }
    match source {
        Source::Pattern(p) => {
            for x in [p.qk, p.max, p.sum, p.pv, p.scores] {
                e.fused.insert(x);
            }
        }
        Source::Builtin(out) | Source::Paged(out) => {
            e.fused.insert(*out);
        }
    }
    let out_shape = g.shape(source.out());
    let sq = match source {
        Source::Paged(_) => super::one(),
        _ => size_of_dims(
            &out_shape[out_shape.len() - 3 + usize::from(matches!(source, Source::Pattern(_)))..]
                [..1],
        ),
    };
    Ok(Body {
        what: "attention".into(),
        block_dim: THREADS,
        grid: [sq, super::one(), size_of_dims(&batch_dims)],
        stmts: body,
    })
}

/// For a paged source: where its keys are, and the token's key count (its position + 1,
/// or 0 for a padding token).
fn paged_keys(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    source: &Source<'_>,
    batch: &[Expr],
) -> EResult<Option<(PagedKeys, Expr)>> {
    let Source::Paged(res) = source else {
        return Ok(None);
    };
    let g = e.g;
    let inst = g.inst(*res).expect("paged_attention");
    let Op::PagedAttention { layer, .. } = inst.op else {
        return Err(e.internal(*res, "not a paged_attention"));
    };
    let ity = e.index_ty;
    let token = [batch[0].clone()];
    let seq = e.elem(out, inst.operands[4], &token, 1)?.remove(0);
    let seq = e.bind(out, "seq", ity, Expr::Cast(ity, Box::new(seq)));
    let pos = e.elem(out, inst.operands[5], &token, 1)?.remove(0);
    let pos = Expr::Cast(ity, Box::new(pos));
    let context = Expr::Select(
        Box::new(lt(seq.clone(), e.ix(0))),
        Box::new(e.ix(0)),
        Box::new(add(pos, e.ix(1))),
    );
    let context = e.bind(out, "context", ity, context);
    let block_size = e.dim(&g.shape(inst.operands[1])[2]);
    Ok(Some((
        PagedKeys {
            layer: layer as i64,
            tables: inst.operands[3],
            seq,
            block_size,
        },
        context,
    )))
}

/// Combines `x` over the whole block with `op` (every thread gets the result).
fn block_combine(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    x: Expr,
    op: BinOp,
    partial: Buf,
) -> Expr {
    let acc = e.var("red", Ty::F32);
    let other = e.var("other", Ty::F32);
    out.push(Stmt::Assign(acc, x));
    for mask in [16u32, 8, 4, 2, 1] {
        out.push(Stmt::ShuffleXor {
            dst: other,
            src: acc,
            mask,
        });
        out.push(Stmt::Assign(acc, bin(op, Expr::Var(acc), Expr::Var(other))));
    }
    out.push(Stmt::If {
        cond: bin(
            BinOp::Eq,
            Expr::Special(Special::LaneId),
            Expr::Const(Const::I32(0)),
        ),
        then: vec![Stmt::Store {
            buf: partial,
            index: Expr::Special(Special::WarpId),
            value: Expr::Var(acc),
        }],
        otherwise: Vec::new(),
    });
    out.push(Stmt::Barrier);
    let load = |w: i32| Expr::Load {
        buf: partial,
        index: Box::new(Expr::Const(Const::I32(w))),
    };
    let mut total = load(0);
    for w in 1..WARPS as i32 {
        total = bin(op, total, load(w));
    }
    out.push(Stmt::Assign(acc, total));
    Expr::Var(acc)
}
