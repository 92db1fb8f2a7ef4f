//! Behaviour tests of the scheduler, one per rule of SERVING.md's scheduler section, driven
//! through the public step protocol with a simulated engine.

mod common;

use common::{tokens, SimEngine};
use kiln_scheduler::{
    BlockSize, FinishReason, KvCacheConfig, Request, RequestId, SampledToken, Scheduler,
    SchedulerConfig, SchedulerError, SchedulingPolicy, SeqId, StepKind,
};

fn scheduler(
    max_num_batched_tokens: usize,
    max_num_seqs: usize,
    num_blocks: usize,
    block_size: BlockSize,
    policy: SchedulingPolicy,
) -> Scheduler {
    let config = SchedulerConfig {
        max_num_batched_tokens,
        max_num_seqs,
        max_waiting_requests: 16,
        policy,
    };
    Scheduler::new(
        config,
        KvCacheConfig::new(num_blocks).with_block_size(block_size),
    )
    .unwrap()
}

fn fcfs(max_num_batched_tokens: usize, max_num_seqs: usize, num_blocks: usize) -> Scheduler {
    scheduler(
        max_num_batched_tokens,
        max_num_seqs,
        num_blocks,
        BlockSize::Tokens16,
        SchedulingPolicy::Fcfs,
    )
}

fn request(id: u64, prompt_len: usize, max_tokens: usize) -> Request {
    Request::new(
        RequestId(id),
        tokens(id as u32 * 1000, prompt_len),
        max_tokens,
    )
}

