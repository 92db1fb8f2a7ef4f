//! Kernel templates and the fusion that picks them: a graph-IR function becomes a list of
//! kir kernels and an execution plan.
//!
//! Pipeline of [`compile_function`] (run kiln-opt's `default_pipeline` first):
//! 1. `graph`: use-def facts and element costs;
//! 2. `partition`: which values are materialized and which kernel computes each
//!    (pointwise, row reduction, loop reduction, matmul with horizontal fusion, attention;
//!    loops become plan loops with their bodies partitioned the same way, unless the plan
//!    runs them as one persistent kernel, `templates/persistent_loop.rs`);
//! 3. `templates`: each kernel group becomes a kir kernel, its element-wise work inlined by
//!    the one fusion mechanism in `emit` (index expressions over materialized buffers);
//! 4. `plan`: buffers, launches, loops, symbol bindings and the arena; identical kernels
//!    are shared;
//! 5. `stats`: per launch, the ops fused and the minimum bytes moved.
//!
//! Matmuls with bf16/f16 operands read straight from buffers use the tensor-core template
//! (`mma.sync` with an `ldmatrix`/`cp.async` pipeline, tiles from a fixed table keyed by
//! shape, with K split across blocks for decode shapes whose grid is too small: partial
//! sums in an f32 arena workspace, added in a fixed order by a second kernel that applies the
//! epilogue, or by the row-reduction kernel that first reads the result over its rows, the
//! RMSNorm after a residual add: `templates::RowSums`); those of at most [`GEMV_ROWS`]
//! rows of a `linear` weight the GEMV template instead (`templates/gemv.rs`: a warp a
//! column, no split-K; a symbolic row count gets it as a further run-time variant), and
//! those of at most [`MMA_GEMV_ROWS`] the tensor-core GEMV (`templates/mma_gemv.rs`:
//! m16n8k16 products on weights loaded straight into registers, K split over a block's
//! warps only; a symbolic row count gets it as its decode variant); other
//! matmuls a register-blocked SIMT GEMM (`templates/matmul.rs`, tiles chosen by shape).
//!
//! Deliberately absent: the wgmma/TMA and tcgen05 paths, split-K across blocks for
//! prefill-sized shapes (later templates);
//! caching a reduction row in registers between the reduction and the epilogue pass;
//! persistent loops with several instances per block or dynamic shared memory.

mod emit;
mod error;
mod graph;
mod partition;
mod plan;
pub mod stats;
mod templates;

pub use error::FusionError;
pub use stats::{KernelStats, Stats};
pub use templates::{choose_splits, choose_tile, MatmulTiling, MmaTile, GEMV_ROWS, MMA_GEMV_ROWS};

use kiln_ir::Module;
use kiln_kir::{Kernel, Plan};

/// How wide index arithmetic is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IndexWidth {
    /// I32 when every tensor a kernel touches stays below 2^31 elements with symbolic dims
    /// at most [`Options::symbol_bound`]; I64 otherwise.
    #[default]
    Auto,
    I32,
    I64,
}

/// Options of the fusion compiler.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub index_width: IndexWidth,
    /// The largest value a symbolic dim is assumed to take (for [`IndexWidth::Auto`]).
    pub symbol_bound: u64,
    /// The tiling of the plain matmul template for every matmul (`None`: chosen by shape,
    /// [`MatmulTiling::choose`]).
    pub matmul_tiling: Option<MatmulTiling>,
    /// Whether bf16/f16 matmuls may use the tensor-core template (else every matmul uses
    /// the plain tiling).
    pub tensor_cores: bool,
    /// Whether FP8 matmuls (`f32(a) @ f32(b).T` of f8e4m3 or f8e5m2 operands, `scaled_mm`)
    /// may use the tensor-core template's m16n8k32 FP8 `mma`, which needs sm_89 or later
    /// (the driver turns it off when a target lacks it; they then take the plain template,
    /// converting in its prologue).
    pub fp8_tensor_cores: bool,
    /// Whether every compiled target has Hopper's `wgmma` (sm_90a): the driver sets it from
    /// the targets (off by default, and always for the CPU backend, which has none). With
    /// [`GemmTuning::wgmma`], prefill bf16/f16 GEMMs of `linear` weights then take the
    /// `wgmma` template (`templates/wgmma_gemm.rs`).
    pub wgmma: bool,
    pub pointwise: PointwiseTuning,
    pub paged: PagedTuning,
    pub persistent: PersistentTuning,
    pub gemm: GemmTuning,
    pub attention: AttentionTuning,
}

