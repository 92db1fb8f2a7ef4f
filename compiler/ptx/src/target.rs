//! The GPU targets kiln compiles for, and the PTX ISA versions each one needs.
//!
//! One table ([`Target::ALL`] plus the `match`es below) holds every per-target fact:
//! the `sm_` name ptxas and `.target` use, the compute capability, and the lowest
//! `.version` ptxas accepts for it (checked with ptxas 13.5, see PTX-NOTES.md).
//! [`Target::for_compute_capability`] picks what to load on a given device.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A PTX ISA version, as written in a module's `.version` directive.
///
/// Ordered by `major`, then `minor`; prints as `8.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PtxVersion {
    pub major: u32,
    pub minor: u32,
}

impl PtxVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        PtxVersion { major, minor }
    }

    /// Parses `"8.0"`; the same text a `.version` directive carries.
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let bad = || TargetError::BadPtxVersion(text.to_string());
        let (major, minor) = text.trim().split_once('.').ok_or_else(bad)?;
        let is_number = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !is_number(major) || !is_number(minor) {
            return Err(bad());
        }
        Ok(PtxVersion {
            major: major.parse().map_err(|_| bad())?,
            minor: minor.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for PtxVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for PtxVersion {
    type Err = TargetError;
    fn from_str(text: &str) -> Result<Self, TargetError> {
        PtxVersion::parse(text)
    }
}

/// The newest `.version` that the CUDA 13.0 driver JIT accepts (9.1+ fails with
/// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`). PTX embedded in a fatbin as the JIT fallback
/// must not declare a newer version; cubins made by a newer ptxas are unaffected.
pub const JIT_PTX_VERSION_CAP: PtxVersion = PtxVersion::new(9, 0);

/// A GPU architecture kiln emits PTX and cubins for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Target {
    /// Ampere (A100, and through the same cubin the 8.x consumer parts).
    #[serde(rename = "sm_80")]
    Sm80,
    /// Ada (L4, L40, RTX 40xx): adds FP8 `mma`.
    #[serde(rename = "sm_89")]
    Sm89,
    /// Hopper with the arch-specific features (wgmma, setmaxnreg); runs only on 9.0.
    #[serde(rename = "sm_90a")]
    Sm90a,
    /// Blackwell datacenter with tcgen05 and tensor memory; runs only on 10.0.
    #[serde(rename = "sm_100a")]
    Sm100a,
    /// Blackwell consumer (RTX 50xx); runs on 12.x.
    #[serde(rename = "sm_120")]
    Sm120,
}

impl Target {
    /// Every target, oldest first.
    pub const ALL: [Target; 5] = [
        Target::Sm80,
        Target::Sm89,
        Target::Sm90a,
        Target::Sm100a,
        Target::Sm120,
    ];

    /// The name used by `.target`, `ptxas -arch=` and in messages: `"sm_90a"`.
    pub const fn sm_name(self) -> &'static str {
        match self {
            Target::Sm80 => "sm_80",
            Target::Sm89 => "sm_89",
            Target::Sm90a => "sm_90a",
            Target::Sm100a => "sm_100a",
            Target::Sm120 => "sm_120",
        }
    }

    /// The name with the `sm_` prefix dropped, as `fatbinary --image3=...,sm=90a` wants it.
    pub fn fatbin_arch(self) -> &'static str {
        &self.sm_name()[3..]
    }

    /// The device compute capability `(major, minor)` this target is built for.
    pub const fn compute_capability(self) -> (u32, u32) {
        match self {
            Target::Sm80 => (8, 0),
            Target::Sm89 => (8, 9),
            Target::Sm90a => (9, 0),
            Target::Sm100a => (10, 0),
            Target::Sm120 => (12, 0),
        }
    }

    /// The lowest `.version` ptxas accepts with this `.target` (checked with ptxas 13.5).
    pub const fn min_ptx_version(self) -> PtxVersion {
        match self {
            Target::Sm80 => PtxVersion::new(7, 0),
            Target::Sm89 => PtxVersion::new(7, 8),
            Target::Sm90a => PtxVersion::new(8, 0),
            Target::Sm100a => PtxVersion::new(8, 6),
            Target::Sm120 => PtxVersion::new(8, 7),
        }
    }

    /// Whether this is an arch-specific (`a`) target, whose code runs on exactly one
    /// compute capability.
    pub const fn is_arch_specific(self) -> bool {
        matches!(self, Target::Sm90a | Target::Sm100a)
    }

    /// The shared memory one SM of the target's GPUs offers its blocks, in bytes (the
    /// largest configuration: A100 164 KiB, Ada and consumer Blackwell 100 KiB, H100 and
    /// B200 228 KiB). Each resident block also reserves 1 KiB of it.
    pub const fn shared_bytes_per_sm(self) -> u64 {
        match self {
            Target::Sm80 => 164 * 1024,
            Target::Sm89 | Target::Sm120 => 100 * 1024,
            Target::Sm90a | Target::Sm100a => 228 * 1024,
        }
    }

    /// The most shared memory one block may use, in bytes, once the kernel opts in
    /// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`): the SM's shared memory less the
    /// 1 KiB each block reserves, as the CUDA programming guide's table of compute
    /// capabilities lists it (8.0: 163 KiB, 8.9 and 12.0: 99 KiB, 9.0 and 10.0: 227 KiB).
    /// Without opting in a block has 48 KiB.
    pub const fn max_shared_bytes_per_block(self) -> u64 {
        match self {
            Target::Sm80 => 163 * 1024,
            Target::Sm89 | Target::Sm120 => 99 * 1024,
            Target::Sm90a | Target::Sm100a => 227 * 1024,
        }
    }

    /// Whether a cubin built for this target loads on a device of compute capability
    /// `major.minor`: the same major with an equal or higher minor, or, for an `a`
    /// target, exactly its own compute capability.
    pub const fn cubin_runs_on(self, major: u32, minor: u32) -> bool {
        let (own_major, own_minor) = self.compute_capability();
        if self.is_arch_specific() {
            major == own_major && minor == own_minor
        } else {
            major == own_major && minor >= own_minor
        }
    }

    /// Parses a name such as `"sm_90a"`; the error lists the valid names.
    pub fn parse(name: &str) -> Result<Target, TargetError> {
        let wanted = name.trim();
        Target::ALL
            .into_iter()
            .find(|target| target.sm_name() == wanted)
            .ok_or_else(|| TargetError::UnknownTarget {
                name: name.to_string(),
                valid: valid_target_names(),
            })
    }

    /// The best target to build for a device of compute capability `major.minor`.
    ///
    /// Exact matches first: `sm_90a` for 9.0, `sm_100a` for 10.0, `sm_120` for any 12.x,
    /// `sm_89` for 8.9, `sm_80` for the other 8.x. Any other device at or above 8.0
    /// (9.x other than 9.0, 10.x other than 10.0, 11.x, 13+) falls back to `sm_80`,
    /// whose cubin does not load there ([`Target::cubin_runs_on`] says so): such a
    /// device runs the `sm_80` PTX through the driver's JIT. Below 8.0 there is none.
    pub const fn for_compute_capability(major: u32, minor: u32) -> Option<Target> {
        match (major, minor) {
            (0..=7, _) => None,
            (8, 9) => Some(Target::Sm89),
            (8, _) => Some(Target::Sm80),
            (9, 0) => Some(Target::Sm90a),
            (10, 0) => Some(Target::Sm100a),
            (12, _) => Some(Target::Sm120),
            _ => Some(Target::Sm80),
        }
    }
}

