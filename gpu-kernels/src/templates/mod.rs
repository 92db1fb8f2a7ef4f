//! The kernel templates: each turns one [`Group`] of the partition into a kir kernel,
//! specialised on its dtypes, constant sizes and contiguity. The element-wise work inside
//! every template (prologues, epilogues) comes from the shared [`Emitter`].

mod attention;
mod matmul;
mod mma_gemm;
mod pointwise;
mod reduce;

pub use matmul::MatmulTiling;
pub use mma_gemm::{choose_tile, MmaTile};

use crate::emit::{Emitter, ParamArg};
use crate::error::{EmitError, FusionError};
use crate::graph::FuncGraph;
use crate::partition::{Group, GroupKind, Partition};
use kiln_ir::{DType, Dim, Value};
use kiln_kir::{Kernel, SizeExpr, Stmt, Ty};
use std::collections::BTreeSet;

/// A kernel as a template produced it, before it gets its final name.
pub(crate) struct Built {
    pub kernel: Kernel,
    pub args: Vec<ParamArg>,
    /// Graph values whose ops it computes.
    pub fused: BTreeSet<Value>,
    /// A short description for the name (`rms_norm`, `matmul_x3`).
    pub what: String,
}

/// What a template hands back: a description, the launch shape and the body.
pub(crate) struct Body {
    pub what: String,
    pub block_dim: u32,
    pub grid: [SizeExpr; 3],
    pub stmts: Vec<Stmt>,
}

/// Builds the kernel of group `gid`; `None` when it stores nothing anyone reads.
pub(crate) fn build(
    g: &FuncGraph<'_>,
    part: &Partition<'_>,
    gid: usize,
    options: &crate::Options,
) -> Result<Option<Built>, FusionError> {
    let group = &part.groups[gid];
    let stores: Vec<Value> = group
        .roots
        .iter()
        .chain(&group.outputs)
        .copied()
        .filter(|v| part.stored[v.0 as usize])
        .collect();
    if stores.is_empty() {
        return Ok(None);
    }
    let index_ty = index_type(g, group, options);
    let mut e = Emitter::new(g, &part.stored, index_ty);
    e.owned = group.owned.clone();
    let body = match &group.kind {
        GroupKind::Pointwise { shape } => {
            pointwise::emit(&mut e, shape, &stores, &options.pointwise)
        }
        GroupKind::Row { outer, inner } => reduce::emit_rows(&mut e, group, outer, inner, &stores),
        GroupKind::LoopReduce => reduce::emit_loop(&mut e, group.roots[0]),
        GroupKind::Matmul { .. } => {
            match mma_gemm::plan(&e, group).filter(|_| options.tensor_cores) {
                Some(plan) => mma_gemm::emit(&mut e, group, &stores, &plan),
                None => matmul::emit(&mut e, group, &stores, &options.matmul_tiling),
            }
        }
        GroupKind::Attention(parts) => attention::emit(&mut e, &attention::Source::Pattern(parts)),
        GroupKind::BuiltinAttention(v) => attention::emit(&mut e, &attention::Source::Builtin(*v)),
    };
    let body = body.map_err(|err| match err {
        EmitError::Fatal(f) => f,
        EmitError::NotFusable(v) => FusionError::Internal {
            function: g.func.name.clone(),
            value: v,
            message: "read at an element its kernel does not hold".into(),
        },
    })?;
    let dtype = stores.first().map(|v| g.ty(*v).dtype).unwrap_or(DType::F32);
    let what = format!("{}_{}", body.what, dtype.name());
    let (kernel, args, fused) = e.finish(String::new(), body.block_dim, body.grid, body.stmts);
    Ok(Some(Built {
        kernel,
        args,
        fused,
        what,
    }))
}

/// I32 index arithmetic when every tensor the kernel touches stays below 2^31 elements
/// with each symbolic dim at most `options.symbol_bound`; I64 otherwise.
fn index_type(g: &FuncGraph<'_>, group: &Group, options: &crate::Options) -> Ty {
    match options.index_width {
        crate::IndexWidth::I32 => return Ty::I32,
        crate::IndexWidth::I64 => return Ty::I64,
        crate::IndexWidth::Auto => {}
    }
    let mut values: BTreeSet<Value> = group.owned.clone();
    for &o in &group.owned {
        if let Some(inst) = g.inst(o) {
            values.extend(inst.operands.iter().copied());
        }
    }
    let limit = (1u128 << 31) - 1;
    let fits = values.iter().all(|v| {
        let n = g.shape(*v).iter().fold(1u128, |acc, d| {
            acc.saturating_mul(match d {
                Dim::Const(n) => u128::from(*n),
                Dim::Sym(_) => u128::from(options.symbol_bound),
            })
        });
        n <= limit
    });
    // Operands reached through inlined chains are bounded by the same shapes in practice;
    // the widest shapes are the group's own values and their direct operands.
    if fits {
        Ty::I32
    } else {
        Ty::I64
    }
}

pub(crate) fn size_of_dims(dims: &[Dim]) -> SizeExpr {
    let mut acc: Option<SizeExpr> = None;
    for d in dims {
        let e = match d {
            Dim::Const(n) => SizeExpr::Const(*n),
            Dim::Sym(s) => SizeExpr::Sym(s.clone()),
        };
        acc = Some(match acc {
            None => e,
            Some(a) => mul_size(a, e),
        });
    }
    acc.unwrap_or(SizeExpr::Const(1))
}

pub(crate) fn mul_size(a: SizeExpr, b: SizeExpr) -> SizeExpr {
    match (a, b) {
        (SizeExpr::Const(x), SizeExpr::Const(y)) => SizeExpr::Const(x * y),
        (SizeExpr::Const(1), y) => y,
        (x, SizeExpr::Const(1)) => x,
        (x, y) => SizeExpr::Mul(Box::new(x), Box::new(y)),
    }
}

pub(crate) fn ceil_div_size(a: SizeExpr, b: u64) -> SizeExpr {
    match a {
        SizeExpr::Const(x) => SizeExpr::Const(x.div_ceil(b)),
        x if b == 1 => x,
        x => SizeExpr::CeilDiv(Box::new(x), Box::new(SizeExpr::Const(b))),
    }
}

pub(crate) fn one() -> SizeExpr {
    SizeExpr::Const(1)
}
