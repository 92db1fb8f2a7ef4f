//! Error recovery by repair: parse, replace the smallest unit around the first syntax error
//! with a [`Token::Skipped`] placeholder, and parse again, until the file parses.
//!
//! LALRPOP's own recovery (`!` in the grammar) drops tokens until *any* state on its stack
//! accepts one, which can carry it out of the `{ ... }` the error was in (a `)` deep in the
//! next statement closes an outer parameter list, say). Repair units instead follow the
//! lexer's balanced delimiters: the unit is the statement, item, config field, parameter
//! or list element containing the error, delimited by separators (and `,` inside `(...)`,
//! `[...]` and `config { ... }`) at the error's own nesting level. Each round removes at
//! least one real token or inserts one placeholder where there was nothing, so the loop
//! ends; after [`MAX_REPAIRS`] rounds (or a round budget for large inputs) the last parse,
//! with LALRPOP's recovery, stands.

use crate::actions::{ErrorSite, ParseContext, SyntaxErrorRecord};
use crate::ast::{Item, Span};
use crate::diagnostic::{Diagnostic, FileId};
use crate::grammar::FileParser;
use crate::lexer::{Lexeme, Token};

/// The most parse-and-repair rounds for one file.
pub const MAX_REPAIRS: usize = 64;
/// The most tokens parsed over all rounds, so huge broken inputs stay linear-ish.
const TOKEN_BUDGET: usize = 1 << 21;

/// Parses `tokens` into items, repairing around errors; returns the items and the
/// diagnostics (one per repaired error plus those of the final parse).
pub(crate) fn parse_with_repairs(
    source: &str,
    file: FileId,
    mut tokens: Vec<Lexeme>,
) -> (Vec<Item>, Vec<Diagnostic>) {
    let parser = FileParser::new();
    let mut diagnostics: Vec<Diagnostic> = Vec::new();
    let mut inserted_at: Vec<u32> = Vec::new();
    let mut budget = TOKEN_BUDGET;
    for round in 0.. {
        let context = ParseContext::new(file, source, &tokens);
        let stream = tokens.iter().map(|lexeme| {
            Ok((
                lexeme.span.start as usize,
                lexeme.token.clone(),
                lexeme.span.end as usize,
            ))
        });
        let items = match parser.parse(&context, stream) {
            Ok(items) => items,
            Err(error) => {
                context.syntax_error(error);
                Vec::new()
            }
        };
        let (errors, others) = context.finish();
        budget = budget.saturating_sub(tokens.len());
        let give_up = round + 1 >= MAX_REPAIRS || budget < tokens.len();
        let repaired = match errors.first() {
            Some(first) if !give_up => repair(&mut tokens, &first.site, &mut inserted_at),
            _ => false,
        };
        if !repaired {
            add_all(&mut diagnostics, errors);
            diagnostics.extend(others);
            return (items, diagnostics);
        }
        let first = errors.into_iter().next();
        add_all(&mut diagnostics, first);
    }
    unreachable!("the repair loop returns")
}

/// Adds the diagnostics of `errors`, except where one was already reported at that place.
fn add_all(diagnostics: &mut Vec<Diagnostic>, errors: impl IntoIterator<Item = SyntaxErrorRecord>) {
    for diagnostic in errors.into_iter().filter_map(|e| e.diagnostic) {
        let place = diagnostic.labels.first().map(|l| l.span);
        if !diagnostics
            .iter()
            .any(|d| d.labels.first().map(|l| l.span) == place)
        {
            diagnostics.push(diagnostic);
        }
    }
}

/// What separates units at one nesting level.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// Top level, blocks, models, layers: separators only.
    Lines,
    /// `(...)`, `[...]`, `config { ... }`: commas too.
    Commas,
}

/// Replaces the unit around the error with one placeholder; `false` when no progress is
/// possible. Every round removes a real token or inserts a placeholder at a byte offset
/// that never had one, so repairs terminate.
fn repair(tokens: &mut Vec<Lexeme>, site: &ErrorSite, inserted_at: &mut Vec<u32>) -> bool {
    let at = match &site.found {
        None => tokens.len(),
        Some((span, token)) => {
            match tokens
                .iter()
                .position(|l| l.span == *span && l.token == *token)
            {
                Some(index) => index,
                None => return false,
            }
        }
    };
    let levels = nesting_levels(tokens);
    // The level whose unit we repair, and whether the error token ends that unit.
    let level = match tokens.get(at) {
        None => 0,
        Some(l) if l.token.is_closer() => levels[at] + 1,
        Some(_) => levels[at],
    };
    let opener = (level > 0)
        .then(|| {
            (0..at)
                .rev()
                .find(|&k| levels[k] + 1 == level && tokens[k].token.is_opener())
        })
        .flatten();
    let kind = match opener {
        None => Level::Lines,
        Some(k) if tokens[k].token != Token::LBrace => Level::Commas,
        Some(k) if k > 0 && tokens[k - 1].token == Token::Config => Level::Commas,
        Some(_) => Level::Lines,
    };
    let separates = |k: usize| {
        levels[k] == level
            && (tokens[k].token == Token::Sep
                || (kind == Level::Commas && tokens[k].token == Token::Comma))
    };
    // Whether the error token ends the unit (rather than sitting inside it).
    let ends_unit = at == tokens.len() || tokens[at].token.is_closer() || separates(at);
    let lower = opener.map_or(0, |k| k + 1);
    let start = (lower..at)
        .rev()
        .find(|&k| separates(k))
        .map_or(lower, |k| k + 1);
    let mut end = if ends_unit {
        at
    } else {
        (at..tokens.len())
            .find(|&k| levels[k] < level || separates(k))
            .unwrap_or(tokens.len())
    };
    // Where a placeholder for an empty unit would go, as a byte offset.
    let insertion_point = tokens
        .get(at)
        .map_or_else(|| tokens.last().map_or(0, |l| l.span.end), |l| l.span.start);
    let has_real_token = tokens[start..end].iter().any(|l| l.token != Token::Skipped);
    if !has_real_token {
        let is_separator = tokens
            .get(at)
            .is_some_and(|l| matches!(l.token, Token::Sep | Token::Comma));
        if start == end && !inserted_at.contains(&insertion_point) {
            // Nothing where something was expected (`f(a, , b)`, `x[]`): a placeholder.
            inserted_at.push(insertion_point);
        } else if is_separator {
            // A stray separator or comma: skip it along with the unit before it.
            end = at + 1;
        } else {
            return false;
        }
    }
    let placeholder_span = if start == end {
        Span::new(insertion_point as usize, insertion_point as usize)
    } else {
        tokens[start].span.to(tokens[end - 1].span)
    };
    let placeholder = Lexeme {
        token: Token::Skipped,
        span: placeholder_span,
        enclosing: tokens.get(start).and_then(|l| l.enclosing),
        synthetic: false,
        after_bad_input: true,
    };
    tokens.splice(start..end, [placeholder]);
    // An error right after the placeholder is most likely a consequence of this one.
    if let Some(next) = tokens.get_mut(start + 1) {
        next.after_bad_input = true;
    }
    true
}

/// The nesting level of every token: openers and closers count as outside their pair.
fn nesting_levels(tokens: &[Lexeme]) -> Vec<usize> {
    let mut level = 0usize;
    tokens
        .iter()
        .map(|l| {
            if l.token.is_opener() {
                level += 1;
                level - 1
            } else if l.token.is_closer() {
                level = level.saturating_sub(1);
                level
            } else {
                level
            }
        })
        .collect()
}
