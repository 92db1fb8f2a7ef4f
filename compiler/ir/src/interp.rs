//! The reference interpreter: the living definition of what every op of the graph IR means.
//! The CPU and GPU backends are tested against it.
//!
//! Numerics, for every float dtype:
//! - element-wise arithmetic (`add sub mul div rem`, `neg abs floor ceil recip sqrt`,
//!   `max min`) is computed in f32 on the (exactly representable) f32 values of the
//!   operands and rounded once to the result dtype;
//! - transcendental functions (`exp log sin cos tanh sigmoid erf rsqrt pow`) are computed
//!   in f64 with `libm` (deterministic across platforms) and rounded once to the dtype;
//! - reductions, `mean` and `matmul` accumulate in f64 in row-major order and round once;
//! - float `max`/`min` (binary and reduce) return NaN when any input is NaN; comparisons
//!   follow IEEE (NaN compares unequal to everything).
//!
//! Integers are stored as i64 and wrap at the width of their dtype; integer `div` floors and
//! `rem` takes the divisor's sign, and both fail on a zero divisor. Conversions are those of
//! [`Tensor::cast`] (see `tensor`).
//!
//! Symbolic dims are bound from the shapes of the inputs (and of checkpoint params) when
//! the function starts; every op's results are checked against the types stored in the IR.

use crate::func::{Function, Inst, Region, Value};
use crate::ops::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::print::describe_inst;
use crate::tensor::{
    int_range, numel, round_f32, round_f64, round_i64, strides, wrap_int, Tensor, TensorData,
};
use crate::types::{DType, Dim, Shape, TensorType};
use crate::IrError;
use std::collections::BTreeMap;

/// Where the interpreter finds the checkpoint tensors named by `param` ops.
pub trait ParamSource {
    /// The tensor called `name`, which the IR declares with type `ty` (whose symbolic dims
    /// the caller checks).
    fn param(&self, name: &str, ty: &TensorType) -> Result<Tensor, IrError>;
}

impl ParamSource for BTreeMap<String, Tensor> {
    fn param(&self, name: &str, ty: &TensorType) -> Result<Tensor, IrError> {
        let tensor = self
            .get(name)
            .ok_or_else(|| IrError::new(format!("param \"{name}\" not found")))?;
        let dims_fit = tensor.shape.len() == ty.rank()
            && tensor
                .shape
                .iter()
                .zip(ty.shape.dims())
                .all(|(&n, d)| match d {
                    Dim::Const(c) => *c == n as u64,
                    Dim::Sym(_) => true,
                });
        if tensor.dtype != ty.dtype || !dims_fit {
            return Err(IrError::new(format!(
                "param \"{name}\": expected {ty}, found {}",
                tensor.ty()
            )));
        }
        Ok(tensor.clone())
    }
}

/// A `ParamSource` with no tensors: for functions without `param` ops.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoParams;

impl ParamSource for NoParams {
    fn param(&self, name: &str, _ty: &TensorType) -> Result<Tensor, IrError> {
        Err(IrError::new(format!(
            "param \"{name}\" not found (no params given)"
        )))
    }
}

/// Runs `func` on `inputs` (one per function parameter); returns its results.
pub fn interpret(
    func: &Function,
    inputs: &[Tensor],
    params: &dyn ParamSource,
) -> Result<Vec<Tensor>, IrError> {
    let arg_values = func.params();
    if inputs.len() != arg_values.len() {
        return Err(IrError::new(format!(
            "@{} takes {} inputs, got {}",
            func.name,
            arg_values.len(),
            inputs.len()
        )));
    }
    let mut machine = Machine {
        func,
        params,
        symbols: BTreeMap::new(),
        env: vec![None; func.values.len()],
    };
    for (i, (&value, input)) in arg_values.iter().zip(inputs).enumerate() {
        let ty = func.ty(value);
        machine
            .bind_and_check(ty, input)
            .map_err(|e| IrError::new(format!("input {i} of @{}: {}", func.name, e.message)))?;
    }
    machine.run_region(&func.body, inputs.to_vec())
}

/// The interpreter's state while running one function.
struct Machine<'a> {
    func: &'a Function,
    params: &'a dyn ParamSource,
    /// Sizes of the symbolic dims seen so far.
    symbols: BTreeMap<String, usize>,
    /// The current tensor of every value (function-wide: values are unique).
    env: Vec<Option<Tensor>>,
}

