//! Small hand-written functions through every template, at awkward sizes.

mod common;

use common::{check, inputs_for, lower};
use kiln_gpu_kernels::Options;
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn add2(x: f32[S, 12], y: f32[12]) -> f32[S, 12] { x * 2.0 + y }
fn rms(x: f32[T, 64], w: f32[64]) -> f32[T, 64] { rms_norm(x, w, 1e-5) }
fn sm(x: f32[B, V]) -> f32[B, V] { softmax(x, axis: -1) }
fn mm(x: f32[T, 32], w: f32[16, 32], b: f32[16]) -> f32[T, 16] { gelu(linear_bias(x, w, b)) }
";

#[test]
fn smoke() {
    let module = lower("smoke.kiln", SRC, None, None);
    for n in [1usize, 7, 33] {
        for f in ["add2", "rms", "sm", "mm"] {
            let func = module.function(f).unwrap();
            let inputs = inputs_for(func, &BTreeMap::new(), n, 1);
            check(&module, f, &inputs, &BTreeMap::new(), &Options::default());
        }
    }
}

#[test]
fn print_rms() {
    let module = lower("smoke.kiln", SRC, None, None);
    for f in ["rms", "mm"] {
        let c = kiln_gpu_kernels::compile_function(&module, f, &Options::default()).unwrap();
        for k in &c.kernels {
            println!("{k}");
        }
        println!("{}", c.stats.table(&BTreeMap::new()));
    }
}
