//! Concrete tensors for the reference interpreter: a dtype, a shape of sizes and row-major
//! data, with the rounding rules that define every float dtype.
//!
//! Storage: floats of every width live in `f32` values that are exactly representable in
//! the tensor's dtype (constructors round; every op rounds its results); integers of every
//! width live in `i64` values within the dtype's range; bools in `bool`.

use crate::fp8::{E4M3, E5M2};
use crate::types::{DType, Dim, Shape, TensorType};
use crate::IrError;
use half::{bf16, f16};

/// The elements of a tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    Float(Vec<f32>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::Float(v) => v.len(),
            TensorData::Int(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements at `offsets`, in that order.
    pub fn take(&self, offsets: &[usize]) -> TensorData {
        match self {
            TensorData::Float(v) => TensorData::Float(offsets.iter().map(|&i| v[i]).collect()),
            TensorData::Int(v) => TensorData::Int(offsets.iter().map(|&i| v[i]).collect()),
            TensorData::Bool(v) => TensorData::Bool(offsets.iter().map(|&i| v[i]).collect()),
        }
    }

    /// Storage for `dtype` with no elements.
    pub fn empty_for(dtype: DType) -> TensorData {
        if dtype.is_float() {
            TensorData::Float(Vec::new())
        } else if dtype.is_int() {
            TensorData::Int(Vec::new())
        } else {
            TensorData::Bool(Vec::new())
        }
    }

    /// Appends `other[range]` (both of one kind).
    pub fn extend_from(&mut self, other: &TensorData, range: std::ops::Range<usize>) {
        match (self, other) {
            (TensorData::Float(a), TensorData::Float(b)) => a.extend_from_slice(&b[range]),
            (TensorData::Int(a), TensorData::Int(b)) => a.extend_from_slice(&b[range]),
            (TensorData::Bool(a), TensorData::Bool(b)) => a.extend_from_slice(&b[range]),
            _ => panic!("extend_from: storage kinds differ"),
        }
    }
}

/// A tensor with concrete sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// The number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a shape, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

impl Tensor {
    /// A tensor from parts, checking that the storage kind fits the dtype, that the length
    /// fits the shape and that every element is a value of the dtype.
    pub fn new(dtype: DType, shape: Vec<usize>, data: TensorData) -> Result<Tensor, IrError> {
        let fits = match &data {
            TensorData::Float(v) => {
                dtype.is_float()
                    && v.iter()
                        .all(|&x| x.is_nan() || round_f32(dtype, x).to_bits() == x.to_bits())
            }
            TensorData::Int(v) => dtype.is_int() && v.iter().all(|&x| wrap_int(dtype, x) == x),
            TensorData::Bool(_) => dtype == DType::Bool,
        };
        if !fits {
            return Err(IrError::new(format!(
                "tensor data does not hold {dtype} values"
            )));
        }
        if data.len() != numel(&shape) {
            return Err(IrError::new(format!(
                "tensor data has {} elements, shape {shape:?} needs {}",
                data.len(),
                numel(&shape)
            )));
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// An f32 tensor. Panics when `data.len()` does not match the shape.
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor::from_floats(DType::F32, shape, data)
    }

    /// A tensor of a float dtype; each value is rounded to the dtype. Panics when `dtype`
    /// is not a float or `data.len()` does not match the shape.
    pub fn from_floats(dtype: DType, shape: &[usize], data: Vec<f32>) -> Tensor {
        assert!(
            dtype.is_float(),
            "from_floats: {dtype} is not a float dtype"
        );
        assert_eq!(
            data.len(),
            numel(shape),
            "from_floats: length vs shape {shape:?}"
        );
        let data = data.into_iter().map(|x| round_f32(dtype, x)).collect();
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data: TensorData::Float(data),
        }
    }

