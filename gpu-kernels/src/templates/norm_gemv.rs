//! The RMSNorm a GEMV computes in its prologue ([`NormPrologues`],
//! `GemmTuning::norm_prologue`): when the only value a row-mean kernel stores is the
//! normalized rows (`rms_norm`: `mean(x*x)`, rsqrt, then element-wise) and every kernel
//! reading them is a GEMV taking them as its A, the GEMV block computes the rows itself
//! and the row kernel launches nothing in that variant.
//!
//! The block (four warps) first reduces each row as the row kernel would: the row kernel's
//! threads (a warp for rows of at most [`reduce::WARP_ROW_MAX`] elements, else a block of
//! [`reduce::ROW_BLOCK`]) are played by the block's warps, each warp one of the row
//! kernel's warps at a time (a warp's lanes the same lanes, each folding the same elements
//! in the same order, the same shuffle tree), the warp sums in shared memory added in warp
//! order: the same f32 statistic, bit for bit. Every thread then computes its share of the
//! normalized rows through the group's element-wise expressions (the statistic bound as
//! the row kernel binds it) and stores them to a shared array of the rows' dtype, rounded
//! as the row kernel's store rounds them; the GEMV's main loop reads A from there. The
//! input rows are read twice (through L1): once for the statistic, once for the rows.

use super::reduce::{self, Acc, Red};
use super::{gemv, index_type, reads_by_group, size_variant, split_plan, stored_values, Variant};
use super::{KvWrites, RowSums};
use crate::emit::{add, lt, min_e, mul, sub, Binding, EResult, Emitter};
use crate::graph::FuncGraph;
use crate::partition::{GroupKind, Partition};
use kiln_ir::{DType, Dim, Op, ReduceOp, Value};
use kiln_kir::{BinOp, Buf, Expr, Special, Stmt, Ty};
use std::collections::{BTreeMap, BTreeSet};

/// The most bytes of normalized rows a GEMV block keeps in shared memory (four rows of
/// 4096 16-bit elements; static shared memory stays below 48 KiB).
const MAX_ROW_BYTES: u64 = 32 * 1024;

/// Warps of a GEMV block (its threads compute the rows).
const WARPS: u64 = gemv::WARPS as u64;

/// Row groups whose normalized rows the GEMVs reading them compute ([`NormPrologues`]
/// applies in the variants where every reader takes the GEMV).
#[derive(Default)]
pub(crate) struct NormPrologues {
    /// Row group → the GEMM groups reading its rows.
    pub by_row: BTreeMap<usize, Vec<usize>>,
    /// GEMM group → the row group whose rows it computes.
    pub by_gemm: BTreeMap<usize, usize>,
}

/// What a GEMV computes of a row group: its mean, the mean's input, the normalized rows
/// (`[M, K]`) and every value the group computes.
#[derive(Clone)]
pub(crate) struct NormPrologue {
    mean: Value,
    input: Value,
    rows: Value,
    owned: BTreeSet<Value>,
    k: u64,
}

/// The prologue of row group `rg` when it is a single mean over rows of a constant length
/// (a multiple of 8) of `[M, K]` values kept as `[M, 1]`, storing exactly one `[M, K]`
/// value of bf16 or f16.
pub(crate) fn prologue(g: &FuncGraph<'_>, part: &Partition<'_>, rg: usize) -> Option<NormPrologue> {
    let group = &part.groups[rg];
    let GroupKind::Row { outer, inner } = &group.kind else {
        return None;
    };
    let ([m], [Dim::Const(k)]) = (outer.as_slice(), inner.as_slice()) else {
        return None;
    };
    let [mean] = group.roots[..] else {
        return None;
    };
    let inst = g.inst(mean)?;
    if !matches!(
        inst.op,
        Op::Reduce {
            op: ReduceOp::Mean,
            ..
        }
    ) {
        return None;
    }
    let [rows] = stored_values(part, rg)[..] else {
        return None;
    };
    let fits = g.shape(mean) == [m.clone(), Dim::Const(1)]
        && g.shape(rows) == [m.clone(), Dim::Const(*k)]
        && matches!(g.ty(rows).dtype, DType::BF16 | DType::F16)
        && *k > 0
        && k % 8 == 0;
    fits.then(|| NormPrologue {
        mean,
        input: inst.operands[0],
        rows,
        owned: group.owned.clone(),
        k: *k,
    })
}

