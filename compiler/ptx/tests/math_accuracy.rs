//! The accuracy of the math routines the PTX emitter inlines, measured without a GPU: each
//! routine is evaluated in Rust with the GPU's exact semantics (`Routine::eval`, the same
//! instructions the emitter prints) and compared with an f64 reference over dense samples
//! of its domain and the known hard cases.
//!
//! The bounds asserted here are the ones documented in `kiln_ptx::numeric`; the kernel
//! IR's contract is 4 ulp. Run with `--nocapture` to see the measured table, and with
//! `KILN_MATH_samples()=4000000` (in `--release`) for the dense sweep behind the documented
//! numbers. (On an H100 the emitted PTX reproduced these evaluations bit for bit:
//! `tests/gpu_check.rs`.)

use kiln_ptx::numeric::{MathFunction, Routine, Scalar};

/// The size of one ulp at the magnitude of `exact` (subnormal ulps below 2^-126).
fn ulp_of(exact: f64) -> f64 {
    let magnitude = exact.abs();
    let exponent = if magnitude == 0.0 {
        -126
    } else {
        (magnitude.log2().floor() as i32).clamp(-126, 127)
    };
    2f64.powi(exponent - 23)
}

/// The error of `got` in ulps of the exact result; infinite when the classes differ.
fn ulp_error(got: f32, exact: f64) -> f64 {
    let rounded = exact as f32;
    if exact.is_nan() || got.is_nan() {
        return if exact.is_nan() && got.is_nan() {
            0.0
        } else {
            f64::INFINITY
        };
    }
    if rounded.is_infinite() || got.is_infinite() {
        return if got == rounded { 0.0 } else { f64::INFINITY };
    }
    (f64::from(got) - exact).abs() / ulp_of(exact)
}

/// Runs a one- or two-input routine many times without rebuilding it.
struct Evaluator {
    routine: Routine,
}

impl Evaluator {
    fn new(function: MathFunction) -> Evaluator {
        Evaluator {
            routine: function.routine(),
        }
    }

    fn eval(&self, x: f32) -> f32 {
        match self.routine.eval(&[Scalar::F32(x)])[0] {
            Scalar::F32(value) => value,
            other => panic!("{other:?}"),
        }
    }

    fn eval2(&self, x: f32, y: f32) -> f32 {
        match self.routine.eval(&[Scalar::F32(x), Scalar::F32(y)])[0] {
            Scalar::F32(value) => value,
            other => panic!("{other:?}"),
        }
    }
}

/// The worst error seen and where.
#[derive(Debug, Default)]
struct Worst {
    ulps: f64,
    at: (f32, f32),
    samples: u64,
}

impl Worst {
    fn record(&mut self, ulps: f64, x: f32, y: f32) {
        self.samples += 1;
        if ulps > self.ulps || ulps.is_nan() {
            self.ulps = ulps;
            self.at = (x, y);
        }
    }

    fn check(&self, name: &str, bound: f64) {
        println!(
            "{name:>8}: worst {:.3} ulp at {:?} over {} samples",
            self.ulps, self.at, self.samples
        );
        assert!(
            self.ulps <= bound,
            "{name}: {} ulp at {:?} exceeds the bound {bound}",
            self.ulps,
            self.at
        );
    }
}

/// About `count` f32 values evenly spaced in bit patterns from `lo` to `hi` (both
/// positive), with their negations too when `both_signs`.
fn sweep(lo: f32, hi: f32, count: u32, both_signs: bool) -> impl Iterator<Item = f32> {
    let (a, b) = (lo.to_bits(), hi.to_bits());
    // An odd stride, so that the samples do not share low bits.
    let stride = ((b - a) / count.max(1)).max(1) | 1;
    (a..=b).step_by(stride as usize).flat_map(move |bits| {
        let x = f32::from_bits(bits);
        let mirrored = if both_signs { Some(-x) } else { None };
        std::iter::once(x).chain(mirrored)
    })
}

