//! `kiln bench kernels`: the GPU kernel benchmarks of BASELINES.md, compiled for the
//! device's target and timed with CUDA events (warm-up, median of the runs, random data):
//! the memory-bound fusions (residual add + RMSNorm, SwiGLU's element-wise part, RoPE, and a
//! plain copy for the ceiling), the bf16 GEMMs (prefill-sized, and decode-sized with
//! M = 1 and 16) and an FP8 e4m3 GEMM at 8192³ (`scaled_mm`, per-tensor scales, bf16 out;
//! its peer is torch._scaled_mm). Reports per case the median time, the bytes that must move (inputs read
//! once + outputs written once; for decode GEMMs the weight bytes), the effective GB/s and
//! the fraction of the copy bandwidth measured in the same run, and TFLOP/s for GEMMs and
//! attention prefill (B4 H32 S4096 D128, causal and not, beside PyTorch's flash backend); with
//! PyTorch's numbers from `benches/torch_peers.py` (same shapes, same machine), also the
//! ratios to eager and torch.compile (cuBLAS for GEMMs).

use anyhow::{anyhow, bail, Context, Result};
use kiln_cuda::{CudaDevice, CudaPackage, CudaProgram};
use kiln_driver::pipeline::{self, CompileOptions};
use kiln_ir::{DType, Tensor};
use kiln_ptx::{Target, Toolchain};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand)]
enum BenchWhat {
    /// Time the fused kernels, GEMMs and paged attention on the GPU.
    Kernels(KernelArgs),
    /// Decode speed of a Llama-shaped 1.1B bf16 model (random weights) on the GPU.
    Decode(crate::bench_decode::DecodeArgs),
    /// Load-test an OpenAI-compatible server (started here, or --url) with vLLM's serving
    /// benchmark definitions: TTFT, TPOT, ITL, E2E latency, throughput.
    Serve(kiln_driver::bench_serve::ServeBenchArgs),
    /// The consensus kernels on the GPU (RM+ solver, cosine similarity, coordinate median)
    /// beside PyTorch eager and numpy.
    Consensus(crate::bench_consensus::ConsensusBenchArgs),
}

#[derive(clap::Args)]
struct KernelArgs {
    /// Timed runs per case (after warm-up); the median is reported.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// PyTorch's numbers for the same cases (the JSON `benches/torch_peers.py` prints).
    #[arg(long, value_name = "FILE")]
    torch_json: Option<PathBuf>,
    /// Also write the JSON here (e.g. benches/results/DATE-GPU-memory-bound.json).
    #[arg(long, short = 'o', value_name = "FILE")]
    out: Option<PathBuf>,
    /// Time only these cases (repeatable; the copy case, the bandwidth ceiling, always runs).
    #[arg(long = "case", value_name = "NAME")]
    cases: Vec<String>,
}

const PROGRAM: &str = "
import nn
fn copy(x: bf16[R, 4096]) -> bf16[R, 4096] { x + 0.0 }
fn add_rms_norm(x: bf16[T, 4096], residual: bf16[T, 4096], w: bf16[4096]) -> (bf16[T, 4096], bf16[T, 4096]) {
    let h = x + residual
    (h, rms_norm(h, w, 1e-5))
}
fn swiglu_act(gate: bf16[T, 14336], up: bf16[T, 14336]) -> bf16[T, 14336] { silu(gate) * up }
fn rotary(q: bf16[T, 32, 128], pos: i64[T]) -> bf16[T, 32, 128] { rope(q, pos, 500000.0) }
fn gemm_4096(x: bf16[4096, 4096], w: bf16[4096, 4096]) -> bf16[4096, 4096] { x @ w.T }
fn gemm_8192(x: bf16[8192, 8192], w: bf16[8192, 8192]) -> bf16[8192, 8192] { x @ w.T }
fn gemm_4096x14336(x: bf16[4096, 4096], w: bf16[14336, 4096]) -> bf16[4096, 14336] { x @ w.T }
fn fp8_gemm_8192(a: f8e4m3[8192, 8192], b: f8e4m3[8192, 8192], scale_a: f32, scale_b: f32) -> bf16[8192, 8192] {
    bf16(scaled_mm(a, b, scale_a, scale_b))
}
fn decode_m1_4096(x: bf16[1, 4096], w0: bf16[4096, 4096], w1: bf16[4096, 4096], w2: bf16[4096, 4096], w3: bf16[4096, 4096]) -> bf16[1, 4096] {
    (((x @ w0.T) @ w1.T) @ w2.T) @ w3.T
}
fn decode_m16_4096(x: bf16[16, 4096], w0: bf16[4096, 4096], w1: bf16[4096, 4096], w2: bf16[4096, 4096], w3: bf16[4096, 4096]) -> bf16[16, 4096] {
    (((x @ w0.T) @ w1.T) @ w2.T) @ w3.T
}
fn decode_m1_14336(x: bf16[1, 4096], w: bf16[14336, 4096]) -> bf16[1, 14336] { x @ w.T }
fn decode_m16_14336(x: bf16[16, 4096], w: bf16[14336, 4096]) -> bf16[16, 14336] { x @ w.T }
fn prefill_causal(q: bf16[4, 4096, 32, 128], k: bf16[4, 4096, 32, 128], v: bf16[4, 4096, 32, 128]) -> bf16[4, 4096, 32, 128] {
    attention(q, k, v, causal: true)
}
fn prefill(q: bf16[4, 4096, 32, 128], k: bf16[4, 4096, 32, 128], v: bf16[4, 4096, 32, 128]) -> bf16[4, 4096, 32, 128] {
    attention(q, k, v, causal: false)
}
fn paged_decode(q: bf16[B, 32, 128], k_cache: bf16[1, NB, 16, 8, 128], v_cache: bf16[1, NB, 16, 8, 128],
                block_tables: i32[B, MB], seq: i32[B], pos: i32[B]) -> bf16[B, 32, 128] {
    paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 0)
}
fn paged_decode_short(q: bf16[B, 32, 128], k_cache: bf16[1, NB, 16, 8, 128], v_cache: bf16[1, NB, 16, 8, 128],
                      block_tables: i32[B, MB], seq: i32[B], pos: i32[B]) -> bf16[B, 32, 128] {
    paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 0)
}
";

