//! `kiln bench serve`: a load generator for an OpenAI-compatible server with the definitions of
//! vLLM's serving benchmark (benchmarks/benchmark_serving.py), so the numbers compare:
//!
//! - `--num-prompts` random prompts of `--input-len` token ids (uniform over the vocabulary,
//!   from `--seed`), each asking for exactly `--output-len` tokens (greedy, `ignore_eos`),
//!   streamed from `/v1/completions` over real HTTP;
//! - arrivals: a Poisson process of `--request-rate` requests a second (`inf`: all at once),
//!   optionally at most `--max-concurrency` in flight;
//! - per request: TTFT = time to the first chunk that carries `choices`; ITL = every gap
//!   between such chunks; E2E latency = time to the last one; output tokens from the final
//!   `usage` chunk; TPOT = (E2E - TTFT) / (output tokens - 1);
//! - mean, median, standard deviation, p90 and p99 of each (percentiles linearly
//!   interpolated, as numpy's), and request, output-token and total-token throughput over
//!   the benchmark's duration.
//!
//! The server is `--url`, or one started in this process on a free loopback port: `--model
//! DIR`, or by default a Llama of `kiln bench decode`'s 1.1B shape with random weights and a
//! word-level tokenizer of one word per id (so every token streams as one chunk). The JSON
//! (`-o FILE`) names the device (GPU and driver, or CPU), the commit, the model, the settings,
//! every metric and every request's measurements.

use crate::backend::{self, BackendChoice};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use kiln_server::{ServeConfig, Server};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The config.json of the 1.1B Llama shape kiln's benchmarks use (BASELINES.md): hidden 2048,
/// 16 layers, 32 query and 8 key/value heads, ffn 8192, vocabulary 32000.
pub const LLAMA_1B: &str = r#"{
  "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
  "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
  "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
  "max_position_embeddings": 2048, "tie_word_embeddings": false
}"#;

/// The flags of `kiln bench serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeBenchArgs {
    /// Benchmark the server at this base URL (e.g. http://127.0.0.1:8000) instead of one
    /// started here.
    #[arg(long, value_name = "URL", conflicts_with_all = ["model", "config"])]
    pub url: Option<String>,
    /// Serve this Hugging Face model directory here (default: the 1.1B Llama shape with
    /// random weights).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// A Llama config.json to serve with random weights instead of the 1.1B shape.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The model name sent in requests (default: the first of the server's /v1/models).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// The vocabulary prompt ids are drawn from (default: the model's config.json; 32000
    /// with --url).
    #[arg(long, value_name = "N")]
    pub vocab_size: Option<usize>,
    /// Requests sent.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub num_prompts: usize,
    /// Prompt tokens of each request.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub input_len: usize,
    /// Tokens each request generates (ignore_eos, so exactly this many).
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub output_len: usize,
    /// Requests a second, arriving as a Poisson process; `inf` sends them all at once.
    #[arg(long, default_value = "inf", value_name = "RATE")]
    pub request_rate: f64,
    /// At most this many requests in flight.
    #[arg(long, value_name = "N")]
    pub max_concurrency: Option<usize>,
    /// Seed of the prompts and the arrival times (and of the random weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the server started here runs the model.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// The dtype of the weights and the KV cache of the server started here.
    #[arg(long, value_enum, default_value_t = kiln_server::DtypeArg::Auto)]
    pub dtype: kiln_server::DtypeArg,
    /// Most sequences the server started here runs at once.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_num_seqs: usize,
    /// Fraction of the GPU memory left with the model loaded that the KV cache takes.
    #[arg(long, default_value_t = 0.9, value_name = "FRACTION")]
    pub gpu_memory_utilization: f64,
    /// Host memory for the KV cache when the server started here runs on the CPU.
    #[arg(long, default_value = "1GiB", value_name = "SIZE",
          value_parser = kiln_server::cli::parse_size)]
    pub kv_cache_memory: u64,
    /// Let the GPU server use decode-sized GEMM kernels for steps of few tokens (see `kiln
    /// serve --no-batch-invariance`).
    #[arg(long)]
    pub no_batch_invariance: bool,
    /// Write the JSON result here.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(clap::Parser)]
struct Flags {
    #[command(flatten)]
    args: ServeBenchArgs,
}

