//! The tensor-core GEMM template (SM80 `mma.sync` path) for bf16 and f16 matmuls with f32
//! accumulation: `[.., M, K] @ [.., K, N]` where both operands are read straight from
//! buffers, B either as stored (`[K, N]`, N contiguous) or as the transpose of a stored
//! `[N, K]` weight (K contiguous, the `linear` layout).
//!
//! The same template, with the input type as its parameter, takes FP8 matmuls (sm_89 and
//! later, [`crate::Options::fp8_tensor_cores`]): `f32(a) @ f32(w).T` of f8e4m3 (or f8e5m2)
//! operands, as the stdlib's `scaled_mm` writes it, with B the transpose of an `[N, K]`
//! weight (the layout torch._scaled_mm uses; 8-bit elements have no transposing
//! `ldmatrix`). The exact casts are dropped: the FP8 bytes are staged (16-element chunks,
//! slices of the same bytes as the 16-bit ones, [`fp8_tile`]), `ldmatrix` moves 16-byte rows
//! exactly as for 16-bit data, and each k32 step is one m16n8k32 `mma`. Per-tensor or
//! per-channel scales are ordinary epilogue work (`* scale_a * scale_b` after the matmul).
//!
//! A block computes a `bm × bn` output tile with `warps_m × warps_n × warps_k` warps, each
//! a `(bm / warps_m) × (bn / warps_n)` warp tile of m16n8k16 products over every
//! `warps_k`-th k16 step of each slice (split-K inside the block: for decode-sized M the
//! warps share one narrow output tile, so more weight bytes are in flight per block; their
//! partial sums meet through shared memory before the epilogue):
//! - a `stages`-deep `cp.async` pipeline stages `bk`-wide slices of A and B in shared
//!   memory (16-byte chunks; rows or k beyond the matrix are zero-filled with a source
//!   length of 0, so ragged M, N and K need no other guard);
//! - each 16-byte chunk's position in its shared-memory row is XORed with bits of the row
//!   index ([`swizzle`]) so that the 8 rows one `ldmatrix` reads fall in 8 different bank
//!   groups;
//! - `ldmatrix` ×4 loads A fragments and pairs of B fragments (`.trans` for `[K, N]` B);
//! - the accumulators go through the same epilogue as the plain template (bias,
//!   activation, residual, cast, horizontally fused matmuls), bounds-checked per element.
//!
//! The tile is chosen per shape by [`choose_tile`] (a fixed table, nothing is tuned at run
//! time) and named in the kernel name (`mma_gemm_128x128x32_w2x2_s3`).
//!
//! Horizontally fused matmuls normally share the grid: it covers the widest output and
//! every block computes the same column tile of each (accumulators and B tiles for all).
//! At decode sizes (M at most 16) matmuls of different widths (GQA's q/k/v) get a grid of
//! segments instead ([`segments`], `_seg` in the name): block column x belongs to the
//! matmul whose run of `ceil(N / bn)` block columns holds it (a block-uniform choice) and
//! computes column tile `x - start` of that matmul only, with the single-matmul decode tile
//! and one B tile. The B copies and the epilogue branch on the segment; the A copies, the
//! mma loop and the split-K-warp reduction are shared. Otherwise a block whose column lies
//! past the narrower matmuls streams one weight tile while the first blocks stream three.
//! It applies when every stored value comes from one matmul and the B operands share a
//! layout; prefill-sized tiles keep the shared grid.
//!
//! Split-K across blocks (decode shapes whose grid would leave the SMs underfed, chosen by
//! [`choose_splits`] from the shape alone): block row `y` of the grid takes the `y`th run of
//! consecutive k slices and writes its f32 partial sums to a workspace `[splits, batch..,
//! M, N]` (an arena temp of the plan); a second kernel ([`emit_split_sum`], named
//! `splitkS_sum`) adds the partial sums of each output element in split order and applies
//! the epilogue (unless a row-reduction kernel reading the result does so itself,
//! `super::RowSums`). A grid of segments splits the same way while it has at most a block per SM
//! of an H100 (q/k/v of the 1.1B Llama: 96 block columns, split over 4 blocks each), its
//! workspace rows holding the segments' columns side by side (`[splits, batch.., M, sum of
//! N]`). A fixed-order sum rather than f32 atomics into a zeroed buffer: the same
//! input gives the same bits on every run, no zeroing launch is needed, and the kernel IR
//! needs no atomics. A matmul the
//! template cannot take (another dtype, a fused prologue on an operand, K or a `[K, N]`
//! B's N not a multiple of 8, a symbolic K) goes to the plain tiled template.

use super::matmul::{batch_index, epilogue_at, epilogue_lanes, kernel_name, OutputElement};
use super::{ceil_div_size, size_of_dims, Body, KvFused, Workspace};
use crate::emit::{add, and, div, lt, mul, rem, sub, EResult, Emitter, SplitSum};
use crate::graph::FuncGraph;
use crate::partition::Group;
use crate::plan::dim_size;
use kiln_ir::{DType, Dim, Op, Value};
use kiln_kir::{BinOp, Buf, Expr, MmaInput, SizeExpr, Special, Stmt, Ty, VarId};
use std::collections::BTreeSet;

/// Elements of one 16-byte chunk of `input` values: 8 (16-bit) or 16 (FP8).
pub(crate) fn chunk_elements(input: MmaInput) -> i64 {
    16 / (input.bits() as i64 / 8)
}
/// Elements of one 16-byte chunk (16-bit elements).
pub(crate) const CHUNK: i64 = 8;

/// The static shared memory a block may use.
const SHARED_BYTES: u32 = 48 * 1024;

/// The shared memory a block of a tuned prefill tile may use ([`tuned_tile`]): the smallest
/// opt-in limit of the kiln targets (sm_89 and sm_120: 99 KiB; sm_80 has 163, sm_90a and
/// sm_100a 227), so that one kernel assembles for all of them. Past the static 48 KiB the
/// arrays live in the dynamic window (`kiln_kir::shared_layout`).
const TUNED_SHARED_BYTES: u32 = 99 * 1024;

/// Accumulator registers per thread the tile table stays within.
const MAX_ACCUMULATORS: u32 = 128;

/// One entry of the tile table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaTile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub warps_m: u32,
    pub warps_n: u32,
    /// Warps splitting each slice's k16 steps among them.
    pub warps_k: u32,
    pub stages: u32,
    /// Blocks splitting the k slices among them (1: no split across blocks; see
    /// [`choose_splits`]).
    pub splits: u32,
    /// Whether the grid's block columns are laid out by segments, one per horizontally
    /// fused matmul (each block computes one matmul's tile; see [`segments`]).
    pub segmented: bool,
}

impl MmaTile {
    pub fn threads(&self) -> u32 {
        32 * self.warps_m * self.warps_n * self.warps_k
    }

    /// Rows of a warp tile.
    pub fn warp_m(&self) -> u32 {
        self.bm / self.warps_m
    }

    /// Columns of a warp tile.
    pub fn warp_n(&self) -> u32 {
        self.bn / self.warps_n
    }

    /// f32 accumulators per thread for `matmuls` fused matmuls.
    pub fn accumulators(&self, matmuls: u32) -> u32 {
        matmuls * (self.warp_m() / 16) * (self.warp_n() / 8) * 4
    }

    /// Shared-memory bytes of one pipeline stage for `matmuls` B operands (16-bit data).
    pub fn stage_bytes(&self, matmuls: u32) -> u32 {
        2 * self.bk * (self.bm + matmuls * self.bn)
    }

    /// Shared-memory bytes where the split-K warps leave their partial sums.
    pub fn reduction_bytes(&self, matmuls: u32) -> u32 {
        (self.warps_k - 1) * 32 * self.warps_m * self.warps_n * self.accumulators(matmuls) * 4
    }

    /// `128x128x32_w2x2_s3`, `16x32x128_w1x2x4_s3` with split-K warps,
    /// `16x32x128_w1x2x4_s3_splitk5` with the k slices split over 5 blocks, and
    /// `16x32x128_w1x2x4_s3_seg` for a grid of segments.
    pub fn name(&self) -> String {
        let warps_k = if self.warps_k > 1 {
            format!("x{}", self.warps_k)
        } else {
            String::new()
        };
        let splits = if self.splits > 1 {
            format!("_splitk{}", self.splits)
        } else {
            String::new()
        };
        let segmented = if self.segmented { "_seg" } else { "" };
        format!(
            "{}x{}x{}_w{}x{}{warps_k}_s{}{segmented}{splits}",
            self.bm, self.bn, self.bk, self.warps_m, self.warps_n, self.stages
        )
    }
}

/// The tile for an `m × n` output (m `None` when symbolic) of `matmuls` horizontally fused
/// matmuls: 128×128 blocks of four 64×64 warp tiles for large shapes, 64-row blocks when M
/// is known to be at most 64, narrower blocks while the accumulators would exceed
/// [`MAX_ACCUMULATORS`]; as many stages (2 to 4) as fit in 48 KiB of shared memory.
/// Decode-sized M (at most 16) gets one m16 row of 32-column tiles with 128-wide k slices
/// split over 4 warps, so that a 4096-wide N still makes 128 blocks that each keep tens of
/// KiB of weights in flight (and [`choose_splits`] may split K across blocks).
pub fn choose_tile(m: Option<u64>, n: u64, matmuls: u32) -> MmaTile {
    if m.is_some_and(|m| m <= 16) && matmuls <= 3 {
        // Fused matmuls sharing the grid (gate and up; three of one width) take half the
        // split-K warps, and three of them half the slice, to fit their B tiles in two or
        // more stages. (Unequal widths, q/k/v, usually get a grid of segments instead, with
        // the single-matmul tile: see `plan`.)
        let mut tile = MmaTile {
            bm: 16,
            bn: 32,
            bk: if matmuls <= 2 { 128 } else { 64 },
            warps_m: 1,
            warps_n: 2,
            warps_k: if matmuls == 1 { 4 } else { 2 },
            stages: 2,
            splits: 1,
            segmented: false,
        };
        tile.stages = ((SHARED_BYTES - tile.reduction_bytes(matmuls)) / tile.stage_bytes(matmuls))
            .clamp(2, 4);
        return tile;
    }
    let mut tile = MmaTile {
        bm: if m.is_some_and(|m| m <= 64) { 64 } else { 128 },
        bn: if n <= 64 { 64 } else { 128 },
        bk: 32,
        warps_m: 2,
        warps_n: 2,
        warps_k: 1,
        stages: 2,
        splits: 1,
        segmented: false,
    };
    while tile.accumulators(matmuls) > MAX_ACCUMULATORS && tile.bn > 32 {
        tile.bn /= 2;
    }
    while tile.accumulators(matmuls) > MAX_ACCUMULATORS && tile.bm > 32 {
        tile.bm /= 2;
    }
    tile.stages = (SHARED_BYTES / tile.stage_bytes(matmuls)).clamp(2, 4);
    tile
}

/// The prefill tile of a 16-bit GEMM under `tuning`'s overrides of the block tile, the
/// warps, the slice width and the stages (`GemmTuning::{tile, warps, bk, stages}`): the
/// table's tile ([`choose_tile`]) with each override that is set, the same narrowing while
/// the accumulators exceed [`MAX_ACCUMULATORS`], and as many stages as asked for that fit
/// in [`TUNED_SHARED_BYTES`] or `GemmTuning::shared_kib` (at most 4 when none is asked
/// for). Decode-sized tiles (split-K warps) and M known to be at most 64 keep the table's;
/// so does an override whose tile the template cannot run ([`valid_prefill_tile`]).
pub fn tuned_tile(m: Option<u64>, n: u64, matmuls: u32, tuning: &crate::GemmTuning) -> MmaTile {
    let table = choose_tile(m, n, matmuls);
    let overridden =
        tuning.tile != (0, 0) || tuning.warps != (0, 0) || tuning.bk != 0 || tuning.stages != 0;
    if !overridden || table.warps_k > 1 || m.is_some_and(|m| m <= 64) {
        return table;
    }
    let mut t = table;
    let pick = |knob: u32, table: u32| if knob > 0 { knob } else { table };
    t.bm = pick(tuning.tile.0, t.bm);
    t.bn = pick(tuning.tile.1, t.bn);
    t.warps_m = pick(tuning.warps.0, t.warps_m);
    t.warps_n = pick(tuning.warps.1, t.warps_n);
    let budget = match tuning.shared_kib {
        0 => TUNED_SHARED_BYTES,
        kib => kib.saturating_mul(1024),
    };
    // No width asked: slices of 64 where four stages of them fit the budget, else the
    // table's 32.
    t.bk = if tuning.bk > 0 {
        tuning.bk
    } else {
        let wide = MmaTile { bk: 64, ..t };
        if 4 * wide.stage_bytes(matmuls) <= budget {
            64
        } else {
            t.bk
        }
    };
    while t.accumulators(matmuls) > MAX_ACCUMULATORS && t.bn / t.warps_n > 16 {
        t.bn /= 2;
    }
    while t.accumulators(matmuls) > MAX_ACCUMULATORS && t.bm / t.warps_m > 16 {
        t.bm /= 2;
    }
    let fit = budget / t.stage_bytes(matmuls);
    t.stages = match tuning.stages {
        0 => fit.min(4),
        s => s.min(fit),
    };
    if valid_prefill_tile(&t, matmuls, budget) {
        t
    } else {
        table
    }
}