impl NormPrologues {
    /// Finds the row groups (none unless tensor cores, the GEMV and
    /// [`crate::GemmTuning::norm_prologue`] are on): a [`prologue`] whose rows only GEMM
    /// groups of the same region read, later, each of their matmuls taking exactly those
    /// rows as A and the GEMV applying, all with the same run-time variants (which the row
    /// group takes, as with [`RowSums`]: a row group that adds split-K sums only where the
    /// GEMMs it adds are GEMVs in the GEMV variant too); the rows no function result and
    /// read in no loop; at most [`MAX_ROW_BYTES`] of rows in a block; 32-bit indexing in
    /// both kernels; nothing the row kernel reads updated in place before the last reader.
    pub(crate) fn find(
        g: &FuncGraph<'_>,
        part: &Partition<'_>,
        options: &crate::Options,
        sums: &RowSums,
    ) -> NormPrologues {
        let mut found = NormPrologues::default();
        if !options.tensor_cores || !options.gemm.gemv || !options.gemm.norm_prologue {
            return found;
        }
        let reads = reads_by_group(g, part);
        let results: BTreeSet<Value> = g.func.results().iter().map(|&r| base(part, r)).collect();
        let variant = |gid: usize| {
            size_variant(
                g,
                part,
                gid,
                options,
                &RowSums::default(),
                &KvWrites::default(),
            )
            .map(|v| (v.symbol, v.at_most, v.gemv))
        };
        for rg in 0..part.groups.len() {
            let Some(norm) = prologue(g, part, rg) else {
                continue;
            };
            let row = &part.groups[rg];
            if results.contains(&norm.rows) || !only_in_region(g, part, norm.rows, row.region) {
                continue;
            }
            let readers: Vec<usize> = (0..part.groups.len())
                .filter(|&gid| gid != rg && reads[gid].iter().any(|&v| base(part, v) == norm.rows))
                .collect();
            let Some(&first) = readers.first() else {
                continue;
            };
            let wanted = variant(first);
            let in_variant = if wanted.is_some() {
                Variant::Gemv
            } else {
                Variant::Large
            };
            let rows_held = match g.shape(norm.rows)[0] {
                Dim::Const(m) => m,
                Dim::Sym(_) => gemv::GEMV_ROWS,
            };
            let dtype = g.ty(norm.rows).dtype;
            let mut ok = wanted.as_ref().is_none_or(|w| w.2)
                && rows_held * norm.k * dtype.size_bytes() as u64 <= MAX_ROW_BYTES
                && index_type(g, row, options) == Ty::I32;
            // What the row kernel reads stays as it was until the last reader runs: no
            // `kv_write` (the only in-place update) in between touches it.
            let last = readers
                .iter()
                .map(|&mg| part.groups[mg].pos)
                .max()
                .unwrap_or(0);
            let inputs: BTreeSet<Value> = reads[rg].iter().map(|&v| base(part, v)).collect();
            let updated = part.groups.iter().enumerate().any(|(gid, other)| {
                matches!(other.kind, GroupKind::KvWrite)
                    && other.pos > row.pos
                    && other.pos < last
                    && reads[gid].iter().any(|&v| inputs.contains(&base(part, v)))
            });
            ok = ok && !updated;
            for &mg in &readers {
                let gemm = &part.groups[mg];
                let takes_rows = matches!(gemm.kind, GroupKind::Matmul { .. })
                    && gemm.region == row.region
                    && gemm.pos > row.pos
                    && gemm.roots.iter().all(|&m| {
                        g.inst(m)
                            .is_some_and(|inst| inst.operands.first() == Some(&norm.rows))
                    });
                ok = ok
                    && takes_rows
                    && index_type(g, gemm, options) == Ty::I32
                    && variant(mg) == wanted
                    && takes_gemv(g, part, mg, options, in_variant);
            }
            // The split-K GEMMs whose sums this row kernel adds: GEMVs in the GEMV variant,
            // so that nothing is left to add where the row kernel vanishes.
            for &mg in sums.by_row.get(&rg).into_iter().flatten() {
                ok = ok
                    && variant(mg) == wanted
                    && split_plan(g, part, mg, options, in_variant, false).is_none();
            }
            if ok {
                for &mg in &readers {
                    found.by_gemm.insert(mg, rg);
                }
                found.by_row.insert(rg, readers);
            }
        }
        found
    }

