//! canonicalize: local rewrites that remove identity ops, merge chains of layout ops and put
//! constants of commutative ops on the right, each exact under the interpreter's semantics.
//!
//! Rewrites, applied to every instruction in program order (nested regions included):
//! - identities whose result is forwarded to their operand: `cast` to the operand's dtype,
//!   `reshape` / `broadcast_to` / `slice` whose result type is the operand's type, `permute`
//!   by the identity, `concat` of one operand, `neg(neg x)`, `not(not x)`, `select` of two
//!   equal branches or of a constant condition;
//! - arithmetic identities with a `full` constant on the right, only where IEEE makes them
//!   exact for every operand: `x * 1`, `x / 1`, `x + (-0.0)`, `x - (+0.0)` (for integers
//!   `x + 0` and `x - 0`), `and(x, true)`, `or(x, false)`. `x + (+0.0)` is *not* an
//!   identity (it turns `-0.0` into `+0.0`) and is left alone;
//! - chains merged into one op: `reshape∘reshape`, `permute∘permute`,
//!   `broadcast_to∘broadcast_to`, and `cast∘cast` when the inner cast is exact (widening:
//!   every value of its source is a value of its target, e.g. `bf16→f32→f16` becomes
//!   `bf16→f16`, while the lossy `f32→bf16→f32` stays);
//! - a `full` constant on the left of a commutative op (`add mul eq ne and or`, and integer
//!   `max min`) moves to the right, so that the rules above and CSE see one form. Float
//!   `max`/`min` are not reordered: which zero `max(+0.0, -0.0)` returns may depend on the
//!   order.
//!
//! Every rewrite keeps the result type exactly (dtype and shape, symbolic dims included): a
//! forwarded value must have the result's type, and a rewritten instruction must infer the
//! same result type, or the rewrite is skipped. Forwarded instructions stay in place, unused,
//! for `dce`.

use crate::pipeline::Pass;
use crate::rewrite::{element_is, full_constant, Forwarding};
use kiln_ir::{
    BinaryOp, DType, Function, Inst, IrError, Op, Region, TensorData, TensorType, UnaryOp, Value,
};

/// The canonicalize pass.
pub const PASS: Pass = Pass {
    name: "canonicalize",
    summary: "remove identity ops, merge reshape/permute/broadcast/exact cast chains, \
              move constants of commutative ops to the right",
    run,
};

/// How many rewrites one instruction may go through in one run (each rewrite makes it
/// simpler; the bound only guards against a rule that would undo another).
const MAX_REWRITES_PER_INST: usize = 8;

/// Runs canonicalize on one function; returns whether it changed anything.
pub fn run(func: &mut Function) -> Result<bool, IrError> {
    let mut body = std::mem::take(&mut func.body);
    let mut canon = Canonicalizer {
        types: &func.values,
        defs: vec![None; func.values.len()],
        forwarding: Forwarding::new(func.values.len()),
        changed: false,
    };
    canon.region(&mut body);
    let changed = canon.changed;
    func.body = body;
    Ok(changed)
}

/// What one rule does to an instruction.
enum Rewrite {
    /// Every use of the result goes to this value instead.
    Forward(Value),
    /// The instruction becomes `op` applied to `operands`.
    Replace { op: Op, operands: Vec<Value> },
}

/// The defining op and operands of a single-result instruction seen so far.
#[derive(Clone)]
struct Def {
    op: Op,
    operands: Vec<Value>,
}

struct Canonicalizer<'f> {
    types: &'f [TensorType],
    defs: Vec<Option<Def>>,
    forwarding: Forwarding,
    changed: bool,
}