/// Whether the emitter can run the prefill tile `t` (no split-K warps) of `matmuls` fused
/// 16-bit matmuls: powers of two, whole pairs of m16n8 fragments per warp, at least two
/// stages in `shared_bytes`, accumulators within [`MAX_ACCUMULATORS`], and copies of 16-byte
/// chunks that divide evenly among the threads in whole rows of either B layout.
pub fn valid_prefill_tile(t: &MmaTile, matmuls: u32, shared_bytes: u32) -> bool {
    let pow2 = |x: u32| x.is_power_of_two();
    let threads = t.threads();
    let chunks = |cols: u32| cols / CHUNK as u32;
    let copies_divide = |rows: u32, cols: u32| {
        chunks(cols) > 0
            && threads.is_multiple_of(chunks(cols))
            && (rows * chunks(cols)).is_multiple_of(threads)
    };
    t.warps_k == 1
        && [t.bm, t.bn, t.bk, t.warps_m, t.warps_n]
            .into_iter()
            .all(pow2)
        && t.bk >= 16
        && t.bm.is_multiple_of(t.warps_m)
        && t.bn.is_multiple_of(t.warps_n)
        && t.warp_m().is_multiple_of(16)
        && t.warp_n().is_multiple_of(16)
        && threads <= 512
        && t.stages >= 2
        && t.stages * t.stage_bytes(matmuls) <= shared_bytes
        && t.accumulators(matmuls) <= MAX_ACCUMULATORS
        && copies_divide(t.bm, t.bk)
        && copies_divide(t.bn, t.bk)
        && copies_divide(t.bk, t.bn)
}

/// The FP8 tile for the 16-bit `tile` of `matmuls` fused matmuls: slices of the same
/// bytes (twice the elements), and, where a warp would hold more than
/// [`FP8_MAX_ACCUMULATORS`] accumulators, twice the warps across N (sm_90a runs the
/// m16n8k32 FP8 `mma.sync` with extra registers: a 64×64 warp tile used all 255 and
/// spilled there, 202 on sm_89).
pub fn fp8_tile(mut tile: MmaTile, matmuls: u32) -> MmaTile {
    tile.bk *= 2;
    while tile.warps_k == 1
        && tile.accumulators(matmuls) > FP8_MAX_ACCUMULATORS
        && tile.warp_n() > 16
    {
        tile.warps_n *= 2;
    }
    tile
}

/// Accumulator registers per thread of an FP8 tile.
const FP8_MAX_ACCUMULATORS: u32 = 64;

/// SMs of an H100 SXM, the GPU the decode split is sized for. The split is a function of the
/// shape alone (the same grid on every GPU, so the same bits everywhere); other parts get a
/// grid sized for this one.
pub const H100_SMS: u64 = 132;

/// The most blocks per SM a split grid may have, so that it runs as one wave: a decode
/// block is 256 threads of 56 registers (ptxas, every target), four of them fill the 64K
/// registers of an SM (and five its shared memory). A decode grid of one or two blocks per
/// SM keeps too few weight bytes in flight (on an H100 a 4096-wide N, 128 blocks, streamed
/// the weight at 64% of copy bandwidth; a 14336-wide N, 448 blocks or 3.4 per SM, at 87 to
/// 89%), so the split takes it to up to four.
const SPLIT_BLOCKS_PER_SM: u64 = 4;

/// The fewest k slices a block of a split takes (so that the partial sums written and read
/// back stay small beside the weight bytes they sum: a block reads 4 × 8 KiB of weight or
/// more per 2 KiB of f32 partial sums it writes).
const MIN_SLICES_PER_SPLIT: u64 = 4;

/// The most blocks one output tile's k slices are split over.
const MAX_SPLITS: u64 = 8;

/// The most blocks one output tile's k slices may be split over under `tuning`.
fn most_splits(tuning: &crate::GemmTuning) -> u64 {
    match tuning.max_splits {
        0 => MAX_SPLITS,
        n => u64::from(n),
    }
}

/// Over how many blocks the k slices of `tile` (the decode tile, with split-K warps) are
/// split for an `m × n` output with reduction length `k` and `batch` batch entries: as many
/// as keep the grid within [`SPLIT_BLOCKS_PER_SM`] blocks per SM of an H100, at most
/// [`MAX_SPLITS`], each block at least [`MIN_SLICES_PER_SPLIT`] slices, rounded so that
/// every block has a slice; 1 (no split) when that is fewer than two, as for grids of more
/// than two blocks per SM. Each block takes `ceil(slices / splits)` consecutive slices, the
/// last block fewer.
pub fn choose_splits(tile: &MmaTile, m: u64, n: u64, k: u64, batch: u64) -> u32 {
    choose_splits_at_most(tile, m, n, k, batch, MAX_SPLITS)
}

/// [`choose_splits`] with at most `most` splits (`GemmTuning::max_splits`).
fn choose_splits_at_most(tile: &MmaTile, m: u64, n: u64, k: u64, batch: u64, most: u64) -> u32 {
    if tile.warps_k == 1 || m > u64::from(tile.bm) {
        return 1;
    }
    let blocks = n.div_ceil(u64::from(tile.bn)).saturating_mul(batch.max(1));
    let slices = k.div_ceil(u64::from(tile.bk));
    let want = (SPLIT_BLOCKS_PER_SM * H100_SMS / blocks.max(1))
        .min(most)
        .min(slices / MIN_SLICES_PER_SPLIT);
    if want < 2 {
        return 1;
    }
    let per_split = slices.div_ceil(want);
    slices.div_ceil(per_split) as u32
}

/// How B of one matmul is read.
#[derive(Clone, Debug)]
pub(crate) struct BSource {
    /// The buffer value read.
    pub(crate) value: Value,
    /// `true` for a `[.., K, N]` buffer (N contiguous), `false` for the `[.., N, K]`
    /// weight under a transpose.
    pub(crate) k_rows: bool,
    /// The permute read through, when `k_rows` is false.
    pub(crate) permute: Option<Value>,
    pub(crate) n: Dim,
}

/// What the template needs to know about a matmul group it can take.
#[derive(Clone)]
pub(crate) struct MmaPlan {
    pub(crate) input: MmaInput,
    pub(crate) a: Value,
    /// The stored value whose buffer holds A: `a` itself, or the value `a` reshapes (a
    /// reshape keeps the row-major order, so A's linear index addresses it directly); for
    /// FP8, the f8 value `a` casts (or one it reshapes).
    pub(crate) a_source: Value,
    pub(crate) b: Vec<BSource>,
    pub(crate) k: u64,
    pub(crate) tile: MmaTile,
    /// The grid's segments, one per matmul, when `tile.segmented`.
    pub(crate) segments: Vec<Segment>,
    /// The FP8-to-float casts of the operands the FP8 `mma` takes over.
    pub(crate) casts: Vec<Value>,
    /// Block rows of a rasterization group (`GemmTuning::raster`; 1: row-major blocks).
    pub(crate) raster: u32,
    /// Whether the main loop double-buffers the fragments (`GemmTuning::double_buffer`).
    pub(crate) double_buffer: bool,
    /// Whether the epilogue stores each thread's two adjacent columns together where every
    /// stored width is even (`GemmTuning::paired_epilogue`).
    pub(crate) paired: bool,
    /// For the decode tile: the k elements of each weight row a block asks L2 for before
    /// its grid-dependency wait, from the start of its k range ([`prefetch_len`]); `None`
    /// for no prefetch.
    pub(crate) prefetch: Option<u64>,
    /// For the decode tile: whether a block lets the next kernel launch after its main
    /// loop (`GemmTuning::trigger`).
    pub(crate) trigger: bool,
}

/// One matmul's share of a segmented grid's block columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Its first block column.
    pub start: u64,
    /// Its block columns, `ceil(n / bn)`.
    pub blocks: u64,
    /// The matmul's N.
    pub n: u64,
    /// Its first column in a row of the split workspace (`[.., M, sum of N]`).
    pub col: u64,
}

/// The segments of a grid of `bn`-wide block columns over matmuls of widths `widths`, in
/// order: each matmul's `ceil(n / bn)` block columns follow the previous one's.
pub fn segments(widths: &[u64], bn: u32) -> Vec<Segment> {
    let (mut start, mut col) = (0, 0);
    widths
        .iter()
        .map(|&n| {
            let s = Segment {
                start,
                blocks: n.div_ceil(u64::from(bn)),
                n,
                col,
            };
            start += s.blocks;
            col += n;
            s
        })
        .collect()
}

/// The columns of all segments together (a row of a segmented split's workspace).
fn segment_columns(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| s.n).sum()
}

/// The indices of `group`'s matmuls that `v` (a value the group stores) is computed from.
pub(crate) fn matmuls_of(e: &Emitter<'_, '_>, group: &Group, v: Value) -> BTreeSet<usize> {
    let mut found = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut stack = vec![v];
    while let Some(x) = stack.pop() {
        if !seen.insert(x) {
            continue;
        }
        if let Some(i) = group.roots.iter().position(|&r| r == x) {
            found.insert(i);
        } else if !e.is_loaded(x) {
            if let Some(inst) = e.g.inst(x) {
                stack.extend(inst.operands.iter().copied());
            }
        }
    }
    found
}

impl MmaPlan {
    /// Whether the grid is one of segments ([`segments`]).
    pub(crate) fn segmented(&self) -> bool {
        self.tile.segmented
    }

    /// `(splits, slices per split)` when the k slices are split across blocks.
    pub(crate) fn split(&self) -> Option<(u32, u64)> {
        (self.tile.splits > 1).then(|| {
            let slices = self.k.div_ceil(u64::from(self.tile.bk));
            (
                self.tile.splits,
                slices.div_ceil(u64::from(self.tile.splits)),
            )
        })
    }
}

/// The most rows the decode-sized variant of a GEMM with a symbolic row count is built for
/// (plans choose it at run time for at most this many rows: `Step::BySize`).
pub const SMALL_ROWS: u64 = 16;

/// The FP8 value that `v`, a matmul operand computed inside the kernel, converts exactly to
/// a wider float (`f32(x)`, `bf16(x)` or `f16(x)` of an f8e4m3 or f8e5m2 `x`).
fn fp8_cast_source(e: &Emitter<'_, '_>, v: Value) -> Option<Value> {
    let g = e.g;
    if e.is_loaded(v) {
        return None;
    }
    let Some(Op::Cast { to }) = g.op(v) else {
        return None;
    };
    if !matches!(to, DType::F32 | DType::BF16 | DType::F16) {
        return None;
    }
    let x = g.inst(v)?.operands[0];
    matches!(g.ty(x).dtype, DType::F8E4M3 | DType::F8E5M2).then_some(x)
}

/// Whether `perm` swaps the last two axes and keeps the others.
fn swaps_last_two(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2
        && perm[r - 1] == r - 2
        && perm[r - 2] == r - 1
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p)
}

