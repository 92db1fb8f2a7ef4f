//! The tensor-core GEMM template against the graph interpreter at small ragged shapes, run
//! through the kir interpreter (`check`) and the Cranelift backend: both B layouts (`x @ w`
//! and `linear`'s transposed weight), bf16 and f16, fused epilogues, horizontally fused
//! matmuls, batch dims, M, N and K that are not multiples of any tile, decode shapes with K
//! split across blocks; and the fallback to the plain template where the tensor-core one
//! does not apply.
//!
//! Tolerance: that of `common::tolerance` for the output dtype (2e-2 relative for
//! bf16/f16: the kernels do not round intermediates to the narrow dtype as the graph
//! interpreter does after every op).

mod common;

use common::{check, inputs_for, lower, rel_err, tolerance};
use kiln_gpu_kernels::{GemmTuning, Options};
use kiln_kir::{Arg, BufferKind, Step};
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn nk(x: bf16[M, 24], w: bf16[53, 24]) -> bf16[M, 53] { linear(x, w) }
fn kn(x: bf16[M, 64], w: bf16[64, 128]) -> bf16[M, 128] { x @ w }
fn bias_gelu(x: bf16[M, 72], w: bf16[200, 72], b: bf16[200]) -> bf16[M, 200] { gelu(linear_bias(x, w, b)) }
fn half_kn(x: f16[M, 40], w: f16[40, 48]) -> f16[M, 48] { x @ w }
fn gate_up(x: bf16[M, 32], gate: bf16[72, 32], up: bf16[72, 32]) -> bf16[M, 72] { silu(linear(x, gate)) * linear(x, up) }
fn residual(x: bf16[M, 48], w: bf16[40, 48], r: bf16[M, 40]) -> bf16[M, 40] { linear(x, w) + r }
fn batched(x: bf16[B, M, 16], y: bf16[B, 16, 24]) -> bf16[B, M, 24] { x @ y }
fn scaled(x: bf16[M, 32], w: bf16[24, 32]) -> bf16[M, 24] { linear(x, w) * 0.5 }
fn decode1(x: bf16[1, 264], w: bf16[40, 264], b: bf16[40]) -> bf16[1, 40] { linear_bias(x, w, b) }
fn decode16(x: bf16[16, 72], w: bf16[72, 96]) -> bf16[16, 96] { x @ w }
fn decode5(x: f16[5, 136], w: f16[70, 136], r: f16[5, 70]) -> f16[5, 70] { linear(x, w) + r }
fn split5(x: f16[5, 1560], w: f16[70, 1560], r: f16[5, 70]) -> f16[5, 70] { linear(x, w) + r }
fn split1(x: bf16[1, 1096], w: bf16[1096, 88], b: bf16[88]) -> bf16[1, 88] { x @ w + b }
fn split_batched(x: bf16[2, 16, 1048], y: bf16[2, 1048, 40]) -> bf16[2, 16, 40] { x @ y }
fn odd_k(x: bf16[M, 20], w: bf16[16, 20]) -> bf16[M, 16] { linear(x, w) }
fn wide(x: f32[M, 32], w: f32[16, 32]) -> f32[M, 16] { linear(x, w) }
fn qkv(x: bf16[M, 256], q: bf16[64, 256], k: bf16[32, 256], v: bf16[32, 256]) -> (bf16[M, 64], bf16[M, 32], bf16[M, 32]) { (linear(x, q), linear(x, k), linear(x, v)) }
fn long_k(x: bf16[M, 2048], w: bf16[96, 2048], r: bf16[M, 96]) -> bf16[M, 96] { linear(x, w) + r }
fn kv_long_k(x: bf16[M, 2048], k: bf16[72, 2048], v: bf16[72, 2048]) -> (bf16[M, 72], bf16[M, 72]) { (linear(x, k), linear(x, v) * 0.5) }
fn heads_out(a: bf16[M, 4, 32], w: bf16[40, 128], r: bf16[M, 40]) -> bf16[M, 40] { linear(a.view(M, 128), w) + r }
fn seg_qkv(x: bf16[M, 256], q: bf16[96, 256], k: bf16[32, 256], v: bf16[40, 256], b: bf16[96], r: bf16[M, 40]) -> (bf16[M, 96], bf16[M, 32], bf16[M, 40]) { (linear_bias(x, q, b), silu(linear(x, k)), linear(x, v) + r) }
fn seg_split(x: bf16[M, 2048], q: bf16[96, 2048], k: bf16[32, 2048], v: bf16[37, 2048], r: bf16[M, 37]) -> (bf16[M, 96], bf16[M, 32], bf16[M, 37]) { (linear(x, q) * 0.5, linear(x, k), linear(x, v) + r) }
fn seg_batched(x: bf16[2, 5, 64], a: bf16[2, 64, 48], b: bf16[2, 64, 16]) -> (bf16[2, 5, 48], bf16[2, 5, 16]) { (x @ a, x @ b) }
fn seg_batched_split(x: bf16[2, 3, 1024], a: bf16[2, 1024, 48], b: bf16[2, 1024, 16]) -> (bf16[2, 3, 48], bf16[2, 3, 16]) { (x @ a, x @ b + 1.0) }
fn seg_mixed(x: bf16[M, 64], a: bf16[64, 48], b: bf16[16, 64]) -> (bf16[M, 48], bf16[M, 16]) { (x @ a, linear(x, b)) }
fn seg_shared(x: bf16[M, 64], a: bf16[48, 64], b: bf16[48, 64], c: bf16[16, 64]) -> (bf16[M, 48], bf16[M, 16]) { (linear(x, a) * linear(x, b), linear(x, c)) }
fn long_nk(x: bf16[M, 200], w: bf16[264, 200], b: bf16[264]) -> bf16[M, 264] { gelu(linear_bias(x, w, b)) }
fn long_kn(x: f16[M, 200], w: f16[200, 264], r: f16[M, 264]) -> f16[M, 264] { x @ w + r }
fn long_gate_up(x: bf16[M, 200], g: bf16[136, 200], u: bf16[136, 200]) -> bf16[M, 136] { silu(linear(x, g)) * linear(x, u) }
fn exact_nk(x: bf16[256, 96], w: bf16[512, 96], r: bf16[256, 512]) -> bf16[256, 512] { linear(x, w) + r }
fn exact_kn(x: f16[256, 128], w: f16[128, 256]) -> f16[256, 256] { x @ w }
fn long_batched(x: bf16[B, M, 96], y: bf16[B, 96, 136]) -> bf16[B, M, 136] { x @ y }
fn fp8_tensor(x: f8e4m3[M, 96], w: f8e4m3[53, 96], sa: f32, sb: f32) -> bf16[M, 53] { bf16(scaled_mm(x, w, sa, sb)) }
fn fp8_channel(x: f8e4m3[M, 48], w: f8e4m3[40, 48], sa: f32[M, 1], sb: f32[40]) -> f32[M, 40] { scaled_mm(x, w, sa, sb) }
fn fp8_e5m2(x: f8e5m2[M, 80], w: f8e5m2[24, 80]) -> f32[M, 24] { f32(x) @ f32(w.T) }
fn fp8_batched(x: f8e4m3[B, M, 32], w: f8e4m3[B, 24, 32], sb: f32[24]) -> f32[B, M, 24] { (f32(x) @ f32(w).transpose(-1, -2)) * sb }
fn fp8_decode(x: f8e4m3[1, 2080], w: f8e4m3[72, 2080], sa: f32, sb: f32[72]) -> bf16[1, 72] { bf16(scaled_mm(x, w, sa, sb)) }
fn fp8_gate_up(x: f8e4m3[M, 64], g: f8e4m3[40, 64], u: f8e4m3[40, 64], s: f32) -> f32[M, 40] { silu(scaled_mm(x, g, s, s)) * scaled_mm(x, u, s, s) }
fn fp8_kn(x: f8e4m3[M, 32], w: f8e4m3[32, 24]) -> f32[M, 24] { f32(x) @ f32(w) }
fn fp8_odd_k(x: f8e4m3[M, 40], w: f8e4m3[24, 40]) -> f32[M, 24] { f32(x) @ f32(w).T }
fn fp8_mixed(x: f8e4m3[M, 32], w: f8e5m2[24, 32]) -> f32[M, 24] { f32(x) @ f32(w).T }
";

