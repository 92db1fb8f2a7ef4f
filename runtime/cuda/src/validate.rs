//! Checks that a plan agrees with itself and with the package's kernels before anything
//! runs: every buffer is declared, temps have arena offsets, views have no cycles, every
//! launch passes one argument of the right kind and dtype per kernel parameter, loops are
//! well formed. A plan that passes can only fail at run time on sizes or on the GPU.
//! Plain Rust, testable without a GPU.

use kiln_ir::DType;
use kiln_kir::manifest::{KernelInfo, ParamLayout};
use kiln_kir::{Arg, BufferId, BufferKind, Plan, Step};

use crate::binding::buffer_decl;
use crate::error::CudaError;

/// The scalar parameter types a symbol value may be passed as.
pub(crate) const SYMBOL_SCALAR_TYPES: [&str; 2] = ["i64", "i32"];

/// Checks `plan` against `kernels` (the package's kernels, indexed by `Step::Launch`).
pub fn check_plan(plan: &Plan, kernels: &[KernelInfo]) -> Result<(), CudaError> {
    let bad = |detail: String| CudaError::BadPlan {
        plan: plan.function.clone(),
        detail,
    };
    for decl in &plan.buffers {
        match &decl.kind {
            BufferKind::Temp if decl.offset.is_none() => {
                return Err(bad(format!(
                    "temp buffer b{} has no arena offset",
                    decl.id.0
                )));
            }
            BufferKind::View(_) => {
                view_root(plan, decl.id)?;
            }
            _ => {}
        }
    }
    for &id in plan.inputs.iter().chain(&plan.outputs) {
        buffer_decl(plan, id)?;
    }
    for binding in &plan.symbols {
        if binding.input >= plan.inputs.len() {
            return Err(bad(format!(
                "symbol `{}` is read from input {}, but the plan has {} inputs",
                binding.name,
                binding.input,
                plan.inputs.len()
            )));
        }
    }
    check_steps(plan, &plan.steps, kernels, "step")
}

/// The buffer a chain of views ends at; an error on a cycle or an undeclared buffer.
pub(crate) fn view_root(plan: &Plan, id: BufferId) -> Result<BufferId, CudaError> {
    let mut current = id;
    for _ in 0..=plan.buffers.len() {
        match &buffer_decl(plan, current)?.kind {
            BufferKind::View(base) => current = *base,
            _ => return Ok(current),
        }
    }
    Err(CudaError::BadPlan {
        plan: plan.function.clone(),
        detail: format!("view b{} is part of a cycle of views", id.0),
    })
}

fn check_steps(
    plan: &Plan,
    steps: &[Step],
    kernels: &[KernelInfo],
    path: &str,
) -> Result<(), CudaError> {
    let bad = |detail: String| CudaError::BadPlan {
        plan: plan.function.clone(),
        detail,
    };
    for (index, step) in steps.iter().enumerate() {
        let here = format!("{path} {index}");
        match step {
            Step::Launch { kernel, args } => {
                let info = kernels.get(*kernel).ok_or_else(|| {
                    bad(format!(
                        "{here} launches kernel #{kernel}, but the package has {} kernels",
                        kernels.len()
                    ))
                })?;
                check_launch_args(plan, info, args, &here)?;
            }
            Step::Copy { src, dst } => {
                buffer_decl(plan, *src)?;
                buffer_decl(plan, *dst)?;
            }
            Step::Loop {
                count,
                carried,
                init,
                next,
                counter,
                body,
            } => {
                let count_dtype = buffer_decl(plan, *count)?.dtype;
                if !matches!(count_dtype, DType::I8 | DType::I32 | DType::I64) {
                    return Err(bad(format!(
                        "{here}: the loop count b{} is {count_dtype}, not an integer",
                        count.0
                    )));
                }
                let counter_dtype = buffer_decl(plan, *counter)?.dtype;
                if counter_dtype != DType::I64 {
                    return Err(bad(format!(
                        "{here}: the loop counter b{} is {counter_dtype}, not i64",
                        counter.0
                    )));
                }
                if carried.len() != init.len() || carried.len() != next.len() {
                    return Err(bad(format!(
                        "{here}: the loop has {} carried, {} init and {} next buffers",
                        carried.len(),
                        init.len(),
                        next.len()
                    )));
                }
                for id in carried.iter().chain(init).chain(next) {
                    buffer_decl(plan, *id)?;
                }
                check_steps(plan, body, kernels, &format!("{here}, body step"))?;
            }
            Step::BySize {
                symbol,
                small,
                large,
                ..
            } => {
                if !plan.symbols.iter().any(|b| &b.name == symbol) {
                    return Err(bad(format!(
                        "{here}: the branch reads symbol `{symbol}`, which no input binds"
                    )));
                }
                check_steps(plan, small, kernels, &format!("{here}, small step"))?;
                check_steps(plan, large, kernels, &format!("{here}, large step"))?;
            }
        }
    }
    Ok(())
}

