//! The scheduler proper: admission, per-step planning with preemption, and applying the
//! engine's sampled tokens.

use std::collections::{BTreeMap, BTreeSet};

use kiln_kvcache::{
    BlockCopy, BlockManager, CacheStats, KvCacheConfig, KvCacheError, SeqId, TokenId,
};

use crate::batch::{
    Admission, Batch, FinishedSequence, SampledToken, ScheduledSequence, StepKind, StepOutcome,
};
use crate::config::SchedulerConfig;
use crate::error::SchedulerError;
use crate::request::{FinishReason, Request, RequestId};
use crate::sequence::{QueueKey, RequestState, SeqStatus, SequenceState};

/// Counters and gauges for metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerStats {
    /// Sequences holding blocks.
    pub num_running_seqs: usize,
    /// Sequences queued for (re)admission, preempted ones included.
    pub num_waiting_seqs: usize,
    /// Requests with at least one running sequence (the `num_requests_running` gauge).
    pub num_running_requests: usize,
    /// Requests with no running sequence, preempted ones included (`num_requests_waiting`).
    pub num_waiting_requests: usize,
    /// Requests that have not started yet: what `max_waiting_requests` bounds.
    pub num_queued_requests: usize,
    /// Preemptions since start.
    pub num_preemptions: u64,
    /// The KV cache's counters.
    pub cache: CacheStats,
}

/// Work planned for one sequence in the step being built (and then in flight).
#[derive(Clone, Copy, Debug)]
struct PlannedWork {
    seq_id: SeqId,
    kind: StepKind,
    num_tokens: usize,
    samples_token: bool,
}

/// The step being built by `schedule`.
#[derive(Debug)]
struct StepPlan {
    budget: usize,
    work: Vec<PlannedWork>,
    copies: Vec<(SeqId, BlockCopy)>,
    admitted: Vec<Admission>,
    preempted: Vec<SeqId>,
}

impl StepPlan {
    fn add(&mut self, work: PlannedWork, copies: Vec<BlockCopy>) {
        debug_assert!(work.num_tokens > 0 && work.num_tokens <= self.budget);
        self.budget -= work.num_tokens;
        self.copies
            .extend(copies.into_iter().map(|copy| (work.seq_id, copy)));
        self.work.push(work);
    }

    /// Forgets whatever was planned for a sequence that is being preempted.
    fn undo(&mut self, seq_id: SeqId) {
        if let Some(index) = self.work.iter().position(|work| work.seq_id == seq_id) {
            self.budget += self.work.remove(index).num_tokens;
        }
        self.copies.retain(|&(owner, _)| owner != seq_id);
    }
}

/// Iteration-level continuous-batching scheduler over a paged KV cache. See the crate
/// documentation for the step protocol and the invariants.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    cache: BlockManager,
    requests: BTreeMap<RequestId, RequestState>,
    sequences: BTreeMap<SeqId, SequenceState>,
    /// Sequences without blocks, in policy order.
    waiting: BTreeSet<QueueKey>,
    /// Sequences with blocks, in policy order at the start of every step.
    running: Vec<SeqId>,
    /// The batch handed out by `schedule` and not yet reported.
    in_flight: Option<Vec<PlannedWork>>,
    next_seq_id: u64,
    next_arrival: u64,
    num_preemptions: u64,
    num_unstarted_requests: usize,
}

impl Scheduler {
    /// A scheduler over an empty KV cache of the given shape.
    pub fn new(
        config: SchedulerConfig,
        cache_config: KvCacheConfig,
    ) -> Result<Self, SchedulerError> {
        config.validate()?;
        Ok(Scheduler {
            config,
            cache: BlockManager::new(cache_config)?,
            requests: BTreeMap::new(),
            sequences: BTreeMap::new(),
            waiting: BTreeSet::new(),
            running: Vec::new(),
            in_flight: None,
            next_seq_id: 0,
            next_arrival: 0,
            num_preemptions: 0,
            num_unstarted_requests: 0,
        })
    }

    /// The limits and policy.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The KV-cache block manager (read-only: block tables, reference counts, statistics).
    pub fn cache(&self) -> &BlockManager {
        &self.cache
    }

