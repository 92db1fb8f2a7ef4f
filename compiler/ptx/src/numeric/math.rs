//! The f32 math routines of the kernel IR's transcendental operators, as [`Routine`]s.
//!
//! Every routine uses only correctly rounded IEEE operations, integer operations and
//! comparisons, so [`Routine::eval`] reproduces the GPU's results bit for bit; the
//! accuracy tests (`tests/math_accuracy.rs`) measure these exact results against f64
//! references. Methods, in brief:
//!
//! - `exp`: `x = n ln2 + r` (Cody–Waite with a 2-part ln 2), `e^r` by a degree-6 minimax
//!   polynomial, `2^n` applied as two exact power-of-two factors (so results that are
//!   subnormal round once). Inputs clamped to [-105, 89] (beyond, the result is 0 or inf).
//! - `log`: `x = 2^e · m` with `m ∈ [√½, √2)` by bit manipulation (subnormals scaled first),
//!   `log1p(m − 1)` by a degree-10 polynomial, `e · ln 2` added in two parts.
//! - `sin`, `cos`: reduction by π/2 with a three-part Cody–Waite for `|x| ≤ 2^17`, and a
//!   Payne–Hanek reduction (a 96-bit window of 2/π per exponent, 64-bit integer products,
//!   one f64 multiply) above; then minimax polynomials on `|r| ≤ π/4` and the quadrant.
//! - `tanh`: an odd polynomial for `|x| < 0.625`, else `1 − 2/(e^{2|x|} + 1)`.
//! - `sigmoid`: `1/(1 + e^{-|x|})`, or `e^{-|x|}/(1 + e^{-|x|})` for negative `x` (no
//!   cancellation, and subnormal results stay accurate), with the quotient corrected for
//!   the roundings of the sum and the division.
//! - `erf`: an odd polynomial for `|x| < 1`, else `1 − exp(M(|x|) − x²)` with `M` a
//!   polynomial fitted to `log erfc(x) + x²` on [1, 4] (erf is 1 in f32 beyond 4).
//! - `rsqrt`: `1 / sqrt(x)`, both correctly rounded.
//! - `pow`: `log2 |x|` in f64 (the atanh series), `t = y · log2 |x|` in f64, then `2^t` as
//!   in `exp`; C's special cases (negative bases with integer exponents, zeros, infinities,
//!   `pow(x, 0) = pow(1, y) = 1`).
//! - `fmod` (the float `Rem`): C's `fmodf`, exact, by binary long division of the
//!   significands (one bit per iteration of a loop; the exponent gap bounds the count).

use super::coefficients::*;
use super::routine::{Builder, Cmp, CmpType, Kind, Op, Routine, Val};

/// A function with a [`Routine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MathFunction {
    Exp,
    Log,
    Sin,
    Cos,
    Tanh,
    Sigmoid,
    Erf,
    Rsqrt,
    /// `pow(x, y)`: two inputs.
    Pow,
    /// `fmod(x, y)`: two inputs.
    Fmod,
}

impl MathFunction {
    pub const ALL: [MathFunction; 10] = [
        MathFunction::Exp,
        MathFunction::Log,
        MathFunction::Sin,
        MathFunction::Cos,
        MathFunction::Tanh,
        MathFunction::Sigmoid,
        MathFunction::Erf,
        MathFunction::Rsqrt,
        MathFunction::Pow,
        MathFunction::Fmod,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MathFunction::Exp => "exp",
            MathFunction::Log => "log",
            MathFunction::Sin => "sin",
            MathFunction::Cos => "cos",
            MathFunction::Tanh => "tanh",
            MathFunction::Sigmoid => "sigmoid",
            MathFunction::Erf => "erf",
            MathFunction::Rsqrt => "rsqrt",
            MathFunction::Pow => "pow",
            MathFunction::Fmod => "fmod",
        }
    }

    /// Builds the routine: f32 inputs (one, or two for `pow` and `fmod`), one f32 output.
    pub fn routine(self) -> Routine {
        let mut b = Builder::new(self.name());
        let x = b.input(Kind::F32);
        let result = match self {
            MathFunction::Exp => exp(&mut b, x),
            MathFunction::Log => log(&mut b, x),
            MathFunction::Sin => sin_cos(&mut b, x, 0),
            MathFunction::Cos => sin_cos(&mut b, x, 1),
            MathFunction::Tanh => tanh(&mut b, x),
            MathFunction::Sigmoid => sigmoid(&mut b, x),
            MathFunction::Erf => erf(&mut b, x),
            MathFunction::Rsqrt => {
                let root = b.op(Op::SqrtF32, &[x]);
                b.op(Op::RcpF32, &[root])
            }
            MathFunction::Pow => {
                let y = b.input(Kind::F32);
                pow(&mut b, x, y)
            }
            MathFunction::Fmod => {
                let y = b.input(Kind::F32);
                fmod(&mut b, x, y)
            }
        };
        b.finish(&[result])
    }

    /// Evaluates the routine in Rust (exactly what the GPU computes). `y` is ignored by
    /// one-input functions.
    pub fn eval(self, x: f32, y: f32) -> f32 {
        use super::routine::Scalar;
        let routine = self.routine();
        let mut inputs = vec![Scalar::F32(x)];
        if routine.inputs.len() == 2 {
            inputs.push(Scalar::F32(y));
        }
        match routine.eval(&inputs)[0] {
            Scalar::F32(value) => value,
            other => unreachable!("{} returned {other:?}", self.name()),
        }
    }
}

