//! The `kiln` binary end to end: `check` reports every independent error, `compile --emit ir`
//! prints IR that parses back, `run --generate` on the tiny Hugging Face checkpoints
//! reproduces transformers' greedy tokens exactly, and `run --prompt` on models/default
//! streams the text the library's generator produces.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run kiln");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_three_independent_errors() {
    let (ok, _, stderr) = kiln(&[
        "check",
        "tests/filetests/errors/three_independent_errors.kiln",
    ]);
    assert!(!ok, "check must fail");
    assert_eq!(
        stderr.matches("error:").count(),
        3,
        "three diagnostics:\n{stderr}"
    );
    assert!(stderr.contains("3 errors found"), "{stderr}");
    for needle in [
        "unknown name `missing`",
        "matmul: inner dims differ",
        "axis 5 is out of range",
    ] {
        assert!(stderr.contains(needle), "missing `{needle}` in:\n{stderr}");
    }
}

#[test]
fn check_accepts_every_model_with_its_config() {
    for (program, config) in [
        ("models/llama.kiln", "tests/fixtures/tiny-llama"),
        ("models/llama.kiln", "tests/fixtures/tiny-qwen2"),
        ("models/gpt2.kiln", "tests/fixtures/tiny-gpt2"),
        ("models/bert.kiln", "tests/fixtures/tiny-bert"),
    ] {
        let (ok, _, stderr) = kiln(&["check", program, "--config", config]);
        assert!(ok, "{program} with {config}:\n{stderr}");
    }
    let (ok, _, stderr) = kiln(&["check", "models/llama.kiln"]);
    assert!(!ok && stderr.contains("no config was given"), "{stderr}");
}

#[test]
fn compile_emits_ir_that_parses_back() {
    let (ok, stdout, stderr) = kiln(&[
        "compile",
        "models/gpt2.kiln",
        "--config",
        "tests/fixtures/tiny-gpt2",
        "--emit",
        "ir",
    ]);
    assert!(ok, "{stderr}");
    let module = kiln_ir::parse::parse_module(&stdout).expect("IR text parses");
    assert_eq!(module.to_string(), stdout);
    assert!(module.function("forward").is_some());
}

/// The first prompt row and transformers' 32 greedy tokens, from expected.safetensors.
fn fixture_prompt_and_greedy(fixture: &str) -> (Vec<i64>, Vec<i64>) {
    let expected = kiln_runtime::weights::read_all(
        &repo()
            .join("tests/fixtures")
            .join(fixture)
            .join("expected.safetensors"),
    )
    .expect("fixture");
    let ids = &expected["input_ids"];
    let row = ids.shape[1];
    (
        ids.to_i64_vec()[..row].to_vec(),
        expected["greedy_ids"].to_i64_vec(),
    )
}

#[test]
fn run_generate_matches_transformers_greedy_tokens() {
    for fixture in ["tiny-llama", "tiny-qwen2", "tiny-gpt2"] {
        let (prompt, greedy) = fixture_prompt_and_greedy(fixture);
        let input = format!("tokens=[{:?}]", prompt);
        let dir = format!("tests/fixtures/{fixture}");
        let n = greedy.len().to_string();
        let (ok, stdout, stderr) =
            kiln(&["run", "--model", &dir, "--input", &input, "--generate", &n]);
        assert!(ok, "{fixture}: {stderr}");
        let got: Vec<i64> = stdout
            .split_whitespace()
            .map(|t| t.parse().expect("token id"))
            .collect();
        assert_eq!(
            got, greedy,
            "{fixture}: greedy tokens differ from transformers'"
        );
        // Without a GPU (this suite's machine) the CPU backend runs, and says so once.
        if kiln_cuda::CudaDevice::new(0).is_err() {
            assert_eq!(
                stderr.matches("running on the CPU backend").count(),
                1,
                "the fallback is announced once: {stderr}"
            );
        }
    }
}

#[test]
fn run_generate_on_the_interpreter_matches_transformers_too() {
    let (prompt, greedy) = fixture_prompt_and_greedy("tiny-llama");
    let input = format!("tokens=[{:?}]", prompt);
    let n = greedy.len().to_string();
    let (ok, stdout, stderr) = kiln(&[
        "run",
        "--model",
        "tests/fixtures/tiny-llama",
        "--backend",
        "interpreter",
        "--input",
        &input,
        "--generate",
        &n,
    ]);
    assert!(ok, "{stderr}");
    let got: Vec<i64> = stdout
        .split_whitespace()
        .map(|t| t.parse().expect("token id"))
        .collect();
    assert_eq!(got, greedy);
    assert!(stderr.contains("reference interpreter"), "{stderr}");
}

#[test]
fn run_reports_bad_input_clearly() {
    let (ok, _, stderr) = kiln(&[
        "run",
        "--model",
        "tests/fixtures/tiny-llama",
        "--input",
        "tokens=[[1, 2], [3]]",
    ]);
    assert!(!ok);
    assert!(stderr.contains("input `tokens`"), "{stderr}");
    let (ok, _, stderr) = kiln(&["run", "--model", "tests/fixtures/tiny-llama"]);
    assert!(!ok && stderr.contains("missing input `tokens`"), "{stderr}");
}

