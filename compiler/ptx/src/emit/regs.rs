//! Typed virtual registers: one numbered family per PTX register class, handed out in
//! order (so the same kernel always gets the same names), and the operands instructions
//! take (registers or immediates).

use std::fmt;

use kiln_kir::Ty;

use crate::numeric::{Kind, Scalar};

/// A PTX register class and its name prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegKind {
    /// `.pred %p`
    Pred,
    /// `.b16 %rs`: f16/bf16 bits and 8-bit memory values (PTX has no 8-bit registers).
    B16,
    /// `.b32 %r`: i32 and raw 32-bit words.
    B32,
    /// `.b64 %rd`: i64 and addresses.
    B64,
    /// `.f32 %f`
    F32,
    /// `.f64 %fd`: only inside math routines.
    F64,
}

impl RegKind {
    /// Every class, in declaration order.
    pub const ALL: [RegKind; 6] = [
        RegKind::Pred,
        RegKind::B16,
        RegKind::B32,
        RegKind::B64,
        RegKind::F32,
        RegKind::F64,
    ];

    pub fn prefix(self) -> &'static str {
        match self {
            RegKind::Pred => "%p",
            RegKind::B16 => "%rs",
            RegKind::B32 => "%r",
            RegKind::B64 => "%rd",
            RegKind::F32 => "%f",
            RegKind::F64 => "%fd",
        }
    }

    /// The type in the `.reg` declaration.
    pub fn decl_type(self) -> &'static str {
        match self {
            RegKind::Pred => ".pred",
            RegKind::B16 => ".b16",
            RegKind::B32 => ".b32",
            RegKind::B64 => ".b64",
            RegKind::F32 => ".f32",
            RegKind::F64 => ".f64",
        }
    }

    /// The `mov` that copies a register of this class.
    pub fn mov(self) -> &'static str {
        match self {
            RegKind::Pred => "mov.pred",
            RegKind::B16 => "mov.b16",
            RegKind::B32 => "mov.b32",
            RegKind::B64 => "mov.b64",
            RegKind::F32 => "mov.f32",
            RegKind::F64 => "mov.f64",
        }
    }

    pub fn of_ty(ty: Ty) -> RegKind {
        match ty {
            Ty::Pred => RegKind::Pred,
            Ty::I32 => RegKind::B32,
            Ty::I64 => RegKind::B64,
            Ty::F32 => RegKind::F32,
        }
    }

    pub fn of_kind(kind: Kind) -> RegKind {
        match kind {
            Kind::Pred => RegKind::Pred,
            Kind::I32 => RegKind::B32,
            Kind::I64 => RegKind::B64,
            Kind::F32 => RegKind::F32,
            Kind::F64 => RegKind::F64,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A virtual register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reg {
    pub kind: RegKind,
    pub number: u32,
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.kind.prefix(), self.number)
    }
}

/// Hands out registers, numbering each class from 1.
#[derive(Clone, Debug, Default)]
pub struct RegisterFile {
    counts: [u32; 6],
}

impl RegisterFile {
    pub fn fresh(&mut self, kind: RegKind) -> Reg {
        let count = &mut self.counts[kind.index()];
        *count += 1;
        Reg {
            kind,
            number: *count,
        }
    }

    /// How many registers of each class were handed out (indexed like [`RegKind::ALL`]).
    pub fn counts(&self) -> [u32; 6] {
        self.counts
    }

    /// The `.reg` declarations of every class used.
    pub fn declarations(&self) -> Vec<String> {
        RegKind::ALL
            .iter()
            .filter(|kind| self.counts[kind.index()] > 0)
            .map(|kind| {
                format!(
                    ".reg {} {}<{}>;",
                    kind.decl_type(),
                    kind.prefix(),
                    self.counts[kind.index()] + 1
                )
            })
            .collect()
    }
}

/// An instruction operand: a register or an immediate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Operand {
    Reg(Reg),
    Imm(Scalar),
}

impl Operand {
    pub fn reg(self) -> Option<Reg> {
        match self {
            Operand::Reg(reg) => Some(reg),
            Operand::Imm(_) => None,
        }
    }
}

impl From<Reg> for Operand {
    fn from(reg: Reg) -> Operand {
        Operand::Reg(reg)
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Reg(reg) => reg.fmt(f),
            Operand::Imm(value) => write_immediate(f, *value),
        }
    }
}

/// PTX immediates: integers in decimal (large positive ones, usually bit masks or float
/// bit patterns, in hexadecimal), floats as exact hexadecimal bit patterns (`0f3F800000`,
/// `0d3FF0000000000000`), predicates as 1/0.
fn write_immediate(f: &mut fmt::Formatter<'_>, value: Scalar) -> fmt::Result {
    match value {
        Scalar::Pred(v) => write!(f, "{}", u8::from(v)),
        Scalar::I32(v) if v >= 0x1_0000 => write!(f, "0x{v:08X}"),
        Scalar::I32(v) => write!(f, "{v}"),
        Scalar::I64(v) => write!(f, "{v}"),
        Scalar::F32(v) => write!(f, "0f{:08X}", v.to_bits()),
        Scalar::F64(v) => write!(f, "0d{:016X}", v.to_bits()),
    }
}
