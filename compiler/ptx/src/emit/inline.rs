//! Prints a numeric [`Routine`] inline as PTX: each value gets a register (constants
//! become immediates), each operation the instruction of [`Op::signature`], a guarded
//! block a predicated branch around it, a do-while loop a backward branch.

use super::function::FunctionEmitter;
use super::regs::{Operand, Reg, RegKind};
use crate::numeric::{Inst, Op, Origin, Routine};

impl FunctionEmitter<'_, '_> {
    /// Emits `routine` on `inputs` (registers of its input kinds); returns its outputs.
    pub(super) fn inline_routine(&mut self, routine: &Routine, inputs: &[Reg]) -> Vec<Reg> {
        let mut values: Vec<Option<Operand>> = routine
            .values
            .iter()
            .map(|(_, origin)| match *origin {
                Origin::Input(n) => Some(Operand::Reg(inputs[n])),
                Origin::Const(value) => Some(Operand::Imm(value)),
                Origin::Computed => None,
            })
            .collect();
        let arguments: Vec<String> = inputs.iter().map(|r| r.to_string()).collect();
        self.comment(&format!("{}({})", routine.name, arguments.join(", ")));
        self.inline_block(routine, &routine.body, &mut values);
        routine
            .outputs
            .iter()
            .map(|v| {
                let operand = values[v.0 as usize].expect("outputs are computed");
                self.reg(operand, RegKind::of_kind(routine.kind(*v)))
            })
            .collect()
    }

    fn inline_block(&mut self, routine: &Routine, insts: &[Inst], values: &mut [Option<Operand>]) {
        let operand = |values: &[Option<Operand>], v: &crate::numeric::Val| {
            values[v.0 as usize].expect("a routine value is defined before it is used")
        };
        for inst in insts {
            match inst {
                Inst::Op { op, dst, args } => {
                    let args: Vec<Operand> = args.iter().map(|a| operand(values, a)).collect();
                    let kind = RegKind::of_kind(routine.kind(*dst));
                    let reg = self.fresh(kind);
                    self.routine_op(*op, reg, &args);
                    values[dst.0 as usize] = Some(Operand::Reg(reg));
                }
                Inst::Assign { dst, src } => {
                    let dst = operand(values, dst)
                        .reg()
                        .expect("assigned values are registers");
                    let src = operand(values, src);
                    self.inst(dst.kind.mov(), &[&dst, &src]);
                }
                Inst::If { cond, then } => {
                    let cond = operand(values, cond);
                    let cond = self.reg(cond, RegKind::Pred);
                    let skip = self.new_label("skip");
                    self.predicated(cond, true, "bra", &skip);
                    self.inline_block(routine, then, values);
                    self.label(&skip);
                }
                Inst::DoWhile { body, cond } => {
                    let top = self.new_label("loop");
                    self.label(&top);
                    self.inline_block(routine, body, values);
                    let cond = operand(values, cond);
                    let cond = self.reg(cond, RegKind::Pred);
                    self.predicated(cond, false, "bra", &top);
                }
            }
        }
    }

    fn routine_op(&mut self, op: Op, dst: Reg, args: &[Operand]) {
        if let Op::LoadTable(table) = op {
            self.ctx.tables.insert(table);
            let base = self.fresh(RegKind::B64);
            self.inst("mov.u64", &[&base, &table.ptx_name()]);
            let offset = self.fresh(RegKind::B64);
            self.inst("mul.wide.u32", &[&offset, &args[0], &4]);
            let address = self.fresh(RegKind::B64);
            self.inst("add.s64", &[&address, &base, &offset]);
            self.inst("ld.const.u32", &[&dst, &format!("[{address}]")]);
            return;
        }
        let signature = op.signature();
        let mut operands: Vec<&dyn std::fmt::Display> = vec![&dst];
        operands.extend(args.iter().map(|a| a as &dyn std::fmt::Display));
        self.inst(&signature.opcode, &operands);
    }
}
