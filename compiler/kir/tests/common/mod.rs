//! Helpers shared by the kernel-IR tests: running a kernel on tensors through the reference
//! interpreter, and comparing floats.

#![allow(dead_code)]

use kiln_ir::{DType, Tensor};
use kiln_kir::{run_kernel, Const, Kernel, KirError};

/// Runs `kernel` on `grid` with one tensor per buffer parameter (in order) and returns the
/// buffers afterwards, as tensors of the same dtypes and shapes.
pub fn run(
    kernel: &Kernel,
    grid: [u64; 3],
    buffers: &[Tensor],
    scalars: &[Const],
) -> Result<Vec<Tensor>, KirError> {
    let mut memory: Vec<Vec<u8>> = buffers.iter().map(Tensor::to_le_bytes).collect();
    let mut slices: Vec<&mut [u8]> = memory.iter_mut().map(Vec::as_mut_slice).collect();
    run_kernel(kernel, grid, &mut slices, scalars)?;
    Ok(buffers
        .iter()
        .zip(&memory)
        .map(|(t, bytes)| Tensor::from_le_bytes(t.dtype, &t.shape, bytes).expect("same size"))
        .collect())
}

/// A 1-D tensor of `dtype` from f32 values (rounded to the dtype).
pub fn floats(dtype: DType, values: &[f32]) -> Tensor {
    Tensor::from_floats(dtype, &[values.len()], values.to_vec())
}

/// A 1-D tensor of `dtype` with `len` zeros.
pub fn zeros(dtype: DType, len: usize) -> Tensor {
    Tensor::zeros(dtype, &[len])
}

/// Deterministic test data in roughly [-2, 2): no two neighbours alike.
pub fn wavy(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = (i as f32 + 1.0) * 0.618 + seed as f32 * 1.37;
            2.0 * (x * 3.1).sin() * (x * 0.71).cos()
        })
        .collect()
}

/// The distance between two finite f32 values in units in the last place.
pub fn ulps(a: f32, b: f32) -> u64 {
    let to_ordered = |x: f32| {
        let bits = x.to_bits();
        if bits & 0x8000_0000 != 0 {
            -((bits & 0x7FFF_FFFF) as i64)
        } else {
            bits as i64
        }
    };
    (to_ordered(a) - to_ordered(b)).unsigned_abs()
}
