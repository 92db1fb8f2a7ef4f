//! The four model programs on the tiny fixtures: compiled plans run on the kir
//! interpreter against the graph interpreter (f32: relative error ≤ 1e-5), and the
//! kernel count per decoder layer of llama.

mod common;

use common::{check, lower};
use kiln_gpu_kernels::{compile_function, Options};
use kiln_ir::{DType, Module, Tensor};
use kiln_tests::{load_safetensors, read_json, repo_root};
use std::collections::BTreeMap;

struct Case {
    module: Module,
    weights: BTreeMap<String, Tensor>,
    inputs: Vec<Tensor>,
    entries: Vec<&'static str>,
}

fn case(program: &str, fixture: &str) -> Case {
    let dir = repo_root().join("tests/fixtures").join(fixture);
    let config = read_json(&dir.join("config.json"));
    let path = repo_root().join(program);
    let source = std::fs::read_to_string(&path).expect("model source");
    let module = lower(program, &source, path.parent(), Some(&config));
    let weights = load_safetensors(&dir.join("model.safetensors"));
    let expected = load_safetensors(&dir.join("expected.safetensors"));
    let ids = expected["input_ids"].cast(DType::I32);
    let (inputs, entries) = match expected.get("attention_mask") {
        Some(mask) => (vec![ids, mask.cast(DType::I32)], vec!["forward", "embed"]),
        None => (vec![ids], vec!["forward"]),
    };
    Case {
        module,
        weights,
        inputs,
        entries,
    }
}

fn check_case(program: &str, fixture: &str) {
    let c = case(program, fixture);
    for entry in &c.entries {
        check(&c.module, entry, &c.inputs, &c.weights, &Options::default());
    }
}

#[test]
fn llama_matches_the_graph_interpreter() {
    check_case("models/llama.kiln", "tiny-llama");
}

#[test]
fn qwen2_matches_the_graph_interpreter() {
    check_case("models/llama.kiln", "tiny-qwen2");
}

#[test]
fn gpt2_matches_the_graph_interpreter() {
    check_case("models/gpt2.kiln", "tiny-gpt2");
}

#[test]
fn bert_matches_the_graph_interpreter() {
    check_case("models/bert.kiln", "tiny-bert");
}

#[test]
fn llama_needs_at_most_eight_kernels_per_decoder_layer() {
    for fixture in ["tiny-llama", "tiny-qwen2"] {
        let c = case("models/llama.kiln", fixture);
        let compiled =
            compile_function(&c.module, "forward", &Options::default()).expect("compiles");
        let per_layer = compiled.stats.kernels_per_layer("forward");
        println!("{fixture}: {per_layer:?}");
        for (layer, count) in &per_layer {
            if layer.is_some() {
                assert!(
                    *count <= 8,
                    "{fixture}: layer {layer:?} has {count} kernels"
                );
            }
        }
    }
}

#[test]
fn llama_stats_table() {
    let c = case("models/llama.kiln", "tiny-llama");
    let compiled = compile_function(&c.module, "forward", &Options::default()).expect("compiles");
    let symbols: BTreeMap<String, u64> = compiled
        .plan
        .symbols
        .iter()
        .map(|s| (s.name.clone(), c.inputs[s.input].shape[s.axis] as u64))
        .collect();
    insta::assert_snapshot!(compiled.stats.table(&symbols));
}
