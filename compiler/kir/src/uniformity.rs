//! Block uniformity: which registers hold the same value in every thread of a block, and so
//! which branches and loops every thread of a block takes together.
//!
//! The rules (a conservative, flow-insensitive analysis):
//! - An expression is uniform when it reads no `ThreadIdx`, `LaneId` or `WarpId`, no
//!   non-uniform register, and no memory that may differ between threads or change while
//!   the block runs: no load from shared memory, and no load from a global buffer that this
//!   kernel stores to. Constants, scalar parameters, `BlockIdx` and `BlockDim` are uniform.
//! - Control flow is uniform at the top of the body, inside an `If` under uniform control
//!   flow whose condition is uniform, and inside a `For` under uniform control flow whose
//!   start, end and step are uniform and whose loop register is uniform.
//! - A register is uniform when every write to it is uniform and happens under uniform
//!   control flow: an `Assign` of a uniform expression; a `LoadVec` (every destination) from
//!   a global buffer the kernel does not store to, at a uniform index; a `ShuffleXor` of a
//!   uniform source; a `For` with uniform start, end and step (its loop register).
//!   A register never written is uniform (it reads as 0).
//!
//! Registers start uniform and are marked non-uniform until nothing changes (a greatest
//! fixed point). Both backends rely on this: the verifier requires `Barrier` and
//! `ShuffleXor` under uniform control flow, and the CPU backend runs the threads of a
//! block in lock step between barriers.

use crate::kernel::{Buf, Expr, Kernel, Special, Stmt, VarId};
use std::collections::BTreeSet;

/// The result of the analysis for one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uniformity {
    uniform_vars: Vec<bool>,
    stored_globals: BTreeSet<u32>,
}

/// Computes which registers of `kernel` are block-uniform. Works on kernels that have not
/// been verified: out-of-range ids count as non-uniform.
pub fn uniformity(kernel: &Kernel) -> Uniformity {
    let mut stored_globals = BTreeSet::new();
    collect_stored_globals(&kernel.body, &mut stored_globals);
    let mut analysis = Uniformity {
        uniform_vars: vec![true; kernel.vars.len()],
        stored_globals,
    };
    loop {
        let mut changed = false;
        analysis.mark_block(&kernel.body, true, &mut changed);
        if !changed {
            return analysis;
        }
    }
}

/// Global buffer parameters that some `Store` or `StoreVec` of `stmts` writes.
fn collect_stored_globals(stmts: &[Stmt], out: &mut BTreeSet<u32>) {
    for stmt in stmts {
        match stmt {
            Stmt::Store {
                buf: Buf::Global(index),
                ..
            }
            | Stmt::AtomicAdd {
                buf: Buf::Global(index),
                ..
            }
            | Stmt::StoreVec {
                buf: Buf::Global(index),
                ..
            } => {
                out.insert(*index);
            }
            Stmt::For { body, .. } => collect_stored_globals(body, out),
            Stmt::If {
                then, otherwise, ..
            } => {
                collect_stored_globals(then, out);
                collect_stored_globals(otherwise, out);
            }
            _ => {}
        }
    }
}