/// A deterministic pseudo-random f32 in [lo, hi).
struct Lcg(u64);

impl Lcg {
    fn next_unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f32 {
        (lo + (hi - lo) * self.next_unit()) as f32
    }
}

fn measure(
    function: MathFunction,
    inputs: impl Iterator<Item = f32>,
    exact: fn(f64) -> f64,
) -> Worst {
    let evaluator = Evaluator::new(function);
    let mut worst = Worst::default();
    for x in inputs {
        let got = evaluator.eval(x);
        worst.record(ulp_error(got, exact(f64::from(x))), x, 0.0);
    }
    worst
}

/// Samples per swept range: by default enough to find a routine's worst cases in seconds
/// of a debug build; `KILN_MATH_samples()` asks for more.
fn samples() -> u32 {
    std::env::var("KILN_MATH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000)
}

#[test]
fn exp_is_within_2_ulp() {
    let inputs = sweep(1e-8, 105.0, samples(), true)
        .chain([0.0, -0.0, 88.72283, 88.7229, -87.33654, -103.97, -104.0]);
    measure(MathFunction::Exp, inputs, f64::exp).check("exp", 2.0);
}

#[test]
fn log_is_within_2_ulp() {
    let inputs = sweep(f32::from_bits(1), f32::MAX, samples(), false)
        .chain(sweep(0.5, 2.0, samples(), false))
        .chain([
            1.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            std::f32::consts::FRAC_1_SQRT_2,
            std::f32::consts::SQRT_2,
        ]);
    measure(MathFunction::Log, inputs, f64::ln).check("log", 2.0);
}

#[test]
fn sin_and_cos_are_within_2_ulp() {
    // Dense up to the fast-reduction limit and beyond, then the whole exponent range.
    let hard = [
        std::f32::consts::FRAC_PI_2,
        std::f32::consts::PI,
        3.0 * std::f32::consts::FRAC_PI_2,
        std::f32::consts::TAU,
        10_000.0,
        131_072.0,
        131_072.02,
        355.0,
        103_993.0,
        1.0e5,
        1.0e6,
        1.0e10,
        1.0e20,
        1.0e30,
        f32::MAX,
        16_367_173.0 * 2f32.powi(72),
    ];
    for (function, exact) in [
        (MathFunction::Sin, f64::sin as fn(f64) -> f64),
        (MathFunction::Cos, f64::cos as fn(f64) -> f64),
    ] {
        let inputs = sweep(1e-30, 4e5, samples(), true)
            .chain(sweep(4e5, f32::MAX, samples(), true))
            .chain(hard.iter().flat_map(|&x| [x, -x]));
        measure(function, inputs, exact).check(function.name(), 2.0);
    }
}

/// The f32 values nearest each multiple of π/2 up to the fast reduction's limit (2^17),
/// and their neighbours: where the reduced argument is smallest and any lost bit of π/2
/// would show.
#[test]
fn sin_and_cos_are_within_2_ulp_near_multiples_of_half_pi() {
    let limit = f64::from(kiln_ptx::numeric::coefficients::TRIG_FAST_REDUCTION_LIMIT);
    let last = (limit / std::f64::consts::FRAC_PI_2) as u32;
    for (function, exact) in [
        (MathFunction::Sin, f64::sin as fn(f64) -> f64),
        (MathFunction::Cos, f64::cos as fn(f64) -> f64),
    ] {
        let inputs = (1..=last).flat_map(|n| {
            let nearest = (f64::from(n) * std::f64::consts::FRAC_PI_2) as f32;
            let bits = nearest.to_bits();
            [f32::from_bits(bits - 1), nearest, f32::from_bits(bits + 1)]
        });
        let name = format!("{} near kπ/2", function.name());
        measure(function, inputs, exact).check(&name, 2.0);
    }
}

#[test]
fn tanh_is_within_2_ulp() {
    let inputs = sweep(1e-30, 12.0, samples(), true).chain([0.625, 0.624_999_94, 9.01, 1e30]);
    measure(MathFunction::Tanh, inputs, f64::tanh).check("tanh", 2.0);
}

#[test]
fn sigmoid_is_within_2_ulp() {
    let inputs = sweep(1e-30, 110.0, samples(), true).chain([0.0, -0.0, 88.0, -88.0, -103.0]);
    measure(MathFunction::Sigmoid, inputs, |x| 1.0 / (1.0 + (-x).exp())).check("sigmoid", 2.0);
}

#[test]
fn erf_is_within_2_ulp() {
    let inputs = sweep(1e-30, 6.0, samples(), true).chain([1.0, 0.999_999_94, 3.9, 4.0]);
    measure(MathFunction::Erf, inputs, libm::erf).check("erf", 2.0);
}

#[test]
fn rsqrt_is_within_1_5_ulp() {
    let inputs = sweep(f32::from_bits(1), f32::MAX, samples(), false).chain([1.0, 4.0, 2.0]);
    measure(MathFunction::Rsqrt, inputs, |x| 1.0 / x.sqrt()).check("rsqrt", 1.5);
}

#[test]
fn pow_is_within_2_ulp() {
    let evaluator = Evaluator::new(MathFunction::Pow);
    let mut worst = Worst::default();
    let mut rng = Lcg(7);
    let mut check = |x: f32, y: f32| {
        let got = evaluator.eval2(x, y);
        worst.record(ulp_error(got, f64::from(x).powf(f64::from(y))), x, y);
    };
    for _ in 0..samples() / 4 {
        let x = rng.range(0.0, 4.0);
        let y = rng.range(-60.0, 60.0);
        check(x, y);
        let x = rng.range(0.0, 1e4);
        let y = rng.range(-9.0, 9.0);
        check(x, y);
        // Bases near 1 with large exponents are where log2 needs its extra precision.
        let x = rng.range(0.99, 1.01);
        let y = rng.range(-8000.0, 8000.0);
        check(x, y);
        // Negative bases with integer exponents.
        let x = rng.range(-10.0, 0.0);
        let y = rng.range(-30.0, 30.0).round();
        check(x, y);
    }
    worst.check("pow", 2.0);
}

#[test]
fn pow_follows_c_for_special_operands() {
    let evaluator = Evaluator::new(MathFunction::Pow);
    let values = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        0.5,
        -0.5,
        2.0,
        -2.0,
        3.0,
        -3.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-40,
        -1e-40,
        f32::MAX,
    ];
    for &x in &values {
        for &y in &values {
            let got = evaluator.eval2(x, y);
            let expected = libm::powf(x, y);
            let same = (got.is_nan() && expected.is_nan())
                || got.to_bits() == expected.to_bits()
                || ulp_error(got, f64::from(expected)) <= 2.0;
            assert!(same, "pow({x:e}, {y:e}) = {got:e}, C says {expected:e}");
        }
    }
}

#[test]
fn fmod_is_exact() {
    let evaluator = Evaluator::new(MathFunction::Fmod);
    let mut rng = Lcg(11);
    let check = |x: f32, y: f32| {
        let got = evaluator.eval2(x, y);
        let expected = libm::fmodf(x, y);
        assert!(
            got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan()),
            "fmod({x:e}, {y:e}) = {got:e}, expected {expected:e}"
        );
    };
    for _ in 0..5_000 {
        check(rng.range(-1e4, 1e4), rng.range(-100.0, 100.0));
        check(rng.range(-10.0, 10.0), rng.range(-1e-3, 1e-3));
        let x = f32::from_bits((rng.next_unit() * f64::from(u32::MAX)) as u32);
        let y = f32::from_bits((rng.next_unit() * f64::from(u32::MAX)) as u32);
        check(x, y);
    }
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.5,
        3.0,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x0040_0001),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        6.283_185_5,
    ];
    for &x in &specials {
        for &y in &specials {
            check(x, y);
        }
    }
}
