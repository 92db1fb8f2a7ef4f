//! The text form of the graph IR, printed. `parse` reads it back: for every module `m`,
//! `parse_module(&m.to_string()) == Ok(m)` (the same value numbers, names and types).
//!
//! ```text
//! func @forward(%0 "tokens": i32[B, S], %1: i64[]) -> (f32[B, S, 64], f32[B, S, 64]) {
//!   %2 = param {name = "model.embed_tokens.weight", ty = f32[256, 64]} : f32[256, 64]
//!   %3 "h" = gather {axis = 0} %2, %0 : f32[B, S, 64]
//!   %4, %5 = loop %1, %3, %3 : f32[B, S, 64], f32[B, S, 64] {
//!   ^(%6: i64[], %7: f32[B, S, 64], %8: f32[B, S, 64]):
//!     %9 = add %7, %8 : f32[B, S, 64]
//!     yield %9, %8
//!   }
//!   return %4, %5
//! }
//! ```
//!
//! - A function: `func @name(params) -> (result types) { body }`; the body ends with
//!   `return` and the values the function yields. Functions of a module are separated by
//!   a blank line.
//! - A value is defined as `%N`, followed by its name as a string when it has one; a
//!   parameter or region argument then shows `: type`.
//! - An instruction: `results = op {attrs} operands : result types`, then its regions. The
//!   attribute dict is left out when the op has no attributes, the `results =` part and
//!   the types when it has no results.
//! - A region: `{`, the line `^(arguments):`, its instructions, `yield values`, `}`.
//! - Attributes: integers, floats (Rust's shortest round-trip form, `inf`, `-inf`, `nan`),
//!   `true`/`false`, strings (`"..."` with `\\ \" \n \t \r \u{..}` escapes), dtypes, dims,
//!   lists of dims `[S, 64]` and tensor types `f32[S, 64]`.
//! - Identifiers (`@name`, symbolic dims) that are not `[A-Za-z_][A-Za-z0-9_]*` print
//!   as strings.
//! - A value of the function's table that nothing defines (an invalid function, rejected by
//!   the verifier) prints as `undefined %N: type` at the top of the body, so that even such
//!   a function survives a round trip.

use crate::func::{Function, Inst, Module, Region, Value};
use crate::ops::Attr;
use crate::types::{Dim, Shape, TensorType};
use std::fmt::{self, Write};

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, func) in self.functions.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{func}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut printer = Printer {
            func: self,
            out: String::new(),
        };
        printer.function().map_err(|_| fmt::Error)?;
        f.write_str(&printer.out)
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(n) => write!(f, "{n}"),
            Attr::Float(x) => f.write_str(&format_f64(*x)),
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::Str(s) => f.write_str(&quote(s)),
            Attr::DType(d) => write!(f, "{d}"),
            Attr::Dim(d) => f.write_str(&format_dim(d)),
            Attr::Dims(dims) => f.write_str(&format_dims(dims)),
            Attr::Type(t) => f.write_str(&format_type(t)),
            Attr::Ident(s) => f.write_str(s),
        }
    }
}

/// A float that parses back to the identical f64: Rust's shortest round-trip form, or
/// `inf`, `-inf`, `nan`.
pub fn format_f64(x: f64) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{x:?}")
    }
}

/// A string literal: `"..."` with `\\`, `\"`, `\n`, `\t`, `\r` and `\u{..}` for other
/// control characters.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether `s` prints bare: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn format_identifier(s: &str) -> String {
    if is_identifier(s) {
        s.to_string()
    } else {
        quote(s)
    }
}

fn format_dim(d: &Dim) -> String {
    match d {
        Dim::Const(n) => n.to_string(),
        Dim::Sym(s) => format_identifier(s),
    }
}

fn format_dims(dims: &[Dim]) -> String {
    let inner: Vec<String> = dims.iter().map(format_dim).collect();
    format!("[{}]", inner.join(", "))
}

/// `f32[S, 64]` (with symbols quoted where needed).
pub fn format_type(t: &TensorType) -> String {
    format!("{}{}", t.dtype, format_dims(t.shape.dims()))
}

/// `[S, 64]` (with symbols quoted where needed).
pub fn format_shape(s: &Shape) -> String {
    format_dims(s.dims())
}

struct Printer<'f> {
    func: &'f Function,
    out: String,
}

