//! Property tests over random workloads: arrivals at random steps with shared prefixes, random
//! lengths, n > 1, aborts between and during steps, small caches that force preemption. After
//! every step: batch limits, block accounting, reference counts, prefix-hit accounting and the
//! KV every sequence reads; at the end: every request finished, was aborted or was rejected,
//! within a bounded number of steps, and every block is free again.

mod common;

use std::collections::BTreeMap;

use common::{check_batch, check_cache, SimEngine};
use kiln_scheduler::{
    BlockSize, FinishReason, KvCacheConfig, Request, RequestId, Scheduler, SchedulerConfig,
    SchedulerError, SchedulingPolicy, TokenId,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Setup {
    block_size: BlockSize,
    num_blocks: usize,
    max_num_seqs: usize,
    extra_budget: usize,
    max_waiting_requests: usize,
    policy: SchedulingPolicy,
    eos_divisor: TokenId,
}

#[derive(Clone, Debug)]
struct Arrival {
    step: usize,
    prefix: usize,
    prefix_len: usize,
    tail_len: usize,
    max_tokens: usize,
    n: usize,
    priority: i32,
    /// Abort this many steps after arrival; `true`: between `schedule` and `on_step_done`.
    abort: Option<(usize, bool)>,
}

fn setup_strategy() -> impl Strategy<Value = Setup> {
    (
        prop::sample::select(BlockSize::ALL.to_vec()),
        3..24usize,
        1..6usize,
        0..40usize,
        1..12usize,
        prop::sample::select(vec![SchedulingPolicy::Fcfs, SchedulingPolicy::Priority]),
        prop::sample::select(vec![0, 7, 23]),
    )
        .prop_map(
            |(
                block_size,
                num_blocks,
                max_num_seqs,
                extra_budget,
                max_waiting_requests,
                policy,
                eos_divisor,
            )| Setup {
                block_size,
                num_blocks,
                max_num_seqs,
                extra_budget,
                max_waiting_requests,
                policy,
                eos_divisor,
            },
        )
}

fn arrival_strategy() -> impl Strategy<Value = Arrival> {
    (
        0..25usize,
        0..3usize,
        0..80usize,
        0..24usize,
        1..40usize,
        prop::sample::select(vec![1, 1, 1, 2, 3]),
        0..3i32,
        prop::option::weighted(0.2, (0..30usize, any::<bool>())),
    )
        .prop_map(
            |(step, prefix, prefix_len, tail_len, max_tokens, n, priority, abort)| Arrival {
                step,
                prefix,
                prefix_len,
                tail_len,
                max_tokens,
                n,
                priority,
                abort,
            },
        )
}

/// Shared prompt prefixes: two that agree on their first 24 tokens, and one made of a
/// three-token vocabulary (equal blocks at different positions must not alias).
fn prefixes() -> [Vec<TokenId>; 3] {
    [
        (0..80).collect(),
        (0..80).map(|t| if t < 24 { t } else { 700 + t }).collect(),
        (0..80).map(|t| 2000 + t % 3).collect(),
    ]
}

#[derive(Debug)]
struct Tracked {
    max_tokens: usize,
    n: usize,
    finished_samples: usize,
    abort_at: Option<(usize, bool)>,
}

fn run_workload(setup: &Setup, arrivals: &[Arrival]) -> Result<(), TestCaseError> {
    let config = SchedulerConfig {
        max_num_batched_tokens: setup.max_num_seqs + setup.extra_budget,
        max_num_seqs: setup.max_num_seqs,
        max_waiting_requests: setup.max_waiting_requests,
        policy: setup.policy,
    };
    let cache_config = KvCacheConfig::new(setup.num_blocks).with_block_size(setup.block_size);
    let capacity = cache_config.capacity_tokens();
    let mut scheduler = Scheduler::new(config, cache_config).unwrap();
    let mut engine = SimEngine::new(&scheduler);
    engine.eos_divisor = setup.eos_divisor;
    let prefixes = prefixes();
    let mut next_unique_token: TokenId = 1_000_000;

    let mut live: BTreeMap<RequestId, Tracked> = BTreeMap::new();
    let mut accepted_work = 0usize;
    let last_arrival = arrivals
        .iter()
        .map(|arrival| arrival.step)
        .max()
        .unwrap_or(0);
    let mut step = 0usize;
    loop {
        for (index, arrival) in arrivals.iter().enumerate().filter(|(_, a)| a.step == step) {
            let mut prompt = prefixes[arrival.prefix][..arrival.prefix_len].to_vec();
            for _ in 0..arrival.tail_len {
                prompt.push(next_unique_token);
                next_unique_token += 1;
            }
            if prompt.is_empty() {
                prompt.push(5);
            }
            let id = RequestId(index as u64);
            let tokens_needed = prompt.len() + arrival.max_tokens;
            let request = Request::new(id, prompt.clone(), arrival.max_tokens)
                .with_n(arrival.n)
                .with_priority(arrival.priority);
            let waiting_before = scheduler.stats().num_queued_requests;
            match engine.submit(&mut scheduler, request) {
                Ok(()) => {
                    prop_assert!(tokens_needed <= capacity);
                    accepted_work += arrival.n * tokens_needed;
                    live.insert(
                        id,
                        Tracked {
                            max_tokens: arrival.max_tokens,
                            n: arrival.n,
                            finished_samples: 0,
                            abort_at: arrival.abort.map(|(delay, mid)| (step + delay, mid)),
                        },
                    );
                }
                Err(SchedulerError::NeverFits {
                    tokens_needed: needed,
                    tokens_available,
                    ..
                }) => {
                    prop_assert_eq!(needed, tokens_needed);
                    prop_assert_eq!(tokens_available, capacity);
                    prop_assert!(needed > capacity);
                }
                Err(SchedulerError::InvalidSampleCount { n, .. }) => {
                    prop_assert!(n > setup.max_num_seqs);
                }
                Err(SchedulerError::QueueFull { limit }) => {
                    prop_assert_eq!(limit, setup.max_waiting_requests);
                    prop_assert_eq!(waiting_before, limit);
                }
                Err(other) => prop_assert!(false, "unexpected rejection {other}"),
            }
        }

        let abort_now = |mid_step: bool, live: &BTreeMap<RequestId, Tracked>| -> Vec<RequestId> {
            live.iter()
                .filter(|(_, tracked)| tracked.abort_at == Some((step, mid_step)))
                .map(|(&id, _)| id)
                .collect()
        };
        for id in abort_now(false, &live) {
            scheduler.abort(id).unwrap();
            live.remove(&id);
            prop_assert!(scheduler.request_sequences(id).is_none());
        }
        check_cache(&scheduler);

        let before = scheduler.stats().cache;
        let batch = scheduler.schedule().unwrap();
        check_batch(&scheduler, &batch);
        let after = scheduler.stats().cache;
        let cached: usize = batch.admitted.iter().map(|a| a.num_cached_tokens).sum();
        let looked_up: usize = batch.admitted.iter().map(|a| a.num_tokens).sum();
        prop_assert_eq!(
            after.prefix_cache_hits - before.prefix_cache_hits,
            cached as u64
        );
        prop_assert_eq!(
            after.prefix_cache_queries - before.prefix_cache_queries,
            looked_up as u64
        );
        for admission in &batch.admitted {
            prop_assert_eq!(admission.num_cached_tokens % setup.block_size.tokens(), 0);
            prop_assert!(admission.num_cached_tokens < admission.num_tokens);
        }

        for id in abort_now(true, &live) {
            scheduler.abort(id).unwrap();
            live.remove(&id);
        }
        let sampled = engine.run(&batch);
        let outcome = scheduler.on_step_done(&sampled).unwrap();
        check_cache(&scheduler);
        for finished in &outcome.finished_sequences {
            let tracked = live.get_mut(&finished.request_id).expect("live request");
            let generated = finished.output_token_ids.len();
            prop_assert!(generated >= 1 && generated <= tracked.max_tokens);
            if finished.reason == FinishReason::Length {
                prop_assert_eq!(generated, tracked.max_tokens);
            }
            prop_assert_eq!(
                &finished.output_token_ids[..],
                &engine.expected_tokens[&finished.seq_id]
                    [engine.expected_tokens[&finished.seq_id].len() - generated..]
            );
            tracked.finished_samples += 1;
        }
        for id in &outcome.finished_requests {
            let tracked = live.remove(id).expect("finished once");
            prop_assert_eq!(tracked.finished_samples, tracked.n);
        }

        step += 1;
        if step > last_arrival && !scheduler.has_unfinished_requests() {
            break;
        }
        // Every accepted request fits alone, so the oldest always progresses: the steps are
        // bounded by the arrivals plus a small multiple of the work (measured: at most ~1.1x).
        prop_assert!(
            step <= last_arrival + 10 + 3 * accepted_work,
            "no progress: {} steps for {} tokens of work",
            step,
            accepted_work
        );
    }
    prop_assert!(live.is_empty(), "requests never finished: {:?}", live);
    prop_assert_eq!(scheduler.cache().num_free_blocks(), setup.num_blocks);
    prop_assert_eq!(scheduler.cache().sequence_ids().count(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_keep_every_invariant_and_finish(
        setup in setup_strategy(),
        arrivals in prop::collection::vec(arrival_strategy(), 1..24),
    ) {
        run_workload(&setup, &arrivals)?;
    }
}
