//! Operators, indexing and the built-in functions of the language, with the dtype
//! promotion rules of docs/dtypes.md: what each becomes in the graph IR, or the
//! compile-time value it folds to.

use crate::lower::{ArgVal, Cx};
use crate::value::Val;
use kiln_ir::{BinaryOp, DType, Dim, Op, ReduceOp, Shape, UnaryOp, Value};
use kiln_syntax::ast::{self, Span};

/// Every built-in function name (for "did you mean" suggestions).
pub const BUILTIN_NAMES: &[&str] = &[
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "sin",
    "cos",
    "tanh",
    "sigmoid",
    "erf",
    "abs",
    "floor",
    "ceil",
    "recip",
    "neg",
    "pow",
    "maximum",
    "minimum",
    "max",
    "min",
    "sum",
    "mean",
    "prod",
    "argmax",
    "argmin",
    "sort",
    "select",
    "cast",
    "as",
    "kv_write",
    "paged_sdpa",
    "view",
    "reshape",
    "permute",
    "transpose",
    "unsqueeze",
    "squeeze",
    "broadcast_to",
    "expand",
    "concat",
    "stack",
    "gather",
    "zeros",
    "ones",
    "full",
    "zeros_like",
    "ones_like",
    "full_like",
    "arange",
    "matmul",
    "shape",
    "dim",
    "int",
    "float",
    "len",
    "compile_error",
    "f32",
    "f16",
    "bf16",
    "f8e4m3",
    "f8e5m2",
    "i8",
    "i32",
    "i64",
    "bool",
];

/// The common dtype of two tensor operands (docs/dtypes.md).
pub fn promote(a: DType, b: DType) -> DType {
    use DType::*;
    if a == b {
        return a;
    }
    let float_rank = |d: DType| match d {
        F8E4M3 | F8E5M2 => 1,
        F16 | BF16 => 2,
        F32 => 3,
        _ => 0,
    };
    let int_rank = |d: DType| match d {
        Bool => 0,
        I8 => 1,
        I32 => 2,
        I64 => 3,
        _ => 0,
    };
    match (a.is_float(), b.is_float()) {
        (true, true) => {
            let (ra, rb) = (float_rank(a), float_rank(b));
            if ra > rb {
                a
            } else if rb > ra {
                b
            } else if ra == 1 {
                // e4m3 with e5m2: neither holds the other.
                F16
            } else {
                // f16 with bf16: neither holds the other.
                F32
            }
        }
        (true, false) => a,
        (false, true) => b,
        (false, false) => {
            if int_rank(a) >= int_rank(b) {
                a
            } else {
                b
            }
        }
    }
}

fn unary_name(name: &str) -> Option<UnaryOp> {
    Some(match name {
        "neg" => UnaryOp::Neg,
        "abs" => UnaryOp::Abs,
        "exp" => UnaryOp::Exp,
        "log" => UnaryOp::Log,
        "sqrt" => UnaryOp::Sqrt,
        "rsqrt" => UnaryOp::Rsqrt,
        "sin" => UnaryOp::Sin,
        "cos" => UnaryOp::Cos,
        "tanh" => UnaryOp::Tanh,
        "sigmoid" => UnaryOp::Sigmoid,
        "erf" => UnaryOp::Erf,
        "floor" => UnaryOp::Floor,
        "ceil" => UnaryOp::Ceil,
        "recip" => UnaryOp::Recip,
        _ => return None,
    })
}

/// The f64 value of a unary op on a compile-time number.
fn fold_unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Erf => libm::erf(x),
        UnaryOp::Floor => x.floor(),
        UnaryOp::Ceil => x.ceil(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Not => x,
    }
}

impl<'g, 'p, 'f> Cx<'g, 'p, 'f> {
    pub(crate) fn unary(&mut self, op: ast::UnOp, v: Val, span: Span) -> Val {
        match (op, v) {
            (_, Val::Poison) => Val::Poison,
            (ast::UnOp::Neg, Val::Int(i)) => match i.checked_neg() {
                Some(n) => Val::Int(n),
                None => self.err(span, "integer overflow"),
            },
            (ast::UnOp::Neg, Val::Float(f)) => Val::Float(-f),
            (ast::UnOp::Not, Val::Bool(b)) => Val::Bool(!b),
            (op, v @ (Val::Tensor(_) | Val::Param(_))) => {
                let Some(t) = self.as_tensor(&v, None, span) else {
                    return Val::Poison;
                };
                let uop = match op {
                    ast::UnOp::Neg => UnaryOp::Neg,
                    ast::UnOp::Not => UnaryOp::Not,
                };
                self.push1(Op::Unary(uop), &[t], span)
            }
            (op, other) => {
                let sym = if op == ast::UnOp::Neg { "-" } else { "!" };
                self.err(
                    span,
                    format!("`{sym}` cannot be applied to {}", other.describe()),
                )
            }
        }
    }

    pub(crate) fn binary(&mut self, op: ast::BinOp, a: Val, b: Val, span: Span) -> Val {
        use ast::BinOp as B;
        if matches!(a, Val::Poison) || matches!(b, Val::Poison) {
            return Val::Poison;
        }
        let is_tensor = |v: &Val| matches!(v, Val::Tensor(_) | Val::Param(_));
        let is_number = |v: &Val| matches!(v, Val::Int(_) | Val::Float(_));
        // A symbolic dim in arithmetic with a tensor or a number becomes a run-time scalar.
        let a_sym = matches!(a, Val::Sym(_)) && (is_tensor(&b) || is_number(&b));
        let b_sym = matches!(b, Val::Sym(_)) && (is_tensor(&a) || is_number(&a));
        if !is_tensor(&a) && !is_tensor(&b) && !a_sym && !b_sym {
            return self.fold_binary(op, a, b, span);
        }
        let a = if a_sym { self.sym_tensor(&a, span) } else { a };
        let b = if b_sym { self.sym_tensor(&b, span) } else { b };
        let ir_op = match op {
            B::Add => BinaryOp::Add,
            B::Sub => BinaryOp::Sub,
            B::Mul => BinaryOp::Mul,
            B::Div => BinaryOp::Div,
            B::Rem => BinaryOp::Rem,
            B::Eq => BinaryOp::Eq,
            B::Ne => BinaryOp::Ne,
            B::Lt => BinaryOp::Lt,
            B::Le => BinaryOp::Le,
            B::Gt => BinaryOp::Gt,
            B::Ge => BinaryOp::Ge,
            B::And => BinaryOp::And,
            B::Or => BinaryOp::Or,
            B::MatMul => {
                let (Some(x), Some(y)) = (
                    self.as_tensor(&a, None, span),
                    self.as_tensor(&b, None, span),
                ) else {
                    return Val::Poison;
                };
                let (x, y) = self.unify(x, y, span);
                return self.push1(Op::MatMul, &[x, y], span);
            }
        };
        self.elementwise(ir_op, a, b, span)
    }

