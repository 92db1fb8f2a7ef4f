//! constfold: evaluates instructions whose operands are all constants with the reference
//! interpreter, and replaces those whose result has every element equal by a `full`.
//!
//! Constants are the results of `full` ops (of any shape, symbolic dims included) and small
//! tensors of constant shape computed from constants (`arange`, then ops on it). Folding
//! never computes anything itself: every value comes from [`kiln_ir::interpret`] run on a
//! one-instruction function, so the rounding of every dtype is the interpreter's. Ways an
//! instruction is evaluated:
//! - element-wise ops (unary, binary, `select`, `cast`) on `full` operands: once, on 0-d
//!   tensors holding the elements, whatever the shapes;
//! - reductions, arg-reductions and `matmul` on `full` operands: on tensors whose dims are
//!   shrunk to 1 except the reduced ones (or `matmul`'s inner dim), which must be constant
//!   and small: every output element reduces the same elements in the same order;
//! - `reshape`, `permute`, `broadcast_to`, `slice` (of a constant dim) and `concat` of
//!   equal `full`s move elements without computing: the result is the same `full`;
//! - anything else whose operands and result have constant shapes of at most
//!   [`MAX_CONSTANT_ELEMENTS`] elements: on the whole tensors.
//!
//! A result is rewritten into `full {value, dtype, shape}` (keeping its value number and
//! type) only when all its elements are bit-identical and the `full` op reproduces that
//! element exactly (an i64 beyond 2^53 does not fold). A computed NaN never folds: its
//! sign and payload depend on the machine the compiler runs on. Other constant results
//! are remembered for the instructions that use them but stay as they are: the IR has no
//! literal for a tensor of distinct elements. An evaluation that fails (an integer
//! division by zero, a gather out of range, an arg-reduction of an empty axis) leaves the
//! instruction alone, so the error still happens at run time.

use crate::pipeline::Pass;
use crate::rewrite::{full_element, same_bits};
use kiln_ir::{
    interpret, Builder, DType, Dim, Function, IrError, NoParams, Op, Region, Shape, Tensor,
    TensorData, TensorType,
};

/// The constant-folding pass.
pub const PASS: Pass = Pass {
    name: "constfold",
    summary: "evaluate ops on constant operands with the interpreter; fold uniform results \
              into `full`",
    run,
};

/// The largest constant tensor (in elements) that constfold materializes.
pub const MAX_CONSTANT_ELEMENTS: u64 = 4096;

/// Runs constfold on one function; returns whether it changed anything.
pub fn run(func: &mut Function) -> Result<bool, IrError> {
    let mut body = std::mem::take(&mut func.body);
    let mut folder = Folder {
        types: &func.values,
        known: vec![None; func.values.len()],
        changed: false,
    };
    folder.region(&mut body);
    let changed = folder.changed;
    func.body = body;
    Ok(changed)
}

/// The values of `func` (at any nesting) that are small constant tensors of distinct
/// elements (at most [`MAX_CONSTANT_ELEMENTS`], computed from constants by the interpreter,
/// exactly as constfold computes them), which the IR cannot state as literals: the fusion
/// stores them in the plan instead of computing them in a kernel on every run.
pub fn small_constants(func: &Function) -> std::collections::BTreeMap<kiln_ir::Value, Tensor> {
    let mut body = func.body.clone();
    let mut folder = Folder {
        types: &func.values,
        known: vec![None; func.values.len()],
        changed: false,
    };
    folder.region(&mut body);
    folder
        .known
        .into_iter()
        .enumerate()
        .filter_map(|(v, known)| match known {
            Some(Constant::Tensor(t)) => Some((kiln_ir::Value(v as u32), t)),
            _ => None,
        })
        .collect()
}

/// What constfold knows about a value.
#[derive(Clone, Debug)]
enum Constant {
    /// Every element is the one of `full {value, dtype}` (the value's type gives the shape).
    Uniform { value: f64, dtype: DType },
    /// A small tensor of constant shape with these elements.
    Tensor(Tensor),
}

struct Folder<'f> {
    types: &'f [TensorType],
    known: Vec<Option<Constant>>,
    changed: bool,
}

