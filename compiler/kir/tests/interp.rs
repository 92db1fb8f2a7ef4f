//! The reference interpreter's semantics, operation by operation: unary and binary
//! operators on every type (checked against values computed here, transcendental ones to
//! within the 4 ulp the IR promises), hardware indices, warp shuffles, conversions on load
//! and store, vector accesses, lock-step execution, divergent loops, and the errors a run
//! reports instead of panicking.

mod common;

use common::{floats, run, ulps, zeros};
use kiln_ir::{DType, Tensor};
use kiln_kir::examples::{binary_map, convert, unary_map};
use kiln_kir::{
    launch_grid, run_kernel, Access, BinOp, Const, Expr, Kernel, KernelBuilder, SizeExpr, Stmt, Ty,
    UnOp,
};

/// Runs an element-wise example kernel (`x`, [`y`], `out`, `n`) over `inputs`.
fn map(kernel: &Kernel, inputs: Vec<Tensor>, out_dtype: DType) -> Tensor {
    let n = inputs[0].numel();
    let grid = launch_grid(kernel, &|s| (s == "n").then_some(n as u64)).unwrap();
    let mut buffers = inputs;
    buffers.push(Tensor::zeros(out_dtype, &[n]));
    let out = run(kernel, grid, &buffers, &[Const::I64(n as i64)]).unwrap();
    out.last().unwrap().clone()
}

fn unary_f32(op: UnOp, x: &[f32]) -> Vec<f32> {
    map(
        &unary_map(op, DType::F32),
        vec![floats(DType::F32, x)],
        DType::F32,
    )
    .to_f32_vec()
}

fn binary_f32(op: BinOp, x: &[f32], y: &[f32]) -> Tensor {
    let out = if op.is_comparison() {
        DType::Bool
    } else {
        DType::F32
    };
    map(
        &binary_map(op, DType::F32),
        vec![floats(DType::F32, x), floats(DType::F32, y)],
        out,
    )
}

fn binary_int(op: BinOp, dtype: DType, x: &[i64], y: &[i64]) -> Vec<i64> {
    let out = if op.is_comparison() {
        DType::Bool
    } else {
        dtype
    };
    map(
        &binary_map(op, dtype),
        vec![
            Tensor::from_ints(dtype, &[x.len()], x.to_vec()),
            Tensor::from_ints(dtype, &[y.len()], y.to_vec()),
        ],
        out,
    )
    .to_i64_vec()
}

/// Asserts that each result is within `max_ulps` of the f64 reference rounded to f32.
fn assert_close(op: UnOp, inputs: &[f32], reference: fn(f64) -> f64, max_ulps: u64) {
    for (x, got) in inputs.iter().zip(unary_f32(op, inputs)) {
        let want = reference(f64::from(*x)) as f32;
        if want.is_nan() {
            assert!(got.is_nan(), "{op:?}({x}) = {got}, expected NaN");
        } else {
            assert!(
                ulps(got, want) <= max_ulps,
                "{op:?}({x}) = {got}, expected {want} within {max_ulps} ulp"
            );
        }
    }
}

const SAMPLES: [f32; 12] = [
    0.0, -0.0, 1.0, -1.0, 0.5, -2.75, 3.3, 10.0, -15.5, 1e-3, 87.0, -100.0,
];

#[test]
fn float_unary_operators() {
    assert_close(UnOp::Neg, &SAMPLES, |x| -x, 0);
    assert_close(UnOp::Abs, &SAMPLES, f64::abs, 0);
    assert_close(UnOp::Floor, &SAMPLES, f64::floor, 0);
    assert_close(UnOp::Ceil, &SAMPLES, f64::ceil, 0);
    assert_close(UnOp::Recip, &SAMPLES, |x| 1.0 / x, 0);
    assert_close(UnOp::Sqrt, &SAMPLES, f64::sqrt, 0);
    assert_close(UnOp::Rsqrt, &SAMPLES, |x| 1.0 / x.sqrt(), 1);
    assert_close(UnOp::Exp, &SAMPLES, f64::exp, 4);
    assert_close(UnOp::Exp2, &SAMPLES, f64::exp2, 0);
    assert_close(UnOp::Log, &SAMPLES, f64::ln, 4);
    assert_close(UnOp::Sin, &SAMPLES, f64::sin, 4);
    assert_close(UnOp::Cos, &SAMPLES, f64::cos, 4);
    assert_close(UnOp::Tanh, &SAMPLES, f64::tanh, 4);
    assert_close(UnOp::Sigmoid, &SAMPLES, |x| 1.0 / (1.0 + (-x).exp()), 4);
    assert_close(UnOp::Erf, &SAMPLES, libm::erf, 4);
    // Special values.
    let specials = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    assert_eq!(unary_f32(UnOp::Exp, &specials)[..2], [f32::INFINITY, 0.0]);
    assert_eq!(unary_f32(UnOp::Sigmoid, &specials)[..2], [1.0, 0.0]);
    assert_eq!(
        unary_f32(UnOp::Rsqrt, &[0.0, f32::INFINITY]),
        [f32::INFINITY, 0.0]
    );
    assert!(unary_f32(UnOp::Sqrt, &[-1.0])[0].is_nan());
    assert!(unary_f32(UnOp::Tanh, &specials)[2].is_nan());
}