/// Knobs of the tensor-core attention prefill template (`templates/flash_attention.rs`; the
/// defaults are what kiln compiles with, `kiln bench` may compare the variants through
/// `KILN_TUNE_ATTENTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionTuning {
    /// Warps of a block, `16 · m_tiles` query rows each: 4 or 8 (fewer than 8 take 4,
    /// more take 8). 8: each K/V tile copied once for twice the rows of 4 warps.
    pub warps: u32,
    /// K/V tiles in shared memory (1 or 2). 1: one K and one V buffer, V of a tile copied
    /// during its scores and K of the next during P·V. 2: two of each, the next tile's K
    /// and V copied (`cp.async`) while this tile is computed. More than 48 KiB of shared
    /// arrays (D 128: 8 warps take 64 KiB with 1 stage and 96 KiB with 2) run from dynamic
    /// shared memory; every configuration fits the 99 KiB of sm_89 and sm_120.
    pub stages: u32,
    /// m16 row tiles a warp owns (1 or 2; 2 by default, with 4 warps: 128 query rows a
    /// block): a block takes `16 · m_tiles · warps` query rows.
    /// 2: each K and V fragment read from shared memory feeds two `mma`s (half the shared
    /// memory reads per row), the Q fragments reloaded from shared memory for each 16
    /// columns of the head dim instead of held in registers. With 2 tiles, D 128 takes 1
    /// stage (64 KiB of shared memory at 4 warps, 96 at 8) and a general mask at D 128
    /// keeps 1 tile with 8 warps: what ptxas fits in 255 registers without spills.
    pub m_tiles: u32,
}

impl Default for AttentionTuning {
    fn default() -> AttentionTuning {
        AttentionTuning {
            warps: 4,
            stages: 2,
            m_tiles: 2,
        }
    }
}

