//! The engine's view of a model: [`ModelRunner`] turns one scheduled step into the
//! last-position logits of every sequence that samples. [`PagedRunner`] implements it on a
//! compiled program's KV-cached `step` entry (the Cranelift CPU plans or the GPU): the whole
//! ragged batch in one step, each sequence's new tokens only, keys and values in the paged
//! cache at the blocks the engine's KV-cache manager assigned. [`InterpreterRunner`]
//! implements it on kiln's reference interpreter without a KV cache. [`Embedder`] runs an
//! encoder's `embed` entry through `kiln_runtime::EmbeddingModel`.
//!
//! `InterpreterRunner` runs, for each sampling sequence, the program's `forward` over the
//! sequence's whole token list, alone (batch of one): batch invariance by construction, at
//! the price of recomputing the prefix every step. `PagedRunner` is batch invariant because
//! every kernel of the step computes a token's row the same way whatever else is in the
//! batch (the soak test checks it).

use std::sync::Arc;

use kiln_ir::{DType, Tensor};
use std::collections::BTreeSet;

use kiln_kvcache::{BlockCopy, BlockId, SeqId};
use kiln_runtime::{
    Backend, EmbedError, EmbeddingModel, Executor, PagedModel, RuntimeError, StepSequence, Weights,
    STEP_ENTRY,
};

/// What a runner can fail with; the engine fails the step's requests with the message.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The program failed to run.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The program returned something of the wrong shape.
    #[error("the model returned {0}")]
    BadOutput(String),
    /// A worker thread of the runner panicked.
    #[error("a runner thread panicked")]
    Panicked,
}

/// One scheduled sequence of a step, as the runner sees it.
#[derive(Clone, Copy, Debug)]
pub struct SequenceInput<'a> {
    /// The sequence (stable while it runs; block tables are kept per sequence).
    pub seq_id: SeqId,
    /// Every token of the sequence up to and including the last one scheduled this step.
    pub token_ids: &'a [u32],
    /// Leading tokens whose KV is already in the cache; the step computes the rest.
    pub num_cached_tokens: usize,
    /// The sequence's KV-cache blocks (position `p` lives in `block_table[p / block_size]`).
    pub block_table: &'a [BlockId],
    /// Whether the step samples a token from this sequence's last position.
    pub samples_token: bool,
}

