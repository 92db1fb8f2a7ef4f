//! Hopper's warpgroup matrix multiply (`wgmma`, sm_90a only) in the kernel IR: the
//! statement family [`WgmmaOp`], the 64-bit shared-memory matrix descriptor, the 128-byte
//! swizzled K-major tile addressing and the accumulator fragment layout, shared by the
//! interpreter (which defines the semantics) and the PTX emitter (which encodes the same
//! descriptor).
//!
//! Semantics:
//! - A *warpgroup* is 4 consecutive warps starting at a warp index divisible by 4 (128
//!   threads). `WgmmaOp::Mma` is a warpgroup collective: every thread of a warpgroup that
//!   executes it must be active (block-uniform control flow, like `Mma`), and its operand
//!   indices must be the same in the whole warpgroup.
//! - `Mma` is `wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{input}.{input}`: `D = A · Bᵀ
//!   (+ D when accumulating)` with A a 64 × 16 tile and B an `n` × 16 tile, both K-major (16
//!   consecutive k of a row are 32 contiguous bytes) in shared memory, read through
//!   descriptors ([`descriptor`]) with the 128-byte swizzle: element (row, k) of a tile whose
//!   descriptor starts at byte `s` is at the byte [`k_major_address`] gives, `s + (row / 8)
//!   · sbo + (row % 8) · 128 + 2 k` with bits 4..7 XORed with bits 7..10 (absolute shared
//!   addresses: each shared array of a kernel with a `wgmma` starts 1024-byte aligned, and
//!   `s % 1024` must be below 128, i.e. the descriptor starts in the first row of a swizzle
//!   atom; advancing it by 32 bytes per k16 step within that row is how a 64-wide slice is
//!   walked).
//! - `d` holds `n / 2` f32 accumulators per thread ([`accumulator_element`]): thread `t` of
//!   the warpgroup, warp `w = t / 32`, `g = (t % 32) / 4`, `q = t % 4`, register `i` holds
//!   row `16 w + g + 8 ((i / 2) % 2)`, column `8 (i / 4) + 2 q + i % 2`.
//! - The reference computes each element as `fma` over k = 0..16 in order, starting from
//!   D (or 0 without accumulation), as `Mma` does.
//! - Asynchrony: the product is issued by `Mma` and completes at a later `Wait`. Before the
//!   first `Mma` of a batch the warpgroup executes `Fence` (`wgmma.fence`, which orders the
//!   accumulator registers' earlier writes); `Commit` closes the warpgroup's open batch;
//!   `Wait(n)` waits until at most `n` committed batches are pending. The interpreter
//!   computes the product when it is issued; a kernel must not touch `d` between `Mma`
//!   and its `Wait` (ptxas reports that, C7515, and serializes), nor write a shared element
//!   a pending batch reads: the interpreter reports both.
//! - Shared memory written through the generic proxy (`Store`, `StoreVec`, `CpAsync`) is
//!   read by `Mma` through the async proxy: each writing thread executes `FenceProxyAsync`
//!   (`fence.proxy.async.shared::cta`) after its writes are complete (after the
//!   `CpAsyncWait` of a copy) and before the barrier that precedes the read. The interpreter
//!   reports an `Mma` that reads an element whose write no fence of its writer followed.

use crate::kernel::{Buf, Expr, MmaInput, VarId};

/// Threads in a warpgroup.
pub const WARPGROUP: usize = 128;

/// Rows of the A tile of one product.
pub const M: usize = 64;

/// The k extent of one 16-bit product.
pub const K: usize = 16;

/// Bytes of one row of a 128-byte swizzle atom (8 rows, 1024 bytes).
pub const SWIZZLE_BYTES: u64 = 128;

/// The alignment of a shared array read by `wgmma` (one 128-byte swizzle atom).
pub const SHARED_ALIGN: u64 = 1024;

/// A K-major, 128-byte swizzled operand tile in a shared array: the descriptor's start is
/// element `index` (I32) of `buf`, and `sbo` bytes separate consecutive groups of 8 rows.
#[derive(Clone, Debug, PartialEq)]
pub struct WgmmaTile {
    pub buf: Buf,
    pub index: Expr,
    pub sbo: u32,
}

/// A warpgroup matrix-multiply statement (module documentation).
#[derive(Clone, Debug, PartialEq)]
pub enum WgmmaOp {
    /// `wgmma.fence.sync.aligned`.
    Fence,
    /// `wgmma.commit_group.sync.aligned`.
    Commit,
    /// `wgmma.wait_group.sync.aligned n`.
    Wait(u32),
    /// `fence.proxy.async.shared::cta` (per thread).
    FenceProxyAsync,
    /// `wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{input}.{input}`, f16 or bf16 inputs,
    /// `n` a multiple of 8 in 8..=256, `d` its `n / 2` F32 registers.
    Mma {
        input: MmaInput,
        n: u32,
        d: Vec<VarId>,
        a: WgmmaTile,
        b: WgmmaTile,
        accumulate: bool,
    },
}

impl WgmmaOp {
    /// Whether the statement is a warpgroup collective (block-uniform control flow).
    pub fn is_collective(&self) -> bool {
        !matches!(self, WgmmaOp::FenceProxyAsync)
    }
}

