//! Shared test helpers: run one launch through the reference interpreter and through the
//! Cranelift backend, and compare every buffer afterwards.

#![allow(dead_code)]

use kiln_cpu::{CpuError, CpuKernel, KernelArg};
use kiln_ir::DType;
use kiln_kir::{Const, Kernel, Param};

/// A deterministic xorshift generator for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `[lo, hi)`.
    pub fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    pub fn i64_in(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo) as u64) as i64
    }
}

/// The memory form of `values` as `dtype` (the interpreter's store conversions).
pub fn floats_as(dtype: DType, values: &[f32]) -> Vec<u8> {
    kiln_ir::Tensor::from_f32(&[values.len()], values.to_vec())
        .cast(dtype)
        .to_le_bytes()
}

/// The memory form of integers as `dtype` (wrapping).
pub fn ints_as(dtype: DType, values: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        match dtype {
            DType::I8 => out.push(v as i8 as u8),
            DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
            DType::I64 => out.extend_from_slice(&v.to_le_bytes()),
            DType::Bool => out.push(u8::from(v != 0)),
            other => panic!("ints_as {other}"),
        }
    }
    out
}

pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `n` random elements of `dtype` in memory form: floats in `[-4, 4)`, integers over a
/// range that fits the dtype, bools at random.
pub fn random_buffer(rng: &mut Rng, dtype: DType, n: usize) -> Vec<u8> {
    if dtype.is_float() {
        let values: Vec<f32> = (0..n).map(|_| rng.f32_in(-4.0, 4.0)).collect();
        floats_as(dtype, &values)
    } else {
        let (lo, hi) = match dtype {
            DType::I8 => (-128, 128),
            DType::I32 => (-100_000, 100_000),
            DType::I64 => (-10_000_000_000, 10_000_000_000),
            _ => (0, 2),
        };
        let values: Vec<i64> = (0..n).map(|_| rng.i64_in(lo, hi)).collect();
        ints_as(dtype, &values)
    }
}

/// A launch argument for the test harness.
#[derive(Clone, Debug)]
pub enum Arg {
    Buffer(Vec<u8>),
    Scalar(Const),
}

/// How closely the backend must match the interpreter on float buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tolerance {
    /// Identical bytes (any NaN equals any NaN).
    Exact,
    /// At most this many units in the last place of the buffer's dtype.
    Ulps(u64),
}

/// The buffers after running `kernel` through the reference interpreter.
pub fn run_interpreter(kernel: &Kernel, grid: [u64; 3], args: &[Arg]) -> Vec<Vec<u8>> {
    let mut buffers: Vec<Vec<u8>> = args
        .iter()
        .filter_map(|a| match a {
            Arg::Buffer(b) => Some(b.clone()),
            Arg::Scalar(_) => None,
        })
        .collect();
    let scalars: Vec<Const> = args
        .iter()
        .filter_map(|a| match a {
            Arg::Scalar(c) => Some(*c),
            Arg::Buffer(_) => None,
        })
        .collect();
    let mut slices: Vec<&mut [u8]> = buffers.iter_mut().map(|b| b.as_mut_slice()).collect();
    kiln_kir::run_kernel(kernel, grid, &mut slices, &scalars)
        .unwrap_or_else(|e| panic!("interpreter: {e}"));
    buffers
}

/// The buffers after running `kernel` on the CPU backend, or its error.
pub fn run_native(kernel: &Kernel, grid: [u64; 3], args: &[Arg]) -> Result<Vec<Vec<u8>>, CpuError> {
    let compiled = CpuKernel::compile(kernel)?;
    run_compiled(&compiled, grid, args)
}

