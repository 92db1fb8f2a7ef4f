//! The lexer: source text to the token stream the grammar reads, with byte spans.
//!
//! Beyond splitting text into tokens it does three things the grammar relies on:
//! - **Separators.** A newline becomes a [`Token::Sep`] only where it can end a statement:
//!   outside `(...)`/`[...]` and after a token that can end an expression (see
//!   `docs/language.md`). `;` is always a separator, and runs of separators collapse into one.
//!   A newline right before `else` is dropped too, so `}` and `else` may sit on separate lines.
//! - **Balanced delimiters.** The lexer matches `( [ {` with their closers. A closer that
//!   skips an unclosed opener, an opener still open at the end of the file, and a
//!   statement keyword (`let`, `fn`, ...) inside `(...)`/`[...]` each produce a diagnostic
//!   and a zero-width synthetic closer, so the parser always sees balanced delimiters. A
//!   closer with no opener is reported and dropped.
//! - **Limits.** Nesting deeper than [`MAX_NESTING`] is reported and the rest of the input is
//!   ignored, so nothing downstream can recurse without bound.
//!
//! Malformed input (unknown characters, unterminated strings and comments, bad escapes,
//! numbers that do not fit) becomes diagnostics, never a panic.

use crate::ast::Span;
use crate::diagnostic::{Diagnostic, FileId};
use logos::Logos;
use std::fmt;

/// The deepest nesting of `(`, `[` and `{` the lexer accepts.
pub const MAX_NESTING: usize = 256;

/// A token as the grammar sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Token {
    Ident(String),
    Int(i64),
    Float(f64),
    /// A string literal with its escapes decoded.
    Str(String),
    /// A statement separator: a significant newline or `;`.
    Sep,
    /// Never produced by [`lex`]: error recovery replaces a stretch of tokens around a
    /// syntax error with it, and the grammar accepts it wherever a statement, item,
    /// field, parameter, type, pattern or expression can stand.
    Skipped,
    Fn,
    Let,
    Model,
    Config,
    Param,
    Layers,
    For,
    In,
    Loop,
    With,
    Import,
    If,
    Else,
    True,
    False,
    From,
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Comma,
    Colon,
    Dot,
    DotDot,
    Ellipsis,
    Arrow,
    Assign,
    EqEq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    At,
    Bang,
    AndAnd,
    OrOr,
}

impl Token {
    /// The fixed spelling of a keyword or punctuation token; `None` for tokens with a value.
    pub fn spelling(&self) -> Option<&'static str> {
        Some(match self {
            Token::Ident(_)
            | Token::Int(_)
            | Token::Float(_)
            | Token::Str(_)
            | Token::Sep
            | Token::Skipped => return None,
            Token::Fn => "fn",
            Token::Let => "let",
            Token::Model => "model",
            Token::Config => "config",
            Token::Param => "param",
            Token::Layers => "layers",
            Token::For => "for",
            Token::In => "in",
            Token::Loop => "loop",
            Token::With => "with",
            Token::Import => "import",
            Token::If => "if",
            Token::Else => "else",
            Token::True => "true",
            Token::False => "false",
            Token::From => "from",
            Token::LParen => "(",
            Token::RParen => ")",
            Token::LBracket => "[",
            Token::RBracket => "]",
            Token::LBrace => "{",
            Token::RBrace => "}",
            Token::Comma => ",",
            Token::Colon => ":",
            Token::Dot => ".",
            Token::DotDot => "..",
            Token::Ellipsis => "...",
            Token::Arrow => "->",
            Token::Assign => "=",
            Token::EqEq => "==",
            Token::NotEq => "!=",
            Token::Lt => "<",
            Token::Le => "<=",
            Token::Gt => ">",
            Token::Ge => ">=",
            Token::Plus => "+",
            Token::Minus => "-",
            Token::Star => "*",
            Token::Slash => "/",
            Token::Percent => "%",
            Token::At => "@",
            Token::Bang => "!",
            Token::AndAnd => "&&",
            Token::OrOr => "||",
        })
    }

    /// Whether an expression can end with this token; a newline after a token that cannot
    /// is not a separator.
    fn can_end_expression(&self) -> bool {
        matches!(
            self,
            Token::Ident(_)
                | Token::Int(_)
                | Token::Float(_)
                | Token::Str(_)
                | Token::True
                | Token::False
                | Token::RParen
                | Token::RBracket
                | Token::RBrace
                | Token::Ellipsis
                | Token::Skipped
        )
    }

    pub fn is_opener(&self) -> bool {
        matches!(self, Token::LParen | Token::LBracket | Token::LBrace)
    }

    pub fn is_closer(&self) -> bool {
        matches!(self, Token::RParen | Token::RBracket | Token::RBrace)
    }

    /// Keywords that only start a statement or an item, so they never occur inside
    /// `(...)` or `[...]`: seeing one there means a closer is missing.
    fn starts_statement_only(&self) -> bool {
        matches!(
            self,
            Token::Let
                | Token::Fn
                | Token::Model
                | Token::Config
                | Token::Param
                | Token::Layers
                | Token::For
                | Token::Import
        )
    }
}