impl Machine<'_> {
    /// Checks `tensor` against `ty`, binding symbols it meets for the first time.
    fn bind_and_check(&mut self, ty: &TensorType, tensor: &Tensor) -> Result<(), IrError> {
        let mismatch = || IrError::new(format!("expected {ty}, found {}", tensor.ty()));
        if tensor.dtype != ty.dtype || tensor.rank() != ty.rank() {
            return Err(mismatch());
        }
        for (dim, &size) in ty.shape.dims().iter().zip(&tensor.shape) {
            match dim {
                Dim::Const(c) if *c != size as u64 => return Err(mismatch()),
                Dim::Const(_) => {}
                Dim::Sym(name) => match self.symbols.get(name) {
                    Some(&bound) if bound != size => {
                        return Err(IrError::new(format!(
                            "symbol {name} is {bound} but {} has it as {size}",
                            tensor.ty()
                        )))
                    }
                    Some(_) => {}
                    None => {
                        self.symbols.insert(name.clone(), size);
                    }
                },
            }
        }
        Ok(())
    }

    fn resolve_dim(&self, dim: &Dim) -> Result<usize, IrError> {
        match dim {
            Dim::Const(n) => Ok(*n as usize),
            Dim::Sym(name) => self.symbols.get(name).copied().ok_or_else(|| {
                IrError::new(format!(
                    "symbol {name} is not bound (no input or param has it)"
                ))
            }),
        }
    }

    fn resolve(&self, shape: &Shape) -> Result<Vec<usize>, IrError> {
        shape.dims().iter().map(|d| self.resolve_dim(d)).collect()
    }

    fn get(&self, v: Value) -> Result<&Tensor, IrError> {
        self.env[v.0 as usize]
            .as_ref()
            .ok_or_else(|| IrError::new(format!("{v:?} is used before it is defined")))
    }

    /// Binds the region's arguments, runs its instructions and returns what it yields.
    fn run_region(&mut self, region: &Region, args: Vec<Tensor>) -> Result<Vec<Tensor>, IrError> {
        for (&v, t) in region.args.iter().zip(args) {
            self.env[v.0 as usize] = Some(t);
        }
        for inst in &region.insts {
            self.run_inst(inst)?;
        }
        region
            .yields
            .iter()
            .map(|&v| self.get(v).cloned())
            .collect()
    }

    /// An error while running `inst`: `@f: %3 = div: message`.
    fn fail(&self, inst: &Inst, message: impl std::fmt::Display) -> IrError {
        IrError::new(format!(
            "@{}: {}: {message}",
            self.func.name,
            describe_inst(inst)
        ))
    }

    fn run_inst(&mut self, inst: &Inst) -> Result<(), IrError> {
        let results = match &inst.op {
            // The loop reports its own errors; those of its body pass through.
            Op::Loop => self.run_loop(inst)?,
            op => self
                .eval_inst(inst, op)
                .map_err(|message| self.fail(inst, message))?,
        };
        self.store_results(inst, results)
            .map_err(|message| self.fail(inst, message))
    }

    /// Runs an instruction without regions.
    fn eval_inst(&mut self, inst: &Inst, op: &Op) -> Result<Vec<Tensor>, String> {
        if let Op::Param { name, ty } = op {
            let tensor = self.params.param(name, ty).map_err(|e| e.message)?;
            self.bind_and_check(ty, &tensor)
                .map_err(|e| format!("param \"{name}\": {}", e.message))?;
            return Ok(vec![tensor]);
        }
        let operands = inst
            .operands
            .iter()
            .map(|&v| self.get(v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.message)?;
        let result_type = self.func.ty(inst.results[0]);
        let out_shape = self.resolve(&result_type.shape).map_err(|e| e.message)?;
        eval_op(op, &operands, result_type.dtype, &out_shape)
    }

    /// Checks the results against the types in the IR and binds them.
    fn store_results(&mut self, inst: &Inst, results: Vec<Tensor>) -> Result<(), String> {
        if results.len() != inst.results.len() {
            return Err(format!(
                "produced {} results, the IR has {}",
                results.len(),
                inst.results.len()
            ));
        }
        for (&v, tensor) in inst.results.iter().zip(results) {
            let ty = self.func.ty(v);
            let expected = self.resolve(&ty.shape).map_err(|e| e.message)?;
            if tensor.dtype != ty.dtype || tensor.shape != expected {
                return Err(format!(
                    "produced {} for {v:?}, whose type is {ty}",
                    tensor.ty()
                ));
            }
            self.env[v.0 as usize] = Some(tensor);
        }
        Ok(())
    }

    fn run_loop(&mut self, inst: &Inst) -> Result<Vec<Tensor>, IrError> {
        let count_tensor = self.get(inst.operands[0]).map_err(|e| self.fail(inst, e))?;
        let count = match count_tensor.as_i64() {
            Some([n]) => *n,
            _ => {
                let found = count_tensor.ty();
                return Err(self.fail(
                    inst,
                    format!("count must be an integer scalar, got {found}"),
                ));
            }
        };
        if count < 0 {
            return Err(self.fail(inst, format!("negative count {count}")));
        }
        let mut carried = inst.operands[1..]
            .iter()
            .map(|&v| self.get(v).cloned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.fail(inst, e))?;
        let body = &inst.regions[0];
        for i in 0..count {
            let mut args = Vec::with_capacity(carried.len() + 1);
            args.push(Tensor::scalar_int(DType::I64, i));
            args.extend(carried);
            carried = self.run_region(body, args)?;
        }
        Ok(carried)
    }
}

