//! Straight-line numeric routines written once and used twice: the PTX emitter prints them
//! as instructions, and [`Routine::eval`] runs them in Rust with the same IEEE semantics,
//! bit for bit.
//!
//! A routine is a small program over typed values ([`Kind`]): inputs, constants, and the
//! results of operations from one table ([`Op::signature`] gives each one's PTX opcode and
//! operand kinds). Every operation is exactly specified by IEEE 754 or by integer
//! arithmetic (no `.approx` instruction), so the Rust evaluation reproduces the GPU's
//! results exactly and the accuracy tests measure the code that runs on the device.
//! Control flow is limited to a guarded block ([`Inst::If`]) and a do-while loop
//! ([`Inst::DoWhile`]); [`Inst::Assign`] overwrites an earlier value (a register move),
//! which is how a guarded block or a loop hands results on.

use std::fmt;

/// The register class of a value: PTX's `.pred`, `.b32` (`%r`), `.b64` (`%rd`), `.f32`
/// and `.f64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pred,
    I32,
    I64,
    F32,
    F64,
}

/// A value of a routine (an index into its value table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Val(pub u32);

/// A concrete value during evaluation (integers are raw bits: signedness is in the op).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    Pred(bool),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

impl Scalar {
    pub fn kind(self) -> Kind {
        match self {
            Scalar::Pred(_) => Kind::Pred,
            Scalar::I32(_) => Kind::I32,
            Scalar::I64(_) => Kind::I64,
            Scalar::F32(_) => Kind::F32,
            Scalar::F64(_) => Kind::F64,
        }
    }

    fn pred(self) -> bool {
        match self {
            Scalar::Pred(v) => v,
            other => panic!("expected a predicate, found {other:?}"),
        }
    }

    fn i32(self) -> i32 {
        match self {
            Scalar::I32(v) => v,
            other => panic!("expected an i32, found {other:?}"),
        }
    }

    fn u32(self) -> u32 {
        self.i32() as u32
    }

    fn i64(self) -> i64 {
        match self {
            Scalar::I64(v) => v,
            other => panic!("expected an i64, found {other:?}"),
        }
    }

    fn f32(self) -> f32 {
        match self {
            Scalar::F32(v) => v,
            other => panic!("expected an f32, found {other:?}"),
        }
    }

    fn f64(self) -> f64 {
        match self {
            Scalar::F64(v) => v,
            other => panic!("expected an f64, found {other:?}"),
        }
    }
}

/// A comparison of `setp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// Less than, or unordered (either operand NaN): floats only.
    Ltu,
    /// Either operand NaN: floats only.
    Nan,
}

impl Cmp {
    fn name(self) -> &'static str {
        match self {
            Cmp::Eq => "eq",
            Cmp::Ne => "ne",
            Cmp::Lt => "lt",
            Cmp::Le => "le",
            Cmp::Gt => "gt",
            Cmp::Ge => "ge",
            Cmp::Ltu => "ltu",
            Cmp::Nan => "nan",
        }
    }

    fn ordered<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Ltu | Cmp::Nan => unreachable!("unordered comparison of integers"),
        }
    }

    fn float(self, a: f64, b: f64) -> bool {
        let unordered = a.is_nan() || b.is_nan();
        match self {
            // PTX's ordered `ne` is false when an operand is NaN.
            Cmp::Ne => !unordered && a != b,
            Cmp::Ltu => unordered || a < b,
            Cmp::Nan => unordered,
            other => other.ordered(a, b),
        }
    }
}

/// How `setp` reads its operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpType {
    S32,
    U32,
    F32,
    F64,
}

/// A constant table in the `.const` state space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// 96-bit windows of the bits of 2/π, one per f32 exponent (see
    /// [`super::two_over_pi`]).
    TwoOverPiWindows,
}