impl ServeBenchArgs {
    /// The arguments `kiln bench serve FLAGS...` would get.
    pub fn from_flags(flags: &[&str]) -> Result<ServeBenchArgs> {
        use clap::Parser;
        let argv = std::iter::once("kiln-bench-serve").chain(flags.iter().copied());
        Ok(Flags::try_parse_from(argv)?.args)
    }
}

/// One request's measurements.
#[derive(Clone, Debug, Default)]
struct RequestResult {
    success: bool,
    error: Option<String>,
    prompt_len: usize,
    output_tokens: usize,
    /// Chunks that carried `choices`.
    chunks: usize,
    ttft: f64,
    latency: f64,
    itl: Vec<f64>,
}

/// Mean, median, standard deviation and percentiles of `values` in milliseconds, under
/// vLLM's key names (`mean_ttft_ms`, ...).
fn summarize(name: &str, seconds: &[f64], out: &mut serde_json::Map<String, Value>) {
    let mut ms: Vec<f64> = seconds.iter().map(|s| s * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let mean = if n == 0 {
        0.0
    } else {
        ms.iter().sum::<f64>() / n as f64
    };
    let std = if n == 0 {
        0.0
    } else {
        (ms.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt()
    };
    out.insert(format!("mean_{name}_ms"), json!(mean));
    out.insert(format!("median_{name}_ms"), json!(percentile(&ms, 50.0)));
    out.insert(format!("std_{name}_ms"), json!(std));
    for p in [90.0, 99.0] {
        out.insert(format!("p{p}_{name}_ms"), json!(percentile(&ms, p)));
    }
}

/// The `p`th percentile of sorted `values`, interpolated linearly between the closest ranks
/// (numpy's default); 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
        }
    }
}

/// Sends one streamed completion and measures it (vLLM's `async_request_openai_completions`).
async fn send(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    prompt: Vec<u32>,
    output_len: usize,
) -> RequestResult {
    let mut result = RequestResult {
        prompt_len: prompt.len(),
        ..RequestResult::default()
    };
    let body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let response = match client.post(url).json(&body).send().await {
        Ok(response) => response,
        Err(e) => {
            result.error = Some(e.to_string());
            return result;
        }
    };
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        result.error = Some(format!("HTTP {status}: {text}"));
        return result;
    }
    let mut last = start;
    let mut usage_tokens = None;
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    'read: while let Some(piece) = stream.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(e) => {
                result.error = Some(e.to_string());
                return result;
            }
        };
        let now = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                break 'read;
            }
            let chunk: Value = match serde_json::from_str(data) {
                Ok(chunk) => chunk,
                Err(e) => {
                    result.error = Some(format!("a chunk that is not JSON ({e}): {data}"));
                    return result;
                }
            };
            if let Some(error) = chunk.get("error") {
                result.error = Some(error.to_string());
                return result;
            }
            if chunk["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                if result.chunks == 0 {
                    result.ttft = (now - start).as_secs_f64();
                } else {
                    result.itl.push((now - last).as_secs_f64());
                }
                result.chunks += 1;
                last = now;
            } else if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
                usage_tokens = Some(tokens as usize);
            }
        }
    }
    if result.chunks == 0 {
        result.error = Some("the stream ended before any token".into());
        return result;
    }
    result.latency = (last - start).as_secs_f64();
    result.output_tokens = usage_tokens.unwrap_or(result.chunks);
    result.success = true;
    result
}

/// What the benchmark runs against, for the JSON.
struct Target {
    base: String,
    model_name: String,
    model: Value,
    device: Value,
    vocab_size: usize,
    server: Option<Server>,
    _scratch: Option<Scratch>,
}

/// A temporary directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A word-level tokenizer.json of `vocab` words `t0`, `t1`, ...: every id decodes to text of
/// its own, so each generated token streams as a chunk.
fn word_tokenizer(vocab: usize) -> Value {
    let words: serde_json::Map<String, Value> =
        (0..vocab).map(|i| (format!("t{i}"), json!(i))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"},
    })
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

