//! What the grammar's actions call: AST constructors that track nesting depth, and the
//! translation of parser errors into readable diagnostics.
//!
//! Every expression, statement and block is built as a [`Deep`] node that knows how deeply
//! nested it is. A node deeper than [`MAX_EXPR_DEPTH`] is replaced by an error node with a
//! diagnostic, so no AST the parser builds (or drops while recovering) is deep enough to
//! overflow the stack of code that walks it recursively.

use crate::ast::*;
use crate::diagnostic::{Diagnostic, FileId};
use crate::lexer::{Delimiter, Lexeme, Token};
use lalrpop_util::{ErrorRecovery, ParseError};
use std::cell::{Cell, RefCell};

/// The deepest expression/statement/block nesting the parser builds.
pub const MAX_EXPR_DEPTH: u32 = 256;

/// The lexer never hands the parser an error (it reports them itself), so the parser's
/// user error type has no values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Never {}

pub(crate) type SyntaxError = ParseError<usize, Token, Never>;
pub(crate) type Recovery = ErrorRecovery<usize, Token, Never>;

/// An AST node and the depth of the tree below it (a leaf has depth 1).
#[derive(Debug)]
pub struct Deep<T> {
    pub node: T,
    pub depth: u32,
}

pub(crate) fn span(start: usize, end: usize) -> Span {
    Span::new(start, end)
}

/// Where a syntax error was found: the unexpected token, or the end of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorSite {
    /// `None` at the end of the file.
    pub found: Option<(Span, Token)>,
}

/// A syntax error: where, and its diagnostic unless it is a consequence of an earlier one.
#[derive(Debug)]
pub struct SyntaxErrorRecord {
    pub site: ErrorSite,
    pub diagnostic: Option<Diagnostic>,
}

/// State the grammar's actions share: where diagnostics go, and the tokens, for messages.
pub struct ParseContext<'a> {
    file: FileId,
    source: &'a str,
    tokens: &'a [Lexeme],
    /// Syntax errors in the order the parser met them.
    errors: RefCell<Vec<SyntaxErrorRecord>>,
    /// Other problems found while building the AST (nesting too deep, ...).
    diagnostics: RefCell<Vec<Diagnostic>>,
    depth_limit_reported: Cell<bool>,
}

impl<'a> ParseContext<'a> {
    pub(crate) fn new(file: FileId, source: &'a str, tokens: &'a [Lexeme]) -> Self {
        ParseContext {
            file,
            source,
            tokens,
            errors: RefCell::new(Vec::new()),
            diagnostics: RefCell::new(Vec::new()),
            depth_limit_reported: Cell::new(false),
        }
    }

    /// The syntax errors met, in order, and the other diagnostics.
    pub(crate) fn finish(self) -> (Vec<SyntaxErrorRecord>, Vec<Diagnostic>) {
        (self.errors.into_inner(), self.diagnostics.into_inner())
    }

    fn report(&self, diagnostic: Diagnostic) {
        self.diagnostics.borrow_mut().push(diagnostic);
    }

    // ---- expressions ----

    fn expr(&self, kind: ExprKind, span: Span, child_depth: u32) -> Deep<Expr> {
        let depth = child_depth + 1;
        if depth <= MAX_EXPR_DEPTH {
            return Deep {
                node: Expr { kind, span },
                depth,
            };
        }
        self.too_deep(span);
        // `kind` is at most MAX_EXPR_DEPTH deep, so dropping it here is harmless.
        Deep {
            node: Expr {
                kind: ExprKind::Error,
                span,
            },
            depth: 1,
        }
    }

    fn too_deep(&self, span: Span) {
        if !self.depth_limit_reported.replace(true) {
            self.report(
                Diagnostic::error(format!(
                    "expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)"
                ))
                .with_label(self.file, span, "this expression is too deep")
                .with_note("split it into smaller pieces with `let`"),
            );
        }
    }

    pub(crate) fn leaf(&self, kind: ExprKind, l: usize, r: usize) -> Deep<Expr> {
        self.expr(kind, span(l, r), 0)
    }

    pub(crate) fn unary(&self, op: UnOp, operand: Deep<Expr>, l: usize, r: usize) -> Deep<Expr> {
        let kind = ExprKind::Unary {
            op,
            operand: Box::new(operand.node),
        };
        self.expr(kind, span(l, r), operand.depth)
    }