#[test]
fn integer_and_pred_unary_operators() {
    let run_int = |op: UnOp, dtype: DType, x: Vec<i64>| {
        map(
            &unary_map(op, dtype),
            vec![Tensor::from_ints(dtype, &[x.len()], x)],
            dtype,
        )
        .to_i64_vec()
    };
    let min32 = i64::from(i32::MIN);
    assert_eq!(
        run_int(UnOp::Neg, DType::I32, vec![5, -7, min32]),
        [-5, 7, min32]
    );
    assert_eq!(
        run_int(UnOp::Abs, DType::I32, vec![5, -7, min32]),
        [5, 7, min32]
    );
    assert_eq!(
        run_int(UnOp::Not, DType::I32, vec![0, -1, 12]),
        [-1, 0, -13]
    );
    assert_eq!(
        run_int(UnOp::Neg, DType::I64, vec![i64::MIN, 3]),
        [i64::MIN, -3]
    );
    assert_eq!(
        run_int(UnOp::Not, DType::I64, vec![1 << 40]),
        [!(1i64 << 40)]
    );
    // i8 computes in i32 and wraps on the store: -(-128) = 128 stores as -128.
    assert_eq!(
        run_int(UnOp::Neg, DType::I8, vec![-128, 127, 3]),
        [-128, -127, -3]
    );
    let not = map(
        &unary_map(UnOp::Not, DType::Bool),
        vec![Tensor::from_bool(&[2], vec![true, false])],
        DType::Bool,
    );
    assert_eq!(not.as_bool().unwrap(), [false, true]);
}

#[test]
fn float_binary_operators() {
    let x = [1.5f32, -7.25, 3.0, 0.1, f32::NAN, -0.0];
    let y = [0.5f32, 2.0, -3.0, 0.2, 1.0, 0.0];
    let check = |op: BinOp, f: fn(f32, f32) -> f32| {
        let got = binary_f32(op, &x, &y).to_f32_vec();
        for i in 0..x.len() {
            let want = f(x[i], y[i]);
            assert!(
                got[i].to_bits() == want.to_bits() || (got[i].is_nan() && want.is_nan()),
                "{op:?}({}, {}) = {}, expected {want}",
                x[i],
                y[i],
                got[i]
            );
        }
    };
    check(BinOp::Add, |a, b| a + b);
    check(BinOp::Sub, |a, b| a - b);
    check(BinOp::Mul, |a, b| a * b);
    check(BinOp::Div, |a, b| a / b);
    check(BinOp::Rem, |a, b| a % b);
    check(BinOp::Min, f32::min);
    check(BinOp::Max, f32::max);
    check(BinOp::Pow, |a, b| f64::from(a).powf(f64::from(b)) as f32);
    // Min and max ignore a NaN operand.
    assert_eq!(
        binary_f32(BinOp::Min, &[f32::NAN], &[2.0]).to_f32_vec(),
        [2.0]
    );
    assert_eq!(
        binary_f32(BinOp::Max, &[-1.0], &[f32::NAN]).to_f32_vec(),
        [-1.0]
    );
    // Comparisons are IEEE: NaN is unordered, `!=` is true for it; -0 == 0.
    let cmp = |op: BinOp| binary_f32(op, &x, &y).as_bool().unwrap().to_vec();
    assert_eq!(cmp(BinOp::Lt), [false, true, false, true, false, false]);
    assert_eq!(cmp(BinOp::Le), [false, true, false, true, false, true]);
    assert_eq!(cmp(BinOp::Gt), [true, false, true, false, false, false]);
    assert_eq!(cmp(BinOp::Ge), [true, false, true, false, false, true]);
    assert_eq!(cmp(BinOp::Eq), [false, false, false, false, false, true]);
    assert_eq!(cmp(BinOp::Ne), [true, true, true, true, true, false]);
}

