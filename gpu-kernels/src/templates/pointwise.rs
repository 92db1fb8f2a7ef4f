//! The pointwise template: one thread per element (or per 2/4/8 contiguous elements with
//! vector loads and stores when the innermost dim is constant and divisible), exact grid.

use super::{ceil_div_size, one, size_of_dims, Body};
use crate::emit::{add, lt, mul, EResult, Emitter};
use kiln_ir::{Dim, Value};
use kiln_kir::{Special, Stmt};

const THREADS: u32 = 256;

pub(crate) fn emit(e: &mut Emitter<'_, '_>, shape: &[Dim], outputs: &[Value]) -> EResult<Body> {
    let widest = outputs
        .iter()
        .map(|v| e.g.ty(*v).dtype.size_bytes())
        .max()
        .unwrap_or(4);
    let lanes = lanes_for(shape.last(), widest);
    let mut dims = shape.to_vec();
    if let Some(Dim::Const(n)) = dims.last_mut() {
        *n /= lanes as u64;
    }
    let total = e.numel(&dims);
    let mut body = Vec::new();
    let block = e.special(Special::BlockIdx(0));
    let thread = e.special(Special::ThreadIdx);
    let ity = e.index_ty;
    let gid = add(mul(block, e.ix(i64::from(THREADS))), thread);
    let gid = e.bind(&mut body, "gid", ity, gid);
    let mut inner = Vec::new();
    e.push_scope();
    let base = mul(gid.clone(), e.ix(lanes as i64));
    let idx = e.delinearize(&mut inner, base, shape);
    for &o in outputs {
        let vals = e.elem(&mut inner, o, &idx, lanes)?;
        e.store(&mut inner, o, &idx, vals);
    }
    e.pop_scope();
    body.push(Stmt::If {
        cond: lt(gid, total),
        then: inner,
        otherwise: Vec::new(),
    });
    let name = outputs
        .first()
        .and_then(|v| e.g.name(*v))
        .map(crate::emit::sanitize)
        .unwrap_or_else(|| "elementwise".into());
    Ok(Body {
        what: format!("pointwise_{name}"),
        block_dim: THREADS,
        grid: [
            ceil_div_size(size_of_dims(&dims), u64::from(THREADS)),
            one(),
            one(),
        ],
        stmts: body,
    })
}

/// How many contiguous elements a thread handles: 8, 4 or 2 when the innermost dim is a
/// constant they divide and the widest element keeps an access within 16 bytes.
pub(crate) fn lanes_for(last: Option<&Dim>, widest_bytes: usize) -> usize {
    let Some(Dim::Const(n)) = last else { return 1 };
    [8usize, 4, 2]
        .into_iter()
        .find(|w| (*n as usize).is_multiple_of(*w) && w * widest_bytes <= 16)
        .unwrap_or(1)
}