    /// Applies a binary element-wise op with promotion: two tensors meet at their common
    /// dtype; a compile-time number takes the tensor's dtype (an integer tensor meeting a
    /// float number becomes f32).
    pub(crate) fn elementwise(&mut self, op: BinaryOp, a: Val, b: Val, span: Span) -> Val {
        let (a, b) = (self.materialize_val(a, span), self.materialize_val(b, span));
        if a == Val::Poison || b == Val::Poison {
            return Val::Poison;
        }
        let dtype_of = |cx: &Self, v: &Val| match v {
            Val::Tensor(t) => Some(cx.b.ty(*t).dtype),
            _ => None,
        };
        let (da, db) = (dtype_of(self, &a), dtype_of(self, &b));
        let scalar_kind = |v: &Val| match v {
            Val::Float(_) => Some(DType::F32),
            Val::Int(_) => Some(DType::I64),
            Val::Bool(_) => Some(DType::Bool),
            _ => None,
        };
        let target = match (da, db) {
            (Some(x), Some(y)) => promote(x, y),
            (Some(x), None) | (None, Some(x)) => {
                let scalar = if da.is_some() { &b } else { &a };
                match scalar_kind(scalar) {
                    Some(DType::F32) if !x.is_float() => DType::F32,
                    Some(DType::I64) if x == DType::Bool => DType::I64,
                    Some(_) => x,
                    None => {
                        return self.err(
                            span,
                            format!("cannot combine a tensor with {}", scalar.describe()),
                        )
                    }
                }
            }
            (None, None) => unreachable!("folded before"),
        };
        let logical = matches!(op, BinaryOp::And | BinaryOp::Or);
        let target = if logical { DType::Bool } else { target };
        let (Some(x), Some(y)) = (
            self.as_tensor(&a, Some(target), span),
            self.as_tensor(&b, Some(target), span),
        ) else {
            return Val::Poison;
        };
        let x = self.cast(x, target, span);
        let y = self.cast(y, target, span);
        self.push1(Op::Binary(op), &[x, y], span)
    }

