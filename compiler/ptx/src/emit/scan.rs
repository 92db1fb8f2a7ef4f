//! What the emitter learns about a kernel before emitting it: which special registers it
//! reads, which registers some path reads before writing (those start at zero), and PTX
//! identifiers for its parameter and shared-array names.

use std::collections::BTreeSet;

use kiln_kir::{Expr, Special, Stmt, VarId, WgmmaOp};

/// The index of a special value in the emitter's table of special-value registers
/// (0 `%tid.x`, 1-3 `%ctaid`, 4 `%ntid.x`, 5 `%laneid`, 6 the warp index).
pub(super) fn special_slot(special: Special) -> usize {
    match special {
        Special::ThreadIdx => 0,
        Special::BlockIdx(axis) => 1 + usize::from(axis.min(2)),
        Special::BlockDim => 4,
        Special::LaneId => 5,
        Special::WarpId => 6,
    }
}

/// Makes a PTX identifier of `name`: letters, digits and `_` kept, other characters
/// replaced by `_`, and an `n` in front unless it starts with a letter.
pub(super) fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.insert(0, 'n');
    }
    out
}

/// Distinct identifiers for `names` (in order), suffixing `_2`, `_3`, ... to repeats.
pub(super) fn distinct_identifiers<'a>(names: impl Iterator<Item = String> + 'a) -> Vec<String> {
    let mut taken = BTreeSet::new();
    names
        .map(|name| {
            let mut candidate = name.clone();
            let mut suffix = 2;
            while !taken.insert(candidate.clone()) {
                candidate = format!("{name}_{suffix}");
                suffix += 1;
            }
            candidate
        })
        .collect()
}

/// Collects the registers an expression reads.
fn collect_reads(expr: &Expr, out: &mut BTreeSet<VarId>) {
    match expr {
        Expr::Var(var) => {
            out.insert(*var);
        }
        Expr::Const(_) | Expr::Param(_) | Expr::Special(_) => {}
        Expr::Unary(_, a) | Expr::Cast(_, a) => collect_reads(a, out),
        Expr::Binary(_, a, b) => {
            collect_reads(a, out);
            collect_reads(b, out);
        }
        Expr::Fma(a, b, c) | Expr::Select(a, b, c) => {
            for e in [a, b, c] {
                collect_reads(e, out);
            }
        }
        Expr::Load { index, .. } => collect_reads(index, out),
    }
}

