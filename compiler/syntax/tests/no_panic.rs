//! Robustness: `parse` never panics and keeps every span inside the input, on random token
//! soups, mutated valid programs (byte and token edits, multi-byte UTF-8 included) and
//! pathological nesting. Deterministic; `KILN_FUZZ_CASES` sets the number of inputs
//! (20,000 by default) and `KILN_FUZZ_SEED` the seed.

mod common;

use kiln_syntax::{parse, FileId};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// splitmix64: small, fast and good enough to drive a fuzzer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// Token spellings the soups are made of: every keyword and punctuation, names, literals
/// good and bad, comments, separators and characters the language does not use.
const TOKENS: &[&str] = &[
    "fn",
    "let",
    "model",
    "config",
    "param",
    "layers",
    "for",
    "in",
    "loop",
    "with",
    "import",
    "if",
    "else",
    "true",
    "false",
    "from",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    ";",
    ".",
    "..",
    "...",
    "->",
    "=",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "%",
    "@",
    "!",
    "&&",
    "||",
    "x",
    "_",
    "f32",
    "L",
    "mean",
    "axis",
    "0",
    "1",
    "4096",
    "1_000",
    "0.5",
    "1e-5",
    "2.5E+3",
    "1.",
    "1e",
    "12ab",
    "99999999999999999999",
    "1e999",
    "\"a.{L}.b\"",
    "\"esc\\n\"",
    "\"bad\\q\"",
    "\"open",
    "\\",
    "// comment",
    "/* c */",
    "/*",
    "*/",
    "\n",
    "\n\n",
    "#",
    "$",
    "é",
    "→",
    "🦀",
    "\u{0}",
    "\t",
    "\r\n",
    "x.0.1",
    "t.1",
];

/// Valid programs to mutate.
const SEEDS: &[&str] = &[
    r#"fn rms_norm(x: [..., D], w: [D], eps: f32) -> [..., D] {
    let xf = f32(x)
    let inv = rsqrt(mean(xf * xf, axis: -1, keep: true) + eps)
    (xf * inv).as(x.dtype) * w
}
fn silu(x) { x * sigmoid(x) }
fn linear(x: [..., K], w: [N, K]) -> [..., N] { x @ w.T }
"#,
    r#"config { hidden_size: int, num_hidden_layers: int, rms_norm_eps: f32 = 1e-5,
         rope_factor: f32 = 1.0 from "rope_scaling.factor", tie: bool = false }
model Llama {
    param embed: [vocab_size, hidden_size] = "model.embed_tokens.weight"
    layers L in 0..num_hidden_layers {
        param wq: [num_attention_heads * head_dim, hidden_size] = "model.layers.{L}.q.weight"
    }
    param lm_head: [vocab_size, hidden_size] = if tie { embed } else { "lm_head.weight" }
    fn step(tokens: i32[T], kv: kv_cache) -> f32[B, vocab_size] {
        let h = embed[tokens]
        for L in layers {
            let q = rope(linear(h, wq).view(T, n, d), pos, theta)
            h = h + paged_attention(q, kv.append(L, q, q), batch, causal: true)
        }
        linear(h[batch.last_token], lm_head)
    }
}
"#,
    r#"import nn
import consensus.games
fn regret(A: f32[G, M, N], iters: int) -> (f32[G, M], f32[G, N]) {
    let (a, _) = (x[..., :half], x[:, 0:64:2])
    loop iters with (rx = zeros[G, M], ry = zeros(G, N)) {
        let s = if n > 1 { -rx.T } else if n == 0 { rx } else { -2 * rx }
        (s + 1, ry); (t.0, t.1)
    }
}
"#,
];

fn token_soup(rng: &mut Rng) -> String {
    let count = rng.below(120);
    let mut out = String::new();
    for _ in 0..count {
        out.push_str(rng.pick(TOKENS));
        if rng.chance(60) {
            out.push(' ');
        }
    }
    out
}

