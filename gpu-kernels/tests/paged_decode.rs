//! The paged decode attention template (`templates/paged_decode.rs`): the staged
//! long-context design (key/value tiles through shared memory by `cp.async`) run by the
//! kernel-IR interpreter against the graph interpreter — GQA and MHA, f32 and bf16, ragged
//! contexts that end inside a tile, partitions past the context, a padding token, tiles
//! that cross cache blocks; a PTX snapshot of the benchmark's partial kernel (GQA 32/8,
//! D 128, bf16); ptxas for every target without spills, both designs. The tensor-core
//! staged design (the default of the long-context kernel): GQA, MHA and groups up to 16,
//! head dims 64 and 128, bf16 and f16, against the interpreter; where it does not apply
//! the register design runs; its PTX snapshot and ptxas reports.

mod common;

use common::{check, lower};
use kiln_gpu_kernels::{Options, PagedTuning};
use kiln_ir::{DType, Tensor};
use std::collections::BTreeMap;

/// The partial kernels of a compiled function.
fn partials(kernels: &[kiln_kir::Kernel]) -> Vec<&kiln_kir::Kernel> {
    kernels
        .iter()
        .filter(|k| k.name.contains("paged_attention_partial"))
        .collect()
}

fn staged(kernel: &kiln_kir::Kernel) -> bool {
    kernel.shared.iter().any(|s| s.name == "k_tiles")
}

/// Whether the kernel scores on the tensor cores.
fn on_tensor_cores(kernel: &kiln_kir::Kernel) -> bool {
    format!("{:?}", kernel.body).contains("Mma {")
}

/// Runs `attend` (q heads `heads`, key/value heads `kv`, head dim `d`, blocks of `bs`
/// tokens) on four tokens of three sequences and a padding token through the plan, for
/// `tuning`, and returns the plan's partial kernel.
fn partial(
    dtype: &str,
    heads: usize,
    kv: usize,
    d: usize,
    bs: usize,
    tuning: PagedTuning,
) -> kiln_kir::Kernel {
    let src = format!(
        "import nn\n\
         fn attend(q: {dtype}[N, {heads}, {d}], k_cache: {dtype}[2, 12, {bs}, {kv}, {d}], \
         v_cache: {dtype}[2, 12, {bs}, {kv}, {d}], block_tables: i32[3, 6], seq: i32[N], \
         pos: i32[N]) -> {dtype}[N, {heads}, {d}] {{\n\
         paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 1)\n}}\n"
    );
    let module = lower("paged.kiln", &src, None, None);
    let mut rng = common::Rng(0x5EED + d as u64 + heads as u64);
    let dt = DType::from_name(dtype).expect("dtype");
    let mut random = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_f32(
            shape,
            (0..n).map(|_| (rng.next() * 2.0 - 1.0) as f32).collect(),
        )
        .cast(dt)
    };
    let tokens = 5;
    let positions = 6 * bs;
    let inputs = vec![
        random(&[tokens, heads, d]),
        random(&[2, 12, bs, kv, d]),
        random(&[2, 12, bs, kv, d]),
        Tensor::from_ints(
            DType::I32,
            &[3, 6],
            (0..18).map(|i| ((i * 7 + 3) % 12) as i64).collect(),
        ),
        Tensor::from_ints(DType::I32, &[tokens], vec![0, 1, -1, 2, 0]),
        // The last position of the table, one inside the first tile, a padding token, a
        // context ending inside a tile of a later partition, the first position.
        Tensor::from_ints(
            DType::I32,
            &[tokens],
            vec![positions as i64 - 1, 2, 7, positions as i64 / 2 + 1, 0],
        ),
    ];
    let options = Options {
        paged: tuning,
        ..Options::default()
    };
    let compiled = check(&module, "attend", &inputs, &BTreeMap::new(), &options);
    let partial = partials(&compiled.kernels);
    assert_eq!(partial.len(), 1, "{:?}", compiled.plan.steps);
    partial[0].clone()
}

/// [`partial`]: whether its partial kernel is staged.
fn run(dtype: &str, heads: usize, kv: usize, d: usize, bs: usize, tuning: PagedTuning) -> bool {
    staged(&partial(dtype, heads, kv, d, bs, tuning))
}