/// `operand` as the transpose of a stored `[.., N, K]` weight: `(permute, weight, cast)`,
/// the permute read through, the weight's value and, for FP8 inputs, the cast to a wider
/// float on either side of the permute (`f32(w).T` or `f32(w.T)`).
pub(crate) fn transposed_weight(
    e: &Emitter<'_, '_>,
    operand: Value,
    fp8: bool,
) -> Option<(Value, Value, Option<Value>)> {
    let g = e.g;
    let (permute, cast) = match g.op(operand) {
        Some(Op::Cast { .. }) if fp8 => (fp8_cast_source(e, operand)?, Some(operand)),
        _ => (operand, None),
    };
    if e.is_loaded(permute) {
        return None;
    }
    let Some(Op::Permute { perm }) = g.op(permute) else {
        return None;
    };
    let inner = g.inst(permute)?.operands[0];
    let (weight, cast) = match cast {
        Some(c) => (inner, Some(c)),
        None if fp8 => (fp8_cast_source(e, inner)?, Some(inner)),
        None => (inner, None),
    };
    (swaps_last_two(perm) && e.is_loaded(weight)).then_some((permute, weight, cast))
}

/// The plan for `group` when the tensor-core template applies to it; with `small_rows`, the
/// variant for a symbolic row count of at most [`SMALL_ROWS`].
///
/// FP8: when A is an exact cast of an f8e4m3/f8e5m2 value to a wider float and every B the
/// same cast of a `[.., N, K]` weight of that dtype under a transpose (the `linear` layout
/// torch._scaled_mm uses), and `options.fp8_tensor_cores`, the casts are dropped: the FP8
/// bytes are copied, and the m16n8k32 `mma` multiplies them exactly as the casts would
/// (f32 accumulation either way). The scales are ordinary element-wise epilogue work. A
/// `[K, N]` FP8 B (8-bit elements have no transposing `ldmatrix`) or mixed dtypes go to
/// the plain template.
pub(crate) fn plan(
    e: &Emitter<'_, '_>,
    group: &Group,
    small_rows: bool,
    options: &crate::Options,
) -> Option<MmaPlan> {
    let tuning = &options.gemm;
    let g = e.g;
    let first = *group.roots.first()?;
    let a = g.inst(first)?.operands[0];
    let (input, a_stored) = match g.ty(a).dtype {
        DType::BF16 => (MmaInput::Bf16, a),
        DType::F16 => (MmaInput::F16, a),
        _ if options.fp8_tensor_cores => {
            let x = fp8_cast_source(e, a)?;
            (MmaInput::of_dtype(g.ty(x).dtype)?, x)
        }
        _ => return None,
    };
    let fp8 = input.is_fp8();
    let chunk = chunk_elements(input) as u64;
    let mut a_source = a_stored;
    while !e.is_loaded(a_source) {
        let Some(Op::Reshape { .. }) = g.op(a_source) else {
            return None;
        };
        a_source = g.inst(a_source)?.operands[0];
    }
    let mut casts: Vec<Value> = if fp8 { vec![a] } else { Vec::new() };
    let a_shape = g.shape(a);
    let k = a_shape.last()?.as_const()?;
    if k == 0 || k % chunk != 0 {
        return None;
    }
    let out_shape = g.shape(first);
    let rank = out_shape.len();
    let mut b = Vec::new();
    for &m in &group.roots {
        let inst = g.inst(m)?;
        if inst.operands[0] != a {
            return None;
        }
        let operand = inst.operands[1];
        let n = g.shape(m)[rank - 1].clone();
        let source = if e.is_loaded(operand) && !fp8 {
            let n_const = n.as_const()?;
            if n_const % chunk != 0 {
                return None;
            }
            BSource {
                value: operand,
                k_rows: true,
                permute: None,
                n,
            }
        } else {
            let (permute, weight, cast) = transposed_weight(e, operand, fp8)?;
            casts.extend(cast);
            BSource {
                value: weight,
                k_rows: false,
                permute: Some(permute),
                n,
            }
        };
        if g.ty(source.value).dtype != input.dtype() {
            return None;
        }
        b.push(source);
    }
    let choose = |m: Option<u64>, n: u64, matmuls: u32| {
        if fp8 {
            fp8_tile(choose_tile(m, n, matmuls), matmuls)
        } else {
            tuned_tile(m, n, matmuls, tuning)
        }
    };
    let m = if small_rows {
        Some(SMALL_ROWS)
    } else {
        out_shape[rank - 2].as_const()
    };
    let n_max = b
        .iter()
        .map(|s| s.n.as_const().unwrap_or(u64::MAX))
        .max()
        .unwrap_or(1);
    let mut tile = choose(m, n_max, b.len() as u32);
    let batch: Option<u64> = out_shape[..rank - 2]
        .iter()
        .try_fold(1u64, |acc, d| Some(acc.saturating_mul(d.as_const()?)));
    let one_shape = b.iter().all(|s| s.n == b[0].n);
    // Decode-sized fused matmuls of different widths (q/k/v of GQA): a grid of segments,
    // each block one matmul's tile with the single-matmul decode tile, when every stored
    // value comes from one matmul and the B operands share a layout (one shared tile).
    let widths: Option<Vec<u64>> = b.iter().map(|s| s.n.as_const()).collect();
    let segmented = match (&widths, m) {
        (Some(widths), Some(m)) if m <= SMALL_ROWS && !one_shape && tuning.segments => {
            b.iter().all(|s| s.k_rows == b[0].k_rows)
                && group
                    .roots
                    .iter()
                    .chain(&group.outputs)
                    .all(|&v| matmuls_of(e, group, v).len() == 1)
        }
        _ => false,
    };
    if segmented {
        let widths = widths.expect("constant widths");
        let m = m.expect("decode rows");
        tile = choose(Some(m), n_max, 1);
        tile.segmented = true;
        let segments = segments(&widths, tile.bn);
        // K split across blocks, as for one matmul, while the grid has at most a block per
        // SM of an H100: q/k/v of the 1.1B Llama make 64 + 16 + 16 = 96 block columns (36
        // SMs idle, each block two 8 KiB weight stages in flight); 4 splits make 384 blocks
        // (2.9 per SM) for one more launch, the sum kernel, which takes over the epilogue
        // (`GemmTuning::segment_splits`, `KILN_TUNE_GEMM=splits=0`, compares).
        let blocks: u64 = segments.iter().map(|s| s.blocks).sum();
        if let (Some(batch), true) = (batch, tuning.segment_splits) {
            if blocks.saturating_mul(batch) <= H100_SMS {
                tile.splits = choose_splits_at_most(
                    &tile,
                    m,
                    blocks * u64::from(tile.bn),
                    k,
                    batch,
                    most_splits(tuning),
                );
            }
        }
        return Some(MmaPlan::with_launch_control(
            MmaPlan {
                input,
                a,
                a_source,
                b,
                k,
                tile,
                segments,
                casts,
                raster: 1,
                double_buffer: false,
                paired: false,
                prefetch: None,
                trigger: false,
            },
            g,
            tuning,
        ));
    }
    // Horizontally fused matmuls of one shape split K across blocks too when their grid
    // has at most a block per SM (k and v of GQA); wider ones (gate and up) keep their
    // epilogue in the GEMM.
    if let (Some(m), Some(batch), true) = (m, batch, one_shape) {
        let blocks = n_max.div_ceil(u64::from(tile.bn)).saturating_mul(batch);
        if b.len() == 1 || blocks <= H100_SMS {
            tile.splits = choose_splits_at_most(&tile, m, n_max, k, batch, most_splits(tuning));
        }
    }
    // Prefill tiles (no split-K warps): the block order and the fragment double buffer of
    // `tuning`; the double buffer alternates two fragment sets over the k16 steps of a
    // slice, so it needs an even number of them.
    let prefill = tile.warps_k == 1 && tile.splits == 1;
    let k_steps = tile.bk / input.k() as u32;
    Some(MmaPlan::with_launch_control(
        MmaPlan {
            input,
            a,
            a_source,
            b,
            k,
            tile,
            segments: Vec::new(),
            casts,
            raster: if prefill { tuning.raster.max(1) } else { 1 },
            double_buffer: prefill && tuning.double_buffer && k_steps.is_multiple_of(2),
            paired: prefill && tuning.paired_epilogue,
            prefetch: None,
            trigger: false,
        },
        g,
        tuning,
    ))
}

/// The weight bytes a decode GEMM's blocks prefetch together at most, unless
/// `GemmTuning::prefetch_mib` says otherwise: about half of an H100's 50 MB L2, so that the
/// prefetched bytes are still there when the pipeline's loads reach them.
const PREFETCH_BUDGET: u64 = 24 << 20;

/// The weight bytes one decode GEMM (or GEMV) prefetches at most under `tuning`.
pub(crate) fn prefetch_budget(tuning: &crate::GemmTuning) -> u64 {
    match tuning.prefetch_mib {
        0 => PREFETCH_BUDGET,
        mib => u64::from(mib) << 20,
    }
}

/// The k elements of each `[N, K]` weight row that a block of the decode tile `plan`
/// prefetches into L2 from the start of its k range, under `tuning`: the whole range while
/// the weights (every B operand, each row once) take at most the budget, else that share of
/// it, in whole 16-byte chunks. `None` when there is nothing to prefetch: another tile, a
/// `[K, N]` B, a batched or symbolic-width weight, rows not 16-byte aligned, or more tile
/// rows than threads (one row a thread).
fn prefetch_len(plan: &MmaPlan, shapes: &[&[Dim]], tuning: &crate::GemmTuning) -> Option<u64> {
    let t = &plan.tile;
    if !tuning.prefetch || t.warps_k == 1 || t.bn > t.threads() {
        return None;
    }
    let element = (plan.input.bits() / 8) as u64;
    if !(plan.k * element).is_multiple_of(16) {
        return None;
    }
    let mut weight_bytes = 0u64;
    for (source, shape) in plan.b.iter().zip(shapes) {
        let leading = &shape[..shape.len().saturating_sub(2)];
        if source.k_rows || leading.iter().any(|d| *d != Dim::Const(1)) {
            return None;
        }
        weight_bytes += source.n.as_const()? * plan.k * element;
    }
    let budget = prefetch_budget(tuning);
    let range = match plan.split() {
        Some((_, per_split)) => (per_split * u64::from(t.bk)).min(plan.k),
        None => plan.k,
    };
    let share = if weight_bytes <= budget {
        range
    } else {
        (u128::from(range) * u128::from(budget) / u128::from(weight_bytes)) as u64
    };
    let chunk = 16 / element;
    let len = share / chunk * chunk;
    (len > 0).then_some(len)
}

impl MmaPlan {
    /// `plan` with its prefetch length and trigger for the decode tile under `tuning`.
    fn with_launch_control(
        mut plan: MmaPlan,
        g: &FuncGraph<'_>,
        tuning: &crate::GemmTuning,
    ) -> MmaPlan {
        let shapes: Vec<&[Dim]> = plan.b.iter().map(|s| g.shape(s.value)).collect();
        plan.prefetch = prefetch_len(&plan, &shapes, tuning);
        plan.trigger = tuning.trigger && plan.tile.warps_k > 1;
        plan
    }
}

pub(crate) fn i32c(n: i64) -> Expr {
    Expr::i32(n as i32)
}

pub(crate) fn shr(a: Expr, bits: u32) -> Expr {
    if bits == 0 {
        return a;
    }
    Expr::binary(BinOp::Shr, a, i32c(i64::from(bits)))
}

pub(crate) fn and_mask(a: Expr, mask: i64) -> Expr {
    Expr::binary(BinOp::And, a, i32c(mask))
}

/// The XOR applied to a chunk index in a row of `chunks` 16-byte chunks (a power of two),
/// as `(row >> shift) & mask`: bits of the row chosen so that any 8 consecutive rows
/// (8-aligned) put one chunk column in 8 different 16-byte positions modulo 128 bytes,
/// the span of the 32 banks.
fn swizzle_bits(chunks: u32) -> (u32, i64) {
    let rows_per_line = (8 / chunks).max(1);
    (rows_per_line.trailing_zeros(), i64::from(chunks.min(8)) - 1)
}

/// [`swizzle_bits`] applied to a row expression.
pub(crate) fn swizzle(row: Expr, chunks: u32) -> Expr {
    let (shift, mask) = swizzle_bits(chunks);
    and_mask(shr(row, shift), mask)
}

