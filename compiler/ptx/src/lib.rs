//! PTX emission for SM80-SM120, and the ptxas/fatbinary toolchain that assembles it.
//!
//! - [`emit`]: kernel IR → one PTX module per target ([`emit_ptx`]).
//! - [`numeric`]: the f32 math routines and 8-bit float conversions the emitter inlines,
//!   with a bit-exact Rust evaluation of each.
//! - [`target`]: the GPU targets, their compute capabilities and minimum PTX versions.
//! - [`toolchain`]: finding ptxas and fatbinary, assembling PTX into cubins with a parsed
//!   resource report, and packing cubins plus a PTX fallback into a fatbin.

pub mod emit;
pub mod numeric;
pub mod target;
pub mod toolchain;

pub use emit::{emit_module, emit_ptx, EmitError, EmitOptions, Feature, PtxModule};
pub use target::{PtxVersion, Target, TargetError, JIT_PTX_VERSION_CAP};
pub use toolchain::discover::{DiscoveryEnv, PtxasSource, SitePackages};
pub use toolchain::report::{FunctionKind, NoticeSeverity, PtxasLog, PtxasNotice, PtxasReport};
pub use toolchain::{
    AssembleOptions, Assembled, PtxHeader, ToolError, ToolVersion, Toolchain, FATBIN_MAGIC,
};
