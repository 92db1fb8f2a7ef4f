//! Reads the text form that `print` writes (its grammar is documented there) back into a
//! [`Module`]. Errors carry `line:column` (both from 1) of the offending token.
//!
//! Value numbers are kept as written, so `parse_module(&m.to_string()) == Ok(m)`. The
//! parser checks only what it needs to build the data structure: each value number has one
//! type (a value may be defined at several places with the same type, which the verifier
//! then rejects), every value used is defined somewhere, the numbers have no gaps, the
//! result types of an instruction match its results in count, and a function's header
//! lists the types of the values it returns. Everything else (dominance, type rules) is the
//! verifier's job, so invalid IR can be written down in tests.
//!
//! `//` starts a comment that runs to the end of the line.

use crate::func::{Function, Inst, Module, Region, Value};
use crate::ops::{Attr, Op};
use crate::types::{DType, Dim, Shape, TensorType};
use crate::IrError;

/// Parses a module in the text form.
pub fn parse_module(text: &str) -> Result<Module, IrError> {
    let tokens = lex(text)?;
    let mut parser = Parser { tokens, at: 0 };
    let mut functions = Vec::new();
    while !parser.at_end() {
        functions.push(parser.function()?);
    }
    Ok(Module { functions })
}

/// Parses a text that holds exactly one function.
pub fn parse_function(text: &str) -> Result<Function, IrError> {
    let mut module = parse_module(text)?;
    match module.functions.len() {
        1 => Ok(module.functions.remove(0)),
        n => Err(IrError::new(format!("expected one function, found {n}"))),
    }
}

/// Parses a tensor type, `f32[S, 64]` (a convenience for tests and tools).
pub fn parse_type(text: &str) -> Result<TensorType, IrError> {
    let tokens = lex(text)?;
    let mut parser = Parser { tokens, at: 0 };
    let ty = parser.tensor_type()?;
    if !parser.at_end() {
        return Err(parser.unexpected("the end of the type"));
    }
    Ok(ty)
}

// ---------------------------------------------------------------------------------------
// Lexer.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// `%12`
    Value(u32),
    /// `@name` or `@"name"`
    Global(String),
    Ident(String),
    Str(String),
    Int(u64),
    Float(f64),
    /// One of `( ) { } [ ] , : = ^ -` or `->`.
    Punct(&'static str),
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Value(n) => format!("`%{n}`"),
            Tok::Global(s) => format!("`@{s}`"),
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Int(n) => format!("`{n}`"),
            Tok::Float(x) => format!("`{x:?}`"),
            Tok::Punct(p) => format!("`{p}`"),
        }
    }
}

/// A position in the text, from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    line: usize,
    column: usize,
}

fn error_at(pos: Pos, message: impl std::fmt::Display) -> IrError {
    IrError::new(format!("{}:{}: {message}", pos.line, pos.column))
}

struct Lexer<'t> {
    chars: std::iter::Peekable<std::str::Chars<'t>>,
    pos: Pos,
}

