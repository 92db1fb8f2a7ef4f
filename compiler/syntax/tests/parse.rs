//! Parser tests: the AST shape of representative programs, printed as s-expressions.

mod common;

use common::{check_spans, expr, file_sexpr, stmt};
use kiln_syntax::ast::{ExprKind, Item, Span, Stmt};
use kiln_syntax::{parse, FileId, SourceMap};

/// Parses `source`, requires it to be error-free with well-nested spans, and returns it.
fn parse_ok(source: &str) -> kiln_syntax::ast::File {
    let (file, diagnostics) = parse(source, FileId(0));
    if !diagnostics.is_empty() {
        let mut map = SourceMap::new();
        map.add("test.kiln", source);
        panic!("unexpected diagnostics:\n{}", map.render(&diagnostics));
    }
    if let Err(problem) = check_spans(&file, source.len()) {
        panic!("bad spans: {problem}\n{file:#?}");
    }
    file
}

/// Checks a whole file against its expected s-expression (one item per line).
fn check(source: &str, expected: &str) {
    let file = parse_ok(source);
    assert_eq!(file_sexpr(&file), expected.trim(), "source:\n{source}");
}

/// The body of `fn t() { <body> }` as statements and value, `;`-separated.
fn body(source: &str) -> String {
    let wrapped = format!("fn t() {{\n{source}\n}}");
    let file = parse_ok(&wrapped);
    let Item::Fn(def) = &file.items[0] else {
        panic!("expected a function")
    };
    let mut parts: Vec<String> = def.body.stmts.iter().map(stmt).collect();
    if let Some(value) = &def.body.value {
        parts.push(format!("=> {}", expr(value)));
    }
    parts.join("; ")
}

/// Checks one expression (the value of a function body).
fn check_expr(source: &str, expected: &str) {
    assert_eq!(body(source), format!("=> {expected}"), "source: {source}");
}

#[test]
fn precedence_of_binary_operators() {
    check_expr("a + b * c", "(+ a (* b c))");
    check_expr("a * b + c", "(+ (* a b) c)");
    check_expr("a - b - c", "(- (- a b) c)");
    check_expr("a @ b * c", "(* (@ a b) c)");
    check_expr("a + b @ c", "(+ a (@ b c))");
    check_expr("a / b % c", "(% (/ a b) c)");
    check_expr("a + b < c * d", "(< (+ a b) (* c d))");
    check_expr("a < b && c >= d || e", "(|| (&& (< a b) (>= c d)) e)");
    check_expr("a || b && c", "(|| a (&& b c))");
    check_expr("0..n + 1", "(.. 0 (+ n 1))");
    check_expr("a == b", "(== a b)");
}

#[test]
fn comparisons_do_not_chain() {
    let (_, diagnostics) = parse("fn t() { a == b != c }", FileId(0));
    assert_eq!(diagnostics.len(), 1);
    assert!(diagnostics[0].message.contains("found `!=`"));
}

#[test]
fn unary_minus_binds_between_postfix_and_multiplication() {
    check_expr("-x.T", "(neg (. x T))");
    check_expr("-2 * x", "(* (neg 2) x)");
    check_expr("-a @ b", "(@ (neg a) b)");
    check_expr("!a && b", "(&& (not a) b)");
    check_expr("- -x", "(neg (neg x))");
    check_expr("-f(x)[0]", "(neg (index (call f x) 0))");
    check_expr("a * -b", "(* a (neg b))");
}