/// The text kiln_runtime's generator produces for `prompt` on models/default, with the
/// model program lowered and run on the CPU backend as `kiln run --backend cpu` does.
fn library_generation(prompt: &str, params: kiln_runtime::SamplingParams) -> String {
    let dir = repo().join("models/default");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (program, diagnostics) =
        kiln_lower::Program::load(&repo().join("models/llama.kiln")).expect("llama.kiln");
    assert!(diagnostics.iter().all(|d| !d.is_error()));
    let options = kiln_lower::Options {
        param_dtype: kiln_ir::DType::F32,
        entries: Some(vec!["forward".into()]),
    };
    let (lowered, _) = kiln_lower::lower(&program, Some(&config), &options);
    let lowered = lowered.expect("llama.kiln lowers with models/default's config");
    let weights = kiln_runtime::Weights::load(&dir, &lowered.params).expect("weights");
    let mut executor = kiln_runtime::CpuPlans::compile(
        lowered.module,
        std::sync::Arc::new(weights),
        &mut kiln_runtime::progress::NoProgress,
    )
    .expect("compiles for the CPU");
    let model = kiln_runtime::ProgramLogits::new(&mut executor, "forward")
        .expect("forward maps tokens to logits");
    let tokenizer = kiln_runtime::Tokenizer::from_dir(&dir).expect("tokenizer");
    let prompt_ids = tokenizer.encode(prompt, true).unwrap();
    let mut generator = kiln_runtime::Generator::new(model, tokenizer);
    generator
        .complete(&prompt_ids, params, |_| {})
        .expect("generation")
        .text
}

/// What `kiln run --prompt` printed, without the final newline.
fn printed_text(stdout: &str) -> &str {
    stdout
        .strip_suffix('\n')
        .expect("the text ends with a newline")
}

#[test]
fn run_prompt_prints_the_greedy_continuation() {
    let prompt = "The for statement";
    let params = kiln_runtime::SamplingParams {
        max_tokens: Some(12),
        ..kiln_runtime::SamplingParams::greedy()
    };
    // Compute the reference while the CLI runs.
    let (reference, (ok, stdout, stderr)) = std::thread::scope(|scope| {
        let reference = scope.spawn(|| library_generation(prompt, params));
        let args = [
            "run",
            "--model",
            "models/default",
            "--backend",
            "cpu",
            "--prompt",
            prompt,
        ];
        let cli = kiln(&[&args[..], &["--max-tokens", "12"]].concat());
        (reference.join().expect("library generation"), cli)
    });
    assert!(ok, "{stderr}");
    let printed = printed_text(&stdout);
    // transformers' greedy sample (models/default/training.json) continues the prompt with
    // " is executed, the first line of the\nvariable ends ...".
    assert!(printed.starts_with(" is executed,"), "{printed:?}");
    assert_eq!(printed, reference);
    assert!(stderr.contains("finish reason: Length"), "{stderr}");
}

#[test]
fn run_prompt_with_a_seed_is_reproducible() {
    let args = [
        "run",
        "--model",
        "models/default",
        "--prompt",
        "The for statement",
        "--max-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "7",
    ];
    let (ok, first, stderr) = kiln(&args);
    assert!(ok, "{stderr}");
    let (ok, second, stderr) = kiln(&args);
    assert!(ok, "{stderr}");
    assert!(!printed_text(&first).is_empty());
    assert_eq!(first, second, "the same seed prints the same text");
}

#[test]
fn run_prompt_rejects_bad_sampling_parameters() {
    let (ok, _, stderr) = kiln(&[
        "run",
        "--model",
        "models/default",
        "--prompt",
        "x",
        "--top-p",
        "1.5",
    ]);
    assert!(!ok);
    assert!(stderr.contains("invalid `top_p`"), "{stderr}");
    let (ok, _, stderr) = kiln(&["run", "--prompt", "x"]);
    assert!(!ok && stderr.contains("--model"), "{stderr}");
}

#[test]
fn embed_prints_the_embeddings_of_the_library_path() {
    use std::io::Write;
    let model_dir = kiln_tests::minilm_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["embed", "--backend", "cpu", "--model"])
        .arg(&model_dir)
        .args(["Hello, world!", "--file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kiln embed");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all("The quick brown fox jumps over the lazy dog.\r\nA\n".as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("kiln embed finishes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Cranelift CPU backend"),
        "says where it runs: {stderr}"
    );
    let texts = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "A",
    ];
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), texts.len());
    let model =
        kiln_runtime::EmbeddingModel::load_quiet(&model_dir, kiln_runtime::EmbedBackend::Cpu)
            .expect("load");
    let want = model.embed_texts(&texts).expect("embed");
    for (index, (line, text)) in lines.iter().zip(texts).enumerate() {
        assert_eq!(line["index"], index);
        assert_eq!(line["text"], text);
        assert_eq!(
            line["tokens"],
            model.tokenize(text).expect("tokenize").len()
        );
        let got: Vec<f32> = line["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        assert_eq!(got, want[index], "embedding of {text:?}");
    }
}

