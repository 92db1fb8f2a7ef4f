//! The two OCP 8-bit float formats, bit-exact: decoding, and encoding with round to nearest
//! even.
//!
//! - **E4M3** (`f8e4m3`, OCP "E4M3FN"): 1 sign, 4 exponent, 3 mantissa bits, bias 7. No
//!   infinities; the only NaN encodings are `S.1111.111` (0x7F, 0xFF), so the largest finite
//!   value is `S.1111.110` = 448. Smallest subnormal 2^-9, smallest normal 2^-6.
//! - **E5M2** (`f8e5m2`, OCP "E5M2"): 1 sign, 5 exponent, 2 mantissa bits, bias 15, IEEE-like:
//!   exponent 31 holds ±inf (mantissa 0) and NaN (mantissa != 0). Largest finite 57344,
//!   smallest subnormal 2^-16, smallest normal 2^-14.
//!
//! Encoding rounds to nearest, ties to even, and **saturates**: a finite value beyond the
//! largest finite one, and ±inf, become ±max-finite; NaN stays NaN (0x7F, or 0xFF for a
//! NaN with the sign bit set). This is the GPU's saturating convert mode,
//! `cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32`, which kiln's kernels use for every conversion to
//! FP8, so the interpreter rounds the same way. Subnormals are produced and decoded exactly.
//! Decoding E5M2's inf patterns (which only come from outside, e.g. a checkpoint) gives ±inf.

/// The layout of an 8-bit float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Format {
    pub exponent_bits: u32,
    pub mantissa_bits: u32,
    pub bias: i32,
    /// Whether the all-ones exponent encodes inf/NaN (IEEE-like) rather than ordinary values.
    pub ieee_special_exponent: bool,
}

/// OCP E4M3FN.
pub const E4M3: Fp8Format = Fp8Format {
    exponent_bits: 4,
    mantissa_bits: 3,
    bias: 7,
    ieee_special_exponent: false,
};

/// OCP E5M2.
pub const E5M2: Fp8Format = Fp8Format {
    exponent_bits: 5,
    mantissa_bits: 2,
    bias: 15,
    ieee_special_exponent: true,
};

/// The canonical NaN encoding (sign clear) of both formats.
const NAN_BITS: u8 = 0x7F;

impl Fp8Format {
    fn exponent_field(self, bits: u8) -> u32 {
        (u32::from(bits) >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)
    }

    fn mantissa_field(self, bits: u8) -> u32 {
        u32::from(bits) & ((1 << self.mantissa_bits) - 1)
    }

    fn max_exponent_field(self) -> u32 {
        (1 << self.exponent_bits) - 1
    }

    /// Whether `bits` encodes NaN.
    pub fn is_nan(self, bits: u8) -> bool {
        let (e, m) = (self.exponent_field(bits), self.mantissa_field(bits));
        let all_mantissa = (1 << self.mantissa_bits) - 1;
        if self.ieee_special_exponent {
            e == self.max_exponent_field() && m != 0
        } else {
            e == self.max_exponent_field() && m == all_mantissa
        }
    }

    /// The bit pattern of the largest finite positive value.
    pub fn max_finite_bits(self) -> u8 {
        let e_max = self.max_exponent_field();
        let all_mantissa = (1 << self.mantissa_bits) - 1;
        let (e, m) = if self.ieee_special_exponent {
            (e_max - 1, all_mantissa)
        } else {
            (e_max, all_mantissa - 1)
        };
        ((e << self.mantissa_bits) | m) as u8
    }

    /// The largest finite value (448 for E4M3, 57344 for E5M2).
    pub fn max_finite(self) -> f32 {
        self.decode(self.max_finite_bits())
    }

    /// The exponent of the smallest normal value, `1 - bias`.
    fn min_normal_exponent(self) -> i32 {
        1 - self.bias
    }