impl fmt::Display for Token {
    /// How a diagnostic names the token: `` `)` ``, ``identifier `x` ``, ``integer `3` ``.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Ident(name) => write!(f, "identifier `{name}`"),
            Token::Int(value) => write!(f, "integer `{value}`"),
            Token::Float(value) => write!(f, "float `{value:?}`"),
            Token::Str(value) => write!(f, "string {value:?}"),
            Token::Sep => write!(f, "end of line"),
            Token::Skipped => write!(f, "skipped input"),
            other => write!(f, "`{}`", other.spelling().unwrap_or("?")),
        }
    }
}

/// The three kinds of delimiters the lexer balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delimiter {
    Paren,
    Bracket,
    Brace,
}

impl Delimiter {
    pub fn open(self) -> &'static str {
        match self {
            Delimiter::Paren => "(",
            Delimiter::Bracket => "[",
            Delimiter::Brace => "{",
        }
    }

    pub fn close(self) -> &'static str {
        match self {
            Delimiter::Paren => ")",
            Delimiter::Bracket => "]",
            Delimiter::Brace => "}",
        }
    }

    fn close_token(self) -> Token {
        match self {
            Delimiter::Paren => Token::RParen,
            Delimiter::Bracket => Token::RBracket,
            Delimiter::Brace => Token::RBrace,
        }
    }
}

/// An opening delimiter and where it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opener {
    pub delimiter: Delimiter,
    pub span: Span,
}

/// One token of the output.
#[derive(Clone, Debug, PartialEq)]
pub struct Lexeme {
    pub token: Token,
    pub span: Span,
    /// The innermost delimiter around the token (for a closer: the opener it closes).
    pub enclosing: Option<Opener>,
    /// A closer the lexer inserted to balance delimiters (it has an empty span).
    pub synthetic: bool,
    /// The lexer reported bad input right before this token, so a parser error here is
    /// most likely a consequence of that one.
    pub after_bad_input: bool,
}

/// The result of lexing one file.
#[derive(Debug, Default)]
pub struct Lexed {
    pub tokens: Vec<Lexeme>,
    pub diagnostics: Vec<Diagnostic>,
    /// Where lexing stopped because nesting went past [`MAX_NESTING`]; the parser's
    /// complaints from there on are consequences, not news.
    pub truncated_at: Option<usize>,
}

