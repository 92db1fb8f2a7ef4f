//! Snapshots of the printed kernels of representative fusions: residual add + RMSNorm in
//! one row kernel, softmax in one row kernel, a matmul with a bias + gelu epilogue.
//! Re-bless with `INSTA_UPDATE=always`.

mod common;

use common::{check, inputs_for, lower};
use kiln_gpu_kernels::Options;
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn add_rms(h: bf16[T, 4096], x: bf16[T, 4096], w: bf16[4096]) -> (bf16[T, 4096], bf16[T, 4096]) {
    let r = h + x
    (r, rms_norm(r, w, 1e-5))
}
fn probs(x: f32[B, 1000]) -> f32[B, 1000] { softmax(x, axis: -1) }
fn dense_gelu(x: f32[T, 96], w: f32[80, 96], b: f32[80]) -> f32[T, 80] { gelu(linear_bias(x, w, b)) }
";

fn printed(function: &str) -> String {
    let module = lower("kernels.kiln", SRC, None, None);
    let func = module.function(function).expect("function");
    let inputs = inputs_for(func, &BTreeMap::new(), 5, 3);
    let compiled = check(
        &module,
        function,
        &inputs,
        &BTreeMap::new(),
        &Options::default(),
    );
    let mut text = String::new();
    for k in &compiled.kernels {
        text.push_str(&k.to_string());
        text.push('\n');
    }
    text.push_str(&compiled.plan.to_string());
    text
}

#[test]
fn residual_add_and_rms_norm_is_one_kernel() {
    let text = printed("add_rms");
    assert_eq!(
        text.matches("\nkernel ").count() + usize::from(text.starts_with("kernel ")),
        1
    );
    insta::assert_snapshot!(text);
}

#[test]
fn softmax_is_one_kernel() {
    insta::assert_snapshot!(printed("probs"));
}

#[test]
fn matmul_with_bias_and_gelu_epilogue() {
    insta::assert_snapshot!(printed("dense_gelu"));
}
