//! The reference interpreter, op by op, against values computed independently in the test
//! (by hand or with naive loops in f64).

use kiln_ir::{interpret, parse_module, verify_module, DType, NoParams, ParamSource, Tensor};
use std::collections::BTreeMap;

/// Parses and verifies a one-function module, then runs it.
fn run_with(
    text: &str,
    inputs: &[Tensor],
    params: &dyn ParamSource,
) -> Result<Vec<Tensor>, String> {
    let module = parse_module(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    verify_module(&module).unwrap_or_else(|e| panic!("{e}\n{text}"));
    interpret(&module.functions[0], inputs, params).map_err(|e| e.message)
}

fn run(text: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    run_with(text, inputs, &NoParams)
}

/// Runs a function with one result.
#[track_caller]
fn run1(text: &str, inputs: &[Tensor]) -> Tensor {
    let mut results = run(text, inputs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(results.len(), 1);
    results.remove(0)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.as_f32().expect("float tensor").to_vec()
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.as_i64().expect("int tensor").to_vec()
}

/// A function applying one binary op to two inputs.
fn binary_fn(op: &str, a: &str, b: &str, out: &str) -> String {
    format!(
        "func @f(%0: {a}, %1: {b}) -> ({out}) {{\n  %2 = {op} %0, %1 : {out}\n  return %2\n}}\n"
    )
}

/// A function applying one op (with attributes) to one input.
fn unary_fn(op: &str, a: &str, out: &str) -> String {
    format!("func @f(%0: {a}) -> ({out}) {{\n  %1 = {op} %0 : {out}\n  return %1\n}}\n")
}

#[test]
fn add_broadcasts_rows() {
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 1.5).collect();
    let b = vec![10.0, 20.0, 30.0];
    let out = run1(
        &binary_fn("add", "f32[R, 3]", "f32[3]", "f32[R, 3]"),
        &[
            Tensor::from_f32(&[2, 3], a.clone()),
            Tensor::from_f32(&[3], b.clone()),
        ],
    );
    let mut expected = Vec::new();
    for r in 0..2 {
        for c in 0..3 {
            expected.push(a[r * 3 + c] + b[c]);
        }
    }
    assert_eq!(out.shape, vec![2, 3]);
    assert_eq!(f32s(&out), expected);
}

#[test]
fn broadcast_both_sides() {
    let out = run1(
        &binary_fn("mul", "f32[R, 1]", "f32[1, C]", "f32[R, C]"),
        &[
            Tensor::from_f32(&[3, 1], vec![1.0, 2.0, 3.0]),
            Tensor::from_f32(&[1, 2], vec![10.0, 100.0]),
        ],
    );
    assert_eq!(f32s(&out), vec![10.0, 100.0, 20.0, 200.0, 30.0, 300.0]);
}

#[test]
fn integer_division_floors_and_remainder_takes_the_divisor_sign() {
    let a = Tensor::from_i32(&[4], vec![-7, 7, -7, 7]);
    let b = Tensor::from_i32(&[4], vec![2, -2, -2, 2]);
    let div = run1(
        &binary_fn("div", "i32[4]", "i32[4]", "i32[4]"),
        &[a.clone(), b.clone()],
    );
    assert_eq!(ints(&div), vec![-4, -4, 3, 3]);
    let rem = run1(&binary_fn("rem", "i32[4]", "i32[4]", "i32[4]"), &[a, b]);
    assert_eq!(ints(&rem), vec![1, -1, -1, 1]);
    let zero = run(
        &binary_fn("div", "i32[1]", "i32[1]", "i32[1]"),
        &[
            Tensor::from_i32(&[1], vec![1]),
            Tensor::from_i32(&[1], vec![0]),
        ],
    );
    assert_eq!(zero.unwrap_err(), "@f: %2 = div: integer division by zero");
}

#[test]
fn float_remainder_is_floored() {
    let out = run1(
        &binary_fn("rem", "f32[4]", "f32[4]", "f32[4]"),
        &[
            Tensor::from_f32(&[4], vec![-7.5, 7.5, 7.5, -6.0]),
            Tensor::from_f32(&[4], vec![2.0, -2.0, 2.0, 3.0]),
        ],
    );
    assert_eq!(f32s(&out), vec![0.5, -0.5, 1.5, 0.0]);
}

#[test]
fn integers_wrap_at_their_width() {
    let out = run1(
        &binary_fn("add", "i8[2]", "i8[2]", "i8[2]"),
        &[
            Tensor::from_ints(DType::I8, &[2], vec![100, -100]),
            Tensor::from_ints(DType::I8, &[2], vec![100, -100]),
        ],
    );
    assert_eq!(ints(&out), vec![-56, 56]);
    let neg = run1(
        &unary_fn("neg", "i32[1]", "i32[1]"),
        &[Tensor::from_i32(&[1], vec![i32::MIN])],
    );
    assert_eq!(ints(&neg), vec![i64::from(i32::MIN)]);
}

#[test]
fn comparisons_and_nan() {
    let a = Tensor::from_f32(&[4], vec![1.0, 2.0, f32::NAN, 3.0]);
    let b = Tensor::from_f32(&[4], vec![2.0, 2.0, 1.0, f32::NAN]);
    let cases: [(&str, [bool; 4]); 6] = [
        ("eq", [false, true, false, false]),
        ("ne", [true, false, true, true]),
        ("lt", [true, false, false, false]),
        ("le", [true, true, false, false]),
        ("gt", [false, false, false, false]),
        ("ge", [false, true, false, false]),
    ];
    for (op, expected) in cases {
        let out = run1(
            &binary_fn(op, "f32[4]", "f32[4]", "bool[4]"),
            &[a.clone(), b.clone()],
        );
        assert_eq!(out.as_bool().unwrap(), expected, "{op}");
    }
    let max = run1(
        &binary_fn("max", "f32[4]", "f32[4]", "f32[4]"),
        &[a.clone(), b.clone()],
    );
    let max = f32s(&max);
    assert_eq!(&max[..2], &[2.0, 2.0]);
    assert!(max[2].is_nan() && max[3].is_nan());
    let min = run1(&binary_fn("min", "f32[4]", "f32[4]", "f32[4]"), &[a, b]);
    assert_eq!(f32s(&min)[..2], [1.0, 2.0]);
}

#[test]
fn logic() {
    let a = Tensor::from_bool(&[4], vec![false, false, true, true]);
    let b = Tensor::from_bool(&[4], vec![false, true, false, true]);
    let and = run1(
        &binary_fn("and", "bool[4]", "bool[4]", "bool[4]"),
        &[a.clone(), b.clone()],
    );
    assert_eq!(and.as_bool().unwrap(), [false, false, false, true]);
    let or = run1(
        &binary_fn("or", "bool[4]", "bool[4]", "bool[4]"),
        &[a.clone(), b.clone()],
    );
    assert_eq!(or.as_bool().unwrap(), [false, true, true, true]);
    let eq = run1(
        &binary_fn("eq", "bool[4]", "bool[4]", "bool[4]"),
        &[a.clone(), b],
    );
    assert_eq!(eq.as_bool().unwrap(), [true, false, false, true]);
    let not = run1(&unary_fn("not", "bool[4]", "bool[4]"), &[a]);
    assert_eq!(not.as_bool().unwrap(), [true, true, false, false]);
}

/// erf by its Maclaurin series, in f64 (converges well for |x| <= 3).
fn erf_series(x: f64) -> f64 {
    let mut sum = 0.0;
    let mut power = x; // x^(2n+1) / n!
    for n in 0..200 {
        let term = power / (2 * n + 1) as f64;
        sum += if n % 2 == 0 { term } else { -term };
        power *= x * x / (n + 1) as f64;
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

#[test]
fn unary_math_is_f32_accurate() {
    let xs: Vec<f32> = vec![0.25, 0.5, 1.0, 1.75, 2.5, 3.0];
    type Reference = fn(f64) -> f64;
    let cases: [(&str, Reference); 11] = [
        ("exp", f64::exp),
        ("log", f64::ln),
        ("sqrt", f64::sqrt),
        ("rsqrt", |x| 1.0 / x.sqrt()),
        ("sin", f64::sin),
        ("cos", f64::cos),
        ("tanh", f64::tanh),
        ("sigmoid", |x| 1.0 / (1.0 + (-x).exp())),
        ("erf", erf_series),
        ("recip", |x| 1.0 / x),
        ("neg", |x| -x),
    ];
    for (op, reference) in cases {
        let out = run1(
            &unary_fn(op, "f32[6]", "f32[6]"),
            &[Tensor::from_f32(&[6], xs.clone())],
        );
        for (got, &x) in f32s(&out).iter().zip(&xs) {
            let expected = reference(f64::from(x)) as f32;
            let ulps = (got.to_bits() as i64 - expected.to_bits() as i64).abs();
            assert!(ulps <= 1, "{op}({x}) = {got}, expected {expected}");
        }
    }
    let rounding = run1(
        &unary_fn("floor", "f32[4]", "f32[4]"),
        &[Tensor::from_f32(&[4], vec![-1.5, 1.5, -0.0, 2.0])],
    );
    assert_eq!(f32s(&rounding), vec![-2.0, 1.0, -0.0, 2.0]);
    let rounding = run1(
        &unary_fn("ceil", "f32[3]", "f32[3]"),
        &[Tensor::from_f32(&[3], vec![-1.5, 1.5, 2.0])],
    );
    assert_eq!(f32s(&rounding), vec![-1.0, 2.0, 2.0]);
    let abs = run1(
        &unary_fn("abs", "i32[2]", "i32[2]"),
        &[Tensor::from_i32(&[2], vec![-3, 4])],
    );
    assert_eq!(ints(&abs), vec![3, 4]);
}

#[test]
fn pow() {
    let out = run1(
        &binary_fn("pow", "f32[3]", "f32[3]", "f32[3]"),
        &[
            Tensor::from_f32(&[3], vec![2.0, 9.0, -8.0]),
            Tensor::from_f32(&[3], vec![10.0, 0.5, 3.0]),
        ],
    );
    assert_eq!(f32s(&out), vec![1024.0, 3.0, -512.0]);
}

#[test]
fn half_precision_results_round_to_nearest_even() {
    let one_plus = |k: i32| 1.0 + 2f32.powi(k);
    // f16 has 10 mantissa bits: 1 + 2^-11 is a tie between 1 and 1 + 2^-10 -> 1 (even);
    // 1 + 3*2^-11 ties between 1 + 2^-10 and 1 + 2^-9 -> 1 + 2^-9 (even).
    let a = Tensor::from_floats(DType::F16, &[2], vec![1.0, 1.0]);
    let b = Tensor::from_floats(DType::F16, &[2], vec![2f32.powi(-11), 3.0 * 2f32.powi(-11)]);
    let out = run1(&binary_fn("add", "f16[2]", "f16[2]", "f16[2]"), &[a, b]);
    assert_eq!(f32s(&out), vec![1.0, one_plus(-9)]);
    // bf16 has 7: 1 + 2^-8 ties to 1; 1 + 2^-8 + 2^-10 rounds up to 1 + 2^-7.
    let a = Tensor::from_floats(DType::BF16, &[2], vec![1.0, 1.0]);
    let b = Tensor::from_floats(
        DType::BF16,
        &[2],
        vec![2f32.powi(-8), 2f32.powi(-8) + 2f32.powi(-10)],
    );
    let out = run1(&binary_fn("add", "bf16[2]", "bf16[2]", "bf16[2]"), &[a, b]);
    assert_eq!(f32s(&out), vec![1.0, one_plus(-7)]);
    // f16 overflows to inf; f8 saturates.
    let big = Tensor::from_floats(DType::F16, &[1], vec![60000.0]);
    let out = run1(
        &binary_fn("add", "f16[1]", "f16[1]", "f16[1]"),
        &[big.clone(), big],
    );
    assert_eq!(f32s(&out), vec![f32::INFINITY]);
    let big = Tensor::from_floats(DType::F8E4M3, &[1], vec![448.0]);
    let out = run1(
        &binary_fn("add", "f8e4m3[1]", "f8e4m3[1]", "f8e4m3[1]"),
        &[big.clone(), big],
    );
    assert_eq!(f32s(&out), vec![448.0]);
}

#[test]
fn casts() {
    let x = Tensor::from_f32(&[7], vec![1.9, -1.9, 3e9, -3e9, f32::NAN, 0.0, 1000.0]);
    let to_i32 = run1(
        &unary_fn("cast {to = i32}", "f32[7]", "i32[7]"),
        std::slice::from_ref(&x),
    );
    assert_eq!(
        ints(&to_i32),
        vec![1, -1, i64::from(i32::MAX), i64::from(i32::MIN), 0, 0, 1000]
    );
    let to_i8 = run1(
        &unary_fn("cast {to = i8}", "f32[7]", "i8[7]"),
        std::slice::from_ref(&x),
    );
    assert_eq!(ints(&to_i8), vec![1, -1, 127, -128, 0, 0, 127]);
    let to_bool = run1(
        &unary_fn("cast {to = bool}", "f32[7]", "bool[7]"),
        std::slice::from_ref(&x),
    );
    assert_eq!(
        to_bool.as_bool().unwrap(),
        [true, true, true, true, true, false, true]
    );
    let to_e4m3 = run1(
        &unary_fn("cast {to = f8e4m3}", "f32[7]", "f8e4m3[7]"),
        std::slice::from_ref(&x),
    );
    let v = f32s(&to_e4m3);
    assert_eq!(v[0], 1.875); // 1.9 -> nearest of 1.75, 1.875, 2.0
    assert_eq!(v[2], 448.0);
    assert_eq!(v[3], -448.0);
    assert!(v[4].is_nan());
    assert_eq!(v[6], 448.0);
    let to_e5m2 = run1(&unary_fn("cast {to = f8e5m2}", "f32[7]", "f8e5m2[7]"), &[x]);
    let v = f32s(&to_e5m2);
    assert_eq!(v[0], 2.0); // 1.9 -> nearest of 1.75, 2.0
    assert_eq!(v[2], 57344.0);
    assert_eq!(v[6], 1024.0);

    let wrap = run1(
        &unary_fn("cast {to = i8}", "i32[3]", "i8[3]"),
        &[Tensor::from_i32(&[3], vec![300, -129, 5])],
    );
    assert_eq!(ints(&wrap), vec![44, 127, 5]);
    let from_bool = run1(
        &unary_fn("cast {to = f32}", "bool[2]", "f32[2]"),
        &[Tensor::from_bool(&[2], vec![true, false])],
    );
    assert_eq!(f32s(&from_bool), vec![1.0, 0.0]);
    // 2^24 + 2^16 + 1 is just above the midpoint between two bf16 neighbours (ulp 2^17):
    // a single correct rounding goes up; rounding to f32 first would land on the tie.
    let n = (1i64 << 24) + (1 << 16) + 1;
    let to_bf16 = run1(
        &unary_fn("cast {to = bf16}", "i64[1]", "bf16[1]"),
        &[Tensor::from_i64(&[1], vec![n])],
    );
    assert_eq!(
        f32s(&to_bf16),
        vec![(1u32 << 24) as f32 + (1u32 << 17) as f32]
    );
}

#[test]
fn select_broadcasts() {
    let text = "func @f(%0: bool[2, 1], %1: f32[2, 3], %2: f32[]) -> (f32[2, 3]) {
  %3 = select %0, %1, %2 : f32[2, 3]
  return %3
}
";
    let out = run1(
        text,
        &[
            Tensor::from_bool(&[2, 1], vec![true, false]),
            Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            Tensor::scalar_f32(-1.0),
        ],
    );
    assert_eq!(f32s(&out), vec![1.0, 2.0, 3.0, -1.0, -1.0, -1.0]);
}

/// A [2, 3, 4] tensor with element (i, j, k) = 100 i + 10 j + k.
fn cube() -> Tensor {
    let mut data = Vec::new();
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..4 {
                data.push((100 * i + 10 * j + k) as f32);
            }
        }
    }
    Tensor::from_f32(&[2, 3, 4], data)
}

