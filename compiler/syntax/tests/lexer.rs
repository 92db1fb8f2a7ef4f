//! Lexer tests: token streams, the newline rules and literal decoding.

use kiln_syntax::lexer::{lex, Token};
use kiln_syntax::FileId;

/// The tokens of `source` in a compact form: spellings, `NL` for separators, values for
/// literals; a `!` prefix marks synthetic closers.
fn tokens(source: &str) -> String {
    let lexed = lex(source, FileId(0));
    lexed
        .tokens
        .iter()
        .map(|l| {
            let text = match &l.token {
                Token::Ident(name) => name.clone(),
                Token::Int(v) => v.to_string(),
                Token::Float(v) => format!("{v:?}"),
                Token::Str(v) => format!("{v:?}"),
                Token::Sep => "NL".to_string(),
                other => other.spelling().unwrap_or("?").to_string(),
            };
            if l.synthetic {
                format!("!{text}")
            } else {
                text
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn messages(source: &str) -> Vec<String> {
    lex(source, FileId(0))
        .diagnostics
        .into_iter()
        .map(|d| d.message)
        .collect()
}

#[test]
fn newlines_separate_only_where_a_statement_can_end() {
    assert_eq!(tokens("a\nb"), "a NL b");
    assert_eq!(tokens("a +\nb"), "a + b");
    assert_eq!(tokens("f(a,\nb)"), "f ( a , b )");
    assert_eq!(tokens("f(a\n)"), "f ( a )");
    assert_eq!(tokens("[a\n+ b]"), "[ a + b ]");
    assert_eq!(tokens("{\na\n}"), "{ a NL }");
    assert_eq!(tokens("x =\n1"), "x = 1");
    assert_eq!(tokens("a\n\n\n;;\nb"), "a NL b");
    assert_eq!(tokens("\n\na"), "a");
    assert_eq!(tokens("a // c\n/* d\n */ b"), "a NL b");
    // `}` ends an expression, but a following `else` continues it.
    assert_eq!(tokens("{ a } \n else { b }"), "{ a } else { b }");
    // Inside braces inside parentheses, newlines count again.
    assert_eq!(tokens("f({ a\n b })"), "f ( { a NL b } )");
}

#[test]
fn literals_are_decoded() {
    assert_eq!(tokens("1_000 0.5 1e-5 2.5E+3"), "1000 0.5 1e-5 2500.0");
    assert_eq!(tokens("1."), "1 .");
    assert_eq!(tokens("0..n"), "0 .. n");
    assert_eq!(tokens("x.0.1"), "x . 0 . 1");
    assert_eq!(tokens(r#""a\"b\\c\nd\te""#), r#""a\"b\\c\nd\te""#);
    assert_eq!(tokens("_ x_1 f32"), "_ x_1 f32");
    assert_eq!(tokens("... .. ."), "... .. .");
}

#[test]
fn malformed_input_becomes_diagnostics() {
    assert_eq!(messages("\"open"), ["unterminated string"]);
    assert_eq!(messages("/* open"), ["unterminated block comment"]);
    assert_eq!(messages("12ab"), ["invalid number `12ab`"]);
    assert_eq!(messages("\"\\q\""), ["unknown escape `\\q` in string"]);
    assert_eq!(
        messages("99999999999999999999"),
        ["integer `99999999999999999999` is too large"]
    );
    assert_eq!(
        messages("a # b $$ c é"),
        [
            "unexpected character `#`",
            "unexpected characters `$$`",
            "unexpected character `é`"
        ]
    );
}

#[test]
fn delimiters_are_balanced() {
    assert_eq!(tokens("f(a"), "f ( a !)");
    assert_eq!(tokens("{ f(a }"), "{ f ( a !) }");
    assert_eq!(tokens("{ f(a\nlet"), "{ f ( a !) NL let !}");
    assert_eq!(tokens("a)"), "a");
    assert_eq!(messages("a)"), ["unexpected `)`"]);
    assert_eq!(
        messages("{ f(a }"),
        ["expected `)` to close this `(`, found `}`"]
    );
}

#[test]
fn nesting_is_capped() {
    let deep = "(".repeat(1000);
    let lexed = lex(&deep, FileId(0));
    assert_eq!(lexed.diagnostics.len(), 1);
    assert!(lexed.diagnostics[0].message.contains("nested too deeply"));
    assert_eq!(lexed.truncated_at, Some(256));
    assert_eq!(lexed.tokens.len(), 512);
}