/// The leading-dimension byte offset of a K-major swizzled tile (unused by the hardware
/// when the k extent, 32 bytes, lies within the swizzle row; 16 by convention).
pub const LBO: u32 = 16;

/// The 64-bit descriptor of a K-major 128-byte swizzled tile starting at shared byte
/// address `start`: bits 0..14 `start >> 4`, 16..30 `lbo >> 4`, 32..46 `sbo >> 4`, 49..52
/// the base offset (0: the tile's atoms are 1024-byte aligned), 62..64 the swizzle mode
/// (1: 128 bytes).
pub fn descriptor(start: u32, lbo: u32, sbo: u32) -> u64 {
    let field = |bytes: u32| (u64::from(bytes) >> 4) & 0x3fff;
    field(start) | (field(lbo) << 16) | (field(sbo) << 32) | (1u64 << 62)
}

/// The constant bits of [`descriptor`] (everything but the start address).
pub fn descriptor_high(sbo: u32) -> u64 {
    descriptor(0, LBO, sbo)
}

/// The shared byte address of element (row, k) (`k_byte` = 2 k for 16-bit elements) of
/// the tile that `desc` describes, as the hardware computes it for a K-major operand with
/// the 128-byte swizzle. An error for another swizzle mode or a nonzero base offset (the
/// only encoding kiln emits).
pub fn k_major_address(desc: u64, row: u64, k_byte: u64) -> Result<u64, String> {
    let start = (desc & 0x3fff) << 4;
    let sbo = ((desc >> 32) & 0x3fff) << 4;
    let base_offset = (desc >> 49) & 7;
    let swizzle = desc >> 62;
    if swizzle != 1 || base_offset != 0 {
        return Err(format!(
            "descriptor {desc:#x}: swizzle mode {swizzle} and base offset {base_offset} \
             (only the 128-byte swizzle with base offset 0)"
        ));
    }
    if start % SHARED_ALIGN >= SWIZZLE_BYTES {
        return Err(format!(
            "descriptor start {start} is not in the first row of a 1024-byte swizzle atom"
        ));
    }
    let linear = start + (row / 8) * sbo + (row % 8) * SWIZZLE_BYTES + k_byte;
    Ok(linear ^ (((linear >> 7) & 7) << 4))
}

/// The byte offset, in a tile whose rows are 128 bytes (64 16-bit elements; 8 rows make
/// an atom), of the 16-byte chunk `chunk` of row `row` stored with the 128-byte swizzle:
/// where a `CpAsync` writes it so that [`k_major_address`] reads it back.
pub fn swizzled_chunk(row: u64, chunk: u64) -> u64 {
    row * SWIZZLE_BYTES + ((chunk ^ (row % 8)) * 16)
}

/// The (row, column) of accumulator register `i` of thread `t` (0..128) of a warpgroup.
pub fn accumulator_element(t: usize, i: usize) -> (usize, usize) {
    let (w, lane) = (t / 32, t % 32);
    let (g, q) = (lane / 4, lane % 4);
    (16 * w + g + 8 * ((i / 2) % 2), 8 * (i / 4) + 2 * q + i % 2)
}

/// Whether `stmts` (nested ones included) hold a `Wgmma` statement.
pub fn uses_wgmma(stmts: &[crate::kernel::Stmt]) -> bool {
    use crate::kernel::Stmt;
    stmts.iter().any(|s| match s {
        Stmt::Wgmma(_) => true,
        Stmt::For { body, .. } => uses_wgmma(body),
        Stmt::If {
            then, otherwise, ..
        } => uses_wgmma(then) || uses_wgmma(otherwise),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_fields() {
        let d = descriptor(0x1_2340, LBO, 1024);
        assert_eq!(d & 0x3fff, 0x1234);
        assert_eq!((d >> 16) & 0x3fff, 1);
        assert_eq!((d >> 32) & 0x3fff, 64);
        assert_eq!(d >> 62, 1);
        assert_eq!(descriptor_high(1024) | 0x1234, d);
    }

    #[test]
    fn swizzled_reads_find_swizzled_writes() {
        // A 16-row tile of 64 k in two atoms; step j starts 32 bytes on.
        for j in 0..4u64 {
            let desc = descriptor(2048 + 32 * j as u32, LBO, 1024);
            for row in 0..16u64 {
                for k in 0..16u64 {
                    let kk = 16 * j + k;
                    let written = 2048 + swizzled_chunk(row, kk / 8) + 2 * (kk % 8);
                    assert_eq!(k_major_address(desc, row, 2 * k).unwrap(), written);
                }
            }
        }
        assert!(k_major_address(descriptor(2048 + 128, LBO, 1024), 0, 0).is_err());
        assert!(k_major_address(descriptor(0, LBO, 1024) & !(3 << 62), 0, 0).is_err());
    }

    #[test]
    fn every_accumulator_element_is_held_once() {
        let n = 256;
        let mut seen = vec![0u32; M * n];
        for t in 0..WARPGROUP {
            for i in 0..n / 2 {
                let (r, c) = accumulator_element(t, i);
                seen[r * n + c] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1));
        // Thread 37 (warp 1, g 1, q 1): register 7 is row 16 + 1 + 8, column 8 + 2 + 1.
        assert_eq!(accumulator_element(37, 7), (25, 11));
        assert_eq!(accumulator_element(37, 4), (17, 10));
    }
}
