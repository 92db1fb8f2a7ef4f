//! GPU kernel benchmarks: kiln programs for the memory-bound fusions of BASELINES.md
//! (residual add + RMSNorm, SwiGLU's element-wise part, RoPE, a plain copy for the ceiling),
//! compiled for the device's target and timed with CUDA events (warm-up, median of the
//! runs, random data larger than L2). Prints one JSON object: the device, the driver, and per
//! case the median time, the bytes that must move (inputs read once + outputs written once)
//! and the effective GB/s and fraction of the copy bandwidth measured in the same run.
//!
//! Usage (on a machine with a GPU and ptxas): `gpu_kernels [RUNS]`.

use kiln_cuda::{CudaDevice, CudaPackage, CudaProgram};
use kiln_driver::pipeline::{self, CompileOptions};
use kiln_ir::{DType, Tensor};
use kiln_ptx::{Target, Toolchain};
use std::sync::Arc;

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(50);
    let device = CudaDevice::new(0)?;
    let (major, minor) = device.info().compute_capability;
    let target =
        Target::for_compute_capability(major, minor).ok_or("no kiln target for this GPU")?;
    let toolchain = Toolchain::discover()?;
    let (program, diags) = kiln_lower::Program::load_source("bench.kiln", PROGRAM, None);
    assert!(
        diags.iter().all(|d| !d.is_error()),
        "{}",
        program.sources.render(&diags)
    );
    let (lowered, diags) = kiln_lower::lower(&program, None, &kiln_lower::Options::default());
    let lowered = lowered.ok_or_else(|| program.sources.render(&diags))?;
    let options = CompileOptions {
        targets: vec![target],
        ..CompileOptions::default()
    };
    let package = pipeline::compile("bench.kiln", lowered, &options, Some(&toolchain))?;
    let fatbin = package.fatbin.as_ref().ok_or("not assembled")?;
    let cuda = Arc::new(CudaPackage::from_image(
        &device,
        package.manifest.clone(),
        fatbin,
        "bench",
    )?);

    let t = 16384usize;
    let copy_rows = 65536; // 512 MB of bf16 read + 512 MB written
    let cases = vec![
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
    ];
    let mut results = Vec::new();
    let mut copy_gbs = None;
    for case in cases {
        let mut program = CudaProgram::new(cuda.clone(), case.function)?;
        program.bind_weights(&|_| None)?;
        let timing = program.time_launches(&case.inputs, runs)?;
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
        results.push(serde_json::json!({
            "case": case.function,
            "kernels": launches,
            "median_ms": timing.median_ms,
            "min_ms": timing.min_ms,
            "bytes": case.bytes,
            "gb_per_s": gbs,
            "fraction_of_copy": copy_gbs.map(|c| gbs / c),
        }));
    }
    let info = device.info();
    let out = serde_json::json!({
        "device": info.name,
        "compute_capability": format!("{}.{}", major, minor),
        "driver": format!("{:?}", info.driver_version),
        "target": target.sm_name(),
        "runs": runs,
        "kiln": results,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