/// Knobs of the tensor-core GEMM template (`templates/mma_gemm.rs`; the defaults are what
/// kiln compiles with, `kiln bench` may compare the variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmTuning {
    /// Whether decode-sized fused matmuls of unequal widths (q/k/v) run a grid of
    /// segments, each block one matmul's tile (else every block computes a tile of each
    /// over the widest matmul's grid).
    pub segments: bool,
    /// Whether a grid of segments of at most a block per SM of an H100 splits K across
    /// blocks (a partial-sum kernel and a sum kernel).
    pub segment_splits: bool,
    /// Whether a split-K GEMM whose stored values are first read by a row reduction over
    /// their rows (the residual add read by the next RMSNorm) leaves its sum to that row
    /// kernel (`templates::RowSums`: one kernel fewer) instead of launching a sum kernel.
    pub row_sums: bool,
    /// Whether the sum kernel of a split-K grid of segments (decode q/k/v) stores the rows
    /// of a segment whose values only `kv_write`s read straight into the caches at their
    /// slots (`templates::KvWrites`: the `kv_write` kernel disappears). Off: on an H100 the
    /// 1.1B decode step took 1.322–1.324 ms/token with it and 1.299–1.301 without
    /// (`…-decode-ab-99e3952.txt`): the sum kernel's k rows add RoPE's second half (three
    /// sums an element) and each layer's sum kernel becomes its own kernel, which costs
    /// more than the 16 `kv_write` launches it saves.
    pub kv_writes: bool,
    /// The most blocks a decode GEMM's k slices are split over (0: the template's limit,
    /// 8; 1: no split-K across blocks). On an H100 the 4096 × 4096 decode GEMM read 2101 /
    /// 2116 GB/s (M = 1 / 16) split 4 ways, 2133 / 2075 split 2 ways and 1948 / 1941 unsplit
    /// (`…-decode-ab-99e3952.txt`).
    pub max_splits: u32,
    /// Prefill block tile `(bm, bn)` of 16-bit GEMMs (0: the tile table, `choose_tile`);
    /// used when the tile it makes is valid and fits shared memory, else the table's.
    /// Default 128 × 256 with 2 × 4 warps, 4 stages, block rows rasterized by 8, double-
    /// buffered fragments and paired stores: on an H100 (`…-kernels-ab-*.txt`, stop 16) the
    /// 4096³ / 8192³ / 4096×14336×4096 GEMMs ran at 457 / 498 / 467 TFLOP/s with slices of
    /// 64 in 227 KiB (an sm_90a build), 423 / 459 / 430 with slices of 32 in 99 KiB (every
    /// target), against 354 / 356 / 336 for the table's 128 × 128 tile of 4 warps.
    pub tile: (u32, u32),
    /// Prefill warps `(warps_m, warps_n)` of 16-bit GEMMs (0: the table's 2 × 2).
    pub warps: (u32, u32),
    /// Width of a prefill k slice of 16-bit GEMMs (0: 64 where four stages of the tile fit
    /// the shared memory, else the table's 32).
    pub bk: u32,
    /// Prefill pipeline stages (0: as many as fit, at most 4).
    pub stages: u32,
    /// Block rasterization of prefill grids: consecutive blocks walk groups of this many
    /// block rows column by column, so that a wave of blocks shares A and B tiles in L2
    /// (0 or 1: the plain row-major block order).
    pub raster: u32,
    /// Whether the prefill main loop double-buffers the A/B fragments in registers: the
    /// `ldmatrix` of k16 step i + 1 (of the next slice after the last step) is issued before
    /// the `mma`s of step i, and the next stage's `cp.async` after the first step's
    /// fragments.
    pub double_buffer: bool,
    /// Whether the prefill epilogue stores each thread's two adjacent output columns as one
    /// 2-element vector (operands read likewise, one bounds check) where every stored width
    /// is even (`_p2` in the kernel name).
    pub paired_epilogue: bool,
    /// The shared memory a tuned prefill tile may use, in KiB (0: 99, the smallest opt-in
    /// limit of the five targets; a kernel compiled for sm_90a alone, as `kiln bench` does
    /// on an H100, may use up to 227).
    pub shared_kib: u32,
    /// Whether each block of a decode-sized GEMM (the M ≤ 16 tile, split-K and segmented
    /// grids included) asks L2 for its slice of an `[N, K]` weight before its
    /// grid-dependency wait (`cp.async.bulk.prefetch.L2` on sm_90 and later), so that the
    /// weight streams from HBM while the previous kernel finishes and during the pipeline's
    /// ramp-up; the real loads then hit L2. Off by default: on an H100 the 1.1B decode step
    /// took 1.286 / 1.346 ms a token with the prefetch and the trigger and 1.231 without
    /// (`…-decode-ab-*.txt`, stop 16), although a chain of four 4096² M = 1 GEMVs alone read
    /// 2568 GB/s with them and 2303 without.
    pub prefetch: bool,
    /// The most weight bytes, in MiB, one decode GEMM's blocks prefetch together (0: the
    /// template's 24, about half an H100's L2): a larger weight prefetches that share of
    /// each block's k range, from its start.
    pub prefetch_mib: u32,
    /// Whether a decode-sized GEMM block lets the next kernel launch once its main loop has
    /// issued its last weight loads (`griddepcontrol.launch_dependents`), so that a
    /// following GEMM's blocks prefetch their weights while this one's reduction and
    /// epilogue run. On: the next kernel still waits for this one to finish before it
    /// touches memory, so only timing changes, and without it a prefetching GEMM after a
    /// GEMM (gate/up → down) could only start prefetching when the last block had exited.
    /// Off by default with `prefetch` (the decode step measured faster without both).
    pub trigger: bool,
    /// Whether every kernel without a trigger of its own lets the next kernel launch right
    /// after its grid-dependency wait (`griddepcontrol.launch_dependents`), so that the
    /// next one's blocks load their constant weights (`preload`) while this one runs. After
    /// the wait, not before it: a kernel launched early cannot let a third one launch
    /// before it has started its own work. On by default: with four GEMV vectors a step
    /// (`gemv_unroll`) the 1.1B decode step on the H100, timed on the GPU alone, took
    /// 1.067 ms against 1.097 without either (`…-decode-knobs2-7c945f7.txt`).
    pub early_trigger: bool,
    /// Whether a kernel without a grid-dependency wait of its own waits after its leading
    /// statements that may precede the wait when they load something (constant or settled
    /// buffers: a norm's gain, loaded first by the row kernels), instead of before its body,
    /// so that those loads overlap the kernel before it (`KILN_TUNE_GEMM=earlyloads=0|1`).
    /// Off by default: on the H100 the 1.1B decode step on the GPU alone took 0.997 /
    /// 1.001 ms with the norms' gains before the wait against 0.985 / 0.987 without
    /// (`…-decode-early-loads-wip.txt`).
    pub early_loads: bool,
    /// Whether a GEMV block (and a tensor-core GEMV warp, `mma_gemv`) loads its first step
    /// of weights before its grid-dependency wait (weights are checkpoint tensors,
    /// [`kiln_kir::Access::Constant`]): with programmatic dependent launch those loads, and
    /// a norm prologue's statistic after the wait, overlap the end of the kernel before it.
    /// Not in the q/k/v grid that writes the KV caches (ptxas spilled with it). Off by
    /// default: the 1.1B decode step on the H100 measured no faster with it (1.401, 1.307,
    /// 1.315 ms a token against 1.259, 1.329 and, with the merge kernel, 1.226 / 1.330
    /// without; `…-decode-ab-{c505a83,1f8206f}.txt`).
    pub preload: bool,
    /// Whether matmuls of at most [`GEMV_ROWS`] rows (a constant, or a symbolic row count
    /// as a further run-time variant) of `linear` weights take the GEMV template
    /// (`templates/gemv.rs`: a warp a column, 16-byte weight loads, no split-K, no sum
    /// kernel) instead of the tensor-core decode tile.
    pub gemv: bool,
    /// 16-byte weight vectors a lane of the GEMV template loads together per step (fewer
    /// when the row is shorter or fused matmuls would hold too many registers), in GEMVs
    /// holding more than one row. 4 by default: the 1.1B decode step on the GPU alone took
    /// 1.084 ms with 4 against 1.097 with 8, and 1.067 with the early trigger too
    /// (`…-decode-knobs2-7c945f7.txt`, when the step ran the four-row variant).
    pub gemv_unroll: u32,
    /// [`GemmTuning::gemv_unroll`] for GEMVs holding one row (M = 1, and the one-row
    /// variant of a symbolic row count). 8 by default: the 1.1B decode step on the H100's
    /// GPU alone took 1.015–1.018 ms with 8 against 1.023–1.025 with 4
    /// (`…-decode-gemv-one-row-knobs-wip.txt`).
    pub gemv_unroll_one: u32,
    /// The most blocks of a GEMV that is not a grid of segments (0: no cap, a block for
    /// every group of 4 columns, `templates/gemv.rs`): with a cap below the column groups,
    /// each block loops over the groups `blockIdx.x, blockIdx.x + grid, ...`, so that what
    /// a block does once (a norm prologue, the first weights loaded before the
    /// grid-dependency wait) is paid once a block rather than once a group. Default 0.
    pub gemv_blocks: u32,
    /// The blocks an SM a GEMV block asks ptxas to fit (`Kernel::blocks_per_sm`, capping
    /// its registers at 65536 / (128 · N) a thread; 1 to 16). 4 by default (128 registers):
    /// on the H100 the 1.1B decode step took 1.069 / 1.175 / 1.295 ms with 5 / 6 / 8 against
    /// 1.058–1.064 with the four-row kernels (`…-decode-gemv-occupancy-wip.txt`), and no
    /// less with the one-row ones at 6.
    pub gemv_occupancy: u32,
    /// Whether prefill bf16/f16 GEMMs of `linear` weights take the `wgmma` template
    /// (`templates/wgmma_gemm.rs`: two warpgroups, a 128 × 256 tile, 128-byte swizzled
    /// `cp.async` stages read by `wgmma` descriptors) where every target has it
    /// ([`Options::wgmma`]); else the `mma.sync` template. On: on the H100, 587 / 611 /
    /// 601 TFLOP/s at 4096³ / 8192³ / 4096×14336×4096 against 455 / 505 / 469 for
    /// `mma.sync` (0.91 / 0.84 / 0.98× torch.matmul).
    pub wgmma: bool,
    /// Whether matmuls of at most [`MMA_GEMV_ROWS`] rows of `linear` weights that the GEMV
    /// does not take (5 to 16 rows, a constant or the decode variant of a symbolic row
    /// count) take the tensor-core GEMV (`templates/mma_gemv.rs`: m16n8k16 products on
    /// weight registers loaded straight from global memory, no split-K across blocks, no
    /// sum kernel) instead of the tensor-core decode tile. Off by default until measured
    /// against the decode tile on an H100 (`KILN_TUNE_GEMM=mmagemv=1`).
    pub mma_gemv: bool,
    /// 32-wide k chunks a warp of the tensor-core GEMV loads together per step (fewer when
    /// K is shorter or fused matmuls or several tiles would hold too many registers).
    pub mma_gemv_unroll: u32,
    /// Warps of a tensor-core GEMV block, splitting K (1 to 16).
    pub mma_gemv_warps: u32,
    /// n8 tiles of a tensor-core GEMV block (1, 2 or 4; others round down to one of
    /// these): each warp loads its A fragments once a chunk for all of them and issues one
    /// `mma` a tile, so that a block reads A once for `8 * tiles` columns. 1 by default:
    /// at M = 16 on the H100, 2 and 4 tiles measured no faster (4096²: 70% and 64% of the
    /// copy bandwidth against 70% with one).
    pub mma_gemv_tiles: u32,
    /// Whether a GEMV whose A is the normalized rows of a row-mean kernel (an RMSNorm) that
    /// stores nothing else, read by GEMVs only (gate/up, the LM head at decode sizes, q/k/v
    /// unless its GEMV writes the caches), computes them itself (`templates::NormPrologues`:
    /// the norm kernel disappears from the GEMV variant): each warp issues its first
    /// step's weight loads, computes the rows' statistic (a warp's order: rows longer than
    /// 1024 elements may differ from the row kernel's sum in the last bits) and the
    /// element-wise part in registers, rounded as the row kernel stores it; no shared
    /// memory, no barrier. Off by default: slower on the H100, where the 1.1B Llama's
    /// decode step took 1.293 ms on the GPU alone against 1.096 without (and the earlier
    /// block-wide design, the rows in shared memory behind two barriers, 1.604 ms a token
    /// against 1.279).
    pub norm_prologue: bool,
    /// With [`GemmTuning::norm_prologue`], whether the q/k/v GEMV that writes the caches
    /// computes its norm too, with no weight loads held over the statistic (with them
    /// ptxas spilled it on every target); off by default: slower still on the H100 (the
    /// step on the GPU alone 1.518 ms against 1.293 with the other norms only).
    pub norm_prologue_kv_writes: bool,
    /// Whether the GEMV of a grid of segments (decode q/k/v at most [`GEMV_ROWS`] tokens)
    /// stores the rows of a segment whose values only `kv_write`s read straight into the
    /// caches at their slots (`templates::KvWrites`, as the split-K sum kernel does with
    /// `kv_writes`): a warp of the k segment owns both columns of a rotary pair, lane 0
    /// applies RoPE and writes both; the `kv_write` kernel disappears (one launch fewer a
    /// layer).
    pub gemv_kv_writes: bool,
}

