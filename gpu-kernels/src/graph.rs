//! Facts about a graph function that fusion needs: where each value is defined, who uses
//! it, which region it lives in, and how expensive its element expression is.

use kiln_ir::{Dim, Function, Inst, Op, Region, UnaryOp, Value};

/// Where a value comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Def<'f> {
    /// The function's `n`th input.
    Input,
    /// An argument of a loop body (the counter or a carried value).
    RegionArg,
    /// A result of an instruction.
    Inst(&'f Inst),
}

/// The use-def structure of one function, over all of its regions.
pub(crate) struct FuncGraph<'f> {
    pub func: &'f Function,
    pub def: Vec<Option<Def<'f>>>,
    /// The region (index into `regions`) each value is defined in.
    pub region_of: Vec<usize>,
    /// For each value, the instructions using it: (region of the user, instruction).
    pub users: Vec<Vec<(usize, &'f Inst)>>,
    /// Values yielded by some region (function results, loop yields).
    pub yielded: Vec<bool>,
    pub regions: Vec<&'f Region>,
}

impl<'f> FuncGraph<'f> {
    pub fn new(func: &'f Function) -> FuncGraph<'f> {
        let n = func.values.len();
        let mut g = FuncGraph {
            func,
            def: vec![None; n],
            region_of: vec![0; n],
            users: vec![Vec::new(); n],
            yielded: vec![false; n],
            regions: Vec::new(),
        };
        for &v in func.params() {
            g.def[v.0 as usize] = Some(Def::Input);
        }
        g.visit(&func.body, true);
        g
    }

    fn visit(&mut self, region: &'f Region, is_body: bool) {
        let id = self.regions.len();
        self.regions.push(region);
        for &a in &region.args {
            if !is_body {
                self.def[a.0 as usize] = Some(Def::RegionArg);
            }
            self.region_of[a.0 as usize] = id;
        }
        for inst in &region.insts {
            for &o in &inst.operands {
                self.users[o.0 as usize].push((id, inst));
            }
            for &r in &inst.results {
                self.def[r.0 as usize] = Some(Def::Inst(inst));
                self.region_of[r.0 as usize] = id;
            }
            for sub in &inst.regions {
                let sub_id = self.regions.len();
                self.visit(sub, false);
                // Values used inside the body count as used by the loop instruction too.
                let mut outer_uses = Vec::new();
                collect_uses(sub, &mut outer_uses);
                for v in outer_uses {
                    if self.region_of[v.0 as usize] != sub_id && self.defined_before(v) {
                        self.users[v.0 as usize].push((id, inst));
                    }
                }
            }
        }
        for &y in &region.yields {
            self.yielded[y.0 as usize] = true;
        }
    }

    fn defined_before(&self, v: Value) -> bool {
        self.def[v.0 as usize].is_some()
    }

    pub fn ty(&self, v: Value) -> &'f kiln_ir::TensorType {
        self.func.ty(v)
    }