/// `1 + r · E(r) ≈ e^r` for `|r| ≤ ln 2 / 2`.
fn exp_poly(b: &mut Builder, r: Val) -> Val {
    let e = b.horner(r, &EXP_POLY);
    let one = b.f32(1.0);
    b.fma(r, e, one)
}

/// `2^k` for an i32 `k` in [-126, 127], built from its bits.
fn pow2(b: &mut Builder, k: Val) -> Val {
    let biased = b.int_const(Op::AddI32, k, 127);
    let bits = b.int_const(Op::ShlI32, biased, 23);
    b.op(Op::F32FromBits, &[bits])
}

/// `p · 2^n` for an i32 `n` in [-252, 254], as two exact factors: only the last multiply
/// can round (into the subnormals) or overflow.
fn scale_by_pow2(b: &mut Builder, p: Val, n: Val) -> Val {
    let half = b.int_const(Op::ShrS32, n, 1);
    let rest = b.op(Op::SubI32, &[n, half]);
    let first = pow2(b, half);
    let second = pow2(b, rest);
    let partial = b.mul(p, first);
    b.mul(partial, second)
}

/// `e^x`.
fn exp(b: &mut Builder, x: Val) -> Val {
    let low = b.f32(-105.0);
    let high = b.f32(89.0);
    let clamped_low = b.op(Op::MaxF32, &[x, low]);
    let clamped = b.op(Op::MinF32, &[clamped_low, high]);
    let t = b.mul_const(clamped, LOG2_E);
    let n = b.op(Op::RoundF32, &[t]);
    let minus_ln2_hi = b.f32(-EXP_LN2_HI);
    let minus_ln2_lo = b.f32(-EXP_LN2_LO);
    let r_hi = b.fma(n, minus_ln2_hi, clamped);
    let r = b.fma(n, minus_ln2_lo, r_hi);
    let p = exp_poly(b, r);
    let n_int = b.op(Op::F32ToI32Trunc, &[n]);
    scale_by_pow2(b, p, n_int)
}

/// `(e, m)` with `x = 2^e · m`, `m ∈ [√½, √2)`, for positive finite `x` (subnormals too):
/// `e` an i32, `m` an f32.
fn split_exponent(b: &mut Builder, x: Val) -> (Val, Val) {
    const SQRT_HALF_BITS: i32 = 0x3F35_04F3;
    let tiny = b.cmp_f32_const(Cmp::Lt, x, f32::MIN_POSITIVE);
    let scaled = b.mul_const(x, 8_388_608.0);
    let normal = b.select(tiny, scaled, x);
    let zero = b.i32(0);
    let minus_23 = b.i32(-23);
    let adjust = b.select(tiny, minus_23, zero);
    let bits = b.op(Op::BitsOfF32, &[normal]);
    let offset = b.int_const(Op::SubI32, bits, SQRT_HALF_BITS);
    let exponent = b.int_const(Op::ShrS32, offset, 23);
    let exponent = b.op(Op::AddI32, &[exponent, adjust]);
    let fraction = b.int_const(Op::AndI32, offset, 0x007F_FFFF);
    let m_bits = b.int_const(Op::AddI32, fraction, SQRT_HALF_BITS);
    let m = b.op(Op::F32FromBits, &[m_bits]);
    (exponent, m)
}

