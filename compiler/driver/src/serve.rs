//! `kiln serve` on the GPU: [`GpuRunnerFactory`] compiles the model's KV-cached `step` entry
//! for the GPU, puts the weights on the device, sizes the KV cache from the device memory
//! left (`--gpu-memory-utilization` of it) and hands the server a
//! [`PagedRunner`](kiln_server::PagedRunner) over the CUDA plans: the same runner the CPU
//! path uses, so each scheduled ragged batch runs as one step with the paged caches kept on
//! the device. Batch invariance holds as on the CPU unless `--no-batch-invariance`: the
//! plans then let steps of few tokens pick the decode-sized GEMM kernels, whose sums run in
//! another order than the kernels of larger steps. An encoder's embeddings (`/v1/embeddings`,
//! the texts of `/v1/consensus`) run on the GPU too, through
//! [`backend::embed_maker`](crate::backend::embed_maker). [`factory`] picks the GPU when
//! [`backend`](crate::backend) finds one, else the CPU runner (saying so once).

use crate::backend::{self, BackendChoice, GpuParts};
use crate::pipeline::{self, CompileOptions};
use kiln_runtime::{CudaPlans, Executor, PagedModel, STEP_ENTRY};
use kiln_server::{
    CacheLayout, CpuRunnerFactory, InterpreterRunner, KvCacheBudget, LoadedModel, ModelRunner,
    PagedRunner, RunnerFactory, ServeConfig, ServerError,
};
use std::sync::Arc;

/// The most CUDA graphs the step keeps (one per distinct token and sequence count of a
/// step, captured on first use; steps of other counts run uncaptured).
pub const MAX_GRAPHS: usize = 512;

/// The runner factory for `choice` and whether it runs on the GPU. With
/// [`BackendChoice::Auto`] and no usable GPU, one line on stderr says why and that the CPU
/// runs the model instead.
pub fn factory(
    choice: BackendChoice,
    threads: usize,
) -> Result<(Box<dyn RunnerFactory>, bool), ServerError> {
    let gpu = match choice {
        BackendChoice::Cpu => None,
        BackendChoice::Interpreter => {
            return Ok((Box::new(InterpreterFactory { threads }), false));
        }
        BackendChoice::Gpu => Some(
            backend::gpu_parts()
                .map_err(|why| ServerError::Engine(format!("no usable GPU: {why}")))?,
        ),
        BackendChoice::Auto => match backend::gpu_parts() {
            Ok(parts) => Some(parts),
            Err(why) => {
                eprintln!("kiln: no GPU ({why}): serving on the CPU backend");
                None
            }
        },
    };
    Ok(match gpu {
        Some(parts) => (Box::new(GpuRunnerFactory::new(parts)), true),
        None => (Box::new(CpuRunnerFactory::new(threads)), false),
    })
}

/// The reference interpreter for every decoder (`--backend interpreter`): exact and slow.
struct InterpreterFactory {
    threads: usize,
}

impl RunnerFactory for InterpreterFactory {
    fn kv_cache_budget(
        &mut self,
        model: &LoadedModel,
        config: &ServeConfig,
    ) -> Result<KvCacheBudget, ServerError> {
        Ok(kiln_server::cpu_kv_cache_budget(model, config))
    }

    fn make(
        self: Box<Self>,
        model: &LoadedModel,
        _cache: &CacheLayout,
    ) -> Result<Box<dyn ModelRunner>, ServerError> {
        Ok(Box::new(InterpreterRunner::new(
            Arc::clone(&model.module),
            Arc::clone(&model.weights),
            model.entry,
            self.threads,
        )))
    }
}

/// The GPU runner of `kiln serve` (see the module docs).
pub struct GpuRunnerFactory {
    gpu: Option<GpuParts>,
    plans: Option<CudaPlans>,
    /// A fixed KV-cache budget instead of a fraction of the free memory (tests).
    kv_cache_bytes: Option<u64>,
}

impl GpuRunnerFactory {
    /// A factory for the GPU `parts` describes.
    pub fn new(parts: GpuParts) -> GpuRunnerFactory {
        GpuRunnerFactory {
            gpu: Some(parts),
            plans: None,
            kv_cache_bytes: None,
        }
    }

    /// Gives the KV cache `bytes` of device memory rather than `--gpu-memory-utilization` of
    /// what is free (a cache small enough to force preemptions, in tests).
    pub fn with_kv_cache_bytes(mut self, bytes: u64) -> GpuRunnerFactory {
        self.kv_cache_bytes = Some(bytes);
        self
    }

    /// A factory for GPU 0; an error says why there is none.
    pub fn open() -> Result<GpuRunnerFactory, String> {
        backend::gpu_parts().map(GpuRunnerFactory::new)
    }
}

/// The model's KV-cached `step` entry as a lowered program: what the GPU runner compiles.
fn step_program(model: &LoadedModel) -> Result<kiln_lower::Lowered, ServerError> {
    let step = model.step_module.as_ref().ok_or_else(|| {
        ServerError::Engine(format!(
            "{} has no KV-cached `{STEP_ENTRY}` entry, which the GPU runner runs; serve it \
             with --backend cpu",
            model.program_path
        ))
    })?;
    Ok(kiln_lower::Lowered {
        module: (**step).clone(),
        config: Default::default(),
        params: model.params.clone(),
    })
}