impl Default for GemmTuning {
    fn default() -> GemmTuning {
        GemmTuning {
            segments: true,
            segment_splits: true,
            row_sums: true,
            kv_writes: false,
            max_splits: 0,
            tile: (128, 256),
            warps: (2, 4),
            bk: 0,
            stages: 0,
            raster: 8,
            double_buffer: true,
            paired_epilogue: true,
            shared_kib: 0,
            prefetch: false,
            prefetch_mib: 0,
            trigger: false,
            early_trigger: true,
            early_loads: false,
            preload: false,
            gemv: true,
            gemv_unroll: 4,
            gemv_unroll_one: 8,
            gemv_blocks: 0,
            gemv_occupancy: 4,
            wgmma: true,
            mma_gemv: false,
            mma_gemv_unroll: 8,
            mma_gemv_warps: 4,
            mma_gemv_tiles: 1,
            norm_prologue: false,
            norm_prologue_kv_writes: false,
            gemv_kv_writes: true,
        }
    }
}

impl GemmTuning {
    /// The knob names [`GemmTuning::set`] takes.
    pub const KEYS: &'static str =
        "segments, splits, rowsum, kvwrite, maxsplits, tile, warps, bk, stages, raster, dbuf, pairs, \
         smem, prefetch, prefetch_mib, trigger, early, earlyloads, preload, gemv, gemvunroll, gemvunroll1, gemvblocks, gemvocc, normgemv, normqkv, wgmma, mmagemv, \
         mmagemvunroll, mmagemvwarps, mmagemvtiles, gemvkvwrite";