    pub(crate) fn binary(&self, lhs: Deep<Expr>, op: BinOp, rhs: Deep<Expr>) -> Deep<Expr> {
        let whole = lhs.node.span.to(rhs.node.span);
        let depth = lhs.depth.max(rhs.depth);
        let kind = ExprKind::Binary {
            op,
            lhs: Box::new(lhs.node),
            rhs: Box::new(rhs.node),
        };
        self.expr(kind, whole, depth)
    }

    pub(crate) fn range(&self, start: Deep<Expr>, end: Deep<Expr>) -> Deep<Expr> {
        let whole = start.node.span.to(end.node.span);
        let depth = start.depth.max(end.depth);
        let kind = ExprKind::Range {
            start: Box::new(start.node),
            end: Box::new(end.node),
        };
        self.expr(kind, whole, depth)
    }

    pub(crate) fn call(
        &self,
        callee: Deep<Expr>,
        args: Vec<Option<Deep<Arg>>>,
        l: usize,
        r: usize,
    ) -> Deep<Expr> {
        let args: Vec<Deep<Arg>> = args.into_iter().flatten().collect();
        let depth = max_depth(&args).max(callee.depth);
        let kind = ExprKind::Call {
            callee: Box::new(callee.node),
            args: args.into_iter().map(|a| a.node).collect(),
        };
        self.expr(kind, span(l, r), depth)
    }

    pub(crate) fn arg(&self, name: Option<Ident>, value: Deep<Expr>) -> Deep<Arg> {
        Deep {
            depth: value.depth,
            node: Arg {
                name,
                value: value.node,
            },
        }
    }

    pub(crate) fn field(&self, base: Deep<Expr>, name: Ident, l: usize, r: usize) -> Deep<Expr> {
        let depth = base.depth;
        let kind = ExprKind::Field {
            base: Box::new(base.node),
            name,
        };
        self.expr(kind, span(l, r), depth)
    }

    pub(crate) fn tuple_index(
        &self,
        base: Deep<Expr>,
        index: i64,
        index_span: Span,
        l: usize,
        r: usize,
    ) -> Deep<Expr> {
        let index = u32::try_from(index).unwrap_or_else(|_| {
            self.report(Diagnostic::error("tuple index is too large").with_label(
                self.file,
                index_span,
                "not a valid tuple position",
            ));
            0
        });
        let depth = base.depth;
        let kind = ExprKind::TupleIndex {
            base: Box::new(base.node),
            index,
        };
        self.expr(kind, span(l, r), depth)
    }

    pub(crate) fn index(
        &self,
        base: Deep<Expr>,
        items: Vec<Deep<IndexItem>>,
        l: usize,
        r: usize,
    ) -> Deep<Expr> {
        let depth = max_depth(&items).max(base.depth);
        let kind = ExprKind::Index {
            base: Box::new(base.node),
            items: items.into_iter().map(|i| i.node).collect(),
        };
        self.expr(kind, span(l, r), depth)
    }

    pub(crate) fn index_expr(&self, value: Deep<Expr>) -> Deep<IndexItem> {
        Deep {
            depth: value.depth,
            node: IndexItem::Expr(value.node),
        }
    }

    pub(crate) fn slice(
        &self,
        start: Option<Deep<Expr>>,
        end: Option<Deep<Expr>>,
        step: Option<Deep<Expr>>,
        l: usize,
        r: usize,
    ) -> Deep<IndexItem> {
        let depth = [&start, &end, &step]
            .iter()
            .filter_map(|part| part.as_ref().map(|p| p.depth))
            .max()
            .unwrap_or(0);
        Deep {
            depth,
            node: IndexItem::Slice {
                start: start.map(|e| e.node),
                end: end.map(|e| e.node),
                step: step.map(|e| e.node),
                span: span(l, r),
            },
        }
    }

    pub(crate) fn tuple(&self, elems: Vec<Deep<Expr>>, l: usize, r: usize) -> Deep<Expr> {
        let depth = max_depth(&elems);
        let kind = ExprKind::Tuple(elems.into_iter().map(|e| e.node).collect());
        self.expr(kind, span(l, r), depth)
    }

