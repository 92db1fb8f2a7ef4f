//! Test helpers shared by the syntax tests: a compact s-expression printer for the AST
//! and a checker that every node's span lies inside its parent's.

#![allow(dead_code)]

use kiln_syntax::ast::*;

/// Prints a file as one s-expression per item, one per line.
pub fn file_sexpr(file: &File) -> String {
    file.items.iter().map(item).collect::<Vec<_>>().join("\n")
}

fn item(item: &Item) -> String {
    match item {
        Item::Import { path, .. } => format!("(import {})", dotted(path)),
        Item::Config(config) => {
            let fields: Vec<String> = config.fields.iter().map(config_field).collect();
            format!("(config {})", fields.join(" "))
        }
        Item::Fn(def) => fn_def(def),
        Item::Model(model) => {
            let items: Vec<String> = model
                .items
                .iter()
                .map(|i| match i {
                    ModelItem::Param(p) => param(p),
                    ModelItem::Layers(l) => {
                        let params: Vec<String> = l.params.iter().map(param).collect();
                        format!(
                            "(layers {} {} {} {})",
                            l.index.name,
                            expr(&l.start),
                            expr(&l.end),
                            params.join(" ")
                        )
                    }
                    ModelItem::Fn(def) => fn_def(def),
                })
                .collect();
            format!("(model {} {})", model.name.name, items.join(" "))
        }
    }
}

fn dotted(path: &[Ident]) -> String {
    path.iter()
        .map(|i| i.name.as_str())
        .collect::<Vec<_>>()
        .join(".")
}

fn config_field(field: &ConfigField) -> String {
    let mut out = format!("({} {}", field.name.name, field.ty.name);
    if let Some(default) = &field.default {
        out += &format!(" = {}", expr(default));
    }
    if let Some(path) = &field.json_path {
        out += &format!(" from {:?}", path.value);
    }
    out + ")"
}

fn param(p: &ParamDecl) -> String {
    format!("(param {} {} {})", p.name.name, ty(&p.ty), expr(&p.source))
}

fn fn_def(def: &FnDef) -> String {
    let params: Vec<String> = def
        .params
        .iter()
        .map(|p| {
            let mut out = p.name.name.clone();
            if let Some(t) = &p.ty {
                out += &format!(": {}", ty(t));
            }
            if let Some(d) = &p.default {
                out += &format!(" = {}", expr(d));
            }
            format!("({out})")
        })
        .collect();
    let ret = def
        .ret
        .as_ref()
        .map(|t| format!(" -> {}", ty(t)))
        .unwrap_or_default();
    format!(
        "(fn {} ({}){} {})",
        def.name.name,
        params.join(" "),
        ret,
        block(&def.body)
    )
}

pub fn ty(t: &Type) -> String {
    match t {
        Type::Tensor { dtype, dims, .. } => {
            let dims: Vec<String> = dims
                .iter()
                .map(|d| match d {
                    DimExpr::Ellipsis(_) => "...".to_string(),
                    DimExpr::Expr(e) => expr(e),
                })
                .collect();
            let dtype = dtype.as_ref().map_or("", |d| d.name.as_str());
            format!("{dtype}[{}]", dims.join(" "))
        }
        Type::Named(name) => name.name.clone(),
        Type::Tuple { elems, .. } => {
            let elems: Vec<String> = elems.iter().map(ty).collect();
            format!("(tuple {})", elems.join(" "))
        }
    }
}

/// `{s1; s2; value}`: statements end with `;`, the value does not.
pub fn block(b: &Block) -> String {
    let mut parts: Vec<String> = b.stmts.iter().map(|s| format!("{};", stmt(s))).collect();
    if let Some(value) = &b.value {
        parts.push(expr(value));
    }
    format!("{{{}}}", parts.join(" "))
}

pub fn stmt(s: &Stmt) -> String {
    match s {
        Stmt::Let { pat: p, value, .. } => format!("(let {} {})", pat(p), expr(value)),
        Stmt::Assign { name, value, .. } => format!("(= {} {})", name.name, expr(value)),
        Stmt::For {
            var, iter, body, ..
        } => format!("(for {} {} {})", var.name, expr(iter), block(body)),
        Stmt::Expr(e) => expr(e),
        Stmt::Error(_) => "<error>".to_string(),
    }
}

fn pat(p: &Pat) -> String {
    match p {
        Pat::Name(name) => name.name.clone(),
        Pat::Wildcard(_) => "_".to_string(),
        Pat::Tuple { elems, .. } => {
            let elems: Vec<String> = elems.iter().map(pat).collect();
            format!("(tuple {})", elems.join(" "))
        }
    }
}

