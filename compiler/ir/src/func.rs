//! Functions, regions and instructions of the graph IR, and the builder that creates them.
//!
//! A [`Module`] holds functions. A [`Function`] owns a table of SSA values (each with its
//! [`TensorType`]) and a body [`Region`]. A region has arguments, a list of instructions and
//! the values it yields (a function's body yields its results; a loop body yields the next
//! carried state). Instructions are in SSA form: every value is defined once, by a region
//! argument or an instruction result, before it is used (see `verify`).

use crate::ops::Op;
use crate::types::TensorType;
use crate::IrError;
use std::fmt;

/// An SSA value: an index into its function's value table.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(pub u32);

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One operation applied to operands, defining its results (and owning nested regions,
/// such as a loop body).
#[derive(Clone, Debug, PartialEq)]
pub struct Inst {
    pub op: Op,
    pub operands: Vec<Value>,
    pub results: Vec<Value>,
    pub regions: Vec<Region>,
}

/// A sequence of instructions with arguments and yielded values.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Region {
    pub args: Vec<Value>,
    pub insts: Vec<Inst>,
    pub yields: Vec<Value>,
}

/// A function: typed parameters (the body's region arguments) and results (what the body yields).
#[derive(Clone, Debug, PartialEq)]
pub struct Function {
    pub name: String,
    /// The type of every value, indexed by `Value.0`.
    pub values: Vec<TensorType>,
    /// Optional source-level names of values (parameters, `let` bindings), for printing.
    pub names: Vec<Option<String>>,
    pub body: Region,
}

impl Function {
    pub fn new(name: impl Into<String>) -> Function {
        Function {
            name: name.into(),
            values: Vec::new(),
            names: Vec::new(),
            body: Region::default(),
        }
    }

    pub fn ty(&self, v: Value) -> &TensorType {
        &self.values[v.0 as usize]
    }

    /// Creates a fresh value of the given type (not yet defined anywhere).
    pub fn new_value(&mut self, ty: TensorType) -> Value {
        self.values.push(ty);
        self.names.push(None);
        Value(self.values.len() as u32 - 1)
    }

    /// Adds a parameter to the function.
    pub fn add_param(&mut self, ty: TensorType, name: Option<&str>) -> Value {
        let v = self.new_value(ty);
        self.names[v.0 as usize] = name.map(str::to_string);
        self.body.args.push(v);
        v
    }

    pub fn params(&self) -> &[Value] {
        &self.body.args
    }

    pub fn results(&self) -> &[Value] {
        &self.body.yields
    }

    /// Every `param` instruction of the function (checkpoint tensor references), in order.
    pub fn checkpoint_params(&self) -> Vec<(&str, &TensorType)> {
        let mut out = Vec::new();
        visit_insts(&self.body, &mut |inst| {
            if let Op::Param { name, ty } = &inst.op {
                out.push((name.as_str(), ty));
            }
        });
        out
    }
}

/// Calls `f` on every instruction of the region and its nested regions, in program order.
pub fn visit_insts<'r>(region: &'r Region, f: &mut impl FnMut(&'r Inst)) {
    for inst in &region.insts {
        f(inst);
        for r in &inst.regions {
            visit_insts(r, f);
        }
    }
}

/// A compilation unit: the functions lowered from one program.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Module {
    pub functions: Vec<Function>,
}

impl Module {
    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.iter().find(|f| f.name == name)
    }
}

/// Appends instructions to a function, inferring result types from the op table.
///
/// The builder keeps a stack of open regions: instructions go into the innermost one.
/// `begin_region`/`end_region` bracket the body of an op with a region (a loop).
pub struct Builder<'f> {
    pub func: &'f mut Function,
    open: Vec<Region>,
}

impl<'f> Builder<'f> {
    pub fn new(func: &'f mut Function) -> Builder<'f> {
        Builder {
            func,
            open: Vec::new(),
        }
    }

    pub fn ty(&self, v: Value) -> &TensorType {
        self.func.ty(v)
    }

    fn current(&mut self) -> &mut Region {
        match self.open.last_mut() {
            Some(r) => r,
            None => &mut self.func.body,
        }
    }

    /// Appends `op` applied to `operands`; returns its results. Fails (appending nothing)
    /// when the op's shape or dtype rule rejects the operands.
    pub fn push(&mut self, op: Op, operands: &[Value]) -> Result<Vec<Value>, IrError> {
        self.push_with_regions(op, operands, Vec::new())
    }

    /// Like [`Builder::push`] for an op with exactly one result.
    pub fn push1(&mut self, op: Op, operands: &[Value]) -> Result<Value, IrError> {
        let results = self.push(op, operands)?;
        debug_assert_eq!(results.len(), 1, "push1 on a multi-result op");
        Ok(results[0])
    }

    /// Appends an op that owns regions (built with `begin_region`/`end_region`).
    pub fn push_with_regions(
        &mut self,
        op: Op,
        operands: &[Value],
        regions: Vec<Region>,
    ) -> Result<Vec<Value>, IrError> {
        let operand_types: Vec<&TensorType> = operands.iter().map(|v| self.func.ty(*v)).collect();
        let region_types: Vec<RegionSignature> = regions
            .iter()
            .map(|r| RegionSignature {
                args: r.args.iter().map(|v| self.func.ty(*v).clone()).collect(),
                yields: r.yields.iter().map(|v| self.func.ty(*v).clone()).collect(),
            })
            .collect();
        let result_types = op.infer(&operand_types, &region_types)?;
        let results = result_types
            .into_iter()
            .map(|t| self.func.new_value(t))
            .collect::<Vec<_>>();
        let inst = Inst {
            op,
            operands: operands.to_vec(),
            results: results.clone(),
            regions,
        };
        self.current().insts.push(inst);
        Ok(results)
    }

    /// Opens a nested region whose arguments have the given types; returns the arguments.
    pub fn begin_region(&mut self, arg_types: Vec<TensorType>) -> Vec<Value> {
        let args: Vec<Value> = arg_types
            .into_iter()
            .map(|t| self.func.new_value(t))
            .collect();
        self.open.push(Region {
            args: args.clone(),
            insts: Vec::new(),
            yields: Vec::new(),
        });
        args
    }

    /// Closes the innermost open region, which yields `yields`.
    pub fn end_region(&mut self, yields: Vec<Value>) -> Region {
        let mut region = self.open.pop().expect("end_region without begin_region");
        region.yields = yields;
        region
    }

    /// Names a value for the text form (the last name given wins).
    pub fn name(&mut self, v: Value, name: &str) {
        self.func.names[v.0 as usize] = Some(name.to_string());
    }
}

/// The argument and yield types of a region, as an op's type rule sees them.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionSignature {
    pub args: Vec<TensorType>,
    pub yields: Vec<TensorType>,
}
