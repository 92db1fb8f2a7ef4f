//! Choosing where a program runs: on the GPU when there is one and ptxas to assemble for
//! it, else on the Cranelift CPU backend (saying so once); `--backend` forces a choice.

use crate::pipeline::{self, CompileOptions};
use kiln_runtime::consensus::ConsensusSolver;
use kiln_runtime::embed::{EmbedExecutorMaker, EMBED_GPU_MAX_GRAPHS};
use kiln_runtime::progress::Progress;
use kiln_runtime::{
    CpuPlans, CudaPlans, EmbedBackend, Executor, Interpreter, RuntimeError, Weights,
};
use std::sync::Arc;

/// Where `kiln run` runs a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The GPU if there is one (and ptxas), else the CPU backend.
    Auto,
    /// The GPU; an error when there is none.
    Gpu,
    /// The compiled kernels on this CPU (Cranelift).
    Cpu,
    /// The graph-IR reference interpreter (exact, slow).
    Interpreter,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::RuntimeError),
    #[error("loading the package on the GPU: {0}")]
    Cuda(#[from] kiln_cuda::CudaError),
}

/// An executor for `lowered` on the chosen backend, compiling with `progress` reports. With
/// [`BackendChoice::Auto`] and no usable GPU, one line on stderr says why and that the CPU
/// backend runs instead.
pub fn executor(
    program: &str,
    lowered: kiln_lower::Lowered,
    weights: Arc<Weights>,
    choice: BackendChoice,
    progress: &mut dyn Progress,
) -> Result<Box<dyn Executor>, BackendError> {
    let gpu = match choice {
        BackendChoice::Interpreter => {
            return Ok(Box::new(Interpreter::new(lowered.module, weights)))
        }
        BackendChoice::Cpu => None,
        BackendChoice::Gpu => Some(gpu_parts().map_err(BackendError::NoGpu)?),
        BackendChoice::Auto => match gpu_parts() {
            Ok(parts) => Some(parts),
            Err(why) => {
                eprintln!("kiln: no GPU ({why}): running on the CPU backend");
                None
            }
        },
    };
    match gpu {
        Some(parts) => gpu_executor(program, lowered, weights, parts),
        None => Ok(Box::new(CpuPlans::compile(
            lowered.module,
            weights,
            progress,
        )?)),
    }
}

/// `choice` with [`BackendChoice::Auto`] made [`BackendChoice::Gpu`] when there is a usable
/// GPU, else [`BackendChoice::Cpu`] (one line on stderr says why): for commands that run
/// several programs and should say so once.
pub fn resolve(choice: BackendChoice) -> BackendChoice {
    match choice {
        BackendChoice::Auto => match gpu_parts() {
            Ok(_) => BackendChoice::Gpu,
            Err(why) => {
                eprintln!("kiln: no GPU ({why}): running on the CPU backend");
                BackendChoice::Cpu
            }
        },
        chosen => chosen,
    }
}

/// Whether `choice` runs `what` on the GPU: a forced GPU must be usable; with
/// [`BackendChoice::Auto`] and no usable GPU, one line on stderr says that `what` (e.g.
/// "consensus runs") on the CPU backend instead.
fn on_gpu(choice: BackendChoice, what: &str) -> Result<bool, BackendError> {
    match choice {
        BackendChoice::Interpreter | BackendChoice::Cpu => Ok(false),
        BackendChoice::Gpu => {
            gpu_parts().map_err(BackendError::NoGpu)?;
            Ok(true)
        }
        BackendChoice::Auto => match gpu_parts() {
            Ok(_) => Ok(true),
            Err(why) => {
                eprintln!("kiln: no GPU ({why}): {what} on the CPU backend");
                Ok(false)
            }
        },
    }
}

/// A usable GPU: the device, its kiln target and the toolchain to assemble for it.
pub type GpuParts = (kiln_cuda::CudaDevice, kiln_ptx::Target, kiln_ptx::Toolchain);

/// GPU 0 with its target and ptxas; an error says why it cannot be used.
pub fn gpu_parts() -> Result<GpuParts, String> {
    let device = kiln_cuda::CudaDevice::new(0).map_err(|e| e.to_string())?;
    let (major, minor) = device.info().compute_capability;
    let target = kiln_ptx::Target::for_compute_capability(major, minor)
        .ok_or_else(|| format!("kiln has no target for compute capability {major}.{minor}"))?;
    let toolchain = kiln_ptx::Toolchain::discover().map_err(|e| e.to_string())?;
    Ok((device, target, toolchain))
}