#[test]
fn integer_binary_operators() {
    let max = i64::from(i32::MAX);
    let min = i64::from(i32::MIN);
    let i32_op = |op, x: &[i64], y: &[i64]| binary_int(op, DType::I32, x, y);
    assert_eq!(i32_op(BinOp::Add, &[max, 1], &[1, -2]), [min, -1]);
    assert_eq!(i32_op(BinOp::Sub, &[min], &[1]), [max]);
    assert_eq!(i32_op(BinOp::Mul, &[65536, -3], &[65536, 7]), [0, -21]);
    // Division and remainder truncate toward zero (C), unlike the graph IR's floor.
    assert_eq!(
        i32_op(BinOp::Div, &[7, -7, 7, min], &[2, 2, -2, -1]),
        [3, -3, -3, min]
    );
    assert_eq!(
        i32_op(BinOp::Rem, &[7, -7, 7, min], &[2, 2, -2, -1]),
        [1, -1, 1, 0]
    );
    assert_eq!(i32_op(BinOp::Min, &[3, -3], &[-4, 4]), [-4, -3]);
    assert_eq!(i32_op(BinOp::Max, &[3, -3], &[-4, 4]), [3, 4]);
    assert_eq!(i32_op(BinOp::And, &[0b1100], &[0b1010]), [0b1000]);
    assert_eq!(i32_op(BinOp::Or, &[0b1100], &[0b1010]), [0b1110]);
    assert_eq!(i32_op(BinOp::Xor, &[0b1100], &[0b1010]), [0b0110]);
    // Shifts: arithmetic right; amounts at or beyond the width (or negative, read as
    // unsigned) shift everything out.
    assert_eq!(
        i32_op(BinOp::Shl, &[1, 1, 3, 1, 5], &[4, 31, 31, 32, -1]),
        [16, min, min, 0, 0]
    );
    assert_eq!(
        i32_op(
            BinOp::Shr,
            &[-16, -16, 16, -1, -5, 5],
            &[2, 40, 40, 31, -3, 0]
        ),
        [-4, -1, 0, -1, -1, 5]
    );
    assert_eq!(i32_op(BinOp::Lt, &[-1, 2], &[0, 2]), [1, 0]);
    assert_eq!(i32_op(BinOp::Ge, &[-1, 2], &[0, 2]), [0, 1]);

    let i64_op = |op, x: &[i64], y: &[i64]| binary_int(op, DType::I64, x, y);
    assert_eq!(i64_op(BinOp::Add, &[i64::MAX], &[1]), [i64::MIN]);
    assert_eq!(i64_op(BinOp::Mul, &[1 << 40], &[1 << 20]), [1 << 60]);
    assert_eq!(i64_op(BinOp::Shl, &[1, 1], &[40, 64]), [1 << 40, 0]);
    assert_eq!(
        i64_op(BinOp::Shr, &[i64::MIN, i64::MIN], &[63, 64]),
        [-1, -1]
    );
    assert_eq!(i64_op(BinOp::Div, &[-(1 << 40)], &[3]), [-(1 << 40) / 3]);

    let pred_op = |op| {
        map(
            &binary_map(op, DType::Bool),
            vec![
                Tensor::from_bool(&[4], vec![false, false, true, true]),
                Tensor::from_bool(&[4], vec![false, true, false, true]),
            ],
            DType::Bool,
        )
        .as_bool()
        .unwrap()
        .to_vec()
    };
    assert_eq!(pred_op(BinOp::And), [false, false, false, true]);
    assert_eq!(pred_op(BinOp::Or), [false, true, true, true]);
    assert_eq!(pred_op(BinOp::Xor), [false, true, true, false]);
    assert_eq!(pred_op(BinOp::Eq), [true, false, false, true]);
    assert_eq!(pred_op(BinOp::Ne), [false, true, true, false]);
}

/// Runs `convert(from, to)` over `x` and returns the output tensor.
fn converted(from: Tensor, to: DType) -> Tensor {
    map(&convert(from.dtype, to), vec![from], to)
}

/// The raw bytes a conversion stores.
fn stored_bytes(to: DType, x: &[f32]) -> Vec<u8> {
    converted(floats(DType::F32, x), to).to_le_bytes()
}

