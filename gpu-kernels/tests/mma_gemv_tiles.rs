//! The tensor-core GEMV with several n8 tiles a block (`GemmTuning::mma_gemv_tiles`, 2 and
//! 4): each warp reads its A registers once a chunk for every tile. A tile's products and
//! the warps' sums run in the same order as with one tile a block, so the plans with and
//! without the knob must give the same bits on the kir interpreter (against the graph
//! interpreter) and on Cranelift: a symbolic row count at 5, 9 and 16 rows and constant 5
//! and 16, N not a multiple of the block's columns (37, 45, 200), K with and without whole
//! steps, gate/up sharing a block, q/k/v of unequal widths as a grid of segments (widths
//! 64/32/24) followed by RoPE, the residual epilogue; with and without the first weights
//! loaded before the wait, the L2 prefetch and the trigger. The kernels' names and grids
//! follow the knob; the preloading kernels assemble without spills on every target.

mod common;

use common::{assert_assembles_without_spills, toolchain};
use common::{inputs_for, launches, loads_before_wait};
use common::{lower_with, same_bits_with_and_without, weights_for};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use kiln_kir::SizeExpr;
use std::collections::BTreeMap;

const SRC: &str = "import nn
model Tiles {
    param w: [37, 264] = \"w\"
    param w_wide: [200, 264] = \"w_wide\"
    param w_long: [45, 4136] = \"w_long\"
    param gate: [41, 1288] = \"gate\"
    param up: [41, 1288] = \"up\"
    param q: [64, 1032] = \"q\"
    param k: [32, 1032] = \"k\"
    param v: [24, 1032] = \"v\"
    fn plain(x: bf16[T, 264]) -> bf16[T, 37] { linear(x, w) }
    fn wide(x: bf16[T, 264], r: bf16[T, 200]) -> bf16[T, 200] { linear(x, w_wide) + r }
    fn long_k(x: bf16[T, 4136]) -> bf16[T, 45] { linear(x, w_long) }
    fn gate_up(x: bf16[T, 1288]) -> bf16[T, 41] { silu(linear(x, gate)) * linear(x, up) }
    fn qkv_rope(x: bf16[T, 1032], pos: i32[T]) -> (bf16[T, 4, 16], bf16[T, 2, 16], bf16[T, 24]) {
        let qh = rope(linear(x, q).view(T, 4, 16), pos, 10000.0)
        let kh = rope(linear(x, k).view(T, 2, 16), pos, 10000.0)
        (qh, kh, linear(x, v))
    }
    fn five(x: bf16[5, 264]) -> bf16[5, 200] { gelu(linear(x, w_wide)) }
    fn sixteen(x: bf16[16, 264], r: bf16[16, 200]) -> bf16[16, 200] { linear(x, w_wide) + r }
}
";

/// The tensor-core GEMV on with `tiles` n8 tiles a block, the first weights loaded before
/// the wait, the L2 prefetch and the trigger when `early`.
fn options(tiles: u32, early: bool) -> Options {
    Options {
        gemm: GemmTuning {
            mma_gemv: true,
            mma_gemv_tiles: tiles,
            preload: early,
            prefetch: early,
            trigger: early,
            ..GemmTuning::default()
        },
        ..Options::default()
    }
}

/// Blocks of the grid of `function`'s tensor-core GEMV at `tiles`: ceil(N / 8 tiles) for
/// each matmul of a grid of segments, of the one width otherwise.
fn blocks(function: &str, tiles: u64) -> u64 {
    let widths: &[u64] = match function {
        "plain" => &[37],
        "wide" | "five" | "sixteen" => &[200],
        "long_k" => &[45],
        "gate_up" => &[41],
        "qkv_rope" => &[64, 32, 24],
        _ => unreachable!(),
    };
    widths.iter().map(|n| n.div_ceil(8 * tiles)).sum()
}

