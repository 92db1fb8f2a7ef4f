//! The pointwise template: one thread per element (or per 2/4/8 contiguous elements with
//! vector loads and stores when the innermost dim is constant and divisible), exact grid.
//! When a transcendental operand is broadcast along a short outer axis (RoPE's sin and cos
//! are the same for every head), each thread walks up to 8 positions of that axis and computes
//! the operand once for them.
//!
//! Segments: when the kernel's concats along the innermost axis cut it into 2 to 4 equal
//! segments of whole vectors (RoPE's rotate-half: two halves), a thread computes the same
//! vector position of every segment. Each such concat then reads one known piece (the
//! emitter knows the index range: no clamped loads, no selects), and an element that one
//! segment reads from another (the rotation partner) is loaded once for both.

use super::Body;
use crate::emit::{add, lt, mul, shift, EResult, Emitter};
use crate::PointwiseTuning;
use kiln_ir::{BinaryOp, Dim, Inst, Op, UnaryOp, Value};
use kiln_kir::{Expr, Special, Stmt};
use std::collections::BTreeSet;

const THREADS: u32 = 256;
/// The longest axis considered for reusing a broadcast transcendental operand.
const MAX_REUSE_AXIS: u64 = 64;
/// The most segments of the innermost axis one thread covers.
const MAX_SEGMENTS: u64 = 4;

pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    shape: &[Dim],
    outputs: &[Value],
    tuning: &PointwiseTuning,
) -> EResult<Body> {
    let widest = outputs
        .iter()
        .map(|v| e.g.ty(*v).dtype.size_bytes())
        .max()
        .unwrap_or(4);
    let lanes = lanes_for(shape.last(), widest);
    let segments = if tuning.segments {
        segments(e, shape, outputs, lanes)
    } else {
        1
    };
    // Each thread walks `walk` consecutive positions of the reuse axis.
    let reuse = reuse_axis(e, shape, outputs).map(|(axis, n)| {
        let walk = (1..=tuning.max_walk.clamp(1, n))
            .rev()
            .find(|w| n % w == 0)
            .unwrap_or(1);
        (axis, n, walk)
    });
    let mut thread_shape = shape.to_vec();
    if let Some((axis, n, walk)) = reuse {
        thread_shape[axis] = Dim::Const(n / walk);
    }
    // With segments, the thread's innermost index is a position within the first segment.
    let seg_len = match thread_shape.last_mut() {
        Some(Dim::Const(n)) if segments > 1 => {
            *n /= segments;
            *n as i64
        }
        _ => 0,
    };
    let mut dims = thread_shape.clone();
    if let Some(Dim::Const(n)) = dims.last_mut() {
        *n /= lanes as u64;
    }
    let total = e.numel(&dims);
    let mut body = Vec::new();
    let block = e.special(Special::BlockIdx(0));
    let thread = e.special(Special::ThreadIdx);
    let ity = e.index_ty;
    let gid = add(mul(block, e.ix(i64::from(THREADS))), thread);
    let gid = e.bind(&mut body, "gid", ity, gid);
    let mut inner = Vec::new();
    e.push_scope();
    let base = mul(gid.clone(), e.ix(lanes as i64));
    let mut idx = e.delinearize(&mut inner, base, &thread_shape);
    if segments > 1 {
        let last = idx.len() - 1;
        let j = match &idx[last] {
            Expr::Var(v) => *v,
            other => {
                let v = e.var("j", ity);
                inner.push(Stmt::Assign(v, other.clone()));
                idx[last] = Expr::Var(v);
                v
            }
        };
        e.set_range(j, 0, seg_len - lanes as i64);
    }
    // The walk's first positions (`unroll` of them) are emitted in the kernel's scope; the
    // rest run as a loop whose body finds everything that does not depend on the walked
    // axis (keyed by the same index) already computed, and computes only what does.
    let unroll = match reuse {
        Some((_, _, walk)) if walk.is_multiple_of(tuning.unroll.max(1)) => tuning.unroll.max(1),
        _ => 1,
    };
    let mut first = idx.clone();
    if let Some((axis, _, walk)) = reuse {
        first[axis] = e.bind(
            &mut inner,
            "at",
            ity,
            mul(idx[axis].clone(), e.ix(walk as i64)),
        );
    }
    let positions = |base: &[Expr], axis: Option<usize>, e: &Emitter<'_, '_>| {
        (0..unroll as i64)
            .map(|u| {
                let mut at = base.to_vec();
                if let Some(axis) = axis {
                    at[axis] = shift(at[axis].clone(), u, e.index_ty);
                }
                at
            })
            .collect::<Vec<_>>()
    };
    let at0 = positions(&first, reuse.map(|r| r.0), e);
    emit_at(e, &mut inner, outputs, &at0, lanes, segments, seg_len)?;
    if let Some((axis, _, steps)) = reuse.filter(|r| r.2 > unroll) {
        let step = e.var("step", ity);
        let mut at = idx.clone();
        at[axis] = add(first[axis].clone(), Expr::Var(step));
        let ats = positions(&at, Some(axis), e);
        let mut walk = Vec::new();
        e.push_scope();
        emit_at(e, &mut walk, outputs, &ats, lanes, segments, seg_len)?;
        e.pop_scope();
        inner.push(Stmt::For {
            var: step,
            start: e.ix(unroll as i64),
            end: e.ix(steps as i64),
            step: e.ix(unroll as i64),
            body: walk,
        });
    }
    e.pop_scope();
    body.push(Stmt::If {
        cond: lt(gid, total),
        then: inner,
        otherwise: Vec::new(),
    });
    let name = outputs
        .first()
        .and_then(|v| e.g.name(*v))
        .map(crate::emit::sanitize)
        .unwrap_or_else(|| "elementwise".into());
    Ok(Body::over(
        format!("pointwise_{name}"),
        THREADS,
        &dims,
        body,
    ))
}

