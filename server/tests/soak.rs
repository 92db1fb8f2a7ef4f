//! Batch invariance under load: 64 concurrent greedy requests on tiny-llama (prompts as token
//! ids), in a KV cache small enough to force preemptions, each equal token for token — and
//! logprob for logprob — to the same request run alone.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config_for, fixture, parse_prometheus, TestServer};
use serde_json::{json, Value};

const REQUESTS: usize = 64;
const MAX_TOKENS: usize = 8;

/// Prompt `i`: 4 to 16 token ids; every fourth shares its first 16 tokens with another, so
/// the prefix cache is exercised too.
fn prompt(i: usize) -> Vec<u32> {
    let length = 4 + (i * 7) % 13;
    if i.is_multiple_of(4) {
        (0..16)
            .map(|k| (3 + k * 5) as u32)
            .chain([i as u32 % 256])
            .collect()
    } else {
        (0..length)
            .map(|k| ((i * 31 + k * 17) % 256) as u32)
            .collect()
    }
}

fn request(i: usize) -> Value {
    json!({
        "model": "tiny-llama",
        "prompt": prompt(i),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": true,
        "logprobs": 0,
        "return_tokens_as_token_ids": true,
    })
}

/// The generated token ids and their logprobs.
fn tokens_of(answer: &Value) -> (Vec<String>, Vec<f64>) {
    let logprobs = &answer["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let values = logprobs["token_logprobs"]
        .as_array()
        .expect("token logprobs")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (tokens, values)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_greedy_requests_equal_the_same_requests_alone() {
    // 512 bytes of KV a token: 48 blocks of 16 tokens, while 64 requests of up to 25 tokens
    // want 2 blocks each, so the scheduler must preempt and recompute.
    let config = kiln_server::ServeConfig {
        cpu_kv_cache_bytes: 48 * 16 * 512,
        max_num_seqs: 64,
        max_queue: 256,
        ..config_for(fixture("tiny-llama"))
    };
    let server = Arc::new(TestServer::start(config).await);
    assert_eq!(server.server.info().num_blocks, 48);
    // The compiled KV-cached step runs the batch (not the per-sequence interpreter).
    assert!(
        server.server.info().runner.contains("KV-cached `step`"),
        "{}",
        server.server.info().runner
    );
    let engine = server.server.engine().unwrap().clone();

    // Watch how many sequences run at once while the batch is in flight.
    let watching = Arc::new(AtomicBool::new(true));
    let most_running = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (watching, most_running, engine) = (
            Arc::clone(&watching),
            Arc::clone(&most_running),
            engine.clone(),
        );
        tokio::spawn(async move {
            while watching.load(Ordering::SeqCst) {
                if let Some(stats) = engine.stats() {
                    most_running.fetch_max(stats.num_running_seqs, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let steps_before = engine.num_steps();
    let started = Instant::now();
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let server = Arc::clone(&server);
            tokio::spawn(async move { server.post("/v1/completions", &request(i)).await })
        })
        .collect();
    let mut batched = Vec::with_capacity(REQUESTS);
    for task in tasks {
        let (status, answer) = task.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        batched.push(answer);
    }
    let concurrent_seconds = started.elapsed().as_secs_f64();
    let concurrent_steps = engine.num_steps() - steps_before;
    watching.store(false, Ordering::SeqCst);
    watcher.await.unwrap();
    let (_, metrics_text) = server.get("/metrics").await;
    let metrics = parse_prometheus(&metrics_text);
    let preemptions = metrics.value("kiln:num_preemptions_total", &[]).unwrap();
    let prefix_hits = metrics.value("kiln:prefix_cache_hits_total", &[]).unwrap();

    let started = Instant::now();
    let mut mismatches = Vec::new();
    for (i, batched_answer) in batched.iter().enumerate() {
        let (status, alone) = server.post("/v1/completions", &request(i)).await;
        assert_eq!(status, 200, "{alone}");
        let (batch_tokens, batch_logprobs) = tokens_of(batched_answer);
        let (alone_tokens, alone_logprobs) = tokens_of(&alone);
        assert_eq!(batch_tokens.len(), MAX_TOKENS);
        if batch_tokens != alone_tokens || batch_logprobs != alone_logprobs {
            mismatches.push(format!(
                "request {i}: batched {batch_tokens:?} {batch_logprobs:?}, alone {alone_tokens:?} {alone_logprobs:?}"
            ));
        }
        assert_eq!(
            batched_answer["choices"][0]["text"],
            alone["choices"][0]["text"]
        );
    }
    let alone_seconds = started.elapsed().as_secs_f64();
    let tokens = (REQUESTS * MAX_TOKENS) as f64;
    println!(
        "soak: {REQUESTS} concurrent greedy requests x {MAX_TOKENS} tokens: {concurrent_seconds:.2} s \
         ({:.1} tokens/s) in {concurrent_steps} engine steps, up to {} sequences at once, \
         {preemptions} preemptions, {prefix_hits} prefix-cache hit tokens; the same requests \
         one at a time: {alone_seconds:.2} s ({:.1} tokens/s); {} of {REQUESTS} differ",
        tokens / concurrent_seconds,
        most_running.load(Ordering::SeqCst),
        tokens / alone_seconds,
        mismatches.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(
        preemptions > 0.0,
        "the cache was meant to force preemptions"
    );
    assert!(
        most_running.load(Ordering::SeqCst) > 1,
        "requests were batched"
    );
    // Every block comes back once the last step is reported.
    let stats = server
        .wait_for_stats(Duration::from_secs(10), |stats| {
            stats.cache.num_free_blocks == stats.cache.num_blocks
        })
        .await;
    assert_eq!(
        stats.cache.num_free_blocks, stats.cache.num_blocks,
        "{stats:?}"
    );
}