    pub(crate) fn list(&self, elems: Vec<Deep<Expr>>, l: usize, r: usize) -> Deep<Expr> {
        let depth = max_depth(&elems);
        let kind = ExprKind::List(elems.into_iter().map(|e| e.node).collect());
        self.expr(kind, span(l, r), depth)
    }

    /// `(e)`: the inner expression, its span widened to cover the parentheses.
    pub(crate) fn parenthesized(&self, mut inner: Deep<Expr>, l: usize, r: usize) -> Deep<Expr> {
        inner.node.span = span(l, r);
        inner
    }

    pub(crate) fn block_expr(&self, block: Deep<Block>) -> Deep<Expr> {
        let whole = block.node.span;
        self.expr(ExprKind::Block(block.node), whole, block.depth)
    }

    pub(crate) fn if_expr(
        &self,
        cond: Deep<Expr>,
        then: Deep<Block>,
        otherwise: Deep<Block>,
        l: usize,
        r: usize,
    ) -> Deep<Expr> {
        let depth = cond.depth.max(then.depth).max(otherwise.depth);
        let kind = ExprKind::If {
            cond: Box::new(cond.node),
            then: then.node,
            otherwise: otherwise.node,
        };
        self.expr(kind, span(l, r), depth)
    }

    pub(crate) fn loop_expr(
        &self,
        count: Deep<Expr>,
        vars: Vec<(Ident, Deep<Expr>)>,
        body: Deep<Block>,
        l: usize,
        r: usize,
    ) -> Deep<Expr> {
        let vars_depth = vars.iter().map(|(_, init)| init.depth).max().unwrap_or(0);
        let depth = count.depth.max(body.depth).max(vars_depth);
        let kind = ExprKind::Loop {
            count: Box::new(count.node),
            vars: vars
                .into_iter()
                .map(|(name, init)| LoopVar {
                    name,
                    init: init.node,
                })
                .collect(),
            body: body.node,
        };
        self.expr(kind, span(l, r), depth)
    }

    // ---- blocks and statements ----

    /// `{ stmts }`: a final expression statement becomes the block's value; skipped input
    /// becomes `Stmt::Error`.
    pub(crate) fn block(&self, stmts: Vec<Deep<Stmt>>, l: usize, r: usize) -> Deep<Block> {
        let mut depth = max_depth(&stmts) + 1;
        let mut stmts: Vec<Stmt> = stmts
            .into_iter()
            .map(|s| match s.node {
                Stmt::Expr(Expr {
                    kind: ExprKind::Error,
                    span,
                }) => Stmt::Error(span),
                other => other,
            })
            .collect();
        let value = match stmts.pop() {
            Some(Stmt::Expr(value)) => Some(Box::new(value)),
            Some(other) => {
                stmts.push(other);
                None
            }
            None => None,
        };
        let whole = span(l, r);
        let mut block = Block {
            stmts,
            value,
            span: whole,
        };
        if depth > MAX_EXPR_DEPTH {
            self.too_deep(whole);
            block = Block {
                stmts: vec![Stmt::Error(whole)],
                value: None,
                span: whole,
            };
            depth = 1;
        }
        Deep { node: block, depth }
    }

    /// The `else if ...` branch as a block whose value is the inner `if`.
    pub(crate) fn else_if(&self, if_expr: Deep<Expr>) -> Deep<Block> {
        let whole = if_expr.node.span;
        Deep {
            depth: if_expr.depth + 1,
            node: Block {
                stmts: Vec::new(),
                value: Some(Box::new(if_expr.node)),
                span: whole,
            },
        }
    }

    fn stmt(&self, node: Stmt, child_depth: u32) -> Deep<Stmt> {
        Deep {
            node,
            depth: child_depth + 1,
        }
    }

    pub(crate) fn let_stmt(&self, pat: Pat, value: Deep<Expr>, l: usize, r: usize) -> Deep<Stmt> {
        let depth = value.depth;
        let stmt = Stmt::Let {
            pat,
            value: value.node,
            span: span(l, r),
        };
        self.stmt(stmt, depth)
    }

    pub(crate) fn assign(&self, name: Ident, value: Deep<Expr>, l: usize, r: usize) -> Deep<Stmt> {
        let depth = value.depth;
        let stmt = Stmt::Assign {
            name,
            value: value.node,
            span: span(l, r),
        };
        self.stmt(stmt, depth)
    }