    /// Whether row group `rg`'s rows are computed by the GEMVs reading them in `variant`
    /// (then it launches nothing).
    pub(crate) fn absorbed(
        &self,
        g: &FuncGraph<'_>,
        part: &Partition<'_>,
        rg: usize,
        options: &crate::Options,
        variant: Variant,
    ) -> bool {
        self.by_row.get(&rg).is_some_and(|readers| {
            readers
                .iter()
                .all(|&mg| takes_gemv(g, part, mg, options, variant))
        })
    }

    /// The prologue GEMM group `mg` computes in `variant`, if any.
    pub(crate) fn of_gemm(
        &self,
        g: &FuncGraph<'_>,
        part: &Partition<'_>,
        mg: usize,
        options: &crate::Options,
        variant: Variant,
    ) -> Option<NormPrologue> {
        let &rg = self.by_gemm.get(&mg)?;
        if !self.absorbed(g, part, rg, options, variant) {
            return None;
        }
        prologue(g, part, rg)
    }
}

/// Whether GEMM group `mg` takes the GEMV in `variant`.
fn takes_gemv(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    mg: usize,
    options: &crate::Options,
    variant: Variant,
) -> bool {
    let group = &part.groups[mg];
    let mut e = Emitter::new(g, &part.stored, Ty::I32);
    e.owned = group.owned.clone();
    gemv::plan(&e, group, variant, options).is_some()
}

/// The base buffer value of `v` (through the reshapes that share a buffer).
fn base(part: &Partition<'_>, mut v: Value) -> Value {
    while let Some(&b) = part.view_of.get(&v) {
        v = b;
    }
    v
}

/// Whether every use of `v` (and of its views) is by an op of `region` other than a loop.
fn only_in_region(g: &FuncGraph<'_>, part: &Partition<'_>, v: Value, region: usize) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        for (r, inst) in &g.users[v.0 as usize] {
            if *r != region || matches!(inst.op, Op::Loop) {
                return false;
            }
            stack.extend(inst.results.iter().filter(|r| part.view_of.contains_key(r)));
        }
    }
    true
}

