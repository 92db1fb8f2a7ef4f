//! Kernel IR → one PTX module for one target: [`emit_ptx`].
//!
//! The module declares the lowest `.version` that covers the target and every feature the
//! kernels use ([`Feature`]); [`EmitOptions::max_ptx_version`] caps it (for the PTX a
//! fatbin carries for the driver's JIT, [`EmitOptions::for_jit`]): features above the cap
//! fall back to exact instruction sequences, and a target that itself needs more than the
//! cap is an error. The same kernels always give byte-identical text.
//!
//! Layout: a header, the constant tables the math routines read, then one
//! `.visible .entry` per kernel with `.param .u64` buffer addresses and typed scalars,
//! `.maxntid`, typed virtual registers (`%p`, `%rs`, `%r`, `%rd`, `%f`, `%fd`), function-
//! scoped `.shared .align 16 .b8` arrays, and the statements, each under a comment with
//! its kernel-IR text.
//!
//! Floors found with ptxas 13.5 (everything else is baseline at sm_80 / PTX 7.0):
//!
//! | instruction | sm_80 | sm_89 | sm_90a, sm_100a, sm_120 |
//! | --- | --- | --- | --- |
//! | `cvt.f32.bf16` | PTX 7.1 | target minimum | target minimum |
//! | `cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32`, `cvt.rn.f16x2.{e4m3x2,e5m2x2}` | absent | PTX 8.1 | target minimum (7.8) |
//! | `cvt.rn.bf16.f32`, `cvt.rn.{bf16,f16}x2.f32`, `min/max.NaN.f32`, `shfl.sync` | 7.0 | 7.8 | target minimum |
//! | `griddepcontrol.{wait,launch_dependents}` | absent | absent | target minimum (7.8) |
//! | `cp.async.bulk.prefetch.L2.global` | absent | absent | target minimum (8.0) |
//! | `wgmma.*`, `fence.proxy.async` | absent | absent | sm_90a only (8.0) |
//!
//! The submodules: [`features`] (that table), `isa` (instruction selection tables),
//! `regs` (registers and operands), `scan` (what a kernel reads before it writes, its
//! identifiers), `function` (prologue, statements, expressions),
//! `memory` (addresses, loads, stores, dtype conversions), `inline` (math routines as
//! instructions).

pub mod features;
mod function;
mod inline;
mod isa;
mod memory;
mod regs;
mod scan;
mod wgmma;

use std::collections::BTreeSet;

use kiln_kir::{verify_kernel, Kernel, KirError, SharedLayout};

pub use features::Feature;

use crate::numeric::Table;
use crate::target::{PtxVersion, Target, JIT_PTX_VERSION_CAP};
use function::ModuleContext;

/// How to emit a module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EmitOptions {
    /// The newest `.version` the module may declare; `None` for no cap.
    pub max_ptx_version: Option<PtxVersion>,
    /// The `.minnctapersm` of kernels without shared memory (streaming kernels, whose speed
    /// is the bytes in flight per SM); 0 or 1 declare one block, so that ptxas never caps
    /// their registers. More makes ptxas cap registers so that that many blocks fit on an SM
    /// (spilling if it must): a tuning knob, left at 0 by the compiler.
    pub streaming_blocks_per_sm: u32,
}

impl EmitOptions {
    /// Options for PTX that the driver JIT-compiles: `.version` at most
    /// [`JIT_PTX_VERSION_CAP`].
    pub fn for_jit() -> EmitOptions {
        EmitOptions {
            max_ptx_version: Some(JIT_PTX_VERSION_CAP),
            ..EmitOptions::default()
        }
    }
}