    pub(crate) fn for_stmt(
        &self,
        var: Ident,
        iter: Deep<Expr>,
        body: Deep<Block>,
        l: usize,
        r: usize,
    ) -> Deep<Stmt> {
        let depth = iter.depth.max(body.depth);
        let stmt = Stmt::For {
            var,
            iter: iter.node,
            body: body.node,
            span: span(l, r),
        };
        self.stmt(stmt, depth)
    }

    pub(crate) fn expr_stmt(&self, value: Deep<Expr>) -> Deep<Stmt> {
        let depth = value.depth;
        self.stmt(Stmt::Expr(value.node), depth)
    }

    pub(crate) fn error_expr(&self, recovery: Recovery, l: usize, r: usize) -> Deep<Expr> {
        self.recovered(recovery);
        self.leaf(ExprKind::Error, l, r)
    }

    pub(crate) fn error_stmt(&self, recovery: Recovery, l: usize, r: usize) -> Deep<Stmt> {
        self.recovered(recovery);
        self.stmt(Stmt::Error(span(l, r)), 0)
    }

    /// A name that is `_` is the wildcard pattern.
    pub(crate) fn name_pat(&self, name: Ident) -> Pat {
        if name.name == "_" {
            Pat::Wildcard(name.span)
        } else {
            Pat::Name(name)
        }
    }

    // ---- errors ----

    /// Records the diagnostic for an error the parser recovered from.
    pub(crate) fn recovered(&self, recovery: Recovery) {
        self.syntax_error(recovery.error);
    }

    /// Records a parser error with its diagnostic, leaving the diagnostic out when the
    /// error is a consequence of one already reported (at a synthetic closer, right after
    /// bad input or skipped tokens).
    pub(crate) fn syntax_error(&self, error: SyntaxError) {
        let site = match &error {
            ParseError::UnrecognizedToken {
                token: (start, token, end),
                ..
            }
            | ParseError::ExtraToken {
                token: (start, token, end),
            } => ErrorSite {
                found: Some((span(*start, *end), token.clone())),
            },
            _ => ErrorSite { found: None },
        };
        let diagnostic = self.describe_error(error);
        self.errors
            .borrow_mut()
            .push(SyntaxErrorRecord { site, diagnostic });
    }

    fn describe_error(&self, error: SyntaxError) -> Option<Diagnostic> {
        Some(match error {
            ParseError::UnrecognizedToken {
                token: (start, token, end),
                expected,
            } => {
                let found_span = span(start, end);
                let lexeme = self.lexeme_at(found_span, &token);
                let consequence = token == Token::Skipped
                    || lexeme.is_some_and(|l| l.synthetic || l.after_bad_input);
                if consequence {
                    return None;
                }
                let found = self.describe_found(&token, found_span);
                let mut diagnostic = Diagnostic::error(format!(
                    "expected {}, found {found}",
                    describe_expected(&expected)
                ))
                .with_label(self.file, found_span, format!("unexpected {found}"));
                let enclosing = lexeme.and_then(|l| l.enclosing);
                if let Some(opener) = enclosing.filter(|o| o.delimiter != Delimiter::Brace) {
                    let closer = format!("\"{}\"", opener.delimiter.close());
                    if expected.contains(&closer) {
                        diagnostic = diagnostic.with_label(
                            self.file,
                            opener.span,
                            format!("`{}` opened here", opener.delimiter.open()),
                        );
                    }
                }
                if is_comparison(&token) && !expected.iter().any(|e| e == "\"<\"") {
                    diagnostic = diagnostic.with_note(
                        "comparisons cannot be chained: write `a < b && b < c` \
                         instead of `a < b < c`",
                    );
                }
                diagnostic
            }
            ParseError::UnrecognizedEof { location, expected } => Diagnostic::error(format!(
                "expected {}, found end of file",
                describe_expected(&expected)
            ))
            .with_label(self.file, span(location, location), "the file ends here"),
            ParseError::ExtraToken {
                token: (start, token, end),
            } => {
                let found_span = span(start, end);
                let found = self.describe_found(&token, found_span);
                Diagnostic::error(format!("unexpected {found}")).with_label(
                    self.file,
                    found_span,
                    "expected end of file",
                )
            }
            ParseError::InvalidToken { location } => Diagnostic::error("invalid token").with_label(
                self.file,
                span(location, location),
                "here",
            ),
            ParseError::User { error } => match error {},
        })
    }

