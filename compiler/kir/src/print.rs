//! The text form of kernels and plans: readable and deterministic, for snapshot tests,
//! `kiln compile --emit kir` and error messages. (It is for people; there is no parser.)
//!
//! A kernel prints as its header (name, parameters, grid, block size, shared arrays,
//! registers) and then its statements, one per line, nested blocks indented by two spaces:
//!
//! ```text
//! kernel reverse_blocks_f32
//!   param x: global f32 read
//!   param out: global f32 write
//!   param n: i64
//!   grid [blocks, 1, 1]
//!   block_dim 128
//!   shared staged: f32[128]
//!   var base: i32
//!   var i: i32
//! {
//!   base = block_idx.x * block_dim
//!   @staged[thread_idx] = x[base + thread_idx]
//!   barrier
//!   for i = base; i < $n; i += 128 {
//!     if (i % 2) == 0 {
//!       out[i] = -@staged[i - base]
//!     }
//!   }
//! }
//! ```
//!
//! Expressions: registers by name (`name%id` when the name is empty or shared by several
//! registers), scalar parameters as `$name`, global buffers as `name[index]`, shared arrays
//! as `@name[index]`, constants as `3` (i32), `3i64`, `3.0` (f32), `true`; binary operators
//! infix with every nested binary operand in parentheses; `min`, `max`, `pow`, `fma`,
//! `select`, unary math and casts (`f32(x)`, `i64(x)`) as calls; `-x` and `!x`. Vector
//! accesses: `[v0, v1] = x[i..+2]` and `out[i..+2] = [e0, e1]`. Ids that are out of range
//! (in a kernel the verifier is about to reject) print as `?` forms instead of panicking.

use crate::kernel::{Access, BinOp, Buf, Const, Expr, Kernel, Param, Special, Stmt, UnOp, VarId};
use crate::plan::{Arg, BufferDecl, BufferKind, Plan, Step};
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

/// The name of a unary operator as printed (`Neg` and `Not` print as `-x` and `!x`).
pub fn unop_name(op: UnOp) -> &'static str {
    match op {
        UnOp::Neg => "neg",
        UnOp::Abs => "abs",
        UnOp::Exp => "exp",
        UnOp::Exp2 => "exp2",
        UnOp::Log => "log",
        UnOp::Sqrt => "sqrt",
        UnOp::Rsqrt => "rsqrt",
        UnOp::Sin => "sin",
        UnOp::Cos => "cos",
        UnOp::Tanh => "tanh",
        UnOp::Sigmoid => "sigmoid",
        UnOp::Erf => "erf",
        UnOp::Floor => "floor",
        UnOp::Ceil => "ceil",
        UnOp::Recip => "recip",
        UnOp::RoundBf16 => "round_bf16",
        UnOp::RoundF16 => "round_f16",
        UnOp::Not => "not",
    }
}

/// The symbol or function name of a binary operator as printed.
pub fn binop_symbol(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Rem => "%",
        BinOp::Min => "min",
        BinOp::Max => "max",
        BinOp::Pow => "pow",
        BinOp::And => "&",
        BinOp::Or => "|",
        BinOp::Xor => "^",
        BinOp::Shl => "<<",
        BinOp::Shr => ">>",
        BinOp::Eq => "==",
        BinOp::Ne => "!=",
        BinOp::Lt => "<",
        BinOp::Le => "<=",
        BinOp::Gt => ">",
        BinOp::Ge => ">=",
    }
}

/// Whether a binary operator prints as a call (`min(a, b)`) rather than infix.
fn binop_is_call(op: BinOp) -> bool {
    matches!(op, BinOp::Min | BinOp::Max | BinOp::Pow)
}

fn special_name(special: Special) -> String {
    match special {
        Special::ThreadIdx => "thread_idx".to_string(),
        Special::BlockIdx(0) => "block_idx.x".to_string(),
        Special::BlockIdx(1) => "block_idx.y".to_string(),
        Special::BlockIdx(2) => "block_idx.z".to_string(),
        Special::BlockIdx(axis) => format!("block_idx.{axis}?"),
        Special::BlockDim => "block_dim".to_string(),
        Special::LaneId => "lane_id".to_string(),
        Special::WarpId => "warp_id".to_string(),
    }
}

