//! GEMV blocks that loop over column groups (`GemmTuning::gemv_blocks`): with a cap below
//! the column groups of a grid that is not one of segments, the grid is the cap and each
//! block computes the groups `blockIdx.x, blockIdx.x + grid, ...`, its norm prologue and
//! preload paid once. The plans with the cap (3 and 5 blocks: several groups a block, a
//! ragged last one) and without it give the same bits on the kir interpreter (against the
//! graph interpreter) and Cranelift, with and without the norm prologue and the preload,
//! M = 1 to 4 (symbolic and constant), bf16 and f16, N not a multiple of 4 × blocks; the
//! kernel's grid is the cap; q/k/v segments keep their grid; the 1.1B decode step compiles
//! with 528 blocks and the norm prologue, every kernel verifying and assembling without
//! spills.

mod common;

use common::{
    assert_assembles_without_spills, count, inputs_for, llama_1b, llama_decode_launches, lower,
    same_bits_with_and_without, toolchain,
};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use kiln_kir::SizeExpr;
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn one(x: bf16[T, 264], w: bf16[45, 264]) -> bf16[T, 45] {
    linear(x, w)
}
fn mlp(h: bf16[T, 2048], g: bf16[2048], gate: bf16[37, 2048], up: bf16[37, 2048]) -> bf16[T, 37] {
    let x = rms_norm(h, g, 0.00001)
    silu(linear(x, gate)) * linear(x, up)
}
fn ragged(x: f16[T, 264], w: f16[264, 264], g: f16[264], w2: f16[53, 264]) -> (f16[T, 264], f16[T, 53]) {
    let h = x + linear(x, w)
    (h, linear(rms_norm(h, g, 0.00001), w2))
}
fn head(h: bf16[4, 1040], last: i32[T], g: bf16[1040], w: bf16[45, 1040]) -> bf16[T, 45] {
    linear(rms_norm(h[last], g, 0.00001), w)
}
fn qkv(h: bf16[T, 1024], g: bf16[1024], q: bf16[64, 1024], k: bf16[32, 1024], v: bf16[32, 1024]) -> (bf16[T, 64], bf16[T, 32], bf16[T, 32]) {
    let x = rms_norm(h, g, 0.00001)
    (linear(x, q), linear(x, k), linear(x, v))
}
fn two(h: f16[3, 2048], g: f16[2048], w: f16[30, 2048]) -> f16[3, 30] {
    linear(rms_norm(h, g, 0.00001), w)
}
";

/// The default options with the norm prologue `norm`, the preload `preload` and, when `on`,
/// at most `blocks` GEMV blocks.
fn options(blocks: u32, norm: bool, preload: bool, on: bool) -> Options {
    Options {
        gemm: GemmTuning {
            gemv_blocks: if on { blocks } else { 0 },
            norm_prologue: norm,
            preload,
            ..GemmTuning::default()
        },
        ..Options::default()
    }
}