#[test]
fn reductions() {
    let x = cube();
    let v = f32s(&x);
    let at = |i: usize, j: usize, k: usize| v[(i * 3 + j) * 4 + k];
    let sum = run1(
        &unary_fn(
            "reduce_sum {axes = [0, 2], keep = true}",
            "f32[2, 3, 4]",
            "f32[1, 3, 1]",
        ),
        std::slice::from_ref(&x),
    );
    let expected: Vec<f32> = (0..3)
        .map(|j| {
            (0..2)
                .flat_map(|i| (0..4).map(move |k| (i, k)))
                .map(|(i, k)| at(i, j, k))
                .sum()
        })
        .collect();
    assert_eq!(sum.shape, vec![1, 3, 1]);
    assert_eq!(f32s(&sum), expected);
    let mean = run1(
        &unary_fn(
            "reduce_mean {axes = [2], keep = false}",
            "f32[2, 3, 4]",
            "f32[2, 3]",
        ),
        std::slice::from_ref(&x),
    );
    let expected: Vec<f32> = (0..2)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| (0..4).map(|k| at(i, j, k)).sum::<f32>() / 4.0)
        .collect();
    assert_eq!(f32s(&mean), expected);
    let max = run1(
        &unary_fn(
            "reduce_max {axes = [0, 1], keep = false}",
            "f32[2, 3, 4]",
            "f32[4]",
        ),
        std::slice::from_ref(&x),
    );
    assert_eq!(f32s(&max), vec![120.0, 121.0, 122.0, 123.0]);
    let min = run1(
        &unary_fn(
            "reduce_min {axes = [1], keep = false}",
            "f32[2, 3, 4]",
            "f32[2, 4]",
        ),
        &[x],
    );
    assert_eq!(
        f32s(&min),
        vec![0.0, 1.0, 2.0, 3.0, 100.0, 101.0, 102.0, 103.0]
    );
    let prod = run1(
        &unary_fn("reduce_prod {axes = [0], keep = false}", "i32[3]", "i32[]"),
        &[Tensor::from_i32(&[3], vec![2, -3, 7])],
    );
    assert_eq!(ints(&prod), vec![-42]);
}

