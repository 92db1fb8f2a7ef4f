//! The example kernels, run by the reference interpreter and checked against values the
//! tests compute directly: the vector add (vector loads and stores, a grid-stride loop, a
//! tail), the RMSNorm row reduction (warp shuffles, shared memory, barriers), divergent
//! branches, a loop with a per-thread trip count, a shared-memory reversal, and
//! fma/select/cast.

mod common;

use common::{floats, run, wavy, zeros};
use kiln_ir::tensor::round_f32;
use kiln_ir::{DType, Tensor};
use kiln_kir::examples::{
    divergent_branches, fma_select, prefix_sums_by_loop, reverse_blocks, rms_norm_rows, vector_add,
    vector_width, RMS_NORM_EPS, VECTOR_ADD_BLOCKS,
};
use kiln_kir::{launch_grid, verify_kernel, Const};

fn check_vector_add(dtype: DType, n: usize) {
    let kernel = vector_add(dtype);
    verify_kernel(&kernel).unwrap();
    let a = floats(dtype, &wavy(n, 1));
    let b = floats(dtype, &wavy(n, 2));
    let out = run(
        &kernel,
        [u64::from(VECTOR_ADD_BLOCKS), 1, 1],
        &[a.clone(), b.clone(), zeros(dtype, n)],
        &[Const::I64(n as i64)],
    )
    .unwrap();
    let expected: Vec<f32> = a
        .to_f32_vec()
        .iter()
        .zip(b.to_f32_vec())
        .map(|(x, y)| round_f32(dtype, x + y))
        .collect();
    assert_eq!(out[2].to_f32_vec(), expected, "{dtype}, n = {n}");
    // The inputs are untouched.
    assert_eq!(out[0], a);
    assert_eq!(out[1], b);
}

#[test]
fn vector_add_bf16_covers_several_grid_strides_and_a_tail() {
    let stride = (VECTOR_ADD_BLOCKS * 128 * vector_width(DType::BF16)) as usize;
    // Two full passes of the vector loop, part of a third, and a tail of 5 elements.
    check_vector_add(DType::BF16, 2 * stride + 8 * 3 + 5);
}

#[test]
fn vector_add_handles_sizes_below_one_vector() {
    for n in [0, 1, 7, 8, 9] {
        check_vector_add(DType::BF16, n);
    }
}

#[test]
fn vector_add_in_other_dtypes() {
    check_vector_add(DType::F32, 3001);
    check_vector_add(DType::F16, 1029);
    check_vector_add(DType::F8E4M3, 77);
}

#[test]
fn vector_add_wraps_integers() {
    let kernel = vector_add(DType::I32);
    let n = 13;
    let a = Tensor::from_i32(&[n], (0..n as i32).map(|i| i32::MAX - i).collect());
    let b = Tensor::from_i32(&[n], (0..n as i32).map(|i| i * 1000).collect());
    let out = run(
        &kernel,
        [4, 1, 1],
        &[a, b, Tensor::from_i32(&[n], vec![0; n])],
        &[Const::I64(n as i64)],
    )
    .unwrap();
    let expected: Vec<i64> = (0..n as i32)
        .map(|i| i64::from((i32::MAX - i).wrapping_add(i * 1000)))
        .collect();
    assert_eq!(out[2].to_i64_vec(), expected);
}

/// RMSNorm computed directly in f64.
fn rms_norm_reference(x: &[f32], weight: &[f32], cols: usize) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let mean_square = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / cols as f64;
            let inv = 1.0 / (mean_square + f64::from(RMS_NORM_EPS)).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(&v, &w)| f64::from(v) * inv * f64::from(w))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn check_rms_norm(dtype: DType, rows: usize, cols: usize, block_dim: u32, tolerance: f64) {
    let kernel = rms_norm_rows(dtype, cols as u32, block_dim);
    verify_kernel(&kernel).unwrap();
    let grid = launch_grid(&kernel, &|s| (s == "rows").then_some(rows as u64)).unwrap();
    assert_eq!(grid, [rows as u64, 1, 1]);
    let x = floats(dtype, &wavy(rows * cols, 3));
    let weight = floats(
        dtype,
        &wavy(cols, 4)
            .iter()
            .map(|w| 1.0 + w / 4.0)
            .collect::<Vec<_>>(),
    );
    let out = run(
        &kernel,
        grid,
        &[x.clone(), weight.clone(), zeros(dtype, rows * cols)],
        &[],
    )
    .unwrap();
    let expected = rms_norm_reference(&x.to_f32_vec(), &weight.to_f32_vec(), cols);
    for (i, (got, want)) in out[2].to_f32_vec().iter().zip(&expected).enumerate() {
        let error = (f64::from(*got) - want).abs();
        assert!(
            error <= tolerance * want.abs().max(1e-3),
            "{dtype} rows={rows} cols={cols} block={block_dim}: element {i} is {got}, expected {want}"
        );
    }
}