/// [`partial`]: whether its partial kernel is staged and scores on the tensor cores.
fn run_mma(dtype: &str, heads: usize, kv: usize, d: usize, bs: usize, t: PagedTuning) -> bool {
    let kernel = partial(dtype, heads, kv, d, bs, t);
    staged(&kernel) && on_tensor_cores(&kernel)
}

fn tuning(part: u64, warps: u32, tile: u64, stages: u64, lanes: u32) -> PagedTuning {
    PagedTuning {
        part,
        warps,
        tile,
        stages,
        lanes,
        short_part: part,
        short_context: 0,
        mma_warps: 0,
        ..PagedTuning::default()
    }
}

/// The tensor-core staged design: `warps` warps, tiles of `tile` keys, `stages` stages.
fn mma(part: u64, warps: u32, tile: u64, stages: u64) -> PagedTuning {
    PagedTuning {
        mma_warps: warps,
        ..tuning(part, 4, tile, stages, 16)
    }
}

#[test]
fn tensor_core_gqa_bf16_equals_the_interpreter() {
    // Group 4 (rows 4..16 of the tile are zeros), head dim 64, cache blocks of 4: a tile
    // of 16 keys crosses four blocks; one warp, three stages; partitions of 16 are one
    // tile, so the copies run two tiles past the partition (zero fills).
    assert!(run_mma("bf16", 8, 2, 64, 4, mma(16, 1, 16, 3)));
    // Two warps of 16 keys a tile, partitions of 40 rounded up to 64 (two tiles): the
    // second warp's keys of the last tile lie past a ragged end.
    assert!(run_mma("bf16", 8, 2, 64, 4, mma(40, 2, 32, 2)));
    // 32 keys a warp (two slabs), f16.
    assert!(run_mma("f16", 8, 2, 64, 8, mma(64, 1, 32, 2)));
}

#[test]
fn tensor_core_gqa_32_8_head_dim_128_equals_the_interpreter() {
    // The benchmark's head counts and head dim, blocks of 16: one block-table read a tile.
    assert!(run_mma("bf16", 32, 8, 128, 16, mma(32, 2, 32, 2)));
    assert!(run_mma("bf16", 32, 8, 128, 16, mma(64, 1, 16, 4)));
}

#[test]
fn tensor_core_mha_and_wide_groups_equal_the_interpreter() {
    // Group 1 (MHA): one real row of the 16.
    assert!(run_mma("bf16", 2, 2, 64, 8, mma(16, 1, 16, 2)));
    assert!(run_mma("bf16", 2, 2, 128, 8, mma(32, 2, 32, 2)));
    // Group 12: all of rows 0..8, some of rows 8..16.
    assert!(run_mma("bf16", 24, 2, 64, 4, mma(32, 2, 32, 2)));
    // Group 16: every row.
    assert!(run_mma("bf16", 32, 2, 64, 4, mma(16, 1, 16, 2)));
}

#[test]
fn where_the_tensor_cores_do_not_apply_the_register_design_runs() {
    // f32 operands, head dim 32, a group of 32, no room: the register design.
    assert!(!run("f32", 8, 2, 64, 4, mma(16, 1, 16, 2)));
    assert!(!run("bf16", 8, 2, 32, 4, mma(16, 1, 16, 2)));
    assert!(!run("bf16", 32, 1, 64, 4, mma(16, 1, 16, 2)));
    // Tiles of 64 keys of head dim 128 take 32 KiB a stage: two stages do not fit.
    assert!(!run("bf16", 8, 2, 128, 16, mma(64, 4, 64, 2)));
    // Without tiles (the short-context variant's setting) the register design too.
    assert!(!run("bf16", 8, 2, 64, 4, mma(16, 1, 0, 2)));
}

