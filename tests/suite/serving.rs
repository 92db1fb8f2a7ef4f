//! Serving from the `kiln` binary's side: `kiln bench serve` on the CPU against the default
//! model (its JSON must be consistent with vLLM's definitions), and the batch-invariance soak
//! on the GPU — 64 concurrent greedy requests to `kiln serve`'s GPU runner, each equal token
//! for token and logprob for logprob to the same request run alone, in a KV cache small
//! enough to force preemptions — and, beneath it, the GPU runner's step over a ragged batch
//! against each sequence alone (prefill and decode, bit for bit), with batch invariance on
//! (and, reported but not asserted, off); the same on the CPU plans in bf16. All-MiniLM-L6-v2
//! served on the executor the runner factory's embedding maker builds (the interpreter here, the
//! GPU under the GPU factory): `/v1/embeddings` within a cosine of 0.9999 of
//! sentence-transformers'. The GPU tests are `#[ignore]`d with the reason (it needs an NVIDIA
//! GPU); scripts/gpu-check.sh runs it with `--include-ignored` where there is one.

use kiln_driver::bench_serve::{self, ServeBenchArgs};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn repo() -> PathBuf {
    std::env::var_os("KILN_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("tests/ is inside the repository")
                .to_path_buf()
        })
}

fn f(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

/// Checks one `kiln bench serve` result against the settings it ran with.
fn check_result(result: &Value, prompts: usize, input_len: usize, output_len: usize) {
    let m = &result["metrics"];
    assert_eq!(m["completed"], json!(prompts), "{m}");
    assert_eq!(m["failed"], json!(0), "{m}");
    assert_eq!(m["total_input_tokens"], json!(prompts * input_len));
    assert_eq!(m["total_output_tokens"], json!(prompts * output_len));
    let duration = f(&m["duration_s"]);
    assert!(duration > 0.0);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
    assert!(close(
        f(&m["output_throughput"]) * duration,
        (prompts * output_len) as f64
    ));
    assert!(close(
        f(&m["request_throughput"]) * duration,
        prompts as f64
    ));
    assert!(close(
        f(&m["total_token_throughput"]) * duration,
        (prompts * (input_len + output_len)) as f64
    ));
    let requests = result["requests"].as_array().expect("requests");
    assert_eq!(requests.len(), prompts);
    let (mut ttfts, mut tpots, mut itls, mut e2els) = (vec![], vec![], vec![], vec![]);
    for r in requests {
        assert_eq!(r["success"], json!(true), "{r}");
        assert_eq!(r["input_len"], json!(input_len));
        assert_eq!(r["output_tokens"], json!(output_len), "{r}");
        // One chunk a token (the default model's greedy output has text at every token).
        assert_eq!(r["chunks"], json!(output_len), "{r}");
        let itl: Vec<f64> = r["itl_ms"].as_array().unwrap().iter().map(f).collect();
        assert_eq!(itl.len(), output_len - 1, "{r}");
        let (ttft, e2el) = (f(&r["ttft_ms"]), f(&r["e2el_ms"]));
        assert!(ttft > 0.0 && ttft <= e2el, "{r}");
        assert!(itl.iter().all(|&gap| gap >= 0.0), "{r}");
        // The gaps add up to the time from the first chunk to the last.
        assert!(
            (itl.iter().sum::<f64>() - (e2el - ttft)).abs() < 1e-6,
            "{r}"
        );
        let tpot = f(&r["tpot_ms"]);
        assert!(close(tpot, (e2el - ttft) / (output_len - 1) as f64), "{r}");
        ttfts.push(ttft);
        tpots.push(tpot);
        e2els.push(e2el);
        itls.extend(itl);
    }
    for (name, mut values) in [
        ("ttft", ttfts),
        ("tpot", tpots),
        ("itl", itls),
        ("e2el", e2els),
    ] {
        values.sort_by(f64::total_cmp);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let stat = |s: &str| f(&m[format!("{s}_{name}_ms")]);
        assert!(close(stat("mean"), mean), "{name}: {m}");
        assert!(
            close(stat("median"), bench_serve::percentile(&values, 50.0)),
            "{name}"
        );
        assert!(
            values[0] <= stat("median")
                && stat("median") <= stat("p90")
                && stat("p90") <= stat("p99")
                && stat("p99") <= values[values.len() - 1],
            "{name}: {m}"
        );
    }
    assert!(f(&m["mean_ttft_ms"]) <= f(&m["mean_e2el_ms"]));
    let settings = &result["settings"];
    assert_eq!(settings["num_prompts"], json!(prompts));
    assert_eq!(settings["input_len"], json!(input_len));
    assert_eq!(settings["output_len"], json!(output_len));
    assert_eq!(result["device"]["kind"], "cpu");
    assert_eq!(result["model"]["name"], "default");
    assert_eq!(result["model"]["config"]["model_type"], "llama");
}

#[test]
fn bench_serve_on_the_cpu_reports_consistent_metrics() {
    let model = repo().join("models/default");
    let model = model.to_str().unwrap();
    let out = std::env::temp_dir().join(format!("kiln-bench-serve-{}.json", std::process::id()));
    // All at once.
    let args = ServeBenchArgs::from_flags(&[
        "--model",
        model,
        "--backend",
        "cpu",
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--seed",
        "1",
        "-o",
        out.to_str().unwrap(),
    ])
    .unwrap();
    let result = bench_serve::run(&args).unwrap();
    check_result(&result, 4, 8, 6);
    assert_eq!(result["settings"]["request_rate"], "inf");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // The file holds the same metrics (floats as JSON text keeps them, to rounding).
    let (written, returned) = (
        written["metrics"].as_object().unwrap(),
        result["metrics"].as_object().unwrap(),
    );
    assert_eq!(
        written.keys().collect::<Vec<_>>(),
        returned.keys().collect::<Vec<_>>()
    );
    for (key, value) in returned {
        assert!(
            (f(value) - f(&written[key])).abs() <= 1e-9 * f(value).abs().max(1.0),
            "{key}"
        );
    }
    let _ = std::fs::remove_file(&out);
    // Poisson arrivals, at most two in flight.
    let args = ServeBenchArgs::from_flags(&[
        "--model",
        model,
        "--backend",
        "cpu",
        "--num-prompts",
        "5",
        "--input-len",
        "5",
        "--output-len",
        "4",
        "--request-rate",
        "40",
        "--max-concurrency",
        "2",
    ])
    .unwrap();
    let result = bench_serve::run(&args).unwrap();
    check_result(&result, 5, 5, 4);
    assert_eq!(result["settings"]["request_rate"], json!(40.0));
    assert_eq!(result["settings"]["max_concurrency"], json!(2));
}

const SOAK_REQUESTS: usize = 64;
const SOAK_TOKENS: usize = 8;

/// Prompt `i` of the soak: 4 to 16 token ids; every fourth shares its first 16 tokens with
/// another, so the prefix cache is exercised too.
fn soak_prompt(i: usize) -> Vec<u32> {
    if i.is_multiple_of(4) {
        (0..16)
            .map(|k| (3 + k * 5) as u32)
            .chain([i as u32 % 256])
            .collect()
    } else {
        (0..4 + (i * 7) % 13)
            .map(|k| ((i * 31 + k * 17) % 256) as u32)
            .collect()
    }
}

/// The generated token ids and their logprobs.
fn tokens_of(answer: &Value) -> (Vec<String>, Vec<f64>) {
    let logprobs = &answer["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().expect("tokens");
    let values = logprobs["token_logprobs"].as_array().expect("logprobs");
    (
        tokens
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect(),
        values.iter().map(|v| v.as_f64().unwrap()).collect(),
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn gpu_serving_of_concurrent_greedy_requests_equals_each_alone() {
    let factory = kiln_driver::serve::GpuRunnerFactory::open()
        .unwrap_or_else(|why| panic!("no usable GPU: {why}"));
    // models/default in bf16: 3072 bytes of KV a token, so 48 blocks of 16 tokens, while 64
    // requests of up to 25 tokens want 2 blocks each: the scheduler must preempt.
    let factory = factory.with_kv_cache_bytes(48 * 16 * 3072);
    let config = kiln_server::ServeConfig {
        port: 0,
        host: "127.0.0.1".into(),
        max_num_seqs: 64,
        max_queue: 256,
        param_dtype: kiln_ir::DType::BF16,
        shutdown_timeout: Duration::from_secs(5),
        ..kiln_server::ServeConfig::for_model(repo().join("models/default"))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = kiln_server::Server::start_with_factory(config, Box::new(factory))
            .await
            .expect("the server starts on the GPU");
        let info = server.info().clone();
        assert_eq!(info.num_blocks, 48, "{info:?}");
        assert!(info.runner.starts_with("GPU"), "{}", info.runner);
        let url = Arc::new(format!("http://{}/v1/completions", server.local_addr()));
        let client = reqwest::Client::new();
        let request = |i: usize| {
            json!({
                "model": info.model_name,
                "prompt": soak_prompt(i),
                "max_tokens": SOAK_TOKENS,
                "temperature": 0,
                "ignore_eos": true,
                "logprobs": 0,
                "return_tokens_as_token_ids": true,
            })
        };
        let post = |body: Value| {
            let (client, url) = (client.clone(), Arc::clone(&url));
            async move {
                let response = client.post(url.as_str()).json(&body).send().await.unwrap();
                let status = response.status();
                let answer: Value = response.json().await.unwrap();
                assert!(status.is_success(), "{status}: {answer}");
                answer
            }
        };
        let tasks: Vec<_> = (0..SOAK_REQUESTS)
            .map(|i| tokio::spawn(post(request(i))))
            .collect();
        let mut batched = Vec::new();
        for task in tasks {
            batched.push(task.await.unwrap());
        }
        let metrics = client
            .get(format!("http://{}/metrics", server.local_addr()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let preemptions: f64 = metrics
            .lines()
            .find(|l| l.starts_with("kiln:num_preemptions_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.trim().parse().ok())
            .expect("kiln:num_preemptions_total");
        let (mut token_mismatches, mut logprob_mismatches) = (Vec::new(), Vec::new());
        for (i, batched_answer) in batched.iter().enumerate() {
            let alone = post(request(i)).await;
            let (batch_tokens, batch_logprobs) = tokens_of(batched_answer);
            let (alone_tokens, alone_logprobs) = tokens_of(&alone);
            assert_eq!(batch_tokens.len(), SOAK_TOKENS, "{batched_answer}");
            if batch_tokens != alone_tokens {
                token_mismatches.push(format!(
                    "request {i}: batched {batch_tokens:?}, alone {alone_tokens:?}"
                ));
            } else if batch_logprobs != alone_logprobs {
                logprob_mismatches.push(format!(
                    "request {i}: batched {batch_logprobs:?}, alone {alone_logprobs:?}"
                ));
            }
        }
        println!(
            "gpu soak: {SOAK_REQUESTS} concurrent greedy requests x {SOAK_TOKENS} tokens on {}: \
             {preemptions} preemptions; {} differ in tokens, {} more only in logprobs",
            info.runner,
            token_mismatches.len(),
            logprob_mismatches.len()
        );
        assert!(
            token_mismatches.is_empty() && logprob_mismatches.is_empty(),
            "tokens:\n{}\nlogprobs:\n{}",
            token_mismatches.join("\n"),
            logprob_mismatches.join("\n")
        );
        assert!(
            preemptions > 0.0,
            "the cache was meant to force preemptions"
        );
        let engine = server.engine().unwrap().clone();
        let mut free = false;
        for _ in 0..200 {
            if let Some(stats) = engine.stats() {
                if stats.cache.num_free_blocks == stats.cache.num_blocks {
                    free = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(free, "every block comes back: {:?}", engine.stats());
        server.shutdown().await.unwrap();
    });
}

/// Logits rows of a batched prefill and decode step of 24 sequences, then of each alone, on
/// the runner `factory` makes for models/default in `dtype`; returns how many rows differ.
fn runner_batch_differences(
    mut factory: Box<dyn kiln_server::RunnerFactory>,
    dtype: kiln_ir::DType,
    batch_invariant: bool,
) -> (usize, usize) {
    use kiln_kvcache::{BlockId, SeqId};
    use kiln_server::{CacheLayout, LoadedModel, SequenceInput};
    let model = LoadedModel::load_as(&repo().join("models/default"), dtype, None)
        .expect("models/default loads");
    let config = kiln_server::ServeConfig {
        batch_invariant,
        ..kiln_server::ServeConfig::default()
    };
    factory.kv_cache_budget(&model, &config).unwrap();
    let cache = CacheLayout {
        num_blocks: 64,
        block_size: 16,
        max_model_len: 256,
    };
    let mut runner = factory.make(&model, &cache).unwrap();
    // 24 sequences of 3 to 25 tokens, two blocks each: a decode step of all of them has 24
    // rows, more than the decode-sized GEMM kernels take; alone it has one.
    let prompts: Vec<Vec<u32>> = (0..24)
        .map(|i| {
            (0..3 + i)
                .map(|k| ((i * 37 + k * 11) % 4000) as u32)
                .collect()
        })
        .collect();
    let tables: Vec<Vec<BlockId>> = (0..24)
        .map(|i| vec![BlockId(2 * i), BlockId(2 * i + 1)])
        .collect();
    let argmax = |row: &[f32]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap() as u32
    };
    fn input<'a>(
        i: usize,
        tokens: &'a [u32],
        cached: usize,
        tables: &'a [Vec<BlockId>],
    ) -> SequenceInput<'a> {
        SequenceInput {
            seq_id: SeqId(i as u64),
            token_ids: tokens,
            num_cached_tokens: cached,
            block_table: &tables[i],
            samples_token: true,
        }
    }
    let batch: Vec<SequenceInput<'_>> =
        (0..24).map(|i| input(i, &prompts[i], 0, &tables)).collect();
    let prefill_batched = runner.logits(&batch).unwrap();
    let extended: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&prefill_batched)
        .map(|(p, row)| p.iter().copied().chain([argmax(row)]).collect())
        .collect();
    let batch: Vec<SequenceInput<'_>> = (0..24)
        .map(|i| input(i, &extended[i], prompts[i].len(), &tables))
        .collect();
    let decode_batched = runner.logits(&batch).unwrap();
    let (mut prefill_differ, mut decode_differ) = (0, 0);
    for i in 0..24 {
        let prefill = runner.logits(&[input(i, &prompts[i], 0, &tables)]).unwrap();
        let decode = runner
            .logits(&[input(i, &extended[i], prompts[i].len(), &tables)])
            .unwrap();
        prefill_differ += usize::from(prefill[0] != prefill_batched[i]);
        decode_differ += usize::from(decode[0] != decode_batched[i]);
    }
    (prefill_differ, decode_differ)
}

#[test]
fn cpu_runner_rows_do_not_depend_on_the_batch() {
    // bf16, whose GEMMs have decode-sized kernels for few rows (the logits of one sequence
    // alone): batch invariance keeps every row on the kernels of many rows.
    let factory = Box::new(kiln_server::CpuRunnerFactory::new(1));
    let differ = runner_batch_differences(factory, kiln_ir::DType::BF16, true);
    assert_eq!(differ, (0, 0));
}

fn gpu_factory() -> Box<dyn kiln_server::RunnerFactory> {
    Box::new(
        kiln_driver::serve::GpuRunnerFactory::open()
            .unwrap_or_else(|why| panic!("no usable GPU: {why}")),
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn gpu_runner_rows_do_not_depend_on_the_batch() {
    let bf16 = kiln_ir::DType::BF16;
    let (prefill, decode) = runner_batch_differences(gpu_factory(), bf16, true);
    println!(
        "gpu runner, batch invariant: {prefill} prefill and {decode} decode rows of 24 differ"
    );
    assert_eq!((prefill, decode), (0, 0));
    // Without it, steps of few tokens take the decode-sized kernels: reported, not asserted.
    let (prefill, decode) = runner_batch_differences(gpu_factory(), bf16, false);
    println!(
        "gpu runner, --no-batch-invariance: {prefill} prefill and {decode} decode rows of 24 \
         differ from the same sequence alone"
    );
}

/// The package the GPU runner loads: models/default's `step` in bf16 assembles for every
/// target, and its manifest lists every weight the checkpoint binds (needs ptxas, no GPU).
#[test]
fn the_gpu_runners_step_package_assembles_for_every_target() {
    let toolchain = match kiln_ptx::Toolchain::discover() {
        Ok(toolchain) => toolchain,
        Err(e) if std::env::var("KILN_ALLOW_NO_PTXAS").is_ok_and(|v| v == "1") => {
            eprintln!("NOT RUN (no ptxas): {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let model = kiln_server::LoadedModel::load_as(
        &repo().join("models/default"),
        kiln_ir::DType::BF16,
        None,
    )
    .unwrap();
    let options = kiln_driver::pipeline::CompileOptions::default();
    let package = kiln_driver::serve::compile_step(&model, &options, Some(&toolchain)).unwrap();
    let step = &package.lowered.module;
    assert_eq!(step.functions.len(), 1);
    assert_eq!(step.functions[0].name, "step");
    assert!(package.fatbin.is_some());
    assert_eq!(package.code.len(), kiln_ptx::Target::ALL.len());
    for target in &package.code {
        assert!(target.cubin.is_some(), "{}", target.target.sm_name());
    }
    let weights: Vec<&str> = package
        .manifest
        .weights
        .iter()
        .map(|w| w.checkpoint_name.as_str())
        .collect();
    for param in &model.params {
        assert!(
            weights.contains(&param.checkpoint_name.as_str()),
            "{}",
            param.checkpoint_name
        );
        assert_eq!(
            param.ty.dtype,
            kiln_ir::DType::BF16,
            "{}",
            param.checkpoint_name
        );
    }
    // The plan has both GEMM variants that batch invariance chooses between.
    let text = format!("{:?}", package.manifest.plans);
    assert!(
        text.contains("BySize"),
        "bf16 GEMMs of symbolic rows get a decode-sized variant"
    );
}

/// Serves all-MiniLM-L6-v2 (`kiln_tests::minilm_dir()`, which `KILN_MINILM_DIR` overrides; a
/// missing model fails the test) with `factory` and checks that `/v1/embeddings` of the 20
/// sentences of tests/fixtures/minilm-expected.json have a cosine of at least 0.9999 with
/// sentence-transformers' and that `/v1/consensus` decides among texts; returns where the
/// server said the embeddings run.
fn served_minilm_matches_sentence_transformers(
    factory: Box<dyn kiln_server::RunnerFactory>,
) -> String {
    let expected = kiln_tests::read_json(&repo().join("tests/fixtures/minilm-expected.json"));
    let sentences = expected["sentences"].as_array().expect("sentences");
    let texts: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().expect("text"))
        .collect();
    let config = kiln_server::ServeConfig {
        port: 0,
        host: "127.0.0.1".into(),
        shutdown_timeout: Duration::from_secs(5),
        ..kiln_server::ServeConfig::for_model(kiln_tests::minilm_dir())
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = kiln_server::Server::start_with_factory(config, factory)
            .await
            .expect("the server starts");
        let client = reqwest::Client::new();
        let post = |path: &str, body: Value| {
            let request = client
                .post(format!("http://{}{path}", server.local_addr()))
                .json(&body);
            async move {
                let response = request.send().await.unwrap();
                let status = response.status();
                let answer: Value = response.json().await.unwrap();
                assert!(status.is_success(), "{status}: {answer}");
                answer
            }
        };
        let answer = post("/v1/embeddings", json!({"input": texts})).await;
        for (index, sentence) in sentences.iter().enumerate() {
            let got = kiln_tests::json_numbers(&answer["data"][index]["embedding"]);
            let want = kiln_tests::json_numbers(&sentence["embedding"]);
            assert_eq!(got.len(), want.len(), "dimension of sentence {index}");
            let dot: f64 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let cosine = dot / (norm(&got) * norm(&want));
            assert!(
                cosine >= 0.9999,
                "sentence {index} ({:?}): cosine {cosine} with sentence-transformers",
                texts[index]
            );
        }
        let decision = post(
            "/v1/consensus",
            json!({"proposals": ["ship on friday", "ship on friday please", "never ship"]}),
        )
        .await;
        assert!(
            decision["winner"].as_u64().is_some_and(|w| w < 3),
            "{decision}"
        );
        let runner = server.info().runner.clone();
        server.shutdown().await.expect("the server shuts down");
        runner
    })
}

/// A CPU runner factory whose encoder embeddings run on the reference interpreter: the
/// server must embed on the executor the factory's `embedding_maker` builds.
struct InterpreterEmbeddings(kiln_server::CpuRunnerFactory);

impl kiln_server::RunnerFactory for InterpreterEmbeddings {
    fn kv_cache_budget(
        &mut self,
        model: &kiln_server::LoadedModel,
        config: &kiln_server::ServeConfig,
    ) -> Result<kiln_server::KvCacheBudget, kiln_server::ServerError> {
        kiln_server::RunnerFactory::kv_cache_budget(&mut self.0, model, config)
    }

    fn make(
        self: Box<Self>,
        model: &kiln_server::LoadedModel,
        cache: &kiln_server::CacheLayout,
    ) -> Result<Box<dyn kiln_server::ModelRunner>, kiln_server::ServerError> {
        kiln_server::RunnerFactory::make(Box::new(self.0), model, cache)
    }

    fn embedding_maker(&mut self) -> Box<kiln_runtime::embed::EmbedExecutorMaker> {
        kiln_runtime::EmbedBackend::Interpreter.maker()
    }
}

#[test]
fn served_embeddings_run_on_the_runner_factorys_executor() {
    let factory = InterpreterEmbeddings(kiln_server::CpuRunnerFactory::new(1));
    let runner = served_minilm_matches_sentence_transformers(Box::new(factory));
    assert!(
        runner.starts_with(kiln_runtime::EmbedBackend::Interpreter.name()),
        "{runner}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn gpu_serving_of_minilm_embeddings_matches_sentence_transformers() {
    let runner = served_minilm_matches_sentence_transformers(gpu_factory());
    assert!(runner.starts_with("GPU ("), "{runner}");
}