    /// Gauges and counters for metrics.
    pub fn stats(&self) -> SchedulerStats {
        let running_requests: BTreeSet<RequestId> = self
            .running
            .iter()
            .map(|seq_id| self.sequences[seq_id].request_id)
            .collect();
        SchedulerStats {
            num_running_seqs: self.running.len(),
            num_waiting_seqs: self.waiting.len(),
            num_running_requests: running_requests.len(),
            num_waiting_requests: self.requests.len() - running_requests.len(),
            num_queued_requests: self.num_unstarted_requests,
            num_preemptions: self.num_preemptions,
            cache: self.cache.stats(),
        }
    }

    /// Whether any request is queued or running.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Live sequences of a queued or running request, by sample index (the forked samples
    /// appear once the prompt has been computed).
    pub fn request_sequences(&self, request_id: RequestId) -> Option<&[SeqId]> {
        self.requests
            .get(&request_id)
            .map(|request| request.sequences.as_slice())
    }

    /// Tokens a live sequence has generated so far.
    pub fn output_token_ids(&self, seq_id: SeqId) -> Option<&[TokenId]> {
        self.sequences
            .get(&seq_id)
            .map(|sequence| &sequence.token_ids[sequence.prompt_len..])
    }

    /// Queues a request, or refuses it at once: invalid contents (`is_invalid_request`), a
    /// prompt + max_tokens that could never fit the whole cache (`NeverFits`), or a full queue
    /// (`QueueFull`, checked last so that bad input is always reported as such).
    pub fn add_request(&mut self, request: Request) -> Result<(), SchedulerError> {
        let id = request.id;
        if self.requests.contains_key(&id) {
            return Err(SchedulerError::DuplicateRequest(id));
        }
        if request.prompt_token_ids.is_empty() {
            return Err(SchedulerError::EmptyPrompt(id));
        }
        if request.max_tokens == 0 {
            return Err(SchedulerError::ZeroMaxTokens(id));
        }
        if request.n == 0 || request.n > self.config.max_num_seqs {
            return Err(SchedulerError::InvalidSampleCount {
                request: id,
                n: request.n,
                max_num_seqs: self.config.max_num_seqs,
            });
        }
        let tokens_needed = request.prompt_token_ids.len() + request.max_tokens;
        let tokens_available = self.cache.config().capacity_tokens();
        if tokens_needed > tokens_available {
            return Err(SchedulerError::NeverFits {
                request: id,
                tokens_needed,
                tokens_available,
            });
        }
        if self.num_unstarted_requests >= self.config.max_waiting_requests {
            return Err(SchedulerError::QueueFull {
                limit: self.config.max_waiting_requests,
            });
        }
        let seq_id = self.new_seq_id();
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let prompt_len = request.prompt_token_ids.len();
        let state = RequestState {
            priority: request.priority,
            arrival,
            max_tokens: request.max_tokens,
            sequences: vec![seq_id],
            started: false,
        };
        self.waiting
            .insert(QueueKey::new(self.config.policy, &state, 0, seq_id));
        self.requests.insert(id, state);
        self.sequences.insert(
            seq_id,
            SequenceState {
                request_id: id,
                sample_index: 0,
                token_ids: request.prompt_token_ids,
                prompt_len,
                num_computed: 0,
                status: SeqStatus::Waiting,
                forks_pending: request.n - 1,
            },
        );
        self.num_unstarted_requests += 1;
        Ok(())
    }

    /// Drops a queued or running request and frees every block its sequences hold. Safe at any
    /// time, also between `schedule` and `on_step_done` (its results are then ignored).
    pub fn abort(&mut self, request_id: RequestId) -> Result<(), SchedulerError> {
        let request = self
            .requests
            .remove(&request_id)
            .ok_or(SchedulerError::UnknownRequest(request_id))?;
        for &seq_id in &request.sequences {
            let sequence = self
                .sequences
                .remove(&seq_id)
                .expect("a request's sequences are tracked");
            match sequence.status {
                SeqStatus::Waiting => {
                    let key =
                        QueueKey::new(self.config.policy, &request, sequence.sample_index, seq_id);
                    let was_queued = self.waiting.remove(&key);
                    debug_assert!(was_queued);
                }
                SeqStatus::Running => {
                    self.running.retain(|&running| running != seq_id);
                    self.cache.free_sequence(seq_id)?;
                }
            }
        }
        if !request.started {
            self.num_unstarted_requests -= 1;
        }
        Ok(())
    }

