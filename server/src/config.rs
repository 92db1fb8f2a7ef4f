//! The server's configuration ([`ServeConfig`], what `kiln serve`'s flags fill in), finding the
//! model directory, and reading API keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_scheduler::SchedulingPolicy;

use crate::error::ServerError;

/// Where the default model lives, relative to the repository root.
pub const DEFAULT_MODEL_DIR: &str = "models/default";

/// Everything `kiln serve` can be told.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The Hugging Face model directory; `None` looks for `models/default` (see
    /// [`resolve_model_dir`]).
    pub model: Option<PathBuf>,
    /// The name clients pass as `model`; defaults to the directory's name.
    pub served_model_name: Option<String>,
    /// Address to bind.
    pub host: String,
    /// Port to bind; 0 picks a free one.
    pub port: u16,
    /// Accepted API keys; when empty (and no key file), `/v1/*` is open.
    pub api_keys: Vec<String>,
    /// A file of API keys, one a line (blank lines and `#` comments ignored).
    pub api_key_file: Option<PathBuf>,
    /// The longest sequence (prompt + output) served; defaults to the model's context length.
    pub max_model_len: Option<usize>,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens one engine step runs; defaults to max(2048, max_num_seqs).
    pub max_num_batched_tokens: Option<usize>,
    /// Most requests waiting to start; one more is answered 429 at once.
    pub max_queue: usize,
    /// Fraction of the GPU memory free with the model on the device that the KV cache and
    /// the largest step's working memory (arena, logits, inputs) take together (when the
    /// model runs on the GPU).
    pub gpu_memory_utilization: f64,
    /// Bytes of host memory the KV cache may take when the model runs on the CPU.
    pub cpu_kv_cache_bytes: u64,
    /// Tokens per KV-cache block (8, 16 or 32).
    pub block_size: usize,
    /// Reuse cached prompt prefixes across requests.
    pub enable_prefix_caching: bool,
    /// Admission and preemption order.
    pub scheduling_policy: SchedulingPolicy,
    /// Threads the reference interpreter spreads a step's sequences over.
    pub interpreter_threads: usize,
    /// How long a shutdown waits for in-flight requests before cancelling them.
    pub shutdown_timeout: Duration,
    /// The dtype of the weights and of the KV cache (f32 or bf16; checkpoints are converted).
    pub param_dtype: kiln_ir::DType,
    /// Serve random weights drawn with this seed instead of the checkpoint's: the model
    /// directory then needs only config.json (benchmarks of a model shape).
    pub random_weights: Option<u64>,
    /// Whether a request's tokens must not depend on what it is batched with: bf16 GEMMs
    /// then always use the kernels of many rows, never the decode-sized ones a step of few
    /// rows would otherwise pick (faster at low load; f32 GEMMs have one kernel anyway).
    pub batch_invariant: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: None,
            served_model_name: None,
            host: "127.0.0.1".into(),
            port: 8000,
            api_keys: Vec::new(),
            api_key_file: None,
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: None,
            max_queue: 1024,
            gpu_memory_utilization: 0.9,
            cpu_kv_cache_bytes: 1 << 30,
            block_size: 16,
            enable_prefix_caching: true,
            scheduling_policy: SchedulingPolicy::Fcfs,
            interpreter_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            shutdown_timeout: Duration::from_secs(30),
            param_dtype: kiln_ir::DType::F32,
            random_weights: None,
            batch_invariant: true,
        }
    }
}

impl ServeConfig {
    /// A configuration serving `model` with every other setting at its default.
    pub fn for_model(model: impl Into<PathBuf>) -> Self {
        ServeConfig {
            model: Some(model.into()),
            ..ServeConfig::default()
        }
    }

    /// Most tokens one engine step runs: `max_num_batched_tokens`, by default 2048, and at
    /// least `max_num_seqs` (every running sequence's decode token fits one step).
    pub fn step_tokens(&self) -> usize {
        self.max_num_batched_tokens
            .unwrap_or(2048)
            .max(self.max_num_seqs)
    }

    /// The keys of `api_keys` and of `api_key_file` together.
    pub fn load_api_keys(&self) -> Result<Vec<String>, ServerError> {
        let mut keys: Vec<String> = self
            .api_keys
            .iter()
            .map(|key| key.trim().to_string())
            .filter(|key| !key.is_empty())
            .collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|source| ServerError::ApiKeyFile {
                path: path.clone(),
                source,
            })?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty() && !line.starts_with('#'))
                    .map(str::to_string),
            );
            if keys.is_empty() {
                return Err(ServerError::InvalidConfig(format!(
                    "the API key file {} holds no key",
                    path.display()
                )));
            }
        }
        Ok(keys)
    }

    /// Checks the values that do not depend on the model.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.max_num_seqs == 0 {
            return Err(ServerError::InvalidConfig(
                "--max-num-seqs must be at least 1".into(),
            ));
        }
        if self.max_queue == 0 {
            return Err(ServerError::InvalidConfig(
                "--max-queue must be at least 1".into(),
            ));
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return Err(ServerError::InvalidConfig(format!(
                "--gpu-memory-utilization must be in (0, 1], got {}",
                self.gpu_memory_utilization
            )));
        }
        if self.max_model_len == Some(0) {
            return Err(ServerError::InvalidConfig(
                "--max-model-len must be at least 1".into(),
            ));
        }
        if self.interpreter_threads == 0 {
            return Err(ServerError::InvalidConfig(
                "the interpreter needs at least one thread".into(),
            ));
        }
        Ok(())
    }
}

/// The model directory to serve: `model` itself when given (it must exist), else
/// `models/default` found in the current directory or above the running executable (a
/// `kiln` binary under `target/` finds the repository it was built in).
pub fn resolve_model_dir(model: Option<&Path>) -> Result<PathBuf, ServerError> {
    if let Some(dir) = model {
        if !dir.is_dir() {
            return Err(ServerError::ModelDir {
                path: dir.to_path_buf(),
                message: "no such directory".into(),
            });
        }
        if !dir.join("config.json").is_file() {
            return Err(ServerError::ModelDir {
                path: dir.to_path_buf(),
                message: "no config.json: a Hugging Face model directory holds config.json, \
                          safetensors weights and (for text) tokenizer.json"
                    .into(),
            });
        }
        return Ok(dir.to_path_buf());
    }
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    let mut searched = Vec::new();
    for root in roots {
        let candidate = root.join(DEFAULT_MODEL_DIR);
        if candidate.join("config.json").is_file() {
            return Ok(candidate);
        }
        if !searched.contains(&candidate) {
            searched.push(candidate);
        }
    }
    Err(ServerError::DefaultModelMissing { searched })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_come_from_flags_and_file() {
        let dir = std::env::temp_dir().join(format!("kiln-server-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys.txt");
        std::fs::write(&file, "# team keys\nalpha\n\n  beta  \n").unwrap();
        let config = ServeConfig {
            api_keys: vec!["gamma".into()],
            api_key_file: Some(file),
            ..ServeConfig::default()
        };
        assert_eq!(config.load_api_keys().unwrap(), ["gamma", "alpha", "beta"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_model_dir_is_named() {
        let error = resolve_model_dir(Some(Path::new("/no/such/kiln/model"))).unwrap_err();
        assert!(error.to_string().contains("/no/such/kiln/model"), "{error}");
    }
}
