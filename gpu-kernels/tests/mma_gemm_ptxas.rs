//! The tensor-core GEMM kernels at LLM shapes (Llama-3-8B projections, a fused gate/up pair,
//! decode-sized M with and without the split of K across blocks and its sum kernel, f16,
//! the 1.1B Llama's q/k/v of unequal widths whose decode variant is a grid of segments)
//! assemble with ptxas for all five targets without spilling a register (ptxas's own `-v`
//! report). Without ptxas the test fails with the install command, unless
//! `KILN_ALLOW_NO_PTXAS=1`, when it says it was not run.

mod common;

use common::{export_launch, lower, param_shapes};
use kiln_gpu_kernels::Options;
use kiln_ptx::{emit_ptx, EmitOptions, Target};

const SRC: &str = "import nn
fn q_proj(x: bf16[T, 4096], w: bf16[4096, 4096]) -> bf16[T, 4096] { linear(x, w) }
fn down(x: bf16[T, 14336], w: bf16[4096, 14336], r: bf16[T, 4096]) -> bf16[T, 4096] { linear(x, w) + r }
fn gate_up(x: bf16[T, 4096], gate: bf16[14336, 4096], up: bf16[14336, 4096]) -> bf16[T, 14336] { silu(linear(x, gate)) * linear(x, up) }
fn decode(x: bf16[16, 4096], w: bf16[14336, 4096]) -> bf16[16, 14336] { linear(x, w) }
fn decode1(x: bf16[1, 4096], w: bf16[4096, 4096]) -> bf16[1, 4096] { linear(x, w) }
fn decode16_down(x: bf16[16, 14336], w: bf16[4096, 14336], r: bf16[16, 4096]) -> bf16[16, 4096] { linear(x, w) + r }
fn square(a: f16[4096, 4096], b: f16[4096, 4096]) -> f16[4096, 4096] { a @ b }
fn qkv_short_k(x: bf16[16, 512], q: bf16[2048, 512], k: bf16[512, 512], v: bf16[512, 512], b: bf16[512]) -> (bf16[16, 2048], bf16[16, 512], bf16[16, 512]) { (linear(x, q), linear(x, k), linear_bias(x, v, b)) }
fn qkv(x: bf16[T, 2048], q: bf16[2048, 2048], k: bf16[512, 2048], v: bf16[512, 2048]) -> (bf16[T, 2048], bf16[T, 512], bf16[T, 512]) { (linear(x, q), linear(x, k), linear(x, v)) }
";

#[test]
fn llm_shaped_gemms_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    let module = lower("llm_gemms.kiln", SRC, None, None);
    let mut kernels = Vec::new();
    let functions = [
        "q_proj",
        "down",
        "gate_up",
        "decode",
        "decode1",
        "decode16_down",
        "square",
        "qkv",
        "qkv_short_k",
    ];
    for function in functions {
        let compiled =
            kiln_gpu_kernels::compile_function(&module, function, &common::mma_options()).unwrap();
        let symbolic_rows = compiled.plan.symbols.iter().any(|s| s.name == "T");
        let gemms: Vec<_> = compiled
            .kernels
            .into_iter()
            .filter(|k| k.name.contains("mma_gemm") || k.name.contains("splitk"))
            .collect();
        let tensor_core = gemms.iter().filter(|k| k.name.contains("mma_gemm")).count();
        // A symbolic row count adds the decode-sized variant chosen at run time.
        assert_eq!(
            tensor_core,
            if symbolic_rows { 2 } else { 1 },
            "{function}: tensor-core kernels"
        );
        // 4096-wide decode GEMMs split K over blocks: a partial kernel and a sum kernel.
        let split = gemms.iter().filter(|k| k.name.contains("splitk")).count();
        let want_split = matches!(function, "decode1" | "decode16_down");
        if want_split {
            assert!(split > 0, "{function}: split K");
        } else if !symbolic_rows {
            assert_eq!(split, 0, "{function}: no split");
        }
        kernels.extend(gemms);
    }
    common::assert_assembles_without_spills(&toolchain, &kernels);
}

