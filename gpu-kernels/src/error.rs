//! The error of the fusion compiler: what it cannot compile, naming the op or value involved.

use kiln_ir::Value;

/// Why a graph function could not be turned into kernels and a plan.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FusionError {
    /// The function named does not exist in the module.
    #[error("no function `{0}` in the module")]
    UnknownFunction(String),
    /// An op (or a form of it) that no template handles.
    #[error("@{function}: {value:?} = {op}: {reason}")]
    Unsupported {
        function: String,
        value: Value,
        op: String,
        reason: String,
    },
    /// A symbolic dim that no function input carries, so the plan cannot bind it.
    #[error("@{function}: symbol `{symbol}` is not a dim of any input")]
    UnboundSymbol { function: String, symbol: String },
    /// A value was reached in a kernel where it is neither computed nor stored: an
    /// internal inconsistency of the partition.
    #[error("@{function}: internal fusion error at {value:?}: {message}")]
    Internal {
        function: String,
        value: Value,
        message: String,
    },
}

/// A failed attempt to fuse a value into a kernel (the index it is read at does not match
/// the element the kernel holds); the partition falls back to another kernel.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum EmitError {
    /// The value is held in registers for one element, but read at another.
    NotFusable(Value),
    Fatal(FusionError),
}

impl From<FusionError> for EmitError {
    fn from(e: FusionError) -> EmitError {
        EmitError::Fatal(e)
    }
}
