//! Every stdlib function (the programs under tests/filetests/ir and stdlib/consensus.kiln)
//! compiled to kernels and run on the kir interpreter, against the graph interpreter, with
//! every symbolic dim at sizes that are no multiple of any tile (1, 7, 33, and 257 for the
//! cheaper ones), in the default (i32) and, at one size, i64 index arithmetic.

mod common;

use common::{check, inputs_for, lower};
use kiln_gpu_kernels::{IndexWidth, Options};
use kiln_ir::Module;
use kiln_tests::repo_root;
use std::collections::BTreeMap;

fn filetest(name: &str) -> Module {
    let path = repo_root().join("tests/filetests/ir").join(name);
    let source = std::fs::read_to_string(&path).expect("read filetest");
    lower(name, &source, path.parent(), None)
}

fn check_all(module: &Module, sizes: &[usize]) {
    for func in &module.functions {
        for &n in sizes {
            // i64 index arithmetic once, at the middle size; the default (i32 here) at all.
            let widths: &[IndexWidth] = if n == 7 {
                &[IndexWidth::Auto, IndexWidth::I64]
            } else {
                &[IndexWidth::Auto]
            };
            for &width in widths {
                let options = Options {
                    index_width: width,
                    ..Options::default()
                };
                let inputs = inputs_for(func, &BTreeMap::new(), n, n as u64 + 11);
                check(module, &func.name, &inputs, &BTreeMap::new(), &options);
            }
        }
    }
}

#[test]
fn activations_linear_and_swiglu() {
    check_all(&filetest("nn_activations.kiln"), &[1, 7, 33, 257]);
}

#[test]
fn norms_in_bf16() {
    check_all(&filetest("nn_norms_bf16.kiln"), &[1, 7, 33, 257]);
}

#[test]
fn rope_styles() {
    check_all(&filetest("nn_rope.kiln"), &[1, 7, 33]);
}

#[test]
fn softmax_embedding_pooling() {
    check_all(&filetest("nn_softmax_embedding.kiln"), &[1, 7, 33, 257]);
}

#[test]
fn attention_causal_and_padded() {
    check_all(&filetest("nn_attention.kiln"), &[1, 7, 17]);
}

#[test]
fn consensus_similarity() {
    check_all(&filetest("consensus_similarity.kiln"), &[1, 7, 33]);
}

#[test]
fn language_features_with_a_loop() {
    check_all(&filetest("language_features.kiln"), &[1, 7, 33]);
}

#[test]
fn consensus_stdlib() {
    let path = repo_root().join("stdlib/consensus.kiln");
    let source = std::fs::read_to_string(&path).expect("read stdlib");
    // Sizes 1 and 7 only: the solvers are loops of many kernels, slow on the lock-step kir
    // interpreter; tests/suite/backends.rs runs them at larger sizes on the CPU backend.
    check_all(
        &lower("consensus.kiln", &source, path.parent(), None),
        &[1, 7],
    );
}
