//! The tensor-core GEMV template (`templates/mma_gemv.rs`) against the graph interpreter,
//! run through the kir interpreter (`check`) and the Cranelift backend: M = 5 to 16
//! (constant, and a symbolic row count whose plan picks it at run time between the GEMV and
//! the large tile), ragged N (not a multiple of the block's 8 columns) and K (a multiple of
//! 8 but not of 32 or of the unrolled step, with and without whole steps), bf16 and f16,
//! fused epilogues (bias, residual, gate/up SwiGLU, q/k/v of unequal widths followed by
//! RoPE, an input reshaped from attention heads); the off switch (`GemmTuning::mma_gemv`,
//! off by default); the L2 prefetch before the grid-dependency wait and the early trigger
//! (`GemmTuning::prefetch`, `trigger`); PTX snapshots (one and two n8 tiles a block) and
//! ptxas for every target, at 1, 2 and 4 tiles a block (`GemmTuning::mma_gemv_tiles`; the
//! tiles' results are checked in `mma_gemv_tiles.rs`).

mod common;

use common::{assert_assembles_without_spills, check, count, inputs_for, launches, lower, rel_err};
use common::{tolerance, toolchain};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn plain(x: bf16[M, 264], w: bf16[37, 264]) -> bf16[M, 37] { linear(x, w) }
fn long_k(x: bf16[M, 4136], w: bf16[45, 4136]) -> bf16[M, 45] { linear(x, w) }
fn short_k(x: f16[M, 40], w: f16[19, 40]) -> f16[M, 19] { linear(x, w) }
fn bias(x: bf16[M, 520], w: bf16[30, 520], b: bf16[30]) -> bf16[M, 30] { linear_bias(x, w, b) }
fn residual(x: f16[M, 1544], w: f16[70, 1544], r: f16[M, 70]) -> f16[M, 70] { linear(x, w) + r }
fn gate_up(x: bf16[M, 1288], g: bf16[41, 1288], u: bf16[41, 1288]) -> bf16[M, 41] { silu(linear(x, g)) * linear(x, u) }
fn qkv_rope(x: bf16[M, 1032], q: bf16[64, 1032], k: bf16[32, 1032], v: bf16[24, 1032], pos: i32[M]) -> (bf16[M, 4, 16], bf16[M, 2, 16], bf16[M, 24]) {
    let qh = rope(linear(x, q).view(M, 4, 16), pos, 10000.0)
    let kh = rope(linear(x, k).view(M, 2, 16), pos, 10000.0)
    (qh, kh, linear(x, v))
}
fn heads_out(a: bf16[M, 4, 32], w: bf16[40, 128], r: bf16[M, 40]) -> bf16[M, 40] { linear(a.view(M, 128), w) + r }
fn five(x: bf16[5, 264], w: bf16[37, 264], b: bf16[37]) -> bf16[5, 37] { gelu(linear_bias(x, w, b)) }
fn nine(x: f16[9, 1040], w: f16[33, 1040], r: f16[9, 33]) -> f16[9, 33] { linear(x, w) + r }
fn sixteen(x: bf16[16, 2056], w: bf16[67, 2056]) -> bf16[16, 67] { linear(x, w) }
fn o_proj(x: bf16[16, 4096], w: bf16[4096, 4096], r: bf16[16, 4096]) -> bf16[16, 4096] { linear(x, w) + r }
fn up_proj(x: bf16[16, 4096], w: bf16[14336, 4096]) -> bf16[16, 14336] { linear(x, w) }
";

fn options(mma_gemv: bool) -> Options {
    Options {
        gemm: GemmTuning {
            mma_gemv,
            ..GemmTuning::default()
        },
        ..Options::default()
    }
}

