//! The kernel IR and execution plans: the contract between the fusion compiler (which
//! produces them from the graph IR) and the backends (PTX for NVIDIA GPUs, Cranelift for
//! CPUs) and the runtime (which executes plans).

pub mod kernel;
pub mod plan;

pub use kernel::{
    Access, BinOp, Buf, Const, Expr, Kernel, Param, Shared, SizeExpr, Special, Stmt, Ty, UnOp, Var,
    VarId,
};
pub use plan::{Arg, BufferDecl, BufferId, BufferKind, Plan, Step, SymBinding};
