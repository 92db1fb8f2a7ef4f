//! What the engine submits (a request) and how a sequence ends.

use std::fmt;

use kiln_kvcache::TokenId;

/// Identifies a request; chosen by the caller, unique among queued and running requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req{}", self.0)
    }
}

/// A generation request as the scheduler sees it: tokens and limits, no sampling parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Caller-chosen id, used by [`crate::Scheduler::abort`].
    pub id: RequestId,
    /// The tokenized prompt (at least one token).
    pub prompt_token_ids: Vec<TokenId>,
    /// Most tokens each sample may generate (at least 1).
    pub max_tokens: usize,
    /// Under [`crate::SchedulingPolicy::Priority`], lower runs first; ignored under FCFS.
    pub priority: i32,
    /// Parallel samples: the prompt is computed once, then forked with copy-on-write.
    pub n: usize,
}

impl Request {
    /// One sample at priority 0.
    pub fn new(id: RequestId, prompt_token_ids: Vec<TokenId>, max_tokens: usize) -> Self {
        Request {
            id,
            prompt_token_ids,
            max_tokens,
            priority: 0,
            n: 1,
        }
    }

    /// The same request with another priority.
    pub fn with_priority(self, priority: i32) -> Self {
        Request { priority, ..self }
    }

    /// The same request with `n` parallel samples.
    pub fn with_n(self, n: usize) -> Self {
        Request { n, ..self }
    }
}

/// Why a sequence stopped generating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FinishReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// A stop string or stop token id matched.
    Stop,
    /// `max_tokens` tokens were generated.
    Length,
}

impl FinishReason {
    /// The OpenAI `finish_reason` value (`"stop"` or `"length"`).
    pub fn openai_name(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}