impl Table {
    /// The module-level name of the table in PTX.
    pub fn ptx_name(self) -> &'static str {
        match self {
            Table::TwoOverPiWindows => "__kiln_two_over_pi_windows",
        }
    }

    /// The table's contents.
    pub fn words(self) -> &'static [u32] {
        match self {
            Table::TwoOverPiWindows => super::two_over_pi::windows(),
        }
    }
}

/// An operation. [`Op::signature`] is the table: PTX opcode, result kind, operand kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    AddF32,
    SubF32,
    MulF32,
    FmaF32,
    DivF32,
    SqrtF32,
    RcpF32,
    AbsF32,
    NegF32,
    /// NaN-propagating minimum (`min.NaN.f32`).
    MinF32,
    /// NaN-propagating maximum (`max.NaN.f32`).
    MaxF32,
    /// Round to the nearest integer, ties to even.
    RoundF32,
    F32ToI32Round,
    F32ToI32Trunc,
    I32ToF32,
    F32ToF64,
    F64ToF32,
    I32ToF64,
    I64ToF64,
    F64ToI32Trunc,
    RoundF64,
    U32ToU64,
    U64ToU32,
    /// The bits of an f32 as an i32.
    BitsOfF32,
    /// The f32 with the given bits.
    F32FromBits,
    AddI32,
    SubI32,
    MulLoI32,
    NegI32,
    AndI32,
    OrI32,
    XorI32,
    /// Shift left; amounts of 32 or more give 0.
    ShlI32,
    /// Arithmetic shift right; amounts of 32 or more give the sign.
    ShrS32,
    /// Logical shift right; amounts of 32 or more give 0.
    ShrU32,
    MinS32,
    MaxS32,
    /// Count of leading zero bits.
    ClzI32,
    /// `u32 * u32` as a u64.
    MulWideU32,
    /// `u32 * u32 + u64` as a u64.
    MadWideU32,
    ShlI64,
    ShrU64,
    OrI64,
    AddF64,
    SubF64,
    MulF64,
    FmaF64,
    DivF64,
    Setp(Cmp, CmpType),
    AndPred,
    OrPred,
    NotPred,
    /// `cond ? a : b` (`selp`), operands `a, b, cond`.
    Select(Kind),
    /// Word `index` of a constant table.
    LoadTable(Table),
}

/// What [`Op::signature`] gives: how to print an op and what it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub opcode: String,
    pub result: Kind,
    pub operands: Vec<Kind>,
}