impl Lexer<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.pos.line += 1;
            self.pos.column = 1;
        } else {
            self.pos.column += 1;
        }
        Some(c)
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek().filter(|&c| keep(c)) {
            s.push(c);
            self.bump();
        }
        s
    }

    fn identifier(&mut self) -> String {
        self.take_while(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// The rest of a string literal after its opening quote.
    fn string(&mut self, start: Pos) -> Result<String, IrError> {
        let mut s = String::new();
        loop {
            let pos = self.pos;
            match self.bump() {
                None | Some('\n') => return Err(error_at(start, "unterminated string")),
                Some('"') => return Ok(s),
                Some('\\') => match self.bump() {
                    Some('\\') => s.push('\\'),
                    Some('"') => s.push('"'),
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('r') => s.push('\r'),
                    Some('u') => {
                        if self.bump() != Some('{') {
                            return Err(error_at(pos, "expected `{` after `\\u`"));
                        }
                        let hex = self.take_while(|c| c.is_ascii_hexdigit());
                        if self.bump() != Some('}') {
                            return Err(error_at(pos, "expected `}` to close `\\u{`"));
                        }
                        let c = u32::from_str_radix(&hex, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .ok_or_else(|| error_at(pos, format!("bad escape `\\u{{{hex}}}`")))?;
                        s.push(c);
                    }
                    _ => return Err(error_at(pos, "unknown escape in string")),
                },
                Some(c) => s.push(c),
            }
        }
    }

    /// A number (without sign): digits, then an optional fraction and exponent.
    fn number(&mut self, start: Pos) -> Result<Tok, IrError> {
        let mut text = self.take_while(|c| c.is_ascii_digit());
        let mut is_float = false;
        if self.peek() == Some('.') {
            is_float = true;
            text.push('.');
            self.bump();
            text.push_str(&self.take_while(|c| c.is_ascii_digit()));
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            is_float = true;
            text.push('e');
            self.bump();
            if let Some(sign) = self.peek().filter(|&c| c == '+' || c == '-') {
                text.push(sign);
                self.bump();
            }
            text.push_str(&self.take_while(|c| c.is_ascii_digit()));
        }
        if is_float {
            text.parse::<f64>()
                .map(Tok::Float)
                .map_err(|_| error_at(start, format!("bad number `{text}`")))
        } else {
            text.parse::<u64>()
                .map(Tok::Int)
                .map_err(|_| error_at(start, format!("integer `{text}` is too large")))
        }
    }
}

fn lex(text: &str) -> Result<Vec<(Tok, Pos)>, IrError> {
    let mut lexer = Lexer {
        chars: text.chars().peekable(),
        pos: Pos { line: 1, column: 1 },
    };
    let mut tokens = Vec::new();
    while let Some(c) = lexer.peek() {
        let start = lexer.pos;
        let tok = match c {
            c if c.is_whitespace() => {
                lexer.bump();
                continue;
            }
            '/' => {
                lexer.bump();
                if lexer.bump() != Some('/') {
                    return Err(error_at(start, "unexpected `/` (comments start with `//`)"));
                }
                lexer.take_while(|c| c != '\n');
                continue;
            }
            '%' => {
                lexer.bump();
                let digits = lexer.take_while(|c| c.is_ascii_digit());
                let n = digits
                    .parse::<u32>()
                    .map_err(|_| error_at(start, "expected a value number after `%`"))?;
                Tok::Value(n)
            }
            '@' => {
                lexer.bump();
                if lexer.peek() == Some('"') {
                    let quote_pos = lexer.pos;
                    lexer.bump();
                    Tok::Global(lexer.string(quote_pos)?)
                } else {
                    let name = lexer.identifier();
                    if name.is_empty() {
                        return Err(error_at(start, "expected a name after `@`"));
                    }
                    Tok::Global(name)
                }
            }
            '"' => {
                lexer.bump();
                Tok::Str(lexer.string(start)?)
            }
            c if c.is_ascii_digit() => lexer.number(start)?,
            c if c.is_ascii_alphabetic() || c == '_' => Tok::Ident(lexer.identifier()),
            '-' => {
                lexer.bump();
                if lexer.peek() == Some('>') {
                    lexer.bump();
                    Tok::Punct("->")
                } else {
                    Tok::Punct("-")
                }
            }
            _ => {
                lexer.bump();
                let punct = ["(", ")", "{", "}", "[", "]", ",", ":", "=", "^"]
                    .into_iter()
                    .find(|p| p.starts_with(c))
                    .ok_or_else(|| error_at(start, format!("unexpected character {c:?}")))?;
                Tok::Punct(punct)
            }
        };
        tokens.push((tok, start));
    }
    Ok(tokens)
}

// ---------------------------------------------------------------------------------------
// Parser.
// ---------------------------------------------------------------------------------------

struct Parser {
    tokens: Vec<(Tok, Pos)>,
    at: usize,
}

/// What one function's text says about each value number.
#[derive(Default)]
struct ValueTable {
    /// Type and name of each value, where defined.
    defs: Vec<Option<(TensorType, Option<String>)>>,
    /// Where each value is first used (for the error when it is never defined).
    first_use: Vec<Option<Pos>>,
}

impl ValueTable {
    fn grow(&mut self, v: Value) {
        let need = v.0 as usize + 1;
        if self.defs.len() < need {
            self.defs.resize(need, None);
            self.first_use.resize(need, None);
        }
    }

    fn define(
        &mut self,
        v: Value,
        ty: TensorType,
        name: Option<String>,
        pos: Pos,
    ) -> Result<(), IrError> {
        self.grow(v);
        let slot = &mut self.defs[v.0 as usize];
        match slot {
            Some((old_ty, old_name)) if *old_ty != ty || *old_name != name => Err(error_at(
                pos,
                format!("%{} is defined again with a different type or name", v.0),
            )),
            _ => {
                *slot = Some((ty, name));
                Ok(())
            }
        }
    }

    fn use_at(&mut self, v: Value, pos: Pos) {
        self.grow(v);
        self.first_use[v.0 as usize].get_or_insert(pos);
    }
}

/// One pending definition: a value, its name and where it was written.
type PendingDef = (Value, Option<String>, Pos);

impl Parser {
    fn at_end(&self) -> bool {
        self.at >= self.tokens.len()
    }

    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.at).map(|(t, _)| t)
    }

    fn peek_at(&self, ahead: usize) -> Option<&Tok> {
        self.tokens.get(self.at + ahead).map(|(t, _)| t)
    }

    fn pos(&self) -> Pos {
        match self.tokens.get(self.at) {
            Some((_, p)) => *p,
            None => match self.tokens.last() {
                Some((_, p)) => Pos {
                    line: p.line,
                    column: p.column + 1,
                },
                None => Pos { line: 1, column: 1 },
            },
        }
    }

    fn next(&mut self) -> Option<Tok> {
        let tok = self.tokens.get(self.at).map(|(t, _)| t.clone());
        self.at += 1;
        tok
    }

    fn unexpected(&self, expected: &str) -> IrError {
        let found = match self.peek() {
            Some(t) => t.describe(),
            None => "the end of the text".to_string(),
        };
        error_at(self.pos(), format!("expected {expected}, found {found}"))
    }

    fn is_punct(&self, p: &str) -> bool {
        matches!(self.peek(), Some(Tok::Punct(q)) if *q == p)
    }

    fn is_keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(s)) if s == word)
    }

    fn eat_punct(&mut self, p: &str) -> bool {
        if self.is_punct(p) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect_punct(&mut self, p: &str) -> Result<(), IrError> {
        if self.eat_punct(p) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("`{p}`")))
        }
    }

    fn expect_keyword(&mut self, word: &str) -> Result<(), IrError> {
        if self.is_keyword(word) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.unexpected(&format!("`{word}`")))
        }
    }

    fn ident(&mut self, what: &str) -> Result<String, IrError> {
        match self.peek() {
            Some(Tok::Ident(s)) => {
                let s = s.clone();
                self.at += 1;
                Ok(s)
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn value(&mut self) -> Result<(Value, Pos), IrError> {
        let pos = self.pos();
        match self.peek() {
            Some(Tok::Value(n)) => {
                let v = Value(*n);
                self.at += 1;
                Ok((v, pos))
            }
            _ => Err(self.unexpected("a value (`%N`)")),
        }
    }

    /// `%N` or `%N "name"`.
    fn definition(&mut self) -> Result<PendingDef, IrError> {
        let (v, pos) = self.value()?;
        let name = match self.peek() {
            Some(Tok::Str(s)) => {
                let s = s.clone();
                self.at += 1;
                Some(s)
            }
            _ => None,
        };
        Ok((v, name, pos))
    }

    /// `%N "name": type`, recorded in `table`.
    fn typed_definition(&mut self, table: &mut ValueTable) -> Result<Value, IrError> {
        let (v, name, pos) = self.definition()?;
        self.expect_punct(":")?;
        let ty = self.tensor_type()?;
        table.define(v, ty, name, pos)?;
        Ok(v)
    }

    /// Values used, separated by commas (possibly none).
    fn uses(&mut self, table: &mut ValueTable) -> Result<Vec<Value>, IrError> {
        let mut values = Vec::new();
        if !matches!(self.peek(), Some(Tok::Value(_))) {
            return Ok(values);
        }
        loop {
            let (v, pos) = self.value()?;
            table.use_at(v, pos);
            values.push(v);
            if !self.eat_punct(",") {
                return Ok(values);
            }
        }
    }

    fn dim(&mut self) -> Result<Dim, IrError> {
        match self.next() {
            Some(Tok::Int(n)) => Ok(Dim::Const(n)),
            Some(Tok::Ident(s)) | Some(Tok::Str(s)) => Ok(Dim::Sym(s)),
            _ => {
                self.at -= 1;
                Err(self.unexpected("a dim"))
            }
        }
    }

    /// `[d, d, ...]` after its `[`.
    fn dims_after_bracket(&mut self) -> Result<Vec<Dim>, IrError> {
        let mut dims = Vec::new();
        if self.eat_punct("]") {
            return Ok(dims);
        }
        loop {
            dims.push(self.dim()?);
            if self.eat_punct("]") {
                return Ok(dims);
            }
            self.expect_punct(",")?;
        }
    }

    fn dtype(&mut self) -> Result<DType, IrError> {
        let pos = self.pos();
        let name = self.ident("a dtype")?;
        DType::from_name(&name).ok_or_else(|| error_at(pos, format!("unknown dtype `{name}`")))
    }

    /// `f32[S, 64]`.
    fn tensor_type(&mut self) -> Result<TensorType, IrError> {
        let dtype = self.dtype()?;
        self.expect_punct("[")?;
        let dims = self.dims_after_bracket()?;
        Ok(TensorType::new(dtype, Shape(dims)))
    }

    fn types(&mut self) -> Result<Vec<TensorType>, IrError> {
        let mut types = vec![self.tensor_type()?];
        while self.eat_punct(",") {
            types.push(self.tensor_type()?);
        }
        Ok(types)
    }

    fn attr_value(&mut self) -> Result<Attr, IrError> {
        let pos = self.pos();
        match self.next() {
            Some(Tok::Int(n)) => Ok(Attr::Int(n)),
            Some(Tok::Float(x)) => Ok(Attr::Float(x)),
            Some(Tok::Str(s)) => Ok(Attr::Str(s)),
            Some(Tok::Punct("-")) => match self.next() {
                Some(Tok::Float(x)) => Ok(Attr::Float(-x)),
                Some(Tok::Int(n)) => Ok(Attr::Float(-(n as f64))),
                Some(Tok::Ident(s)) if s == "inf" => Ok(Attr::Float(f64::NEG_INFINITY)),
                Some(Tok::Ident(s)) if s == "nan" => Ok(Attr::Float(f64::NAN)),
                _ => Err(error_at(pos, "expected a number after `-`")),
            },
            Some(Tok::Punct("[")) => Ok(Attr::Dims(self.dims_after_bracket()?)),
            Some(Tok::Ident(s)) => {
                if self.is_punct("[") {
                    self.at -= 1;
                    Ok(Attr::Type(self.tensor_type()?))
                } else {
                    Ok(Attr::Ident(s))
                }
            }
            _ => {
                self.at -= 1;
                Err(self.unexpected("an attribute value"))
            }
        }
    }

    /// `{key = value, ...}` after the op name; none when the next `{` opens a region.
    fn attrs(&mut self) -> Result<Vec<(String, Attr)>, IrError> {
        let mut attrs = Vec::new();
        let opens_dict = self.is_punct("{")
            && matches!(self.peek_at(1), Some(Tok::Ident(_)))
            && matches!(self.peek_at(2), Some(Tok::Punct("=")));
        if !opens_dict {
            return Ok(attrs);
        }
        self.expect_punct("{")?;
        loop {
            let key = self.ident("an attribute name")?;
            self.expect_punct("=")?;
            attrs.push((key, self.attr_value()?));
            if self.eat_punct("}") {
                return Ok(attrs);
            }
            self.expect_punct(",")?;
        }
    }

    fn function(&mut self) -> Result<Function, IrError> {
        self.expect_keyword("func")?;
        let name = match self.next() {
            Some(Tok::Global(name)) => name,
            _ => {
                self.at -= 1;
                return Err(self.unexpected("a function name (`@name`)"));
            }
        };
        let mut table = ValueTable::default();
        let mut body = Region::default();
        self.expect_punct("(")?;
        if !self.eat_punct(")") {
            loop {
                body.args.push(self.typed_definition(&mut table)?);
                if self.eat_punct(")") {
                    break;
                }
                self.expect_punct(",")?;
            }
        }
        self.expect_punct("->")?;
        self.expect_punct("(")?;
        let header_pos = self.pos();
        let result_types = if self.is_punct(")") {
            Vec::new()
        } else {
            self.types()?
        };
        self.expect_punct(")")?;
        self.expect_punct("{")?;
        while self.is_keyword("undefined") {
            self.at += 1;
            self.typed_definition(&mut table)?;
        }
        body.insts = self.insts(&mut table)?;
        self.expect_keyword("return")?;
        body.yields = self.uses(&mut table)?;
        self.expect_punct("}")?;

        let (values, names) = finish_table(table)?;
        let returned: Vec<&TensorType> =
            body.yields.iter().map(|v| &values[v.0 as usize]).collect();
        if returned.len() != result_types.len()
            || returned.iter().zip(&result_types).any(|(a, b)| *a != b)
        {
            return Err(error_at(
                header_pos,
                format!("@{name}'s header result types differ from the types it returns"),
            ));
        }
        Ok(Function {
            name,
            values,
            names,
            body,
        })
    }

    /// Instructions up to (not including) `return`, `yield` or `}`.
    fn insts(&mut self, table: &mut ValueTable) -> Result<Vec<Inst>, IrError> {
        let mut insts = Vec::new();
        loop {
            match self.peek() {
                Some(Tok::Value(_)) => {}
                Some(Tok::Ident(word)) if word != "return" && word != "yield" => {}
                _ => return Ok(insts),
            }
            insts.push(self.inst(table)?);
        }
    }

    fn inst(&mut self, table: &mut ValueTable) -> Result<Inst, IrError> {
        let mut results: Vec<PendingDef> = Vec::new();
        if matches!(self.peek(), Some(Tok::Value(_))) {
            loop {
                results.push(self.definition()?);
                if !self.eat_punct(",") {
                    break;
                }
            }
            self.expect_punct("=")?;
        }
        let op_pos = self.pos();
        let name = self.ident("an op name")?;
        let attrs = self.attrs()?;
        let op = Op::from_parts(&name, attrs).map_err(|e| error_at(op_pos, e.message))?;
        let operands = self.uses(table)?;
        let types_pos = self.pos();
        let types = if self.eat_punct(":") {
            self.types()?
        } else {
            Vec::new()
        };
        if types.len() != results.len() {
            return Err(error_at(
                types_pos,
                format!(
                    "{name} defines {} values but lists {} result types",
                    results.len(),
                    types.len()
                ),
            ));
        }
        for ((v, value_name, pos), ty) in results.iter().cloned().zip(types) {
            table.define(v, ty, value_name, pos)?;
        }
        let mut regions = Vec::new();
        while self.is_punct("{") {
            regions.push(self.region(table)?);
        }
        Ok(Inst {
            op,
            operands,
            results: results.into_iter().map(|(v, _, _)| v).collect(),
            regions,
        })
    }

    /// `{ ^(args): insts yield values }`.
    fn region(&mut self, table: &mut ValueTable) -> Result<Region, IrError> {
        self.expect_punct("{")?;
        self.expect_punct("^")?;
        self.expect_punct("(")?;
        let mut region = Region::default();
        if !self.eat_punct(")") {
            loop {
                region.args.push(self.typed_definition(table)?);
                if self.eat_punct(")") {
                    break;
                }
                self.expect_punct(",")?;
            }
        }
        self.expect_punct(":")?;
        region.insts = self.insts(table)?;
        self.expect_keyword("yield")?;
        region.yields = self.uses(table)?;
        self.expect_punct("}")?;
        Ok(region)
    }
}

/// The function's value table, once every number from 0 up has a definition.
fn finish_table(table: ValueTable) -> Result<(Vec<TensorType>, Vec<Option<String>>), IrError> {
    // A value used but never defined is reported where it is first used.
    let used_undefined = table
        .defs
        .iter()
        .zip(&table.first_use)
        .enumerate()
        .filter_map(|(i, (def, used))| match (def, used) {
            (None, Some(pos)) => Some((*pos, i)),
            _ => None,
        })
        .min_by_key(|(pos, _)| (pos.line, pos.column));
    if let Some((pos, i)) = used_undefined {
        return Err(error_at(pos, format!("%{i} is never defined")));
    }
    let mut values = Vec::with_capacity(table.defs.len());
    let mut names = Vec::with_capacity(table.defs.len());
    for (i, def) in table.defs.into_iter().enumerate() {
        let (ty, name) = def.ok_or_else(|| {
            IrError::new(format!(
                "%{i} is never defined (value numbers must have no gaps; declare unused ones \
                 with `undefined %{i}: type`)"
            ))
        })?;
        values.push(ty);
        names.push(name);
    }
    Ok((values, names))
}