#[test]
fn sums_accumulate_in_f64() {
    // In f32, 1e8 + 1 == 1e8, so a f32 accumulator would give 0.
    let out = run1(
        &unary_fn("reduce_sum {axes = [0], keep = false}", "f32[3]", "f32[]"),
        &[Tensor::from_f32(&[3], vec![1e8, 1.0, -1e8])],
    );
    assert_eq!(f32s(&out), vec![1.0]);
}

#[test]
fn empty_and_nan_reductions() {
    let empty = Tensor::from_f32(&[2, 0], vec![]);
    let sum = run1(
        &unary_fn(
            "reduce_sum {axes = [1], keep = false}",
            "f32[2, 0]",
            "f32[2]",
        ),
        std::slice::from_ref(&empty),
    );
    assert_eq!(f32s(&sum), vec![0.0, 0.0]);
    let max = run1(
        &unary_fn(
            "reduce_max {axes = [1], keep = false}",
            "f32[2, 0]",
            "f32[2]",
        ),
        &[empty],
    );
    assert_eq!(f32s(&max), vec![f32::NEG_INFINITY; 2]);
    let with_nan = Tensor::from_f32(&[3], vec![1.0, f32::NAN, 2.0]);
    let max = run1(
        &unary_fn("reduce_max {axes = [0], keep = false}", "f32[3]", "f32[]"),
        &[with_nan],
    );
    assert!(f32s(&max)[0].is_nan());
}

