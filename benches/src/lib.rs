//! Inputs shared by kiln's host-side benchmarks: the model programs and their configs.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// A model program's source and a config for it.
pub fn model(program: &str, config: &str) -> (String, serde_json::Value) {
    let root = repo_root();
    let source = std::fs::read_to_string(root.join(program)).expect("model program");
    let config = std::fs::read_to_string(root.join(config)).expect("config");
    (source, serde_json::from_str(&config).expect("config json"))
}

/// Parses, lowers and optimizes a program; panics on errors (benchmarks use valid programs).
pub fn lower_and_optimize(
    name: &str,
    source: &str,
    config: &serde_json::Value,
) -> kiln_lower::Lowered {
    let (program, diags) = kiln_lower::Program::load_source(name, source, None);
    assert!(diags.iter().all(|d| !d.is_error()), "{name} does not parse");
    let (lowered, diags) =
        kiln_lower::lower(&program, Some(config), &kiln_lower::Options::default());
    let mut lowered = lowered.unwrap_or_else(|| panic!("{name} does not lower: {diags:?}"));
    kiln_opt::optimize(&mut lowered.module).expect("optimize");
    lowered
}
