//! KV-cached execution of a model's `step` entry (models/llama.kiln): [`PagedModel`] builds
//! the inputs of one step over a ragged batch from each sequence's new tokens and cache
//! blocks, and runs it on an [`Executor`] that keeps the paged caches between steps (on the
//! GPU they never leave the device); [`PagedLogits`] is a [`LogitsModel`] for the
//! [`Generator`](crate::Generator) that gives each sequence only the tokens it has not
//! cached yet, managing the blocks itself, and gives greedy requests the step's own argmax.
//!
//! The entry's signature (checked by [`PagedModel::new`]):
//! `step(tokens: i32[T], pos: i32[T], seq: i32[T], slots: i32[T], block_tables: i32[B, MB],
//! last: i32[B], k_cache, v_cache: [L, NB, BS, KV, D]) -> (logits: f32[B, vocab],
//! greedy: i64[B], k_cache, v_cache)`, `greedy` each row's argmax: [`PagedModel::step_greedy`]
//! copies back only those tokens.

use crate::generate::LogitsModel;
use crate::{Executor, FedInput, RuntimeError};
use kiln_ir::{DType, Tensor};
use std::collections::VecDeque;

/// The name of the KV-cached entry of the model programs that have one.
pub const STEP_ENTRY: &str = "step";

/// The step's results that are not caches: its logits, then its greedy tokens.
const LOGITS: usize = 0;
const GREEDY: usize = 1;

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug)]
pub struct StepSequence<'a> {
    /// Every token of the sequence up to and including the last one of this step.
    pub tokens: &'a [u32],
    /// Leading tokens whose keys and values are already in the cache; the step computes
    /// the rest (at least one).
    pub cached: usize,
    /// The sequence's cache blocks: position `p` lives in block `blocks[p / block_size]`.
    pub blocks: &'a [u32],
}

/// The shape of one of the two caches: `[layers, blocks, block_size, kv_heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl CacheShape {
    pub fn dims(&self) -> [usize; 5] {
        [
            self.layers,
            self.blocks,
            self.block_size,
            self.kv_heads,
            self.head_dim,
        ]
    }

    /// Bytes of one cache (keys or values).
    pub fn bytes(&self) -> usize {
        self.dims().iter().product::<usize>() * self.dtype.size_bytes()
    }
}

/// A program's `step` entry with its paged caches, run step by step on an executor (which
/// holds the caches between steps: always pass the same one).
pub struct PagedModel {
    entry: String,
    cache: CacheShape,
    /// Columns of the block-table input: the most blocks one sequence may hold. Fixed, so
    /// that steps of the same batch size have the same shapes (and replay one CUDA graph).
    table_width: usize,
    /// Whether the executor holds the caches (after the first step).
    started: bool,
    /// The sequences of each greedy step submitted and not collected yet, oldest first.
    submitted: VecDeque<usize>,
    /// The sequences of the last step run or submitted: what a chained step's tokens come
    /// from.
    last_rows: Option<usize>,
}

