//! Binding a plan to concrete sizes: the values of its symbolic dims read off the inputs,
//! buffer shapes and byte sizes, and the checks that the caller's inputs and weights fit
//! the plan. Plain Rust, testable without a GPU.

use std::collections::BTreeMap;
use std::fmt;

use kiln_ir::{DType, Tensor};
use kiln_kir::manifest::WeightInfo;
use kiln_kir::{BufferDecl, BufferId, Plan, SizeExpr};

use crate::error::CudaError;

/// The values of a plan's symbolic dims for one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SymbolValues(BTreeMap<String, u64>);

impl SymbolValues {
    pub fn new() -> SymbolValues {
        SymbolValues::default()
    }

    /// Symbol values from `(name, value)` pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, u64)>) -> SymbolValues {
        SymbolValues(
            pairs
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
        )
    }

    pub fn insert(&mut self, name: impl Into<String>, value: u64) {
        self.0.insert(name.into(), value);
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }

    /// The symbols and their values, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(name, value)| (name.as_str(), *value))
    }

    /// `expr` with these values; `None` when it uses an unbound symbol (or divides by 0,
    /// or overflows).
    pub fn eval(&self, expr: &SizeExpr) -> Option<u64> {
        expr.eval(&|name| self.get(name))
    }
}

impl fmt::Display for SymbolValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no symbols");
        }
        let pairs: Vec<String> = self
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        f.write_str(&pairs.join(", "))
    }
}

/// Reads the plan's symbol values off the shapes of its inputs, checking that each
/// binding names an existing input axis and that symbols bound twice agree.
pub fn bind_symbols(plan: &Plan, input_shapes: &[&[usize]]) -> Result<SymbolValues, CudaError> {
    let mut values = SymbolValues::new();
    let mut origin: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for binding in &plan.symbols {
        let bad_input = |detail: String| CudaError::BadInput {
            plan: plan.function.clone(),
            index: binding.input,
            detail,
        };
        let shape = input_shapes.get(binding.input).ok_or_else(|| {
            bad_input(format!(
                "symbol `{}` is read from this input, but only {} inputs were given",
                binding.name,
                input_shapes.len()
            ))
        })?;
        let size = *shape.get(binding.axis).ok_or_else(|| {
            bad_input(format!(
                "symbol `{}` is read from axis {}, but the input has shape {shape:?}",
                binding.name, binding.axis
            ))
        })? as u64;
        plan.check_symbol(&binding.name, size).map_err(bad_input)?;
        match values.get(&binding.name) {
            Some(previous) if previous != size => {
                let (input, axis) = origin[binding.name.as_str()];
                return Err(bad_input(format!(
                    "symbol `{}` is {size} on axis {} here but {previous} on axis {axis} of \
                     input {input}",
                    binding.name, binding.axis
                )));
            }
            Some(_) => {}
            None => {
                values.insert(binding.name.clone(), size);
                origin.insert(&binding.name, (binding.input, binding.axis));
            }
        }
    }
    Ok(values)
}

/// The declaration of buffer `id`.
pub fn buffer_decl(plan: &Plan, id: BufferId) -> Result<&BufferDecl, CudaError> {
    let by_index = plan.buffers.get(id.0 as usize).filter(|decl| decl.id == id);
    by_index
        .or_else(|| plan.buffers.iter().find(|decl| decl.id == id))
        .ok_or_else(|| CudaError::BadPlan {
            plan: plan.function.clone(),
            detail: format!("buffer b{} is used but not declared", id.0),
        })
}

/// `expr` evaluated with `symbols`, as a byte or element count; `what` names it in errors.
pub fn eval_size(
    plan: &Plan,
    expr: &SizeExpr,
    symbols: &SymbolValues,
    what: &dyn Fn() -> String,
) -> Result<usize, CudaError> {
    let value = symbols.eval(expr).ok_or_else(|| CudaError::BadPlan {
        plan: plan.function.clone(),
        detail: format!(
            "{} `{expr}` cannot be evaluated with {symbols} (an unbound symbol, a division \
             by zero or an overflow)",
            what()
        ),
    })?;
    usize::try_from(value).map_err(|_| CudaError::BadPlan {
        plan: plan.function.clone(),
        detail: format!("{} `{expr}` is {value}, too large for this machine", what()),
    })
}

