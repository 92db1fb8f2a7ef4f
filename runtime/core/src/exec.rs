//! Where a lowered program runs, behind one trait: the graph interpreter (the reference),
//! the compiled kernels on this CPU through Cranelift, or on an NVIDIA GPU through CUDA.

use crate::cpu::CpuProgram;
use crate::progress::Progress;
use crate::{RuntimeError, Weights};
use kiln_cuda::{CudaPackage, CudaProgram};
use kiln_ir::{Module, Tensor};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A lowered program with its weights, ready to run its entry functions.
pub trait Executor {
    /// The backend, for messages: "the reference interpreter (CPU)", ...
    fn describe(&self) -> String;
    /// The program as lowered (entry signatures).
    fn module(&self) -> &Module;
    /// Runs entry `function` on `inputs` (one per parameter, in order).
    fn run(&mut self, function: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError>;
}

fn no_entry(module: &Module, function: &str) -> RuntimeError {
    let names: Vec<&str> = module.functions.iter().map(|f| f.name.as_str()).collect();
    RuntimeError::Input(format!(
        "no entry function `{function}`; the program has: {}",
        names.join(", ")
    ))
}

fn backend_error(function: &str, message: impl ToString) -> RuntimeError {
    RuntimeError::Backend {
        function: function.to_string(),
        message: message.to_string(),
    }
}

/// The graph-IR reference interpreter: exact, slow, always available.
pub struct Interpreter {
    module: Module,
    weights: Arc<Weights>,
}

impl Interpreter {
    pub fn new(module: Module, weights: Arc<Weights>) -> Interpreter {
        Interpreter { module, weights }
    }
}

impl Executor for Interpreter {
    fn describe(&self) -> String {
        crate::Backend::Interpreter.name().to_string()
    }

    fn module(&self) -> &Module {
        &self.module
    }

    fn run(&mut self, function: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        crate::run(
            crate::Backend::Interpreter,
            &self.module,
            function,
            inputs,
            &self.weights,
        )
    }
}

/// The program optimized and fused into kernels, compiled for this CPU with Cranelift
/// ([`CpuProgram`]) and run plan by plan, blocks in parallel.
pub struct CpuPlans {
    module: Module,
    program: CpuProgram,
    weights: Arc<Weights>,
}

impl CpuPlans {
    /// Optimizes, fuses and compiles every entry of `module`, reporting to `progress`.
    pub fn compile(
        module: Module,
        weights: Arc<Weights>,
        progress: &mut dyn Progress,
    ) -> Result<CpuPlans, RuntimeError> {
        let program = CpuProgram::compile(&module, progress)?;
        Ok(CpuPlans {
            module,
            program,
            weights,
        })
    }
}

impl Executor for CpuPlans {
    fn describe(&self) -> String {
        "Cranelift CPU backend".to_string()
    }

    fn module(&self) -> &Module {
        &self.module
    }

    fn run(&mut self, function: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        self.program.run(function, inputs, &self.weights)
    }
}

/// A compiled package loaded on a GPU: one [`CudaProgram`] per entry, its weights uploaded
/// on first use; repeated runs with the same shapes replay a CUDA graph.
pub struct CudaPlans {
    module: Module,
    package: Arc<CudaPackage>,
    programs: BTreeMap<String, CudaProgram>,
    weights: Arc<Weights>,
}

impl CudaPlans {
    /// `package` must be compiled from `module` (the driver's pipeline does both).
    pub fn new(module: Module, package: Arc<CudaPackage>, weights: Arc<Weights>) -> CudaPlans {
        CudaPlans {
            module,
            package,
            programs: BTreeMap::new(),
            weights,
        }
    }
}

impl Executor for CudaPlans {
    fn describe(&self) -> String {
        let info = self.package.device().info();
        let (major, minor) = info.compute_capability;
        format!("GPU ({}, sm_{major}{minor})", info.name)
    }

    fn module(&self) -> &Module {
        &self.module
    }

    fn run(&mut self, function: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        if self.module.function(function).is_none() {
            return Err(no_entry(&self.module, function));
        }
        if !self.programs.contains_key(function) {
            let mut program = CudaProgram::new(self.package.clone(), function)
                .map_err(|e| backend_error(function, e))?;
            let weights = &self.weights;
            program
                .bind_weights(&|name| weights.get(name))
                .map_err(|e| backend_error(function, e))?;
            self.programs.insert(function.to_string(), program);
        }
        let program = self.programs.get_mut(function).expect("inserted above");
        program
            .run_graph(inputs)
            .map_err(|e| backend_error(function, e))
    }
}