/// Decode attention of BASELINES.md: 64 sequences of 4096 cached tokens, GQA 32/8, D 128.
const PAGED_BATCH: usize = 64;
const PAGED_CONTEXT: usize = 4096;

struct Case {
    function: &'static str,
    inputs: Vec<Tensor>,
    /// Bytes read and written at the minimum (for decode GEMMs: the weight's bytes).
    bytes: u64,
    /// Multiply-adds times two, for GEMMs.
    flops: Option<u64>,
}

/// `x [m, k] @ w [n, k]ᵀ` in bf16, `chain` times with a different weight each time (so that
/// weights smaller than L2 are not found there by the next run); decode-sized (`m <= 16`)
/// counts only the weights' bytes.
fn gemm_case(
    function: &'static str,
    m: usize,
    n: usize,
    k: usize,
    chain: usize,
    seed: u64,
) -> Case {
    let per_gemm = if m <= 16 {
        (n * k * 2) as u64
    } else {
        ((m * k + n * k + m * n) * 2) as u64
    };
    let mut inputs = vec![random_bf16(&[m, k], seed)];
    inputs.extend((0..chain).map(|i| random_bf16(&[n, k], seed + 1 + i as u64)));
    Case {
        function,
        inputs,
        bytes: per_gemm * chain as u64,
        flops: Some((2 * m * n * k * chain) as u64),
    }
}

/// `bf16((a [m, k] · b [n, k]ᵀ) · scale_a · scale_b)` for f8e4m3 `a` and `b` (values in
/// [-1, 1] rounded to e4m3) and per-tensor f32 scales, as torch._scaled_mm computes it
/// (`benches/torch_peers.py`).
fn fp8_gemm_case(function: &'static str, m: usize, n: usize, k: usize, seed: u64) -> Case {
    let fp8 = |shape: &[usize], seed| random_bf16(shape, seed).cast(DType::F8E4M3);
    let scale = |x: f32| Tensor::from_f32(&[], vec![x]);
    Case {
        function,
        inputs: vec![
            fp8(&[m, k], seed),
            fp8(&[n, k], seed + 1),
            scale(0.5),
            scale(0.25),
        ],
        bytes: (m * k + n * k + m * n * 2) as u64,
        flops: Some((2 * m * n * k) as u64),
    }
}

fn random_bf16(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed;
    let data = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32
        })
        .collect();
    Tensor::from_f32(shape, data).cast(DType::BF16)
}

/// The copy that sets the bandwidth ceiling: 512 MB of bf16 read and 512 MB written.
fn copy_case() -> Case {
    let rows = 65536;
    Case {
        function: "copy",
        inputs: vec![random_bf16(&[rows, 4096], 1)],
        bytes: 2 * 2 * (rows * 4096) as u64,
        flops: None,
    }
}