// ---------------------------------------------------------------------------------------
// The meaning of each op. `out_dtype` and `out_shape` are the (resolved) type of the first
// result, as the type rule computed it.
// ---------------------------------------------------------------------------------------

type EvalResult = Result<Vec<Tensor>, String>;

fn one(dtype: DType, shape: &[usize], data: TensorData) -> EvalResult {
    Ok(vec![Tensor {
        dtype,
        shape: shape.to_vec(),
        data,
    }])
}

/// Evaluates an op without regions.
fn eval_op(op: &Op, x: &[&Tensor], out_dtype: DType, out_shape: &[usize]) -> EvalResult {
    match op {
        Op::Param { .. } | Op::Loop => Err("evaluated by the interpreter's driver".into()),
        Op::Full { value, dtype, .. } => Ok(vec![Tensor::full(*dtype, out_shape, *value)]),
        Op::Arange { dtype, .. } => {
            let len = out_shape[0];
            let data = if dtype.is_float() {
                TensorData::Float((0..len).map(|i| round_i64(*dtype, i as i64)).collect())
            } else {
                TensorData::Int((0..len).map(|i| wrap_int(*dtype, i as i64)).collect())
            };
            one(*dtype, out_shape, data)
        }
        Op::Unary(u) => one(out_dtype, out_shape, unary(*u, x[0])?),
        Op::Binary(b) => {
            let lhs = broadcast_data(x[0], out_shape);
            let rhs = broadcast_data(x[1], out_shape);
            one(out_dtype, out_shape, binary(*b, x[0].dtype, &lhs, &rhs)?)
        }
        Op::Select => {
            let cond = broadcast_data(x[0], out_shape);
            let (TensorData::Bool(cond), a, b) = (
                cond,
                broadcast_data(x[1], out_shape),
                broadcast_data(x[2], out_shape),
            ) else {
                return Err("condition is not bool".into());
            };
            let picks = cond
                .iter()
                .enumerate()
                .map(|(i, &c)| if c { i } else { i + cond.len() })
                .collect::<Vec<_>>();
            let mut both = a;
            both.extend_from(&b, 0..b.len());
            one(out_dtype, out_shape, both.take(&picks))
        }
        Op::Cast { to } => Ok(vec![x[0].cast(*to)]),
        Op::Reduce { op, axes, .. } => one(out_dtype, out_shape, reduce(*op, x[0], axes)),
        Op::ArgMax { axis, .. } => one(out_dtype, out_shape, arg_reduce(x[0], *axis, true)?),
        Op::ArgMin { axis, .. } => one(out_dtype, out_shape, arg_reduce(x[0], *axis, false)?),
        Op::Sort { axis } => one(out_dtype, out_shape, sort(x[0], *axis)),
        Op::MatMul => one(out_dtype, out_shape, matmul(x[0], x[1], out_shape)),
        Op::Attention { scale } => one(out_dtype, out_shape, attention(x, *scale)),
        Op::KvWrite { layer } => one(out_dtype, out_shape, kv_write(x, *layer)?),
        Op::PagedAttention { layer, scale } => {
            one(out_dtype, out_shape, paged_attention(x, *layer, *scale)?)
        }
        Op::Reshape { .. } => one(out_dtype, out_shape, x[0].data.clone()),
        Op::Permute { perm } => {
            let in_strides = strides(&x[0].shape);
            let permuted: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
            let offsets = strided_offsets(out_shape, &permuted, 0);
            one(out_dtype, out_shape, x[0].data.take(&offsets))
        }
        Op::BroadcastTo { .. } => one(out_dtype, out_shape, broadcast_data(x[0], out_shape)),
        Op::Slice {
            axis, start, step, ..
        } => {
            let input = x[0];
            let end = start + (out_shape[*axis] as u64).saturating_sub(1) * step;
            if out_shape[*axis] > 0 && end >= input.shape[*axis] as u64 {
                return Err(format!(
                    "index {end} of axis {axis} is out of range (size {})",
                    input.shape[*axis]
                ));
            }
            let mut steps = strides(&input.shape);
            let base = *start as usize * steps[*axis];
            steps[*axis] *= *step as usize;
            let offsets = strided_offsets(out_shape, &steps, base);
            one(out_dtype, out_shape, input.data.take(&offsets))
        }
        Op::Concat { axis } => {
            let outer = numel(&out_shape[..*axis]);
            let inner = numel(&out_shape[*axis + 1..]);
            let mut data = TensorData::empty_for(out_dtype);
            for o in 0..outer {
                for part in x {
                    let chunk = part.shape[*axis] * inner;
                    data.extend_from(&part.data, o * chunk..(o + 1) * chunk);
                }
            }
            one(out_dtype, out_shape, data)
        }
        Op::Gather { axis } => gather(x[0], x[1], *axis, out_shape),
    }
}

