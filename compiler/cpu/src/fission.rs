//! Loop fission: how a kernel's per-thread statement tree becomes one block's sequential
//! program, and where each register lives.
//!
//! The body is split at the synchronising statements (`Barrier`, the warp collectives
//! `ShuffleXor`, `Mma` and `LdMatrix`, and the `For`/`If` statements that contain one; the
//! verifier only allows them under block-uniform control flow):
//! - each maximal run of statements without synchronisation becomes a **thread loop**, the
//!   run executed for thread 0, then thread 1, ... (threads may not communicate within it,
//!   so any order is a valid interleaving);
//! - a `Barrier` is the boundary between two thread loops and emits nothing;
//! - a `ShuffleXor`, `Mma` or `LdMatrix` is a block-level exchange between the threads'
//!   register files (`LdMatrix` first evaluates each thread's index);
//! - `CpAsync` copies at once inside its thread loop, and its commit and wait do nothing:
//!   a program that could tell the difference reads or writes the destination before the
//!   wait, which is a race the IR leaves undefined;
//! - a `For`/`If` containing synchronisation runs once at block level, with its bounds and
//!   condition evaluated as thread 0 sees them, and its body split again.
//!
//! Registers that must survive from one thread loop to another live in a per-thread
//! scratch array (`scratch[thread][slot]`, 8 bytes a slot); the others stay in Cranelift
//! variables inside their one thread loop. A register needs a slot when it is touched at
//! block level (a uniform loop's counter, a uniform bound or condition, a shuffle), by
//! two or more thread loops, or by a thread loop that runs more than once (inside a
//! block-level `For`, where it may carry a value from one iteration to the next).

use kiln_kir::{Expr, Kernel, Stmt, VarId};
use std::collections::BTreeSet;

/// One step of a block's sequential program.
#[derive(Debug)]
pub(crate) enum BlockItem<'k> {
    /// Synchronisation-free statements run once per thread.
    ThreadLoop(Segment<'k>),
    /// `dst = src of thread (t ^ mask)` for every thread `t`, reading every `src` first.
    Shuffle { dst: VarId, src: VarId, mask: u32 },
    /// A warp-level tensor-core product (`Stmt::Mma`) for every warp.
    Mma(&'k Stmt),
    /// A warp-level matrix load (`Stmt::LdMatrix`) for every warp.
    LdMatrix(&'k Stmt),
    /// A block-uniform loop around synchronisation.
    For {
        var: VarId,
        start: &'k Expr,
        end: &'k Expr,
        step: &'k Expr,
        body: Vec<BlockItem<'k>>,
    },
    /// A block-uniform branch around synchronisation.
    If {
        cond: &'k Expr,
        then: Vec<BlockItem<'k>>,
        otherwise: Vec<BlockItem<'k>>,
    },
}

/// A run of statements executed as one loop over the block's threads.
#[derive(Debug)]
pub(crate) struct Segment<'k> {
    pub stmts: &'k [Stmt],
    /// Every register the statements read or write, ascending.
    pub touched: Vec<VarId>,
    /// The registers the statements write, ascending.
    pub written: Vec<VarId>,
}

/// The block program of a kernel and its register placement.
#[derive(Debug)]
pub(crate) struct Fission<'k> {
    pub items: Vec<BlockItem<'k>>,
    /// The scratch slot of each register, or `None` for one that lives in a single thread
    /// loop.
    pub slots: Vec<Option<u32>>,
    pub slot_count: u32,
}