async fn start_server(args: &ServeBenchArgs) -> Result<Target> {
    let (dir, scratch, random, config_json) = match &args.model {
        Some(dir) => (dir.clone(), None, None, crate::read_config_json(dir)?),
        None => {
            let config: Value = match &args.config {
                Some(path) => crate::read_config_json(path)?,
                None => serde_json::from_str(LLAMA_1B)?,
            };
            let vocab = config["vocab_size"]
                .as_u64()
                .ok_or_else(|| anyhow!("the config has no vocab_size"))?
                as usize;
            let dir = std::env::temp_dir().join(format!(
                "kiln-bench-serve-{}-{}",
                std::process::id(),
                args.seed
            ));
            std::fs::create_dir_all(&dir)?;
            let scratch = Scratch(dir.clone());
            std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)?;
            std::fs::write(
                dir.join("tokenizer.json"),
                serde_json::to_string(&word_tokenizer(vocab))?,
            )?;
            (dir, Some(scratch), Some(args.seed), config)
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (factory, gpu, device) = match args.backend {
        BackendChoice::Auto | BackendChoice::Gpu => match backend::gpu_parts() {
            Ok(parts) => {
                let info = parts.0.info();
                let device = json!({
                    "kind": "gpu",
                    "name": info.name,
                    "compute_capability": format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
                    "memory_bytes": info.total_memory,
                    "driver": info.driver_version.to_string(),
                });
                let factory: Box<dyn kiln_server::RunnerFactory> =
                    Box::new(crate::serve::GpuRunnerFactory::new(parts));
                (factory, true, device)
            }
            Err(why) if args.backend == BackendChoice::Gpu => bail!("no usable GPU: {why}"),
            Err(why) => {
                eprintln!("kiln: no GPU ({why}): serving on the CPU backend");
                let (factory, _) = crate::serve::factory(BackendChoice::Cpu, threads)?;
                (
                    factory,
                    false,
                    json!({"kind": "cpu", "name": cpu_name(), "threads": threads}),
                )
            }
        },
        choice => {
            let (factory, _) = crate::serve::factory(choice, threads)?;
            (
                factory,
                false,
                json!({"kind": "cpu", "name": cpu_name(), "threads": threads}),
            )
        }
    };
    let dtype = args.dtype.resolve(gpu);
    let config = ServeConfig {
        port: 0,
        host: "127.0.0.1".into(),
        max_num_seqs: args.max_num_seqs,
        max_queue: args.num_prompts.max(1),
        gpu_memory_utilization: args.gpu_memory_utilization,
        cpu_kv_cache_bytes: args.kv_cache_memory,
        param_dtype: dtype,
        random_weights: random,
        batch_invariant: !args.no_batch_invariance,
        shutdown_timeout: Duration::from_secs(5),
        ..ServeConfig::for_model(&dir)
    };
    eprintln!("kiln: starting the server on {}", dir.display());
    let server = Server::start_with_factory(config, factory).await?;
    let info = server.info().clone();
    eprintln!(
        "kiln: serving on http://{} ({}; KV cache {} blocks of {} tokens)",
        server.local_addr(),
        info.runner,
        info.num_blocks,
        info.block_size
    );
    let vocab_size = config_json["vocab_size"].as_u64().unwrap_or(32000) as usize;
    let model = json!({
        "name": info.model_name,
        "dir": args.model.as_ref().map(|d| d.display().to_string()),
        "random_weights": random.map(|seed| json!({"seed": seed})),
        "config": config_json,
        "dtype": dtype.name(),
        "runner": info.runner,
        "max_model_len": info.max_model_len,
        "kv_cache_blocks": info.num_blocks,
        "kv_block_size": info.block_size,
        "max_num_seqs": args.max_num_seqs,
        "batch_invariant": !args.no_batch_invariance,
    });
    Ok(Target {
        base: format!("http://{}", server.local_addr()),
        model_name: info.model_name,
        model,
        device,
        vocab_size,
        server: Some(server),
        _scratch: scratch,
    })
}

async fn remote(args: &ServeBenchArgs, url: &str, client: &reqwest::Client) -> Result<Target> {
    let base = url.trim_end_matches('/').to_string();
    let model_name = match &args.served_model_name {
        Some(name) => name.clone(),
        None => {
            let models: Value = client
                .get(format!("{base}/v1/models"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            models["data"][0]["id"]
                .as_str()
                .ok_or_else(|| anyhow!("{base}/v1/models lists no model"))?
                .to_string()
        }
    };
    Ok(Target {
        base,
        model: json!({"name": model_name}),
        model_name,
        device: json!({"kind": "remote", "url": url}),
        vocab_size: args.vocab_size.unwrap_or(32000),
        server: None,
        _scratch: None,
    })
}

/// A small xorshift generator: prompts and arrival gaps reproducible from `--seed`.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs `kiln bench serve` and returns its JSON result (also written to `--out`).
pub fn run(args: &ServeBenchArgs) -> Result<Value> {
    if args.num_prompts == 0 || args.input_len == 0 || args.output_len == 0 {
        bail!("--num-prompts, --input-len and --output-len must be at least 1");
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        bail!("--request-rate must be positive (inf: all at once)");
    }
    if args.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: &ServeBenchArgs) -> Result<Value> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.num_prompts)
        .build()?;
    let mut target = match &args.url {
        Some(url) => remote(args, url, &client).await?,
        None => start_server(args).await?,
    };
    if let Some(vocab) = args.vocab_size {
        target.vocab_size = vocab;
    }
    let result = drive(args, &target, &client).await;
    if let Some(server) = target.server.take() {
        server.shutdown().await?;
    }
    let result = result?;
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("kiln: wrote {}", path.display());
    }
    Ok(result)
}

