//! Rust functions that JIT'd kernels call for what Cranelift has no instruction for: the
//! transcendental math functions and the narrow float conversions.
//!
//! Math helpers compute in f64 (libm) and round once to f32, which is well within the
//! kernel IR's 4-ulp bound. Conversions use `half` and `kiln_ir::fp8`, the same code the
//! reference interpreters use, so stores and loads of f16/bf16/f8 match them bit for bit.
//! Every helper takes and returns only `f32` and `i32`/`u32`, so each has one plain C
//! signature on every host.

use half::{bf16, f16};
use kiln_ir::fp8::{E4M3, E5M2};

/// One helper: its JIT symbol name, its address and its signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Helper {
    Exp,
    Exp2,
    Log,
    Sin,
    Cos,
    Tanh,
    Erf,
    Sigmoid,
    Rsqrt,
    Pow,
    Fmod,
    F16ToF32,
    F32ToF16,
    Bf16ToF32,
    F32ToBf16,
    E4m3ToF32,
    F32ToE4m3,
    E5m2ToF32,
    F32ToE5m2,
}

/// The scalar types that cross the helper ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HelperType {
    F32,
    /// 32-bit integer (bit patterns of narrow floats, zero-extended).
    U32,
}

impl Helper {
    pub(crate) const ALL: [Helper; 19] = [
        Helper::Exp,
        Helper::Exp2,
        Helper::Log,
        Helper::Sin,
        Helper::Cos,
        Helper::Tanh,
        Helper::Erf,
        Helper::Sigmoid,
        Helper::Rsqrt,
        Helper::Pow,
        Helper::Fmod,
        Helper::F16ToF32,
        Helper::F32ToF16,
        Helper::Bf16ToF32,
        Helper::F32ToBf16,
        Helper::E4m3ToF32,
        Helper::F32ToE4m3,
        Helper::E5m2ToF32,
        Helper::F32ToE5m2,
    ];

    /// The symbol the JIT'd code imports.
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            Helper::Exp => "kiln_cpu_exp_f32",
            Helper::Exp2 => "kiln_cpu_exp2_f32",
            Helper::Log => "kiln_cpu_log_f32",
            Helper::Sin => "kiln_cpu_sin_f32",
            Helper::Cos => "kiln_cpu_cos_f32",
            Helper::Tanh => "kiln_cpu_tanh_f32",
            Helper::Erf => "kiln_cpu_erf_f32",
            Helper::Sigmoid => "kiln_cpu_sigmoid_f32",
            Helper::Rsqrt => "kiln_cpu_rsqrt_f32",
            Helper::Pow => "kiln_cpu_pow_f32",
            Helper::Fmod => "kiln_cpu_fmod_f32",
            Helper::F16ToF32 => "kiln_cpu_f16_to_f32",
            Helper::F32ToF16 => "kiln_cpu_f32_to_f16",
            Helper::Bf16ToF32 => "kiln_cpu_bf16_to_f32",
            Helper::F32ToBf16 => "kiln_cpu_f32_to_bf16",
            Helper::E4m3ToF32 => "kiln_cpu_e4m3_to_f32",
            Helper::F32ToE4m3 => "kiln_cpu_f32_to_e4m3",
            Helper::E5m2ToF32 => "kiln_cpu_e5m2_to_f32",
            Helper::F32ToE5m2 => "kiln_cpu_f32_to_e5m2",
        }
    }

    /// The helper's address, for the JIT's symbol table.
    pub(crate) fn address(self) -> *const u8 {
        let unary: extern "C" fn(f32) -> f32 = match self {
            Helper::Exp => exp_f32,
            Helper::Exp2 => exp2_f32,
            Helper::Log => log_f32,
            Helper::Sin => sin_f32,
            Helper::Cos => cos_f32,
            Helper::Tanh => tanh_f32,
            Helper::Erf => erf_f32,
            Helper::Sigmoid => sigmoid_f32,
            Helper::Rsqrt => rsqrt_f32,
            Helper::Pow => return pow_f32 as *const u8,
            Helper::Fmod => return fmod_f32 as *const u8,
            Helper::F16ToF32 => return f16_to_f32 as *const u8,
            Helper::Bf16ToF32 => return bf16_to_f32 as *const u8,
            Helper::E4m3ToF32 => return e4m3_to_f32 as *const u8,
            Helper::E5m2ToF32 => return e5m2_to_f32 as *const u8,
            Helper::F32ToF16 => return f32_to_f16 as *const u8,
            Helper::F32ToBf16 => return f32_to_bf16 as *const u8,
            Helper::F32ToE4m3 => return f32_to_e4m3 as *const u8,
            Helper::F32ToE5m2 => return f32_to_e5m2 as *const u8,
        };
        unary as *const u8
    }

    /// Parameter types and the result type.
    pub(crate) fn signature(self) -> (&'static [HelperType], HelperType) {
        use HelperType::{F32, U32};
        match self {
            Helper::Exp
            | Helper::Exp2
            | Helper::Log
            | Helper::Sin
            | Helper::Cos
            | Helper::Tanh
            | Helper::Erf
            | Helper::Sigmoid
            | Helper::Rsqrt => (&[F32], F32),
            Helper::Pow | Helper::Fmod => (&[F32, F32], F32),
            Helper::F16ToF32 | Helper::Bf16ToF32 | Helper::E4m3ToF32 | Helper::E5m2ToF32 => {
                (&[U32], F32)
            }
            Helper::F32ToF16 | Helper::F32ToBf16 | Helper::F32ToE4m3 | Helper::F32ToE5m2 => {
                (&[F32], U32)
            }
        }
    }
}

