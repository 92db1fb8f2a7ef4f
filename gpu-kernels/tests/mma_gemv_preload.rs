//! The tensor-core GEMV's first weights loaded before the grid-dependency wait
//! (`GemmTuning::preload` with `GemmTuning::mma_gemv`): where every weight is a checkpoint
//! tensor (`Access::Constant`) and K holds a whole step, a warp loads its first step of
//! packed weight vectors (B fragments), then waits for the kernel before it, then loads A
//! and multiplies. The plans with and without it run on the kir interpreter (against the
//! graph interpreter) and on Cranelift and must give the same bits: M = 5 to 16 through a
//! symbolic row count and constant M of 5, 8 and 16, ragged N and K (one whole step and a
//! tail, several steps, no whole step), gate/up sharing a block, q/k/v segments of unequal
//! widths followed by RoPE, other warps and unrolls; with the L2 prefetch too (one wait
//! after both). Only constant buffers are loaded before the wait, weights that are inputs
//! are not preloaded, and ptxas assembles the kernels for the five targets without spills.

mod common;

use common::{
    assert_assembles_without_spills, before_wait, inputs_for, lower_with,
    same_bits_with_and_without, toolchain, weights_for, Before,
};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use kiln_kir::{Access, Kernel, Param, Stmt};
use std::collections::BTreeMap;

const SRC: &str = "import nn
model MmaPreload {
    param w: [37, 2056] = \"w\"
    param w_long: [45, 4136] = \"w_long\"
    param w_short: [19, 40] = \"w_short\"
    param gate: [41, 1288] = \"gate\"
    param up: [41, 1288] = \"up\"
    param q: [64, 1032] = \"q\"
    param k: [32, 1032] = \"k\"
    param v: [24, 1032] = \"v\"
    param o: [4096, 4096] = \"o\"
    param b5: [37] = \"b5\"
    fn plain(x: bf16[T, 2056]) -> bf16[T, 37] { linear(x, w) }
    fn long_k(x: bf16[T, 4136], r: bf16[T, 45]) -> bf16[T, 45] { linear(x, w_long) + r }
    fn short_k(x: bf16[T, 40]) -> bf16[T, 19] { linear(x, w_short) }
    fn gate_up(x: bf16[T, 1288]) -> bf16[T, 41] { silu(linear(x, gate)) * linear(x, up) }
    fn qkv_rope(x: bf16[T, 1032], pos: i32[T]) -> (bf16[T, 4, 16], bf16[T, 2, 16], bf16[T, 24]) {
        let qh = rope(linear(x, q).view(T, 4, 16), pos, 10000.0)
        let kh = rope(linear(x, k).view(T, 2, 16), pos, 10000.0)
        (qh, kh, linear(x, v))
    }
    fn five(x: bf16[5, 2056]) -> bf16[5, 37] { gelu(linear_bias(x, w, b5)) }
    fn eight(x: bf16[8, 4136], r: bf16[8, 45]) -> bf16[8, 45] { linear(x, w_long) + r }
    fn sixteen(x: bf16[16, 1032]) -> (bf16[16, 64], bf16[16, 32], bf16[16, 24]) {
        (linear(x, q), linear(x, k), linear(x, v))
    }
    fn o_proj(x: bf16[T, 4096], r: bf16[T, 4096]) -> bf16[T, 4096] { linear(x, o) + r }
    fn activations(x: bf16[T, 2048], y: bf16[41, 2048]) -> bf16[T, 41] { linear(x, y) }
}
";

fn options(preload: bool, prefetch: bool) -> Options {
    Options {
        gemm: GemmTuning {
            mma_gemv: true,
            preload,
            prefetch,
            // Where the wait sits is the subject here: no trigger after it.
            early_trigger: false,
            ..GemmTuning::default()
        },
        ..Options::default()
    }
}

/// Both plans of `function` at `T = t` on the interpreters and Cranelift: the same bits.
/// Returns the kernels of the plan with the preload.
fn same_bits(function: &str, t: usize, prefetch: bool) -> Vec<Kernel> {
    let module = lower_with("mma_preload.kiln", SRC);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("T".to_string(), t)]);
    let inputs = inputs_for(func, &symbols, t, 21);
    let weights = weights_for(func, 22);
    let (with, without) =
        same_bits_with_and_without(&module, function, &inputs, &weights, t, |on| {
            options(on, prefetch)
        });
    for names in [&with, &without] {
        assert_eq!(
            names.iter().filter(|n| n.contains("mma_gemv")).count(),
            1,
            "@{function} T={t}: {names:?}"
        );
    }
    compile_function(&module, function, &options(true, prefetch))
        .unwrap()
        .kernels
}