impl PagedModel {
    /// The `entry` of `module` (the executor's program) with caches of `blocks` blocks of
    /// `block_size` tokens, for sequences of at most `max_len` tokens.
    pub fn new(
        module: &kiln_ir::Module,
        entry: &str,
        blocks: usize,
        block_size: usize,
        max_len: usize,
    ) -> Result<PagedModel, RuntimeError> {
        let func = module
            .function(entry)
            .ok_or_else(|| RuntimeError::Input(format!("no entry function `{entry}`")))?;
        let bad = |why: &str| {
            RuntimeError::Input(format!(
                "`{entry}` is not a KV-cached step entry ({why}); expected step(tokens: i32[T], \
                 pos: i32[T], seq: i32[T], slots: i32[T], block_tables: i32[B, MB], last: \
                 i32[B], k_cache, v_cache: [L, NB, BS, KV, D]) -> (f32[B, vocab], i64[B], \
                 k_cache, v_cache)"
            ))
        };
        let params = func.params();
        if params.len() != 8 || func.results().len() != 4 {
            return Err(bad("it takes 8 inputs and returns 4 results"));
        }
        let greedy = func.ty(func.results()[1]);
        if greedy.dtype != DType::I64 || greedy.shape.0.len() != 1 {
            return Err(bad(&format!("its greedy tokens are {greedy}")));
        }
        for (i, rank) in [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (5, 1)] {
            let ty = func.ty(params[i]);
            if ty.dtype != DType::I32 || ty.shape.0.len() != rank {
                return Err(bad(&format!("input {i} is {ty}")));
            }
        }
        let cache_ty = func.ty(params[6]);
        let fixed = |axis: usize| cache_ty.shape.0.get(axis).and_then(|d| d.as_const());
        let (Some(layers), Some(kv_heads), Some(head_dim)) = (fixed(0), fixed(3), fixed(4)) else {
            return Err(bad(&format!("the cache is {cache_ty}")));
        };
        if cache_ty.shape.0.len() != 5 || func.ty(params[7]) != cache_ty {
            return Err(bad(&format!(
                "the caches are {cache_ty} and {}",
                func.ty(params[7])
            )));
        }
        let updated = kiln_ir::in_place_inputs(func);
        if updated[2..] != [Some(6), Some(7)] {
            return Err(bad(
                "its last two results are not the caches updated in place",
            ));
        }
        if let Some(declared) = fixed(2) {
            if declared as usize != block_size {
                return Err(RuntimeError::Input(format!(
                    "`{entry}` is compiled for cache blocks of {declared} tokens, not {block_size} \
                     (the model program's kv_block_size)"
                )));
            }
        }
        if blocks == 0 || block_size == 0 || max_len == 0 {
            return Err(RuntimeError::Input(
                "a paged cache needs at least one block of at least one token".into(),
            ));
        }
        Ok(PagedModel {
            cache: CacheShape {
                layers: layers as usize,
                blocks,
                block_size,
                kv_heads: kv_heads as usize,
                head_dim: head_dim as usize,
                dtype: cache_ty.dtype,
            },
            table_width: max_len.div_ceil(block_size),
            entry: entry.to_string(),
            started: false,
            submitted: VecDeque::new(),
            last_rows: None,
        })
    }

    pub fn cache_shape(&self) -> CacheShape {
        self.cache
    }

    /// The input shapes of a step of `tokens` tokens over `sequences` sequences, in the
    /// entry's order (tokens, positions, sequences, slots, block tables, last tokens, the
    /// two caches): what a run binds the entry's symbolic dims from.
    pub fn step_shapes(&self, tokens: usize, sequences: usize) -> Vec<Vec<usize>> {
        let mut shapes = vec![vec![tokens]; 4];
        shapes.push(vec![sequences, self.table_width]);
        shapes.push(vec![sequences]);
        shapes.extend([self.cache.dims().to_vec(), self.cache.dims().to_vec()]);
        shapes
    }

    /// The most blocks one sequence may hold.
    pub fn table_width(&self) -> usize {
        self.table_width
    }

