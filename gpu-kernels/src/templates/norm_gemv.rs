//! The RMSNorm a GEMV computes in its prologue ([`NormPrologues`],
//! `GemmTuning::norm_prologue`): when the only value a row-mean kernel stores is the
//! normalized rows (`rms_norm`: `mean(x*x)`, rsqrt, then element-wise) and every kernel
//! reading them is a GEMV taking them as its A, the GEMV computes the rows itself and the
//! row kernel launches nothing in that variant.
//!
//! Warp-local, without shared memory or a barrier. Each warp first issues its first K
//! step's weight loads into registers (after the grid-dependency wait; before it where
//! `GemmTuning::preload` applies), so that their DRAM latency overlaps the statistic. Then,
//! for each row it holds (rows past a symbolic M skipped), its lanes read the norm's input
//! row in 16-byte vectors, lane `l` the vectors `l`, `l + 32`, ..., fold `x * x` in f32
//! (`reduce::Acc`) and add the lanes by the shuffle tree, so that every lane has the sum;
//! the mean divides it by K as `Acc::result` does, and the values of the statistic's shape
//! computed from it (`mean + eps`, its rsqrt) are computed once a row. The main loop then
//! computes each A vector from the group's element-wise expression of the normalized rows
//! (`x * inv * w`) and rounds it to the rows' dtype (`UnOp::RoundBf16` / `RoundF16`) as the
//! row kernel's store rounds it. Every warp computes the same bits, so all columns see the
//! same rows.
//!
//! Numerics: for rows of at most [`reduce::WARP_ROW_MAX`] elements the walk is the row
//! kernel's (a warp a row) and the rows are the row kernel's, bit for bit. Longer rows
//! (the 1.1B Llama's 2048) are added in this warp order rather than the row kernel's block
//! order (a warp's sums added in shared memory), so the statistic may differ from the row
//! kernel's in its last bits; the rows' rounding is the row kernel's.
//!
//! The input rows are read once for the statistic and again (through L1) in the main loop,
//! by every warp. The q/k/v grid that writes the caches keeps its norm kernel (ptxas
//! spilled it with the first step held), and a warp of several weight streams (gate/up)
//! holds fewer weight registers a step (`gemv::NORM_WEIGHT_REGISTERS`).

