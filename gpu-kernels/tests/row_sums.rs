//! A split-K GEMM's sum added by the row-reduction kernel that first reads its result
//! (`templates::RowSums`): `rms_norm(h)` of a residual add `h = r + x @ W.T` at decode
//! sizes. The plans with and without it are run on the kir interpreter and on Cranelift:
//! the same bits (the row kernel adds the partial sums in split order and applies the same
//! epilogue as the sum kernel it replaces), both within tolerance of the graph interpreter,
//! and one kernel fewer per fused pair. The decode step of the 1.1B Llama shape: 31 sum
//! kernels fewer, its fused RMSNorm kernels assembled by ptxas without spills.

mod common;

use common::{
    assert_assembles_without_spills, count, inputs_for, llama_1b, llama_decode_launches, lower,
    same_bits_with_and_without, toolchain,
};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use kiln_kir::Kernel;
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn norm1(x: bf16[1, 2048], w: bf16[256, 2048], r: bf16[1, 256], g: bf16[256]) -> (bf16[1, 256], bf16[1, 256]) {
    let h = r + linear(x, w)
    (h, rms_norm(h, g, 0.00001))
}
fn norm16(x: bf16[16, 2048], w: bf16[256, 2048], r: bf16[16, 256], g: bf16[256]) -> (bf16[16, 256], bf16[16, 256]) {
    let h = r + linear(x, w)
    (h, rms_norm(h, g, 0.00001))
}
fn block(x: bf16[T, 2048], w: bf16[256, 2048], r: bf16[T, 256], g: bf16[256], w2: bf16[256, 256]) -> bf16[T, 256] {
    let h = r + linear(x, w)
    h + linear(rms_norm(h, g, 0.00001), w2)
}
fn two_layers(x: bf16[T, 1024], w: bf16[1024, 1024], g: bf16[1024], w2: bf16[1024, 1024], g2: bf16[1024]) -> bf16[T, 1024] {
    let h = x + linear(x, w)
    let h2 = h + linear(rms_norm(h, g, 0.00001), w2)
    rms_norm(h2, g2, 0.00001)
}
fn read_before(x: bf16[1, 2048], w: bf16[256, 2048], r: bf16[1, 256], g: bf16[256], w2: bf16[256, 256]) -> (bf16[1, 256], bf16[1, 256]) {
    let h = r + linear(x, w)
    let y = linear(h, w2)
    (rms_norm(h, g, 0.00001), y)
}
";

fn options(row_sums: bool) -> Options {
    Options {
        gemm: GemmTuning {
            row_sums,
            ..common::mma_options().gemm
        },
        ..common::mma_options()
    }
}