/// Tokens as logos recognises them, before values are decoded and separators decided.
#[derive(Logos, Clone, Copy, Debug, PartialEq)]
#[logos(skip r"[ \t\r]+")]
#[logos(skip r"//[^\n]*")]
enum RawToken {
    #[token("\n")]
    Newline,
    /// `/* ... */`; the flag says whether the closing `*/` was found.
    #[token("/*", skip_block_comment)]
    BlockComment(bool),
    #[regex("[A-Za-z_][A-Za-z0-9_]*")]
    Ident,
    #[regex("[0-9][0-9_]*", priority = 5)]
    Int,
    #[regex(r"[0-9][0-9_]*\.[0-9][0-9_]*([eE][+-]?[0-9][0-9_]*)?", priority = 5)]
    #[regex(r"[0-9][0-9_]*[eE][+-]?[0-9][0-9_]*", priority = 5)]
    Float,
    /// A number glued to letters (`12ab`, `1e`, `0x1F`): reported as one bad literal.
    #[regex(
        r"[0-9][0-9_]*(\.[0-9][0-9_]*)?([eE][+-]?[0-9][0-9_]*)?[A-Za-z_][A-Za-z0-9_]*",
        priority = 1
    )]
    BadNumber,
    #[regex(r#""([^"\\\n]|\\[^\n])*""#)]
    Str,
    #[regex(r#""([^"\\\n]|\\[^\n])*\\?"#, priority = 1)]
    UnterminatedStr,
    #[token("fn")]
    Fn,
    #[token("let")]
    Let,
    #[token("model")]
    Model,
    #[token("config")]
    Config,
    #[token("param")]
    Param,
    #[token("layers")]
    Layers,
    #[token("for")]
    For,
    #[token("in")]
    In,
    #[token("loop")]
    Loop,
    #[token("with")]
    With,
    #[token("import")]
    Import,
    #[token("if")]
    If,
    #[token("else")]
    Else,
    #[token("true")]
    True,
    #[token("false")]
    False,
    #[token("from")]
    From,
    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    #[token(",")]
    Comma,
    #[token(":")]
    Colon,
    #[token(";")]
    Semicolon,
    #[token(".")]
    Dot,
    #[token("..")]
    DotDot,
    #[token("...")]
    Ellipsis,
    #[token("->")]
    Arrow,
    #[token("=")]
    Assign,
    #[token("==")]
    EqEq,
    #[token("!=")]
    NotEq,
    #[token("<")]
    Lt,
    #[token("<=")]
    Le,
    #[token(">")]
    Gt,
    #[token(">=")]
    Ge,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,
    #[token("%")]
    Percent,
    #[token("@")]
    At,
    #[token("!")]
    Bang,
    #[token("&&")]
    AndAnd,
    #[token("||")]
    OrOr,
}

fn skip_block_comment(lex: &mut logos::Lexer<'_, RawToken>) -> bool {
    match lex.remainder().find("*/") {
        Some(end) => {
            lex.bump(end + 2);
            true
        }
        None => {
            lex.bump(lex.remainder().len());
            false
        }
    }
}

/// Splits `source` into tokens; never panics.
pub fn lex(source: &str, file: FileId) -> Lexed {
    let mut lexer = Lexer {
        source,
        file,
        out: Lexed::default(),
        open: Vec::new(),
        pending_newline: None,
        unknown_run: None,
        skipped_bad_input: false,
    };
    lexer.run();
    lexer.out
}

struct Lexer<'s> {
    source: &'s str,
    file: FileId,
    out: Lexed,
    /// The delimiters open at the current position, innermost last.
    open: Vec<Opener>,
    /// A newline seen since the last token; whether it separates is decided at the next one.
    pending_newline: Option<Span>,
    /// A run of adjacent unknown characters, reported as one diagnostic.
    unknown_run: Option<Span>,
    /// Unknown characters were skipped since the last token.
    skipped_bad_input: bool,
}

