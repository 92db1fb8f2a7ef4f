//! kiln's OpenAI-compatible HTTP server: `kiln serve`.
//!
//! # Architecture
//! - [`model`] loads a Hugging Face model directory: config.json's `model_type` picks the kiln
//!   program, which is lowered and bound to the checkpoint; [`codec`] turns text into token
//!   ids (tokenizer.json, or a byte-level fallback for checkpoints without one).
//! - [`engine`] is one dedicated thread owning the continuous-batching scheduler (and through
//!   it the paged KV block manager) and a [`runner::ModelRunner`]; it samples, detokenizes,
//!   applies stop conditions and streams events to each request's channel.
//! - [`http`] (axum) validates requests with [`protocol`] before they reach the engine,
//!   so bad input is always a 400 and a full queue a 429, at once; answers are JSON or
//!   server-sent events. [`metrics`] renders Prometheus text with vLLM's names under `kiln:`.
//!
//! # Startup
//! [`Server::start_with_factory`] loads the model, asks the [`RunnerFactory`] for the KV-cache
//! budget (the CPU's is `--kv-cache-memory`; the `kiln` binary's GPU factory puts the model
//! on the device and gives `--gpu-memory-utilization` of the memory left), sizes the cache,
//! refuses to start when one `max_model_len` sequence does not fit (naming both numbers and
//! the budget), makes the runner for that cache, starts the engine and binds the listener.
//! [`Server::start`] does so on the CPU ([`CpuRunnerFactory`]). [`serve`] adds logging and graceful shutdown on SIGTERM / ctrl-c:
//! stop accepting, let in-flight requests finish (up to the shutdown timeout, then cancel
//! them), stop the engine, return.
//!
//! # What is deliberately absent
//! Tool calls. (`/v1/consensus` is here: texts or embeddings through the consensus game of the
//! stdlib, on the runner factory's `ConsensusSolver`; docs/consensus.md.)
//! Compiling for the GPU: this crate runs what it is given; the `kiln` binary (kiln-cli, which
//! holds the compiler pipeline) makes the GPU runner. The reference-interpreter runner keeps
//! no KV: it reruns each sampled sequence every step, exact and batch-invariant but slow.

pub mod cli;
pub mod codec;
pub mod config;
pub mod engine;
pub mod error;
mod http;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod runner;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_kvcache::{check_max_model_len_fits, num_blocks_for_memory, BlockSize, KvCacheConfig};
use kiln_runtime::consensus::ConsensusSolver;
use kiln_runtime::embed::EmbedExecutorMaker;
use kiln_scheduler::{SchedulerConfig, SchedulingPolicy};
use tokio::sync::{oneshot, Semaphore};

pub use cli::{run_cli, run_cli_on, DtypeArg, ServeArgs};
pub use config::{resolve_model_dir, ServeConfig, DEFAULT_MODEL_DIR};
pub use engine::{EngineHandle, GenerationRequest, RequestEvent, SampleEvent};
pub use error::{ApiError, ServerError};
pub use kiln_runtime::models::ModelKind;
pub use metrics::Metrics;
pub use model::LoadedModel;
pub use runner::{
    Embedder, InterpreterRunner, ModelRunner, PagedRunner, RunnerError, SequenceInput,
};

use crate::engine::{start_engine, EngineConfig};
use crate::http::{router, AppState};
use crate::metrics::CacheConfigInfo;

/// What a started server serves, for logs and tests.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// The name clients pass as `model`.
    pub model_name: String,
    /// The model directory.
    pub model_dir: PathBuf,
    /// config.json's `model_type`.
    pub model_type: String,
    /// Decoder (generation) or encoder (embeddings).
    pub kind: ModelKind,
    /// The longest sequence served.
    pub max_model_len: usize,
    /// KV-cache blocks (0 for encoders, which keep no cache).
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Where the model runs.
    pub runner: String,
    /// How text becomes tokens.
    pub codec: String,
}