/// (request, kind, positions, samples) of every sequence in a batch.
fn shape(batch: &kiln_scheduler::Batch) -> Vec<(u64, StepKind, std::ops::Range<usize>, bool)> {
    batch
        .sequences
        .iter()
        .map(|entry| {
            (
                entry.request_id.0,
                entry.kind,
                entry.positions(),
                entry.samples_token,
            )
        })
        .collect()
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_and_only_the_last_chunk_samples() {
    let mut scheduler = fcfs(16, 4, 64);
    let mut engine = SimEngine::new(&scheduler);
    engine.submit(&mut scheduler, request(1, 40, 2)).unwrap();
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(shape(&batch), vec![(1, StepKind::Prefill, 0..16, false)]);
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(shape(&batch), vec![(1, StepKind::Prefill, 16..32, false)]);
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(shape(&batch), vec![(1, StepKind::Prefill, 32..40, true)]);
    let (batch, outcome) = engine.step(&mut scheduler);
    assert_eq!(shape(&batch), vec![(1, StepKind::Decode, 40..41, true)]);
    assert_eq!(outcome.finished_requests, vec![RequestId(1)]);
    assert_eq!(outcome.finished_sequences[0].reason, FinishReason::Length);
    assert_eq!(outcome.finished_sequences[0].output_token_ids.len(), 2);
    assert!(!scheduler.has_unfinished_requests());
    assert_eq!(scheduler.cache().num_free_blocks(), 64);
}

#[test]
fn decodes_go_first_and_prefill_chunks_fill_the_rest_of_the_budget() {
    let mut scheduler = fcfs(16, 4, 64);
    let mut engine = SimEngine::new(&scheduler);
    engine.submit(&mut scheduler, request(1, 10, 10)).unwrap();
    engine.step(&mut scheduler);
    engine.submit(&mut scheduler, request(2, 30, 10)).unwrap();
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(
        shape(&batch),
        vec![
            (1, StepKind::Decode, 10..11, true),
            (2, StepKind::Prefill, 0..15, false)
        ]
    );
    assert_eq!(batch.num_batched_tokens, 16);
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(
        shape(&batch),
        vec![
            (1, StepKind::Decode, 11..12, true),
            (2, StepKind::Prefill, 15..30, true)
        ]
    );
}

#[test]
fn the_token_budget_is_shared_out_in_arrival_order() {
    let mut scheduler = fcfs(8, 8, 64);
    let mut engine = SimEngine::new(&scheduler);
    for id in 1..=3 {
        engine.submit(&mut scheduler, request(id, 5, 4)).unwrap();
    }
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(
        shape(&batch),
        vec![
            (1, StepKind::Prefill, 0..5, true),
            (2, StepKind::Prefill, 0..3, false)
        ]
    );
    assert_eq!(scheduler.stats().num_waiting_requests, 1);
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(
        shape(&batch),
        vec![
            (1, StepKind::Decode, 5..6, true),
            (2, StepKind::Prefill, 3..5, true),
            (3, StepKind::Prefill, 0..5, true)
        ]
    );
    assert_eq!(batch.num_batched_tokens, 8);
}

#[test]
fn the_sequence_cap_holds_back_admissions() {
    let mut scheduler = fcfs(64, 2, 64);
    let mut engine = SimEngine::new(&scheduler);
    engine.submit(&mut scheduler, request(1, 5, 1)).unwrap();
    engine.submit(&mut scheduler, request(2, 5, 3)).unwrap();
    engine.submit(&mut scheduler, request(3, 5, 3)).unwrap();
    let (batch, outcome) = engine.step(&mut scheduler);
    assert_eq!(batch.sequences.len(), 2);
    assert_eq!(outcome.finished_requests, vec![RequestId(1)]);
    assert_eq!(scheduler.stats().num_waiting_seqs, 1);
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(
        shape(&batch),
        vec![
            (2, StepKind::Decode, 5..6, true),
            (3, StepKind::Prefill, 0..5, true)
        ]
    );
}

/// Admission order of single-step requests on a one-sequence scheduler.
fn admission_order(policy: SchedulingPolicy, priorities: &[i32]) -> Vec<u64> {
    let mut scheduler = scheduler(64, 1, 64, BlockSize::Tokens16, policy);
    let mut engine = SimEngine::new(&scheduler);
    for (id, &priority) in priorities.iter().enumerate() {
        let request = request(id as u64, 4, 1).with_priority(priority);
        engine.submit(&mut scheduler, request).unwrap();
    }
    let mut order = Vec::new();
    while scheduler.has_unfinished_requests() {
        let (batch, _) = engine.step(&mut scheduler);
        order.extend(
            batch
                .admitted
                .iter()
                .map(|admission| admission.request_id.0),
        );
    }
    order
}

#[test]
fn priority_policy_admits_lower_values_first_and_ties_by_arrival() {
    assert_eq!(
        admission_order(SchedulingPolicy::Priority, &[5, 1, 3, 1, -2]),
        vec![4, 1, 3, 2, 0]
    );
    assert_eq!(
        admission_order(SchedulingPolicy::Fcfs, &[5, 1, 3, 1, -2]),
        vec![0, 1, 2, 3, 4]
    );
}

/// Three requests filling a 6-block cache of 8-token blocks: the first needs a new block on its
/// third step. Returns the scheduler after that step, with its batch.
fn fill_cache_then_grow(
    policy: SchedulingPolicy,
    priorities: [i32; 3],
) -> (Scheduler, SimEngine, kiln_scheduler::Batch) {
    let mut scheduler = scheduler(64, 8, 6, BlockSize::Tokens8, policy);
    let mut engine = SimEngine::new(&scheduler);
    let prompts = [15, 12, 12];
    let max_tokens = [3, 20, 20];
    for id in 0..3 {
        let request = request(id, prompts[id as usize], max_tokens[id as usize])
            .with_priority(priorities[id as usize]);
        engine.submit(&mut scheduler, request).unwrap();
    }
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(batch.admitted.len(), 3);
    assert_eq!(scheduler.cache().num_free_blocks(), 0);
    // Waits behind the full cache from now on.
    engine.submit(&mut scheduler, request(3, 9, 5)).unwrap();
    let (batch, _) = engine.step(&mut scheduler);
    assert!(batch.preempted.is_empty() && batch.admitted.is_empty());
    let (batch, _) = engine.step(&mut scheduler);
    (scheduler, engine, batch)
}

#[test]
fn fcfs_preempts_the_newest_and_requeues_it_at_the_front_to_hit_the_prefix_cache() {
    let (mut scheduler, mut engine, batch) = fill_cache_then_grow(SchedulingPolicy::Fcfs, [0; 3]);
    let preempted_seq = scheduler_seq_of(&batch, 2);
    assert_eq!(batch.preempted.len(), 1);
    assert!(
        preempted_seq.is_none(),
        "the preempted request does not run"
    );
    assert_eq!(
        shape(&batch),
        vec![
            (0, StepKind::Decode, 16..17, true),
            (1, StepKind::Decode, 13..14, true)
        ]
    );
    assert!(
        batch.admitted.is_empty(),
        "no admission in a step that preempted"
    );
    let stats = scheduler.stats();
    assert_eq!(stats.num_preemptions, 1);
    // Request 0 finished this step; 1 runs; 2 (preempted) and 3 (never started) wait.
    assert_eq!(
        (stats.num_running_requests, stats.num_waiting_requests),
        (1, 2)
    );
    assert_eq!(stats.num_queued_requests, 1);
    // Request 0 finished (max_tokens 3) and freed its blocks; the preempted request 2 comes
    // back before request 3, which has waited longer, and hits its own computed block.
    let (batch, _) = engine.step(&mut scheduler);
    let admitted: Vec<(u64, usize, usize)> = batch
        .admitted
        .iter()
        .map(|admission| {
            (
                admission.request_id.0,
                admission.num_tokens,
                admission.num_cached_tokens,
            )
        })
        .collect();
    assert_eq!(admitted, vec![(2, 14, 8), (3, 9, 0)]);
    assert_eq!(
        shape(&batch),
        vec![
            (1, StepKind::Decode, 14..15, true),
            (2, StepKind::Prefill, 8..14, true),
            (3, StepKind::Prefill, 0..9, true)
        ]
    );
    while scheduler.has_unfinished_requests() {
        engine.step(&mut scheduler);
    }
    assert_eq!(scheduler.cache().num_free_blocks(), 6);
}

fn scheduler_seq_of(batch: &kiln_scheduler::Batch, request_id: u64) -> Option<SeqId> {
    batch
        .sequences
        .iter()
        .find(|entry| entry.request_id.0 == request_id)
        .map(|entry| entry.seq_id)
}

#[test]
fn priority_policy_preempts_the_lowest_priority_not_the_newest() {
    let (scheduler, _, batch) = fill_cache_then_grow(SchedulingPolicy::Priority, [0, 2, 1]);
    assert_eq!(batch.preempted.len(), 1);
    assert_eq!(
        shape(&batch),
        vec![
            (0, StepKind::Decode, 16..17, true),
            (2, StepKind::Decode, 13..14, true)
        ]
    );
    assert_eq!(
        scheduler.request_sequences(RequestId(1)),
        Some(batch.preempted.as_slice())
    );
}

#[test]
fn a_request_that_could_never_fit_is_rejected_at_once() {
    let mut scheduler = fcfs(64, 4, 4);
    let error = scheduler.add_request(request(1, 60, 5)).unwrap_err();
    assert_eq!(
        error,
        SchedulerError::NeverFits {
            request: RequestId(1),
            tokens_needed: 65,
            tokens_available: 64
        }
    );
    assert!(error.is_invalid_request());
    let message = error.to_string();
    assert!(
        message.contains("65") && message.contains("64"),
        "{message}"
    );
    assert!(!scheduler.has_unfinished_requests());

    // One token less fits, and runs to completion alone in the cache.
    let mut engine = SimEngine::new(&scheduler);
    engine.submit(&mut scheduler, request(2, 60, 4)).unwrap();
    let mut steps = 0;
    while scheduler.has_unfinished_requests() {
        engine.step(&mut scheduler);
        steps += 1;
        assert!(steps < 10);
    }
}

#[test]
fn invalid_requests_are_refused() {
    let mut scheduler = fcfs(64, 4, 16);
    assert_eq!(
        scheduler.add_request(request(1, 0, 5)),
        Err(SchedulerError::EmptyPrompt(RequestId(1)))
    );
    assert_eq!(
        scheduler.add_request(request(1, 3, 0)),
        Err(SchedulerError::ZeroMaxTokens(RequestId(1)))
    );
    assert!(matches!(
        scheduler.add_request(request(1, 3, 3).with_n(5)),
        Err(SchedulerError::InvalidSampleCount {
            n: 5,
            max_num_seqs: 4,
            ..
        })
    ));
    scheduler.add_request(request(1, 3, 3)).unwrap();
    assert_eq!(
        scheduler.add_request(request(1, 3, 3)),
        Err(SchedulerError::DuplicateRequest(RequestId(1)))
    );
    let bad_config = SchedulerConfig {
        max_num_batched_tokens: 4,
        max_num_seqs: 8,
        ..SchedulerConfig::default()
    };
    assert!(matches!(
        Scheduler::new(bad_config, KvCacheConfig::new(16)),
        Err(SchedulerError::InvalidConfig(_))
    ));
}

#[test]
fn the_waiting_queue_is_bounded() {
    let config = SchedulerConfig {
        max_num_batched_tokens: 64,
        max_num_seqs: 4,
        max_waiting_requests: 2,
        policy: SchedulingPolicy::Fcfs,
    };
    let mut scheduler = Scheduler::new(config, KvCacheConfig::new(16)).unwrap();
    let mut engine = SimEngine::new(&scheduler);
    engine.submit(&mut scheduler, request(1, 5, 5)).unwrap();
    engine.submit(&mut scheduler, request(2, 5, 5)).unwrap();
    let full = scheduler.add_request(request(3, 5, 5)).unwrap_err();
    assert_eq!(full, SchedulerError::QueueFull { limit: 2 });
    assert!(!full.is_invalid_request());
    // Bad input is still reported as such when the queue is full.
    assert_eq!(
        scheduler.add_request(request(4, 0, 5)),
        Err(SchedulerError::EmptyPrompt(RequestId(4)))
    );
    // Started requests leave the queue.
    engine.step(&mut scheduler);
    assert_eq!(scheduler.stats().num_queued_requests, 0);
    engine.submit(&mut scheduler, request(3, 5, 5)).unwrap();
    engine.submit(&mut scheduler, request(4, 5, 5)).unwrap();
    // Aborting a queued request makes room.
    scheduler.abort(RequestId(4)).unwrap();
    engine.submit(&mut scheduler, request(5, 5, 5)).unwrap();
}

#[test]
fn parallel_samples_share_the_prompt_and_copy_on_write_its_last_block() {
    let mut scheduler = fcfs(64, 4, 16);
    let mut engine = SimEngine::new(&scheduler);
    engine
        .submit(&mut scheduler, request(1, 20, 4).with_n(3))
        .unwrap();
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(shape(&batch), vec![(1, StepKind::Prefill, 0..19, false)]);
    let samples = scheduler.request_sequences(RequestId(1)).unwrap().to_vec();
    assert_eq!(samples.len(), 3);
    let shared_table = scheduler.cache().block_table(samples[0]).unwrap().to_vec();
    assert_eq!(scheduler.cache().ref_count(shared_table[0]).unwrap(), 3);
    assert_eq!(scheduler.cache().num_free_blocks(), 14);

    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(
        shape(&batch),
        vec![
            (1, StepKind::Prefill, 19..20, true),
            (1, StepKind::Prefill, 19..20, true),
            (1, StepKind::Prefill, 19..20, true)
        ]
    );
    let sample_indices: Vec<usize> = batch
        .sequences
        .iter()
        .map(|entry| entry.sample_index)
        .collect();
    assert_eq!(sample_indices, vec![0, 1, 2]);
    assert_eq!(batch.block_copies.len(), 2);
    assert!(batch
        .block_copies
        .iter()
        .all(|copy| copy.src == shared_table[1]));
    assert_ne!(batch.block_copies[0].dst, batch.block_copies[1].dst);
    for entry in &batch.sequences {
        assert_eq!(entry.block_table[0], shared_table[0]);
    }
    assert_eq!(scheduler.cache().ref_count(shared_table[0]).unwrap(), 3);
    assert_eq!(scheduler.cache().num_free_blocks(), 12);

    let mut finished = Vec::new();
    while scheduler.has_unfinished_requests() {
        let (_, outcome) = engine.step(&mut scheduler);
        finished.extend(outcome.finished_sequences);
    }
    assert_eq!(finished.len(), 3);
    assert!(finished
        .iter()
        .all(|sequence| sequence.output_token_ids.len() == 4));
    assert_ne!(finished[0].output_token_ids, finished[1].output_token_ids);
    assert_eq!(scheduler.cache().num_free_blocks(), 16);
}

#[test]
fn a_one_token_prompt_forks_at_admission() {
    let mut scheduler = fcfs(64, 4, 16);
    let mut engine = SimEngine::new(&scheduler);
    engine
        .submit(&mut scheduler, request(1, 1, 2).with_n(2))
        .unwrap();
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(
        shape(&batch),
        vec![
            (1, StepKind::Prefill, 0..1, true),
            (1, StepKind::Prefill, 0..1, true)
        ]
    );
    assert_eq!(
        batch.block_copies.len(),
        0,
        "nothing written yet, nothing to copy"
    );
}

#[test]
fn a_repeated_prompt_reuses_the_cached_prefix_counted_in_tokens() {
    let mut scheduler = fcfs(64, 4, 16);
    let mut engine = SimEngine::new(&scheduler);
    let prompt = tokens(7, 40);
    engine
        .submit(
            &mut scheduler,
            Request::new(RequestId(1), prompt.clone(), 2),
        )
        .unwrap();
    while scheduler.has_unfinished_requests() {
        engine.step(&mut scheduler);
    }
    let mut longer = prompt;
    longer.extend(tokens(900, 5));
    engine
        .submit(&mut scheduler, Request::new(RequestId(2), longer, 2))
        .unwrap();
    let (batch, _) = engine.step(&mut scheduler);
    assert_eq!(batch.admitted[0].num_cached_tokens, 32);
    assert_eq!(shape(&batch), vec![(2, StepKind::Prefill, 32..45, true)]);
    let stats = scheduler.stats().cache;
    assert_eq!(stats.prefix_cache_queries, 40 + 45);
    assert_eq!(stats.prefix_cache_hits, 32);
}

#[test]
fn abort_frees_every_block_in_any_state() {
    let mut scheduler = fcfs(64, 4, 16);
    let mut engine = SimEngine::new(&scheduler);
    engine
        .submit(&mut scheduler, request(1, 20, 50).with_n(3))
        .unwrap();
    engine.submit(&mut scheduler, request(2, 30, 50)).unwrap();
    engine.submit(&mut scheduler, request(3, 30, 50)).unwrap();
    for _ in 0..4 {
        engine.step(&mut scheduler);
    }
    assert_eq!(scheduler.request_sequences(RequestId(1)).unwrap().len(), 3);
    assert!(scheduler.cache().num_free_blocks() < 16);

    // Request 3 is still queued behind the sequence cap.
    assert_eq!(scheduler.stats().num_queued_requests, 1);
    scheduler.abort(RequestId(3)).unwrap();
    assert_eq!(scheduler.stats().num_queued_requests, 0);

    // Aborting between schedule and on_step_done: its tokens are ignored.
    let batch = scheduler.schedule().unwrap();
    let sampled = engine.run(&batch);
    scheduler.abort(RequestId(1)).unwrap();
    let outcome = scheduler.on_step_done(&sampled).unwrap();
    assert!(outcome.finished_sequences.is_empty());
    assert!(scheduler.request_sequences(RequestId(1)).is_none());
    common::check_cache(&scheduler);

    scheduler.abort(RequestId(2)).unwrap();
    assert_eq!(scheduler.cache().num_free_blocks(), 16);
    assert_eq!(scheduler.cache().sequence_ids().count(), 0);
    assert!(!scheduler.has_unfinished_requests());
    assert_eq!(
        scheduler.abort(RequestId(2)),
        Err(SchedulerError::UnknownRequest(RequestId(2)))
    );
}

#[test]
fn engine_reported_finishes_end_sequences() {
    let mut scheduler = fcfs(64, 4, 16);
    scheduler.add_request(request(1, 4, 10)).unwrap();
    let batch = scheduler.schedule().unwrap();
    let seq_id = batch.sequences[0].seq_id;
    let outcome = scheduler
        .on_step_done(&[SampledToken::new(seq_id, 42)])
        .unwrap();
    assert!(outcome.finished_sequences.is_empty());
    assert_eq!(scheduler.output_token_ids(seq_id), Some(&[42][..]));
    scheduler.schedule().unwrap();
    let outcome = scheduler
        .on_step_done(&[SampledToken::finishing(seq_id, 43, FinishReason::Stop)])
        .unwrap();
    assert_eq!(outcome.finished_requests, vec![RequestId(1)]);
    assert_eq!(outcome.finished_sequences[0].reason, FinishReason::Stop);
    assert_eq!(outcome.finished_sequences[0].output_token_ids, vec![42, 43]);
    assert_eq!(FinishReason::Eos.openai_name(), "stop");
    assert_eq!(FinishReason::Length.openai_name(), "length");
}

#[test]
fn the_step_protocol_is_enforced() {
    let mut scheduler = fcfs(64, 4, 16);
    scheduler.add_request(request(1, 4, 10)).unwrap();
    scheduler.add_request(request(2, 80, 10)).unwrap();
    assert_eq!(
        scheduler.on_step_done(&[SampledToken::new(SeqId(0), 1)]),
        Err(SchedulerError::NoStepInProgress)
    );
    let batch = scheduler.schedule().unwrap();
    let sampling = batch.sequences[0].seq_id;
    let not_sampling = batch.sequences[1].seq_id;
    assert!(!batch.sequences[1].samples_token);
    assert_eq!(scheduler.schedule(), Err(SchedulerError::StepInProgress));
    assert_eq!(
        scheduler.on_step_done(&[]),
        Err(SchedulerError::MissingOutput(sampling))
    );
    assert_eq!(
        scheduler.on_step_done(&[
            SampledToken::new(sampling, 1),
            SampledToken::new(not_sampling, 1)
        ]),
        Err(SchedulerError::UnexpectedOutput(not_sampling))
    );
    assert_eq!(
        scheduler.on_step_done(&[
            SampledToken::new(sampling, 1),
            SampledToken::new(sampling, 2)
        ]),
        Err(SchedulerError::DuplicateOutput(sampling))
    );
    // The rejected reports changed nothing; a correct one goes through.
    scheduler
        .on_step_done(&[SampledToken::new(sampling, 1)])
        .unwrap();
    assert_eq!(scheduler.output_token_ids(sampling), Some(&[1][..]));
    assert!(scheduler.schedule().is_ok());
}
