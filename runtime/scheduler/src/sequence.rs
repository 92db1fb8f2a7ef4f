//! Internal bookkeeping of requests and their sequences, and the order the policies impose.

use kiln_kvcache::{SeqId, TokenId};

use crate::config::SchedulingPolicy;
use crate::request::RequestId;

/// A queued or running request.
#[derive(Clone, Debug)]
pub(crate) struct RequestState {
    pub(crate) priority: i32,
    /// Order of `add_request` calls; breaks priority ties and defines FCFS.
    pub(crate) arrival: u64,
    pub(crate) max_tokens: usize,
    /// Live (unfinished) sequences, by sample index.
    pub(crate) sequences: Vec<SeqId>,
    /// Whether the request ever got blocks (requests that did not count against the queue bound).
    pub(crate) started: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SeqStatus {
    /// Holds no blocks; queued for (re)admission.
    Waiting,
    /// Holds blocks; scheduled every step the budget allows.
    Running,
}

/// One sample of a request.
#[derive(Clone, Debug)]
pub(crate) struct SequenceState {
    pub(crate) request_id: RequestId,
    pub(crate) sample_index: usize,
    /// Prompt followed by every generated token.
    pub(crate) token_ids: Vec<TokenId>,
    pub(crate) prompt_len: usize,
    /// Leading tokens whose KV is cached (0 while waiting).
    pub(crate) num_computed: usize,
    pub(crate) status: SeqStatus,
    /// Children still to fork off this sequence (n - 1 for a request's first sequence until
    /// its prompt, all but the last token, is computed; then 0).
    pub(crate) forks_pending: usize,
}

impl SequenceState {
    /// Tokens to compute before the next event: sampling, or for a sequence about to fork, the
    /// prompt without its last token (each child computes that token itself and samples).
    pub(crate) fn compute_target(&self) -> usize {
        if self.forks_pending > 0 {
            self.token_ids.len() - 1
        } else {
            self.token_ids.len()
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.compute_target() - self.num_computed
    }

    pub(crate) fn num_generated(&self) -> usize {
        self.token_ids.len() - self.prompt_len
    }

    /// Decoding: exactly the last sampled token is left to compute.
    pub(crate) fn is_decode(&self) -> bool {
        self.forks_pending == 0 && self.num_generated() > 0 && self.remaining() == 1
    }

    /// Running `num_tokens` now ends at the last known token, so the step samples.
    pub(crate) fn samples_after(&self, num_tokens: usize) -> bool {
        self.forks_pending == 0 && self.num_computed + num_tokens == self.token_ids.len()
    }

    /// Sequence slots the sequence will occupy once forked.
    pub(crate) fn slots(&self) -> usize {
        1 + self.forks_pending
    }
}

/// Scheduling order: smaller is served first and preempted last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct QueueKey {
    rank: i64,
    arrival: u64,
    sample_index: usize,
    seq_id: SeqId,
}

impl QueueKey {
    pub(crate) fn new(
        policy: SchedulingPolicy,
        request: &RequestState,
        sample_index: usize,
        seq_id: SeqId,
    ) -> Self {
        let rank = match policy {
            SchedulingPolicy::Fcfs => 0,
            SchedulingPolicy::Priority => i64::from(request.priority),
        };
        QueueKey {
            rank,
            arrival: request.arrival,
            sample_index,
            seq_id,
        }
    }

    pub(crate) fn seq_id(&self) -> SeqId {
        self.seq_id
    }
}
