//! Errors of the scheduler: requests refused at admission, and misuse of the step protocol.

use kiln_kvcache::{KvCacheError, SeqId};
use thiserror::Error;

use crate::request::RequestId;

/// Everything the scheduler can refuse or report.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SchedulerError {
    /// The scheduler configuration is unusable.
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(String),
    /// A request with this id is already queued or running.
    #[error("request {0} already exists")]
    DuplicateRequest(RequestId),
    /// The prompt has no tokens.
    #[error("request {0} has an empty prompt")]
    EmptyPrompt(RequestId),
    /// `max_tokens` is zero.
    #[error("request {0} asks for max_tokens = 0; at least 1 token must be generated")]
    ZeroMaxTokens(RequestId),
    /// `n` is zero or larger than the number of sequences one step may hold.
    #[error("request {request} asks for n = {n} samples; allowed are 1 to {max_num_seqs} (max_num_seqs)")]
    InvalidSampleCount {
        /// The request.
        request: RequestId,
        /// Samples asked for.
        n: usize,
        /// The scheduler's sequence cap.
        max_num_seqs: usize,
    },
    /// Prompt + max_tokens could not fit even into an empty KV cache: refused at once.
    #[error(
        "request {request} needs up to {tokens_needed} tokens of KV cache (prompt + max_tokens) \
         but the whole cache holds {tokens_available}"
    )]
    NeverFits {
        /// The request.
        request: RequestId,
        /// Prompt tokens + max_tokens.
        tokens_needed: usize,
        /// Tokens the whole cache holds.
        tokens_available: usize,
    },
    /// The waiting queue is at its bound (the server answers 429).
    #[error("the waiting queue is full ({limit} requests); try again later")]
    QueueFull {
        /// The queue bound.
        limit: usize,
    },
    /// No queued or running request has this id (it finished, was aborted, or never existed).
    #[error("request {0} is not queued or running")]
    UnknownRequest(RequestId),
    /// `schedule` was called before the previous batch was reported with `on_step_done`.
    #[error("the previous batch has not been reported with on_step_done")]
    StepInProgress,
    /// `on_step_done` was given tokens although no batch is in flight.
    #[error("on_step_done was given tokens but no batch is in flight")]
    NoStepInProgress,
    /// A token was reported for a sequence the last batch did not sample.
    #[error("a token was reported for {0}, which the last batch did not sample")]
    UnexpectedOutput(SeqId),
    /// A sequence the last batch sampled got no token.
    #[error("no token was reported for {0}, which the last batch sampled")]
    MissingOutput(SeqId),
    /// Two tokens were reported for one sequence.
    #[error("two tokens were reported for {0}")]
    DuplicateOutput(SeqId),
    /// The KV cache refused an operation the scheduler believed valid.
    #[error(transparent)]
    KvCache(#[from] KvCacheError),
}

impl SchedulerError {
    /// Whether the error refuses a request because of its contents (an HTTP 400): it would be
    /// refused again if resubmitted unchanged.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            SchedulerError::DuplicateRequest(_)
                | SchedulerError::EmptyPrompt(_)
                | SchedulerError::ZeroMaxTokens(_)
                | SchedulerError::InvalidSampleCount { .. }
                | SchedulerError::NeverFits { .. }
        )
    }
}