#[test]
fn arg_reductions() {
    let x = Tensor::from_f32(
        &[2, 4],
        vec![3.0, 7.0, 7.0, 1.0, 2.0, f32::NAN, 9.0, f32::NAN],
    );
    let argmax = run1(
        &unary_fn("argmax {axis = 1, keep = false}", "f32[2, 4]", "i64[2]"),
        std::slice::from_ref(&x),
    );
    assert_eq!(ints(&argmax), vec![1, 1]);
    let argmin = run1(
        &unary_fn("argmin {axis = 1, keep = true}", "f32[2, 4]", "i64[2, 1]"),
        std::slice::from_ref(&x),
    );
    assert_eq!(argmin.shape, vec![2, 1]);
    assert_eq!(ints(&argmin), vec![3, 1]);
    let down = run1(
        &unary_fn("argmax {axis = 0, keep = false}", "f32[2, 4]", "i64[4]"),
        &[x],
    );
    assert_eq!(ints(&down), vec![0, 1, 1, 1]);
    let ints_in = Tensor::from_i32(&[5], vec![4, -2, 9, 9, -2]);
    let argmin = run1(
        &unary_fn("argmin {axis = 0, keep = false}", "i32[5]", "i64[]"),
        std::slice::from_ref(&ints_in),
    );
    assert_eq!(ints(&argmin), vec![1]);
    let argmax = run1(
        &unary_fn("argmax {axis = 0, keep = false}", "i32[5]", "i64[]"),
        &[ints_in],
    );
    assert_eq!(ints(&argmax), vec![2]);
}

