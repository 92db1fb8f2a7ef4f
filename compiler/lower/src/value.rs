//! The values the lowering evaluates: IR tensors, and everything known at compile time
//! (numbers, strings, dims, dtypes, tuples) that never reaches the IR as data.

use kiln_ir::{DType, Dim, Value};
use std::fmt;

/// Handle of a model parameter declaration (an index into the lowering's param table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub u32);

/// A value during lowering.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    /// A tensor in the IR being built.
    Tensor(Value),
    /// A compile-time integer (also a constant dimension).
    Int(i64),
    /// A compile-time float.
    Float(f64),
    Bool(bool),
    Str(String),
    /// A symbolic dimension bound at run time (`S`, `T`).
    Sym(String),
    DType(DType),
    Tuple(Vec<Val>),
    /// `[a, b]` lists and `x.shape`.
    List(Vec<Val>),
    /// `a..b`
    Range(i64, i64),
    /// A model param not yet materialized as an IR `param` op (it may be tied to another).
    Param(ParamId),
    /// The `layers` of the current model, for `for L in layers`.
    Layers,
    /// The result of an expression that already produced a diagnostic; using it reports
    /// nothing more.
    Poison,
}

impl Val {
    /// A short description for error messages ("a tensor", "the integer 3", ...).
    pub fn describe(&self) -> String {
        match self {
            Val::Tensor(_) => "a tensor".into(),
            Val::Int(i) => format!("the integer {i}"),
            Val::Float(f) => format!("the number {f}"),
            Val::Bool(b) => format!("the boolean {b}"),
            Val::Str(s) => format!("the string {s:?}"),
            Val::Sym(s) => format!("the symbolic dim {s}"),
            Val::DType(d) => format!("the dtype {d}"),
            Val::Tuple(v) => format!("a tuple of {}", v.len()),
            Val::List(v) => format!("a list of {}", v.len()),
            Val::Range(a, b) => format!("the range {a}..{b}"),
            Val::Param(_) => "a param".into(),
            Val::Layers => "the model's layers".into(),
            Val::Poison => "an erroneous value".into(),
        }
    }

    /// The value as a dimension, when it is one.
    pub fn as_dim(&self) -> Option<Dim> {
        match self {
            Val::Int(i) if *i >= 0 => Some(Dim::Const(*i as u64)),
            Val::Sym(s) => Some(Dim::Sym(s.clone())),
            _ => None,
        }
    }
}

impl From<Dim> for Val {
    fn from(d: Dim) -> Val {
        match d {
            Dim::Const(n) => Val::Int(n as i64),
            Dim::Sym(s) => Val::Sym(s),
        }
    }
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A config value bound from config.json (or a default).
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl ConfigValue {
    pub fn to_val(&self) -> Val {
        match self {
            ConfigValue::Int(i) => Val::Int(*i),
            ConfigValue::Float(f) => Val::Float(*f),
            ConfigValue::Bool(b) => Val::Bool(*b),
            ConfigValue::Str(s) => Val::Str(s.clone()),
        }
    }
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Int(i) => write!(f, "{i}"),
            ConfigValue::Float(x) => write!(f, "{x:?}"),
            ConfigValue::Bool(b) => write!(f, "{b}"),
            ConfigValue::Str(s) => write!(f, "{s:?}"),
        }
    }
}
