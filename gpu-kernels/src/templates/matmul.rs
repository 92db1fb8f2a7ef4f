//! The matmul template: `[.., M, K] @ [.., K, N]` with broadcast batch dims, a plain
//! shared-memory tiled kernel (tensor cores come later). Several matmuls sharing the left
//! operand are computed by one kernel (horizontal fusion: each thread keeps accumulators for
//! all of them), the element-wise prologue of each operand is inlined into its tile loads
//! (transposes, casts, scales) and the element-wise epilogue (bias, activation, residual
//! add, cast, or a combination of the fused matmuls such as `silu(gate) * up`) is applied to
//! the accumulators before the store. Ragged edges are bounds-checked.

use super::{ceil_div_size, size_of_dims, Body};
use crate::emit::{add, and, bin, div, lt, mul, rem, Binding, EResult, Emitter};
use crate::partition::Group;
use kiln_ir::{DType, Dim, Op, Value};
use kiln_kir::{BinOp, Buf, Expr, Special, Stmt, Ty, VarId};

/// The tiling of the matmul template, in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulTiling {
    /// Output rows per block.
    pub bm: u32,
    /// Output columns per block.
    pub bn: u32,
    /// The K step staged in shared memory.
    pub bk: u32,
    /// Output rows per thread.
    pub tm: u32,
    /// Output columns per thread.
    pub tn: u32,
}

impl Default for MatmulTiling {
    fn default() -> MatmulTiling {
        MatmulTiling {
            bm: 64,
            bn: 64,
            bk: 16,
            tm: 4,
            tn: 4,
        }
    }
}

impl MatmulTiling {
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }
}

/// The operand index for batch index `batch` of the result (numpy-broadcast batch dims).
pub(crate) fn batch_index(
    e: &Emitter<'_, '_>,
    operand: Value,
    out_batch: &[Dim],
    batch: &[Expr],
) -> Vec<Expr> {
    let shape = e.g.shape(operand);
    let ob = &shape[..shape.len() - 2];
    let pad = out_batch.len() - ob.len();
    ob.iter()
        .enumerate()
        .map(|(d, dim)| {
            if *dim == Dim::Const(1) && out_batch[d + pad] != Dim::Const(1) {
                e.ix(0)
            } else {
                batch[d + pad].clone()
            }
        })
        .collect()
}

/// Whether `b`'s element (k, n) is stored with k contiguous (a transposed weight).
fn k_contiguous(e: &Emitter<'_, '_>, b: Value) -> bool {
    match e.g.op(b) {
        Some(Op::Permute { perm }) => {
            let r = perm.len();
            r >= 2 && perm[r - 1] == r - 2 && perm[r - 2] == r - 1
        }
        _ => false,
    }
}

pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    stores: &[Value],
    t: &MatmulTiling,
) -> EResult<Body> {
    let g = e.g;
    let matmuls = group.roots.clone();
    let first = matmuls[0];
    let out_shape = g.shape(first).to_vec();
    let rank = out_shape.len();
    let batch_dims = out_shape[..rank - 2].to_vec();
    let a = g.inst(first).expect("matmul").operands[0];
    let a_shape = g.shape(a).to_vec();
    let k_dim = a_shape[a_shape.len() - 1].clone();
    let dtype = g.ty(first).dtype;
    let ty = Ty::compute_type_of(dtype);
    let sdtype = match ty {
        Ty::F32 => DType::F32,
        Ty::I64 => DType::I64,
        _ => DType::I32,
    };
    let n_dims: Vec<Dim> = matmuls
        .iter()
        .map(|m| g.shape(*m)[rank - 1].clone())
        .collect();
    let grid_n = if n_dims.iter().all(|d| d.as_const().is_some()) {
        Dim::Const(n_dims.iter().filter_map(Dim::as_const).max().unwrap_or(1))
    } else if n_dims.iter().all(|d| *d == n_dims[0]) {
        n_dims[0].clone()
    } else {
        return Err(e.internal(
            first,
            "horizontally fused matmuls with different symbolic N",
        ));
    };
    let threads = t.threads();
    let (bm, bn, bk, tm, tn) = (
        t.bm as i64,
        t.bn as i64,
        t.bk as i64,
        t.tm as usize,
        t.tn as usize,
    );
    let ity = e.index_ty;
    let mut body = Vec::new();
    let tid = e.special(Special::ThreadIdx);
    let tx = e.bind(&mut body, "tx", ity, rem(tid.clone(), e.ix(bn / tn as i64)));
    let ty_ = e.bind(&mut body, "ty", ity, div(tid.clone(), e.ix(bn / tn as i64)));
    let m0 = mul(e.special(Special::BlockIdx(1)), e.ix(bm));
    let m0 = e.bind(&mut body, "m0", ity, m0);
    let n0 = mul(e.special(Special::BlockIdx(0)), e.ix(bn));
    let n0 = e.bind(&mut body, "n0", ity, n0);
    let bz = e.special(Special::BlockIdx(2));
    let batch = e.delinearize(&mut body, bz, &batch_dims);
    let m_size = e.dim(&out_shape[rank - 2]);
    let k_size = e.dim(&k_dim);
    let zero = Expr::Const(crate::emit::zero_of(ty));
    // Accumulators: acc[matmul][r][c].
    let mut acc: Vec<Vec<VarId>> = Vec::new();
    for _ in &matmuls {
        let cells: Vec<VarId> = (0..tm * tn).map(|_| e.var("acc", ty)).collect();
        for c in &cells {
            body.push(Stmt::Assign(*c, zero.clone()));
        }
        acc.push(cells);
    }
    let a_tile = e.shared_array("a_tile", sdtype, (bm * bk) as u32);
    let b_tiles: Vec<Buf> = matmuls
        .iter()
        .map(|_| e.shared_array("b_tile", sdtype, (bk * bn) as u32))
        .collect();
    let k0 = e.var("k0", ity);
    let mut kloop = Vec::new();
    // Stage the A tile.
    let a_batch = batch_index(e, a, &batch_dims, &batch);
    for q in 0..(bm * bk) as usize / threads as usize {
        let flat = add(tid.clone(), e.ix(q as i64 * i64::from(threads)));
        let mm = e.bind(&mut kloop, "mm", ity, div(flat.clone(), e.ix(bk)));
        let kk = e.bind(&mut kloop, "kk", ity, rem(flat, e.ix(bk)));
        let gm = e.bind(&mut kloop, "gm", ity, add(m0.clone(), mm.clone()));
        let gk = e.bind(&mut kloop, "gk", ity, add(Expr::Var(k0), kk.clone()));
        let slot = add(mul(mm, e.ix(bk)), kk);
        let mut idx = a_batch.clone();
        idx.extend([gm.clone(), gk.clone()]);
        let inside = and(lt(gm, m_size.clone()), lt(gk, k_size.clone()));
        stage(e, &mut kloop, a, a_tile, slot, &idx, inside, &zero)?;
    }
    for (i, &m) in matmuls.iter().enumerate() {
        let b = g.inst(m).expect("matmul").operands[1];
        let b_batch = batch_index(e, b, &batch_dims, &batch);
        let n_size = e.dim(&n_dims[i]);
        let kfast = k_contiguous(e, b);
        for q in 0..(bk * bn) as usize / threads as usize {
            let flat = add(tid.clone(), e.ix(q as i64 * i64::from(threads)));
            let (kk, nn) = if kfast {
                (rem(flat.clone(), e.ix(bk)), div(flat, e.ix(bk)))
            } else {
                (div(flat.clone(), e.ix(bn)), rem(flat, e.ix(bn)))
            };
            let kk = e.bind(&mut kloop, "kk", ity, kk);
            let nn = e.bind(&mut kloop, "nn", ity, nn);
            let gk = e.bind(&mut kloop, "gk", ity, add(Expr::Var(k0), kk.clone()));
            let gn = e.bind(&mut kloop, "gn", ity, add(n0.clone(), nn.clone()));
            let slot = add(mul(kk, e.ix(bn)), nn);
            let mut idx = b_batch.clone();
            idx.extend([gk.clone(), gn.clone()]);
            let inside = and(lt(gk, k_size.clone()), lt(gn, n_size.clone()));
            stage(e, &mut kloop, b, b_tiles[i], slot, &idx, inside, &zero)?;
        }
    }
    kloop.push(Stmt::Barrier);
    // Multiply the staged tiles.
    let kk = e.var("kk", ity);
    let mut inner = Vec::new();
    let a_vals: Vec<VarId> = (0..tm)
        .map(|r| {
            let v = e.var("a", ty);
            let row = add(mul(ty_.clone(), e.ix(tm as i64)), e.ix(r as i64));
            inner.push(Stmt::Assign(
                v,
                Expr::Load {
                    buf: a_tile,
                    index: Box::new(add(mul(row, e.ix(bk)), Expr::Var(kk))),
                },
            ));
            v
        })
        .collect();
    for (i, cells) in acc.iter().enumerate() {
        for c in 0..tn {
            let b = e.var("b", ty);
            let col = add(mul(tx.clone(), e.ix(tn as i64)), e.ix(c as i64));
            inner.push(Stmt::Assign(
                b,
                Expr::Load {
                    buf: b_tiles[i],
                    index: Box::new(add(mul(Expr::Var(kk), e.ix(bn)), col)),
                },
            ));
            for (r, a_r) in a_vals.iter().enumerate() {
                let cell = cells[r * tn + c];
                let value = if ty == Ty::F32 {
                    Expr::Fma(
                        Box::new(Expr::Var(*a_r)),
                        Box::new(Expr::Var(b)),
                        Box::new(Expr::Var(cell)),
                    )
                } else {
                    bin(
                        BinOp::Add,
                        Expr::Var(cell),
                        bin(BinOp::Mul, Expr::Var(*a_r), Expr::Var(b)),
                    )
                };
                inner.push(Stmt::Assign(cell, value));
            }
        }
    }
    kloop.push(Stmt::For {
        var: kk,
        start: e.ix(0),
        end: e.ix(bk),
        step: e.ix(1),
        body: inner,
    });
    kloop.push(Stmt::Barrier);
    body.push(Stmt::For {
        var: k0,
        start: e.ix(0),
        end: k_size,
        step: e.ix(bk),
        body: kloop,
    });
    // Epilogue: each output element the thread holds.
    for r in 0..tm {
        for c in 0..tn {
            let gm = add(
                m0.clone(),
                add(mul(ty_.clone(), e.ix(tm as i64)), e.ix(r as i64)),
            );
            let gm = e.bind(&mut body, "row", ity, gm);
            let gn = add(
                n0.clone(),
                add(mul(tx.clone(), e.ix(tn as i64)), e.ix(c as i64)),
            );
            let gn = e.bind(&mut body, "col", ity, gn);
            let accs: Vec<VarId> = acc.iter().map(|a| a[r * tn + c]).collect();
            let at = OutputElement {
                batch: &batch,
                row: &gm,
                col: &gn,
                rows: &m_size,
            };
            epilogue_at(e, &mut body, &matmuls, &accs, &at, None, stores)?;
        }
    }
    for &m in &matmuls {
        e.fused.insert(m);
    }
    let what = kernel_name("matmul", &matmuls, stores);
    Ok(Body {
        what,
        block_dim: threads,
        grid: [
            ceil_div_size(size_of_dims(&[grid_n]), t.bn as u64),
            ceil_div_size(size_of_dims(&out_shape[rank - 2..rank - 1]), t.bm as u64),
            size_of_dims(&batch_dims),
        ],
        stmts: body,
    })
}

