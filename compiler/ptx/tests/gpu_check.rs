//! Exports a self-contained check of the emitted PTX for a machine with an NVIDIA GPU:
//! the PTX modules (sm_90a with the f8 `cvt` forms, sm_80 with the fallbacks, which the
//! driver JIT-compiles for any newer GPU), inputs, and the expected outputs: the math
//! routines' exact results from their Rust evaluation (`Routine::eval`, so the GPU must
//! match bit for bit), f8 conversions from `kiln_ir::fp8`, and whole kernels from the
//! kernel-IR interpreter.
//!
//! `KILN_GPU_CHECK_DIR=dir cargo test -p kiln-ptx --test gpu_check -- --ignored`, then on
//! the GPU machine `python3 tools/gpu_check.py dir` (needs CuPy and NumPy).

mod kernels;

use std::path::{Path, PathBuf};

use kiln_ir::DType;
use kiln_kir::examples;
use kiln_kir::{interp, BinOp, Const, Kernel, UnOp};
use kiln_ptx::numeric::{MathFunction, Scalar};
use kiln_ptx::{emit_ptx, EmitOptions, Target};
use serde_json::{json, Value};

/// Appends arrays to one binary file and describes where each one is.
struct Blob {
    bytes: Vec<u8>,
}

impl Blob {
    fn push(&mut self, data: &[u8]) -> Value {
        let offset = self.bytes.len();
        self.bytes.extend_from_slice(data);
        // Keep every array 16-byte aligned for vector loads.
        while !self.bytes.len().is_multiple_of(16) {
            self.bytes.push(0);
        }
        json!({ "offset": offset, "bytes": data.len() })
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Inputs for a one-input function: a stride through every f32 bit pattern, then evenly
/// spaced values over `[lo, hi]`.
fn math_inputs(count: usize, lo: f64, hi: f64, salt: u32) -> Vec<f32> {
    let half = count / 2;
    let mut values: Vec<f32> = (0..half as u32)
        .map(|i| f32::from_bits(i.wrapping_mul(0x9E37_79B1).wrapping_add(salt)))
        .collect();
    values.extend(
        (0..count - half).map(|i| (lo + (hi - lo) * i as f64 / (count - half) as f64) as f32),
    );
    values
}

fn scalar_json(c: Const) -> Value {
    match c {
        Const::Pred(v) => json!({ "type": "u8", "value": u8::from(v) }),
        Const::I32(v) => json!({ "type": "i32", "value": v }),
        Const::I64(v) => json!({ "type": "i64", "value": v }),
        Const::F32(v) => json!({ "type": "f32", "value": v }),
    }
}

/// Runs `kernel` on the interpreter over `buffers` and records a check comparing output
/// buffer `compare` (element `dtype` name for the comparison, tolerance in ulps).
#[allow(clippy::too_many_arguments)]
fn kernel_check(
    checks: &mut Vec<Value>,
    inputs: &mut Blob,
    expected: &mut Blob,
    module: &str,
    kernel: &Kernel,
    grid: [u64; 3],
    mut buffers: Vec<Vec<u8>>,
    scalars: &[Const],
    compare: &[(usize, &str, u32)],
) {
    let args_in: Vec<Value> = buffers.iter().map(|b| inputs.push(b)).collect();
    let mut slices: Vec<&mut [u8]> = buffers.iter_mut().map(|b| b.as_mut_slice()).collect();
    interp::run_kernel(kernel, grid, &mut slices, scalars)
        .unwrap_or_else(|e| panic!("interpreting {}: {e}", kernel.name));
    let comparisons: Vec<Value> = compare
        .iter()
        .map(|&(index, dtype, ulps)| {
            json!({ "buffer": index, "dtype": dtype, "max_ulps": ulps,
                    "expected": expected.push(&buffers[index]) })
        })
        .collect();
    checks.push(json!({
        "name": format!("{module}:{}", kernel.name),
        "module": module,
        "kernel": kernel.name,
        "grid": grid,
        "block": kernel.block_dim,
        "buffers": args_in,
        "scalars": scalars.iter().map(|c| scalar_json(*c)).collect::<Vec<_>>(),
        "compare": comparisons,
    }));
}

fn export(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut inputs = Blob { bytes: Vec::new() };
    let mut expected = Blob { bytes: Vec::new() };
    let mut checks = Vec::new();
    let count = 1 << 17;

    // Math: unary_map/binary_map kernels against the routines' exact results.
    let unary = [
        (UnOp::Exp, MathFunction::Exp, -110.0, 110.0),
        (UnOp::Log, MathFunction::Log, 0.0, 1000.0),
        (UnOp::Sin, MathFunction::Sin, -2e5, 2e5),
        (UnOp::Cos, MathFunction::Cos, -100.0, 100.0),
        (UnOp::Tanh, MathFunction::Tanh, -12.0, 12.0),
        (UnOp::Sigmoid, MathFunction::Sigmoid, -110.0, 110.0),
        (UnOp::Erf, MathFunction::Erf, -5.0, 5.0),
        (UnOp::Rsqrt, MathFunction::Rsqrt, 0.0, 100.0),
    ];
    let mut math_kernels = Vec::new();
    for (salt, (op, function, lo, hi)) in unary.into_iter().enumerate() {
        let kernel = examples::unary_map(op, DType::F32);
        let x = math_inputs(count, lo, hi, salt as u32);
        let routine = function.routine();
        let out: Vec<f32> = x
            .iter()
            .map(|&v| match routine.eval(&[Scalar::F32(v)])[0] {
                Scalar::F32(r) => r,
                other => panic!("{other:?}"),
            })
            .collect();
        math_kernels.push((kernel, vec![x], out));
    }
    for (op, function, (lo, hi), (ylo, yhi)) in [
        (BinOp::Pow, MathFunction::Pow, (0.0, 10.0), (-40.0, 40.0)),
        (BinOp::Rem, MathFunction::Fmod, (-1e4, 1e4), (-50.0, 50.0)),
    ] {
        let kernel = examples::binary_map(op, DType::F32);
        let x = math_inputs(count, lo, hi, 7);
        let mut y = math_inputs(count, ylo, yhi, 11);
        y.reverse();
        let routine = function.routine();
        let out: Vec<f32> = x
            .iter()
            .zip(&y)
            .map(
                |(&a, &b)| match routine.eval(&[Scalar::F32(a), Scalar::F32(b)])[0] {
                    Scalar::F32(r) => r,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        math_kernels.push((kernel, vec![x, y], out));
    }
    let math_module: Vec<Kernel> = math_kernels.iter().map(|(k, _, _)| k.clone()).collect();
    for (kernel, args, out) in &math_kernels {
        let mut buffers: Vec<Value> = args.iter().map(|a| inputs.push(&f32_bytes(a))).collect();
        buffers.push(json!({ "offset": 0, "bytes": out.len() * 4, "zero": true }));
        checks.push(json!({
            "name": format!("math:{}", kernel.name),
            "module": "math",
            "kernel": kernel.name,
            "grid": [out.len().div_ceil(128), 1, 1],
            "block": 128,
            "buffers": buffers,
            "scalars": [ { "type": "i64", "value": out.len() } ],
            "compare": [ { "buffer": args.len(), "dtype": "f32", "max_ulps": 0,
                           "expected": expected.push(&f32_bytes(out)) } ],
        }));
    }

    // Conversions and whole kernels, on both paths: sm_90a (f8 cvt) and sm_80 (fallbacks).
    let f8_inputs: Vec<f32> = (0..65_536u32)
        .map(|i| f32::from_bits(i.wrapping_mul(0x9E37_79B1)))
        .chain((0..65_536).map(|i| (-600.0 + 1200.0 * f64::from(i) / 65_536.0) as f32))
        .chain((0..65_536).map(|i| (-1e-3 + 2e-3 * f64::from(i) / 65_536.0) as f32))
        .collect();
    let n = f8_inputs.len();
    let grid_n = [(n as u64).div_ceil(128), 1, 1];
    let bytes_256: Vec<u8> = (0..=255u8).collect();
    let mut kernel_module = Vec::new();
    for module in ["sm_90a", "sm_80"] {
        for (to, compare) in [
            (DType::F8E4M3, "e4m3"),
            (DType::F8E5M2, "e5m2"),
            (DType::BF16, "bf16"),
            (DType::F16, "f16"),
        ] {
            let kernel = examples::convert(DType::F32, to);
            let out = vec![0u8; n * to.size_bytes()];
            kernel_check(
                &mut checks,
                &mut inputs,
                &mut expected,
                module,
                &kernel,
                grid_n,
                vec![f32_bytes(&f8_inputs), out],
                &[Const::I64(n as i64)],
                &[(1, compare, 0)],
            );
            kernel_module.push(kernel);
        }
        for from in [DType::F8E4M3, DType::F8E5M2] {
            let kernel = examples::convert(from, DType::F32);
            kernel_check(
                &mut checks,
                &mut inputs,
                &mut expected,
                module,
                &kernel,
                [2, 1, 1],
                vec![bytes_256.clone(), vec![0u8; 256 * 4]],
                &[Const::I64(256)],
                &[(1, "f32", 0)],
            );
            kernel_module.push(kernel);
        }
        // f8 vector stores and loads.
        let groups = 4096usize;
        let x: Vec<f32> = (0..groups * 4)
            .map(|i| ((i as f32) * 0.37).sin() * 500.0)
            .collect();
        let kernel = kernels::f8_stores();
        kernel_check(
            &mut checks,
            &mut inputs,
            &mut expected,
            module,
            &kernel,
            [(groups as u64).div_ceil(128), 1, 1],
            vec![
                f32_bytes(&x),
                vec![0; groups * 4],
                vec![0; groups * 4],
                vec![0; groups * 16],
            ],
            &[Const::F32(0.75), Const::I64(groups as i64)],
            &[(1, "e4m3", 0), (2, "e5m2", 0), (3, "f32", 0)],
        );
        kernel_module.push(kernel);
        // bf16 vector add (vector body and scalar tail).
        let len = 5000usize;
        let a: Vec<u8> = (0..len)
            .flat_map(|i| half::bf16::from_f32((i as f32).sqrt()).to_le_bytes())
            .collect();
        let b: Vec<u8> = (0..len)
            .flat_map(|i| half::bf16::from_f32(1.0 / (1.0 + i as f32)).to_le_bytes())
            .collect();
        let kernel = examples::vector_add(DType::BF16);
        kernel_check(
            &mut checks,
            &mut inputs,
            &mut expected,
            module,
            &kernel,
            [4, 1, 1],
            vec![a, b, vec![0; len * 2]],
            &[Const::I64(len as i64)],
            &[(2, "bf16", 0)],
        );
        kernel_module.push(kernel);
        // RMSNorm rows: shuffles, shared memory, barriers (rsqrt: 1.5 ulp in f32, so allow
        // one bf16 ulp).
        let (rows, cols) = (64usize, 4096usize);
        let x: Vec<u8> = (0..rows * cols)
            .flat_map(|i| {
                half::bf16::from_f32(((i * 7919) % 1000) as f32 / 250.0 - 2.0).to_le_bytes()
            })
            .collect();
        let w: Vec<u8> = (0..cols)
            .flat_map(|i| half::bf16::from_f32(0.5 + (i % 13) as f32 / 13.0).to_le_bytes())
            .collect();
        let kernel = examples::rms_norm_rows(DType::BF16, cols as u32, 256);
        kernel_check(
            &mut checks,
            &mut inputs,
            &mut expected,
            module,
            &kernel,
            [rows as u64, 1, 1],
            vec![x, w, vec![0; rows * cols * 2]],
            &[],
            &[(2, "bf16", 1)],
        );
        kernel_module.push(kernel);
        // Tiled matmul: loops, shared tiles, barriers; the same fma order as the interpreter.
        let (m, nn, k) = (64usize, 48usize, 80usize);
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let b: Vec<f32> = (0..k * nn).map(|i| ((i % 11) as f32 - 5.0) / 4.0).collect();
        let kernel = kernels::tiled_matmul();
        kernel_check(
            &mut checks,
            &mut inputs,
            &mut expected,
            module,
            &kernel,
            [(nn / 16) as u64, (m / 16) as u64, 1],
            vec![f32_bytes(&a), f32_bytes(&b), vec![0; m * nn * 4]],
            &[
                Const::I32(m as i32),
                Const::I32(nn as i32),
                Const::I32(k as i32),
            ],
            &[(2, "f32", 0)],
        );
        kernel_module.push(kernel);
        // Vector widths, predicates, shuffles and 64-bit shifts.
        let threads = kernels::ODDS_BLOCK as usize;
        let pattern = |count: usize, seed: u32| -> Vec<u8> {
            (0..count as u32)
                .map(|i| (i.wrapping_mul(0x9E37_79B1).wrapping_add(seed) >> 13) as u8)
                .collect()
        };
        let h: Vec<u8> = (0..threads * 4)
            .flat_map(|i| half::f16::from_f32((i as f32 - 100.0) * 0.37).to_le_bytes())
            .collect();
        let flags: Vec<u8> = pattern(threads * 8, 1)
            .iter()
            .map(|b| [0, 1, 2, 255][(b % 4) as usize])
            .collect();
        let kernel = kernels::odds_and_ends();
        kernel_check(
            &mut checks,
            &mut inputs,
            &mut expected,
            module,
            &kernel,
            [1, 1, 1],
            vec![
                h,
                flags,
                pattern(threads * 4, 2),
                pattern(threads * 8, 3),
                pattern(threads * 4, 4),
                vec![0; threads * 8 * 4],
                vec![0; threads * 8],
                vec![0; threads * 4],
                vec![0; threads * 8],
                vec![0; threads * 4],
                vec![0; threads * 4 * 8],
            ],
            &[Const::Pred(true), Const::I64(61), Const::I32(7)],
            &[
                (5, "f32", 0),
                (6, "u8", 0),
                (7, "u8", 0),
                (8, "e4m3", 0),
                (9, "e5m2", 0),
                (10, "u8", 0),
            ],
        );
        kernel_module.push(kernel);
        // Every unary op against the interpreter's libm (the contract's 4 ulp).
        let len = 20_000usize;
        let x: Vec<f32> = (0..len).map(|i| (i as f32 - 10_000.0) * 0.0123).collect();
        let y: Vec<f32> = (0..len).map(|i| ((i % 97) as f32 - 48.0) * 0.11).collect();
        let kernel = kernels::every_unary_op();
        kernel_check(
            &mut checks,
            &mut inputs,
            &mut expected,
            module,
            &kernel,
            [(len as u64).div_ceil(128), 1, 1],
            vec![
                f32_bytes(&x),
                f32_bytes(&y),
                vec![0; len * 20 * 4],
                vec![0; len * 8],
            ],
            &[Const::I64(len as i64)],
            &[(2, "f32", 4), (3, "u8", 0)],
        );
        kernel_module.push(kernel);
    }

    let half_count = kernel_module.len() / 2;
    let modules = [
        ("math", Target::Sm90a, math_module),
        (
            "sm_90a",
            Target::Sm90a,
            kernel_module[..half_count].to_vec(),
        ),
        ("sm_80", Target::Sm80, kernel_module[half_count..].to_vec()),
    ];
    let mut module_files = serde_json::Map::new();
    for (name, target, kernels) in modules {
        let ptx = emit_ptx(&kernels, target, &EmitOptions::for_jit()).unwrap();
        let file = format!("{name}.ptx");
        std::fs::write(dir.join(&file), ptx).unwrap();
        module_files.insert(name.to_string(), json!(file));
    }
    std::fs::write(dir.join("inputs.bin"), &inputs.bytes).unwrap();
    std::fs::write(dir.join("expected.bin"), &expected.bytes).unwrap();
    let manifest = json!({ "modules": module_files, "checks": checks });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

#[test]
#[ignore = "writes a GPU check to $KILN_GPU_CHECK_DIR; run tools/gpu_check.py on a GPU"]
fn export_gpu_check() {
    let dir = std::env::var_os("KILN_GPU_CHECK_DIR")
        .map(PathBuf::from)
        .expect("set KILN_GPU_CHECK_DIR");
    export(&dir);
}