fn cases() -> Vec<Case> {
    let t = 16384usize;
    vec![
        copy_case(),
        Case {
            function: "add_rms_norm",
            inputs: vec![
                random_bf16(&[t, 4096], 2),
                random_bf16(&[t, 4096], 3),
                random_bf16(&[4096], 4),
            ],
            bytes: (4 * t * 4096 * 2 + 4096 * 2) as u64,
            flops: None,
        },
        Case {
            function: "swiglu_act",
            inputs: vec![random_bf16(&[t, 14336], 5), random_bf16(&[t, 14336], 6)],
            bytes: (3 * t * 14336 * 2) as u64,
            flops: None,
        },
        Case {
            function: "rotary",
            inputs: vec![
                random_bf16(&[t, 32, 128], 7),
                Tensor::from_ints(DType::I64, &[t], (0..t as i64).map(|p| p % 4096).collect()),
            ],
            bytes: (2 * t * 32 * 128 * 2 + t * 8) as u64,
            flops: None,
        },
        gemm_case("gemm_4096", 4096, 4096, 4096, 1, 10),
        gemm_case("gemm_8192", 8192, 8192, 8192, 1, 12),
        gemm_case("gemm_4096x14336", 4096, 14336, 4096, 1, 14),
        // On the FP8 tensor cores from sm_89 (an sm_80 GPU runs the plain template).
        fp8_gemm_case("fp8_gemm_8192", 8192, 8192, 8192, 40),
        // Four 32 MB weights in a chain: 128 MB a run, more than the 50 MB L2 of an H100.
        gemm_case("decode_m1_4096", 1, 4096, 4096, 4, 16),
        gemm_case("decode_m16_4096", 16, 4096, 4096, 4, 21),
        gemm_case("decode_m1_14336", 1, 14336, 4096, 1, 26),
        gemm_case("decode_m16_14336", 16, 14336, 4096, 1, 28),
        paged_decode_case("paged_decode", PAGED_BATCH, PAGED_CONTEXT, 30),
        // The decode step's attention: one sequence of 256 tokens.
        paged_decode_case("paged_decode_short", 1, 256, 32),
        prefill_case("prefill_causal", true, 40),
        prefill_case("prefill", false, 44),
    ]
}

/// Attention prefill of BASELINES.md: B4 H32 S4096 D128 bf16, q/k/v/out `[B, S, H, D]`;
/// FLOPs of the two products (`4 · B · H · S² · D`, half of it causal), bytes of q, k, v
/// and the output.
fn prefill_case(function: &'static str, causal: bool, seed: u64) -> Case {
    let (b, s, h, d) = (4usize, 4096usize, 32usize, 128usize);
    let shape = [b, s, h, d];
    let flops = 4 * b * h * s * s * d;
    Case {
        function,
        inputs: (0..3).map(|i| random_bf16(&shape, seed + i)).collect(),
        bytes: (4 * b * s * h * d * 2) as u64,
        flops: Some(if causal { flops / 2 } else { flops } as u64),
    }
}

/// One decode token for each of `batch` sequences over `context` cached tokens each, in
/// blocks of 16 scattered over the cache (a fixed pseudo-random permutation); bytes = the K
/// and V read.
fn paged_decode_case(function: &'static str, batch: usize, context: usize, seed: u64) -> Case {
    let per_seq = context / 16;
    let blocks = batch * per_seq;
    let cache = [1, blocks, 16, 8, 128];
    let mut order: Vec<i64> = (0..blocks as i64).collect();
    let mut state = seed;
    for i in (1..order.len()).rev() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    let int = |shape: &[usize], v: Vec<i64>| Tensor::from_ints(DType::I32, shape, v);
    Case {
        function,
        inputs: vec![
            random_bf16(&[batch, 32, 128], seed),
            random_bf16(&cache, seed + 1),
            random_bf16(&cache, seed + 2),
            int(&[batch, per_seq], order),
            int(&[batch], (0..batch as i64).collect()),
            int(&[batch], vec![context as i64 - 1; batch]),
        ],
        bytes: (2 * blocks * 16 * 8 * 128 * 2) as u64,
        flops: None,
    }
}

/// The environment variables `kiln bench` (and nothing else) reads to compile with other
/// template settings, for comparing variants on one GPU; each holds comma-separated
/// `KEY=N` items.
///
/// `KILN_TUNE_POINTWISE`: `walk=N` (the most positions of a short outer axis a pointwise
/// thread walks; default 8, 1 for none), `segments=0|1` (a thread covers one vector per
/// concat segment of the innermost axis; default 1), `unroll=N` (walk positions computed
/// together, their loads before their stores; default 1) and `blocks=N` (`.minnctapersm N`
/// on kernels without shared memory, so ptxas caps their registers for N blocks of 256
/// threads per SM; default 1). Example: `KILN_TUNE_POINTWISE=walk=4,segments=1,blocks=5`.
const TUNE_POINTWISE: &str = "KILN_TUNE_POINTWISE";

/// `KILN_TUNE_PAGED`: `part=N` (key positions of a paged-attention partition), `unroll=N`
/// (keys a warp takes per step), `warps=N` (warps of the partial kernel's block),
/// `short_part=N` and `short_context=N` (the partition for block tables of at most that many
/// positions; `short_part` ≥ `part` turns the variant off), `short_warps=N` and
/// `short_unroll=N` (that variant's warps and keys a warp step), `tile=N` (keys of a
/// shared-memory tile of the staged long-context design; 0: the register design),
/// `stages=N` (its tiles in flight), `blocks=N` (blocks an SM ptxas fits the staged
/// kernel's registers for) and `lanes=N` (lanes splitting a key's head dim in it), `mma=N`
/// (warps of the tensor-core staged design, `mma.sync` scores and weighted values; 0: the
/// CUDA-core one), `onepass=N` (warps of the short-context variant's one-pass kernel, no merge kernel; 0: the partial
/// and merge kernels of `short_part` partitions), `fusedmerge=0|1` (the partial kernel's
/// last block of a token and head group merges the partitions, no merge kernel; default 0),
/// `preload=0|1` (the register design loads its first keys and values before its
/// grid-dependency wait; default 1); defaults in
/// [`kiln_gpu_kernels::PagedTuning`]. Example: `KILN_TUNE_PAGED=tile=32,stages=2,part=256`.
const TUNE_PAGED: &str = "KILN_TUNE_PAGED";

