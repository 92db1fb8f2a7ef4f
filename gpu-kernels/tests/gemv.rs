//! The GEMV template (`templates/gemv.rs`) against the graph interpreter, run through the
//! kir interpreter (`check`) and the Cranelift backend: M = 1 to 4 (constant, and a symbolic
//! row count whose plan picks the GEMV at run time), ragged N (not a multiple of the block's
//! warps) and K (a multiple of 8 but not of the unrolled step, with and without whole
//! steps), bf16 and f16, fused epilogues (bias, residual, gate/up SwiGLU, q/k/v of unequal
//! widths followed by RoPE as the Llama decode step has them, an input reshaped from
//! attention heads); the off switch (`GemmTuning::gemv`); the 1.1B Llama decode step (no
//! split-K sum kernels left at one token); a PTX snapshot and ptxas for every target.

mod common;

use common::{
    assert_assembles_without_spills, check, count, inputs_for, launches, llama_decode_launches,
    lower, rel_err,
};
use common::{llama_1b, tolerance, toolchain};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn plain(x: bf16[M, 264], w: bf16[37, 264]) -> bf16[M, 37] { linear(x, w) }
fn long_k(x: bf16[M, 2056], w: bf16[45, 2056]) -> bf16[M, 45] { linear(x, w) }
fn bias(x: bf16[M, 520], w: bf16[30, 520], b: bf16[30]) -> bf16[M, 30] { linear_bias(x, w, b) }
fn residual(x: f16[M, 136], w: f16[70, 136], r: f16[M, 70]) -> f16[M, 70] { linear(x, w) + r }
fn gate_up(x: bf16[M, 264], g: bf16[41, 264], u: bf16[41, 264]) -> bf16[M, 41] { silu(linear(x, g)) * linear(x, u) }
fn qkv_rope(x: bf16[M, 1032], q: bf16[64, 1032], k: bf16[32, 1032], v: bf16[32, 1032], pos: i32[M]) -> (bf16[M, 4, 16], bf16[M, 2, 16], bf16[M, 2, 16]) {
    let qh = rope(linear(x, q).view(M, 4, 16), pos, 10000.0)
    let kh = rope(linear(x, k).view(M, 2, 16), pos, 10000.0)
    (qh, kh, linear(x, v).view(M, 2, 16))
}
fn heads_out(a: bf16[M, 4, 32], w: bf16[40, 128], r: bf16[M, 40]) -> bf16[M, 40] { linear(a.view(M, 128), w) + r }
fn norm_after(x: bf16[M, 2048], w: bf16[256, 2048], r: bf16[M, 256], g: bf16[256]) -> (bf16[M, 256], bf16[M, 256]) {
    let h = r + linear(x, w)
    (h, rms_norm(h, g, 0.00001))
}
fn one(x: bf16[1, 264], w: bf16[37, 264], b: bf16[37]) -> bf16[1, 37] { gelu(linear_bias(x, w, b)) }
fn three(x: f16[3, 1040], w: f16[33, 1040], r: f16[3, 33]) -> f16[3, 33] { linear(x, w) + r }
fn o_proj(x: bf16[1, 2048], w: bf16[2048, 2048], r: bf16[1, 2048]) -> bf16[1, 2048] { linear(x, w) + r }
fn five(x: bf16[5, 264], w: bf16[37, 264]) -> bf16[5, 37] { linear(x, w) }
";

fn options(gemv: bool) -> Options {
    Options {
        gemm: GemmTuning {
            gemv,
            // Past four rows the decode tile (the tensor-core GEMV has its own tests).
            mma_gemv: false,
            ..GemmTuning::default()
        },
        ..Options::default()
    }
}

