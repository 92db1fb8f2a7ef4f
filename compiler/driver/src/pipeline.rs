//! The compiler as one function of named stages: optimize the graph IR (kiln-opt), fuse it
//! into kernels and plans (kiln-gpu-kernels), emit PTX per target (kiln-ptx), assemble with
//! ptxas and pack a fatbin, and describe it all in a manifest.

use kiln_gpu_kernels::CompiledModule;
use kiln_kir::{KernelInfo, KernelResources, Manifest, WeightInfo};
use kiln_lower::Lowered;
use kiln_ptx::{Target, Toolchain};
use std::path::Path;

/// What to build.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Targets to emit PTX for (and assemble, when a toolchain is given).
    pub targets: Vec<Target>,
    pub fusion: kiln_gpu_kernels::Options,
    /// The `.minnctapersm` of kernels without shared memory
    /// ([`kiln_ptx::EmitOptions::streaming_blocks_per_sm`]; 0: one block).
    pub streaming_blocks_per_sm: u32,
}

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            targets: Target::ALL.to_vec(),
            fusion: kiln_gpu_kernels::Options::default(),
            streaming_blocks_per_sm: 0,
        }
    }
}

/// The PTX of every kernel for one target, and what ptxas made of it.
#[derive(Clone, Debug)]
pub struct TargetCode {
    pub target: Target,
    pub ptx: String,
    /// The cubin and ptxas's log, when assembled.
    pub cubin: Option<Vec<u8>>,
    pub ptxas_log: Option<String>,
}