impl Folder<'_> {
    fn region(&mut self, region: &mut Region) {
        for inst in &mut region.insts {
            for nested in &mut inst.regions {
                self.region(nested);
            }
            if !inst.regions.is_empty() || inst.results.len() != 1 {
                continue;
            }
            let result = inst.results[0];
            match &inst.op {
                Op::Full { value, dtype, .. } => {
                    self.known[result.0 as usize] = Some(Constant::Uniform {
                        value: *value,
                        dtype: *dtype,
                    });
                    continue;
                }
                Op::Param { .. } => continue,
                _ => {}
            }
            let operands: Option<Vec<&Constant>> = inst
                .operands
                .iter()
                .map(|v| self.known[v.0 as usize].as_ref())
                .collect();
            let Some(operands) = operands else { continue };
            let operand_types: Vec<&TensorType> = inst
                .operands
                .iter()
                .map(|v| &self.types[v.0 as usize])
                .collect();
            let result_type = &self.types[result.0 as usize];
            let folded = fold(&inst.op, &operands, &operand_types, result_type);
            match folded {
                Some(Constant::Uniform { value, dtype }) if dtype == result_type.dtype => {
                    inst.op = Op::Full {
                        value,
                        dtype,
                        shape: result_type.shape.clone(),
                    };
                    inst.operands.clear();
                    self.changed = true;
                    self.known[result.0 as usize] = folded;
                }
                Some(Constant::Tensor(_)) => self.known[result.0 as usize] = folded,
                _ => {}
            }
        }
    }
}

/// The constant result of `op` on constant operands, if it can be computed here.
fn fold(
    op: &Op,
    operands: &[&Constant],
    operand_types: &[&TensorType],
    result_type: &TensorType,
) -> Option<Constant> {
    let uniform: Option<Vec<Tensor>> = operands
        .iter()
        .map(|c| match c {
            Constant::Uniform { value, dtype } => Some(full_element(*dtype, *value)),
            Constant::Tensor(_) => None,
        })
        .collect();
    if let (Some(elements), false) = (&uniform, operands.is_empty()) {
        if let Some(folded) = fold_uniform(op, operands, elements, operand_types) {
            return Some(folded);
        }
    }
    fold_small(op, operands, operand_types, result_type)
}

/// Folds an op whose operands are all `full`s, without materializing their shapes.
fn fold_uniform(
    op: &Op,
    operands: &[&Constant],
    elements: &[Tensor],
    operand_types: &[&TensorType],
) -> Option<Constant> {
    match op {
        Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } => {
            uniform_result(&evaluate(op, elements.to_vec())?)
        }
        Op::Reshape { .. } | Op::Permute { .. } | Op::BroadcastTo { .. } | Op::Sort { .. } => {
            Some(operands[0].clone())
        }
        Op::Slice { axis, .. } => {
            // A constant end on a symbolic dim is checked at run time: leave that check.
            operand_types[0].shape.dims()[*axis].as_const()?;
            Some(operands[0].clone())
        }
        Op::Concat { .. } => elements[1..]
            .iter()
            .all(|e| same_bits(e, &elements[0]))
            .then(|| operands[0].clone()),
        Op::Reduce { axes, .. } => {
            let x = operand_types[0];
            let shape = shrunk_shape(x, |axis| axes.contains(&axis))?;
            let input = Tensor::full(x.dtype, &shape, uniform_value(operands[0])?);
            uniform_result(&evaluate(op, vec![input])?)
        }
        Op::ArgMax { axis, .. } | Op::ArgMin { axis, .. } => {
            let x = operand_types[0];
            let shape = shrunk_shape(x, |a| a == *axis)?;
            let input = Tensor::full(x.dtype, &shape, uniform_value(operands[0])?);
            uniform_result(&evaluate(op, vec![input])?)
        }
        Op::MatMul => {
            let (a, b) = (operand_types[0], operand_types[1]);
            let (ra, rb) = (a.rank(), b.rank());
            let lhs_shape = shrunk_shape(a, |axis| axis == ra - 1)?;
            let rhs_shape = shrunk_shape(b, |axis| axis == rb - 2)?;
            let lhs = Tensor::full(a.dtype, &lhs_shape, uniform_value(operands[0])?);
            let rhs = Tensor::full(b.dtype, &rhs_shape, uniform_value(operands[1])?);
            uniform_result(&evaluate(op, vec![lhs, rhs])?)
        }
        _ => None,
    }
}