/// The natural logarithm.
fn log(b: &mut Builder, x: Val) -> Val {
    let (exponent, m) = split_exponent(b, x);
    let one = b.f32(1.0);
    let f = b.sub(m, one);
    let f2 = b.mul(f, f);
    let r = b.horner(f, &LOG_POLY);
    let log1p = b.fma(f2, r, f);
    let e = b.op(Op::I32ToF32, &[exponent]);
    let ln2_lo = b.f32(LN2_LO);
    let ln2_hi = b.f32(LN2_HI);
    let low = b.fma(e, ln2_lo, log1p);
    let result = b.fma(e, ln2_hi, low);
    // log(+inf) = +inf, log(±0) = -inf, log(x < 0) = log(NaN) = NaN.
    let inf = b.f32(f32::INFINITY);
    let is_inf = b.cmp_f32(Cmp::Eq, x, inf);
    let result = b.select(is_inf, inf, result);
    let is_zero = b.cmp_f32_const(Cmp::Eq, x, 0.0);
    let minus_inf = b.f32(f32::NEG_INFINITY);
    let result = b.select(is_zero, minus_inf, result);
    let invalid = b.cmp_f32_const(Cmp::Ltu, x, 0.0);
    let nan = b.f32(f32::NAN);
    b.select(invalid, nan, result)
}

/// `(q, r)` with `x = q · π/2 + r`, `|r| ≲ π/4` (`q` an i32, only its low two bits used).
fn reduce_by_half_pi(b: &mut Builder, x: Val) -> (Val, Val) {
    let t = b.mul_const(x, TWO_OVER_PI);
    let n = b.op(Op::RoundF32, &[t]);
    let p1 = b.f32(-PIO2_1);
    let p2 = b.f32(-PIO2_2);
    let p3 = b.f32(-PIO2_3);
    let r1 = b.fma(n, p1, x);
    let r2 = b.fma(n, p2, r1);
    let r = b.fma(n, p3, r2);
    let q = b.op(Op::F32ToI32Trunc, &[n]);
    let magnitude = b.op(Op::AbsF32, &[x]);
    let large = b.cmp_f32_const(Cmp::Gt, magnitude, TRIG_FAST_REDUCTION_LIMIT);
    let finite = b.cmp_f32_const(Cmp::Lt, magnitude, f32::INFINITY);
    let slow = b.op(Op::AndPred, &[large, finite]);
    b.if_then(slow, |b| {
        let (q_slow, r_slow) = payne_hanek(b, x);
        b.assign(q, q_slow);
        b.assign(r, r_slow);
    });
    (q, r)
}