#[test]
fn staged_gqa_f32_equals_the_interpreter() {
    // Tiles of 8 for two warps, three stages, 8 lanes a key (4 keys a warp at once):
    // partitions of 16 are two tiles, the copies run a tile past the partition (zero
    // fills).
    assert!(run("f32", 8, 2, 32, 4, tuning(16, 2, 8, 3, 8)));
    // A warp a key; tiles of 6 (not dividing the cache blocks of 4: a tile crosses
    // blocks), partitions rounded up to 12.
    assert!(run("f32", 8, 2, 32, 4, tuning(10, 2, 6, 2, 32)));
    // 4 lanes a key (8 keys a warp at once): tiles of 5 rounded up to 16.
    assert!(run("f32", 8, 2, 32, 4, tuning(16, 2, 5, 2, 4)));
}

#[test]
fn staged_head_dim_96_equals_the_interpreter() {
    // Six elements a lane at 16 lanes a key (loaded from shared memory as pairs); twelve
    // at 8 lanes.
    assert!(run("f32", 4, 2, 96, 4, tuning(16, 2, 8, 2, 16)));
    assert!(run("bf16", 4, 2, 96, 4, tuning(16, 2, 8, 2, 8)));
}

#[test]
fn more_partitions_than_a_merge_chunk_equal_the_interpreter() {
    // 96 positions in partitions of 8 and 9: 12 and 11 partitions, so the merge walks a
    // whole chunk of 8 states and a ragged one (positions past the last partition clamped
    // and left out of the sums), and the shorter contexts leave partitions empty.
    assert!(!run("f32", 8, 2, 32, 16, tuning(8, 1, 0, 2, 32)));
    assert!(!run("bf16", 8, 2, 64, 16, tuning(9, 2, 0, 2, 32)));
}

#[test]
fn staged_gqa_32_8_equals_the_interpreter() {
    // The benchmark's head counts at head dim 32: four warps, tiles of 16 (8 lanes a key),
    // tiles inside the cache blocks of 16 (one block-table read a tile).
    assert!(run("f32", 32, 8, 32, 16, tuning(32, 4, 16, 3, 8)));
}

#[test]
fn staged_mha_bf16_equals_the_interpreter() {
    // Head dim 64 in bf16: a row is 8 chunks of 16 bytes, a tile of 4 keys fewer chunks
    // than the block's 64 threads.
    assert!(run("bf16", 2, 2, 64, 8, tuning(8, 2, 4, 4, 32)));
    // 16 lanes a key: two keys a warp at once.
    assert!(run("bf16", 2, 2, 64, 8, tuning(8, 2, 4, 4, 16)));
    assert!(run("bf16", 4, 2, 64, 8, tuning(24, 4, 8, 2, 8)));
}

#[test]
fn without_tiles_or_room_the_register_design_runs() {
    assert!(!run("f32", 8, 2, 32, 4, tuning(16, 2, 0, 3, 16)));
    // Two stages of 64 keys of head dim 256 in f32 need 256 KiB: no room.
    let mut wide = tuning(128, 4, 64, 2, 16);
    wide.unroll = 2;
    assert!(!run("f32", 2, 1, 256, 4, wide));
}

/// The benchmark's function (`kiln bench kernels`): GQA 32/8, D 128, bf16, blocks of 16.
const BENCH_SRC: &str = "import nn
fn paged_decode(q: bf16[B, 32, 128], k_cache: bf16[1, NB, 16, 8, 128], v_cache: bf16[1, NB, 16, 8, 128],
                block_tables: i32[B, MB], seq: i32[B], pos: i32[B]) -> bf16[B, 32, 128] {
    paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 0)
}
";

fn bench_kernels(options: &Options) -> Vec<kiln_kir::Kernel> {
    let module = lower("paged_bench.kiln", BENCH_SRC, None, None);
    let compiled = kiln_gpu_kernels::compile_function(&module, "paged_decode", options)
        .unwrap_or_else(|e| panic!("{e}"));
    compiled.kernels
}

#[test]
fn the_long_context_partial_kernel_snapshot() {
    // The CUDA-core staged design at tiles of 16 in four stages.
    let mut options = Options::default();
    options.paged.tile = 16;
    options.paged.stages = 4;
    options.paged.mma_warps = 0;
    let kernels = bench_kernels(&options);
    let long: Vec<kiln_kir::Kernel> = partials(&kernels)
        .into_iter()
        .filter(|k| staged(k))
        .cloned()
        .collect();
    assert_eq!(
        long.len(),
        1,
        "the long-context variant is staged, the short one not"
    );
    let ptx = kiln_ptx::emit_ptx(&long, kiln_ptx::Target::Sm90a, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ptx.contains("cp.async"), "{ptx}");
    insta::assert_snapshot!(ptx);
}