/// Runs `function` compiled with and without row sums on the kir interpreter (each checked
/// against the graph interpreter) and on Cranelift; asserts the four results are the same
/// bits and returns the launches of both plans.
fn same_bits(function: &str, t: usize) -> (Vec<String>, Vec<String>) {
    let module = lower("row_sums.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("T".to_string(), t)]);
    let inputs = inputs_for(func, &symbols, t, 11);
    same_bits_with_and_without(&module, function, &inputs, &BTreeMap::new(), t, options)
}

#[test]
fn the_norm_of_a_residual_add_adds_the_split_k_sums() {
    // M = 1 and M = 16 at K = 2048, N = 256: 8 block columns, the k slices split across
    // blocks; the sum kernel is gone, the RMSNorm kernel adds the sums and stores `h`.
    for function in ["norm1", "norm16"] {
        let (with, without) = same_bits(function, 1);
        assert_eq!(count(&without, "_sum"), 1, "{function}: {without:?}");
        assert_eq!(with.len() + 1, without.len(), "{function}: {with:?}");
        assert_eq!(count(&with, "rms_norm_splitk"), 1, "{function}: {with:?}");
        assert!(
            with[0].starts_with("mma_gemm") && with[0].contains("splitk"),
            "{with:?}"
        );
        assert!(with[1].starts_with("rms_norm_splitk"), "{with:?}");
    }
}

#[test]
fn a_symbolic_row_count_takes_the_fused_kernel_for_decode_sizes_only() {
    // T = 1 and 16 run the split GEMM and the norm that adds its sums; T = 40 the prefill
    // tile that stores `h` itself and the plain norm. `h` is read again after the norm
    // (the residual of the second matmul).
    for t in [1, 16] {
        let (with, without) = same_bits("block", t);
        assert_eq!(
            with.len() + 1,
            without.len(),
            "T={t}: {with:?} / {without:?}"
        );
        assert_eq!(count(&with, "rms_norm_splitk"), 1, "T={t}: {with:?}");
    }
    let (with, without) = same_bits("block", 40);
    assert_eq!(with, without);
    assert_eq!(count(&with, "splitk"), 0, "{with:?}");
}

#[test]
fn chained_layers_fuse_every_pair() {
    // Two residual adds each read first by an RMSNorm: two sum kernels fewer.
    for t in [1, 5] {
        let (with, without) = same_bits("two_layers", t);
        assert_eq!(count(&with, "rms_norm_splitk"), 2, "T={t}: {with:?}");
        assert_eq!(
            with.len() + 2,
            without.len(),
            "T={t}: {with:?} / {without:?}"
        );
    }
}

#[test]
fn a_reader_before_the_norm_keeps_the_sum_kernel() {
    // `h` is first read by another matmul, which must find it stored: the sum kernel stays.
    let (with, without) = same_bits("read_before", 1);
    assert_eq!(with, without);
    assert_eq!(count(&with, "splitk4_sum"), 1, "{with:?}");
}

#[test]
fn the_plan_without_row_sums_is_the_default_off_switch() {
    let module = lower("row_sums.kiln", SRC, None, None);
    let off = compile_function(&module, "norm1", &options(false)).unwrap();
    assert!(off
        .kernels
        .iter()
        .any(|k| k.name.contains("splitk") && k.name.contains("_sum_")));
    assert!(!off
        .kernels
        .iter()
        .any(|k| k.name.contains("rms_norm_splitk")));
}

#[test]
fn the_1b_llama_decode_step_launches_31_kernels_fewer() {
    // Per layer the o-proj's and the down-proj's split-K sums go into the next RMSNorm;
    // the last layer's down-proj is read first by the final norm through `h[last]` (rows
    // of another shape), so its sum kernel stays: 2 × 16 - 1 pairs.
    let module = llama_1b();
    let mut counts = Vec::new();
    for row_sums in [true, false] {
        // One token, one sequence (the batch-invariant option takes the large branches,
        // which the row sums leave alone).
        let (names, _) = llama_decode_launches(&module, &options(row_sums));
        counts.push((
            names.len(),
            count(&names, "rms_norm_splitk"),
            count(&names, "_sum_"),
        ));
    }
    println!("decode step launches (with, fused norms, sum kernels): {counts:?}");
    let (with, fused, _) = counts[0];
    let (without, _, sums) = counts[1];
    assert_eq!(fused, 31);
    assert_eq!(with + 31, without);
    assert_eq!(sums, 16 * 3, "q/k/v, o-proj and down-proj sums per layer");
}

#[test]
fn the_fused_norms_of_the_1b_llama_assemble_without_spills() {
    let Some(toolchain) = toolchain() else { return };
    let compiled = compile_function(&llama_1b(), "step", &common::mma_options()).unwrap();
    let fused: Vec<Kernel> = compiled
        .kernels
        .into_iter()
        .filter(|k| k.name.contains("rms_norm_splitk"))
        .collect();
    // The o-proj's (4 splits) and the down-proj's (8), with the residual read from the
    // embedding gather in layer 0.
    assert!(
        fused.len() >= 2,
        "{:?}",
        fused.iter().map(|k| &k.name).collect::<Vec<_>>()
    );
    assert_assembles_without_spills(&toolchain, &fused);
}
