//! Every example kernel of `kiln_kir::examples`, run through the Cranelift backend and
//! compared with the reference interpreter.

mod common;

use common::{check, random_buffer, Arg, Rng, Tolerance};
use kiln_ir::DType;
use kiln_kir::examples;
use kiln_kir::{BinOp, Const, UnOp};

const FLOAT_DTYPES: [DType; 5] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E5M2,
];

/// A grid of `ceil(n / 128)` blocks: the last one partial unless `n` is a multiple.
fn grid_over(n: usize) -> [u64; 3] {
    [n.div_ceil(128) as u64, 1, 1]
}

#[test]
fn vector_add_every_dtype_with_a_tail() {
    let mut rng = Rng::new(1);
    for dtype in DType::ALL {
        if dtype == DType::Bool {
            continue;
        }
        // Not a multiple of the vector width, nor of the grid's threads.
        for n in [0usize, 5, 1000, 4 * 128 * 8 + 13] {
            let kernel = examples::vector_add(dtype);
            let args = [
                Arg::Buffer(random_buffer(&mut rng, dtype, n)),
                Arg::Buffer(random_buffer(&mut rng, dtype, n)),
                Arg::Buffer(vec![0; n * dtype.size_bytes()]),
                Arg::Scalar(Const::I64(n as i64)),
            ];
            check(&kernel, [4, 1, 1], &args, Tolerance::Exact);
        }
    }
}

#[test]
fn vector_add_sized_grid() {
    let mut rng = Rng::new(2);
    let n = 777;
    let kernel = examples::vector_add_sized(DType::F32, 3, 64);
    let args = [
        Arg::Buffer(random_buffer(&mut rng, DType::F32, n)),
        Arg::Buffer(random_buffer(&mut rng, DType::F32, n)),
        Arg::Buffer(vec![0; n * 4]),
        Arg::Scalar(Const::I64(n as i64)),
    ];
    check(&kernel, [3, 1, 1], &args, Tolerance::Exact);
}

#[test]
fn rms_norm_rows_matches_bit_for_bit() {
    let mut rng = Rng::new(3);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (cols, block_dim) in [(64u32, 32u32), (100, 64), (1000, 256), (33, 1024)] {
            let rows = 5;
            let kernel = examples::rms_norm_rows(dtype, cols, block_dim);
            let n = rows * cols as usize;
            let args = [
                Arg::Buffer(random_buffer(&mut rng, dtype, n)),
                Arg::Buffer(random_buffer(&mut rng, dtype, cols as usize)),
                Arg::Buffer(vec![0; n * dtype.size_bytes()]),
            ];
            check(&kernel, [rows as u64, 1, 1], &args, Tolerance::Exact);
        }
    }
}

/// Inputs for unary ops: a spread over the op's interesting range, plus special values.
fn unary_inputs(rng: &mut Rng, op: UnOp, n: usize) -> Vec<f32> {
    let (lo, hi) = match op {
        UnOp::Log | UnOp::Sqrt | UnOp::Rsqrt => (1e-3, 100.0),
        UnOp::Exp => (-80.0, 80.0),
        UnOp::Exp2 => (-140.0, 140.0),
        UnOp::Sin | UnOp::Cos => (-100.0, 100.0),
        _ => (-10.0, 10.0),
    };
    let mut values: Vec<f32> = (0..n).map(|_| rng.f32_in(lo, hi)).collect();
    let specials = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-30,
        -3.5,
    ];
    values[..specials.len()].copy_from_slice(&specials);
    values
}

