//! The kernel IR and execution plans: the contract between the fusion compiler (which
//! produces them from the graph IR) and the backends (PTX for NVIDIA GPUs, Cranelift for
//! CPUs) and the runtime (which executes plans).
//!
//! Around the IR itself (`kernel`, `plan`): a verifier (`verify`) with the block-uniformity
//! analysis it and the backends share (`uniformity`), a text form (`print`), a reference
//! interpreter (`interp`), helpers for writing kernels by hand (`build`) and example
//! kernels for the backends' tests (`examples`).

pub mod build;
pub mod error;
pub mod examples;
pub mod interp;
pub mod kernel;
pub mod manifest;
pub mod plan;
pub mod print;
pub mod shared_layout;
pub mod tensor;
pub mod uniformity;
pub mod verify;
pub mod wgmma;

pub use build::KernelBuilder;
pub use error::KirError;
pub use interp::{
    launch_grid, run_kernel, run_kernel_across_wait, run_kernel_prefetching, Prefetch,
};
pub use kernel::{constant_buffer, loads_raw_pairs, settled_buffer};
pub use kernel::{
    Access, BinOp, Buf, Const, Expr, Kernel, MmaInput, Param, Shared, SizeExpr, Special, Stmt, Ty,
    UnOp, Var, VarId,
};
pub use manifest::{KernelInfo, KernelResources, Manifest, ParamLayout, WeightInfo};
pub use plan::{Arg, BufferDecl, BufferId, BufferKind, Plan, Step, SymBinding};
pub use shared_layout::SharedLayout;
pub use uniformity::{uniformity, Uniformity};
pub use verify::verify_kernel;
pub use wgmma::{WgmmaOp, WgmmaTile};