#[test]
fn postfix_chains() {
    check_expr("x.T", "(. x T)");
    check_expr(
        "(xf * inv).as(x.dtype) * w",
        "(* (call (. (* xf inv) as) (. x dtype)) w)",
    );
    check_expr(
        "linear(x, wq).view(T, num_attention_heads, head_dim)",
        "(call (. (call linear x wq) view) T num_attention_heads head_dim)",
    );
    check_expr("kv.append(L, k, v)", "(call (. kv append) L k v)");
    check_expr("t.0", "(. t 0)");
    check_expr("t.0.1", "(. (. t 0) 1)");
    check_expr("t.1.x", "(. (. t 1) x)");
    check_expr("f(x)(y)", "(call (call f x) y)");
    check_expr("embed[tokens]", "(index embed tokens)");
    check_expr("m[i][j]", "(index (index m i) j)");
    check_expr(
        "rms_norm(h, norm, rms_norm_eps)[batch.last_token]",
        "(index (call rms_norm h norm rms_norm_eps) (. batch last_token))",
    );
}

#[test]
fn slices() {
    check_expr("x[..., :half]", "(index x ... (slice _ half _))");
    check_expr("x[:, 0:64:2]", "(index x (slice _ _ _) (slice 0 64 2))");
    check_expr("x[1:]", "(index x (slice 1 _ _))");
    check_expr("x[::2]", "(index x (slice _ _ 2))");
    check_expr("x[a:b:]", "(index x (slice a b _))");
    check_expr("x[half:, ...]", "(index x (slice half _ _) ...)");
    check_expr("x[-1]", "(index x (neg 1))");
    check_expr("x[i, j + 1]", "(index x i (+ j 1))");
}

#[test]
fn tuples_lists_and_parentheses() {
    check_expr("(a)", "a");
    check_expr("((a + b))", "(+ a b)");
    check_expr("(a, b)", "(tuple a b)");
    check_expr("(a,)", "(tuple a)");
    check_expr("(a, b,)", "(tuple a b)");
    check_expr("()", "(tuple)");
    check_expr("[]", "(list)");
    check_expr("[1, 2, 3,]", "(list 1 2 3)");
    check_expr("[T, n * d]", "(list T (* n d))");
    check_expr("(a + b) * c", "(* (+ a b) c)");
}