impl Lexer<'_> {
    fn run(&mut self) {
        let mut raw = RawToken::lexer(self.source);
        while let Some(result) = raw.next() {
            let range = raw.span();
            let span = Span::new(range.start, range.end);
            let raw_token = match result {
                Ok(token) => token,
                Err(()) => {
                    self.unknown_character(span);
                    continue;
                }
            };
            self.flush_unknown_run();
            let token = match self.decode(raw_token, span) {
                Some(token) => token,
                None => continue,
            };
            if !self.push_significant(token, span) {
                return;
            }
        }
        self.flush_unknown_run();
        self.finish();
    }

    /// Turns a raw token into a grammar token, reporting malformed literals; `None` for
    /// tokens that are not significant (comments) or were handled here (newlines).
    fn decode(&mut self, raw: RawToken, span: Span) -> Option<Token> {
        let text = &self.source[span.range()];
        Some(match raw {
            RawToken::Newline => {
                if self.pending_newline.is_none() {
                    // Zero-width, so a diagnostic at a newline points at the end of the line.
                    self.pending_newline =
                        Some(Span::new(span.start as usize, span.start as usize));
                }
                return None;
            }
            RawToken::BlockComment(closed) => {
                if !closed {
                    self.error(Diagnostic::error("unterminated block comment").with_label(
                        self.file,
                        Span::new(span.start as usize, span.start as usize + 2),
                        "this comment is never closed with `*/`",
                    ));
                }
                return None;
            }
            RawToken::Ident => Token::Ident(text.to_string()),
            RawToken::Int => Token::Int(self.decode_int(text, span)),
            RawToken::Float => self.decode_float(text, span),
            RawToken::BadNumber => {
                self.error(
                    Diagnostic::error(format!("invalid number `{text}`"))
                        .with_label(self.file, span, "not a number")
                        .with_note(
                            "numbers are decimal: `4096`, `1_000`, `0.5`, `1e-5`; \
                             a name cannot start with a digit",
                        ),
                );
                Token::Int(0)
            }
            RawToken::Str => Token::Str(self.decode_string(&text[1..text.len() - 1], span)),
            RawToken::UnterminatedStr => {
                self.error(
                    Diagnostic::error("unterminated string")
                        .with_label(self.file, span, "this string has no closing `\"`")
                        .with_note("a string ends on the line where it starts"),
                );
                let body = text[1..].strip_suffix('\\').unwrap_or(&text[1..]);
                Token::Str(self.decode_string(body, span))
            }
            RawToken::Fn => Token::Fn,
            RawToken::Let => Token::Let,
            RawToken::Model => Token::Model,
            RawToken::Config => Token::Config,
            RawToken::Param => Token::Param,
            RawToken::Layers => Token::Layers,
            RawToken::For => Token::For,
            RawToken::In => Token::In,
            RawToken::Loop => Token::Loop,
            RawToken::With => Token::With,
            RawToken::Import => Token::Import,
            RawToken::If => Token::If,
            RawToken::Else => Token::Else,
            RawToken::True => Token::True,
            RawToken::False => Token::False,
            RawToken::From => Token::From,
            RawToken::LParen => Token::LParen,
            RawToken::RParen => Token::RParen,
            RawToken::LBracket => Token::LBracket,
            RawToken::RBracket => Token::RBracket,
            RawToken::LBrace => Token::LBrace,
            RawToken::RBrace => Token::RBrace,
            RawToken::Comma => Token::Comma,
            RawToken::Colon => Token::Colon,
            RawToken::Semicolon => Token::Sep,
            RawToken::Dot => Token::Dot,
            RawToken::DotDot => Token::DotDot,
            RawToken::Ellipsis => Token::Ellipsis,
            RawToken::Arrow => Token::Arrow,
            RawToken::Assign => Token::Assign,
            RawToken::EqEq => Token::EqEq,
            RawToken::NotEq => Token::NotEq,
            RawToken::Lt => Token::Lt,
            RawToken::Le => Token::Le,
            RawToken::Gt => Token::Gt,
            RawToken::Ge => Token::Ge,
            RawToken::Plus => Token::Plus,
            RawToken::Minus => Token::Minus,
            RawToken::Star => Token::Star,
            RawToken::Slash => Token::Slash,
            RawToken::Percent => Token::Percent,
            RawToken::At => Token::At,
            RawToken::Bang => Token::Bang,
            RawToken::AndAnd => Token::AndAnd,
            RawToken::OrOr => Token::OrOr,
        })
    }

    fn decode_int(&mut self, text: &str, span: Span) -> i64 {
        let digits: String = text.chars().filter(|&c| c != '_').collect();
        match digits.parse::<i64>() {
            Ok(value) => value,
            Err(_) => {
                self.error(
                    Diagnostic::error(format!("integer `{text}` is too large"))
                        .with_label(self.file, span, "does not fit in 64 bits")
                        .with_note(format!("the largest integer is {}", i64::MAX)),
                );
                0
            }
        }
    }

    /// A float, or, right after a `.`, the digits of a tuple index chain: `x.0.1` is lexed
    /// by logos as `x`, `.`, `0.1` and split back into `0`, `.`, `1` here.
    fn decode_float(&mut self, text: &str, span: Span) -> Token {
        let after_dot = matches!(
            self.out.tokens.last(),
            Some(Lexeme {
                token: Token::Dot,
                ..
            })
        );
        let is_index_chain = text.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if after_dot && is_index_chain {
            if let Some(dot) = text.find('.') {
                let start = span.start as usize;
                let first = Span::new(start, start + dot);
                let dot_span = Span::new(start + dot, start + dot + 1);
                let second = Span::new(start + dot + 1, span.end as usize);
                let first_value = self.decode_int(&text[..dot], first);
                self.emit(Token::Int(first_value), first, false);
                self.emit(Token::Dot, dot_span, false);
                return Token::Int(self.decode_int(&text[dot + 1..], second));
            }
        }
        let digits: String = text.chars().filter(|&c| c != '_').collect();
        match digits.parse::<f64>() {
            Ok(value) if value.is_finite() => Token::Float(value),
            _ => {
                self.error(
                    Diagnostic::error(format!("float `{text}` is out of range")).with_label(
                        self.file,
                        span,
                        "too large for a 64-bit float",
                    ),
                );
                Token::Float(0.0)
            }
        }
    }

    /// Decodes `\" \\ \n \t` in the body of a string; `span` is the whole literal.
    fn decode_string(&mut self, body: &str, span: Span) -> String {
        let body_start = span.start as usize + 1;
        let mut value = String::with_capacity(body.len());
        let mut chars = body.char_indices();
        while let Some((offset, c)) = chars.next() {
            if c != '\\' {
                value.push(c);
                continue;
            }
            match chars.next() {
                Some((_, '"')) => value.push('"'),
                Some((_, '\\')) => value.push('\\'),
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                Some((_, other)) => {
                    let start = body_start + offset;
                    self.error(
                        Diagnostic::error(format!("unknown escape `\\{other}` in string"))
                            .with_label(
                                self.file,
                                Span::new(start, start + 1 + other.len_utf8()),
                                "unknown escape",
                            )
                            .with_note(r#"the escapes are `\"`, `\\`, `\n` and `\t`"#),
                    );
                    value.push(other);
                }
                None => {}
            }
        }
        value
    }

    fn unknown_character(&mut self, span: Span) {
        self.unknown_run = Some(match self.unknown_run {
            Some(run) if run.end == span.start => run.to(span),
            Some(run) => {
                self.report_unknown(run);
                span
            }
            None => span,
        });
    }

    fn flush_unknown_run(&mut self) {
        if let Some(run) = self.unknown_run.take() {
            self.report_unknown(run);
        }
    }

    fn report_unknown(&mut self, run: Span) {
        self.skipped_bad_input = true;
        let text = &self.source[run.range()];
        let message = if text.chars().count() == 1 {
            format!("unexpected character `{text}`")
        } else {
            format!("unexpected characters `{text}`")
        };
        self.error(Diagnostic::error(message).with_label(self.file, run, "not part of any token"));
    }

    /// Handles one significant token: missing closers, the pending newline, delimiter
    /// balance. Returns `false` when lexing must stop (nesting too deep).
    fn push_significant(&mut self, token: Token, span: Span) -> bool {
        if token.starts_statement_only() {
            self.close_parens_before_statement(&token, span);
        }
        if token == Token::Sep {
            self.pending_newline = None;
            self.emit_separator(span);
            return true;
        }
        if let Some(newline) = self.pending_newline.take() {
            if token != Token::Else && self.newline_separates() {
                self.emit_separator(newline);
            }
        }
        match token {
            Token::LParen => self.open_delimiter(Delimiter::Paren, span),
            Token::LBracket => self.open_delimiter(Delimiter::Bracket, span),
            Token::LBrace => self.open_delimiter(Delimiter::Brace, span),
            Token::RParen => {
                self.close_delimiter(Delimiter::Paren, span);
                true
            }
            Token::RBracket => {
                self.close_delimiter(Delimiter::Bracket, span);
                true
            }
            Token::RBrace => {
                self.close_delimiter(Delimiter::Brace, span);
                true
            }
            token => {
                self.emit(token, span, false);
                true
            }
        }
    }

    /// Whether a newline at the current position is a separator: it is not inside `(...)`
    /// or `[...]`, nor after a token that cannot end an expression.
    fn newline_separates(&self) -> bool {
        let inside_parens = matches!(
            self.open.last(),
            Some(Opener {
                delimiter: Delimiter::Paren | Delimiter::Bracket,
                ..
            })
        );
        let after_expression_end = self
            .out
            .tokens
            .last()
            .is_some_and(|last| last.token.can_end_expression());
        !inside_parens && after_expression_end
    }

    fn emit_separator(&mut self, span: Span) {
        match self.out.tokens.last() {
            None
            | Some(Lexeme {
                token: Token::Sep, ..
            }) => {}
            Some(_) => self.emit(Token::Sep, span, false),
        }
    }

    fn emit(&mut self, token: Token, span: Span, synthetic: bool) {
        let enclosing = self.open.last().copied();
        self.push_lexeme(token, span, enclosing, synthetic);
    }

    fn push_lexeme(
        &mut self,
        token: Token,
        span: Span,
        enclosing: Option<Opener>,
        synthetic: bool,
    ) {
        let after_bad_input = std::mem::take(&mut self.skipped_bad_input);
        self.out.tokens.push(Lexeme {
            token,
            span,
            enclosing,
            synthetic,
            after_bad_input,
        });
    }

    fn open_delimiter(&mut self, delimiter: Delimiter, span: Span) -> bool {
        if self.open.len() >= MAX_NESTING {
            self.error(
                Diagnostic::error(format!(
                    "delimiters nested too deeply (more than {MAX_NESTING} levels)"
                ))
                .with_label(self.file, span, "nesting limit reached here")
                .with_note("the rest of the file was not read"),
            );
            self.out.truncated_at = Some(span.start as usize);
            while let Some(opener) = self.open.last().copied() {
                self.emit(
                    opener.delimiter.close_token(),
                    Span::new(span.start as usize, span.start as usize),
                    true,
                );
                self.open.pop();
            }
            return false;
        }
        self.emit(
            match delimiter {
                Delimiter::Paren => Token::LParen,
                Delimiter::Bracket => Token::LBracket,
                Delimiter::Brace => Token::LBrace,
            },
            span,
            false,
        );
        self.open.push(Opener { delimiter, span });
        true
    }

    fn close_delimiter(&mut self, delimiter: Delimiter, span: Span) {
        let Some(depth) = self.open.iter().rposition(|o| o.delimiter == delimiter) else {
            // `[1, 2)`: `)` and `]` confused, with nothing for the found one to close.
            if let Some(top) = self.open.last().copied() {
                let confusable = top.delimiter != Delimiter::Brace && delimiter != Delimiter::Brace;
                if confusable && self.same_line(top.span, span) {
                    self.mistyped_closer(top, delimiter, span);
                    return;
                }
            }
            self.error(
                Diagnostic::error(format!("unexpected `{}`", delimiter.close())).with_label(
                    self.file,
                    span,
                    format!("there is no `{}` for this to close", delimiter.open()),
                ),
            );
            return;
        };
        if depth + 1 < self.open.len() {
            let top = self.open[self.open.len() - 1];
            let matching = self.open[depth];
            // `g([1, 2})`: a wrong closer typed in place of the innermost one, when that
            // opener is on this line, the closer is not first on its line and the opener it
            // could match is on an earlier line.
            let typo = self.same_line(top.span, span)
                && !self.first_on_line(span)
                && !self.same_line(matching.span, span);
            if typo {
                self.mistyped_closer(top, delimiter, span);
                return;
            }
            let found = format!("`{}`", delimiter.close());
            self.close_unclosed(depth + 1, span, &found);
        }
        // The real closer: record the opener it closes as its enclosing delimiter.
        let opener = self.open.pop();
        self.push_lexeme(delimiter.close_token(), span, opener, false);
    }

    /// Reports `found` (typed where `top` should be closed) and treats it as `top`'s closer.
    fn mistyped_closer(&mut self, top: Opener, found: Delimiter, span: Span) {
        let close = top.delimiter.close();
        let open = top.delimiter.open();
        self.error(
            Diagnostic::error(format!(
                "expected `{close}` to close this `{open}`, found `{}`",
                found.close()
            ))
            .with_label(self.file, span, format!("expected `{close}`"))
            .with_label(self.file, top.span, format!("unclosed `{open}`")),
        );
        self.open.pop();
        self.push_lexeme(top.delimiter.close_token(), span, Some(top), false);
    }

    fn same_line(&self, a: Span, b: Span) -> bool {
        let (first, second) = if a.start <= b.start { (a, b) } else { (b, a) };
        self.source
            .get(first.start as usize..second.start as usize)
            .is_some_and(|between| !between.contains('\n'))
    }

    fn first_on_line(&self, span: Span) -> bool {
        let before = &self.source[..span.start as usize];
        let indent = before.trim_end_matches([' ', '\t', '\r']);
        indent.is_empty() || indent.ends_with('\n')
    }

    /// Closes every delimiter from `depth` up (the innermost is reported, the others are
    /// mentioned) with synthetic closers at `found_span`.
    fn close_unclosed(&mut self, depth: usize, found_span: Span, found: &str) {
        let Some(innermost) = self.open.last().copied() else {
            return;
        };
        let close = innermost.delimiter.close();
        let open = innermost.delimiter.open();
        let mut diagnostic = Diagnostic::error(format!(
            "expected `{close}` to close this `{open}`, found {found}"
        ))
        .with_label(self.file, found_span, format!("expected `{close}`"))
        .with_label(self.file, innermost.span, format!("unclosed `{open}`"));
        let others = &self.open[depth..self.open.len() - 1];
        const SHOWN: usize = 3;
        for other in others.iter().rev().take(SHOWN) {
            diagnostic = diagnostic.with_label(
                self.file,
                other.span,
                format!("unclosed `{}`", other.delimiter.open()),
            );
        }
        if others.len() > SHOWN {
            diagnostic = diagnostic.with_note(format!(
                "{} more delimiters are unclosed",
                others.len() - SHOWN
            ));
        }
        self.error(diagnostic);
        let at = Span::new(found_span.start as usize, found_span.start as usize);
        while self.open.len() > depth {
            let opener = self.open.pop();
            if let Some(opener) = opener {
                self.push_lexeme(opener.delimiter.close_token(), at, Some(opener), true);
            }
        }
    }

    /// `let`, `fn`, ... inside `(...)`/`[...]`: the parentheses were never closed, so close
    /// them before the keyword (up to the enclosing `{`).
    fn close_parens_before_statement(&mut self, token: &Token, span: Span) {
        let depth = self
            .open
            .iter()
            .rposition(|o| o.delimiter == Delimiter::Brace)
            .map_or(0, |brace| brace + 1);
        if depth < self.open.len() {
            self.close_unclosed(depth, span, &token.to_string());
        }
    }

    fn finish(&mut self) {
        let end = self.source.len();
        let eof = Span::new(end, end);
        if let Some(newline) = self.pending_newline.take() {
            if self.newline_separates() {
                self.emit_separator(newline);
            }
        }
        if !self.open.is_empty() {
            self.close_unclosed(0, eof, "end of file");
        }
    }

    fn error(&mut self, diagnostic: Diagnostic) {
        self.out.diagnostics.push(diagnostic);
    }
}