#[test]
fn fp8_stores_round_to_nearest_even_and_saturate() {
    // E4M3: 1.0625 lies halfway between 1.0 and 1.125 → even (1.0, 0x38); 1.1875 → 1.25.
    // 448 is the largest finite value; beyond it and inf saturate; NaN stays NaN.
    assert_eq!(
        stored_bytes(
            DType::F8E4M3,
            &[
                1.0,
                1.0625,
                1.1875,
                448.0,
                464.0,
                1e6,
                f32::INFINITY,
                -500.0,
                -0.0,
                2f32.powi(-9)
            ]
        ),
        [0x38, 0x38, 0x3A, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0x80, 0x01]
    );
    assert_eq!(stored_bytes(DType::F8E4M3, &[f32::NAN])[0] & 0x7F, 0x7F);
    // E5M2: 1.125 is halfway between 1.0 and 1.25 → 1.0 (0x3C); 57344 is the max, inf saturates.
    assert_eq!(
        stored_bytes(
            DType::F8E5M2,
            &[
                1.0,
                1.125,
                1.375,
                57344.0,
                1e9,
                f32::NEG_INFINITY,
                2f32.powi(-16)
            ]
        ),
        [0x3C, 0x3C, 0x3E, 0x7B, 0x7B, 0xFB, 0x01]
    );
    // Loading decodes the bits: a round trip through fp8 gives the rounded values.
    let back = converted(
        Tensor::from_le_bytes(DType::F8E4M3, &[3], &[0x38, 0x7E, 0xBA]).unwrap(),
        DType::F32,
    );
    assert_eq!(back.to_f32_vec(), [1.0, 448.0, -1.25]);
}

#[test]
fn bf16_and_f16_stores_round_to_nearest_even() {
    let one_plus = |k: i32| 1.0 + 2f32.powi(-k);
    // bf16 keeps 7 fraction bits: 1 + 2^-8 is a tie → 1.0; 1 + 3·2^-8 is a tie → 1 + 2^-6
    // (even); just above a tie rounds up.
    assert_eq!(
        stored_bytes(
            DType::BF16,
            &[
                1.0,
                one_plus(8),
                1.0 + 3.0 * 2f32.powi(-8),
                one_plus(8) + 2f32.powi(-20)
            ]
        ),
        [0x80, 0x3F, 0x80, 0x3F, 0x82, 0x3F, 0x81, 0x3F]
    );
    assert_eq!(
        stored_bytes(DType::BF16, &[f32::MAX]),
        [0x80, 0x7F],
        "rounds to inf"
    );
    // f16 keeps 10 fraction bits; 65520 rounds to inf.
    assert_eq!(
        stored_bytes(DType::F16, &[1.0, one_plus(11), 65504.0, 65520.0]),
        [0x00, 0x3C, 0x00, 0x3C, 0xFF, 0x7B, 0x00, 0x7C]
    );
}

#[test]
fn casts_between_every_type() {
    // float → int truncates toward zero, saturates, NaN → 0; the i8 store wraps.
    let to_i32 = converted(
        floats(DType::F32, &[2.9, -2.9, 3e9, -3e9, f32::NAN]),
        DType::I32,
    );
    assert_eq!(
        to_i32.to_i64_vec(),
        [2, -2, i64::from(i32::MAX), i64::from(i32::MIN), 0]
    );
    let to_i8 = converted(floats(DType::F32, &[300.7, -1.5, 127.9]), DType::I8);
    assert_eq!(to_i8.to_i64_vec(), [44, -1, 127]);
    let to_i64 = converted(floats(DType::F32, &[2f32.powi(40), -0.5]), DType::I64);
    assert_eq!(to_i64.to_i64_vec(), [1 << 40, 0]);
    // int → float rounds to nearest even.
    let to_f32 = converted(
        Tensor::from_i32(&[3], vec![16_777_217, 16_777_219, -5]),
        DType::F32,
    );
    assert_eq!(to_f32.to_f32_vec(), [16_777_216.0, 16_777_220.0, -5.0]);
    // i64 → i32 wraps; i8 → i32 sign-extends.
    let wrapped = converted(
        Tensor::from_i64(&[2], vec![(1 << 32) + 7, -(1 << 31) - 1]),
        DType::I32,
    );
    assert_eq!(wrapped.to_i64_vec(), [7, i64::from(i32::MAX)]);
    let widened = converted(Tensor::from_ints(DType::I8, &[1], vec![-100]), DType::I64);
    assert_eq!(widened.to_i64_vec(), [-100]);
    // Anything → pred is `!= 0` (NaN included); pred → number is 0 or 1.
    let to_bool = converted(floats(DType::F32, &[0.0, -0.0, 0.5, f32::NAN]), DType::Bool);
    assert_eq!(to_bool.as_bool().unwrap(), [false, false, true, true]);
    let int_to_bool = converted(Tensor::from_i32(&[2], vec![0, -3]), DType::Bool);
    assert_eq!(int_to_bool.as_bool().unwrap(), [false, true]);
    let from_bool = converted(Tensor::from_bool(&[2], vec![true, false]), DType::BF16);
    assert_eq!(from_bool.to_f32_vec(), [1.0, 0.0]);
    let bool_to_int = converted(Tensor::from_bool(&[2], vec![true, false]), DType::I8);
    assert_eq!(bool_to_int.to_i64_vec(), [1, 0]);
}