/// The prefill knobs of `GemmTuning` (`KILN_TUNE_GEMM`) at the bench shapes (4096³, 8192³,
/// 4096 × 14336 × 4096, a fused gate/up pair, f16 with a `[K, N]` B): every variant
/// assembles for all five targets without spills (registers printed with `--nocapture`);
/// the PTX of the 8-warp 128 × 256 kernel for sm_90a (dynamic shared memory, rasterized,
/// double-buffered, paired stores) is a reviewed snapshot.
#[test]
fn prefill_knob_gemms_assemble_for_every_target_without_spills() {
    use kiln_gpu_kernels::GemmTuning;
    let module = lower("llm_gemms.kiln", KNOB_SRC, None, None);
    let tuned = |tile, warps, bk, stages, raster, double_buffer| GemmTuning {
        tile,
        warps,
        bk,
        stages,
        raster,
        double_buffer,
        ..GemmTuning::default()
    };
    let mut kernels = Vec::new();
    for (tuning, want) in [
        (
            tuned((0, 0), (0, 0), 0, 0, 8, true),
            "128x128x32_w2x2_s3_r8_db",
        ),
        (
            tuned((128, 256), (2, 4), 0, 0, 8, true),
            "128x256x32_w2x4_s4_r8_db",
        ),
        (
            GemmTuning {
                paired_epilogue: true,
                ..tuned((128, 256), (2, 4), 0, 0, 8, true)
            },
            "128x256x32_w2x4_s4_r8_db_p2",
        ),
        (
            tuned((256, 128), (4, 2), 0, 0, 8, true),
            "256x128x32_w4x2_s4_r8_db",
        ),
        (
            tuned((128, 128), (2, 4), 0, 0, 8, true),
            "128x128x32_w2x4_s4_r8_db",
        ),
        (
            tuned((128, 128), (2, 4), 64, 0, 8, true),
            "128x128x64_w2x4_s3_r8_db",
        ),
        (
            tuned((128, 256), (2, 4), 0, 3, 8, false),
            "128x256x32_w2x4_s3_r8",
        ),
    ] {
        let options = Options {
            gemm: tuning,
            ..Options::default()
        };
        for function in ["square", "big", "gate_up_plain", "gate_up", "f16_kn"] {
            let compiled = kiln_gpu_kernels::compile_function(&module, function, &options).unwrap();
            let gemms: Vec<_> = compiled
                .kernels
                .into_iter()
                .filter(|k| k.name.contains("mma_gemm"))
                .collect();
            assert_eq!(gemms.len(), 1, "{function}");
            if function != "gate_up" {
                assert!(gemms[0].name.contains(want), "{}: {want}", gemms[0].name);
            }
            if !kernels
                .iter()
                .any(|k: &kiln_kir::Kernel| k.name == gemms[0].name)
            {
                kernels.extend(gemms);
            }
        }
    }
    let wide = kernels
        .iter()
        .find(|k| k.name == "k0_mma_gemm_128x256x32_w2x4_s4_r8_db_p2_bf16")
        .expect("the 128 x 256 kernel");
    let ptx = emit_ptx(
        std::slice::from_ref(wide),
        Target::Sm90a,
        &EmitOptions::default(),
    )
    .unwrap();
    assert!(ptx.contains(".extern .shared"), "dynamic shared memory");
    insta::assert_snapshot!("gemm_128x256_r8_db_p2_sm_90a", ptx);
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    common::assert_assembles_without_spills(&toolchain, &kernels);
    // Past 99 KiB (`smem=227`): for the targets with 227 KiB a block, sm_90a and sm_100a.
    let options = Options {
        gemm: GemmTuning {
            shared_kib: 227,
            ..tuned((128, 256), (2, 4), 64, 0, 8, true)
        },
        ..Options::default()
    };
    let compiled = kiln_gpu_kernels::compile_function(&module, "big", &options).unwrap();
    let wide: Vec<_> = compiled
        .kernels
        .into_iter()
        .filter(|k| k.name.contains("mma_gemm_128x256x64_w2x4_s4_r8_db"))
        .collect();
    assert_eq!(wide.len(), 1);
    common::assert_assembles_without_spills_for(
        &toolchain,
        &wide,
        &[Target::Sm90a, Target::Sm100a],
    );
}