/// Offsets `base + sum(index[i] * steps[i])` for every index of `shape`, row-major.
fn strided_offsets(shape: &[usize], steps: &[usize], base: usize) -> Vec<usize> {
    let total = numel(shape);
    let mut offsets = Vec::with_capacity(total);
    let mut index = vec![0usize; shape.len()];
    let mut offset = base;
    for _ in 0..total {
        offsets.push(offset);
        // Advance the row-major counter, updating the offset incrementally.
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            offset += steps[d];
            if index[d] < shape[d] {
                break;
            }
            offset -= steps[d] * index[d];
            index[d] = 0;
        }
    }
    offsets
}

/// The data of `x` broadcast (numpy rules) to `shape`.
fn broadcast_data(x: &Tensor, shape: &[usize]) -> TensorData {
    if x.shape == shape {
        return x.data.clone();
    }
    let pad = shape.len() - x.rank();
    let in_strides = strides(&x.shape);
    let steps: Vec<usize> = (0..shape.len())
        .map(|d| {
            if d < pad || x.shape[d - pad] == 1 {
                0
            } else {
                in_strides[d - pad]
            }
        })
        .collect();
    x.data.take(&strided_offsets(shape, &steps, 0))
}

fn unary(op: UnaryOp, x: &Tensor) -> Result<TensorData, String> {
    let dtype = x.dtype;
    Ok(match &x.data {
        TensorData::Float(v) => {
            // `in_f32`: computed in f32; `in_f64`: a transcendental computed in f64.
            let in_f32 = |f: fn(f32) -> f32| v.iter().map(|&a| round_f32(dtype, f(a))).collect();
            let in_f64 = |f: fn(f64) -> f64| {
                v.iter()
                    .map(|&a| round_f64(dtype, f(f64::from(a))))
                    .collect()
            };
            TensorData::Float(match op {
                UnaryOp::Neg => in_f32(|a| -a),
                UnaryOp::Abs => in_f32(f32::abs),
                UnaryOp::Floor => in_f32(f32::floor),
                UnaryOp::Ceil => in_f32(f32::ceil),
                UnaryOp::Recip => in_f32(|a| 1.0 / a),
                UnaryOp::Sqrt => in_f32(f32::sqrt),
                UnaryOp::Rsqrt => in_f64(|a| 1.0 / libm::sqrt(a)),
                UnaryOp::Exp => in_f64(libm::exp),
                UnaryOp::Log => in_f64(libm::log),
                UnaryOp::Sin => in_f64(libm::sin),
                UnaryOp::Cos => in_f64(libm::cos),
                UnaryOp::Tanh => in_f64(libm::tanh),
                UnaryOp::Sigmoid => in_f64(|a| 1.0 / (1.0 + libm::exp(-a))),
                UnaryOp::Erf => in_f64(libm::erf),
                UnaryOp::Not => return Err("not expects bool".into()),
            })
        }
        TensorData::Int(v) => TensorData::Int(match op {
            UnaryOp::Neg => v
                .iter()
                .map(|&a| wrap_int(dtype, a.wrapping_neg()))
                .collect(),
            UnaryOp::Abs => v
                .iter()
                .map(|&a| wrap_int(dtype, a.wrapping_abs()))
                .collect(),
            _ => return Err(format!("{} is not defined on integers", op.name())),
        }),
        TensorData::Bool(v) => match op {
            UnaryOp::Not => TensorData::Bool(v.iter().map(|&a| !a).collect()),
            _ => return Err(format!("{} is not defined on bool", op.name())),
        },
    })
}

/// Floored remainder: the result takes the sign of the divisor.
fn floored_rem_f32(a: f32, b: f32) -> f32 {
    let r = a % b;
    if r != 0.0 && (r < 0.0) != (b < 0.0) {
        r + b
    } else {
        r
    }
}

fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

fn nan_min(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

fn floor_div_i64(a: i64, b: i64) -> i64 {
    let q = a.wrapping_div(b);
    if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    }
}