#[test]
fn embed_refuses_a_decoder_and_empty_input() {
    let (ok, _, stderr) = kiln(&["embed", "--model", "tests/fixtures/tiny-llama", "hi"]);
    assert!(!ok);
    assert!(
        stderr.contains("needs an encoder") || stderr.contains("embeddings need an encoder"),
        "{stderr}"
    );
    let (ok, _, stderr) = kiln(&["embed", "--model", "tests/fixtures/tiny-bert"]);
    assert!(!ok && stderr.contains("nothing to embed"), "{stderr}");
}

/// A fresh directory under the system temp dir for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Proposals 0, 1, 2 are close (1 and 2 mirror each other around 0), 3 is far away.
const PROPOSALS: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.9, 0.1, 0.0],
    [0.9, -0.1, 0.0],
    [-1.0, 0.0, 1.0],
];

fn decision(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn consensus_chooses_the_central_proposal_from_json_and_npy_embeddings() {
    let dir = scratch("consensus");
    let json_path = dir.join("proposals.json");
    std::fs::write(&json_path, serde_json::json!(PROPOSALS).to_string()).expect("write");
    // The same matrix as a version-1 .npy file of little-endian f32.
    let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend((header.len() as u16).to_le_bytes());
    npy.extend(header.as_bytes());
    for v in PROPOSALS.iter().flatten() {
        npy.extend(v.to_le_bytes());
    }
    let npy_path = dir.join("proposals.npy");
    std::fs::write(&npy_path, npy).expect("write");
    let mut outputs = Vec::new();
    for path in [&json_path, &npy_path] {
        let (ok, stdout, stderr) = kiln(&[
            "consensus",
            "--embeddings",
            path.to_str().unwrap(),
            "--iterations",
            "1000",
            "--eta",
            "1.0",
            "--similarity",
        ]);
        assert!(ok, "{stderr}");
        let d = decision(&stdout);
        assert_eq!(d["winner"], 0, "{stdout}");
        assert_eq!(d["method"], "hedge");
        assert_eq!(d["agent_support"].as_array().unwrap().len(), 4);
        let nashconv = d["nashconv"].as_f64().unwrap();
        assert!((0.0..1e-3).contains(&nashconv), "NashConv {nashconv}");
        // The three agents of the cluster back the winner; the similarity matrix is
        // symmetric with a unit diagonal.
        for i in 0..3 {
            assert!(d["agent_support"][i].as_f64().unwrap() > 0.9, "{stdout}");
        }
        let s = &d["similarity"];
        for i in 0..4 {
            assert!((s[i][i].as_f64().unwrap() - 1.0).abs() < 1e-6);
            for j in 0..4 {
                assert_eq!(s[i][j], s[j][i]);
            }
        }
        outputs.push(d);
    }
    assert_eq!(outputs[0], outputs[1], "JSON and .npy inputs decide alike");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn consensus_embeds_texts_with_an_encoder_and_rejects_bad_input() {
    // tiny-bert with a word-level tokenizer over a few words.
    let dir = scratch("consensus-texts");
    let fixture = repo().join("tests/fixtures/tiny-bert");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), dir.join(file)).expect("copy fixture");
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]",
                  "vocab": {"[UNK]": 0, "red": 1, "apple": 2, "blue": 3, "sky": 4, "green": 5}},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("write");
    let model = dir.to_str().unwrap();
    let (ok, stdout, stderr) = kiln(&[
        "consensus",
        "--model",
        model,
        "--text",
        "blue sky",
        "--text",
        "red apple",
        "--text",
        "red apple",
        "--text",
        "green apple",
        "--method",
        "fictitious_play",
    ]);
    assert!(ok, "{stderr}");
    let d = decision(&stdout);
    assert_eq!(d["method"], "fictitious_play");
    let winner = d["winner"].as_u64().unwrap() as usize;
    assert!(winner < 4);
    assert_eq!(
        d["winner_text"],
        ["blue sky", "red apple", "red apple", "green apple"][winner]
    );
    // Bad input: an unknown method and ragged embeddings are errors, not crashes.
    let (ok, _, stderr) = kiln(&[
        "consensus",
        "--model",
        model,
        "--text",
        "red",
        "--method",
        "plurality",
    ]);
    assert!(!ok && stderr.contains("unknown method"), "{stderr}");
    let ragged = dir.join("ragged.json");
    std::fs::write(&ragged, "[[1, 2], [3]]").expect("write");
    let (ok, _, stderr) = kiln(&["consensus", "--embeddings", ragged.to_str().unwrap()]);
    assert!(!ok && stderr.contains("width"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