impl Op {
    /// The instruction table: PTX opcode, result kind and operand kinds of every op.
    pub fn signature(self) -> Signature {
        use Kind::*;
        let (opcode, result, operands): (&str, Kind, &[Kind]) = match self {
            Op::AddF32 => ("add.rn.f32", F32, &[F32, F32]),
            Op::SubF32 => ("sub.rn.f32", F32, &[F32, F32]),
            Op::MulF32 => ("mul.rn.f32", F32, &[F32, F32]),
            Op::FmaF32 => ("fma.rn.f32", F32, &[F32, F32, F32]),
            Op::DivF32 => ("div.rn.f32", F32, &[F32, F32]),
            Op::SqrtF32 => ("sqrt.rn.f32", F32, &[F32]),
            Op::RcpF32 => ("rcp.rn.f32", F32, &[F32]),
            Op::AbsF32 => ("abs.f32", F32, &[F32]),
            Op::NegF32 => ("neg.f32", F32, &[F32]),
            Op::MinF32 => ("min.NaN.f32", F32, &[F32, F32]),
            Op::MaxF32 => ("max.NaN.f32", F32, &[F32, F32]),
            Op::RoundF32 => ("cvt.rni.f32.f32", F32, &[F32]),
            Op::F32ToI32Round => ("cvt.rni.s32.f32", I32, &[F32]),
            Op::F32ToI32Trunc => ("cvt.rzi.s32.f32", I32, &[F32]),
            Op::I32ToF32 => ("cvt.rn.f32.s32", F32, &[I32]),
            Op::F32ToF64 => ("cvt.f64.f32", F64, &[F32]),
            Op::F64ToF32 => ("cvt.rn.f32.f64", F32, &[F64]),
            Op::I32ToF64 => ("cvt.rn.f64.s32", F64, &[I32]),
            Op::I64ToF64 => ("cvt.rn.f64.s64", F64, &[I64]),
            Op::F64ToI32Trunc => ("cvt.rzi.s32.f64", I32, &[F64]),
            Op::RoundF64 => ("cvt.rni.f64.f64", F64, &[F64]),
            Op::U32ToU64 => ("cvt.u64.u32", I64, &[I32]),
            Op::U64ToU32 => ("cvt.u32.u64", I32, &[I64]),
            Op::BitsOfF32 => ("mov.b32", I32, &[F32]),
            Op::F32FromBits => ("mov.b32", F32, &[I32]),
            Op::AddI32 => ("add.s32", I32, &[I32, I32]),
            Op::SubI32 => ("sub.s32", I32, &[I32, I32]),
            Op::MulLoI32 => ("mul.lo.s32", I32, &[I32, I32]),
            Op::NegI32 => ("neg.s32", I32, &[I32]),
            Op::AndI32 => ("and.b32", I32, &[I32, I32]),
            Op::OrI32 => ("or.b32", I32, &[I32, I32]),
            Op::XorI32 => ("xor.b32", I32, &[I32, I32]),
            Op::ShlI32 => ("shl.b32", I32, &[I32, I32]),
            Op::ShrS32 => ("shr.s32", I32, &[I32, I32]),
            Op::ShrU32 => ("shr.u32", I32, &[I32, I32]),
            Op::MinS32 => ("min.s32", I32, &[I32, I32]),
            Op::MaxS32 => ("max.s32", I32, &[I32, I32]),
            Op::ClzI32 => ("clz.b32", I32, &[I32]),
            Op::MulWideU32 => ("mul.wide.u32", I64, &[I32, I32]),
            Op::MadWideU32 => ("mad.wide.u32", I64, &[I32, I32, I64]),
            Op::ShlI64 => ("shl.b64", I64, &[I64, I32]),
            Op::ShrU64 => ("shr.u64", I64, &[I64, I32]),
            Op::OrI64 => ("or.b64", I64, &[I64, I64]),
            Op::AddF64 => ("add.rn.f64", F64, &[F64, F64]),
            Op::SubF64 => ("sub.rn.f64", F64, &[F64, F64]),
            Op::MulF64 => ("mul.rn.f64", F64, &[F64, F64]),
            Op::FmaF64 => ("fma.rn.f64", F64, &[F64, F64, F64]),
            Op::DivF64 => ("div.rn.f64", F64, &[F64, F64]),
            Op::AndPred => ("and.pred", Pred, &[Pred, Pred]),
            Op::OrPred => ("or.pred", Pred, &[Pred, Pred]),
            Op::NotPred => ("not.pred", Pred, &[Pred]),
            Op::Setp(cmp, ty) => {
                let (suffix, operand) = match ty {
                    CmpType::S32 => ("s32", I32),
                    CmpType::U32 => ("u32", I32),
                    CmpType::F32 => ("f32", F32),
                    CmpType::F64 => ("f64", F64),
                };
                return Signature {
                    opcode: format!("setp.{}.{suffix}", cmp.name()),
                    result: Pred,
                    operands: vec![operand, operand],
                };
            }
            Op::Select(kind) => {
                let suffix = match kind {
                    I32 => "b32",
                    I64 => "b64",
                    F32 => "f32",
                    F64 => "f64",
                    Pred => panic!("selp has no .pred form"),
                };
                return Signature {
                    opcode: format!("selp.{suffix}"),
                    result: kind,
                    operands: vec![kind, kind, Pred],
                };
            }
            Op::LoadTable(_) => ("ld.const.u32", I32, &[I32]),
        };
        Signature {
            opcode: opcode.to_string(),
            result,
            operands: operands.to_vec(),
        }
    }