#[test]
fn batched_matmul_with_broadcast() {
    // a: [2, 1, 3, 4], b: [5, 4, 2] -> [2, 5, 3, 2]
    let a_data: Vec<f32> = (0..24).map(|i| (i as f32 - 7.0) * 0.25).collect();
    let b_data: Vec<f32> = (0..40).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
    let text = binary_fn(
        "matmul",
        "f32[2, 1, 3, 4]",
        "f32[5, 4, 2]",
        "f32[2, 5, 3, 2]",
    );
    let out = run1(
        &text,
        &[
            Tensor::from_f32(&[2, 1, 3, 4], a_data.clone()),
            Tensor::from_f32(&[5, 4, 2], b_data.clone()),
        ],
    );
    let mut expected = Vec::new();
    for g in 0..2 {
        for h in 0..5 {
            for i in 0..3 {
                for j in 0..2 {
                    let mut acc = 0.0f64;
                    for p in 0..4 {
                        acc += f64::from(a_data[g * 12 + i * 4 + p])
                            * f64::from(b_data[h * 8 + p * 2 + j]);
                    }
                    expected.push(acc as f32);
                }
            }
        }
    }
    assert_eq!(out.shape, vec![2, 5, 3, 2]);
    assert_eq!(f32s(&out), expected);
}

#[test]
fn integer_matmul() {
    let out = run1(
        &binary_fn("matmul", "i32[2, 2]", "i32[2, 2]", "i32[2, 2]"),
        &[
            Tensor::from_i32(&[2, 2], vec![1, 2, 3, 4]),
            Tensor::from_i32(&[2, 2], vec![5, 6, 7, 8]),
        ],
    );
    assert_eq!(ints(&out), vec![19, 22, 43, 50]);
}