    /// A tensor of an integer dtype; values wrap to the dtype's width. Panics when `dtype`
    /// is not an integer or `data.len()` does not match the shape.
    pub fn from_ints(dtype: DType, shape: &[usize], data: Vec<i64>) -> Tensor {
        assert!(dtype.is_int(), "from_ints: {dtype} is not an integer dtype");
        assert_eq!(
            data.len(),
            numel(shape),
            "from_ints: length vs shape {shape:?}"
        );
        let data = data.into_iter().map(|x| wrap_int(dtype, x)).collect();
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data: TensorData::Int(data),
        }
    }

    /// An i32 tensor.
    pub fn from_i32(shape: &[usize], data: Vec<i32>) -> Tensor {
        Tensor::from_ints(DType::I32, shape, data.into_iter().map(i64::from).collect())
    }

    /// An i64 tensor.
    pub fn from_i64(shape: &[usize], data: Vec<i64>) -> Tensor {
        Tensor::from_ints(DType::I64, shape, data)
    }

    /// A bool tensor.
    pub fn from_bool(shape: &[usize], data: Vec<bool>) -> Tensor {
        assert_eq!(
            data.len(),
            numel(shape),
            "from_bool: length vs shape {shape:?}"
        );
        Tensor {
            dtype: DType::Bool,
            shape: shape.to_vec(),
            data: TensorData::Bool(data),
        }
    }

    /// A 0-d f32 tensor.
    pub fn scalar_f32(x: f32) -> Tensor {
        Tensor::from_f32(&[], vec![x])
    }

    /// A 0-d tensor of an integer dtype.
    pub fn scalar_int(dtype: DType, x: i64) -> Tensor {
        Tensor::from_ints(dtype, &[], vec![x])
    }

    /// A tensor of `shape` with every element `value` converted to `dtype` (the conversion
    /// of `cast`: floats round, integers truncate toward zero and saturate, bool is `!= 0`).
    pub fn full(dtype: DType, shape: &[usize], value: f64) -> Tensor {
        let n = numel(shape);
        let data = if dtype.is_float() {
            TensorData::Float(vec![round_f64(dtype, value); n])
        } else if dtype.is_int() {
            TensorData::Int(vec![float_to_int(dtype, value); n])
        } else {
            TensorData::Bool(vec![value != 0.0; n])
        };
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    /// A tensor of zeros (false for bool).
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        Tensor::full(dtype, shape, 0.0)
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The IR type of this tensor (every dim constant).
    pub fn ty(&self) -> TensorType {
        let dims = self.shape.iter().map(|&n| Dim::Const(n as u64)).collect();
        TensorType::new(self.dtype, Shape(dims))
    }

    /// The float elements, if the dtype is a float.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::Float(v) => Some(v),
            _ => None,
        }
    }

    /// The integer elements, if the dtype is an integer.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::Int(v) => Some(v),
            _ => None,
        }
    }

    /// The bool elements, if the dtype is bool.
    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            TensorData::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// Every element as f32 (integers rounded to nearest, bools as 0/1).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::Float(v) => v.clone(),
            TensorData::Int(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::Bool(v) => v.iter().map(|&b| f32::from(u8::from(b))).collect(),
        }
    }

    /// Every element as f64 (integers beyond 2^53 rounded, bools as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::Float(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Int(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
        }
    }

    /// Every element as i64 (floats converted like `cast` to i64, bools as 0/1).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match &self.data {
            TensorData::Float(v) => v
                .iter()
                .map(|&x| float_to_int(DType::I64, f64::from(x)))
                .collect(),
            TensorData::Int(v) => v.clone(),
            TensorData::Bool(v) => v.iter().map(|&b| i64::from(b)).collect(),
        }
    }

    /// The tensor converted to `to` with the semantics of the `cast` op.
    pub fn cast(&self, to: DType) -> Tensor {
        let data = match (&self.data, to) {
            (TensorData::Float(v), to) if to.is_float() => {
                TensorData::Float(v.iter().map(|&x| round_f32(to, x)).collect())
            }
            (TensorData::Float(v), to) if to.is_int() => {
                TensorData::Int(v.iter().map(|&x| float_to_int(to, f64::from(x))).collect())
            }
            (TensorData::Float(v), _) => TensorData::Bool(v.iter().map(|&x| x != 0.0).collect()),
            (TensorData::Int(v), to) if to.is_float() => {
                TensorData::Float(v.iter().map(|&x| round_i64(to, x)).collect())
            }
            (TensorData::Int(v), to) if to.is_int() => {
                TensorData::Int(v.iter().map(|&x| wrap_int(to, x)).collect())
            }
            (TensorData::Int(v), _) => TensorData::Bool(v.iter().map(|&x| x != 0).collect()),
            (TensorData::Bool(v), to) if to.is_float() => {
                TensorData::Float(v.iter().map(|&b| f32::from(u8::from(b))).collect())
            }
            (TensorData::Bool(v), to) if to.is_int() => {
                TensorData::Int(v.iter().map(|&b| i64::from(b)).collect())
            }
            (TensorData::Bool(v), _) => TensorData::Bool(v.clone()),
        };
        Tensor {
            dtype: to,
            shape: self.shape.clone(),
            data,
        }
    }

    /// The elements in their in-memory form: little-endian, `dtype.size_bytes()` each
    /// (f16/bf16 as IEEE/bfloat16 bits, f8 as OCP bits, bool as 0/1).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.numel() * self.dtype.size_bytes());
        match &self.data {
            TensorData::Float(v) => {
                for &x in v {
                    match self.dtype {
                        DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
                        DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                        DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
                        DType::F8E4M3 => out.push(E4M3.encode(x)),
                        DType::F8E5M2 => out.push(E5M2.encode(x)),
                        _ => unreachable!("float storage for {}", self.dtype),
                    }
                }
            }
            TensorData::Int(v) => {
                for &x in v {
                    match self.dtype {
                        DType::I8 => out.extend_from_slice(&(x as i8).to_le_bytes()),
                        DType::I32 => out.extend_from_slice(&(x as i32).to_le_bytes()),
                        _ => out.extend_from_slice(&x.to_le_bytes()),
                    }
                }
            }
            TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        }
        out
    }

    /// A tensor from its in-memory form (the inverse of [`Tensor::to_le_bytes`]).
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor, IrError> {
        let width = dtype.size_bytes();
        if bytes.len() != numel(shape) * width {
            return Err(IrError::new(format!(
                "{} bytes do not hold a {dtype} tensor of shape {shape:?}",
                bytes.len()
            )));
        }
        let chunks = bytes.chunks_exact(width);
        let data = match dtype {
            DType::F32 => TensorData::Float(
                chunks
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => TensorData::Float(
                chunks
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            DType::BF16 => TensorData::Float(
                chunks
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            DType::F8E4M3 => TensorData::Float(bytes.iter().map(|&b| E4M3.decode(b)).collect()),
            DType::F8E5M2 => TensorData::Float(bytes.iter().map(|&b| E5M2.decode(b)).collect()),
            DType::I8 => TensorData::Int(bytes.iter().map(|&b| i64::from(b as i8)).collect()),
            DType::I32 => TensorData::Int(
                chunks
                    .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ),
            DType::I64 => TensorData::Int(
                chunks
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                    .collect(),
            ),
            DType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        };
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }

    /// The largest absolute difference between two tensors of one shape, as f64 (NaN when
    /// exactly one side is NaN at some element, 0 where both are NaN).
    pub fn max_abs_diff(&self, other: &Tensor) -> f64 {
        assert_eq!(self.shape, other.shape, "max_abs_diff: shapes differ");
        self.to_f64_vec()
            .into_iter()
            .zip(other.to_f64_vec())
            .map(|(a, b)| match (a.is_nan(), b.is_nan()) {
                (true, true) => 0.0,
                (false, false) if a == b => 0.0,
                _ => (a - b).abs(),
            })
            .fold(0.0, |m: f64, d| if d.is_nan() || d > m { d } else { m })
    }
}

// ---------------------------------------------------------------------------------------
// Conversions that define the dtypes.
// ---------------------------------------------------------------------------------------

/// `x` rounded to the nearest value of the float `dtype` (ties to even). f16 overflows to
/// inf; f8 saturates to the largest finite value (see `fp8`); NaN stays NaN.
pub fn round_f32(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F8E4M3 => E4M3.round(x),
        DType::F8E5M2 => E5M2.round(x),
        _ => panic!("round_f32: {dtype} is not a float dtype"),
    }
}

/// `x` (an exact f64, e.g. an f64 accumulator) rounded once to the float `dtype`.
///
/// For narrow dtypes this goes through f32 rounded *to odd*: f32 keeps more than twice the
/// narrow format's precision plus two bits, so the second rounding (to nearest even) gives
/// the correctly rounded result with no double-rounding error.
pub fn round_f64(dtype: DType, x: f64) -> f32 {
    match dtype {
        DType::F32 => x as f32,
        _ => round_f32(dtype, f64_to_f32_round_to_odd(x)),
    }
}

/// An integer converted to the float `dtype`, rounded once to nearest even.
pub fn round_i64(dtype: DType, x: i64) -> f32 {
    match dtype {
        DType::F32 => x as f32,
        _ => {
            // Round to odd in f32, then to nearest in the narrow dtype (see `round_f64`).
            let nearest = x as f32;
            let back = nearest as f64 as i128;
            if back == i128::from(x) {
                return round_f32(dtype, nearest);
            }
            let mut bits = nearest.to_bits();
            if back.abs() > i128::from(x).abs() {
                bits -= 1;
            }
            round_f32(dtype, f32::from_bits(bits | 1))
        }
    }
}

/// `x` rounded to f32 with "round to odd": exact values stay, inexact ones go to the
/// neighbour (toward zero or away) whose last mantissa bit is 1.
fn f64_to_f32_round_to_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if !x.is_finite() || f64::from(nearest) == x {
        return nearest;
    }
    let mut bits = nearest.to_bits();
    if f64::from(nearest).abs() > x.abs() {
        // Step one unit toward zero (sign-magnitude bits: decrement the magnitude).
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

/// An integer wrapped (two's complement) to the width of the integer `dtype`.
pub fn wrap_int(dtype: DType, x: i64) -> i64 {
    match dtype {
        DType::I8 => i64::from(x as i8),
        DType::I32 => i64::from(x as i32),
        DType::I64 => x,
        _ => panic!("wrap_int: {dtype} is not an integer dtype"),
    }
}

/// The smallest and largest value of an integer dtype.
pub fn int_range(dtype: DType) -> (i64, i64) {
    match dtype {
        DType::I8 => (i64::from(i8::MIN), i64::from(i8::MAX)),
        DType::I32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
        DType::I64 => (i64::MIN, i64::MAX),
        _ => panic!("int_range: {dtype} is not an integer dtype"),
    }
}

/// A float converted to the integer `dtype`: truncated toward zero, saturated to the
/// dtype's range, NaN to 0 (PTX `cvt.rzi.sat`).
pub fn float_to_int(dtype: DType, x: f64) -> i64 {
    let (lo, hi) = int_range(dtype);
    if x.is_nan() {
        0
    } else {
        // `as` truncates toward zero and saturates at the i64 range.
        (x as i64).clamp(lo, hi)
    }
}