fn floored_rem_i64(a: i64, b: i64) -> i64 {
    let r = a.wrapping_rem(b);
    if r != 0 && ((r < 0) != (b < 0)) {
        r + b
    } else {
        r
    }
}

/// A binary op on broadcast operand data of dtype `dtype`.
fn binary(
    op: BinaryOp,
    dtype: DType,
    lhs: &TensorData,
    rhs: &TensorData,
) -> Result<TensorData, String> {
    use BinaryOp::*;
    Ok(match (lhs, rhs) {
        (TensorData::Float(a), TensorData::Float(b)) => {
            let pairs = a.iter().copied().zip(b.iter().copied());
            if op.is_comparison() {
                let test: fn(f32, f32) -> bool = match op {
                    Eq => |x, y| x == y,
                    Ne => |x, y| x != y,
                    Lt => |x, y| x < y,
                    Le => |x, y| x <= y,
                    Gt => |x, y| x > y,
                    _ => |x, y| x >= y,
                };
                return Ok(TensorData::Bool(pairs.map(|(x, y)| test(x, y)).collect()));
            }
            let f: fn(f32, f32) -> f64 = match op {
                Add => |x, y| f64::from(x + y),
                Sub => |x, y| f64::from(x - y),
                Mul => |x, y| f64::from(x * y),
                Div => |x, y| f64::from(x / y),
                Rem => |x, y| f64::from(floored_rem_f32(x, y)),
                Max => |x, y| f64::from(nan_max(x, y)),
                Min => |x, y| f64::from(nan_min(x, y)),
                Pow => |x, y| libm::pow(f64::from(x), f64::from(y)),
                _ => return Err(format!("{} is not defined on floats", op.name())),
            };
            TensorData::Float(pairs.map(|(x, y)| round_f64(dtype, f(x, y))).collect())
        }
        (TensorData::Int(a), TensorData::Int(b)) => {
            let pairs = a.iter().copied().zip(b.iter().copied());
            if op.is_comparison() {
                let test: fn(i64, i64) -> bool = match op {
                    Eq => |x, y| x == y,
                    Ne => |x, y| x != y,
                    Lt => |x, y| x < y,
                    Le => |x, y| x <= y,
                    Gt => |x, y| x > y,
                    _ => |x, y| x >= y,
                };
                return Ok(TensorData::Bool(pairs.map(|(x, y)| test(x, y)).collect()));
            }
            if matches!(op, Div | Rem) && b.contains(&0) {
                return Err("integer division by zero".into());
            }
            let f: fn(i64, i64) -> i64 = match op {
                Add => i64::wrapping_add,
                Sub => i64::wrapping_sub,
                Mul => i64::wrapping_mul,
                Div => floor_div_i64,
                Rem => floored_rem_i64,
                Max => i64::max,
                Min => i64::min,
                _ => return Err(format!("{} is not defined on integers", op.name())),
            };
            TensorData::Int(pairs.map(|(x, y)| wrap_int(dtype, f(x, y))).collect())
        }
        (TensorData::Bool(a), TensorData::Bool(b)) => {
            let f: fn(bool, bool) -> bool = match op {
                Eq => |x, y| x == y,
                Ne => |x, y| x != y,
                And => |x, y| x && y,
                Or => |x, y| x || y,
                _ => return Err(format!("{} is not defined on bool", op.name())),
            };
            TensorData::Bool(a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect())
        }
        _ => return Err("operand storage kinds differ".into()),
    })
}

/// For every element of `shape` (row-major), the row-major index of its output element
/// after the `axes` are reduced away.
fn reduced_index_map(shape: &[usize], axes: &[usize]) -> (Vec<usize>, usize) {
    let kept: Vec<usize> = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
    let kept_shape: Vec<usize> = kept.iter().map(|&d| shape[d]).collect();
    let kept_strides = strides(&kept_shape);
    let mut steps = vec![0; shape.len()];
    for (k, &d) in kept.iter().enumerate() {
        steps[d] = kept_strides[k];
    }
    (strided_offsets(shape, &steps, 0), numel(&kept_shape))
}