#[test]
fn hardware_indices() {
    // out[block linear index * 64 + t] = encoding of every special register.
    let mut k = KernelBuilder::new("indices", 64);
    k.grid([SizeExpr::Const(2), SizeExpr::Const(3), SizeExpr::Const(2)]);
    let out = k.buffer("out", DType::I32, Access::Write);
    let block = k.var("block", Ty::I32);
    let kernel = k.finish(vec![
        Stmt::assign(
            block,
            (Expr::block_idx(2) * Expr::i32(3) + Expr::block_idx(1)) * Expr::i32(2)
                + Expr::block_idx(0),
        ),
        Stmt::store(
            out,
            Expr::var(block) * Expr::block_dim() + Expr::thread_idx(),
            Expr::var(block) * Expr::i32(1_000_000)
                + Expr::block_dim() * Expr::i32(10_000)
                + Expr::warp_id() * Expr::i32(100)
                + Expr::lane_id(),
        ),
    ]);
    let grid = launch_grid(&kernel, &|_| None).unwrap();
    let result = run(&kernel, grid, &[zeros(DType::I32, 12 * 64)], &[]).unwrap();
    let expected: Vec<i64> = (0..12 * 64)
        .map(|i: i64| (i / 64) * 1_000_000 + 640_000 + (i % 64 / 32) * 100 + i % 32)
        .collect();
    assert_eq!(result[0].to_i64_vec(), expected);
}

#[test]
fn shuffle_xor_reads_the_partner_lane_before_the_statement() {
    // x = lane + 100 * warp; x = shuffle_xor(x, mask) (in place); out[t] = x.
    for mask in [1, 5, 16, 31, 0] {
        let mut k = KernelBuilder::new("shuffle", 96);
        let out = k.buffer("out", DType::I32, Access::Write);
        let x = k.var("x", Ty::I32);
        let kernel = k.finish(vec![
            Stmt::assign(x, Expr::lane_id() + Expr::warp_id() * Expr::i32(100)),
            Stmt::ShuffleXor {
                dst: x,
                src: x,
                mask,
            },
            Stmt::store(out, Expr::thread_idx(), x),
        ]);
        let result = run(&kernel, [1, 1, 1], &[zeros(DType::I32, 96)], &[]).unwrap();
        let expected: Vec<i64> = (0..96)
            .map(|t: i64| ((t % 32) ^ i64::from(mask)) + 100 * (t / 32))
            .collect();
        assert_eq!(result[0].to_i64_vec(), expected, "mask {mask}");
    }
}

#[test]
fn statements_run_in_lock_step() {
    // data[t] = data[(t + 1) % 64]: every thread reads before any thread writes.
    let mut k = KernelBuilder::new("rotate", 64);
    let data = k.buffer("data", DType::I32, Access::ReadWrite);
    let kernel = k.finish(vec![Stmt::store(
        data,
        Expr::thread_idx(),
        Expr::load(data, (Expr::thread_idx() + Expr::i32(1)) % Expr::i32(64)),
    )]);
    let result = run(
        &kernel,
        [1, 1, 1],
        &[Tensor::from_i32(&[64], (0..64).collect())],
        &[],
    )
    .unwrap();
    let expected: Vec<i64> = (0..64).map(|t| (t + 1) % 64).collect();
    assert_eq!(result[0].to_i64_vec(), expected);
}

#[test]
fn vector_loads_and_stores_through_shared_memory() {
    // Each thread stores 4 consecutive values into shared memory as a vector, then loads
    // its neighbour's vector back after a barrier.
    let mut k = KernelBuilder::new("vectors", 32);
    let out = k.buffer("out", DType::F16, Access::Write);
    let tile = k.shared("tile", DType::F16, 128);
    let lanes: Vec<_> = (0..4).map(|j| k.var(format!("v{j}"), Ty::F32)).collect();
    let base = Expr::thread_idx() * Expr::i32(4);
    let kernel = k.finish(vec![
        Stmt::StoreVec {
            buf: tile,
            index: base.clone(),
            values: (0..4)
                .map(|j| (base.clone() + Expr::i32(j)).cast(Ty::F32) * Expr::f32(0.5))
                .collect(),
        },
        Stmt::Barrier,
        Stmt::LoadVec {
            dsts: lanes.clone(),
            buf: tile,
            index: ((Expr::thread_idx() + Expr::i32(1)) % Expr::i32(32)) * Expr::i32(4),
        },
        Stmt::StoreVec {
            buf: out,
            index: base,
            values: lanes.iter().map(|&v| Expr::var(v)).collect(),
        },
    ]);
    let result = run(&kernel, [1, 1, 1], &[zeros(DType::F16, 128)], &[]).unwrap();
    let expected: Vec<f32> = (0..128).map(|i| ((i + 4) % 128) as f32 * 0.5).collect();
    assert_eq!(result[0].to_f32_vec(), expected);
}

