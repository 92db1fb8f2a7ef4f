//! kiln's front end: source text to an AST with spans, plus diagnostics that point at the source.
//!
//! Invariants: no input makes the lexer or parser panic; a syntax error is a [`Diagnostic`]
//! and the parser keeps going, so one run reports every error it can find. Every
//! diagnostic's spans lie inside the source. Nesting is capped ([`lexer::MAX_NESTING`]
//! delimiters, [`MAX_EXPR_DEPTH`] AST levels), so recursive walks of the AST are safe.
//!
//! Pipeline: [`lexer::lex`] (tokens, separators, balanced delimiters), then the LALRPOP
//! grammar in `grammar.lalrpop` (its actions live in `actions.rs`), driven by
//! `recovery.rs`, which repairs around each syntax error and parses again.

mod actions;
pub mod ast;
pub mod diagnostic;
pub mod lexer;
mod recovery;

lalrpop_util::lalrpop_mod!(
    #[allow(clippy::all, clippy::pedantic, unused, rust_2018_idioms)]
    grammar
);

pub use actions::MAX_EXPR_DEPTH;
pub use diagnostic::{Diagnostic, FileId, Label, Severity, SourceMap};

/// Parses one source file. Always returns a (possibly partial) AST; the diagnostics, in
/// source order, say what was wrong. Never panics.
pub fn parse(source: &str, file: FileId) -> (ast::File, Vec<Diagnostic>) {
    let lexed = lexer::lex(source, file);
    let (items, parser_diagnostics) = recovery::parse_with_repairs(source, file, lexed.tokens);
    let mut diagnostics = lexed.diagnostics;
    // A parser error where the lexer already reported one is a consequence of it, and
    // after a truncation the parser's complaints about the cut-off text are noise.
    let cut = lexed.truncated_at.unwrap_or(usize::MAX);
    let lexer_positions: Vec<usize> = diagnostics.iter().map(primary_start).collect();
    diagnostics.extend(parser_diagnostics.into_iter().filter(|d| {
        let at = primary_start(d);
        at < cut && !lexer_positions.contains(&at)
    }));
    diagnostics.sort_by_key(primary_start);
    (ast::File { items }, diagnostics)
}

fn primary_start(diagnostic: &Diagnostic) -> usize {
    diagnostic
        .labels
        .first()
        .map_or(0, |label| label.span.start as usize)
}
