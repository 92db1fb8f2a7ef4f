//! The whole front end (parse, imports, config binding, lowering) never panics: mutated copies
//! of every stdlib and model program are compiled and must give either IR or diagnostics.
//! `KILN_FUZZ_CASES` raises the number of mutants (default 1,500 per run; the parser alone is
//! exercised with 20,000 more in compiler/syntax/tests/no_panic.rs).

use kiln_tests::{compile_source, read_json, repo_root, Rng};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Words and punctuation that make mutants reach deep into lowering rather than stop at
/// the parser.
const SPLICES: &[&str] = &[
    "x",
    "S",
    "-1",
    "0",
    "2",
    "1e-5",
    ".T",
    ".view(S, -1)",
    "[..., 0:2]",
    "@",
    "*",
    "+",
    "f32(",
    ")",
    "(",
    "]",
    "[",
    ",",
    "axis: -1",
    "keep: true",
    "bf16",
    "sum(",
    "max(",
    "select(",
    "loop 3 with (a = 0.0) { a }",
    "if true { 1 } else { 2 }",
    "let y = ",
    "\n",
    "layers",
    "embed",
    "hidden_size",
    "\"{L}\"",
    "{",
    "}",
];

fn mutate(source: &str, rng: &mut Rng) -> String {
    let mut s: Vec<char> = source.chars().collect();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(s.len() + 1);
        match rng.below(4) {
            0 if !s.is_empty() => {
                let len = 1 + rng.below(12);
                let end = (at + len).min(s.len());
                s.drain(at.min(end)..end);
            }
            1 => {
                let piece = SPLICES[rng.below(SPLICES.len())];
                s.splice(at..at, piece.chars());
            }
            2 if !s.is_empty() => {
                let from = rng.below(s.len());
                let len = (1 + rng.below(40)).min(s.len() - from);
                let copy: Vec<char> = s[from..from + len].to_vec();
                s.splice(at..at, copy);
            }
            _ => {
                let word: String = ["S", "1", "f32", "x"][rng.below(4)].into();
                s.splice(at..at, word.chars());
            }
        }
    }
    s.into_iter().collect()
}

#[test]
fn mutated_programs_never_panic() {
    let cases: usize = std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let programs = [
        (
            "models/llama.kiln",
            Some("tests/fixtures/tiny-llama/config.json"),
        ),
        (
            "models/gpt2.kiln",
            Some("tests/fixtures/tiny-gpt2/config.json"),
        ),
        (
            "models/bert.kiln",
            Some("tests/fixtures/tiny-bert/config.json"),
        ),
        ("stdlib/consensus.kiln", None),
        ("tests/filetests/ir/language_features.kiln", None),
        ("tests/filetests/ir/nn_rope.kiln", None),
        ("tests/filetests/ir/nn_attention.kiln", None),
    ];
    let loaded: Vec<(String, String, Option<serde_json::Value>)> = programs
        .iter()
        .map(|(p, c)| {
            let path = repo_root().join(p);
            (
                p.to_string(),
                std::fs::read_to_string(&path).expect("program"),
                c.map(|c| read_json(&repo_root().join(c))),
            )
        })
        .collect();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut lowered = 0;
    for case in 0..cases {
        let (name, source, config) = &loaded[case % loaded.len()];
        let mutant = mutate(source, &mut rng);
        let result = catch_unwind(AssertUnwindSafe(|| {
            compile_source(name, &mutant, None, config.as_ref())
        }));
        match result {
            Ok(Ok(_)) => lowered += 1,
            Ok(Err(rendered)) => assert!(
                rendered.contains("error"),
                "a failure must render a diagnostic"
            ),
            Err(_) => panic!("case {case}: compiling a mutant of {name} panicked:\n{mutant}"),
        }
    }
    // Some mutants are still valid programs; most are not. Both paths must be exercised.
    assert!(
        lowered > 0 && lowered < cases,
        "{lowered} of {cases} mutants lowered"
    );
}