    /// Runs one step on `executor` and returns the logits of each sequence's last token,
    /// in order.
    pub fn step(
        &mut self,
        executor: &mut dyn Executor,
        batch: &[StepSequence<'_>],
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let logits = self.run(executor, batch, LOGITS)?;
        let [rows, vocab] = logits.shape[..] else {
            return Err(RuntimeError::Input(format!(
                "`{}` returned logits of shape {:?}, expected [B, vocab]",
                self.entry, logits.shape
            )));
        };
        self.check_rows(rows, batch.len())?;
        let values = logits.to_f32_vec();
        Ok(values.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect())
    }

    /// Runs one step on `executor` and returns each sequence's greedy next token (the
    /// argmax of its logits, the lowest id on ties), made by the step itself: on the GPU
    /// only these integers come back, not the logits.
    pub fn step_greedy(
        &mut self,
        executor: &mut dyn Executor,
        batch: &[StepSequence<'_>],
    ) -> Result<Vec<u32>, RuntimeError> {
        self.submit_greedy(executor, batch, false)?;
        self.collect_greedy(executor)
    }

    /// Queues a step like [`PagedModel::step_greedy`] and returns without its tokens, which
    /// [`PagedModel::collect_greedy`] returns, steps in the order they were submitted. On
    /// the GPU the step is launched and the host is free: a decode loop submits the next
    /// step before it collects this one, so the device never waits for the host.
    ///
    /// With `chained`, each sequence's one new token is the greedy token that the step run
    /// or submitted just before made for the same row (the same sequences in the same
    /// order), taken on the executor: the host does not need it to submit this step. The
    /// last entry of each sequence's `tokens` is then not read (any value will do).
    pub fn submit_greedy(
        &mut self,
        executor: &mut dyn Executor,
        batch: &[StepSequence<'_>],
        chained: bool,
    ) -> Result<(), RuntimeError> {
        if chained {
            if self.last_rows != Some(batch.len()) {
                return Err(RuntimeError::Input(format!(
                    "a chained step takes its tokens from the step before, which had {} \
                     sequences, not {}",
                    self.last_rows.map_or("no".into(), |rows| rows.to_string()),
                    batch.len()
                )));
            }
            if let Some(b) = batch.iter().position(|s| s.cached + 1 != s.tokens.len()) {
                return Err(RuntimeError::Input(format!(
                    "sequence {b} of a chained step computes {} tokens; a chained step \
                     computes one token a sequence",
                    batch[b].tokens.len().saturating_sub(batch[b].cached)
                )));
            }
        }
        let mut inputs = self.inputs(executor, batch)?;
        let fed = if chained {
            inputs[0] = None;
            vec![FedInput {
                input: 0,
                result: GREEDY,
            }]
        } else {
            Vec::new()
        };
        executor.submit_kept_outputs(&self.entry, inputs, &[GREEDY], &fed)?;
        self.started = true;
        self.submitted.push_back(batch.len());
        self.last_rows = Some(batch.len());
        Ok(())
    }

    /// The greedy tokens of the oldest step of [`PagedModel::submit_greedy`] not collected
    /// yet, one a sequence of that step.
    pub fn collect_greedy(
        &mut self,
        executor: &mut dyn Executor,
    ) -> Result<Vec<u32>, RuntimeError> {
        let rows = self.submitted.pop_front().ok_or_else(|| {
            RuntimeError::Input(format!(
                "no step of `{}` was submitted that is not collected yet",
                self.entry
            ))
        })?;
        let results = executor.collect_kept_outputs(&self.entry)?;
        let greedy = results
            .into_iter()
            .next()
            .ok_or_else(|| RuntimeError::Input(format!("`{}` returned nothing", self.entry)))?;
        self.check_rows(greedy.shape.first().copied().unwrap_or(0), rows)?;
        greedy
            .to_i64_vec()
            .into_iter()
            .map(|token| {
                u32::try_from(token).map_err(|_| {
                    RuntimeError::Input(format!(
                        "`{}` returned the greedy token {token}, not a vocabulary id",
                        self.entry
                    ))
                })
            })
            .collect()
    }

    /// Runs one step and returns its result `which` ([`LOGITS`] or [`GREEDY`]).
    fn run(
        &mut self,
        executor: &mut dyn Executor,
        batch: &[StepSequence<'_>],
        which: usize,
    ) -> Result<Tensor, RuntimeError> {
        let inputs = self.inputs(executor, batch)?;
        let results = executor.run_kept_outputs(&self.entry, inputs, &[which])?;
        self.started = true;
        self.last_rows = Some(batch.len());
        results
            .into_iter()
            .next()
            .ok_or_else(|| RuntimeError::Input(format!("`{}` returned nothing", self.entry)))
    }

    /// A step's inputs: the six of [`PagedModel::step_inputs`], then the caches (zeros on
    /// the first step, where the executor cannot keep them as zeros itself; kept after).
    fn inputs(
        &mut self,
        executor: &mut dyn Executor,
        batch: &[StepSequence<'_>],
    ) -> Result<Vec<Option<Tensor>>, RuntimeError> {
        let mut inputs: Vec<Option<Tensor>> =
            self.step_inputs(batch)?.into_iter().map(Some).collect();
        let kept_zeros = |executor: &mut dyn Executor| -> Result<bool, RuntimeError> {
            let dims = self.cache.dims();
            Ok(
                executor.keep_zeros(&self.entry, 6, self.cache.dtype, &dims)?
                    && executor.keep_zeros(&self.entry, 7, self.cache.dtype, &dims)?,
            )
        };
        if self.started || kept_zeros(executor)? {
            inputs.extend([None, None]);
        } else {
            let dims = self.cache.dims();
            let zeros =
                Tensor::from_f32(&dims, vec![0.0; dims.iter().product()]).cast(self.cache.dtype);
            inputs.extend([Some(zeros.clone()), Some(zeros)]);
        }
        Ok(inputs)
    }

    /// Checks that a result has a row for each of the step's `sequences`.
    fn check_rows(&self, rows: usize, sequences: usize) -> Result<(), RuntimeError> {
        if rows == sequences {
            Ok(())
        } else {
            Err(RuntimeError::Input(format!(
                "`{}` returned {rows} rows for {sequences} sequences",
                self.entry
            )))
        }
    }

    /// The six step inputs before the caches: tokens, pos, seq, slots, block_tables, last.
    fn step_inputs(&self, batch: &[StepSequence<'_>]) -> Result<Vec<Tensor>, RuntimeError> {
        if batch.is_empty() {
            return Err(RuntimeError::Input(
                "a step needs at least one sequence".into(),
            ));
        }
        let bs = self.cache.block_size;
        let (mut tokens, mut pos, mut seq, mut slots, mut last) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut tables = vec![0i64; batch.len() * self.table_width];
        for (b, s) in batch.iter().enumerate() {
            let len = s.tokens.len();
            if s.cached >= len {
                return Err(RuntimeError::Input(format!(
                    "sequence {b} has {len} tokens, all cached: a step computes at least one"
                )));
            }
            let needed = len.div_ceil(bs);
            if s.blocks.len() < needed || s.blocks.len() > self.table_width {
                return Err(RuntimeError::Input(format!(
                    "sequence {b} has {} cache blocks for {len} tokens (needs {needed}, at most {})",
                    s.blocks.len(),
                    self.table_width
                )));
            }
            if let Some(&block) = s.blocks.iter().find(|&&k| k as usize >= self.cache.blocks) {
                return Err(RuntimeError::Input(format!(
                    "sequence {b} uses block {block}, but the cache has {}",
                    self.cache.blocks
                )));
            }
            for (k, &block) in s.blocks.iter().enumerate() {
                tables[b * self.table_width + k] = i64::from(block);
            }
            for p in s.cached..len {
                tokens.push(i64::from(s.tokens[p]));
                pos.push(p as i64);
                seq.push(b as i64);
                slots.push(i64::from(s.blocks[p / bs]) * bs as i64 + (p % bs) as i64);
            }
            last.push(tokens.len() as i64 - 1);
        }
        let n = tokens.len();
        let int = |shape: &[usize], values: Vec<i64>| Tensor::from_ints(DType::I32, shape, values);
        Ok(vec![
            int(&[n], tokens),
            int(&[n], pos),
            int(&[n], seq),
            int(&[n], slots),
            int(&[batch.len(), self.table_width], tables),
            int(&[batch.len()], last),
        ])
    }
}

/// A [`LogitsModel`] over a [`PagedModel`]: each call's sequences are matched to the
/// sequences of the previous call they extend (the generator passes every request's whole
/// sequence each step), so only their new tokens are computed; a sequence nobody extends
/// any more gives its blocks back.
pub struct PagedLogits<'e> {
    executor: &'e mut dyn Executor,
    model: PagedModel,
    free: Vec<u32>,
    cached: Vec<CachedSequence>,
}

struct CachedSequence {
    tokens: Vec<u32>,
    blocks: Vec<u32>,
}

impl<'e> PagedLogits<'e> {
    /// The `step` entry of the executor's program with a cache of `blocks` blocks of
    /// `block_size` tokens, for sequences of at most `max_len` tokens.
    pub fn new(
        executor: &'e mut dyn Executor,
        blocks: usize,
        block_size: usize,
        max_len: usize,
    ) -> Result<PagedLogits<'e>, RuntimeError> {
        let model = PagedModel::new(executor.module(), STEP_ENTRY, blocks, block_size, max_len)?;
        let free = (0..model.cache.blocks as u32).rev().collect();
        Ok(PagedLogits {
            executor,
            model,
            free,
            cached: Vec::new(),
        })
    }

    pub fn model(&self) -> &PagedModel {
        &self.model
    }

    /// Where the model runs, for messages.
    pub fn describe(&self) -> String {
        self.executor.describe()
    }
}

impl LogitsModel for PagedLogits<'_> {
    fn last_logits(&mut self, sequences: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.run_step(sequences, PagedModel::step)
    }

    fn last_greedy(&mut self, sequences: &[Vec<i64>]) -> Option<Result<Vec<u32>, RuntimeError>> {
        Some(self.run_step(sequences, PagedModel::step_greedy))
    }
}

impl PagedLogits<'_> {
    /// Runs `step` (logits or greedy tokens) over `sequences`, each computing only what its
    /// cached sequence does not hold, with the blocks of the sequences nobody extends any
    /// more given back; after an error nothing is known to be cached.
    fn run_step<T>(
        &mut self,
        sequences: &[Vec<i64>],
        step: fn(
            &mut PagedModel,
            &mut dyn Executor,
            &[StepSequence<'_>],
        ) -> Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        let mut tokens = Vec::with_capacity(sequences.len());
        for (i, s) in sequences.iter().enumerate() {
            let ids: Result<Vec<u32>, _> = s.iter().map(|&t| u32::try_from(t)).collect();
            tokens.push(ids.map_err(|_| {
                RuntimeError::Input(format!("sequence {i} holds a negative token id"))
            })?);
        }
        // Each sequence takes the longest unclaimed cached sequence it extends.
        let mut previous: Vec<Option<CachedSequence>> = std::mem::take(&mut self.cached)
            .into_iter()
            .map(Some)
            .collect();
        let mut entries = Vec::with_capacity(tokens.len());
        for t in &tokens {
            let best = previous
                .iter()
                .enumerate()
                .filter_map(|(k, c)| c.as_ref().map(|c| (k, c)))
                .filter(|(_, c)| c.tokens.len() <= t.len() && t.starts_with(&c.tokens))
                .max_by_key(|(_, c)| c.tokens.len())
                .map(|(k, _)| k);
            entries.push(best.and_then(|k| previous[k].take()));
        }
        for unused in previous.into_iter().flatten() {
            self.free.extend(unused.blocks);
        }
        let bs = self.model.cache.block_size;
        let mut claimed = Vec::with_capacity(tokens.len());
        for (t, entry) in tokens.iter().zip(entries) {
            let (mut blocks, cached) = match entry {
                // At least the last token is computed (its logits are wanted).
                Some(e) => (e.blocks, e.tokens.len().min(t.len() - 1)),
                None => (Vec::new(), 0),
            };
            while blocks.len() < t.len().div_ceil(bs) {
                match self.free.pop() {
                    Some(block) => blocks.push(block),
                    None => {
                        self.free.extend(blocks);
                        for (blocks, _) in claimed {
                            self.free.extend::<Vec<u32>>(blocks);
                        }
                        return Err(RuntimeError::Input(format!(
                            "the KV cache's {} blocks of {bs} tokens are all in use",
                            self.model.cache.blocks
                        )));
                    }
                }
            }
            claimed.push((blocks, cached));
        }
        let batch: Vec<StepSequence<'_>> = tokens
            .iter()
            .zip(&claimed)
            .map(|(t, (blocks, cached))| StepSequence {
                tokens: t,
                cached: *cached,
                blocks,
            })
            .collect();
        let ran = step(&mut self.model, &mut *self.executor, &batch);
        match ran {
            Ok(rows) => {
                self.cached = tokens
                    .into_iter()
                    .zip(claimed)
                    .map(|(tokens, (blocks, _))| CachedSequence { tokens, blocks })
                    .collect();
                Ok(rows)
            }
            Err(e) => {
                // Nothing is known to be cached after a failed step.
                for (blocks, _) in claimed {
                    self.free.extend(blocks);
                }
                Err(e)
            }
        }
    }
}