    /// Sets knob `key` (the `KILN_TUNE_GEMM` names, [`GemmTuning::KEYS`]) from `value`: a
    /// number (`0|1` for switches), or `AxB` for `tile` and `warps`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let pair = || -> Result<(u32, u32), String> {
            value
                .split_once('x')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| format!("`{key}={value}`: want AxB, two numbers"))
        };
        let number = || -> Result<u32, String> {
            value
                .parse()
                .map_err(|_| format!("`{key}={value}`: the value is not a number"))
        };
        match key {
            "tile" => self.tile = pair()?,
            "warps" => self.warps = pair()?,
            "segments" => self.segments = number()? != 0,
            "splits" => self.segment_splits = number()? != 0,
            "rowsum" => self.row_sums = number()? != 0,
            "kvwrite" => self.kv_writes = number()? != 0,
            "maxsplits" => self.max_splits = number()?,
            "bk" => self.bk = number()?,
            "stages" => self.stages = number()?,
            "raster" => self.raster = number()?,
            "dbuf" => self.double_buffer = number()? != 0,
            "pairs" => self.paired_epilogue = number()? != 0,
            "smem" => self.shared_kib = number()?,
            "prefetch" => self.prefetch = number()? != 0,
            "prefetch_mib" => self.prefetch_mib = number()?,
            "trigger" => self.trigger = number()? != 0,
            "early" => self.early_trigger = number()? != 0,
            "earlyloads" => self.early_loads = number()? != 0,
            "preload" => self.preload = number()? != 0,
            "gemv" => self.gemv = number()? != 0,
            "gemvunroll" => self.gemv_unroll = number()?.max(1),
            "gemvunroll1" => self.gemv_unroll_one = number()?.max(1),
            "gemvblocks" => self.gemv_blocks = number()?,
            "gemvocc" => self.gemv_occupancy = number()?.clamp(1, 16),
            "wgmma" => self.wgmma = number()? != 0,
            "mmagemv" => self.mma_gemv = number()? != 0,
            "mmagemvunroll" => self.mma_gemv_unroll = number()?.max(1),
            "mmagemvwarps" => self.mma_gemv_warps = number()?.clamp(1, 16),
            "mmagemvtiles" => {
                self.mma_gemv_tiles = match number()? {
                    0 | 1 => 1,
                    2 | 3 => 2,
                    _ => 4,
                }
            }
            "normgemv" => self.norm_prologue = number()? != 0,
            "normqkv" => self.norm_prologue_kv_writes = number()? != 0,
            "gemvkvwrite" => self.gemv_kv_writes = number()? != 0,
            _ => return Err(format!("unknown key `{key}` ({})", Self::KEYS)),
        }
        Ok(())
    }
}