/// Checks a launch's arguments against the kernel's parameters.
fn check_launch_args(
    plan: &Plan,
    kernel: &KernelInfo,
    args: &[Arg],
    here: &str,
) -> Result<(), CudaError> {
    let bad = |detail: String| CudaError::BadPlan {
        plan: plan.function.clone(),
        detail: format!("{here} launches kernel `{}`: {detail}", kernel.name),
    };
    if args.len() != kernel.params.len() {
        return Err(bad(format!(
            "{} arguments for {} parameters ({})",
            args.len(),
            kernel.params.len(),
            parameter_names(kernel)
        )));
    }
    for (param, arg) in kernel.params.iter().zip(args) {
        match (param, arg) {
            (ParamLayout::Buffer { name, dtype, .. }, Arg::Buffer(id)) => {
                let decl = buffer_decl(plan, *id)?;
                if decl.dtype != *dtype {
                    return Err(bad(format!(
                        "parameter `{name}` is a {dtype} buffer, but b{} is {}",
                        id.0, decl.dtype
                    )));
                }
            }
            (ParamLayout::Scalar { name, ty }, Arg::Sym(symbol)) => {
                if !SYMBOL_SCALAR_TYPES.contains(&ty.as_str()) {
                    return Err(bad(format!(
                        "parameter `{name}` is {ty}, which cannot hold the value of symbol \
                         `{symbol}`"
                    )));
                }
                if !plan.symbols.iter().any(|binding| &binding.name == symbol) {
                    return Err(bad(format!(
                        "parameter `{name}` is given symbol `{symbol}`, which no input binds"
                    )));
                }
            }
            (ParamLayout::Buffer { name, .. }, Arg::Sym(symbol)) => {
                return Err(bad(format!(
                    "parameter `{name}` is a buffer, but it is given symbol `{symbol}`"
                )));
            }
            (ParamLayout::Scalar { name, ty }, Arg::Buffer(id)) => {
                return Err(bad(format!(
                    "parameter `{name}` is a {ty} scalar, but it is given buffer b{}",
                    id.0
                )));
            }
        }
    }
    Ok(())
}

/// `a, b, out, n` for error messages.
pub(crate) fn parameter_names(kernel: &KernelInfo) -> String {
    kernel
        .params
        .iter()
        .map(|param| match param {
            ParamLayout::Buffer { name, .. } | ParamLayout::Scalar { name, .. } => name.as_str(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `steps` contain a loop (whose count is read on the host, so the plan cannot be
/// captured into one CUDA graph).
pub fn has_loop(steps: &[Step]) -> bool {
    steps.iter().any(|step| match step {
        Step::Loop { .. } => true,
        Step::BySize { small, large, .. } => has_loop(small) || has_loop(large),
        Step::Launch { .. } | Step::Copy { .. } => false,
    })
}