fn access_name(access: Access) -> &'static str {
    match access {
        Access::Read => "read",
        Access::Write => "write",
        Access::ReadWrite => "read_write",
        Access::Constant => "constant",
        Access::Settled => "settled",
    }
}

fn format_const(value: Const) -> String {
    match value {
        Const::Pred(b) => b.to_string(),
        Const::I32(x) => x.to_string(),
        Const::I64(x) => format!("{x}i64"),
        // `{:?}` keeps a decimal point or exponent (`1.0`, `1e-5`) and round-trips.
        Const::F32(x) if x.is_nan() => "nan".to_string(),
        Const::F32(x) => format!("{x:?}"),
    }
}

/// How one kernel's registers, parameters and buffers are named in its text form.
#[derive(Clone, Debug)]
pub struct Names<'k> {
    kernel: &'k Kernel,
    var_names: Vec<String>,
}

impl<'k> Names<'k> {
    pub fn new(kernel: &'k Kernel) -> Names<'k> {
        let mut uses: BTreeMap<&str, usize> = BTreeMap::new();
        for var in &kernel.vars {
            *uses.entry(var.name.as_str()).or_default() += 1;
        }
        let var_names = kernel
            .vars
            .iter()
            .enumerate()
            .map(|(id, var)| {
                if var.name.is_empty() || uses[var.name.as_str()] > 1 {
                    format!("{}%{id}", var.name)
                } else {
                    var.name.clone()
                }
            })
            .collect();
        Names { kernel, var_names }
    }

    pub fn var(&self, var: VarId) -> String {
        match self.var_names.get(var.0 as usize) {
            Some(name) => name.clone(),
            None => format!("%{}?", var.0),
        }
    }

    fn param(&self, index: u32) -> String {
        match self.kernel.params.get(index as usize) {
            Some(param) => format!("${}", param.name()),
            None => format!("$param{index}?"),
        }
    }

    fn buf(&self, buf: Buf) -> String {
        match buf {
            Buf::Global(index) => match self.kernel.params.get(index as usize) {
                Some(param) => param.name().to_string(),
                None => format!("global{index}?"),
            },
            Buf::Shared(index) => match self.kernel.shared.get(index as usize) {
                Some(shared) => format!("@{}", shared.name),
                None => format!("@shared{index}?"),
            },
        }
    }

    /// An expression in the text form.
    pub fn expr(&self, expr: &Expr) -> String {
        let mut out = String::new();
        self.write_expr(&mut out, expr, false);
        out
    }

    /// Writes `expr`; `nested` puts a binary operator in parentheses.
    fn write_expr(&self, out: &mut String, expr: &Expr, nested: bool) {
        match expr {
            Expr::Const(value) => out.push_str(&format_const(*value)),
            Expr::Var(var) => out.push_str(&self.var(*var)),
            Expr::Param(index) => out.push_str(&self.param(*index)),
            Expr::Special(special) => out.push_str(&special_name(*special)),
            Expr::Unary(UnOp::Neg, a) => {
                out.push('-');
                self.write_expr(out, a, true);
            }
            Expr::Unary(UnOp::Not, a) => {
                out.push('!');
                self.write_expr(out, a, true);
            }
            Expr::Unary(op, a) => self.write_call(out, unop_name(*op), &[a]),
            Expr::Binary(op, a, b) if binop_is_call(*op) => {
                self.write_call(out, binop_symbol(*op), &[a, b]);
            }
            Expr::Binary(op, a, b) => {
                if nested {
                    out.push('(');
                }
                self.write_expr(out, a, true);
                let _ = write!(out, " {} ", binop_symbol(*op));
                self.write_expr(out, b, true);
                if nested {
                    out.push(')');
                }
            }
            Expr::Fma(a, b, c) => self.write_call(out, "fma", &[a, b, c]),
            Expr::Select(c, a, b) => self.write_call(out, "select", &[c, a, b]),
            Expr::Cast(ty, a) => self.write_call(out, ty.name(), &[a]),
            Expr::Load { buf, index } => {
                out.push_str(&self.buf(*buf));
                out.push('[');
                self.write_expr(out, index, false);
                out.push(']');
            }
        }
    }

    fn write_call(&self, out: &mut String, name: &str, args: &[&Expr]) {
        out.push_str(name);
        out.push('(');
        for (i, arg) in args.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            self.write_expr(out, arg, false);
        }
        out.push(')');
    }

