//! Lowering of kiln programs to the graph IR.
//!
//! [`Program`] loads a root file and its imports; [`lower`] binds the `config` block from a
//! config.json, resolves model params to checkpoint names, and evaluates each entry function
//! (a function whose parameters are all fully typed) into an IR function, inlining every
//! call and checking shapes and dtypes on the way. Invariants:
//! - the output is deterministic: the same program and config give the same IR, byte for byte;
//! - every function it returns passes `kiln_ir::verify`;
//! - errors are diagnostics with spans, never panics, and independent errors are all reported.

mod builtins;
pub mod config;
mod lower;
pub mod program;
pub mod value;

pub use builtins::promote;
pub use lower::{lower, Lowered, Options, ParamBinding};
pub use program::{stdlib_modules, stdlib_source, Program};
pub use value::ConfigValue;