/// Checks `function` at `M = m` on the kir interpreter and on Cranelift (each against the
/// graph interpreter) and returns the kernels launched.
fn run(function: &str, m: usize, mma_gemv: bool) -> Vec<String> {
    let module = lower("mma_gemv.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("M".to_string(), m)]);
    let inputs = inputs_for(func, &symbols, m, 7);
    let weights = BTreeMap::new();
    let compiled = check(&module, function, &inputs, &weights, &options(mma_gemv));
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
fn five_to_sixteen_rows_take_the_mma_gemv_and_match_the_interpreter() {
    for function in [
        "plain",
        "long_k",
        "short_k",
        "bias",
        "residual",
        "gate_up",
        "heads_out",
    ] {
        for m in 5..=16 {
            let names = run(function, m, true);
            assert_eq!(count(&names, "mma_gemv"), 1, "{function} M={m}: {names:?}");
            assert_eq!(names.len(), 1, "{function} M={m}: {names:?}");
        }
        // At most four rows the GEMV, past 16 the tensor-core tiles.
        let names = run(function, 3, true);
        assert_eq!(count(&names, "mma_gemv"), 0, "{function}: {names:?}");
        assert_eq!(count(&names, "gemv"), 1, "{function}: {names:?}");
        let names = run(function, 17, true);
        assert_eq!(count(&names, "gemv"), 0, "{function}: {names:?}");
    }
}

#[test]
fn fused_matmuls_share_a_block_or_take_segments() {
    let names = run("gate_up", 8, true);
    assert!(
        names[0].contains("mma_gemv_n8_w4_u2") && names[0].contains("_x2_epilogue"),
        "{names:?}"
    );
    assert!(!names[0].contains("_seg"), "{names:?}");
    // q/k/v of widths 64/32/24: a grid of segments; RoPE stays in its pointwise kernel.
    for m in [5, 11, 16] {
        let names = run("qkv_rope", m, true);
        assert_eq!(count(&names, "mma_gemv"), 1, "M={m}: {names:?}");
        assert!(names[0].contains("_seg_x3"), "M={m}: {names:?}");
        assert_eq!(count(&names, "_sum"), 0, "M={m}: {names:?}");
    }
}

#[test]
fn constant_rows_take_the_mma_gemv_without_a_run_time_choice() {
    let module = lower("mma_gemv.kiln", SRC, None, None);
    for function in ["five", "nine", "sixteen"] {
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
        assert_eq!(names.len(), 1, "{function}: {names:?}");
        assert!(names[0].contains("mma_gemv"), "{function}: {names:?}");
    }
}

#[test]
fn the_switch_turns_the_mma_gemv_off() {
    for function in ["plain", "bias", "gate_up", "qkv_rope", "sixteen"] {
        let names = run(function, 16, false);
        assert_eq!(count(&names, "gemv"), 0, "{function}: {names:?}");
        assert!(count(&names, "mma_gemm") >= 1, "{function}: {names:?}");
    }
}

#[test]
fn the_block_knobs_keep_the_results() {
    // Warps splitting K (1, 2, 8) and chunks a step (1, 3) under `KILN_TUNE_GEMM` names.
    let module = lower("mma_gemv.kiln", SRC, None, None);
    for (warps, unroll) in [("1", "3"), ("2", "1"), ("8", "8")] {
        let mut options = options(true);
        options.gemm.set("mmagemvwarps", warps).unwrap();
        options.gemm.set("mmagemvunroll", unroll).unwrap();
        for (function, m) in [("long_k", 7), ("gate_up", 16), ("qkv_rope", 9)] {
            let func = module.function(function).unwrap();
            let symbols = BTreeMap::from([("M".to_string(), m)]);
            let inputs = inputs_for(func, &symbols, m, 11);
            let compiled = check(&module, function, &inputs, &BTreeMap::new(), &options);
            let sizes = BTreeMap::from([("M".to_string(), m as u64)]);
            let names = launches(&compiled.plan, &compiled.kernels, &sizes);
            assert!(
                names[0].contains(&format!("mma_gemv_n8_w{warps}_u")),
                "{function} {warps}x{unroll}: {names:?}"
            );
        }
    }
}

#[test]
fn the_prefetch_and_the_trigger_keep_the_results() {
    // `KILN_TUNE_GEMM=mmagemv=1,prefetch=P,trigger=T`: the interpreter also checks that
    // every prefetch lies inside its weight and is 16-byte aligned.
    let module = lower("mma_gemv.kiln", SRC, None, None);
    assert!(!GemmTuning::default().mma_gemv);
    for (prefetch, trigger) in [(true, true), (true, false), (false, true)] {
        let mut options = Options::default();
        for (key, on) in [
            ("mmagemv", true),
            ("prefetch", prefetch),
            ("trigger", trigger),
            // The early trigger (on by default) would add a wait and a trigger.
            ("early", false),
        ] {
            options.gemm.set(key, if on { "1" } else { "0" }).unwrap();
        }
        for (function, m) in [
            ("plain", 5),
            ("long_k", 16),
            ("gate_up", 9),
            ("qkv_rope", 16),
        ] {
            let func = module.function(function).unwrap();
            let symbols = BTreeMap::from([("M".to_string(), m)]);
            let inputs = inputs_for(func, &symbols, m, 5);
            let compiled = check(&module, function, &inputs, &BTreeMap::new(), &options);
            let kernel = compiled
                .kernels
                .iter()
                .find(|k| k.name.contains("mma_gemv"))
                .unwrap_or_else(|| panic!("{function}: no tensor-core GEMV"));
            let waits = kernel
                .body
                .iter()
                .filter(|s| **s == kiln_kir::Stmt::GridDependencyWait)
                .count();
            let text = kernel.to_string();
            let what = format!("{function} prefetch={prefetch} trigger={trigger}");
            assert_eq!(waits, usize::from(prefetch), "{what}");
            assert_eq!(text.contains("prefetch_l2("), prefetch, "{what}");
            assert_eq!(text.contains("launch_dependents"), trigger, "{what}");
        }
    }
}

#[test]
fn the_mma_gemv_kernels_assemble_without_spills() {
    let Some(toolchain) = toolchain() else { return };
    let module = lower("mma_gemv.kiln", SRC, None, None);
    let mut kernels = Vec::new();
    for function in [
        "plain", "long_k", "gate_up", "qkv_rope", "nine", "sixteen", "o_proj",
    ] {
        let mut prefetching = options(true);
        prefetching.gemm.prefetch = true;
        prefetching.gemm.trigger = true;
        for options in [options(true), prefetching] {
            let compiled = compile_function(&module, function, &options).unwrap();
            kernels.extend(
                compiled
                    .kernels
                    .into_iter()
                    .filter(|k| k.name.contains("mma_gemv")),
            );
        }
    }
    assert!(
        kernels.len() >= 14,
        "{:?}",
        kernels.iter().map(|k| &k.name).collect::<Vec<_>>()
    );
    let registers = assert_assembles_without_spills(&toolchain, &kernels);
    for (target, name, regs) in &registers {
        println!("{target:?} {name}: {regs} registers");
    }
}

/// The o-proj's one kernel under `options`, named `name` with a grid of `blocks`, and its
/// sm_90a PTX.
fn o_proj_ptx(options: &Options, name: &str, blocks: u64) -> String {
    let module = lower("mma_gemv.kiln", SRC, None, None);
    let compiled = compile_function(&module, "o_proj", options).unwrap();
    assert_eq!(compiled.kernels.len(), 1);
    assert_eq!(compiled.kernels[0].name, name);
    assert_eq!(
        compiled.kernels[0].grid[0],
        kiln_kir::SizeExpr::Const(blocks)
    );
    kiln_ptx::emit_ptx(
        &compiled.kernels,
        kiln_ptx::Target::Sm90a,
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_o_proj_mma_gemv_kernel_snapshot() {
    // A 4096 × 4096 o-proj at 16 tokens, the residual add its epilogue.
    let ptx = o_proj_ptx(
        &options(true),
        "k0_mma_gemv_n8_w4_u8_epilogue_bf16",
        4096 / 8,
    );
    assert!(ptx.contains("mma.sync.aligned.m16n8k16"), "{ptx}");
    assert!(!ptx.contains("ldmatrix"), "{ptx}");
    insta::assert_snapshot!(ptx);
}

/// The tensor-core GEMV on with `tiles` n8 tiles a block.
fn tiled(tiles: u32) -> Options {
    let mut options = options(true);
    options.gemm.mma_gemv_tiles = tiles;
    options
}

#[test]
fn the_tiled_mma_gemv_kernels_assemble_without_spills() {
    // M = 16, K = 4096 at N = 4096 and 14336 (the decode GEMMs of issue #5), gate/up, q/k/v
    // segments and a ragged K, at 1, 2 and 4 tiles a block, with and without the L2
    // prefetch and the trigger.
    let Some(toolchain) = toolchain() else { return };
    let module = lower("mma_gemv.kiln", SRC, None, None);
    for tiles in [1, 2, 4] {
        let mut kernels = Vec::new();
        let mut prefetching = tiled(tiles);
        prefetching.gemm.prefetch = true;
        prefetching.gemm.trigger = true;
        for options in [tiled(tiles), prefetching] {
            for function in ["o_proj", "up_proj", "gate_up", "qkv_rope", "long_k"] {
                let compiled = compile_function(&module, function, &options).unwrap();
                kernels.extend(
                    compiled
                        .kernels
                        .into_iter()
                        .filter(|k| k.name.contains("mma_gemv")),
                );
            }
        }
        assert!(kernels.len() >= 10, "tiles={tiles}");
        let suffix = format!("_t{tiles}");
        for kernel in &kernels {
            assert_eq!(kernel.name.contains(&suffix), tiles > 1, "{}", kernel.name);
        }
        let registers = assert_assembles_without_spills(&toolchain, &kernels);
        for (target, name, regs) in &registers {
            println!("tiles={tiles} {target:?} {name}: {regs} registers");
        }
    }
}

#[test]
fn the_o_proj_mma_gemv_kernel_with_two_tiles_snapshot() {
    // The o-proj of the snapshot above with 16 columns a block: A loaded once a chunk for
    // both tiles, two products a half-chunk, 256 blocks.
    let ptx = o_proj_ptx(
        &tiled(2),
        "k0_mma_gemv_n8_w4_u4_t2_epilogue_bf16",
        4096 / 16,
    );
    assert_eq!(
        ptx.matches("mma.sync.aligned.m16n8k16").count(),
        16,
        "{ptx}"
    );
    insta::assert_snapshot!(ptx);
}
