//! Scheduler limits and policy.

use crate::error::SchedulerError;

/// Which waiting request is admitted first, and which running sequence is preempted first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SchedulingPolicy {
    /// First come, first served; the newest request is preempted first.
    #[default]
    Fcfs,
    /// Lower `priority` value first, ties by arrival; the lowest priority (newest among equals)
    /// is preempted first.
    Priority,
}

/// Per-step limits, the queue bound and the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most tokens (decode tokens + prefill chunk tokens) one step may run.
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once (so also per step).
    pub max_num_seqs: usize,
    /// Most requests waiting to start; one more is refused with `QueueFull`.
    pub max_waiting_requests: usize,
    /// Admission and preemption order.
    pub policy: SchedulingPolicy,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_waiting_requests: 1024,
            policy: SchedulingPolicy::Fcfs,
        }
    }
}

impl SchedulerConfig {
    /// Checks the limits: all positive, and a step's token budget at least the sequence cap
    /// (so every running decode always fits into a step).
    pub fn validate(&self) -> Result<(), SchedulerError> {
        if self.max_num_seqs == 0 {
            return Err(SchedulerError::InvalidConfig(
                "max_num_seqs must be at least 1".into(),
            ));
        }
        if self.max_waiting_requests == 0 {
            return Err(SchedulerError::InvalidConfig(
                "max_waiting_requests must be at least 1".into(),
            ));
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(SchedulerError::InvalidConfig(format!(
                "max_num_batched_tokens ({}) must be at least max_num_seqs ({}) so that every \
                 running sequence can decode in one step",
                self.max_num_batched_tokens, self.max_num_seqs
            )));
        }
        Ok(())
    }
}