/// Folds an op on small constant tensors (and `arange`), evaluating it on whole tensors.
fn fold_small(
    op: &Op,
    operands: &[&Constant],
    operand_types: &[&TensorType],
    result_type: &TensorType,
) -> Option<Constant> {
    if !matches!(op, Op::Arange { .. }) && operands.is_empty() {
        return None;
    }
    small_shape(result_type)?;
    let inputs = operands
        .iter()
        .zip(operand_types)
        .map(|(c, ty)| match c {
            Constant::Uniform { value, dtype } => {
                Some(Tensor::full(*dtype, &small_shape(ty)?, *value))
            }
            Constant::Tensor(t) => Some(t.clone()),
        })
        .collect::<Option<Vec<Tensor>>>()?;
    let result = evaluate(op, inputs)?;
    if result.ty() != *result_type {
        return None;
    }
    uniform_result(&result).or(Some(Constant::Tensor(result)))
}

/// The sizes of a type whose dims are all constant with at most `MAX_CONSTANT_ELEMENTS`
/// elements.
fn small_shape(ty: &TensorType) -> Option<Vec<usize>> {
    let numel = ty.shape.const_numel()?;
    if numel > MAX_CONSTANT_ELEMENTS {
        return None;
    }
    ty.shape
        .dims()
        .iter()
        .map(|d| d.as_const().map(|n| n as usize))
        .collect()
}

/// `ty`'s shape with every dim for which `keep(axis)` is false shrunk to 1; the kept dims
/// must be constant and hold at most `MAX_CONSTANT_ELEMENTS` elements together.
fn shrunk_shape(ty: &TensorType, keep: impl Fn(usize) -> bool) -> Option<Vec<usize>> {
    let shape: Vec<Dim> = ty
        .shape
        .dims()
        .iter()
        .enumerate()
        .map(|(axis, d)| if keep(axis) { d.clone() } else { Dim::Const(1) })
        .collect();
    small_shape(&TensorType::new(ty.dtype, Shape(shape)))
}

fn uniform_value(c: &Constant) -> Option<f64> {
    match c {
        Constant::Uniform { value, .. } => Some(*value),
        Constant::Tensor(_) => None,
    }
}

/// `Uniform` when the tensor has at least one element, all of them bit-identical and not
/// NaN, and a `full` op reproduces that element exactly.
fn uniform_result(t: &Tensor) -> Option<Constant> {
    let first = first_element(t)?;
    let all_equal = match &t.data {
        TensorData::Float(v) => v.iter().all(|x| x.to_bits() == v[0].to_bits()),
        TensorData::Int(v) => v.iter().all(|x| *x == v[0]),
        TensorData::Bool(v) => v.iter().all(|x| *x == v[0]),
    };
    if !all_equal {
        return None;
    }
    let value = match &first.data {
        // Which NaN an operation returns depends on the machine (x86 gives a negative one,
        // Arm a positive one); folding it would make the output depend on the machine too.
        TensorData::Float(v) if v[0].is_nan() => return None,
        TensorData::Float(v) => f64::from(v[0]),
        TensorData::Int(v) => v[0] as f64,
        TensorData::Bool(v) => f64::from(u8::from(v[0])),
    };
    same_bits(&full_element(t.dtype, value), &first).then_some(Constant::Uniform {
        value,
        dtype: t.dtype,
    })
}

/// The first element of a tensor as a 0-d tensor.
fn first_element(t: &Tensor) -> Option<Tensor> {
    let data = match &t.data {
        TensorData::Float(v) => TensorData::Float(vec![*v.first()?]),
        TensorData::Int(v) => TensorData::Int(vec![*v.first()?]),
        TensorData::Bool(v) => TensorData::Bool(vec![*v.first()?]),
    };
    Some(Tensor {
        dtype: t.dtype,
        shape: Vec::new(),
        data,
    })
}

/// Runs `op` on `inputs` in the reference interpreter: a function with one parameter per
/// input and the one instruction. `None` when the op rejects these operands or fails.
fn evaluate(op: &Op, inputs: Vec<Tensor>) -> Option<Tensor> {
    let mut func = Function::new("constfold");
    let params: Vec<_> = inputs
        .iter()
        .map(|t| func.add_param(t.ty(), None))
        .collect();
    let results = Builder::new(&mut func).push(op.clone(), &params).ok()?;
    if results.len() != 1 {
        return None;
    }
    func.body.yields = results;
    interpret(&func, &inputs, &NoParams).ok()?.pop()
}