#[test]
fn every_unary_op_on_f32() {
    let mut rng = Rng::new(4);
    for op in UnOp::FLOAT {
        let n = 300; // three blocks, the last one partial
        let kernel = examples::unary_map(op, DType::F32);
        let values = unary_inputs(&mut rng, op, n);
        let args = [
            Arg::Buffer(common::floats_as(DType::F32, &values)),
            Arg::Buffer(vec![0; n * 4]),
            Arg::Scalar(Const::I64(n as i64)),
        ];
        let tolerance = match op {
            // libm's f32 functions against f64 ones rounded once: both within the IR's
            // 4-ulp bound of the exact result.
            UnOp::Exp | UnOp::Log | UnOp::Sin | UnOp::Cos | UnOp::Tanh | UnOp::Erf => {
                Tolerance::Ulps(4)
            }
            _ => Tolerance::Exact,
        };
        check(&kernel, grid_over(n), &args, tolerance);
    }
}

#[test]
fn the_roundings_to_16_bit_floats_match_the_interpreter() {
    // Ties, values past f16's range, subnormals of both types, NaN: the store's rounding.
    let mut rng = Rng::new(6);
    for op in UnOp::ROUNDINGS {
        let n = 300;
        let kernel = examples::unary_map(op, DType::F32);
        let mut values = unary_inputs(&mut rng, op, n);
        let more = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            70000.0,
            -1e-6,
            1e-40,
            3.0e38,
        ];
        values[10..10 + more.len()].copy_from_slice(&more);
        let args = [
            Arg::Buffer(common::floats_as(DType::F32, &values)),
            Arg::Buffer(vec![0; n * 4]),
            Arg::Scalar(Const::I64(n as i64)),
        ];
        check(&kernel, grid_over(n), &args, Tolerance::Exact);
    }
}

#[test]
fn unary_ops_on_narrow_floats_and_integers() {
    let mut rng = Rng::new(5);
    for dtype in FLOAT_DTYPES {
        for op in [UnOp::Neg, UnOp::Abs, UnOp::Sqrt, UnOp::Recip, UnOp::Sigmoid] {
            let n = 200;
            let kernel = examples::unary_map(op, dtype);
            let args = [
                Arg::Buffer(random_buffer(&mut rng, dtype, n)),
                Arg::Buffer(vec![0; n * dtype.size_bytes()]),
                Arg::Scalar(Const::I64(n as i64)),
            ];
            check(&kernel, grid_over(n), &args, Tolerance::Exact);
        }
    }
    for dtype in [DType::I8, DType::I32, DType::I64] {
        for op in [UnOp::Neg, UnOp::Abs, UnOp::Not] {
            let n = 130;
            let kernel = examples::unary_map(op, dtype);
            let args = [
                Arg::Buffer(random_buffer(&mut rng, dtype, n)),
                Arg::Buffer(vec![0; n * dtype.size_bytes()]),
                Arg::Scalar(Const::I64(n as i64)),
            ];
            check(&kernel, grid_over(n), &args, Tolerance::Exact);
        }
    }
    let n = 129;
    let kernel = examples::unary_map(UnOp::Not, DType::Bool);
    let args = [
        Arg::Buffer(random_buffer(&mut rng, DType::Bool, n)),
        Arg::Buffer(vec![0; n]),
        Arg::Scalar(Const::I64(n as i64)),
    ];
    check(&kernel, grid_over(n), &args, Tolerance::Exact);
}