/// Where consensus programs run for `choice` (`kiln consensus`, `POST /v1/consensus`). With
/// [`BackendChoice::Auto`] and no usable GPU, one line on stderr says so and the CPU
/// backend runs them.
pub fn consensus_solver(choice: BackendChoice) -> Result<ConsensusSolver, BackendError> {
    if choice == BackendChoice::Interpreter {
        return Ok(ConsensusSolver::interpreter());
    }
    if !on_gpu(choice, "consensus runs")? {
        return Ok(ConsensusSolver::cpu());
    }
    Ok(ConsensusSolver::new(Box::new(
        |lowered: kiln_lower::Lowered| {
            let parts =
                gpu_parts().map_err(|why| RuntimeError::Input(format!("no usable GPU: {why}")))?;
            gpu_plans("consensus", lowered, Arc::new(Weights::default()), parts)
                .map(|plans| Box::new(plans) as Box<dyn Executor + Send>)
                .map_err(|e| RuntimeError::Input(e.to_string()))
        },
    )))
}

/// Where an encoder's `embed` entry runs for `choice` (`kiln embed`, the texts of `kiln
/// consensus`, and `kiln serve`'s embeddings on the GPU): the maker [`EmbeddingModel`]
/// (`kiln_runtime::EmbeddingModel::load_on`) builds its executor with. On the GPU the entry is
/// compiled by [`gpu_plans`] (the path `kiln run` takes), batch invariant (a text's vector
/// does not depend on the batch it ran in) and keeping at most
/// [`EMBED_GPU_MAX_GRAPHS`] CUDA graphs, one per batch shape. With [`BackendChoice::Auto`]
/// and no usable GPU, one line on stderr says so and the CPU backend runs it.
///
/// [`EmbeddingModel`]: kiln_runtime::EmbeddingModel
pub fn embed_maker(choice: BackendChoice) -> Result<Box<EmbedExecutorMaker>, BackendError> {
    if choice == BackendChoice::Interpreter {
        return Ok(EmbedBackend::Interpreter.maker());
    }
    if !on_gpu(choice, "embeddings run")? {
        return Ok(EmbedBackend::Cpu.maker());
    }
    Ok(Box::new(
        |lowered: kiln_lower::Lowered, weights: Arc<Weights>, _: &mut dyn Progress| {
            let parts =
                gpu_parts().map_err(|why| RuntimeError::Input(format!("no usable GPU: {why}")))?;
            let entries: Vec<String> = lowered
                .module
                .functions
                .iter()
                .map(|f| f.name.clone())
                .collect();
            let mut plans = gpu_plans("embed", lowered, weights, parts)
                .map_err(|e| RuntimeError::Input(format!("compiling for the GPU: {e}")))?;
            plans.set_batch_invariant(true);
            plans.set_max_graphs(Some(EMBED_GPU_MAX_GRAPHS));
            // The weights go to the device now, so that a problem shows at load time.
            for entry in &entries {
                plans.load(entry)?;
            }
            Ok(Box::new(plans) as Box<dyn Executor + Send>)
        },
    ))
}

fn gpu_executor(
    program: &str,
    lowered: kiln_lower::Lowered,
    weights: Arc<Weights>,
    parts: GpuParts,
) -> Result<Box<dyn Executor>, BackendError> {
    Ok(Box::new(gpu_plans(program, lowered, weights, parts)?))
}

/// `lowered` compiled for the GPU of `parts` and loaded on it.
pub fn gpu_plans(
    program: &str,
    lowered: kiln_lower::Lowered,
    weights: Arc<Weights>,
    (device, target, toolchain): GpuParts,
) -> Result<CudaPlans, BackendError> {
    let module = lowered.module.clone();
    let options = CompileOptions {
        targets: vec![target],
        ..CompileOptions::default()
    };
    let package = pipeline::compile(program, lowered, &options, Some(&toolchain))?;
    let fatbin = package
        .fatbin
        .as_ref()
        .ok_or_else(|| BackendError::NoGpu("the package was not assembled".into()))?;
    let cuda =
        kiln_cuda::CudaPackage::from_image(&device, package.manifest.clone(), fatbin, program)?;
    Ok(CudaPlans::new(module, Arc::new(cuda), weights))
}
