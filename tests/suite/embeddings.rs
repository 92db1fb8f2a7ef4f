//! Sentence embeddings of the real all-MiniLM-L6-v2 against sentence-transformers: 20 varied
//! sentences (tests/fixtures/minilm-expected.json, made by make_minilm_expected.py) through
//! `kiln_runtime::EmbeddingModel`, the path `kiln embed` and the server take. kiln's token ids
//! must equal sentence-transformers' exactly (truncation at max_seq_length included), and
//! every embedding must have a cosine of at least 0.9999 with sentence-transformers' float32
//! CPU result, on the compiled CPU plan, on the reference interpreter and on the GPU (the GPU
//! test is `#[ignore]`d with the reason: a machine without a GPU reports it as ignored, never
//! as passed; scripts/gpu-check.sh runs it with `--include-ignored`). The model directory is
//! `kiln_tests::minilm_dir()` (`KILN_MINILM_DIR` overrides it); a missing model fails every
//! test here with the reason, it never skips one.

use kiln_driver::backend::{self, BackendChoice};
use kiln_runtime::{EmbedBackend, EmbeddingModel, NoProgress};
use kiln_tests::{json_numbers, minilm_dir, read_json, repo_root};

const MIN_COSINE: f64 = 0.9999;

/// How close the GPU's embeddings must be to the CPU plan's (both kiln, float32).
const MIN_GPU_CPU_COSINE: f64 = 0.99999;

struct Expected {
    texts: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
    max_seq_length: usize,
}

fn expected() -> Expected {
    let json = read_json(&repo_root().join("tests/fixtures/minilm-expected.json"));
    let sentences = json["sentences"].as_array().expect("sentences");
    Expected {
        texts: sentences
            .iter()
            .map(|s| s["text"].as_str().expect("text").to_string())
            .collect(),
        token_ids: sentences
            .iter()
            .map(|s| {
                json_numbers(&s["token_ids"])
                    .iter()
                    .map(|&v| v as u32)
                    .collect()
            })
            .collect(),
        embeddings: sentences
            .iter()
            .map(|s| {
                json_numbers(&s["embedding"])
                    .iter()
                    .map(|&v| v as f32)
                    .collect()
            })
            .collect(),
        max_seq_length: json["max_seq_length"].as_u64().expect("max_seq_length") as usize,
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// all-MiniLM-L6-v2 on `backend`.
fn load(backend: EmbedBackend) -> EmbeddingModel {
    EmbeddingModel::load_quiet(&minilm_dir(), backend)
        .unwrap_or_else(|e| panic!("loading all-MiniLM-L6-v2 for the {}: {e}", backend.name()))
}

/// Checks `model`'s token ids and embeddings of the 20 sentences against
/// sentence-transformers'; returns the embeddings.
fn check(model: &EmbeddingModel) -> Vec<Vec<f32>> {
    let expected = expected();
    assert_eq!(expected.texts.len(), 20);
    assert_eq!(model.max_seq_length(), expected.max_seq_length);
    assert_eq!(model.dimension(), 384);
    for (text, want) in expected.texts.iter().zip(&expected.token_ids) {
        let got = model.tokenize(text).expect("tokenize");
        assert_eq!(&got, want, "token ids of {text:?}");
    }
    let vectors = model.embed_texts(&expected.texts).expect("embed");
    assert_eq!(vectors.len(), expected.texts.len());
    let mut worst = (f64::INFINITY, 0);
    for (index, (got, want)) in vectors.iter().zip(&expected.embeddings).enumerate() {
        assert_eq!(got.len(), want.len(), "dimension of sentence {index}");
        let similarity = cosine(got, want);
        assert!(
            similarity >= MIN_COSINE,
            "sentence {index} ({:?}) on the {}: cosine {similarity} < {MIN_COSINE}",
            expected.texts[index],
            model.describe()
        );
        if similarity < worst.0 {
            worst = (similarity, index);
        }
    }
    eprintln!(
        "all-MiniLM-L6-v2 on the {}: lowest cosine 1 - {:.2e} (sentence {})",
        model.describe(),
        1.0 - worst.0,
        worst.1
    );
    vectors
}

#[test]
fn minilm_on_the_cpu_plan_matches_sentence_transformers() {
    let model = load(EmbedBackend::Cpu);
    assert_eq!(model.describe(), "Cranelift CPU backend");
    check(&model);
}

#[test]
fn minilm_on_the_interpreter_matches_sentence_transformers() {
    let model = load(EmbedBackend::Interpreter);
    assert_eq!(model.describe(), EmbedBackend::Interpreter.name());
    check(&model);
}

/// The GPU path of `kiln embed` and `kiln serve` (the `embed` entry compiled for the GPU by
/// `kiln_driver::backend::embed_maker`): sentence-transformers' vectors within
/// [`MIN_COSINE`], the CPU plan's within [`MIN_GPU_CPU_COSINE`], the same vectors batched
/// and each text alone (a batch shape per text), and the same bits on a second run (CUDA
/// graphs replayed where the plan has them).
#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn minilm_on_the_gpu_matches_sentence_transformers_and_the_cpu_plan() {
    let dir = minilm_dir();
    let make = backend::embed_maker(BackendChoice::Gpu)
        .unwrap_or_else(|e| panic!("this test needs a GPU and ptxas: {e}"));
    let gpu = EmbeddingModel::load_on(&dir, make.as_ref(), &mut NoProgress)
        .unwrap_or_else(|e| panic!("loading all-MiniLM-L6-v2 for the GPU: {e}"));
    assert!(
        gpu.describe().starts_with("GPU ("),
        "runs on the GPU: {}",
        gpu.describe()
    );
    let on_gpu = check(&gpu);
    let texts = expected().texts;
    let cpu = load(EmbedBackend::Cpu)
        .embed_texts(&texts)
        .expect("embed on the CPU");
    for (index, (g, c)) in on_gpu.iter().zip(&cpu).enumerate() {
        let similarity = cosine(g, c);
        assert!(
            similarity >= MIN_GPU_CPU_COSINE,
            "sentence {index} ({:?}): GPU and CPU plan cosine {similarity} < {MIN_GPU_CPU_COSINE}",
            texts[index]
        );
    }
    let alone = gpu
        .clone()
        .with_batch_tokens(1)
        .embed_texts(&texts)
        .expect("embed each text alone on the GPU");
    for (index, (batched, alone)) in on_gpu.iter().zip(&alone).enumerate() {
        let max_diff = batched
            .iter()
            .zip(alone)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            max_diff < 1e-5,
            "sentence {index}: batching changed its GPU embedding by {max_diff}"
        );
    }
    let again = gpu.embed_texts(&texts).expect("embed again on the GPU");
    assert_eq!(again, on_gpu, "a second run changed a result");
}

