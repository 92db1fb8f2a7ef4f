//! One kernel as one `.entry`: the prologue (parameters, special registers, register
//! zeroing), statements as structured branches and loops, expressions as instructions.
//!
//! Every kernel register ([`kiln_kir::VarId`]) owns one PTX register of its type for the
//! whole kernel; expressions compute into fresh registers. Registers, labels and names are
//! numbered in emission order, so the output is a function of the kernel alone.

use std::collections::BTreeSet;

use kiln_ir::DType;
use kiln_kir::print::Names;
use kiln_kir::{Access, Buf, Const, Expr, Kernel, Param, SharedLayout, Special, Stmt, Ty, VarId};

use super::features::Feature;
use super::isa::{self, BinaryLowering, CastLowering, UnaryLowering};
use super::regs::{Operand, Reg, RegKind, RegisterFile};
use super::scan::{
    collect_specials, definite_assignment, distinct_identifiers, sanitize, special_slot,
};
use super::EmitError;
use crate::numeric::{MathFunction, Scalar, Table};
use crate::target::{PtxVersion, Target};

/// What the kernels of one module share: the target, the version cap, and the features
/// and constant tables used so far.
#[derive(Debug)]
pub struct ModuleContext {
    pub target: Target,
    pub cap: Option<PtxVersion>,
    pub features: BTreeSet<Feature>,
    pub tables: BTreeSet<Table>,
    /// The `.minnctapersm` of kernels without shared memory ([`super::EmitOptions`]).
    pub streaming_blocks_per_sm: u32,
}

impl ModuleContext {
    pub fn new(target: Target, cap: Option<PtxVersion>) -> ModuleContext {
        ModuleContext {
            target,
            cap,
            features: BTreeSet::new(),
            tables: BTreeSet::new(),
            streaming_blocks_per_sm: 1,
        }
    }

    /// Whether `feature` may be used (the target has it within the version cap); records
    /// the use when it may.
    pub fn use_feature(&mut self, feature: Feature) -> bool {
        match feature.min_ptx_version(self.target) {
            Some(version) if self.cap.is_none_or(|cap| version <= cap) => {
                self.features.insert(feature);
                true
            }
            _ => false,
        }
    }
}

/// A typed result of an expression.
#[derive(Clone, Copy, Debug)]
pub struct Value {
    pub operand: Operand,
    pub ty: Ty,
}

/// Where a buffer lives.
#[derive(Clone, Debug)]
pub enum Place {
    /// A global buffer: the register holding its (global-window) address, and how the
    /// kernel may touch it.
    Global { pointer: Reg, access: Access },
    /// A shared array: the symbol it is addressed from, the array's byte offset from that
    /// symbol (nonzero only in the dynamic window) and the register holding its 32-bit
    /// address.
    Shared {
        symbol: String,
        offset: u64,
        base: Reg,
    },
}

/// The shared arrays' PTX symbols and their declarations.
#[derive(Clone, Debug)]
struct SharedArray {
    symbol: String,
    bytes: u64,
    dtype: DType,
    /// The byte offset from `symbol` (the dynamic window's arrays).
    offset: u64,
}

/// One line of a function body.
#[derive(Clone, Debug)]
enum Line {
    /// `[@[!]guard] opcode operands;`
    Inst {
        guard: Option<(Reg, bool)>,
        opcode: String,
        operands: Vec<String>,
    },
    Label(String),
    Comment(String),
}

impl Line {
    fn render(&self) -> String {
        match self {
            Line::Inst {
                guard,
                opcode,
                operands,
            } => {
                let guard = match guard {
                    Some((pred, true)) => format!("@!{pred} "),
                    Some((pred, false)) => format!("@{pred} "),
                    None => String::new(),
                };
                if operands.is_empty() {
                    format!("\t{guard}{opcode};")
                } else {
                    format!("\t{guard}{opcode} {};", operands.join(", "))
                }
            }
            Line::Label(label) => format!("{label}:"),
            Line::Comment(text) => format!("\t// {text}"),
        }
    }
}

/// Emits one kernel.
pub struct FunctionEmitter<'k, 'c> {
    pub(super) kernel: &'k Kernel,
    pub(super) ctx: &'c mut ModuleContext,
    names: Names<'k>,
    pub(super) regs: RegisterFile,
    lines: Vec<Line>,
    labels: u32,
    /// Per register class, the last number handed out by the prologue: higher numbers are
    /// expression temporaries.
    prologue_counts: [u32; 6],
    vars: Vec<Reg>,
    /// Per parameter: the buffer address or the scalar value.
    params: Vec<Reg>,
    param_symbols: Vec<String>,
    shared: Vec<SharedArray>,
    shared_bases: Vec<Reg>,
    /// The `.extern .shared` window of a kernel whose arrays exceed the static limit: its
    /// symbol and size ([`SharedLayout`]).
    dynamic_shared: Option<(String, u64)>,
    /// The alignment of the shared arrays and the window ([`SharedLayout::align`]).
    shared_align: u64,
    /// Registers of the special values the kernel reads (see [`special_slot`]).
    specials: [Option<Reg>; 7],
}

