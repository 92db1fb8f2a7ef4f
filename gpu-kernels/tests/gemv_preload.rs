//! The GEMV's first weights loaded before the grid-dependency wait (`GemmTuning::preload`):
//! where every weight of a GEMV is a checkpoint tensor (`Access::Constant`), a block loads
//! its first step of weight vectors, then waits for the kernel before it, then (after a
//! norm prologue, if any) multiplies. The plans with and without it run on the kir
//! interpreter (against the graph interpreter) and on Cranelift and must give the same
//! bits: M = 1 to 4 through a symbolic row count, K with one whole step and a tail, several
//! whole steps, gate/up sharing a warp, q/k/v segments of unequal widths followed by RoPE,
//! the norm prologue. The wait is where the template puts it (after the loads, at the top
//! level) and only where the weights are constant; ptxas for the five targets without
//! spills.

mod common;

use common::{
    assert_assembles_without_spills, inputs_for, loads_before_wait, lower_with,
    same_bits_with_and_without, toolchain, weights_for,
};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use kiln_kir::{Access, Kernel, Param, Stmt};
use std::collections::BTreeMap;

const SRC: &str = "import nn
model Preload {
    param w: [37, 2056] = \"w\"
    param w_long: [45, 4104] = \"w_long\"
    param gate: [41, 2048] = \"gate\"
    param up: [41, 2048] = \"up\"
    param q: [64, 1032] = \"q\"
    param k: [32, 1032] = \"k\"
    param v: [32, 1032] = \"v\"
    param g: [2048] = \"g\"
    fn plain(x: bf16[T, 2056]) -> bf16[T, 37] { linear(x, w) }
    fn long_k(x: bf16[T, 4104], r: bf16[T, 45]) -> bf16[T, 45] { linear(x, w_long) + r }
    fn gate_up(x: bf16[T, 2048]) -> bf16[T, 41] { silu(linear(x, gate)) * linear(x, up) }
    fn qkv_rope(x: bf16[T, 1032], pos: i32[T]) -> (bf16[T, 4, 16], bf16[T, 2, 16], bf16[T, 2, 16]) {
        let qh = rope(linear(x, q).view(T, 4, 16), pos, 10000.0)
        let kh = rope(linear(x, k).view(T, 2, 16), pos, 10000.0)
        (qh, kh, linear(x, v).view(T, 2, 16))
    }
    fn normed(h: bf16[T, 2048]) -> bf16[T, 41] {
        let x = rms_norm(h, g, 0.00001)
        silu(linear(x, gate)) * linear(x, up)
    }
    fn activations(x: bf16[T, 2048], y: bf16[41, 2048]) -> bf16[T, 41] { linear(x, y) }
}
";

fn options(preload: bool, norm_prologue: bool) -> Options {
    Options {
        gemm: GemmTuning {
            preload,
            norm_prologue,
            // Where the wait sits is the subject here: no trigger after it.
            early_trigger: false,
            ..GemmTuning::default()
        },
        ..Options::default()
    }
}

/// Both plans of `function` at `T = t` on the interpreters and Cranelift: the same bits.
fn same_bits(function: &str, t: usize, norm_prologue: bool) -> Vec<Kernel> {
    let module = lower_with("preload.kiln", SRC);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("T".to_string(), t)]);
    let inputs = inputs_for(func, &symbols, t, 11);
    let weights = weights_for(func, 12);
    same_bits_with_and_without(&module, function, &inputs, &weights, t, |on| {
        options(on, norm_prologue)
    });
    compile_function(&module, function, &options(true, norm_prologue))
        .unwrap()
        .kernels
}

/// The GEMV kernels among `kernels`: a symbolic row count has two, the one-row variant
/// (`_m1`) and the one for up to four rows (`_m4`).
fn gemvs(kernels: &[Kernel]) -> Vec<&Kernel> {
    let gemvs: Vec<&Kernel> = kernels.iter().filter(|k| k.name.contains("gemv")).collect();
    let names: Vec<&str> = gemvs.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(gemvs.len(), 2, "{names:?}");
    assert!(
        names[0].contains("_m1") != names[1].contains("_m1"),
        "{names:?}"
    );
    gemvs
}