impl Printer<'_> {
    fn indent(&mut self, depth: usize) {
        for _ in 0..depth {
            self.out.push_str("  ");
        }
    }

    /// `%N` or `%N "name"`.
    fn definition(&mut self, v: Value) {
        let _ = write!(self.out, "%{}", v.0);
        if let Some(Some(name)) = self.func.names.get(v.0 as usize) {
            let _ = write!(self.out, " {}", quote(name));
        }
    }

    /// `%N "name": type`.
    fn typed_definition(&mut self, v: Value) {
        self.definition(v);
        let ty = format_type(self.func.ty(v));
        let _ = write!(self.out, ": {ty}");
    }

    fn value_list(&mut self, values: &[Value]) {
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            let _ = write!(self.out, "%{}", v.0);
        }
    }

    fn function(&mut self) -> fmt::Result {
        let func = self.func;
        write!(self.out, "func @{}(", format_identifier(&func.name))?;
        for (i, &v) in func.body.args.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            self.typed_definition(v);
        }
        self.out.push_str(") -> (");
        let results: Vec<String> = func
            .body
            .yields
            .iter()
            .map(|&v| format_type(func.ty(v)))
            .collect();
        self.out.push_str(&results.join(", "));
        self.out.push_str(") {\n");
        for v in undefined_values(func) {
            self.indent(1);
            self.out.push_str("undefined ");
            self.typed_definition(v);
            self.out.push('\n');
        }
        for inst in &func.body.insts {
            self.inst(inst, 1);
        }
        self.indent(1);
        self.out.push_str("return");
        if !func.body.yields.is_empty() {
            self.out.push(' ');
            self.value_list(&func.body.yields);
        }
        self.out.push_str("\n}\n");
        Ok(())
    }

    fn inst(&mut self, inst: &Inst, depth: usize) {
        self.indent(depth);
        for (i, &v) in inst.results.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            self.definition(v);
        }
        if !inst.results.is_empty() {
            self.out.push_str(" = ");
        }
        self.out.push_str(inst.op.name());
        let attrs = inst.op.attrs();
        if !attrs.is_empty() {
            let fields: Vec<String> = attrs.iter().map(|(k, a)| format!("{k} = {a}")).collect();
            let _ = write!(self.out, " {{{}}}", fields.join(", "));
        }
        if !inst.operands.is_empty() {
            self.out.push(' ');
            self.value_list(&inst.operands);
        }
        if !inst.results.is_empty() {
            let types: Vec<String> = inst
                .results
                .iter()
                .map(|&v| format_type(self.func.ty(v)))
                .collect();
            let _ = write!(self.out, " : {}", types.join(", "));
        }
        for region in &inst.regions {
            self.out.push_str(" {\n");
            self.region(region, depth);
            self.indent(depth);
            self.out.push('}');
        }
        self.out.push('\n');
    }

    /// The inside of a region whose `{` is on a line at `depth`.
    fn region(&mut self, region: &Region, depth: usize) {
        self.indent(depth);
        self.out.push_str("^(");
        for (i, &v) in region.args.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            self.typed_definition(v);
        }
        self.out.push_str("):\n");
        for inst in &region.insts {
            self.inst(inst, depth + 1);
        }
        self.indent(depth + 1);
        self.out.push_str("yield");
        if !region.yields.is_empty() {
            self.out.push(' ');
            self.value_list(&region.yields);
        }
        self.out.push('\n');
    }
}

/// How messages point at an instruction: `%3 = add`, `%4, %5 = loop`, or the op's name
/// when it has no results.
pub fn describe_inst(inst: &Inst) -> String {
    let results: Vec<String> = inst.results.iter().map(|v| format!("%{}", v.0)).collect();
    if results.is_empty() {
        inst.op.name().to_string()
    } else {
        format!("{} = {}", results.join(", "), inst.op.name())
    }
}

/// The values of the function's table that no parameter, region argument or instruction
/// result defines, in order.
fn undefined_values(func: &Function) -> Vec<Value> {
    let mut defined = vec![false; func.values.len()];
    let mut mark = |v: &Value| {
        if let Some(d) = defined.get_mut(v.0 as usize) {
            *d = true;
        }
    };
    fn walk(region: &Region, mark: &mut impl FnMut(&Value)) {
        region.args.iter().for_each(&mut *mark);
        for inst in &region.insts {
            inst.results.iter().for_each(&mut *mark);
            for r in &inst.regions {
                walk(r, mark);
            }
        }
    }
    walk(&func.body, &mut mark);
    (0..func.values.len() as u32)
        .map(Value)
        .filter(|v| !defined[v.0 as usize])
        .collect()
}