    pub fn shape(&self, v: Value) -> &'f [Dim] {
        self.func.ty(v).shape.dims()
    }

    pub fn inst(&self, v: Value) -> Option<&'f Inst> {
        match self.def[v.0 as usize] {
            Some(Def::Inst(inst)) => Some(inst),
            _ => None,
        }
    }

    pub fn op(&self, v: Value) -> Option<&'f Op> {
        self.inst(v).map(|i| &i.op)
    }

    /// A function input, a region argument, a checkpoint param or a loop result: a value
    /// that lives in a buffer no kernel of this region writes.
    pub fn is_source(&self, v: Value) -> bool {
        match self.def[v.0 as usize] {
            Some(Def::Input) | Some(Def::RegionArg) | None => true,
            Some(Def::Inst(inst)) => matches!(inst.op, Op::Param { .. } | Op::Loop),
        }
    }

    /// A function input that no `kv_write` updates in place: the runtime copies it in
    /// before the step's first kernel and no kernel writes it, so a kernel may load it
    /// before its grid-dependency wait (`Access::Settled`).
    pub fn is_step_input(&self, v: Value) -> bool {
        matches!(self.def[v.0 as usize], Some(Def::Input))
            && !self.users[v.0 as usize]
                .iter()
                .any(|(_, inst)| matches!(inst.op, Op::KvWrite { .. }) && inst.operands[0] == v)
    }

    /// A checkpoint tensor (`param`): no kernel of the program writes it, so a kernel may
    /// load it before its grid-dependency wait (`Access::Constant`).
    pub fn is_checkpoint(&self, v: Value) -> bool {
        matches!(self.op(v), Some(Op::Param { .. }))
    }

    /// Reductions and matmuls: values a kernel root computes.
    pub fn is_heavy(&self, v: Value) -> bool {
        matches!(
            self.op(v),
            Some(
                Op::Reduce { .. }
                    | Op::ArgMax { .. }
                    | Op::ArgMin { .. }
                    | Op::Sort { .. }
                    | Op::MatMul
                    | Op::Attention { .. }
                    | Op::KvWrite { .. }
                    | Op::PagedAttention { .. }
            )
        )
    }

    /// Element-wise and movement ops: inlined into their consumers.
    pub fn is_elementwise(&self, v: Value) -> bool {
        !self.is_source(v) && !self.is_heavy(v)
    }

    pub fn name(&self, v: Value) -> Option<&'f str> {
        self.func.names[v.0 as usize].as_deref()
    }

    /// Distinct instructions using `v` (a loop using it in its body counts once).
    pub fn user_count(&self, v: Value) -> usize {
        let users = &self.users[v.0 as usize];
        let mut n = 0;
        for (i, (_, inst)) in users.iter().enumerate() {
            if !users[..i].iter().any(|(_, j)| std::ptr::eq(*j, *inst)) {
                n += 1;
            }
        }
        n
    }
}

fn collect_uses(region: &Region, out: &mut Vec<Value>) {
    for inst in &region.insts {
        out.extend(inst.operands.iter().copied());
        for sub in &inst.regions {
            collect_uses(sub, out);
        }
    }
    out.extend(region.yields.iter().copied());
}

/// The work of computing one element of a value with its element-wise producers inlined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cost {
    pub loads: u32,
    pub transcendental: u32,
    pub arith: u32,
}

impl Cost {
    /// Loads weigh 2, transcendental functions 4, other arithmetic 1.
    pub fn total(self) -> u32 {
        self.loads * 2 + self.transcendental * 4 + self.arith
    }

    pub fn plus(self, other: Cost) -> Cost {
        Cost {
            loads: self.loads.saturating_add(other.loads),
            transcendental: self.transcendental.saturating_add(other.transcendental),
            arith: self.arith.saturating_add(other.arith),
        }
    }

    pub const LOAD: Cost = Cost {
        loads: 1,
        transcendental: 0,
        arith: 0,
    };
}

/// The cost an op adds on top of its operands'.
pub(crate) fn op_cost(op: &Op) -> Cost {
    let (transcendental, arith) = match op {
        Op::Unary(u) => match u {
            UnaryOp::Exp
            | UnaryOp::Log
            | UnaryOp::Sin
            | UnaryOp::Cos
            | UnaryOp::Tanh
            | UnaryOp::Sigmoid
            | UnaryOp::Erf
            | UnaryOp::Rsqrt
            | UnaryOp::Sqrt => (1, 0),
            _ => (0, 1),
        },
        Op::Binary(kiln_ir::BinaryOp::Pow) => (1, 0),
        Op::Binary(_) | Op::Select | Op::Cast { .. } | Op::Concat { .. } | Op::Gather { .. } => {
            (0, 1)
        }
        _ => (0, 0),
    };
    Cost {
        loads: 0,
        transcendental,
        arith,
    }
}