/// `KILN_TUNE_GEMM`: `segments=0|1` (decode-sized fused matmuls of unequal widths, q/k/v,
/// run a grid of segments, each block one matmul's tile; default 1) and `splits=0|1` (such a
/// grid of at most a block per SM splits K across blocks; default 1) and `rowsum=0|1` (a
/// split-K GEMM whose stored values a row reduction reads first, the residual add before
/// an RMSNorm, leaves its sum to that row kernel; default 1), `kvwrite=0|1` (the sum
/// kernel of a split-K q/k/v grid stores k and v straight into the paged caches, no
/// `kv_write` kernel; default 0) and `maxsplits=N` (the most blocks a decode GEMM's k slices
/// are split over; default 0, the template's 8), `prefetch=0|1` (each decode GEMM block
/// asks L2 for its weight slice before its grid-dependency wait; default 0), `prefetch_mib=N`
/// (the most weight MiB a decode GEMM prefetches; default 0, the template's 24),
/// `trigger=0|1` (a decode GEMM block lets the next kernel launch after its main loop;
/// default 0), `early=0|1` (every other kernel lets the next launch right after its
/// grid-dependency wait; default 1), `earlyloads=0|1` (a kernel without a wait of its own
/// waits after its leading loads of constant or settled buffers, a norm's gain; default 0),
/// `preload=0|1` (a GEMV block loads its first weights before its grid-dependency wait;
/// default 0), `gemv=0|1` (matmuls of at most 4 rows of
/// a `linear` weight take the GEMV template, a warp a column, no split-K; default 1), `gemvunroll=N` (16-byte weight vectors
/// a lane loads together per step in GEMVs of more than one row; default 4), `gemvunroll1=N`
/// (the same for GEMVs of one row; default 8), `gemvblocks=N` (the most blocks of a GEMV
/// that is not a grid of segments, each looping over column groups so that its norm
/// prologue and preload are paid once a block; default 0, a block a group of 4 columns),
/// `gemvocc=N` (the blocks an SM a GEMV asks ptxas to fit; default 4),
/// `normgemv=0|1` (a GEMV whose A is an
/// RMSNorm's rows, read by GEMVs only, computes the norm itself, no norm kernel; default 0),
/// `normqkv=0|1` (with it, the q/k/v GEMV that writes the caches computes its norm too;
/// default 0),
/// `mmagemv=0|1` (matmuls of 5 to 16 rows of a `linear` weight take the tensor-core GEMV,
/// m16n8k16 products on weights loaded straight into registers, no split-K across blocks;
/// default 0), `mmagemvunroll=N` (32-wide k chunks a warp of it loads together per step;
/// default 8, at most 8 for one matmul), `mmagemvwarps=N` (warps of its block, splitting
/// K; default 4) and `mmagemvtiles=N` (n8 tiles of its block, 1, 2 or 4, each warp reading
/// A once a chunk for all of them; default 1), `gemvkvwrite=0|1` (the q/k/v GEMV of segments stores RoPE'd k and v
/// straight into the paged caches, no `kv_write` kernel; default 1); for prefill GEMMs
/// (16-bit, M > 64)
/// `tile=BMxBN` (block tile), `warps=WMxWN`, `bk=N` (k slice), `stages=N` (0: as many as fit
/// in shared memory; the table's tile where the overrides make one the template cannot
/// run), `raster=N` (block rows of a rasterization group; 0 or 1: row-major blocks) and
/// `dbuf=0|1` (fragments double-buffered across k16 steps), `pairs=0|1` (the epilogue
/// stores two adjacent columns at once) and `smem=KiB` (the shared memory a tuned tile may
/// use; default 99, every target; up to 227 on an H100), `wgmma=0|1` (prefill GEMMs of
/// `linear` weights take the sm_90a `wgmma` template where every compiled target has it, as
/// in the sm_90a-only build `kiln bench kernels` makes on an H100; default 1); defaults in
/// [`kiln_gpu_kernels::GemmTuning`]. Examples: `KILN_TUNE_GEMM=segments=1,splits=0`,
/// `KILN_TUNE_GEMM=tile=128x256,warps=2x4,stages=4,raster=8,dbuf=1,pairs=1`.
const TUNE_GEMM: &str = "KILN_TUNE_GEMM";