async fn drive(args: &ServeBenchArgs, target: &Target, client: &reqwest::Client) -> Result<Value> {
    let url = format!("{}/v1/completions", target.base);
    let mut rng = Rng::new(args.seed);
    let vocab = target.vocab_size.max(1);
    let prompts: Vec<Vec<u32>> = (0..args.num_prompts)
        .map(|_| {
            (0..args.input_len)
                .map(|_| ((rng.next_f64() * vocab as f64) as usize).min(vocab - 1) as u32)
                .collect()
        })
        .collect();
    // A first request, not counted: the server answers, and first-run work is done.
    let warmup = send(
        client,
        &url,
        &target.model_name,
        prompts[0].clone(),
        args.output_len.min(4),
    )
    .await;
    if let Some(error) = warmup.error {
        bail!("the warm-up request failed: {error}");
    }
    // Poisson arrivals: exponential gaps of mean 1 / rate.
    let gaps: Vec<f64> = (0..args.num_prompts)
        .map(|_| {
            if args.request_rate.is_infinite() {
                0.0
            } else {
                -(1.0 - rng.next_f64()).ln() / args.request_rate
            }
        })
        .collect();
    let limit = args
        .max_concurrency
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    eprintln!(
        "kiln: {} requests of {} tokens in, {} out; request rate {}; max concurrency {}",
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.request_rate,
        args.max_concurrency
            .map_or_else(|| "none".to_string(), |n| n.to_string())
    );
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.num_prompts);
    for (prompt, gap) in prompts.into_iter().zip(gaps) {
        if gap > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        let permit = match &limit {
            Some(limit) => Some(Arc::clone(limit).acquire_owned().await?),
            None => None,
        };
        let (client, url, model) = (client.clone(), url.clone(), target.model_name.clone());
        let output_len = args.output_len;
        tasks.push(tokio::spawn(async move {
            let result = send(&client, &url, &model, prompt, output_len).await;
            drop(permit);
            result
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await?);
    }
    let duration = start.elapsed().as_secs_f64();
    Ok(report(args, target, &results, duration))
}

fn report(
    args: &ServeBenchArgs,
    target: &Target,
    results: &[RequestResult],
    duration: f64,
) -> Value {
    let done: Vec<&RequestResult> = results.iter().filter(|r| r.success).collect();
    let input: usize = done.iter().map(|r| r.prompt_len).sum();
    let output: usize = done.iter().map(|r| r.output_tokens).sum();
    let ttfts: Vec<f64> = done.iter().map(|r| r.ttft).collect();
    let tpots: Vec<f64> = done
        .iter()
        .filter(|r| r.output_tokens > 1)
        .map(|r| (r.latency - r.ttft) / (r.output_tokens - 1) as f64)
        .collect();
    let itls: Vec<f64> = done.iter().flat_map(|r| r.itl.iter().copied()).collect();
    let e2els: Vec<f64> = done.iter().map(|r| r.latency).collect();
    let mut metrics = serde_json::Map::new();
    metrics.insert("completed".into(), json!(done.len()));
    metrics.insert("failed".into(), json!(results.len() - done.len()));
    metrics.insert("duration_s".into(), json!(duration));
    metrics.insert("total_input_tokens".into(), json!(input));
    metrics.insert("total_output_tokens".into(), json!(output));
    metrics.insert(
        "request_throughput".into(),
        json!(done.len() as f64 / duration),
    );
    metrics.insert("output_throughput".into(), json!(output as f64 / duration));
    metrics.insert(
        "total_token_throughput".into(),
        json!((input + output) as f64 / duration),
    );
    summarize("ttft", &ttfts, &mut metrics);
    summarize("tpot", &tpots, &mut metrics);
    summarize("itl", &itls, &mut metrics);
    summarize("e2el", &e2els, &mut metrics);
    let requests: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "success": r.success,
                "error": r.error,
                "input_len": r.prompt_len,
                "output_tokens": r.output_tokens,
                "chunks": r.chunks,
                "ttft_ms": r.ttft * 1e3,
                "e2el_ms": r.latency * 1e3,
                "tpot_ms": (r.success && r.output_tokens > 1)
                    .then(|| (r.latency - r.ttft) / (r.output_tokens - 1) as f64 * 1e3),
                "itl_ms": r.itl.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
            })
        })
        .collect();
    print_summary(&metrics, args);
    let rate = if args.request_rate.is_infinite() {
        json!("inf")
    } else {
        json!(args.request_rate)
    };
    json!({
        "benchmark": "kiln bench serve (vLLM benchmark_serving definitions)",
        "date_unix_s": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "commit": commit(),
        "device": target.device,
        "model": target.model,
        "settings": {
            "url": args.url,
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "request_rate": rate,
            "max_concurrency": args.max_concurrency,
            "seed": args.seed,
            "temperature": 0.0,
            "ignore_eos": true,
            "vocab_size": target.vocab_size,
        },
        "metrics": metrics,
        "requests": requests,
    })
}

