//! kiln's runtime core: loading a checkpoint's tensors for a lowered program and running the
//! program's entry functions on a backend.
//!
//! Backends ([`exec`]): the reference interpreter (exact, slow, always available), the
//! compiled kernels on the CPU through Cranelift ([`cpu::CpuProgram`]), and on an NVIDIA GPU
//! through CUDA, all behind the [`Executor`] trait.
//!
//! Sentence embeddings: [`embed`] ([`EmbeddingModel`]: text to L2-normalized vectors with an
//! encoder checkpoint). Long steps report through [`progress`].
//!
//! Text generation on the host: [`tokenizer`] (tokenizer.json, tokenizer_config.json,
//! incremental detokenization), [`chat`] (chat templates), [`generation_config`],
//! [`sampling`] (the sampler and stop conditions) and [`generate`] (the [`Generator`] that
//! drives a model with them); [`paged`] runs a model's KV-cached `step` entry with a paged
//! cache that the executor keeps between steps.

pub mod chat;
pub mod consensus;
pub mod cpu;
pub mod embed;
pub mod exec;
pub mod generate;
pub mod generation_config;
pub mod models;
pub mod paged;
pub mod progress;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate, MessageContent};
pub use cpu::CpuProgram;
pub use embed::{EmbedBackend, EmbedError, EmbeddingModel};
pub use exec::{CpuPlans, CudaPlans, Executor, Interpreter};
pub use generate::{
    Completion, GenerateError, GenerationEvent, Generator, LogitsModel, ProgramLogits, RequestId,
};
pub use generation_config::GenerationConfig;
pub use kiln_cuda::FedInput;
pub use paged::{CacheShape, PagedLogits, PagedModel, StepSequence, STEP_ENTRY};
pub use progress::{NoProgress, Progress, ProgressUnit};
pub use sampling::{FinishReason, Sampler, SamplingError, SamplingParams};
pub use tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};
pub use weights::Weights;

use std::path::{Path, PathBuf};

/// What can go wrong while loading or running.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("the checkpoint in {dir} has no tensor `{name}` (the program expects {expected})")]
    MissingTensor {
        name: String,
        expected: kiln_ir::TensorType,
        dir: PathBuf,
    },
    #[error("tensor `{name}` in {path}: {message}")]
    BadTensor {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("{0}")]
    Input(String),
    #[error("running `{function}`: {message}")]
    Backend { function: String, message: String },
    #[error("running `{function}`: {source}")]
    Execution {
        function: String,
        source: kiln_ir::IrError,
    },
    #[error("compiling for the CPU: {0}")]
    Compile(String),
    #[error("running `{function}` on the CPU plan: {message}")]
    CpuExecution { function: String, message: String },
}

impl RuntimeError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> RuntimeError {
        RuntimeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The graph-IR reference interpreter.
    Interpreter,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Interpreter => "reference interpreter (CPU)",
        }
    }
}

/// Runs entry `function` of a lowered module on `inputs` with `weights`.
pub fn run(
    backend: Backend,
    module: &kiln_ir::Module,
    function: &str,
    inputs: &[kiln_ir::Tensor],
    weights: &Weights,
) -> Result<Vec<kiln_ir::Tensor>, RuntimeError> {
    let func = module.function(function).ok_or_else(|| {
        let names: Vec<&str> = module.functions.iter().map(|f| f.name.as_str()).collect();
        RuntimeError::Input(format!(
            "no entry function `{function}`; the program has: {}",
            names.join(", ")
        ))
    })?;
    match backend {
        Backend::Interpreter => {
            kiln_ir::interpret(func, inputs, weights).map_err(|source| RuntimeError::Execution {
                function: function.to_string(),
                source,
            })
        }
    }
}
