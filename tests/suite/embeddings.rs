//! Sentence embeddings of the real all-MiniLM-L6-v2 against sentence-transformers: 20 varied
//! sentences (tests/fixtures/minilm-expected.json, made by make_minilm_expected.py) through
//! `kiln_runtime::EmbeddingModel`, the path `kiln embed` and the server take. kiln's token ids
//! must equal sentence-transformers' exactly (truncation at max_seq_length included), and
//! every embedding must have a cosine of at least 0.9999 with sentence-transformers' float32
//! CPU result, on the compiled CPU plan and on the reference interpreter.

use kiln_runtime::{EmbedBackend, EmbeddingModel};
use kiln_tests::{minilm_dir, read_json, repo_root};

const MIN_COSINE: f64 = 0.9999;

struct Expected {
    texts: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
    max_seq_length: usize,
}

fn expected() -> Expected {
    let json = read_json(&repo_root().join("tests/fixtures/minilm-expected.json"));
    let sentences = json["sentences"].as_array().expect("sentences");
    let numbers = |value: &serde_json::Value| -> Vec<f64> {
        value
            .as_array()
            .expect("an array")
            .iter()
            .map(|v| v.as_f64().expect("a number"))
            .collect()
    };
    Expected {
        texts: sentences
            .iter()
            .map(|s| s["text"].as_str().expect("text").to_string())
            .collect(),
        token_ids: sentences
            .iter()
            .map(|s| numbers(&s["token_ids"]).iter().map(|&v| v as u32).collect())
            .collect(),
        embeddings: sentences
            .iter()
            .map(|s| numbers(&s["embedding"]).iter().map(|&v| v as f32).collect())
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

fn check(backend: EmbedBackend) {
    let expected = expected();
    assert_eq!(expected.texts.len(), 20);
    let model = EmbeddingModel::load_quiet(&minilm_dir(), backend)
        .unwrap_or_else(|e| panic!("loading all-MiniLM-L6-v2: {e}"));
    assert_eq!(model.backend(), backend);
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
            backend.name()
        );
        if similarity < worst.0 {
            worst = (similarity, index);
        }
    }
    eprintln!(
        "all-MiniLM-L6-v2 on the {}: lowest cosine 1 - {:.2e} (sentence {})",
        backend.name(),
        1.0 - worst.0,
        worst.1
    );
}

#[test]
fn minilm_on_the_cpu_plan_matches_sentence_transformers() {
    check(EmbedBackend::Cpu);
}

#[test]
fn minilm_on_the_interpreter_matches_sentence_transformers() {
    check(EmbedBackend::Interpreter);
}