/// The package of the model's `step` entry compiled with `options` (assembled when a
/// toolchain is given).
pub fn compile_step(
    model: &LoadedModel,
    options: &CompileOptions,
    toolchain: Option<&kiln_ptx::Toolchain>,
) -> Result<pipeline::Package, ServerError> {
    pipeline::compile(model.program_path, step_program(model)?, options, toolchain)
        .map_err(|e| engine_error("compiling the model for the GPU", e))
}

fn engine_error(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Engine(format!("{what}: {e}"))
}

impl RunnerFactory for GpuRunnerFactory {
    fn consensus_solver(&mut self) -> kiln_runtime::consensus::ConsensusSolver {
        crate::backend::consensus_solver(crate::backend::BackendChoice::Gpu).unwrap_or_else(|e| {
            tracing::warn!("consensus requests run on the CPU backend: {e}");
            kiln_runtime::consensus::ConsensusSolver::cpu()
        })
    }

    fn embedding_maker(&mut self) -> Box<kiln_runtime::embed::EmbedExecutorMaker> {
        crate::backend::embed_maker(crate::backend::BackendChoice::Gpu).unwrap_or_else(|e| {
            tracing::warn!("embeddings run on the CPU backend: {e}");
            kiln_runtime::EmbedBackend::Cpu.maker()
        })
    }

    fn kv_cache_budget(
        &mut self,
        model: &LoadedModel,
        config: &ServeConfig,
    ) -> Result<KvCacheBudget, ServerError> {
        let (device, target, toolchain) = self
            .gpu
            .take()
            .ok_or_else(|| ServerError::Engine("the GPU runner was already made".into()))?;
        let symbol_bound = kiln_gpu_kernels::DEFAULT_SYMBOL_BOUND;
        tracing::info!(
            "compiling `{STEP_ENTRY}` of {} for {}",
            model.program_path,
            target.sm_name()
        );
        let mut plans = backend::gpu_plans(
            model.program_path,
            step_program(model)?,
            Arc::clone(&model.weights),
            (device.clone(), target, toolchain),
        )
        .map_err(|e| engine_error("compiling the model for the GPU", e))?;
        plans.set_batch_invariant(config.batch_invariant);
        plans.set_max_graphs(Some(MAX_GRAPHS));
        plans
            .load(STEP_ENTRY)
            .map_err(|e| engine_error("putting the weights on the GPU", e))?;
        let (free, total) = device
            .memory_info()
            .map_err(|e| engine_error("reading the GPU's memory", e))?;
        // The kernels are compiled for symbolic dims (the cache's block count among them)
        // of at most `symbol_bound`.
        let bytes_per_token = model.kv_shape.bytes_per_token();
        let most = symbol_bound * config.block_size as u64 * bytes_per_token;
        // The largest step (the most tokens and sequences, full block tables) allocates its
        // arena, logits and inputs after the cache: keep that much out of the cache's share.
        let largest = PagedModel::new(
            plans.module(),
            STEP_ENTRY,
            symbol_bound as usize,
            config.block_size,
            config.max_model_len.unwrap_or(model.context_len),
        )
        .map_err(|e| engine_error("sizing the largest step", e))?
        .step_shapes(config.step_tokens(), config.max_num_seqs);
        let step_bytes = plans
            .working_bytes(STEP_ENTRY, &largest)
            .map_err(|e| engine_error("sizing the largest step", e))?
            as u64;
        self.plans = Some(plans);
        let fraction = config.gpu_memory_utilization;
        let wanted = ((free as f64 * fraction) as u64).saturating_sub(step_bytes);
        let bytes = self.kv_cache_bytes.unwrap_or(wanted).min(most);
        Ok(KvCacheBudget {
            bytes,
            device: "cuda".into(),
            hint: format!(
                "With the model on {} ({:.2} GiB in all), {:.2} GiB are free; \
                 --gpu-memory-utilization {fraction} of that, less {:.2} GiB for the largest \
                 step (--max-num-batched-tokens, --max-num-seqs), gives the KV cache {:.2} GiB \
                 ({} bytes a token; at most {symbol_bound} blocks, the largest symbolic dim \
                 the kernels are compiled for); raise --gpu-memory-utilization or lower \
                 --max-model-len",
                device.info().name,
                total as f64 / f64::from(1 << 30),
                free as f64 / f64::from(1 << 30),
                step_bytes as f64 / f64::from(1 << 30),
                bytes as f64 / f64::from(1 << 30),
                bytes_per_token
            ),
        })
    }

    fn make(
        self: Box<Self>,
        _model: &LoadedModel,
        cache: &CacheLayout,
    ) -> Result<Box<dyn ModelRunner>, ServerError> {
        let plans = self.plans.ok_or_else(|| {
            ServerError::Engine("the GPU runner is made after its KV-cache budget".into())
        })?;
        let executor: Box<dyn Executor + Send> = Box::new(plans);
        let runner = PagedRunner::new(
            executor,
            cache.num_blocks,
            cache.block_size,
            cache.max_model_len,
        )
        .map_err(|e| ServerError::Engine(e.to_string()))?;
        Ok(Box::new(runner))
    }
}