#[test]
fn paged_kernels_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    let mut register = Options::default();
    register.paged.mma_warps = 0;
    register.paged.tile = 0;
    let mut kernels = bench_kernels(&register);
    // (tile, stages, blocks an SM, lanes a key) of the CUDA-core staged design.
    let variants = [
        (16, 4, 0, 16),
        (16, 4, 4, 16),
        (32, 2, 0, 16),
        (16, 4, 0, 32),
        (8, 4, 0, 32),
        (8, 8, 0, 16),
        (32, 2, 0, 8),
    ];
    for (tile, stages, blocks, lanes) in variants {
        let mut options = Options::default();
        options.paged.tile = tile;
        options.paged.stages = stages;
        options.paged.blocks_per_sm = blocks;
        options.paged.lanes = lanes;
        options.paged.mma_warps = 0;
        options.paged.short_part = options.paged.part;
        kernels.extend(
            bench_kernels(&options)
                .into_iter()
                .filter(|k| k.name.contains("partial")),
        );
    }
    let registers = common::assert_assembles_without_spills(&toolchain, &kernels);
    assert_eq!(registers.len(), 5 * kernels.len());
}

/// The benchmark's long-context partial kernel of the tensor-core design.
fn mma_kernel(warps: u32, tile: u64, stages: u64, part: u64, blocks: u32) -> kiln_kir::Kernel {
    let mut options = Options::default();
    options.paged.mma_warps = warps;
    options.paged.tile = tile;
    options.paged.stages = stages;
    options.paged.part = part;
    options.paged.blocks_per_sm = blocks;
    let kernels = bench_kernels(&options);
    let long: Vec<kiln_kir::Kernel> = partials(&kernels)
        .into_iter()
        .filter(|k| staged(k))
        .cloned()
        .collect();
    assert_eq!(long.len(), 1, "the long-context variant is staged");
    assert!(on_tensor_cores(&long[0]));
    long.into_iter().next().expect("one kernel")
}

#[test]
fn the_tensor_core_design_is_the_default_of_the_long_context_kernel() {
    let kernels = bench_kernels(&Options::default());
    let partial = partials(&kernels);
    assert_eq!(partial.len(), 2, "a long- and a short-context kernel");
    let mma: Vec<bool> = partial.iter().map(|k| on_tensor_cores(k)).collect();
    assert_eq!(mma.iter().filter(|&&m| m).count(), 1, "{mma:?}");
    for kernel in partial {
        assert_eq!(on_tensor_cores(kernel), staged(kernel), "{}", kernel.name);
    }
}

#[test]
fn the_tensor_core_partial_kernel_snapshot() {
    // Two warps of 16 keys a tile, two stages.
    let kernel = mma_kernel(2, 32, 2, 256, 0);
    let ptx = kiln_ptx::emit_ptx(&[kernel], kiln_ptx::Target::Sm90a, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ptx.contains("mma.sync.aligned.m16n8k16"), "{ptx}");
    assert!(ptx.contains("ldmatrix.sync.aligned.m8n8.x4.trans"), "{ptx}");
    assert!(ptx.contains("cp.async"), "{ptx}");
    insta::assert_snapshot!(ptx);
}

#[test]
fn tensor_core_kernels_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    // (warps, tile, stages, partition, blocks an SM): the knob settings to measure.
    let variants = [
        (1, 16, 4, 256, 0),
        (1, 32, 2, 256, 0),
        (2, 32, 2, 256, 0),
        (2, 32, 2, 128, 6),
        (1, 16, 4, 256, 6),
        (1, 16, 2, 128, 0),
    ];
    let kernels: Vec<kiln_kir::Kernel> = variants
        .into_iter()
        .map(|(w, t, s, p, b)| mma_kernel(w, t, s, p, b))
        .collect();
    let registers = common::assert_assembles_without_spills(&toolchain, &kernels);
    assert_eq!(registers.len(), 5 * kernels.len());
}
