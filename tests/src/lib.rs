//! Helpers shared by kiln's cross-crate tests: compiling programs from source and loading
//! safetensors checkpoints into interpreter tensors.

use kiln_ir::tensor::Tensor;
use kiln_lower::{Lowered, Options, Program};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Compiles a program from source; `Err` holds the rendered diagnostics.
pub fn compile_source(name: &str, source: &str, dir: Option<&Path>, config: Option<&serde_json::Value>) -> Result<Lowered, String> {
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
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Loads every tensor of a safetensors file (F32, I64, I32 and BF16/F16 converted to f32).
pub fn load_safetensors(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<usize> = view.shape().to_vec();
        let data = view.data();
        let tensor = match view.dtype() {
            safetensors::Dtype::F32 => Tensor::from_f32(&shape, data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            safetensors::Dtype::I64 => Tensor::from_ints(kiln_ir::DType::I64, &shape, data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()),
            safetensors::Dtype::I32 => Tensor::from_ints(kiln_ir::DType::I32, &shape, data.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()),
            other => panic!("{name}: dtype {other:?} is not supported by the test loader"),
        };
        out.insert(name, tensor);
    }
    out
}