/// `branches[i]` under `segment == i` (the last one otherwise): a block-uniform choice in
/// a grid of segments.
/// In a grid of `segments`, block column x's segment (bound as `segment`, the same in the
/// whole block) and x's offset in it.
pub(crate) fn segment_of_block(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    segments: &[Segment],
) -> (Expr, Expr) {
    let bx = Expr::Special(Special::BlockIdx(0));
    let mut which: Option<Expr> = None;
    let mut start = i32c(0);
    for s in &segments[1..] {
        let past = bx.clone().ge(i32c(s.start as i64));
        let one = Expr::select(past.clone(), i32c(1), i32c(0));
        which = Some(match which {
            Some(w) => w + one,
            None => one,
        });
        start = Expr::select(past, i32c(s.start as i64), start);
    }
    let which = which.unwrap_or_else(|| i32c(0));
    let which = e.bind(body, "segment", Ty::I32, which);
    let start = e.bind(body, "segment_start", Ty::I32, start);
    (which, bx - start)
}

pub(crate) fn by_segment(segment: &Expr, mut branches: Vec<Vec<Stmt>>) -> Vec<Stmt> {
    let mut chain = branches.pop().unwrap_or_default();
    while let Some(branch) = branches.pop() {
        let i = branches.len() as i64;
        chain = vec![Stmt::if_else(
            segment.clone().equals(i32c(i)),
            branch,
            chain,
        )];
    }
    chain
}

/// The fragment sets of a double-buffered main loop and what loading and multiplying them
/// needs.
struct Fragments<'a> {
    a_tile: Buf,
    b_tiles: &'a [Buf],
    /// Per k step, the thread's `ldmatrix` offset in an A stage (only step 0's is used).
    a_ld: &'a [Expr],
    /// Per B tile, k step and pair of n8 tiles, the offset in a B stage (only step 0's
    /// first pair's is used).
    b_ld: &'a [Vec<Vec<Expr>>],
    /// Per B tile, whether it is `[K, N]` (a transposing `ldmatrix`).
    trans: Vec<bool>,
    bk: i64,
    bn: i64,
    /// Elements of a 16-byte chunk.
    chunk_len: i64,
    input: MmaInput,
    acc: &'a [Vec<[VarId; 4]>],
    /// Two sets of A fragments, one per m16 tile.
    a: [Vec<[VarId; 4]>; 2],
    /// Two sets of B fragments, per B tile and n8 tile.
    b: [Vec<Vec<[VarId; 2]>>; 2],
}

/// `a ^ bits` (`a` when `bits` is 0).
fn xor(a: Expr, bits: i64) -> Expr {
    if bits == 0 {
        a
    } else {
        Expr::binary(BinOp::Xor, a, i32c(bits))
    }
}

impl Fragments<'_> {
    /// The `ldmatrix`es of k step `kk` of the stage at `a_base`/`b_base` into `set`.
    ///
    /// The offsets derive from step 0's (one register each, not one per step and pair): a
    /// step's chunks are step 0's XOR `2 kk` (their low bit is the lane's half, the swizzle
    /// depends on the row only), so in a row of chunks the offset is step 0's XOR
    /// `2 kk × chunk_len`; the next m16 tile (A) or pair of n8 tiles (transposed B) is 16
    /// rows on, which the swizzle (bits 0 to 2 of `row >> shift`, shift at most 2) does not
    /// see. In a `[K, N]` B the roles swap: the step moves 16 rows, the pair 2 chunks.
    fn load(&self, out: &mut Vec<Stmt>, kk: usize, set: usize, a_base: &Expr, b_base: &Expr) {
        let step_bits = kk as i64 * 2 * self.chunk_len;
        let a_offset = xor(self.a_ld[0].clone(), step_bits);
        for (mi, frag) in self.a[set].iter().enumerate() {
            out.push(Stmt::LdMatrix {
                dsts: frag.to_vec(),
                trans: false,
                buf: self.a_tile,
                index: a_base.clone() + a_offset.clone() + i32c(mi as i64 * 16 * self.bk),
            });
        }
        for (i, frags) in self.b[set].iter().enumerate() {
            for pair in 0..frags.len() / 2 {
                let (lo, hi) = (&frags[2 * pair], &frags[2 * pair + 1]);
                let first = self.b_ld[i][0][0].clone();
                let pair = pair as i64;
                let offset = if self.trans[i] {
                    xor(first, pair * 2 * CHUNK) + i32c(kk as i64 * 16 * self.bn)
                } else {
                    xor(first, step_bits) + i32c(pair * 16 * self.bk)
                };
                out.push(Stmt::LdMatrix {
                    dsts: vec![lo[0], lo[1], hi[0], hi[1]],
                    trans: self.trans[i],
                    buf: self.b_tiles[i],
                    index: b_base.clone() + offset,
                });
            }
        }
    }

    /// The products of fragment set `set` into the accumulators.
    fn products(&self, out: &mut Vec<Stmt>, set: usize) {
        for (i, b_frags) in self.b[set].iter().enumerate() {
            let ni_count = b_frags.len();
            for (mi, a) in self.a[set].iter().enumerate() {
                for (ni, b) in b_frags.iter().enumerate() {
                    let c = self.acc[i][mi * ni_count + ni];
                    out.push(Stmt::Mma {
                        input: self.input,
                        d: c,
                        a: *a,
                        b: *b,
                        c,
                    });
                }
            }
        }
    }
}

/// The tile `(m_tile, n_tile)` (I32) of this block of a rasterized grid: blocks in launch
/// order (`pid = blockIdx.y * columns + blockIdx.x`) walk groups of `plan.raster` block
/// rows (the last group the rows left) column by column, the rows of a group first, so
/// that the blocks running at once read fewer distinct A and B tiles (kept in L2). The grid
/// itself is unchanged, `ceil(N / bn) × ceil(M / bm)`.
pub(crate) fn raster(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    plan: &MmaPlan,
    out_shape: &[Dim],
    grid_n: &Dim,
) -> (Expr, Expr) {
    let t = plan.tile;
    let group = i64::from(plan.raster);
    let wide = e.index_ty == Ty::I64;
    let to_i32 = |x: Expr| {
        if wide {
            Expr::Cast(Ty::I32, Box::new(x))
        } else {
            x
        }
    };
    let rank = out_shape.len();
    let m_size = e.dim(&out_shape[rank - 2]);
    let n_size = e.dim(grid_n);
    let rows = to_i32(ceil_div_expr(m_size, e.ix(i64::from(t.bm)), e.ix(1)));
    let rows = e.bind(body, "tile_rows", Ty::I32, rows);
    let columns = to_i32(ceil_div_expr(n_size, e.ix(i64::from(t.bn)), e.ix(1)));
    let columns = e.bind(body, "tile_columns", Ty::I32, columns);
    let pid =
        Expr::Special(Special::BlockIdx(1)) * columns.clone() + Expr::Special(Special::BlockIdx(0));
    let pid = e.bind(body, "pid", Ty::I32, pid);
    let width = e.bind(body, "group_blocks", Ty::I32, columns * i32c(group));
    let first = Expr::binary(BinOp::Div, pid.clone(), width.clone()) * i32c(group);
    let first = e.bind(body, "group_row", Ty::I32, first);
    let in_group = e.bind(
        body,
        "in_group",
        Ty::I32,
        Expr::binary(BinOp::Rem, pid, width),
    );
    let group_rows = e.bind(
        body,
        "group_rows",
        Ty::I32,
        (rows - first.clone()).min(i32c(group)),
    );
    let m_tile = first + Expr::binary(BinOp::Rem, in_group.clone(), group_rows.clone());
    let m_tile = e.bind(body, "m_tile", Ty::I32, m_tile);
    let n_tile = Expr::binary(BinOp::Div, in_group, group_rows);
    let n_tile = e.bind(body, "n_tile", Ty::I32, n_tile);
    (m_tile, n_tile)
}

/// `ceil(a / b)` of index expressions (`one` the index type's 1).
fn ceil_div_expr(a: Expr, b: Expr, one: Expr) -> Expr {
    div(sub(add(a, b.clone()), one), b)
}

pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    stores: &[Value],
    plan: &MmaPlan,
) -> EResult<Body> {
    let g = e.g;
    let matmuls = group.roots.clone();
    let first = matmuls[0];
    let out_shape = g.shape(first).to_vec();
    let rank = out_shape.len();
    let batch_dims = out_shape[..rank - 2].to_vec();
    let t = plan.tile;
    let dtype = plan.input.dtype();
    // Elements of one 16-byte chunk (8, or 16 for FP8), and its log2.
    let chunk_len = chunk_elements(plan.input);
    let chunk_shift = chunk_len.trailing_zeros();
    let threads = t.threads() as i64;
    let (bm, bn, bk) = (i64::from(t.bm), i64::from(t.bn), i64::from(t.bk));
    let (wm, wn) = (i64::from(t.warp_m()), i64::from(t.warp_n()));
    let (mi_count, ni_count) = ((wm / 16) as usize, (wn / 8) as usize);
    let stages = i64::from(t.stages);
    let ity = e.index_ty;
    let index = |x: Expr| -> Expr {
        if ity == Ty::I64 {
            Expr::Cast(Ty::I64, Box::new(x))
        } else {
            x
        }
    };
    let mut body = Vec::new();

    // Per-thread constants.
    let tid = Expr::Special(Special::ThreadIdx);
    let lane = e.bind(&mut body, "lane", Ty::I32, Expr::Special(Special::LaneId));
    let warp = e.bind(&mut body, "warp", Ty::I32, Expr::Special(Special::WarpId));
    // Warp w: k group w / (warps_m * warps_n), then row-major over the warp tiles.
    let tile_warps = i64::from(t.warps_m * t.warps_n);
    let warp_k = e.bind(
        &mut body,
        "warp_k",
        Ty::I32,
        Expr::binary(BinOp::Div, warp.clone(), i32c(tile_warps)),
    );
    let warp_in_k = Expr::binary(BinOp::Rem, warp, i32c(tile_warps));
    let warp_m0 = e.bind(
        &mut body,
        "warp_m0",
        Ty::I32,
        Expr::binary(BinOp::Div, warp_in_k.clone(), i32c(i64::from(t.warps_n))) * i32c(wm),
    );
    let warp_n0 = e.bind(
        &mut body,
        "warp_n0",
        Ty::I32,
        Expr::binary(BinOp::Rem, warp_in_k, i32c(i64::from(t.warps_n))) * i32c(wn),
    );
    // Split across blocks (decode shapes, one row of tiles): block row y takes the k
    // slices `y * per_split ..`, at most `per_split` of them.
    let split = plan.split();
    let grid_n = plan
        .b
        .iter()
        .map(|s| s.n.clone())
        .max_by_key(|d| d.as_const().unwrap_or(u64::MAX))
        .unwrap_or(Dim::Const(1));
    // A rasterized grid: the block's tile `(m_tile, n_tile)` from its place in launch order.
    let rastered = (plan.raster > 1).then(|| raster(e, &mut body, plan, &out_shape, &grid_n));
    let m0 = if split.is_some() {
        e.ix(0)
    } else if let Some((m_tile, _)) = &rastered {
        mul(index(m_tile.clone()), e.ix(bm))
    } else {
        mul(e.special(Special::BlockIdx(1)), e.ix(bm))
    };
    let m0 = e.bind(&mut body, "m0", ity, m0);
    let k_tiles = plan.k.div_ceil(bk as u64) as i64;
    let (k_first, k_count) = match split {
        Some((_, per_split)) => {
            let first = Expr::Special(Special::BlockIdx(1)) * i32c(per_split as i64);
            let first = e.bind(&mut body, "k_first", Ty::I32, first);
            let count = i32c(per_split as i64).min(i32c(k_tiles) - first.clone());
            let count = e.bind(&mut body, "k_count", Ty::I32, count);
            (Some(first), count)
        }
        None => (None, i32c(k_tiles)),
    };
    // A grid of segments: block column x is column tile `x - start` of the matmul whose
    // segment holds it (`segment`, the same in the whole block).
    let segmented = t.segmented;
    let segs = &plan.segments;
    let sets = if segmented { 1 } else { matmuls.len() };
    let segment = segmented.then(|| segment_of_block(e, &mut body, segs));
    let n0 = match (&segment, &rastered) {
        (Some((_, column)), _) => mul(index(column.clone()), e.ix(bn)),
        (None, Some((_, n_tile))) => mul(index(n_tile.clone()), e.ix(bn)),
        (None, None) => mul(e.special(Special::BlockIdx(0)), e.ix(bn)),
    };
    let n0 = e.bind(&mut body, "n0", ity, n0);
    let segment = segment.map(|(which, _)| which);
    let bz = e.special(Special::BlockIdx(2));
    let batch = e.delinearize(&mut body, bz, &batch_dims);
    let m_size = e.dim(&out_shape[rank - 2]);
    let k_size = e.ix(plan.k as i64);

    let acc: Vec<Vec<[VarId; 4]>> = (0..sets)
        .map(|_| {
            (0..mi_count * ni_count)
                .map(|_| [0; 4].map(|_| e.var("acc", Ty::F32)))
                .collect()
        })
        .collect();
    for cells in acc.iter().flatten() {
        for &c in cells {
            body.push(Stmt::Assign(c, Expr::f32(0.0)));
        }
    }
    let a_stage = bm * bk;
    let b_stage = bk * bn;
    let a_tile = e.shared_array("a_tile", dtype, (stages * a_stage) as u32);
    let b_tiles: Vec<Buf> = (0..sets)
        .map(|_| e.shared_array("b_tile", dtype, (stages * b_stage) as u32))
        .collect();
    let a_buf = e.buffer(plan.a_source, kiln_kir::Access::Read);
    let b_bufs: Vec<Buf> = plan
        .b
        .iter()
        .map(|s| e.buffer(s.value, kiln_kir::Access::Read))
        .collect();

    // ---- before the grid-dependency wait: thread r asks L2 for row n0 + r of each weight
    // the block reads, the first `len` elements of its k range (address arithmetic and
    // prefetches only, so the previous kernel may still be running).
    if let Some(len) = plan.prefetch {
        let element = (plan.input.bits() / 8) as i64;
        let k_lo = match &k_first {
            Some(first) => first.clone() * i32c(bk),
            None => i32c(0),
        };
        let k_lo = e.bind(&mut body, "pf_k0", Ty::I32, k_lo);
        let bytes = (i32c(len as i64).min(i32c(plan.k as i64) - k_lo.clone())) * i32c(element);
        let bytes = e.bind(&mut body, "pf_bytes", Ty::I32, bytes);
        let rows = |e: &mut Emitter<'_, '_>, i: usize| -> Vec<Stmt> {
            let source = &plan.b[i];
            let w_shape = g.shape(source.value).to_vec();
            let gn = add(n0.clone(), index(tid.clone()));
            let mut idx = vec![e.ix(0); w_shape.len() - 2];
            idx.extend([gn.clone(), index(k_lo.clone())]);
            let at = e.linear(&w_shape, &idx);
            let n_size = e.dim(&source.n);
            let inside = and(lt(tid.clone(), i32c(bn)), lt(gn, n_size));
            vec![Stmt::if_then(
                inside,
                vec![Stmt::PrefetchL2 {
                    buf: b_bufs[i],
                    index: at,
                    bytes: bytes.clone(),
                }],
            )]
        };
        match &segment {
            Some(which) => {
                let branches = (0..plan.b.len()).map(|i| rows(e, i)).collect();
                body.extend(by_segment(which, branches));
            }
            None => {
                for i in 0..plan.b.len() {
                    let stmts = rows(e, i);
                    body.extend(stmts);
                }
            }
        }
    }

    // ---- the copies of one stage: per thread, chunks at fixed tile positions.
    // A: rows of bk elements, `bk / 8` chunks each.
    let a_chunks = bk / chunk_len;
    let a_copies = bm * a_chunks / threads;
    let a_batch = batch_index(e, plan.a, &batch_dims, &batch);
    let a_shape = g.shape(plan.a).to_vec();
    let a_col = e.bind(
        &mut body,
        "a_col",
        Ty::I32,
        and_mask(tid.clone(), a_chunks - 1) * i32c(chunk_len),
    );
    // Compact copies (the double-buffered loop): copy q > 0 of a thread addresses from copy
    // 0's source and destination plus constants (its rows are a multiple of 8 on, which
    // the swizzle does not see), and the bounds a constant shape keeps whole (M or N a
    // multiple of the tile, K of the slice) are not checked per copy: fewer registers and
    // integer instructions beside the `mma`s.
    let compact = plan.double_buffer && k_first.is_none();
    let exact_m = compact
        && out_shape[rank - 2]
            .as_const()
            .is_some_and(|m| m.is_multiple_of(u64::from(t.bm)));
    let exact_k = compact && plan.k.is_multiple_of(u64::from(t.bk));
    struct Copy {
        /// Source index at k = 0.
        src: Expr,
        /// Whether the row (M or N) is inside the matrix (`None`: always).
        row_ok: Option<Expr>,
        /// The tile row (for k-rows B, the k offset within the slice).
        row: Expr,
        /// Destination index within a stage.
        dst: Expr,
    }
    let mut a_plan: Vec<Copy> = Vec::new();
    for q in 0..a_copies {
        let step = q * threads / a_chunks;
        if compact && q > 0 && step % 8 == 0 {
            let first = &a_plan[0];
            let row = first.row.clone() + i32c(step);
            let row_ok = (!exact_m).then(|| {
                let gm = add(m0.clone(), index(row.clone()));
                e.bind(&mut body, "a_ok", Ty::Pred, lt(gm, m_size.clone()))
            });
            let copy = Copy {
                src: add(first.src.clone(), e.ix(step * plan.k as i64)),
                row_ok,
                row,
                dst: first.dst.clone() + i32c(step * bk),
            };
            a_plan.push(copy);
            continue;
        }
        let row = e.bind(
            &mut body,
            "a_row",
            Ty::I32,
            shr(tid.clone(), a_chunks.trailing_zeros()) + i32c(q * threads / a_chunks),
        );
        let gm = add(m0.clone(), index(row.clone()));
        let mut idx = a_batch.clone();
        idx.extend([gm.clone(), index(a_col.clone())]);
        let src = e.linear(&a_shape, &idx);
        let src = e.bind(&mut body, "a_src", ity, src);
        let row_ok =
            (!exact_m).then(|| e.bind(&mut body, "a_ok", Ty::Pred, lt(gm, m_size.clone())));
        let chunk = shr(a_col.clone(), chunk_shift);
        let dst = row.clone() * i32c(bk)
            + Expr::binary(BinOp::Xor, chunk, swizzle(row.clone(), a_chunks as u32))
                * i32c(chunk_len);
        let dst = e.bind(&mut body, "a_dst", Ty::I32, dst);
        a_plan.push(Copy {
            src,
            row_ok,
            row,
            dst,
        });
    }
    // The copies of matmul i's B tile (at k = 0 of the slice), bound in `out`.
    let b_plan_of = |e: &mut Emitter<'_, '_>, out: &mut Vec<Stmt>, i: usize| {
        let source = &plan.b[i];
        let w_shape = g.shape(source.value).to_vec();
        let b_batch = batch_index(
            e,
            source.permute.unwrap_or(source.value),
            &batch_dims,
            &batch,
        );
        let n_size = e.dim(&source.n);
        let (rows, cols) = if source.k_rows { (bk, bn) } else { (bn, bk) };
        let chunks = cols / chunk_len;
        let copies = rows * chunks / threads;
        let col = e.bind(
            out,
            "b_col",
            Ty::I32,
            and_mask(tid.clone(), chunks - 1) * i32c(chunk_len),
        );
        // Whole tiles only where this matmul spans the grid: horizontally fused matmuls of
        // different widths share the widest one's grid, past a narrower one's N.
        let exact_n = compact
            && source.n.as_const().is_some_and(|n| {
                n.is_multiple_of(u64::from(t.bn))
                    && plan.b.iter().all(|other| other.n.as_const() == Some(n))
            });
        // The stride of B's rows (k for `[K, N]`, n for `[N, K]`).
        let row_stride = e.dim(w_shape.last().expect("a matrix"));
        let mut copies_plan: Vec<Copy> = Vec::new();
        for q in 0..copies {
            let step = q * threads / chunks;
            if compact && q > 0 && step % 8 == 0 {
                let first = &copies_plan[0];
                let row = first.row.clone() + i32c(step);
                let row_ok = match (source.k_rows, exact_n) {
                    (_, true) => None,
                    (true, false) => first.row_ok.clone(),
                    (false, false) => {
                        let gn = add(n0.clone(), index(row.clone()));
                        Some(e.bind(out, "b_ok", Ty::Pred, lt(gn, n_size.clone())))
                    }
                };
                let copy = Copy {
                    src: add(first.src.clone(), mul(e.ix(step), row_stride.clone())),
                    row_ok,
                    row,
                    dst: first.dst.clone() + i32c(step * cols),
                };
                copies_plan.push(copy);
                continue;
            }
            let row = e.bind(
                out,
                "b_row",
                Ty::I32,
                shr(tid.clone(), chunks.trailing_zeros()) + i32c(q * threads / chunks),
            );
            // Element (k, n) of B at k = 0 of the slice.
            let (gk, gn) = if source.k_rows {
                (index(row.clone()), add(n0.clone(), index(col.clone())))
            } else {
                (index(col.clone()), add(n0.clone(), index(row.clone())))
            };
            let mut idx = b_batch.clone();
            if source.k_rows {
                idx.extend([gk, gn.clone()]);
            } else {
                idx.extend([gn.clone(), gk]);
            }
            let src = e.linear(&w_shape, &idx);
            let src = e.bind(out, "b_src", ity, src);
            let row_ok = (!exact_n).then(|| e.bind(out, "b_ok", Ty::Pred, lt(gn, n_size.clone())));
            let chunk = shr(col.clone(), chunk_shift);
            let dst = row.clone() * i32c(cols)
                + Expr::binary(BinOp::Xor, chunk, swizzle(row.clone(), chunks as u32))
                    * i32c(chunk_len);
            let dst = e.bind(out, "b_dst", Ty::I32, dst);
            copies_plan.push(Copy {
                src,
                row_ok,
                row,
                dst,
            });
        }
        (col, copies_plan)
    };
    // Fused matmuls side by side: every B plan bound once, before the loop; a grid of
    // segments binds its segment's in the branch that copies it.
    let b_plans: Vec<(usize, Expr, Vec<Copy>)> = if segmented {
        Vec::new()
    } else {
        (0..plan.b.len())
            .map(|i| {
                let (col, copies) = b_plan_of(e, &mut body, i);
                (i, col, copies)
            })
            .collect()
    };

    // The copies of the block's k slice `kt` (of `k_count`) into stage `stage` (both I32
    // expressions); slices past the block's last are zero-filled without reading memory.
    let load_stage = |e: &mut Emitter<'_, '_>, stage: Expr, kt: Expr| -> Vec<Stmt> {
        let mut out = Vec::new();
        let slice_ok = k_first.as_ref().map(|_| {
            e.bind(
                &mut out,
                "slice_ok",
                Ty::Pred,
                lt(kt.clone(), k_count.clone()),
            )
        });
        let kt = match &k_first {
            Some(first) => first.clone() + kt,
            None => kt,
        };
        let k0 = e.bind(&mut out, "k0", ity, mul(index(kt.clone()), e.ix(bk)));
        let in_block = |ok: Expr| match &slice_ok {
            Some(s) => and(ok, s.clone()),
            None => ok,
        };
        // Whole slices (`exact_k`): a slice inside K is inside for every copy.
        let slice_in_k = exact_k.then(|| {
            let ok = lt(kt.clone(), i32c(k_tiles));
            e.bind(&mut out, "slice_in_k", Ty::Pred, ok)
        });
        let a_k_ok = match &slice_in_k {
            Some(ok) => ok.clone(),
            None => {
                let a_gk = add(k0.clone(), index(a_col.clone()));
                let a_k_ok = in_block(lt(a_gk, k_size.clone()));
                e.bind(&mut out, "a_k_ok", Ty::Pred, a_k_ok)
            }
        };
        let both = |row_ok: &Option<Expr>, k_ok: Expr| match row_ok {
            Some(r) => and(r.clone(), k_ok),
            None => k_ok,
        };
        for copy in &a_plan {
            let valid = both(&copy.row_ok, a_k_ok.clone());
            out.push(Stmt::CpAsync {
                dst: a_tile,
                dst_index: stage.clone() * i32c(a_stage) + copy.dst.clone(),
                src: a_buf,
                src_index: Expr::select(valid.clone(), add(copy.src.clone(), k0.clone()), e.ix(0)),
                src_len: Expr::select(valid, i32c(chunk_len), i32c(0)),
            });
        }
        let b_copies = |e: &mut Emitter<'_, '_>,
                        out: &mut Vec<Stmt>,
                        i: usize,
                        col: &Expr,
                        copies: &[Copy]| {
            let source = &plan.b[i];
            let n_len = e.dim(&source.n);
            for copy in copies {
                let (gk, step) = if source.k_rows {
                    let n_stride = n_len.clone();
                    (
                        add(k0.clone(), index(copy.row.clone())),
                        mul(k0.clone(), n_stride),
                    )
                } else {
                    (add(k0.clone(), index(col.clone())), k0.clone())
                };
                let k_ok = match &slice_in_k {
                    Some(ok) => ok.clone(),
                    None => in_block(lt(gk, k_size.clone())),
                };
                let valid = both(&copy.row_ok, k_ok);
                out.push(Stmt::CpAsync {
                    dst: b_tiles[if segmented { 0 } else { i }],
                    dst_index: stage.clone() * i32c(b_stage) + copy.dst.clone(),
                    src: b_bufs[i],
                    src_index: Expr::select(valid.clone(), add(copy.src.clone(), step), e.ix(0)),
                    src_len: Expr::select(valid, i32c(chunk_len), i32c(0)),
                });
            }
        };
        match &segment {
            Some(which) => {
                let branches = (0..plan.b.len())
                    .map(|i| {
                        let mut branch = Vec::new();
                        let (col, copies) = b_plan_of(e, &mut branch, i);
                        b_copies(e, &mut branch, i, &col, &copies);
                        branch
                    })
                    .collect();
                out.extend(by_segment(which, branches));
            }
            None => {
                for (i, col, copies) in &b_plans {
                    b_copies(e, &mut out, *i, col, copies);
                }
            }
        }
        out
    };

    // ---- ldmatrix row offsets (within a stage), fixed per thread.
    // Lane 8q + r names row r of matrix q.
    let ld_row = e.bind(&mut body, "ld_row", Ty::I32, and_mask(lane.clone(), 7));
    let ld_q_lo = e.bind(
        &mut body,
        "ld_q",
        Ty::I32,
        and_mask(shr(lane.clone(), 3), 1),
    );
    let ld_q_hi = e.bind(&mut body, "ld_h", Ty::I32, shr(lane.clone(), 4));
    // The k16 steps of a slice this warp takes: `s * warps_k + warp_k` for s in 0..steps.
    let warps_k = i64::from(t.warps_k);
    let k_steps = (bk / plan.input.k() as i64 / warps_k) as usize;
    let step_of = |s: usize| i32c(s as i64 * warps_k) + warp_k.clone();
    // A, x4: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15).
    let a_ld: Vec<Expr> = (0..k_steps)
        .map(|kk| {
            let row = warp_m0.clone() + ld_row.clone() + ld_q_lo.clone() * i32c(8);
            let chunk = step_of(kk) * i32c(2) + ld_q_hi.clone();
            let offset = row.clone() * i32c(bk)
                + Expr::binary(BinOp::Xor, chunk, swizzle(row, a_chunks as u32)) * i32c(chunk_len);
            e.bind(&mut body, "a_ld", Ty::I32, offset)
        })
        .collect();
    // B, x4 over two n8 tiles: (n tile j, k 0-7), (j, k 8-15), (j + 1, k 0-7), (j + 1, k 8-15).
    let b_ld: Vec<Vec<Vec<Expr>>> = plan
        .b
        .iter()
        .take(sets)
        .map(|source| {
            (0..k_steps)
                .map(|kk| {
                    (0..ni_count / 2)
                        .map(|pair| {
                            let n_tile = warp_n0.clone()
                                + (i32c(2 * pair as i64) + ld_q_hi.clone()) * i32c(8);
                            let offset = if source.k_rows {
                                let row = step_of(kk) * i32c(16)
                                    + ld_q_lo.clone() * i32c(8)
                                    + ld_row.clone();
                                let chunk = shr(n_tile, 3);
                                row.clone() * i32c(bn)
                                    + Expr::binary(
                                        BinOp::Xor,
                                        chunk,
                                        swizzle(row, (bn / chunk_len) as u32),
                                    ) * i32c(chunk_len)
                            } else {
                                let row = n_tile + ld_row.clone();
                                let chunk = step_of(kk) * i32c(2) + ld_q_lo.clone();
                                row.clone() * i32c(bk)
                                    + Expr::binary(BinOp::Xor, chunk, swizzle(row, a_chunks as u32))
                                        * i32c(chunk_len)
                            };
                            e.bind(&mut body, "b_ld", Ty::I32, offset)
                        })
                        .collect()
                })
                .collect()
        })
        .collect();

    // ---- the pipeline (after the grid-dependency wait when the block prefetched).
    if plan.prefetch.is_some() {
        body.push(Stmt::GridDependencyWait);
    }
    for s in 0..stages - 1 {
        let copies = load_stage(e, i32c(s), i32c(s));
        body.extend(copies);
        body.push(Stmt::CpAsyncCommit);
    }
    if plan.double_buffer {
        // Two fragment sets, step kk of every slice in set kk % 2 (k_steps is even). Step
        // kk + 1's fragments are loaded before step kk's products; the last step waits for
        // the next slice's stage and loads its first step. The next stage's copies go out
        // after step 1's fragments: the stage they overwrite, `(kt - 1) % stages`, was last
        // read before the previous slice's barrier.
        let frags = Fragments {
            a_tile,
            b_tiles: &b_tiles[..sets],
            a_ld: &a_ld,
            b_ld: &b_ld,
            trans: plan.b.iter().take(sets).map(|s| s.k_rows).collect(),
            bk,
            bn,
            chunk_len,
            input: plan.input,
            acc: &acc,
            a: [0; 2].map(|_| {
                (0..mi_count)
                    .map(|_| [0; 4].map(|_| e.var("fa", Ty::I32)))
                    .collect()
            }),
            b: [0; 2].map(|_| {
                (0..sets)
                    .map(|_| {
                        (0..ni_count)
                            .map(|_| [0; 2].map(|_| e.var("fb", Ty::I32)))
                            .collect()
                    })
                    .collect()
            }),
        };
        body.extend([Stmt::CpAsyncWait((stages - 2) as u32), Stmt::Barrier]);
        frags.load(&mut body, 0, 0, &i32c(0), &i32c(0));
        // The stages read (`kt % stages`) and written (`(kt + stages - 1) % stages`) as
        // counters that wrap, not remainders: fewer integer instructions beside the `mma`s.
        let read = e.var("read_stage", Ty::I32);
        let write = e.var("write_stage", Ty::I32);
        body.push(Stmt::Assign(read, i32c(0)));
        body.push(Stmt::Assign(write, i32c(stages - 1)));
        let wrap = |v: VarId| {
            Expr::select(
                (Expr::var(v) + i32c(1)).equals(i32c(stages)),
                i32c(0),
                Expr::var(v) + i32c(1),
            )
        };
        let kt = e.var("kt", Ty::I32);
        let mut kloop = Vec::new();
        let a_base = e.bind(
            &mut kloop,
            "a_base",
            Ty::I32,
            Expr::var(read) * i32c(a_stage),
        );
        let b_base = e.bind(
            &mut kloop,
            "b_base",
            Ty::I32,
            Expr::var(read) * i32c(b_stage),
        );
        let following = e.bind(&mut kloop, "next_read", Ty::I32, wrap(read));
        for kk in 0..k_steps {
            let set = kk % 2;
            if kk + 1 < k_steps {
                frags.load(&mut kloop, kk + 1, 1 - set, &a_base, &b_base);
            } else {
                kloop.extend([Stmt::CpAsyncWait((stages - 2) as u32), Stmt::Barrier]);
                let a_next = e.bind(
                    &mut kloop,
                    "a_next",
                    Ty::I32,
                    following.clone() * i32c(a_stage),
                );
                let b_next = e.bind(
                    &mut kloop,
                    "b_next",
                    Ty::I32,
                    following.clone() * i32c(b_stage),
                );
                frags.load(&mut kloop, 0, 1 - set, &a_next, &b_next);
            }
            if kk == 0 {
                let next = Expr::var(kt) + i32c(stages - 1);
                let copies = load_stage(e, Expr::var(write), next);
                kloop.extend(copies);
                kloop.push(Stmt::CpAsyncCommit);
            }
            frags.products(&mut kloop, set);
        }
        kloop.push(Stmt::Assign(read, following));
        kloop.push(Stmt::Assign(write, wrap(write)));
        body.push(Stmt::For {
            var: kt,
            start: i32c(0),
            end: k_count,
            step: i32c(1),
            body: kloop,
        });
    } else {
        let kt = e.var("kt", Ty::I32);
        let mut kloop = vec![Stmt::CpAsyncWait((stages - 2) as u32), Stmt::Barrier];
        let next = Expr::var(kt) + i32c(stages - 1);
        let next_stage = e.bind(
            &mut kloop,
            "next_stage",
            Ty::I32,
            Expr::binary(BinOp::Rem, next.clone(), i32c(stages)),
        );
        let copies = load_stage(e, next_stage, next);
        kloop.extend(copies);
        kloop.push(Stmt::CpAsyncCommit);
        let stage = Expr::binary(BinOp::Rem, Expr::var(kt), i32c(stages));
        let a_base = e.bind(&mut kloop, "a_base", Ty::I32, stage.clone() * i32c(a_stage));
        let b_base = e.bind(&mut kloop, "b_base", Ty::I32, stage * i32c(b_stage));
        let a_frag: Vec<[VarId; 4]> = (0..mi_count)
            .map(|_| [0; 4].map(|_| e.var("fa", Ty::I32)))
            .collect();
        let b_frag: Vec<[VarId; 2]> = (0..ni_count)
            .map(|_| [0; 2].map(|_| e.var("fb", Ty::I32)))
            .collect();
        for kk in 0..k_steps {
            for (mi, frag) in a_frag.iter().enumerate() {
                kloop.push(Stmt::LdMatrix {
                    dsts: frag.to_vec(),
                    trans: false,
                    buf: a_tile,
                    index: a_base.clone() + a_ld[kk].clone() + i32c(mi as i64 * 16 * bk),
                });
            }
            for (i, source) in plan.b.iter().enumerate().take(sets) {
                for pair in 0..ni_count / 2 {
                    let (lo, hi) = (&b_frag[2 * pair], &b_frag[2 * pair + 1]);
                    kloop.push(Stmt::LdMatrix {
                        dsts: vec![lo[0], lo[1], hi[0], hi[1]],
                        trans: source.k_rows,
                        buf: b_tiles[i],
                        index: b_base.clone() + b_ld[i][kk][pair].clone(),
                    });
                }
                for (mi, a) in a_frag.iter().enumerate() {
                    for (ni, b) in b_frag.iter().enumerate() {
                        let c = acc[i][mi * ni_count + ni];
                        kloop.push(Stmt::Mma {
                            input: plan.input,
                            d: c,
                            a: *a,
                            b: *b,
                            c,
                        });
                    }
                }
            }
        }
        body.push(Stmt::For {
            var: kt,
            start: i32c(0),
            end: k_count,
            step: i32c(1),
            body: kloop,
        });
    }
    // Every weight load of the block is issued: the next kernel may launch (and prefetch).
    if plan.trigger {
        body.push(Stmt::LaunchDependents);
    }
    body.push(Stmt::CpAsyncWait(0));

    // ---- split-K warps: groups 1.. leave their partial sums, group 0 adds them in order.
    if t.warps_k > 1 {
        let group_threads = 32 * tile_warps;
        let sums: Vec<VarId> = acc.iter().flatten().flatten().copied().collect();
        let count = sums.len() as i64;
        let partials = e.shared_array(
            "partials",
            DType::F32,
            ((warps_k - 1) * group_threads * count) as u32,
        );
        let in_group = e.bind(
            &mut body,
            "in_group",
            Ty::I32,
            Expr::binary(BinOp::Rem, tid.clone(), i32c(group_threads)),
        );
        let own = e.bind(
            &mut body,
            "partial",
            Ty::I32,
            ((warp_k.clone() - i32c(1)) * i32c(group_threads) + in_group.clone()) * i32c(count),
        );
        let leave = sums
            .iter()
            .enumerate()
            .map(|(i, &v)| Stmt::store(partials, own.clone() + i32c(i as i64), v))
            .collect();
        body.push(Stmt::if_then(warp_k.clone().gt(i32c(0)), leave));
        body.push(Stmt::Barrier);
        let mut gather = Vec::new();
        for group in 1..warps_k {
            let first = (i32c((group - 1) * group_threads) + in_group.clone()) * i32c(count);
            let first = e.bind(&mut gather, "partial", Ty::I32, first);
            for (i, &v) in sums.iter().enumerate() {
                gather.push(Stmt::assign(
                    v,
                    Expr::var(v) + Expr::load(partials, first.clone() + i32c(i as i64)),
                ));
            }
        }
        body.push(Stmt::if_then(warp_k.clone().equals(i32c(0)), gather));
    }

    // ---- epilogue: each accumulator element through the fused element-wise work (only the
    // first warp of a k split holds the sums).
    let first_k = (t.warps_k > 1).then(|| warp_k.clone().equals(i32c(0)));
    // Split across blocks: the block's partial sums go to the f32 workspace
    // `[splits, batch.., M, N]` (`emit_split_sum` adds them); `workspace` is the offset of
    // this block's `[M, N]` matrix in it (`[M, sum of N]` for a grid of segments).
    let workspace = match split {
        Some(_) => {
            let buf = e.workspace(0, DType::F32, kiln_kir::Access::Write);
            let matrix = if segmented {
                mul(m_size.clone(), e.ix(segment_columns(segs) as i64))
            } else {
                e.numel(&out_shape[rank - 2..])
            };
            let batch = e.numel(&batch_dims);
            let which = add(
                mul(e.special(Special::BlockIdx(1)), batch),
                e.special(Special::BlockIdx(2)),
            );
            let offset = e.bind(&mut body, "workspace", ity, mul(which, matrix));
            let row_len = if segmented {
                e.ix(segment_columns(segs) as i64)
            } else {
                e.dim(&plan.b[0].n)
            };
            // Fused matmul i's partial sums follow the first's: `[matmuls, splits, ..]`.
            let per_matmul = mul(
                e.ix(i64::from(split.expect("split").0)),
                e.numel(&out_shape),
            );
            let per_matmul = e.bind(&mut body, "per_matmul", ity, per_matmul);
            Some((buf, offset, row_len, per_matmul))
        }
        None => None,
    };
    let g4 = e.bind(&mut body, "g", Ty::I32, shr(lane.clone(), 2));
    let t2 = e.bind(&mut body, "t2", Ty::I32, and_mask(lane, 3) * i32c(2));
    // Paired stores: accumulators j and j + 1 are columns 2t and 2t + 1 of one row, stored
    // (and their epilogue operands read) as 2-element vectors under one bounds check, which
    // an even width makes exact (2t + 1 < N when 2t < N).
    let paired = plan.paired
        && workspace.is_none()
        && !segmented
        && stores
            .iter()
            .all(|&o| matches!(g.shape(o).last(), Some(Dim::Const(n)) if n % 2 == 0));
    // The accumulators' elements into `out`: every matmul's, or (`seg`) one segment's
    // matmul with the stored values computed from it.
    let elements = |e: &mut Emitter<'_, '_>,
                    out: &mut Vec<Stmt>,
                    seg: Option<usize>|
     -> EResult<()> {
        let (these, stored): (Vec<Value>, Vec<Value>) = match seg {
            Some(i) => (
                vec![matmuls[i]],
                stores
                    .iter()
                    .copied()
                    .filter(|&v| matmuls_of(e, group, v).contains(&i))
                    .collect(),
            ),
            None => (matmuls.clone(), stores.to_vec()),
        };
        for mi in 0..mi_count {
            for ni in 0..ni_count {
                if paired {
                    for (j, row_offset) in [(0, 0), (2, 8)] {
                        let row = warp_m0.clone() + g4.clone() + i32c(mi as i64 * 16 + row_offset);
                        let col = warp_n0.clone() + t2.clone() + i32c(ni as i64 * 8);
                        let gm = e.bind(out, "row", ity, add(m0.clone(), index(row)));
                        let gn = e.bind(out, "col", ity, add(n0.clone(), index(col)));
                        let accs: Vec<Vec<VarId>> = acc
                            .iter()
                            .map(|a| a[mi * ni_count + ni][j..j + 2].to_vec())
                            .collect();
                        let at = OutputElement {
                            batch: &batch,
                            row: &gm,
                            col: &gn,
                            rows: &m_size,
                        };
                        epilogue_lanes(e, out, &these, &accs, &at, None, &stored)?;
                    }
                    continue;
                }
                // Accumulator j holds row g + 8 (j / 2), column 2t + j % 2 of the m16n8 tile.
                for (j, (row_offset, col_offset)) in
                    [(0, 0), (0, 1), (8, 0), (8, 1)].into_iter().enumerate()
                {
                    let row = warp_m0.clone() + g4.clone() + i32c(mi as i64 * 16 + row_offset);
                    let col = warp_n0.clone() + t2.clone() + i32c(ni as i64 * 8 + col_offset);
                    let gm = e.bind(out, "row", ity, add(m0.clone(), index(row)));
                    let gn = e.bind(out, "col", ity, add(n0.clone(), index(col)));
                    let accs: Vec<VarId> = acc.iter().map(|a| a[mi * ni_count + ni][j]).collect();
                    if let Some((buf, offset, row_len, per_matmul)) = &workspace {
                        // The partial sums of this block's slices, at [matmul, split, batch,
                        // row, col] (a segment's at its columns of [split, batch, row, col]).
                        let (n, first_col) = match seg {
                            Some(i) => (e.ix(segs[i].n as i64), e.ix(segs[i].col as i64)),
                            None => (row_len.clone(), e.ix(0)),
                        };
                        let mut cond = and(lt(gm.clone(), m_size.clone()), lt(gn.clone(), n));
                        if let Some(first) = &first_k {
                            cond = and(cond, first.clone());
                        }
                        let at = add(
                            offset.clone(),
                            add(mul(gm, row_len.clone()), add(first_col, gn)),
                        );
                        let at = e.bind(out, "at", ity, at);
                        let partials = accs
                            .iter()
                            .enumerate()
                            .map(|(i, acc)| {
                                let at = if i == 0 {
                                    at.clone()
                                } else {
                                    add(at.clone(), mul(e.ix(i as i64), per_matmul.clone()))
                                };
                                Stmt::store(*buf, at, *acc)
                            })
                            .collect();
                        out.push(Stmt::if_then(cond, partials));
                        continue;
                    }
                    let at = OutputElement {
                        batch: &batch,
                        row: &gm,
                        col: &gn,
                        rows: &m_size,
                    };
                    epilogue_at(e, out, &these, &accs, &at, first_k.as_ref(), &stored)?;
                }
            }
        }
        Ok(())
    };
    match &segment {
        Some(which) => {
            let mut branches = Vec::new();
            for i in 0..segs.len() {
                let mut branch = Vec::new();
                elements(e, &mut branch, Some(i))?;
                branches.push(branch);
            }
            body.extend(by_segment(which, branches));
        }
        None => elements(e, &mut body, None)?,
    }
    for &m in &matmuls {
        e.fused.insert(m);
    }
    for source in &plan.b {
        if let Some(p) = source.permute {
            e.fused.insert(p);
        }
    }
    e.fused.extend(plan.casts.iter().copied());
    let input_name = if plan.input.is_fp8() {
        format!("{}_", plan.input.name())
    } else {
        String::new()
    };
    let raster_name = if plan.raster > 1 {
        format!("_r{}", plan.raster)
    } else {
        String::new()
    };
    let db_name = if plan.double_buffer { "_db" } else { "" };
    let paired_name = if paired { "_p2" } else { "" };
    let what = kernel_name(
        &format!(
            "mma_gemm_{input_name}{}{raster_name}{db_name}{paired_name}",
            t.name()
        ),
        &matmuls,
        stores,
    );
    let grid_x = if segmented {
        SizeExpr::Const(segs.iter().map(|s| s.blocks).sum())
    } else {
        ceil_div_size(size_of_dims(&[grid_n]), t.bn as u64)
    };
    Ok(Body {
        what,
        block_dim: t.threads(),
        grid: [
            grid_x,
            match split {
                Some((splits, _)) => SizeExpr::Const(u64::from(splits)),
                None => ceil_div_size(size_of_dims(&out_shape[rank - 2..rank - 1]), t.bm as u64),
            },
            size_of_dims(&batch_dims),
        ],
        stmts: body,
    })
}