/// One output element a thread holds: its batch index, row and column, and the row count.
pub(crate) struct OutputElement<'a> {
    pub batch: &'a [Expr],
    pub row: &'a Expr,
    pub col: &'a Expr,
    pub rows: &'a Expr,
}

/// The epilogue at one output element: binds each matmul's value there to its accumulator
/// (`accs[i]` for `matmuls[i]`) and stores every stored value of the group at that index,
/// when the element is inside the output (and `guard`, if any, holds).
pub(crate) fn epilogue_at(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    matmuls: &[Value],
    accs: &[VarId],
    at: &OutputElement<'_>,
    guard: Option<&Expr>,
    stores: &[Value],
) -> EResult<()> {
    let mut idx = at.batch.to_vec();
    idx.extend([at.row.clone(), at.col.clone()]);
    for (&m, &a) in matmuls.iter().zip(accs) {
        e.bindings.push(Binding {
            value: m,
            index: idx.clone(),
            expr: Expr::Var(a),
        });
    }
    for &o in stores {
        let shape = e.g.shape(o);
        let n_size = e.dim(&shape[shape.len() - 1]);
        let mut then = Vec::new();
        e.push_scope();
        let vals = e.elem(&mut then, o, &idx, 1)?;
        e.store(&mut then, o, &idx, vals);
        e.pop_scope();
        let mut cond = and(
            lt(at.row.clone(), at.rows.clone()),
            lt(at.col.clone(), n_size),
        );
        if let Some(guard) = guard {
            cond = and(cond, guard.clone());
        }
        body.push(Stmt::If {
            cond,
            then,
            otherwise: Vec::new(),
        });
    }
    e.bindings.clear();
    Ok(())
}

/// A matmul kernel's name: `prefix`, `_xN` for N horizontally fused matmuls, `_epilogue`
/// when it stores more than the matmuls' own results.
pub(crate) fn kernel_name(prefix: &str, matmuls: &[Value], stores: &[Value]) -> String {
    let mut what = prefix.to_string();
    if matmuls.len() > 1 {
        what = format!("{what}_x{}", matmuls.len());
    }
    if stores.iter().any(|s| !matmuls.contains(s)) {
        what = format!("{what}_epilogue");
    }
    what
}

/// `tile[slot] = inside ? operand[idx] : 0`.
#[allow(clippy::too_many_arguments)]
fn stage(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    operand: Value,
    tile: Buf,
    slot: Expr,
    idx: &[Expr],
    inside: Expr,
    zero: &Expr,
) -> EResult<()> {
    let ty = e.cty(operand);
    let staged = e.var("staged", ty);
    let mut then = Vec::new();
    e.push_scope();
    let v = e.elem(&mut then, operand, idx, 1)?.remove(0);
    e.pop_scope();
    then.push(Stmt::Assign(staged, v));
    out.push(Stmt::If {
        cond: inside,
        then,
        otherwise: vec![Stmt::Assign(staged, zero.clone())],
    });
    out.push(Stmt::Store {
        buf: tile,
        index: slot,
        value: Expr::Var(staged),
    });
    Ok(())
}