/// The KV cache the engine manages, for a runner that holds it.
#[derive(Clone, Copy, Debug)]
pub struct CacheLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_model_len: usize,
}

/// A running server: the HTTP listener and, for decoders, the engine thread.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    info: ServerInfo,
    engine: Option<EngineHandle>,
    engine_thread: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    stop_accepting: Option<oneshot::Sender<()>>,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    shutdown_timeout: Duration,
}

/// Where the KV cache lives and how many bytes it may take.
#[derive(Clone, Debug)]
pub struct KvCacheBudget {
    /// Bytes the cache (keys and values together) may take.
    pub bytes: u64,
    /// Where the cache lives, for the `kiln:cache_config_info` metric ("cpu", "cuda").
    pub device: String,
    /// How `bytes` was computed and which flag changes it, for the refusal to start when
    /// one `max_model_len` sequence does not fit.
    pub hint: String,
}

/// The host-memory budget of `--kv-cache-memory`, for runners that keep the cache on the CPU.
pub fn cpu_kv_cache_budget(model: &LoadedModel, config: &ServeConfig) -> KvCacheBudget {
    let shape = &model.kv_shape;
    // The compiled step's cache has a symbolic block count, at most the plans' bound.
    let most = kiln_runtime::cpu::SYMBOL_BOUND
        .saturating_mul(config.block_size as u64)
        .saturating_mul(shape.bytes_per_token());
    KvCacheBudget {
        bytes: config.cpu_kv_cache_bytes.min(most),
        device: "cpu".into(),
        hint: format!(
            "The CPU KV-cache budget is {} bytes ({} bytes a token for {} layers x {} KV heads \
             x {} head dim x {} bytes; at most {} blocks, the largest symbolic dim the kernels \
             are compiled for); raise --kv-cache-memory or lower --max-model-len",
            config.cpu_kv_cache_bytes,
            shape.bytes_per_token(),
            shape.num_layers,
            shape.num_kv_heads,
            shape.head_dim,
            shape.dtype_bytes,
            kiln_runtime::cpu::SYMBOL_BOUND
        ),
    }
}

/// The runner `kiln serve` uses on the CPU: a program with a KV-cached `step` entry runs on
/// the compiled CPU plans through [`PagedRunner`], others on the reference interpreter
/// (`threads` threads).
pub fn cpu_runner(
    model: &LoadedModel,
    cache: &CacheLayout,
    threads: usize,
    batch_invariant: bool,
) -> Result<Box<dyn ModelRunner>, ServerError> {
    let Some(step) = &model.step_module else {
        return Ok(Box::new(InterpreterRunner::new(
            Arc::clone(&model.module),
            Arc::clone(&model.weights),
            model.entry,
            threads,
        )));
    };
    let mut plans = kiln_runtime::CpuPlans::compile(
        (**step).clone(),
        Arc::clone(&model.weights),
        &mut kiln_runtime::NoProgress,
    )
    .map_err(|e| ServerError::Engine(format!("compiling the model for the CPU: {e}")))?;
    plans.set_batch_invariant(batch_invariant);
    let runner = PagedRunner::new(
        Box::new(plans),
        cache.num_blocks,
        cache.block_size,
        cache.max_model_len,
    )
    .map_err(|e| ServerError::Engine(e.to_string()))?;
    Ok(Box::new(runner))
}

/// Makes a decoder's runner in two stages: the KV-cache budget first (a GPU runner puts the
/// model on the device, then measures the memory left), then the runner for the cache the
/// engine sized from that budget.
pub trait RunnerFactory {
    /// The bytes the KV cache may take (called once, after the model is loaded).
    fn kv_cache_budget(
        &mut self,
        model: &LoadedModel,
        config: &ServeConfig,
    ) -> Result<KvCacheBudget, ServerError>;

    /// The runner for a cache of `cache`'s shape.
    fn make(
        self: Box<Self>,
        model: &LoadedModel,
        cache: &CacheLayout,
    ) -> Result<Box<dyn ModelRunner>, ServerError>;