/// A compiled program.
#[derive(Clone, Debug)]
pub struct Package {
    pub lowered: Lowered,
    pub compiled: CompiledModule,
    pub code: Vec<TargetCode>,
    pub fatbin: Option<Vec<u8>>,
    pub manifest: Manifest,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("optimizing: {0}")]
    Optimize(#[from] kiln_opt::OptError),
    #[error("fusing: {0}")]
    Fusion(#[from] kiln_gpu_kernels::FusionError),
    #[error("emitting PTX for {target}: {message}")]
    Emit { target: Target, message: String },
    #[error(transparent)]
    Tool(#[from] kiln_ptx::ToolError),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Optimizes and fuses a lowered program: the target-independent half of compilation.
pub fn fuse(
    mut lowered: Lowered,
    options: &CompileOptions,
) -> Result<(Lowered, CompiledModule), PipelineError> {
    kiln_opt::optimize(&mut lowered.module)?;
    let mut fusion = options.fusion.clone();
    // One set of kernels serves every target: the FP8 mma only when each one has it (sm_89
    // and later); otherwise FP8 matmuls take the plain template.
    fusion.fp8_tensor_cores &= options
        .targets
        .iter()
        .all(|&t| kiln_ptx::Feature::Fp8Mma.min_ptx_version(t).is_some());
    // Hopper's wgmma only when every target is sm_90a (the GEMM template then takes it,
    // unless `GemmTuning::wgmma` is off); no targets (a CPU build) means none.
    fusion.wgmma = !options.targets.is_empty()
        && options
            .targets
            .iter()
            .all(|&t| kiln_ptx::Feature::Wgmma.min_ptx_version(t).is_some());
    // Prefill GEMM tiles may take the shared memory every target's blocks can opt into
    // (99 KiB for the five targets together, 227 KiB for an H100 alone), unless a knob says.
    if fusion.gemm.shared_kib == 0 {
        if let Some(least) = options
            .targets
            .iter()
            .map(|t| t.max_shared_bytes_per_block())
            .min()
        {
            fusion.gemm.shared_kib = (least / 1024) as u32;
        }
    }
    let compiled = kiln_gpu_kernels::compile_module(&lowered.module, &fusion)?;
    Ok((lowered, compiled))
}

/// Compiles a lowered program for every target of `options`; with a toolchain, also
/// assembles each target and packs the cubins with the PTX of the oldest target (which
/// every newer GPU can JIT) into a fatbin.
pub fn compile(
    program: &str,
    lowered: Lowered,
    options: &CompileOptions,
    toolchain: Option<&Toolchain>,
) -> Result<Package, PipelineError> {
    let (lowered, compiled) = fuse(lowered, options)?;
    let mut code = Vec::new();
    for &target in &options.targets {
        let emit = kiln_ptx::EmitOptions {
            streaming_blocks_per_sm: options.streaming_blocks_per_sm,
            ..kiln_ptx::EmitOptions::default()
        };
        let ptx = kiln_ptx::emit_ptx(&compiled.kernels, target, &emit).map_err(|e| {
            PipelineError::Emit {
                target,
                message: e.to_string(),
            }
        })?;
        code.push(TargetCode {
            target,
            ptx,
            cubin: None,
            ptxas_log: None,
        });
    }
    let mut resources = Vec::new();
    let mut fatbin = None;
    if let Some(toolchain) = toolchain {
        for tc in &mut code {
            let assembled =
                toolchain.assemble(&tc.ptx, tc.target, &kiln_ptx::AssembleOptions::default())?;
            for report in &assembled.report.functions {
                resources.push(KernelResources {
                    kernel: report.name.clone(),
                    target: tc.target.sm_name().to_string(),
                    registers: report.registers,
                    spill_bytes: report.spill_store_bytes + report.spill_load_bytes,
                    shared_bytes: report.shared_memory_bytes,
                });
            }
            tc.ptxas_log = Some(assembled.log.clone());
            tc.cubin = Some(assembled.cubin);
        }
        let cubins: Vec<(Target, Vec<u8>)> = code
            .iter()
            .filter_map(|tc| tc.cubin.clone().map(|c| (tc.target, c)))
            .collect();
        // The JIT copy: the oldest target's PTX, re-emitted under the driver's version cap.
        let jit = match options.targets.iter().min() {
            Some(&target) => Some((
                kiln_ptx::emit_ptx(
                    &compiled.kernels,
                    target,
                    &kiln_ptx::EmitOptions {
                        streaming_blocks_per_sm: options.streaming_blocks_per_sm,
                        ..kiln_ptx::EmitOptions::for_jit()
                    },
                )
                .map_err(|e| PipelineError::Emit {
                    target,
                    message: e.to_string(),
                })?,
                target,
            )),
            None => None,
        };
        fatbin = Some(toolchain.fatbin(&cubins, jit.as_ref().map(|(p, t)| (p.as_str(), *t)))?);
    }
    let manifest = Manifest {
        format: Manifest::FORMAT,
        program: program.to_string(),
        config: lowered
            .config
            .iter()
            .map(|(k, v)| {
                let json = match v {
                    kiln_lower::ConfigValue::Int(i) => serde_json::json!(i),
                    kiln_lower::ConfigValue::Float(f) => serde_json::json!(f),
                    kiln_lower::ConfigValue::Bool(b) => serde_json::json!(b),
                    kiln_lower::ConfigValue::Str(s) => serde_json::json!(s),
                };
                (k.clone(), json)
            })
            .collect(),
        targets: if fatbin.is_some() {
            options
                .targets
                .iter()
                .map(|t| t.sm_name().to_string())
                .collect()
        } else {
            Vec::new()
        },
        ptx_target: options
            .targets
            .iter()
            .min()
            .map(|t| t.sm_name().to_string()),
        // The PTX emitter starts every kernel for sm_90a and later with the wait.
        dependent_launch: true,
        kernels: compiled.kernels.iter().map(KernelInfo::of).collect(),
        plans: compiled.plans.clone(),
        weights: lowered
            .params
            .iter()
            .map(|p| WeightInfo {
                checkpoint_name: p.checkpoint_name.clone(),
                dtype: p.ty.dtype,
                shape: p
                    .ty
                    .shape
                    .0
                    .iter()
                    .map(|d| d.as_const().unwrap_or(0))
                    .collect(),
                declared_as: p.declared_as.clone(),
            })
            .collect(),
        resources,
    };
    Ok(Package {
        lowered,
        compiled,
        code,
        fatbin,
        manifest,
    })
}

impl Package {
    /// Writes `manifest.json`, `kernels.fatbin` (when assembled), `kernels.<sm>.ptx` and
    /// `ptxas.<sm>.log` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), PipelineError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| PipelineError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let manifest = serde_json::to_string_pretty(&self.manifest).expect("a manifest serializes");
        let path = dir.join(Manifest::FILE);
        std::fs::write(&path, manifest).map_err(io(&path))?;
        if let Some(fatbin) = &self.fatbin {
            let path = dir.join(Manifest::FATBIN);
            std::fs::write(&path, fatbin).map_err(io(&path))?;
        }
        for tc in &self.code {
            let path = dir.join(format!("kernels.{}.ptx", tc.target.sm_name()));
            std::fs::write(&path, &tc.ptx).map_err(io(&path))?;
            if let Some(log) = &tc.ptxas_log {
                let path = dir.join(format!("ptxas.{}.log", tc.target.sm_name()));
                std::fs::write(&path, log).map_err(io(&path))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel names of `source` fused for `targets`.
    fn kernel_names(source: &str, targets: &[Target]) -> Vec<String> {
        let (program, diags) = kiln_lower::Program::load_source("t.kiln", source, None);
        assert!(!diags.iter().any(|d| d.is_error()));
        let (lowered, _) = kiln_lower::lower(&program, None, &kiln_lower::Options::default());
        let options = CompileOptions {
            targets: targets.to_vec(),
            ..CompileOptions::default()
        };
        let (_, compiled) = fuse(lowered.expect("lowered"), &options).unwrap();
        compiled.kernels.iter().map(|k| k.name.clone()).collect()
    }

    #[test]
    fn prefill_gemms_use_wgmma_only_when_every_target_is_sm_90a() {
        let source = "import nn
fn f(x: bf16[512, 256], w: bf16[384, 256]) -> bf16[512, 384] { linear(x, w) }";
        let wgmma = |names: &[String]| names.iter().any(|n| n.contains("wgmma_gemm"));
        assert!(wgmma(&kernel_names(source, &[Target::Sm90a])));
        for targets in [
            vec![Target::Sm100a],
            vec![Target::Sm89, Target::Sm90a],
            Target::ALL.to_vec(),
        ] {
            let names = kernel_names(source, &targets);
            assert!(!wgmma(&names), "{targets:?}: {names:?}");
            assert!(names.iter().any(|n| n.contains("mma_gemm")), "{names:?}");
        }
    }

    #[test]
    fn fp8_matmuls_use_the_fp8_mma_only_when_every_target_has_it() {
        let source = "import nn
fn f(a: f8e4m3[64, 64], b: f8e4m3[32, 64], sa: f32, sb: f32[32]) -> bf16[64, 32] { bf16(scaled_mm(a, b, sa, sb)) }";
        let fp8 = |names: &[String]| names.iter().any(|n| n.contains("mma_gemm_e4m3"));
        for targets in [
            vec![Target::Sm89],
            vec![Target::Sm90a],
            vec![Target::Sm89, Target::Sm90a, Target::Sm100a, Target::Sm120],
        ] {
            assert!(fp8(&kernel_names(source, &targets)), "{targets:?}");
        }
        // sm_80 has no FP8 mma: the same program compiles to the plain template.
        for targets in [vec![Target::Sm80], Target::ALL.to_vec()] {
            let names = kernel_names(source, &targets);
            assert!(!fp8(&names), "{targets:?}: {names:?}");
            assert!(names.iter().any(|n| n.contains("matmul")), "{names:?}");
        }
    }
}