/// Emits `kernel` as a `.visible .entry` function.
pub fn emit_kernel(kernel: &Kernel, ctx: &mut ModuleContext) -> Result<String, EmitError> {
    let mut emitter = FunctionEmitter::new(kernel, ctx);
    emitter.prologue()?;
    emitter.statements(&kernel.body)?;
    emitter.inst("ret", &[]);
    Ok(emitter.finish())
}

impl<'k, 'c> FunctionEmitter<'k, 'c> {
    fn new(kernel: &'k Kernel, ctx: &'c mut ModuleContext) -> FunctionEmitter<'k, 'c> {
        let declared = kernel.params.iter().map(|p| sanitize(p.name())).chain(
            kernel
                .shared
                .iter()
                .map(|s| format!("smem_{}", sanitize(&s.name))),
        );
        let mut identifiers = distinct_identifiers(declared);
        let shared_symbols = identifiers.split_off(kernel.params.len());
        let layout = SharedLayout::of(kernel);
        // ptxas takes `.extern .shared` only at module scope, so the window's name carries
        // the kernel's (`emit_module` rejects a kernel named like another's window).
        let dynamic_shared = layout
            .dynamic
            .then(|| (dynamic_shared_symbol(&kernel.name), layout.bytes));
        let shared = kernel
            .shared
            .iter()
            .zip(shared_symbols)
            .zip(&layout.offsets)
            .map(|((s, symbol), &offset)| SharedArray {
                symbol: match &dynamic_shared {
                    Some((window, _)) => window.clone(),
                    None => symbol,
                },
                bytes: u64::from(s.len) * s.dtype.size_bytes() as u64,
                dtype: s.dtype,
                offset,
            })
            .collect();
        FunctionEmitter {
            kernel,
            ctx,
            names: Names::new(kernel),
            regs: RegisterFile::default(),
            lines: Vec::new(),
            labels: 0,
            prologue_counts: [0; 6],
            vars: Vec::new(),
            params: Vec::new(),
            param_symbols: identifiers,
            shared,
            shared_bases: Vec::new(),
            dynamic_shared,
            shared_align: layout.align,
            specials: [None; 7],
        }
    }

    // ---- output

    /// Appends `opcode operands;`.
    pub(super) fn inst(&mut self, opcode: &str, operands: &[&dyn std::fmt::Display]) {
        self.lines.push(Line::Inst {
            guard: None,
            opcode: opcode.to_string(),
            operands: operands.iter().map(|o| o.to_string()).collect(),
        });
    }

    /// Appends a predicated instruction `@p opcode operands;` (`@!p` when `negate`).
    pub(super) fn predicated(&mut self, pred: Reg, negate: bool, opcode: &str, operand: &str) {
        self.lines.push(Line::Inst {
            guard: Some((pred, negate)),
            opcode: opcode.to_string(),
            operands: vec![operand.to_string()],
        });
    }

    pub(super) fn label(&mut self, label: &str) {
        self.lines.push(Line::Label(label.to_string()));
    }

    pub(super) fn comment(&mut self, text: &str) {
        self.lines.push(Line::Comment(text.to_string()));
    }

    /// Makes the last instruction write `dst` instead of `result` when it is the
    /// unguarded instruction that computed the temporary `result` (then nothing else
    /// reads that temporary); returns whether it did.
    fn retarget_last(&mut self, result: Operand, dst: Reg) -> bool {
        let Operand::Reg(temp) = result else {
            return false;
        };
        let is_temporary = temp.number > self.prologue_counts[temp.kind as usize];
        if !is_temporary || temp.kind != dst.kind {
            return false;
        }
        match self.lines.last_mut() {
            Some(Line::Inst {
                guard: None,
                operands,
                ..
            }) if operands.first() == Some(&temp.to_string()) => {
                operands[0] = dst.to_string();
                true
            }
            _ => false,
        }
    }

    /// A fresh label name `$L<n>_<what>`.
    pub(super) fn new_label(&mut self, what: &str) -> String {
        self.labels += 1;
        format!("$L{}_{what}", self.labels)
    }

    pub(super) fn fresh(&mut self, kind: RegKind) -> Reg {
        self.regs.fresh(kind)
    }

    /// The register of a value, moving an immediate into a fresh one.
    pub(super) fn reg(&mut self, operand: Operand, kind: RegKind) -> Reg {
        match operand {
            Operand::Reg(reg) => reg,
            Operand::Imm(_) => {
                let reg = self.fresh(kind);
                self.inst(kind.mov(), &[&reg, &operand]);
                reg
            }
        }
    }