    /// Applies the op to concrete operands, exactly as the GPU does.
    pub fn apply(self, args: &[Scalar]) -> Scalar {
        let f = |i: usize| args[i].f32();
        let d = |i: usize| args[i].f64();
        let s = |i: usize| args[i].i32();
        let u = |i: usize| args[i].u32();
        let l = |i: usize| args[i].i64();
        match self {
            Op::AddF32 => Scalar::F32(f(0) + f(1)),
            Op::SubF32 => Scalar::F32(f(0) - f(1)),
            Op::MulF32 => Scalar::F32(f(0) * f(1)),
            Op::FmaF32 => Scalar::F32(f(0).mul_add(f(1), f(2))),
            Op::DivF32 => Scalar::F32(f(0) / f(1)),
            Op::SqrtF32 => Scalar::F32(f(0).sqrt()),
            Op::RcpF32 => Scalar::F32(1.0 / f(0)),
            Op::AbsF32 => Scalar::F32(f(0).abs()),
            Op::NegF32 => Scalar::F32(-f(0)),
            Op::MinF32 => Scalar::F32(nan_propagating(f(0), f(1), f32::min)),
            Op::MaxF32 => Scalar::F32(nan_propagating(f(0), f(1), f32::max)),
            Op::RoundF32 => Scalar::F32(f(0).round_ties_even()),
            // Rust's float-to-int `as` saturates and maps NaN to 0, like PTX's cvt.
            Op::F32ToI32Round => Scalar::I32(f(0).round_ties_even() as i32),
            Op::F32ToI32Trunc => Scalar::I32(f(0) as i32),
            Op::I32ToF32 => Scalar::F32(s(0) as f32),
            Op::F32ToF64 => Scalar::F64(f64::from(f(0))),
            Op::F64ToF32 => Scalar::F32(d(0) as f32),
            Op::I32ToF64 => Scalar::F64(f64::from(s(0))),
            Op::I64ToF64 => Scalar::F64(l(0) as f64),
            Op::F64ToI32Trunc => Scalar::I32(d(0) as i32),
            Op::RoundF64 => Scalar::F64(d(0).round_ties_even()),
            Op::U32ToU64 => Scalar::I64(i64::from(u(0))),
            Op::U64ToU32 => Scalar::I32(l(0) as i32),
            Op::BitsOfF32 => Scalar::I32(f(0).to_bits() as i32),
            Op::F32FromBits => Scalar::F32(f32::from_bits(u(0))),
            Op::AddI32 => Scalar::I32(s(0).wrapping_add(s(1))),
            Op::SubI32 => Scalar::I32(s(0).wrapping_sub(s(1))),
            Op::MulLoI32 => Scalar::I32(s(0).wrapping_mul(s(1))),
            Op::NegI32 => Scalar::I32(s(0).wrapping_neg()),
            Op::AndI32 => Scalar::I32(s(0) & s(1)),
            Op::OrI32 => Scalar::I32(s(0) | s(1)),
            Op::XorI32 => Scalar::I32(s(0) ^ s(1)),
            // PTX clamps shift amounts (read as unsigned) at the register width.
            Op::ShlI32 => Scalar::I32(if u(1) >= 32 { 0 } else { s(0) << u(1) }),
            Op::ShrS32 => Scalar::I32(s(0) >> u(1).min(31)),
            Op::ShrU32 => Scalar::I32(if u(1) >= 32 { 0 } else { (u(0) >> u(1)) as i32 }),
            Op::MinS32 => Scalar::I32(s(0).min(s(1))),
            Op::MaxS32 => Scalar::I32(s(0).max(s(1))),
            Op::ClzI32 => Scalar::I32(u(0).leading_zeros() as i32),
            Op::MulWideU32 => Scalar::I64((u64::from(u(0)) * u64::from(u(1))) as i64),
            Op::MadWideU32 => {
                Scalar::I64((u64::from(u(0)) * u64::from(u(1))).wrapping_add(l(2) as u64) as i64)
            }
            Op::ShlI64 => Scalar::I64(if u(1) >= 64 { 0 } else { l(0) << u(1) }),
            Op::ShrU64 => Scalar::I64(if u(1) >= 64 {
                0
            } else {
                ((l(0) as u64) >> u(1)) as i64
            }),
            Op::OrI64 => Scalar::I64(l(0) | l(1)),
            Op::AddF64 => Scalar::F64(d(0) + d(1)),
            Op::SubF64 => Scalar::F64(d(0) - d(1)),
            Op::MulF64 => Scalar::F64(d(0) * d(1)),
            Op::FmaF64 => Scalar::F64(d(0).mul_add(d(1), d(2))),
            Op::DivF64 => Scalar::F64(d(0) / d(1)),
            Op::Setp(cmp, ty) => Scalar::Pred(match ty {
                CmpType::S32 => cmp.ordered(s(0), s(1)),
                CmpType::U32 => cmp.ordered(u(0), u(1)),
                CmpType::F32 => cmp.float(f64::from(f(0)), f64::from(f(1))),
                CmpType::F64 => cmp.float(d(0), d(1)),
            }),
            Op::AndPred => Scalar::Pred(args[0].pred() && args[1].pred()),
            Op::OrPred => Scalar::Pred(args[0].pred() || args[1].pred()),
            Op::NotPred => Scalar::Pred(!args[0].pred()),
            Op::Select(_) => {
                if args[2].pred() {
                    args[0]
                } else {
                    args[1]
                }
            }
            Op::LoadTable(table) => {
                let words = table.words();
                let index = u(0) as usize;
                assert!(index < words.len(), "{table:?}[{index}] is out of bounds");
                Scalar::I32(words[index] as i32)
            }
        }
    }
}