impl<'k> Fission<'k> {
    pub(crate) fn of(kernel: &'k Kernel) -> Fission<'k> {
        let items = split(&kernel.body);
        let mut usage = vec![Usage::default(); kernel.vars.len()];
        let mut next_segment = 0;
        record_usage(&items, false, &mut usage, &mut next_segment);
        let mut slots = vec![None; kernel.vars.len()];
        let mut slot_count = 0;
        for (slot, use_of_var) in slots.iter_mut().zip(&usage) {
            if use_of_var.needs_slot() {
                *slot = Some(slot_count);
                slot_count += 1;
            }
        }
        Fission {
            items,
            slots,
            slot_count,
        }
    }
}

/// Whether a statement is or contains a `Barrier` or a `ShuffleXor`.
pub(crate) fn synchronises(stmt: &Stmt) -> bool {
    match stmt {
        Stmt::Barrier | Stmt::ShuffleXor { .. } | Stmt::Mma { .. } | Stmt::LdMatrix { .. } => true,
        Stmt::For { body, .. } => body.iter().any(synchronises),
        Stmt::If {
            then, otherwise, ..
        } => then.iter().any(synchronises) || otherwise.iter().any(synchronises),
        Stmt::Assign(..)
        | Stmt::LoadVec { .. }
        | Stmt::Store { .. }
        | Stmt::StoreVec { .. }
        | Stmt::PackHalves { .. }
        | Stmt::CpAsync { .. }
        | Stmt::CpAsyncCommit
        | Stmt::CpAsyncWait(_)
        | Stmt::GridDependencyWait
        | Stmt::PrefetchL2 { .. }
        | Stmt::LaunchDependents
        | Stmt::AtomicAdd { .. }
        | Stmt::Fence
        | Stmt::Wgmma(_) => false,
    }
}

fn split(stmts: &[Stmt]) -> Vec<BlockItem<'_>> {
    let mut items = Vec::new();
    let mut run_start = 0;
    for (position, stmt) in stmts.iter().enumerate() {
        if !synchronises(stmt) {
            continue;
        }
        if run_start < position {
            items.push(BlockItem::ThreadLoop(Segment::new(
                &stmts[run_start..position],
            )));
        }
        run_start = position + 1;
        match stmt {
            Stmt::Barrier => {}
            Stmt::ShuffleXor { dst, src, mask } => items.push(BlockItem::Shuffle {
                dst: *dst,
                src: *src,
                mask: *mask,
            }),
            Stmt::Mma { .. } => items.push(BlockItem::Mma(stmt)),
            Stmt::LdMatrix { .. } => items.push(BlockItem::LdMatrix(stmt)),
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => items.push(BlockItem::For {
                var: *var,
                start,
                end,
                step,
                body: split(body),
            }),
            Stmt::If {
                cond,
                then,
                otherwise,
            } => items.push(BlockItem::If {
                cond,
                then: split(then),
                otherwise: split(otherwise),
            }),
            Stmt::Assign(..)
            | Stmt::LoadVec { .. }
            | Stmt::Store { .. }
            | Stmt::StoreVec { .. }
            | Stmt::PackHalves { .. }
            | Stmt::CpAsync { .. }
            | Stmt::CpAsyncCommit
            | Stmt::CpAsyncWait(_)
            | Stmt::GridDependencyWait
            | Stmt::PrefetchL2 { .. }
            | Stmt::LaunchDependents
            | Stmt::AtomicAdd { .. }
            | Stmt::Fence
            | Stmt::Wgmma(_) => {
                unreachable!("only synchronising statements end a run")
            }
        }
    }
    if run_start < stmts.len() {
        items.push(BlockItem::ThreadLoop(Segment::new(&stmts[run_start..])));
    }
    items
}

impl<'k> Segment<'k> {
    fn new(stmts: &'k [Stmt]) -> Segment<'k> {
        let mut touched = BTreeSet::new();
        let mut written = BTreeSet::new();
        for stmt in stmts {
            stmt_vars(stmt, &mut touched, &mut written);
        }
        Segment {
            stmts,
            touched: touched.into_iter().collect(),
            written: written.into_iter().collect(),
        }
    }
}

/// Where a register is used, as far as slot placement cares.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    at_block_level: bool,
    /// The first thread loop that touches it.
    first_segment: Option<usize>,
    in_several_segments: bool,
    in_repeated_segment: bool,
}

impl Usage {
    fn needs_slot(self) -> bool {
        self.at_block_level || self.in_several_segments || self.in_repeated_segment
    }
}