#[test]
fn preloaded_gemvs_give_the_same_bits() {
    for t in [1, 3, 4] {
        for function in ["plain", "long_k", "gate_up", "qkv_rope"] {
            let kernels = same_bits(function, t, false);
            for gemv in gemvs(&kernels) {
                let loads =
                    loads_before_wait(gemv).unwrap_or_else(|| panic!("@{function}: no wait"));
                assert!(
                    !loads.is_empty(),
                    "@{function}: nothing loaded before the wait"
                );
                assert!(loads.iter().all(|&c| c), "@{function}: a non-constant load");
            }
        }
    }
}

#[test]
fn the_norm_prologue_runs_after_the_wait_and_the_first_weights() {
    for t in [1, 2] {
        let kernels = same_bits("normed", t, true);
        for gemv in gemvs(&kernels) {
            assert!(gemv.name.contains("_norm"), "{}", gemv.name);
            // No barrier (the norm's reduction) before the wait; the weights' loads are there.
            let wait = gemv
                .body
                .iter()
                .position(|s| *s == Stmt::GridDependencyWait)
                .expect("an explicit wait");
            let before = format!("{:?}", &gemv.body[..wait]);
            assert!(!before.contains("Barrier"), "{before}");
            assert!(!loads_before_wait(gemv).unwrap().is_empty());
        }
    }
}

#[test]
fn weights_computed_by_kernels_are_not_preloaded() {
    // `y` is an input: another kernel could be writing it, so it waits first.
    let kernels = same_bits("activations", 1, false);
    for gemv in gemvs(&kernels) {
        assert_eq!(loads_before_wait(gemv), None);
        assert!(gemv.params.iter().all(|p| !matches!(
            p,
            Param::Buffer {
                access: Access::Constant,
                ..
            }
        )));
    }
}

#[test]
fn the_switch_off_leaves_the_wait_at_the_start() {
    let module = lower_with("preload.kiln", SRC);
    for function in ["plain", "gate_up", "qkv_rope"] {
        let compiled = compile_function(&module, function, &options(false, false)).unwrap();
        for kernel in gemvs(&compiled.kernels) {
            assert_eq!(loads_before_wait(kernel), None, "@{function}");
        }
    }
}

#[test]
fn preloaded_gemvs_assemble_without_spills() {
    let Some(toolchain) = toolchain() else {
        return;
    };
    let module = lower_with("preload.kiln", SRC);
    let mut kernels = Vec::new();
    for (function, norm) in [("long_k", false), ("gate_up", false), ("qkv_rope", false)]
        .into_iter()
        .chain([("normed", true)])
    {
        let compiled = compile_function(&module, function, &options(true, norm)).unwrap();
        kernels.extend(
            compiled
                .kernels
                .into_iter()
                .filter(|k| k.name.contains("gemv")),
        );
    }
    let registers = assert_assembles_without_spills(&toolchain, &kernels);
    assert!(!registers.is_empty());
}

#[test]
fn the_early_trigger_follows_every_wait() {
    // The 1.1B decode step: each kernel lets the next launch right after its wait (the
    // GEMVs after their preloads), and none triggers before it.
    let module = common::llama_1b();
    let mut options = Options::default();
    options.gemm.early_trigger = true;
    let (names, kernels) = common::llama_decode_launches(&module, &options);
    assert!(names.len() > 100, "{names:?}");
    for kernel in &kernels {
        let wait = kernel
            .body
            .iter()
            .position(|s| *s == Stmt::GridDependencyWait)
            .unwrap_or_else(|| panic!("{}: no explicit wait", kernel.name));
        assert_eq!(
            kernel.body.get(wait + 1),
            Some(&Stmt::LaunchDependents),
            "{}",
            kernel.name
        );
        kiln_kir::verify_kernel(kernel).unwrap_or_else(|e| panic!("{e}"));
    }
    // Off: no kernel triggers.
    options.gemm.early_trigger = false;
    let (_, kernels) = common::llama_decode_launches(&module, &options);
    for kernel in &kernels {
        assert!(!format!("{:?}", kernel.body).contains("LaunchDependents"));
    }
}

#[test]
fn the_early_trigger_keeps_the_bits() {
    let module = lower_with("preload.kiln", SRC);
    let func = module.function("normed").unwrap();
    let symbols = BTreeMap::from([("T".to_string(), 2)]);
    let inputs = inputs_for(func, &symbols, 2, 13);
    let weights = weights_for(func, 14);
    same_bits_with_and_without(&module, "normed", &inputs, &weights, 2, |on| {
        let mut options = options(true, false);
        options.gemm.early_trigger = on;
        options
    });
}