/// The tensor-core GEMV kernel among `kernels`.
fn mma_gemv(kernels: &[Kernel]) -> &Kernel {
    let found: Vec<&Kernel> = kernels
        .iter()
        .filter(|k| k.name.contains("mma_gemv"))
        .collect();
    assert_eq!(found.len(), 1, "{:?}", names(kernels));
    found[0]
}

fn names(kernels: &[Kernel]) -> Vec<&str> {
    kernels.iter().map(|k| k.name.as_str()).collect()
}

/// The loads among `before` and whether all are of constant buffers.
fn loads(before: &[Before]) -> (usize, bool) {
    let loads: Vec<bool> = before
        .iter()
        .filter_map(|b| match b {
            Before::Load { constant } => Some(*constant),
            Before::Prefetch => None,
        })
        .collect();
    (loads.len(), loads.iter().all(|&c| c))
}

/// The chunks a warp loads a step (`_u{unroll}` in the kernel's name).
fn unroll_of(kernel: &Kernel) -> usize {
    kernel
        .name
        .split("_u")
        .nth(1)
        .and_then(|rest| rest.split('_').next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("{}: no unroll in the name", kernel.name))
}

#[test]
fn preloaded_mma_gemvs_give_the_same_bits() {
    // Symbolic M (the small variant) at 5, 8 and 16 rows.
    for t in [5, 8, 16] {
        for (function, matmuls) in [("plain", 1), ("long_k", 1), ("gate_up", 2), ("qkv_rope", 3)] {
            let kernels = same_bits(function, t, false);
            let kernel = mma_gemv(&kernels);
            let before = before_wait(kernel).unwrap_or_else(|| panic!("@{function}: no wait"));
            assert!(!before.contains(&Before::Prefetch), "@{function}");
            // A step of vectors per matmul (each segment's branch holds its own).
            let (count, all_constant) = loads(&before);
            assert_eq!(
                count,
                unroll_of(kernel) * matmuls,
                "@{function} T={t}: {}",
                kernel.name
            );
            assert!(all_constant, "@{function}: a non-constant load");
        }
    }
}

#[test]
fn the_block_knobs_keep_the_bits() {
    // Warps splitting K and chunks a step (`mmagemvwarps`, `mmagemvunroll`): the preloaded
    // step follows them.
    let module = lower_with("mma_preload.kiln", SRC);
    for (warps, unroll) in [("1", "3"), ("8", "8")] {
        let knobs = |on: bool| {
            let mut options = options(on, false);
            options.gemm.set("mmagemvwarps", warps).unwrap();
            options.gemm.set("mmagemvunroll", unroll).unwrap();
            options
        };
        for (function, t) in [("long_k", 7), ("gate_up", 16), ("qkv_rope", 9)] {
            let func = module.function(function).unwrap();
            let symbols = BTreeMap::from([("T".to_string(), t)]);
            let inputs = inputs_for(func, &symbols, t, 23);
            let weights = weights_for(func, 24);
            same_bits_with_and_without(&module, function, &inputs, &weights, t, knobs);
            let compiled = compile_function(&module, function, &knobs(true)).unwrap();
            let kernel = mma_gemv(&compiled.kernels);
            assert!(
                kernel.name.contains(&format!("_w{warps}_u")),
                "{}",
                kernel.name
            );
            let (count, all_constant) = loads(&before_wait(kernel).unwrap());
            assert!(count > 0 && all_constant, "{function} {warps}x{unroll}");
        }
    }
}

#[test]
fn constant_rows_preload_too() {
    for function in ["five", "eight", "sixteen"] {
        let kernels = same_bits(function, 1, false);
        let kernel = mma_gemv(&kernels);
        let before = before_wait(kernel).unwrap_or_else(|| panic!("@{function}: no wait"));
        let (count, all_constant) = loads(&before);
        assert!(count > 0, "@{function}: nothing loaded before the wait");
        assert!(all_constant, "@{function}: a non-constant load");
    }
}