const KNOB_SRC: &str = "import nn
fn square(a: bf16[4096, 4096], b: bf16[4096, 4096]) -> bf16[4096, 4096] { linear(a, b) }
fn big(a: bf16[8192, 8192], b: bf16[8192, 8192]) -> bf16[8192, 8192] { linear(a, b) }
fn gate_up_plain(x: bf16[4096, 4096], w: bf16[14336, 4096]) -> bf16[4096, 14336] { linear(x, w) }
fn gate_up(x: bf16[4096, 4096], gate: bf16[14336, 4096], up: bf16[14336, 4096]) -> bf16[4096, 14336] { silu(linear(x, gate)) * linear(x, up) }
fn f16_kn(a: f16[4096, 4096], b: f16[4096, 4096]) -> f16[4096, 4096] { a @ b }
";

const FP8_SRC: &str = "import nn
fn fp8_8192(a: f8e4m3[8192, 8192], b: f8e4m3[8192, 8192], sa: f32, sb: f32) -> bf16[8192, 8192] { bf16(scaled_mm(a, b, sa, sb)) }
fn fp8_channel(a: f8e4m3[T, 4096], b: f8e4m3[14336, 4096], sa: f32[T, 1], sb: f32[14336]) -> bf16[T, 14336] { bf16(scaled_mm(a, b, sa, sb)) }
fn fp8_decode1(a: f8e4m3[1, 4096], b: f8e4m3[4096, 4096], sa: f32, sb: f32) -> bf16[1, 4096] { bf16(scaled_mm(a, b, sa, sb)) }
";

/// The FP8 GEMMs (the 8192³ bench shape with per-tensor scales, per-channel scales with a
/// symbolic row count and its decode variant, a decode GEMM split across blocks) assemble
/// for every target with the FP8 mma (sm_89 and later) without spills; the PTX of the
/// 8192³ kernel for sm_89 is a reviewed snapshot.
#[test]
fn fp8_gemms_assemble_from_sm_89_without_spills() {
    let module = lower("fp8_gemms.kiln", FP8_SRC, None, None);
    let mut kernels = Vec::new();
    for function in ["fp8_8192", "fp8_channel", "fp8_decode1"] {
        let compiled =
            kiln_gpu_kernels::compile_function(&module, function, &common::mma_options()).unwrap();
        let gemms: Vec<_> = compiled
            .kernels
            .into_iter()
            .filter(|k| k.name.contains("mma_gemm") || k.name.contains("splitk"))
            .collect();
        assert!(
            gemms.iter().any(|k| k.name.contains("mma_gemm_e4m3")),
            "{function}: {:?}",
            gemms.iter().map(|k| &k.name).collect::<Vec<_>>()
        );
        if function == "fp8_8192" {
            assert_eq!(gemms.len(), 1);
            assert!(
                gemms[0].name.contains("mma_gemm_e4m3_128x128x64_w2x4_s3"),
                "{}",
                gemms[0].name
            );
            let ptx = emit_ptx(
                std::slice::from_ref(&gemms[0]),
                Target::Sm89,
                &EmitOptions::default(),
            )
            .unwrap();
            assert!(ptx.contains("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"));
            insta::assert_snapshot!("fp8_gemm_8192_sm_89", ptx);
        }
        kernels.extend(gemms);
    }
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    common::assert_assembles_without_spills_for(
        &toolchain,
        &kernels,
        &[Target::Sm89, Target::Sm90a, Target::Sm100a, Target::Sm120],
    );
}

