//! Instruction selection as tables: which PTX instruction (or inlined routine) implements
//! each kernel-IR operator at each type, and how each memory dtype is loaded and stored.
//!
//! Float arithmetic always names its rounding (`add.rn.f32`, ...): an explicit rounding
//! modifier stops ptxas from contracting a multiply and an add into an `fma`, so each IR
//! operation rounds exactly once, as the interpreter does.

use kiln_ir::DType;
use kiln_kir::{BinOp, Ty, UnOp};

use crate::numeric::MathFunction;

/// How a unary operator is implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryLowering {
    /// One instruction `opcode d, a;`.
    Inst(&'static str),
    /// An inlined routine.
    Routine(MathFunction),
    /// The conversion a store of the 16-bit float type makes, then a load's.
    Round(DType),
}

/// The unary operator table; `None` for type combinations the verifier rejects.
pub fn unary(op: UnOp, ty: Ty) -> Option<UnaryLowering> {
    use UnaryLowering::{Inst, Routine};
    Some(match (op, ty) {
        (UnOp::Neg, Ty::I32) => Inst("neg.s32"),
        (UnOp::Neg, Ty::I64) => Inst("neg.s64"),
        (UnOp::Neg, Ty::F32) => Inst("neg.f32"),
        (UnOp::Abs, Ty::I32) => Inst("abs.s32"),
        (UnOp::Abs, Ty::I64) => Inst("abs.s64"),
        (UnOp::Abs, Ty::F32) => Inst("abs.f32"),
        (UnOp::Not, Ty::Pred) => Inst("not.pred"),
        (UnOp::Not, Ty::I32) => Inst("not.b32"),
        (UnOp::Not, Ty::I64) => Inst("not.b64"),
        (UnOp::Sqrt, Ty::F32) => Inst("sqrt.rn.f32"),
        (UnOp::Recip, Ty::F32) => Inst("rcp.rn.f32"),
        (UnOp::Floor, Ty::F32) => Inst("cvt.rmi.f32.f32"),
        (UnOp::Ceil, Ty::F32) => Inst("cvt.rpi.f32.f32"),
        (UnOp::Exp, Ty::F32) => Routine(MathFunction::Exp),
        (UnOp::Exp2, Ty::F32) => Inst("ex2.approx.ftz.f32"),
        (UnOp::Log, Ty::F32) => Routine(MathFunction::Log),
        (UnOp::Sin, Ty::F32) => Routine(MathFunction::Sin),
        (UnOp::Cos, Ty::F32) => Routine(MathFunction::Cos),
        (UnOp::Tanh, Ty::F32) => Routine(MathFunction::Tanh),
        (UnOp::Sigmoid, Ty::F32) => Routine(MathFunction::Sigmoid),
        (UnOp::Erf, Ty::F32) => Routine(MathFunction::Erf),
        (UnOp::Rsqrt, Ty::F32) => Routine(MathFunction::Rsqrt),
        (UnOp::RoundBf16, Ty::F32) => UnaryLowering::Round(DType::BF16),
        (UnOp::RoundF16, Ty::F32) => UnaryLowering::Round(DType::F16),
        _ => return None,
    })
}

/// How a binary operator is implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryLowering {
    /// One instruction `opcode d, a, b;` with a result of the operand type (or `Pred` for
    /// `setp`).
    Inst(&'static str),
    /// A shift: the amount becomes a `.u32` (64-bit amounts are clamped to 64 first).
    Shift(&'static str),
    /// Equality of predicates: `xor.pred`, negated for `Eq`.
    PredEquality { negate: bool },
    /// An inlined routine of two inputs.
    Routine(MathFunction),
}

/// The binary operator table; `None` for type combinations the verifier rejects.
pub fn binary(op: BinOp, ty: Ty) -> Option<BinaryLowering> {
    use BinOp::*;
    use BinaryLowering::{Inst, PredEquality, Routine, Shift};
    use Ty::{Pred, F32, I32, I64};
    Some(match (op, ty) {
        (Add, I32) => Inst("add.s32"),
        (Add, I64) => Inst("add.s64"),
        (Add, F32) => Inst("add.rn.f32"),
        (Sub, I32) => Inst("sub.s32"),
        (Sub, I64) => Inst("sub.s64"),
        (Sub, F32) => Inst("sub.rn.f32"),
        (Mul, I32) => Inst("mul.lo.s32"),
        (Mul, I64) => Inst("mul.lo.s64"),
        (Mul, F32) => Inst("mul.rn.f32"),
        (Div, I32) => Inst("div.s32"),
        (Div, I64) => Inst("div.s64"),
        (Div, F32) => Inst("div.rn.f32"),
        (Rem, I32) => Inst("rem.s32"),
        (Rem, I64) => Inst("rem.s64"),
        (Rem, F32) => Routine(MathFunction::Fmod),
        // The IR's float min/max return the other operand when one is NaN, as min.f32 does.
        (Min, I32) => Inst("min.s32"),
        (Min, I64) => Inst("min.s64"),
        (Min, F32) => Inst("min.f32"),
        (Max, I32) => Inst("max.s32"),
        (Max, I64) => Inst("max.s64"),
        (Max, F32) => Inst("max.f32"),
        (Pow, F32) => Routine(MathFunction::Pow),
        (And, Pred) => Inst("and.pred"),
        (And, I32) => Inst("and.b32"),
        (And, I64) => Inst("and.b64"),
        (Or, Pred) => Inst("or.pred"),
        (Or, I32) => Inst("or.b32"),
        (Or, I64) => Inst("or.b64"),
        (Xor, Pred) => Inst("xor.pred"),
        (Xor, I32) => Inst("xor.b32"),
        (Xor, I64) => Inst("xor.b64"),
        (Shl, I32) => Shift("shl.b32"),
        (Shl, I64) => Shift("shl.b64"),
        (Shr, I32) => Shift("shr.s32"),
        (Shr, I64) => Shift("shr.s64"),
        (Eq, Pred) => PredEquality { negate: true },
        (Ne, Pred) => PredEquality { negate: false },
        (Eq, I32) => Inst("setp.eq.s32"),
        (Ne, I32) => Inst("setp.ne.s32"),
        (Lt, I32) => Inst("setp.lt.s32"),
        (Le, I32) => Inst("setp.le.s32"),
        (Gt, I32) => Inst("setp.gt.s32"),
        (Ge, I32) => Inst("setp.ge.s32"),
        (Eq, I64) => Inst("setp.eq.s64"),
        (Ne, I64) => Inst("setp.ne.s64"),
        (Lt, I64) => Inst("setp.lt.s64"),
        (Le, I64) => Inst("setp.le.s64"),
        (Gt, I64) => Inst("setp.gt.s64"),
        (Ge, I64) => Inst("setp.ge.s64"),
        (Eq, F32) => Inst("setp.eq.f32"),
        // The IR's `Ne` is true when an operand is NaN: the unordered form.
        (Ne, F32) => Inst("setp.neu.f32"),
        (Lt, F32) => Inst("setp.lt.f32"),
        (Le, F32) => Inst("setp.le.f32"),
        (Gt, F32) => Inst("setp.gt.f32"),
        (Ge, F32) => Inst("setp.ge.f32"),
        _ => return None,
    })
}

/// `fma` per type: `mad.lo` wraps for integers, `fma.rn` rounds once for floats.
pub fn fma(ty: Ty) -> Option<&'static str> {
    match ty {
        Ty::I32 => Some("mad.lo.s32"),
        Ty::I64 => Some("mad.lo.s64"),
        Ty::F32 => Some("fma.rn.f32"),
        Ty::Pred => None,
    }
}

