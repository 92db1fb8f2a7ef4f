//! `kiln bench kernels`: the GPU kernel benchmarks of the memory-bound fusions of
//! BASELINES.md (residual add + RMSNorm, SwiGLU's element-wise part, RoPE, and a plain copy
//! for the ceiling), compiled for the device's target and timed with CUDA events (warm-up,
//! median of the runs, random data larger than L2). Reports per case the median time, the
//! bytes that must move (inputs read once + outputs written once), the effective GB/s and
//! the fraction of the copy bandwidth measured in the same run; with PyTorch's numbers from
//! `benches/torch_peers.py` (same shapes, same machine), also the ratios to eager and
//! torch.compile.

use anyhow::{anyhow, bail, Context, Result};
use kiln_cuda::{CudaDevice, CudaPackage, CudaProgram};
use kiln_driver::pipeline::{self, CompileOptions};
use kiln_ir::{DType, Tensor};
use kiln_ptx::{Target, Toolchain};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand)]
enum BenchWhat {
    /// Time the memory-bound fused kernels on the GPU.
    Kernels(KernelArgs),
}

#[derive(clap::Args)]
struct KernelArgs {
    /// Timed runs per case (after warm-up); the median is reported.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// PyTorch's numbers for the same cases (the JSON `benches/torch_peers.py` prints).
    #[arg(long, value_name = "FILE")]
    torch_json: Option<PathBuf>,
    /// Also write the JSON here (e.g. benches/results/DATE-GPU-memory-bound.json).
    #[arg(long, short = 'o', value_name = "FILE")]
    out: Option<PathBuf>,
}

const PROGRAM: &str = "
import nn
fn copy(x: bf16[R, 4096]) -> bf16[R, 4096] { x + 0.0 }
fn add_rms_norm(x: bf16[T, 4096], residual: bf16[T, 4096], w: bf16[4096]) -> (bf16[T, 4096], bf16[T, 4096]) {
    let h = x + residual
    (h, rms_norm(h, w, 1e-5))
}
fn swiglu_act(gate: bf16[T, 14336], up: bf16[T, 14336]) -> bf16[T, 14336] { silu(gate) * up }
fn rotary(q: bf16[T, 32, 128], pos: i64[T]) -> bf16[T, 32, 128] { rope(q, pos, 500000.0) }
";

struct Case {
    function: &'static str,
    inputs: Vec<Tensor>,
    /// Bytes read and written at the minimum.
    bytes: u64,
}

fn random_bf16(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed;
    let data = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32
        })
        .collect();
    Tensor::from_f32(shape, data).cast(DType::BF16)
}

fn cases() -> Vec<Case> {
    let t = 16384usize;
    let copy_rows = 65536; // 512 MB of bf16 read + 512 MB written
    vec![
        Case {
            function: "copy",
            inputs: vec![random_bf16(&[copy_rows, 4096], 1)],
            bytes: 2 * 2 * (copy_rows * 4096) as u64,
        },
        Case {
            function: "add_rms_norm",
            inputs: vec![
                random_bf16(&[t, 4096], 2),
                random_bf16(&[t, 4096], 3),
                random_bf16(&[4096], 4),
            ],
            bytes: (4 * t * 4096 * 2 + 4096 * 2) as u64,
        },
        Case {
            function: "swiglu_act",
            inputs: vec![random_bf16(&[t, 14336], 5), random_bf16(&[t, 14336], 6)],
            bytes: (3 * t * 14336 * 2) as u64,
        },
        Case {
            function: "rotary",
            inputs: vec![
                random_bf16(&[t, 32, 128], 7),
                Tensor::from_ints(DType::I64, &[t], (0..t as i64).map(|p| p % 4096).collect()),
            ],
            bytes: (2 * t * 32 * 128 * 2 + t * 8) as u64,
        },
    ]
}