#[test]
fn divergent_loops_with_per_thread_steps_and_nesting() {
    // Thread t: for j in t % 5 .. 20 step t % 3 + 1 { if j % 2 == 0 { for k in 0..j { s += 1 } }
    //   else { s += 100 } }; out[t] = s, and the loop register ends at the first value ≥ 20.
    let mut k = KernelBuilder::new("divergent_loops", 32);
    let out = k.buffer("out", DType::I32, Access::Write);
    let last = k.buffer("last", DType::I32, Access::Write);
    let j = k.var("j", Ty::I32);
    let inner = k.var("inner", Ty::I32);
    let s = k.var("s", Ty::I32);
    let t = Expr::thread_idx;
    let kernel = k.finish(vec![
        Stmt::for_range(
            j,
            t() % Expr::i32(5),
            Expr::i32(20),
            t() % Expr::i32(3) + Expr::i32(1),
            vec![Stmt::if_else(
                (Expr::var(j) % Expr::i32(2)).equals(Expr::i32(0)),
                vec![Stmt::for_range(
                    inner,
                    Expr::i32(0),
                    j,
                    Expr::i32(1),
                    vec![Stmt::assign(s, Expr::var(s) + Expr::i32(1))],
                )],
                vec![Stmt::assign(s, Expr::var(s) + Expr::i32(100))],
            )],
        ),
        Stmt::store(out, t(), s),
        Stmt::store(last, t(), j),
    ]);
    let result = run(
        &kernel,
        [1, 1, 1],
        &[zeros(DType::I32, 32), zeros(DType::I32, 32)],
        &[],
    )
    .unwrap();
    let (mut sums, mut lasts) = (Vec::new(), Vec::new());
    for t in 0..32i64 {
        let (mut s, mut j, step) = (0, t % 5, t % 3 + 1);
        while j < 20 {
            s += if j % 2 == 0 { j } else { 100 };
            j += step;
        }
        sums.push(s);
        lasts.push(j);
    }
    assert_eq!(result[0].to_i64_vec(), sums);
    assert_eq!(result[1].to_i64_vec(), lasts);
}

#[test]
fn registers_read_before_any_write_are_zero() {
    let mut k = KernelBuilder::new("fresh", 32);
    let out = k.buffer("out", DType::F32, Access::Write);
    let never = k.var("never", Ty::F32);
    let kernel = k.finish(vec![Stmt::store(out, Expr::thread_idx(), never)]);
    let result = run(&kernel, [2, 1, 1], &[floats(DType::F32, &[7.0; 32])], &[]).unwrap();
    assert_eq!(result[0].to_f32_vec(), [0.0; 32]);
}

/// The error message of running `kernel` on one block with `buffers` and `scalars`.
fn run_error(kernel: &Kernel, buffers: &[Tensor], scalars: &[Const]) -> String {
    run(kernel, [1, 1, 1], buffers, scalars)
        .expect_err("the run should fail")
        .to_string()
}

#[test]
fn out_of_bounds_accesses_name_the_buffer_and_the_index() {
    let kernel = unary_map(UnOp::Neg, DType::F32);
    // n says 40 elements, but x holds 32.
    let message = run_error(
        &kernel,
        &[zeros(DType::F32, 32), zeros(DType::F32, 40)],
        &[Const::I64(40)],
    );
    assert_eq!(
        message,
        "kernel `unary_neg_f32`, statement body[1].then[0] `out[i] = -x[i]`: \
         block (0, 0, 0) thread 32: index 32 is out of bounds of buffer `x` (32 elements of f32)"
    );
    let message = run_error(
        &kernel,
        &[zeros(DType::F32, 40), zeros(DType::F32, 8)],
        &[Const::I64(40)],
    );
    assert!(
        message.contains("thread 8: index 8 is out of bounds of buffer `out` (8 elements of f32)"),
        "{message}"
    );
    // A negative index.
    let mut k = KernelBuilder::new("negative", 32);
    let x = k.buffer("x", DType::I8, Access::ReadWrite);
    let kernel = k.finish(vec![Stmt::store(
        x,
        Expr::thread_idx() - Expr::i32(1),
        Expr::i32(0),
    )]);
    let message = run_error(&kernel, &[zeros(DType::I8, 32)], &[]);
    assert!(
        message.contains("thread 0: index -1 is out of bounds of buffer `x`"),
        "{message}"
    );
    // Select evaluates both arms: the arm not chosen must be in bounds too.
    let mut k = KernelBuilder::new("select_both", 32);
    let x = k.buffer("x", DType::F32, Access::ReadWrite);
    let kernel = k.finish(vec![Stmt::store(
        x,
        Expr::thread_idx(),
        Expr::select(
            Expr::pred(true),
            Expr::f32(1.0),
            Expr::load(x, Expr::thread_idx() + Expr::i32(1)),
        ),
    )]);
    let message = run_error(&kernel, &[zeros(DType::F32, 32)], &[]);
    assert!(
        message.contains("thread 31: index 32 is out of bounds"),
        "{message}"
    );
}