impl Canonicalizer<'_> {
    fn region(&mut self, region: &mut Region) {
        for inst in &mut region.insts {
            self.changed |= self.forwarding.apply(&mut inst.operands);
            for nested in &mut inst.regions {
                self.region(nested);
            }
            if inst.regions.is_empty() && inst.results.len() == 1 {
                self.simplify(inst);
                self.defs[inst.results[0].0 as usize] = Some(Def {
                    op: inst.op.clone(),
                    operands: inst.operands.clone(),
                });
            }
        }
        self.changed |= self.forwarding.apply(&mut region.yields);
    }

    fn ty(&self, v: Value) -> &TensorType {
        &self.types[v.0 as usize]
    }

    fn def(&self, v: Value) -> Option<&Def> {
        self.defs[v.0 as usize].as_ref()
    }

    /// Applies rules to a single-result instruction until none applies.
    fn simplify(&mut self, inst: &mut Inst) {
        let result = inst.results[0];
        for _ in 0..MAX_REWRITES_PER_INST {
            match self.rewrite(&inst.op, &inst.operands, result) {
                None => return,
                Some(Rewrite::Forward(v)) => {
                    debug_assert_eq!(self.ty(v), self.ty(result));
                    self.forwarding.forward(result, v);
                    return;
                }
                Some(Rewrite::Replace { op, operands }) => {
                    if !self.infers_type_of(&op, &operands, result) {
                        return;
                    }
                    inst.op = op;
                    inst.operands = operands;
                    self.changed = true;
                }
            }
        }
    }

    /// Whether `op` applied to `operands` has exactly the type of `result`.
    fn infers_type_of(&self, op: &Op, operands: &[Value], result: Value) -> bool {
        let operand_types: Vec<&TensorType> = operands.iter().map(|&v| self.ty(v)).collect();
        matches!(op.infer(&operand_types, &[]), Ok(types) if types == [self.ty(result).clone()])
    }

    /// Forwards `result` to `v` when both have the same type.
    fn forward_if_same_type(&self, v: Value, result: Value) -> Option<Rewrite> {
        (self.ty(v) == self.ty(result)).then_some(Rewrite::Forward(v))
    }

    /// The first rule that applies to `op` applied to `operands`, if any.
    fn rewrite(&self, op: &Op, operands: &[Value], result: Value) -> Option<Rewrite> {
        match op {
            Op::Binary(b) => self.binary(*b, operands[0], operands[1], result),
            Op::Unary(u @ (UnaryOp::Neg | UnaryOp::Not)) => {
                let inner = self.def(operands[0])?;
                if inner.op == Op::Unary(*u) {
                    self.forward_if_same_type(inner.operands[0], result)
                } else {
                    None
                }
            }
            Op::Cast { to } => self.cast(*to, operands[0], result),
            Op::Reshape { shape } => {
                let x = operands[0];
                if self.ty(x) == self.ty(result) {
                    return Some(Rewrite::Forward(x));
                }
                match self.def(x)? {
                    Def {
                        op: Op::Reshape { .. },
                        operands: inner,
                    } => Some(Rewrite::Replace {
                        op: Op::Reshape {
                            shape: shape.clone(),
                        },
                        operands: vec![inner[0]],
                    }),
                    _ => None,
                }
            }
            Op::Permute { perm } => {
                let x = operands[0];
                if perm.iter().enumerate().all(|(i, &p)| i == p) {
                    return self.forward_if_same_type(x, result);
                }
                match self.def(x)? {
                    Def {
                        op: Op::Permute { perm: inner_perm },
                        operands: inner,
                    } if inner_perm.len() == perm.len() => {
                        // out[i] = x[perm[i]] and x[j] = y[inner_perm[j]].
                        let composed = perm.iter().map(|&p| inner_perm[p]).collect();
                        Some(Rewrite::Replace {
                            op: Op::Permute { perm: composed },
                            operands: vec![inner[0]],
                        })
                    }
                    _ => None,
                }
            }
            Op::BroadcastTo { shape } => {
                let x = operands[0];
                if self.ty(x) == self.ty(result) {
                    return Some(Rewrite::Forward(x));
                }
                match self.def(x)? {
                    Def {
                        op: Op::BroadcastTo { .. },
                        operands: inner,
                    } => Some(Rewrite::Replace {
                        op: Op::BroadcastTo {
                            shape: shape.clone(),
                        },
                        operands: vec![inner[0]],
                    }),
                    _ => None,
                }
            }
            // A slice that keeps the operand's type takes every element: a constant dim
            // `n` sliced to length `n` must be `[0:n:1]` (or a dim of size <= 1), and a
            // symbolic end is only allowed for the whole dim.
            Op::Slice { .. } => self.forward_if_same_type(operands[0], result),
            Op::Concat { .. } if operands.len() == 1 => {
                self.forward_if_same_type(operands[0], result)
            }
            Op::Select => self.select(operands[0], operands[1], operands[2], result),
            _ => None,
        }
    }

    /// The element of `v` when a `full` op defines it.
    fn constant(&self, v: Value) -> Option<kiln_ir::Tensor> {
        full_constant(&self.def(v)?.op)
    }

    fn binary(&self, op: BinaryOp, lhs: Value, rhs: Value, result: Value) -> Option<Rewrite> {
        let dtype = self.ty(lhs).dtype;
        let rhs_constant = self.constant(rhs);
        if rhs_constant.is_none() && self.constant(lhs).is_some() && is_commutative(op, dtype) {
            return Some(Rewrite::Replace {
                op: Op::Binary(op),
                operands: vec![rhs, lhs],
            });
        }
        let c = rhs_constant?;
        let float_zero_with_sign = |negative: bool| match &c.data {
            TensorData::Float(v) => v[0] == 0.0 && v[0].is_sign_negative() == negative,
            _ => false,
        };
        let identity = match op {
            // x + (-0.0) == x for every x, -0.0 included; x + (+0.0) turns -0.0 into +0.0.
            BinaryOp::Add if dtype.is_float() => float_zero_with_sign(true),
            // x - (+0.0) == x + (-0.0).
            BinaryOp::Sub if dtype.is_float() => float_zero_with_sign(false),
            BinaryOp::Add | BinaryOp::Sub => element_is(&c, 0.0),
            // x * 1 and x / 1 are exact in IEEE arithmetic (and floor division by 1).
            BinaryOp::Mul | BinaryOp::Div => element_is(&c, 1.0),
            BinaryOp::And => element_is(&c, 1.0),
            BinaryOp::Or => element_is(&c, 0.0),
            _ => false,
        };
        if identity {
            self.forward_if_same_type(lhs, result)
        } else {
            None
        }
    }

    fn cast(&self, to: DType, x: Value, result: Value) -> Option<Rewrite> {
        if self.ty(x).dtype == to {
            return Some(Rewrite::Forward(x));
        }
        let Def {
            op: Op::Cast { to: middle },
            operands: inner,
        } = self.def(x)?
        else {
            return None;
        };
        let source = inner[0];
        if !cast_is_exact(self.ty(source).dtype, *middle) {
            return None;
        }
        if self.ty(source).dtype == to {
            self.forward_if_same_type(source, result)
        } else {
            Some(Rewrite::Replace {
                op: Op::Cast { to },
                operands: vec![source],
            })
        }
    }

    fn select(&self, cond: Value, a: Value, b: Value, result: Value) -> Option<Rewrite> {
        if a == b {
            return self.forward_if_same_type(a, result);
        }
        let c = self.constant(cond)?;
        let picked = if element_is(&c, 1.0) { a } else { b };
        self.forward_if_same_type(picked, result)
    }
}

/// Whether `op(a, b) == op(b, a)` bit for bit on operands of `dtype`.
fn is_commutative(op: BinaryOp, dtype: DType) -> bool {
    use BinaryOp::*;
    match op {
        Add | Mul | Eq | Ne | And | Or => true,
        Max | Min => !dtype.is_float(),
        _ => false,
    }
}

/// Whether `cast` from `from` to `to` keeps every value exactly (so that a cast after it
/// sees the same numbers the source held, and `cast(cast(x, to), c) == cast(x, c)`).
pub fn cast_is_exact(from: DType, to: DType) -> bool {
    use DType::*;
    if from == to || from == Bool {
        // Bool casts to 0 or 1, which every dtype holds.
        return true;
    }
    match (from, to) {
        (I8, I32 | I64) | (I32, I64) => true,
        // i8's range [-128, 127] fits the 8-bit significand of bf16 and f16's 11 bits.
        (I8, F16 | BF16 | F32) => true,
        (F16 | BF16, F32) => true,
        // Both f8 formats fit inside f16, bf16 and f32 (range and precision).
        (F8E4M3 | F8E5M2, F16 | BF16 | F32) => true,
        _ => false,
    }
}
