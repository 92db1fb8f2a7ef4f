//! Graph-IR passes and the pipeline that runs them: canonicalize, constfold, cse and dce,
//! each a named [`Pass`] that rewrites one function and keeps the interpreter's results
//! exactly (bit for bit), and [`default_pipeline`], the order the compiler runs them in.
//!
//! Invariants every pass keeps:
//! - valid IR stays valid (the pipeline runs the verifier after every pass in debug builds);
//! - results are unchanged under [`kiln_ir::interpret`]: no rewrite changes arithmetic or
//!   rounding, and constants are computed by the interpreter itself;
//! - result types never change (dtype and shape, symbolic dims included);
//! - determinism: the same module gives byte-identical output (no hash-order iteration).
//!
//! Only `dce` removes instructions and renumbers values; the other passes forward uses and
//! leave what became unused in place.
//!
//! Deliberately absent (for now): layout passes, loop-invariant code motion, removal of
//! dead loop-carried state, and a literal for constant tensors of distinct elements (so
//! folding `arange`-derived tensors stops at `full` results; [`small_constants`] hands
//! such tensors to the fusion, which stores them in the plan).

pub mod canonicalize;
pub mod constfold;
pub mod cse;
pub mod dce;
pub mod pipeline;
mod rewrite;

pub use constfold::small_constants;
pub use pipeline::{
    all_passes, default_pipeline, optimize, pass_by_name, OptError, Pass, PassRun, Pipeline,
    RunOptions, RunReport, Step, DEFAULT_MAX_ROUNDS,
};
pub use rewrite::{count_insts, count_module_insts};
