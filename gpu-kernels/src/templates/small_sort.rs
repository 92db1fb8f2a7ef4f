//! The sort templates. Small sort: a thread per line of a `sort` over a constant axis of at
//! most 32 elements (consecutive threads take consecutive positions of the fastest other
//! axis, so `sort(U.T)` reads `U` coalesced), the line loaded into registers with its
//! element-wise prologue, sorted by a Batcher odd-even merge network generated here, and —
//! when the axis is the last — the reductions over the sorted line and the element-wise
//! values of the line computed from those registers in the same kernel (a median or a
//! trimmed mean writes only its result). Sort loop: any other `sort`, a thread per line
//! that ranks each element against the line and stores it at its rank (correct, not fast).
//!
//! Order: NaN after every number, as the interpreter's stable sort. The network's
//! compare-exchange keeps a pair unless the second is smaller, so it permutes the line's
//! values; it does not keep the input order of equal values, which only a -0.0 beside a
//! +0.0 can show. The rank loop is stable and matches the interpreter bit for bit.

use super::reduce::{Acc, Red};
use super::Body;
use crate::emit::{add, and, bin, lt, mul, EResult, Emitter, HeldRow};
use crate::partition::Group;
use kiln_ir::{Dim, Op, Value};
use kiln_kir::{BinOp, Const, Expr, Special, Stmt, Ty};

/// Threads per block (one line each).
const BLOCK: u32 = 128;