/// `selp` per type (predicates are selected with predicate logic instead).
pub fn select(ty: Ty) -> Option<&'static str> {
    match ty {
        Ty::I32 => Some("selp.b32"),
        Ty::I64 => Some("selp.b64"),
        Ty::F32 => Some("selp.f32"),
        Ty::Pred => None,
    }
}

/// How a `Cast` is implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CastLowering {
    /// Same type: nothing to do.
    Identity,
    /// `opcode d, a;`
    Inst(&'static str),
    /// `!= 0` (NaN counts as nonzero): `opcode d, a, 0;`
    NonZero(&'static str),
    /// Predicate to number: `selp.T d, 1, 0, a;`
    FromPred(&'static str),
}

/// The cast table: float → int truncates toward zero and saturates (NaN → 0), int →
/// float rounds to nearest even, i64 → i32 wraps.
pub fn cast(from: Ty, to: Ty) -> CastLowering {
    use CastLowering::*;
    match (from, to) {
        _ if from == to => Identity,
        (Ty::F32, Ty::I32) => Inst("cvt.rzi.s32.f32"),
        (Ty::F32, Ty::I64) => Inst("cvt.rzi.s64.f32"),
        (Ty::I32, Ty::F32) => Inst("cvt.rn.f32.s32"),
        (Ty::I64, Ty::F32) => Inst("cvt.rn.f32.s64"),
        (Ty::I32, Ty::I64) => Inst("cvt.s64.s32"),
        (Ty::I64, Ty::I32) => Inst("cvt.u32.u64"),
        (Ty::I32, Ty::Pred) => NonZero("setp.ne.s32"),
        (Ty::I64, Ty::Pred) => NonZero("setp.ne.s64"),
        (Ty::F32, Ty::Pred) => NonZero("setp.neu.f32"),
        (Ty::Pred, Ty::I32) => FromPred("selp.b32"),
        (Ty::Pred, Ty::I64) => FromPred("selp.b64"),
        (Ty::Pred, Ty::F32) => FromPred("selp.f32"),
        _ => unreachable!("every pair of distinct types is listed"),
    }
}

/// How elements of a memory dtype are moved between memory and registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Element {
    pub bytes: u32,
    /// The `ld`/`st` type of one element (`.b16` for half floats, `.u8`/`.s8` for bytes).
    pub memory_type: &'static str,
    /// The register class a scalar load lands in before conversion.
    pub raw: super::regs::RegKind,
}

/// The element table.
pub fn element(dtype: DType) -> Element {
    use super::regs::RegKind;
    let (bytes, memory_type, raw) = match dtype {
        DType::F32 => (4, "f32", RegKind::F32),
        DType::F16 | DType::BF16 => (2, "b16", RegKind::B16),
        DType::F8E4M3 | DType::F8E5M2 | DType::Bool => (1, "u8", RegKind::B16),
        DType::I8 => (1, "s8", RegKind::B16),
        DType::I32 => (4, "s32", RegKind::B32),
        DType::I64 => (8, "s64", RegKind::B64),
    };
    Element {
        bytes,
        memory_type,
        raw,
    }
}

/// `ld`/`st` vector suffix for `count` elements (`""`, `.v2`, `.v4`).
pub fn vector_suffix(count: usize) -> &'static str {
    match count {
        1 => "",
        2 => ".v2",
        4 => ".v4",
        _ => unreachable!("vectors of 1, 2 or 4 memory words"),
    }
}
