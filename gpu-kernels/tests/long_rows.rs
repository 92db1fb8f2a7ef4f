//! Row reductions over rows too long to stay in registers (the strided walk, several
//! positions' loads a step): ragged last steps, arg-reductions with ties, against the
//! interpreter on the CPU backend.

mod common;

use common::{check, inputs_for, lower};
use kiln_gpu_kernels::Options;
use kiln_ir::{DType, Tensor};
use std::collections::BTreeMap;

const SRC: &str = "
fn greedy(x: f32[B, V]) -> i64[B] { argmax(x, axis: -1) }
fn lowest(x: bf16[B, V]) -> i64[B] { argmin(x, axis: -1) }
fn total(x: bf16[B, V]) -> f32[B] { sum(f32(x), axis: -1) }
fn logsumexp(x: f32[B, V]) -> f32[B] {
    let m = max(x, axis: -1, keep: true)
    (m + log(sum(exp(x - m), axis: -1, keep: true))).reshape([B])
}
";

/// Row lengths: one step of a thread block, a whole unrolled step and a ragged one, the
/// 32000-entry vocabulary.
const LENGTHS: [usize; 4] = [100, 8192, 10001, 32000];

#[test]
fn long_rows_equal_the_interpreter() {
    let module = lower("long_rows.kiln", SRC, None, None);
    for v in LENGTHS {
        for rows in [1usize, 3] {
            let symbols = BTreeMap::from([("B".to_string(), rows), ("V".to_string(), v)]);
            for f in ["greedy", "lowest", "total", "logsumexp"] {
                let func = module.function(f).unwrap();
                let inputs = inputs_for(func, &symbols, v, 7);
                check(&module, f, &inputs, &BTreeMap::new(), &Options::default());
            }
        }
    }
}

#[test]
fn ties_go_to_the_first_position() {
    // Every thread's share of the row holds the maximum, in several unrolled positions and
    // steps: the first position must win, as in the interpreter.
    let module = lower("long_rows.kiln", SRC, None, None);
    for v in [10001usize, 32000] {
        let values: Vec<f32> = (0..2 * v)
            .map(|i| {
                if (i % v) % 97 == 5 {
                    3.0
                } else {
                    (i % 13) as f32 / 13.0
                }
            })
            .collect();
        let x = Tensor::from_floats(DType::F32, &[2, v], values);
        let compiled = check(
            &module,
            "greedy",
            &[x],
            &BTreeMap::new(),
            &Options::default(),
        );
        assert!(!compiled.kernels.is_empty());
    }
}
