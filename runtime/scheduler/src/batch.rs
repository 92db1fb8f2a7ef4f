//! The step protocol's data: the batch `schedule()` hands to the engine, the tokens the engine
//! reports back to `on_step_done()`, and what finished.

use std::ops::Range;

use kiln_kvcache::{BlockCopy, BlockId, BlockSize, SeqId, TokenId};

use crate::request::{FinishReason, RequestId};

/// Whether a scheduled sequence runs part of its prompt or one generated token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A chunk of tokens not computed yet: the prompt, or prompt + generated tokens when a
    /// preempted sequence is recomputed.
    Prefill,
    /// The one token sampled in the previous step.
    Decode,
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSequence {
    /// The sequence.
    pub seq_id: SeqId,
    /// The request it belongs to.
    pub request_id: RequestId,
    /// Which of the request's `n` samples this is (0 for the first).
    pub sample_index: usize,
    /// Prefill chunk or decode token.
    pub kind: StepKind,
    /// Tokens to run, at positions `first_position..first_position + token_ids.len()`.
    pub token_ids: Vec<TokenId>,
    /// Position of the first token (the number of tokens whose KV is already cached).
    pub first_position: usize,
    /// The sequence's whole block table; it covers every position up to the last one run.
    pub block_table: Vec<BlockId>,
    /// Whether the engine samples a token from the last position (only the last chunk of a
    /// prefill, and every decode).
    pub samples_token: bool,
}

impl ScheduledSequence {
    /// Positions of the tokens run this step.
    pub fn positions(&self) -> Range<usize> {
        self.first_position..self.first_position + self.token_ids.len()
    }

    /// Tokens the attention of the last position sees (cached + run now).
    pub fn context_len(&self) -> usize {
        self.first_position + self.token_ids.len()
    }

    /// Cache slot (`block * block_size + offset`) each token's K and V are written to.
    pub fn slot_mapping(&self, block_size: BlockSize) -> Vec<usize> {
        let block_size = block_size.tokens();
        self.positions()
            .map(|position| {
                self.block_table[position / block_size].index() * block_size + position % block_size
            })
            .collect()
    }
}

/// A sequence that got its blocks this step, with what the prefix cache supplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The sequence.
    pub seq_id: SeqId,
    /// Its request.
    pub request_id: RequestId,
    /// Tokens looked up in the prefix cache (the prompt, or prompt + generated on recompute).
    pub num_tokens: usize,
    /// Of those, tokens found cached (the first prefill chunk starts there).
    pub num_cached_tokens: usize,
}

/// What one engine step must run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Scheduled sequences: decodes first, then prefill chunks.
    pub sequences: Vec<ScheduledSequence>,
    /// Copy-on-write block copies to perform, in order, before the forward pass.
    pub block_copies: Vec<BlockCopy>,
    /// Sequences that were given blocks this step.
    pub admitted: Vec<Admission>,
    /// Sequences preempted this step (their blocks were freed; they will be recomputed).
    pub preempted: Vec<SeqId>,
    /// Tokens run this step (sum over `sequences`), at most `max_num_batched_tokens`.
    pub num_batched_tokens: usize,
}

impl Batch {
    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }
}

/// The token the engine sampled for one sequence of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampledToken {
    /// The sequence (its entry in the batch had `samples_token`).
    pub seq_id: SeqId,
    /// The sampled token.
    pub token_id: TokenId,
    /// Set when the engine saw the sequence end (EOS, stop string or stop token). Reaching
    /// `max_tokens` is detected by the scheduler.
    pub finish: Option<FinishReason>,
}

impl SampledToken {
    /// A token after which generation goes on (unless `max_tokens` is reached).
    pub fn new(seq_id: SeqId, token_id: TokenId) -> Self {
        SampledToken {
            seq_id,
            token_id,
            finish: None,
        }
    }

    /// A token that ends the sequence.
    pub fn finishing(seq_id: SeqId, token_id: TokenId, reason: FinishReason) -> Self {
        SampledToken {
            seq_id,
            token_id,
            finish: Some(reason),
        }
    }
}

/// A sequence that finished in the step just reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishedSequence {
    /// The sequence.
    pub seq_id: SeqId,
    /// Its request.
    pub request_id: RequestId,
    /// Which of the request's samples it was.
    pub sample_index: usize,
    /// Why it stopped.
    pub reason: FinishReason,
    /// Every token it generated, the last one included.
    pub output_token_ids: Vec<TokenId>,
}

/// What `on_step_done` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Sequences that finished (their blocks are freed).
    pub finished_sequences: Vec<FinishedSequence>,
    /// Requests all of whose samples have now finished.
    pub finished_requests: Vec<RequestId>,
}