/// The concrete shape of a buffer.
pub fn buffer_shape(
    plan: &Plan,
    decl: &BufferDecl,
    symbols: &SymbolValues,
) -> Result<Vec<usize>, CudaError> {
    decl.shape
        .iter()
        .enumerate()
        .map(|(axis, dim)| {
            eval_size(plan, dim, symbols, &|| {
                format!("dimension {axis} of buffer b{}", decl.id.0)
            })
        })
        .collect()
}

/// Bytes of a buffer: its element count times its dtype's size.
pub fn buffer_bytes(
    plan: &Plan,
    decl: &BufferDecl,
    symbols: &SymbolValues,
) -> Result<usize, CudaError> {
    let shape = buffer_shape(plan, decl, symbols)?;
    shape
        .iter()
        .try_fold(decl.dtype.size_bytes(), |bytes, &dim| {
            bytes.checked_mul(dim)
        })
        .ok_or_else(|| CudaError::BadPlan {
            plan: plan.function.clone(),
            detail: format!(
                "buffer b{} of shape {shape:?} has more bytes than this machine can address",
                decl.id.0
            ),
        })
}

/// Checks the caller's inputs against the plan: their number, dtypes and shapes.
pub fn check_inputs(
    plan: &Plan,
    inputs: &[Tensor],
    symbols: &SymbolValues,
) -> Result<(), CudaError> {
    check_input_count(plan, inputs.len())?;
    for (index, tensor) in inputs.iter().enumerate() {
        check_input(plan, index, tensor, symbols)?;
    }
    Ok(())
}

/// Checks that `given` inputs are as many as the plan takes.
pub fn check_input_count(plan: &Plan, given: usize) -> Result<(), CudaError> {
    if given == plan.inputs.len() {
        return Ok(());
    }
    Err(CudaError::BadInput {
        plan: plan.function.clone(),
        index: given.min(plan.inputs.len()),
        detail: format!(
            "{given} inputs were given, the plan takes {}",
            plan.inputs.len()
        ),
    })
}

/// Checks input `index` against its declaration (dtype and shape for `symbols`).
pub fn check_input(
    plan: &Plan,
    index: usize,
    tensor: &Tensor,
    symbols: &SymbolValues,
) -> Result<(), CudaError> {
    let id = plan.inputs[index];
    let decl = buffer_decl(plan, id)?;
    let shape = buffer_shape(plan, decl, symbols)?;
    if tensor.dtype != decl.dtype || tensor.shape != shape {
        return Err(CudaError::BadInput {
            plan: plan.function.clone(),
            index,
            detail: format!(
                "expected {} {shape:?} ({symbols}), got {} {:?}",
                decl.dtype, tensor.dtype, tensor.shape
            ),
        });
    }
    Ok(())
}

/// The dtype and shape a weight must have: the manifest's [`WeightInfo`] when it lists the
/// weight, which must then agree with the plan's declaration; otherwise the declaration
/// (whose shape must not use symbols).
pub fn expected_weight(
    plan: &Plan,
    decl: &BufferDecl,
    name: &str,
    weights: &[WeightInfo],
) -> Result<(DType, Vec<usize>), CudaError> {
    let declared = buffer_shape(plan, decl, &SymbolValues::new())?;
    if let Some(info) = weights.iter().find(|info| info.checkpoint_name == name) {
        let listed: Vec<usize> = info.shape.iter().map(|&dim| dim as usize).collect();
        if info.dtype != decl.dtype || listed != declared {
            return Err(CudaError::BadPlan {
                plan: plan.function.clone(),
                detail: format!(
                    "weight `{name}` is declared {} {declared:?} in the plan (b{}) but {} \
                     {listed:?} in the manifest",
                    decl.dtype, decl.id.0, info.dtype
                ),
            });
        }
    }
    Ok((decl.dtype, declared))
}

/// Checks a weight tensor against its expected dtype and shape.
pub fn check_weight(
    name: &str,
    dtype: DType,
    shape: &[usize],
    tensor: &Tensor,
) -> Result<(), CudaError> {
    if tensor.dtype != dtype || tensor.shape != shape {
        return Err(CudaError::WeightMismatch {
            name: name.to_string(),
            expected: format!("{dtype} {shape:?}"),
            found: format!("{} {:?}", tensor.dtype, tensor.shape),
        });
    }
    Ok(())
}
