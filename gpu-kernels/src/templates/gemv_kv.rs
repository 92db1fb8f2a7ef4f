//! `kv_write`s performed by the GEMV of a grid of segments (`templates::KvWrites`, decode
//! q/k/v of at most [`super::GEMV_ROWS`] tokens): the same pairing of a `kv_write` group
//! with the GEMM whose segments it reads as for the split-K sum kernel, and the same
//! addressing (`kv_cache::store_row`), with the values held in the warp's registers.
//!
//! A GEMV warp holds whole dot products, a column each, so the rows of a write may only
//! read, at element (`t`, `h`, `d`), the segment's values at (`t`, `h · D + d`) and at the
//! rotary partner `h · D + (d ± D/2)` (RoPE's rotated half; [`column_reads`] checks this
//! on the graph). A segment whose rows read partners gets a warp per pair of columns
//! (`j`, `j + D/2` of a head: half as many block columns); the warp's lane 0 stores the
//! segment's values of both columns as the epilogue always does, reads them back (the
//! bits a `kv_write` kernel would load), and stores both elements of the rows into the
//! cache at the token's slot (a negative slot, the padding, storing nothing).

use super::kv_cache::store_row;
use super::mma_gemm::{matmuls_of, segments, Segment};
use super::KvFused;
use crate::emit::{add, and, div, lt, mul, rem, EResult, Emitter, HeldRow};
use crate::graph::FuncGraph;
use crate::partition::Partition;
use kiln_ir::{Dim, Op, Value};
use kiln_kir::{Expr, Stmt, Ty};
use std::collections::{BTreeMap, BTreeSet};

/// A `kv_write` a GEMV segment performs.
#[derive(Clone, Debug)]
pub(crate) struct ColumnWrite {
    /// The `kv_write`.
    pub write: Value,
    /// Whether its rows read each column's rotary partner (a warp per pair of columns).
    pub paired: bool,
    /// The rows' head dim `D`.
    pub dim: u64,
}

/// The `kv_write`s a GEMV performs, per matmul of its group.
#[derive(Clone, Debug, Default)]
pub(crate) struct GemvWrites {
    pub by_matmul: Vec<Option<ColumnWrite>>,
    /// What the writes compute themselves (the `kv_write` group's values, RoPE's angles
    /// computed inline: [`KvFused::owned`]).
    pub owned: BTreeSet<Value>,
}

impl GemvWrites {
    /// The writes of `fused` (whose `gemv` says which read rotary partners) for a group of
    /// `matmuls` matmuls.
    pub(crate) fn of(g: &FuncGraph<'_>, fused: &KvFused, matmuls: usize) -> GemvWrites {
        let mut by_matmul = vec![None; matmuls];
        let paired = fused.gemv.as_deref().unwrap_or_default();
        for (&(seg, write), &paired) in fused.writes.iter().zip(paired) {
            let rows = g.inst(write).expect("kv_write").operands[1];
            let dim = g.shape(rows)[2].as_const().expect("a constant head dim");
            by_matmul[seg] = Some(ColumnWrite { write, paired, dim });
        }
        GemvWrites {
            by_matmul,
            owned: fused.owned.clone(),
        }
    }

    /// The grid's segments over `widths`, a paired segment's block columns covering its
    /// pairs of columns.
    pub(crate) fn segments(&self, widths: &[u64], warps: u32) -> Vec<Segment> {
        let warp_columns: Vec<u64> = widths
            .iter()
            .zip(&self.by_matmul)
            .map(|(&n, w)| match w {
                Some(w) if w.paired => n / 2,
                _ => n,
            })
            .collect();
        segments(&warp_columns, warps)
    }
}

/// Per write of `fused` (`KvWrites`), whether its rows read each column's rotary partner,
/// when the GEMV may perform every write: each write's rows read its segment's values only
/// as [`column_reads`] allows, and a paired write's head dim is even.
pub(crate) fn pairs(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    mg: usize,
    fused: &KvFused,
    stores: &[Value],
) -> Option<Vec<bool>> {
    let gemm = &part.groups[mg];
    let mut e = Emitter::new(g, &part.stored, Ty::I32);
    e.owned = gemm.owned.clone();
    let mut found = Vec::new();
    for &(seg, w) in &fused.writes {
        let values: BTreeSet<Value> = stores
            .iter()
            .copied()
            .filter(|&v| matmuls_of(&e, gemm, v) == BTreeSet::from([seg]))
            .collect();
        let rows = g.inst(w)?.operands[1];
        let paired = column_reads(g, &values, rows)?;
        found.push(paired);
    }
    Some(found)
}

