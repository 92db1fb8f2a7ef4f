//! The decomposed attention (matmul, masked softmax, matmul, as the stdlib wrote it before
//! the built-in op) is still recognised as one attention kernel and matches the graph
//! interpreter.

mod common;

use common::{check, inputs_for};
use kiln_gpu_kernels::Options;
use std::collections::BTreeMap;

const IR: &str = r#"
func @padded(%0 "q": f32[B, S, 4, 16], %1 "k": f32[B, S, 4, 16], %2 "v": f32[B, S, 4, 16], %3 "keep": i32[B, S]) -> (f32[B, S, 4, 16]) {
  %4 = full {value = 0.0, dtype = i32, shape = []} : i32[]
  %5 = ne %3, %4 : bool[B, S]
  %6 "allow" = reshape {shape = [B, 1, 1, S]} %5 : bool[B, 1, 1, S]
  %7 "qh" = permute {perm = [0, 2, 1, 3]} %0 : f32[B, 4, S, 16]
  %8 = permute {perm = [0, 2, 1, 3]} %1 : f32[B, 4, S, 16]
  %9 = permute {perm = [0, 1, 3, 2]} %8 : f32[B, 4, 16, S]
  %10 = matmul %7, %9 : f32[B, 4, S, S]
  %11 = full {value = 0.25, dtype = f32, shape = []} : f32[]
  %12 "scores" = mul %10, %11 : f32[B, 4, S, S]
  %13 = full {value = -inf, dtype = f32, shape = []} : f32[]
  %14 "xf" = select %6, %12, %13 : f32[B, 4, S, S]
  %15 = reduce_max {axes = [3], keep = true} %14 : f32[B, 4, S, 1]
  %16 = sub %14, %15 : f32[B, 4, S, S]
  %17 "e" = exp %16 : f32[B, 4, S, S]
  %18 = reduce_sum {axes = [3], keep = true} %17 : f32[B, 4, S, 1]
  %19 "p" = div %17, %18 : f32[B, 4, S, S]
  %20 = permute {perm = [0, 2, 1, 3]} %2 : f32[B, 4, S, 16]
  %21 = matmul %19, %20 : f32[B, 4, S, 16]
  %22 = permute {perm = [0, 2, 1, 3]} %21 : f32[B, S, 4, 16]
  return %22
}
"#;

#[test]
fn decomposed_attention_is_one_kernel() {
    let module = kiln_ir::parse_module(IR).expect("parses");
    let func = module.function("padded").expect("function");
    for n in [1usize, 7, 33] {
        let mut inputs = inputs_for(func, &BTreeMap::new(), n, 5);
        // Keep every sequence's first key so that no row is fully masked.
        let mut keep = inputs[3].to_i64_vec();
        for b in 0..n {
            keep[b * n] = 1;
        }
        inputs[3] = kiln_ir::Tensor::from_ints(kiln_ir::DType::I32, &[n, n], keep);
        let compiled = check(
            &module,
            "padded",
            &inputs,
            &BTreeMap::new(),
            &Options::default(),
        );
        // One attention kernel (the final permute of the result, a function output, is
        // a pointwise copy of its own).
        let names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names.iter().filter(|n| n.contains("attention")).count(),
            1,
            "{names:?}"
        );
        assert!(
            !names
                .iter()
                .any(|n| n.contains("matmul") || n.contains("softmax")),
            "{names:?}"
        );
    }
}
