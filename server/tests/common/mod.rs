//! Shared helpers of the server's integration tests: a live server on a free loopback port, an
//! HTTP client, server-sent-event and Prometheus text parsers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_server::{ServeConfig, Server};
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server/ is inside the repository")
        .to_path_buf()
}

/// A test fixture model directory (`tiny-llama`, ...).
pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// A model directory with tiny-llama's weights, a byte-level tokenizer.json and a chat
/// template (server/tests/fixtures/byte-tokenizer), assembled once per test process.
pub fn tiny_chat_model() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        // Under target/tmp (cargo's scratch space for integration tests), one per process.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("kiln-server-tests-{}", std::process::id()))
            .join("tiny-chat");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let weights = fixture("tiny-llama");
        for file in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(weights.join(file), dir.join(file)).expect("copy tiny-llama");
        }
        let tokenizer = repo().join("server/tests/fixtures/byte-tokenizer");
        for file in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            std::fs::copy(tokenizer.join(file), dir.join(file)).expect("copy tokenizer");
        }
        dir
    })
    .clone()
}

/// A configuration serving `model` on a free loopback port.
pub fn config_for(model: PathBuf) -> ServeConfig {
    ServeConfig {
        port: 0,
        host: "127.0.0.1".into(),
        cpu_kv_cache_bytes: 64 << 20,
        shutdown_timeout: Duration::from_secs(5),
        ..ServeConfig::for_model(model)
    }
}

/// A live server and a client for it.
pub struct TestServer {
    pub server: Server,
    pub client: reqwest::Client,
    pub base: String,
}

impl TestServer {
    pub async fn start(config: ServeConfig) -> TestServer {
        let server = Server::start(config).await.expect("the server starts");
        TestServer::around(server)
    }

    pub fn around(server: Server) -> TestServer {
        let base = format!("http://{}", server.local_addr());
        TestServer {
            server,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .expect("client"),
            base,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns the status and the parsed body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text}"));
        (status, json)
    }

    /// POSTs a raw body with a content type; returns the status and the parsed body.
    pub async fn post_raw(&self, path: &str, body: &str, content_type: &str) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text}"));
        (status, json)
    }

    /// GETs a path; returns the status and the text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// POSTs a streaming request and returns the status and every `data:` payload.
    pub async fn stream(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, sse_data(&text))
    }

    /// Polls the engine's statistics until `done` holds, for at most `timeout`.
    pub async fn wait_for_stats(
        &self,
        timeout: Duration,
        done: impl Fn(&kiln_scheduler::SchedulerStats) -> bool,
    ) -> kiln_scheduler::SchedulerStats {
        let started = Instant::now();
        loop {
            let stats = self
                .server
                .engine()
                .expect("a decoder has an engine")
                .stats()
                .expect("stats are published");
            if done(&stats) || started.elapsed() > timeout {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `data:` payloads of a server-sent-event stream, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            event
                .lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus text exposition (format 0.0.4): samples, and each family's TYPE.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of `name` whose labels include every pair of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|sample| {
                sample.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|sample| sample.value)
    }
}

/// Parses Prometheus text, panicking with the line on anything malformed.
pub fn parse_prometheus(text: &str) -> Exposition {
    let mut exposition = Exposition::default();
    for (number, line) in text.lines().enumerate() {
        let fail = |why: &str| -> ! { panic!("line {}: {why}: {line:?}", number + 1) };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().unwrap_or_else(|| fail("TYPE without a name"));
                    let kind = words.next().unwrap_or_else(|| fail("TYPE without a type"));
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        fail("unknown metric type");
                    }
                    exposition.types.insert(name.to_string(), kind.to_string());
                }
                Some("HELP") => {
                    words.next().unwrap_or_else(|| fail("HELP without a name"));
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail("no value"));
        let name = &line[..name_end];
        let valid_name = name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
        if name.is_empty() || !valid_name {
            fail("invalid metric name");
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after_brace) = rest.strip_prefix('{') {
            let mut chars = after_brace.char_indices().peekable();
            let consumed;
            loop {
                while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                    chars.next();
                }
                match chars.peek() {
                    Some((i, '}')) => {
                        consumed = i + 1;
                        break;
                    }
                    None => fail("unterminated label set"),
                    _ => {}
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if !matches!(chars.next(), Some((_, '"'))) {
                    fail("label value not quoted");
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => fail("dangling escape"),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => fail("unterminated label value"),
                    }
                }
                labels.insert(key, value);
            }
            rest = &after_brace[consumed..];
        }
        let value_text = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| fail("no value"));
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            text => text
                .parse()
                .unwrap_or_else(|_| fail("value is not a number")),
        };
        exposition.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    exposition
}