/// `KILN_TUNE_ATTENTION`: `warps=4|8` (warps of a prefill block, `16 · mtiles` query rows
/// each; default 4), `stages=1|2` (K/V tiles in shared memory: 1 alternates a K and a V
/// buffer, 2 copies the next tile while this one is computed; default 2; two row tiles at
/// D 128 take 1) and `mtiles=1|2` (m16 row tiles a warp: 2 feeds each K/V fragment to two
/// `mma`s; default 2); defaults in [`kiln_gpu_kernels::AttentionTuning`]. Examples:
/// `KILN_TUNE_ATTENTION=warps=8,mtiles=1` (the one-tile design of 128 rows a block),
/// `KILN_TUNE_ATTENTION=warps=4,stages=1,mtiles=1` (48 KiB of static shared memory).
const TUNE_ATTENTION: &str = "KILN_TUNE_ATTENTION";

/// The `KEY=VALUE` items of the tuning variable `var`, if it is set.
fn tuning_pairs(var: &str) -> Result<Vec<(String, String)>> {
    let Ok(spec) = std::env::var(var) else {
        return Ok(Vec::new());
    };
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| anyhow!("{var}: `{item}` is not KEY=VALUE"))?;
            Ok((key.to_string(), value.to_string()))
        })
        .collect()
}

/// The `KEY=N` items of the tuning variable `var`, if it is set.
fn tuning_items(var: &str) -> Result<Vec<(String, u64)>> {
    tuning_pairs(var)?
        .into_iter()
        .map(|(key, value)| {
            let n: u64 = value
                .parse()
                .with_context(|| format!("{var}: `{key}={value}`: the value is not a number"))?;
            Ok((key, n))
        })
        .collect()
}

