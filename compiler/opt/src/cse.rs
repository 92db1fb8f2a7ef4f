//! cse: common-subexpression elimination — an instruction that repeats an earlier one (the
//! same op, attributes included, on the same operands, with no regions) reuses its results.
//!
//! Instructions are visited in program order with a scoped table: an instruction in a loop
//! body may reuse a value defined earlier in the body or in an enclosing region (before the
//! loop), never one defined inside another region, and nothing outside a region reuses a
//! value defined inside it. Ops are pure (a `param` reads the same checkpoint tensor every
//! time), so `param` ops with the same name and type merge too. Instructions with regions
//! (loops) are not merged. The repeated instruction stays in place, unused, for `dce`.
//!
//! The table is a `HashMap` used for lookups only; nothing iterates it, so the output does
//! not depend on its order.

use crate::pipeline::Pass;
use crate::rewrite::Forwarding;
use kiln_ir::{Function, IrError, Op, Region, Value};
use std::collections::HashMap;

/// The CSE pass.
pub const PASS: Pass = Pass {
    name: "cse",
    summary: "reuse the results of an earlier identical instruction (same op, attributes \
              and operands) that dominates a later one",
    run,
};

/// Runs CSE on one function; returns whether it changed anything.
pub fn run(func: &mut Function) -> Result<bool, IrError> {
    let mut cse = Cse {
        forwarding: Forwarding::new(func.values.len()),
        available: HashMap::new(),
        changed: false,
    };
    cse.region(&mut func.body);
    Ok(cse.changed)
}

/// What makes two instructions equal: the op with its attributes (as text, floats by their
/// bits) and the operands.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    op: String,
    operands: Vec<Value>,
}

/// The op and its attributes as a string that distinguishes every pair of different ops.
fn op_key(op: &Op) -> String {
    match op {
        // Distinguish floats by their bits: `Debug` prints every NaN as `NaN`.
        Op::Full {
            value,
            dtype,
            shape,
        } => format!("full {:016x} {dtype} {shape:?}", value.to_bits()),
        _ => format!("{op:?}"),
    }
}

struct Cse {
    forwarding: Forwarding,
    /// The results of the first instruction with each key, among those visible here.
    available: HashMap<Key, Vec<Value>>,
    changed: bool,
}

impl Cse {
    fn region(&mut self, region: &mut Region) {
        // The keys this region adds, removed when it ends.
        let mut added = Vec::new();
        for inst in &mut region.insts {
            self.changed |= self.forwarding.apply(&mut inst.operands);
            for nested in &mut inst.regions {
                self.region(nested);
            }
            if !inst.regions.is_empty() {
                continue;
            }
            let key = Key {
                op: op_key(&inst.op),
                operands: inst.operands.clone(),
            };
            match self.available.get(&key) {
                Some(earlier) => {
                    for (&result, &reused) in inst.results.iter().zip(earlier) {
                        self.forwarding.forward(result, reused);
                    }
                }
                None => {
                    self.available.insert(key.clone(), inst.results.clone());
                    added.push(key);
                }
            }
        }
        self.changed |= self.forwarding.apply(&mut region.yields);
        for key in added {
            self.available.remove(&key);
        }
    }
}