/// Checks `function` at the given symbol values on the kir interpreter and on Cranelift;
/// returns the kernel names.
fn run(function: &str, symbols: &[(&str, usize)]) -> Vec<String> {
    run_both(function, symbols, &common::mma_options())
}

/// [`run`] with `options`.
fn run_both(function: &str, symbols: &[(&str, usize)], options: &Options) -> Vec<String> {
    let module = lower("mma_gemm.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols: BTreeMap<String, usize> =
        symbols.iter().map(|(s, v)| (s.to_string(), *v)).collect();
    let inputs = inputs_for(func, &symbols, 1, 7);
    let weights = BTreeMap::new();
    let compiled = check(&module, function, &inputs, &weights, options);
    let want = kiln_ir::interpret(func, &inputs, &weights).unwrap();
    let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
    let got = cpu
        .run(&compiled.plan, &inputs, &|name| weights.get(name))
        .unwrap_or_else(|e| panic!("@{function} on Cranelift: {e}"));
    for (g, w) in got.iter().zip(&want) {
        let err = rel_err(g, w);
        assert!(
            err <= tolerance(w.dtype),
            "@{function} on Cranelift: relative error {err:e}"
        );
    }
    compiled.kernels.iter().map(|k| k.name.clone()).collect()
}

fn uses_tensor_cores(names: &[String]) -> bool {
    names.iter().any(|n| n.contains("mma_gemm"))
}

#[test]
fn transposed_weight_with_ragged_m_and_n() {
    // 37 x 53 x 24.
    let names = run("nk", &[("M", 37)]);
    assert!(uses_tensor_cores(&names), "{names:?}");
}

#[test]
fn row_major_b_whole_tiles() {
    // 128 x 128 x 64: exactly one block tile, two k slices.
    let names = run("kn", &[("M", 128)]);
    assert!(uses_tensor_cores(&names), "{names:?}");
}

#[test]
fn bias_and_gelu_epilogue_over_two_block_rows_and_columns() {
    // 130 x 200 x 72: ragged in M, N and K.
    let names = run("bias_gelu", &[("M", 130)]);
    assert!(uses_tensor_cores(&names), "{names:?}");
    assert!(names.iter().any(|n| n.contains("epilogue")), "{names:?}");
}

#[test]
fn f16_inputs_with_k_not_a_multiple_of_the_slice() {
    let names = run("half_kn", &[("M", 37)]);
    assert!(uses_tensor_cores(&names), "{names:?}");
}

#[test]
fn horizontally_fused_gate_and_up() {
    let names = run("gate_up", &[("M", 19)]);
    assert!(
        names
            .iter()
            .any(|n| n.contains("mma_gemm") && n.contains("_x2")),
        "{names:?}"
    );
}

#[test]
fn residual_and_scale_epilogues_and_batch_dims() {
    assert!(uses_tensor_cores(&run("residual", &[("M", 33)])));
    assert!(uses_tensor_cores(&run("batched", &[("B", 2), ("M", 5)])));
    assert!(uses_tensor_cores(&run("scaled", &[("M", 9)])));
}

#[test]
fn decode_shapes_split_k_over_warps() {
    // M of 1, 5 and 16 rows: one m16 row of tiles, k slices shared by four warps; K of 264
    // and 136 (ragged slices), N of 40 and 70 (ragged tiles), both B layouts, epilogues.
    for function in ["decode1", "decode16", "decode5"] {
        let names = run(function, &[]);
        assert!(
            names
                .iter()
                .any(|n| n.contains("mma_gemm_16x32x128_w1x2x4")),
            "{function}: {names:?}"
        );
    }
}

#[test]
fn decode_shapes_split_k_across_blocks() {
    // Few output tiles and long K: the k slices are split over blocks whose partial sums a
    // second kernel adds (with the epilogue). K of 1560 (13 slices of 128, the last 24
    // wide: blocks of 5, 5 and 3 slices), 1096 and 1048 (9 slices: 5 and 4); N of 70, 88
    // and 40 (ragged 32-wide tiles); both B layouts, a residual and a bias epilogue, batch
    // dims (the workspace holds one [M, N] matrix per split and batch entry).
    for (function, splits) in [("split5", 3), ("split1", 2), ("split_batched", 2)] {
        let names = run(function, &[]);
        let partial = format!("mma_gemm_16x32x128_w1x2x4_s3_splitk{splits}_f32");
        let sum = format!("splitk{splits}_sum");
        assert_eq!(names.len(), 2, "{function}: {names:?}");
        assert!(names[0].ends_with(&partial), "{function}: {names:?}");
        assert!(names[1].contains(&sum), "{function}: {names:?}");
    }
}

#[test]
fn the_split_workspace_is_an_arena_temp_of_the_partial_sums() {
    let module = lower("mma_gemm.kiln", SRC, None, None);
    let compiled =
        kiln_gpu_kernels::compile_function(&module, "split_batched", &common::mma_options())
            .unwrap();
    let plan = &compiled.plan;
    let [Step::Launch { args: partial, .. }, Step::Launch { args: sum, .. }] =
        plan.steps.as_slice()
    else {
        panic!("two launches: {:?}", plan.steps);
    };
    let temps: Vec<_> = plan
        .buffers
        .iter()
        .filter(|b| b.kind == BufferKind::Temp)
        .collect();
    assert_eq!(temps.len(), 1, "{temps:?}");
    let workspace = temps[0];
    assert_eq!(workspace.dtype, kiln_ir::DType::F32);
    let dims: Vec<u64> = workspace
        .shape
        .iter()
        .map(|d| d.eval(&|_| None).unwrap())
        .collect();
    assert_eq!(dims, [2, 2, 16, 40]);
    assert_eq!(plan.arena_bytes.eval(&|_| None), Some(2 * 2 * 16 * 40 * 4));
    assert!(partial.contains(&Arg::Buffer(workspace.id)));
    assert!(sum.contains(&Arg::Buffer(workspace.id)));
}

#[test]
fn other_matmuls_use_the_plain_template() {
    // K = 20 is not a multiple of 8 (16-byte copies); f32 has no tensor-core path here.
    for function in ["odd_k", "wide"] {
        let names = run(function, &[("M", 11)]);
        assert!(!uses_tensor_cores(&names), "{function}: {names:?}");
        assert!(names.iter().any(|n| n.contains("matmul")), "{names:?}");
    }
}

#[test]
fn the_plain_template_can_be_forced() {
    let module = lower("mma_gemm.kiln", SRC, None, None);
    let options = Options {
        tensor_cores: false,
        ..common::mma_options()
    };
    let compiled = kiln_gpu_kernels::compile_function(&module, "nk", &options).unwrap();
    assert!(compiled
        .kernels
        .iter()
        .all(|k| !k.name.contains("mma_gemm")));
}

#[test]
fn a_symbolic_row_count_gets_a_decode_variant_chosen_at_run_time() {
    // The same plan runs the decode-sized kernels for at most 16 rows and the large tiles
    // above: single, two (gate/up, half the split-K warps), three of unequal widths (q/k/v:
    // a grid of segments, each block one matmul's tile with the single-matmul tile), a
    // split-K one, and two fused matmuls of one shape whose few output tiles split K across
    // blocks (their sum kernel adds each one's partial sums and applies both epilogues).
    for (function, rows, small) in [
        ("nk", [1, 16, 17], "mma_gemm_16x32x128_w1x2x4"),
        ("gate_up", [3, 16, 40], "mma_gemm_16x32x128_w1x2x2"),
        ("qkv", [1, 7, 33], "mma_gemm_16x32x128_w1x2x4_s3_seg_x3"),
        ("long_k", [1, 5, 20], "mma_gemm_16x32x128_w1x2x4_s3_splitk"),
        (
            "kv_long_k",
            [1, 5, 20],
            "mma_gemm_16x32x128_w1x2x2_s2_splitk4_x2",
        ),
    ] {
        for m in rows {
            let names = run(function, &[("M", m)]);
            assert!(
                names.iter().any(|n| n.contains(small)),
                "{function}: {names:?}"
            );
            assert!(
                names.iter().any(|n| n.contains("mma_gemm_128x")),
                "{function}: {names:?}"
            );
        }
    }
    let module = lower("mma_gemm.kiln", SRC, None, None);
    let compiled =
        kiln_gpu_kernels::compile_function(&module, "long_k", &common::mma_options()).unwrap();
    assert!(
        matches!(
            compiled.plan.steps.as_slice(),
            [Step::BySize { symbol, at_most: 16, .. }] if symbol == "M"
        ),
        "{:?}",
        compiled.plan.steps
    );
}

#[test]
fn a_reshaped_operand_is_read_from_the_buffer_it_reshapes() {
    // Attention's [T, H, D] output viewed as [T, H * D] feeds the o-projection: the
    // tensor-core template reads the stored buffer (same row-major order), both variants.
    for m in [1, 5, 37] {
        let names = run("heads_out", &[("M", m)]);
        assert!(uses_tensor_cores(&names), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("_matmul_")), "{names:?}");
    }
}

