//! kiln's f32 math and 8-bit float conversions as exact, target-independent routines.
//!
//! The PTX emitter prints each [`routine::Routine`] as instructions; [`routine::Routine::eval`]
//! runs the same instructions in Rust with identical results (every operation is a
//! correctly rounded IEEE operation or integer arithmetic; no `.approx` instruction is
//! used). So the accuracy measured in Rust is the accuracy on the GPU.
//!
//! Measured worst errors against the exact result, in ulps of the f32 result (subnormal
//! ulps below 2^-126), from `tests/math_accuracy.rs` with 4 million samples per range
//! (`KILN_MATH_SAMPLES=4000000`, release) plus the hard cases; the tests assert 2 ulp
//! (1.5 for rsqrt, exactness for fmod), the kernel IR's contract is 4:
//!
//! | function | worst error | where | ranges sampled |
//! | --- | --- | --- | --- |
//! | exp | 1.16 ulp | 5.2004876 | ±[1e-8, 105] |
//! | log | 0.92 ulp | 1.5764403 | every binade of positive f32, dense in [0.5, 2] |
//! | sin | 1.54 ulp | 5.19653e30 | ±[1e-30, 4e5] and ±[4e5, f32::MAX]; the f32s next to every kπ/2 below 2^17 (1.47) |
//! | cos | 1.52 ulp | 1.1536725e8 | as sin (1.48 next to kπ/2) |
//! | tanh | 1.29 ulp | 0.6331813 | ±[1e-30, 12] |
//! | sigmoid | 1.51 ulp | -4.5042877 | ±[1e-30, 110] |
//! | erf | 1.04 ulp | 1.0645806 | ±[1e-30, 6] |
//! | rsqrt | 1.48 ulp | 1.8926417e-37 | every binade of positive f32 |
//! | pow | 1.17 ulp | pow(-7.287335, 26) | x ∈ [0, 4], y ∈ [-60, 60]; x ∈ [0, 1e4], y ∈ [-9, 9]; x ∈ [0.99, 1.01], y ∈ [-8000, 8000]; negative x with integer y; C's special cases exactly |
//! | fmod | exact | | random pairs, random bit patterns, specials |
//!
//! - [`math`]: exp, log, sin, cos, tanh, sigmoid, erf, rsqrt, pow, fmod.
//! - [`convert`]: f32 ↔ e4m3/e5m2 without the sm_89+ `cvt` forms.
//! - [`coefficients`]: the polynomial tables and split constants (fitted by
//!   `tools/fit_math.py`).
//! - [`two_over_pi`]: the bits of 2/π for the large-argument reduction of sin and cos.

pub mod coefficients;
pub mod convert;
pub mod math;
pub mod routine;
pub mod two_over_pi;

pub use convert::{e4m3_decode_routine, Fp8};
pub use math::MathFunction;
pub use routine::{Builder, Cmp, CmpType, Inst, Kind, Op, Origin, Routine, Scalar, Table, Val};