/// Knobs of the persistent loop template (`templates/persistent_loop.rs`; the defaults are
/// what kiln compiles with, benchmarks may compare the variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PersistentTuning {
    /// Whether an eligible graph loop runs as one persistent kernel (else as a plan loop
    /// that launches its body's kernels every iteration).
    pub enabled: bool,
    /// Whether a matrix-vector product of a loop-invariant matrix keeps the matrix in
    /// registers (else it reads it from shared memory every iteration). Off: on an H100,
    /// RM+ on 10,000 games of 64×64 took 0.17 ms an iteration with the matrices in
    /// registers (256 threads, two games an SM) and 0.07 ms reading them from shared memory
    /// (`kiln bench consensus`).
    pub matrix_registers: bool,
    /// The blocks an SM the kernel asks ptxas to fit (`Kernel::blocks_per_sm`, capping its
    /// registers); 0 asks for 8 (the PTX emitter cuts it to what the target's shared memory
    /// allows); 1 leaves the registers to ptxas.
    pub blocks_per_sm: u32,
}

impl Default for PersistentTuning {
    fn default() -> PersistentTuning {
        PersistentTuning {
            enabled: true,
            matrix_registers: false,
            blocks_per_sm: 0,
        }
    }
}

/// Knobs of the pointwise template (the defaults are what kiln compiles with; `kiln bench
/// kernels` may override them to compare variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointwiseTuning {
    /// The most positions of a short outer axis one thread walks to reuse a broadcast
    /// transcendental operand (1: no walk).
    pub max_walk: u64,
    /// Whether a thread covers one vector in each equal segment of the innermost axis that
    /// the kernel's concats cut it into (RoPE's rotate-half: each element of `x` read once,
    /// no selects).
    pub segments: bool,
    /// Walk positions computed together, all their loads before their stores (1: one at a
    /// time); used when it divides the walk.
    pub unroll: u64,
}

impl Default for PointwiseTuning {
    fn default() -> PointwiseTuning {
        PointwiseTuning {
            max_walk: 8,
            segments: true,
            unroll: 1,
        }
    }
}

