//! The constants of the math routines: minimax polynomial coefficients (fitted by
//! `tools/fit_math.py`, rounded to f32) and the split constants of the argument reductions.
//!
//! Polynomials are listed from the constant term up and evaluated by Horner's rule with
//! fused multiply-adds ([`super::routine::Builder::horner`]).

/// `e^r ≈ 1 + r · E(r)` for `|r| ≤ ln 2 / 2`; minimax relative error 2^-28.5 before rounding.
pub const EXP_POLY: [f32; 6] = [
    1.0,
    0.500_000_06,
    0.166_663_65,
    0.041_664_77,
    0.008_379_059,
    0.001_406_142_3,
];

/// `log1p(f) ≈ f + f² · R(f)` for `f ∈ [√½ − 1, √2 − 1]`; minimax relative error 2^-27.9.
pub const LOG_POLY: [f32; 9] = [
    -0.499_999_88,
    0.333_333_25,
    -0.250_015_83,
    0.200_019_73,
    -0.166_090_83,
    0.141_818_26,
    -0.132_429_88,
    0.129_044_34,
    -0.076_217_785,
];

/// `sin r ≈ r + r³ · S(r²)` for `|r| ≤ 0.7916`; minimax relative error 2^-27.9.
pub const SIN_POLY: [f32; 3] = [-0.166_666_54, 0.008_332_123, -0.000_195_101_22];

/// `cos r ≈ 1 + r² · C(r²)` for `|r| ≤ 0.7916`; minimax relative error 2^-33.7.
pub const COS_POLY: [f32; 4] = [-0.5, 0.041_666_62, -0.001_388_661, 2.437_686_6e-5];

/// `tanh x ≈ x + x³ · T(x²)` for `|x| ≤ 0.625`; minimax relative error 2^-32.5.
pub const TANH_POLY: [f32; 6] = [
    -0.333_333_3,
    0.133_332_06,
    -0.053_946_763,
    0.021_700_704,
    -0.008_177_4,
    0.002_142_962_8,
];

/// `erf x ≈ x + x · Q(x²)` for `|x| ≤ 1`; minimax relative error 2^-29.6.
pub const ERF_POLY: [f32; 7] = [
    0.128_379_17,
    -0.376_126_26,
    0.112_835_854,
    -0.026_853_813,
    0.005_188_327_7,
    -0.000_801_019_4,
    7.853_864e-5,
];

/// `erfc x ≈ exp(M(x) − x²)` for `1 ≤ x ≤ 4`, fitted with weight `erfc x` (the absolute
/// error it causes in `erf x = 1 − erfc x`); minimax weighted error 2^-35.5.
pub const ERFC_LOG_POLY: [f32; 8] = [
    0.000_188_036_39,
    -1.129_578_4,
    0.366_780_07,
    -0.108_418_55,
    0.025_208_239,
    -0.004_204_555,
    0.000_441_335_08,
    -2.168_674_7e-5,
];

/// `log(m) = 2 atanh(u) = u · Σ 2u^2k / (2k + 1)` with `u = (m − 1)/(m + 1)`,
/// `|u| ≤ 0.1716`: the Taylor series in f64 (relative truncation error below 2^-50),
/// used by `pow`.
pub const LOG_ATANH_SERIES: [f64; 9] = [
    2.0,
    2.0 / 3.0,
    2.0 / 5.0,
    2.0 / 7.0,
    2.0 / 9.0,
    2.0 / 11.0,
    2.0 / 13.0,
    2.0 / 15.0,
    2.0 / 17.0,
];

/// log2(e), rounded to f32.
pub const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 with its last 9 significand bits zero (so `n · LN2_HI` is exact for |n| < 2^9);
/// with [`EXP_LN2_LO`] it carries ln 2 to 40 bits.
pub const EXP_LN2_HI: f32 = f32::from_bits(0x3F31_7200);
/// `ln 2 − EXP_LN2_HI`, rounded to f32.
pub const EXP_LN2_LO: f32 = f32::from_bits(0x35BF_BE8E);
/// ln 2 rounded to f32, and the rest, for the final sum of `log`.
pub const LN2_HI: f32 = std::f32::consts::LN_2;
pub const LN2_LO: f32 = f32::from_bits(0xB102_E308);
/// 2/π rounded to f32.
pub const TWO_OVER_PI: f32 = std::f32::consts::FRAC_2_PI;
/// π/2 as the sum of three f32s (Cody–Waite): `PIO2_1` is π/2 rounded to f32.
pub const PIO2_1: f32 = std::f32::consts::FRAC_PI_2;
/// -4.3711388e-8
pub const PIO2_2: f32 = f32::from_bits(0xB33B_BD2E);
/// -1.7151245e-15
pub const PIO2_3: f32 = f32::from_bits(0xA6F7_2CED);
/// π/2 · 2^-64 in f64, to turn the 64-bit fixed-point fraction of the large-argument
/// reduction into radians.
pub const PIO2_TIMES_2_POW_MINUS_64: f64 =
    std::f64::consts::FRAC_PI_2 / 18_446_744_073_709_551_616.0;
/// Above this magnitude `sin`/`cos` reduce with the table of 2/π (Payne–Hanek); at or
/// below it the three-part Cody–Waite reduction is exact enough: `n · PIO2_1` is exact and
/// `x − n · PIO2_1` too, and the tests check the f32s nearest every multiple of π/2 below
/// it, where the reduced argument is smallest.
pub const TRIG_FAST_REDUCTION_LIMIT: f32 = 131_072.0;
/// Below this magnitude `tanh` uses its polynomial, above it `1 − 2/(e^2|x| + 1)`.
pub const TANH_POLY_LIMIT: f32 = 0.625;
/// Below this magnitude `erf` uses its polynomial, above it `1 − erfc`.
pub const ERF_POLY_LIMIT: f32 = 1.0;
/// `erf` is 1 in f32 from here on (`erfc 4 ≈ 1.5e-8` is below half an ulp of 1).
pub const ERF_SATURATION: f32 = 4.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_constants_carry_the_extra_bits() {
        let ln2 = std::f64::consts::LN_2;
        assert!((f64::from(EXP_LN2_HI) + f64::from(EXP_LN2_LO) - ln2).abs() < 1e-13);
        assert_eq!(EXP_LN2_HI.to_bits() & 0x1FF, 0);
        assert_eq!(EXP_LN2_LO, (ln2 - f64::from(EXP_LN2_HI)) as f32);
        assert_eq!(LN2_LO, (ln2 - f64::from(LN2_HI)) as f32);
        let pio2 = std::f64::consts::FRAC_PI_2;
        assert_eq!(PIO2_2, (pio2 - f64::from(PIO2_1)) as f32);
        // The third part (from mpmath) agrees with what f64 can still see of the rest
        // (f64's π/2 is itself only good to about 1e-16).
        let rest = pio2 - f64::from(PIO2_1) - f64::from(PIO2_2);
        assert!((f64::from(PIO2_3) - rest).abs() < 2e-16, "{rest:e}");
    }
}