fn nan_propagating(a: f32, b: f32, pick: fn(f32, f32) -> f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        pick(a, b)
    }
}

/// Where a value comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Origin {
    /// The routine's input number `n`.
    Input(usize),
    Const(Scalar),
    /// The result of an instruction.
    Computed,
}

/// One instruction of a routine.
#[derive(Clone, Debug, PartialEq)]
pub enum Inst {
    Op {
        op: Op,
        dst: Val,
        args: Vec<Val>,
    },
    /// `dst = src`, overwriting `dst` (a register move).
    Assign {
        dst: Val,
        src: Val,
    },
    /// Runs `then` only when `cond` holds.
    If {
        cond: Val,
        then: Vec<Inst>,
    },
    /// Runs `body`, then again while `cond` (computed by the body) holds.
    DoWhile {
        body: Vec<Inst>,
        cond: Val,
    },
}

/// A numeric routine: values, instructions, inputs and outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Routine {
    pub name: &'static str,
    /// Kind and origin of every value, indexed by [`Val`].
    pub values: Vec<(Kind, Origin)>,
    pub body: Vec<Inst>,
    pub inputs: Vec<Val>,
    pub outputs: Vec<Val>,
}

impl Routine {
    pub fn kind(&self, value: Val) -> Kind {
        self.values[value.0 as usize].0
    }

    /// Runs the routine on `inputs` (of the input kinds) and returns its outputs.
    pub fn eval(&self, inputs: &[Scalar]) -> Vec<Scalar> {
        assert_eq!(
            inputs.len(),
            self.inputs.len(),
            "{}: input count",
            self.name
        );
        let mut state: Vec<Option<Scalar>> = self
            .values
            .iter()
            .map(|(kind, origin)| match *origin {
                Origin::Input(n) => {
                    assert_eq!(inputs[n].kind(), *kind, "{}: input {n}", self.name);
                    Some(inputs[n])
                }
                Origin::Const(value) => Some(value),
                Origin::Computed => None,
            })
            .collect();
        run(&self.body, &mut state, self.name);
        self.outputs
            .iter()
            .map(|v| state[v.0 as usize].expect("every output is computed"))
            .collect()
    }