    /// The value of a bit pattern (exact in f32).
    pub fn decode(self, bits: u8) -> f32 {
        let negative = bits & 0x80 != 0;
        let (e, m) = (self.exponent_field(bits), self.mantissa_field(bits));
        let magnitude = if self.is_nan(bits) {
            f64::NAN
        } else if self.ieee_special_exponent && e == self.max_exponent_field() {
            f64::INFINITY
        } else if e == 0 {
            // Subnormal: 0.m * 2^(1 - bias).
            let scale = self.min_normal_exponent() - self.mantissa_bits as i32;
            libm::scalbn(f64::from(m), scale)
        } else {
            // Normal: 1.m * 2^(e - bias).
            let significand = f64::from((1 << self.mantissa_bits) | m);
            let scale = e as i32 - self.bias - self.mantissa_bits as i32;
            libm::scalbn(significand, scale)
        };
        let value = if negative { -magnitude } else { magnitude };
        value as f32
    }

    /// The nearest bit pattern to `x` (ties to even), saturating to ±max-finite; NaN stays NaN.
    pub fn encode(self, x: f32) -> u8 {
        let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return sign | NAN_BITS;
        }
        let magnitude = f64::from(x.abs());
        let max = f64::from(self.max_finite());
        if magnitude >= max {
            return sign | self.max_finite_bits();
        }
        if magnitude == 0.0 {
            return sign;
        }
        let m_bits = self.mantissa_bits as i32;
        // The binade of `magnitude`: 2^exponent <= magnitude < 2^(exponent+1); subnormals
        // share the quantum of the smallest normal binade.
        let (_, frexp_exponent) = libm::frexp(magnitude);
        let mut exponent = (frexp_exponent - 1).max(self.min_normal_exponent());
        // Integer significand in units of the quantum 2^(exponent - m_bits), rounded.
        let mut significand = libm::scalbn(magnitude, m_bits - exponent).round_ties_even() as u32;
        if significand == 1 << (m_bits + 1) {
            // Rounded up into the next binade.
            significand >>= 1;
            exponent += 1;
        }
        let rounded = libm::scalbn(f64::from(significand), exponent - m_bits);
        if rounded > max {
            return sign | self.max_finite_bits();
        }
        let bits = if significand < 1 << m_bits {
            // Subnormal (exponent field 0).
            significand
        } else {
            let exponent_field = (exponent + self.bias) as u32;
            (exponent_field << m_bits) | (significand - (1 << m_bits))
        };
        sign | bits as u8
    }

    /// `x` rounded to the nearest value of this format (see [`Fp8Format::encode`]).
    pub fn round(self, x: f32) -> f32 {
        self.decode(self.encode(x))
    }
}

/// Decodes an E4M3 bit pattern.
pub fn e4m3_to_f32(bits: u8) -> f32 {
    E4M3.decode(bits)
}

/// Encodes to E4M3 (round to nearest even, saturating, NaN kept).
pub fn f32_to_e4m3(x: f32) -> u8 {
    E4M3.encode(x)
}

/// Decodes an E5M2 bit pattern.
pub fn e5m2_to_f32(bits: u8) -> f32 {
    E5M2.decode(bits)
}