#[test]
fn literals() {
    check_expr("1_000", "1000");
    check_expr("1e-5", "1e-5");
    check_expr("2.5E+3", "2500.0");
    check_expr("0.5", "0.5");
    check_expr(r#""a\"b\\c\n\t""#, r#""a\"b\\c\n\t""#);
    check_expr("true && false", "(&& true false)");
    check_expr(r#""model.layers.{L}.w""#, r#""model.layers.{L}.w""#);
}

#[test]
fn named_arguments() {
    check_expr(
        "mean(x, axis: -1, keep: true)",
        "(call mean x axis=(neg 1) keep=true)",
    );
    check_expr(
        "paged_attention(q, kv, batch, causal: true,)",
        "(call paged_attention q kv batch causal=true)",
    );
    check_expr("f()", "(call f)");
}

#[test]
fn if_else_chains() {
    check_expr(
        "if c { a } else if d { b } else { c }",
        "(if c {a} {(if d {b} {c})})",
    );
    check_expr("if n > 1 { x } else { y }", "(if (> n 1) {x} {y})");
    // `else` may start the next line.
    check_expr("if c { a }\nelse { b }", "(if c {a} {b})");
    check_expr(
        "if tie_word_embeddings { embed } else { \"lm_head.weight\" }",
        "(if tie_word_embeddings {embed} {\"lm_head.weight\"})",
    );
}

#[test]
fn loops_with_carried_state() {
    check_expr(
        "loop iters with (a = zeros(G, M), b = 0.0) {\n let a2 = a + 1\n let b2 = b\n (a2, b2)\n }",
        "(loop iters ((a (call zeros G M)) (b 0.0)) {(let a2 (+ a 1)); (let b2 b); (tuple a2 b2)})",
    );
    check_expr(
        "loop n with (rx = zeros[G, M]) { rx }",
        "(loop n ((rx (index zeros G M))) {rx})",
    );
}

#[test]
fn statements() {
    assert_eq!(
        body("let x = 1\nlet (a, _) = f(x)\nh = h + x\nfor L in layers { h = g(h) }\nh"),
        "(let x 1); (let (tuple a _) (call f x)); (= h (+ h x)); (for L layers {(= h (call g h));}); => h"
    );
    assert_eq!(body("for i in 0..n { }"), "(for i (.. 0 n) {})");
    assert_eq!(body("let ((a, b), c) = t"), "(let (tuple (tuple a b) c) t)");
    assert_eq!(body("let x = 1; x"), "(let x 1); => x");
    assert_eq!(
        body("let x = { let y = 2\n y * y }\nx"),
        "(let x {(let y 2); (* y y)}); => x"
    );
}

#[test]
fn newlines_separate_statements() {
    // A line starting with `(` or `-` is a new statement, not a call or a subtraction.
    assert_eq!(body("let a = f\n(x)"), "(let a f); => x");
    assert_eq!(body("let a = b\n-c"), "(let a b); => (neg c)");
    assert_eq!(body("let a = b\n[1, 2]"), "(let a b); => (list 1 2)");
    // After an operator, `=`, `,` or an opener, a newline is not a separator.
    assert_eq!(body("let a = b +\n c"), "(let a (+ b c))");
    assert_eq!(body("let a =\n b"), "(let a b)");
    assert_eq!(body("f(a,\n b)"), "=> (call f a b)");
    // Inside parentheses and brackets, newlines are dropped altogether.
    assert_eq!(body("let a = (b\n + c)"), "(let a (+ b c))");
    assert_eq!(body("let a = [b\n , c\n]"), "(let a (list b c))");
    assert_eq!(body("let a = x.\nT"), "(let a (. x T))");
    // Blank lines, comments and `;` collapse into one separator.
    assert_eq!(
        body("let a = 1 // one\n\n/* two */ ;; \n let b = 2\nb"),
        "(let a 1); (let b 2); => b"
    );
}

#[test]
fn blocks_take_their_last_expression_as_value() {
    let file = parse_ok("fn f() { let x = 1\n}\nfn g() { 1 }\nfn h() {}");
    let values: Vec<bool> = file
        .items
        .iter()
        .map(|i| match i {
            Item::Fn(def) => def.body.value.is_some(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(values, [false, true, false]);
}

#[test]
fn config_fields() {
    check(
        r#"config { hidden_size: int, num_hidden_layers: int,
         rms_norm_eps: f32 = 1e-5, rope_theta: f32 = 10000.0, tie_word_embeddings: bool = false }"#,
        "(config (hidden_size int) (num_hidden_layers int) (rms_norm_eps f32 = 1e-5) \
         (rope_theta f32 = 10000.0) (tie_word_embeddings bool = false))",
    );
    check(
        r#"config {
    hidden_size: int
    num_attention_heads: int,
    head_dim: int = hidden_size / num_attention_heads
    rope_factor: f32 = 1.0 from "rope_scaling.factor"
    theta: f32 from "rope_theta",
}"#,
        r#"(config (hidden_size int) (num_attention_heads int) (head_dim int = (/ hidden_size num_attention_heads)) (rope_factor f32 = 1.0 from "rope_scaling.factor") (theta f32 from "rope_theta"))"#,
    );
    check("config {}", "(config )");
}

#[test]
fn functions_and_types() {
    check(
        "fn linear(x: [..., K], w: [N, K]) -> [..., N] { x @ w.T }",
        "(fn linear ((x: [... K]) (w: [N K])) -> [... N] {(@ x (. w T))})",
    );
    check(
        "fn f(x: f32[N, D], s: bf16[], e: f32 = 1e-5, k, z: kv_cache) -> (f32[G, M], f32[G, N]) { x }",
        "(fn f ((x: f32[N D]) (s: bf16[]) (e: f32 = 1e-5) (k) (z: kv_cache)) -> (tuple f32[G M] f32[G N]) {x})",
    );
    check(
        "fn g(q: [T, num_heads * head_dim, D / 2],) { q }",
        "(fn g ((q: [T (* num_heads head_dim) (/ D 2)])) {q})",
    );
    check("fn h() -> (f32) { 1 }", "(fn h () -> f32 {1})");
    check("fn h() -> (f32,) { 1 }", "(fn h () -> (tuple f32) {1})");
}

#[test]
fn imports() {
    check(
        "import nn\nimport consensus.games",
        "(import nn)\n(import consensus.games)",
    );
}

#[test]
fn models_with_params_and_layers() {
    check(
        r#"model Llama {
    param embed: [vocab_size, hidden_size] = "model.embed_tokens.weight"
    layers L in 0..num_hidden_layers {
        param attn_norm: [hidden_size] = "model.layers.{L}.input_layernorm.weight"
        param wq: [num_attention_heads * head_dim, hidden_size] = "model.layers.{L}.self_attn.q_proj.weight"
    }
    param lm_head: [vocab_size, hidden_size] = if tie_word_embeddings { embed } else { "lm_head.weight" }
    fn step(tokens: i32[T]) -> f32[B, vocab_size] { embed[tokens] }
}"#,
        r#"(model Llama (param embed [vocab_size hidden_size] "model.embed_tokens.weight") (layers L 0 num_hidden_layers (param attn_norm [hidden_size] "model.layers.{L}.input_layernorm.weight") (param wq [(* num_attention_heads head_dim) hidden_size] "model.layers.{L}.self_attn.q_proj.weight")) (param lm_head [vocab_size hidden_size] (if tie_word_embeddings {embed} {"lm_head.weight"})) (fn step ((tokens: i32[T])) -> f32[B vocab_size] {(index embed tokens)}))"#,
    );
}

#[test]
fn spans_cover_whole_expressions() {
    let source = "fn f(x) { -x.T + mean(x, axis: -1) * 2 }";
    let file = parse_ok(source);
    let Item::Fn(def) = &file.items[0] else {
        panic!()
    };
    let value = def.body.value.as_ref().unwrap();
    let text = |span: Span| source[span.range()].to_string();
    assert_eq!(text(value.span), "-x.T + mean(x, axis: -1) * 2");
    let ExprKind::Binary { lhs, rhs, .. } = &value.kind else {
        panic!()
    };
    assert_eq!(text(lhs.span), "-x.T");
    assert_eq!(text(rhs.span), "mean(x, axis: -1) * 2");
    let ExprKind::Unary { operand, .. } = &lhs.kind else {
        panic!()
    };
    assert_eq!(text(operand.span), "x.T");
    assert_eq!(text(def.body.span), "{ -x.T + mean(x, axis: -1) * 2 }");
    assert_eq!(text(def.span), source);

    let source = "fn g() {\n    let y = (a + b)\n    y\n}";
    let text = |span: Span| source[span.range()].to_string();
    let file = parse_ok(source);
    let Item::Fn(def) = &file.items[0] else {
        panic!()
    };
    let Stmt::Let { value, span, .. } = &def.body.stmts[0] else {
        panic!()
    };
    assert_eq!(text(*span), "let y = (a + b)");
    assert_eq!(text(value.span), "(a + b)");
}

/// The sketch programs of DESIGN.md, with its `...` elisions filled in.
const DESIGN_SKETCH: &str = r#"
// stdlib/nn.kiln
fn rms_norm(x: [..., D], w: [D], eps: f32) -> [..., D] {
    let xf = f32(x)
    let inv = rsqrt(mean(xf * xf, axis: -1, keep: true) + eps)
    (xf * inv).as(x.dtype) * w
}
fn silu(x) { x * sigmoid(x) }
fn linear(x: [..., K], w: [N, K]) -> [..., N] { x @ w.T }
fn swiglu(x, gate, up, down) { linear(silu(linear(x, gate)) * linear(x, up), down) }

// models/llama.kiln  (Llama 2/3, Mistral, Qwen2 by config)
config { hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
         num_key_value_heads: int, intermediate_size: int, vocab_size: int,
         rms_norm_eps: f32 = 1e-5, rope_theta: f32 = 10000.0, tie_word_embeddings: bool = false }
model Llama {
    param embed: [vocab_size, hidden_size] = "model.embed_tokens.weight"
    layers L in 0..num_hidden_layers {
        param attn_norm: [hidden_size] = "model.layers.{L}.input_layernorm.weight"
        param wq: [num_attention_heads * head_dim, hidden_size] = "model.layers.{L}.self_attn.q_proj.weight"
    }
    // one engine step over a ragged batch of T tokens: prefill chunks and decode tokens mixed
    fn step(tokens: i32[T], pos: i32[T], kv: kv_cache, batch: batch_info) -> f32[B, vocab_size] {
        let h = embed[tokens]
        for L in layers {
            let x = rms_norm(h, attn_norm, rms_norm_eps)
            let q = rope(linear(x, wq).view(T, num_attention_heads, head_dim), pos, rope_theta)
            let k = rope(linear(x, wk).view(T, num_key_value_heads, head_dim), pos, rope_theta)
            let v = linear(x, wv).view(T, num_key_value_heads, head_dim)
            let a = paged_attention(q, kv.append(L, k, v), batch, causal: true)
            h = h + linear(a.view(T, hidden_size), wo)
            h = h + swiglu(rms_norm(h, mlp_norm, rms_norm_eps), w_gate, w_up, w_down)
        }
        linear(rms_norm(h, norm, rms_norm_eps)[batch.last_token], lm_head)
    }
}

// stdlib/consensus.kiln
fn cosine_similarity(x: f32[N, D]) -> f32[N, N] {
    let n = x * rsqrt(sum(x * x, axis: -1, keep: true) + 1e-12)
    n @ n.T
}
// a batch of G two-player games; a fixed-count loop with carried state, which the
// compiler may keep inside one persistent kernel
fn regret_matching(A: f32[G, M, N], B: f32[G, M, N], iters: int) -> (f32[G, M], f32[G, N]) {
    loop iters with (rx = zeros[G, M], ry = zeros[G, N], sx = zeros[G, M], sy = zeros[G, N]) {
        let x = strategy(rx)
        (rx + x, ry, sx, sy)
    }
}
"#;

#[test]
fn design_sketch_parses() {
    let file = parse_ok(DESIGN_SKETCH);
    assert_eq!(file.items.len(), 8);
    let sexpr = file_sexpr(&file);
    assert!(sexpr
        .contains("(let a (call paged_attention q (call (. kv append) L k v) batch causal=true))"));
    assert!(sexpr.contains("(= h (+ h (call linear (call (. a view) T hidden_size) wo)))"));
}

#[test]
fn repository_kiln_files_parse() {
    // Every .kiln file checked into stdlib/ and models/ must parse without errors.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for dir in ["stdlib", "models"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "kiln") {
                let source = std::fs::read_to_string(&path).unwrap();
                let (_, diagnostics) = parse(&source, FileId(0));
                let mut map = SourceMap::new();
                map.add(path.display().to_string(), source);
                assert!(diagnostics.is_empty(), "{}", map.render(&diagnostics));
            }
        }
    }
}

#[test]
fn recovery_keeps_the_rest_of_the_file() {
    let source = "fn step(h) {\n    for L layers {\n        let x = f(h, (a, b))\n    }\n    \
                  let a = 1, 2\n    let b = (x +)\n    h\n}\nfn g(x, , y) { x + y }\nconfig { a: int, b int, c: f32 }";
    let (file, diagnostics) = parse(source, FileId(0));
    assert_eq!(diagnostics.len(), 5, "{diagnostics:#?}");
    assert_eq!(
        file_sexpr(&file),
        "(fn step ((h)) {<error>; <error>; (let b <error>); h})\n\
         (fn g ((x) (y)) {(+ x y)})\n\
         (config (a int) (c f32))"
    );
    check_spans(&file, source.len()).unwrap();
}