/// The reduction of a finite `x` with `|x| ≥ 1` by the bits of 2/π (see
/// [`super::two_over_pi`]): `(q, r)` as in [`reduce_by_half_pi`].
fn payne_hanek(b: &mut Builder, x: Val) -> (Val, Val) {
    use super::routine::Table;
    use super::two_over_pi::FIRST_EXPONENT;
    let bits = b.op(Op::BitsOfF32, &[x]);
    let magnitude_bits = b.int_const(Op::AndI32, bits, 0x7FFF_FFFF);
    let exponent = b.int_const(Op::ShrU32, magnitude_bits, 23);
    let fraction = b.int_const(Op::AndI32, magnitude_bits, 0x007F_FFFF);
    let m = b.int_const(Op::OrI32, fraction, 0x0080_0000);
    let window = b.int_const(Op::SubI32, exponent, FIRST_EXPONENT as i32);
    let index = b.int_const(Op::MulLoI32, window, 3);
    let table = Op::LoadTable(Table::TwoOverPiWindows);
    let k2 = b.op(table, &[index]);
    let index1 = b.int_const(Op::AddI32, index, 1);
    let k1 = b.op(table, &[index1]);
    let index2 = b.int_const(Op::AddI32, index, 2);
    let k0 = b.op(table, &[index2]);
    // P = m · (k2:k1:k0) mod 2^96, keeping its top 64 bits (the low word only carries).
    let t0 = b.op(Op::MulWideU32, &[m, k0]);
    let carry0 = b.int_const(Op::ShrU64, t0, 32);
    let t1 = b.op(Op::MadWideU32, &[m, k1, carry0]);
    let mid = b.op(Op::U64ToU32, &[t1]);
    let carry1_wide = b.int_const(Op::ShrU64, t1, 32);
    let carry1 = b.op(Op::U64ToU32, &[carry1_wide]);
    let hi_product = b.op(Op::MulLoI32, &[m, k2]);
    let hi = b.op(Op::AddI32, &[hi_product, carry1]);
    // Quadrant: bits 95..94 of P; fraction: bits 93..30 as a 64-bit fixed-point number.
    let quadrant = b.int_const(Op::ShrU32, hi, 30);
    let hi_wide = b.op(Op::U32ToU64, &[hi]);
    let mid_wide = b.op(Op::U32ToU64, &[mid]);
    let frac_hi = b.int_const(Op::ShlI64, hi_wide, 34);
    let frac_mid = b.int_const(Op::ShlI64, mid_wide, 2);
    let frac = b.op(Op::OrI64, &[frac_hi, frac_mid]);
    // A fraction of one half or more goes to the next quadrant; read as signed, the same
    // bits are then the (negative) remainder.
    let top_wide = b.int_const(Op::ShrU64, frac, 63);
    let top = b.op(Op::U64ToU32, &[top_wide]);
    let q = b.op(Op::AddI32, &[quadrant, top]);
    let frac_f64 = b.op(Op::I64ToF64, &[frac]);
    let scale = b.f64(PIO2_TIMES_2_POW_MINUS_64);
    let r_f64 = b.op(Op::MulF64, &[frac_f64, scale]);
    let r = b.op(Op::F64ToF32, &[r_f64]);
    // sin(-x) = -sin(x): negate both parts for negative x.
    let negative = b.cmp_s32_const(Cmp::Lt, bits, 0);
    let minus_q = b.op(Op::NegI32, &[q]);
    let minus_r = b.op(Op::NegF32, &[r]);
    let q = b.select(negative, minus_q, q);
    let r = b.select(negative, minus_r, r);
    (q, r)
}

/// `sin x` (`quadrant_offset` 0) or `cos x` (1, since `cos x = sin(x + π/2)`).
fn sin_cos(b: &mut Builder, x: Val, quadrant_offset: i32) -> Val {
    let (q, r) = reduce_by_half_pi(b, x);
    let r2 = b.mul(r, r);
    let r3 = b.mul(r, r2);
    let s = b.horner(r2, &SIN_POLY);
    let sin = b.fma(r3, s, r);
    let c = b.horner(r2, &COS_POLY);
    let one = b.f32(1.0);
    let cos = b.fma(r2, c, one);
    let quadrant = b.int_const(Op::AddI32, q, quadrant_offset);
    let odd_bit = b.int_const(Op::AndI32, quadrant, 1);
    let odd = b.cmp_s32_const(Cmp::Ne, odd_bit, 0);
    let value = b.select(odd, cos, sin);
    let sign_bit = b.int_const(Op::AndI32, quadrant, 2);
    let negate = b.cmp_s32_const(Cmp::Ne, sign_bit, 0);
    let minus_value = b.op(Op::NegF32, &[value]);
    b.select(negate, minus_value, value)
}

fn tanh(b: &mut Builder, x: Val) -> Val {
    let magnitude = b.op(Op::AbsF32, &[x]);
    let x2 = b.mul(x, x);
    let t = b.horner(x2, &TANH_POLY);
    let x2t = b.mul(x2, t);
    let small = b.fma(x, x2t, x);
    let twice = b.add(magnitude, magnitude);
    let e = exp(b, twice);
    let one = b.f32(1.0);
    let denominator = b.add(e, one);
    let reciprocal = b.op(Op::RcpF32, &[denominator]);
    let minus_two = b.f32(-2.0);
    let large_magnitude = b.fma(minus_two, reciprocal, one);
    let large = b.with_sign_of(large_magnitude, x);
    let is_small = b.cmp_f32_const(Cmp::Lt, magnitude, TANH_POLY_LIMIT);
    b.select(is_small, small, large)
}

