//! The engine: one dedicated thread that owns the scheduler (and through it the KV block
//! manager) and a [`ModelRunner`], and turns requests into token events.
//!
//! # The loop
//! 1. Take commands from the channel (new requests, aborts, cancel, shutdown); with nothing to
//!    run, block on the channel (idle wait).
//! 2. `schedule()` a step; run the step's block copies and the model on its sequences.
//! 3. For each sequence that samples: sample with the request's own [`Sampler`] (per-sample
//!    seed), check end-of-sequence and stop token ids, detokenize incrementally, pass the text
//!    through the stop-string matcher, check `max_tokens`, and send a [`SampleEvent`] to the
//!    request's channel. The last event of a sample carries its finish reason and every piece
//!    of text still held back.
//! 4. Report the tokens with `on_step_done` (finished sequences free their blocks), publish
//!    gauges and statistics.
//!
//! # Aborts
//! A request ends early when its [`RequestStream`] is dropped (the HTTP client went away: the
//! stream's guard sends an abort), or when sending it an event fails. Either way the request is
//! aborted in the scheduler, which frees every block its sequences hold.
//!
//! # The waiting queue
//! The bound on requests that have not started is enforced by [`EngineHandle::submit`] with an
//! atomic count, so a full queue is answered at once even while the engine thread is busy in a
//! long step. A request leaves the count when the scheduler first gives it blocks, or when it
//! ends before that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_runtime::sampling::{
    FinishReason, Sampler, SamplingParams, StopStringMatcher, TokenLogprobs,
};
use kiln_scheduler::{
    Batch, KvCacheConfig, Request, RequestId, SampledToken, Scheduler, SchedulerConfig,
    SchedulerError, SchedulerStats,
};
use tokio::sync::mpsc as async_mpsc;

use crate::codec::{StreamDecoder, TextCodec};
use crate::error::ServerError;
use crate::metrics::{EngineGauges, FinishedRequestTimes, Metrics};
use crate::runner::{ModelRunner, SequenceInput};

/// One prompt to generate for, as the HTTP layer hands it to the engine.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// The tokenized prompt (not empty; shorter than the context).
    pub prompt_token_ids: Vec<u32>,
    /// Sampling parameters, already validated. `seed` seeds sample 0; sample `i` uses
    /// `seed + i`.
    pub params: SamplingParams,
    /// Most tokens each sample generates (prompt + max_tokens fits the context).
    pub max_tokens: usize,
    /// Parallel samples (forked after the prompt is computed).
    pub n: usize,
    /// Scheduling priority (lower first) under the priority policy.
    pub priority: i32,
}

/// One generated token of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleEvent {
    /// Which prompt of the submission (0 for single-prompt requests).
    pub prompt_index: usize,
    /// Which of the prompt's `n` samples.
    pub sample_index: usize,
    /// The token.
    pub token_id: u32,
    /// Text released by this token: empty while a character or a possible stop string is
    /// incomplete; in a sample's last event, everything still held back.
    pub text: String,
    /// The token's logprob and the top alternatives, when asked for.
    pub logprobs: Option<TokenLogprobs>,
    /// Set on the sample's last event.
    pub finish: Option<FinishReason>,
}

/// Why the engine gave up on a request.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineFailure {
    /// The scheduler refused the request (bad input, or a full queue).
    #[error(transparent)]
    Rejected(#[from] SchedulerError),
    /// The model or the sampler failed; not the request's fault.
    #[error("the model failed: {0}")]
    Model(String),
    /// The server is shutting down and cancelled the request.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What a request's channel carries.
#[derive(Clone, Debug, PartialEq)]
pub enum RequestEvent {
    /// A generated token.
    Token(SampleEvent),
    /// The prompt's request ended with an error; no more events come for it.
    Failed {
        /// Which prompt of the submission.
        prompt_index: usize,
        /// What went wrong.
        failure: EngineFailure,
    },
}

/// Why [`EngineHandle::submit`] refused a submission.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full.
    #[error("the waiting queue is full ({limit} requests)")]
    QueueFull {
        /// The queue bound.
        limit: usize,
    },
    /// The engine thread is gone.
    #[error("the engine is not running")]
    Stopped,
}

