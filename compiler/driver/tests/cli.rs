//! The `kiln` binary end to end: `check` reports every independent error, `compile --emit ir`
//! prints IR that parses back, and `run --generate` on the tiny Hugging Face checkpoints
//! reproduces transformers' greedy tokens exactly.

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
        assert!(
            stderr.contains("reference interpreter"),
            "the backend is announced: {stderr}"
        );
    }
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
