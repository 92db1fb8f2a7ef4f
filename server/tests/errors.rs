//! Every error path answers with an OpenAI-shaped error and the right status: 400 for bad
//! bodies and prompts that do not fit, 401 for API keys, 404 for unknown models and routes,
//! 429 at once when the queue is full (even while the engine is stuck in a step), and never a
//! 500 for bad input.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config_for, fixture, tiny_chat_model, TestServer};
use kiln_server::{InterpreterRunner, ModelRunner, RunnerError, SequenceInput, Server};
use serde_json::{json, Value};

/// Asserts an OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
fn assert_openai_error(body: &Value) {
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{body}"));
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.contains_key("param") && error.contains_key("code"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_invalid_bodies_are_400() {
    let server = TestServer::start(config_for(tiny_chat_model())).await;
    let raw_cases = [
        ("/v1/completions", "{not json", "application/json"),
        ("/v1/completions", "", "application/json"),
        ("/v1/chat/completions", "[1, 2]", "application/json"),
        (
            "/v1/completions",
            "prompt=hi",
            "application/x-www-form-urlencoded",
        ),
        ("/v1/embeddings", "{\"input\": ", "application/json"),
    ];
    for (path, body, content_type) in raw_cases {
        let (status, answer) = server.post_raw(path, body, content_type).await;
        assert_eq!(status, 400, "{path} {body:?}: {answer}");
        assert_openai_error(&answer);
        assert_eq!(answer["error"]["type"], "invalid_request_error");
    }
    let cases = [
        ("/v1/completions", json!({"max_tokens": 3})),
        ("/v1/completions", json!({"prompt": 5})),
        ("/v1/completions", json!({"prompt": []})),
        ("/v1/completions", json!({"prompt": ""})),
        ("/v1/completions", json!({"prompt": [1, -2]})),
        ("/v1/completions", json!({"prompt": [1, 999999]})),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": -1})),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 0})),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": "ten"}),
        ),
        ("/v1/completions", json!({"prompt": "x", "temperature": -1})),
        ("/v1/completions", json!({"prompt": "x", "top_p": 0})),
        ("/v1/completions", json!({"prompt": "x", "top_k": -7})),
        ("/v1/completions", json!({"prompt": "x", "min_p": 2})),
        (
            "/v1/completions",
            json!({"prompt": "x", "presence_penalty": 3}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "repetition_penalty": 0}),
        ),
        ("/v1/completions", json!({"prompt": "x", "stop": 7})),
        ("/v1/completions", json!({"prompt": "x", "stop": [""]})),
        ("/v1/completions", json!({"prompt": "x", "n": 0})),
        ("/v1/completions", json!({"prompt": "x", "n": 100000})),
        ("/v1/completions", json!({"prompt": "x", "logprobs": 50})),
        ("/v1/completions", json!({"prompt": "x", "priority": 2})),
        (
            "/v1/completions",
            json!({"prompt": "x", "stream_options": {"include_usage": true}}),
        ),
        ("/v1/chat/completions", json!({"messages": []})),
        ("/v1/chat/completions", json!({"messages": "hi"})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"content": "no role"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
        ),
        ("/v1/embeddings", json!({"input": "x"})),
    ];
    for (path, body) in cases {
        let (status, answer) = server.post(path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_openai_error(&answer);
    }
    // A field of the wrong type names itself.
    let (_, answer) = server
        .post("/v1/completions", &json!({"prompt": "x", "top_p": 1.5}))
        .await;
    assert_eq!(answer["error"]["param"], "top_p");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_that_do_not_fit_the_context_are_400() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let too_long: Vec<u32> = (0..200).map(|i| i % 256).collect();
    let (status, answer) = server
        .post("/v1/completions", &json!({"prompt": too_long}))
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_openai_error(&answer);
    assert_eq!(answer["error"]["param"], "prompt");
    assert_eq!(answer["error"]["code"], "context_length_exceeded");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("200") && message.contains("128"),
        "{message}"
    );
    // Exactly the context: nothing left to generate.
    let full: Vec<u32> = (0..128).collect();
    let (status, _) = server
        .post("/v1/completions", &json!({"prompt": full}))
        .await;
    assert_eq!(status, 400);
    // Prompt + max_tokens over the context.
    let (status, answer) = server
        .post(
            "/v1/completions",
            &json!({"prompt": (0..100).collect::<Vec<u32>>(), "max_tokens": 29}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "max_tokens");
    assert!(answer["error"]["message"].as_str().unwrap().contains("28"));
    // One token less fits.
    let (status, answer) = server
        .post(
            "/v1/completions",
            &json!({"prompt": (0..100).collect::<Vec<u32>>(), "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    // Chat counts the rendered template.
    let chat = TestServer::start(config_for(tiny_chat_model())).await;
    let (status, answer) = chat
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "y".repeat(130)}]}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_v1_but_not_health_or_metrics() {
    let dir = std::env::temp_dir().join(format!("kiln-server-keyfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("keys");
    std::fs::write(&key_file, "# ops\nfrom-a-file\n").unwrap();
    let config = kiln_server::ServeConfig {
        api_keys: vec!["sekrit".into()],
        api_key_file: Some(key_file),
        ..config_for(fixture("tiny-llama"))
    };
    let server = TestServer::start(config).await;
    let body = json!({"prompt": [1, 2], "max_tokens": 1});
    let send = |key: Option<&str>, path: &str| {
        let mut request = server.client.post(server.url(path)).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    for key in [None, Some("wrong"), Some("sekrit2"), Some("")] {
        let response = send(key, "/v1/completions").await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "key {key:?}");
        let answer: Value = response.json().await.unwrap();
        assert_openai_error(&answer);
        assert_eq!(answer["error"]["code"], "invalid_api_key");
    }
    for key in ["sekrit", "from-a-file"] {
        let response = send(Some(key), "/v1/completions").await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "key {key}");
    }
    let models = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status().as_u16(), 401);
    assert_eq!(server.get("/health").await.0, 200);
    assert_eq!(server.get("/metrics").await.0, 200);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_and_routes_are_404() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    for path in ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"] {
        let (status, answer) = server
            .post(
                path,
                &json!({"model": "gpt-9", "prompt": "x", "messages": [], "input": "x"}),
            )
            .await;
        assert_eq!(status, 404, "{path}: {answer}");
        assert_openai_error(&answer);
        assert_eq!(answer["error"]["code"], "model_not_found");
        assert!(answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-9"));
    }
    let (status, text) = server.get("/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert_openai_error(&serde_json::from_str(&text).unwrap());
    let (status, text) = server.get("/v1/completions").await;
    assert_eq!(status, 405);
    assert_openai_error(&serde_json::from_str(&text).unwrap());
}

/// A runner that blocks inside the model until the test opens its gate.
struct GatedRunner {
    inner: InterpreterRunner,
    open: Arc<AtomicBool>,
    entered: Arc<AtomicUsize>,
}

impl ModelRunner for GatedRunner {
    fn logits(&mut self, batch: &[SequenceInput<'_>]) -> Result<Vec<Vec<f32>>, RunnerError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        while !self.open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.inner.logits(batch)
    }

    fn describe(&self) -> String {
        "gated interpreter (test)".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_429_at_once_while_the_engine_is_blocked() {
    let open = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicUsize::new(0));
    let config = kiln_server::ServeConfig {
        max_queue: 1,
        max_num_seqs: 1,
        ..config_for(fixture("tiny-llama"))
    };
    let (gate, steps) = (Arc::clone(&open), Arc::clone(&entered));
    let server = Server::start_with_runner(config, move |model| {
        Box::new(GatedRunner {
            inner: InterpreterRunner::new(
                Arc::clone(&model.module),
                Arc::clone(&model.weights),
                model.entry,
                1,
            ),
            open: gate,
            entered: steps,
        })
    })
    .await
    .unwrap();
    let server = Arc::new(TestServer::around(server));
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0});
    // A runs and blocks the engine inside the model.
    let running = {
        let (server, body) = (Arc::clone(&server), body.clone());
        tokio::spawn(async move { server.post("/v1/completions", &body).await })
    };
    let started = Instant::now();
    while entered.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the engine never ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // B fills the one queue slot.
    let queued = {
        let (server, body) = (Arc::clone(&server), body.clone());
        tokio::spawn(async move { server.post("/v1/completions", &body).await })
    };
    let engine = server.server.engine().unwrap();
    while engine.num_pending() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "B never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // C is refused at once, with the engine still stuck.
    let asked = Instant::now();
    let (status, answer) = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    // (the byte fallback has no chat template: bad input is reported before the queue)
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 429, "{answer}");
    assert_openai_error(&answer);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "429 must be immediate"
    );
    assert!(!open.load(Ordering::SeqCst) && entered.load(Ordering::SeqCst) == 1);
    open.store(true, Ordering::SeqCst);
    let (status, answer) = running.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = queued.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    // With the queue drained, requests are accepted again.
    let (status, _) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_never_get_a_500() {
    let server = TestServer::start(config_for(tiny_chat_model())).await;
    let bodies = [
        json!(null),
        json!(42),
        json!({"prompt": null}),
        json!({"prompt": [[]]}),
        json!({"prompt": [[1], "a"]}),
        json!({"prompt": [1.5]}),
        json!({"prompt": "x", "n": -1}),
        json!({"prompt": "x", "seed": -3, "max_tokens": 1}),
        json!({"prompt": "x", "temperature": 1e39}),
        json!({"prompt": "x", "stop_token_ids": [-1]}),
        json!({"prompt": "x", "stream": "yes"}),
        json!({"prompt": "x", "max_tokens": 18446744073709551615u64}),
        json!({"messages": [{"role": "user", "content": null}], "max_tokens": 1}),
        json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        json!({"messages": [{"role": "user", "content": {"text": "x"}}]}),
    ];
    for body in bodies {
        for path in ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"] {
            let (status, answer) = server.post(path, &body).await;
            assert!(status < 500, "{path} {body}: {status} {answer}");
            if status != 200 {
                assert_openai_error(&answer);
            }
        }
    }
}
