//! The server's life around requests: a client that disconnects frees every KV block it held,
//! /metrics parses as Prometheus text and its counters move, startup refuses a KV cache too
//! small for max_model_len, shutdown is graceful, and embeddings work for encoders only and
//! equal `kiln embed`'s (the library's `EmbeddingModel`) for the real all-MiniLM-L6-v2.

mod common;

use std::time::Duration;

use common::{config_for, fixture, parse_prometheus, TestServer};
use kiln_server::{ServeConfig, Server};
use serde_json::{json, Value};

/// A request long enough to still be generating when the client leaves.
fn long_request(stream: bool) -> Value {
    json!({
        "prompt": (1..40).collect::<Vec<u32>>(),
        "max_tokens": 80,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_stream_is_aborted_and_frees_every_block() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let engine = server.server.engine().unwrap();
    let total_blocks = engine.stats().unwrap().cache.num_blocks;
    let mut response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&long_request(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let first = response.chunk().await.unwrap().expect("a first chunk");
    assert!(first.starts_with(b"data: {"), "{first:?}");
    let busy = server
        .wait_for_stats(Duration::from_secs(10), |stats| stats.num_running_seqs == 1)
        .await;
    assert_eq!(busy.num_running_seqs, 1, "{busy:?}");
    assert!(
        busy.cache.num_free_blocks < total_blocks,
        "the request holds blocks"
    );
    drop(response);
    let stats = server
        .wait_for_stats(Duration::from_secs(30), |stats| {
            stats.num_running_seqs == 0 && stats.cache.num_free_blocks == total_blocks
        })
        .await;
    assert_eq!(stats.num_running_seqs, 0, "{stats:?}");
    assert_eq!(stats.num_waiting_seqs, 0, "{stats:?}");
    assert_eq!(stats.cache.num_free_blocks, total_blocks, "{stats:?}");
    let (_, text) = server.get("/metrics").await;
    let metrics = parse_prometheus(&text);
    assert_eq!(
        metrics.value(
            "kiln:request_success_total",
            &[("finished_reason", "abort")]
        ),
        Some(1.0)
    );
    assert_eq!(metrics.value("kiln:kv_cache_usage_perc", &[]), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_on_a_json_answer_frees_every_block() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let engine = server.server.engine().unwrap();
    let total_blocks = engine.stats().unwrap().cache.num_blocks;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let outcome = impatient
        .post(server.url("/v1/completions"))
        .json(&long_request(false))
        .send()
        .await;
    assert!(
        outcome.is_err(),
        "the request outlives the client's patience"
    );
    let stats = server
        .wait_for_stats(Duration::from_secs(30), |stats| {
            stats.num_running_seqs == 0 && stats.cache.num_free_blocks == total_blocks
        })
        .await;
    assert_eq!(stats.cache.num_free_blocks, total_blocks, "{stats:?}");
    assert_eq!(stats.num_running_requests + stats.num_waiting_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_counters_move() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let scrape = || async {
        let response = server
            .client
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        parse_prometheus(&response.text().await.unwrap())
    };
    let before = scrape().await;
    for family in [
        ("kiln:num_requests_running", "gauge"),
        ("kiln:num_requests_waiting", "gauge"),
        ("kiln:kv_cache_usage_perc", "gauge"),
        ("kiln:cache_config_info", "gauge"),
        ("kiln:prompt_tokens_total", "counter"),
        ("kiln:generation_tokens_total", "counter"),
        ("kiln:num_preemptions_total", "counter"),
        ("kiln:prefix_cache_queries_total", "counter"),
        ("kiln:prefix_cache_hits_total", "counter"),
        ("kiln:request_success_total", "counter"),
        ("kiln:time_to_first_token_seconds", "histogram"),
        ("kiln:inter_token_latency_seconds", "histogram"),
        ("kiln:request_time_per_output_token_seconds", "histogram"),
        ("kiln:e2e_request_latency_seconds", "histogram"),
        ("kiln:request_queue_time_seconds", "histogram"),
        ("kiln:iteration_tokens_total", "histogram"),
    ] {
        assert_eq!(
            before.types.get(family.0).map(String::as_str),
            Some(family.1),
            "{family:?}"
        );
    }
    assert_eq!(
        before.value(
            "kiln:cache_config_info",
            &[("block_size", "16"), ("model_name", "tiny-llama")]
        ),
        Some(1.0)
    );
    let ttft_edges: Vec<f64> = before
        .samples
        .iter()
        .filter(|s| s.name == "kiln:time_to_first_token_seconds_bucket")
        .map(|s| s.labels["le"].parse::<f64>().unwrap())
        .collect();
    let vllm_edges = [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    ];
    assert_eq!(ttft_edges[..vllm_edges.len()], vllm_edges);
    assert!(ttft_edges[vllm_edges.len()].is_infinite());
    // Two requests, sharing a 16-token prefix (a prefix-cache hit for the second).
    let prompt: Vec<u32> = (1..=20).collect();
    for _ in 0..2 {
        let (status, answer) = server
            .post(
                "/v1/completions",
                &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    // Gauges are published after the step that ended the last request.
    server
        .wait_for_stats(Duration::from_secs(10), |stats| stats.num_running_seqs == 0)
        .await;
    let after = scrape().await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels).unwrap() - before.value(name, labels).unwrap()
    };
    assert_eq!(moved("kiln:prompt_tokens_total", &[]), 40.0);
    assert_eq!(moved("kiln:generation_tokens_total", &[]), 8.0);
    assert_eq!(
        moved(
            "kiln:request_success_total",
            &[("finished_reason", "length")]
        ),
        2.0
    );
    assert_eq!(moved("kiln:prefix_cache_queries_total", &[]), 40.0);
    assert_eq!(moved("kiln:prefix_cache_hits_total", &[]), 16.0);
    assert_eq!(moved("kiln:time_to_first_token_seconds_count", &[]), 2.0);
    assert_eq!(moved("kiln:e2e_request_latency_seconds_count", &[]), 2.0);
    assert_eq!(moved("kiln:request_queue_time_seconds_count", &[]), 2.0);
    assert_eq!(moved("kiln:inter_token_latency_seconds_count", &[]), 6.0);
    assert_eq!(
        moved("kiln:request_time_per_output_token_seconds_count", &[]),
        2.0
    );
    assert!(moved("kiln:iteration_tokens_total_count", &[]) >= 8.0);
    // Histogram buckets are cumulative and end at the count.
    for family in [
        "kiln:time_to_first_token_seconds",
        "kiln:iteration_tokens_total",
    ] {
        let buckets: Vec<f64> = after
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
            .map(|s| s.value)
            .collect();
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{family}: {buckets:?}"
        );
        assert_eq!(
            buckets.last().copied(),
            after.value(&format!("{family}_count"), &[])
        );
    }
    assert_eq!(after.value("kiln:num_requests_running", &[]), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_a_kv_cache_too_small_for_max_model_len() {
    // tiny-llama: 2 layers x 2 (K, V) x 2 KV heads x 16 dims x 4 bytes = 512 bytes a token;
    // 40 KiB hold 5 blocks of 16 tokens = 80 tokens, less than its context of 128.
    let config = ServeConfig {
        cpu_kv_cache_bytes: 40 << 10,
        ..config_for(fixture("tiny-llama"))
    };
    let error = Server::start(config).await.unwrap_err().to_string();
    assert!(error.contains("128") && error.contains("80"), "{error}");
    assert!(error.contains("--kv-cache-memory"), "{error}");
    // With max_model_len lowered to what fits, it starts.
    let config = ServeConfig {
        cpu_kv_cache_bytes: 40 << 10,
        max_model_len: Some(80),
        ..config_for(fixture("tiny-llama"))
    };
    let server = Server::start(config).await.expect("80 tokens fit");
    assert_eq!(server.info().num_blocks, 5);
    server.shutdown().await.unwrap();
    // A max_model_len beyond the model's context is refused too.
    let config = ServeConfig {
        max_model_len: Some(4096),
        ..config_for(fixture("tiny-llama"))
    };
    let error = Server::start(config).await.unwrap_err().to_string();
    assert!(error.contains("4096") && error.contains("128"), "{error}");
    let error = Server::start(ServeConfig {
        model: Some("/nonexistent/model".into()),
        ..config_for(fixture("tiny-llama"))
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("/nonexistent/model"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish_then_stops_accepting() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let client = server.client.clone();
    let url = server.url("/v1/completions");
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut response = client.post(&url).json(&body).send().await.unwrap();
    let first = response.chunk().await.unwrap().expect("a first chunk");
    let TestServer { server, .. } = server;
    let shutdown = tokio::spawn(server.shutdown());
    let mut rest = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let data = common::sse_data(&rest);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"], "length",
        "finished, not cut"
    );
    shutdown.await.unwrap().expect("a clean shutdown");
    assert!(
        client.post(&url).json(&body).send().await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_outlives_the_timeout() {
    let config = ServeConfig {
        shutdown_timeout: Duration::from_millis(300),
        ..config_for(fixture("tiny-llama"))
    };
    let server = TestServer::start(config).await;
    let engine = server.server.engine().unwrap().clone();
    let mut response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&long_request(true))
        .send()
        .await
        .unwrap();
    let mut text = String::from_utf8(response.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let TestServer { server, .. } = server;
    let shutdown = tokio::spawn(server.shutdown());
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let data = common::sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{error}"
    );
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shutdown ends")
        .unwrap()
        .expect("a clean shutdown");
    assert!(!engine.is_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_for_encoders_only() {
    let server = TestServer::start(config_for(fixture("tiny-bert"))).await;
    let (status, answer) = server
        .post(
            "/v1/embeddings",
            &json!({"model": "tiny-bert", "input": ["hello", "world", "hello"]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["usage"]["prompt_tokens"], 15);
    let vectors: Vec<Vec<f64>> = answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vectors.len(), 3);
    for vector in &vectors {
        assert_eq!(vector.len(), 64);
        let norm: f64 = vector.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "L2-normalized: {norm}");
    }
    assert_eq!(vectors[0], vectors[2]);
    assert_ne!(vectors[0], vectors[1]);
    // Token ids and base64 give the same numbers.
    let (status, answer) = server
        .post(
            "/v1/embeddings",
            &json!({"input": [104, 101, 108, 108, 111], "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let encoded = answer["data"][0]["embedding"].as_str().unwrap();
    let decoded = decode_base64_f32(encoded);
    for (a, b) in decoded.iter().zip(&vectors[0]) {
        assert!((f64::from(*a) - b).abs() < 1e-6);
    }
    // An encoder serves no generation.
    let (status, answer) = server
        .post("/v1/completions", &json!({"prompt": "hi"}))
        .await;
    assert_eq!(status, 400, "{answer}");
    // A decoder serves no embeddings.
    let decoder = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let (status, answer) = decoder
        .post("/v1/embeddings", &json!({"input": "hello"}))
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("embeddings"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeddings_equal_the_library_path() {
    let dir = kiln_tests::minilm_dir();
    let texts = [
        "Hello, world!",
        "   Leading and trailing spaces, and\ttabs\nand newlines.   ",
        "Café, naïve, résumé.",
        &"A long text that sentence-transformers truncates at 256 tokens. ".repeat(30),
    ];
    let server = TestServer::start(config_for(dir.clone())).await;
    let (status, answer) = server
        .post("/v1/embeddings", &json!({"input": texts}))
        .await;
    assert_eq!(status, 200, "{answer}");
    let model = kiln_runtime::EmbeddingModel::load_quiet(&dir, kiln_runtime::EmbedBackend::Cpu)
        .expect("load all-MiniLM-L6-v2");
    let want = model.embed_texts(&texts).expect("embed");
    let tokens: usize = texts
        .iter()
        .map(|t| model.tokenize(t).expect("tokenize").len())
        .sum();
    assert_eq!(answer["usage"]["prompt_tokens"], tokens);
    for (index, want) in want.iter().enumerate() {
        let got: Vec<f32> = answer["data"][index]["embedding"]
            .as_array()
            .expect("an embedding")
            .iter()
            .map(|v| v.as_f64().expect("a number") as f32)
            .collect();
        assert_eq!(&got, want, "embedding {index}");
    }
}

fn decode_base64_f32(text: &str) -> Vec<f32> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut bytes = Vec::new();
    for group in text.as_bytes().chunks(4) {
        let digits: Vec<u8> = group
            .iter()
            .filter(|&&c| c != b'=')
            .map(|&c| value(c))
            .collect();
        let n = digits
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
        bytes.extend_from_slice(&n.to_be_bytes()[1..digits.len()]);
    }
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