/// `1/(1 + e)` or `e/(1 + e)` with `e = e^{-|x|}`: the quotient is corrected for the
/// rounding of `1 + e` (its exact error by Fast2Sum) and of the division (its exact
/// remainder by `fma`), so only `exp`'s error and the last rounding remain.
fn sigmoid(b: &mut Builder, x: Val) -> Val {
    let magnitude = b.op(Op::AbsF32, &[x]);
    let minus_magnitude = b.op(Op::NegF32, &[magnitude]);
    let e = exp(b, minus_magnitude);
    let one = b.f32(1.0);
    let denominator = b.add(one, e);
    // denominator + tail = 1 + e exactly.
    let denominator_excess = b.sub(denominator, one);
    let tail = b.sub(e, denominator_excess);
    let non_negative = b.cmp_f32_const(Cmp::Ge, x, 0.0);
    let numerator = b.select(non_negative, one, e);
    let quotient = b.op(Op::DivF32, &[numerator, denominator]);
    // remainder = numerator - quotient * (denominator + tail)
    let minus_quotient = b.op(Op::NegF32, &[quotient]);
    let remainder = b.fma(minus_quotient, denominator, numerator);
    let remainder = b.fma(minus_quotient, tail, remainder);
    // 1/denominator: the quotient itself for x >= 0, else 1 - quotient.
    let complement = b.sub(one, quotient);
    let reciprocal = b.select(non_negative, quotient, complement);
    b.fma(remainder, reciprocal, quotient)
}

fn erf(b: &mut Builder, x: Val) -> Val {
    let magnitude = b.op(Op::AbsF32, &[x]);
    let x2 = b.mul(x, x);
    let q = b.horner(x2, &ERF_POLY);
    let small = b.fma(x, q, x);
    let limit = b.f32(ERF_SATURATION);
    let t = b.op(Op::MinF32, &[magnitude, limit]);
    let m = b.horner(t, &ERFC_LOG_POLY);
    let minus_t = b.op(Op::NegF32, &[t]);
    let log_erfc = b.fma(minus_t, t, m);
    let erfc = exp(b, log_erfc);
    let one = b.f32(1.0);
    let large_magnitude = b.sub(one, erfc);
    let large = b.with_sign_of(large_magnitude, x);
    let is_small = b.cmp_f32_const(Cmp::Lt, magnitude, ERF_POLY_LIMIT);
    b.select(is_small, small, large)
}

/// `log2 x` in f64 for an f32 `x ≥ 0` (−inf at 0, inf at inf, NaN for NaN).
fn log2_f64(b: &mut Builder, x: Val) -> Val {
    let (exponent, m) = split_exponent(b, x);
    let m_wide = b.op(Op::F32ToF64, &[m]);
    let one = b.f64(1.0);
    let numerator = b.op(Op::SubF64, &[m_wide, one]);
    let denominator = b.op(Op::AddF64, &[m_wide, one]);
    let u = b.op(Op::DivF64, &[numerator, denominator]);
    let u2 = b.op(Op::MulF64, &[u, u]);
    let series = b.horner_f64(u2, &LOG_ATANH_SERIES);
    let ln_m = b.op(Op::MulF64, &[u, series]);
    let e = b.op(Op::I32ToF64, &[exponent]);
    let log2_e = b.f64(std::f64::consts::LOG2_E);
    let result = b.op(Op::FmaF64, &[ln_m, log2_e, e]);
    let inf = b.f32(f32::INFINITY);
    let is_inf = b.cmp_f32(Cmp::Eq, x, inf);
    let wide_inf = b.f64(f64::INFINITY);
    let result = b.select(is_inf, wide_inf, result);
    let is_zero = b.cmp_f32_const(Cmp::Eq, x, 0.0);
    let wide_minus_inf = b.f64(f64::NEG_INFINITY);
    let result = b.select(is_zero, wide_minus_inf, result);
    let is_nan = b.cmp_f32(Cmp::Nan, x, x);
    let wide_nan = b.f64(f64::NAN);
    b.select(is_nan, wide_nan, result)
}