pub fn run_compiled(
    compiled: &CpuKernel,
    grid: [u64; 3],
    args: &[Arg],
) -> Result<Vec<Vec<u8>>, CpuError> {
    let mut buffers: Vec<Vec<u8>> = args
        .iter()
        .filter_map(|a| match a {
            Arg::Buffer(b) => Some(b.clone()),
            Arg::Scalar(_) => None,
        })
        .collect();
    {
        let mut slots = buffers.iter_mut();
        let mut launch_args: Vec<KernelArg<'_>> = args
            .iter()
            .map(|a| match a {
                Arg::Buffer(_) => KernelArg::Buffer(slots.next().expect("one per buffer")),
                Arg::Scalar(Const::I32(v)) => KernelArg::I32(*v),
                Arg::Scalar(Const::I64(v)) => KernelArg::I64(*v),
                Arg::Scalar(Const::F32(v)) => KernelArg::F32(*v),
                Arg::Scalar(Const::Pred(v)) => KernelArg::Pred(*v),
            })
            .collect();
        compiled.launch(grid, &mut launch_args)?;
    }
    Ok(buffers)
}

/// Runs both and asserts every buffer matches within `tolerance`.
pub fn check(kernel: &Kernel, grid: [u64; 3], args: &[Arg], tolerance: Tolerance) {
    let expected = run_interpreter(kernel, grid, args);
    let actual =
        run_native(kernel, grid, args).unwrap_or_else(|e| panic!("{}: native: {e}", kernel.name));
    let dtypes: Vec<DType> = kernel
        .params
        .iter()
        .filter_map(|p| match p {
            Param::Buffer { dtype, .. } => Some(*dtype),
            Param::Scalar { .. } => None,
        })
        .collect();
    let names: Vec<&str> = kernel
        .params
        .iter()
        .filter(|p| matches!(p, Param::Buffer { .. }))
        .map(Param::name)
        .collect();
    for (((want, got), dtype), name) in expected.iter().zip(&actual).zip(&dtypes).zip(&names) {
        compare_buffer(&kernel.name, name, *dtype, want, got, tolerance);
    }
}

/// Asserts two memory-form buffers of `dtype` agree within `tolerance`.
pub fn compare_buffer(
    kernel: &str,
    buffer: &str,
    dtype: DType,
    want: &[u8],
    got: &[u8],
    tolerance: Tolerance,
) {
    assert_eq!(want.len(), got.len(), "{kernel}: buffer `{buffer}` length");
    let size = dtype.size_bytes();
    for (element, (a, b)) in want
        .chunks_exact(size)
        .zip(got.chunks_exact(size))
        .enumerate()
    {
        if a == b {
            continue;
        }
        let ok = dtype.is_float() && {
            let (x, y) = (bits_of(a), bits_of(b));
            let (x_nan, y_nan) = (is_nan(dtype, x), is_nan(dtype, y));
            if x_nan || y_nan {
                x_nan && y_nan
            } else {
                match tolerance {
                    Tolerance::Exact => false,
                    Tolerance::Ulps(n) => ordered(x, size).abs_diff(ordered(y, size)) <= n,
                }
            }
        };
        assert!(
            ok,
            "{kernel}: buffer `{buffer}` ({dtype}) element {element}: interpreter {a:02x?}, \
             native {b:02x?} ({tolerance:?})"
        );
    }
}

fn bits_of(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte))
}

/// Sign-magnitude bits mapped onto a line where adjacent floats are adjacent integers.
fn ordered(bits: u64, size: usize) -> i64 {
    let sign = 1u64 << (8 * size - 1);
    if bits & sign != 0 {
        -((bits & !sign) as i64)
    } else {
        bits as i64
    }
}

fn is_nan(dtype: DType, bits: u64) -> bool {
    match dtype {
        DType::F32 => f32::from_bits(bits as u32).is_nan(),
        DType::F16 => half::f16::from_bits(bits as u16).is_nan(),
        DType::BF16 => half::bf16::from_bits(bits as u16).is_nan(),
        DType::F8E4M3 => kiln_ir::fp8::E4M3.is_nan(bits as u8),
        DType::F8E5M2 => kiln_ir::fp8::E5M2.is_nan(bits as u8),
        _ => false,
    }
}