/// The 8192³ FP8 GEMM with the prefill knobs that apply to FP8 (the rasterized block order
/// and the double-buffered fragments; its tile stays the table's) assembles from sm_89
/// without spills.
#[test]
fn fp8_gemm_with_the_block_order_and_double_buffer_assembles_without_spills() {
    let module = lower("fp8_gemms.kiln", FP8_SRC, None, None);
    let options = Options {
        gemm: kiln_gpu_kernels::GemmTuning {
            raster: 8,
            double_buffer: true,
            tile: (128, 256),
            warps: (2, 4),
            ..Default::default()
        },
        ..Options::default()
    };
    let compiled = kiln_gpu_kernels::compile_function(&module, "fp8_8192", &options).unwrap();
    let gemms: Vec<_> = compiled
        .kernels
        .into_iter()
        .filter(|k| k.name.contains("mma_gemm"))
        .collect();
    assert_eq!(gemms.len(), 1);
    assert!(
        gemms[0]
            .name
            .contains("mma_gemm_e4m3_128x128x64_w2x4_s3_r8_db"),
        "{}",
        gemms[0].name
    );
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    common::assert_assembles_without_spills_for(
        &toolchain,
        &gemms,
        &[Target::Sm89, Target::Sm90a, Target::Sm100a, Target::Sm120],
    );
}

/// Shapes for the GPU check: `(function, T)`.
const GPU_CASES: [(&str, u64); 15] = [
    ("small_nk", 37),
    ("small_kn", 130),
    ("q_proj", 4096),
    ("gate_up_plain", 4096),
    ("big", 8192),
    ("decode", 16),
    ("decode1", 1),
    ("decode16", 16),
    ("fp8_small", 37),
    ("fp8_8192", 8192),
    ("fp8_decode", 16),
    ("ragged", 1000),
    // The tensor-core GEMV (`mmagemv_` functions compile with `GemmTuning::mma_gemv` on):
    // the decode shapes of the bench at M = 16, and a ragged one (N not a multiple of 8, K
    // of 32) at a symbolic T of 11.
    ("mmagemv_4096", 16),
    ("mmagemv_14336", 16),
    ("mmagemv_ragged", 11),
];

const GPU_SRC: &str = "import nn
fn small_nk(x: bf16[T, 24], w: bf16[53, 24]) -> bf16[T, 53] { linear(x, w) }
fn small_kn(x: bf16[T, 72], w: bf16[72, 200]) -> bf16[T, 200] { x @ w }
fn q_proj(x: bf16[T, 4096], w: bf16[4096, 4096]) -> bf16[T, 4096] { linear(x, w) }
fn gate_up_plain(x: bf16[T, 4096], w: bf16[14336, 4096]) -> bf16[T, 14336] { linear(x, w) }
fn big(x: bf16[T, 8192], w: bf16[8192, 8192]) -> bf16[T, 8192] { linear(x, w) }
fn decode(x: bf16[16, 4096], w: bf16[14336, 4096]) -> bf16[16, 14336] { linear(x, w) }
fn decode1(x: bf16[1, 4096], w: bf16[4096, 4096]) -> bf16[1, 4096] { linear(x, w) }
fn decode16(x: bf16[16, 4096], w: bf16[4096, 4096]) -> bf16[16, 4096] { linear(x, w) }
fn fp8_small(x: f8e4m3[T, 96], w: f8e4m3[53, 96], sa: f32[T, 1], sb: f32[53]) -> bf16[T, 53] { bf16(scaled_mm(x, w, sa, sb)) }
fn fp8_8192(x: f8e4m3[T, 8192], w: f8e4m3[8192, 8192], sa: f32, sb: f32) -> bf16[T, 8192] { bf16(scaled_mm(x, w, sa, sb)) }
fn fp8_decode(x: f8e4m3[T, 4096], w: f8e4m3[4096, 4096], sa: f32, sb: f32[4096]) -> bf16[T, 4096] { bf16(scaled_mm(x, w, sa, sb)) }
fn ragged(x: bf16[T, 1032], w: bf16[1500, 1032]) -> bf16[T, 1500] { linear(x, w) }
fn mmagemv_4096(x: bf16[16, 4096], w: bf16[4096, 4096]) -> bf16[16, 4096] { linear(x, w) }
fn mmagemv_14336(x: bf16[16, 4096], w: bf16[14336, 4096]) -> bf16[16, 14336] { linear(x, w) }
fn mmagemv_ragged(x: bf16[T, 4104], w: bf16[4099, 4104]) -> bf16[T, 4099] { linear(x, w) }
";