fn record_usage(
    items: &[BlockItem<'_>],
    repeated: bool,
    usage: &mut [Usage],
    next_segment: &mut usize,
) {
    for item in items {
        match item {
            BlockItem::ThreadLoop(segment) => {
                let id = *next_segment;
                *next_segment += 1;
                for var in &segment.touched {
                    let entry = &mut usage[var.0 as usize];
                    match entry.first_segment {
                        None => entry.first_segment = Some(id),
                        Some(first) if first != id => entry.in_several_segments = true,
                        Some(_) => {}
                    }
                    entry.in_repeated_segment |= repeated;
                }
            }
            BlockItem::Shuffle { dst, src, .. } => {
                usage[dst.0 as usize].at_block_level = true;
                usage[src.0 as usize].at_block_level = true;
            }
            BlockItem::Mma(stmt) | BlockItem::LdMatrix(stmt) => {
                let (mut touched, mut written) = (BTreeSet::new(), BTreeSet::new());
                stmt_vars(stmt, &mut touched, &mut written);
                for v in touched {
                    usage[v.0 as usize].at_block_level = true;
                }
            }
            BlockItem::For {
                var,
                start,
                end,
                step,
                body,
            } => {
                usage[var.0 as usize].at_block_level = true;
                let mut read = BTreeSet::new();
                for expr in [start, end, step] {
                    expr_vars(expr, &mut read);
                }
                for v in read {
                    usage[v.0 as usize].at_block_level = true;
                }
                record_usage(body, true, usage, next_segment);
            }
            BlockItem::If {
                cond,
                then,
                otherwise,
            } => {
                let mut read = BTreeSet::new();
                expr_vars(cond, &mut read);
                for v in read {
                    usage[v.0 as usize].at_block_level = true;
                }
                record_usage(then, repeated, usage, next_segment);
                record_usage(otherwise, repeated, usage, next_segment);
            }
        }
    }
}

/// Adds the registers `stmt` reads or writes to `touched`, and those it writes to `written`.
pub(crate) fn stmt_vars(stmt: &Stmt, touched: &mut BTreeSet<VarId>, written: &mut BTreeSet<VarId>) {
    match stmt {
        Stmt::Assign(var, value) => {
            written.insert(*var);
            touched.insert(*var);
            expr_vars(value, touched);
        }
        Stmt::LoadVec { dsts, index, .. } => {
            written.extend(dsts.iter().copied());
            touched.extend(dsts.iter().copied());
            expr_vars(index, touched);
        }
        Stmt::Store { index, value, .. } => {
            expr_vars(index, touched);
            expr_vars(value, touched);
        }
        Stmt::StoreVec { index, values, .. } => {
            expr_vars(index, touched);
            for value in values {
                expr_vars(value, touched);
            }
        }
        Stmt::For {
            var,
            start,
            end,
            step,
            body,
        } => {
            written.insert(*var);
            touched.insert(*var);
            for expr in [start, end, step] {
                expr_vars(expr, touched);
            }
            for inner in body {
                stmt_vars(inner, touched, written);
            }
        }
        Stmt::If {
            cond,
            then,
            otherwise,
        } => {
            expr_vars(cond, touched);
            for inner in then.iter().chain(otherwise) {
                stmt_vars(inner, touched, written);
            }
        }
        // The CPU backend runs no L2 prefetches nor grid-dependency control.
        Stmt::Barrier
        | Stmt::CpAsyncCommit
        | Stmt::CpAsyncWait(_)
        | Stmt::GridDependencyWait
        | Stmt::PrefetchL2 { .. }
        | Stmt::Fence
        | Stmt::LaunchDependents => {}
        Stmt::AtomicAdd {
            dst, index, value, ..
        } => {
            written.insert(*dst);
            touched.insert(*dst);
            expr_vars(index, touched);
            expr_vars(value, touched);
        }
        // Rejected before lowering (`codegen::compile`).
        Stmt::Wgmma(_) => {}
        Stmt::ShuffleXor { dst, src, .. } => {
            written.insert(*dst);
            touched.insert(*dst);
            touched.insert(*src);
        }
        Stmt::Mma { d, a, b, c, .. } => {
            written.extend(d.iter().copied());
            touched.extend(d.iter().chain(a).chain(b).chain(c).copied());
        }
        Stmt::PackHalves { dst, lo, hi, .. } => {
            written.insert(*dst);
            touched.insert(*dst);
            expr_vars(lo, touched);
            expr_vars(hi, touched);
        }
        Stmt::LdMatrix { dsts, index, .. } => {
            written.extend(dsts.iter().copied());
            touched.extend(dsts.iter().copied());
            expr_vars(index, touched);
        }
        Stmt::CpAsync {
            dst_index,
            src_index,
            src_len,
            ..
        } => {
            for expr in [dst_index, src_index, src_len] {
                expr_vars(expr, touched);
            }
        }
    }
}

/// Adds the registers `expr` reads to `read`.
pub(crate) fn expr_vars(expr: &Expr, read: &mut BTreeSet<VarId>) {
    match expr {
        Expr::Var(var) => {
            read.insert(*var);
        }
        Expr::Const(_) | Expr::Param(_) | Expr::Special(_) => {}
        Expr::Unary(_, a) | Expr::Cast(_, a) => expr_vars(a, read),
        Expr::Load { index, .. } => expr_vars(index, read),
        Expr::Binary(_, a, b) => {
            expr_vars(a, read);
            expr_vars(b, read);
        }
        Expr::Fma(a, b, c) | Expr::Select(a, b, c) => {
            expr_vars(a, read);
            expr_vars(b, read);
            expr_vars(c, read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::DType;

    #[test]
    fn rms_norm_splits_at_every_shuffle_and_barrier() {
        let kernel = kiln_kir::examples::rms_norm_rows(DType::F32, 100, 64);
        let fission = Fission::of(&kernel);
        // One thread loop, then (shuffle, thread loop) five times, with the store of the
        // warp's partial folded into the fifth; the barrier ends it. Then the same again for
        // the second reduction, and one thread loop for the output.
        let shape: Vec<char> = fission
            .items
            .iter()
            .map(|item| match item {
                BlockItem::ThreadLoop(_) => 'T',
                BlockItem::Shuffle { .. } => 'S',
                BlockItem::Mma(_) => 'M',
                BlockItem::LdMatrix(_) => 'L',
                BlockItem::For { .. } => 'F',
                BlockItem::If { .. } => 'I',
            })
            .collect();
        assert_eq!(shape.iter().collect::<String>(), "TSTSTSTSTSTTSTSTSTSTSTT");

        let slot_of = |name: &str| {
            let position = kernel.vars.iter().position(|v| v.name == name).unwrap();
            fission.slots[position]
        };
        // Live across barriers or shuffled: in scratch.
        for name in ["row_base", "col", "sum_sq", "partner", "total"] {
            assert!(slot_of(name).is_some(), "{name}");
        }
        // Used within one thread loop only: Cranelift variables.
        for name in ["value", "inv_rms"] {
            assert!(slot_of(name).is_none(), "{name}");
        }
    }
}