    pub(super) fn value_reg(&mut self, value: Value) -> Reg {
        self.reg(value.operand, RegKind::of_ty(value.ty))
    }

    fn finish(self) -> String {
        let kernel = self.kernel;
        let mut out = String::new();
        out.push_str(&format!("// kernel {}\n", kernel.name));
        if let Some((window, bytes)) = &self.dynamic_shared {
            out.push_str(&format!(
                "// {bytes} bytes of dynamic shared memory\n.extern .shared .align {} .b8 {window}[];\n",
                self.shared_align
            ));
        }
        out.push_str(&format!(".visible .entry {}(", kernel.name));
        let params: Vec<String> = kernel
            .params
            .iter()
            .zip(&self.param_symbols)
            .map(|(param, symbol)| format!("\t.param {} {symbol}", param_type(param)))
            .collect();
        if params.is_empty() {
            out.push_str(")\n");
        } else {
            out.push('\n');
            out.push_str(&params.join(",\n"));
            out.push_str("\n)\n");
        }
        // `.minnctapersm 1`: one block per SM is enough, so ptxas never caps registers to
        // reach a higher occupancy (which it otherwise does, spilling to local memory),
        // unless the kernel asks for more (`Kernel::blocks_per_sm`, a template that fits
        // its registers). Kernels without shared memory may be asked for more (a tuning
        // option). A request beyond the blocks whose shared memory the target's SM holds
        // is cut to those: more could never be resident, and the registers need not shrink
        // for them.
        let shared: u64 = self.shared.iter().map(|a| a.bytes).sum();
        let resident = self.ctx.target.shared_bytes_per_sm() / (shared + 1024);
        let blocks = if kernel.shared.is_empty() {
            self.ctx.streaming_blocks_per_sm.max(kernel.blocks_per_sm)
        } else {
            (u64::from(kernel.blocks_per_sm).min(resident)) as u32
        }
        .max(1);
        out.push_str(&format!(
            ".maxntid {}, 1, 1\n.minnctapersm {blocks}\n{{\n",
            kernel.block_dim
        ));
        for decl in self.regs.declarations() {
            out.push_str(&format!("\t{decl}\n"));
        }
        if self.dynamic_shared.is_none() {
            for array in &self.shared {
                out.push_str(&format!(
                    "\t.shared .align {} .b8 {}[{}];\n",
                    self.shared_align, array.symbol, array.bytes
                ));
            }
        }
        out.push('\n');
        for line in &self.lines {
            out.push_str(&line.render());
            out.push('\n');
        }
        out.push_str("}\n");
        out
    }

    // ---- prologue