#[test]
fn fused_matmuls_of_unequal_widths_get_a_grid_of_segments_at_decode_sizes() {
    // q/k/v-like widths 96, 32 and 40 (3 + 1 + 2 block columns, the last ragged), a bias,
    // an activation and a residual epilogue each on its own matmul; K of 256 (two slices,
    // no split across blocks). Symbolic M: the decode variant for at most 16 rows, today's
    // layout above.
    for m in [1, 5, 16, 17, 33] {
        let names = run("seg_qkv", &[("M", m)]);
        assert!(
            names
                .iter()
                .any(|n| n.contains("mma_gemm_16x32x128_w1x2x4_s3_seg_x3_epilogue")),
            "{names:?}"
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("mma_gemm_128x") && !n.contains("_seg")),
            "{names:?}"
        );
    }
    let module = lower("mma_gemm.kiln", SRC, None, None);
    let compiled =
        kiln_gpu_kernels::compile_function(&module, "seg_qkv", &common::mma_options()).unwrap();
    let seg = compiled
        .kernels
        .iter()
        .find(|k| k.name.contains("_seg"))
        .expect("a segmented kernel");
    assert_eq!(
        seg.grid[0].eval(&|_| None),
        Some(6),
        "3 + 1 + 2 block columns"
    );
    // Batch dims and `[K, N]` B operands (N 48 and 16).
    let names = run("seg_batched", &[]);
    assert!(
        names
            .iter()
            .any(|n| n.contains("mma_gemm_16x32x128_w1x2x4_s3_seg_x2")),
        "{names:?}"
    );
}