/// The compare-exchange pairs `(i, j)`, `i < j`, of Batcher's odd-even merge sort for `n`
/// elements: the network for the next power of two with every pair that reaches past `n`
/// left out (as if the missing elements were larger than all others, which never move).
pub(crate) fn network(n: usize) -> Vec<(usize, usize)> {
    let size = n.next_power_of_two();
    let mut pairs = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < size {
                for i in 0..k.min(size - j - k) {
                    let (a, b) = (i + j, i + j + k);
                    if a / (2 * p) == b / (2 * p) && b < n {
                        pairs.push((a, b));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    pairs
}

/// This thread's line of a sort over `axis` of `shape` (a thread per line): the other
/// axes' dims, whether the thread has a line (bound in `body`), and the line's index over
/// the other axes (bound in `work`, the statements run only when it has one).
fn line_of(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    work: &mut Vec<Stmt>,
    shape: &[Dim],
    axis: usize,
) -> (Vec<Dim>, Expr, Vec<Expr>) {
    let others: Vec<Dim> = shape
        .iter()
        .enumerate()
        .filter(|(d, _)| *d != axis)
        .map(|(_, d)| d.clone())
        .collect();
    let ity = e.index_ty;
    let block = e.special(Special::BlockIdx(0));
    let thread = e.special(Special::ThreadIdx);
    let line = add(mul(block, e.ix(i64::from(BLOCK))), thread);
    let line = e.bind(body, "line", ity, line);
    let lines = e.numel(&others);
    let valid = e.bind(body, "valid", Ty::Pred, lt(line.clone(), lines));
    let line_idx = e.delinearize(work, line, &others);
    (others, valid, line_idx)
}

/// The kernel of a thread per line: `body`, then `work` where the thread has a line.
fn per_line_body(
    mut body: Vec<Stmt>,
    valid: Expr,
    work: Vec<Stmt>,
    others: &[Dim],
    what: String,
) -> Body {
    body.push(Stmt::If {
        cond: valid,
        then: work,
        otherwise: Vec::new(),
    });
    Body::over(what, BLOCK, others, body)
}

/// The index of element `j` of the line at `line_idx` (the other axes' indices).
fn at(line_idx: &[Expr], axis: usize, j: Expr) -> Vec<Expr> {
    let mut idx = line_idx.to_vec();
    idx.insert(axis, j);
    idx
}

pub(crate) fn emit_small(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    axis: usize,
    len: u64,
    stores: &[Value],
) -> EResult<Body> {
    let g = e.g;
    let h = group.roots[0];
    let x = g.inst(h).expect("a sort").operands[0];
    let shape = g.shape(h).to_vec();
    let mut body = Vec::new();
    let mut work = Vec::new();
    let (others, valid, line_idx) = line_of(e, &mut body, &mut work, &shape, axis);
    e.push_scope();
    let ty = e.cty(h);
    let n = len as usize;
    let mut regs = Vec::with_capacity(n);
    for j in 0..n {
        let v = e.elem(&mut work, x, &at(&line_idx, axis, e.ix(j as i64)), 1)?;
        regs.push(e.bind(&mut work, "v", ty, v[0].clone()));
    }
    // NaN sorts last: it enters the network as +inf, and the last `nans` positions get NaN
    // back afterwards (the +infs it stood for end up there, after any real +inf). Lines
    // without NaN (one predicate per element, folded into its comparison by ptxas) skip
    // both steps.
    let nans = (ty == Ty::F32 && n > 0).then(|| {
        let mut any = Expr::Const(Const::Pred(false));
        for r in &regs {
            let is_nan = bin(BinOp::Ne, r.clone(), r.clone());
            any = e.bind(&mut work, "any_nan", Ty::Pred, bin(BinOp::Or, any, is_nan));
        }
        let count = e.var("nans", Ty::I32);
        work.push(Stmt::Assign(count, Expr::Const(Const::I32(0))));
        let mut then = Vec::new();
        for r in regs.iter_mut() {
            let v = e.var("v", ty);
            work.push(Stmt::Assign(v, r.clone()));
            let is_nan = e.bind(
                &mut then,
                "nan",
                Ty::Pred,
                bin(BinOp::Ne, Expr::Var(v), Expr::Var(v)),
            );
            let inf = Expr::Const(Const::F32(f32::INFINITY));
            then.push(Stmt::Assign(
                v,
                Expr::Select(
                    Box::new(is_nan.clone()),
                    Box::new(inf),
                    Box::new(Expr::Var(v)),
                ),
            ));
            let one = Expr::Select(
                Box::new(is_nan),
                Box::new(Expr::Const(Const::I32(1))),
                Box::new(Expr::Const(Const::I32(0))),
            );
            then.push(Stmt::Assign(count, add(Expr::Var(count), one)));
            *r = Expr::Var(v);
        }
        work.push(Stmt::If {
            cond: any.clone(),
            then,
            otherwise: Vec::new(),
        });
        (any, count)
    });
    for (i, j) in network(n) {
        let (a, b) = (regs[i].clone(), regs[j].clone());
        let (lo, hi) = if ty == Ty::F32 {
            // A select, not min/max: the pair is permuted, never rewritten.
            let swap = e.bind(&mut work, "swap", Ty::Pred, lt(b.clone(), a.clone()));
            let sel = |p: &Expr, x: &Expr, y: &Expr| {
                Expr::Select(
                    Box::new(p.clone()),
                    Box::new(x.clone()),
                    Box::new(y.clone()),
                )
            };
            (sel(&swap, &b, &a), sel(&swap, &a, &b))
        } else {
            (bin(BinOp::Min, a.clone(), b.clone()), bin(BinOp::Max, a, b))
        };
        regs[i] = e.bind(&mut work, "lo", ty, lo);
        regs[j] = e.bind(&mut work, "hi", ty, hi);
    }
    if let Some((any, count)) = nans {
        let mut then = Vec::new();
        for (i, r) in regs.iter_mut().enumerate() {
            let s = e.var("s", ty);
            work.push(Stmt::Assign(s, r.clone()));
            // Position i holds a NaN when i >= n - nans.
            let is_nan = bin(
                BinOp::Ge,
                Expr::Var(count),
                Expr::Const(Const::I32((n - i) as i32)),
            );
            let nan = Expr::Const(Const::F32(f32::NAN));
            then.push(Stmt::Assign(
                s,
                Expr::Select(Box::new(is_nan), Box::new(nan), Box::new(Expr::Var(s))),
            ));
            *r = Expr::Var(s);
        }
        work.push(Stmt::If {
            cond: any,
            then,
            otherwise: Vec::new(),
        });
    }
    e.fused.extend(group.roots.iter().copied());
    e.rows.push(HeldRow {
        value: h,
        axis,
        regs: regs.clone(),
        at: Vec::new(),
    });
    let mut names = vec![format!("sort{len}")];
    // The reductions over the sorted line (the axis is the last one here).
    for &r in &group.roots[1..] {
        let inst = g.inst(r).expect("a reduction");
        let input = inst.operands[0];
        let in_shape = g.shape(input);
        let m = in_shape
            .last()
            .and_then(Dim::as_const)
            .ok_or_else(|| e.internal(r, "a small-sort reduction over a symbolic axis"))?;
        let red = Red::of(&inst.op);
        names.push(red.name().to_string());
        let acc = Acc::new(e, &mut work, red, g.ty(input).dtype);
        let summing = matches!(red, Red::Sum | Red::Mean);
        for j in 0..m {
            let idx = at(&line_idx, line_idx.len(), e.ix(j as i64));
            let v = e.elem(&mut work, input, &idx, 1)?.remove(0);
            // A sum that starts at +0.0 is never -0.0, so adding a constant +0.0 (a masked
            // element) leaves it unchanged.
            let zero = matches!(v, Expr::Const(Const::F32(z)) if z.to_bits() == 0)
                || matches!(v, Expr::Const(Const::I32(0) | Const::I64(0)));
            if summing && zero {
                continue;
            }
            acc.fold(e, &mut work, v, Some(Expr::Const(Const::I64(j as i64))));
        }
        let result = acc.result(e.ix(m as i64));
        let rty = e.cty(r);
        let result = e.bind(&mut work, red.name(), rty, result);
        let rank = g.shape(r).len();
        let mut index = line_idx.clone();
        index.extend((line_idx.len()..rank).map(|_| e.ix(0)));
        e.bindings.push(crate::emit::Binding {
            value: r,
            index,
            expr: result,
        });
    }
    // What leaves the kernel: the sorted lines when another kernel reads them, the
    // reductions, and the element-wise values of the line.
    e.push_scope();
    for &v in stores {
        if v == h {
            for (j, r) in regs.iter().enumerate() {
                let idx = at(&line_idx, axis, e.ix(j as i64));
                e.store(&mut work, h, &idx, vec![r.clone()]);
            }
            continue;
        }
        let vs = g.shape(v);
        let tail: Vec<Dim> = vs[line_idx.len()..].to_vec();
        let count: u64 = tail
            .iter()
            .map(Dim::as_const)
            .product::<Option<u64>>()
            .ok_or_else(|| e.internal(v, "a small-sort output with a symbolic line"))?;
        for t in 0..count {
            let mut idx = line_idx.clone();
            let mut rest = t;
            let mut tail_idx = vec![0u64; tail.len()];
            for (d, dim) in tail.iter().enumerate().rev() {
                let size = dim.as_const().expect("constant");
                tail_idx[d] = rest % size;
                rest /= size;
            }
            idx.extend(tail_idx.iter().map(|&i| e.ix(i as i64)));
            let vals = e.elem(&mut work, v, &idx, 1)?;
            e.store(&mut work, v, &idx, vals);
        }
    }
    e.pop_scope();
    e.pop_scope();
    Ok(per_line_body(body, valid, work, &others, names.join("_")))
}

/// A thread per line: element `i` goes to position `#{j : x_j before x_i}`, where `x_j`
/// comes before `x_i` when it is smaller, or equal (NaNs are equal to each other) and
/// earlier in the line.
pub(crate) fn emit_loop(e: &mut Emitter<'_, '_>, h: Value) -> EResult<Body> {
    let g = e.g;
    let inst = g.inst(h).expect("a sort");
    let Op::Sort { axis } = inst.op else {
        return Err(e.internal(h, "not a sort"));
    };
    let x = inst.operands[0];
    let shape = g.shape(h).to_vec();
    let ity = e.index_ty;
    let ty = e.cty(h);
    let mut body = Vec::new();
    let mut work = Vec::new();
    let (others, valid, line_idx) = line_of(e, &mut body, &mut work, &shape, axis);
    let len = e.dim(&shape[axis]);
    let i = e.var("i", ity);
    let j = e.var("j", ity);
    let rank = e.var("rank", ity);
    let mut outer_body = Vec::new();
    e.push_scope();
    let xi = e.elem(&mut outer_body, x, &at(&line_idx, axis, Expr::Var(i)), 1)?;
    let xi = e.bind(&mut outer_body, "xi", ty, xi[0].clone());
    outer_body.push(Stmt::Assign(rank, e.ix(0)));
    let mut inner_body = Vec::new();
    e.push_scope();
    let xj = e.elem(&mut inner_body, x, &at(&line_idx, axis, Expr::Var(j)), 1)?;
    let xj = e.bind(&mut inner_body, "xj", ty, xj[0].clone());
    let earlier = lt(Expr::Var(j), Expr::Var(i));
    let (smaller, equal) = if ty == Ty::F32 {
        let nan = |v: &Expr| bin(BinOp::Ne, v.clone(), v.clone());
        let number = |v: &Expr| bin(BinOp::Eq, v.clone(), v.clone());
        (
            bin(
                BinOp::Or,
                lt(xj.clone(), xi.clone()),
                and(nan(&xi), number(&xj)),
            ),
            bin(
                BinOp::Or,
                bin(BinOp::Eq, xj.clone(), xi.clone()),
                and(nan(&xi), nan(&xj)),
            ),
        )
    } else {
        (
            lt(xj.clone(), xi.clone()),
            bin(BinOp::Eq, xj.clone(), xi.clone()),
        )
    };
    let before = bin(BinOp::Or, smaller, and(equal, earlier));
    let before = e.bind(&mut inner_body, "before", Ty::Pred, before);
    let step = Expr::Select(Box::new(before), Box::new(e.ix(1)), Box::new(e.ix(0)));
    inner_body.push(Stmt::Assign(rank, add(Expr::Var(rank), step)));
    e.pop_scope();
    outer_body.push(Stmt::For {
        var: j,
        start: e.ix(0),
        end: len.clone(),
        step: e.ix(1),
        body: inner_body,
    });
    e.store(
        &mut outer_body,
        h,
        &at(&line_idx, axis, Expr::Var(rank)),
        vec![xi],
    );
    e.fused.insert(h);
    e.pop_scope();
    work.push(Stmt::For {
        var: i,
        start: e.ix(0),
        end: len,
        step: e.ix(1),
        body: outer_body,
    });
    Ok(per_line_body(
        body,
        valid,
        work,
        &others,
        "sort".to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::network;

    /// Applies the network to `v` (as the template does: the smaller value first).
    fn run(n: usize, v: &mut [u32]) {
        for (i, j) in network(n) {
            if v[j] < v[i] {
                v.swap(i, j);
            }
        }
    }

    #[test]
    fn the_network_sorts_every_zero_one_input_up_to_20() {
        // The 0-1 principle: a comparator network that sorts every 0/1 sequence sorts all.
        for n in 1..=20usize {
            for bits in 0u32..(1 << n) {
                let mut v: Vec<u32> = (0..n).map(|k| (bits >> k) & 1).collect();
                run(n, &mut v);
                assert!(
                    v.windows(2).all(|w| w[0] <= w[1]),
                    "n = {n}, input {bits:b}"
                );
            }
        }
    }

    #[test]
    fn the_network_sorts_random_lines_up_to_32() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for n in 1..=32usize {
            for _ in 0..2000 {
                let mut v: Vec<u32> = (0..n)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state % 7) as u32
                    })
                    .collect();
                let mut want = v.clone();
                want.sort_unstable();
                run(n, &mut v);
                assert_eq!(v, want, "n = {n}");
            }
        }
    }

    #[test]
    fn network_sizes_are_batchers() {
        // Batcher's odd-even merge sort: 19 comparators for 8, 63 for 16, 191 for 32.
        assert_eq!(network(1).len(), 0);
        assert_eq!(network(2).len(), 1);
        assert_eq!(network(8).len(), 19);
        assert_eq!(network(16).len(), 63);
        assert_eq!(network(32).len(), 191);
    }
}