/// Emits the prologue into `out` for `rows` rows held (`m_size` the row count; rows past a
/// symbolic one skipped) and returns the shared array `[rows, K]` of normalized rows.
/// Block-uniform: its barriers are reached by every thread.
pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    norm: &NormPrologue,
    rows: u64,
    m_size: &Expr,
    symbolic_rows: bool,
) -> EResult<Buf> {
    let g = e.g;
    let ity = e.index_ty;
    e.owned.extend(norm.owned.iter().copied());
    e.fused.insert(norm.mean);
    let k = norm.k;
    // The row kernel's walk: its threads a row, elements a thread and step.
    let threads = if k <= reduce::WARP_ROW_MAX {
        32
    } else {
        reduce::ROW_BLOCK
    };
    let kdim = Dim::Const(k);
    let lanes = reduce::row_lanes(Some(&kdim), Some(k), threads) as u64;
    let step = u64::from(threads) * lanes;
    let chunks = k.div_ceil(step);
    let row_warps = u64::from(threads / 32);
    let pairs = rows * row_warps;
    let partial = e.shared_array("norm_partial", DType::F32, pairs as u32);
    let lane = Expr::Special(Special::LaneId);
    let warp = Expr::Special(Special::WarpId);
    let last_row = e.bind(out, "last_row", ity, sub(m_size.clone(), e.ix(1)));
    let in_dtype = g.ty(norm.input).dtype;
    // Pair p = (row, row-kernel warp) goes to warp p mod 4, in rounds.
    for round in 0..pairs.div_ceil(WARPS) {
        e.push_scope();
        let p = add(e.ix((round * WARPS) as i64), index(ity, warp.clone()));
        let p = e.bind(out, "pair", ity, p);
        let row = crate::emit::div(p.clone(), e.ix(row_warps as i64));
        // Pairs past the rows read the last row (their sums are never used).
        let row = e.bind(out, "stat_row", ity, min_e(row, last_row.clone()));
        let rw = crate::emit::rem(p.clone(), e.ix(row_warps as i64));
        let tid = add(mul(rw, e.ix(32)), index(ity, lane.clone()));
        let tid = e.bind(out, "tid", ity, tid);
        let acc = Acc::new(e, out, Red::Mean, in_dtype);
        let first = e.bind(out, "j", ity, mul(tid, e.ix(lanes as i64)));
        for c in 0..chunks {
            let start = add(first.clone(), e.ix((c * step) as i64));
            let (j, valid) = if (c + 1) * step > k {
                let valid = e.bind(out, "in_row", Ty::Pred, lt(start.clone(), e.ix(k as i64)));
                let last = e.ix((k - lanes) as i64);
                (e.bind(out, "j", ity, min_e(start, last)), Some(valid))
            } else {
                (e.bind(out, "j", ity, start), None)
            };
            let vals = e.elem(out, norm.input, &[row.clone(), j], lanes as usize)?;
            for x in vals {
                let x = match &valid {
                    Some(valid) => Expr::Select(
                        Box::new(valid.clone()),
                        Box::new(x),
                        Box::new(Expr::f32(0.0)),
                    ),
                    None => x,
                };
                acc.fold(e, out, x, None);
            }
        }
        acc.warp_reduce(e, out);
        let store = Stmt::Store {
            buf: partial,
            index: p.clone(),
            value: Expr::var(acc.value()),
        };
        let first_lane = lane.clone().equals(Expr::Const(kiln_kir::Const::I32(0)));
        let cond = crate::emit::and(first_lane, lt(p, e.ix(pairs as i64)));
        out.push(Stmt::if_then(cond, vec![store]));
        e.pop_scope();
    }
    out.push(Stmt::Barrier);
    // Each row's statistic (the warp sums in order, as the row kernel's block adds them),
    // then the thread's vectors of the normalized row into shared memory.
    let dtype = g.ty(norm.rows).dtype;
    let held = e.shared_array("norm_rows", dtype, (rows * k) as u32);
    let tid = index(ity, Expr::Special(Special::ThreadIdx));
    let tid = e.bind(out, "t", ity, tid);
    let vector = 8u64;
    let block_step = u64::from(gemv::WARPS) * 32 * vector;
    for r in 0..rows {
        let mut stmts = Vec::new();
        e.push_scope();
        let total = e.var("norm_sum", Ty::F32);
        let at = |i: u64| Expr::Load {
            buf: partial,
            index: Box::new(Expr::Const(kiln_kir::Const::I32(i as i32))),
        };
        stmts.push(Stmt::Assign(total, at(r * row_warps)));
        for w in 1..row_warps {
            stmts.push(Stmt::assign(
                total,
                Expr::var(total) + at(r * row_warps + w),
            ));
        }
        // As `Acc::result` divides (the count a constant of the index type).
        let mean = crate::emit::bin(
            BinOp::Div,
            Expr::var(total),
            Expr::Cast(Ty::F32, Box::new(e.ix(k as i64))),
        );
        let mean = e.bind(&mut stmts, "mean", Ty::F32, mean);
        let held_bindings = e.bindings.len();
        e.bindings.push(Binding {
            value: norm.mean,
            index: vec![e.ix(r as i64), e.ix(0)],
            expr: mean,
        });
        for c in 0..k.div_ceil(block_step) {
            let pos = add(
                mul(tid.clone(), e.ix(vector as i64)),
                e.ix((c * block_step) as i64),
            );
            let pos = e.bind(&mut stmts, "pos", ity, pos);
            let mut chunk = Vec::new();
            e.push_scope();
            let vals = e.elem(&mut chunk, norm.rows, &[e.ix(r as i64), pos.clone()], 8);
            e.pop_scope();
            let vals = vals?;
            chunk.push(Stmt::StoreVec {
                buf: held,
                index: add(e.ix((r * k) as i64), pos.clone()),
                values: vals,
            });
            if (c + 1) * block_step > k {
                stmts.push(Stmt::if_then(lt(pos, e.ix(k as i64)), chunk));
            } else {
                stmts.extend(chunk);
            }
        }
        e.bindings.truncate(held_bindings);
        e.pop_scope();
        if symbolic_rows && r > 0 {
            out.push(Stmt::if_then(lt(e.ix(r as i64), m_size.clone()), stmts));
        } else {
            out.extend(stmts);
        }
    }
    out.push(Stmt::Barrier);
    Ok(held)
}

/// `x` (an i32 special) in the index type.
fn index(ity: Ty, x: Expr) -> Expr {
    if ity == Ty::I64 {
        Expr::Cast(Ty::I64, Box::new(x))
    } else {
        x
    }
}