#[test]
fn a_grid_of_segments_splits_k_across_blocks_when_it_is_small() {
    // 3 + 1 + 2 block columns and K = 2048 (16 slices): 4 splits of 4 slices, partial
    // sums side by side in a [4, M, 96 + 32 + 37] workspace, then the sum kernel applies
    // each segment's epilogue (scale, none, residual on a ragged 37-wide N).
    for m in [1, 7, 16, 20] {
        let names = run("seg_split", &[("M", m)]);
        assert!(
            names
                .iter()
                .any(|n| n.contains("mma_gemm_16x32x128_w1x2x4_s3_seg_splitk4_x3_f32")),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n.contains("splitk4_sum_x3_epilogue")),
            "{names:?}"
        );
    }
    let names = run("seg_batched_split", &[]);
    assert!(
        names
            .iter()
            .any(|n| n.contains("mma_gemm_16x32x128_w1x2x4_s3_seg_splitk2_x2_f32")),
        "{names:?}"
    );
    let module = lower("mma_gemm.kiln", SRC, None, None);
    let compiled =
        kiln_gpu_kernels::compile_function(&module, "seg_batched_split", &common::mma_options())
            .unwrap();
    let temps: Vec<Vec<u64>> = compiled
        .plan
        .buffers
        .iter()
        .filter(|b| b.kind == BufferKind::Temp)
        .map(|b| b.shape.iter().map(|d| d.eval(&|_| None).unwrap()).collect())
        .collect();
    assert_eq!(temps, [vec![2, 2, 3, 64]]);
}