#[test]
fn data_movement() {
    let x = cube();
    let v = f32s(&x);
    let at = |i: usize, j: usize, k: usize| v[(i * 3 + j) * 4 + k];

    let reshaped = run1(
        &unary_fn("reshape {shape = [6, 4]}", "f32[2, 3, 4]", "f32[6, 4]"),
        std::slice::from_ref(&x),
    );
    assert_eq!(
        (reshaped.shape.clone(), f32s(&reshaped)),
        (vec![6, 4], v.clone())
    );

    let permuted = run1(
        &unary_fn("permute {perm = [2, 0, 1]}", "f32[2, 3, 4]", "f32[4, 2, 3]"),
        std::slice::from_ref(&x),
    );
    let mut expected = Vec::new();
    for k in 0..4 {
        for i in 0..2 {
            for j in 0..3 {
                expected.push(at(i, j, k));
            }
        }
    }
    assert_eq!(f32s(&permuted), expected);

    let sliced = run1(
        &unary_fn(
            "slice {axis = 2, start = 1, end = 4, step = 2}",
            "f32[2, 3, 4]",
            "f32[2, 3, 2]",
        ),
        std::slice::from_ref(&x),
    );
    let mut expected = Vec::new();
    for i in 0..2 {
        for j in 0..3 {
            for k in [1, 3] {
                expected.push(at(i, j, k));
            }
        }
    }
    assert_eq!(f32s(&sliced), expected);

    let broadcast = run1(
        &unary_fn("broadcast_to {shape = [2, 2, 3]}", "f32[3]", "f32[2, 2, 3]"),
        &[Tensor::from_f32(&[3], vec![1.0, 2.0, 3.0])],
    );
    assert_eq!(f32s(&broadcast), [1.0, 2.0, 3.0].repeat(4));

    let text = "func @f(%0: f32[2, 1], %1: f32[2, 2]) -> (f32[2, 4]) {
  %2 = concat {axis = 1} %0, %1, %0 : f32[2, 4]
  return %2
}
";
    let joined = run1(
        text,
        &[
            Tensor::from_f32(&[2, 1], vec![1.0, 2.0]),
            Tensor::from_f32(&[2, 2], vec![10.0, 11.0, 20.0, 21.0]),
        ],
    );
    assert_eq!(
        f32s(&joined),
        vec![1.0, 10.0, 11.0, 1.0, 2.0, 20.0, 21.0, 2.0]
    );
}

#[test]
fn slice_of_a_symbolic_dim_is_checked_at_run_time() {
    let text = unary_fn(
        "slice {axis = 0, start = 1, end = 3, step = 1}",
        "f32[S]",
        "f32[2]",
    );
    let out = run1(&text, &[Tensor::from_f32(&[4], vec![0.0, 1.0, 2.0, 3.0])]);
    assert_eq!(f32s(&out), vec![1.0, 2.0]);
    let err = run(&text, &[Tensor::from_f32(&[2], vec![0.0, 1.0])]).unwrap_err();
    assert_eq!(
        err,
        "@f: %1 = slice: index 2 of axis 0 is out of range (size 2)"
    );
}

#[test]
fn gather_takes_along_an_axis() {
    let text = "func @f(%0: f32[2, 3, 4], %1: i32[2, 2]) -> (f32[2, 2, 2, 4]) {
  %2 = gather {axis = 1} %0, %1 : f32[2, 2, 2, 4]
  return %2
}
";
    let x = cube();
    let v = f32s(&x);
    let idx = [2usize, 0, 1, 1];
    let out = run1(
        text,
        &[
            x,
            Tensor::from_i32(&[2, 2], idx.iter().map(|&i| i as i32).collect()),
        ],
    );
    let mut expected = Vec::new();
    for i in 0..2 {
        for &j in &idx {
            for k in 0..4 {
                expected.push(v[(i * 3 + j) * 4 + k]);
            }
        }
    }
    assert_eq!(f32s(&out), expected);

    let embed = "func @f(%0: f32[3, 2], %1: i64[T]) -> (f32[T, 2]) {
  %2 = gather {axis = 0} %0, %1 : f32[T, 2]
  return %2
}
";
    let table = Tensor::from_f32(&[3, 2], vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    let err = run(embed, &[table, Tensor::from_i64(&[2], vec![1, 3])]).unwrap_err();
    assert_eq!(
        err,
        "@f: %2 = gather: index 3 out of range for axis 0 of size 3"
    );
}

#[test]
fn sources_bind_symbols_from_inputs() {
    let text = "func @f(%0: f32[S, 2]) -> (f32[S, 2], i32[S], f16[]) {
  %1 = full {value = 0.5, dtype = f32, shape = [S, 2]} : f32[S, 2]
  %2 = arange {len = S, dtype = i32} : i32[S]
  %3 = full {value = 0.1, dtype = f16, shape = []} : f16[]
  return %1, %2, %3
}
";
    let out = run(text, &[Tensor::zeros(DType::F32, &[3, 2])]).unwrap();
    assert_eq!(f32s(&out[0]), vec![0.5; 6]);
    assert_eq!(ints(&out[1]), vec![0, 1, 2]);
    // 0.1 in f16 is 0x2E66 = 1638 * 2^-14.
    assert_eq!(f32s(&out[2]), vec![1638.0 / 16384.0]);
}