    /// Where `POST /v1/consensus` runs its programs (called once, before [`Self::make`]):
    /// by default the compiled kernels on the CPU.
    fn consensus_solver(&mut self) -> ConsensusSolver {
        ConsensusSolver::cpu()
    }

    /// Where an encoder's `embed` entry runs for `/v1/embeddings` and the texts of
    /// `/v1/consensus` (called once, before the model is loaded; the maker runs only for an
    /// encoder): by default the compiled kernels on the CPU.
    fn embedding_maker(&mut self) -> Box<EmbedExecutorMaker> {
        kiln_runtime::EmbedBackend::Cpu.maker()
    }
}

/// The CPU runner of `kiln serve` ([`cpu_runner`]) with the host-memory budget.
#[derive(Debug, Clone, Copy)]
pub struct CpuRunnerFactory {
    threads: usize,
    batch_invariant: bool,
}

impl CpuRunnerFactory {
    /// The interpreter (for programs without a `step` entry) uses `threads` threads.
    pub fn new(threads: usize) -> CpuRunnerFactory {
        CpuRunnerFactory {
            threads,
            batch_invariant: true,
        }
    }
}

impl RunnerFactory for CpuRunnerFactory {
    fn kv_cache_budget(
        &mut self,
        model: &LoadedModel,
        config: &ServeConfig,
    ) -> Result<KvCacheBudget, ServerError> {
        self.batch_invariant = config.batch_invariant;
        Ok(cpu_kv_cache_budget(model, config))
    }

    fn make(
        self: Box<Self>,
        model: &LoadedModel,
        cache: &CacheLayout,
    ) -> Result<Box<dyn ModelRunner>, ServerError> {
        cpu_runner(model, cache, self.threads, self.batch_invariant)
    }
}

/// A [`RunnerFactory`] of a closure, with the host-memory budget.
struct HostRunner<F>(F);

impl<F> RunnerFactory for HostRunner<F>
where
    F: FnOnce(&LoadedModel, &CacheLayout) -> Result<Box<dyn ModelRunner>, ServerError>,
{
    fn kv_cache_budget(
        &mut self,
        model: &LoadedModel,
        config: &ServeConfig,
    ) -> Result<KvCacheBudget, ServerError> {
        Ok(cpu_kv_cache_budget(model, config))
    }

    fn make(
        self: Box<Self>,
        model: &LoadedModel,
        cache: &CacheLayout,
    ) -> Result<Box<dyn ModelRunner>, ServerError> {
        (self.0)(model, cache)
    }
}

impl Server {
    /// Loads the model and serves it on the CPU ([`cpu_runner`]).
    pub async fn start(config: ServeConfig) -> Result<Server, ServerError> {
        let factory = CpuRunnerFactory::new(config.interpreter_threads);
        Server::start_with_factory(config, Box::new(factory)).await
    }

    /// Loads the model and serves it with the runner `make_runner` builds (for decoders; an
    /// encoder is served without an engine).
    pub async fn start_with_runner<F>(
        config: ServeConfig,
        make_runner: F,
    ) -> Result<Server, ServerError>
    where
        F: FnOnce(&LoadedModel) -> Box<dyn ModelRunner>,
    {
        Server::start_with_cache_runner(config, |model, _| Ok(make_runner(model))).await
    }

    /// Like [`Server::start_with_runner`], for runners that hold the KV cache the engine
    /// manages (its shape is given, sized from `--kv-cache-memory`) and whose making can fail.
    pub async fn start_with_cache_runner<F>(
        config: ServeConfig,
        make_runner: F,
    ) -> Result<Server, ServerError>
    where
        F: FnOnce(&LoadedModel, &CacheLayout) -> Result<Box<dyn ModelRunner>, ServerError>,
    {
        Server::start_with_factory(config, Box::new(HostRunner(make_runner))).await
    }