/// Limits of the engine: the scheduler's, the cache's and the queue bound.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Step budget, sequence cap and policy (its queue bound is set to `max_queue`).
    pub scheduler: SchedulerConfig,
    /// KV-cache blocks.
    pub cache: KvCacheConfig,
    /// Most requests waiting to start.
    pub max_queue: usize,
}

enum EngineCommand {
    Add {
        id: RequestId,
        prompt_index: usize,
        request: Box<GenerationRequest>,
        events: async_mpsc::UnboundedSender<RequestEvent>,
        arrival: Instant,
    },
    Abort(RequestId),
    CancelAll,
    Shutdown,
}

/// State shared by the engine thread and its handles.
#[derive(Debug)]
struct EngineShared {
    max_queue: usize,
    /// Submitted requests that have not started (nor ended).
    pending: AtomicUsize,
    next_request_id: AtomicU64,
    stats: Mutex<Option<SchedulerStats>>,
    alive: AtomicBool,
    steps: AtomicU64,
}

impl EngineShared {
    fn release_pending(&self) {
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// A cloneable handle to the engine thread.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    commands: mpsc::Sender<EngineCommand>,
    shared: Arc<EngineShared>,
}

impl std::fmt::Debug for EngineCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineCommand::Add { id, .. } => write!(f, "Add({id})"),
            EngineCommand::Abort(id) => write!(f, "Abort({id})"),
            EngineCommand::CancelAll => write!(f, "CancelAll"),
            EngineCommand::Shutdown => write!(f, "Shutdown"),
        }
    }
}

impl EngineHandle {
    /// Queues `requests` (one per prompt) and returns the stream of their events; refuses
    /// all of them at once when the queue has no room for all.
    pub fn submit(&self, requests: Vec<GenerationRequest>) -> Result<RequestStream, SubmitError> {
        if !self.shared.alive.load(Ordering::Acquire) {
            return Err(SubmitError::Stopped);
        }
        let count = requests.len();
        let limit = self.shared.max_queue;
        self.shared
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                (pending + count <= limit).then_some(pending + count)
            })
            .map_err(|_| SubmitError::QueueFull { limit })?;
        let (sender, receiver) = async_mpsc::unbounded_channel();
        let arrival = Instant::now();
        let mut ids = Vec::with_capacity(count);
        for (prompt_index, request) in requests.into_iter().enumerate() {
            let id = RequestId(self.shared.next_request_id.fetch_add(1, Ordering::Relaxed));
            let command = EngineCommand::Add {
                id,
                prompt_index,
                request: Box::new(request),
                events: sender.clone(),
                arrival,
            };
            if self.commands.send(command).is_err() {
                for _ in ids.len()..count {
                    self.shared.release_pending();
                }
                return Err(SubmitError::Stopped);
            }
            ids.push(id);
        }
        Ok(RequestStream {
            events: receiver,
            guard: AbortGuard {
                ids,
                commands: self.commands.clone(),
            },
        })
    }

    /// The scheduler's statistics (blocks, queues, preemptions) after the last step.
    pub fn stats(&self) -> Option<SchedulerStats> {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests submitted that have not started yet.
    pub fn num_pending(&self) -> usize {
        self.shared.pending.load(Ordering::Acquire)
    }

    /// Engine steps run so far.
    pub fn num_steps(&self) -> u64 {
        self.shared.steps.load(Ordering::Acquire)
    }

    /// Whether the engine thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Ends every request in flight with [`EngineFailure::ShuttingDown`].
    pub fn cancel_all(&self) {
        let _ = self.commands.send(EngineCommand::CancelAll);
    }

    /// Asks the engine thread to cancel what is left and exit.
    pub fn shutdown(&self) {
        let _ = self.commands.send(EngineCommand::Shutdown);
    }
}

