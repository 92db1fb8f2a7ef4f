//! The verifier: checks the invariants every pass must keep. It runs after every pass.
//!
//! For a module:
//! - function names are unique;
//! - every function verifies.
//!
//! For a function:
//! 1. the value table and the name table have the same length, and every value that a
//!    region argument, an instruction result, an operand or a yield refers to is in it;
//! 2. every value of the table is defined exactly once: by a region argument (the body's
//!    arguments are the function's parameters) or by an instruction result — not twice,
//!    and not never;
//! 3. every use is dominated by its definition (standard SSA scoping for nested regions):
//!    an operand, or a value a region yields, is defined earlier in the same region (an
//!    argument, or a result of an earlier instruction) or in an enclosing region before the
//!    instruction that owns this region. So an instruction cannot use its own results,
//!    neither as operands nor inside its regions, and no value defined inside a region is
//!    visible outside it;
//! 4. each instruction has the operand count and the region count of its row in the op
//!    table;
//! 5. each instruction's stored result types (count and types) equal what
//!    [`Op::infer`](crate::Op::infer)
//!    computes from its operand types and its regions' signatures, which also checks each
//!    op's own region contract (a loop's body takes `(i64[], carried...)` and yields the
//!    carried types);
//! 6. the function's results (what its body yields) are defined in the body (a case of 3);
//! 7. every `kv_write` may update its cache in place (see [`crate::inplace`]).

use crate::func::{Function, Inst, Module, Region, RegionSignature, Value};
use crate::print::{describe_inst, format_type};
use crate::types::TensorType;
use crate::IrError;
use std::collections::BTreeSet;

/// Verifies every function of the module, and that their names are unique.
pub fn verify_module(module: &Module) -> Result<(), IrError> {
    let mut seen = BTreeSet::new();
    for func in &module.functions {
        if !seen.insert(func.name.as_str()) {
            return Err(IrError::new(format!(
                "function @{} is defined twice",
                func.name
            )));
        }
        verify_function(func)?;
    }
    Ok(())
}

/// Verifies one function (see the module doc for the invariants).
pub fn verify_function(func: &Function) -> Result<(), IrError> {
    let fail = |message: String| IrError::new(format!("in @{}: {message}", func.name));
    if func.names.len() != func.values.len() {
        return Err(fail(format!(
            "the name table has {} entries for {} values",
            func.names.len(),
            func.values.len()
        )));
    }
    let mut verifier = Verifier {
        func,
        times_defined: vec![0; func.values.len()],
        visible: vec![false; func.values.len()],
    };
    verifier
        .region(&func.body, "the function body")
        .map_err(fail)?;
    if let Some(v) = verifier.times_defined.iter().position(|&n| n == 0) {
        return Err(fail(format!(
            "%{v}: {} is never defined",
            format_type(&func.values[v])
        )));
    }
    crate::inplace::check_in_place(func).map_err(fail)?;
    Ok(())
}

struct Verifier<'f> {
    func: &'f Function,
    /// How often each value has been defined so far.
    times_defined: Vec<u32>,
    /// Whether each value may be used at the current point.
    visible: Vec<bool>,
}

impl Verifier<'_> {
    fn in_range(&self, v: Value, context: &str) -> Result<(), String> {
        if (v.0 as usize) < self.func.values.len() {
            Ok(())
        } else {
            Err(format!(
                "{context} refers to %{}, beyond the value table ({} values)",
                v.0,
                self.func.values.len()
            ))
        }
    }

    fn define(&mut self, v: Value, context: &str) -> Result<(), String> {
        self.in_range(v, context)?;
        let count = &mut self.times_defined[v.0 as usize];
        *count += 1;
        if *count > 1 {
            return Err(format!("%{} is defined more than once ({context})", v.0));
        }
        Ok(())
    }

    fn check_use(&self, v: Value, context: &str) -> Result<(), String> {
        self.in_range(v, context)?;
        if self.visible[v.0 as usize] {
            Ok(())
        } else {
            Err(format!(
                "{context} uses %{}, which is not defined before it in this region or an \
                 enclosing one",
                v.0
            ))
        }
    }

    fn region(&mut self, region: &Region, context: &str) -> Result<(), String> {
        let mut scope: Vec<Value> = Vec::new();
        for &arg in &region.args {
            self.define(arg, &format!("an argument of {context}"))?;
            self.visible[arg.0 as usize] = true;
            scope.push(arg);
        }
        for inst in &region.insts {
            self.inst(inst)?;
            scope.extend(&inst.results);
        }
        for &v in &region.yields {
            self.check_use(v, &format!("the yield of {context}"))?;
        }
        for v in scope {
            self.visible[v.0 as usize] = false;
        }
        Ok(())
    }

    fn inst(&mut self, inst: &Inst) -> Result<(), String> {
        let here = describe_inst(inst);
        for &v in &inst.operands {
            self.check_use(v, &here)?;
        }
        for (i, region) in inst.regions.iter().enumerate() {
            self.region(region, &format!("region {i} of {here}"))?;
        }
        for &v in &inst.results {
            self.define(v, &here)?;
        }
        self.check_types(inst, &here)?;
        for &v in &inst.results {
            self.visible[v.0 as usize] = true;
        }
        Ok(())
    }

    /// The stored result types equal what the op table infers.
    fn check_types(&self, inst: &Inst, here: &str) -> Result<(), String> {
        let func = self.func;
        let operand_types: Vec<&TensorType> = inst.operands.iter().map(|&v| func.ty(v)).collect();
        let signature = |values: &[Value]| -> Result<Vec<TensorType>, String> {
            values
                .iter()
                .map(|&v| {
                    self.in_range(v, here)?;
                    Ok(func.ty(v).clone())
                })
                .collect()
        };
        let regions = inst
            .regions
            .iter()
            .map(|r| {
                Ok(RegionSignature {
                    args: signature(&r.args)?,
                    yields: signature(&r.yields)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let inferred = inst.op.infer(&operand_types, &regions).map_err(|e| {
            // The type rule's message starts with the op's name, which `here` shows.
            let prefix = format!("{}: ", inst.op.name());
            let message = e.message.strip_prefix(&prefix).unwrap_or(&e.message);
            format!("{here}: {message}")
        })?;
        let stored: Vec<&TensorType> = inst.results.iter().map(|&v| func.ty(v)).collect();
        if stored.len() != inferred.len() || stored.iter().zip(&inferred).any(|(s, i)| *s != i) {
            let show = |types: Vec<&TensorType>| {
                types
                    .into_iter()
                    .map(format_type)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "{here}: stored result types ({}) differ from the op's type rule ({})",
                show(stored),
                show(inferred.iter().collect())
            ));
        }
        Ok(())
    }
}