#[test]
fn a_k_without_a_whole_step_waits_at_the_start() {
    // K = 40: every chunk is in the guarded rest, nothing to load ahead.
    for t in [5, 16] {
        let kernels = same_bits("short_k", t, false);
        assert_eq!(before_wait(mma_gemv(&kernels)), None);
    }
}

#[test]
fn the_prefetch_and_the_preload_share_one_wait() {
    for (function, t) in [
        ("plain", 5),
        ("long_k", 16),
        ("gate_up", 9),
        ("qkv_rope", 16),
    ] {
        let kernels = same_bits(function, t, true);
        let kernel = mma_gemv(&kernels);
        let before = before_wait(kernel).unwrap_or_else(|| panic!("@{function}: no wait"));
        let (count, all_constant) = loads(&before);
        assert!(count > 0, "@{function}: nothing loaded before the wait");
        assert!(all_constant, "@{function}: a non-constant load");
        // The prefetches come first (they ask L2 for all of K, the loads for its start).
        let first_load = before.iter().position(|b| *b != Before::Prefetch).unwrap();
        assert!(first_load > 0, "@{function}: {before:?}");
        assert!(
            before[first_load..].iter().all(|b| *b != Before::Prefetch),
            "@{function}: {before:?}"
        );
    }
}

#[test]
fn weights_that_are_inputs_are_not_preloaded() {
    // `y` is an input: another kernel could be writing it, so the block waits first.
    let kernels = same_bits("activations", 7, false);
    let kernel = mma_gemv(&kernels);
    assert_eq!(before_wait(kernel), None);
    assert!(kernel.params.iter().all(|p| !matches!(
        p,
        Param::Buffer {
            access: Access::Constant,
            ..
        }
    )));
}

#[test]
fn the_switch_off_leaves_the_wait_at_the_start() {
    let module = lower_with("mma_preload.kiln", SRC);
    for function in ["plain", "gate_up", "qkv_rope", "sixteen"] {
        let compiled = compile_function(&module, function, &options(false, false)).unwrap();
        assert_eq!(
            before_wait(mma_gemv(&compiled.kernels)),
            None,
            "@{function}"
        );
        // With the prefetch, only prefetches before its wait.
        let compiled = compile_function(&module, function, &options(false, true)).unwrap();
        let before = before_wait(mma_gemv(&compiled.kernels)).unwrap();
        assert!(!before.is_empty(), "@{function}");
        assert!(before.iter().all(|b| *b == Before::Prefetch), "@{function}");
    }
}

#[test]
fn the_early_trigger_follows_the_preload() {
    let module = lower_with("mma_preload.kiln", SRC);
    let mut options = options(true, false);
    options.gemm.early_trigger = true;
    for function in ["long_k", "qkv_rope"] {
        let compiled = compile_function(&module, function, &options).unwrap();
        let kernel = mma_gemv(&compiled.kernels);
        let wait = kernel
            .body
            .iter()
            .position(|s| *s == Stmt::GridDependencyWait)
            .unwrap();
        assert_eq!(kernel.body.get(wait + 1), Some(&Stmt::LaunchDependents));
        assert!(loads(&before_wait(kernel).unwrap()).0 > 0);
    }
}

#[test]
fn preloaded_mma_gemvs_assemble_without_spills() {
    let Some(toolchain) = toolchain() else {
        return;
    };
    let module = lower_with("mma_preload.kiln", SRC);
    let mut registers = Vec::new();
    for preload in [false, true] {
        let mut kernels = Vec::new();
        for function in [
            "plain", "long_k", "gate_up", "qkv_rope", "eight", "sixteen", "o_proj",
        ] {
            for prefetch in [false, true] {
                let compiled =
                    compile_function(&module, function, &options(preload, prefetch)).unwrap();
                kernels.extend(
                    compiled
                        .kernels
                        .into_iter()
                        .filter(|k| k.name.contains("mma_gemv")),
                );
            }
        }
        assert_eq!(kernels.len(), 14, "{:?}", names(&kernels));
        println!("preload {preload}:");
        registers.push(assert_assembles_without_spills(&toolchain, &kernels));
    }
    // The same kernels in the same order, with and without: the registers side by side.
    assert_eq!(registers[0].len(), registers[1].len());
    for (off, on) in registers[0].iter().zip(&registers[1]) {
        assert_eq!(off.0, on.0);
        println!(
            "{:>7} {:<50} {:>3} -> {:>3} registers",
            off.0.sm_name(),
            off.1,
            off.2,
            on.2
        );
    }
}