    fn expr_list(&self, exprs: impl IntoIterator<Item = String>) -> String {
        format!("[{}]", exprs.into_iter().collect::<Vec<_>>().join(", "))
    }

    /// The text of a warpgroup matrix-multiply statement.
    fn wgmma(&self, op: &crate::wgmma::WgmmaOp) -> String {
        use crate::wgmma::WgmmaOp;
        match op {
            WgmmaOp::Fence => "wgmma_fence".to_string(),
            WgmmaOp::Commit => "wgmma_commit".to_string(),
            WgmmaOp::Wait(n) => format!("wgmma_wait({n})"),
            WgmmaOp::FenceProxyAsync => "fence_proxy_async".to_string(),
            WgmmaOp::Mma {
                input,
                n,
                d,
                a,
                b,
                accumulate,
            } => {
                let tile = |t: &crate::wgmma::WgmmaTile| {
                    format!("{}[{}] sbo {}", self.buf(t.buf), self.expr(&t.index), t.sbo)
                };
                format!(
                    "{} = wgmma_m64n{n}k16_{}({}, {}{})",
                    self.expr_list(d.iter().map(|&v| self.var(v))),
                    input.name(),
                    tile(a),
                    tile(b),
                    if *accumulate { ", accumulate" } else { "" }
                )
            }
        }
    }

    /// The first line of a statement's text form (a `for` or `if` ends with `{`).
    pub fn stmt_head(&self, stmt: &Stmt) -> String {
        match stmt {
            Stmt::Assign(var, value) => format!("{} = {}", self.var(*var), self.expr(value)),
            Stmt::LoadVec { dsts, buf, index } => format!(
                "{} = {}[{}..+{}]",
                self.expr_list(dsts.iter().map(|&v| self.var(v))),
                self.buf(*buf),
                self.expr(index),
                dsts.len()
            ),
            Stmt::Store { buf, index, value } => format!(
                "{}[{}] = {}",
                self.buf(*buf),
                self.expr(index),
                self.expr(value)
            ),
            Stmt::StoreVec { buf, index, values } => format!(
                "{}[{}..+{}] = {}",
                self.buf(*buf),
                self.expr(index),
                values.len(),
                self.expr_list(values.iter().map(|v| self.expr(v)))
            ),
            Stmt::For {
                var,
                start,
                end,
                step,
                ..
            } => {
                let var = self.var(*var);
                format!(
                    "for {var} = {}; {var} < {}; {var} += {} {{",
                    self.expr(start),
                    self.expr(end),
                    self.expr(step)
                )
            }
            Stmt::If { cond, .. } => format!("if {} {{", self.expr(cond)),
            Stmt::Barrier => "barrier".to_string(),
            Stmt::ShuffleXor { dst, src, mask } => {
                format!(
                    "{} = shuffle_xor({}, {mask})",
                    self.var(*dst),
                    self.var(*src)
                )
            }
            Stmt::Mma { input, d, a, b, c } => {
                let list = |vars: &[VarId]| self.expr_list(vars.iter().map(|&v| self.var(v)));
                format!(
                    "{} = mma_m16n8k{}_{}({}, {}, {})",
                    list(d),
                    input.k(),
                    input.name(),
                    list(a),
                    list(b),
                    list(c)
                )
            }
            Stmt::PackHalves { dst, input, lo, hi } => format!(
                "{} = pack_{}x2({}, {})",
                self.var(*dst),
                input.name(),
                self.expr(lo),
                self.expr(hi)
            ),
            Stmt::LdMatrix {
                dsts,
                trans,
                buf,
                index,
            } => format!(
                "{} = ldmatrix_x{}{}({}[{}])",
                self.expr_list(dsts.iter().map(|&v| self.var(v))),
                dsts.len(),
                if *trans { "_trans" } else { "" },
                self.buf(*buf),
                self.expr(index)
            ),
            Stmt::CpAsync {
                dst,
                dst_index,
                src,
                src_index,
                src_len,
            } => format!(
                "cp_async({}[{}], {}[{}], {})",
                self.buf(*dst),
                self.expr(dst_index),
                self.buf(*src),
                self.expr(src_index),
                self.expr(src_len)
            ),
            Stmt::CpAsyncCommit => "cp_async_commit".to_string(),
            Stmt::CpAsyncWait(n) => format!("cp_async_wait({n})"),
            Stmt::GridDependencyWait => "grid_dependency_wait".to_string(),
            Stmt::PrefetchL2 { buf, index, bytes } => format!(
                "prefetch_l2({}[{}], {})",
                self.buf(*buf),
                self.expr(index),
                self.expr(bytes)
            ),
            Stmt::LaunchDependents => "launch_dependents".to_string(),
            Stmt::AtomicAdd {
                dst,
                buf,
                index,
                value,
            } => format!(
                "{} = atomic_add({}[{}], {})",
                self.var(*dst),
                self.buf(*buf),
                self.expr(index),
                self.expr(value)
            ),
            Stmt::Fence => "fence_gpu".to_string(),
            Stmt::Wgmma(op) => self.wgmma(op),
        }
    }