/// Threads of a block of the split-K sum kernel.
const SUM_THREADS: u32 = 256;

/// The f32 workspace of a split-K GEMM: `[splits, batch.., M, N]`, the partial sums of
/// each block row's k slices (`[matmuls, splits, ..]` for horizontally fused matmuls).
pub(crate) fn split_workspace(g: &FuncGraph<'_>, group: &Group, plan: &MmaPlan) -> Workspace {
    let (splits, _) = plan.split().expect("a split GEMM");
    let mut shape = Vec::new();
    if plan.tile.segmented {
        // `[splits, batch.., M, sum of N]`: the segments' columns side by side.
        let out = g.shape(group.roots[0]);
        shape.push(SizeExpr::Const(u64::from(splits)));
        shape.extend(out[..out.len() - 1].iter().map(dim_size));
        shape.push(SizeExpr::Const(segment_columns(&plan.segments)));
        return Workspace {
            dtype: DType::F32,
            shape,
        };
    }
    if group.roots.len() > 1 {
        shape.push(SizeExpr::Const(group.roots.len() as u64));
    }
    shape.push(SizeExpr::Const(u64::from(splits)));
    shape.extend(g.shape(group.roots[0]).iter().map(dim_size));
    Workspace {
        dtype: DType::F32,
        shape,
    }
}

