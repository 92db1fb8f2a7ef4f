//! The persistent loop template: batched solver loops of stdlib/consensus.kiln become one
//! kernel (no plan loop) at the benchmark's shape and agree with the graph interpreter on the
//! kernel interpreter; a loop whose working set does not fit in shared memory keeps the plan
//! loop; symbolic game sizes choose between the two at run time.

mod common;

use common::{check, inputs_for, lower, rel_err, run_plan};
use kiln_gpu_kernels::{Options, PersistentTuning};
use kiln_ir::{Module, Tensor};
use kiln_kir::{Plan, Step};
use std::collections::BTreeMap;

const SRC: &str = "import consensus
fn rm_plus_64(A: f32[G, 64, 64], iters: int, tol: float, check_every: int) ->
        (f32[G, 64], f32[G, 64], f32[G], f32[G], f32[G]) {
    zero_sum_rm_plus(A, iters, tol, check_every)
}
fn bimatrix_64(A: f32[G, 64, 64], B: f32[G, 64, 64], iters: int, tol: float, check_every: int) ->
        (f32[G, 64], f32[G, 64], f32[G], bool[G], f32[G]) {
    bimatrix_rm_plus(A, B, iters, tol, check_every)
}
fn rm_plus_128(A: f32[G, 128, 128], iters: int, tol: float, check_every: int) ->
        (f32[G, 128], f32[G, 128], f32[G], f32[G], f32[G]) {
    zero_sum_rm_plus(A, iters, tol, check_every)
}
fn rm_plus_any(A: f32[G, M, N], iters: int, tol: float, check_every: int) ->
        (f32[G, M], f32[G, N], f32[G], f32[G], f32[G]) {
    zero_sum_rm_plus(A, iters, tol, check_every)
}
fn hedge_small(A: f32[G, 5, 4], iters: int, eta: float, tol: float, check_every: int) ->
        (f32[G, 5], f32[G, 4], f32[G], f32[G], f32[G]) {
    zero_sum_optimistic_hedge(A, iters, eta, tol, check_every)
}
fn centrality(S: f32[G, 8, 8], iters: int) -> (f32[G, 8], i64[G]) {
    similarity_centrality(S, iters)
}
";

fn module() -> Module {
    lower("persistent.kiln", SRC, None, None)
}

/// Every step of a plan, branches and loop bodies included.
fn all_steps(steps: &[Step], out: &mut Vec<Step>) {
    for s in steps {
        out.push(s.clone());
        match s {
            Step::Loop { body, .. } => all_steps(body, out),
            Step::BySize { small, large, .. } => {
                all_steps(small, out);
                all_steps(large, out);
            }
            _ => {}
        }
    }
}

/// (plan loops, launches of persistent kernels) anywhere in the plan.
fn census(plan: &Plan, kernels: &[kiln_kir::Kernel]) -> (usize, usize) {
    let mut steps = Vec::new();
    all_steps(&plan.steps, &mut steps);
    let loops = steps
        .iter()
        .filter(|s| matches!(s, Step::Loop { .. }))
        .count();
    let persistent = steps
        .iter()
        .filter(|s| {
            matches!(s, Step::Launch { kernel, .. } if kernels[*kernel].name.contains("persistent_loop"))
        })
        .count();
    (loops, persistent)
}

fn scalar_int(v: i64) -> Tensor {
    Tensor::from_i64(&[], vec![v])
}

fn scalar_f32(v: f32) -> Tensor {
    Tensor::from_f32(&[], vec![v])
}

fn games(g: usize, m: usize, n: usize, seed: u64) -> Tensor {
    let mut rng = kiln_tests::Rng(seed);
    Tensor::from_f32(
        &[g, m, n],
        (0..g * m * n).map(|_| rng.unit() as f32).collect(),
    )
}

#[test]
fn the_benchmark_solver_is_one_persistent_kernel_without_a_plan_loop() {
    let module = module();
    // The payoff arrays a game keeps in shared memory: a zero-sum game reads -A as the
    // negation of A's array (one copy), a bimatrix game holds A and B.
    for (function, matrices) in [("rm_plus_64", 1), ("bimatrix_64", 2)] {
        let compiled =
            kiln_gpu_kernels::compile_function(&module, function, &Options::default()).unwrap();
        let (loops, persistent) = census(&compiled.plan, &compiled.kernels);
        assert_eq!(
            (loops, persistent),
            (0, 1),
            "{function}: plan loops, persistent kernels"
        );
        let kernel = compiled
            .kernels
            .iter()
            .find(|k| k.name.contains("persistent_loop"))
            .unwrap();
        let shared: u64 = kernel
            .shared
            .iter()
            .map(|s| u64::from(s.len) * s.dtype.size_bytes() as u64)
            .sum();
        // A thread per element of the widest per-game value (64), at least 128 threads; the
        // products with A and -A (or B) read the matrices from shared memory (the default:
        // faster on an H100 than holding them in registers with 256 threads).
        assert!(!Options::default().persistent.matrix_registers);
        assert_eq!(kernel.block_dim, 128, "{function}");
        // Each payoff matrix is 64 × 65 floats; the state and temporaries take less than
        // one more.
        let payoffs = matrices * 64 * 65 * 4;
        assert!(
            (payoffs..payoffs + 64 * 65 * 4).contains(&shared),
            "{function}: {shared} bytes"
        );
    }
}

#[test]
fn the_benchmark_solver_equals_the_interpreter() {
    let module = module();
    let inputs = vec![
        games(2, 64, 64, 5),
        scalar_int(4),
        scalar_f32(1e-3),
        scalar_int(2),
    ];
    check(
        &module,
        "rm_plus_64",
        &inputs,
        &BTreeMap::new(),
        &Options::default(),
    );
}