#[test]
fn misaligned_vectors_and_unwritten_shared_memory_are_errors() {
    let mut k = KernelBuilder::new("misaligned", 32);
    let x = k.buffer("x", DType::BF16, Access::Read);
    let a = k.var("a", Ty::F32);
    let b = k.var("b", Ty::F32);
    let kernel = k.finish(vec![Stmt::LoadVec {
        dsts: vec![a, b],
        buf: x,
        index: Expr::thread_idx() * Expr::i32(3),
    }]);
    let message = run_error(&kernel, &[zeros(DType::BF16, 128)], &[]);
    assert!(
        message.contains("thread 1: vector access of 2 elements at index 3, not a multiple of 2"),
        "{message}"
    );

    let mut k = KernelBuilder::new("unwritten", 64);
    let out = k.buffer("out", DType::F32, Access::Write);
    let tile = k.shared("tile", DType::F32, 64);
    let kernel = k.finish(vec![
        Stmt::if_then(
            Expr::thread_idx().lt(Expr::i32(60)),
            vec![Stmt::store(tile, Expr::thread_idx(), Expr::f32(1.0))],
        ),
        Stmt::Barrier,
        Stmt::store(
            out,
            Expr::thread_idx(),
            Expr::load(tile, Expr::i32(63) - Expr::thread_idx()),
        ),
    ]);
    let message = run_error(&kernel, &[zeros(DType::F32, 64)], &[]);
    assert!(
        message.contains(
            "thread 0: reads element 63 of shared array `tile` before any thread of the block wrote it"
        ),
        "{message}"
    );
}

#[test]
fn undefined_arithmetic_and_runaway_loops_are_errors() {
    let message = map_error(BinOp::Div, &[5, 6], &[1, 0]);
    assert!(
        message.contains("thread 1: integer division of 6 by zero"),
        "{message}"
    );
    let message = map_error(BinOp::Rem, &[5], &[0]);
    assert!(
        message.contains("integer division of 5 by zero"),
        "{message}"
    );

    let mut k = KernelBuilder::new("loops", 32);
    let step = k.scalar("step", Ty::I32);
    let end = k.scalar("end", Ty::I32);
    let j = k.var("j", Ty::I32);
    let kernel = k.finish(vec![Stmt::for_range(j, Expr::i32(0), end, step, vec![])]);
    let message = run_error(&kernel, &[], &[Const::I32(0), Const::I32(10)]);
    assert!(
        message.contains("`for j = 0; j < $end; j += $step {`: block (0, 0, 0) thread 0: the loop's step is 0, not positive"),
        "{message}"
    );
    // 0, 2^30, then 2^31 does not fit.
    let message = run_error(&kernel, &[], &[Const::I32(1 << 30), Const::I32(i32::MAX)]);
    assert!(
        message.contains("the loop register overflows its type"),
        "{message}"
    );
    // Reaching the end exactly near the top of the range is fine: 0, 2^30 - 1, 2^31 - 2.
    let step = (1 << 30) - 1;
    run(
        &kernel,
        [1, 1, 1],
        &[],
        &[Const::I32(step), Const::I32(2 * step)],
    )
    .unwrap();
}

fn map_error(op: BinOp, x: &[i64], y: &[i64]) -> String {
    let kernel = binary_map(op, DType::I32);
    let n = x.len();
    run_error(
        &kernel,
        &[
            Tensor::from_ints(DType::I32, &[n], x.to_vec()),
            Tensor::from_ints(DType::I32, &[n], y.to_vec()),
            zeros(DType::I32, n),
        ],
        &[Const::I64(n as i64)],
    )
}