/// Runs `function` at `T = t` with and without the cap (the same bits everywhere) and
/// returns both plans' launches.
fn same_bits(
    function: &str,
    t: usize,
    blocks: u32,
    norm: bool,
    preload: bool,
) -> (Vec<String>, Vec<String>) {
    let module = lower("gemv_blocks.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("T".to_string(), t)]);
    let inputs = inputs_for(func, &symbols, t, 31);
    same_bits_with_and_without(&module, function, &inputs, &BTreeMap::new(), t, |on| {
        options(blocks, norm, preload, on)
    })
}

#[test]
fn looping_blocks_give_the_same_bits() {
    for function in ["one", "mlp", "ragged", "head"] {
        for norm in [false, true] {
            for (blocks, preload) in [(3, true), (5, false)] {
                for t in 1..=4 {
                    let what = format!("{function} T={t} blocks={blocks} norm={norm}");
                    let (with, without) = same_bits(function, t, blocks, norm, preload);
                    // `ragged`'s first matmul (264 columns) loops too.
                    let looped = format!("_g{blocks}");
                    let loops = if function == "ragged" { 2 } else { 1 };
                    assert_eq!(count(&with, &looped), loops, "{what}: {with:?}");
                    assert_eq!(count(&without, &looped), 0, "{what}: {without:?}");
                    assert_eq!(with.len(), without.len(), "{what}: {with:?}");
                    let normed = usize::from(norm && function != "one");
                    let gemv_norms = with
                        .iter()
                        .filter(|n| n.starts_with("gemv") && n.contains("_norm"))
                        .count();
                    assert_eq!(gemv_norms, normed, "{what}: {with:?}");
                }
            }
        }
    }
}

#[test]
fn constant_rows_loop_too() {
    for norm in [false, true] {
        for preload in [false, true] {
            let (with, _) = same_bits("two", 3, 3, norm, preload);
            assert_eq!(count(&with, "_g3"), 1, "norm={norm}: {with:?}");
        }
    }
    // With the trigger (`launch_dependents` once, after the block's last group).
    let module = lower("gemv_blocks.kiln", SRC, None, None);
    let func = module.function("two").unwrap();
    let inputs = inputs_for(func, &BTreeMap::new(), 3, 31);
    let (with, _) =
        same_bits_with_and_without(&module, "two", &inputs, &BTreeMap::new(), 3, |on| {
            let mut options = options(3, true, true, on);
            options.gemm.trigger = true;
            options
        });
    assert_eq!(count(&with, "_g3"), 1, "{with:?}");
}

#[test]
fn the_grid_is_the_cap() {
    let module = lower("gemv_blocks.kiln", SRC, None, None);
    let grid_of = |function: &str, blocks: u32| -> Vec<(String, SizeExpr)> {
        let compiled =
            compile_function(&module, function, &options(blocks, true, true, true)).unwrap();
        compiled
            .kernels
            .iter()
            .filter(|k| k.name.contains("gemv"))
            .map(|k| (k.name.clone(), k.grid[0].clone()))
            .collect()
    };
    // 45 columns are 12 groups of 4: 5 blocks loop; 12 or more keep a block a group.
    for (blocks, want, looped) in [
        (5, 5, true),
        (11, 11, true),
        (12, 12, false),
        (64, 12, false),
    ] {
        let grids = grid_of("one", blocks);
        assert!(!grids.is_empty());
        for (name, grid) in grids {
            assert_eq!(grid, SizeExpr::Const(want), "{name} blocks={blocks}");
            let suffix = format!("_g{blocks}_");
            assert_eq!(name.contains(&suffix), looped, "{name} blocks={blocks}");
        }
    }
    // 37 columns of gate/up sharing a warp: 10 groups.
    for (name, grid) in grid_of("mlp", 3) {
        assert_eq!(grid, SizeExpr::Const(3), "{name}");
        assert!(name.contains("_norm_g3"), "{name}");
    }
    // A grid of segments (q/k/v of different widths) keeps its blocks.
    for (name, grid) in grid_of("qkv", 3) {
        assert_eq!(grid, SizeExpr::Const(16 + 8 + 8), "{name}");
        assert!(!name.contains("_g3"), "{name}");
    }
}

#[test]
fn segments_keep_their_bits_and_grid() {
    for t in [1, 4] {
        let (with, without) = same_bits("qkv", t, 3, true, true);
        assert_eq!(with, without, "T={t}");
    }
}

#[test]
fn the_knob_parses() {
    let mut tuning = GemmTuning::default();
    assert_eq!(tuning.gemv_blocks, 0, "off by default");
    tuning.set("gemvblocks", "528").unwrap();
    assert_eq!(tuning.gemv_blocks, 528);
    tuning.set("gemvblocks", "0").unwrap();
    assert_eq!(tuning.gemv_blocks, 0);
    assert!(tuning.set("gemvblocks", "many").is_err());
    assert!(GemmTuning::KEYS.contains("gemvblocks"));
}

#[test]
fn the_1b_decode_step_loops_with_528_blocks() {
    let module = llama_1b();
    let (with, kernels) = llama_decode_launches(&module, &options(528, true, true, true));
    let (without, _) = llama_decode_launches(&module, &options(528, true, true, false));
    assert_eq!(with.len(), without.len(), "{with:?}");
    // gate/up (8192 columns: 2048 groups), down (2048: 512 groups, fewer than the cap) and
    // the LM head (32000: 8000 groups); q/k/v are a grid of segments.
    assert_eq!(count(&with, "_norm_g528"), 16 + 1, "{with:?}");
    assert_eq!(count(&with, "_g528"), 16 + 1, "{with:?}");
    for kernel in &kernels {
        kiln_kir::verify_kernel(kernel).unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
        if kernel.name.contains("_g528") {
            assert_eq!(kernel.grid[0], SizeExpr::Const(528), "{}", kernel.name);
        }
    }
    let Some(toolchain) = toolchain() else { return };
    // Without the norm prologue as well.
    let (plain, plain_kernels) = llama_decode_launches(&module, &options(528, false, true, true));
    assert_eq!(count(&plain, "_g528"), 16 + 1, "{plain:?}");
    let mut looped: Vec<kiln_kir::Kernel> = kernels
        .into_iter()
        .chain(plain_kernels)
        .filter(|k| k.name.contains("_g528"))
        .collect();
    // One of each distinct body (the layers share them).
    let mut seen = std::collections::BTreeSet::new();
    looped.retain(|k| seen.insert(k.name.split_once('_').map_or("", |(_, n)| n).to_string()));
    assert!(looped.len() >= 4, "{:?}", seen);
    let registers = assert_assembles_without_spills(&toolchain, &looped);
    for (target, name, regs) in &registers {
        println!("{target:?} {name}: {regs} registers");
    }
}