    /// Number of instructions, counting each loop or guarded body once.
    pub fn instruction_count(&self) -> usize {
        fn count(insts: &[Inst]) -> usize {
            insts
                .iter()
                .map(|inst| match inst {
                    Inst::Op { .. } | Inst::Assign { .. } => 1,
                    Inst::If { then, .. } => 1 + count(then),
                    Inst::DoWhile { body, .. } => 1 + count(body),
                })
                .sum()
        }
        count(&self.body)
    }

    /// The constant tables the routine reads.
    pub fn tables(&self) -> Vec<Table> {
        fn collect(insts: &[Inst], out: &mut Vec<Table>) {
            for inst in insts {
                match inst {
                    Inst::Op {
                        op: Op::LoadTable(table),
                        ..
                    } => {
                        if !out.contains(table) {
                            out.push(*table);
                        }
                    }
                    Inst::Op { .. } | Inst::Assign { .. } => {}
                    Inst::If { then, .. } => collect(then, out),
                    Inst::DoWhile { body, .. } => collect(body, out),
                }
            }
        }
        let mut tables = Vec::new();
        collect(&self.body, &mut tables);
        tables
    }
}

fn run(insts: &[Inst], state: &mut [Option<Scalar>], name: &str) {
    let get = |state: &[Option<Scalar>], v: Val| {
        state[v.0 as usize].unwrap_or_else(|| panic!("{name}: value {} read before written", v.0))
    };
    for inst in insts {
        match inst {
            Inst::Op { op, dst, args } => {
                let mut operands = [Scalar::Pred(false); 3];
                for (slot, &arg) in operands.iter_mut().zip(args) {
                    *slot = get(state, arg);
                }
                state[dst.0 as usize] = Some(op.apply(&operands[..args.len()]));
            }
            Inst::Assign { dst, src } => state[dst.0 as usize] = Some(get(state, *src)),
            Inst::If { cond, then } => {
                if get(state, *cond).pred() {
                    run(then, state, name);
                }
            }
            Inst::DoWhile { body, cond } => loop {
                run(body, state, name);
                if !get(state, *cond).pred() {
                    break;
                }
            },
        }
    }
}

impl fmt::Display for Routine {
    /// A listing for debugging: one instruction a line, values as `vN`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(
            f: &mut fmt::Formatter<'_>,
            routine: &Routine,
            insts: &[Inst],
            depth: usize,
        ) -> fmt::Result {
            let name = |v: &Val| match routine.values[v.0 as usize].1 {
                Origin::Const(value) => format!("{value:?}"),
                Origin::Input(n) => format!("in{n}"),
                Origin::Computed => format!("v{}", v.0),
            };
            let indent = "  ".repeat(depth);
            for inst in insts {
                match inst {
                    Inst::Op { op, dst, args } => {
                        let args: Vec<String> = args.iter().map(name).collect();
                        writeln!(
                            f,
                            "{indent}{} = {} {}",
                            name(dst),
                            op.signature().opcode,
                            args.join(", ")
                        )?;
                    }
                    Inst::Assign { dst, src } => {
                        writeln!(f, "{indent}{} := {}", name(dst), name(src))?
                    }
                    Inst::If { cond, then } => {
                        writeln!(f, "{indent}if {} {{", name(cond))?;
                        list(f, routine, then, depth + 1)?;
                        writeln!(f, "{indent}}}")?;
                    }
                    Inst::DoWhile { body, cond } => {
                        writeln!(f, "{indent}do {{")?;
                        list(f, routine, body, depth + 1)?;
                        writeln!(f, "{indent}}} while {}", name(cond))?;
                    }
                }
            }
            Ok(())
        }
        writeln!(f, "routine {}", self.name)?;
        list(f, self, &self.body, 1)
    }
}

