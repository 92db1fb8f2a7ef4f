//! dce: dead-code elimination — removes instructions whose results are unused, then compacts
//! the function's value and name tables, renumbering values in definition order.
//!
//! Liveness starts from what the function returns and runs backwards through each region:
//! an instruction is live when one of its results is, and then its operands are. Every op is
//! pure, so an unused instruction goes whatever its op (a `loop` too, when none of its
//! results is used: its body then goes with it). Inside a live loop, everything the body
//! yields is live (the carried state feeds the next iteration), and the dead instructions of
//! the body go. Function parameters and region arguments stay (they are signatures).
//!
//! Compaction gives the values new numbers in the order the verifier defines them: the
//! function's parameters, then for each instruction in program order its regions'
//! arguments and instructions (recursively) and then its results. Nothing else changes, so
//! the printed IR of equal functions is byte-identical. Instructions that fail at run time
//! (an integer division by zero) are removed like any other when unused.

use crate::pipeline::Pass;
use kiln_ir::{Function, IrError, Region, Value};

/// The DCE pass.
pub const PASS: Pass = Pass {
    name: "dce",
    summary: "remove instructions whose results are unused; compact and renumber values",
    run,
};

/// Runs DCE on one function; returns whether it changed anything (removals or new numbers).
pub fn run(func: &mut Function) -> Result<bool, IrError> {
    let mut live = vec![false; func.values.len()];
    for &v in &func.body.yields {
        live[v.0 as usize] = true;
    }
    let removed = sweep(&mut func.body, &mut live);
    let renumbered = compact(func);
    Ok(removed || renumbered)
}

/// Removes the dead instructions of `region`, whose yields are already marked live, and
/// marks the values its live instructions use. Returns whether it removed any.
fn sweep(region: &mut Region, live: &mut [bool]) -> bool {
    let mut removed = false;
    let mut kept = Vec::with_capacity(region.insts.len());
    for mut inst in std::mem::take(&mut region.insts).into_iter().rev() {
        if !inst.results.iter().any(|r| live[r.0 as usize]) {
            removed = true;
            continue;
        }
        for nested in &mut inst.regions {
            for &v in &nested.yields {
                live[v.0 as usize] = true;
            }
            removed |= sweep(nested, live);
        }
        for &v in &inst.operands {
            live[v.0 as usize] = true;
        }
        kept.push(inst);
    }
    kept.reverse();
    region.insts = kept;
    removed
}

/// Renumbers the values that are defined, in definition order, and drops the others from
/// the value and name tables. Returns whether any number changed.
fn compact(func: &mut Function) -> bool {
    let mut new_number = vec![u32::MAX; func.values.len()];
    let mut order: Vec<Value> = Vec::with_capacity(func.values.len());
    number_region(&func.body, &mut new_number, &mut order);
    let unchanged =
        order.len() == func.values.len() && order.iter().enumerate().all(|(i, v)| v.0 == i as u32);
    if unchanged {
        return false;
    }
    func.values = order
        .iter()
        .map(|v| func.values[v.0 as usize].clone())
        .collect();
    func.names = order
        .iter()
        .map(|v| func.names[v.0 as usize].take())
        .collect();
    renumber_region(&mut func.body, &new_number);
    true
}

/// Gives the values `region` defines their new numbers, in definition order.
fn number_region(region: &Region, new_number: &mut [u32], order: &mut Vec<Value>) {
    for &arg in &region.args {
        define(arg, new_number, order);
    }
    for inst in &region.insts {
        for nested in &inst.regions {
            number_region(nested, new_number, order);
        }
        for &result in &inst.results {
            define(result, new_number, order);
        }
    }
}

/// Gives `v` the next number.
fn define(v: Value, new_number: &mut [u32], order: &mut Vec<Value>) {
    new_number[v.0 as usize] = order.len() as u32;
    order.push(v);
}

fn renumber_region(region: &mut Region, new_number: &[u32]) {
    let renumber = |values: &mut Vec<Value>| {
        for v in values {
            *v = Value(new_number[v.0 as usize]);
        }
    };
    renumber(&mut region.args);
    for inst in &mut region.insts {
        renumber(&mut inst.operands);
        renumber(&mut inst.results);
        for nested in &mut inst.regions {
            renumber_region(nested, new_number);
        }
    }
    renumber(&mut region.yields);
}