#[test]
fn unequal_widths_keep_the_shared_layout_where_segments_do_not_apply() {
    // B operands of both layouts (no one shared tile), and a stored value computed from
    // two matmuls: every block computes every matmul's tile, as for prefill.
    for function in ["seg_mixed", "seg_shared"] {
        for m in [1, 9, 40] {
            let names = run(function, &[("M", m)]);
            assert!(uses_tensor_cores(&names), "{function}: {names:?}");
            assert!(
                !names.iter().any(|n| n.contains("_seg")),
                "{function}: {names:?}"
            );
        }
    }
}

#[test]
fn the_gemm_knobs_turn_segments_and_their_split_off() {
    // `kiln bench`'s KILN_TUNE_GEMM: the same q/k/v-like group with segments but no split
    // across blocks, and with the shared grid of the widest matmul (three B tiles a block).
    let module = lower("mma_gemm.kiln", SRC, None, None);
    for (segments, segment_splits, want) in [
        (
            true,
            true,
            "mma_gemm_16x32x128_w1x2x4_s3_seg_splitk4_x3_f32",
        ),
        (
            true,
            false,
            "mma_gemm_16x32x128_w1x2x4_s3_seg_x3_epilogue_bf16",
        ),
        (false, true, "mma_gemm_16x32x64_w1x2x2_s3_x3_epilogue_bf16"),
    ] {
        let options = Options {
            gemm: GemmTuning {
                segments,
                segment_splits,
                ..common::mma_options().gemm
            },
            ..common::mma_options()
        };
        let weights = BTreeMap::new();
        let func = module.function("seg_split").unwrap();
        let symbols = BTreeMap::from([("M".to_string(), 3)]);
        let inputs = inputs_for(func, &symbols, 1, 7);
        let compiled = check(&module, "seg_split", &inputs, &weights, &options);
        let names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
        assert!(
            names.iter().any(|n| n.ends_with(want)),
            "segments {segments}, splits {segment_splits}: {names:?}"
        );
    }
}