/// Builds a [`Routine`]; the methods named after operations append one instruction and
/// return its result.
#[derive(Debug)]
pub struct Builder {
    name: &'static str,
    values: Vec<(Kind, Origin)>,
    /// The instruction lists being filled: the body, then one per open block.
    blocks: Vec<Vec<Inst>>,
    inputs: Vec<Val>,
}

impl Builder {
    pub fn new(name: &'static str) -> Builder {
        Builder {
            name,
            values: Vec::new(),
            blocks: vec![Vec::new()],
            inputs: Vec::new(),
        }
    }

    fn value(&mut self, kind: Kind, origin: Origin) -> Val {
        let id = u32::try_from(self.values.len()).expect("fewer than 2^32 values");
        self.values.push((kind, origin));
        Val(id)
    }

    fn kind(&self, value: Val) -> Kind {
        self.values[value.0 as usize].0
    }

    fn push(&mut self, inst: Inst) {
        self.blocks.last_mut().expect("a block is open").push(inst);
    }

    /// Declares the next input.
    pub fn input(&mut self, kind: Kind) -> Val {
        let value = self.value(kind, Origin::Input(self.inputs.len()));
        self.inputs.push(value);
        value
    }

    pub fn f32(&mut self, value: f32) -> Val {
        self.value(Kind::F32, Origin::Const(Scalar::F32(value)))
    }

    pub fn f64(&mut self, value: f64) -> Val {
        self.value(Kind::F64, Origin::Const(Scalar::F64(value)))
    }

    pub fn i32(&mut self, value: i32) -> Val {
        self.value(Kind::I32, Origin::Const(Scalar::I32(value)))
    }

    /// An i32 constant given by its bits.
    pub fn u32(&mut self, bits: u32) -> Val {
        self.i32(bits as i32)
    }

    /// Appends `op` applied to `args`, checking the operand kinds against the table.
    pub fn op(&mut self, op: Op, args: &[Val]) -> Val {
        let signature = op.signature();
        let kinds: Vec<Kind> = args.iter().map(|&a| self.kind(a)).collect();
        assert_eq!(
            kinds, signature.operands,
            "{}: operands of {}",
            self.name, signature.opcode
        );
        let dst = self.value(signature.result, Origin::Computed);
        self.push(Inst::Op {
            op,
            dst,
            args: args.to_vec(),
        });
        dst
    }

    /// Overwrites `dst` with `src` (both computed values of one kind).
    pub fn assign(&mut self, dst: Val, src: Val) {
        assert_eq!(
            self.kind(dst),
            self.kind(src),
            "{}: assign kinds",
            self.name
        );
        assert_eq!(
            self.values[dst.0 as usize].1,
            Origin::Computed,
            "{}: only computed values can be overwritten",
            self.name
        );
        self.push(Inst::Assign { dst, src });
    }

    /// Runs what `then` appends only when `cond` holds.
    pub fn if_then(&mut self, cond: Val, then: impl FnOnce(&mut Builder)) {
        self.blocks.push(Vec::new());
        then(self);
        let block = self.blocks.pop().expect("the block just opened");
        self.push(Inst::If { cond, then: block });
    }

    /// Runs what `body` appends, then again while the predicate it returns holds.
    pub fn do_while(&mut self, body: impl FnOnce(&mut Builder) -> Val) {
        self.blocks.push(Vec::new());
        let cond = body(self);
        let block = self.blocks.pop().expect("the block just opened");
        self.push(Inst::DoWhile { body: block, cond });
    }