    /// Plans the next step: running decodes first (one token each), then chunks of running
    /// prefills, then new or preempted sequences in policy order, all within the token budget
    /// and the sequence cap. When a running sequence needs a block and none is free, the
    /// lowest-ranked running sequence (the newest under FCFS) is preempted, possibly the
    /// sequence itself; no sequence is admitted in a step that preempted.
    pub fn schedule(&mut self) -> Result<Batch, SchedulerError> {
        if self.in_flight.is_some() {
            return Err(SchedulerError::StepInProgress);
        }
        let mut plan = StepPlan {
            budget: self.config.max_num_batched_tokens,
            work: Vec::new(),
            copies: Vec::new(),
            admitted: Vec::new(),
            preempted: Vec::new(),
        };
        self.sort_running();
        let (decodes, prefills): (Vec<SeqId>, Vec<SeqId>) = self
            .running
            .iter()
            .copied()
            .partition(|seq_id| self.sequences[seq_id].is_decode());
        for seq_id in decodes {
            if plan.budget == 0 {
                break;
            }
            if self.is_running(seq_id) {
                self.plan_running(seq_id, 1, &mut plan)?;
            }
        }
        for seq_id in prefills {
            if plan.budget == 0 {
                break;
            }
            if self.is_running(seq_id) {
                let num_tokens = self.sequences[&seq_id].remaining().min(plan.budget);
                if num_tokens > 0 {
                    self.plan_running(seq_id, num_tokens, &mut plan)?;
                }
            }
        }
        if plan.preempted.is_empty() {
            self.admit_waiting(&mut plan)?;
        }
        self.sort_running();
        self.build_batch(plan)
    }

    /// Applies a finished step: every sequence of the batch gets its tokens marked computed
    /// (full blocks become prefix-cached), sampling sequences get their token, sequences that
    /// hit EOS / stop / `max_tokens` are finished and their blocks freed. A first sequence whose
    /// prompt is now computed is forked into the request's `n` samples. `sampled` must hold
    /// exactly one token for each sampling sequence of the batch that has not been aborted.
    pub fn on_step_done(
        &mut self,
        sampled: &[SampledToken],
    ) -> Result<StepOutcome, SchedulerError> {
        let Some(planned) = self.in_flight.take() else {
            return if sampled.is_empty() {
                Ok(StepOutcome::default())
            } else {
                Err(SchedulerError::NoStepInProgress)
            };
        };
        let tokens = match self.check_sampled(&planned, sampled) {
            Ok(tokens) => tokens,
            Err(error) => {
                self.in_flight = Some(planned);
                return Err(error);
            }
        };
        let mut outcome = StepOutcome::default();
        for work in planned {
            let Some(sequence) = self.sequences.get_mut(&work.seq_id) else {
                continue; // aborted while the step ran
            };
            self.cache.mark_computed(work.seq_id, work.num_tokens)?;
            sequence.num_computed += work.num_tokens;
            if sequence.forks_pending > 0 && sequence.remaining() == 0 {
                self.fork(work.seq_id)?;
            }
            if !work.samples_token {
                continue;
            }
            let sample = tokens[&work.seq_id];
            let sequence = self.sequences.get_mut(&work.seq_id).expect("checked above");
            sequence.token_ids.push(sample.token_id);
            self.cache.append_tokens(work.seq_id, &[sample.token_id])?;
            let max_tokens = self.requests[&sequence.request_id].max_tokens;
            let reason = sample.finish.or_else(|| {
                (sequence.num_generated() >= max_tokens).then_some(FinishReason::Length)
            });
            if let Some(reason) = reason {
                self.finish(work.seq_id, reason, &mut outcome)?;
            }
        }
        Ok(outcome)
    }

    fn check_sampled(
        &self,
        planned: &[PlannedWork],
        sampled: &[SampledToken],
    ) -> Result<BTreeMap<SeqId, SampledToken>, SchedulerError> {
        let mut tokens = BTreeMap::new();
        for &sample in sampled {
            if tokens.insert(sample.seq_id, sample).is_some() {
                return Err(SchedulerError::DuplicateOutput(sample.seq_id));
            }
        }
        let sampling: BTreeSet<SeqId> = planned
            .iter()
            .filter(|work| work.samples_token)
            .map(|work| work.seq_id)
            .collect();
        if let Some(&unexpected) = tokens.keys().find(|seq_id| !sampling.contains(seq_id)) {
            return Err(SchedulerError::UnexpectedOutput(unexpected));
        }
        if let Some(&missing) = sampling
            .iter()
            .find(|seq_id| self.sequences.contains_key(seq_id) && !tokens.contains_key(seq_id))
        {
            return Err(SchedulerError::MissingOutput(missing));
        }
        Ok(tokens)
    }