fn reduce(op: ReduceOp, x: &Tensor, axes: &[usize]) -> TensorData {
    let (target, out_len) = reduced_index_map(&x.shape, axes);
    let count = (numel(&x.shape) / out_len.max(1)) as f64;
    match &x.data {
        TensorData::Float(v) => {
            let init = match op {
                ReduceOp::Sum | ReduceOp::Mean => 0.0,
                ReduceOp::Prod => 1.0,
                ReduceOp::Max => f64::NEG_INFINITY,
                ReduceOp::Min => f64::INFINITY,
            };
            let mut acc = vec![init; out_len];
            for (&a, &t) in v.iter().zip(&target) {
                let a = f64::from(a);
                let slot = &mut acc[t];
                *slot = match op {
                    ReduceOp::Sum | ReduceOp::Mean => *slot + a,
                    ReduceOp::Prod => *slot * a,
                    ReduceOp::Max if a.is_nan() || slot.is_nan() => f64::NAN,
                    ReduceOp::Max => slot.max(a),
                    ReduceOp::Min if a.is_nan() || slot.is_nan() => f64::NAN,
                    ReduceOp::Min => slot.min(a),
                };
            }
            if op == ReduceOp::Mean {
                let n = if out_len == 0 { 0.0 } else { count };
                acc.iter_mut().for_each(|s| *s /= n);
            }
            TensorData::Float(acc.into_iter().map(|s| round_f64(x.dtype, s)).collect())
        }
        TensorData::Int(v) => {
            let (lo, hi) = int_range(x.dtype);
            let init = match op {
                ReduceOp::Sum | ReduceOp::Mean => 0,
                ReduceOp::Prod => 1,
                ReduceOp::Max => lo,
                ReduceOp::Min => hi,
            };
            let mut acc = vec![init; out_len];
            for (&a, &t) in v.iter().zip(&target) {
                let slot = &mut acc[t];
                *slot = match op {
                    ReduceOp::Sum | ReduceOp::Mean => slot.wrapping_add(a),
                    ReduceOp::Prod => slot.wrapping_mul(a),
                    ReduceOp::Max => (*slot).max(a),
                    ReduceOp::Min => (*slot).min(a),
                };
            }
            TensorData::Int(acc.into_iter().map(|s| wrap_int(x.dtype, s)).collect())
        }
        TensorData::Bool(_) => unreachable!("the type rule rejects bool reductions"),
    }
}

/// Index of the largest (`largest`) or smallest element along `axis`: the lowest index on
/// ties, the first NaN if any.
fn arg_reduce(x: &Tensor, axis: usize, largest: bool) -> Result<TensorData, String> {
    let len = x.shape[axis];
    if len == 0 {
        return Err(format!("axis {axis} of {} is empty", x.ty()));
    }
    let outer = numel(&x.shape[..axis]);
    let inner = numel(&x.shape[axis + 1..]);
    let values = x.to_f64_vec();
    let ints = x.as_i64();
    // Whether element `j` beats the best so far at `i` (strictly, so ties keep the first).
    let beats = |j: usize, i: usize| -> bool {
        if let Some(v) = ints {
            return if largest { v[j] > v[i] } else { v[j] < v[i] };
        }
        let (a, b) = (values[j], values[i]);
        if b.is_nan() {
            false
        } else if a.is_nan() {
            true
        } else if largest {
            a > b
        } else {
            a < b
        }
    };
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for n in 0..inner {
            let at = |k: usize| (o * len + k) * inner + n;
            let mut best = 0;
            for k in 1..len {
                if beats(at(k), at(best)) {
                    best = k;
                }
            }
            out.push(best as i64);
        }
    }
    Ok(TensorData::Int(out))
}

/// Every line of `x` along `axis` sorted ascending, stably; float NaNs go last (numpy's
/// `np.sort(kind="stable")`).
fn sort(x: &Tensor, axis: usize) -> TensorData {
    let len = x.shape[axis];
    let outer = numel(&x.shape[..axis]);
    let inner = numel(&x.shape[axis + 1..]);
    let mut picks = vec![0usize; numel(&x.shape)];
    let values = x.to_f64_vec();
    let ints = x.as_i64();
    let mut line: Vec<usize> = Vec::with_capacity(len);
    for o in 0..outer {
        for n in 0..inner {
            let at = |k: usize| (o * len + k) * inner + n;
            line.clear();
            line.extend((0..len).map(at));
            match ints {
                Some(v) => line.sort_by_key(|&i| v[i]),
                // NaN after every number; numbers by value (-0.0 == +0.0); stable.
                None => line.sort_by(|&i, &j| {
                    let (a, b) = (values[i], values[j]);
                    match (a.is_nan(), b.is_nan()) {
                        (false, false) => a.partial_cmp(&b).expect("numbers compare"),
                        (a_nan, b_nan) => a_nan.cmp(&b_nan),
                    }
                }),
            }
            for (k, &i) in line.iter().enumerate() {
                picks[at(k)] = i;
            }
        }
    }
    x.data.take(&picks)
}

