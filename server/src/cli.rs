//! `kiln serve`'s command line: the flags ([`ServeArgs`], a clap `Args` the `kiln` binary
//! embeds as its `serve` subcommand) and [`run_cli`], which builds the tokio runtime and
//! serves until SIGTERM or ctrl-c.

use std::path::PathBuf;
use std::time::Duration;

use kiln_scheduler::SchedulingPolicy;

use crate::config::ServeConfig;
use crate::error::ServerError;

/// Which waiting request runs first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    /// First come, first served.
    Fcfs,
    /// Lower `priority` first, ties by arrival (requests may set `priority`).
    Priority,
}

/// The dtype the weights and the KV cache are served in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// bf16 on the GPU, f32 on the CPU.
    Auto,
    /// 32-bit floats.
    F32,
    /// bfloat16 (checkpoints in other dtypes are converted).
    Bf16,
}

impl DtypeArg {
    /// The dtype on the GPU (`gpu`) or the CPU.
    pub fn resolve(self, gpu: bool) -> kiln_ir::DType {
        match self {
            DtypeArg::F32 => kiln_ir::DType::F32,
            DtypeArg::Bf16 => kiln_ir::DType::BF16,
            DtypeArg::Auto if gpu => kiln_ir::DType::BF16,
            DtypeArg::Auto => kiln_ir::DType::F32,
        }
    }
}

/// Serve a model over an OpenAI-compatible HTTP API.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// The Hugging Face model directory (config.json, safetensors, tokenizer.json). Default:
    /// models/default, found in the current directory or above the kiln executable.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// The model name clients send as `model` (default: the directory's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require this API key (`Authorization: Bearer KEY`) on /v1/*; repeatable. /health and
    /// /metrics stay open.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// A file of accepted API keys, one a line (blank lines and # comments ignored).
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// The longest sequence (prompt + output) served (default: the model's context length).
    #[arg(long, value_name = "N")]
    pub max_model_len: Option<usize>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_num_seqs: usize,
    /// Most tokens one engine step runs (default: max(2048, max-num-seqs)).
    #[arg(long, value_name = "N")]
    pub max_num_batched_tokens: Option<usize>,
    /// Most requests waiting to start; more are answered 429 at once.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_queue: usize,
    /// Fraction of the GPU memory left free once the model is on the device that the KV
    /// cache and the largest step's working memory take together (on the CPU,
    /// --kv-cache-memory sizes the cache).
    #[arg(long, default_value_t = 0.9, value_name = "FRACTION")]
    pub gpu_memory_utilization: f64,
    /// The dtype of the weights and of the KV cache.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// Let steps of few rows use the decode-sized bf16 GEMM kernels: faster at low load, but
    /// a request's tokens may then depend on what it was batched with.
    #[arg(long)]
    pub no_batch_invariance: bool,
    /// Host memory for the KV cache when the model runs on the CPU: bytes, or with a suffix
    /// (KiB, MiB, GiB; K, M, G).
    #[arg(long, default_value = "1GiB", value_name = "SIZE", value_parser = parse_size)]
    pub kv_cache_memory: u64,
    /// Tokens per KV-cache block (8, 16 or 32).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub block_size: usize,
    /// Do not reuse cached prompt prefixes across requests.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Admission and preemption order.
    #[arg(long, value_enum, default_value_t = PolicyArg::Fcfs)]
    pub scheduling_policy: PolicyArg,
    /// Threads the CPU interpreter spreads a step's sequences over (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seconds a shutdown waits for in-flight requests before cancelling them.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub shutdown_timeout: u64,
}

impl ServeArgs {
    /// The server configuration these flags describe, for the CPU.
    pub fn to_config(&self) -> ServeConfig {
        self.to_config_for(false)
    }

    /// The server configuration these flags describe, for the GPU (`gpu`) or the CPU.
    pub fn to_config_for(&self, gpu: bool) -> ServeConfig {
        let defaults = ServeConfig::default();
        ServeConfig {
            model: self.model.clone(),
            served_model_name: self.served_model_name.clone(),
            host: self.host.clone(),
            port: self.port,
            api_keys: self.api_keys.clone(),
            api_key_file: self.api_key_file.clone(),
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_queue: self.max_queue,
            gpu_memory_utilization: self.gpu_memory_utilization,
            cpu_kv_cache_bytes: self.kv_cache_memory,
            block_size: self.block_size,
            enable_prefix_caching: !self.no_prefix_caching,
            scheduling_policy: match self.scheduling_policy {
                PolicyArg::Fcfs => SchedulingPolicy::Fcfs,
                PolicyArg::Priority => SchedulingPolicy::Priority,
            },
            interpreter_threads: self.threads.unwrap_or(defaults.interpreter_threads),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            param_dtype: self.dtype.resolve(gpu),
            random_weights: None,
            batch_invariant: !self.no_batch_invariance,
        }
    }
}

/// Parses `1073741824`, `512MiB`, `1GiB`, `64M`, `2G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 1073741824, 512MiB, 1GiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
    };
    Ok((number * scale as f64) as u64)
}

/// Runs `kiln serve` with `args` on the CPU, on a new multi-threaded tokio runtime.
pub fn run_cli(args: &ServeArgs) -> Result<(), ServerError> {
    let config = args.to_config();
    let factory = crate::CpuRunnerFactory::new(config.interpreter_threads);
    run_cli_on(config, Box::new(factory))
}

/// Runs `kiln serve` with `config` and the runner `factory` makes (the `kiln` binary's GPU
/// runner comes this way), on a new multi-threaded tokio runtime.
pub fn run_cli_on(
    config: ServeConfig,
    factory: Box<dyn crate::RunnerFactory>,
) -> Result<(), ServerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-http")
        .build()
        .map_err(|e| ServerError::Engine(format!("starting the async runtime: {e}")))?;
    runtime.block_on(crate::serve_with(config, factory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}