/// Sends an abort for each request when the stream is dropped (finished requests ignore it).
#[derive(Debug)]
struct AbortGuard {
    ids: Vec<RequestId>,
    commands: mpsc::Sender<EngineCommand>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        for &id in &self.ids {
            let _ = self.commands.send(EngineCommand::Abort(id));
        }
    }
}

/// The events of one submission; dropping it aborts whatever is still running.
#[derive(Debug)]
pub struct RequestStream {
    events: async_mpsc::UnboundedReceiver<RequestEvent>,
    guard: AbortGuard,
}

impl RequestStream {
    /// The next event; `None` when the engine dropped the request without finishing it
    /// (it stopped).
    pub async fn next(&mut self) -> Option<RequestEvent> {
        self.events.recv().await
    }

    /// How many prompts the submission had.
    pub fn num_prompts(&self) -> usize {
        self.guard.ids.len()
    }
}

/// Starts the engine thread over a fresh scheduler and cache.
pub fn start_engine(
    config: EngineConfig,
    runner: Box<dyn ModelRunner>,
    codec: TextCodec,
    eos_token_ids: Vec<u32>,
    metrics: Arc<Metrics>,
) -> Result<(EngineHandle, JoinHandle<()>), ServerError> {
    let scheduler_config = SchedulerConfig {
        max_waiting_requests: config.max_queue,
        ..config.scheduler
    };
    let scheduler = Scheduler::new(scheduler_config, config.cache)?;
    let shared = Arc::new(EngineShared {
        max_queue: config.max_queue,
        pending: AtomicUsize::new(0),
        next_request_id: AtomicU64::new(0),
        stats: Mutex::new(Some(scheduler.stats())),
        alive: AtomicBool::new(true),
        steps: AtomicU64::new(0),
    });
    let (commands, receiver) = mpsc::channel();
    let engine = Engine {
        scheduler,
        runner,
        codec,
        eos_token_ids,
        requests: BTreeMap::new(),
        commands: receiver,
        shared: Arc::clone(&shared),
        metrics,
        accepting: true,
        exit: false,
    };
    let thread = std::thread::Builder::new()
        .name("kiln-engine".into())
        .spawn(move || {
            let _alive = AliveFlag(Arc::clone(&engine.shared));
            engine.run();
        })
        .map_err(|e| ServerError::Engine(e.to_string()))?;
    Ok((EngineHandle { commands, shared }, thread))
}

/// Clears the `alive` flag when the engine thread ends, panics included.
struct AliveFlag(Arc<EngineShared>);

impl Drop for AliveFlag {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
    }
}

/// One sample's generation state.
struct SampleState {
    /// Prompt followed by every token generated so far.
    token_ids: Vec<u32>,
    num_generated: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopStringMatcher,
    last_token_at: Option<Instant>,
}

/// A request the scheduler knows.
struct ActiveRequest {
    prompt_index: usize,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    n: usize,
    /// Samples that produced their last token.
    num_finished_samples: usize,
    /// Whether the request's end was counted in the metrics.
    recorded: bool,
    events: async_mpsc::UnboundedSender<RequestEvent>,
    samples: BTreeMap<usize, SampleState>,
    arrival: Instant,
    started_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_finish: &'static str,
}

impl ActiveRequest {
    fn times(&self, now: Instant) -> FinishedRequestTimes {
        FinishedRequestTimes {
            queue_seconds: self
                .started_at
                .unwrap_or(now)
                .duration_since(self.arrival)
                .as_secs_f64(),
            e2e_seconds: now.duration_since(self.arrival).as_secs_f64(),
            ttft_seconds: self
                .first_token_at
                .map(|t| t.duration_since(self.arrival).as_secs_f64()),
            num_output_tokens: self
                .samples
                .values()
                .map(|s| s.num_generated)
                .max()
                .unwrap_or(0),
        }
    }