#[test]
fn every_binary_op_on_f32() {
    let mut rng = Rng::new(6);
    let ops = [
        BinOp::Add,
        BinOp::Sub,
        BinOp::Mul,
        BinOp::Div,
        BinOp::Rem,
        BinOp::Min,
        BinOp::Max,
        BinOp::Pow,
        BinOp::Eq,
        BinOp::Ne,
        BinOp::Lt,
        BinOp::Le,
        BinOp::Gt,
        BinOp::Ge,
    ];
    for op in ops {
        let n = 257;
        let kernel = examples::binary_map(op, DType::F32);
        let mut x: Vec<f32> = (0..n).map(|_| rng.f32_in(-8.0, 8.0)).collect();
        let mut y: Vec<f32> = (0..n).map(|_| rng.f32_in(-8.0, 8.0)).collect();
        // Equal operands, NaNs on either side, infinities.
        x[..6].copy_from_slice(&[1.0, f32::NAN, 2.0, f32::NAN, f32::INFINITY, 3.0]);
        y[..6].copy_from_slice(&[1.0, 2.0, f32::NAN, f32::NAN, 5.0, 3.0]);
        if op == BinOp::Pow {
            for v in &mut x {
                *v = v.abs();
            }
        }
        let out_dtype = if op.is_comparison() {
            DType::Bool
        } else {
            DType::F32
        };
        let args = [
            Arg::Buffer(common::floats_as(DType::F32, &x)),
            Arg::Buffer(common::floats_as(DType::F32, &y)),
            Arg::Buffer(vec![0; n * out_dtype.size_bytes()]),
            Arg::Scalar(Const::I64(n as i64)),
        ];
        let tolerance = if op == BinOp::Pow {
            Tolerance::Ulps(4)
        } else {
            Tolerance::Exact
        };
        check(&kernel, grid_over(n), &args, tolerance);
    }
}

#[test]
fn every_binary_op_on_integers() {
    let mut rng = Rng::new(7);
    let ops = [
        BinOp::Add,
        BinOp::Sub,
        BinOp::Mul,
        BinOp::Div,
        BinOp::Rem,
        BinOp::Min,
        BinOp::Max,
        BinOp::And,
        BinOp::Or,
        BinOp::Xor,
        BinOp::Shl,
        BinOp::Shr,
        BinOp::Eq,
        BinOp::Ne,
        BinOp::Lt,
        BinOp::Le,
        BinOp::Gt,
        BinOp::Ge,
    ];
    for dtype in [DType::I8, DType::I32, DType::I64] {
        for op in ops {
            let n = 200;
            let kernel = examples::binary_map(op, dtype);
            let (min, max) = match dtype {
                DType::I8 => (i64::from(i8::MIN), i64::from(i8::MAX)),
                DType::I32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
                _ => (i64::MIN, i64::MAX),
            };
            let spread = max.min(1000);
            let mut x: Vec<i64> = (0..n).map(|_| rng.i64_in(-spread, spread)).collect();
            let mut y: Vec<i64> = (0..n).map(|_| rng.i64_in(-spread, spread)).collect();
            x[..4].copy_from_slice(&[min, max, min, 7]);
            y[..4].copy_from_slice(&[-1, 1, 1, 7]);
            match op {
                BinOp::Div | BinOp::Rem => {
                    for v in &mut y {
                        if *v == 0 {
                            *v = 3;
                        }
                    }
                }
                BinOp::Shl | BinOp::Shr => {
                    // Amounts in and beyond the width, and negative (huge as unsigned).
                    for v in &mut y {
                        *v = v.rem_euclid(80) - 8;
                    }
                }
                _ => {}
            }
            let out_dtype = if op.is_comparison() {
                DType::Bool
            } else {
                dtype
            };
            let args = [
                Arg::Buffer(common::ints_as(dtype, &x)),
                Arg::Buffer(common::ints_as(dtype, &y)),
                Arg::Buffer(vec![0; n * out_dtype.size_bytes()]),
                Arg::Scalar(Const::I64(n as i64)),
            ];
            check(&kernel, grid_over(n), &args, Tolerance::Exact);
        }
    }
    for op in [BinOp::And, BinOp::Or, BinOp::Xor, BinOp::Eq, BinOp::Ne] {
        let n = 140;
        let kernel = examples::binary_map(op, DType::Bool);
        let args = [
            Arg::Buffer(random_buffer(&mut rng, DType::Bool, n)),
            Arg::Buffer(random_buffer(&mut rng, DType::Bool, n)),
            Arg::Buffer(vec![0; n]),
            Arg::Scalar(Const::I64(n as i64)),
        ];
        check(&kernel, grid_over(n), &args, Tolerance::Exact);
    }
}

