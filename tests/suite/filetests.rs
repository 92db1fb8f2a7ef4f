//! Golden filetests: every program under `tests/filetests/ir` lowers to the IR in its insta
//! snapshot (and that IR parses back to itself); every program under `tests/filetests/errors`
//! fails with the rendered diagnostics in its snapshot. The stdlib and model programs are
//! covered in place. Re-bless with `INSTA_UPDATE=always` or `cargo insta review`.
//!
//! A program's first lines may hold directives:
//! `// config: <path relative to the repository root>` or `// config-json: {...}`.

use kiln_tests::{compile_source, read_json, repo_root};
use std::path::Path;

/// The config named by a program's directives, if any.
fn config_for(source: &str) -> Option<serde_json::Value> {
    for line in source.lines().take_while(|l| l.starts_with("//")) {
        if let Some(path) = line.strip_prefix("// config:") {
            return Some(read_json(&repo_root().join(path.trim())));
        }
        if let Some(json) = line.strip_prefix("// config-json:") {
            return Some(serde_json::from_str(json.trim()).expect("config-json directive"));
        }
    }
    None
}

/// Lowers `path` and returns its IR text, checking the print/parse round trip.
fn lowered_ir(path: &Path, source: &str, config: Option<&serde_json::Value>) -> String {
    let name = path
        .strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string();
    let lowered = compile_source(&name, source, path.parent(), config)
        .unwrap_or_else(|diags| panic!("{name} failed to lower:\n{diags}"));
    let text = lowered.module.to_string();
    let reparsed = kiln_ir::parse::parse_module(&text)
        .unwrap_or_else(|e| panic!("{name}: the printed IR does not parse back: {e}\n{text}"));
    assert_eq!(
        reparsed, lowered.module,
        "{name}: the IR changed in a print/parse round trip"
    );
    assert_eq!(
        reparsed.to_string(),
        text,
        "{name}: reprinting changed the text"
    );
    kiln_ir::verify::verify_module(&reparsed).unwrap_or_else(|e| panic!("{name}: {e}"));
    text
}

#[test]
fn ir_filetests() {
    insta::glob!("../filetests/ir", "*.kiln", |path| {
        let source = std::fs::read_to_string(path).expect("read filetest");
        let config = config_for(&source);
        insta::assert_snapshot!(lowered_ir(path, &source, config.as_ref()));
    });
}

#[test]
fn error_filetests() {
    insta::glob!("../filetests/errors", "*.kiln", |path| {
        let source = std::fs::read_to_string(path).expect("read filetest");
        let config = config_for(&source);
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .to_string();
        match compile_source(&name, &source, path.parent(), config.as_ref()) {
            Ok(_) => panic!("{name} was expected to fail but lowered cleanly"),
            Err(rendered) => insta::assert_snapshot!(rendered),
        }
    });
}

/// The model programs, each lowered with the config of every fixture it serves.
#[test]
fn model_programs() {
    let cases = [
        (
            "models/llama.kiln",
            "tests/fixtures/tiny-llama/config.json",
            "llama_tiny_llama",
        ),
        (
            "models/llama.kiln",
            "tests/fixtures/tiny-qwen2/config.json",
            "llama_tiny_qwen2",
        ),
        (
            "models/gpt2.kiln",
            "tests/fixtures/tiny-gpt2/config.json",
            "gpt2_tiny_gpt2",
        ),
        (
            "models/bert.kiln",
            "tests/fixtures/tiny-bert/config.json",
            "bert_tiny_bert",
        ),
    ];
    for (program, config, snapshot) in cases {
        let path = repo_root().join(program);
        let source = std::fs::read_to_string(&path).expect("read model");
        let config = read_json(&repo_root().join(config));
        insta::assert_snapshot!(snapshot, lowered_ir(&path, &source, Some(&config)));
    }
}

/// The stdlib modules lowered as programs of their own: their fully typed functions are
/// entries (the generic ones are covered by the programs under tests/filetests/ir).
#[test]
fn stdlib_programs() {
    for module in kiln_lower::stdlib_modules() {
        let path = repo_root().join(format!("stdlib/{module}.kiln"));
        let source = std::fs::read_to_string(&path).expect("read stdlib");
        insta::assert_snapshot!(format!("stdlib_{module}"), lowered_ir(&path, &source, None));
    }
}