    /// The run-time size of a symbolic dim as an i64 scalar tensor: the sum of a vector of
    /// ones that long (exact in the f64 accumulation of reductions).
    fn sym_tensor(&mut self, v: &Val, span: Span) -> Val {
        let Some(dim) = v.as_dim() else {
            return Val::Poison;
        };
        let ones = Op::Full {
            value: 1.0,
            dtype: DType::I64,
            shape: Shape(vec![dim]),
        };
        let Val::Tensor(ones) = self.push1(ones, &[], span) else {
            return Val::Poison;
        };
        self.push1(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
                keep: false,
            },
            &[ones],
            span,
        )
    }

    /// Replaces a model param by its IR tensor.
    pub(crate) fn materialize_val(&mut self, v: Val, span: Span) -> Val {
        match v {
            Val::Param(id) => match self.materialize(id, span) {
                Some(t) => Val::Tensor(t),
                None => Val::Poison,
            },
            other => other,
        }
    }

    /// Casts two tensors to their common dtype.
    fn unify(&mut self, x: Value, y: Value, span: Span) -> (Value, Value) {
        let d = promote(self.b.ty(x).dtype, self.b.ty(y).dtype);
        (self.cast(x, d, span), self.cast(y, d, span))
    }

    fn fold_binary(&mut self, op: ast::BinOp, a: Val, b: Val, span: Span) -> Val {
        use ast::BinOp as B;
        let num = |v: &Val| match v {
            Val::Int(i) => Some(*i as f64),
            Val::Float(f) => Some(*f),
            _ => None,
        };
        match (&a, &b) {
            (Val::Int(x), Val::Int(y)) => {
                let (x, y) = (*x, *y);
                let r = match op {
                    B::Add => x.checked_add(y).map(Val::Int),
                    B::Sub => x.checked_sub(y).map(Val::Int),
                    B::Mul => x.checked_mul(y).map(Val::Int),
                    B::Div if y == 0 => return self.err(span, "division by zero"),
                    B::Div if x % y == 0 => Some(Val::Int(x / y)),
                    B::Div => Some(Val::Float(x as f64 / y as f64)),
                    B::Rem if y == 0 => return self.err(span, "division by zero"),
                    B::Rem => Some(Val::Int(
                        x.rem_euclid(y) + if y < 0 && x.rem_euclid(y) != 0 { y } else { 0 },
                    )),
                    B::Eq => Some(Val::Bool(x == y)),
                    B::Ne => Some(Val::Bool(x != y)),
                    B::Lt => Some(Val::Bool(x < y)),
                    B::Le => Some(Val::Bool(x <= y)),
                    B::Gt => Some(Val::Bool(x > y)),
                    B::Ge => Some(Val::Bool(x >= y)),
                    B::And | B::Or | B::MatMul => None,
                };
                match r {
                    Some(v) => v,
                    None if matches!(op, B::Add | B::Sub | B::Mul) => {
                        self.err(span, "integer overflow")
                    }
                    None => self.bad_operands(op, &a, &b, span),
                }
            }
            _ if num(&a).is_some() && num(&b).is_some() => {
                let (x, y) = (num(&a).unwrap_or_default(), num(&b).unwrap_or_default());
                match op {
                    B::Add => Val::Float(x + y),
                    B::Sub => Val::Float(x - y),
                    B::Mul => Val::Float(x * y),
                    B::Div => Val::Float(x / y),
                    B::Rem => Val::Float(x - y * (x / y).floor()),
                    B::Eq => Val::Bool(x == y),
                    B::Ne => Val::Bool(x != y),
                    B::Lt => Val::Bool(x < y),
                    B::Le => Val::Bool(x <= y),
                    B::Gt => Val::Bool(x > y),
                    B::Ge => Val::Bool(x >= y),
                    B::And | B::Or | B::MatMul => self.bad_operands(op, &a, &b, span),
                }
            }
            (Val::Bool(x), Val::Bool(y)) => match op {
                B::And => Val::Bool(*x && *y),
                B::Or => Val::Bool(*x || *y),
                B::Eq => Val::Bool(x == y),
                B::Ne => Val::Bool(x != y),
                _ => self.bad_operands(op, &a, &b, span),
            },
            (Val::Str(x), Val::Str(y)) => match op {
                B::Eq => Val::Bool(x == y),
                B::Ne => Val::Bool(x != y),
                _ => self.bad_operands(op, &a, &b, span),
            },
            (Val::Sym(x), Val::Sym(y)) if matches!(op, B::Eq | B::Ne) => {
                Val::Bool((x == y) == (op == B::Eq))
            }
            (Val::DType(x), Val::DType(y)) if matches!(op, B::Eq | B::Ne) => {
                Val::Bool((x == y) == (op == B::Eq))
            }
            (Val::Sym(s), _) | (_, Val::Sym(s)) => {
                let s = s.clone();
                self.err(
                    span,
                    format!(
                        "`{}` on the symbolic dim `{s}` is not supported: its size is known only at run time",
                        op.symbol()
                    ),
                )
            }
            _ => self.bad_operands(op, &a, &b, span),
        }
    }

    fn bad_operands(&mut self, op: ast::BinOp, a: &Val, b: &Val, span: Span) -> Val {
        self.err(
            span,
            format!(
                "`{}` cannot be applied to {} and {}",
                op.symbol(),
                a.describe(),
                b.describe()
            ),
        )
    }

    /// Normalizes an axis argument (negative counts from the end) for a tensor of `rank`.
    fn axis(&mut self, v: &Val, rank: usize, span: Span) -> Option<usize> {
        match v {
            Val::Int(a) => {
                let r = rank as i64;
                if *a < -r || *a >= r.max(1) && *a >= r {
                    self.err(
                        span,
                        format!("axis {a} is out of range for a tensor of rank {rank}"),
                    );
                    None
                } else {
                    Some(if *a < 0 {
                        (a + r) as usize
                    } else {
                        *a as usize
                    })
                }
            }
            Val::Poison => None,
            other => {
                self.err(
                    span,
                    format!("an axis must be an integer, found {}", other.describe()),
                );
                None
            }
        }
    }

    /// Dims from call arguments: either one list argument or one argument per dim.
    fn dims_arg(&mut self, args: &[ArgVal], span: Span) -> Option<Vec<Val>> {
        let items: Vec<Val> = match args {
            [one] if matches!(one.value, Val::List(_) | Val::Tuple(_)) => match &one.value {
                Val::List(v) | Val::Tuple(v) => v.clone(),
                _ => unreachable!(),
            },
            _ => args.iter().map(|a| a.value.clone()).collect(),
        };
        for item in &items {
            match item {
                Val::Int(_) | Val::Sym(_) => {}
                Val::Poison => return None,
                other => {
                    self.err(
                        span,
                        format!(
                            "a dimension must be an integer or a symbolic dim, found {}",
                            other.describe()
                        ),
                    );
                    return None;
                }
            }
        }
        Some(items)
    }

    fn shape_of(items: &[Val]) -> Option<Shape> {
        items
            .iter()
            .map(Val::as_dim)
            .collect::<Option<Vec<_>>>()
            .map(Shape)
    }

    /// Resolves one `-1` in a reshape target from the input shape.
    fn reshape_target(&mut self, input: &Shape, items: &[Val], span: Span) -> Option<Shape> {
        let holes = items.iter().filter(|v| **v == Val::Int(-1)).count();
        if holes == 0 {
            return match Self::shape_of(items) {
                Some(s) => Some(s),
                None => {
                    self.err(span, "reshape dimensions must be non-negative, or -1 once");
                    None
                }
            };
        }
        if holes > 1 {
            self.err(span, "only one dimension of a reshape can be -1");
            return None;
        }
        let known: Vec<Dim> = items
            .iter()
            .filter(|v| **v != Val::Int(-1))
            .filter_map(Val::as_dim)
            .collect();
        let mut in_syms: Vec<&String> = input
            .0
            .iter()
            .filter_map(|d| if let Dim::Sym(s) = d { Some(s) } else { None })
            .collect();
        let in_const: u64 = input.0.iter().filter_map(Dim::as_const).product();
        let mut out_const: u64 = 1;
        for d in &known {
            match d {
                Dim::Const(n) => out_const *= n,
                Dim::Sym(s) => match in_syms.iter().position(|x| *x == s) {
                    Some(i) => {
                        in_syms.remove(i);
                    }
                    None => {
                        self.err(
                            span,
                            format!("reshape of {input}: the symbolic dim {s} is not in the input"),
                        );
                        return None;
                    }
                },
            }
        }
        let inferred = match (in_syms.as_slice(), out_const) {
            ([], c) if c > 0 && in_const.is_multiple_of(c) => Dim::Const(in_const / c),
            ([s], c) if c == in_const => Dim::Sym((*s).clone()),
            _ => {
                self.err(
                    span,
                    format!("reshape of {input}: cannot infer the -1 dimension"),
                );
                return None;
            }
        };
        Some(Shape(
            items
                .iter()
                .map(|v| {
                    if *v == Val::Int(-1) {
                        inferred.clone()
                    } else {
                        v.as_dim().expect("checked")
                    }
                })
                .collect(),
        ))
    }

    fn tensor_arg(&mut self, args: &[ArgVal], i: usize, fname: &str, span: Span) -> Option<Value> {
        match args.get(i) {
            Some(a) => {
                if let Val::Poison = a.value {
                    return None;
                }
                match &a.value {
                    Val::Tensor(_) | Val::Param(_) | Val::Int(_) | Val::Float(_) | Val::Bool(_) => {
                        self.as_tensor(&a.value, None, a.span)
                    }
                    other => {
                        self.err(
                            a.span,
                            format!(
                                "`{fname}` expects a tensor here, found {}",
                                other.describe()
                            ),
                        );
                        None
                    }
                }
            }
            None => {
                self.err(span, format!("`{fname}` is missing an argument"));
                None
            }
        }
    }

    /// Calls a built-in; `None` when `name` is not one.
    pub(crate) fn builtin(&mut self, name: &str, args: Vec<ArgVal>, span: Span) -> Option<Val> {
        let (positional, named): (Vec<ArgVal>, Vec<ArgVal>) =
            args.into_iter().partition(|a| a.name.is_none());
        let get_named = |n: &str| {
            named
                .iter()
                .find(|a| a.name.as_deref() == Some(n))
                .map(|a| (a.value.clone(), a.span))
        };
        if positional.iter().any(|a| a.value == Val::Poison)
            || named.iter().any(|a| a.value == Val::Poison)
        {
            return if BUILTIN_NAMES.contains(&name) {
                Some(Val::Poison)
            } else {
                None
            };
        }
        let allowed_named: &[&str] = match name {
            "sum" | "mean" | "prod" | "max" | "min" | "argmax" | "argmin" => &["axis", "keep"],
            "concat" | "stack" | "gather" | "unsqueeze" | "squeeze" | "sort" => &["axis"],
            "zeros" | "ones" | "full" | "arange" | "full_like" | "zeros_like" | "ones_like" => {
                &["dtype"]
            }
            _ => &[],
        };
        if BUILTIN_NAMES.contains(&name) {
            for a in &named {
                let n = a.name.as_deref().unwrap_or_default();
                if !allowed_named.contains(&n) {
                    return Some(self.err(a.span, format!("`{name}` has no named argument `{n}`")));
                }
            }
        }
        let arity = |cx: &mut Self, n: usize| -> bool {
            if positional.len() != n {
                cx.err(
                    span,
                    format!(
                        "`{name}` takes {n} argument{}, found {}",
                        if n == 1 { "" } else { "s" },
                        positional.len()
                    ),
                );
                false
            } else {
                true
            }
        };
        // Casts: `f32(x)`, `cast(x, bf16)`, `x.as(bf16)`.
        if let Some(to) = DType::from_name(name) {
            if !arity(self, 1) {
                return Some(Val::Poison);
            }
            return Some(self.cast_val(&positional[0].value, to, span));
        }
        if let Some(op) = unary_name(name) {
            if !arity(self, 1) {
                return Some(Val::Poison);
            }
            let v = &positional[0].value;
            return Some(match v {
                Val::Int(i) if op == UnaryOp::Neg || op == UnaryOp::Abs => {
                    Val::Int(if op == UnaryOp::Neg { -i } else { i.abs() })
                }
                Val::Int(i) => Val::Float(fold_unary(op, *i as f64)),
                Val::Float(x) => Val::Float(fold_unary(op, *x)),
                _ => match self.tensor_arg(&positional, 0, name, span) {
                    Some(t) => {
                        // Float math on an integer tensor computes in f32.
                        let t = if !matches!(op, UnaryOp::Neg | UnaryOp::Abs)
                            && !self.b.ty(t).dtype.is_float()
                        {
                            self.cast(t, DType::F32, span)
                        } else {
                            t
                        };
                        self.push1(Op::Unary(op), &[t], span)
                    }
                    None => Val::Poison,
                },
            });
        }
        let v = match name {
            "cast" | "as" => {
                if !arity(self, 2) {
                    return Some(Val::Poison);
                }
                match positional[1].value {
                    Val::DType(to) => self.cast_val(&positional[0].value, to, span),
                    ref other => self.err(
                        positional[1].span,
                        format!("`{name}` needs a dtype, found {}", other.describe()),
                    ),
                }
            }
            "pow" | "maximum" | "minimum" => {
                if !arity(self, 2) {
                    return Some(Val::Poison);
                }
                self.binary_builtin(name, &positional, span)
            }
            "max" | "min" if positional.len() == 2 && named.is_empty() => {
                self.binary_builtin(name, &positional, span)
            }
            "sum" | "mean" | "prod" | "max" | "min" => {
                if !arity(self, 1) {
                    return Some(Val::Poison);
                }
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let rank = self.b.ty(x).rank();
                let mut axes: Vec<usize> = match get_named("axis") {
                    None => (0..rank).collect(),
                    Some((Val::List(items) | Val::Tuple(items), s)) => {
                        let mut out = Vec::new();
                        for item in &items {
                            match self.axis(item, rank, s) {
                                Some(a) => out.push(a),
                                None => return Some(Val::Poison),
                            }
                        }
                        out
                    }
                    Some((v, s)) => match self.axis(&v, rank, s) {
                        Some(a) => vec![a],
                        None => return Some(Val::Poison),
                    },
                };
                axes.sort_unstable();
                axes.dedup();
                let keep = match self.bool_named(get_named("keep")) {
                    Some(k) => k,
                    None => return Some(Val::Poison),
                };
                let op = match name {
                    "sum" => ReduceOp::Sum,
                    "mean" => ReduceOp::Mean,
                    "prod" => ReduceOp::Prod,
                    "max" => ReduceOp::Max,
                    _ => ReduceOp::Min,
                };
                let x = if op == ReduceOp::Mean && !self.b.ty(x).dtype.is_float() {
                    self.cast(x, DType::F32, span)
                } else {
                    x
                };
                self.push1(Op::Reduce { op, axes, keep }, &[x], span)
            }
            "argmax" | "argmin" => {
                if !arity(self, 1) {
                    return Some(Val::Poison);
                }
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let rank = self.b.ty(x).rank();
                let axis = match get_named("axis") {
                    Some((v, s)) => self.axis(&v, rank, s),
                    None => self.axis(&Val::Int(-1), rank, span),
                };
                let Some(axis) = axis else {
                    return Some(Val::Poison);
                };
                let Some(keep) = self.bool_named(get_named("keep")) else {
                    return Some(Val::Poison);
                };
                let op = if name == "argmax" {
                    Op::ArgMax { axis, keep }
                } else {
                    Op::ArgMin { axis, keep }
                };
                self.push1(op, &[x], span)
            }
            "sort" => {
                if !arity(self, 1) {
                    return Some(Val::Poison);
                }
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let ty = self.b.ty(x).clone();
                if ty.dtype == DType::Bool {
                    return Some(self.err(
                        positional[0].span,
                        format!("`sort` takes numbers, found {ty}"),
                    ));
                }
                let axis = match get_named("axis") {
                    Some((v, s)) => self.axis(&v, ty.rank(), s),
                    None => self.axis(&Val::Int(-1), ty.rank(), span),
                };
                let Some(axis) = axis else {
                    return Some(Val::Poison);
                };
                self.push1(Op::Sort { axis }, &[x], span)
            }
            "select" => {
                if !arity(self, 3) {
                    return Some(Val::Poison);
                }
                let Some(c) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                if self.b.ty(c).dtype != DType::Bool {
                    let ty = self.b.ty(c).clone();
                    return Some(self.err(
                        positional[0].span,
                        format!("select's condition must be bool, found {ty}"),
                    ));
                }
                let (a, b) = (&positional[1].value, &positional[2].value);
                // Promote the two branches like a binary op would.
                let dt = |cx: &Self, v: &Val| {
                    if let Val::Tensor(t) = v {
                        Some(cx.b.ty(*t).dtype)
                    } else {
                        None
                    }
                };
                let target = match (dt(self, a), dt(self, b)) {
                    (Some(x), Some(y)) => promote(x, y),
                    (Some(x), None) | (None, Some(x)) => {
                        let other = if dt(self, a).is_some() { b } else { a };
                        if matches!(other, Val::Float(_)) && !x.is_float() {
                            DType::F32
                        } else {
                            x
                        }
                    }
                    (None, None) => match (a, b) {
                        (Val::Float(_), _) | (_, Val::Float(_)) => DType::F32,
                        (Val::Bool(_), Val::Bool(_)) => DType::Bool,
                        _ => DType::I64,
                    },
                };
                let (Some(x), Some(y)) = (
                    self.as_tensor(a, Some(target), span),
                    self.as_tensor(b, Some(target), span),
                ) else {
                    return Some(Val::Poison);
                };
                let x = self.cast(x, target, span);
                let y = self.cast(y, target, span);
                self.push1(Op::Select, &[c, x, y], span)
            }
            "matmul" => {
                if !arity(self, 2) {
                    return Some(Val::Poison);
                }
                let (a, b) = (positional[0].value.clone(), positional[1].value.clone());
                self.binary(ast::BinOp::MatMul, a, b, span)
            }
            "view" | "reshape" => {
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let Some(items) = self.dims_arg(&positional[1..], span) else {
                    return Some(Val::Poison);
                };
                let input = self.b.ty(x).shape.clone();
                let Some(shape) = self.reshape_target(&input, &items, span) else {
                    return Some(Val::Poison);
                };
                self.push1(Op::Reshape { shape }, &[x], span)
            }
            "broadcast_to" | "expand" => {
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let Some(items) = self.dims_arg(&positional[1..], span) else {
                    return Some(Val::Poison);
                };
                let Some(shape) = Self::shape_of(&items) else {
                    return Some(self.err(span, "dimensions must be non-negative"));
                };
                self.push1(Op::BroadcastTo { shape }, &[x], span)
            }
            "permute" => {
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let rank = self.b.ty(x).rank();
                let Some(items) = self.dims_arg(&positional[1..], span) else {
                    return Some(Val::Poison);
                };
                let mut perm = Vec::new();
                for item in &items {
                    match self.axis(item, rank, span) {
                        Some(a) => perm.push(a),
                        None => return Some(Val::Poison),
                    }
                }
                self.push1(Op::Permute { perm }, &[x], span)
            }
            "transpose" => {
                if !arity(self, 3) {
                    return Some(Val::Poison);
                }
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let rank = self.b.ty(x).rank();
                let (Some(a), Some(b)) = (
                    self.axis(&positional[1].value, rank, span),
                    self.axis(&positional[2].value, rank, span),
                ) else {
                    return Some(Val::Poison);
                };
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(a, b);
                self.push1(Op::Permute { perm }, &[x], span)
            }
            "unsqueeze" | "squeeze" => {
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let shape = self.b.ty(x).shape.clone();
                let axis_val = match (positional.get(1), get_named("axis")) {
                    (Some(a), _) => a.value.clone(),
                    (None, Some((v, _))) => v,
                    (None, None) => return Some(self.err(span, format!("`{name}` needs an axis"))),
                };
                let mut dims = shape.0.clone();
                if name == "unsqueeze" {
                    let Some(a) = self.axis(&axis_val, dims.len() + 1, span) else {
                        return Some(Val::Poison);
                    };
                    dims.insert(a, Dim::Const(1));
                } else {
                    let Some(a) = self.axis(&axis_val, dims.len(), span) else {
                        return Some(Val::Poison);
                    };
                    if dims[a] != Dim::Const(1) {
                        return Some(self.err(
                            span,
                            format!("squeeze: axis {a} of {shape} does not have size 1"),
                        ));
                    }
                    dims.remove(a);
                }
                self.push1(Op::Reshape { shape: Shape(dims) }, &[x], span)
            }
            "concat" | "stack" => {
                if !arity(self, 1) {
                    return Some(Val::Poison);
                }
                let items = match &positional[0].value {
                    Val::List(v) | Val::Tuple(v) if !v.is_empty() => v.clone(),
                    other => {
                        return Some(self.err(
                            positional[0].span,
                            format!(
                                "`{name}` takes a non-empty list of tensors, found {}",
                                other.describe()
                            ),
                        ))
                    }
                };
                let mut tensors = Vec::new();
                for item in &items {
                    match self.as_tensor(item, None, span) {
                        Some(t) => tensors.push(t),
                        None => return Some(Val::Poison),
                    }
                }
                let dtype = tensors
                    .iter()
                    .map(|t| self.b.ty(*t).dtype)
                    .reduce(promote)
                    .expect("non-empty");
                let tensors: Vec<Value> = tensors
                    .into_iter()
                    .map(|t| self.cast(t, dtype, span))
                    .collect();
                let rank = self.b.ty(tensors[0]).rank() + usize::from(name == "stack");
                let axis_val = get_named("axis").map(|(v, _)| v).unwrap_or(Val::Int(0));
                let Some(axis) = self.axis(&axis_val, rank, span) else {
                    return Some(Val::Poison);
                };
                let tensors = if name == "stack" {
                    let mut out = Vec::new();
                    for t in tensors {
                        let mut dims = self.b.ty(t).shape.0.clone();
                        dims.insert(axis.min(dims.len()), Dim::Const(1));
                        match self.push1(Op::Reshape { shape: Shape(dims) }, &[t], span) {
                            Val::Tensor(r) => out.push(r),
                            _ => return Some(Val::Poison),
                        }
                    }
                    out
                } else {
                    tensors
                };
                self.push1(Op::Concat { axis }, &tensors, span)
            }
            "gather" => {
                if !arity(self, 2) {
                    return Some(Val::Poison);
                }
                let (Some(table), Some(idx)) = (
                    self.tensor_arg(&positional, 0, name, span),
                    self.tensor_arg(&positional, 1, name, span),
                ) else {
                    return Some(Val::Poison);
                };
                let rank = self.b.ty(table).rank();
                let axis_val = get_named("axis").map(|(v, _)| v).unwrap_or(Val::Int(0));
                let Some(axis) = self.axis(&axis_val, rank, span) else {
                    return Some(Val::Poison);
                };
                self.push1(Op::Gather { axis }, &[table, idx], span)
            }
            "zeros" | "ones" | "full" => {
                let (value, dim_args) = match name {
                    "zeros" => (0.0, &positional[..]),
                    "ones" => (1.0, &positional[..]),
                    _ => {
                        let Some(first) = positional.first() else {
                            return Some(self.err(span, "`full` takes a shape then a value"));
                        };
                        let _ = first;
                        if positional.len() < 2 {
                            return Some(self.err(
                                span,
                                "`full` takes a shape then a value: full([G, M], 0.5)",
                            ));
                        }
                        let v = match positional[positional.len() - 1].value {
                            Val::Int(i) => i as f64,
                            Val::Float(f) => f,
                            Val::Bool(b) => f64::from(u8::from(b)),
                            ref other => {
                                return Some(self.err(
                                    positional[positional.len() - 1].span,
                                    format!(
                                        "`full`'s value must be a number, found {}",
                                        other.describe()
                                    ),
                                ))
                            }
                        };
                        (v, &positional[..positional.len() - 1])
                    }
                };
                let dtype = match self.dtype_named(get_named("dtype")) {
                    Some(d) => d.unwrap_or(
                        if name == "full"
                            && value.fract() == 0.0
                            && matches!(positional.last().map(|a| &a.value), Some(Val::Int(_)))
                        {
                            DType::I64
                        } else {
                            DType::F32
                        },
                    ),
                    None => return Some(Val::Poison),
                };
                let Some(items) = self.dims_arg(dim_args, span) else {
                    return Some(Val::Poison);
                };
                let Some(shape) = Self::shape_of(&items) else {
                    return Some(self.err(span, "dimensions must be non-negative"));
                };
                self.push1(
                    Op::Full {
                        value,
                        dtype,
                        shape,
                    },
                    &[],
                    span,
                )
            }
            "zeros_like" | "ones_like" | "full_like" => {
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let ty = self.b.ty(x).clone();
                let value = match name {
                    "zeros_like" => 0.0,
                    "ones_like" => 1.0,
                    _ => match positional.get(1).map(|a| &a.value) {
                        Some(Val::Int(i)) => *i as f64,
                        Some(Val::Float(f)) => *f,
                        _ => {
                            return Some(self.err(span, "`full_like` takes a tensor and a number"))
                        }
                    },
                };
                let dtype = match self.dtype_named(get_named("dtype")) {
                    Some(d) => d.unwrap_or(ty.dtype),
                    None => return Some(Val::Poison),
                };
                self.push1(
                    Op::Full {
                        value,
                        dtype,
                        shape: ty.shape,
                    },
                    &[],
                    span,
                )
            }
            "arange" => {
                if !arity(self, 1) {
                    return Some(Val::Poison);
                }
                let Some(len) = positional[0].value.as_dim() else {
                    return Some(self.err(
                        positional[0].span,
                        format!(
                            "`arange` takes a length (an integer or a symbolic dim), found {}",
                            positional[0].value.describe()
                        ),
                    ));
                };
                let dtype = match self.dtype_named(get_named("dtype")) {
                    Some(d) => d.unwrap_or(DType::I64),
                    None => return Some(Val::Poison),
                };
                self.push1(Op::Arange { len, dtype }, &[], span)
            }
            "shape" => {
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                Val::List(
                    self.b
                        .ty(x)
                        .shape
                        .0
                        .iter()
                        .cloned()
                        .map(Val::from)
                        .collect(),
                )
            }
            "dim" => {
                if !arity(self, 2) {
                    return Some(Val::Poison);
                }
                let Some(x) = self.tensor_arg(&positional, 0, name, span) else {
                    return Some(Val::Poison);
                };
                let shape = self.b.ty(x).shape.clone();
                let Some(a) = self.axis(&positional[1].value, shape.rank(), span) else {
                    return Some(Val::Poison);
                };
                Val::from(shape.0[a].clone())
            }
            "int" => match positional.first().map(|a| &a.value) {
                Some(Val::Int(i)) if positional.len() == 1 => Val::Int(*i),
                Some(Val::Float(f)) if positional.len() == 1 => Val::Int(f.trunc() as i64),
                _ => self.err(span, "`int` takes one compile-time number"),
            },
            "float" => match positional.first().map(|a| &a.value) {
                Some(Val::Int(i)) if positional.len() == 1 => Val::Float(*i as f64),
                Some(Val::Float(f)) if positional.len() == 1 => Val::Float(*f),
                _ => self.err(span, "`float` takes one compile-time number"),
            },
            "sdpa" => {
                // sdpa(q, k, v, allow, scale): the built-in attention op.
                if !arity(self, 5) {
                    return Some(Val::Poison);
                }
                let scale = match positional[4].value {
                    Val::Int(i) => i as f64,
                    Val::Float(f) => f,
                    ref other => {
                        return Some(self.err(
                            positional[4].span,
                            format!(
                                "sdpa's scale must be a number known at compile time, found {}",
                                other.describe()
                            ),
                        ))
                    }
                };
                let mut operands = Vec::new();
                for (i, arg) in positional.iter().take(4).enumerate() {
                    let hint = if i == 3 { Some(DType::Bool) } else { None };
                    match self.as_tensor(&arg.value, hint, arg.span) {
                        Some(t) => operands.push(t),
                        None => return Some(Val::Poison),
                    }
                }
                self.push1(Op::Attention { scale }, &operands, span)
            }
            "kv_write" => {
                // kv_write(cache, rows, slots, layer): store rows at slots of a paged cache.
                if !arity(self, 4) {
                    return Some(Val::Poison);
                }
                let Some(layer) = self.layer_index(name, &positional[3]) else {
                    return Some(Val::Poison);
                };
                let mut operands = Vec::new();
                for arg in &positional[..3] {
                    match self.as_tensor(&arg.value, None, arg.span) {
                        Some(t) => operands.push(t),
                        None => return Some(Val::Poison),
                    }
                }
                self.push1(Op::KvWrite { layer }, &operands, span)
            }
            "paged_sdpa" => {
                // paged_sdpa(q, k_cache, v_cache, block_tables, seq, pos, layer, scale):
                // causal attention of each token over its sequence's cached positions.
                if !arity(self, 8) {
                    return Some(Val::Poison);
                }
                let Some(layer) = self.layer_index(name, &positional[6]) else {
                    return Some(Val::Poison);
                };
                let scale = match positional[7].value {
                    Val::Int(i) => i as f64,
                    Val::Float(f) => f,
                    ref other => {
                        return Some(self.err(
                            positional[7].span,
                            format!(
                                "paged_sdpa's scale must be a number known at compile time, \
                                 found {}",
                                other.describe()
                            ),
                        ))
                    }
                };
                let mut operands = Vec::new();
                for arg in &positional[..6] {
                    match self.as_tensor(&arg.value, None, arg.span) {
                        Some(t) => operands.push(t),
                        None => return Some(Val::Poison),
                    }
                }
                self.push1(Op::PagedAttention { layer, scale }, &operands, span)
            }
            "compile_error" => {
                let msg = match positional.first().map(|a| &a.value) {
                    Some(Val::Str(s)) => s.clone(),
                    _ => return Some(self.err(span, "`compile_error` takes a message string")),
                };
                let details: Vec<String> = positional[1..]
                    .iter()
                    .map(|a| match &a.value {
                        Val::Str(s) => format!("{s:?}"),
                        other => other.describe(),
                    })
                    .collect();
                if details.is_empty() {
                    self.err(span, msg)
                } else {
                    self.err(span, format!("{msg}: {}", details.join(", ")))
                }
            }
            "len" => match positional.first().map(|a| &a.value) {
                Some(Val::List(v) | Val::Tuple(v)) if positional.len() == 1 => {
                    Val::Int(v.len() as i64)
                }
                _ => self.err(span, "`len` takes one list or tuple"),
            },
            _ => return None,
        };
        Some(v)
    }

    /// A layer index known at compile time (the `L` of a layer loop), for the paged-cache
    /// built-ins.
    fn layer_index(&mut self, fname: &str, arg: &ArgVal) -> Option<usize> {
        match arg.value {
            Val::Int(i) if i >= 0 => Some(i as usize),
            ref other => {
                let found = other.describe();
                self.err(
                    arg.span,
                    format!(
                        "`{fname}`'s layer must be a non-negative integer known at compile \
                         time (a layer loop's index), found {found}"
                    ),
                );
                None
            }
        }
    }

    fn bool_named(&mut self, v: Option<(Val, Span)>) -> Option<bool> {
        match v {
            None => Some(false),
            Some((Val::Bool(b), _)) => Some(b),
            Some((other, s)) => {
                self.err(
                    s,
                    format!("expected true or false, found {}", other.describe()),
                );
                None
            }
        }
    }

    /// `Some(None)` when absent, `Some(Some(d))` for a dtype, `None` after an error.
    fn dtype_named(&mut self, v: Option<(Val, Span)>) -> Option<Option<DType>> {
        match v {
            None => Some(None),
            Some((Val::DType(d), _)) => Some(Some(d)),
            Some((other, s)) => {
                self.err(
                    s,
                    format!("expected a dtype such as f32, found {}", other.describe()),
                );
                None
            }
        }
    }

    fn binary_builtin(&mut self, name: &str, args: &[ArgVal], span: Span) -> Val {
        let op = match name {
            "pow" => BinaryOp::Pow,
            "max" | "maximum" => BinaryOp::Max,
            _ => BinaryOp::Min,
        };
        let (a, b) = (args[0].value.clone(), args[1].value.clone());
        let num = |v: &Val| match v {
            Val::Int(i) => Some(*i as f64),
            Val::Float(f) => Some(*f),
            _ => None,
        };
        if let (Some(x), Some(y)) = (num(&a), num(&b)) {
            if let (Val::Int(i), Val::Int(j)) = (&a, &b) {
                if op != BinaryOp::Pow {
                    return Val::Int(if op == BinaryOp::Max {
                        *i.max(j)
                    } else {
                        *i.min(j)
                    });
                }
            }
            return Val::Float(match op {
                BinaryOp::Pow => x.powf(y),
                BinaryOp::Max => x.max(y),
                _ => x.min(y),
            });
        }
        // pow on an integer tensor computes in f32.
        if op == BinaryOp::Pow {
            for v in [&a, &b] {
                if let Val::Tensor(t) = v {
                    if !self.b.ty(*t).dtype.is_float() {
                        let c = self.cast(*t, DType::F32, span);
                        let (a2, b2) = if v == &a {
                            (Val::Tensor(c), b.clone())
                        } else {
                            (a.clone(), Val::Tensor(c))
                        };
                        return self.elementwise(op, a2, b2, span);
                    }
                }
            }
        }
        self.elementwise(op, a, b, span)
    }

    fn cast_val(&mut self, v: &Val, to: DType, span: Span) -> Val {
        match v {
            Val::Int(_) | Val::Float(_) | Val::Bool(_) | Val::Tensor(_) | Val::Param(_) => {
                match self.as_tensor(v, None, span) {
                    Some(t) => Val::Tensor(self.cast(t, to, span)),
                    None => Val::Poison,
                }
            }
            Val::Poison => Val::Poison,
            other => self.err(span, format!("cannot cast {} to {to}", other.describe())),
        }
    }

    /// `x[items]`: element of a tuple or list, or slicing, selection and gathering of a tensor.
    pub(crate) fn index(&mut self, base: Val, items: &'p [ast::IndexItem], span: Span) -> Val {
        match &base {
            Val::Poison => return Val::Poison,
            Val::List(v) | Val::Tuple(v) => {
                let v = v.clone();
                if let [ast::IndexItem::Expr(e)] = items {
                    return match self.expr(e) {
                        Val::Int(i) => {
                            let n = v.len() as i64;
                            let j = if i < 0 { i + n } else { i };
                            if (0..n).contains(&j) {
                                v[j as usize].clone()
                            } else {
                                self.err(
                                    e.span,
                                    format!("index {i} is out of range for a list of {n}"),
                                )
                            }
                        }
                        Val::Poison => Val::Poison,
                        other => self.err(
                            e.span,
                            format!(
                                "a list index must be an integer, found {}",
                                other.describe()
                            ),
                        ),
                    };
                }
                return self.err(span, "a list takes one integer index");
            }
            _ => {}
        }
        let Some(x) = self.as_tensor(&base, None, span) else {
            return Val::Poison;
        };
        let shape = self.b.ty(x).shape.clone();
        let rank = shape.rank();
        let explicit = items
            .iter()
            .filter(|i| !matches!(i, ast::IndexItem::Ellipsis(_)))
            .count();
        if items
            .iter()
            .filter(|i| matches!(i, ast::IndexItem::Ellipsis(_)))
            .count()
            > 1
        {
            return self.err(span, "an index may contain `...` only once");
        }
        if explicit > rank {
            let ty = self.b.ty(x).clone();
            return self.err(span, format!("too many indices ({explicit}) for {ty}"));
        }
        let mut cur = x;
        let mut axis = 0;
        let mut squeeze = Vec::new();
        let mut gather: Option<(usize, Value, Span)> = None;
        for item in items {
            match item {
                ast::IndexItem::Ellipsis(_) => {
                    axis += rank - explicit;
                }
                ast::IndexItem::Expr(e) => {
                    let v = self.expr(e);
                    match v {
                        Val::Int(i) => {
                            let Some(start) = self.index_bound(i, &shape.0[axis], e.span) else { return Val::Poison };
                            match self.slice(cur, axis, start, Dim::Const(start + 1), 1, e.span) {
                                Some(t) => cur = t,
                                None => return Val::Poison,
                            }
                            squeeze.push(axis);
                        }
                        Val::Range(a, b) => {
                            let (Some(s), Some(en)) = (self.index_bound(a, &shape.0[axis], e.span), self.index_bound(b, &shape.0[axis], e.span)) else { return Val::Poison };
                            match self.slice(cur, axis, s, Dim::Const(en), 1, e.span) {
                                Some(t) => cur = t,
                                None => return Val::Poison,
                            }
                        }
                        Val::Tensor(_) | Val::Param(_) => {
                            if gather.is_some() {
                                return self.err(e.span, "only one index may be a tensor");
                            }
                            let Some(t) = self.as_tensor(&v, None, e.span) else { return Val::Poison };
                            gather = Some((axis, t, e.span));
                        }
                        Val::Poison => return Val::Poison,
                        other => return self.err(e.span, format!("an index must be an integer, a range, a slice or an integer tensor, found {}", other.describe())),
                    }
                    axis += 1;
                }
                ast::IndexItem::Slice {
                    start,
                    end,
                    step,
                    span: sspan,
                } => {
                    let dim = shape.0[axis].clone();
                    let bound = |cx: &mut Self,
                                 e: &'p Option<ast::Expr>,
                                 default: Option<Dim>|
                     -> Option<Option<Dim>> {
                        match e {
                            None => Some(default),
                            Some(e) => match cx.expr(e) {
                                Val::Int(i) => cx.index_bound(i, &dim, e.span).map(|b| {
                                    Some(Dim::Const(b.min(dim.as_const().unwrap_or(u64::MAX))))
                                }),
                                Val::Sym(s) => Some(Some(Dim::Sym(s))),
                                Val::Poison => None,
                                other => {
                                    cx.err(e.span, format!("a slice bound must be an integer known at compile time, found {}", other.describe()));
                                    None
                                }
                            },
                        }
                    };
                    let Some(s) = bound(self, start, Some(Dim::Const(0))) else {
                        return Val::Poison;
                    };
                    let Some(en) = bound(self, end, Some(dim.clone())) else {
                        return Val::Poison;
                    };
                    let step = match step {
                        None => 1,
                        Some(e) => match self.expr(e) {
                            Val::Int(k) if k >= 1 => k as u64,
                            Val::Poison => return Val::Poison,
                            other => {
                                return self.err(
                                    e.span,
                                    format!(
                                        "a slice step must be a positive integer, found {}",
                                        other.describe()
                                    ),
                                )
                            }
                        },
                    };
                    let Some(Dim::Const(s)) = s else {
                        return self.err(*sspan, "a slice start must be an integer");
                    };
                    let en = en.unwrap_or(dim.clone());
                    if s == 0 && en == dim && step == 1 {
                        axis += 1;
                        continue;
                    }
                    match self.slice(cur, axis, s, en, step, *sspan) {
                        Some(t) => cur = t,
                        None => return Val::Poison,
                    }
                    axis += 1;
                }
            }
        }
        // Drop the selected axes, then gather.
        if !squeeze.is_empty() {
            let dims: Vec<Dim> = self
                .b
                .ty(cur)
                .shape
                .0
                .iter()
                .enumerate()
                .filter(|(i, _)| !squeeze.contains(i))
                .map(|(_, d)| d.clone())
                .collect();
            cur = match self.push1(Op::Reshape { shape: Shape(dims) }, &[cur], span) {
                Val::Tensor(t) => t,
                _ => return Val::Poison,
            };
        }
        if let Some((g_axis, idx, ispan)) = gather {
            let shift = squeeze.iter().filter(|a| **a < g_axis).count();
            return self.push1(
                Op::Gather {
                    axis: g_axis - shift,
                },
                &[cur, idx],
                ispan,
            );
        }
        Val::Tensor(cur)
    }

    /// A non-negative position along a dim from a possibly negative index.
    fn index_bound(&mut self, i: i64, dim: &Dim, span: Span) -> Option<u64> {
        if i >= 0 {
            if let Some(n) = dim.as_const() {
                if i as u64 > n {
                    self.err(
                        span,
                        format!("index {i} is out of range for a dimension of size {n}"),
                    );
                    return None;
                }
            }
            return Some(i as u64);
        }
        match dim.as_const() {
            Some(n) if (-i) as u64 <= n => Some(n - (-i) as u64),
            Some(n) => {
                self.err(
                    span,
                    format!("index {i} is out of range for a dimension of size {n}"),
                );
                None
            }
            None => {
                self.err(
                    span,
                    format!(
                        "a negative index needs a dimension of known size, but this one is {dim}"
                    ),
                );
                None
            }
        }
    }

    fn slice(
        &mut self,
        x: Value,
        axis: usize,
        start: u64,
        end: Dim,
        step: u64,
        span: Span,
    ) -> Option<Value> {
        match self.push1(
            Op::Slice {
                axis,
                start,
                end,
                step,
            },
            &[x],
            span,
        ) {
            Val::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_follows_the_documented_lattice() {
        assert_eq!(promote(DType::BF16, DType::F32), DType::F32);
        assert_eq!(promote(DType::BF16, DType::F16), DType::F32);
        assert_eq!(promote(DType::F8E4M3, DType::F8E5M2), DType::F16);
        assert_eq!(promote(DType::F8E4M3, DType::BF16), DType::BF16);
        assert_eq!(promote(DType::I32, DType::BF16), DType::BF16);
        assert_eq!(promote(DType::I8, DType::I64), DType::I64);
        assert_eq!(promote(DType::Bool, DType::I32), DType::I32);
    }
}