/// The second kernel of a split-K GEMM: one thread per output element adds the
/// workspace's partial sums in split order (a fixed order, so the result is the same bits
/// on every run) and applies the group's epilogue to the total. `writes`: the `kv_write`s
/// a grid of segments' sum kernel performs, each with its segment (`templates::KvWrites`).
pub(crate) fn emit_split_sum(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    stores: &[Value],
    plan: &MmaPlan,
    writes: Option<&KvFused>,
) -> EResult<Body> {
    let g = e.g;
    let (splits, _) = plan.split().expect("a split GEMM");
    let matmuls = group.roots.clone();
    let out_shape = g.shape(matmuls[0]).to_vec();
    let rank = out_shape.len();
    if plan.tile.segmented {
        return emit_segmented_sum(e, group, stores, plan, splits, writes);
    }
    let ity = e.index_ty;
    let mut body = Vec::new();
    let total = e.numel(&out_shape);
    let gid = add(
        mul(
            e.special(Special::BlockIdx(0)),
            e.ix(i64::from(SUM_THREADS)),
        ),
        e.special(Special::ThreadIdx),
    );
    let gid = e.bind(&mut body, "gid", ity, gid);
    let workspace = e.workspace(0, DType::F32, kiln_kir::Access::Read);
    let mut inner = Vec::new();
    // One sum per fused matmul, each over its splits in order.
    let mut sums = Vec::with_capacity(matmuls.len());
    for i in 0..matmuls.len() as i64 {
        let first = add(gid.clone(), mul(e.ix(i * i64::from(splits)), total.clone()));
        sums.push(sum_in_split_order(
            e, &mut inner, workspace, first, &total, splits,
        ));
    }
    let idx = e.delinearize(&mut inner, gid.clone(), &out_shape);
    let rows = e.dim(&out_shape[rank - 2]);
    let at = OutputElement {
        batch: &idx[..rank - 2],
        row: &idx[rank - 2],
        col: &idx[rank - 1],
        rows: &rows,
    };
    epilogue_at(e, &mut inner, &matmuls, &sums, &at, None, stores)?;
    body.push(Stmt::if_then(lt(gid, total), inner));
    let what = kernel_name(&format!("splitk{splits}_sum"), &matmuls, stores);
    Ok(Body::over(what, SUM_THREADS, &out_shape, body))
}

/// The f32 sum of the workspace's `splits` partial sums at `first`, `first + stride`, ... in
/// split order (the same bits every run), computed into `out`.
fn sum_in_split_order(
    e: &mut Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    workspace: Buf,
    first: Expr,
    stride: &Expr,
    splits: u32,
) -> VarId {
    let sum = e.var("sum", Ty::F32);
    out.push(Stmt::Assign(sum, Expr::load(workspace, first.clone())));
    for s in 1..i64::from(splits) {
        let at = add(first.clone(), mul(e.ix(s), stride.clone()));
        out.push(Stmt::assign(
            sum,
            Expr::var(sum) + Expr::load(workspace, at),
        ));
    }
    sum
}