#[test]
fn rms_norm_matches_a_direct_computation() {
    // bf16 output: the result is rounded once, so within one bf16 rounding (2^-8 relative)
    // plus f32 accumulation noise.
    check_rms_norm(DType::BF16, 3, 1000, 256, 2f64.powi(-8) * 1.01);
    check_rms_norm(DType::F32, 2, 4096, 1024, 1e-5);
    check_rms_norm(DType::F32, 4, 100, 32, 1e-5);
    check_rms_norm(DType::F16, 1, 17, 64, 2f64.powi(-11) * 1.01);
}

#[test]
fn divergent_branches_take_each_threads_path() {
    let x: Vec<f32> = (0..64).map(|i| i as f32 * 0.5 - 3.0).collect();
    let out = run(
        &divergent_branches(),
        [1, 1, 1],
        &[floats(DType::F32, &x), zeros(DType::F32, 64)],
        &[],
    )
    .unwrap();
    let expected: Vec<f32> = (0..64)
        .map(|t| {
            let v = x[t];
            if t % 2 == 0 {
                if t < 16 {
                    v * 2.0
                } else {
                    -v
                }
            } else if t % 32 == 31 {
                0.0
            } else {
                v + 100.0
            }
        })
        .collect();
    assert_eq!(out[1].to_f32_vec(), expected);
}

#[test]
fn loops_with_per_thread_trip_counts() {
    let x: Vec<f32> = (0..64).map(|i| (i % 7) as f32 - 2.0).collect();
    let out = run(
        &prefix_sums_by_loop(),
        [1, 1, 1],
        &[floats(DType::F32, &x), zeros(DType::F32, 64)],
        &[],
    )
    .unwrap();
    let expected: Vec<f32> = (0..64).map(|t| x[..=t].iter().sum()).collect();
    assert_eq!(out[1].to_f32_vec(), expected);
}

#[test]
fn shared_memory_and_a_barrier_exchange_elements_between_threads() {
    let kernel = reverse_blocks(DType::I32, 96);
    let grid = launch_grid(&kernel, &|s| (s == "blocks").then_some(3)).unwrap();
    let x = Tensor::from_i32(&[288], (0..288).collect());
    let out = run(
        &kernel,
        grid,
        &[x, Tensor::from_i32(&[288], vec![0; 288])],
        &[],
    )
    .unwrap();
    let expected: Vec<i64> = (0..288)
        .map(|i: i64| (i / 96) * 96 + (95 - i % 96))
        .collect();
    assert_eq!(out[1].to_i64_vec(), expected);
}

#[test]
fn fma_select_and_casts() {
    let x = [2.5f32, -1.7, 0.0, 3.0e9, -7.9, 1.0];
    let y = [0.1f32, 1.0, 2.0, 1.0, 0.0, 1.0 / 3.0];
    let z = [1.0f32, 0.0, 5.0, -3.0e9, 0.0, 1.0e-8];
    let n = x.len();
    let out = run(
        &fma_select(),
        [1, 1, 1],
        &[
            floats(DType::F32, &x),
            floats(DType::F32, &y),
            floats(DType::F32, &z),
            zeros(DType::F32, n),
        ],
        &[Const::I64(n as i64)],
    )
    .unwrap();
    let expected: Vec<f32> = (0..n)
        .map(|i| {
            if x[i] > 0.0 {
                x[i].mul_add(y[i], z[i])
            } else {
                ((x[i] as i32).wrapping_mul(3)) as f32
            }
        })
        .collect();
    assert_eq!(out[3].to_f32_vec(), expected);
    // One rounding: fma(1, 1/3, 1e-8) differs from the twice-rounded product-then-sum.
    assert_eq!(out[3].to_f32_vec()[5], 1.0f32.mul_add(1.0 / 3.0, 1.0e-8));
}
