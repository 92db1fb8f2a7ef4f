//! Where a kernel's shared arrays live: declared one by one as static `.shared` arrays when
//! they fit the 48 KiB a block may declare statically, else packed at fixed offsets into
//! one dynamic shared-memory window whose size the launch passes (the manifest's
//! `KernelInfo::dynamic_shared_bytes`).
//!
//! Only kernels beyond the static limit take the dynamic window: every other kernel keeps
//! byte-identical PTX, ptxas keeps reporting its shared memory, and the runtime need not set
//! a function attribute for it.

use crate::kernel::Kernel;

/// The shared memory a block may declare statically, in bytes (every CUDA GPU).
pub const MAX_STATIC_SHARED_BYTES: u64 = 48 * 1024;

/// The most shared memory a block of any kiln target may opt into (sm_90a and sm_100a:
/// 227 KiB, their SM's 228 KiB less the 1 KiB each block reserves). Each target's own limit
/// is checked by the PTX emitter.
pub const MAX_DYNAMIC_SHARED_BYTES: u64 = 227 * 1024;

/// Each array of the dynamic window starts at a multiple of this many bytes (the alignment
/// of a 16-byte vector, `ldmatrix` row and `cp.async` chunk).
pub const ARRAY_ALIGN: u64 = 16;

/// The placement of a kernel's shared arrays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLayout {
    /// Per array (in declaration order): its bytes.
    pub sizes: Vec<u64>,
    /// Per array: its byte offset in the dynamic window (all zero when static).
    pub offsets: Vec<u64>,
    /// Whether the arrays live in the dynamic window.
    pub dynamic: bool,
    /// The bytes a block needs: the static arrays' sum, or the window's size (the last
    /// array's end, arrays padded to [`ARRAY_ALIGN`]).
    pub bytes: u64,
    /// The alignment of each array (and of the window): [`ARRAY_ALIGN`], or 1024 bytes in
    /// a kernel with a `Wgmma` (its 128-byte swizzled tiles, [`crate::wgmma`]).
    pub align: u64,
}

impl SharedLayout {
    /// The layout of `kernel`'s arrays.
    pub fn of(kernel: &Kernel) -> SharedLayout {
        let sizes: Vec<u64> = kernel
            .shared
            .iter()
            .map(|s| u64::from(s.len) * s.dtype.size_bytes() as u64)
            .collect();
        let total: u64 = sizes.iter().sum();
        let align = if crate::wgmma::uses_wgmma(&kernel.body) {
            crate::wgmma::SHARED_ALIGN
        } else {
            ARRAY_ALIGN
        };
        if total <= MAX_STATIC_SHARED_BYTES {
            return SharedLayout {
                offsets: vec![0; sizes.len()],
                sizes,
                dynamic: false,
                bytes: total,
                align,
            };
        }
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut end = 0u64;
        for size in &sizes {
            let start = end.next_multiple_of(align);
            offsets.push(start);
            end = start + size;
        }
        SharedLayout {
            sizes,
            offsets,
            dynamic: true,
            bytes: end,
            align,
        }
    }

    /// The dynamic shared memory a launch passes: the window's size, or 0 when static.
    pub fn dynamic_bytes(&self) -> u64 {
        if self.dynamic {
            self.bytes
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::KernelBuilder;
    use kiln_ir::DType;

    fn kernel(arrays: &[(DType, u32)]) -> Kernel {
        let mut b = KernelBuilder::new("k", 128);
        for (i, (dtype, len)) in arrays.iter().enumerate() {
            b.shared(format!("s{i}"), *dtype, *len);
        }
        b.finish(Vec::new())
    }

    #[test]
    fn small_kernels_stay_static() {
        let layout = SharedLayout::of(&kernel(&[(DType::F32, 3), (DType::BF16, 24 * 1024 - 6)]));
        assert!(!layout.dynamic);
        assert_eq!(layout.bytes, 48 * 1024);
        assert_eq!(layout.offsets, vec![0, 0]);
        assert_eq!(layout.dynamic_bytes(), 0);
        let empty = SharedLayout::of(&kernel(&[]));
        assert_eq!((empty.dynamic, empty.bytes), (false, 0));
    }

    #[test]
    fn large_kernels_pack_aligned_arrays_into_one_window() {
        // 3 f32 (12 bytes), then 40 KiB of bf16, then one f16 and 8 KiB of f32.
        let layout = SharedLayout::of(&kernel(&[
            (DType::F32, 3),
            (DType::BF16, 20 * 1024),
            (DType::F16, 1),
            (DType::F32, 2048),
        ]));
        assert!(layout.dynamic);
        assert_eq!(layout.sizes, vec![12, 40 * 1024, 2, 8192]);
        assert_eq!(layout.offsets, vec![0, 16, 16 + 40 * 1024, 32 + 40 * 1024]);
        assert_eq!(layout.bytes, 32 + 48 * 1024);
        assert_eq!(layout.dynamic_bytes(), layout.bytes);
        assert!(layout.offsets.iter().all(|o| o % ARRAY_ALIGN == 0));
    }
}
