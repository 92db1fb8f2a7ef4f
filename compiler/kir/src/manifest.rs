//! The package manifest: what `kiln compile -o DIR` writes next to the fatbin and what the
//! runtime reads to load and launch the kernels. Serialized as `manifest.json`.
//!
//! A package directory holds `manifest.json`, `kernels.fatbin` (one cubin per compiled
//! target plus the PTX for JIT, made by `fatbinary`), `kernels.<sm>.ptx` for each target,
//! and `ptxas.<sm>.log`.

use crate::kernel::{Kernel, Param, SizeExpr, Ty};
use crate::plan::Plan;
use kiln_ir::DType;
use serde::{Deserialize, Serialize};

/// How one kernel parameter is passed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamLayout {
    /// A device pointer (8 bytes).
    Buffer {
        name: String,
        dtype: DType,
        writes: bool,
    },
    /// A scalar by value: `i64` for sizes, `f32`, `i32` or a predicate byte.
    Scalar { name: String, ty: String },
}

/// Everything the runtime needs to launch one kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub name: String,
    pub params: Vec<ParamLayout>,
    pub block_dim: u32,
    pub grid: [SizeExpr; 3],
    /// Shared memory in bytes: the arrays' sum.
    pub shared_bytes: u64,
    /// Dynamic shared memory each launch passes, in bytes: the size of the window holding
    /// the arrays of a kernel beyond the static limit ([`crate::SharedLayout`]), else 0.
    /// The runtime raises the function's limit to it once and launches with it.
    #[serde(default)]
    pub dynamic_shared_bytes: u64,
}

impl KernelInfo {
    pub fn of(kernel: &Kernel) -> KernelInfo {
        KernelInfo {
            name: kernel.name.clone(),
            params: kernel
                .params
                .iter()
                .map(|p| match p {
                    Param::Buffer {
                        name,
                        dtype,
                        access,
                    } => ParamLayout::Buffer {
                        name: name.clone(),
                        dtype: *dtype,
                        writes: access.writes(),
                    },
                    Param::Scalar { name, ty } => ParamLayout::Scalar {
                        name: name.clone(),
                        ty: match ty {
                            Ty::Pred => "pred",
                            Ty::I32 => "i32",
                            Ty::I64 => "i64",
                            Ty::F32 => "f32",
                        }
                        .to_string(),
                    },
                })
                .collect(),
            block_dim: kernel.block_dim,
            grid: kernel.grid.clone(),
            shared_bytes: kernel
                .shared
                .iter()
                .map(|s| u64::from(s.len) * s.dtype.size_bytes() as u64)
                .sum(),
            dynamic_shared_bytes: crate::SharedLayout::of(kernel).dynamic_bytes(),
        }
    }
}

/// A checkpoint tensor the package reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightInfo {
    pub checkpoint_name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// The program's params that read it (more than one when tied).
    pub declared_as: Vec<String>,
}

/// Registers and spills of one kernel on one target, from the ptxas log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelResources {
    pub kernel: String,
    pub target: String,
    pub registers: u32,
    pub spill_bytes: u64,
    pub shared_bytes: u64,
}

/// The manifest of a compiled package.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The format version of this file.
    pub format: u32,
    /// The program it was compiled from, and the config values bound.
    pub program: String,
    pub config: serde_json::Map<String, serde_json::Value>,
    /// The SM targets with a cubin in the fatbin (`sm_80`, `sm_90a`, ...).
    pub targets: Vec<String>,
    /// The target whose PTX is embedded for JIT (`.version` ≤ 9.0).
    pub ptx_target: Option<String>,
    /// Whether every kernel built for a target of compute capability 9.0 or later starts by
    /// waiting for the kernel before it (`griddepcontrol.wait`), so that the runtime may
    /// launch it with programmatic dependent launch. False in manifests written before kiln
    /// emitted the wait: their kernels are launched one after another.
    #[serde(default)]
    pub dependent_launch: bool,
    pub kernels: Vec<KernelInfo>,
    pub plans: Vec<Plan>,
    pub weights: Vec<WeightInfo>,
    pub resources: Vec<KernelResources>,
}

impl Manifest {
    pub const FORMAT: u32 = 1;
    pub const FILE: &'static str = "manifest.json";
    pub const FATBIN: &'static str = "kernels.fatbin";
}
