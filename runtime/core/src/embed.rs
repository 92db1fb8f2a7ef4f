//! Sentence embeddings from an encoder checkpoint (BERT-family sentence-transformers models
//! such as all-MiniLM-L6-v2), the one path behind `kiln embed`, the server's
//! `/v1/embeddings` and anything else that turns text into vectors.
//!
//! [`EmbeddingModel`] holds the lowered `embed` entry of the model's program (mean pooling
//! over the attention mask, then L2 normalization, both inside the program) on the
//! [`Executor`] a maker ([`EmbedExecutorMaker`]) built for it with the weights: the reference
//! interpreter or the compiled CPU plan ([`EmbedBackend`]), or the CUDA plans that kiln-cli's
//! backend choice compiles for the GPU (this crate does not compile for the GPU). It also
//! holds the tokenizer configured the way sentence-transformers tokenizes:
//! - the text is stripped of leading and trailing whitespace;
//! - special tokens are added by tokenizer.json's post-processor ([CLS] … [SEP]);
//! - the ids are truncated to `max_seq_length` (sentence_bert_config.json's, else the
//!   smaller of config.json's `max_position_embeddings` and tokenizer_config.json's
//!   `model_max_length`), dropping tokens from the end; tokenizer.json's own truncation and
//!   padding settings are replaced.
//!
//! Batches: sequences are sorted by length and grouped so that each group, padded to its
//! longest member, holds at most `batch_tokens` tokens (a sequence longer than that runs
//! alone) and at most a quarter of it is padding, counting every sequence as at least
//! [`SHORT_SEQUENCE`] tokens long (short ones share a kernel tile on any backend, and the
//! matmul template tiles each sequence of a batch on its own, so padding a short sequence
//! to a long one's length costs the long one's time). Padding uses id 0 and mask 0, so it
//! changes no real token's result. Results come back in input order. The batch and sequence
//! sizes are the entry's symbols, so one executor serves every batch shape (on the GPU, a
//! plan without loops is captured as a CUDA graph per shape on first use, at most
//! [`EMBED_GPU_MAX_GRAPHS`] shapes, others run uncaptured; a plan with the layer loop runs
//! directly). The sizes stay far below the plans' symbol bound
//! (`kiln_kir::Plan::symbol_bound`); a larger one is the executor's error naming the symbol.

use crate::models::{self, ModelKind};
use crate::progress::{NoProgress, Progress};
use crate::{
    Backend, CpuPlans, Executor, Interpreter, RuntimeError, Tokenizer, TokenizerError, Weights,
};
use kiln_ir::{DType, Tensor};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Padded tokens per batch unless [`EmbeddingModel::with_batch_tokens`] says otherwise.
pub const DEFAULT_BATCH_TOKENS: usize = 2048;

/// Sequences up to this many tokens batch together without counting their padding.
pub const SHORT_SEQUENCE: usize = 32;

/// The most CUDA graphs (one per batch shape) a GPU embedding executor keeps; the GPU maker
/// of kiln-cli sets it.
pub const EMBED_GPU_MAX_GRAPHS: usize = 64;

/// Makes the executor an encoder's `embed` entry runs on from the lowered program (that entry
/// only) and its weights, reporting compilation to the progress: [`EmbedBackend::make`] for
/// the interpreter and the CPU plans; kiln-cli's `backend::embed_maker` for the GPU.
pub type EmbedExecutorMaker = dyn Fn(
        kiln_lower::Lowered,
        Arc<Weights>,
        &mut dyn Progress,
    ) -> Result<Box<dyn Executor + Send>, RuntimeError>
    + Send
    + Sync;

/// Where the `embed` entry runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EmbedBackend {
    /// The compiled CPU plan (fused kernels JIT-compiled by Cranelift).
    #[default]
    Cpu,
    /// The graph-IR reference interpreter.
    Interpreter,
}