fn valid_target_names() -> String {
    Target::ALL
        .iter()
        .map(|target| target.sm_name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sm_name())
    }
}

impl FromStr for Target {
    type Err = TargetError;
    fn from_str(name: &str) -> Result<Self, TargetError> {
        Target::parse(name)
    }
}

/// Errors from parsing target names and PTX versions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("unknown GPU target `{name}`; valid targets are: {valid}")]
    UnknownTarget { name: String, valid: String },
    #[error("`{0}` is not a PTX version; expected MAJOR.MINOR such as 8.0")]
    BadPtxVersion(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_parse_display_and_serde() {
        for target in Target::ALL {
            assert_eq!(Target::parse(target.sm_name()), Ok(target));
            assert_eq!(target.to_string().parse::<Target>(), Ok(target));
            let json = serde_json::to_string(&target).unwrap();
            assert_eq!(json, format!("\"{}\"", target.sm_name()));
            assert_eq!(serde_json::from_str::<Target>(&json).unwrap(), target);
        }
        let names: Vec<_> = Target::ALL.iter().map(|t| t.sm_name()).collect();
        assert_eq!(names, ["sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120"]);
        let arches: Vec<_> = Target::ALL.iter().map(|t| t.fatbin_arch()).collect();
        assert_eq!(arches, ["80", "89", "90a", "100a", "120"]);
    }

    #[test]
    fn unknown_target_lists_the_valid_names() {
        let message = Target::parse("sm_90").unwrap_err().to_string();
        assert_eq!(
            message,
            "unknown GPU target `sm_90`; valid targets are: sm_80, sm_89, sm_90a, sm_100a, sm_120"
        );
        assert!(Target::parse("").is_err());
        assert!(Target::parse("SM_80").is_err());
    }

    #[test]
    fn compute_capabilities_and_minimum_ptx_versions() {
        let table: Vec<_> = Target::ALL
            .iter()
            .map(|t| {
                (
                    t.sm_name(),
                    t.compute_capability(),
                    t.min_ptx_version().to_string(),
                )
            })
            .collect();
        assert_eq!(
            table,
            [
                ("sm_80", (8, 0), "7.0".to_string()),
                ("sm_89", (8, 9), "7.8".to_string()),
                ("sm_90a", (9, 0), "8.0".to_string()),
                ("sm_100a", (10, 0), "8.6".to_string()),
                ("sm_120", (12, 0), "8.7".to_string()),
            ]
        );
        for target in Target::ALL {
            assert!(target.min_ptx_version() <= JIT_PTX_VERSION_CAP);
        }
    }

    #[test]
    fn shared_memory_a_block_may_opt_into() {
        let kib: Vec<_> = Target::ALL
            .iter()
            .map(|t| (t.sm_name(), t.max_shared_bytes_per_block() / 1024))
            .collect();
        assert_eq!(
            kib,
            [
                ("sm_80", 163),
                ("sm_89", 99),
                ("sm_90a", 227),
                ("sm_100a", 227),
                ("sm_120", 99),
            ]
        );
        for target in Target::ALL {
            // One block's 1 KiB reservation below the SM, above the static 48 KiB.
            assert_eq!(
                target.max_shared_bytes_per_block() + 1024,
                target.shared_bytes_per_sm()
            );
            assert!(target.max_shared_bytes_per_block() > 48 * 1024);
            assert!(
                target.max_shared_bytes_per_block()
                    <= kiln_kir::shared_layout::MAX_DYNAMIC_SHARED_BYTES
            );
        }
    }

    #[test]
    fn ptx_versions_order_parse_and_print() {
        assert_eq!(PtxVersion::parse("8.0"), Ok(PtxVersion::new(8, 0)));
        assert_eq!(PtxVersion::parse(" 9.0 "), Ok(JIT_PTX_VERSION_CAP));
        assert_eq!(JIT_PTX_VERSION_CAP.to_string(), "9.0");
        assert!(PtxVersion::new(8, 10) > PtxVersion::new(8, 9));
        assert!(PtxVersion::new(9, 0) > PtxVersion::new(8, 10));
        assert!(PtxVersion::new(9, 1) > JIT_PTX_VERSION_CAP);
        for bad in ["", "8", "8.", ".0", "8.x", "v8.0", "8.0.1", "-1.0"] {
            assert_eq!(
                PtxVersion::parse(bad),
                Err(TargetError::BadPtxVersion(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn picks_a_target_for_each_compute_capability() {
        let pick = |major, minor| Target::for_compute_capability(major, minor);
        assert_eq!(pick(7, 5), None);
        assert_eq!(pick(6, 1), None);
        assert_eq!(pick(8, 0), Some(Target::Sm80));
        assert_eq!(pick(8, 6), Some(Target::Sm80));
        assert_eq!(pick(8, 7), Some(Target::Sm80));
        assert_eq!(pick(8, 9), Some(Target::Sm89));
        assert_eq!(pick(9, 0), Some(Target::Sm90a));
        assert_eq!(pick(10, 0), Some(Target::Sm100a));
        assert_eq!(pick(12, 0), Some(Target::Sm120));
        assert_eq!(pick(12, 1), Some(Target::Sm120));
        // not covered by an exact target: fall back to sm_80 (PTX JIT on the device)
        assert_eq!(pick(9, 1), Some(Target::Sm80));
        assert_eq!(pick(10, 3), Some(Target::Sm80));
        assert_eq!(pick(11, 0), Some(Target::Sm80));
        assert_eq!(pick(13, 0), Some(Target::Sm80));
        // every exact pick's cubin loads on its device
        for target in Target::ALL {
            let (major, minor) = target.compute_capability();
            assert_eq!(pick(major, minor), Some(target));
            assert!(target.cubin_runs_on(major, minor));
        }
    }

    #[test]
    fn cubin_compatibility_follows_the_suffix_rules() {
        assert!(Target::Sm80.cubin_runs_on(8, 6));
        assert!(!Target::Sm80.cubin_runs_on(9, 0));
        assert!(!Target::Sm89.cubin_runs_on(8, 6));
        assert!(Target::Sm120.cubin_runs_on(12, 1));
        assert!(!Target::Sm90a.cubin_runs_on(9, 1));
        assert!(!Target::Sm100a.cubin_runs_on(10, 3));
        assert!(Target::Sm90a.is_arch_specific() && Target::Sm100a.is_arch_specific());
        assert!(!Target::Sm120.is_arch_specific());
    }
}