/// Checks `function` at `M = m` on the kir interpreter and on Cranelift (each against the
/// graph interpreter) and returns the kernels launched.
fn run(function: &str, m: usize, gemv: bool) -> Vec<String> {
    let module = lower("gemv.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("M".to_string(), m)]);
    let inputs = inputs_for(func, &symbols, m, 5);
    let weights = BTreeMap::new();
    let compiled = check(&module, function, &inputs, &weights, &options(gemv));
    let want = kiln_ir::interpret(func, &inputs, &weights).unwrap();
    let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
    let got = cpu
        .run(&compiled.plan, &inputs, &|name| weights.get(name))
        .unwrap_or_else(|e| panic!("@{function} on Cranelift: {e}"));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = rel_err(g, w);
        assert!(
            err <= tolerance(w.dtype),
            "@{function} M={m} result {i} on Cranelift: relative error {err:e}"
        );
    }
    let sizes = BTreeMap::from([("M".to_string(), m as u64)]);
    launches(&compiled.plan, &compiled.kernels, &sizes)
}

#[test]
fn one_to_four_rows_take_the_gemv_and_match_the_interpreter() {
    for function in [
        "plain",
        "long_k",
        "bias",
        "residual",
        "gate_up",
        "heads_out",
    ] {
        for m in 1..=4 {
            let names = run(function, m, true);
            assert_eq!(count(&names, "gemv"), 1, "{function} M={m}: {names:?}");
            assert_eq!(count(&names, "mma_gemm"), 0, "{function} M={m}: {names:?}");
            assert_eq!(count(&names, "_sum"), 0, "{function} M={m}: {names:?}");
        }
        // Five rows and more: the tensor-core tiles.
        for m in [5, 40] {
            let names = run(function, m, true);
            assert_eq!(count(&names, "gemv"), 0, "{function} M={m}: {names:?}");
            assert!(
                count(&names, "mma_gemm") >= 1,
                "{function} M={m}: {names:?}"
            );
        }
    }
}

#[test]
fn fused_matmuls_share_a_warp_or_take_segments() {
    // gate/up: one kernel computing both at each column, the SwiGLU product its epilogue.
    let names = run("gate_up", 2, true);
    assert!(
        names[0].starts_with("gemv_w4_") && names[0].contains("_x2_epilogue"),
        "{names:?}"
    );
    assert!(!names[0].contains("_seg"), "{names:?}");
    // q/k/v of widths 64/32/32: a grid of segments; RoPE stays in its pointwise kernel.
    for m in 1..=4 {
        let names = run("qkv_rope", m, true);
        assert_eq!(count(&names, "gemv"), 1, "M={m}: {names:?}");
        assert!(names[0].contains("_seg_x3"), "M={m}: {names:?}");
        assert_eq!(count(&names, "_sum"), 0, "M={m}: {names:?}");
    }
    let names = run("qkv_rope", 16, true);
    assert_eq!(count(&names, "gemv"), 0, "{names:?}");
}

#[test]
fn constant_rows_take_the_gemv_without_a_run_time_choice() {
    for (function, gemv) in [("one", true), ("three", true), ("five", false)] {
        let module = lower("gemv.kiln", SRC, None, None);
        let compiled = compile_function(&module, function, &options(true)).unwrap();
        assert!(
            !compiled
                .plan
                .steps
                .iter()
                .any(|s| matches!(s, kiln_kir::Step::BySize { .. })),
            "{function}"
        );
        let names = run(function, 1, true);
        assert_eq!(count(&names, "gemv") == 1, gemv, "{function}: {names:?}");
    }
}

#[test]
fn the_norm_after_a_gemv_reads_the_stored_sum() {
    // With the GEMV the residual add is stored by it and the RMSNorm reads it (no split-K,
    // nothing for the norm to add); at 16 rows the split GEMM's sums go to the norm.
    for m in 1..=4 {
        let names = run("norm_after", m, true);
        assert_eq!(names.len(), 2, "M={m}: {names:?}");
        assert!(names[0].starts_with("gemv"), "M={m}: {names:?}");
        assert_eq!(count(&names, "splitk"), 0, "M={m}: {names:?}");
    }
    let names = run("norm_after", 16, true);
    assert_eq!(count(&names, "rms_norm_splitk"), 1, "{names:?}");
}