/// Knobs of the paged decode attention template (the defaults are what kiln compiles with;
/// `kiln bench` may override them to compare variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedTuning {
    /// Key positions of one partition (one block of the first kernel). 1024: on an H100 the
    /// tensor-core design read 2507 GB/s of KV with 1024, 2329–2341 with 512, 2163 with 256
    /// and 1625 with 128 (64 × 4096 keys, GQA 32/8, D 128; `…-kernels-c0e3c5f.txt` and
    /// `…-paged-ab-c0e3c5f.txt`, stop 16). The cost: a small batch of contexts between 512
    /// and a few thousand positions gets few blocks (the short-context variant takes those
    /// of at most `short_context`).
    pub part: u64,
    /// Keys one warp takes per loop step of the register design, their loads issued
    /// together (the staged design takes `tile / warps`). 8: on an H100 the
    /// long-context case (64 × 4096 keys, GQA 32/8, D 128) read 1214 GB/s with 8 and 1131
    /// with 4 (`…-paged-tuning-c7ac524.txt`); 167 registers, no spills on the five targets.
    pub unroll: usize,
    /// Warps of a block of the first kernel (the short variant takes `short_warps`, and
    /// `short_unroll` for `unroll`).
    pub warps: u32,
    /// Key positions of a partition when the block tables hold at most `short_context`
    /// positions (a variant the plan picks at run time by the block tables' width): short
    /// contexts then still make enough blocks. On an H100 the 1.1B decode step (≤ 256 keys)
    /// took 1.51 ms with partitions of 32 and 1.61 ms with 128, while 64 × 4096 keys read
    /// 687 GB/s with 32 and 1214 GB/s with 128 (`…-paged-tuning-c7ac524.txt`). Equal to
    /// `part` or more: no variant.
    pub short_part: u64,
    /// The most key positions (block-table width × block size) the short variant serves.
    pub short_context: u64,
    /// The short variant's `warps` and `unroll` (its partial kernel is the register
    /// design). 8 warps of 4 keys a step: on the H100 the 1.1B decode step (≤ 256 keys) on
    /// the GPU alone took 0.962 / 0.962 / 0.963 ms against 0.988 / 0.988 with 4 warps of 8
    /// (both with the preload), 0.972 / 0.973 with 16 of 2, 0.978 / 0.980 with 8 of 8 in
    /// partitions of 64, 0.987 with 16 of 4 in partitions of 64, 0.996 with 4 of 4 in
    /// partitions of 16, 1.026 with 2 of 8 in partitions of 16 and 1.031 with 16 of 8 in
    /// partitions of 128 (`…-decode-paged-short-sweep{,2}-wip.txt`).
    pub short_warps: u32,
    pub short_unroll: usize,
    /// Keys of one shared-memory tile of the staged designs of the long-context kernel
    /// (`templates/paged_decode.rs`: key and value tiles copied by `cp.async`, `stages - 1`
    /// tiles ahead of the math); 0 keeps the register design (a warp's keys loaded into
    /// registers each step). With `mma_warps` the tensor-core design; without, the
    /// CUDA-core one, each warp scoring `tile / warps` keys of a tile from shared memory
    /// (rounded up to a multiple of `warps`). `part` is rounded up to a multiple of it.
    /// The short-context variant always uses the register design. The CUDA-core staged
    /// design measured no faster than the register one on an H100 (64 × 4096 keys, GQA
    /// 32/8, D 128, one call: 1206 GB/s for the register design, 975 for tiles of 16 in 4
    /// stages, 1044 at 4 blocks an SM, 1209 with partitions of 256 at 4 blocks an SM, 881
    /// with 32 lanes a key, 747 with tiles of 32 in 2 stages, `…-paged-staged-1d5799f.txt`).
    /// Default 16: one 16-token cache block a tile of the tensor-core design.
    pub tile: u64,
    /// Tiles of the staged design in shared memory (2 or more; fewer when they would not
    /// fit 48 KiB beside the block merge, the register design when 2 do not).
    pub stages: u64,
    /// Blocks of the staged kernel an SM that ptxas fits the registers of
    /// (`Kernel::blocks_per_sm`); 0 or 1 leaves the registers to ptxas.
    pub blocks_per_sm: u32,
    /// Lanes of the staged design that split one key's head dim: 32 / `lanes` keys a warp
    /// at once, each score summed by log2(`lanes`) shuffles, one max across the lane
    /// groups a step and the groups' sums added after the loop (rounded up to a power of
    /// two of at most 32 and at least head dim / 16).
    pub lanes: u32,
    /// Warps of the tensor-core staged design of the long-context kernel (0: off; it
    /// needs `tile` > 0): the group's query heads (at most 16) as one m16 row tile of A
    /// fragments, each warp scoring `tile / warps` keys of a tile (rounded up to a multiple
    /// of 16) from swizzled shared memory with `mma.sync` m16n8k16 (`S = Q Kᵀ`), an online
    /// softmax on the accumulator fragments and `P V` on the tensor cores
    /// (`templates/paged_decode.rs`); rounded up to a power of two. It takes bf16 or f16 q,
    /// k and v (one type), head dims 64 and 128 and positive scales; elsewhere, or when 2
    /// stages do not fit beside the block merge, the register design runs. Default 1 (with
    /// tiles of 16 in 4 stages): the register design is issue-bound on an H100 (Nsight
    /// Compute: SM throughput 70%, DRAM 32%, 5 shuffle rounds a key and query head), and
    /// the tensor cores take a 16-key slab of all the group's heads in 32 `mma.sync` and
    /// 16 `ldmatrix` a warp — several times fewer instructions a key; 188 registers on
    /// sm_90a, no spills on the five targets; on the H100, 2163 GB/s of KV at partitions
    /// of 256 against 1213 for the register design (64 × 4096 keys; 2503–2521 at 1024).
    pub mma_warps: u32,
    /// Warps of the one-pass kernel of the short-context variant (0: off, the partial and
    /// merge kernels of `short_part` partitions): one block per (token, key/value head) of
    /// `one_pass` warps takes the whole block table (at most `short_context` positions) in
    /// the register design, its block-table row read once into shared memory, the warps
    /// merged in shared memory and the output stored: no workspace and no merge kernel (16
    /// launches fewer in the 1.1B decode step, whose merges took 4.1 µs a layer on the H100
    /// against 7.7 µs for the partial, Nsight Compute). Default 16: at one token the grid
    /// is one block per key/value head, so the warps a block are the keys in flight (16
    /// warps of `unroll` 8: 128 keys a step; ptxas caps them at 128 registers, no spills on
    /// the five targets). Off (0) by default: on the H100 the one-pass kernel took 14.3 µs
    /// a layer of the 1.1B decode step against 11.8 for the partial and merge kernels
    /// (Nsight Compute; 8 blocks at one token), and the step 1.54-1.60 ms against 1.51
    /// without it (`KILN_TUNE_PAGED=onepass=16`; `onepass=8` 1.52).
    pub one_pass: u32,
    /// Whether the partial kernel merges the partitions itself (`KILN_TUNE_PAGED=
    /// fusedmerge=0|1`): each block stores its partition's state, then one thread makes the
    /// block's stores visible at GPU scope and counts the block in a per-(token, key/value
    /// head) counter (`BufferKind::Zeroed`) with an atomic add; the block that arrives last
    /// reads every partition's state, merges them as the merge kernel does (same order,
    /// same operations: the same bits) and stores the output, then sets the counter back
    /// to zero for the next launch. One launch a layer fewer (16 in the 1.1B decode step,
    /// whose merge kernels took 4.2 µs a layer on the H100, mostly fixed cost); the last
    /// block reads only the partition states, (D + 2) floats a partition and query head.
    /// Off by default: on the H100 the long-context case (64 sequences of 4096 keys) read
    /// 2198 GB/s with it against 2518 with the merge kernel, and in the 1.1B decode step
    /// (Nsight Compute, `…-decode-step-ncu-efa79d4.csv`) the partial kernel with the merge
    /// took 12.2 µs against 7.7 + 4.2 for the partial and merge kernels, since the last
    /// block's merge runs after every other block, as the merge kernel did, and the wall
    /// clock showed no gain.
    pub fused_merge: bool,
    /// Whether the register design's blocks load the first step of their keys and values
    /// (and the block-table entries, sequences and positions those need) before the
    /// grid-dependency wait (`KILN_TUNE_PAGED=preload=0|1`), so that with programmatic
    /// dependent launch the cache's DRAM latency overlaps the end of the kernel before it
    /// (the q/k/v GEMV). Rows of the step's own tokens, which that kernel may be writing,
    /// are loaded again after the wait (`kiln_kir::Access::Settled`): a key position `j`
    /// of a token at position `p` in a step of `T` tokens is an earlier step's when
    /// `j ≤ p - T` (a sequence's tokens in one step hold consecutive positions). It
    /// applies where the sequences, positions and block tables are step inputs.
    pub preload: bool,
}

