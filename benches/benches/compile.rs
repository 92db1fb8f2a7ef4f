//! Compile-time benchmarks at real model sizes: the front end (parse, lower, optimize), and
//! the whole compiler to PTX for four targets (ptxas excluded; target under 1 s on one core).

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_benches::{lower_and_optimize, model};

/// A Llama-3-8B-shaped config (32 layers, GQA 32/8, llama3 rope scaling).
fn llama3_8b_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    })
}

fn front_end(c: &mut Criterion) {
    let (llama, _) = model("models/llama.kiln", "tests/fixtures/tiny-llama/config.json");
    let config = llama3_8b_config();
    c.bench_function(
        "front end: llama 3 8B (32 layers) parse+lower+optimize",
        |b| b.iter(|| lower_and_optimize("llama.kiln", &llama, &config)),
    );
    let (gpt2, gpt2_config) = model("models/gpt2.kiln", "tests/fixtures/tiny-gpt2/config.json");
    c.bench_function("front end: gpt2 tiny parse+lower+optimize", |b| {
        b.iter(|| lower_and_optimize("gpt2.kiln", &gpt2, &gpt2_config))
    });
}

/// The whole compiler short of ptxas: front end, fusion and PTX for four targets.
fn to_ptx(c: &mut Criterion) {
    let (llama, _) = model("models/llama.kiln", "tests/fixtures/tiny-llama/config.json");
    let config = llama3_8b_config();
    let targets = [
        kiln_ptx::Target::Sm80,
        kiln_ptx::Target::Sm89,
        kiln_ptx::Target::Sm90a,
        kiln_ptx::Target::Sm100a,
    ];
    let options = kiln_driver::pipeline::CompileOptions {
        targets: targets.to_vec(),
        ..Default::default()
    };
    c.bench_function(
        "compile: llama 3 8B (32 layers) to PTX for 4 targets, ptxas excluded",
        |b| {
            b.iter(|| {
                let lowered = lower_and_optimize("llama.kiln", &llama, &config);
                kiln_driver::pipeline::compile("llama.kiln", lowered, &options, None)
                    .expect("compile")
            })
        },
    );
}

criterion_group!(benches, front_end, to_ptx);
criterion_main!(benches);
