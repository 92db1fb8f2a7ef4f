//! Conversions between f32 and the 8-bit float formats as [`Routine`]s, for targets without
//! the `cvt` forms (sm_80, or sm_89 under a PTX version cap below 8.1).
//!
//! They round exactly like `cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32` and `kiln_ir::fp8`:
//! to nearest even, saturating to ± the largest finite value (infinities included), NaN
//! kept (as `sign | 0x7F`). The tests compare them with `kiln_ir::fp8` bit for bit.

use super::routine::{Builder, Cmp, Kind, Op, Routine};

/// An OCP 8-bit float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fp8 {
    E4M3,
    E5M2,
}

impl Fp8 {
    fn mantissa_bits(self) -> i32 {
        match self {
            Fp8::E4M3 => 3,
            Fp8::E5M2 => 2,
        }
    }

    fn bias(self) -> i32 {
        match self {
            Fp8::E4M3 => 7,
            Fp8::E5M2 => 15,
        }
    }

    fn max_finite(self) -> f32 {
        match self {
            Fp8::E4M3 => 448.0,
            Fp8::E5M2 => 57_344.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fp8::E4M3 => "e4m3",
            Fp8::E5M2 => "e5m2",
        }
    }

    /// f32 → the format's byte (an i32 in 0..=255).
    pub fn encode_routine(self) -> Routine {
        let mut b = Builder::new(match self {
            Fp8::E4M3 => "f32_to_e4m3",
            Fp8::E5M2 => "f32_to_e5m2",
        });
        let x = b.input(Kind::F32);
        let mantissa_bits = self.mantissa_bits();
        let shift = 23 - mantissa_bits;
        let bits = b.op(Op::BitsOfF32, &[x]);
        let sign_word = b.int_const(Op::ShrU32, bits, 24);
        let sign = b.int_const(Op::AndI32, sign_word, 0x80);
        let magnitude = b.int_const(Op::AndI32, bits, 0x7FFF_FFFF);
        let is_nan = b.cmp_s32_const(Cmp::Gt, magnitude, 0x7F80_0000);
        // Saturate: everything from the largest finite value up (inf too) becomes it.
        let limit = self.max_finite().to_bits() as i32;
        let clamped = b.int_const(Op::MinS32, magnitude, limit);
        // Normal results: round the f32 bits to `mantissa_bits` (ties to even), rebias.
        let lsb_word = b.int_const(Op::ShrU32, clamped, shift);
        let lsb = b.int_const(Op::AndI32, lsb_word, 1);
        let half_minus_one = b.int_const(Op::AddI32, clamped, (1 << (shift - 1)) - 1);
        let rounded = b.op(Op::AddI32, &[half_minus_one, lsb]);
        let shifted = b.int_const(Op::ShrU32, rounded, shift);
        let normal_code = b.int_const(Op::SubI32, shifted, (127 - self.bias()) << mantissa_bits);
        // Subnormal results: count quanta of the smallest subnormal, rounded to even (a
        // count of 2^mantissa_bits is the smallest normal, whose code it also is).
        let value = b.op(Op::F32FromBits, &[clamped]);
        let quanta_scale = (2.0f32).powi(self.bias() - 1 + mantissa_bits);
        let quanta = b.mul_const(value, quanta_scale);
        let subnormal_code = b.op(Op::F32ToI32Round, &[quanta]);
        let smallest_normal = (2.0f32).powi(1 - self.bias()).to_bits() as i32;
        let is_subnormal = b.cmp_s32_const(Cmp::Lt, clamped, smallest_normal);
        let code = b.select(is_subnormal, subnormal_code, normal_code);
        let nan_code = b.i32(0x7F);
        let code = b.select(is_nan, nan_code, code);
        let byte = b.op(Op::OrI32, &[code, sign]);
        b.finish(&[byte])
    }
}

/// E4M3 byte (an i32 in 0..=255) → f32, exactly: the 7 magnitude bits placed in an f32's
/// exponent and fraction fields are the value times 2^-120 (subnormals included).
pub fn e4m3_decode_routine() -> Routine {
    let mut b = Builder::new("e4m3_to_f32");
    let byte = b.input(Kind::I32);
    let magnitude = b.int_const(Op::AndI32, byte, 0x7F);
    let sign = b.int_const(Op::AndI32, byte, 0x80);
    let sign_bit = b.int_const(Op::ShlI32, sign, 24);
    let field = b.int_const(Op::ShlI32, magnitude, 20);
    let bits = b.op(Op::OrI32, &[sign_bit, field]);
    let scaled = b.op(Op::F32FromBits, &[bits]);
    let value = b.mul_const(scaled, (2.0f32).powi(120));
    let is_nan = b.cmp_s32_const(Cmp::Eq, magnitude, 0x7F);
    let nan = b.f32(f32::NAN);
    let result = b.select(is_nan, nan, value);
    b.finish(&[result])
}
