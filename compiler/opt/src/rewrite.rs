//! Helpers shared by the passes: forwarding uses of one value to another along program
//! order, reading constants off `full` ops, and counting instructions.
//!
//! None of the passes creates values: a rewrite either changes an instruction in place
//! (keeping its result values, whose types must not change) or forwards every later use of
//! a result to an equivalent value that dominates it, leaving the now unused instruction
//! for `dce` to remove.

use kiln_ir::func::visit_insts;
use kiln_ir::{DType, Function, Module, Op, Tensor, TensorData, Value};

/// Where the uses of each value go: `None` keeps the value, `Some(v)` forwards its uses
/// to `v` (which must dominate every one of them).
#[derive(Clone, Debug)]
pub(crate) struct Forwarding {
    to: Vec<Option<Value>>,
}

impl Forwarding {
    pub(crate) fn new(value_count: usize) -> Forwarding {
        Forwarding {
            to: vec![None; value_count],
        }
    }

    /// Forwards the uses of `from` to `to`.
    pub(crate) fn forward(&mut self, from: Value, to: Value) {
        debug_assert_ne!(from, to, "forwarding a value to itself");
        self.to[from.0 as usize] = Some(to);
    }

    /// The value that uses of `v` refer to now (following chains of forwards).
    pub(crate) fn resolve(&self, mut v: Value) -> Value {
        while let Some(next) = self.to[v.0 as usize] {
            v = next;
        }
        v
    }

    /// Rewrites `values` in place; returns whether any of them changed.
    pub(crate) fn apply(&self, values: &mut [Value]) -> bool {
        let mut changed = false;
        for v in values {
            let resolved = self.resolve(*v);
            if resolved != *v {
                *v = resolved;
                changed = true;
            }
        }
        changed
    }
}

/// The one element of a `full` op, converted to its dtype as the interpreter converts it:
/// a 0-d tensor.
pub(crate) fn full_element(dtype: DType, value: f64) -> Tensor {
    Tensor::full(dtype, &[], value)
}

/// The element of a `full` op (its one value, converted to its dtype); `None` for any
/// other op.
pub(crate) fn full_constant(op: &Op) -> Option<Tensor> {
    match op {
        Op::Full { value, dtype, .. } => Some(full_element(*dtype, *value)),
        _ => None,
    }
}

/// Whether two tensors hold the same elements bit for bit (floats compared by their bits,
/// so `-0.0` differs from `0.0` and NaNs equal only NaNs of the same bits).
pub(crate) fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    if a.dtype != b.dtype || a.shape != b.shape {
        return false;
    }
    match (&a.data, &b.data) {
        (TensorData::Float(x), TensorData::Float(y)) => {
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        }
        (x, y) => x == y,
    }
}

/// Whether a 0-d tensor's one element is the number `n` (bool: `n` of 0 or 1).
pub(crate) fn element_is(element: &Tensor, n: f64) -> bool {
    match &element.data {
        TensorData::Float(v) => v.first().is_some_and(|&x| f64::from(x) == n),
        TensorData::Int(v) => v.first().is_some_and(|&x| x as f64 == n),
        TensorData::Bool(v) => v.first().is_some_and(|&x| f64::from(u8::from(x)) == n),
    }
}

/// The number of instructions of a function, those in nested regions included.
pub fn count_insts(func: &Function) -> usize {
    let mut count = 0;
    visit_insts(&func.body, &mut |_| count += 1);
    count
}

/// The number of instructions of every function of a module.
pub fn count_module_insts(module: &Module) -> usize {
    module.functions.iter().map(count_insts).sum()
}
