//! Entry functions run as compiled CPU plans: the lowered module is optimized (kiln-opt),
//! fused into kernels and execution plans (kiln-gpu-kernels) — the same kernels the PTX
//! backend emits for a GPU — and the kernels are JIT-compiled for this CPU by Cranelift
//! (kiln-cpu), whose plan executor then runs them over host memory.

use crate::progress::{Progress, ProgressUnit};
use crate::{RuntimeError, Weights};
use kiln_cpu::{CpuExecutor, CpuKernel, KeptInput};
use kiln_ir::{Module, Tensor};
use kiln_kir::Plan;
use std::collections::BTreeMap;

/// A lowered module compiled for this CPU: one plan per entry function, sharing its kernels.
#[derive(Debug)]
pub struct CpuProgram {
    plans: Vec<Plan>,
    executor: CpuExecutor,
}

/// The largest value a symbolic dim of a program compiled by [`CpuProgram::compile`] may
/// take (the plans refuse larger ones: their index arithmetic may assume it).
pub const SYMBOL_BOUND: u64 = kiln_gpu_kernels::DEFAULT_SYMBOL_BOUND;

impl CpuProgram {
    /// Optimizes, fuses and compiles every function of `module`, reporting the kernels
    /// compiled so far to `progress`.
    pub fn compile(
        module: &Module,
        progress: &mut dyn Progress,
    ) -> Result<CpuProgram, RuntimeError> {
        progress.start("optimizing and fusing", 0, ProgressUnit::Items);
        let mut optimized = module.clone();
        let fused = kiln_opt::optimize(&mut optimized)
            .map_err(|e| RuntimeError::Compile(format!("optimizing: {e}")))
            .and_then(|_| {
                kiln_gpu_kernels::compile_module(&optimized, &kiln_gpu_kernels::Options::default())
                    .map_err(|e| RuntimeError::Compile(format!("fusing: {e}")))
            });
        progress.finish();
        let compiled = fused?;
        let total = compiled.kernels.len();
        progress.start(
            &format!("compiling {total} kernels (Cranelift)"),
            total as u64,
            ProgressUnit::Items,
        );
        let mut kernels = Vec::with_capacity(total);
        for (done, kernel) in compiled.kernels.iter().enumerate() {
            match CpuKernel::compile(kernel) {
                Ok(native) => kernels.push(native),
                Err(e) => {
                    progress.finish();
                    return Err(RuntimeError::Compile(format!(
                        "compiling kernel `{}` for the CPU: {e}",
                        kernel.name
                    )));
                }
            }
            progress.advance(done as u64 + 1);
        }
        progress.finish();
        Ok(CpuProgram {
            plans: compiled.plans,
            executor: CpuExecutor::from_compiled(kernels),
        })
    }

    /// Batch invariance ([`CpuExecutor::set_batch_invariant`]): a row's result never depends
    /// on how many rows the run has.
    pub fn set_batch_invariant(&mut self, batch_invariant: bool) {
        self.executor.set_batch_invariant(batch_invariant);
    }

    /// How many distinct kernels the plans launch.
    pub fn kernel_count(&self) -> usize {
        self.executor.kernels().len()
    }

    /// Runs the plan of entry `function` on `inputs` with `weights`.
    pub fn run(
        &self,
        function: &str,
        inputs: &[Tensor],
        weights: &Weights,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let plan = self.plan(function)?;
        self.executor
            .run(plan, inputs, &|name| weights.get(name))
            .map_err(|e| RuntimeError::CpuExecution {
                function: function.to_string(),
                message: e.to_string(),
            })
    }

    /// Runs the plan of entry `function` keeping the inputs it updates in place in `kept`
    /// (see [`CpuExecutor::run_kept`]).
    pub fn run_kept(
        &self,
        function: &str,
        inputs: &[Option<&Tensor>],
        kept: &mut BTreeMap<usize, KeptInput>,
        weights: &Weights,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let plan = self.plan(function)?;
        self.executor
            .run_kept(plan, inputs, kept, &|name| weights.get(name))
            .map_err(|e| RuntimeError::CpuExecution {
                function: function.to_string(),
                message: e.to_string(),
            })
    }

    fn plan(&self, function: &str) -> Result<&Plan, RuntimeError> {
        self.plans
            .iter()
            .find(|p| p.function == function)
            .ok_or_else(|| {
                let names: Vec<&str> = self.plans.iter().map(|p| p.function.as_str()).collect();
                RuntimeError::Input(format!(
                    "no entry function `{function}`; the program has: {}",
                    names.join(", ")
                ))
            })
    }
}