pub fn expr(e: &Expr) -> String {
    let list = |head: &str, elems: &[Expr]| {
        let mut parts = vec![head.to_string()];
        parts.extend(elems.iter().map(expr));
        format!("({})", parts.join(" "))
    };
    match &e.kind {
        ExprKind::Int(v) => v.to_string(),
        ExprKind::Float(v) => format!("{v:?}"),
        ExprKind::Bool(v) => v.to_string(),
        ExprKind::Str(v) => format!("{v:?}"),
        ExprKind::Name(n) => n.clone(),
        ExprKind::Tuple(elems) => list("tuple", elems),
        ExprKind::List(elems) => list("list", elems),
        ExprKind::Unary { op, operand } => {
            let op = match op {
                UnOp::Neg => "neg",
                UnOp::Not => "not",
            };
            format!("({op} {})", expr(operand))
        }
        ExprKind::Binary { op, lhs, rhs } => {
            format!("({} {} {})", op.symbol(), expr(lhs), expr(rhs))
        }
        ExprKind::Call { callee, args } => {
            let mut parts = vec!["call".to_string(), expr(callee)];
            parts.extend(args.iter().map(|a| match &a.name {
                Some(name) => format!("{}={}", name.name, expr(&a.value)),
                None => expr(&a.value),
            }));
            format!("({})", parts.join(" "))
        }
        ExprKind::Field { base, name } => format!("(. {} {})", expr(base), name.name),
        ExprKind::TupleIndex { base, index } => format!("(. {} {index})", expr(base)),
        ExprKind::Index { base, items } => {
            let mut parts = vec!["index".to_string(), expr(base)];
            parts.extend(items.iter().map(|i| match i {
                IndexItem::Expr(e) => expr(e),
                IndexItem::Ellipsis(_) => "...".to_string(),
                IndexItem::Slice {
                    start, end, step, ..
                } => {
                    let part = |p: &Option<Expr>| p.as_ref().map_or("_".to_string(), expr);
                    format!("(slice {} {} {})", part(start), part(end), part(step))
                }
            }));
            format!("({})", parts.join(" "))
        }
        ExprKind::Range { start, end } => format!("(.. {} {})", expr(start), expr(end)),
        ExprKind::If {
            cond,
            then,
            otherwise,
        } => format!("(if {} {} {})", expr(cond), block(then), block(otherwise)),
        ExprKind::Loop { count, vars, body } => {
            let vars: Vec<String> = vars
                .iter()
                .map(|v| format!("({} {})", v.name.name, expr(&v.init)))
                .collect();
            format!(
                "(loop {} ({}) {})",
                expr(count),
                vars.join(" "),
                block(body)
            )
        }
        ExprKind::Block(b) => block(b),
        ExprKind::Error => "<error>".to_string(),
    }
}

/// Checks that every node's span is inside `outer` and that children nest inside their
/// parent; returns the first violation.
pub fn check_spans(file: &File, source_len: usize) -> Result<(), String> {
    let whole = Span::new(0, source_len);
    for item in &file.items {
        match item {
            Item::Import { path, span } => {
                inside(*span, whole, "import")?;
                for p in path {
                    inside(p.span, *span, "import path")?;
                }
            }
            Item::Config(config) => {
                inside(config.span, whole, "config")?;
                for field in &config.fields {
                    inside(field.span, config.span, "field")?;
                    inside(field.name.span, field.span, "field name")?;
                    inside(field.ty.span, field.span, "field type")?;
                    if let Some(d) = &field.default {
                        expr_spans(d, field.span)?;
                    }
                    if let Some(p) = &field.json_path {
                        inside(p.span, field.span, "json path")?;
                    }
                }
            }
            Item::Fn(def) => fn_spans(def, whole)?,
            Item::Model(model) => {
                inside(model.span, whole, "model")?;
                for mitem in &model.items {
                    match mitem {
                        ModelItem::Param(p) => param_spans(p, model.span)?,
                        ModelItem::Layers(l) => {
                            inside(l.span, model.span, "layers")?;
                            expr_spans(&l.start, l.span)?;
                            expr_spans(&l.end, l.span)?;
                            for p in &l.params {
                                param_spans(p, l.span)?;
                            }
                        }
                        ModelItem::Fn(def) => fn_spans(def, model.span)?,
                    }
                }
            }
        }
    }
    Ok(())
}