/// Values that exercise every conversion: rounding ties, saturation, NaN, infinities,
/// subnormals, integers beyond 2^24 and beyond i32.
fn conversion_inputs(from: DType, rng: &mut Rng, n: usize) -> Vec<u8> {
    if from.is_float() {
        let mut values: Vec<f32> = (0..n).map(|_| rng.f32_in(-600.0, 600.0)).collect();
        let specials = [
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0625,
            1.1875,
            449.0,
            -70000.0,
            3e9,
            -3e9,
            1e-7,
            2f32.powi(-10),
            65504.0,
            0.4999,
            -127.9,
            300.5,
        ];
        values[..specials.len()].copy_from_slice(&specials);
        common::floats_as(from, &values)
    } else if from == DType::Bool {
        random_buffer(rng, from, n)
    } else {
        let (lo, hi) = match from {
            DType::I8 => (-128, 128),
            DType::I32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
            _ => (i64::MIN / 2, i64::MAX / 2),
        };
        let mut values: Vec<i64> = (0..n).map(|_| rng.i64_in(lo, hi)).collect();
        values[..4].copy_from_slice(&[0, -1, 16_777_217, 300]);
        common::ints_as(from, &values)
    }
}

#[test]
fn every_conversion_between_dtypes() {
    let mut rng = Rng::new(8);
    for from in DType::ALL {
        for to in DType::ALL {
            let n = 150;
            let kernel = examples::convert(from, to);
            let args = [
                Arg::Buffer(conversion_inputs(from, &mut rng, n)),
                Arg::Buffer(vec![0; n * to.size_bytes()]),
                Arg::Scalar(Const::I64(n as i64)),
            ];
            check(&kernel, grid_over(n), &args, Tolerance::Exact);
        }
    }
}

#[test]
fn fma_select_divergence_and_loops() {
    let mut rng = Rng::new(9);
    let n = 333;
    let kernel = examples::fma_select();
    let args = [
        Arg::Buffer(random_buffer(&mut rng, DType::F32, n)),
        Arg::Buffer(random_buffer(&mut rng, DType::F32, n)),
        Arg::Buffer(random_buffer(&mut rng, DType::F32, n)),
        Arg::Buffer(vec![0; n * 4]),
        Arg::Scalar(Const::I64(n as i64)),
    ];
    check(&kernel, grid_over(n), &args, Tolerance::Exact);

    for kernel in [
        examples::divergent_branches(),
        examples::prefix_sums_by_loop(),
    ] {
        let args = [
            Arg::Buffer(random_buffer(&mut rng, DType::F32, 64)),
            Arg::Buffer(vec![0; 64 * 4]),
        ];
        check(&kernel, [1, 1, 1], &args, Tolerance::Exact);
    }
}

#[test]
fn reverse_blocks_through_shared_memory() {
    let mut rng = Rng::new(10);
    for dtype in [
        DType::F32,
        DType::BF16,
        DType::I8,
        DType::I64,
        DType::F8E4M3,
    ] {
        for (blocks, block_dim) in [(1u64, 32u32), (3, 128), (7, 1024)] {
            let kernel = examples::reverse_blocks(dtype, block_dim);
            let n = blocks as usize * block_dim as usize;
            let args = [
                Arg::Buffer(random_buffer(&mut rng, dtype, n)),
                Arg::Buffer(vec![0; n * dtype.size_bytes()]),
            ];
            check(&kernel, [blocks, 1, 1], &args, Tolerance::Exact);
        }
    }
}

#[test]
fn pack_halves_matches_bit_for_bit() {
    let mut rng = Rng::new(12);
    for input in [kiln_kir::MmaInput::Bf16, kiln_kir::MmaInput::F16] {
        let kernel = examples::pack_halves(input);
        let args = [
            Arg::Buffer(random_buffer(&mut rng, DType::F32, 128)),
            Arg::Buffer(vec![0; 64 * 4]),
        ];
        check(&kernel, [1, 1, 1], &args, Tolerance::Exact);
    }
}

