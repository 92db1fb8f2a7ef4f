//! Completions and chat completions over real HTTP against a live server: JSON and streamed
//! answers agree, chat content as a string or as parts, stop strings and stop token ids, `n`,
//! logprobs, greedy tokens from the model against the host's argmax,
//! `stream_options.include_usage`, `max_tokens` defaults, priority scheduling, and a smoke test
//! of the real default model.

mod common;

use common::{config_for, fixture, repo, tiny_chat_model, TestServer};
use serde_json::{json, Value};

/// POSTs and asserts 200.
async fn ok(server: &TestServer, path: &str, body: Value) -> Value {
    let (status, answer) = server.post(path, &body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The chunks of a stream before `[DONE]`, parsed; asserts the stream ends with `[DONE]`.
async fn chunks(server: &TestServer, path: &str, body: Value) -> Vec<Value> {
    let (status, data) = server.stream(path, &body).await;
    assert_eq!(status, 200, "{data:?}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    data[..data.len() - 1]
        .iter()
        .map(|chunk| serde_json::from_str(chunk).expect("chunks are JSON"))
        .collect()
}

fn text_of(answer: &Value) -> String {
    answer["choices"][0]["text"]
        .as_str()
        .expect("a completion has text")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_json_and_stream_agree_token_for_token() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let request = json!({
        "model": "tiny-llama",
        "prompt": [1, 72, 101, 108, 108, 111],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": true,
    });
    let answer = ok(&server, "/v1/completions", request.clone()).await;
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["model"], "tiny-llama");
    assert!(answer["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18})
    );
    let mut streamed_request = request;
    streamed_request["stream"] = json!(true);
    let stream = chunks(&server, "/v1/completions", streamed_request).await;
    let mut text = String::new();
    for (i, chunk) in stream.iter().enumerate() {
        assert_eq!(chunk["object"], "text_completion");
        assert!(
            chunk.get("usage").is_none(),
            "usage only with include_usage"
        );
        let choice = &chunk["choices"][0];
        let last = i + 1 == stream.len();
        let piece = choice["text"].as_str().unwrap();
        assert!(
            last || !piece.is_empty(),
            "no chunk without text before the end: {chunk}"
        );
        assert_eq!(choice["finish_reason"].is_null(), !last, "{chunk}");
        text.push_str(piece);
    }
    assert_eq!(text, text_of(&answer));
    assert_eq!(
        stream.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_prompt_is_tokenized_and_the_model_name_may_be_omitted() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    // The byte-level fallback: "Hi" is the token ids [72, 105].
    let by_text = ok(
        &server,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let by_ids = ok(
        &server,
        "/v1/completions",
        json!({"prompt": [72, 105], "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(by_text["usage"]["prompt_tokens"], 2);
    assert_eq!(text_of(&by_text), text_of(&by_ids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_content_as_string_or_parts_and_streamed_deltas() {
    let server = TestServer::start(config_for(tiny_chat_model())).await;
    let as_string = ok(
        &server,
        "/v1/chat/completions",
        json!({
            "model": "tiny-chat",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first line\nsecond line"},
            ],
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": true,
        }),
    )
    .await;
    assert_eq!(as_string["object"], "chat.completion");
    assert!(as_string["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let message = &as_string["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    // "<system>Be brief.\n<user>first line\nsecond line\n<assistant>" in bytes.
    let rendered = "<system>Be brief.\n<user>first line\nsecond line\n<assistant>";
    assert_eq!(as_string["usage"]["prompt_tokens"], rendered.len());
    assert_eq!(as_string["usage"]["completion_tokens"], 8);
    // Parts are joined with newlines: the same prompt, so the same greedy answer.
    let parts_request = json!({
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "first line"},
                {"type": "text", "text": "second line"},
            ]},
        ],
        "max_completion_tokens": 8,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "an_unknown_field": {"is": "ignored"},
    });
    let stream = chunks(&server, "/v1/chat/completions", parts_request).await;
    assert_eq!(stream[0]["choices"][0]["delta"]["role"], "assistant");
    let mut content = String::new();
    for (i, chunk) in stream.iter().enumerate() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        let choice = &chunk["choices"][0];
        let last = i + 1 == stream.len();
        let delta = choice["delta"].as_object().unwrap();
        if !last {
            let piece = delta["content"]
                .as_str()
                .expect("every chunk carries content");
            assert!(!piece.is_empty(), "an empty content chunk: {chunk}");
        }
        assert_eq!(delta.contains_key("role"), i == 0, "{chunk}");
        content.push_str(delta.get("content").and_then(Value::as_str).unwrap_or(""));
    }
    assert_eq!(
        stream.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(content, message["content"].as_str().unwrap());
}

/// The first ASCII letter or digit in `text` after its first character, with the text before
/// its first occurrence: a stop string the greedy continuation is sure to produce.
fn stop_candidate(text: &str) -> Option<(String, String)> {
    let stop = text.chars().skip(1).find(char::is_ascii_alphanumeric)?;
    let at = text.find(stop)?;
    Some((stop.to_string(), text[..at].to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_stop_token_ids_end_a_choice() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let mut found = None;
    for start in [65u32, 97, 48, 33, 120] {
        let prompt: Vec<u32> = (start..start + 6).collect();
        let answer = ok(
            &server,
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        if let Some(candidate) = stop_candidate(&text_of(&answer)) {
            found = Some((prompt, candidate));
            break;
        }
    }
    let (prompt, (stop, before)) = found.expect("some greedy continuation has an ASCII char");
    let request = json!({
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": true,
        "stop": [stop.clone(), "a stop string that never comes"],
    });
    let answer = ok(&server, "/v1/completions", request.clone()).await;
    assert_eq!(text_of(&answer), before, "the text stops before `{stop}`");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["choices"][0]["stop_reason"], stop.as_str());
    // A single string works too, and streaming releases exactly the same text.
    let mut streamed = request;
    streamed["stop"] = json!(stop);
    streamed["stream"] = json!(true);
    let stream = chunks(&server, "/v1/completions", streamed).await;
    let text: String = stream
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, before);
    assert_eq!(
        stream.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    // The byte fallback makes the character's token id its byte value.
    let token_id = u32::from(stop.as_bytes()[0]);
    let answer = ok(
        &server,
        "/v1/completions",
        json!({
            "prompt": prompt,
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": true,
            "stop_token_ids": [token_id],
        }),
    )
    .await;
    assert_eq!(text_of(&answer), before);
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["choices"][0]["stop_reason"], token_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_samples_fork_and_a_seed_reproduces_them() {
    let server = TestServer::start(config_for(fixture("tiny-llama"))).await;
    let request = json!({
        "prompt": [10, 20, 30, 40],
        "n": 2,
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 1234,
        "ignore_eos": true,
    });
    let first = ok(&server, "/v1/completions", request.clone()).await;
    let choices = first["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_ne!(choices[0]["text"], choices[1]["text"], "samples draw apart");
    assert_eq!(first["usage"]["prompt_tokens"], 4);
    assert_eq!(first["usage"]["completion_tokens"], 20);
    let again = ok(&server, "/v1/completions", request.clone()).await;
    assert_eq!(
        first["choices"], again["choices"],
        "the same seed, the same samples"
    );
    // Streamed, each chunk names its choice and each choice finishes once.
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let stream = chunks(&server, "/v1/completions", streamed).await;
    let mut texts = [String::new(), String::new()];
    let mut finished = [0, 0];
    for chunk in &stream {
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().unwrap() as usize;
        texts[index].push_str(choice["text"].as_str().unwrap());
        finished[index] += usize::from(!choice["finish_reason"].is_null());
    }
    assert_eq!(finished, [1, 1]);
    assert_eq!(texts[0], choices[0]["text"].as_str().unwrap());
    assert_eq!(texts[1], choices[1]["text"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_in_completions_and_chat() {
    let server = TestServer::start(config_for(tiny_chat_model())).await;
    let answer = ok(
        &server,
        "/v1/completions",
        json!({"prompt": "abc", "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": true}),
    )
    .await;
    let logprobs = &answer["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6);
    let offsets = logprobs["text_offset"].as_array().unwrap();
    assert_eq!(offsets[0], 0);
    for (i, top) in logprobs["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3, "{top:?}");
        let chosen = logprobs["token_logprobs"][i].as_f64().unwrap();
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(chosen <= 0.0);
        assert!(
            (chosen - best).abs() < 1e-5,
            "greedy picks the most likely token"
        );
    }
    let chat = ok(
        &server,
        "/v1/chat/completions",
        json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": true,
            "top_logprobs": 2,
            "ignore_eos": true,
        }),
    )
    .await;
    let content = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 4);
    for entry in content {
        assert!(entry["token"].is_string());
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        assert!(entry["bytes"].is_array());
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
    }
    // Streamed logprobs cover every token once.
    let stream = chunks(
        &server,
        "/v1/chat/completions",
        json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": true,
            "ignore_eos": true,
            "stream": true,
        }),
    )
    .await;
    let streamed: usize = stream
        .iter()
        .map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(streamed, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_usage_adds_a_last_usage_chunk() {
    let server = TestServer::start(config_for(tiny_chat_model())).await;
    let stream = chunks(
        &server,
        "/v1/chat/completions",
        json!({
            "messages": [{"role": "user", "content": "count"}],
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
    )
    .await;
    let (usage_chunk, rest) = stream.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let prompt_tokens = "<user>count\n<assistant>".len();
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5})
    );
    for chunk in rest {
        assert!(chunk["usage"].is_null(), "{chunk}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unset_max_tokens_runs_to_the_context_length() {
    let config = kiln_server::ServeConfig {
        max_model_len: Some(24),
        ..config_for(fixture("tiny-llama"))
    };
    let server = TestServer::start(config).await;
    let prompt: Vec<u32> = (40..60).collect();
    let answer = ok(
        &server,
        "/v1/completions",
        json!({"prompt": prompt, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(answer["usage"]["completion_tokens"], 4);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    // Several prompts in one request: one choice each, in order.
    let answer = ok(
        &server,
        "/v1/completions",
        json!({"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(answer["usage"]["prompt_tokens"], 5);
    assert_eq!(answer["usage"]["completion_tokens"], 6);
    let alone = ok(
        &server,
        "/v1/completions",
        json!({"prompt": [4, 5], "max_tokens": 3, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(choices[1]["text"], alone["choices"][0]["text"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_is_honoured_under_priority_scheduling() {
    let config = kiln_server::ServeConfig {
        scheduling_policy: kiln_scheduler::SchedulingPolicy::Priority,
        ..config_for(fixture("tiny-llama"))
    };
    let server = TestServer::start(config).await;
    let answer = ok(
        &server,
        "/v1/completions",
        json!({"prompt": [1, 2], "max_tokens": 2, "priority": -5, "temperature": 0}),
    )
    .await;
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_model_chats_through_its_own_tokenizer_and_template() {
    let config = kiln_server::ServeConfig {
        served_model_name: Some("kiln-default".into()),
        ..config_for(repo().join("models/default"))
    };
    let server = TestServer::start(config).await;
    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "kiln-default");
    assert_eq!(models["data"][0]["max_model_len"], 256);
    let answer = ok(
        &server,
        "/v1/chat/completions",
        json!({
            "model": "kiln-default",
            "messages": [{"role": "user", "content": "What is a list?"}],
            "max_tokens": 2,
            "temperature": 0,
        }),
    )
    .await;
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty(), "{answer}");
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap() > 3);
}

/// A plain greedy request takes the model's own argmax (the runner's `greedy_tokens`: only
/// token ids come back from the step); asking for logprobs needs the logits and the host's
/// argmax. Both must pick the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_from_the_model_equal_the_hosts_argmax_of_its_logits() {
    let server = TestServer::start(config_for(tiny_chat_model())).await;
    for prompt in ["abc", "The quick brown fox", "0 1 2 3"] {
        let request = |logprobs: Option<u32>| {
            let mut body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                  "ignore_eos": true});
            if let Some(n) = logprobs {
                body["logprobs"] = json!(n);
            }
            body
        };
        let on_the_model = ok(&server, "/v1/completions", request(None)).await;
        let on_the_host = ok(&server, "/v1/completions", request(Some(1))).await;
        assert_eq!(
            text_of(&on_the_model),
            text_of(&on_the_host),
            "prompt {prompt:?}"
        );
        assert_eq!(
            on_the_model["usage"]["completion_tokens"], 12,
            "{on_the_model}"
        );
    }
}
