//! kiln's graph IR: typed SSA tensor ops defined once in the op table (`ops`), a text form
//! that prints and parses back identically (`print`, `parse`), a verifier (`verify`) and the
//! reference interpreter (`interp`) that is the living definition of every op.

pub mod fp8;
pub mod func;
pub mod inplace;
pub mod interp;
pub mod ops;
pub mod parse;
pub mod print;
pub mod tensor;
pub mod types;
pub mod verify;

pub use func::{Builder, Function, Inst, Module, Region, RegionSignature, Value};
pub use inplace::{check_in_place, in_place_inputs};
pub use interp::{interpret, NoParams, ParamSource};
pub use ops::{Arity, Attr, BinaryOp, DTypeClass, Op, OpSpec, ReduceOp, UnaryOp};
pub use parse::{parse_function, parse_module, parse_type};
pub use tensor::{Tensor, TensorData};
pub use types::{DType, Dim, Shape, TensorType};
pub use verify::{verify_function, verify_module};

/// An error from the IR layer: a type rule that rejects its operands, a text form that does
/// not parse, a verifier finding, or a run-time failure of the interpreter.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct IrError {
    pub message: String,
}

impl IrError {
    pub fn new(message: impl Into<String>) -> IrError {
        IrError {
            message: message.into(),
        }
    }
}