/// Runs the model for the engine, one step at a time.
pub trait ModelRunner: Send {
    /// Runs one step over `batch` (every scheduled sequence, decodes first) and returns the
    /// last-position logits of each sequence with `samples_token`, in batch order.
    fn logits(&mut self, batch: &[SequenceInput<'_>]) -> Result<Vec<Vec<f32>>, RunnerError>;

    /// Like [`ModelRunner::logits`], but returns the argmax of each of those rows (the
    /// lowest id on ties), made where the model runs so that the logits need not come back;
    /// `None`, having run nothing, where the runner cannot (then ask for the logits).
    fn greedy_tokens(
        &mut self,
        batch: &[SequenceInput<'_>],
    ) -> Result<Option<Vec<u32>>, RunnerError> {
        let _ = batch;
        Ok(None)
    }

    /// Performs copy-on-write block copies before the step's forward pass. Runners that
    /// keep no KV cache have nothing to copy.
    fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<(), RunnerError> {
        let _ = copies;
        Ok(())
    }

    /// Where the model runs, for the startup log.
    fn describe(&self) -> String;
}

/// [`ModelRunner`] on the reference interpreter (see the module docs).
#[derive(Debug)]
pub struct InterpreterRunner {
    module: Arc<kiln_ir::Module>,
    weights: Arc<Weights>,
    entry: String,
    threads: usize,
}

impl InterpreterRunner {
    /// A runner of `entry` (`tokens: i32[B, S] -> logits: f32[B, S, vocab]`) spreading each
    /// step's sequences over `threads` threads.
    pub fn new(
        module: Arc<kiln_ir::Module>,
        weights: Arc<Weights>,
        entry: &str,
        threads: usize,
    ) -> InterpreterRunner {
        InterpreterRunner {
            module,
            weights,
            entry: entry.to_string(),
            threads: threads.max(1),
        }
    }

    /// The last position's logits of one sequence, run alone.
    fn last_logits(&self, token_ids: &[u32]) -> Result<Vec<f32>, RunnerError> {
        let ids = token_ids.iter().map(|&id| i64::from(id)).collect();
        let tokens = Tensor::from_ints(DType::I32, &[1, token_ids.len()], ids);
        let results = kiln_runtime::run(
            Backend::Interpreter,
            &self.module,
            &self.entry,
            &[tokens],
            &self.weights,
        )?;
        let logits = results
            .first()
            .ok_or_else(|| RunnerError::BadOutput("no result".into()))?;
        let [1, length, vocab] = logits.shape[..] else {
            return Err(RunnerError::BadOutput(format!(
                "logits of shape {:?}, expected [1, {}, vocab]",
                logits.shape,
                token_ids.len()
            )));
        };
        if length != token_ids.len() || vocab == 0 {
            return Err(RunnerError::BadOutput(format!(
                "logits of shape {:?} for {} tokens",
                logits.shape,
                token_ids.len()
            )));
        }
        let values = logits.to_f32_vec();
        Ok(values[(length - 1) * vocab..].to_vec())
    }
}

impl ModelRunner for InterpreterRunner {
    fn logits(&mut self, batch: &[SequenceInput<'_>]) -> Result<Vec<Vec<f32>>, RunnerError> {
        let sampling: Vec<&[u32]> = batch
            .iter()
            .filter(|input| input.samples_token)
            .map(|input| input.token_ids)
            .collect();
        if sampling.len() <= 1 || self.threads == 1 {
            return sampling
                .iter()
                .map(|tokens| self.last_logits(tokens))
                .collect();
        }
        // Each sequence runs alone, so spreading them over threads changes no result.
        let threads = self.threads.min(sampling.len());
        let mut rows: Vec<Option<Result<Vec<f32>, RunnerError>>> =
            (0..sampling.len()).map(|_| None).collect();
        let this = &*self;
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|worker| {
                    let sampling = &sampling;
                    scope.spawn(move || {
                        (worker..sampling.len())
                            .step_by(threads)
                            .map(|index| (index, this.last_logits(sampling[index])))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for worker in workers {
                match worker.join() {
                    Ok(results) => {
                        for (index, row) in results {
                            rows[index] = Some(row);
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        rows.into_iter()
            .map(|row| row.unwrap_or(Err(RunnerError::Panicked)))
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "{} over {} thread{} (no KV reuse: every step reruns each sampled sequence)",
            Backend::Interpreter.name(),
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        )
    }
}

/// [`ModelRunner`] on a program's KV-cached `step` entry (see the module docs). A
/// copy-on-write block copy is made by recomputation: the next step that runs the block's
/// sequence computes the block's positions again (into the new block) instead of copying.
pub struct PagedRunner {
    executor: Box<dyn Executor + Send>,
    model: PagedModel,
    /// Blocks that received a copy not made yet.
    copied_into: BTreeSet<u32>,
}

impl PagedRunner {
    /// A runner of `executor`'s `step` entry with a cache of `num_blocks` blocks of
    /// `block_size` tokens, for sequences of at most `max_model_len` tokens.
    pub fn new(
        executor: Box<dyn Executor + Send>,
        num_blocks: usize,
        block_size: usize,
        max_model_len: usize,
    ) -> Result<PagedRunner, RunnerError> {
        let model = PagedModel::new(
            executor.module(),
            STEP_ENTRY,
            num_blocks,
            block_size,
            max_model_len,
        )?;
        Ok(PagedRunner {
            executor,
            model,
            copied_into: BTreeSet::new(),
        })
    }
}

impl PagedRunner {
    /// Runs one step over `batch` through `step` (the model's logits or its greedy tokens, a
    /// row per sequence) and returns the rows of the sequences that sample a token.
    fn run<Row>(
        &mut self,
        batch: &[SequenceInput<'_>],
        step: impl FnOnce(
            &mut PagedModel,
            &mut dyn Executor,
            &[StepSequence<'_>],
        ) -> Result<Vec<Row>, RuntimeError>,
    ) -> Result<Vec<Row>, RunnerError> {
        let block_size = self.model.cache_shape().block_size;
        let tables: Vec<Vec<u32>> = batch
            .iter()
            .map(|input| input.block_table.iter().map(|b| b.0).collect())
            .collect();
        let steps: Vec<StepSequence<'_>> = batch
            .iter()
            .zip(&tables)
            .map(|(input, blocks)| {
                // Positions of a block that got a copy are computed again.
                let recompute_from = blocks
                    .iter()
                    .position(|b| self.copied_into.contains(b))
                    .map_or(usize::MAX, |k| k * block_size);
                StepSequence {
                    tokens: input.token_ids,
                    cached: input.num_cached_tokens.min(recompute_from),
                    blocks,
                }
            })
            .collect();
        let rows = step(&mut self.model, self.executor.as_mut(), &steps)?;
        for blocks in &tables {
            for b in blocks {
                self.copied_into.remove(b);
            }
        }
        Ok(rows
            .into_iter()
            .zip(batch)
            .filter(|(_, input)| input.samples_token)
            .map(|(row, _)| row)
            .collect())
    }
}

impl ModelRunner for PagedRunner {
    fn logits(&mut self, batch: &[SequenceInput<'_>]) -> Result<Vec<Vec<f32>>, RunnerError> {
        self.run(batch, |model, executor, steps| model.step(executor, steps))
    }

    fn greedy_tokens(
        &mut self,
        batch: &[SequenceInput<'_>],
    ) -> Result<Option<Vec<u32>>, RunnerError> {
        let tokens = self.run(batch, |model, executor, steps| {
            model.step_greedy(executor, steps)
        })?;
        Ok(Some(tokens))
    }

    fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<(), RunnerError> {
        self.copied_into.extend(copies.iter().map(|c| c.dst.0));
        Ok(())
    }

    fn describe(&self) -> String {
        let cache = self.model.cache_shape();
        format!(
            "{}, KV-cached `{STEP_ENTRY}` over a paged cache of {} blocks of {} tokens",
            self.executor.describe(),
            cache.blocks,
            cache.block_size
        )
    }
}

/// Sentence embeddings for `/v1/embeddings`: [`kiln_runtime::EmbeddingModel`], the path
/// `kiln embed` takes, so both give the same vectors for the same token ids.
#[derive(Debug, Clone)]
pub struct Embedder {
    model: EmbeddingModel,
}

impl Embedder {
    /// An embedder running `model`.
    pub fn new(model: EmbeddingModel) -> Embedder {
        Embedder { model }
    }

    /// The L2-normalized embedding of every token sequence, in order.
    pub fn embed(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, RunnerError> {
        self.model.embed_ids(sequences).map_err(|e| match e {
            EmbedError::Runtime(e) => RunnerError::Runtime(e),
            other => RunnerError::BadOutput(other.to_string()),
        })
    }

    /// Where the model runs, for the startup log.
    pub fn describe(&self) -> String {
        format!(
            "{} (sentence embeddings, batches of at most {} padded tokens)",
            self.model.describe(),
            kiln_runtime::embed::DEFAULT_BATCH_TOKENS
        )
    }
}