/// Applies the tuning variables to `options` and says so on stderr when any is set.
pub(crate) fn apply_tuning(options: &mut CompileOptions) -> Result<()> {
    let pointwise = tuning_items(TUNE_POINTWISE)?;
    let tuning = &mut options.fusion.pointwise;
    for (key, n) in &pointwise {
        let n = *n;
        match key.as_str() {
            "walk" => tuning.max_walk = n.max(1),
            "segments" => tuning.segments = n != 0,
            "unroll" => tuning.unroll = n.max(1),
            "blocks" => options.streaming_blocks_per_sm = u32::try_from(n).unwrap_or(u32::MAX),
            _ => bail!("{TUNE_POINTWISE}: unknown key `{key}` (walk, segments, unroll, blocks)"),
        }
    }
    if !pointwise.is_empty() {
        eprintln!(
            "kiln bench: {TUNE_POINTWISE}: walk {}, segments {}, unroll {}, blocks per SM {}",
            tuning.max_walk,
            tuning.segments,
            tuning.unroll,
            options.streaming_blocks_per_sm.max(1)
        );
    }
    let paged_items = tuning_items(TUNE_PAGED)?;
    let paged = &mut options.fusion.paged;
    for (key, n) in &paged_items {
        let (raw, n) = (*n, (*n).max(1));
        match key.as_str() {
            "part" => paged.part = n,
            "unroll" => paged.unroll = n as usize,
            "warps" => paged.warps = u32::try_from(n.min(32)).unwrap_or(32),
            "short_part" => paged.short_part = n,
            "short_context" => paged.short_context = n,
            "short_warps" => paged.short_warps = u32::try_from(n.min(32)).unwrap_or(32),
            "short_unroll" => paged.short_unroll = n as usize,
            "tile" => paged.tile = raw,
            "stages" => paged.stages = n,
            "lanes" => paged.lanes = u32::try_from(n.min(32)).unwrap_or(32),
            "blocks" => paged.blocks_per_sm = u32::try_from(n.min(32)).unwrap_or(32),
            "mma" => paged.mma_warps = u32::try_from(raw.min(32)).unwrap_or(32),
            "onepass" => paged.one_pass = u32::try_from(raw.min(32)).unwrap_or(32),
            "fusedmerge" => paged.fused_merge = raw != 0,
            "preload" => paged.preload = raw != 0,
            _ => bail!(
                "{TUNE_PAGED}: unknown key `{key}` (part, unroll, warps, short_part, \
                 short_context, short_warps, short_unroll, tile, stages, blocks, lanes, mma, \
                 onepass, fusedmerge, preload)"
            ),
        }
    }
    if !paged_items.is_empty() {
        eprintln!(
            "kiln bench: {TUNE_PAGED}: part {}, unroll {}, warps {}, short_part {} up to {} keys \
             ({} warps of {} keys a step), \
             tile {} ({} stages, {} blocks an SM, {} lanes a key, {} tensor-core warps), \
             one-pass short kernel of {} warps, fused merge {}",
            paged.part,
            paged.unroll,
            paged.warps,
            paged.short_part,
            paged.short_context,
            paged.short_warps,
            paged.short_unroll,
            paged.tile,
            paged.stages,
            paged.blocks_per_sm,
            paged.lanes,
            paged.mma_warps,
            paged.one_pass,
            paged.fused_merge
        );
    }
    let gemm_items = tuning_pairs(TUNE_GEMM)?;
    let gemm = &mut options.fusion.gemm;
    for (key, value) in &gemm_items {
        gemm.set(key, value)
            .map_err(|e| anyhow!("{TUNE_GEMM}: {e}"))?;
    }
    if !gemm_items.is_empty() {
        eprintln!(
            "kiln bench: {TUNE_GEMM}: segments {}, splits {}, rowsum {}, kvwrite {}, maxsplits {}, \
             prefetch {}, prefetch_mib {}, trigger {}, early {}, earlyloads {}, preload {}, gemv {}, gemvunroll {}, gemvunroll1 {}, gemvblocks {}, gemvocc {}, normgemv {}, \
             normqkv {}, mmagemv {}, mmagemvunroll {}, mmagemvwarps {}, mmagemvtiles {}, gemvkvwrite {}, \
             tile {}x{}, warps {}x{}, bk {}, stages {}, raster {}, dbuf {}, pairs {}, smem {} KiB \
             (0: the table's)",
            u8::from(gemm.segments),
            u8::from(gemm.segment_splits),
            u8::from(gemm.row_sums),
            u8::from(gemm.kv_writes),
            gemm.max_splits,
            u8::from(gemm.prefetch),
            gemm.prefetch_mib,
            u8::from(gemm.trigger),
            u8::from(gemm.early_trigger),
            u8::from(gemm.early_loads),
            u8::from(gemm.preload),
            u8::from(gemm.gemv),
            gemm.gemv_unroll,
            gemm.gemv_unroll_one,
            gemm.gemv_blocks,
            gemm.gemv_occupancy,
            u8::from(gemm.norm_prologue),
            u8::from(gemm.norm_prologue_kv_writes),
            u8::from(gemm.mma_gemv),
            gemm.mma_gemv_unroll,
            gemm.mma_gemv_warps,
            gemm.mma_gemv_tiles,
            u8::from(gemm.gemv_kv_writes),
            gemm.tile.0,
            gemm.tile.1,
            gemm.warps.0,
            gemm.warps.1,
            gemm.bk,
            gemm.stages,
            gemm.raster,
            u8::from(gemm.double_buffer),
            u8::from(gemm.paired_epilogue),
            gemm.shared_kib
        );
    }
    let attention_items = tuning_items(TUNE_ATTENTION)?;
    let attention = &mut options.fusion.attention;
    for (key, n) in &attention_items {
        match (key.as_str(), *n) {
            ("warps", 4 | 8) => attention.warps = *n as u32,
            ("stages", 1 | 2) => attention.stages = *n as u32,
            ("mtiles", 1 | 2) => attention.m_tiles = *n as u32,
            ("warps", _) => bail!("{TUNE_ATTENTION}: warps={n}: 4 or 8"),
            ("stages", _) => bail!("{TUNE_ATTENTION}: stages={n}: 1 or 2"),
            ("mtiles", _) => bail!("{TUNE_ATTENTION}: mtiles={n}: 1 or 2"),
            _ => bail!("{TUNE_ATTENTION}: unknown key `{key}` (warps, stages, mtiles)"),
        }
    }
    if !attention_items.is_empty() {
        eprintln!(
            "kiln bench: {TUNE_ATTENTION}: warps {}, stages {}, m16 tiles a warp {}",
            attention.warps, attention.stages, attention.m_tiles
        );
    }
    Ok(())
}