/// Writes `$KILN_GEMM_CHECK_DIR/manifest.json` and one PTX file (sm_90a, JIT-capped) per
/// kernel launched, for `tools/gemm_gpu_check.py`, which runs each case's launches in order
/// on random data (a split-K case: the partial kernel, then the sum kernel, sharing a
/// workspace the script allocates) against PyTorch and times them beside `torch.matmul`
/// (FP8 cases: `scaled_mm` beside `torch._scaled_mm`). `KILN_TUNE_GEMM` (as `kiln bench`
/// reads it) sets the GEMM knobs of the exported kernels, so that each variant can be
/// checked on the GPU. An explicit `wgmma=1` exports what an sm_90a-only build compiles
/// (`Options::wgmma`, and 227 KiB of shared memory unless `smem` says otherwise): the
/// prefill cases (4096³, 8192³, the ragged 1000 × 1500 × 1032) take the `wgmma` template.
#[test]
#[ignore = "writes a GPU check to $KILN_GEMM_CHECK_DIR; run tools/gemm_gpu_check.py on a GPU"]
fn export_gemm_gpu_check() {
    use kiln_kir::Step;
    let dir = std::path::PathBuf::from(
        std::env::var_os("KILN_GEMM_CHECK_DIR").expect("set KILN_GEMM_CHECK_DIR"),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let module = lower("gemm_check.kiln", GPU_SRC, None, None);
    let mut options = common::mma_options();
    for item in std::env::var("KILN_TUNE_GEMM")
        .unwrap_or_default()
        .split(',')
    {
        if let Some((key, value)) = item.trim().split_once('=') {
            options.gemm.set(key, value).unwrap();
            if key == "wgmma" && value == "1" {
                options.wgmma = true;
            }
        }
    }
    if options.wgmma && options.gemm.shared_kib == 0 {
        options.gemm.shared_kib = 227;
    }
    let mut cases = Vec::new();
    for (function, t) in GPU_CASES {
        let mut options = options.clone();
        options.gemm.mma_gemv |= function.starts_with("mmagemv_");
        let compiled = kiln_gpu_kernels::compile_function(&module, function, &options).unwrap();
        let symbols = |s: &str| (s == "T").then_some(t);
        let mut launches = Vec::new();
        // The branch of a decode-variant choice that runs at this T.
        let steps: Vec<&Step> = compiled
            .plan
            .steps
            .iter()
            .flat_map(|step| match step {
                Step::BySize {
                    at_most,
                    small,
                    large,
                    ..
                } => (if t <= *at_most { small } else { large }).iter().collect(),
                other => vec![other],
            })
            .collect();
        for (n, step) in steps.into_iter().enumerate() {
            let Step::Launch { kernel, args } = step else {
                panic!("{function}: a step that is not a launch");
            };
            let kernel = &compiled.kernels[*kernel];
            let file = format!("{function}_{n}.ptx");
            launches.push(export_launch(
                &dir, &file, &compiled, kernel, args, &symbols,
            ));
        }
        let shapes = param_shapes(&module, function, t);
        cases.push(serde_json::json!({
            "function": function,
            "launches": launches,
            "T": t,
            "inputs": shapes,
            // x @ w for [K, N] weights, linear (x @ w.T) for [N, K] ones.
            "transposed_weight": !function.ends_with("_kn"),
            // f8e4m3 x and w, then the scales of x's rows and w's rows (0-d: per tensor).
            "fp8": function.starts_with("fp8"),
        }));
    }
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "cases": cases })).unwrap(),
    )
    .unwrap();
}