fn pow(b: &mut Builder, x: Val, y: Val) -> Val {
    let magnitude = b.op(Op::AbsF32, &[x]);
    let log2 = log2_f64(b, magnitude);
    let y_wide = b.op(Op::F32ToF64, &[y]);
    let t = b.op(Op::MulF64, &[y_wide, log2]);
    // Beyond ±300 the result is inf or 0 anyway; the clamp keeps inf out of `t - n`.
    let high = b.f64(300.0);
    let low = b.f64(-300.0);
    let too_high = b.op(Op::Setp(Cmp::Gt, CmpType::F64), &[t, high]);
    let t = b.select(too_high, high, t);
    let too_low = b.op(Op::Setp(Cmp::Lt, CmpType::F64), &[t, low]);
    let t = b.select(too_low, low, t);
    let n = b.op(Op::RoundF64, &[t]);
    let fraction = b.op(Op::SubF64, &[t, n]);
    let ln2 = b.f64(std::f64::consts::LN_2);
    let r_wide = b.op(Op::MulF64, &[fraction, ln2]);
    let r = b.op(Op::F64ToF32, &[r_wide]);
    let p = exp_poly(b, r);
    let n_int = b.op(Op::F64ToI32Trunc, &[n]);
    let n_low = b.int_const(Op::MaxS32, n_int, -252);
    let n_clamped = b.int_const(Op::MinS32, n_low, 254);
    let magnitude_result = scale_by_pow2(b, p, n_clamped);

    // Is y an integer, and an odd one? (Every f32 of magnitude 2^24 or more is even.)
    let y_rounded = b.op(Op::RoundF32, &[y]);
    let y_integer = b.cmp_f32(Cmp::Eq, y_rounded, y);
    let y_magnitude = b.op(Op::AbsF32, &[y]);
    let y_small = b.cmp_f32_const(Cmp::Lt, y_magnitude, 16_777_216.0);
    let y_int = b.op(Op::F32ToI32Trunc, &[y]);
    let y_low_bit = b.int_const(Op::AndI32, y_int, 1);
    let y_odd_bit = b.cmp_s32_const(Cmp::Ne, y_low_bit, 0);
    let y_odd_small = b.op(Op::AndPred, &[y_integer, y_small]);
    let y_odd = b.op(Op::AndPred, &[y_odd_small, y_odd_bit]);
    // A negative base (its sign bit, so -0 too) with an odd integer exponent: negative.
    let x_bits = b.op(Op::BitsOfF32, &[x]);
    let x_sign = b.cmp_s32_const(Cmp::Lt, x_bits, 0);
    let negate = b.op(Op::AndPred, &[x_sign, y_odd]);
    let minus_result = b.op(Op::NegF32, &[magnitude_result]);
    let result = b.select(negate, minus_result, magnitude_result);
    // A finite negative base with a non-integer exponent: NaN.
    let x_negative = b.cmp_f32_const(Cmp::Lt, x, 0.0);
    let x_finite_low = b.cmp_f32_const(Cmp::Gt, x, f32::NEG_INFINITY);
    let y_not_integer = b.op(Op::NotPred, &[y_integer]);
    let negative_finite = b.op(Op::AndPred, &[x_negative, x_finite_low]);
    let invalid = b.op(Op::AndPred, &[negative_finite, y_not_integer]);
    let nan = b.f32(f32::NAN);
    let result = b.select(invalid, nan, result);
    // pow(x, ±0) = 1, pow(1, y) = 1, pow(-1, ±inf) = 1, even for NaN operands.
    let y_zero = b.cmp_f32_const(Cmp::Eq, y, 0.0);
    let x_one = b.cmp_f32_const(Cmp::Eq, x, 1.0);
    let magnitude_one = b.cmp_f32_const(Cmp::Eq, magnitude, 1.0);
    let y_infinite = b.cmp_f32_const(Cmp::Eq, y_magnitude, f32::INFINITY);
    let unit_infinite = b.op(Op::AndPred, &[magnitude_one, y_infinite]);
    let one_case = b.op(Op::OrPred, &[y_zero, x_one]);
    let one_case = b.op(Op::OrPred, &[one_case, unit_infinite]);
    let one = b.f32(1.0);
    b.select(one_case, one, result)
}

/// `(significand, exponent)` of a positive finite f32 given by its bits, the significand
/// with its leading one at bit 23 (subnormals normalised, their exponent below 1).
fn unpack(b: &mut Builder, bits: Val) -> (Val, Val) {
    let exponent_field = b.int_const(Op::ShrU32, bits, 23);
    let subnormal = b.cmp_s32_const(Cmp::Eq, exponent_field, 0);
    let leading = b.op(Op::ClzI32, &[bits]);
    let shift = b.int_const(Op::SubI32, leading, 8);
    let normalised = b.op(Op::ShlI32, &[bits, shift]);
    let one = b.i32(1);
    let subnormal_exponent = b.op(Op::SubI32, &[one, shift]);
    let fraction = b.int_const(Op::AndI32, bits, 0x007F_FFFF);
    let normal = b.int_const(Op::OrI32, fraction, 0x0080_0000);
    let significand = b.select(subnormal, normalised, normal);
    let exponent = b.select(subnormal, subnormal_exponent, exponent_field);
    (significand, exponent)
}

