//! The `kv_write` template: stores a step's new key or value rows into their slots of a
//! paged cache, in place (the result is a view of the cache operand's buffer). One thread
//! per vector of up to 16 bytes of a row; the row's producers (a projection's bias, RoPE)
//! are inlined into its loads. A negative slot (a padding token) or one past the cache
//! stores nothing. Several independent writes of rows of one shape (a layer's keys and
//! values) are one kernel, the threads of each write after those of the one before.

use super::pointwise::lanes_for;
use super::Body;
use crate::emit::{add, and, div, lt, mul, rem, EResult, Emitter};
use kiln_ir::{Dim, Op, Value};
use kiln_kir::{BinOp, Expr, Special, Stmt};

const THREADS: u32 = 256;

pub(crate) fn emit(e: &mut Emitter<'_, '_>, writes: &[Value]) -> EResult<Body> {
    let g = e.g;
    let first = *writes.first().expect("a kv_write group has a write");
    let first_inst = g.inst(first).expect("kv_write");
    let row_shape = g.shape(first_inst.operands[1]).to_vec();
    let lanes = lanes_for(row_shape.last(), g.ty(first).dtype.size_bytes());
    // Threads cover [writes, N, KV, D / lanes].
    let mut dims = vec![Dim::Const(writes.len() as u64)];
    dims.extend(row_shape.iter().cloned());
    if let Some(Dim::Const(n)) = dims.last_mut() {
        *n /= lanes as u64;
    }
    let ity = e.index_ty;
    let mut body = Vec::new();
    let gid = add(
        mul(e.special(Special::BlockIdx(0)), e.ix(i64::from(THREADS))),
        e.special(Special::ThreadIdx),
    );
    let gid = e.bind(&mut body, "gid", ity, gid);
    let total = e.numel(&dims);
    let mut inner = Vec::new();
    let idx = e.delinearize(&mut inner, gid.clone(), &dims);
    let (which, token, head) = (idx[0].clone(), idx[1].clone(), idx[2].clone());
    let col = e.bind(
        &mut inner,
        "col",
        ity,
        mul(idx[3].clone(), e.ix(lanes as i64)),
    );
    // One branch per write, the last taking what the others do not.
    let mut chain: Vec<Stmt> = Vec::new();
    for (i, &out) in writes.iter().enumerate().rev() {
        // Each write's loads in their own scope: a value one branch loads (the slots) is
        // not assigned in the others.
        e.push_scope();
        let store = store_row(e, out, &token, &head, &col, lanes);
        e.pop_scope();
        let store = store?;
        chain = if chain.is_empty() {
            store
        } else {
            vec![Stmt::If {
                cond: lt(which.clone(), e.ix(i as i64 + 1)),
                then: store,
                otherwise: chain,
            }]
        };
        e.fused.insert(out);
    }
    inner.extend(chain);
    body.push(Stmt::If {
        cond: lt(gid, total),
        then: inner,
        otherwise: Vec::new(),
    });
    let what = if writes.len() == 1 {
        "kv_write".to_string()
    } else {
        format!("kv_write_x{}", writes.len())
    };
    Ok(Body::over(what, THREADS, &dims, body))
}

/// The statements of one thread's part of `kv_write` `out`: its token's slot read, and
/// unless the slot is negative or past the cache, `lanes` elements of row (`token`,
/// `head`) from `col` stored into it (also a split-K sum kernel's part of the write,
/// `mma_gemm::emit_segmented_sum`).
pub(crate) fn store_row(
    e: &mut Emitter<'_, '_>,
    out: Value,
    token: &Expr,
    head: &Expr,
    col: &Expr,
    lanes: usize,
) -> EResult<Vec<Stmt>> {
    let g = e.g;
    let inst = g.inst(out).expect("kv_write");
    let Op::KvWrite { layer } = inst.op else {
        return Err(e.internal(out, "not a kv_write"));
    };
    let (rows, slots) = (inst.operands[1], inst.operands[2]);
    let cache_shape = g.shape(out).to_vec();
    let ity = e.index_ty;
    let mut stmts = Vec::new();
    let slot = e
        .elem(&mut stmts, slots, std::slice::from_ref(token), 1)?
        .remove(0);
    let slot = e.bind(&mut stmts, "slot", ity, Expr::Cast(ity, Box::new(slot)));
    let block_size = e.dim(&cache_shape[2]);
    let capacity = mul(e.dim(&cache_shape[1]), block_size.clone());
    let valid = and(
        lt(slot.clone(), capacity),
        Expr::Binary(BinOp::Ge, Box::new(slot.clone()), Box::new(e.ix(0))),
    );
    let mut store = Vec::new();
    e.push_scope();
    let values = e.elem(
        &mut store,
        rows,
        &[token.clone(), head.clone(), col.clone()],
        lanes,
    )?;
    e.pop_scope();
    let at = [
        e.ix(layer as i64),
        div(slot.clone(), block_size.clone()),
        rem(slot, block_size),
        head.clone(),
        col.clone(),
    ];
    e.store(&mut store, out, &at, values);
    stmts.push(Stmt::If {
        cond: valid,
        then: store,
        otherwise: Vec::new(),
    });
    Ok(stmts)
}