use super::reduce::{self, Acc, Red};
use super::{gemv, index_type, reads_by_group, size_variant, split_plan, stored_values, Variant};
use super::{KvWrites, RowSums};
use crate::emit::{add, lt, min_e, mul, Binding, EResult, Emitter};
use crate::graph::FuncGraph;
use crate::partition::{GroupKind, Partition};
use kiln_ir::{DType, Dim, Op, ReduceOp, Value};
use kiln_kir::{Expr, Special, Stmt, Ty, UnOp};
use std::collections::{BTreeMap, BTreeSet};

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
    /// read in no loop; 32-bit indexing in both kernels; nothing the row kernel reads
    /// updated in place before the last reader; no reader a grid of segments that performs
    /// `kv_write`s (`kv`, the q/k/v GEMV writing the caches: with the first step's weights
    /// held over the statistic, ptxas spilled it on every target, so that norm keeps its
    /// row kernel) unless [`crate::GemmTuning::norm_prologue_kv_writes`] asks for it, then
    /// without weights held over the statistic.
    pub(crate) fn find(
        g: &FuncGraph<'_>,
        part: &Partition<'_>,
        options: &crate::Options,
        sums: &RowSums,
        kv: &KvWrites,
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
            let mut ok =
                wanted.as_ref().is_none_or(|w| w.2) && index_type(g, row, options) == Ty::I32;
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
                let writes_kv = kv.by_gemm.get(&mg).is_some_and(|f| f.gemv.is_some())
                    && super::segmented_gemv(g, part, mg, options, in_variant);
                ok = ok
                    && takes_rows
                    && (!writes_kv || options.gemm.norm_prologue_kv_writes)
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
/// symbolic one skipped): each warp computes every row's statistic itself (no shared memory,
/// no barrier) and binds it, with the row-broadcast values computed from it (the `eps` sum
/// and its rsqrt), in `e.bindings` at `[r, 0]` for row `r`, so that the main loop's reads of
/// the normalized rows (`e.elem(norm.rows, [r, k], ..)`, rounded by [`round`]) use them.
///
/// The walk is the row kernel's for rows of a warp: lane `l` folds the vectors `l`,
/// `l + 32`, ... of the row (`x * x` in f32, `reduce::Acc`), then the shuffle tree; every
/// lane ends with the same sum and the mean divides it by K as `Acc::result` does.
pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    norm: &NormPrologue,
    rows: u64,
    m_size: &Expr,
    symbolic_rows: bool,
) -> EResult<()> {
    let g = e.g;
    let ity = e.index_ty;
    e.owned.extend(norm.owned.iter().copied());
    e.fused.insert(norm.mean);
    let k = norm.k;
    let kdim = Dim::Const(k);
    let lanes = reduce::row_lanes(Some(&kdim), Some(k), 32) as u64;
    let step = 32 * lanes;
    let chunks = k.div_ceil(step);
    let in_dtype = g.ty(norm.input).dtype;
    // The values of the row's statistic's shape computed from it (`mean + eps`, its rsqrt):
    // once a row, not once an element.
    let stat_shape = g.shape(norm.mean).to_vec();
    let scalars: Vec<Value> = norm
        .owned
        .iter()
        .copied()
        .filter(|&v| v != norm.mean && !g.is_heavy(v) && g.shape(v) == stat_shape.as_slice())
        .collect();
    let lane = index(ity, Expr::Special(Special::LaneId));
    let first = e.bind(out, "j", ity, mul(lane, e.ix(lanes as i64)));
    // The row scalars' bindings, made once every row's are computed (a value bound at some
    // rows is read only there).
    let mut bound = Vec::new();
    for r in 0..rows {
        let mut stmts = Vec::new();
        e.push_scope();
        let row = e.ix(r as i64);
        let acc = Acc::new(e, &mut stmts, Red::Mean, in_dtype);
        for c in 0..chunks {
            let start = add(first.clone(), e.ix((c * step) as i64));
            let (j, valid) = if (c + 1) * step > k {
                // The ragged last chunk: lanes past the row read its last vector and fold 0.
                let valid = e.bind(
                    &mut stmts,
                    "in_row",
                    Ty::Pred,
                    lt(start.clone(), e.ix(k as i64)),
                );
                let last = e.ix((k - lanes) as i64);
                (
                    e.bind(&mut stmts, "j", ity, min_e(start, last)),
                    Some(valid),
                )
            } else {
                (e.bind(&mut stmts, "j", ity, start), None)
            };
            let vals = e.elem(&mut stmts, norm.input, &[row.clone(), j], lanes as usize)?;
            for x in vals {
                let x = match &valid {
                    Some(valid) => Expr::Select(
                        Box::new(valid.clone()),
                        Box::new(x),
                        Box::new(Expr::f32(0.0)),
                    ),
                    None => x,
                };
                acc.fold(e, &mut stmts, x, None);
            }
        }
        acc.warp_reduce(e, &mut stmts);
        let mean = acc.result(e.ix(k as i64));
        let mean = e.bind(&mut stmts, "mean", Ty::F32, mean);
        let at = vec![e.ix(r as i64), e.ix(0)];
        e.bindings.push(Binding {
            value: norm.mean,
            index: at.clone(),
            expr: mean,
        });
        for &v in &scalars {
            let x = e.elem(&mut stmts, v, &at, 1)?;
            let ty = Ty::compute_type_of(g.ty(v).dtype);
            let x = e.bind(&mut stmts, "row_scale", ty, x[0].clone());
            bound.push(Binding {
                value: v,
                index: at.clone(),
                expr: x,
            });
        }

        e.pop_scope();
        if symbolic_rows && r > 0 {
            out.push(Stmt::if_then(lt(e.ix(r as i64), m_size.clone()), stmts));
        } else {
            out.extend(stmts);
        }
    }
    e.bindings.extend(bound);
    Ok(())
}

/// The `width` elements of normalized row `r` from `k0` on, computed in registers through
/// the group's element-wise expressions (after [`emit`] bound the row's statistic) and
/// rounded to the rows' dtype as the row kernel's store rounds them.
pub(crate) fn elements(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    norm: &NormPrologue,
    r: u64,
    k0: Expr,
    width: usize,
) -> EResult<Vec<Expr>> {
    let op = match e.g.ty(norm.rows).dtype {
        DType::F16 => UnOp::RoundF16,
        _ => UnOp::RoundBf16,
    };
    let row = e.ix(r as i64);
    let vals = e.elem(out, norm.rows, &[row, k0], width)?;
    Ok(vals
        .into_iter()
        .map(|x| Expr::Unary(op, Box::new(x)))
        .collect())
}

/// `x` (an i32 special) in the index type.
fn index(ity: Ty, x: Expr) -> Expr {
    if ity == Ty::I64 {
        Expr::Cast(Ty::I64, Box::new(x))
    } else {
        x
    }
}