#[test]
fn loops_carry_state() {
    // acc = 0; for i in 0..n { acc = acc + f32(i) * x }; also counts iterations.
    let text = r#"func @f(%0 "n": i64[], %1 "x": f32[2]) -> (f32[2], i32[]) {
  %2 = full {value = 0.0, dtype = f32, shape = [2]} : f32[2]
  %3 = full {value = 0.0, dtype = i32, shape = []} : i32[]
  %4, %5 = loop %0, %2, %3 : f32[2], i32[] {
  ^(%6: i64[], %7: f32[2], %8: i32[]):
    %9 = cast {to = f32} %6 : f32[]
    %10 = mul %9, %1 : f32[2]
    %11 = add %7, %10 : f32[2]
    %12 = full {value = 1.0, dtype = i32, shape = []} : i32[]
    %13 = add %8, %12 : i32[]
    yield %11, %13
  }
  return %4, %5
}
"#;
    let x = Tensor::from_f32(&[2], vec![1.0, -2.0]);
    let out = run(text, &[Tensor::scalar_int(DType::I64, 5), x.clone()]).unwrap();
    assert_eq!(f32s(&out[0]), vec![10.0, -20.0]);
    assert_eq!(ints(&out[1]), vec![5]);
    let out = run(text, &[Tensor::scalar_int(DType::I64, 0), x.clone()]).unwrap();
    assert_eq!(f32s(&out[0]), vec![0.0, 0.0]);
    let err = run(text, &[Tensor::scalar_int(DType::I64, -1), x]).unwrap_err();
    assert_eq!(err, "@f: %4, %5 = loop: negative count -1");
}

#[test]
fn nested_loops() {
    // x doubled 3 times in an inner loop, 4 times over: x * 2^12.
    let text = "func @f(%0: i32[], %1: f32[2]) -> (f32[2]) {
  %2 = full {value = 3.0, dtype = i64, shape = []} : i64[]
  %3 = loop %0, %1 : f32[2] {
  ^(%4: i64[], %5: f32[2]):
    %6 = loop %2, %5 : f32[2] {
    ^(%7: i64[], %8: f32[2]):
      %9 = add %8, %8 : f32[2]
      yield %9
    }
    yield %6
  }
  return %3
}
";
    let out = run1(
        text,
        &[
            Tensor::scalar_int(DType::I32, 4),
            Tensor::from_f32(&[2], vec![1.0, 0.5]),
        ],
    );
    assert_eq!(f32s(&out), vec![4096.0, 2048.0]);
}

#[test]
fn params_come_from_the_source() {
    let text = r#"func @f(%0: i32[T]) -> (f32[T, D]) {
  %1 = param {name = "embed", ty = f32[V, D]} : f32[V, D]
  %2 = gather {axis = 0} %1, %0 : f32[T, D]
  return %2
}
"#;
    let table = Tensor::from_f32(&[3, 2], vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    let params = BTreeMap::from([("embed".to_string(), table)]);
    let out = run_with(text, &[Tensor::from_i32(&[3], vec![2, 0, 2])], &params).unwrap();
    assert_eq!(out[0].shape, vec![3, 2]);
    assert_eq!(f32s(&out[0]), vec![2.0, 2.5, 0.0, 0.5, 2.0, 2.5]);

    let missing = run_with(text, &[Tensor::from_i32(&[1], vec![0])], &BTreeMap::new());
    assert_eq!(
        missing.unwrap_err(),
        "@f: %1 = param: param \"embed\" not found"
    );

    let fixed = r#"func @f() -> (f32[4, 2]) {
  %0 = param {name = "w", ty = f32[4, 2]} : f32[4, 2]
  return %0
}
"#;
    let wrong = BTreeMap::from([("w".to_string(), Tensor::zeros(DType::F32, &[4, 3]))]);
    assert_eq!(
        run_with(fixed, &[], &wrong).unwrap_err(),
        "@f: %0 = param: param \"w\": expected f32[4, 2], found f32[4, 3]"
    );
    let wrong = BTreeMap::from([("w".to_string(), Tensor::zeros(DType::F16, &[4, 2]))]);
    assert_eq!(
        run_with(fixed, &[], &wrong).unwrap_err(),
        "@f: %0 = param: param \"w\": expected f32[4, 2], found f16[4, 2]"
    );
}

#[test]
fn inputs_are_checked_and_symbols_bound_once() {
    let text = binary_fn("add", "f32[S]", "f32[S]", "f32[S]");
    let err = run(
        &text,
        &[
            Tensor::from_f32(&[2], vec![0.0; 2]),
            Tensor::from_f32(&[3], vec![0.0; 3]),
        ],
    )
    .unwrap_err();
    assert_eq!(err, "input 1 of @f: symbol S is 2 but f32[3] has it as 3");
    let err = run(&text, &[Tensor::from_f32(&[2], vec![0.0; 2])]).unwrap_err();
    assert_eq!(err, "@f takes 2 inputs, got 1");
    let err = run(
        &text,
        &[
            Tensor::from_f32(&[2], vec![0.0; 2]),
            Tensor::from_i32(&[2], vec![0; 2]),
        ],
    )
    .unwrap_err();
    assert_eq!(err, "input 1 of @f: expected f32[S], found i32[2]");
}

