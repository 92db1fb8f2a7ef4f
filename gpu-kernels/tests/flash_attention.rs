//! The tensor-core attention prefill template (`flash_attention.rs`) against the graph
//! interpreter at small ragged shapes, through the kir interpreter (`check`) and the
//! Cranelift backend: causal and not, GQA, head dims 64 and 128, bf16 and f16, query and
//! key counts that are not multiples of the 64-row tiles, key counts unlike the query
//! count, a general mask (`attention_padded`), q/k/v read through reshapes, a q computed in
//! the kernel (RoPE; the RoPE'd k gets a buffer of its own), 64-bit indices, scores large
//! enough that the running maximum moves far across key tiles (against the reference
//! template: the graph interpreter rounds each dot product to bf16); and the reference
//! template for what the new one does not take (f32, head dim 32, k and v read through
//! slices, tensor cores switched off). The stdlib pattern and `paged_attention` never reach it (their
//! tests: attention_pattern.rs, kernels.rs). The block shapes of two m16 row tiles a warp
//! (`AttentionTuning::m_tiles`) at the same shapes, their shared memory, PTX snapshot and
//! ptxas reports.
//!
//! Tolerance: that of `common::tolerance` (2e-2 relative for bf16/f16: the kernel rounds
//! the probabilities before normalizing, the interpreter after). A PTX snapshot of the
//! causal B4 H32 S4096 D128 kernel; ptxas for every target without spills.

mod common;

use common::{check, export_launch, inputs_for, lower, param_shapes, rel_err, tolerance};
use kiln_gpu_kernels::{AttentionTuning, Options};
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn causal(q: bf16[B, S, 8, 64], k: bf16[B, S, 2, 64], v: bf16[B, S, 2, 64]) -> bf16[B, S, 8, 64] { attention(q, k, v, causal: true) }
fn full(q: bf16[B, S, 4, 64], k: bf16[B, S, 4, 64], v: bf16[B, S, 4, 64]) -> bf16[B, S, 4, 64] { attention(q, k, v, causal: false) }
fn causal128(q: f16[B, S, 4, 128], k: f16[B, S, 1, 128], v: f16[B, S, 1, 128]) -> f16[B, S, 4, 128] { attention(q, k, v, causal: true) }
fn full128(q: bf16[B, S, 2, 128], k: bf16[B, T, 2, 128], v: bf16[B, T, 2, 128]) -> bf16[B, S, 2, 128] { attention_core(q, k, v, true) }
fn half_full(q: f16[B, S, 4, 64], k: f16[B, T, 2, 64], v: f16[B, T, 2, 64]) -> f16[B, S, 4, 64] { attention_core(q, k, v, true) }
fn padded(q: bf16[B, S, 4, 64], k: bf16[B, T, 2, 64], v: bf16[B, T, 2, 64], keep: bool[B, T]) -> bf16[B, S, 4, 64] { attention_padded(q, k, v, keep) }
fn viewed(x: bf16[B, S, 256], kv: bf16[B, S, 128]) -> bf16[B, S, 4, 64] { attention(x.view(B, S, 4, 64), kv.view(B, S, 2, 64), kv.view(B, S, 2, 64), causal: true) }
fn wide32(q: bf16[B, S, 4, 32], k: bf16[B, S, 4, 32], v: bf16[B, S, 4, 32]) -> bf16[B, S, 4, 32] { attention(q, k, v, causal: true) }
fn single(q: f32[B, S, 2, 64], k: f32[B, S, 2, 64], v: f32[B, S, 2, 64]) -> f32[B, S, 2, 64] { attention(q, k, v, causal: true) }
fn scaled_q(q: bf16[B, S, 2, 64], k: bf16[B, S, 2, 64], v: bf16[B, S, 2, 64]) -> bf16[B, S, 2, 64] { attention(q * 0.5, k, v, causal: true) }
fn roped(q: bf16[B, S, 4, 128], k: bf16[B, S, 2, 128], v: bf16[B, S, 2, 128]) -> bf16[B, S, 4, 128] {
    let pos = arange(S)
    attention(rope(q, pos, 10000.0), rope(k, pos, 10000.0), v, causal: true)
}
fn sliced(qkv: bf16[B, S, 3, 2, 64]) -> bf16[B, S, 2, 64] { attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal: true) }
";

