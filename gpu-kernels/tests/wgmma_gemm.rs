//! The sm_90a `wgmma` GEMM template against the graph interpreter, run through the kir
//! interpreter (which reads the shared tiles through the `wgmma` descriptors with the
//! 128-byte swizzle and checks the async-proxy fences): ragged M, N and K (K a multiple of
//! 8), fused epilogues with paired and single-column stores, horizontally fused gate/up
//! matmuls, bf16 and f16; and where it does not apply (targets without `wgmma`, the knob
//! off, few rows) the `mma.sync` template runs instead.

mod common;

use common::{check, inputs_for, lower};
use kiln_gpu_kernels::Options;
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn residual(x: bf16[M, 136], w: bf16[301, 136], r: bf16[M, 301]) -> bf16[M, 301] { linear(x, w) + r }
fn bias_gelu(x: f16[M, 72], w: f16[200, 72], b: f16[200]) -> f16[M, 200] { gelu(linear_bias(x, w, b)) }
fn gate_up(x: bf16[M, 200], g: bf16[136, 200], u: bf16[136, 200]) -> bf16[M, 136] { silu(linear(x, g)) * linear(x, u) }
fn long_k(x: bf16[M, 520], w: bf16[264, 520]) -> bf16[M, 264] { linear(x, w) }
fn few(x: f16[40, 72], w: f16[200, 72]) -> f16[40, 200] { linear(x, w) }
";

/// Options of an sm_90a-only build with the template on.
fn wgmma_options() -> Options {
    let mut options = common::mma_options();
    options.wgmma = true;
    options.gemm.wgmma = true;
    options.gemm.shared_kib = 227;
    options
}

/// Checks `function` at `M = m` on the kir interpreter; returns the kernel names (a
/// symbolic M compiles the decode-sized variant too, which keeps the mma.sync tile).
fn run(function: &str, m: usize, options: &Options) -> Vec<String> {
    let module = lower("wgmma_gemm.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("M".to_string(), m)]);
    let inputs = inputs_for(func, &symbols, 1, 7);
    let compiled = check(&module, function, &inputs, &BTreeMap::new(), options);
    compiled.kernels.iter().map(|k| k.name.clone()).collect()
}

#[test]
fn ragged_prefill_gemms_match_the_graph_interpreter() {
    let options = wgmma_options();
    for (function, m, name) in [
        ("residual", 200, "wgmma_gemm_128x256x64_s4_r8_epilogue"),
        ("bias_gelu", 130, "wgmma_gemm_128x256x64_s4_r8_p2_epilogue"),
        ("gate_up", 150, "wgmma_gemm_128x128x64_s4_r8_p2_x2_epilogue"),
        ("long_k", 129, "wgmma_gemm_128x256x64_s4_r8_p2"),
    ] {
        let names = run(function, m, &options);
        assert!(
            names.iter().any(|n| n.contains(name)),
            "{function}: {names:?}"
        );
    }
}

#[test]
fn other_builds_keep_the_mma_sync_template() {
    let mut off = wgmma_options();
    off.gemm.wgmma = false;
    let mut no_targets = wgmma_options();
    no_targets.wgmma = false;
    for options in [off, no_targets] {
        let names = run("residual", 200, &options);
        assert!(!names.iter().any(|n| n.contains("wgmma")), "{names:?}");
        assert!(names.iter().any(|n| n.contains("mma_gemm")), "{names:?}");
    }
    // Few rows: the mma.sync tiles.
    let names = run("few", 40, &wgmma_options());
    assert!(!names.iter().any(|n| n.contains("wgmma")), "{names:?}");
}

const LLM_SRC: &str = "import nn
fn q_proj(x: bf16[T, 4096], w: bf16[4096, 4096]) -> bf16[T, 4096] { linear(x, w) }
fn down(x: bf16[T, 14336], w: bf16[4096, 14336], r: bf16[T, 4096]) -> bf16[T, 4096] { linear(x, w) + r }
fn gate_up(x: bf16[T, 4096], gate: bf16[14336, 4096], up: bf16[14336, 4096]) -> bf16[T, 14336] { silu(linear(x, gate)) * linear(x, up) }
fn odd(x: f16[T, 1032], w: f16[1501, 1032], b: f16[1501]) -> f16[T, 1501] { gelu(linear_bias(x, w, b)) }
";

/// The prefill kernels of LLM-shaped GEMMs assemble for sm_90a without spills, and ptxas
/// keeps the `wgmma`s asynchronous (no C7515/C7511 serialization notice, which it gives when
/// the accumulators are touched between a `wgmma` and its wait).
#[test]
fn llm_shaped_wgmma_gemms_assemble_for_sm_90a_without_spills_or_serialization() {
    use kiln_ptx::{emit_ptx, AssembleOptions, EmitOptions, Target};
    let module = lower("wgmma_llm.kiln", LLM_SRC, None, None);
    let options = wgmma_options();
    let mut kernels = Vec::new();
    for function in ["q_proj", "down", "gate_up", "odd"] {
        let compiled = kiln_gpu_kernels::compile_function(&module, function, &options).unwrap();
        let wgmma: Vec<_> = compiled
            .kernels
            .into_iter()
            .filter(|k| k.name.contains("wgmma_gemm"))
            .collect();
        assert_eq!(wgmma.len(), 1, "{function}");
        kernels.extend(wgmma);
    }
    for kernel in &kernels {
        for target in [Target::Sm80, Target::Sm89, Target::Sm100a, Target::Sm120] {
            assert!(emit_ptx(
                std::slice::from_ref(kernel),
                target,
                &EmitOptions::default()
            )
            .is_err());
        }
    }
    let q_proj = emit_ptx(&kernels[..1], Target::Sm90a, &EmitOptions::default()).unwrap();
    assert!(
        q_proj.contains(".extern .shared .align 1024"),
        "1024-byte aligned tiles"
    );
    insta::assert_snapshot!("wgmma_gemm_128x256_q_proj_sm_90a", q_proj);
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    common::assert_assembles_without_spills_for(&toolchain, &kernels, &[Target::Sm90a]);
    for kernel in &kernels {
        for options in [EmitOptions::default(), EmitOptions::for_jit()] {
            let ptx = emit_ptx(std::slice::from_ref(kernel), Target::Sm90a, &options).unwrap();
            let assembled = toolchain
                .assemble(&ptx, Target::Sm90a, &AssembleOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
            for code in ["C7515", "C7511", "C7510"] {
                assert!(
                    !assembled.log.contains(code),
                    "{}:\n{}",
                    kernel.name,
                    assembled.log
                );
            }
        }
    }
}