#[test]
fn tensor_core_tile_matches_bit_for_bit() {
    // Random values (not exact sums): the backend must add in the reference's order.
    let mut rng = Rng::new(11);
    use kiln_kir::MmaInput;
    for input in [
        MmaInput::Bf16,
        MmaInput::F16,
        MmaInput::E4M3,
        MmaInput::E5M2,
    ] {
        let layouts: &[bool] = if input.is_fp8() {
            &[false]
        } else {
            &[false, true]
        };
        for &b_k_major in layouts {
            for (m, k) in [(16, 16), (13, 11), (0, 5), (16, input.k() as i32)] {
                let kernel = examples::mma_tile(input, b_k_major);
                let dtype = input.dtype();
                let args = [
                    Arg::Buffer(random_buffer(&mut rng, dtype, 16 * input.k())),
                    Arg::Buffer(random_buffer(&mut rng, dtype, 8 * input.k())),
                    Arg::Buffer(vec![0; 128 * 4]),
                    Arg::Scalar(Const::I32(m)),
                    Arg::Scalar(Const::I32(k)),
                ];
                check(&kernel, [1, 1, 1], &args, Tolerance::Exact);
            }
        }
    }
}

#[test]
fn prefetching_copy_runs_its_prefetches_and_launch_control_as_no_ops() {
    let mut rng = Rng::new(13);
    for dtype in [DType::F32, DType::BF16, DType::F8E4M3] {
        for n in [1usize, 64, 100, 130] {
            let kernel = examples::prefetch_copy(dtype);
            let x = random_buffer(&mut rng, dtype, n);
            let args = [
                Arg::Buffer(x.clone()),
                Arg::Buffer(vec![0; n * dtype.size_bytes()]),
                Arg::Scalar(Const::I64(n as i64)),
            ];
            let grid = [n.div_ceil(64) as u64, 1, 1];
            check(&kernel, grid, &args, Tolerance::Exact);
            let out = common::run_native(&kernel, grid, &args).expect("runs");
            assert_eq!(out[1], x, "{dtype} n = {n}");
        }
    }
}

#[test]
fn atomic_adds_are_atomic_across_blocks_running_at_once() {
    // Many blocks on several threads at once: every count seen once, the last block's total
    // (partials added in block order) the interpreter's bits, the counter back at zero.
    let blocks = 257usize;
    let mut rng = Rng::new(29);
    let x = random_buffer(&mut rng, DType::F32, blocks * 32);
    let args = [
        Arg::Buffer(x),
        Arg::Buffer(vec![0; blocks * 4]),
        Arg::Buffer(vec![0; 4]),
        Arg::Buffer(vec![0; blocks * 4]),
        Arg::Buffer(vec![0; 4]),
        Arg::Scalar(Const::I64(blocks as i64)),
    ];
    let grid = [blocks as u64, 1, 1];
    let kernel = examples::last_block_total(true);
    let want = common::run_interpreter(&kernel, grid, &args);
    let ints = |bytes: &[u8]| -> Vec<i32> {
        bytes
            .chunks(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    for _ in 0..4 {
        let got = common::run_native(&kernel, grid, &args).expect("runs");
        assert_eq!(got[1], want[1], "partials");
        assert_eq!(ints(&got[2]), vec![0], "the counter is reset");
        let mut arrivals = ints(&got[3]);
        arrivals.sort_unstable();
        assert_eq!(arrivals, (0..blocks as i32).collect::<Vec<_>>());
        assert_eq!(got[4], want[4], "the last block's total");
    }
    let kernel = examples::last_block_total(false);
    let got = common::run_native(&kernel, grid, &args).expect("runs");
    assert_eq!(ints(&got[2]), vec![blocks as i32], "without the reset");
}