impl Default for PagedTuning {
    fn default() -> PagedTuning {
        PagedTuning {
            part: 1024,
            unroll: 8,
            warps: 4,
            short_part: 32,
            short_context: 512,
            short_warps: 8,
            short_unroll: 4,
            tile: 16,
            stages: 4,
            blocks_per_sm: 0,
            lanes: 16,
            mma_warps: 1,
            one_pass: 0,
            fused_merge: false,
            preload: true,
        }
    }
}

/// The default [`Options::symbol_bound`].
pub const DEFAULT_SYMBOL_BOUND: u64 = 1 << 16;

impl Default for Options {
    fn default() -> Options {
        Options {
            index_width: IndexWidth::Auto,
            symbol_bound: DEFAULT_SYMBOL_BOUND,
            matmul_tiling: None,
            tensor_cores: true,
            fp8_tensor_cores: true,
            wgmma: false,
            pointwise: PointwiseTuning::default(),
            paged: PagedTuning::default(),
            persistent: PersistentTuning::default(),
            gemm: GemmTuning::default(),
            attention: AttentionTuning::default(),
        }
    }
}

/// The kernels and plan of one function.
#[derive(Clone, Debug)]
pub struct CompiledFunction {
    pub kernels: Vec<Kernel>,
    pub plan: Plan,
    pub stats: Stats,
}

/// Every function of a module, sharing one list of kernels.
#[derive(Clone, Debug)]
pub struct CompiledModule {
    pub kernels: Vec<Kernel>,
    pub plans: Vec<Plan>,
    pub stats: Stats,
}

/// Compiles the function called `function` of `module`.
pub fn compile_function(
    module: &Module,
    function: &str,
    options: &Options,
) -> Result<CompiledFunction, FusionError> {
    let func = module
        .function(function)
        .ok_or_else(|| FusionError::UnknownFunction(function.to_string()))?;
    let mut kernels = Vec::new();
    let (plan, launches) = compile_into(func, options, &mut kernels)?;
    Ok(CompiledFunction {
        kernels,
        plan,
        stats: Stats { launches },
    })
}

/// Compiles every function of `module`.
pub fn compile_module(module: &Module, options: &Options) -> Result<CompiledModule, FusionError> {
    let mut kernels = Vec::new();
    let mut plans = Vec::new();
    let mut stats = Stats::default();
    for func in &module.functions {
        let (plan, launches) = compile_into(func, options, &mut kernels)?;
        plans.push(plan);
        stats.launches.extend(launches);
    }
    Ok(CompiledModule {
        kernels,
        plans,
        stats,
    })
}

fn compile_into(
    func: &kiln_ir::Function,
    options: &Options,
    kernels: &mut Vec<Kernel>,
) -> Result<(Plan, Vec<KernelStats>), FusionError> {
    let g = graph::FuncGraph::new(func);
    let part = partition::partition(&g)?;
    plan::PlanBuilder::new(&g, &part, options, kernels).build()
}
