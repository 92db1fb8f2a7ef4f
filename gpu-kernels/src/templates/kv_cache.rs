//! The `kv_write` template: stores a step's new key or value rows into their slots of a
//! paged cache, in place (the result is a view of the cache operand's buffer). One thread
//! per vector of up to 16 bytes of a row; the row's producers (a projection's bias, RoPE)
//! are inlined into its loads. A negative slot (a padding token) or one past the cache
//! stores nothing.

use super::pointwise::lanes_for;
use super::{ceil_div_size, one, size_of_dims, Body};
use crate::emit::{add, and, div, lt, mul, rem, EResult, Emitter};
use kiln_ir::{Dim, Op, Value};
use kiln_kir::{Expr, Special, Stmt};

const THREADS: u32 = 256;

pub(crate) fn emit(e: &mut Emitter<'_, '_>, out: Value) -> EResult<Body> {
    let g = e.g;
    let inst = g.inst(out).expect("kv_write");
    let Op::KvWrite { layer } = inst.op else {
        return Err(e.internal(out, "not a kv_write"));
    };
    let (rows, slots) = (inst.operands[1], inst.operands[2]);
    let cache_shape = g.shape(out).to_vec();
    let row_shape = g.shape(rows).to_vec();
    let lanes = lanes_for(row_shape.last(), g.ty(out).dtype.size_bytes());
    // Threads cover [N, KV, D / lanes].
    let mut dims = row_shape.clone();
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
    let (token, head) = (idx[0].clone(), idx[1].clone());
    let col = e.bind(
        &mut inner,
        "col",
        ity,
        mul(idx[2].clone(), e.ix(lanes as i64)),
    );
    let slot = e
        .elem(&mut inner, slots, std::slice::from_ref(&token), 1)?
        .remove(0);
    let slot = e.bind(&mut inner, "slot", ity, Expr::Cast(ity, Box::new(slot)));
    let block_size = e.dim(&cache_shape[2]);
    let capacity = mul(e.dim(&cache_shape[1]), block_size.clone());
    let valid = and(
        lt(slot.clone(), capacity),
        kiln_kir::Expr::Binary(
            kiln_kir::BinOp::Ge,
            Box::new(slot.clone()),
            Box::new(e.ix(0)),
        ),
    );
    let mut store = Vec::new();
    e.push_scope();
    let values = e.elem(&mut store, rows, &[token, head.clone(), col.clone()], lanes)?;
    e.pop_scope();
    let at = [
        e.ix(layer as i64),
        div(slot.clone(), block_size.clone()),
        rem(slot, block_size),
        head,
        col,
    ];
    e.store(&mut store, out, &at, values);
    inner.push(Stmt::If {
        cond: valid,
        then: store,
        otherwise: Vec::new(),
    });
    body.push(Stmt::If {
        cond: lt(gid, total),
        then: inner,
        otherwise: Vec::new(),
    });
    e.fused.insert(out);
    Ok(Body {
        what: "kv_write".into(),
        block_dim: THREADS,
        grid: [
            ceil_div_size(size_of_dims(&dims), u64::from(THREADS)),
            one(),
            one(),
        ],
        stmts: body,
    })
}