/// Walks `stmts` with `assigned` the registers written on every path so far; adds to
/// `read_first` each register some path reads before writing it.
pub(super) fn definite_assignment(
    stmts: &[Stmt],
    assigned: &mut BTreeSet<VarId>,
    read_first: &mut BTreeSet<VarId>,
) {
    fn read(exprs: &[&Expr], assigned: &BTreeSet<VarId>, read_first: &mut BTreeSet<VarId>) {
        let mut reads = BTreeSet::new();
        for e in exprs {
            collect_reads(e, &mut reads);
        }
        read_first.extend(reads.difference(assigned).copied());
    }
    for stmt in stmts {
        match stmt {
            Stmt::Assign(var, e) => {
                read(&[e], assigned, read_first);
                assigned.insert(*var);
            }
            Stmt::LoadVec { dsts, index, .. } => {
                read(&[index], assigned, read_first);
                assigned.extend(dsts.iter().copied());
            }
            Stmt::Store { index, value, .. } => read(&[index, value], assigned, read_first),
            Stmt::StoreVec { index, values, .. } => {
                let mut exprs = vec![index];
                exprs.extend(values.iter());
                read(&exprs, assigned, read_first);
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => {
                read(&[start, end, step], assigned, read_first);
                assigned.insert(*var);
                // The body may not run: what it writes is not assigned afterwards.
                let mut inside = assigned.clone();
                definite_assignment(body, &mut inside, read_first);
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                read(&[cond], assigned, read_first);
                let mut then_assigned = assigned.clone();
                definite_assignment(then, &mut then_assigned, read_first);
                let mut else_assigned = assigned.clone();
                definite_assignment(otherwise, &mut else_assigned, read_first);
                *assigned = then_assigned
                    .intersection(&else_assigned)
                    .copied()
                    .collect();
            }
            Stmt::Barrier
            | Stmt::CpAsyncCommit
            | Stmt::CpAsyncWait(_)
            | Stmt::GridDependencyWait
            | Stmt::Fence
            | Stmt::LaunchDependents => {}
            Stmt::PrefetchL2 { index, bytes, .. } => read(&[index, bytes], assigned, read_first),
            Stmt::AtomicAdd {
                dst, index, value, ..
            } => {
                read(&[index, value], assigned, read_first);
                assigned.insert(*dst);
            }
            Stmt::ShuffleXor { dst, src, .. } => {
                if !assigned.contains(src) {
                    read_first.insert(*src);
                }
                assigned.insert(*dst);
            }
            Stmt::Mma { d, a, b, c, .. } => {
                for var in a.iter().chain(b).chain(c) {
                    if !assigned.contains(var) {
                        read_first.insert(*var);
                    }
                }
                assigned.extend(d.iter().copied());
            }
            Stmt::PackHalves { dst, lo, hi, .. } => {
                read(&[lo, hi], assigned, read_first);
                assigned.insert(*dst);
            }
            Stmt::LdMatrix { dsts, index, .. } => {
                read(&[index], assigned, read_first);
                assigned.extend(dsts.iter().copied());
            }
            Stmt::CpAsync {
                dst_index,
                src_index,
                src_len,
                ..
            } => read(&[dst_index, src_index, src_len], assigned, read_first),
            Stmt::Wgmma(WgmmaOp::Mma {
                d,
                a,
                b,
                accumulate,
                ..
            }) => {
                read(&[&a.index, &b.index], assigned, read_first);
                if *accumulate {
                    read_first.extend(d.iter().filter(|v| !assigned.contains(v)));
                }
                assigned.extend(d.iter().copied());
            }
            Stmt::Wgmma(_) => {}
        }
    }
}

/// Collects the special values an expression tree reads.
fn collect_specials_expr(expr: &Expr, out: &mut BTreeSet<usize>) {
    match expr {
        Expr::Special(special) => {
            out.insert(special_slot(*special));
        }
        Expr::Const(_) | Expr::Var(_) | Expr::Param(_) => {}
        Expr::Unary(_, a) | Expr::Cast(_, a) => collect_specials_expr(a, out),
        Expr::Binary(_, a, b) => {
            collect_specials_expr(a, out);
            collect_specials_expr(b, out);
        }
        Expr::Fma(a, b, c) | Expr::Select(a, b, c) => {
            for e in [a, b, c] {
                collect_specials_expr(e, out);
            }
        }
        Expr::Load { index, .. } => collect_specials_expr(index, out),
    }
}

pub(super) fn collect_specials(stmts: &[Stmt], out: &mut BTreeSet<usize>) {
    for stmt in stmts {
        match stmt {
            Stmt::Assign(_, e) => collect_specials_expr(e, out),
            Stmt::LoadVec { index, .. } => collect_specials_expr(index, out),
            Stmt::Store { index, value, .. } => {
                collect_specials_expr(index, out);
                collect_specials_expr(value, out);
            }
            Stmt::StoreVec { index, values, .. } => {
                collect_specials_expr(index, out);
                for v in values {
                    collect_specials_expr(v, out);
                }
            }
            Stmt::For {
                start,
                end,
                step,
                body,
                ..
            } => {
                for e in [start, end, step] {
                    collect_specials_expr(e, out);
                }
                collect_specials(body, out);
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                collect_specials_expr(cond, out);
                collect_specials(then, out);
                collect_specials(otherwise, out);
            }
            Stmt::LdMatrix { index, .. } => collect_specials_expr(index, out),
            Stmt::PackHalves { lo, hi, .. } => {
                collect_specials_expr(lo, out);
                collect_specials_expr(hi, out);
            }
            Stmt::CpAsync {
                dst_index,
                src_index,
                src_len,
                ..
            } => {
                for e in [dst_index, src_index, src_len] {
                    collect_specials_expr(e, out);
                }
            }
            Stmt::PrefetchL2 { index, bytes, .. } => {
                collect_specials_expr(index, out);
                collect_specials_expr(bytes, out);
            }
            Stmt::AtomicAdd { index, value, .. } => {
                collect_specials_expr(index, out);
                collect_specials_expr(value, out);
            }
            Stmt::Wgmma(WgmmaOp::Mma { a, b, .. }) => {
                collect_specials_expr(&a.index, out);
                collect_specials_expr(&b.index, out);
            }
            Stmt::Wgmma(_) => {}
            Stmt::Barrier
            | Stmt::ShuffleXor { .. }
            | Stmt::Mma { .. }
            | Stmt::CpAsyncCommit
            | Stmt::CpAsyncWait(_)
            | Stmt::GridDependencyWait
            | Stmt::Fence
            | Stmt::LaunchDependents => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_sanitized_and_distinct() {
        let names = ["x", "x", "model.weight", "2d", "_tmp", "x_2"]
            .iter()
            .map(|n| sanitize(n));
        assert_eq!(
            distinct_identifiers(names),
            ["x", "x_2", "model_weight", "n2d", "n_tmp", "x_2_2"]
        );
    }
}