fn inside(span: Span, outer: Span, what: &str) -> Result<(), String> {
    if span.start <= span.end && outer.start <= span.start && span.end <= outer.end {
        Ok(())
    } else {
        Err(format!("{what} span {span:?} is not inside {outer:?}"))
    }
}

fn param_spans(p: &ParamDecl, outer: Span) -> Result<(), String> {
    inside(p.span, outer, "param")?;
    type_spans(&p.ty, p.span)?;
    expr_spans(&p.source, p.span)
}

fn fn_spans(def: &FnDef, outer: Span) -> Result<(), String> {
    inside(def.span, outer, "fn")?;
    for p in &def.params {
        inside(p.span, def.span, "fn param")?;
        if let Some(t) = &p.ty {
            type_spans(t, p.span)?;
        }
        if let Some(d) = &p.default {
            expr_spans(d, p.span)?;
        }
    }
    if let Some(t) = &def.ret {
        type_spans(t, def.span)?;
    }
    block_spans(&def.body, def.span)
}

fn type_spans(t: &Type, outer: Span) -> Result<(), String> {
    inside(t.span(), outer, "type")?;
    match t {
        Type::Tensor { dims, span, .. } => {
            for d in dims {
                match d {
                    DimExpr::Ellipsis(s) => inside(*s, *span, "dim")?,
                    DimExpr::Expr(e) => expr_spans(e, *span)?,
                }
            }
        }
        Type::Named(_) => {}
        Type::Tuple { elems, span } => {
            for e in elems {
                type_spans(e, *span)?;
            }
        }
    }
    Ok(())
}

fn block_spans(b: &Block, outer: Span) -> Result<(), String> {
    inside(b.span, outer, "block")?;
    for s in &b.stmts {
        match s {
            Stmt::Let { value, span, .. } | Stmt::Assign { value, span, .. } => {
                inside(*span, b.span, "statement")?;
                expr_spans(value, *span)?;
            }
            Stmt::For {
                iter, body, span, ..
            } => {
                inside(*span, b.span, "for")?;
                expr_spans(iter, *span)?;
                block_spans(body, *span)?;
            }
            Stmt::Expr(e) => expr_spans(e, b.span)?,
            Stmt::Error(span) => inside(*span, b.span, "error statement")?,
        }
    }
    if let Some(v) = &b.value {
        expr_spans(v, b.span)?;
    }
    Ok(())
}

fn expr_spans(e: &Expr, outer: Span) -> Result<(), String> {
    inside(e.span, outer, "expression")?;
    let span = e.span;
    match &e.kind {
        ExprKind::Tuple(elems) | ExprKind::List(elems) => {
            for x in elems {
                expr_spans(x, span)?;
            }
        }
        ExprKind::Unary { operand, .. } => expr_spans(operand, span)?,
        ExprKind::Binary { lhs, rhs, .. } => {
            expr_spans(lhs, span)?;
            expr_spans(rhs, span)?;
        }
        ExprKind::Range { start, end } => {
            expr_spans(start, span)?;
            expr_spans(end, span)?;
        }
        ExprKind::Call { callee, args } => {
            expr_spans(callee, span)?;
            for a in args {
                expr_spans(&a.value, span)?;
            }
        }
        ExprKind::Field { base, name } => {
            expr_spans(base, span)?;
            inside(name.span, span, "field name")?;
        }
        ExprKind::TupleIndex { base, .. } => expr_spans(base, span)?,
        ExprKind::Index { base, items } => {
            expr_spans(base, span)?;
            for i in items {
                match i {
                    IndexItem::Expr(x) => expr_spans(x, span)?,
                    IndexItem::Ellipsis(s) => inside(*s, span, "ellipsis")?,
                    IndexItem::Slice {
                        start,
                        end,
                        step,
                        span: slice,
                    } => {
                        inside(*slice, span, "slice")?;
                        for part in [start, end, step].into_iter().flatten() {
                            expr_spans(part, *slice)?;
                        }
                    }
                }
            }
        }
        ExprKind::If {
            cond,
            then,
            otherwise,
        } => {
            expr_spans(cond, span)?;
            block_spans(then, span)?;
            block_spans(otherwise, span)?;
        }
        ExprKind::Loop { count, vars, body } => {
            expr_spans(count, span)?;
            for v in vars {
                expr_spans(&v.init, span)?;
            }
            block_spans(body, span)?;
        }
        ExprKind::Block(b) => block_spans(b, span)?,
        ExprKind::Int(_)
        | ExprKind::Float(_)
        | ExprKind::Bool(_)
        | ExprKind::Str(_)
        | ExprKind::Name(_)
        | ExprKind::Error => {}
    }
    Ok(())
}