fn print_summary(metrics: &serde_json::Map<String, Value>, args: &ServeBenchArgs) {
    let get = |key: &str| metrics.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    println!("{:=^60}", " Serving Benchmark Result ");
    println!("{:<44}{:>16}", "Successful requests:", get("completed"));
    println!("{:<44}{:>16}", "Failed requests:", get("failed"));
    println!(
        "{:<44}{:>16}",
        "Request rate (req/s):",
        if args.request_rate.is_infinite() {
            "inf".to_string()
        } else {
            args.request_rate.to_string()
        }
    );
    println!(
        "{:<44}{:>16.2}",
        "Benchmark duration (s):",
        get("duration_s")
    );
    println!(
        "{:<44}{:>16}",
        "Total input tokens:",
        get("total_input_tokens")
    );
    println!(
        "{:<44}{:>16}",
        "Total generated tokens:",
        get("total_output_tokens")
    );
    println!(
        "{:<44}{:>16.2}",
        "Request throughput (req/s):",
        get("request_throughput")
    );
    println!(
        "{:<44}{:>16.2}",
        "Output token throughput (tok/s):",
        get("output_throughput")
    );
    println!(
        "{:<44}{:>16.2}",
        "Total token throughput (tok/s):",
        get("total_token_throughput")
    );
    for (name, title) in [
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ] {
        println!("{:-^60}", format!(" {title} "));
        for stat in ["mean", "median", "p90", "p99"] {
            let key = format!("{stat}_{name}_ms");
            let label = format!("{} {} (ms):", capitalize(stat), name.to_uppercase());
            println!("{label:<44}{:>16.2}", get(&key));
        }
    }
    println!("{:=^60}", "");
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The commit measured: `KILN_COMMIT` (set where the tree is a copy without .git), else git's.
pub fn commit() -> Option<String> {
    std::env::var("KILN_COMMIT").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let values = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&values, 50.0), 2.5);
        assert!((percentile(&values, 90.0) - 3.7).abs() < 1e-12);
        assert!((percentile(&values, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn flags_parse_with_vllm_defaults_of_kiln() {
        let args =
            ServeBenchArgs::from_flags(&["--num-prompts", "3", "--request-rate", "2.5"]).unwrap();
        assert_eq!(args.num_prompts, 3);
        assert_eq!(args.request_rate, 2.5);
        assert!(ServeBenchArgs::from_flags(&[])
            .unwrap()
            .request_rate
            .is_infinite());
        assert!(ServeBenchArgs::from_flags(&["--url", "http://x", "--model", "m"]).is_err());
    }
}