pub(crate) fn run(args: BenchArgs) -> Result<ExitCode> {
    let args = match args.what {
        BenchWhat::Kernels(args) => args,
        BenchWhat::Decode(args) => return crate::bench_decode::run(args),
        BenchWhat::Consensus(args) => return crate::bench_consensus::run(args),
        BenchWhat::Serve(args) => {
            kiln_driver::bench_serve::run(&args)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let torch = read_peers(args.torch_json.as_deref())?;
    let gpu = Gpu::open()?;
    let mut options = gpu.compile_options();
    apply_tuning(&mut options)?;
    let all = cases();
    if let Some(unknown) = args
        .cases
        .iter()
        .find(|name| !all.iter().any(|case| case.function == name.as_str()))
    {
        let known: Vec<&str> = all.iter().map(|case| case.function).collect();
        bail!("--case {unknown}: no such case ({})", known.join(", "));
    }
    // Only the chosen cases (and the copy) are compiled: an A/B of one knob takes seconds.
    let entries = (!args.cases.is_empty()).then(|| {
        let mut entries = args.cases.clone();
        entries.push("copy".to_string());
        entries
    });
    let (package, cuda) = gpu.compile_entries("bench.kiln", PROGRAM, None, entries, &options)?;
    let mut results = Vec::new();
    let mut copy_gbs = None;
    println!(
        "{:<18} {:>8} {:>10} {:>9} {:>8} {:>8} {:>9} {:>9}",
        "case", "kernels", "median ms", "GB/s", "of copy", "TFLOP/s", "x eager", "x compile"
    );
    let chosen = all.into_iter().filter(|case| {
        case.function == "copy"
            || args.cases.is_empty()
            || args.cases.iter().any(|name| name == case.function)
    });
    for case in chosen {
        let mut program = CudaProgram::new(cuda.clone(), case.function)?;
        program.bind_weights(&|_| None)?;
        let timing = program.time_launches(&case.inputs, args.runs)?;
        let gbs = case.bytes as f64 / (timing.median_ms * 1e-3) / 1e9;
        if case.function == "copy" {
            copy_gbs = Some(gbs);
        }
        let kernel_names: Vec<&str> = package
            .compiled
            .stats
            .launches
            .iter()
            .filter(|k| k.function == case.function)
            .map(|k| k.name.as_str())
            .collect();
        let launches = kernel_names.len();
        let tflops = case
            .flops
            .map(|f| f as f64 / (timing.median_ms * 1e-3) / 1e12);
        // PyTorch's time for the same case: ratios are time ratios (above 1: kiln is faster).
        let peer = |mode: &str| {
            torch
                .as_ref()
                .and_then(|t| t[mode][case.function]["median_ms"].as_f64())
        };
        let (eager, compiled) = (peer("eager"), peer("compiled"));
        let fraction = copy_gbs.map(|c| gbs / c);
        let show = |x: Option<f64>| x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<18} {:>8} {:>10.4} {:>9.0} {:>8} {:>8} {:>9} {:>9}",
            case.function,
            launches,
            timing.median_ms,
            gbs,
            show(fraction),
            show(tflops),
            show(eager.map(|e| e / timing.median_ms)),
            show(compiled.map(|c| c / timing.median_ms)),
        );
        results.push(serde_json::json!({
            "case": case.function,
            "kernels": launches,
            "kernel_names": kernel_names,
            "median_ms": timing.median_ms,
            "min_ms": timing.min_ms,
            "bytes": case.bytes,
            "gb_per_s": gbs,
            "fraction_of_copy": fraction,
            "tflop_per_s": tflops,
            "torch_eager_median_ms": eager,
            "torch_compile_median_ms": compiled,
            "speedup_vs_torch_eager": eager.map(|e| e / timing.median_ms),
            "speedup_vs_torch_compile": compiled.map(|c| c / timing.median_ms),
        }));
    }
    let out = gpu.record(serde_json::json!({
        "runs": args.runs,
        "kiln": results,
        "torch": torch,
    }));
    let text = serde_json::to_string_pretty(&out)?;
    if let Some(path) = &args.out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("kiln: wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The peers' numbers (the JSON `benches/torch_peers.py` prints), when a file is given.
pub(crate) fn read_peers(path: Option<&std::path::Path>) -> Result<Option<serde_json::Value>> {
    path.map(|path| -> Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    })
    .transpose()
}

/// The GPU, its kiln target and ptxas.
pub(crate) struct Gpu {
    pub device: CudaDevice,
    pub target: Target,
    pub toolchain: Toolchain,
}

impl Gpu {
    /// A result record: the GPU (name, compute capability, driver), the commit and the
    /// target first, then the fields of `rest` (a JSON object) in their order.
    pub fn record(&self, rest: serde_json::Value) -> serde_json::Value {
        let info = self.device.info();
        let (major, minor) = info.compute_capability;
        let mut out = serde_json::json!({
            "device": info.name,
            "compute_capability": format!("{major}.{minor}"),
            "driver": info.driver_version.to_string(),
            "commit": kiln_driver::bench_serve::commit(),
            "target": self.target.sm_name(),
        });
        if let (Some(out), serde_json::Value::Object(rest)) = (out.as_object_mut(), rest) {
            out.extend(rest);
        }
        out
    }

    pub fn open() -> Result<Gpu> {
        let device = CudaDevice::new(0).context("kiln bench needs a GPU")?;
        let (major, minor) = device.info().compute_capability;
        let target = Target::for_compute_capability(major, minor)
            .ok_or_else(|| anyhow!("no kiln target for compute capability {major}.{minor}"))?;
        let toolchain = Toolchain::discover()?;
        Ok(Gpu {
            device,
            target,
            toolchain,
        })
    }

    /// The compile options for this GPU's target.
    pub fn compile_options(&self) -> CompileOptions {
        CompileOptions {
            targets: vec![self.target],
            ..CompileOptions::default()
        }
    }

    /// Compiles a lowered program for this GPU and loads it.
    pub fn compile_lowered(
        &self,
        name: &str,
        lowered: kiln_lower::Lowered,
        options: &CompileOptions,
    ) -> Result<(pipeline::Package, Arc<CudaPackage>)> {
        let package = pipeline::compile(name, lowered, options, Some(&self.toolchain))?;
        let fatbin = package
            .fatbin
            .as_ref()
            .ok_or_else(|| anyhow!("not assembled"))?;
        let cuda = Arc::new(CudaPackage::from_image(
            &self.device,
            package.manifest.clone(),
            fatbin,
            name,
        )?);
        Ok((package, cuda))
    }

    /// [`Gpu::compile_lowered`] of a program's source, params in f32 unless they say.
    pub fn compile_source(
        &self,
        name: &str,
        source: &str,
        config: Option<&serde_json::Value>,
        options: &CompileOptions,
    ) -> Result<(pipeline::Package, Arc<CudaPackage>)> {
        self.compile_entries(name, source, config, None, options)
    }

    /// [`Gpu::compile_source`] of only the entry functions `entries` (all when `None`).
    pub fn compile_entries(
        &self,
        name: &str,
        source: &str,
        config: Option<&serde_json::Value>,
        entries: Option<Vec<String>>,
        options: &CompileOptions,
    ) -> Result<(pipeline::Package, Arc<CudaPackage>)> {
        let (program, diags) = kiln_lower::Program::load_source(name, source, None);
        if diags.iter().any(|d| d.is_error()) {
            bail!("{}", program.sources.render(&diags));
        }
        let lower_options = kiln_lower::Options {
            entries,
            ..kiln_lower::Options::default()
        };
        let (lowered, diags) = kiln_lower::lower(&program, config, &lower_options);
        let lowered = lowered.ok_or_else(|| anyhow!("{}", program.sources.render(&diags)))?;
        self.compile_lowered(name, lowered, options)
    }

    /// The copy bandwidth in GB/s (bf16, 512 MB read and written; median of `runs`).
    pub fn copy_bandwidth(&self, runs: usize) -> Result<f64> {
        let source = "fn copy(x: bf16[R, 4096]) -> bf16[R, 4096] { x + 0.0 }";
        let (_, cuda) = self.compile_source("copy.kiln", source, None, &self.compile_options())?;
        let case = copy_case();
        let mut program = CudaProgram::new(cuda, case.function)?;
        program.bind_weights(&|_| None)?;
        let timing = program.time_launches(&case.inputs, runs)?;
        Ok(case.bytes as f64 / (timing.median_ms * 1e-3) / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel names each decode GEMM case compiles to with the default options, the
    /// tensor-core GEMV switched to `mma_gemv` with `tiles` n8 tiles a block.
    fn decode_kernels(function: &str, mma_gemv: bool, tiles: u32) -> Vec<String> {
        let (program, diags) = kiln_lower::Program::load_source("bench.kiln", PROGRAM, None);
        assert!(!diags.iter().any(|d| d.is_error()));
        let options = kiln_lower::Options {
            entries: Some(vec![function.to_string()]),
            ..kiln_lower::Options::default()
        };
        let (lowered, _) = kiln_lower::lower(&program, None, &options);
        let mut module = lowered.expect("lowered").module;
        kiln_opt::optimize(&mut module).expect("optimized");
        let mut fusion = kiln_gpu_kernels::Options::default();
        fusion.gemm.mma_gemv = mma_gemv;
        fusion.gemm.mma_gemv_tiles = tiles;
        let compiled = kiln_gpu_kernels::compile_module(&module, &fusion).expect("compiled");
        compiled.kernels.iter().map(|k| k.name.clone()).collect()
    }

    #[test]
    fn the_decode_gemm_cases_take_the_gemvs() {
        // M = 1: the GEMV; M = 16 with `mmagemv=1`: the tensor-core GEMV, one kernel a GEMM,
        // no sum kernel; `mmagemvtiles=2|4`: 2 or 4 n8 tiles a block, fewer chunks a step.
        for (function, kind, gemms, tiles) in [
            ("decode_m1_4096", "gemv_w4", 4, 1),
            ("decode_m1_14336", "gemv_w4", 1, 1),
            ("decode_m16_4096", "mma_gemv_n8_w4_u8_", 4, 1),
            ("decode_m16_14336", "mma_gemv_n8_w4_u8_", 1, 1),
            ("decode_m16_4096", "mma_gemv_n8_w4_u4_t2_", 4, 2),
            ("decode_m16_14336", "mma_gemv_n8_w4_u4_t2_", 1, 2),
            ("decode_m16_4096", "mma_gemv_n8_w4_u2_t4_", 4, 4),
            ("decode_m16_14336", "mma_gemv_n8_w4_u2_t4_", 1, 4),
        ] {
            let names = decode_kernels(function, true, tiles);
            assert_eq!(names.len(), gemms, "{function}: {names:?}");
            assert!(
                names.iter().all(|n| n.contains(kind)),
                "{function}: {names:?}"
            );
        }
        // By default (`mmagemv=0`) M = 16 takes the tensor-core decode tile.
        for function in ["decode_m16_4096", "decode_m16_14336"] {
            let names = decode_kernels(function, false, 1);
            assert!(
                names.iter().all(|n| !n.contains("gemv")),
                "{function}: {names:?}"
            );
        }
    }
}