/// Why a module could not be emitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    #[error("the kernel does not verify: {0}")]
    InvalidKernel(#[from] KirError),
    #[error("two kernels of the module are named `{0}`")]
    DuplicateKernel(String),
    #[error("the kernel name `{0}` is reserved for kiln's constant tables or shared windows")]
    ReservedName(String),
    #[error("{target} needs PTX ISA {needed}, but the module is capped at {cap}")]
    TargetAboveCap {
        target: Target,
        needed: PtxVersion,
        cap: PtxVersion,
    },
    #[error(
        "kernel `{kernel}`: its shared arrays take {bytes} bytes, more than the {limit} a block may use on {target}"
    )]
    SharedMemory {
        kernel: String,
        bytes: u64,
        target: Target,
        limit: u64,
    },
    #[error("kernel `{kernel}`: the PTX emitter cannot translate {message}")]
    Unsupported { kernel: String, message: String },
}

/// A PTX module and what it was built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxModule {
    pub text: String,
    pub target: Target,
    /// The declared `.version`.
    pub version: PtxVersion,
    /// The version-dependent features the kernels use.
    pub features: Vec<Feature>,
}

/// Emits `kernels` as one PTX module for `target`.
pub fn emit_ptx(
    kernels: &[Kernel],
    target: Target,
    options: &EmitOptions,
) -> Result<String, EmitError> {
    emit_module(kernels, target, options).map(|module| module.text)
}

/// [`emit_ptx`], also reporting the version and the features used.
pub fn emit_module(
    kernels: &[Kernel],
    target: Target,
    options: &EmitOptions,
) -> Result<PtxModule, EmitError> {
    if let Some(cap) = options.max_ptx_version {
        if target.min_ptx_version() > cap {
            return Err(EmitError::TargetAboveCap {
                target,
                needed: target.min_ptx_version(),
                cap,
            });
        }
    }
    let mut names = BTreeSet::new();
    let reserved: Vec<&str> = [Table::TwoOverPiWindows]
        .iter()
        .map(|t| t.ptx_name())
        .collect();
    let windows: BTreeSet<String> = kernels
        .iter()
        .map(|kernel| function::dynamic_shared_symbol(&kernel.name))
        .collect();
    for kernel in kernels {
        if reserved.contains(&kernel.name.as_str()) || windows.contains(&kernel.name) {
            return Err(EmitError::ReservedName(kernel.name.clone()));
        }
        if !names.insert(kernel.name.as_str()) {
            return Err(EmitError::DuplicateKernel(kernel.name.clone()));
        }
        verify_kernel(kernel)?;
        let bytes = SharedLayout::of(kernel).bytes;
        if bytes > target.max_shared_bytes_per_block() {
            return Err(EmitError::SharedMemory {
                kernel: kernel.name.clone(),
                bytes,
                target,
                limit: target.max_shared_bytes_per_block(),
            });
        }
    }

    let mut ctx = ModuleContext::new(target, options.max_ptx_version);
    ctx.streaming_blocks_per_sm = options.streaming_blocks_per_sm.max(1);
    let functions = kernels
        .iter()
        .map(|kernel| function::emit_kernel(kernel, &mut ctx))
        .collect::<Result<Vec<_>, _>>()?;

    let version = ctx
        .features
        .iter()
        .filter_map(|feature| feature.min_ptx_version(target))
        .fold(target.min_ptx_version(), PtxVersion::max);
    let mut text = format!(
        "//\n// Generated by kiln for {target}.\n//\n\n.version {version}\n.target {}\n.address_size 64\n",
        target.sm_name()
    );
    for table in &ctx.tables {
        text.push('\n');
        text.push_str(&table_declaration(*table));
    }
    for function in functions {
        text.push('\n');
        text.push_str(&function);
    }
    Ok(PtxModule {
        text,
        target,
        version,
        features: ctx.features.into_iter().collect(),
    })
}

/// `.const .align 4 .b32 name[n] = { ... };`, eight words a line.
fn table_declaration(table: Table) -> String {
    let words = table.words();
    let lines: Vec<String> = words
        .chunks(8)
        .map(|chunk| {
            let hex: Vec<String> = chunk.iter().map(|w| format!("0x{w:08X}")).collect();
            format!("\t{}", hex.join(", "))
        })
        .collect();
    format!(
        ".const .align 4 .b32 {}[{}] = {{\n{}\n}};\n",
        table.ptx_name(),
        words.len(),
        lines.join(",\n")
    )
}