    /// Loads the model and serves it with the runner `factory` makes, the KV cache sized
    /// from the budget it gives (the GPU runner of `kiln serve` comes this way).
    pub async fn start_with_factory(
        config: ServeConfig,
        mut factory: Box<dyn RunnerFactory + '_>,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        let api_keys = config.load_api_keys()?;
        let dir = resolve_model_dir(config.model.as_deref())?;
        let (dtype, random) = (config.param_dtype, config.random_weights);
        let embed_on = factory.embedding_maker();
        let model = tokio::task::spawn_blocking(move || {
            LoadedModel::load_with(&dir, dtype, random, embed_on.as_ref())
        })
        .await
        .map_err(|e| ServerError::Engine(format!("loading the model: {e}")))??;
        let model_name = config
            .served_model_name
            .clone()
            .unwrap_or_else(|| model.default_name());
        let max_model_len = config.max_model_len.unwrap_or(model.context_len);
        if max_model_len > model.context_len {
            return Err(ServerError::InvalidConfig(format!(
                "--max-model-len {max_model_len} is longer than the model's context of {} \
                 tokens (config.json)",
                model.context_len
            )));
        }
        let block_size = BlockSize::try_from(config.block_size)?;
        let consensus = Arc::new(std::sync::Mutex::new(factory.consensus_solver()));
        let (engine, engine_thread, num_blocks, runner_description, metrics) = match model.kind {
            ModelKind::Decoder => {
                let budget = factory.kv_cache_budget(&model, &config)?;
                let bytes_per_token = model.kv_shape.bytes_per_token();
                let num_blocks =
                    num_blocks_for_memory(budget.bytes, 1.0, bytes_per_token, block_size)?
                        .min(u32::MAX as usize);
                check_max_model_len_fits(max_model_len, num_blocks, block_size).map_err(
                    |check| ServerError::KvCacheTooSmall {
                        check,
                        hint: budget.hint.clone(),
                    },
                )?;
                let metrics = Arc::new(Metrics::new(
                    &model_name,
                    CacheConfigInfo {
                        block_size: block_size.tokens(),
                        num_blocks,
                        enable_prefix_caching: config.enable_prefix_caching,
                        gpu_memory_utilization: config.gpu_memory_utilization,
                        device: budget.device.clone(),
                    },
                ));
                let engine_config = EngineConfig {
                    scheduler: SchedulerConfig {
                        max_num_batched_tokens: config.step_tokens(),
                        max_num_seqs: config.max_num_seqs,
                        max_waiting_requests: config.max_queue,
                        policy: config.scheduling_policy,
                    },
                    cache: KvCacheConfig::new(num_blocks)
                        .with_block_size(block_size)
                        .with_prefix_caching(config.enable_prefix_caching),
                    max_queue: config.max_queue,
                };
                let runner = factory.make(
                    &model,
                    &CacheLayout {
                        num_blocks,
                        block_size: block_size.tokens(),
                        max_model_len,
                    },
                )?;
                let description = runner.describe();
                let (engine, thread) = start_engine(
                    engine_config,
                    runner,
                    model.codec.clone(),
                    model.eos_token_ids.clone(),
                    Arc::clone(&metrics),
                )?;
                (Some(engine), Some(thread), num_blocks, description, metrics)
            }
            ModelKind::Encoder => {
                let metrics = Arc::new(Metrics::new(&model_name, CacheConfigInfo::default()));
                let description = model
                    .embedding
                    .clone()
                    .map(|embedding| Embedder::new(embedding).describe())
                    .unwrap_or_default();
                (None, None, 0, description, metrics)
            }
        };
        let embedder = model.embedding.clone().map(Embedder::new);
        let info = ServerInfo {
            model_name: model_name.clone(),
            model_dir: model.dir.clone(),
            model_type: model.model_type.clone(),
            kind: model.kind,
            max_model_len,
            num_blocks,
            block_size: block_size.tokens(),
            runner: runner_description,
            codec: model.codec.describe(),
        };
        let state = Arc::new(AppState {
            model_name,
            model_root: model.dir.display().to_string(),
            model_type: model.model_type.clone(),
            kind: model.kind,
            codec: model.codec.clone(),
            generation_config: model.generation_config.clone(),
            max_model_len,
            vocab_size: model.vocab_size,
            max_num_seqs: config.max_num_seqs,
            priority_scheduling: config.scheduling_policy == SchedulingPolicy::Priority,
            engine: engine.clone(),
            embedder,
            embedding_slots: Semaphore::new(config.interpreter_threads),
            consensus,
            metrics: Arc::clone(&metrics),
            api_keys,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            next_response_id: AtomicU64::new(0),
        });
        let host = if config.host.contains(':') && !config.host.starts_with('[') {
            format!("[{}]", config.host)
        } else {
            config.host.clone()
        };
        let addr = format!("{host}:{}", config.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let (stop_accepting, stopped) = oneshot::channel::<()>();
        let app = router(state);
        let http_task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Server {
            local_addr,
            info,
            engine,
            engine_thread,
            metrics,
            stop_accepting: Some(stop_accepting),
            http_task,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What is served.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// The engine (decoders only).
    pub fn engine(&self) -> Option<&EngineHandle> {
        self.engine.as_ref()
    }

    /// The metrics the server exposes.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Graceful shutdown: stop accepting connections, let in-flight requests finish for up to
    /// the shutdown timeout, then cancel what is left; stop the engine thread.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop_accepting.take() {
            let _ = stop.send(());
        }
        let served = match tokio::time::timeout(self.shutdown_timeout, &mut self.http_task).await {
            Ok(joined) => joined,
            Err(_) => {
                tracing::warn!(
                    "in-flight requests still running after {:?}: cancelling them",
                    self.shutdown_timeout
                );
                if let Some(engine) = &self.engine {
                    engine.cancel_all();
                }
                (&mut self.http_task).await
            }
        };
        if let Some(engine) = &self.engine {
            engine.shutdown();
        }
        if let Some(thread) = self.engine_thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|e| ServerError::Engine(e.to_string()))?;
            if joined.is_err() {
                return Err(ServerError::Engine("the engine thread panicked".into()));
            }
        }
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ServerError::Serve {
                addr: self.local_addr,
                source,
            }),
            Err(join_error) => Err(ServerError::Engine(format!(
                "the HTTP task failed: {join_error}"
            ))),
        }
    }
}