    /// The state of sample `index`, created on its first step (forked samples start from the
    /// prompt like the first one).
    fn sample(&mut self, index: usize, codec: &TextCodec) -> Result<&mut SampleState, String> {
        if !self.samples.contains_key(&index) {
            let mut params = self.params.clone();
            params.seed = params.seed.map(|seed| seed.wrapping_add(index as u64));
            let sampler = Sampler::new(params, &self.prompt).map_err(|e| e.to_string())?;
            self.samples.insert(
                index,
                SampleState {
                    token_ids: self.prompt.clone(),
                    num_generated: 0,
                    decoder: codec.stream_decoder(&self.prompt, self.params.skip_special_tokens),
                    stops: StopStringMatcher::new(self.params.stop.clone()),
                    sampler,
                    last_token_at: None,
                },
            );
        }
        Ok(self.samples.get_mut(&index).expect("inserted above"))
    }
}

struct Engine {
    scheduler: Scheduler,
    runner: Box<dyn ModelRunner>,
    codec: TextCodec,
    eos_token_ids: Vec<u32>,
    requests: BTreeMap<RequestId, ActiveRequest>,
    commands: mpsc::Receiver<EngineCommand>,
    shared: Arc<EngineShared>,
    metrics: Arc<Metrics>,
    /// False once shutdown began: new requests are refused.
    accepting: bool,
    /// Set by a shutdown command: the loop ends, cancelling what is left.
    exit: bool,
}

/// How long the loop waits for commands when requests exist but none could be scheduled.
const STALLED_WAIT: Duration = Duration::from_millis(5);

impl Engine {
    fn run(mut self) {
        while !self.exit {
            let idle = self.requests.is_empty();
            self.take_commands(idle);
            if !self.exit && !self.requests.is_empty() {
                self.step();
            }
            self.publish();
        }
        self.cancel_all(EngineFailure::ShuttingDown);
        self.publish();
    }

    /// Handles queued commands, first waiting for one when `block`. Sets `exit` on shutdown,
    /// or when every handle is gone and nothing runs.
    fn take_commands(&mut self, block: bool) {
        if block {
            match self.commands.recv() {
                Ok(command) => self.handle(command),
                Err(_) => {
                    self.exit = true;
                    return;
                }
            }
        }
        while !self.exit {
            match self.commands.try_recv() {
                Ok(command) => self.handle(command),
                Err(TryRecvError::Empty) => return,
                // Handles are gone: finish what runs (nobody can add more), then exit.
                Err(TryRecvError::Disconnected) => {
                    self.exit = self.requests.is_empty();
                    return;
                }
            }
        }
    }

    /// Applies one command.
    fn handle(&mut self, command: EngineCommand) {
        match command {
            EngineCommand::Add {
                id,
                prompt_index,
                request,
                events,
                arrival,
            } => self.add(id, prompt_index, *request, events, arrival),
            EngineCommand::Abort(id) => self.abort(id, "abort"),
            EngineCommand::CancelAll => {
                self.accepting = false;
                self.cancel_all(EngineFailure::ShuttingDown);
            }
            EngineCommand::Shutdown => {
                self.accepting = false;
                self.exit = true;
            }
        }
    }

    fn add(
        &mut self,
        id: RequestId,
        prompt_index: usize,
        request: GenerationRequest,
        events: async_mpsc::UnboundedSender<RequestEvent>,
        arrival: Instant,
    ) {
        let refuse = |failure: EngineFailure| {
            let _ = events.send(RequestEvent::Failed {
                prompt_index,
                failure,
            });
        };
        if !self.accepting {
            self.shared.release_pending();
            refuse(EngineFailure::ShuttingDown);
            return;
        }
        if events.is_closed() {
            // The client left before the engine saw the request.
            self.shared.release_pending();
            return;
        }
        let scheduled = Request {
            id,
            prompt_token_ids: request.prompt_token_ids.clone(),
            max_tokens: request.max_tokens,
            priority: request.priority,
            n: request.n,
        };
        if let Err(error) = self.scheduler.add_request(scheduled) {
            self.shared.release_pending();
            refuse(EngineFailure::Rejected(error));
            return;
        }
        self.requests.insert(
            id,
            ActiveRequest {
                prompt_index,
                prompt: request.prompt_token_ids,
                params: request.params,
                max_tokens: request.max_tokens,
                n: request.n,
                num_finished_samples: 0,
                recorded: false,
                events,
                samples: BTreeMap::new(),
                arrival,
                started_at: None,
                first_token_at: None,
                last_finish: "stop",
            },
        );
    }