/// The walk of [`column_reads`].
struct Reads<'a, 'f> {
    g: &'a FuncGraph<'f>,
    values: &'a BTreeSet<Value>,
    rows: &'a [Dim],
    depends: BTreeMap<Value, bool>,
}

impl Reads<'_, '_> {
    /// Whether `v` is computed from the segment's values.
    fn depends(&mut self, v: Value) -> bool {
        if let Some(&d) = self.depends.get(&v) {
            return d;
        }
        let d = self.values.contains(&v)
            || self
                .g
                .inst(v)
                .is_some_and(|inst| inst.operands.clone().iter().any(|&o| self.depends(o)));
        self.depends.insert(v, d);
        d
    }

    /// [`column_reads`] of the elements `d` in `lo..hi` (of every `t`, `h`) of the rows,
    /// which read `v` at (`t`, `h`, `d + delta`).
    fn at(&mut self, v: Value, lo: i64, hi: i64, delta: i64) -> Option<bool> {
        if lo >= hi || !self.depends(v) {
            return Some(false);
        }
        let g = self.g;
        let inst = g.inst(v)?;
        let shape = g.shape(v);
        let last = shape.len().checked_sub(1)?;
        match &inst.op {
            Op::Reshape { .. } => {
                // The segment's `[M, H · D]` values (or values computed from them
                // element-wise) as the rows' `[M, H, D]`.
                let [m, Dim::Const(h), Dim::Const(d)] = shape else {
                    return None;
                };
                let flat = [m.clone(), Dim::Const(h * d)];
                if shape != self.rows || g.shape(inst.operands[0]) != flat {
                    return None;
                }
                self.flat(inst.operands[0], lo, hi, delta)
            }
            Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } => {
                let mut paired = false;
                for &o in &inst.operands {
                    if !self.depends(o) {
                        continue;
                    }
                    if g.shape(o) != shape {
                        return None;
                    }
                    paired |= self.at(o, lo, hi, delta)?;
                }
                Some(paired)
            }
            Op::Slice {
                axis, start, step, ..
            } if *axis == last && *step == 1 => {
                self.at(inst.operands[0], lo, hi, delta + *start as i64)
            }
            Op::Concat { axis } if *axis == last => {
                let mut paired = false;
                let mut offset = 0i64;
                for &o in &inst.operands {
                    let size = g.shape(o)[last].as_const()? as i64;
                    // The rows' elements whose read falls in this piece.
                    let (from, to) = (lo.max(offset - delta), hi.min(offset + size - delta));
                    paired |= self.at(o, from, to, delta - offset)?;
                    offset += size;
                }
                Some(paired)
            }
            _ => None,
        }
    }

    /// [`Reads::at`] below the reshape: `v` is `[M, H · D]`, read at (`t`, `h · D + d +
    /// delta`) for the rows' elements `d` in `lo..hi`.
    fn flat(&mut self, v: Value, lo: i64, hi: i64, delta: i64) -> Option<bool> {
        if !self.depends(v) {
            return Some(false);
        }
        if self.values.contains(&v) {
            let Some(&Dim::Const(d)) = self.rows.get(2) else {
                return None;
            };
            let half = (d / 2) as i64;
            return if delta == 0 {
                Some(false)
            } else if d % 2 == 0
                && ((delta == half && hi <= half) || (delta == -half && lo >= half))
            {
                Some(true)
            } else {
                None
            };
        }
        let g = self.g;
        let inst = g.inst(v)?;
        match &inst.op {
            Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } => {
                let mut paired = false;
                for &o in &inst.operands {
                    if !self.depends(o) {
                        continue;
                    }
                    if g.shape(o) != g.shape(v) {
                        return None;
                    }
                    paired |= self.flat(o, lo, hi, delta)?;
                }
                Some(paired)
            }
            _ => None,
        }
    }
}