    /// Writes statements at `depth` levels of indentation (two spaces each).
    fn write_block(&self, out: &mut String, stmts: &[Stmt], depth: usize) {
        let indent = "  ".repeat(depth);
        for stmt in stmts {
            let _ = writeln!(out, "{indent}{}", self.stmt_head(stmt));
            match stmt {
                Stmt::For { body, .. } => {
                    self.write_block(out, body, depth + 1);
                    let _ = writeln!(out, "{indent}}}");
                }
                Stmt::If {
                    then, otherwise, ..
                } => {
                    self.write_block(out, then, depth + 1);
                    if !otherwise.is_empty() {
                        let _ = writeln!(out, "{indent}}} else {{");
                        self.write_block(out, otherwise, depth + 1);
                    }
                    let _ = writeln!(out, "{indent}}}");
                }
                _ => {}
            }
        }
    }
}

/// The text form of one statement and everything nested in it.
pub fn format_stmt(kernel: &Kernel, stmt: &Stmt) -> String {
    let mut out = String::new();
    Names::new(kernel).write_block(&mut out, std::slice::from_ref(stmt), 0);
    out
}

/// The text form of one expression of `kernel`.
pub fn format_expr(kernel: &Kernel, expr: &Expr) -> String {
    Names::new(kernel).expr(expr)
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = Names::new(self);
        writeln!(f, "kernel {}", self.name)?;
        for param in &self.params {
            match param {
                Param::Buffer {
                    name,
                    dtype,
                    access,
                } => writeln!(f, "  param {name}: global {dtype} {}", access_name(*access))?,
                Param::Scalar { name, ty } => writeln!(f, "  param {name}: {ty}")?,
            }
        }
        let [x, y, z] = &self.grid;
        writeln!(f, "  grid [{x}, {y}, {z}]")?;
        writeln!(f, "  block_dim {}", self.block_dim)?;
        if self.blocks_per_sm != 1 {
            writeln!(f, "  blocks_per_sm {}", self.blocks_per_sm)?;
        }
        for shared in &self.shared {
            writeln!(
                f,
                "  shared {}: {}[{}]",
                shared.name, shared.dtype, shared.len
            )?;
        }
        for (id, var) in self.vars.iter().enumerate() {
            writeln!(f, "  var {}: {}", names.var(VarId(id as u32)), var.ty)?;
        }
        let mut body = String::new();
        names.write_block(&mut body, &self.body, 1);
        write!(f, "{{\n{body}}}\n")
    }
}

