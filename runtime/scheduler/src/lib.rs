//! Iteration-level continuous-batching scheduler for kiln's serving runtime (host side, no GPU,
//! no async), over the paged KV cache of `kiln-kvcache`.
//!
//! # Step protocol
//! The engine loops: [`Scheduler::schedule`] returns a [`Batch`]; the engine performs the
//! batch's block copies (in order), runs the forward pass over every scheduled sequence's
//! tokens, samples one token for each sequence marked `samples_token`, and reports them with
//! [`Scheduler::on_step_done`]. Requests come in through [`Scheduler::add_request`] and leave by
//! finishing (EOS / stop reported by the engine, or `max_tokens`) or by [`Scheduler::abort`],
//! which is allowed at any time. The scheduler knows tokens, never text or sampling parameters.
//!
//! A request with `n > 1` runs as one sequence until its prompt, except the last token, is
//! computed; it is then forked into `n` sequences sharing those blocks, each of which computes
//! the last prompt token itself (copy-on-write of the shared last block) and samples.
//!
//! # Invariants
//! - Each batch runs at most `max_num_batched_tokens` tokens and at most `max_num_seqs`
//!   sequences, each at most once; decodes come first, then prefill chunks. Running sequences
//!   (counting samples still to be forked) never exceed `max_num_seqs`.
//! - Running sequences hold blocks covering every token they run; waiting sequences hold none.
//!   A preempted sequence frees all its blocks (its computed full blocks stay prefix-cached),
//!   keeps its tokens and is recomputed when readmitted.
//! - Admission follows the policy order and stops at the first sequence that does not fit:
//!   later ones never overtake it. Nothing is admitted in a step that preempted.
//! - Preemption picks the lowest-ranked running sequence: the newest under FCFS, the lowest
//!   priority (newest among equals) under the priority policy.
//! - Every accepted request fits the whole cache on its own (others are refused by
//!   `add_request`), so under FCFS the oldest sequence is never preempted by another and always
//!   progresses: every request finishes.
//! - The queue of requests not yet started is bounded; past the bound `add_request` answers
//!   [`SchedulerError::QueueFull`] at once.

mod batch;
mod config;
mod error;
mod request;
mod scheduler;
mod sequence;

pub use batch::{
    Admission, Batch, FinishedSequence, SampledToken, ScheduledSequence, StepKind, StepOutcome,
};
pub use config::{SchedulerConfig, SchedulingPolicy};
pub use error::SchedulerError;
pub use kiln_kvcache::{BlockCopy, BlockId, BlockSize, KvCacheConfig, SeqId, TokenId};
pub use request::{FinishReason, Request, RequestId};
pub use scheduler::{Scheduler, SchedulerStats};