/// Whether the rows `[M, H, D]` of a `kv_write` (`rows`), at each element (`t`, `h`, `d`),
/// read the segment's `[M, H · D]` values (`values`, through a reshape to the rows' shape)
/// only at (`t`, `h · D + d`) or at its rotary partner (`d + D/2` below `D/2`, `d - D/2`
/// above): through element-wise ops of one shape, slices of the last axis and concats
/// along it (RoPE's rotated half). `Some(true)` when some element reads a partner.
pub(crate) fn column_reads(
    g: &FuncGraph<'_>,
    values: &BTreeSet<Value>,
    rows: Value,
) -> Option<bool> {
    let [_, _, Dim::Const(dim)] = g.shape(rows) else {
        return None;
    };
    let mut reads = Reads {
        g,
        values,
        rows: g.shape(rows),
        depends: BTreeMap::new(),
    };
    reads.at(rows, 0, *dim as i64, 0)
}

/// The columns a warp of a paired segment owns: pair `pair` is column `j` of head `h`
/// (`pair = h · D/2 + j`), the warp's columns `h · D + j` and `h · D + j + D/2`.
pub(crate) fn pair_columns(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    pair: &Expr,
    dim: u64,
) -> Vec<Expr> {
    let ity = e.index_ty;
    let half = e.ix(dim as i64 / 2);
    let head = div(pair.clone(), half.clone());
    let first = add(mul(head, e.ix(dim as i64)), rem(pair.clone(), half.clone()));
    let first = e.bind(out, "col_lo", ity, first);
    let second = e.bind(out, "col_hi", ity, add(first.clone(), half));
    vec![first, second]
}

/// Lane 0's `kv_write` of the warp's columns `cols` (one, or a rotary pair) of the rows
/// `0..rows` (those past a symbolic M, `m`, skipped): the segment's `stored` values read
/// back where the epilogue stored them, held for the rows' reads, and each element of the
/// rows stored into the cache at its token's slot (`kv_cache::store_row`). `n`: the
/// segment's width (a warp past it writes nothing).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_columns(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    write: &ColumnWrite,
    owned: &BTreeSet<Value>,
    stored: &[Value],
    cols: &[Expr],
    rows: u64,
    m: Option<&Expr>,
    lane0: &Expr,
    n: u64,
) -> EResult<()> {
    let ity = e.index_ty;
    let mut stmts = Vec::new();
    let kernel_owned = std::mem::replace(&mut e.owned, owned.clone());
    let head = e.bind(
        &mut stmts,
        "head",
        ity,
        div(cols[0].clone(), e.ix(write.dim as i64)),
    );
    let positions: Vec<Expr> = cols
        .iter()
        .map(|c| {
            let d = rem(c.clone(), e.ix(write.dim as i64));
            e.bind(&mut stmts, "d", ity, d)
        })
        .collect();
    let mut result = Ok(());
    for r in 0..rows as i64 {
        let row = e.ix(r);
        let mut row_stmts = Vec::new();
        e.push_scope();
        let held = e.rows.len();
        for &u in stored {
            let mut regs = Vec::new();
            for c in cols {
                match e.elem(&mut row_stmts, u, &[row.clone(), c.clone()], 1) {
                    Ok(mut v) => regs.push(v.remove(0)),
                    Err(err) => result = Err(err),
                }
            }
            if regs.len() == cols.len() {
                e.rows.push(HeldRow {
                    value: u,
                    axis: 1,
                    regs,
                    at: cols.to_vec(),
                });
            }
        }
        for d in &positions {
            e.push_scope();
            match store_row(e, write.write, &row, &head, d, 1) {
                Ok(s) => row_stmts.extend(s),
                Err(err) => result = Err(err),
            }
            e.pop_scope();
        }
        e.rows.truncate(held);
        e.pop_scope();
        match m.filter(|_| r > 0) {
            // Rows past a symbolic M: skipped (the same branch in every thread).
            Some(m) => stmts.push(Stmt::if_then(lt(row, m.clone()), row_stmts)),
            None => stmts.extend(row_stmts),
        }
    }
    e.owned = kernel_owned;
    result?;
    let last = cols.last().expect("a column").clone();
    let inside = and(lane0.clone(), lt(last, e.ix(n as i64)));
    out.push(Stmt::if_then(inside, stmts));
    e.fused.insert(write.write);
    Ok(())
}