    /// Reserves slots for `num_tokens` tokens of a running sequence, preempting the
    /// lowest-ranked running sequences while blocks are short.
    fn plan_running(
        &mut self,
        seq_id: SeqId,
        num_tokens: usize,
        plan: &mut StepPlan,
    ) -> Result<(), SchedulerError> {
        loop {
            match self.cache.reserve_slots(seq_id, num_tokens) {
                Ok(copies) => {
                    let sequence = &self.sequences[&seq_id];
                    let kind = if sequence.is_decode() {
                        StepKind::Decode
                    } else {
                        StepKind::Prefill
                    };
                    let work = PlannedWork {
                        seq_id,
                        kind,
                        num_tokens,
                        samples_token: sequence.samples_after(num_tokens),
                    };
                    plan.add(work, copies);
                    return Ok(());
                }
                Err(KvCacheError::OutOfBlocks { .. }) => {
                    let victim = *self
                        .running
                        .last()
                        .expect("the sequence asking for blocks is running");
                    self.preempt(victim, plan)?;
                    if victim == seq_id {
                        return Ok(());
                    }
                }
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// Preemption by recompute: frees every block (computed full blocks stay prefix-cached)
    /// and queues the sequence again under its original rank.
    fn preempt(&mut self, seq_id: SeqId, plan: &mut StepPlan) -> Result<(), SchedulerError> {
        plan.undo(seq_id);
        self.cache.free_sequence(seq_id)?;
        self.running.retain(|&running| running != seq_id);
        let sequence = self.sequences.get_mut(&seq_id).expect("running sequence");
        sequence.status = SeqStatus::Waiting;
        sequence.num_computed = 0;
        let key = self.key_of(seq_id);
        self.waiting.insert(key);
        self.num_preemptions += 1;
        plan.preempted.push(seq_id);
        Ok(())
    }

    /// Gives blocks to waiting sequences in policy order until one does not fit (blocks,
    /// sequence cap or budget): later ones never overtake it.
    fn admit_waiting(&mut self, plan: &mut StepPlan) -> Result<(), SchedulerError> {
        while plan.budget > 0 {
            let Some(seq_id) = self.waiting.first().map(QueueKey::seq_id) else {
                break;
            };
            if self.running_slots() + self.sequences[&seq_id].slots() > self.config.max_num_seqs {
                break;
            }
            let allocation = match self
                .cache
                .allocate_sequence(seq_id, &self.sequences[&seq_id].token_ids)
            {
                Ok(allocation) => allocation,
                Err(KvCacheError::OutOfBlocks { .. }) => break,
                Err(other) => return Err(other.into()),
            };
            self.waiting.pop_first();
            self.running.push(seq_id);
            let sequence = self.sequences.get_mut(&seq_id).expect("queued sequence");
            sequence.status = SeqStatus::Running;
            sequence.num_computed = allocation.num_cached_tokens;
            let request_id = sequence.request_id;
            plan.admitted.push(Admission {
                seq_id,
                request_id,
                num_tokens: sequence.token_ids.len(),
                num_cached_tokens: allocation.num_cached_tokens,
            });
            let fork_now = sequence.forks_pending > 0 && sequence.remaining() == 0;
            let request = self.requests.get_mut(&request_id).expect("live request");
            if !request.started {
                request.started = true;
                self.num_unstarted_requests -= 1;
            }
            let family = if fork_now {
                self.fork(seq_id)?
            } else {
                vec![seq_id]
            };
            for member in family {
                if plan.budget == 0 {
                    return Ok(());
                }
                let sequence = &self.sequences[&member];
                let num_tokens = sequence.remaining().min(plan.budget);
                let samples_token = sequence.samples_after(num_tokens);
                match self.cache.reserve_slots(member, num_tokens) {
                    Ok(copies) => {
                        let work = PlannedWork {
                            seq_id: member,
                            kind: StepKind::Prefill,
                            num_tokens,
                            samples_token,
                        };
                        plan.add(work, copies);
                    }
                    // A forked sample short of a copy-on-write block stays running and gets
                    // its turn (with preemption if need be) next step.
                    Err(KvCacheError::OutOfBlocks { .. }) => return Ok(()),
                    Err(other) => return Err(other.into()),
                }
            }
        }
        Ok(())
    }

    /// Forks a request's first sequence into its `n` samples once its prompt (all but the
    /// last token) is computed. Returns the whole family, the first sequence first.
    fn fork(&mut self, parent: SeqId) -> Result<Vec<SeqId>, SchedulerError> {
        let parent_state = self.sequences.get_mut(&parent).expect("live sequence");
        let num_children = std::mem::take(&mut parent_state.forks_pending);
        let template = parent_state.clone();
        let mut family = vec![parent];
        for sample_index in 1..=num_children {
            let child = self.new_seq_id();
            self.cache.fork(parent, child)?;
            self.sequences.insert(
                child,
                SequenceState {
                    sample_index,
                    ..template.clone()
                },
            );
            self.requests
                .get_mut(&template.request_id)
                .expect("live request")
                .sequences
                .push(child);
            self.running.push(child);
            family.push(child);
        }
        Ok(family)
    }

    fn finish(
        &mut self,
        seq_id: SeqId,
        reason: FinishReason,
        outcome: &mut StepOutcome,
    ) -> Result<(), SchedulerError> {
        self.cache.free_sequence(seq_id)?;
        self.running.retain(|&running| running != seq_id);
        let sequence = self.sequences.remove(&seq_id).expect("live sequence");
        let request_id = sequence.request_id;
        let request = self.requests.get_mut(&request_id).expect("live request");
        request.sequences.retain(|&live| live != seq_id);
        outcome.finished_sequences.push(FinishedSequence {
            seq_id,
            request_id,
            sample_index: sequence.sample_index,
            reason,
            output_token_ids: sequence.token_ids[sequence.prompt_len..].to_vec(),
        });
        if request.sequences.is_empty() {
            self.requests.remove(&request_id);
            outcome.finished_requests.push(request_id);
        }
        Ok(())
    }

    fn build_batch(&mut self, plan: StepPlan) -> Result<Batch, SchedulerError> {
        let mut sequences = Vec::with_capacity(plan.work.len());
        for work in &plan.work {
            let sequence = &self.sequences[&work.seq_id];
            let start = sequence.num_computed;
            sequences.push(ScheduledSequence {
                seq_id: work.seq_id,
                request_id: sequence.request_id,
                sample_index: sequence.sample_index,
                kind: work.kind,
                token_ids: sequence.token_ids[start..start + work.num_tokens].to_vec(),
                first_position: start,
                block_table: self.cache.block_table(work.seq_id)?.to_vec(),
                samples_token: work.samples_token,
            });
        }
        let num_batched_tokens = plan.work.iter().map(|work| work.num_tokens).sum();
        if !plan.work.is_empty() {
            self.in_flight = Some(plan.work);
        }
        Ok(Batch {
            sequences,
            block_copies: plan.copies.into_iter().map(|(_, copy)| copy).collect(),
            admitted: plan.admitted,
            preempted: plan.preempted,
            num_batched_tokens,
        })
    }

    fn is_running(&self, seq_id: SeqId) -> bool {
        self.sequences
            .get(&seq_id)
            .is_some_and(|sequence| sequence.status == SeqStatus::Running)
    }

    /// Sequence slots held by running sequences, counting samples still to be forked.
    fn running_slots(&self) -> usize {
        self.running
            .iter()
            .map(|seq_id| self.sequences[seq_id].slots())
            .sum()
    }

    fn key_of(&self, seq_id: SeqId) -> QueueKey {
        let sequence = &self.sequences[&seq_id];
        let request = &self.requests[&sequence.request_id];
        QueueKey::new(self.config.policy, request, sequence.sample_index, seq_id)
    }

    fn sort_running(&mut self) {
        let mut running = std::mem::take(&mut self.running);
        running.sort_by_cached_key(|&seq_id| self.key_of(seq_id));
        self.running = running;
    }

    fn new_seq_id(&mut self) -> SeqId {
        let seq_id = SeqId(self.next_seq_id);
        self.next_seq_id += 1;
        seq_id
    }
}