fn matmul(a: &Tensor, b: &Tensor, out_shape: &[usize]) -> TensorData {
    let rank = out_shape.len();
    let (m, n) = (out_shape[rank - 2], out_shape[rank - 1]);
    let k = a.shape[a.rank() - 1];
    let batch = &out_shape[..rank - 2];
    // Offset of each batch entry's matrix in `a` / `b`, broadcasting their batch dims.
    let batch_offsets = |t: &Tensor, matrix: usize| -> Vec<usize> {
        let t_batch = &t.shape[..t.rank() - 2];
        let pad = batch.len() - t_batch.len();
        let t_strides = strides(t_batch);
        let steps: Vec<usize> = (0..batch.len())
            .map(|d| {
                if d < pad || t_batch[d - pad] == 1 {
                    0
                } else {
                    t_strides[d - pad] * matrix
                }
            })
            .collect();
        strided_offsets(batch, &steps, 0)
    };
    let a_offsets = batch_offsets(a, m * k);
    let b_offsets = batch_offsets(b, k * n);
    match (&a.data, &b.data) {
        (TensorData::Float(av), TensorData::Float(bv)) => {
            let mut out = Vec::with_capacity(numel(out_shape));
            for (&ao, &bo) in a_offsets.iter().zip(&b_offsets) {
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = 0.0f64;
                        for p in 0..k {
                            acc += f64::from(av[ao + i * k + p]) * f64::from(bv[bo + p * n + j]);
                        }
                        out.push(round_f64(a.dtype, acc));
                    }
                }
            }
            TensorData::Float(out)
        }
        (TensorData::Int(av), TensorData::Int(bv)) => {
            let mut out = Vec::with_capacity(numel(out_shape));
            for (&ao, &bo) in a_offsets.iter().zip(&b_offsets) {
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = 0i64;
                        for p in 0..k {
                            acc = acc
                                .wrapping_add(av[ao + i * k + p].wrapping_mul(bv[bo + p * n + j]));
                        }
                        out.push(wrap_int(a.dtype, acc));
                    }
                }
            }
            TensorData::Int(out)
        }
        _ => unreachable!("the type rule requires numeric operands of one dtype"),
    }
}

/// Scaled dot-product attention (see `Op::Attention`), rounding where the unfused
/// composition would: the dot product to q's dtype, the scaled scores in f32, the
/// probabilities to q's dtype, the weighted sum to q's dtype.
fn attention(x: &[&Tensor], scale: f64) -> TensorData {
    let (q, k, v, allow) = (x[0], x[1], x[2], x[3]);
    let [b, s, h, d] = [q.shape[0], q.shape[1], q.shape[2], q.shape[3]];
    let [t, kv] = [k.shape[1], k.shape[2]];
    let group = h / kv;
    let mask = broadcast_data(allow, &[b, h, s, t]);
    let (
        TensorData::Float(qv),
        TensorData::Float(kvv),
        TensorData::Float(vv),
        TensorData::Bool(mask),
    ) = (&q.data, &k.data, &v.data, &mask)
    else {
        unreachable!("the type rule requires float q/k/v and a bool mask")
    };
    let dtype = q.dtype;
    let scale = scale as f32;
    let mut out = vec![0.0f32; b * s * h * d];
    let mut scores = vec![0.0f32; t];
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / group;
            for i in 0..s {
                let q_row = &qv[((bi * s + i) * h + hi) * d..][..d];
                for (j, score) in scores.iter_mut().enumerate() {
                    let k_row = &kvv[((bi * t + j) * kv + g) * d..][..d];
                    let dot: f64 = q_row
                        .iter()
                        .zip(k_row)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let allowed = mask[((bi * h + hi) * s + i) * t + j];
                    *score = if allowed {
                        round_f64(dtype, dot) * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                let probs = softmax_probs(&scores, dtype);
                for c in 0..d {
                    let acc: f64 = probs
                        .iter()
                        .enumerate()
                        .map(|(j, p)| {
                            f64::from(*p) * f64::from(vv[((bi * t + j) * kv + g) * d + c])
                        })
                        .sum();
                    out[((bi * s + i) * h + hi) * d + c] = round_f64(dtype, acc);
                }
            }
        }
    }
    TensorData::Float(out)
}

/// The offset of the row at `slot` of `layer` in a paged cache `[L, NB, BS, KV, D]`, in
/// elements, or an error naming what is out of range.
fn cache_row(cache: &Tensor, layer: usize, slot: i64) -> Result<usize, String> {
    let [_, blocks, block_size, heads, dim] = cache.shape[..] else {
        unreachable!("the type rule requires a rank-5 cache")
    };
    let slots = blocks * block_size;
    if slot < 0 || slot as usize >= slots {
        return Err(format!(
            "slot {slot} is outside the cache's {slots} slots ({blocks} blocks of {block_size})"
        ));
    }
    Ok((layer * slots + slot as usize) * heads * dim)
}