#[test]
fn a_loop_that_does_not_fit_keeps_the_plan_loop() {
    let module = module();
    let compiled =
        kiln_gpu_kernels::compile_function(&module, "rm_plus_128", &Options::default()).unwrap();
    // A and -A alone are 2 × 64 KiB: more than a block's shared memory.
    assert_eq!(census(&compiled.plan, &compiled.kernels), (1, 0));
    let inputs = vec![
        games(2, 128, 128, 6),
        scalar_int(2),
        scalar_f32(1e-3),
        scalar_int(2),
    ];
    check(
        &module,
        "rm_plus_128",
        &inputs,
        &BTreeMap::new(),
        &Options::default(),
    );
}

#[test]
fn symbolic_game_sizes_choose_the_persistent_kernel_when_they_fit() {
    let module = module();
    let compiled =
        kiln_gpu_kernels::compile_function(&module, "rm_plus_any", &Options::default()).unwrap();
    // M ≤ 64 and N ≤ 64 (two branches) run the kernel; each other branch the plan loop.
    assert_eq!(census(&compiled.plan, &compiled.kernels), (2, 1));
    assert!(
        compiled
            .plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::BySize { symbol, at_most: 64, .. } if symbol == "M")),
        "{}",
        compiled.plan
    );
    // Within the bound (the persistent kernel) and past it (the plan loop). NashConv is a
    // difference of nearly equal payoffs: after 30 iterations of f32 sums (the interpreter
    // sums in f64) it agrees to a relative 1e-4, the strategies and values to 1e-5.
    let func = module.function("rm_plus_any").unwrap();
    for (g, m, n) in [(3, 5, 4), (2, 7, 65)] {
        let inputs = vec![
            games(g, m, n, 7),
            scalar_int(30),
            scalar_f32(1e-4),
            scalar_int(5),
        ];
        let want = kiln_ir::interpret(func, &inputs, &BTreeMap::new()).unwrap();
        let got = run_plan(&compiled.kernels, &compiled.plan, &inputs, &BTreeMap::new()).unwrap();
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            let tol = if i == 3 { 1e-4 } else { 1e-5 };
            let err = rel_err(got, want);
            assert!(err <= tol, "{g}x{m}x{n} result {i}: relative error {err:e}");
        }
    }
}

#[test]
fn other_solver_loops_equal_the_interpreter() {
    let module = module();
    for function in ["hedge_small", "centrality"] {
        let compiled =
            kiln_gpu_kernels::compile_function(&module, function, &Options::default()).unwrap();
        assert_eq!(
            census(&compiled.plan, &compiled.kernels),
            (0, 1),
            "{function}"
        );
        let func = module.function(function).unwrap();
        let mut inputs = inputs_for(func, &BTreeMap::new(), 3, 9);
        for (t, p) in inputs.iter_mut().zip(func.params()) {
            if func.ty(*p).shape.dims().is_empty() && !func.ty(*p).dtype.is_float() {
                *t = scalar_int(25);
            }
        }
        if function == "hedge_small" {
            inputs[2] = scalar_f32(0.5);
            inputs[3] = scalar_f32(1e-4);
            inputs[4] = scalar_int(5);
        }
        check(
            &module,
            function,
            &inputs,
            &BTreeMap::new(),
            &Options::default(),
        );
    }
}

/// The persistent kernels of `functions`, renamed after their function.
fn persistent_kernels(module: &Module, functions: &[&str]) -> Vec<kiln_kir::Kernel> {
    let mut out = Vec::new();
    for function in functions {
        let compiled =
            kiln_gpu_kernels::compile_function(module, function, &Options::default()).unwrap();
        out.extend(
            compiled
                .kernels
                .into_iter()
                .filter(|k| k.name.contains("persistent_loop"))
                .map(|mut k| {
                    k.name = format!("{function}_{}", k.name);
                    k
                }),
        );
    }
    out
}

#[test]
fn the_power_iteration_kernel_snapshot() {
    let module = module();
    let kernels = persistent_kernels(&module, &["centrality"]);
    assert_eq!(kernels.len(), 1);
    let ptx = kiln_ptx::emit_ptx(&kernels, kiln_ptx::Target::Sm90a, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    insta::assert_snapshot!(format!("{}\n{ptx}", kernels[0]));
}

#[test]
fn persistent_kernels_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    let module = module();
    let kernels = persistent_kernels(
        &module,
        &[
            "rm_plus_64",
            "bimatrix_64",
            "rm_plus_any",
            "hedge_small",
            "centrality",
        ],
    );
    assert_eq!(kernels.len(), 5);
    common::assert_assembles_without_spills(&toolchain, &kernels);
}

#[test]
fn the_tuning_variants_equal_the_interpreter() {
    let module = module();
    let inputs = vec![
        games(2, 64, 64, 8),
        scalar_int(3),
        scalar_f32(1e-3),
        scalar_int(2),
    ];
    for (enabled, matrix_registers, want) in [(true, false, (0, 1)), (false, true, (1, 0))] {
        let options = Options {
            persistent: PersistentTuning {
                enabled,
                matrix_registers,
                ..PersistentTuning::default()
            },
            ..Options::default()
        };
        let compiled = check(&module, "rm_plus_64", &inputs, &BTreeMap::new(), &options);
        assert_eq!(census(&compiled.plan, &compiled.kernels), want);
        if let Some(k) = compiled
            .kernels
            .iter()
            .find(|k| k.name.contains("persistent"))
        {
            // The matrices read from shared memory: no register products, fewer threads.
            assert_eq!(k.block_dim, 128);
        }
    }
}