#[test]
fn rms_norm_end_to_end() {
    // rms_norm(x, w) = x * rsqrt(mean(x * x, -1) + eps) * w
    let text = "func @rms_norm(%0: f32[T, 4], %1: f32[4]) -> (f32[T, 4]) {
  %2 = mul %0, %0 : f32[T, 4]
  %3 = reduce_mean {axes = [1], keep = true} %2 : f32[T, 1]
  %4 = full {value = 1e-5, dtype = f32, shape = []} : f32[]
  %5 = add %3, %4 : f32[T, 1]
  %6 = rsqrt %5 : f32[T, 1]
  %7 = mul %0, %6 : f32[T, 4]
  %8 = mul %7, %1 : f32[T, 4]
  return %8
}
";
    let x: Vec<f32> = vec![1.0, -2.0, 3.0, 0.5, 0.0, 0.25, -0.75, 4.0];
    let w: Vec<f32> = vec![1.0, 0.5, 2.0, -1.0];
    let out = run1(
        text,
        &[
            Tensor::from_f32(&[2, 4], x.clone()),
            Tensor::from_f32(&[4], w.clone()),
        ],
    );
    for t in 0..2 {
        let row = &x[t * 4..t * 4 + 4];
        let mean = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            / 4.0;
        let inv = 1.0 / (mean + 1e-5).sqrt();
        for d in 0..4 {
            let expected = f64::from(row[d]) * inv * f64::from(w[d]);
            let got = f64::from(f32s(&out)[t * 4 + d]);
            assert!(
                (got - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                "{got} vs {expected}"
            );
        }
    }
}

#[test]
fn tensor_bytes_round_trip() {
    for dtype in DType::ALL {
        let t = Tensor::full(dtype, &[3], 1.5).cast(dtype);
        let back = Tensor::from_le_bytes(dtype, &[3], &t.to_le_bytes()).unwrap();
        assert_eq!(back, t, "{dtype}");
    }
    let t = Tensor::from_floats(DType::BF16, &[2], vec![1.0, -2.0]);
    assert_eq!(t.to_le_bytes(), vec![0x80, 0x3F, 0x00, 0xC0]);
}

/// numpy's `np.sort(x, kind="stable")` of one line: numbers ascending, equal values
/// (-0.0 and +0.0 included) in input order, NaN last.
fn numpy_stable_sort(line: &[f32]) -> Vec<f32> {
    let mut numbers: Vec<f32> = line.iter().copied().filter(|x| !x.is_nan()).collect();
    // Insertion sort, stable by construction (written out rather than trusting a library
    // comparator to treat -0.0 and +0.0 as equal).
    for i in 1..numbers.len() {
        let mut j = i;
        while j > 0 && numbers[j - 1] > numbers[j] {
            numbers.swap(j - 1, j);
            j -= 1;
        }
    }
    numbers.extend(line.iter().filter(|x| x.is_nan()));
    numbers
}

#[test]
fn sort_orders_lines_like_numpy() {
    let nan = f32::NAN;
    let rows: Vec<Vec<f32>> = vec![
        vec![3.0, -1.0, 2.0, -1.0, 0.5, 7.0],
        vec![nan, 1.0, -nan, -5.0, f32::INFINITY, f32::NEG_INFINITY],
        vec![0.0, -0.0, 1.0, -0.0, 0.0, -1.0],
        vec![2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
    ];
    let x: Vec<f32> = rows.concat();
    let out = run1(
        &unary_fn("sort {axis = 1}", "f32[R, 6]", "f32[R, 6]"),
        &[Tensor::from_f32(&[4, 6], x)],
    );
    let got = f32s(&out);
    for (r, row) in rows.iter().enumerate() {
        let want = numpy_stable_sort(row);
        let line = &got[r * 6..(r + 1) * 6];
        // Bit for bit: the sign of each zero is where numpy's stable sort puts it.
        let bits = |v: &[f32]| {
            v.iter()
                .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(line), bits(&want), "row {r}: {line:?} vs {want:?}");
    }
    // The zeros row: [-1, 0, -0, -0, 0, 1] (input order among the equal zeros).
    assert_eq!(
        got[12..18].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        [-1.0f32, 0.0, -0.0, -0.0, 0.0, 1.0].map(f32::to_bits)
    );
    assert!(got[10].is_nan() && got[11].is_nan() && got[9] == f32::INFINITY);
}

#[test]
fn sort_along_a_leading_axis_and_integers() {
    // Axis 0 of a [3, 2]: each column sorted.
    let out = run1(
        &unary_fn("sort {axis = 0}", "f32[3, 2]", "f32[3, 2]"),
        &[Tensor::from_f32(
            &[3, 2],
            vec![5.0, -1.0, 1.0, 4.0, 3.0, 0.0],
        )],
    );
    assert_eq!(f32s(&out), vec![1.0, -1.0, 3.0, 0.0, 5.0, 4.0]);
    let out = run1(
        &unary_fn("sort {axis = 0}", "i64[5]", "i64[5]"),
        &[Tensor::from_ints(
            DType::I64,
            &[5],
            vec![4, -9, 4, 0, i64::MAX],
        )],
    );
    assert_eq!(ints(&out), vec![-9, 0, 4, 4, i64::MAX]);
}