/// The softmax of one row of attention scores as the unfused composition rounds it: the
/// exponentials and their sum in f32, each probability rounded to `dtype`.
fn softmax_probs(scores: &[f32], dtype: DType) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total = round_f64(DType::F32, exps.iter().map(|e| f64::from(*e)).sum());
    exps.iter().map(|e| round_f32(dtype, e / total)).collect()
}

/// `kv_write` (see `Op::KvWrite`): the cache with each row of x stored at its slot.
fn kv_write(x: &[&Tensor], layer: usize) -> Result<TensorData, String> {
    let (cache, rows, slots) = (x[0], x[1], x[2]);
    let slots = slots.as_i64().ok_or("slots are not integers")?;
    let (TensorData::Float(cache_data), TensorData::Float(row_data)) = (&cache.data, &rows.data)
    else {
        unreachable!("the type rule requires float cache and rows")
    };
    let width = cache.shape[3] * cache.shape[4];
    let mut out = cache_data.clone();
    for (n, &slot) in slots.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let at = cache_row(cache, layer, slot)?;
        out[at..at + width].copy_from_slice(&row_data[n * width..][..width]);
    }
    Ok(TensorData::Float(out))
}

/// `paged_attention` (see `Op::PagedAttention`): each query token attends causally to its
/// sequence's cached positions, rounding like one row of [`attention`].
fn paged_attention(x: &[&Tensor], layer: usize, scale: f64) -> Result<TensorData, String> {
    let (q, k, v, tables, seq, pos) = (x[0], x[1], x[2], x[3], x[4], x[5]);
    let [n, h, d] = [q.shape[0], q.shape[1], q.shape[2]];
    let [block_size, kv] = [k.shape[2], k.shape[3]];
    let [batch, max_blocks] = [tables.shape[0], tables.shape[1]];
    let group = h / kv;
    let tables = tables.as_i64().ok_or("block tables are not integers")?;
    let seq = seq.as_i64().ok_or("`seq` is not integers")?;
    let pos = pos.as_i64().ok_or("`pos` is not integers")?;
    let (TensorData::Float(qv), TensorData::Float(kc), TensorData::Float(vc)) =
        (&q.data, &k.data, &v.data)
    else {
        unreachable!("the type rule requires float q and caches")
    };
    let dtype = q.dtype;
    let scale = scale as f32;
    let mut out = vec![0.0f32; n * h * d];
    for t in 0..n {
        if seq[t] < 0 {
            continue;
        }
        let b = seq[t] as usize;
        if b >= batch {
            return Err(format!(
                "token {t} belongs to sequence {b}, but the block tables have {batch} rows"
            ));
        }
        if pos[t] < 0 || pos[t] as usize >= max_blocks * block_size {
            return Err(format!(
                "token {t} is at position {}, outside the {} positions a block-table row holds",
                pos[t],
                max_blocks * block_size
            ));
        }
        let context = pos[t] as usize + 1;
        let mut rows = Vec::with_capacity(context);
        for p in 0..context {
            let block = tables[b * max_blocks + p / block_size];
            let slot = block * block_size as i64 + (p % block_size) as i64;
            rows.push(cache_row(k, layer, slot).map_err(|e| {
                format!("token {t}, position {p} (block {block} of sequence {b}): {e}")
            })?);
        }
        for hi in 0..h {
            let g = hi / group;
            let q_row = &qv[(t * h + hi) * d..][..d];
            let scores: Vec<f32> = rows
                .iter()
                .map(|&row| {
                    let k_row = &kc[row + g * d..][..d];
                    let dot: f64 = q_row
                        .iter()
                        .zip(k_row)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    round_f64(dtype, dot) * scale
                })
                .collect();
            let probs = softmax_probs(&scores, dtype);
            for c in 0..d {
                let acc: f64 = probs
                    .iter()
                    .zip(&rows)
                    .map(|(p, &row)| f64::from(*p) * f64::from(vc[row + g * d + c]))
                    .sum();
                out[(t * h + hi) * d + c] = round_f64(dtype, acc);
            }
        }
    }
    Ok(TensorData::Float(out))
}

fn gather(table: &Tensor, indices: &Tensor, axis: usize, out_shape: &[usize]) -> EvalResult {
    let len = table.shape[axis];
    let outer = numel(&table.shape[..axis]);
    let inner = numel(&table.shape[axis + 1..]);
    let idx = indices.as_i64().ok_or("indices are not integers")?;
    let mut offsets = Vec::with_capacity(numel(out_shape));
    for o in 0..outer {
        for &i in idx {
            if i < 0 || i as usize >= len {
                return Err(format!(
                    "index {i} out of range for axis {axis} of size {len}"
                ));
            }
            let base = (o * len + i as usize) * inner;
            offsets.extend(base..base + inner);
        }
    }
    one(table.dtype, out_shape, table.data.take(&offsets))
}
