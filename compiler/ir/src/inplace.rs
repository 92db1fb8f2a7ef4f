//! In-place updates: which results of a function are its inputs updated in place (a KV
//! cache through `kv_write`), and the rule that makes updating in place safe.
//!
//! `kv_write` is pure in the IR (its result is a new cache), but compiled plans store the
//! new rows into the cache operand's memory. That is equivalent as long as nothing reads
//! the old cache after the write, which holds when every other use of the operand is an
//! instruction the write depends on (so it has run before). [`check_in_place`] enforces it
//! (the verifier calls it); [`in_place_inputs`] tells the runtime which results alias which
//! parameters, so it can keep them resident between runs instead of copying them.

use crate::func::{Function, Inst, Region, Value};
use crate::ops::Op;
use std::collections::BTreeMap;

/// For each result of `func`: the parameter it updates in place, when the result is a chain
/// of `kv_write`s (in the function body) starting at that parameter.
pub fn in_place_inputs(func: &Function) -> Vec<Option<usize>> {
    let written: BTreeMap<Value, Value> = func
        .body
        .insts
        .iter()
        .filter(|inst| matches!(inst.op, Op::KvWrite { .. }))
        .map(|inst| (inst.results[0], inst.operands[0]))
        .collect();
    func.results()
        .iter()
        .map(|&result| {
            let mut v = result;
            if !written.contains_key(&v) {
                return None;
            }
            while let Some(&cache) = written.get(&v) {
                v = cache;
            }
            func.params().iter().position(|&p| p == v)
        })
        .collect()
}

/// Checks that every `kv_write` may update its cache operand in place: it is in the
/// function body (not inside a loop), no other `kv_write` writes the same operand, the
/// operand is not a result of the function, and every other instruction that uses the
/// operand is one the write depends on.
pub fn check_in_place(func: &Function) -> Result<(), String> {
    let insts = &func.body.insts;
    let mut nested = Vec::new();
    for inst in insts {
        for region in &inst.regions {
            collect_nested_writes(region, &mut nested);
        }
    }
    if let Some(inst) = nested.first() {
        return Err(format!(
            "kv_write of %{} is inside a loop; caches are written in the function body only",
            inst.operands[0].0
        ));
    }
    // Which top-level instruction defines each value, and which instructions use it
    // (an instruction with regions uses every outer value its regions use).
    let mut defined_by: BTreeMap<Value, usize> = BTreeMap::new();
    let mut users: BTreeMap<Value, Vec<usize>> = BTreeMap::new();
    let mut operands_of: Vec<Vec<Value>> = Vec::with_capacity(insts.len());
    for (i, inst) in insts.iter().enumerate() {
        for &r in &inst.results {
            defined_by.insert(r, i);
        }
        let mut used = inst.operands.clone();
        for region in &inst.regions {
            collect_uses(region, &mut used);
        }
        used.sort();
        used.dedup();
        for &v in &used {
            users.entry(v).or_default().push(i);
        }
        operands_of.push(used);
    }
    for (w, inst) in insts.iter().enumerate() {
        if !matches!(inst.op, Op::KvWrite { .. }) {
            continue;
        }
        let cache = inst.operands[0];
        if func.results().contains(&cache) {
            return Err(format!(
                "%{} is written in place by kv_write but is also a result of @{}",
                cache.0, func.name
            ));
        }
        let others: Vec<usize> = users[&cache].iter().copied().filter(|&u| u != w).collect();
        if others.is_empty() {
            continue;
        }
        let ancestors = ancestors_of(w, &operands_of, &defined_by);
        for u in others {
            if matches!(insts[u].op, Op::KvWrite { .. }) && insts[u].operands[0] == cache {
                return Err(format!("%{} is written by two kv_writes", cache.0));
            }
            if !ancestors[u] {
                return Err(format!(
                    "kv_write updates %{} in place, but {} (defining %{}) reads it and does \
                     not come before the write; read the cache the write returns instead",
                    cache.0,
                    insts[u].op.name(),
                    insts[u].results.first().map_or(0, |r| r.0)
                ));
            }
        }
    }
    Ok(())
}

/// Which top-level instructions instruction `at` depends on, transitively.
fn ancestors_of(
    at: usize,
    operands_of: &[Vec<Value>],
    defined_by: &BTreeMap<Value, usize>,
) -> Vec<bool> {
    let mut seen = vec![false; operands_of.len()];
    let mut stack = vec![at];
    while let Some(i) = stack.pop() {
        for v in &operands_of[i] {
            if let Some(&d) = defined_by.get(v) {
                if !seen[d] {
                    seen[d] = true;
                    stack.push(d);
                }
            }
        }
    }
    seen
}

fn collect_nested_writes<'r>(region: &'r Region, out: &mut Vec<&'r Inst>) {
    for inst in &region.insts {
        if matches!(inst.op, Op::KvWrite { .. }) {
            out.push(inst);
        }
        for r in &inst.regions {
            collect_nested_writes(r, out);
        }
    }
}

fn collect_uses(region: &Region, out: &mut Vec<Value>) {
    for inst in &region.insts {
        out.extend(&inst.operands);
        for r in &inst.regions {
            collect_uses(r, out);
        }
    }
    out.extend(&region.yields);
}