#[test]
fn launch_arguments_are_checked() {
    let kernel = unary_map(UnOp::Abs, DType::F32);
    let mut memory = [vec![0u8; 16], vec![0u8; 16]];
    let mut launch = |sizes: [usize; 2], scalars: &[Const]| {
        memory[0].resize(sizes[0], 0);
        memory[1].resize(sizes[1], 0);
        let [a, b] = &mut memory;
        run_kernel(&kernel, [1, 1, 1], &mut [a, b], scalars)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        launch([16, 16], &[Const::I32(4)]),
        "kernel `unary_abs_f32`, launch: scalar `n` is i64, but a i32 value was given"
    );
    assert_eq!(
        launch([16, 14], &[Const::I64(4)]),
        "kernel `unary_abs_f32`, launch: buffer `out` has 14 bytes, not a whole number of f32 elements"
    );
    assert!(launch([16, 16], &[]).contains("0 scalars given for 1 scalar parameters"));
    let mut lone = vec![0u8; 16];
    let message = run_kernel(&kernel, [1, 1, 1], &mut [&mut lone], &[Const::I64(4)])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("1 buffers given for 2 buffer parameters"),
        "{message}"
    );
    // A kernel that does not verify does not run.
    let mut bad = kernel.clone();
    bad.block_dim = 100;
    let message = run_kernel(&bad, [1, 1, 1], &mut [], &[])
        .unwrap_err()
        .to_string();
    assert!(message.contains("header: block_dim 100"), "{message}");
    // Grids come from the symbols.
    let message = launch_grid(&kernel, &|_| None).unwrap_err().to_string();
    assert!(
        message.contains("grid axis 0 `ceil_div(n, 128)` cannot be evaluated"),
        "{message}"
    );
}

#[test]
fn integer_fma_wraps() {
    let mut k = KernelBuilder::new("int_fma", 32);
    let out32 = k.buffer("out32", DType::I32, Access::Write);
    let out64 = k.buffer("out64", DType::I64, Access::Write);
    let t = Expr::thread_idx;
    let kernel = k.finish(vec![
        Stmt::store(
            out32,
            t(),
            Expr::fma(t(), Expr::i32(1 << 27), Expr::i32(-5)),
        ),
        Stmt::store(
            out64,
            t(),
            Expr::fma(t().cast(Ty::I64), Expr::i64(1 << 59), Expr::i64(7)),
        ),
    ]);
    let result = run(
        &kernel,
        [1, 1, 1],
        &[zeros(DType::I32, 32), zeros(DType::I64, 32)],
        &[],
    )
    .unwrap();
    let expected32: Vec<i64> = (0..32i32)
        .map(|t| i64::from(t.wrapping_mul(1 << 27).wrapping_add(-5)))
        .collect();
    let expected64: Vec<i64> = (0..32i64)
        .map(|t| t.wrapping_mul(1 << 59).wrapping_add(7))
        .collect();
    assert_eq!(result[0].to_i64_vec(), expected32);
    assert_eq!(result[1].to_i64_vec(), expected64);
}

/// Runs [`kiln_kir::examples::last_block_total`] over `blocks` blocks from a zeroed
/// counter: (partials, counter, arrivals, out).
fn last_block(reset: bool, blocks: usize) -> (Vec<f32>, i64, Vec<i64>, f32) {
    let kernel = kiln_kir::examples::last_block_total(reset);
    let x: Vec<f32> = (0..blocks * 32).map(|i| (i % 7) as f32 - 2.5).collect();
    let buffers = [
        floats(DType::F32, &x),
        zeros(DType::F32, blocks),
        zeros(DType::I32, 1),
        zeros(DType::I32, blocks),
        zeros(DType::F32, 1),
    ];
    let out = run(
        &kernel,
        [blocks as u64, 1, 1],
        &buffers,
        &[Const::I64(blocks as i64)],
    )
    .unwrap();
    (
        out[1].to_f32_vec(),
        out[2].to_i64_vec()[0],
        out[3].to_i64_vec(),
        out[4].to_f32_vec()[0],
    )
}

#[test]
fn atomic_adds_count_the_blocks_in_order_and_the_last_one_sees_every_store() {
    let (partials, counter, arrivals, out) = last_block(true, 5);
    // Blocks run one after another: block b sees b earlier adds.
    assert_eq!(arrivals, vec![0, 1, 2, 3, 4]);
    assert_eq!(counter, 0, "the last block resets the counter");
    let want: f32 = partials.iter().sum();
    assert_eq!(out, want);
    assert_ne!(out, 0.0);
    let (_, counter, _, _) = last_block(false, 5);
    assert_eq!(counter, 5, "without the reset the counter keeps the count");
}

#[test]
fn an_atomic_add_needs_an_i32_global_buffer() {
    for (dtype, access, expected) in [
        (DType::F32, Access::ReadWrite, "not i32"),
        (DType::I32, Access::Read, "writes buffer"),
    ] {
        let mut k = KernelBuilder::new("atomic", 32);
        let buf = k.buffer("x", dtype, access);
        let old = k.var("old", Ty::I32);
        let kernel = k.finish(vec![Stmt::AtomicAdd {
            dst: old,
            buf,
            index: Expr::i32(0),
            value: Expr::i32(1),
        }]);
        let err = kiln_kir::verify::verify_kernel(&kernel).unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
}