    fn lexeme_at(&self, at: Span, token: &Token) -> Option<&'a Lexeme> {
        let first = self.tokens.partition_point(|l| l.span.start < at.start);
        self.tokens[first..]
            .iter()
            .take_while(|l| l.span.start == at.start)
            .find(|l| l.span == at && &l.token == token)
    }

    /// How a diagnostic names a found token, using its source text for literals.
    fn describe_found(&self, token: &Token, at: Span) -> String {
        let text = self.source.get(at.range()).unwrap_or("");
        match token {
            Token::Int(_) => format!("integer `{text}`"),
            Token::Float(_) => format!("float `{text}`"),
            Token::Str(_) => format!("string `{text}`"),
            Token::Sep if text == ";" => "`;`".to_string(),
            other => other.to_string(),
        }
    }
}

fn max_depth<T>(nodes: &[Deep<T>]) -> u32 {
    nodes.iter().map(|n| n.depth).max().unwrap_or(0)
}

fn is_comparison(token: &Token) -> bool {
    matches!(
        token,
        Token::EqEq | Token::NotEq | Token::Lt | Token::Le | Token::Gt | Token::Ge
    )
}

/// Terminals that can start an expression, as the grammar names them.
const EXPRESSION_STARTS: &[&str] = &[
    "IDENT",
    "INT",
    "FLOAT",
    "STR",
    "\"(\"",
    "\"[\"",
    "\"-\"",
    "\"!\"",
    "\"true\"",
    "\"false\"",
];
/// Further expression starts that are folded into "expression" when the above are all there.
const MORE_EXPRESSION_STARTS: &[&str] = &["\"{\"", "\"if\"", "\"loop\"", "\"layers\""];
const BINARY_OPERATORS: &[&str] = &[
    "\"+\"", "\"-\"", "\"*\"", "\"/\"", "\"%\"", "\"@\"", "\"==\"", "\"!=\"", "\"<\"", "\"<=\"",
    "\">\"", "\">=\"", "\"&&\"", "\"||\"",
];
/// Postfix tokens, left out of the list when "operator" is already in it.
const POSTFIX_STARTS: &[&str] = &["\"(\"", "\"[\"", "\".\""];

/// The expected-token list of a parser error in words: `` expected `=` ``, `expected
/// expression or `}``, `` expected one of operator, `,`, `)` ``.
fn describe_expected(expected: &[String]) -> String {
    let mut remaining: Vec<&str> = expected
        .iter()
        .map(String::as_str)
        .filter(|t| *t != "SKIPPED")
        .collect();
    let mut words: Vec<String> = Vec::new();
    let has = |list: &[&str], name: &str| list.contains(&name);
    if EXPRESSION_STARTS.iter().all(|t| has(&remaining, t)) {
        let is_statement = has(&remaining, "\"let\"") && has(&remaining, "\"for\"");
        remaining.retain(|t| {
            !EXPRESSION_STARTS.contains(t)
                && !MORE_EXPRESSION_STARTS.contains(t)
                && !(is_statement && (*t == "\"let\"" || *t == "\"for\""))
        });
        words.push(
            if is_statement {
                "statement"
            } else {
                "expression"
            }
            .to_string(),
        );
    }
    if has(&remaining, "\"+\"") && has(&remaining, "\"*\"") {
        remaining.retain(|t| !BINARY_OPERATORS.contains(t) && !POSTFIX_STARTS.contains(t));
        words.push("operator".to_string());
    }
    words.extend(remaining.iter().map(|t| terminal_in_words(t)));
    match words.as_slice() {
        [] => "something else".to_string(),
        [one] => one.clone(),
        [first, second] => format!("{first} or {second}"),
        [init @ .., last] => format!("one of {}, or {last}", init.join(", ")),
    }
}

fn terminal_in_words(terminal: &str) -> String {
    match terminal {
        "IDENT" => "identifier".to_string(),
        "INT" => "integer".to_string(),
        "FLOAT" => "float".to_string(),
        "STR" => "string".to_string(),
        "SEP" => "newline".to_string(),
        quoted => format!("`{}`", quoted.trim_matches('"')),
    }
}
