//! kiln's compiler driver as a library: the pipeline from a lowered program to a package
//! (kernels, plans, PTX per target, cubins, fatbin, manifest), shared by the `kiln` binary
//! and the test suites; the choice of backend a program runs on; `kiln serve`'s GPU runner
//! and `kiln bench serve`'s load generator.

pub mod backend;
pub mod bench_serve;
pub mod pipeline;
pub mod serve;

use anyhow::Context;
use std::path::Path;

/// Reads a config.json given as a file or as a directory holding one.
pub fn read_config_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
}
