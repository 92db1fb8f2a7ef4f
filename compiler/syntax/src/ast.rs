//! The abstract syntax tree of a kiln source file: every node carries the byte span it came from.

use std::fmt;

/// A half-open byte range `start..end` into one source file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    pub fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// A name with the span where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// One parsed source file.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// `import nn` or `import consensus.games`: the dotted path of a module.
    Import {
        path: Vec<Ident>,
        span: Span,
    },
    Config(ConfigBlock),
    Fn(FnDef),
    Model(ModelDef),
}

/// `config { name: type = default from "json.path", ... }`
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigBlock {
    pub fields: Vec<ConfigField>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConfigField {
    pub name: Ident,
    /// `int`, `float`, `f32`, `bool`, `str` (checked during lowering).
    pub ty: Ident,
    pub default: Option<Expr>,
    /// `from "rope_scaling.factor"`: a dotted path into config.json; the field name otherwise.
    pub json_path: Option<StrLit>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StrLit {
    pub value: String,
    pub span: Span,
}

/// `fn name(params) -> ret { body }`
#[derive(Clone, Debug, PartialEq)]
pub struct FnDef {
    pub name: Ident,
    pub params: Vec<FnParam>,
    pub ret: Option<Type>,
    pub body: Block,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FnParam {
    pub name: Ident,
    pub ty: Option<Type>,
    pub default: Option<Expr>,
    pub span: Span,
}

/// `model Name { param ...  layers L in a..b { param ... }  fn ... }`
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDef {
    pub name: Ident,
    pub items: Vec<ModelItem>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ModelItem {
    Param(ParamDecl),
    Layers(LayersDecl),
    Fn(FnDef),
}

/// `param name: type = source` where `source` evaluates at compile time to a checkpoint
/// tensor name (a string, possibly with `{L}` layer patterns) or to another param (tying).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: Ident,
    pub ty: Type,
    pub source: Expr,
    pub span: Span,
}

/// `layers L in start..end { param ... }`: one copy of each param per layer index.
#[derive(Clone, Debug, PartialEq)]
pub struct LayersDecl {
    pub index: Ident,
    pub start: Expr,
    pub end: Expr,
    pub params: Vec<ParamDecl>,
    pub span: Span,
}

/// A type annotation.
#[derive(Clone, Debug, PartialEq)]
pub enum Type {
    /// `f32[N, D]`, `[..., D]` (dtype left open), `bf16[]` (a 0-d tensor).
    Tensor {
        dtype: Option<Ident>,
        dims: Vec<DimExpr>,
        span: Span,
    },
    /// A bare name: a dtype used as a scalar type (`f32`, `int`, `bool`) or an opaque
    /// runtime type (`kv_cache`, `batch_info`).
    Named(Ident),
    /// `(T1, T2)`
    Tuple { elems: Vec<Type>, span: Span },
}

impl Type {
    pub fn span(&self) -> Span {
        match self {
            Type::Tensor { span, .. } | Type::Tuple { span, .. } => *span,
            Type::Named(id) => id.span,
        }
    }
}

/// One dimension in a tensor type.
#[derive(Clone, Debug, PartialEq)]
pub enum DimExpr {
    /// `...`: any number of leading dimensions.
    Ellipsis(Span),
    /// A dimension expression: a literal, a name (a config value or a dim to bind) or
    /// arithmetic on them (`num_heads * head_dim`).
    Expr(Expr),
}

/// `{ stmt* expr? }`
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    /// The value of the block; `None` for a block with no final expression.
    pub value: Option<Box<Expr>>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// `let pat = expr`
    Let { pat: Pat, value: Expr, span: Span },
    /// `name = expr`: rebinds an existing name.
    Assign {
        name: Ident,
        value: Expr,
        span: Span,
    },
    /// `for L in layers { ... }` (or any compile-time range `for i in 0..n`): unrolled.
    For {
        var: Ident,
        iter: Expr,
        body: Block,
        span: Span,
    },
    /// An expression evaluated for nothing but its errors (rarely useful, kept for recovery).
    Expr(Expr),
    /// A statement that failed to parse; the parser recorded a diagnostic for it.
    Error(Span),
}

/// The left side of `let`.
#[derive(Clone, Debug, PartialEq)]
pub enum Pat {
    Name(Ident),
    /// `_`
    Wildcard(Span),
    Tuple {
        elems: Vec<Pat>,
        span: Span,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    MatMul,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::MatMul => "@",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

/// A call argument: positional (`x`) or named (`axis: -1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

/// One entry of an index expression `x[...]`.
#[derive(Clone, Debug, PartialEq)]
pub enum IndexItem {
    /// `e`: selects one position (or gathers, when `e` is a tensor of indices).
    Expr(Expr),
    /// `start:end:step`, each part optional (`:` alone keeps the whole axis).
    Slice {
        start: Option<Expr>,
        end: Option<Expr>,
        step: Option<Expr>,
        span: Span,
    },
    /// `...`: as many whole axes as needed.
    Ellipsis(Span),
}

/// `name = init` in a loop header.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopVar {
    pub name: Ident,
    pub init: Expr,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Name(String),
    /// `(a, b)`; `()` is the empty tuple.
    Tuple(Vec<Expr>),
    /// `[a, b]`: a list, used for shapes and permutations.
    List(Vec<Expr>),
    Unary {
        op: UnOp,
        operand: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// `callee(args)`: callee is usually a `Name` or a `Field` (method call).
    Call {
        callee: Box<Expr>,
        args: Vec<Arg>,
    },
    /// `base.name` (`x.T`, `x.dtype`, `x.view` as a callee).
    Field {
        base: Box<Expr>,
        name: Ident,
    },
    /// `base.0`: a tuple element.
    TupleIndex {
        base: Box<Expr>,
        index: u32,
    },
    /// `base[items]`
    Index {
        base: Box<Expr>,
        items: Vec<IndexItem>,
    },
    /// `a..b`: a compile-time integer range (layer loops, `for`).
    Range {
        start: Box<Expr>,
        end: Box<Expr>,
    },
    /// `if cond { a } else { b }`: the condition must be known at compile time.
    If {
        cond: Box<Expr>,
        then: Block,
        otherwise: Block,
    },
    /// `loop count with (a = x, b = y) { ...; (a2, b2) }`: a fixed-count loop whose body
    /// yields the next value of every carried variable; the expression's value is the tuple
    /// of their final values (a single value when one variable is carried).
    Loop {
        count: Box<Expr>,
        vars: Vec<LoopVar>,
        body: Block,
    },
    /// A block used as an expression.
    Block(Block),
    /// An expression that failed to parse; the parser recorded a diagnostic for it.
    Error,
}