    /// Drops a request and frees its blocks; `reason` labels it in the metrics.
    fn abort(&mut self, id: RequestId, reason: &'static str) {
        let Some(request) = self.requests.remove(&id) else {
            return;
        };
        let _ = self.scheduler.abort(id);
        if request.started_at.is_none() {
            self.shared.release_pending();
        }
        if !request.recorded {
            self.metrics
                .record_finished(reason, request.times(Instant::now()));
        }
    }

    /// Ends every request with `failure`.
    fn cancel_all(&mut self, failure: EngineFailure) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.fail(id, failure.clone());
        }
    }

    /// Tells the request's client about `failure` and aborts it.
    fn fail(&mut self, id: RequestId, failure: EngineFailure) {
        if let Some(request) = self.requests.get(&id) {
            let _ = request.events.send(RequestEvent::Failed {
                prompt_index: request.prompt_index,
                failure,
            });
        }
        self.abort(id, "abort");
    }

    /// Publishes gauges, then statistics (so whoever sees the statistics sees the gauges).
    fn publish(&self) {
        let stats = self.scheduler.stats();
        let pending = self.shared.pending.load(Ordering::Acquire);
        let not_yet_added = pending.saturating_sub(stats.num_queued_requests);
        self.metrics.set_gauges(EngineGauges {
            num_requests_running: stats.num_running_requests,
            num_requests_waiting: stats.num_waiting_requests + not_yet_added,
            kv_cache_usage: stats.cache.usage(),
            prefix_cache_queries: stats.cache.prefix_cache_queries,
            prefix_cache_hits: stats.cache.prefix_cache_hits,
            num_preemptions: stats.num_preemptions,
        });
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
    }

    /// Schedules and runs one step.
    fn step(&mut self) {
        let batch = match self.scheduler.schedule() {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!("scheduler: {error}");
                self.cancel_all(EngineFailure::Model(format!("scheduler: {error}")));
                return;
            }
        };
        let now = Instant::now();
        for admission in &batch.admitted {
            if let Some(request) = self.requests.get_mut(&admission.request_id) {
                if request.started_at.is_none() {
                    request.started_at = Some(now);
                    self.shared.release_pending();
                    self.metrics.record_prompt_tokens(request.prompt.len());
                }
            }
        }
        if batch.is_empty() {
            // Nothing fits right now (the scheduler never leaves this state for long: running
            // sequences free blocks as they finish). Wait for a command instead of spinning.
            match self.commands.recv_timeout(STALLED_WAIT) {
                Ok(command) => self.handle(command),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            return;
        }
        self.metrics.record_step(batch.num_batched_tokens);
        self.shared.steps.fetch_add(1, Ordering::AcqRel);
        let rows = match self.run_model(&batch) {
            Ok(rows) => rows,
            Err(message) => {
                tracing::error!("model step failed: {message}");
                let ids: BTreeSet<RequestId> =
                    batch.sequences.iter().map(|s| s.request_id).collect();
                for id in ids {
                    self.fail(id, EngineFailure::Model(message.clone()));
                }
                self.report(&[]);
                return;
            }
        };
        let mut sampled = Vec::new();
        let mut gone = BTreeSet::new();
        let sampling = batch.sequences.iter().filter(|s| s.samples_token);
        for (scheduled, row) in sampling.zip(rows) {
            let id = scheduled.request_id;
            if gone.contains(&id) {
                continue;
            }
            match self.sample(id, scheduled.sample_index, row) {
                Ok(token) => sampled.push(SampledToken {
                    seq_id: scheduled.seq_id,
                    ..token
                }),
                Err(SampleError::Disconnected) => {
                    gone.insert(id);
                }
                Err(SampleError::Failed(message)) => {
                    self.fail(id, EngineFailure::Model(message));
                    gone.insert(id);
                }
            }
        }
        for &id in &gone {
            self.abort(id, "abort");
        }
        sampled.retain(|token| {
            batch
                .sequences
                .iter()
                .find(|s| s.seq_id == token.seq_id)
                .is_some_and(|s| !gone.contains(&s.request_id))
        });
        self.report(&sampled);
    }

    /// Runs the block copies and the model; returns one row per sampling sequence: its
    /// greedy token where every sampling sequence takes the plain argmax and the runner
    /// makes it (so the logits stay where the model ran), else its logits.
    fn run_model(&mut self, batch: &Batch) -> Result<Vec<StepRow>, String> {
        for scheduled in &batch.sequences {
            let request = self
                .requests
                .get_mut(&scheduled.request_id)
                .ok_or_else(|| format!("{} is scheduled but unknown", scheduled.request_id))?;
            request.sample(scheduled.sample_index, &self.codec)?;
        }
        let mut inputs = Vec::with_capacity(batch.sequences.len());
        for scheduled in &batch.sequences {
            let sample = &self.requests[&scheduled.request_id].samples[&scheduled.sample_index];
            let end = scheduled.context_len();
            if end > sample.token_ids.len()
                || (scheduled.samples_token && end != sample.token_ids.len())
            {
                return Err(format!(
                    "{} is scheduled up to position {end} but holds {} tokens",
                    scheduled.seq_id,
                    sample.token_ids.len()
                ));
            }
            inputs.push(SequenceInput {
                seq_id: scheduled.seq_id,
                token_ids: &sample.token_ids[..end],
                num_cached_tokens: scheduled.first_position,
                block_table: &scheduled.block_table,
                samples_token: scheduled.samples_token,
            });
        }
        self.runner
            .copy_blocks(&batch.block_copies)
            .map_err(|e| e.to_string())?;
        let plain_argmax = batch.sequences.iter().filter(|s| s.samples_token).all(|s| {
            self.requests[&s.request_id].samples[&s.sample_index]
                .sampler
                .takes_plain_argmax()
        });
        let greedy = if plain_argmax {
            self.runner
                .greedy_tokens(&inputs)
                .map_err(|e| e.to_string())?
        } else {
            None
        };
        let rows: Vec<StepRow> = match greedy {
            Some(tokens) => tokens.into_iter().map(StepRow::Greedy).collect(),
            None => self
                .runner
                .logits(&inputs)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(StepRow::Logits)
                .collect(),
        };
        let expected = inputs.iter().filter(|i| i.samples_token).count();
        if rows.len() != expected {
            return Err(format!(
                "the runner returned {} rows for {expected} sampling sequences",
                rows.len()
            ));
        }
        Ok(rows)
    }

    /// Samples the next token of one sample and sends its event.
    fn sample(
        &mut self,
        id: RequestId,
        sample_index: usize,
        row: StepRow,
    ) -> Result<SampledToken, SampleError> {
        let now = Instant::now();
        let request = self
            .requests
            .get_mut(&id)
            .ok_or_else(|| SampleError::Failed(format!("{id} vanished")))?;
        let max_tokens = request.max_tokens;
        let prompt_index = request.prompt_index;
        let sample = request
            .sample(sample_index, &self.codec)
            .map_err(SampleError::Failed)?;
        let drawn = match row {
            StepRow::Logits(logits) => sample
                .sampler
                .sample(&logits)
                .map_err(|e| SampleError::Failed(e.to_string()))?,
            StepRow::Greedy(token) => sample.sampler.accept_argmax(token),
        };
        let token = drawn.token;
        sample.token_ids.push(token);
        sample.num_generated += 1;
        let params = sample.sampler.params();
        let mut finish = if !params.ignore_eos && self.eos_token_ids.contains(&token) {
            Some(FinishReason::Eos)
        } else if params.stop_token_ids.contains(&token) {
            Some(FinishReason::StopToken(token))
        } else {
            None
        };
        let mut text = String::new();
        let failed = |e: kiln_runtime::TokenizerError| SampleError::Failed(e.to_string());
        if finish.is_none() {
            let delta = sample.decoder.push(token).map_err(failed)?;
            let outcome = sample.stops.push(&delta);
            text = outcome.released;
            finish = outcome.matched.map(FinishReason::StopString);
        }
        if finish.is_none() && sample.num_generated >= max_tokens {
            finish = Some(FinishReason::Length);
        }
        if let Some(reason) = &finish {
            if !matches!(reason, FinishReason::StopString(_)) {
                // Release what is held back; a stop string can still complete in it.
                let outcome = sample.stops.push(&sample.decoder.finish().map_err(failed)?);
                text.push_str(&outcome.released);
                match outcome.matched {
                    Some(stop) => finish = Some(FinishReason::StopString(stop)),
                    None => text.push_str(&sample.stops.flush()),
                }
            }
        }
        let since_previous = sample
            .last_token_at
            .map(|t| now.duration_since(t).as_secs_f64());
        sample.last_token_at = Some(now);
        self.metrics.record_generated_token(since_previous);
        if request.first_token_at.is_none() {
            request.first_token_at = Some(now);
            self.metrics
                .record_first_token(now.duration_since(request.arrival).as_secs_f64());
        }
        if finish.is_some() {
            request.num_finished_samples += 1;
        }
        let scheduler_finish = finish.as_ref().map(|reason| {
            request.last_finish = reason.openai_name();
            match reason {
                FinishReason::Eos => kiln_scheduler::FinishReason::Eos,
                FinishReason::StopToken(_) | FinishReason::StopString(_) => {
                    kiln_scheduler::FinishReason::Stop
                }
                FinishReason::Length => kiln_scheduler::FinishReason::Length,
            }
        });
        if request.num_finished_samples == request.n && !request.recorded {
            // Counted before the client can see the last token, so a scrape that follows
            // the answer always includes it.
            request.recorded = true;
            self.metrics
                .record_finished(request.last_finish, request.times(now));
        }
        let event = SampleEvent {
            prompt_index,
            sample_index,
            token_id: token,
            text,
            logprobs: drawn.logprobs,
            finish,
        };
        if request.events.send(RequestEvent::Token(event)).is_err() {
            return Err(SampleError::Disconnected);
        }
        Ok(SampledToken {
            seq_id: kiln_scheduler::SeqId(0),
            token_id: token,
            finish: scheduler_finish,
        })
    }

    /// Reports the step's tokens to the scheduler and retires finished requests.
    fn report(&mut self, sampled: &[SampledToken]) {
        match self.scheduler.on_step_done(sampled) {
            Ok(outcome) => {
                let now = Instant::now();
                for id in outcome.finished_requests {
                    if let Some(request) = self.requests.remove(&id) {
                        if !request.recorded {
                            self.metrics
                                .record_finished(request.last_finish, request.times(now));
                        }
                    }
                }
            }
            Err(error) => {
                tracing::error!("scheduler rejected the step's results: {error}");
                self.cancel_all(EngineFailure::Model(format!("scheduler: {error}")));
                // Every sequence is aborted now, so the step can be closed with no tokens.
                let _ = self.scheduler.on_step_done(&[]);
            }
        }
    }
}

/// What the model gave a sampling sequence in one step.
enum StepRow {
    /// The logits of its last position.
    Logits(Vec<f32>),
    /// The argmax of those logits, for a sampler that takes the plain argmax.
    Greedy(u32),
}

/// Why one sample could not advance.
enum SampleError {
    /// The client is gone; the request is aborted.
    Disconnected,
    /// Sampling or detokenization failed.
    Failed(String),
}