/// [`emit_split_sum`] for a grid of segments: a thread per element of the workspace's
/// `[batch.., M, sum of N]` rows; the segment holding its column gives the matmul, whose
/// stored values the epilogue writes. The threads of a segment with a `kv_write` of
/// `writes` store that write's rows instead: the thread of row `t`, column `c` the element
/// (`t`, `c / dim`, `c % dim`) of the rows into the cache at slot `slots[t]`, its values
/// computed from the partial sums ([`SplitSum`], read wherever the rows read them: RoPE's
/// rotated half).
fn emit_segmented_sum(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    stores: &[Value],
    plan: &MmaPlan,
    splits: u32,
    writes: Option<&KvFused>,
) -> EResult<Body> {
    let g = e.g;
    let matmuls = group.roots.clone();
    let segs = &plan.segments;
    let mut dims = g.shape(matmuls[0]).to_vec();
    let rank = dims.len();
    dims[rank - 1] = Dim::Const(segment_columns(segs));
    let ity = e.index_ty;
    let mut body = Vec::new();
    let total = e.numel(&dims);
    let gid = add(
        mul(
            e.special(Special::BlockIdx(0)),
            e.ix(i64::from(SUM_THREADS)),
        ),
        e.special(Special::ThreadIdx),
    );
    let gid = e.bind(&mut body, "gid", ity, gid);
    let workspace = e.workspace(0, DType::F32, kiln_kir::Access::Read);
    let mut inner = Vec::new();
    let sum = sum_in_split_order(e, &mut inner, workspace, gid.clone(), &total, splits);
    let idx = e.delinearize(&mut inner, gid.clone(), &dims);
    let rows = e.dim(&dims[rank - 2]);
    for (i, seg) in segs.iter().enumerate() {
        let first = e.ix(seg.col as i64);
        let below_end = lt(idx[rank - 1].clone(), e.ix((seg.col + seg.n) as i64));
        let inside = if seg.col == 0 {
            below_end
        } else {
            and(first.clone().le(idx[rank - 1].clone()), below_end)
        };
        let col = e.bind(&mut inner, "col", ity, sub(idx[rank - 1].clone(), first));
        let at = OutputElement {
            batch: &idx[..rank - 2],
            row: &idx[rank - 2],
            col: &col,
            rows: &rows,
        };
        let stored: Vec<Value> = stores
            .iter()
            .copied()
            .filter(|&v| matmuls_of(e, group, v).contains(&i))
            .collect();
        let mut then = Vec::new();
        let write = writes.and_then(|fused| {
            let (_, w) = fused.writes.iter().find(|(seg, _)| *seg == i)?;
            Some((&fused.owned, *w))
        });
        match write {
            Some((kv, w)) => {
                let source = SplitSum {
                    workspace,
                    matmuls: vec![matmuls[i]],
                    splits,
                    owned: group.owned.clone(),
                    segment: Some((segment_columns(segs), seg.col)),
                };
                then = kv_write_element(e, kv, w, source, &stored, &idx[rank - 2], &col)?;
            }
            None => epilogue_at(e, &mut then, &[matmuls[i]], &[sum], &at, None, &stored)?,
        }
        inner.push(Stmt::if_then(inside, then));
    }
    body.push(Stmt::if_then(lt(gid, total), inner));
    let mut what = kernel_name(&format!("splitk{splits}_sum"), &matmuls, stores);
    if writes.is_some_and(|fused| !fused.writes.is_empty()) {
        what = format!("{what}_kv_write");
    }
    Ok(Body::over(what, SUM_THREADS, &dims, body))
}

/// The statements of a sum kernel's thread that stores element (`row`, `col`) of
/// `kv_write` `w`'s rows (`[M, heads, dim]`, computed from the values one segment stores,
/// each added from the partial sums by `source`, and the values of `kv`) into its cache:
/// `w`'s own addressing, a negative slot or one past the cache storing nothing.
fn kv_write_element(
    e: &mut Emitter<'_, '_>,
    kv: &BTreeSet<Value>,
    w: Value,
    source: SplitSum,
    stored: &[Value],
    row: &Expr,
    col: &Expr,
) -> EResult<Vec<Stmt>> {
    let g = e.g;
    let rows = g.inst(w).expect("kv_write").operands[1];
    let Some(dim) = g.shape(rows).get(2).and_then(Dim::as_const) else {
        return Err(e.internal(w, "kv_write rows of a symbolic head dim"));
    };
    let ity = e.index_ty;
    let mut out = Vec::new();
    let head = e.bind(&mut out, "head", ity, div(col.clone(), e.ix(dim as i64)));
    let at = e.bind(&mut out, "d", ity, rem(col.clone(), e.ix(dim as i64)));
    // The rows are computed as the `kv_write` kernel computes them, the segment's stored
    // values from the partial sums.
    let held_sums = e.split_sums.len();
    e.split_sums.push(source);
    for &v in stored {
        e.sourced.insert(v, held_sums);
    }
    let owned = std::mem::replace(&mut e.owned, kv.clone());
    e.push_scope();
    let stmts = super::kv_cache::store_row(e, w, row, &head, &at, 1);
    e.pop_scope();
    e.owned = owned;
    for v in stored {
        e.sourced.remove(v);
    }
    e.split_sums.truncate(held_sums);
    out.extend(stmts?);
    e.fused.insert(w);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_fits_shared_memory_and_registers() {
        for m in [Some(1), Some(16), Some(64), Some(65), Some(4096), None] {
            for n in [8, 64, 4096, 14336] {
                for matmuls in 1..=3 {
                    let t = choose_tile(m, n, matmuls);
                    assert!(t.stages >= 2, "{t:?}");
                    assert!(
                        t.stages * t.stage_bytes(matmuls) + t.reduction_bytes(matmuls)
                            <= SHARED_BYTES,
                        "{t:?}"
                    );
                    assert_eq!((t.bk / 16) % t.warps_k, 0, "{t:?}");
                    assert!(t.accumulators(matmuls) <= MAX_ACCUMULATORS, "{t:?}");
                    // Whole m16n8 fragments, pairs of n8 tiles for ldmatrix x4, and copies
                    // that divide evenly among the threads.
                    assert_eq!(t.warp_m() % 16, 0, "{t:?}");
                    assert_eq!(t.warp_n() % 16, 0, "{t:?}");
                    assert_eq!((t.bm * t.bk / 8) % t.threads(), 0, "{t:?}");
                    assert_eq!((t.bn * t.bk / 8) % t.threads(), 0, "{t:?}");
                }
            }
        }
        assert_eq!(choose_tile(None, 4096, 1).name(), "128x128x32_w2x2_s3");
        assert_eq!(choose_tile(Some(64), 4096, 1).name(), "64x128x32_w2x2_s4");
        assert_eq!(choose_tile(Some(16), 4096, 1).name(), "16x32x128_w1x2x4_s3");
    }

    #[test]
    fn fp8_tiles_stage_the_same_bytes_and_fit_their_registers() {
        for m in [Some(1), Some(16), Some(64), Some(4096), None] {
            for n in [8, 64, 4096] {
                for matmuls in 1..=3 {
                    let wide = choose_tile(m, n, matmuls);
                    let t = fp8_tile(wide, matmuls);
                    // One byte an element: the 16-bit tile's stage bytes.
                    assert_eq!(t.bk * (t.bm + matmuls * t.bn), wide.stage_bytes(matmuls));
                    assert_eq!((t.bk / 32) % t.warps_k, 0, "{t:?}");
                    assert_eq!(t.warp_n() % 16, 0, "{t:?}");
                    assert_eq!((t.bm * t.bk / 16) % t.threads(), 0, "{t:?}");
                    assert_eq!((t.bn * t.bk / 16) % t.threads(), 0, "{t:?}");
                    assert!(t.threads() <= 256, "{t:?}");
                    if t.warps_k == 1 && t.warp_n() > 16 {
                        assert!(t.accumulators(matmuls) <= FP8_MAX_ACCUMULATORS, "{t:?}");
                    }
                }
            }
        }
        assert_eq!(
            fp8_tile(choose_tile(None, 8192, 1), 1).name(),
            "128x128x64_w2x4_s3"
        );
        assert_eq!(
            fp8_tile(choose_tile(Some(16), 4096, 1), 1).name(),
            "16x32x256_w1x2x4_s3"
        );
    }

    #[test]
    fn decode_grids_of_few_blocks_per_sm_split_k_across_blocks() {
        let decode = choose_tile(Some(16), 4096, 1);
        // (m, n, k, batch) -> splits: 4096-wide N makes 128 tiles; 32 slices of K = 4096
        // in 4 blocks of 8 make 512 blocks (3.9 per SM). 14336-wide N (448 blocks, 3.4 per
        // SM) is left alone, and so is a K too short for two blocks of 4 slices.
        for (m, n, k, batch, splits) in [
            (1, 4096, 4096, 1, 4),
            (16, 4096, 4096, 1, 4),
            (16, 4096, 14336, 1, 4),
            (16, 14336, 4096, 1, 1),
            (1, 14336, 4096, 1, 1),
            (16, 11008, 4096, 1, 1),
            (16, 1024, 4096, 1, 8),
            (16, 4096, 4096, 2, 2),
            (16, 1024, 1408, 1, 2),
            (16, 4096, 4096, 4, 1),
            (16, 4096, 896, 1, 1),
            (16, 4096, 1024, 1, 2),
            (17, 4096, 4096, 1, 1),
        ] {
            assert_eq!(
                choose_splits(&decode, m, n, k, batch),
                splits,
                "{m}x{n}x{k} batch {batch}"
            );
        }
        // Every block of a split has a slice.
        for k in (8..20_000).step_by(8) {
            let s = u64::from(choose_splits(&decode, 1, 4096, k, 1));
            let slices = k.div_ceil(128);
            let per_split = slices.div_ceil(s);
            assert!((s - 1) * per_split < slices, "k {k}: {s} splits");
        }
        let prefill = choose_tile(None, 4096, 1);
        assert_eq!(choose_splits(&prefill, 16, 4096, 4096, 1), 1);
        let mut split = decode;
        split.splits = 5;
        assert_eq!(split.name(), "16x32x128_w1x2x4_s3_splitk5");
    }

    #[test]
    fn segments_lay_out_the_matmuls_block_columns_one_after_another() {
        // q/k/v of the 1.1B Llama: 64 + 16 + 16 = 96 block columns of 32; as one grid of at
        // most a block per SM, its 16 slices of K = 2048 split over 4 blocks (384 blocks).
        let segs = segments(&[2048, 512, 512], 32);
        let starts: Vec<(u64, u64, u64)> =
            segs.iter().map(|s| (s.start, s.blocks, s.col)).collect();
        assert_eq!(starts, [(0, 64, 0), (64, 16, 2048), (80, 16, 2560)]);
        assert_eq!(segment_columns(&segs), 3072);
        let mut tile = choose_tile(Some(16), 2048, 1);
        tile.segmented = true;
        assert_eq!(tile.name(), "16x32x128_w1x2x4_s3_seg");
        assert_eq!(choose_splits(&tile, 1, 96 * 32, 2048, 1), 4);
        // A cap on the splits (`GemmTuning::max_splits`) holds, 1 meaning none.
        assert_eq!(choose_splits_at_most(&tile, 1, 96 * 32, 2048, 1, 2), 2);
        assert_eq!(choose_splits_at_most(&tile, 1, 96 * 32, 2048, 1, 1), 1);
        // Ragged widths: a partial last tile in each segment.
        let segs = segments(&[96, 32, 40], 32);
        let starts: Vec<(u64, u64, u64)> =
            segs.iter().map(|s| (s.start, s.blocks, s.col)).collect();
        assert_eq!(starts, [(0, 3, 0), (3, 1, 96), (4, 2, 128)]);
    }

    #[test]
    fn the_swizzle_spreads_eight_rows_over_eight_bank_groups() {
        for chunks in [4u32, 8, 16] {
            for chunk in 0..chunks {
                for first in (0..64).step_by(8) {
                    let mut groups = std::collections::BTreeSet::new();
                    for row in first..first + 8 {
                        let (shift, mask) = swizzle_bits(chunks);
                        let xor = (row >> shift) & mask as u32;
                        let position = row * chunks + (chunk ^ xor);
                        groups.insert(position % 8);
                    }
                    assert_eq!(groups.len(), 8, "{chunks} chunks, chunk {chunk}");
                }
            }
        }
    }
}