fn buffer_list(ids: impl IntoIterator<Item = crate::plan::BufferId>) -> String {
    ids.into_iter()
        .map(|id| format!("b{}", id.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_buffer_decl(f: &mut fmt::Formatter<'_>, decl: &BufferDecl) -> fmt::Result {
    let shape: Vec<String> = decl.shape.iter().map(ToString::to_string).collect();
    write!(
        f,
        "  buffer b{}: {}[{}] ",
        decl.id.0,
        decl.dtype,
        shape.join(", ")
    )?;
    match &decl.kind {
        BufferKind::Input(n) => write!(f, "input {n}")?,
        BufferKind::Output(n) => write!(f, "output {n}")?,
        BufferKind::Weight(name) => write!(f, "weight {name:?}")?,
        BufferKind::Constant(bytes) => write!(f, "constant ({} bytes)", bytes.len())?,
        BufferKind::Temp => write!(f, "temp")?,
        BufferKind::Zeroed => write!(f, "zeroed")?,
        BufferKind::View(of) => write!(f, "view of b{}", of.0)?,
    }
    if let Some(offset) = &decl.offset {
        write!(f, " at offset {offset}")?;
    }
    writeln!(f)
}

fn write_steps(f: &mut fmt::Formatter<'_>, steps: &[Step], depth: usize) -> fmt::Result {
    let indent = "  ".repeat(depth);
    for step in steps {
        match step {
            Step::Launch { kernel, args } => {
                let args: Vec<String> = args
                    .iter()
                    .map(|arg| match arg {
                        Arg::Buffer(id) => format!("b{}", id.0),
                        Arg::Sym(name) => format!("sym {name}"),
                    })
                    .collect();
                writeln!(f, "{indent}launch kernel {kernel} ({})", args.join(", "))?;
            }
            Step::Copy { src, dst } => writeln!(f, "{indent}copy b{} -> b{}", src.0, dst.0)?,
            Step::Loop {
                count,
                carried,
                init,
                next,
                counter,
                body,
            } => {
                writeln!(
                    f,
                    "{indent}loop count b{} counter b{} carried [{}] init [{}] next [{}] {{",
                    count.0,
                    counter.0,
                    buffer_list(carried.iter().copied()),
                    buffer_list(init.iter().copied()),
                    buffer_list(next.iter().copied()),
                )?;
                write_steps(f, body, depth + 1)?;
                writeln!(f, "{indent}}}")?;
            }
            Step::BySize {
                symbol,
                at_most,
                small,
                large,
            } => {
                writeln!(f, "{indent}if {symbol} <= {at_most} {{")?;
                write_steps(f, small, depth + 1)?;
                writeln!(f, "{indent}}} else {{")?;
                write_steps(f, large, depth + 1)?;
                writeln!(f, "{indent}}}")?;
            }
        }
    }
    Ok(())
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan {}", self.function)?;
        for symbol in &self.symbols {
            writeln!(
                f,
                "  symbol {} = input {} axis {}",
                symbol.name, symbol.input, symbol.axis
            )?;
        }
        for decl in &self.buffers {
            write_buffer_decl(f, decl)?;
        }
        writeln!(f, "  inputs [{}]", buffer_list(self.inputs.iter().copied()))?;
        writeln!(
            f,
            "  outputs [{}]",
            buffer_list(self.outputs.iter().copied())
        )?;
        writeln!(f, "  arena_bytes {}", self.arena_bytes)?;
        if let Some(bound) = self.symbol_bound {
            writeln!(f, "  symbols at most {bound}")?;
        }
        writeln!(f, "{{")?;
        write_steps(f, &self.steps, 1)?;
        writeln!(f, "}}")
    }
}
