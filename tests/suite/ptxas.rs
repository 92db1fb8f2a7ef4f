//! Every kernel of every stdlib and model program assembles with ptxas for all five targets
//! (sm_80, sm_89, sm_90a, sm_100a, sm_120), and the pointwise and reduction kernels do not
//! spill registers on any of them (ptxas's own report). Needs ptxas: without it the test fails
//! with the install command, unless `KILN_ALLOW_NO_PTXAS=1`, when it says it was not run.

use kiln_driver::pipeline::{self, CompileOptions};
use kiln_ptx::{Target, Toolchain};
use kiln_tests::{compile_source, read_json, repo_root};

fn toolchain() -> Option<Toolchain> {
    match Toolchain::discover() {
        Ok(t) => Some(t),
        Err(e) if std::env::var("KILN_ALLOW_NO_PTXAS").is_ok_and(|v| v == "1") => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "NOT RUN (no ptxas): {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn every_program_assembles_for_every_target_without_spills_in_pointwise_and_reductions() {
    let Some(toolchain) = toolchain() else { return };
    let mut programs: Vec<(std::path::PathBuf, Option<serde_json::Value>)> =
        std::fs::read_dir(repo_root().join("tests/filetests/ir"))
            .expect("filetests")
            .map(|e| (e.expect("entry").path(), None))
            .collect();
    programs.push((repo_root().join("stdlib/consensus.kiln"), None));
    for (model, fixture) in [
        ("llama", "tiny-llama"),
        ("llama", "tiny-qwen2"),
        ("gpt2", "tiny-gpt2"),
        ("bert", "tiny-bert"),
    ] {
        let config = read_json(&repo_root().join(format!("tests/fixtures/{fixture}/config.json")));
        programs.push((
            repo_root().join(format!("models/{model}.kiln")),
            Some(config),
        ));
    }
    programs.sort_by(|a, b| a.0.cmp(&b.0));
    let options = CompileOptions {
        targets: Target::ALL.to_vec(),
        ..CompileOptions::default()
    };
    let mut spilling = Vec::new();
    for (path, config) in programs {
        let name = path
            .strip_prefix(repo_root())
            .unwrap_or(&path)
            .display()
            .to_string();
        let source = std::fs::read_to_string(&path).expect("program");
        let lowered = compile_source(&name, &source, path.parent(), config.as_ref())
            .unwrap_or_else(|d| panic!("{d}"));
        let package = pipeline::compile(&name, lowered, &options, Some(&toolchain))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(package.fatbin.is_some(), "{name}: no fatbin");
        let kernels = package.compiled.kernels.len();
        assert_eq!(
            package.manifest.resources.len(),
            kernels * Target::ALL.len(),
            "{name}: a ptxas report per kernel and target"
        );
        for r in &package.manifest.resources {
            let template_with_tiles = r.kernel.contains("matmul") || r.kernel.contains("attention");
            if !template_with_tiles && r.spill_bytes > 0 {
                spilling.push(format!("{name}: {} on {}", r.kernel, r.target));
            }
        }
    }
    spilling.sort();
    spilling.dedup();
    // Known defect, kept visible: GPT-2's first layer norm (embedding gathers of wte and wpe
    // fused into the row reduction, i64 indices) spills on sm_90a and sm_100a. When it is fixed
    // this list must shrink; any new spill fails the test.
    // The same for the two-player solvers' per-iteration candidate scoring (the NashConv of
    // the last and the average iterate, four row reductions fused with the strategy updates
    // they read) on sm_120.
    let known = [
        "models/gpt2.kiln: k0_layer_norm_f32 on sm_100a".to_string(),
        "models/gpt2.kiln: k0_layer_norm_f32 on sm_90a".to_string(),
        "stdlib/consensus.kiln: k80_reduce_max_sum_max_sum_f32 on sm_120".to_string(),
    ];
    let unexpected: Vec<&String> = spilling.iter().filter(|s| !known.contains(s)).collect();
    assert!(
        unexpected.is_empty(),
        "pointwise/reduction kernels that spill: {unexpected:?}"
    );
    for k in &known {
        assert!(
            spilling.contains(k),
            "{k} no longer spills: remove it from the known list"
        );
    }
}
