//! The default pipeline on the four model programs' lowered IR: the interpreter's outputs on
//! the fixture checkpoints are bit-identical before and after, the instruction count drops,
//! a second run changes nothing, and the optimized IR is kept as an insta snapshot
//! (re-bless with `INSTA_UPDATE=always`).

use kiln_ir::{interpret, DType, Module, Tensor, TensorData};
use kiln_opt::{count_module_insts, default_pipeline, RunOptions};
use kiln_tests::{compile_source, load_safetensors, read_json, repo_root};
use std::collections::BTreeMap;

/// A model program lowered for one fixture, with its checkpoint and entry inputs.
struct ModelCase {
    snapshot: &'static str,
    module: Module,
    weights: BTreeMap<String, Tensor>,
    /// Each entry function with its inputs.
    entries: Vec<(&'static str, Vec<Tensor>)>,
}

fn model_case(program: &str, fixture: &str, snapshot: &'static str) -> ModelCase {
    let dir = repo_root().join("tests/fixtures").join(fixture);
    let config = read_json(&dir.join("config.json"));
    let path = repo_root().join(program);
    let source = std::fs::read_to_string(&path).expect("model source");
    let lowered = compile_source(program, &source, path.parent(), Some(&config))
        .unwrap_or_else(|d| panic!("{d}"));
    let weights = load_safetensors(&dir.join("model.safetensors"));
    let expected = load_safetensors(&dir.join("expected.safetensors"));
    let ids = expected["input_ids"].cast(DType::I32);
    let entries = match expected.get("attention_mask") {
        Some(mask) => {
            let inputs = vec![ids, mask.cast(DType::I32)];
            vec![("forward", inputs.clone()), ("embed", inputs)]
        }
        None => vec![("forward", vec![ids])],
    };
    ModelCase {
        snapshot,
        module: lowered.module,
        weights,
        entries,
    }
}

fn model_cases() -> Vec<ModelCase> {
    vec![
        model_case("models/llama.kiln", "tiny-llama", "llama_tiny_llama"),
        model_case("models/llama.kiln", "tiny-qwen2", "llama_tiny_qwen2"),
        model_case("models/gpt2.kiln", "tiny-gpt2", "gpt2_tiny_gpt2"),
        model_case("models/bert.kiln", "tiny-bert", "bert_tiny_bert"),
    ]
}

/// Runs every entry of the case on `module`.
fn run_entries(case: &ModelCase, module: &Module) -> Vec<Vec<Tensor>> {
    case.entries
        .iter()
        .map(|(entry, inputs)| {
            let func = module
                .function(entry)
                .unwrap_or_else(|| panic!("{}: no entry {entry}", case.snapshot));
            interpret(func, inputs, &case.weights)
                .unwrap_or_else(|e| panic!("{} {entry}: {e}", case.snapshot))
        })
        .collect()
}

/// Asserts that two tensors are equal bit for bit (floats compared by their bits).
fn assert_bitwise_equal(what: &str, before: &Tensor, after: &Tensor) {
    assert_eq!(before.ty(), after.ty(), "{what}: types differ");
    match (&before.data, &after.data) {
        (TensorData::Float(a), TensorData::Float(b)) => {
            if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
                panic!("{what}: element {i} was {} and is now {}", a[i], b[i]);
            }
        }
        (a, b) => assert_eq!(a, b, "{what}: elements differ"),
    }
}

fn optimized(module: &Module) -> Module {
    let mut module = module.clone();
    let options = RunOptions {
        verify_each_pass: true,
        print_after: None,
    };
    default_pipeline()
        .run_with(&mut module, &options)
        .unwrap_or_else(|e| panic!("{e}"));
    module
}

#[test]
fn the_default_pipeline_keeps_model_outputs_bit_identical_and_shrinks_them() {
    let mut report = String::new();
    for case in model_cases() {
        let after = optimized(&case.module);
        let outputs_before = run_entries(&case, &case.module);
        let outputs_after = run_entries(&case, &after);
        for (((entry, _), before), after) in
            case.entries.iter().zip(&outputs_before).zip(&outputs_after)
        {
            assert_eq!(before.len(), after.len());
            for (i, (b, a)) in before.iter().zip(after).enumerate() {
                assert_bitwise_equal(&format!("{} {entry} result {i}", case.snapshot), b, a);
            }
        }
        let (count_before, count_after) =
            (count_module_insts(&case.module), count_module_insts(&after));
        assert!(
            count_after < count_before,
            "{}: {count_before} instructions before, {count_after} after",
            case.snapshot
        );
        report.push_str(&format!(
            "{}: {count_before} -> {count_after}\n",
            case.snapshot
        ));
    }
    println!("instructions before -> after the default pipeline:\n{report}");
}

#[test]
fn the_default_pipeline_is_idempotent_and_its_output_is_kept_in_snapshots() {
    for case in model_cases() {
        let once = optimized(&case.module);
        let text = once.to_string();
        let twice = optimized(&once);
        assert_eq!(
            twice.to_string(),
            text,
            "{}: a second run changed the IR",
            case.snapshot
        );
        let again = optimized(&case.module);
        assert_eq!(
            again.to_string(),
            text,
            "{}: two runs on one input differ",
            case.snapshot
        );
        let reparsed = kiln_ir::parse_module(&text).expect("the optimized IR parses");
        assert_eq!(
            reparsed, once,
            "{}: the optimized IR does not round-trip",
            case.snapshot
        );
        insta::assert_snapshot!(case.snapshot, text);
    }
}