/// Encodes to E5M2 (round to nearest even, saturating, NaN kept).
pub fn f32_to_e5m2(x: f32) -> u8 {
    E5M2.encode(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// E4M3 straight from the OCP definition, written independently of `Fp8Format`.
    fn e4m3_reference(bits: u8) -> f64 {
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((bits >> 3) & 0xF);
        let m = f64::from(bits & 0x7);
        if e == 15 && m == 7.0 {
            return f64::NAN;
        }
        if e == 0 {
            sign * (m / 8.0) * 2f64.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }

    /// E5M2 straight from the OCP definition.
    fn e5m2_reference(bits: u8) -> f64 {
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((bits >> 2) & 0x1F);
        let m = f64::from(bits & 0x3);
        if e == 31 {
            return if m == 0.0 {
                sign * f64::INFINITY
            } else {
                f64::NAN
            };
        }
        if e == 0 {
            sign * (m / 4.0) * 2f64.powi(-14)
        } else {
            sign * (1.0 + m / 4.0) * 2f64.powi(e - 15)
        }
    }

    fn check_table(format: Fp8Format, reference: fn(u8) -> f64) {
        for bits in 0..=255u8 {
            let expected = reference(bits);
            let decoded = format.decode(bits);
            if expected.is_nan() {
                assert!(decoded.is_nan(), "{bits:#04x} should decode to NaN");
                assert!(format.is_nan(format.encode(decoded)));
                continue;
            }
            assert_eq!(f64::from(decoded), expected, "decode {bits:#04x}");
            if expected.is_infinite() {
                continue;
            }
            assert_eq!(format.encode(decoded), bits, "encode(decode({bits:#04x}))");
        }
    }

    #[test]
    fn e4m3_matches_the_bit_level_definition() {
        check_table(E4M3, e4m3_reference);
    }

    #[test]
    fn e5m2_matches_the_bit_level_definition() {
        check_table(E5M2, e5m2_reference);
    }

    #[test]
    fn well_known_values() {
        assert_eq!(E4M3.max_finite(), 448.0);
        assert_eq!(f32_to_e4m3(448.0), 0x7E);
        assert_eq!(f32_to_e4m3(240.0), 0x77);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(f32_to_e4m3(1.0), 0x38);
        assert_eq!(E5M2.max_finite(), 57344.0);
        assert_eq!(f32_to_e5m2(57344.0), 0x7B);
        assert_eq!(e5m2_to_f32(0x01), 2f32.powi(-16));
        assert_eq!(e5m2_to_f32(0x7C), f32::INFINITY);
        assert_eq!(e5m2_to_f32(0xFC), f32::NEG_INFINITY);
        assert_eq!(f32_to_e5m2(1.0), 0x3C);
    }

    /// Every midpoint between adjacent finite values rounds to the one with the even
    /// mantissa; a hair above or below rounds to the nearer one.
    fn check_midpoints(format: Fp8Format, reference: fn(u8) -> f64) {
        let mut finite: Vec<(f64, u8)> = (0..=0x7Fu8)
            .map(|b| (reference(b), b))
            .filter(|(v, _)| v.is_finite())
            .collect();
        finite.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        for pair in finite.windows(2) {
            let ((lo, lo_bits), (hi, hi_bits)) = (pair[0], pair[1]);
            let mid = (lo + hi) / 2.0;
            let even = if lo_bits & 1 == 0 { lo_bits } else { hi_bits };
            assert_eq!(format.encode(mid as f32), even, "midpoint {mid}");
            assert_eq!(format.encode(-mid as f32), even | 0x80, "midpoint -{mid}");
            let below = f32::from_bits((mid as f32).to_bits() - 1);
            let above = f32::from_bits((mid as f32).to_bits() + 1);
            assert_eq!(format.encode(below), lo_bits, "below midpoint {mid}");
            assert_eq!(format.encode(above), hi_bits, "above midpoint {mid}");
        }
    }

    #[test]
    fn e4m3_rounds_midpoints_to_even() {
        check_midpoints(E4M3, e4m3_reference);
        // Between 0 and the smallest subnormal: the midpoint goes to zero (even).
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_e4m3(2f32.powi(-10) * 1.0001), 0x01);
        // 1 + 1/16 lies between 1 and 1.125: tie to the even mantissa, 1.0.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
    }

    #[test]
    fn e5m2_rounds_midpoints_to_even() {
        check_midpoints(E5M2, e5m2_reference);
        assert_eq!(f32_to_e5m2(2f32.powi(-17)), 0x00);
        assert_eq!(f32_to_e5m2(1.125), 0x3C);
        assert_eq!(f32_to_e5m2(1.375), 0x3E);
    }

    #[test]
    fn out_of_range_saturates_and_nan_stays_nan() {
        for x in [449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(f32_to_e4m3(x), 0x7E, "{x}");
            assert_eq!(f32_to_e4m3(-x), 0xFE, "-{x}");
        }
        for x in [57345.0, 61440.0, 65536.0, 1e9, f32::INFINITY] {
            assert_eq!(f32_to_e5m2(x), 0x7B, "{x}");
            assert_eq!(f32_to_e5m2(-x), 0xFB, "-{x}");
        }
        assert!(e4m3_to_f32(f32_to_e4m3(f32::NAN)).is_nan());
        assert!(e5m2_to_f32(f32_to_e5m2(f32::NAN)).is_nan());
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        assert_eq!(f32_to_e5m2(-0.0), 0x80);
        assert_eq!(f32_to_e4m3(1e-30), 0x00);
    }
}
