//! A simulated engine for the scheduler tests: a device KV cache of (token, position) slots that
//! the batches write and read, so that wrong block tables, prefix hits or copies show up as
//! wrong KV, plus a deterministic sampler and checks shared by the test files.

#![allow(dead_code)]

use std::collections::BTreeMap;

use kiln_scheduler::{
    Batch, BlockSize, FinishReason, Request, RequestId, SampledToken, Scheduler, SeqId, StepKind,
    StepOutcome, TokenId,
};

/// Token the simulated model samples after the token at `position` of `seq`.
pub fn sampled_token(seq_id: SeqId, position: usize) -> TokenId {
    let mixed = (seq_id.0 as usize)
        .wrapping_mul(0x9e37_79b9)
        .wrapping_add(position.wrapping_mul(0x85eb_ca6b));
    (mixed % 1000) as TokenId + 50_000
}

/// Simulated engine: device slots, the prompt of every request, and what each sequence's
/// tokens must be.
pub struct SimEngine {
    block_size: usize,
    slots: Vec<Option<(TokenId, usize)>>,
    prompts: BTreeMap<RequestId, Vec<TokenId>>,
    /// Expected tokens of every sequence seen so far (prompt + sampled).
    pub expected_tokens: BTreeMap<SeqId, Vec<TokenId>>,
    /// A sequence ends with EOS when its sampled token is divisible by this (0: never).
    pub eos_divisor: TokenId,
}

impl SimEngine {
    pub fn new(scheduler: &Scheduler) -> Self {
        let config = scheduler.cache().config();
        SimEngine {
            block_size: config.block_size.tokens(),
            slots: vec![None; config.capacity_tokens()],
            prompts: BTreeMap::new(),
            expected_tokens: BTreeMap::new(),
            eos_divisor: 0,
        }
    }

    /// Adds a request to the scheduler and remembers its prompt.
    pub fn submit(
        &mut self,
        scheduler: &mut Scheduler,
        request: Request,
    ) -> Result<(), kiln_scheduler::SchedulerError> {
        let id = request.id;
        let prompt = request.prompt_token_ids.clone();
        scheduler.add_request(request)?;
        self.prompts.insert(id, prompt);
        Ok(())
    }

    fn slot(&self, block_table: &[kiln_scheduler::BlockId], position: usize) -> usize {
        block_table[position / self.block_size].index() * self.block_size
            + position % self.block_size
    }

    /// Runs a batch like a model would: copies, KV writes, attention reads, sampling. Panics
    /// when a sequence would read KV that is not its own.
    pub fn run(&mut self, batch: &Batch) -> Vec<SampledToken> {
        for copy in &batch.block_copies {
            for offset in 0..self.block_size {
                self.slots[copy.dst.index() * self.block_size + offset] =
                    self.slots[copy.src.index() * self.block_size + offset];
            }
        }
        let mut sampled = Vec::new();
        for entry in &batch.sequences {
            let prompt = &self.prompts[&entry.request_id];
            let expected = self
                .expected_tokens
                .entry(entry.seq_id)
                .or_insert_with(|| prompt.clone());
            assert_eq!(
                entry.token_ids,
                expected[entry.positions()],
                "{} runs the wrong tokens",
                entry.seq_id
            );
            assert!(
                entry.block_table.len() * self.block_size >= entry.context_len(),
                "block table too short"
            );
            assert_eq!(
                entry
                    .slot_mapping(BlockSize::try_from(self.block_size).unwrap())
                    .len(),
                entry.token_ids.len()
            );
            assert_eq!(
                entry.samples_token,
                entry.context_len() == expected.len(),
                "{} samples at the wrong chunk",
                entry.seq_id
            );
            let expected = expected.clone();
            for position in entry.positions() {
                let slot = self.slot(&entry.block_table, position);
                self.slots[slot] = Some((expected[position], position));
            }
            for (position, &token) in expected.iter().enumerate().take(entry.context_len()) {
                let slot = self.slot(&entry.block_table, position);
                assert_eq!(
                    self.slots[slot],
                    Some((token, position)),
                    "{} reads wrong KV at position {position}",
                    entry.seq_id
                );
            }
            if entry.samples_token {
                let token = sampled_token(entry.seq_id, entry.context_len());
                self.expected_tokens
                    .get_mut(&entry.seq_id)
                    .expect("inserted above")
                    .push(token);
                let eos = self.eos_divisor != 0 && token.is_multiple_of(self.eos_divisor);
                sampled.push(if eos {
                    SampledToken::finishing(entry.seq_id, token, FinishReason::Eos)
                } else {
                    SampledToken::new(entry.seq_id, token)
                });
            }
        }
        sampled
    }