#[test]
fn the_switch_turns_the_gemv_off() {
    for function in ["plain", "bias", "gate_up", "qkv_rope"] {
        let names = run(function, 1, false);
        assert_eq!(count(&names, "gemv"), 0, "{function}: {names:?}");
        assert!(count(&names, "mma_gemm") >= 1, "{function}: {names:?}");
    }
}

/// The 1.1B Llama decode step's kernels at one token of one sequence.
fn llama_step(gemv: bool) -> (Vec<String>, Vec<kiln_kir::Kernel>) {
    let mut options = options(gemv);
    options.gemm.norm_prologue = true;
    llama_decode_launches(&llama_1b(), &options)
}

#[test]
fn the_1b_llama_decode_step_has_no_split_k_left() {
    let (with, _) = llama_step(true);
    let (without, _) = llama_step(false);
    println!(
        "decode step launches: {} with the GEMV, {} without",
        with.len(),
        without.len()
    );
    // q/k/v, o-proj, gate/up and down per layer, and the LM head.
    assert_eq!(count(&with, "gemv"), 16 * 4 + 1, "{with:?}");
    assert_eq!(count(&with, "splitk"), 0, "{with:?}");
    assert_eq!(count(&with, "mma_gemm"), 0, "{with:?}");
    // Without: 16 × 3 sum kernels (q/k/v, o-proj and down-proj, less the 31 whose sums
    // the next RMSNorm adds), the 17 RMSNorm kernels whose rows the GEMVs compute
    // (gate/up's and the LM head's: `templates::NormPrologues`, tests/norm_gemv.rs; the
    // q/k/v GEMV writing the caches keeps its norm kernel) and the 16 kv_write kernels
    // whose writes each q/k/v GEMV performs (`GemmTuning::gemv_kv_writes`).
    assert_eq!(count(&with, "rms_norm"), 16, "{with:?}");
    let kv_write_kernels = with.iter().filter(|n| n.starts_with("kv_write")).count();
    assert_eq!(kv_write_kernels, 0, "{with:?}");
    assert_eq!(
        with.len() + 17 + 17 + 16,
        without.len(),
        "{with:?}\n{without:?}"
    );
}

#[test]
fn the_gemv_kernels_assemble_without_spills() {
    let Some(toolchain) = toolchain() else { return };
    let (_, kernels) = llama_step(true);
    let module = lower("gemv.kiln", SRC, None, None);
    let mut gemvs: Vec<kiln_kir::Kernel> = kernels
        .into_iter()
        .filter(|k| k.name.contains("gemv"))
        .collect();
    for function in ["gate_up", "qkv_rope", "three"] {
        let compiled = compile_function(&module, function, &options(true)).unwrap();
        gemvs.extend(
            compiled
                .kernels
                .into_iter()
                .filter(|k| k.name.contains("gemv")),
        );
    }
    assert!(
        gemvs.len() >= 5,
        "{:?}",
        gemvs.iter().map(|k| &k.name).collect::<Vec<_>>()
    );
    let registers = assert_assembles_without_spills(&toolchain, &gemvs);
    for (target, name, regs) in &registers {
        println!("{target:?} {name}: {regs} registers");
    }
}

#[test]
fn the_o_proj_gemv_kernel_snapshot() {
    // The 1.1B Llama's o-proj at one token: 2048 × 2048, the residual add its epilogue.
    let module = lower("gemv.kiln", SRC, None, None);
    let compiled = compile_function(&module, "o_proj", &options(true)).unwrap();
    assert_eq!(compiled.kernels.len(), 1);
    assert_eq!(compiled.kernels[0].name, "k0_gemv_w4_u8_m1_epilogue_bf16");
    let ptx = kiln_ptx::emit_ptx(
        &compiled.kernels,
        kiln_ptx::Target::Sm90a,
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(ptx.contains("shfl.sync.bfly"), "{ptx}");
    insta::assert_snapshot!(ptx);
}