pub(crate) fn run(args: BenchArgs) -> Result<ExitCode> {
    let BenchWhat::Kernels(args) = args.what;
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let torch: Option<serde_json::Value> = args
        .torch_json
        .as_ref()
        .map(|path| -> Result<serde_json::Value> {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        })
        .transpose()?;
    let device = CudaDevice::new(0).context("kiln bench kernels needs a GPU")?;
    let (major, minor) = device.info().compute_capability;
    let target = Target::for_compute_capability(major, minor)
        .ok_or_else(|| anyhow!("no kiln target for compute capability {major}.{minor}"))?;
    let toolchain = Toolchain::discover()?;
    let (program, diags) = kiln_lower::Program::load_source("bench.kiln", PROGRAM, None);
    if diags.iter().any(|d| d.is_error()) {
        bail!("{}", program.sources.render(&diags));
    }
    let (lowered, diags) = kiln_lower::lower(&program, None, &kiln_lower::Options::default());
    let lowered = lowered.ok_or_else(|| anyhow!("{}", program.sources.render(&diags)))?;
    let options = CompileOptions {
        targets: vec![target],
        ..CompileOptions::default()
    };
    let package = pipeline::compile("bench.kiln", lowered, &options, Some(&toolchain))?;
    let fatbin = package
        .fatbin
        .as_ref()
        .ok_or_else(|| anyhow!("not assembled"))?;
    let cuda = Arc::new(CudaPackage::from_image(
        &device,
        package.manifest.clone(),
        fatbin,
        "bench",
    )?);
    let mut results = Vec::new();
    let mut copy_gbs = None;
    println!(
        "{:<14} {:>8} {:>10} {:>9} {:>8} {:>9} {:>9}",
        "case", "kernels", "median ms", "GB/s", "of copy", "x eager", "x compile"
    );
    for case in cases() {
        let mut program = CudaProgram::new(cuda.clone(), case.function)?;
        program.bind_weights(&|_| None)?;
        let timing = program.time_launches(&case.inputs, args.runs)?;
        let gbs = case.bytes as f64 / (timing.median_ms * 1e-3) / 1e9;
        if case.function == "copy" {
            copy_gbs = Some(gbs);
        }
        let launches = package
            .compiled
            .stats
            .launches
            .iter()
            .filter(|k| k.function == case.function)
            .count();
        let peer = |mode: &str| {
            torch
                .as_ref()
                .and_then(|t| t[mode][case.function]["gb_per_s"].as_f64())
        };
        let (eager, compiled) = (peer("eager"), peer("compiled"));
        let fraction = copy_gbs.map(|c| gbs / c);
        let show = |x: Option<f64>| x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:>8} {:>10.4} {:>9.0} {:>8} {:>9} {:>9}",
            case.function,
            launches,
            timing.median_ms,
            gbs,
            show(fraction),
            show(eager.map(|e| gbs / e)),
            show(compiled.map(|c| gbs / c)),
        );
        results.push(serde_json::json!({
            "case": case.function,
            "kernels": launches,
            "median_ms": timing.median_ms,
            "min_ms": timing.min_ms,
            "bytes": case.bytes,
            "gb_per_s": gbs,
            "fraction_of_copy": fraction,
            "torch_eager_gb_per_s": eager,
            "torch_compile_gb_per_s": compiled,
        }));
    }
    let info = device.info();
    let out = serde_json::json!({
        "device": info.name,
        "compute_capability": format!("{major}.{minor}"),
        "driver": info.driver_version.to_string(),
        "commit": commit(),
        "target": target.sm_name(),
        "runs": args.runs,
        "kiln": results,
        "torch": torch,
    });
    let text = serde_json::to_string_pretty(&out)?;
    if let Some(path) = &args.out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("kiln: wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The commit measured: `KILN_COMMIT` (set where the tree is a copy without .git), else git's.
fn commit() -> Option<String> {
    std::env::var("KILN_COMMIT").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}