    /// One full engine step.
    pub fn step(&mut self, scheduler: &mut Scheduler) -> (Batch, StepOutcome) {
        let batch = scheduler.schedule().unwrap();
        check_batch(scheduler, &batch);
        let sampled = self.run(&batch);
        let outcome = scheduler.on_step_done(&sampled).unwrap();
        check_cache(scheduler);
        (batch, outcome)
    }
}

/// Limits every batch must respect.
pub fn check_batch(scheduler: &Scheduler, batch: &Batch) {
    let config = scheduler.config();
    let total: usize = batch
        .sequences
        .iter()
        .map(|entry| entry.token_ids.len())
        .sum();
    assert_eq!(total, batch.num_batched_tokens);
    assert!(
        batch.num_batched_tokens <= config.max_num_batched_tokens,
        "token budget exceeded"
    );
    assert!(
        batch.sequences.len() <= config.max_num_seqs,
        "sequence cap exceeded"
    );
    assert!(scheduler.stats().num_running_seqs <= config.max_num_seqs);
    let mut seen = std::collections::BTreeSet::new();
    for entry in &batch.sequences {
        assert!(
            seen.insert(entry.seq_id),
            "{} scheduled twice",
            entry.seq_id
        );
        assert!(!entry.token_ids.is_empty());
        if entry.kind == StepKind::Decode {
            assert_eq!(entry.token_ids.len(), 1);
            assert!(entry.samples_token);
        }
        assert!(
            !batch.preempted.contains(&entry.seq_id),
            "preempted but scheduled"
        );
    }
    let first_prefill = batch
        .sequences
        .iter()
        .position(|entry| entry.kind == StepKind::Prefill)
        .unwrap_or(batch.sequences.len());
    assert!(
        batch.sequences[first_prefill..]
            .iter()
            .all(|entry| entry.kind == StepKind::Prefill),
        "a decode after a prefill"
    );
    if !batch.preempted.is_empty() {
        assert!(
            batch.admitted.is_empty(),
            "admitted in a step that preempted"
        );
    }
}

/// Block accounting, recomputed from the outside.
pub fn check_cache(scheduler: &Scheduler) {
    let cache = scheduler.cache();
    cache.verify().unwrap();
    let mut references: BTreeMap<u32, u32> = BTreeMap::new();
    for seq in cache.sequence_ids() {
        for block in cache.block_table(seq).unwrap() {
            *references.entry(block.0).or_default() += 1;
        }
    }
    let stats = cache.stats();
    assert_eq!(
        references.len() + stats.num_free_blocks,
        stats.num_blocks,
        "free + used != total"
    );
    for block in 0..stats.num_blocks as u32 {
        let expected = references.get(&block).copied().unwrap_or(0);
        assert_eq!(
            cache.ref_count(kiln_scheduler::BlockId(block)).unwrap(),
            expected,
            "block {block}: reference count != block-table references"
        );
    }
}

/// Consecutive tokens starting at `first`.
pub fn tokens(first: TokenId, len: usize) -> Vec<TokenId> {
    (first..first + len as TokenId).collect()
}