/// Computes and stores every output at each position of `ats`, in each segment (the
/// innermost index moved by whole segments). With several positions or segments, all
/// values come first, then the stores, so that every load is issued before the first store;
/// otherwise each output is stored as soon as it is computed.
fn emit_at(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    outputs: &[Value],
    ats: &[Vec<Expr>],
    lanes: usize,
    segments: u64,
    seg_len: i64,
) -> EResult<()> {
    let batch = segments > 1 || ats.len() > 1;
    let mut stores = Vec::new();
    for at in ats {
        for k in 0..segments as i64 {
            let mut idx = at.clone();
            if let Some(last) = idx.last_mut().filter(|_| k > 0) {
                *last = shift(last.clone(), k * seg_len, e.index_ty);
            }
            for &o in outputs {
                let vals = e.elem(out, o, &idx, lanes)?;
                if batch {
                    stores.push((o, idx.clone(), vals));
                } else {
                    e.store(out, o, &idx, vals);
                }
            }
        }
    }
    for (o, idx, vals) in stores {
        e.store(out, o, &idx, vals);
    }
    Ok(())
}

/// How many equal segments of the innermost axis a thread covers: the piece boundaries of
/// the concats along that axis that the kernel computes (at the outputs' innermost length)
/// split it into `n / gcd(n, boundaries)` segments; used when that is 2 to
/// [`MAX_SEGMENTS`] and a segment holds whole vectors of `lanes`, else 1.
fn segments(e: &Emitter<'_, '_>, shape: &[Dim], outputs: &[Value], lanes: usize) -> u64 {
    let g = e.g;
    let Some(&Dim::Const(n)) = shape.last() else {
        return 1;
    };
    let mut step = n;
    for (v, inst) in computed_insts(e, outputs) {
        let Op::Concat { axis } = inst.op else {
            continue;
        };
        let vs = g.shape(v);
        if axis + 1 != vs.len() || vs.last() != Some(&Dim::Const(n)) {
            continue;
        }
        let mut offset = 0;
        for o in &inst.operands {
            let Some(size) = g.shape(*o)[axis].as_const() else {
                return 1;
            };
            offset += size;
            step = gcd(step, offset);
        }
    }
    let count = n / step.max(1);
    if (2..=MAX_SEGMENTS).contains(&count) && step.is_multiple_of(lanes as u64) {
        count
    } else {
        1
    }
}

/// The instructions the kernel computes for `outputs` (the outputs and everything it does
/// not read from a buffer), each once, with the value they define.
fn computed_insts<'f>(e: &Emitter<'_, 'f>, outputs: &[Value]) -> Vec<(Value, &'f Inst)> {
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    let mut stack: Vec<Value> = outputs.to_vec();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) || (e.is_loaded(v) && !outputs.contains(&v)) {
            continue;
        }
        let Some(inst) = e.g.inst(v) else { continue };
        stack.extend(inst.operands.iter().copied());
        found.push((v, inst));
    }
    found
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The outer axis (and its length) each thread should walk: one of constant length 2 to
/// `MAX_REUSE_AXIS`, not the innermost, along which a transcendental value the kernel
/// computes is broadcast (its own dim is 1 there); the longest such axis.
fn reuse_axis(e: &Emitter<'_, '_>, shape: &[Dim], outputs: &[Value]) -> Option<(usize, u64)> {
    let g = e.g;
    let rank = shape.len();
    let mut best: Option<(usize, u64)> = None;
    for (v, inst) in computed_insts(e, outputs) {
        if !is_transcendental(&inst.op) {
            continue;
        }
        let vs = g.shape(v);
        if vs.len() > rank {
            continue;
        }
        let pad = rank - vs.len();
        for axis in 0..rank.saturating_sub(1) {
            let own = if axis < pad {
                &Dim::Const(1)
            } else {
                &vs[axis - pad]
            };
            if let (Dim::Const(1), Dim::Const(n)) = (own, &shape[axis]) {
                if (2..=MAX_REUSE_AXIS).contains(n) && best.is_none_or(|(_, b)| *n > b) {
                    best = Some((axis, *n));
                }
            }
        }
    }
    best
}

/// Ops whose element costs far more than a load: worth computing once per thread.
fn is_transcendental(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(
            UnaryOp::Exp
                | UnaryOp::Log
                | UnaryOp::Sin
                | UnaryOp::Cos
                | UnaryOp::Tanh
                | UnaryOp::Erf
                | UnaryOp::Sigmoid
        ) | Op::Binary(BinaryOp::Pow)
    )
}

/// How many contiguous elements a thread handles: 8, 4 or 2 when the innermost dim is a
/// constant they divide and the widest element keeps an access within 16 bytes.
pub(crate) fn lanes_for(last: Option<&Dim>, widest_bytes: usize) -> usize {
    let Some(Dim::Const(n)) = last else { return 1 };
    [8usize, 4, 2]
        .into_iter()
        .find(|w| (*n as usize).is_multiple_of(*w) && w * widest_bytes <= 16)
        .unwrap_or(1)
}
