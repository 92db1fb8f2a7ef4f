//! Helpers shared by kiln's cross-crate tests: compiling programs from source and loading
//! safetensors checkpoints into interpreter tensors.

use kiln_ir::tensor::Tensor;
use kiln_lower::{Lowered, Options, Program};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Compiles a program from source; `Err` holds the rendered diagnostics.
pub fn compile_source(
    name: &str,
    source: &str,
    dir: Option<&Path>,
    config: Option<&serde_json::Value>,
) -> Result<Lowered, String> {
    let (program, mut diags) = Program::load_source(name, source, dir);
    if !diags.iter().any(|d| d.is_error()) {
        let (lowered, mut more) = kiln_lower::lower(&program, config, &Options::default());
        diags.append(&mut more);
        if let Some(l) = lowered {
            if !diags.iter().any(|d| d.is_error()) {
                return Ok(l);
            }
        }
    }
    Err(program.sources.render(&diags))
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Loads every tensor of a safetensors file as stored.
pub fn load_safetensors(path: &Path) -> BTreeMap<String, Tensor> {
    kiln_runtime::weights::read_all(path).unwrap_or_else(|e| panic!("{e}"))
}