/// Runs `function` on both backends with `options`, returns the kernel names.
fn run_with(function: &str, symbols: &[(&str, usize)], options: &Options) -> Vec<String> {
    let module = lower("mma_gemm.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols: BTreeMap<String, usize> =
        symbols.iter().map(|(s, v)| (s.to_string(), *v)).collect();
    let inputs = inputs_for(func, &symbols, 1, 7);
    let weights = BTreeMap::new();
    let compiled = check(&module, function, &inputs, &weights, options);
    compiled.kernels.iter().map(|k| k.name.clone()).collect()
}

fn uses_fp8_tensor_cores(names: &[String]) -> bool {
    names
        .iter()
        .any(|n| n.contains("mma_gemm_e4m3") || n.contains("mma_gemm_e5m2"))
}

#[test]
fn fp8_scaled_matmuls_take_the_fp8_mma_with_scales_in_the_epilogue() {
    // Per-tensor scales, bf16 out, 37 x 53 x 96 (ragged M and N, three k32 steps of a
    // 64-wide slice and a half); per-channel scales ([M, 1] and [N]), f32 out; e5m2;
    // batch dims with a transposed batched weight; two fused matmuls sharing A.
    for (function, m) in [
        ("fp8_tensor", 37),
        ("fp8_tensor", 130),
        ("fp8_channel", 21),
        ("fp8_e5m2", 19),
        ("fp8_gate_up", 33),
    ] {
        let names = run(function, &[("M", m)]);
        assert!(uses_fp8_tensor_cores(&names), "{function}: {names:?}");
        assert!(
            names.iter().all(|n| !n.contains("pointwise")),
            "{function}: the casts and scales are fused: {names:?}"
        );
    }
    let names = run("fp8_batched", &[("B", 2), ("M", 9)]);
    assert!(uses_fp8_tensor_cores(&names), "{names:?}");
    // A decode shape: K = 2080 split over warps and across blocks (a sum kernel applies
    // the scales); a symbolic M also gets the decode variant.
    let names = run("fp8_decode", &[]);
    assert!(uses_fp8_tensor_cores(&names), "{names:?}");
    assert!(names.iter().any(|n| n.contains("splitk")), "{names:?}");
    let names = run("fp8_tensor", &[("M", 3)]);
    assert!(
        names.iter().any(|n| n.contains("mma_gemm_e4m3_16x32x256")),
        "{names:?}"
    );
}

#[test]
fn fp8_matmuls_the_fp8_mma_cannot_take_use_the_plain_template() {
    // A [K, N] FP8 B (no transposing 8-bit ldmatrix), K not a multiple of 16 (16-byte
    // copies), mixed FP8 dtypes; and any FP8 matmul when a target lacks the FP8 mma
    // (`fp8_tensor_cores` off, as the driver sets it for sm_80): still correct.
    for function in ["fp8_kn", "fp8_odd_k", "fp8_mixed"] {
        let names = run(function, &[("M", 11)]);
        assert!(!uses_tensor_cores(&names), "{function}: {names:?}");
        assert!(names.iter().any(|n| n.contains("matmul")), "{names:?}");
    }
    let options = Options {
        fp8_tensor_cores: false,
        ..common::mma_options()
    };
    for function in ["fp8_tensor", "fp8_channel"] {
        let names = run_with(function, &[("M", 37)], &options);
        assert!(!uses_tensor_cores(&names), "{function}: {names:?}");
    }
}

/// The prefill knobs of `GemmTuning` (block tile, warps, slice width, stages, rasterized
/// block order, double-buffered fragments, paired epilogue stores), each set forced on.
fn prefill_knob_sets() -> Vec<(GemmTuning, &'static str)> {
    let tuned = |tile, warps, bk, stages, raster, double_buffer| GemmTuning {
        tile,
        warps,
        bk,
        stages,
        raster,
        double_buffer,
        ..GemmTuning::default()
    };
    vec![
        // 8 warps of 64 x 64 over a 128 x 256 block, four 24 KiB stages (dynamic shared
        // memory).
        (
            GemmTuning {
                paired_epilogue: true,
                ..tuned((128, 256), (2, 4), 0, 0, 8, true)
            },
            "128x256x32_w2x4_s4_r8_db_p2",
        ),
        (
            tuned((256, 128), (4, 2), 0, 2, 2, false),
            "256x128x32_w4x2_s2_r2",
        ),
        // 64-wide slices (four k16 steps), 8 warps of 32 x 32.
        (
            GemmTuning {
                paired_epilogue: true,
                ..tuned((128, 64), (4, 2), 64, 0, 3, true)
            },
            "128x64x64_w4x2_s4_r3_db_p2",
        ),
        (
            tuned((128, 128), (2, 2), 64, 3, 0, true),
            "128x128x64_w2x2_s3_db",
        ),
        // Four 48 KiB stages: past the 99 KiB every target allows (`shared_kib`).
        (
            GemmTuning {
                shared_kib: 227,
                ..tuned((128, 256), (2, 4), 64, 0, 0, true)
            },
            "128x256x64_w2x4_s4_db",
        ),
        // The table's tile, rasterized and double-buffered; with four stages.
        (
            tuned((0, 0), (0, 0), 0, 0, 2, true),
            "128x128x32_w2x2_s3_r2_db",
        ),
        (
            tuned((0, 0), (0, 0), 0, 4, 0, true),
            "128x128x32_w2x2_s4_db",
        ),
    ]
}

#[test]
fn prefill_tile_knobs_match_the_interpreter_at_ragged_shapes() {
    // M of 300 (three 128-row block rows, the last ragged; two 256-row ones), N of 264
    // (two 256-wide block columns, the second 8 wide), K of 200 (seven 32-wide slices, the
    // last 8 wide; four 64-wide ones): fewer and more slices than stages, a rasterization
    // group cut short by the last block rows, both B layouts, f16, epilogues with a bias,
    // GELU and a residual, two fused matmuls and batch dims; and shapes of whole tiles.
    for (tuning, want) in prefill_knob_sets() {
        let options = Options {
            gemm: tuning,
            ..Options::default()
        };
        for (function, symbols) in [
            ("long_nk", vec![("M", 300)]),
            ("long_kn", vec![("M", 300)]),
            ("long_gate_up", vec![("M", 130)]),
            ("long_batched", vec![("B", 2), ("M", 140)]),
            ("bias_gelu", vec![("M", 130)]),
            // Whole tiles and slices: no bounds checks in the copies of the double buffer.
            ("exact_nk", vec![]),
            ("exact_kn", vec![]),
        ] {
            let names = run_both(function, &symbols, &options);
            let prefill: Vec<&String> = names
                .iter()
                .filter(|n| n.contains("mma_gemm") && !n.contains("mma_gemm_16x"))
                .collect();
            assert_eq!(prefill.len(), 1, "{function}: {names:?}");
            // Two fused matmuls narrow the tile to keep their accumulators in registers.
            if function != "long_gate_up" {
                assert!(prefill[0].contains(want), "{function}: {want}: {names:?}");
            }
        }
    }
}

#[test]
fn prefill_knobs_leave_decode_tiles_and_fp8_alone() {
    let (tuning, _) = prefill_knob_sets().remove(0);
    let options = Options {
        gemm: GemmTuning {
            mma_gemv: false,
            ..tuning
        },
        ..Options::default()
    };
    // Decode shapes (the tensor-core GEMV off) keep the split-K-warp tile and its split across blocks.
    let names = run_both("split5", &[], &options);
    assert!(
        names[0].ends_with("mma_gemm_16x32x128_w1x2x4_s3_splitk3_f32"),
        "{names:?}"
    );
    let names = run_both("long_nk", &[("M", 9)], &options);
    assert!(
        names
            .iter()
            .any(|n| n.contains("mma_gemm_16x32x128_w1x2x4_s3_")),
        "{names:?}"
    );
    // FP8 keeps its table tile (N of 53: 64 wide), with the block order and the double
    // buffer.
    let names = run_both("fp8_tensor", &[("M", 130)], &options);
    assert!(
        names
            .iter()
            .any(|n| n.contains("mma_gemm_e4m3_128x64x64_w2x2_s4_r8_db")),
        "{names:?}"
    );
    // An odd width (53) keeps the stores of single columns.
    let names = run_both("nk", &[("M", 130)], &options);
    assert!(
        names
            .iter()
            .any(|n| n.contains("mma_gemm_128x256x32_w2x4_s4_r8_db_bf16")),
        "{names:?}"
    );
    // A tile the template cannot run falls back to the table's.
    let options = Options {
        gemm: GemmTuning {
            tile: (96, 128),
            ..GemmTuning::default()
        },
        ..Options::default()
    };
    let names = run_both("long_nk", &[("M", 130)], &options);
    assert!(
        names
            .iter()
            .any(|n| n.contains("mma_gemm_128x128x32_w2x2_s3_")),
        "{names:?}"
    );
}

#[test]
fn gemm_knobs_parse_from_their_kiln_tune_names() {
    let mut tuning = GemmTuning::default();
    for (key, value) in [
        ("tile", "128x256"),
        ("warps", "2x4"),
        ("stages", "4"),
        ("raster", "8"),
        ("dbuf", "1"),
        ("pairs", "1"),
        ("bk", "64"),
        ("smem", "227"),
        ("maxsplits", "2"),
        ("mmagemv", "1"),
    ] {
        tuning.set(key, value).unwrap();
    }
    assert!(tuning.mma_gemv && !GemmTuning::default().mma_gemv);
    assert_eq!(
        (tuning.tile, tuning.warps, tuning.stages, tuning.raster),
        ((128, 256), (2, 4), 4, 8)
    );
    assert!(tuning.double_buffer && tuning.paired_epilogue);
    assert_eq!(
        (tuning.bk, tuning.max_splits, tuning.shared_kib),
        (64, 2, 227)
    );
    assert!(tuning.set("tile", "128").is_err());
    assert!(tuning.set("stages", "x").is_err());
    assert!(tuning.set("colour", "1").is_err());
}