/// Checks `function` at the given symbol values on the kir interpreter and on Cranelift
/// with `options`; returns the kernel names.
fn run_with(function: &str, symbols: &[(&str, usize)], options: &Options) -> Vec<String> {
    let module = lower("flash_attention.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols: BTreeMap<String, usize> =
        symbols.iter().map(|(s, v)| (s.to_string(), *v)).collect();
    let mut inputs = inputs_for(func, &symbols, 1, 11);
    if function == "padded" {
        // Keep at least the first key of every sequence (a row with no key is NaN).
        let keep = inputs.last_mut().unwrap();
        let t = keep.shape[1];
        let values: Vec<bool> = (0..keep.numel())
            .map(|i| i % t == 0 || i % 3 != 1)
            .collect();
        *keep = kiln_ir::Tensor::from_bool(&keep.shape.clone(), values);
    }
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

fn run(function: &str, symbols: &[(&str, usize)]) -> Vec<String> {
    run_with(function, symbols, &Options::default())
}

fn flash(names: &[String], variant: &str) -> bool {
    names
        .iter()
        .any(|n| n.contains("flash_attention") && n.contains(variant))
}

#[test]
fn causal_gqa_d64_with_ragged_query_tiles() {
    // 2 sequences of 70 tokens: a full and a 6-row query tile, the diagonal tiles masked,
    // 4 query heads per key/value head.
    let names = run("causal", &[("B", 2), ("S", 70)]);
    assert!(flash(&names, "_d64_causal"), "{names:?}");
}

#[test]
fn causal_over_several_key_tiles() {
    // 150 tokens: three query tiles, the last one visits three key tiles, the first one.
    let names = run("causal", &[("B", 1), ("S", 150)]);
    assert!(flash(&names, "_d64_causal"), "{names:?}");
}

#[test]
fn large_scores_rescale_the_running_sums_across_tiles() {
    // Scores of tens: the row maximum moves between key tiles by far more than exp's
    // range. The graph interpreter rounds each dot product to bf16 first (the unfused
    // composition), which moves such scores by more than the tolerance; both templates
    // keep it in f32, so the tensor-core kernel is compared with the reference one.
    let module = lower("flash_attention.kiln", SRC, None, None);
    let func = module.function("causal").unwrap();
    let symbols = BTreeMap::from([("B".to_string(), 2), ("S".to_string(), 150)]);
    let mut inputs = inputs_for(func, &symbols, 1, 5);
    let q = &inputs[0];
    let sharp: Vec<f32> = q.to_f32_vec().iter().map(|x| x * 40.0).collect();
    inputs[0] = kiln_ir::Tensor::from_f32(&q.shape.clone(), sharp).cast(q.dtype);
    let outputs = |tensor_cores: bool| {
        let options = Options {
            tensor_cores,
            ..Options::default()
        };
        let compiled = kiln_gpu_kernels::compile_function(&module, "causal", &options).unwrap();
        let names: Vec<String> = compiled.kernels.iter().map(|k| k.name.clone()).collect();
        assert_eq!(flash(&names, "_d64_causal"), tensor_cores, "{names:?}");
        let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
        cpu.run(&compiled.plan, &inputs, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (flash_out, reference) = (outputs(true), outputs(false));
    let err = rel_err(&flash_out[0], &reference[0]);
    assert!(
        err <= tolerance(reference[0].dtype),
        "relative error {err:e}"
    );
}

#[test]
fn sixty_four_bit_indices() {
    let options = Options {
        index_width: kiln_gpu_kernels::IndexWidth::I64,
        ..Options::default()
    };
    let names = run_with("causal", &[("B", 2), ("S", 70)], &options);
    assert!(flash(&names, "_d64_causal"), "{names:?}");
    let names = run_with("padded", &[("B", 1), ("S", 20), ("T", 65)], &options);
    assert!(flash(&names, "_d64_masked"), "{names:?}");
}

#[test]
fn not_causal_without_gqa() {
    let names = run("full", &[("B", 1), ("S", 100)]);
    assert!(
        names
            .iter()
            .any(|n| n.contains("flash_attention_128x64x2_m2_d64_bf16")),
        "{names:?}"
    );
}

#[test]
fn causal_d128_f16_gqa() {
    let names = run("causal128", &[("B", 1), ("S", 77)]);
    assert!(flash(&names, "_d128_causal"), "{names:?}");
}

#[test]
fn more_keys_than_queries_d128() {
    // 20 queries over 130 keys: three key tiles, the last of 2 keys.
    let names = run("full128", &[("B", 2), ("S", 20), ("T", 130)]);
    assert!(flash(&names, "_d128"), "{names:?}");
}

#[test]
fn fewer_keys_than_queries_f16() {
    let names = run("half_full", &[("B", 1), ("S", 90), ("T", 9)]);
    assert!(flash(&names, "_d64"), "{names:?}");
}

#[test]
fn a_general_mask_is_evaluated_per_score() {
    let names = run("padded", &[("B", 2), ("S", 33), ("T", 71)]);
    assert!(flash(&names, "_d64_masked"), "{names:?}");
}

#[test]
fn operands_read_through_reshapes() {
    let names = run("viewed", &[("B", 1), ("S", 65)]);
    assert!(flash(&names, "_d64_causal"), "{names:?}");
}

#[test]
fn a_computed_q_is_staged_through_registers() {
    // q * 0.5 in the kernel; RoPE'd q in the kernel and RoPE'd k in a buffer of its own.
    let names = run("scaled_q", &[("B", 1), ("S", 70)]);
    assert!(flash(&names, "_d64_causal"), "{names:?}");
    let names = run("roped", &[("B", 2), ("S", 67)]);
    assert!(flash(&names, "_d128_causal"), "{names:?}");
    assert!(names.iter().any(|n| n.contains("pointwise_k")), "{names:?}");
}

#[test]
fn what_the_template_does_not_take_goes_to_the_reference_template() {
    // Head dim 32, f32, k and v read through slices.
    for function in ["wide32", "single", "sliced"] {
        let names = run(function, &[("B", 1), ("S", 40)]);
        assert!(!flash(&names, ""), "{function}: {names:?}");
        assert!(
            names.iter().any(|n| n.contains("attention")),
            "{function}: {names:?}"
        );
    }
    // Tensor cores switched off.
    let options = Options {
        tensor_cores: false,
        ..Options::default()
    };
    let names = run_with("causal", &[("B", 1), ("S", 40)], &options);
    assert!(!flash(&names, ""), "{names:?}");
}

/// The prefill benchmark's shapes (B4 H32 S4096 D128, causal and not), the head dim 64,
/// f16, GQA and a general mask.
const LLM_SRC: &str = "import nn
fn prefill_causal(q: bf16[4, 4096, 32, 128], k: bf16[4, 4096, 32, 128], v: bf16[4, 4096, 32, 128]) -> bf16[4, 4096, 32, 128] { attention(q, k, v, causal: true) }
fn prefill(q: bf16[4, 4096, 32, 128], k: bf16[4, 4096, 32, 128], v: bf16[4, 4096, 32, 128]) -> bf16[4, 4096, 32, 128] { attention(q, k, v, causal: false) }
fn gqa64(q: f16[B, S, 32, 64], k: f16[B, S, 8, 64], v: f16[B, S, 8, 64]) -> f16[B, S, 32, 64] { attention(q, k, v, causal: true) }
fn padded(q: bf16[B, S, 32, 128], k: bf16[B, S, 8, 128], v: bf16[B, S, 8, 128], keep: i32[B, S]) -> bf16[B, S, 32, 128] { attention_padded(q, k, v, keep) }
";

fn flash_kernels(functions: &[&str]) -> Vec<kiln_kir::Kernel> {
    flash_kernels_with(functions, &Options::default())
}

fn flash_kernels_with(functions: &[&str], options: &Options) -> Vec<kiln_kir::Kernel> {
    let module = lower("flash_llm.kiln", LLM_SRC, None, None);
    let mut kernels = Vec::new();
    for function in functions {
        let compiled = kiln_gpu_kernels::compile_function(&module, function, options).unwrap();
        let flash: Vec<_> = compiled
            .kernels
            .into_iter()
            .filter(|k| k.name.contains("flash_attention"))
            .collect();
        assert_eq!(flash.len(), 1, "{function}");
        kernels.extend(flash);
    }
    kernels
}

#[test]
fn the_causal_prefill_kernel_snapshot() {
    // The default: 4 warps of two m16 row tiles, one stage at D 128 (FlashAttention-2's
    // block).
    let kernels = flash_kernels(&["prefill_causal"]);
    assert!(kernels[0]
        .name
        .contains("flash_attention_128x64_m2_d128_causal"));
    let ptx = kiln_ptx::emit_ptx(&kernels, kiln_ptx::Target::Sm90a, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    insta::assert_snapshot!(ptx);
}

/// The block shapes of one m16 row tile a warp (warps, stages; the default has two).
const OTHER_SHAPES: [(u32, u32); 4] = [(4, 1), (4, 2), (8, 1), (8, 2)];

fn with_shape(warps: u32, stages: u32) -> Options {
    with_tiles(warps, stages, 1)
}

fn with_tiles(warps: u32, stages: u32, m_tiles: u32) -> Options {
    Options {
        attention: AttentionTuning {
            warps,
            stages,
            m_tiles,
        },
        ..Options::default()
    }
}

#[test]
fn every_block_shape_matches_the_interpreter() {
    // Ragged query and key tiles, causal (two or three query tiles, the diagonal tiles
    // masked), more keys than queries at D 128, GQA, a general mask and a computed q.
    for (warps, stages) in OTHER_SHAPES {
        let options = with_shape(warps, stages);
        let shape = format!(
            "flash_attention_{}x64{}_d",
            16 * warps,
            if stages == 2 { "x2" } else { "" }
        );
        let names = run_with("causal", &[("B", 1), ("S", 150)], &options);
        assert!(flash(&names, &format!("{shape}64_causal")), "{names:?}");
        let names = run_with("full128", &[("B", 1), ("S", 20), ("T", 130)], &options);
        assert!(flash(&names, &format!("{shape}128")), "{names:?}");
        let names = run_with("padded", &[("B", 1), ("S", 33), ("T", 71)], &options);
        assert!(flash(&names, &format!("{shape}64_masked")), "{names:?}");
        let names = run_with("roped", &[("B", 1), ("S", 67)], &options);
        assert!(flash(&names, &format!("{shape}128_causal")), "{names:?}");
    }
}

#[test]
fn shared_memory_per_block_shape() {
    // D 128: Q tile of 16 rows a warp, K and V tiles of 64 rows a stage, 256 bytes a row.
    // Beyond 48 KiB the arrays take the dynamic window; 96 KiB fits every target.
    for (warps, stages, bytes, dynamic) in [
        (4, 1, 48 * 1024, 0),
        (4, 2, 80 * 1024, 80 * 1024),
        (8, 1, 64 * 1024, 64 * 1024),
        (8, 2, 96 * 1024, 96 * 1024),
    ] {
        let kernels = flash_kernels_with(&["prefill_causal"], &with_shape(warps, stages));
        let info = kiln_kir::KernelInfo::of(&kernels[0]);
        assert_eq!(info.block_dim, 32 * warps);
        assert_eq!(info.shared_bytes, bytes, "{warps} warps, {stages} stages");
        assert_eq!(
            info.dynamic_shared_bytes, dynamic,
            "{warps} warps, {stages} stages"
        );
    }
    assert_eq!(
        Options::default().attention,
        AttentionTuning {
            warps: 4,
            stages: 2,
            m_tiles: 2
        }
    );
}

#[test]
fn the_causal_prefill_kernel_of_4_warps_and_1_stage_snapshot() {
    // The 48 KiB design of static shared memory.
    let kernels = flash_kernels_with(&["prefill_causal"], &with_shape(4, 1));
    let ptx = kiln_ptx::emit_ptx(&kernels, kiln_ptx::Target::Sm90a, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    insta::assert_snapshot!(ptx);
}

#[test]
fn other_block_shapes_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    for (warps, stages) in OTHER_SHAPES {
        let kernels = flash_kernels_with(&["prefill_causal", "gqa64"], &with_shape(warps, stages));
        let registers = common::assert_assembles_without_spills(&toolchain, &kernels);
        assert_eq!(registers.len(), 5 * kernels.len());
    }
}

#[test]
fn prefill_kernels_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    let kernels = flash_kernels(&["prefill_causal", "prefill", "gqa64", "padded"]);
    let registers = common::assert_assembles_without_spills(&toolchain, &kernels);
    assert_eq!(registers.len(), 5 * kernels.len());
}

/// Cases of the GPU check: the prefill benchmark's shapes, GQA at a ragged length, head
/// dim 64 in f16 with more keys than queries.
const GPU_SRC: &str = "import nn
fn prefill_causal(q: bf16[4, 4096, 32, 128], k: bf16[4, 4096, 32, 128], v: bf16[4, 4096, 32, 128]) -> bf16[4, 4096, 32, 128] { attention(q, k, v, causal: true) }
fn prefill(q: bf16[4, 4096, 32, 128], k: bf16[4, 4096, 32, 128], v: bf16[4, 4096, 32, 128]) -> bf16[4, 4096, 32, 128] { attention(q, k, v, causal: false) }
fn gqa_ragged(q: bf16[2, 1000, 32, 128], k: bf16[2, 1000, 8, 128], v: bf16[2, 1000, 8, 128]) -> bf16[2, 1000, 32, 128] { attention(q, k, v, causal: true) }
fn d64_f16(q: f16[3, 333, 16, 64], k: f16[3, 777, 16, 64], v: f16[3, 777, 16, 64]) -> f16[3, 333, 16, 64] { attention_core(q, k, v, true) }
";

/// The block shape of `KILN_TUNE_ATTENTION` (`warps=N,stages=N,mtiles=N`, as `kiln bench`
/// reads it), else the default.
fn tuning_from_env() -> Options {
    let mut options = Options::default();
    if let Ok(spec) = std::env::var("KILN_TUNE_ATTENTION") {
        for item in spec.split(',').filter(|s| !s.trim().is_empty()) {
            let (key, value) = item.trim().split_once('=').expect("KEY=N");
            let n: u32 = value.parse().expect("a number");
            match key {
                "warps" => options.attention.warps = n,
                "stages" => options.attention.stages = n,
                "mtiles" => options.attention.m_tiles = n,
                _ => panic!("KILN_TUNE_ATTENTION: unknown key `{key}` (warps, stages, mtiles)"),
            }
        }
    }
    options
}

/// Writes `$KILN_FLASH_CHECK_DIR/manifest.json` and one PTX file (sm_90a, JIT-capped) per
/// case for `tools/flash_gpu_check.py`, which runs each kernel on random data against
/// PyTorch's `scaled_dot_product_attention` and times both. `KILN_TUNE_ATTENTION` picks
/// another block shape (`warps=4,stages=1`); beside its cases, those of the other row
/// tiles a warp: `*_m1` (one tile, 8 warps) for a tuning of two tiles (the default),
/// `*_m2` (two tiles, 4 warps) for one of one tile.
#[test]
#[ignore = "writes a GPU check to $KILN_FLASH_CHECK_DIR; run tools/flash_gpu_check.py on a GPU"]
fn export_flash_gpu_check() {
    use kiln_kir::Step;
    let dir = std::path::PathBuf::from(
        std::env::var_os("KILN_FLASH_CHECK_DIR").expect("set KILN_FLASH_CHECK_DIR"),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let module = lower("flash_check.kiln", GPU_SRC, None, None);
    let options = tuning_from_env();
    // Beside the tuning's kernels, those of the other row tiles a warp (the one-tile
    // design in 8 warps, the two-tile one in 4), side by side in one run.
    let (warps, m_tiles, suffix) = match options.attention.m_tiles {
        2 => (8, 1, "_m1"),
        _ => (4, 2, "_m2"),
    };
    let attention = AttentionTuning {
        warps,
        m_tiles,
        ..options.attention
    };
    let other = Options {
        attention,
        ..options.clone()
    };
    let variants = [(options, ""), (other, suffix)];
    let mut cases = Vec::new();
    for ((options, suffix), function) in variants.iter().flat_map(|v| {
        ["prefill_causal", "prefill", "gqa_ragged", "d64_f16"]
            .into_iter()
            .map(move |f| (v, f))
    }) {
        let compiled = kiln_gpu_kernels::compile_function(&module, function, options).unwrap();
        let [Step::Launch { kernel, args }] = &compiled.plan.steps[..] else {
            panic!("{function}: one launch expected");
        };
        let kernel = &compiled.kernels[*kernel];
        assert!(kernel.name.contains("flash_attention"), "{}", kernel.name);
        let file = format!("{function}{suffix}.ptx");
        let mut case = export_launch(&dir, &file, &compiled, kernel, args, &|_| None);
        let func = module.function(function).unwrap();
        let extra = serde_json::json!({
            "function": format!("{function}{suffix}"),
            "shared_bytes": kernel.shared.iter().map(|s| s.len as usize * s.dtype.size_bytes()).sum::<usize>(),
            "dynamic_shared_bytes": kiln_kir::KernelInfo::of(kernel).dynamic_shared_bytes,
            "inputs": param_shapes(&module, function, 0),
            "dtype": func.ty(func.params()[0]).dtype.name(),
            "causal": kernel.name.contains("_causal"),
        });
        case.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        cases.push(case);
    }
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "cases": cases })).unwrap(),
    )
    .unwrap();
}

/// Block shapes of two m16 row tiles a warp (warps, stages; at D 128 they take one stage).
const TWO_TILE_SHAPES: [(u32, u32); 4] = [(4, 2), (4, 1), (8, 1), (8, 2)];

#[test]
fn two_row_tiles_a_warp_match_the_interpreter() {
    // Ragged query and key counts against 128- and 256-row blocks: causal GQA with the
    // diagonal tile inside the block (a warp's second tile past its first), a key count
    // unlike the query count at D 128 and f16, fewer keys than queries, a general mask, a
    // computed q and 64-bit indices.
    for (warps, stages) in TWO_TILE_SHAPES {
        let options = with_tiles(warps, stages, 2);
        let rows = 32 * warps;
        let x2 = if stages == 2 { "x2" } else { "" };
        let d64 = format!("flash_attention_{rows}x64{x2}_m2_d64");
        let d128 = format!("flash_attention_{rows}x64_m2_d128");
        for s in [70, 150, 300] {
            let names = run_with("causal", &[("B", 2), ("S", s)], &options);
            assert!(flash(&names, &format!("{d64}_causal")), "{names:?}");
        }
        let names = run_with("causal128", &[("B", 1), ("S", 177)], &options);
        assert!(flash(&names, &format!("{d128}_causal")), "{names:?}");
        let names = run_with("full128", &[("B", 2), ("S", 20), ("T", 130)], &options);
        assert!(flash(&names, &format!("{d128}_bf16")), "{names:?}");
        let names = run_with("full", &[("B", 1), ("S", 140)], &options);
        assert!(flash(&names, &format!("{d64}_bf16")), "{names:?}");
        let names = run_with("half_full", &[("B", 1), ("S", 90), ("T", 9)], &options);
        assert!(flash(&names, &d64), "{names:?}");
        let names = run_with("padded", &[("B", 2), ("S", 33), ("T", 71)], &options);
        assert!(flash(&names, &format!("{d64}_masked")), "{names:?}");
        let names = run_with("roped", &[("B", 1), ("S", 67)], &options);
        assert!(flash(&names, &format!("{d128}_causal")), "{names:?}");
    }
    let options = Options {
        index_width: kiln_gpu_kernels::IndexWidth::I64,
        ..with_tiles(4, 2, 2)
    };
    let names = run_with("causal", &[("B", 2), ("S", 70)], &options);
    assert!(flash(&names, "_m2_d64_causal"), "{names:?}");
}

#[test]
fn two_row_tiles_a_warp_rescale_large_scores_like_the_reference() {
    // As `large_scores_rescale_the_running_sums_across_tiles`, the row maxima moving far
    // across key tiles in both of a warp's row tiles.
    let module = lower("flash_attention.kiln", SRC, None, None);
    let func = module.function("causal").unwrap();
    let symbols = BTreeMap::from([("B".to_string(), 1), ("S".to_string(), 200)]);
    let mut inputs = inputs_for(func, &symbols, 1, 5);
    let q = &inputs[0];
    let sharp: Vec<f32> = q.to_f32_vec().iter().map(|x| x * 40.0).collect();
    inputs[0] = kiln_ir::Tensor::from_f32(&q.shape.clone(), sharp).cast(q.dtype);
    let outputs = |tensor_cores: bool| {
        let options = Options {
            tensor_cores,
            ..with_tiles(4, 2, 2)
        };
        let compiled = kiln_gpu_kernels::compile_function(&module, "causal", &options).unwrap();
        let names: Vec<String> = compiled.kernels.iter().map(|k| k.name.clone()).collect();
        assert_eq!(flash(&names, "_m2_d64_causal"), tensor_cores, "{names:?}");
        let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
        cpu.run(&compiled.plan, &inputs, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (flash_out, reference) = (outputs(true), outputs(false));
    let err = rel_err(&flash_out[0], &reference[0]);
    assert!(
        err <= tolerance(reference[0].dtype),
        "relative error {err:e}"
    );
}

#[test]
fn shared_memory_of_two_row_tiles_a_warp() {
    // D 128: a Q tile of 32 rows a warp and one K/V stage whatever the tuning asks
    // (64 KiB at 4 warps, 96 KiB at 8); a general mask at D 128 keeps one row tile.
    for (warps, stages) in TWO_TILE_SHAPES {
        let options = with_tiles(warps, stages, 2);
        let kernels = flash_kernels_with(&["prefill_causal", "padded"], &options);
        let bytes = u64::from(32 * warps + 2 * 64) * 128 * 2;
        let info = kiln_kir::KernelInfo::of(&kernels[0]);
        assert!(
            kernels[0].name.contains("x64_m2_d128_causal"),
            "{}",
            kernels[0].name
        );
        assert_eq!(info.block_dim, 32 * warps);
        assert_eq!(info.shared_bytes, bytes, "{warps} warps, {stages} stages");
        assert_eq!(info.dynamic_shared_bytes, bytes);
        assert!(!kernels[1].name.contains("_m2"), "{}", kernels[1].name);
    }
}

#[test]
fn the_causal_prefill_kernel_of_one_row_tile_a_warp_snapshot() {
    // 8 warps of 16 query rows, Q fragments in registers and two stages.
    let kernels = flash_kernels_with(&["prefill_causal"], &with_tiles(8, 2, 1));
    assert!(kernels[0]
        .name
        .contains("flash_attention_128x64x2_d128_causal"));
    let ptx = kiln_ptx::emit_ptx(&kernels, kiln_ptx::Target::Sm90a, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    insta::assert_snapshot!(ptx);
}

#[test]
fn two_row_tiles_a_warp_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    for (warps, stages) in TWO_TILE_SHAPES {
        let kernels = flash_kernels_with(
            &["prefill_causal", "prefill", "gqa64", "padded"],
            &with_tiles(warps, stages, 2),
        );
        let registers = common::assert_assembles_without_spills(&toolchain, &kernels);
        assert_eq!(registers.len(), 5 * kernels.len());
    }
}
