//! A row kernel's checkpoint weights (a norm's gain and bias) load with the row's first
//! loads, before the row's reduction and its barrier (`Emitter::hoist_constant_loads`),
//! and before its grid-dependency wait (`GemmTuning::early_loads`), and the kernel keeps
//! its bits (the kir interpreter against the graph interpreter).

mod common;

use common::{check, constant, inputs_for, lower_with, weights_for};
use kiln_gpu_kernels::{GemmTuning, Options};
use kiln_kir::Stmt;
use std::collections::BTreeMap;

const SRC: &str = "import nn
model Norms {
    param g: [2048] = \"g\"
    param b: [2048] = \"b\"
    fn rms(h: bf16[T, 2048]) -> bf16[T, 2048] { rms_norm(h, g, 0.00001) }
    fn layer(h: f32[T, 2048]) -> f32[T, 2048] { layer_norm(h, g, b, 0.00001) }
}
";

#[test]
fn norm_weights_load_before_the_rows_reduction() {
    let module = lower_with("norms.kiln", SRC);
    for (function, weights) in [("rms", 1), ("layer", 2)] {
        let func = module.function(function).unwrap();
        let t = 3;
        let inputs = inputs_for(func, &BTreeMap::from([("T".to_string(), t)]), t, 5);
        let compiled = check(
            &module,
            function,
            &inputs,
            &weights_for(func, 6),
            &Options::default(),
        );
        assert_eq!(compiled.kernels.len(), 1, "{function}");
        let kernel = &compiled.kernels[0];
        let body = &kernel.body;
        let barrier = body
            .iter()
            .position(|s| *s == Stmt::Barrier)
            .unwrap_or_else(|| panic!("{function}: no barrier at the top level"));
        let early = body[..barrier]
            .iter()
            .filter(|s| matches!(s, Stmt::LoadVec { buf, .. } if constant(kernel, *buf)))
            .count();
        assert_eq!(early, weights, "{function}: {kernel}");
    }
}

#[test]
fn norm_weights_load_before_the_grid_dependency_wait() {
    let module = lower_with("norms.kiln", SRC);
    for early_loads in [true, false] {
        let options = Options {
            gemm: GemmTuning {
                early_loads,
                ..GemmTuning::default()
            },
            ..Options::default()
        };
        let func = module.function("layer").unwrap();
        let inputs = inputs_for(func, &BTreeMap::from([("T".to_string(), 2)]), 2, 7);
        let compiled = check(&module, "layer", &inputs, &weights_for(func, 8), &options);
        let kernel = &compiled.kernels[0];
        // Without the knob the wait is the first statement (made explicit by the early
        // trigger) or before the body.
        let wait = kernel
            .body
            .iter()
            .position(|s| *s == Stmt::GridDependencyWait)
            .unwrap_or(0);
        if !early_loads {
            assert_eq!(wait, 0, "{kernel}");
            continue;
        }
        let loads = |stmts: &[Stmt]| {
            stmts
                .iter()
                .filter(|s| matches!(s, Stmt::LoadVec { .. }))
                .count()
        };
        // The gain and the bias before the wait, the row after it.
        assert_eq!(loads(&kernel.body[..wait]), 2, "{kernel}");
        assert!(loads(&kernel.body[wait..]) > 0, "{kernel}");
    }
}