    fn prologue(&mut self) -> Result<(), EmitError> {
        let kernel = self.kernel;
        for (param, symbol) in kernel.params.iter().zip(self.param_symbols.clone()) {
            let reg = match param {
                Param::Buffer { .. } => {
                    let reg = self.fresh(RegKind::B64);
                    self.inst("ld.param.u64", &[&reg, &format!("[{symbol}]")]);
                    self.inst("cvta.to.global.u64", &[&reg, &reg]);
                    reg
                }
                Param::Scalar { ty: Ty::Pred, .. } => {
                    let byte = self.fresh(RegKind::B16);
                    self.inst("ld.param.u8", &[&byte, &format!("[{symbol}]")]);
                    let reg = self.fresh(RegKind::Pred);
                    self.inst("setp.ne.u16", &[&reg, &byte, &0]);
                    reg
                }
                Param::Scalar { ty, .. } => {
                    let reg = self.fresh(RegKind::of_ty(*ty));
                    let load = format!("ld.param{}", param_type(param));
                    self.inst(&load, &[&reg, &format!("[{symbol}]")]);
                    reg
                }
            };
            self.params.push(reg);
        }
        for index in 0..self.shared.len() {
            let base = self.fresh(RegKind::B32);
            let array = &self.shared[index];
            let symbol = match array.offset {
                0 => array.symbol.clone(),
                offset => format!("{}+{offset}", array.symbol),
            };
            self.inst("mov.u32", &[&base, &symbol]);
            self.shared_bases.push(base);
        }
        let mut specials = BTreeSet::new();
        collect_specials(&kernel.body, &mut specials);
        if specials.contains(&special_slot(Special::WarpId)) {
            specials.insert(special_slot(Special::ThreadIdx));
        }
        for slot in specials {
            let reg = self.fresh(RegKind::B32);
            match slot {
                0 => self.inst("mov.u32", &[&reg, &"%tid.x"]),
                1..=3 => {
                    let axis = ["x", "y", "z"][slot - 1];
                    self.inst("mov.u32", &[&reg, &format!("%ctaid.{axis}")]);
                }
                4 => self.inst("mov.u32", &[&reg, &"%ntid.x"]),
                5 => self.inst("mov.u32", &[&reg, &"%laneid"]),
                _ => {
                    let tid = self.specials[0].expect("the thread index is read first");
                    self.inst("shr.u32", &[&reg, &tid, &5]);
                }
            }
            self.specials[slot] = Some(reg);
        }
        let mut listing = Vec::new();
        for (index, var) in kernel.vars.iter().enumerate() {
            let reg = self.fresh(RegKind::of_ty(var.ty));
            self.vars.push(reg);
            listing.push(format!("{} = {reg}", self.names.var(VarId(index as u32))));
        }
        if !listing.is_empty() {
            for chunk in listing.chunks(6) {
                self.comment(&format!("registers: {}", chunk.join(", ")));
            }
        }
        // Registers start at 0: zero those that some path may read before writing.
        let mut assigned = BTreeSet::new();
        let mut read_first = BTreeSet::new();
        definite_assignment(&kernel.body, &mut assigned, &mut read_first);
        for var in read_first {
            let reg = self.vars[var.0 as usize];
            let zero = zero_of(kernel.var_ty(var));
            self.inst(reg.kind.mov(), &[&reg, &Operand::Imm(zero)]);
        }
        // Programmatic dependent launch: wait until the kernel before this one has finished
        // and its writes are visible. Nothing before this point touches memory, so a kernel
        // launched early reads nothing stale. A kernel with a `GridDependencyWait` waits
        // there instead (what precedes it touches no memory but L2 prefetches, which the
        // verifier checks). The next kernel may launch once every block of this one has
        // exited (the implicit trigger) or executed a `LaunchDependents`: an explicit
        // `griddepcontrol.launch_dependents` at the start let later kernels' waiting blocks
        // take SMs early, and the 1.1B decode step measured no faster with it.
        let waits_later = kernel.body.contains(&Stmt::GridDependencyWait);
        if !waits_later && self.ctx.use_feature(Feature::GridDependencyControl) {
            self.inst("griddepcontrol.wait", &[]);
        }
        self.prologue_counts = self.regs.counts();
        Ok(())
    }

    // ---- statements

    fn statements(&mut self, stmts: &[Stmt]) -> Result<(), EmitError> {
        for stmt in stmts {
            self.statement(stmt)?;
        }
        Ok(())
    }