    /// The finished routine returning `outputs`.
    pub fn finish(mut self, outputs: &[Val]) -> Routine {
        assert_eq!(self.blocks.len(), 1, "{}: unclosed block", self.name);
        Routine {
            name: self.name,
            values: self.values,
            body: self.blocks.pop().expect("the body"),
            inputs: self.inputs,
            outputs: outputs.to_vec(),
        }
    }

    // f32 arithmetic

    pub fn add(&mut self, a: Val, b: Val) -> Val {
        self.op(Op::AddF32, &[a, b])
    }

    pub fn sub(&mut self, a: Val, b: Val) -> Val {
        self.op(Op::SubF32, &[a, b])
    }

    pub fn mul(&mut self, a: Val, b: Val) -> Val {
        self.op(Op::MulF32, &[a, b])
    }

    pub fn fma(&mut self, a: Val, b: Val, c: Val) -> Val {
        self.op(Op::FmaF32, &[a, b, c])
    }

    /// `a * b + c` with constants `b` and `c`.
    pub fn fma_const(&mut self, a: Val, b: f32, c: f32) -> Val {
        let (b, c) = (self.f32(b), self.f32(c));
        self.fma(a, b, c)
    }

    /// `a * b` with a constant `b`.
    pub fn mul_const(&mut self, a: Val, b: f32) -> Val {
        let b = self.f32(b);
        self.mul(a, b)
    }

    /// `coeffs[0] + x * (coeffs[1] + x * (...))` by Horner's rule with fused multiply-adds.
    pub fn horner(&mut self, x: Val, coeffs: &[f32]) -> Val {
        let (&last, rest) = coeffs.split_last().expect("at least one coefficient");
        let mut acc = self.f32(last);
        for &c in rest.iter().rev() {
            let c = self.f32(c);
            acc = self.fma(acc, x, c);
        }
        acc
    }

    /// [`Builder::horner`] in f64.
    pub fn horner_f64(&mut self, x: Val, coeffs: &[f64]) -> Val {
        let (&last, rest) = coeffs.split_last().expect("at least one coefficient");
        let mut acc = self.f64(last);
        for &c in rest.iter().rev() {
            let c = self.f64(c);
            acc = self.op(Op::FmaF64, &[acc, x, c]);
        }
        acc
    }

    pub fn select(&mut self, cond: Val, if_true: Val, if_false: Val) -> Val {
        let kind = self.kind(if_true);
        self.op(Op::Select(kind), &[if_true, if_false, cond])
    }

    /// `a cmp b` for f32 operands.
    pub fn cmp_f32(&mut self, cmp: Cmp, a: Val, b: Val) -> Val {
        self.op(Op::Setp(cmp, CmpType::F32), &[a, b])
    }

    /// `a cmp b` for a constant f32 `b`.
    pub fn cmp_f32_const(&mut self, cmp: Cmp, a: Val, b: f32) -> Val {
        let b = self.f32(b);
        self.cmp_f32(cmp, a, b)
    }

    /// `a cmp b` for signed i32 operands, `b` constant.
    pub fn cmp_s32_const(&mut self, cmp: Cmp, a: Val, b: i32) -> Val {
        let b = self.i32(b);
        self.op(Op::Setp(cmp, CmpType::S32), &[a, b])
    }

    /// `a op b` for an i32 op and a constant `b`.
    pub fn int_const(&mut self, op: Op, a: Val, b: i32) -> Val {
        let b = self.i32(b);
        self.op(op, &[a, b])
    }

    /// `x` with the sign bit of `sign` (for `x` with a clear sign bit).
    pub fn with_sign_of(&mut self, x: Val, sign: Val) -> Val {
        let x_bits = self.op(Op::BitsOfF32, &[x]);
        let sign_bits = self.op(Op::BitsOfF32, &[sign]);
        let sign_bit = self.int_const(Op::AndI32, sign_bits, i32::MIN);
        let bits = self.op(Op::OrI32, &[x_bits, sign_bit]);
        self.op(Op::F32FromBits, &[bits])
    }
}