impl EmbedBackend {
    /// A description for logs.
    pub fn name(self) -> &'static str {
        match self {
            EmbedBackend::Cpu => "compiled CPU plan (Cranelift)",
            EmbedBackend::Interpreter => Backend::Interpreter.name(),
        }
    }

    /// This backend as an [`EmbedExecutorMaker`].
    pub fn maker(self) -> Box<EmbedExecutorMaker> {
        Box::new(move |lowered, weights, progress: &mut dyn Progress| {
            self.make(lowered, weights, progress)
        })
    }

    /// The executor of this backend for `lowered` with `weights` (an [`EmbedExecutorMaker`]).
    pub fn make(
        self,
        lowered: kiln_lower::Lowered,
        weights: Arc<Weights>,
        progress: &mut dyn Progress,
    ) -> Result<Box<dyn Executor + Send>, RuntimeError> {
        Ok(match self {
            EmbedBackend::Interpreter => Box::new(Interpreter::new(lowered.module, weights)),
            EmbedBackend::Cpu => Box::new(CpuPlans::compile(lowered.module, weights, progress)?),
        })
    }
}

/// What can go wrong while loading an encoder or embedding text.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: {message}")]
    ModelDir { path: PathBuf, message: String },
    #[error("lowering {program} against {dir}:\n{diagnostics}")]
    Lowering {
        program: String,
        dir: PathBuf,
        diagnostics: String,
    },
    #[error("{0}")]
    Input(String),
    #[error("the model returned {0}")]
    BadOutput(String),
}

/// An encoder ready to embed text (see the module docs). Cloning is cheap: clones share the
/// executor, whose runs take turns (one batch at a time; each run uses the whole backend).
#[derive(Clone)]
pub struct EmbeddingModel {
    executor: Arc<Mutex<Box<dyn Executor + Send>>>,
    /// The executor's description, for logs.
    description: String,
    entry: String,
    tokenizer: Option<Tokenizer>,
    max_seq_length: usize,
    max_positions: usize,
    vocab_size: usize,
    dimension: usize,
    batch_tokens: usize,
}

impl fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("executor", &self.description)
            .field("entry", &self.entry)
            .field("max_seq_length", &self.max_seq_length)
            .field("dimension", &self.dimension)
            .field("batch_tokens", &self.batch_tokens)
            .finish_non_exhaustive()
    }
}

/// The sequence limits and sizes of an encoder directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderLimits {
    /// Tokens a text is truncated to (special tokens included).
    pub max_seq_length: usize,
    /// The most positions the model has (config.json's `max_position_embeddings`).
    pub max_positions: usize,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// The embedding width (config.json's `hidden_size`).
    pub dimension: usize,
}

impl EncoderLimits {
    /// Reads the limits from `dir`'s config.json and sentence_bert_config.json, with
    /// `model_max_length` from the tokenizer when there is one.
    pub fn from_dir(
        dir: &Path,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<EncoderLimits, EmbedError> {
        let config = read_json(&dir.join("config.json"))?;
        let int = |key: &str| {
            config
                .get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| EmbedError::ModelDir {
                    path: dir.join("config.json"),
                    message: format!("no `{key}`"),
                })
        };
        let max_positions = int("max_position_embeddings")?;
        let vocab_size = int("vocab_size")?;
        let dimension = int("hidden_size")?;
        let sbert_path = dir.join("sentence_bert_config.json");
        let from_sbert = if sbert_path.is_file() {
            read_json(&sbert_path)?
                .get("max_seq_length")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        } else {
            None
        };
        let max_seq_length = match from_sbert {
            Some(n) => n,
            None => tokenizer
                .and_then(|t| t.config().model_max_length)
                .map_or(max_positions, |n| n.min(max_positions)),
        };
        if max_seq_length == 0 || max_seq_length > max_positions {
            return Err(EmbedError::ModelDir {
                path: dir.to_path_buf(),
                message: format!(
                    "max_seq_length {max_seq_length} is outside 1..={max_positions} (max_position_embeddings)"
                ),
            });
        }
        Ok(EncoderLimits {
            max_seq_length,
            max_positions,
            vocab_size,
            dimension,
        })
    }
}