#[test]
fn several_tiles_a_block_give_the_same_bits() {
    let module = lower_with("tiles.kiln", SRC);
    let cases = [
        ("plain", 5),
        ("plain", 16),
        ("wide", 9),
        ("wide", 16),
        ("long_k", 5),
        ("long_k", 16),
        ("gate_up", 5),
        ("gate_up", 16),
        ("qkv_rope", 5),
        ("qkv_rope", 16),
        ("five", 5),
        ("sixteen", 16),
    ];
    for tiles in [2u32, 4] {
        for early in [false, true] {
            for (function, t) in cases {
                let func = module.function(function).unwrap();
                let symbols = BTreeMap::from([("T".to_string(), t)]);
                let inputs = inputs_for(func, &symbols, t, 17);
                let weights = weights_for(func, 18);
                let what = format!("@{function} T={t} tiles={tiles} early={early}");
                let (with, without) =
                    same_bits_with_and_without(&module, function, &inputs, &weights, t, |on| {
                        options(if on { tiles } else { 1 }, early)
                    });
                let gemv = |names: &[String]| -> String {
                    let found: Vec<&String> =
                        names.iter().filter(|n| n.contains("mma_gemv")).collect();
                    assert_eq!(found.len(), 1, "{what}: {names:?}");
                    found[0].clone()
                };
                let (with, without) = (gemv(&with), gemv(&without));
                assert!(with.contains(&format!("_t{tiles}")), "{what}: {with}");
                assert!(
                    !without.contains("_t2") && !without.contains("_t4"),
                    "{what}: {without}"
                );
                assert_eq!(
                    with.contains("_seg"),
                    function == "qkv_rope",
                    "{what}: {with}"
                );
                // The grid: ceil(N / 8 tiles) blocks (a matmul's each in a grid of segments).
                let compiled = compile_function(&module, function, &options(tiles, early))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let sizes = BTreeMap::from([("T".to_string(), t as u64)]);
                let launched = launches(&compiled.plan, &compiled.kernels, &sizes);
                assert!(launched.contains(&with), "{what}: {launched:?}");
                let kernel = compiled
                    .kernels
                    .iter()
                    .find(|k| k.name.ends_with(&with))
                    .unwrap_or_else(|| panic!("{what}: no kernel {with}"));
                let want = blocks(function, u64::from(tiles));
                assert_eq!(kernel.grid[0], SizeExpr::Const(want), "{what}");
                // The first weights of every tile before the wait when early.
                let before = loads_before_wait(kernel).map_or(0, |loads| loads.len());
                assert_eq!(before > 0, early, "{what}: {before} loads before the wait");
            }
        }
    }
}

#[test]
fn the_tiles_knob_takes_one_two_or_four() {
    let mut tuning = GemmTuning::default();
    assert_eq!(tuning.mma_gemv_tiles, 1);
    for (value, want) in [("2", 2), ("4", 4), ("3", 2), ("8", 4), ("0", 1), ("1", 1)] {
        tuning.set("mmagemvtiles", value).unwrap();
        assert_eq!(tuning.mma_gemv_tiles, want, "mmagemvtiles={value}");
    }
    assert!(tuning.set("mmagemvtiles", "two").is_err());
    assert!(GemmTuning::KEYS.contains("mmagemvtiles"));
}

#[test]
fn preloading_tiled_kernels_assemble_without_spills() {
    // The first step's weights of every tile held across the wait.
    let Some(toolchain) = toolchain() else { return };
    let module = lower_with("tiles.kiln", SRC);
    for tiles in [2, 4] {
        let mut kernels = Vec::new();
        for function in ["plain", "long_k", "gate_up", "qkv_rope", "sixteen"] {
            let compiled = compile_function(&module, function, &options(tiles, true)).unwrap();
            kernels.extend(
                compiled
                    .kernels
                    .into_iter()
                    .filter(|k| k.name.contains("mma_gemv")),
            );
        }
        assert_eq!(kernels.len(), 5, "tiles={tiles}");
        for (target, name, regs) in assert_assembles_without_spills(&toolchain, &kernels) {
            println!("tiles={tiles} {target:?} {name}: {regs} registers");
        }
    }
}