/// C's `fmodf(x, y)`: `x − trunc(x/y) · y`, exact, with the sign of `x`.
fn fmod(b: &mut Builder, x: Val, y: Val) -> Val {
    let x_bits = b.op(Op::BitsOfF32, &[x]);
    let y_bits = b.op(Op::BitsOfF32, &[y]);
    let x_magnitude = b.int_const(Op::AndI32, x_bits, 0x7FFF_FFFF);
    let y_magnitude = b.int_const(Op::AndI32, y_bits, 0x7FFF_FFFF);
    let sign = b.int_const(Op::AndI32, x_bits, i32::MIN);
    let (mx, ex) = unpack(b, x_magnitude);
    let (my, ey) = unpack(b, y_magnitude);
    // Long division: one quotient bit per step of the exponent gap.
    // `work` (the partial remainder) and `steps` are computed values, so the loop can
    // update them in place.
    let work = mx;
    let steps = b.op(Op::SubI32, &[ex, ey]);
    let positive_gap = b.cmp_s32_const(Cmp::Gt, steps, 0);
    b.if_then(positive_gap, |b| {
        b.do_while(|b| {
            let difference = b.op(Op::SubI32, &[work, my]);
            let fits = b.cmp_s32_const(Cmp::Ge, difference, 0);
            let kept = b.select(fits, difference, work);
            let shifted = b.int_const(Op::ShlI32, kept, 1);
            b.assign(work, shifted);
            let left = b.int_const(Op::SubI32, steps, 1);
            b.assign(steps, left);
            b.cmp_s32_const(Cmp::Gt, steps, 0)
        });
    });
    let difference = b.op(Op::SubI32, &[work, my]);
    let fits = b.cmp_s32_const(Cmp::Ge, difference, 0);
    let remainder = b.select(fits, difference, work);
    // Renormalise the remainder at y's exponent.
    let leading = b.op(Op::ClzI32, &[remainder]);
    let shift = b.int_const(Op::SubI32, leading, 8);
    let significand = b.op(Op::ShlI32, &[remainder, shift]);
    let exponent = b.op(Op::SubI32, &[ey, shift]);
    let exponent_field = b.int_const(Op::ShlI32, exponent, 23);
    let fraction = b.int_const(Op::AndI32, significand, 0x007F_FFFF);
    let normal_bits = b.op(Op::OrI32, &[exponent_field, fraction]);
    let one = b.i32(1);
    let subnormal_shift = b.op(Op::SubI32, &[one, exponent]);
    let subnormal_bits = b.op(Op::ShrU32, &[significand, subnormal_shift]);
    let is_normal = b.cmp_s32_const(Cmp::Ge, exponent, 1);
    let bits = b.select(is_normal, normal_bits, subnormal_bits);
    let is_zero = b.cmp_s32_const(Cmp::Eq, remainder, 0);
    let zero = b.i32(0);
    let bits = b.select(is_zero, zero, bits);
    let signed_bits = b.op(Op::OrI32, &[bits, sign]);
    let result = b.op(Op::F32FromBits, &[signed_bits]);
    // |x| < |y| (y infinite included): x itself. y = 0, x infinite, a NaN: NaN.
    let x_smaller = b.op(Op::Setp(Cmp::Lt, CmpType::S32), &[x_magnitude, y_magnitude]);
    let result = b.select(x_smaller, x, result);
    let y_zero = b.cmp_s32_const(Cmp::Eq, y_magnitude, 0);
    let x_special = b.cmp_s32_const(Cmp::Ge, x_magnitude, 0x7F80_0000);
    let y_nan = b.cmp_s32_const(Cmp::Gt, y_magnitude, 0x7F80_0000);
    let invalid = b.op(Op::OrPred, &[y_zero, x_special]);
    let invalid = b.op(Op::OrPred, &[invalid, y_nan]);
    let nan = b.f32(f32::NAN);
    b.select(invalid, nan, result)
}