    fn statement(&mut self, stmt: &Stmt) -> Result<(), EmitError> {
        let head = self.names.stmt_head(stmt);
        self.comment(head.trim_end_matches(" {"));
        match stmt {
            Stmt::Assign(var, expr) => {
                let value = self.expr(expr)?;
                let dst = self.var_reg(*var)?;
                if !self.retarget_last(value.operand, dst) {
                    self.inst(dst.kind.mov(), &[&dst, &value.operand]);
                }
            }
            Stmt::Store { buf, index, value } => {
                let value = self.expr(value)?;
                self.store(*buf, index, value)?;
            }
            Stmt::LoadVec { dsts, buf, index }
                if dsts.first().is_some_and(|&d| {
                    kiln_kir::loads_raw_pairs(
                        self.dtype(*buf).unwrap_or(DType::F32),
                        self.kernel.var_ty(d),
                    )
                }) =>
            {
                let dsts = dsts
                    .iter()
                    .map(|&v| self.var_reg(v))
                    .collect::<Result<Vec<_>, _>>()?;
                self.load_raw_pairs(&dsts, *buf, index)?;
            }
            Stmt::LoadVec { dsts, buf, index } => {
                let dsts = dsts
                    .iter()
                    .map(|&v| self.var_reg(v))
                    .collect::<Result<Vec<_>, _>>()?;
                self.load_vector(&dsts, *buf, index)?;
            }
            Stmt::StoreVec { buf, index, values } => {
                let values = values
                    .iter()
                    .map(|v| self.expr(v))
                    .collect::<Result<Vec<_>, _>>()?;
                self.store_vector(*buf, index, &values)?;
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => self.for_loop(*var, start, end, step, body)?,
            Stmt::If {
                cond,
                then,
                otherwise,
            } => self.if_else(cond, then, otherwise)?,
            Stmt::Barrier => self.inst("bar.sync", &[&0]),
            Stmt::ShuffleXor { dst, src, mask } => self.shuffle_xor(*dst, *src, *mask)?,
            Stmt::Mma { input, d, a, b, c } => {
                let list = |e: &Self, vars: &[VarId]| -> Result<String, EmitError> {
                    let regs = vars
                        .iter()
                        .map(|&v| e.var_reg(v).map(|r| r.to_string()))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(format!("{{{}}}", regs.join(", ")))
                };
                if input.is_fp8() && !self.ctx.use_feature(Feature::Fp8Mma) {
                    return Err(self.error(format!(
                        "an {} mma needs sm_89 or later and PTX 8.4 ({} with cap {:?})",
                        input.name(),
                        self.ctx.target,
                        self.ctx.cap.map(|c| c.to_string())
                    )));
                }
                let opcode = format!(
                    "mma.sync.aligned.m16n8k{1}.row.col.f32.{0}.{0}.f32",
                    input.name(),
                    input.k()
                );
                let operands = [
                    list(self, d)?,
                    list(self, a)?,
                    list(self, b)?,
                    list(self, c)?,
                ];
                self.inst(
                    &opcode,
                    &[&operands[0], &operands[1], &operands[2], &operands[3]],
                );
            }
            Stmt::PackHalves { dst, input, lo, hi } => {
                let (lo, hi) = (self.expr(lo)?, self.expr(hi)?);
                let (lo, hi) = (self.value_reg(lo), self.value_reg(hi));
                let word = self.fresh(RegKind::B32);
                // The first source goes to the upper half.
                let opcode = format!("cvt.rn.{}x2.f32", input.name());
                self.inst(&opcode, &[&word, &hi, &lo]);
                let dst = self.var_reg(*dst)?;
                self.inst("mov.b32", &[&dst, &word]);
            }
            Stmt::LdMatrix {
                dsts,
                trans,
                buf,
                index,
            } => {
                let dsts = dsts
                    .iter()
                    .map(|&v| self.var_reg(v))
                    .collect::<Result<Vec<_>, _>>()?;
                self.ldmatrix(&dsts, *trans, *buf, index)?;
            }
            Stmt::CpAsync {
                dst,
                dst_index,
                src,
                src_index,
                src_len,
            } => self.cp_async(*dst, dst_index, *src, src_index, src_len)?,
            Stmt::CpAsyncCommit => self.inst("cp.async.commit_group", &[]),
            Stmt::CpAsyncWait(n) => self.inst("cp.async.wait_group", &[n]),
            Stmt::GridDependencyWait => {
                if self.ctx.use_feature(Feature::GridDependencyControl) {
                    self.inst("griddepcontrol.wait", &[]);
                }
            }
            Stmt::LaunchDependents => {
                if self.ctx.use_feature(Feature::GridDependencyControl) {
                    self.inst("griddepcontrol.launch_dependents", &[]);
                }
            }
            Stmt::PrefetchL2 { buf, index, bytes } => {
                if self.ctx.use_feature(Feature::BulkPrefetchL2) {
                    self.prefetch_l2(*buf, index, bytes)?;
                }
            }
            Stmt::Wgmma(op) => self.wgmma(op)?,
            Stmt::AtomicAdd {
                dst,
                buf,
                index,
                value,
            } => {
                let dst = self.var_reg(*dst)?;
                self.atomic_add(dst, *buf, index, value)?;
            }
            // Acquire and release at GPU scope (see `atomic_add` for the rule it serves).
            Stmt::Fence => self.inst("fence.acq_rel.gpu", &[]),
        }
        Ok(())
    }

    pub(super) fn var_reg(&self, var: VarId) -> Result<Reg, EmitError> {
        self.vars
            .get(var.0 as usize)
            .copied()
            .ok_or_else(|| self.error(format!("register {} is not declared", var.0)))
    }

    pub(super) fn error(&self, message: String) -> EmitError {
        EmitError::Unsupported {
            kernel: self.kernel.name.clone(),
            message,
        }
    }

    /// `for var = start; var < end; var += step`, with start, end and step evaluated once:
    /// a test before the first iteration, then a test at the bottom.
    fn for_loop(
        &mut self,
        var: VarId,
        start: &Expr,
        end: &Expr,
        step: &Expr,
        body: &[Stmt],
    ) -> Result<(), EmitError> {
        let counter = self.var_reg(var)?;
        let ty = self.kernel.var_ty(var);
        let (compare, add) = match ty {
            Ty::I32 => ("setp.lt.s32", "add.s32"),
            Ty::I64 => ("setp.lt.s64", "add.s64"),
            other => return Err(self.error(format!("a loop register of type {other}"))),
        };
        let start = self.expr(start)?;
        let end = self.expr(end)?;
        let step = self.expr(step)?;
        // `end` and `step` stay in registers the body does not write (the verifier's rule).
        self.inst(counter.kind.mov(), &[&counter, &start.operand]);
        let body_label = self.new_label("for_body");
        let end_label = self.new_label("for_end");
        let enter = self.fresh(RegKind::Pred);
        self.inst(compare, &[&enter, &counter, &end.operand]);
        self.predicated(enter, true, "bra", &end_label);
        self.label(&body_label);
        self.statements(body)?;
        self.inst(add, &[&counter, &counter, &step.operand]);
        let again = self.fresh(RegKind::Pred);
        self.inst(compare, &[&again, &counter, &end.operand]);
        self.predicated(again, false, "bra", &body_label);
        self.label(&end_label);
        Ok(())
    }

    fn if_else(&mut self, cond: &Expr, then: &[Stmt], otherwise: &[Stmt]) -> Result<(), EmitError> {
        let cond = self.expr(cond)?;
        if let Operand::Imm(Scalar::Pred(taken)) = cond.operand {
            return self.statements(if taken { then } else { otherwise });
        }
        let pred = self.value_reg(cond);
        let end_label = self.new_label("if_end");
        if otherwise.is_empty() {
            self.predicated(pred, true, "bra", &end_label);
            self.statements(then)?;
        } else {
            let else_label = self.new_label("if_else");
            self.predicated(pred, true, "bra", &else_label);
            self.statements(then)?;
            self.inst("bra", &[&end_label]);
            self.label(&else_label);
            self.statements(otherwise)?;
        }
        self.label(&end_label);
        Ok(())
    }

    /// `dst = src` of lane `lane ^ mask`, through `shfl.sync.bfly.b32` on 32-bit words.
    fn shuffle_xor(&mut self, dst: VarId, src: VarId, mask: u32) -> Result<(), EmitError> {
        let (dst_reg, src_reg) = (self.var_reg(dst)?, self.var_reg(src)?);
        let shuffle = |e: &mut Self, word: Reg| -> Reg {
            let out = e.fresh(RegKind::B32);
            e.inst("shfl.sync.bfly.b32", &[&out, &word, &mask, &31, &-1]);
            out
        };
        match self.kernel.var_ty(src) {
            Ty::I32 => {
                let out = shuffle(self, src_reg);
                self.inst("mov.b32", &[&dst_reg, &out]);
            }
            Ty::F32 => {
                let bits = self.fresh(RegKind::B32);
                self.inst("mov.b32", &[&bits, &src_reg]);
                let out = shuffle(self, bits);
                self.inst("mov.b32", &[&dst_reg, &out]);
            }
            Ty::I64 => {
                let (lo, hi) = (self.fresh(RegKind::B32), self.fresh(RegKind::B32));
                self.inst("mov.b64", &[&format!("{{{lo}, {hi}}}"), &src_reg]);
                let (lo_out, hi_out) = (shuffle(self, lo), shuffle(self, hi));
                self.inst("mov.b64", &[&dst_reg, &format!("{{{lo_out}, {hi_out}}}")]);
            }
            Ty::Pred => {
                let word = self.fresh(RegKind::B32);
                self.inst("selp.b32", &[&word, &1, &0, &src_reg]);
                let out = shuffle(self, word);
                self.inst("setp.ne.s32", &[&dst_reg, &out, &0]);
            }
        }
        Ok(())
    }

    // ---- expressions

    pub(super) fn expr(&mut self, expr: &Expr) -> Result<Value, EmitError> {
        Ok(match expr {
            Expr::Const(c) => Value {
                operand: Operand::Imm(scalar_of(*c)),
                ty: c.ty(),
            },
            Expr::Var(var) => Value {
                operand: Operand::Reg(self.var_reg(*var)?),
                ty: self.kernel.var_ty(*var),
            },
            Expr::Param(index) => match self.kernel.params.get(*index as usize) {
                Some(Param::Scalar { ty, .. }) => Value {
                    operand: Operand::Reg(self.params[*index as usize]),
                    ty: *ty,
                },
                _ => return Err(self.error(format!("parameter {index} is not a scalar"))),
            },
            Expr::Special(special) => {
                let reg = self.specials[special_slot(*special)]
                    .ok_or_else(|| self.error(format!("{special:?} was not collected")))?;
                Value {
                    operand: Operand::Reg(reg),
                    ty: Ty::I32,
                }
            }
            Expr::Unary(op, a) => {
                let a = self.expr(a)?;
                self.unary(*op, a)?
            }
            Expr::Binary(op, a, b) => {
                let a = self.expr(a)?;
                let b = self.expr(b)?;
                self.binary(*op, a, b)?
            }
            Expr::Fma(a, b, c) => {
                let (a, b, c) = (self.expr(a)?, self.expr(b)?, self.expr(c)?);
                let opcode =
                    isa::fma(a.ty).ok_or_else(|| self.error(format!("fma of {}", a.ty)))?;
                let a = Value {
                    operand: self.value_reg(a).into(),
                    ty: a.ty,
                };
                let dst = self.fresh(RegKind::of_ty(a.ty));
                self.inst(opcode, &[&dst, &a.operand, &b.operand, &c.operand]);
                Value {
                    operand: dst.into(),
                    ty: a.ty,
                }
            }
            Expr::Select(cond, a, b) => {
                let cond = self.expr(cond)?;
                let (a, b) = (self.expr(a)?, self.expr(b)?);
                self.select(cond, a, b)
            }
            Expr::Cast(to, a) => {
                let a = self.expr(a)?;
                self.cast(a, *to)
            }
            Expr::Load { buf, index } => self.load(*buf, index)?,
        })
    }

    fn unary(&mut self, op: kiln_kir::UnOp, a: Value) -> Result<Value, EmitError> {
        let lowering =
            isa::unary(op, a.ty).ok_or_else(|| self.error(format!("{op:?} of {}", a.ty)))?;
        let input = self.value_reg(a);
        let result = match lowering {
            UnaryLowering::Inst(opcode) => {
                let dst = self.fresh(input.kind);
                self.inst(opcode, &[&dst, &input]);
                dst
            }
            UnaryLowering::Routine(function) => self.math(function, &[input]),
            UnaryLowering::Round(dtype) => {
                let raw = self.narrow(dtype, a)?;
                self.widen(dtype, raw)?
            }
        };
        Ok(Value {
            operand: result.into(),
            ty: a.ty,
        })
    }

    fn binary(&mut self, op: kiln_kir::BinOp, a: Value, b: Value) -> Result<Value, EmitError> {
        let lowering =
            isa::binary(op, a.ty).ok_or_else(|| self.error(format!("{op:?} of {}", a.ty)))?;
        let result_ty = if op.is_comparison() { Ty::Pred } else { a.ty };
        let result = match lowering {
            BinaryLowering::Inst(opcode) => {
                let both_immediate = a.operand.reg().is_none() && b.operand.reg().is_none();
                let (a_op, b_op) = if a.ty == Ty::Pred {
                    (self.value_reg(a).into(), self.value_reg(b).into())
                } else if both_immediate {
                    (self.value_reg(a).into(), b.operand)
                } else {
                    (a.operand, b.operand)
                };
                let dst = self.fresh(RegKind::of_ty(result_ty));
                self.inst(opcode, &[&dst, &a_op, &b_op]);
                dst
            }
            BinaryLowering::Shift(opcode) => {
                let width = if a.ty == Ty::I64 { 64 } else { 32 };
                let amount = match b.operand {
                    // PTX clamps amounts (read as unsigned) at the width; do it here.
                    Operand::Imm(Scalar::I32(v)) => {
                        Operand::Imm(Scalar::I32((v as u32).min(width) as i32))
                    }
                    Operand::Imm(Scalar::I64(v)) => {
                        Operand::Imm(Scalar::I32((v as u64).min(u64::from(width)) as i32))
                    }
                    _ if b.ty == Ty::I64 => {
                        // Amounts of 64 or more (read as unsigned) shift everything out.
                        let clamped = self.fresh(RegKind::B64);
                        self.inst("min.u64", &[&clamped, &b.operand, &64]);
                        let narrow = self.fresh(RegKind::B32);
                        self.inst("cvt.u32.u64", &[&narrow, &clamped]);
                        Operand::Reg(narrow)
                    }
                    _ => b.operand,
                };
                let value = self.value_reg(a);
                let dst = self.fresh(RegKind::of_ty(a.ty));
                self.inst(opcode, &[&dst, &value, &amount]);
                dst
            }
            BinaryLowering::PredEquality { negate } => {
                let (a, b) = (self.value_reg(a), self.value_reg(b));
                let differ = self.fresh(RegKind::Pred);
                self.inst("xor.pred", &[&differ, &a, &b]);
                if negate {
                    let same = self.fresh(RegKind::Pred);
                    self.inst("not.pred", &[&same, &differ]);
                    same
                } else {
                    differ
                }
            }
            BinaryLowering::Routine(function) => {
                let inputs = [self.value_reg(a), self.value_reg(b)];
                self.math(function, &inputs)
            }
        };
        Ok(Value {
            operand: result.into(),
            ty: result_ty,
        })
    }

    fn select(&mut self, cond: Value, a: Value, b: Value) -> Value {
        let cond = self.value_reg(cond);
        let dst = match isa::select(a.ty) {
            Some(opcode) => {
                let dst = self.fresh(RegKind::of_ty(a.ty));
                self.inst(opcode, &[&dst, &a.operand, &b.operand, &cond]);
                dst
            }
            None => {
                // (cond and a) or (not cond and b)
                let (a, b) = (self.value_reg(a), self.value_reg(b));
                let when_true = self.fresh(RegKind::Pred);
                self.inst("and.pred", &[&when_true, &cond, &a]);
                let not_cond = self.fresh(RegKind::Pred);
                self.inst("not.pred", &[&not_cond, &cond]);
                let when_false = self.fresh(RegKind::Pred);
                self.inst("and.pred", &[&when_false, &not_cond, &b]);
                let dst = self.fresh(RegKind::Pred);
                self.inst("or.pred", &[&dst, &when_true, &when_false]);
                dst
            }
        };
        Value {
            operand: dst.into(),
            ty: a.ty,
        }
    }

    pub(super) fn cast(&mut self, a: Value, to: Ty) -> Value {
        let dst = match isa::cast(a.ty, to) {
            CastLowering::Identity => return a,
            CastLowering::Inst(opcode) => {
                let input = self.value_reg(a);
                let dst = self.fresh(RegKind::of_ty(to));
                self.inst(opcode, &[&dst, &input]);
                dst
            }
            CastLowering::NonZero(opcode) => {
                let zero = Operand::Imm(zero_of(a.ty));
                let input = self.value_reg(a);
                let dst = self.fresh(RegKind::Pred);
                self.inst(opcode, &[&dst, &input, &zero]);
                dst
            }
            CastLowering::FromPred(opcode) => {
                let input = self.value_reg(a);
                let one = Operand::Imm(one_of(to));
                let zero = Operand::Imm(zero_of(to));
                let dst = self.fresh(RegKind::of_ty(to));
                self.inst(opcode, &[&dst, &one, &zero, &input]);
                dst
            }
        };
        Value {
            operand: dst.into(),
            ty: to,
        }
    }

    /// Inlines the routine of `function` on `inputs`; returns its result register.
    pub(super) fn math(&mut self, function: MathFunction, inputs: &[Reg]) -> Reg {
        let routine = function.routine();
        let outputs = self.inline_routine(&routine, inputs);
        outputs[0]
    }

    // ---- places

    /// Where `buf` lives.
    pub(super) fn place(&self, buf: Buf) -> Result<Place, EmitError> {
        match buf {
            Buf::Global(index) => match self.kernel.params.get(index as usize) {
                Some(Param::Buffer { access, .. }) => Ok(Place::Global {
                    pointer: self.params[index as usize],
                    access: *access,
                }),
                _ => Err(self.error(format!("parameter {index} is not a buffer"))),
            },
            Buf::Shared(index) => self
                .shared
                .get(index as usize)
                .map(|array| Place::Shared {
                    symbol: array.symbol.clone(),
                    offset: array.offset,
                    base: self.shared_bases[index as usize],
                })
                .ok_or_else(|| self.error(format!("shared array {index} is not declared"))),
        }
    }

    /// The memory dtype of `buf`.
    pub(super) fn dtype(&self, buf: Buf) -> Result<DType, EmitError> {
        match buf {
            Buf::Global(index) => match self.kernel.params.get(index as usize) {
                Some(Param::Buffer { dtype, .. }) => Ok(*dtype),
                _ => Err(self.error(format!("parameter {index} is not a buffer"))),
            },
            Buf::Shared(index) => self
                .shared
                .get(index as usize)
                .map(|array| array.dtype)
                .ok_or_else(|| self.error(format!("shared array {index} is not declared"))),
        }
    }
}

/// The module-scope symbol of `kernel`'s dynamic shared-memory window.
pub(super) fn dynamic_shared_symbol(kernel: &str) -> String {
    format!("{kernel}$smem")
}

/// The `.param` type of a parameter: buffers are 64-bit addresses, predicates a byte (as a
/// C++ `bool` argument is passed).
fn param_type(param: &Param) -> &'static str {
    match param {
        Param::Buffer { .. } => ".u64",
        Param::Scalar { ty, .. } => match ty {
            Ty::Pred => ".u8",
            Ty::I32 => ".s32",
            Ty::I64 => ".s64",
            Ty::F32 => ".f32",
        },
    }
}

pub(super) fn scalar_of(c: Const) -> Scalar {
    match c {
        Const::Pred(v) => Scalar::Pred(v),
        Const::I32(v) => Scalar::I32(v),
        Const::I64(v) => Scalar::I64(v),
        Const::F32(v) => Scalar::F32(v),
    }
}

pub(super) fn zero_of(ty: Ty) -> Scalar {
    match ty {
        Ty::Pred => Scalar::Pred(false),
        Ty::I32 => Scalar::I32(0),
        Ty::I64 => Scalar::I64(0),
        Ty::F32 => Scalar::F32(0.0),
    }
}

fn one_of(ty: Ty) -> Scalar {
    match ty {
        Ty::Pred => Scalar::Pred(true),
        Ty::I32 => Scalar::I32(1),
        Ty::I64 => Scalar::I64(1),
        Ty::F32 => Scalar::F32(1.0),
    }
}