/// The tokenizer of an encoder directory configured as in the module docs, or `None` when
/// it has no tokenizer.json.
pub fn encoder_tokenizer(dir: &Path) -> Result<Option<Tokenizer>, EmbedError> {
    if !dir.join("tokenizer.json").is_file() {
        return Ok(None);
    }
    let tokenizer = Tokenizer::from_dir(dir)?;
    let limits = EncoderLimits::from_dir(dir, Some(&tokenizer))?;
    Ok(Some(
        tokenizer.with_truncation(Some(limits.max_seq_length))?,
    ))
}

impl EmbeddingModel {
    /// Loads the encoder in `dir` (config.json, safetensors weights, tokenizer.json when
    /// present): picks the program by `model_type`, lowers its `embed` entry, binds the
    /// weights and compiles for `backend`, reporting the loading and the compiling to
    /// `progress`.
    pub fn load(
        dir: &Path,
        backend: EmbedBackend,
        progress: &mut dyn Progress,
    ) -> Result<EmbeddingModel, EmbedError> {
        EmbeddingModel::load_on(dir, backend.maker().as_ref(), progress)
    }

    /// Like [`EmbeddingModel::load`], the `embed` entry running on the executor `make`
    /// builds (the GPU's, from kiln-cli).
    pub fn load_on(
        dir: &Path,
        make: &EmbedExecutorMaker,
        progress: &mut dyn Progress,
    ) -> Result<EmbeddingModel, EmbedError> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let program = match models::program_for(model_type) {
            Some(program) if program.kind == ModelKind::Encoder => program,
            Some(_) => {
                return Err(EmbedError::ModelDir {
                    path: config_path,
                    message: format!(
                        "model_type `{model_type}` is a text-generation model; embeddings need an encoder ({})",
                        encoder_types().join(", ")
                    ),
                })
            }
            None => {
                return Err(EmbedError::ModelDir {
                    path: config_path,
                    message: format!(
                        "no kiln program for model_type `{model_type}`; the encoders kiln knows: {}",
                        encoder_types().join(", ")
                    ),
                })
            }
        };
        let lowered = program
            .lower(&config)
            .map_err(|diagnostics| EmbedError::Lowering {
                program: program.path.to_string(),
                dir: dir.to_path_buf(),
                diagnostics,
            })?;
        let weights = Weights::load_with_progress(dir, &lowered.params, progress)?;
        EmbeddingModel::from_parts(
            dir,
            lowered,
            Arc::new(weights),
            program.entry,
            make,
            progress,
        )
    }

    /// An embedding model over a program lowered and weights loaded already (the server
    /// has them), run on the executor `make` builds; `dir` supplies the tokenizer and the
    /// limits.
    pub fn from_parts(
        dir: &Path,
        lowered: kiln_lower::Lowered,
        weights: Arc<Weights>,
        entry: &str,
        make: &EmbedExecutorMaker,
        progress: &mut dyn Progress,
    ) -> Result<EmbeddingModel, EmbedError> {
        let tokenizer = encoder_tokenizer(dir)?;
        let limits = EncoderLimits::from_dir(dir, tokenizer.as_ref())?;
        if lowered.module.function(entry).is_none() {
            return Err(EmbedError::Input(format!(
                "the program has no entry function `{entry}`"
            )));
        }
        let executor = make(lowered, weights, progress)?;
        Ok(EmbeddingModel {
            description: executor.describe(),
            executor: Arc::new(Mutex::new(executor)),
            entry: entry.to_string(),
            tokenizer,
            max_seq_length: limits.max_seq_length,
            max_positions: limits.max_positions,
            vocab_size: limits.vocab_size,
            dimension: limits.dimension,
            batch_tokens: DEFAULT_BATCH_TOKENS,
        })
    }

    /// Loads `dir` for `backend` without reporting progress.
    pub fn load_quiet(dir: &Path, backend: EmbedBackend) -> Result<EmbeddingModel, EmbedError> {
        EmbeddingModel::load(dir, backend, &mut NoProgress)
    }

    /// The same model batching at most `batch_tokens` padded tokens per run (at least 1; a
    /// longer sequence runs alone). 1 runs every sequence alone.
    pub fn with_batch_tokens(mut self, batch_tokens: usize) -> EmbeddingModel {
        self.batch_tokens = batch_tokens.max(1);
        self
    }

    /// Where the `embed` entry runs (the executor's description).
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// The length of every embedding.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Tokens a text is truncated to.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// The tokenizer (configured as in the module docs), if the directory has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The token ids `text` is embedded from.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| {
            EmbedError::Input(
                "this model directory has no tokenizer.json, so it embeds token ids only".into(),
            )
        })?;
        Ok(tokenizer.encode(text.trim(), true)?)
    }

    /// The L2-normalized embedding of every text, in order.
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let sequences = texts
            .iter()
            .map(|text| self.tokenize(text.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        self.embed_ids(&sequences)
    }

    /// The L2-normalized embedding of every token sequence, in order. Sequences are not
    /// truncated: each must hold 1 to `max_position_embeddings` ids below the vocabulary
    /// size.
    pub fn embed_ids(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        for (index, ids) in sequences.iter().enumerate() {
            if ids.is_empty() || ids.len() > self.max_positions {
                return Err(EmbedError::Input(format!(
                    "sequence {index} has {} tokens; this model takes 1 to {}",
                    ids.len(),
                    self.max_positions
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(EmbedError::Input(format!(
                    "sequence {index} has token id {bad}, outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
        }
        let mut results: Vec<Option<Vec<f32>>> = vec![None; sequences.len()];
        // One call's batches run back to back; other clones' calls wait.
        let mut executor = self.executor.lock().map_err(|_| {
            EmbedError::BadOutput("nothing: an earlier embedding run panicked".into())
        })?;
        for batch in batches(sequences, self.batch_tokens) {
            let vectors = self.run_batch(
                executor.as_mut(),
                &batch.iter().map(|&i| &sequences[i][..]).collect::<Vec<_>>(),
            )?;
            for (index, vector) in batch.into_iter().zip(vectors) {
                results[index] = Some(vector);
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Runs one padded batch through the `embed` entry on `executor`.
    fn run_batch(
        &self,
        executor: &mut (dyn Executor + Send),
        sequences: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let rows = sequences.len();
        let width = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows * width);
        let mut mask = Vec::with_capacity(rows * width);
        for sequence in sequences {
            ids.extend(sequence.iter().map(|&id| i64::from(id)));
            mask.extend(std::iter::repeat_n(1, sequence.len()));
            let padding = width - sequence.len();
            ids.extend(std::iter::repeat_n(0, padding));
            mask.extend(std::iter::repeat_n(0, padding));
        }
        let inputs = [
            Tensor::from_ints(DType::I32, &[rows, width], ids),
            Tensor::from_ints(DType::I32, &[rows, width], mask),
        ];
        let results = executor.run(&self.entry, &inputs)?;
        let embeddings = results
            .first()
            .ok_or_else(|| EmbedError::BadOutput("no result".into()))?;
        if embeddings.shape != [rows, self.dimension] {
            return Err(EmbedError::BadOutput(format!(
                "embeddings of shape {:?}, expected [{rows}, {}]",
                embeddings.shape, self.dimension
            )));
        }
        Ok(embeddings
            .to_f32_vec()
            .chunks(self.dimension)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Groups sequence indices into batches (see the module docs): sorted by length (ties in
/// input order), each batch's longest length times its size at most `batch_tokens`, and its
/// padding (sequences counted as at least [`SHORT_SEQUENCE`] long) at most a quarter of that.
fn batches(sequences: &[Vec<u32>], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| sequences[i].len());
    let effective = |i: usize| sequences[i].len().max(SHORT_SEQUENCE);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_tokens = 0;
    for index in order {
        // Sorted ascending: this sequence is the longest of the batch if it joins.
        let count = current.len() + 1;
        let padded = count * sequences[index].len();
        let real = current_tokens + effective(index);
        let too_much_padding = 4 * real < 3 * count * effective(index);
        if !current.is_empty() && (padded > batch_tokens || too_much_padding) {
            batches.push(std::mem::take(&mut current));
            current_tokens = 0;
        }
        current.push(index);
        current_tokens += effective(index);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// The `model_type`s of the shipped encoder programs.
fn encoder_types() -> Vec<&'static str> {
    models::MODEL_PROGRAMS
        .iter()
        .filter(|p| p.kind == ModelKind::Encoder)
        .flat_map(|p| p.model_types.iter().copied())
        .collect()
}

fn read_json(path: &Path) -> Result<serde_json::Value, EmbedError> {
    let text = std::fs::read_to_string(path).map_err(|e| EmbedError::ModelDir {
        path: path.to_path_buf(),
        message: format!("reading: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| EmbedError::ModelDir {
        path: path.to_path_buf(),
        message: format!("parsing: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(lengths: &[usize]) -> Vec<Vec<u32>> {
        lengths.iter().map(|&n| vec![1; n]).collect()
    }

    #[test]
    fn batches_group_similar_lengths_under_the_token_budget() {
        let sequences = lengths(&[5, 100, 6, 7, 90, 300, 40]);
        // 5, 6, 7 and 40 count as 32, 32, 32, 40: 16 padded tokens of 160.
        assert_eq!(
            batches(&sequences, 200),
            [vec![0, 2, 3, 6], vec![4, 1], vec![5]]
        );
        // 90 and 100 in a batch of 1000 tokens, but padding 40 to 90 would be too much.
        assert_eq!(
            batches(&sequences, 1000),
            [vec![0, 2, 3, 6], vec![4, 1], vec![5]]
        );
        // One token a batch: every sequence alone, shortest first.
        assert_eq!(
            batches(&sequences, 1),
            [
                vec![0],
                vec![2],
                vec![3],
                vec![6],
                vec![4],
                vec![1],
                vec![5]
            ]
        );
        assert!(batches(&[], 10).is_empty());
    }

    #[test]
    fn embedding_a_tiny_bert_gives_unit_vectors_that_do_not_depend_on_batching() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert");
        let model = EmbeddingModel::load_quiet(&dir, EmbedBackend::Interpreter).expect("load");
        assert_eq!(model.describe(), Backend::Interpreter.name());
        assert!(model.tokenizer().is_none());
        assert!(matches!(model.tokenize("hi"), Err(EmbedError::Input(_))));
        let sequences = vec![
            vec![5, 9, 13],
            vec![7],
            vec![2, 4, 6, 8, 10, 12],
            vec![5, 9, 13],
        ];
        let batched = model.embed_ids(&sequences).expect("embed");
        let alone = model
            .clone()
            .with_batch_tokens(1)
            .embed_ids(&sequences)
            .expect("embed alone");
        assert_eq!(batched.len(), 4);
        for (b, a) in batched.iter().zip(&alone) {
            assert_eq!(b.len(), model.dimension());
            let norm: f32 = b.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
            let max_diff = b
                .iter()
                .zip(a)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(max_diff < 1e-5, "padding changed a result by {max_diff}");
        }
        assert_eq!(batched[0], batched[3]);
        assert!(matches!(
            model.embed_ids(&[vec![]]),
            Err(EmbedError::Input(_))
        ));
        assert!(matches!(
            model.embed_ids(&[vec![1_000_000]]),
            Err(EmbedError::Input(_))
        ));
    }
}