impl Uniformity {
    /// Whether `var` holds the same value in every thread of a block.
    pub fn is_uniform_var(&self, var: VarId) -> bool {
        self.uniform_vars
            .get(var.0 as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Whether `expr` evaluates to the same value in every thread of a block.
    pub fn is_uniform_expr(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Const(_) | Expr::Param(_) => true,
            Expr::Var(var) => self.is_uniform_var(*var),
            Expr::Special(special) => match special {
                Special::BlockIdx(_) | Special::BlockDim => true,
                Special::ThreadIdx | Special::LaneId | Special::WarpId => false,
            },
            Expr::Unary(_, a) | Expr::Cast(_, a) => self.is_uniform_expr(a),
            Expr::Binary(_, a, b) => self.is_uniform_expr(a) && self.is_uniform_expr(b),
            Expr::Fma(a, b, c) | Expr::Select(a, b, c) => {
                self.is_uniform_expr(a) && self.is_uniform_expr(b) && self.is_uniform_expr(c)
            }
            Expr::Load { buf, index } => {
                self.is_invariant_memory(*buf) && self.is_uniform_expr(index)
            }
        }
    }

    /// Whether a `For` whose header is `var`, `start`, `end`, `step` keeps uniform control
    /// flow uniform inside its body.
    pub fn is_uniform_loop(&self, var: VarId, start: &Expr, end: &Expr, step: &Expr) -> bool {
        self.is_uniform_var(var)
            && self.is_uniform_expr(start)
            && self.is_uniform_expr(end)
            && self.is_uniform_expr(step)
    }

    /// Memory that reads the same in every thread for the whole kernel: a global buffer the
    /// kernel never stores to.
    fn is_invariant_memory(&self, buf: Buf) -> bool {
        match buf {
            Buf::Global(index) => !self.stored_globals.contains(&index),
            Buf::Shared(_) => false,
        }
    }

    fn mark_non_uniform(&mut self, var: VarId, changed: &mut bool) {
        if let Some(uniform) = self.uniform_vars.get_mut(var.0 as usize) {
            if *uniform {
                *uniform = false;
                *changed = true;
            }
        }
    }

    /// One pass over `stmts` under control flow that is uniform when `uniform_flow`.
    fn mark_block(&mut self, stmts: &[Stmt], uniform_flow: bool, changed: &mut bool) {
        for stmt in stmts {
            match stmt {
                Stmt::Assign(var, value) => {
                    if !(uniform_flow && self.is_uniform_expr(value)) {
                        self.mark_non_uniform(*var, changed);
                    }
                }
                Stmt::LoadVec { dsts, buf, index } => {
                    let uniform = uniform_flow
                        && self.is_invariant_memory(*buf)
                        && self.is_uniform_expr(index);
                    if !uniform {
                        for dst in dsts {
                            self.mark_non_uniform(*dst, changed);
                        }
                    }
                }
                Stmt::ShuffleXor { dst, src, .. } => {
                    if !(uniform_flow && self.is_uniform_var(*src)) {
                        self.mark_non_uniform(*dst, changed);
                    }
                }
                Stmt::PackHalves { dst, lo, hi, .. } => {
                    if !(uniform_flow && self.is_uniform_expr(lo) && self.is_uniform_expr(hi)) {
                        self.mark_non_uniform(*dst, changed);
                    }
                }
                // Fragments differ from lane to lane.
                Stmt::Mma { d, .. } => {
                    for var in d {
                        self.mark_non_uniform(*var, changed);
                    }
                }
                Stmt::LdMatrix { dsts, .. } => {
                    for var in dsts {
                        self.mark_non_uniform(*var, changed);
                    }
                }
                Stmt::Wgmma(crate::wgmma::WgmmaOp::Mma { d, .. }) => {
                    for var in d {
                        self.mark_non_uniform(*var, changed);
                    }
                }
                Stmt::Wgmma(_) => {}
                Stmt::For {
                    var,
                    start,
                    end,
                    step,
                    body,
                } => {
                    let bounds_uniform = self.is_uniform_expr(start)
                        && self.is_uniform_expr(end)
                        && self.is_uniform_expr(step);
                    if !(uniform_flow && bounds_uniform) {
                        self.mark_non_uniform(*var, changed);
                    }
                    let body_uniform = uniform_flow && self.is_uniform_loop(*var, start, end, step);
                    self.mark_block(body, body_uniform, changed);
                }
                Stmt::If {
                    cond,
                    then,
                    otherwise,
                } => {
                    let branch_uniform = uniform_flow && self.is_uniform_expr(cond);
                    self.mark_block(then, branch_uniform, changed);
                    self.mark_block(otherwise, branch_uniform, changed);
                }
                Stmt::Store { .. }
                | Stmt::StoreVec { .. }
                | Stmt::Barrier
                | Stmt::CpAsync { .. }
                | Stmt::CpAsyncCommit
                | Stmt::CpAsyncWait(_)
                | Stmt::GridDependencyWait
                | Stmt::PrefetchL2 { .. }
                | Stmt::Fence
                | Stmt::LaunchDependents => {}
                // Each thread's add returns another value.
                Stmt::AtomicAdd { dst, .. } => self.mark_non_uniform(*dst, changed),
            }
        }
    }
}