/// `kiln serve` on the CPU: starts the server, logs where it listens, and shuts down
/// gracefully on SIGTERM or ctrl-c.
pub async fn serve(config: ServeConfig) -> Result<(), ServerError> {
    let factory = CpuRunnerFactory::new(config.interpreter_threads);
    serve_with(config, Box::new(factory)).await
}

/// [`serve`] with the runner `factory` makes.
pub async fn serve_with(
    config: ServeConfig,
    factory: Box<dyn RunnerFactory + '_>,
) -> Result<(), ServerError> {
    init_logging();
    let server = Server::start_with_factory(config.clone(), factory).await?;
    let info = server.info();
    tracing::info!(
        "serving `{}` ({} from {}) on http://{}",
        info.model_name,
        info.model_type,
        info.model_dir.display(),
        server.local_addr()
    );
    tracing::info!("model runs on the {}; text: {}", info.runner, info.codec);
    if info.kind == ModelKind::Decoder {
        tracing::info!(
            "max_model_len {}, KV cache {} blocks of {} tokens ({} tokens), max_num_seqs {}, \
             queue bound {}",
            info.max_model_len,
            info.num_blocks,
            info.block_size,
            info.num_blocks * info.block_size,
            config.max_num_seqs,
            config.max_queue
        );
    }
    shutdown_signal().await;
    tracing::info!(
        "shutting down: no new connections; waiting up to {:?} for in-flight requests",
        config.shutdown_timeout
    );
    server.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Logs to stderr at `info` unless `RUST_LOG` says otherwise (no-op when a subscriber exists).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on ctrl-c, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