/// Applies a few random byte- and token-level edits to a valid program; the result is
/// made valid UTF-8 lossily, so split multi-byte characters turn into U+FFFD.
fn mutate(rng: &mut Rng, seed: &str) -> String {
    let mut bytes = seed.as_bytes().to_vec();
    for _ in 0..1 + rng.below(6) {
        let len = bytes.len().max(1);
        let at = rng.below(len);
        let span = 1 + rng.below(16);
        let end = (at + span).min(bytes.len());
        match rng.below(6) {
            0 => {
                if at < end {
                    bytes.drain(at..end);
                }
            }
            1 => {
                let copy: Vec<u8> = bytes[at.min(bytes.len())..end].to_vec();
                let to = rng.below(bytes.len() + 1);
                bytes.splice(to..to, copy);
            }
            2 => {
                let other = rng.below(len);
                let other_end = (other + span).min(bytes.len());
                if end <= other {
                    let second: Vec<u8> = bytes[other..other_end].to_vec();
                    let first: Vec<u8> = bytes[at..end].to_vec();
                    bytes.splice(other..other_end, first);
                    bytes.splice(at..end, second);
                }
            }
            3 => {
                let to = rng.below(bytes.len() + 1);
                let random: Vec<u8> = (0..1 + rng.below(4)).map(|_| rng.next() as u8).collect();
                bytes.splice(to..to, random);
            }
            4 => {
                let to = rng.below(bytes.len() + 1);
                let token = rng.pick(TOKENS).as_bytes().to_vec();
                bytes.splice(to..to, token);
            }
            _ => {
                // Replace a byte with one from a multi-byte character.
                if !bytes.is_empty() {
                    let at = at.min(bytes.len() - 1);
                    bytes[at] = rng.pick("é→🦀".as_bytes());
                }
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Inputs that stress depth limits: long operator chains and deep nesting.
fn pathological(rng: &mut Rng) -> String {
    let n = 50 + rng.below(1200);
    let body = match rng.below(7) {
        0 => "(".repeat(n) + "1" + &")".repeat(n),
        1 => "-".repeat(n) + "x",
        2 => "a + ".repeat(n) + "b",
        3 => "x".to_string() + &".f".repeat(n),
        4 => "if c { a } else ".repeat(n) + "{ b }",
        5 => "{ ".repeat(n) + &"}".repeat(n),
        _ => "[".repeat(n),
    };
    format!("fn f() {{ {body} }}")
}

fn check(input: &str) -> Result<(), String> {
    let result = catch_unwind(AssertUnwindSafe(|| parse(input, FileId(0))));
    let (file, diagnostics) = result.map_err(|_| "panicked".to_string())?;
    for diagnostic in &diagnostics {
        for label in &diagnostic.labels {
            let (start, end) = (label.span.start as usize, label.span.end as usize);
            if start > end || end > input.len() {
                return Err(format!(
                    "diagnostic `{}` has span {start}..{end} outside 0..{}",
                    diagnostic.message,
                    input.len()
                ));
            }
        }
    }
    common::check_spans(&file, input.len())
}

#[test]
fn parse_never_panics_and_spans_stay_in_bounds() {
    let cases: usize = std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6B69_6C6E);
    let mut rng = Rng(seed);
    // Panics are caught and reported with their input; keep the default hook quiet.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for case in 0..cases {
        let input = match case % 10 {
            0..=3 => token_soup(&mut rng),
            4..=8 => {
                let seed = rng.pick(SEEDS);
                mutate(&mut rng, seed)
            }
            _ if rng.chance(20) => pathological(&mut rng),
            _ => {
                let soup = token_soup(&mut rng);
                mutate(&mut rng, &soup)
            }
        };
        if let Err(problem) = check(&input) {
            failures.push(format!("case {case}: {problem}\ninput: {input:?}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    std::panic::set_hook(default_hook);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