extern "C" fn exp_f32(x: f32) -> f32 {
    libm::exp(f64::from(x)) as f32
}

/// As the interpreter computes it: in f64, rounded once.
extern "C" fn exp2_f32(x: f32) -> f32 {
    kiln_kir::kernel::exp2_ftz(x)
}

extern "C" fn log_f32(x: f32) -> f32 {
    libm::log(f64::from(x)) as f32
}

extern "C" fn sin_f32(x: f32) -> f32 {
    libm::sin(f64::from(x)) as f32
}

extern "C" fn cos_f32(x: f32) -> f32 {
    libm::cos(f64::from(x)) as f32
}

extern "C" fn tanh_f32(x: f32) -> f32 {
    libm::tanh(f64::from(x)) as f32
}

extern "C" fn erf_f32(x: f32) -> f32 {
    libm::erf(f64::from(x)) as f32
}

extern "C" fn sigmoid_f32(x: f32) -> f32 {
    (1.0 / (1.0 + libm::exp(-f64::from(x)))) as f32
}

extern "C" fn rsqrt_f32(x: f32) -> f32 {
    (1.0 / libm::sqrt(f64::from(x))) as f32
}

extern "C" fn pow_f32(x: f32, y: f32) -> f32 {
    libm::pow(f64::from(x), f64::from(y)) as f32
}

/// The exact remainder of `x / y` truncated toward zero (C's `fmodf`).
extern "C" fn fmod_f32(x: f32, y: f32) -> f32 {
    x % y
}

extern "C" fn f16_to_f32(bits: u32) -> f32 {
    f16::from_bits(bits as u16).to_f32()
}

extern "C" fn f32_to_f16(x: f32) -> u32 {
    u32::from(f16::from_f32(x).to_bits())
}

extern "C" fn bf16_to_f32(bits: u32) -> f32 {
    bf16::from_bits(bits as u16).to_f32()
}

extern "C" fn f32_to_bf16(x: f32) -> u32 {
    u32::from(bf16::from_f32(x).to_bits())
}

extern "C" fn e4m3_to_f32(bits: u32) -> f32 {
    E4M3.decode(bits as u8)
}

extern "C" fn f32_to_e4m3(x: f32) -> u32 {
    u32::from(E4M3.encode(x))
}

extern "C" fn e5m2_to_f32(bits: u32) -> f32 {
    E5M2.decode(bits as u8)
}

extern "C" fn f32_to_e5m2(x: f32) -> u32 {
    u32::from(E5M2.encode(x))
}