/// all-MiniLM-L6-v2's `embed` entry, lowered as `EmbeddingModel::load` lowers it, compiles
/// through the pipeline the GPU path takes and assembles for every target; its pointwise and
/// reduction kernels do not spill (ptxas's report). Needs ptxas: without it the test fails
/// with the reason, unless `KILN_ALLOW_NO_PTXAS=1`, when it says it was not run.
#[test]
fn minilm_embed_entry_assembles_for_every_gpu_target() {
    use kiln_driver::pipeline::{self, CompileOptions};
    use kiln_ptx::{Target, Toolchain};
    let toolchain = match Toolchain::discover() {
        Ok(toolchain) => toolchain,
        Err(e) if std::env::var("KILN_ALLOW_NO_PTXAS").is_ok_and(|v| v == "1") => {
            eprintln!("NOT RUN (no ptxas): {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let config = read_json(&minilm_dir().join("config.json"));
    let program = kiln_runtime::models::program_for("bert").expect("the bert program");
    let lowered = program.lower(&config).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(lowered.module.functions.len(), 1);
    assert_eq!(lowered.module.functions[0].name, "embed");
    let options = CompileOptions {
        targets: Target::ALL.to_vec(),
        ..CompileOptions::default()
    };
    let package = pipeline::compile("embed", lowered, &options, Some(&toolchain))
        .unwrap_or_else(|e| panic!("compiling all-MiniLM-L6-v2's embed entry: {e}"));
    assert!(package.fatbin.is_some(), "no fatbin");
    let kernels = package.compiled.kernels.len();
    assert_eq!(
        package.manifest.resources.len(),
        kernels * Target::ALL.len(),
        "a ptxas report per kernel and target"
    );
    let mut spilling = Vec::new();
    for r in &package.manifest.resources {
        eprintln!(
            "{} on {}: {} registers, {} spill bytes",
            r.kernel, r.target, r.registers, r.spill_bytes
        );
        let template_with_tiles = r.kernel.contains("matmul") || r.kernel.contains("attention");
        if !template_with_tiles && r.spill_bytes > 0 {
            spilling.push(format!("{} on {}", r.kernel, r.target));
        }
    }
    assert!(
        spilling.is_empty(),
        "pointwise/reduction kernels that spill: {spilling:?}"
    );
}
