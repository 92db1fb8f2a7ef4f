//! The instructions whose availability depends on the target and the PTX version, with the
//! floors found by assembling probes with ptxas 13.5 (see the tests in
//! `tests/emit_snapshots.rs` and the table in the crate's `emit` module documentation).
//!
//! Everything else the emitter prints is baseline for every kiln target at its minimum
//! `.version` (sm_80 / PTX 7.0): `cvt.rn.bf16.f32`, `cvt.rn.{bf16x2,f16x2}.f32`,
//! `min.NaN`/`max.NaN`, `shfl.sync`, `bar.sync`, f64 arithmetic, `clz`, `bfe`/`bfi`.

use crate::target::{PtxVersion, Target};

/// An instruction family with a target- or version-dependent floor. The emitter uses it
/// when the target has it and the version it needs is within the cap; otherwise it emits
/// an exact fallback sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// `cvt.f32.bf16`: sm_80 with PTX 7.1 (7.0 rejects it). Fallback: the bf16 bits
    /// shifted into the top of an f32 (exact).
    Bf16ToF32,
    /// `cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32` and `cvt.rn.f16x2.{e4m3x2,e5m2x2}`: sm_89
    /// needs PTX 8.1, sm_90 and later 7.8; sm_80 has none. Fallback: the integer
    /// routines of [`crate::numeric::convert`] (encode) and exact bit placement (decode).
    Fp8Convert,
    /// `griddepcontrol.wait` (programmatic dependent launch): sm_90 and later with PTX 7.8;
    /// sm_80 and sm_89 have none. Every kernel starts with it where the target has it (see the prologue in `function.rs`); without them
    /// the runtime launches kernels one after another, so there is no fallback sequence.
    GridDependencyControl,
    /// `cp.async.bulk.prefetch.L2.global` (an L2 prefetch of a byte range, the kernel IR's
    /// `PrefetchL2`): sm_90 and later with PTX 8.0; sm_80 and sm_89 have none. It is only a
    /// hint, placed before `griddepcontrol.wait` to overlap the previous kernel, which those
    /// targets cannot do: without it the emitter leaves the statement out.
    BulkPrefetchL2,
    /// `mma.sync.aligned.m16n8k32.row.col.f32.{e4m3,e5m2}.{e4m3,e5m2}.f32`: sm_89 and later
    /// with PTX 8.4; sm_80 has none and there is no fallback (an FP8 `Mma` for sm_80 is an
    /// error: the fusion leaves FP8 matmuls to other templates unless every target has it).
    Fp8Mma,
    /// `wgmma.{fence,commit_group,wait_group,mma_async}` and `fence.proxy.async.shared::cta`
    /// (the kernel IR's `Wgmma`): sm_90a only with PTX 8.0 (sm_100a and sm_120 reject
    /// wgmma); no fallback (the fusion uses the wgmma GEMM only when every target has it).
    Wgmma,
}

impl Feature {
    pub const ALL: [Feature; 6] = [
        Feature::Bf16ToF32,
        Feature::Fp8Convert,
        Feature::GridDependencyControl,
        Feature::BulkPrefetchL2,
        Feature::Fp8Mma,
        Feature::Wgmma,
    ];

    /// The instructions, as in a PTX listing.
    pub fn instructions(self) -> &'static str {
        match self {
            Feature::Bf16ToF32 => "cvt.f32.bf16",
            Feature::Fp8Convert => {
                "cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32, cvt.rn.f16x2.{e4m3x2,e5m2x2}"
            }
            Feature::GridDependencyControl => {
                "griddepcontrol.wait, griddepcontrol.launch_dependents"
            }
            Feature::BulkPrefetchL2 => "cp.async.bulk.prefetch.L2.global",
            Feature::Fp8Mma => "mma.sync.aligned.m16n8k32.row.col.f32.{e4m3,e5m2}",
            Feature::Wgmma => "wgmma.*, fence.proxy.async.shared::cta",
        }
    }

    /// The lowest `.version` that has the feature on `target`, or `None` when the target
    /// lacks it (the result is never below the target's own minimum).
    pub fn min_ptx_version(self, target: Target) -> Option<PtxVersion> {
        let floor = match (self, target) {
            (Feature::Bf16ToF32, _) => PtxVersion::new(7, 1),
            (Feature::Fp8Convert, Target::Sm80) => return None,
            (Feature::Fp8Convert, Target::Sm89) => PtxVersion::new(8, 1),
            (Feature::Fp8Convert, _) => PtxVersion::new(7, 8),
            (Feature::GridDependencyControl, Target::Sm80 | Target::Sm89) => return None,
            (Feature::GridDependencyControl, _) => PtxVersion::new(7, 8),
            (Feature::BulkPrefetchL2, Target::Sm80 | Target::Sm89) => return None,
            (Feature::BulkPrefetchL2, _) => PtxVersion::new(8, 0),
            (Feature::Fp8Mma, Target::Sm80) => return None,
            (Feature::Fp8Mma, _) => PtxVersion::new(8, 4),
            (Feature::Wgmma, Target::Sm90a) => PtxVersion::new(8, 0),
            (Feature::Wgmma, _) => return None,
        };
        Some(floor.max(target.min_ptx_version()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_per_target() {
        let table: Vec<(Target, Vec<Option<String>>)> = Target::ALL
            .iter()
            .map(|&t| {
                let floors = Feature::ALL
                    .iter()
                    .map(|f| f.min_ptx_version(t).map(|v| v.to_string()))
                    .collect();
                (t, floors)
            })
            .collect();
        let v = |s: &str| Some(s.to_string());
        assert_eq!(
            table,
            [
                (Target::Sm80, vec![v("7.1"), None, None, None, None, None]),
                (
                    Target::Sm89,
                    vec![v("7.8"), v("8.1"), None, None, v("8.4"), None]
                ),
                (
                    Target::Sm90a,
                    vec![v("8.0"), v("8.0"), v("8.0"), v("8.0"), v("8.4"), v("8.0")]
                ),
                (
                    Target::Sm100a,
                    vec![v("8.6"), v("8.6"), v("8.6"), v("8.6"), v("8.6"), None]
                ),
                (
                    Target::Sm120,
                    vec![v("8.7"), v("8.7"), v("8.7"), v("8.7"), v("8.7"), None]
                ),
            ]
        );
    }
}
