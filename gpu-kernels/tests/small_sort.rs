//! The sort templates against the graph interpreter, on the kernel interpreter and on the
//! Cranelift backend: lines of K = 1, 2, 3, 7, 16 and 32 over a ragged number of lines
//! (not a multiple of the block), values with ties, NaN, infinities and signed zeros;
//! the fusion of a median and a trimmed mean into the sorting kernel (one kernel that
//! reads U and writes [P]); consumers that cannot join (stored sorted lines, read by a later
//! kernel); the rank-loop fallback for a symbolic or long axis; a PTX snapshot of the median
//! kernel and ptxas for every target without spills.

mod common;

use common::{check, rel_err, run_plan};
use kiln_gpu_kernels::{compile_function, CompiledFunction, Options};
use kiln_ir::{Module, Tensor};
use kiln_kir::{Kernel, Param};
use std::collections::BTreeMap;

const KS: [usize; 6] = [1, 2, 3, 7, 16, 32];

/// Ragged: 300 lines are two full blocks of 128 and a partial one.
const LINES: usize = 300;

fn source() -> String {
    let mut src = String::from("import consensus\n");
    for k in KS {
        let trim = k / 4;
        src.push_str(&format!(
            "fn sort_k{k}(x: f32[P, {k}]) -> f32[P, {k}] {{ sort(x, axis: -1) }}
fn median_k{k}(U: f32[{k}, P]) -> f32[P] {{ coordinate_median(U) }}
fn trimmed_k{k}(U: f32[{k}, P]) -> f32[P] {{ trimmed_mean(U, {trim}) }}
"
        ));
    }
    src.push_str(
        "fn centered(x: f32[P, 7]) -> f32[P, 7] {
    let s = sort(x, axis: -1)
    s - mean(s, axis: -1, keep: true)
}
fn spread(x: f32[P, 9]) -> (f32[P], i64[P]) {
    let s = sort(x, axis: -1)
    (s[:, 8] - s[:, 0], argmax(s, axis: -1))
}
fn stored_and_fused(x: f32[P, 8]) -> (f32[P, 8], f32[P], f32[8]) {
    let s = sort(x, axis: -1)
    (s, max(s, axis: -1), sum(s, axis: 0))
}
fn columns(x: f32[6, C]) -> f32[6, C] { sort(x, axis: 0) }
fn ints(x: i32[P, 5]) -> i32[P, 5] { sort(x, axis: -1) }
fn any_k(x: f32[P, K]) -> f32[P, K] { sort(x, axis: -1) }
fn long_k(x: f32[P, 40]) -> f32[P, 40] { sort(x, axis: -1) }
",
    );
    src
}

fn module() -> Module {
    common::lower("small_sort.kiln", &source(), None, None)
}

/// Values drawn from a small set (so lines have ties), with NaN, ±inf and ±0.
fn awkward(shape: &[usize], seed: u64) -> Tensor {
    const POOL: [f32; 12] = [
        -1.5,
        -0.0,
        0.0,
        0.25,
        2.0,
        -3.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        7.0,
        0.25,
        -1.5,
    ];
    let n: usize = shape.iter().product();
    let mut rng = common::Rng(seed);
    let data = (0..n)
        .map(|_| {
            let r = (rng.next() + 1.0) / 2.0;
            // Mostly ordinary numbers, a few of the pool's special values.
            if r < 0.7 {
                (rng.next() * 4.0) as f32
            } else {
                POOL[((r - 0.7) / 0.3 * POOL.len() as f64) as usize % POOL.len()]
            }
        })
        .collect();
    Tensor::from_f32(shape, data)
}

/// Finite values only (the trimmed mean's sums and the centered line compare within a
/// tolerance, which a NaN or an infinity would defeat).
fn finite(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = common::Rng(seed);
    // Quarter steps: ties are common.
    Tensor::from_f32(
        shape,
        (0..n)
            .map(|_| ((rng.next() * 8.0).round() / 4.0) as f32)
            .collect(),
    )
}

/// The same values, NaN where the other is NaN (the kernel's NaN may have other bits).
fn assert_same_values(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let same = (a.is_nan() && b.is_nan()) || a == b;
        assert!(same, "{what}: element {i}: {a} vs {b}");
    }
}

/// Runs `function` on the kernel interpreter and on the Cranelift backend and compares
/// both with the graph interpreter: exactly (`exact`) or within the f32 tolerance.
fn check_backends(
    module: &Module,
    function: &str,
    inputs: &[Tensor],
    exact: bool,
) -> CompiledFunction {
    let func = module.function(function).expect("function");
    let want = kiln_ir::interpret(func, inputs, &BTreeMap::<String, Tensor>::new())
        .unwrap_or_else(|e| panic!("{function}: graph interpreter: {e}"));
    let compiled = compile_function(module, function, &Options::default())
        .unwrap_or_else(|e| panic!("{function}: {e}"));
    let weights: BTreeMap<String, Tensor> = BTreeMap::new();
    let kir = run_plan(&compiled.kernels, &compiled.plan, inputs, &weights)
        .unwrap_or_else(|e| panic!("{function}: kernel interpreter: {e}"));
    let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
    let cranelift = cpu
        .run(&compiled.plan, inputs, &|name| weights.get(name))
        .unwrap_or_else(|e| panic!("{function}: cranelift: {e}"));
    for (backend, got) in [("kernel interpreter", &kir), ("cranelift", &cranelift)] {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{function} result {i} on the {backend}");
            if exact || !w.dtype.is_float() {
                assert_same_values(g, w, &what);
            } else {
                let err = rel_err(g, w);
                assert!(err <= 1e-6, "{what}: relative error {err:e}");
            }
        }
    }
    compiled
}

fn launches(compiled: &CompiledFunction) -> usize {
    compiled.plan.to_string().matches("launch ").count()
}

#[test]
fn sorted_lines_equal_the_interpreter_for_every_k() {
    let module = module();
    for (s, k) in KS.into_iter().enumerate() {
        let x = awkward(&[LINES, k], 11 + s as u64);
        let compiled = check_backends(&module, &format!("sort_k{k}"), &[x], true);
        assert_eq!(compiled.kernels.len(), 1, "sort_k{k}");
        assert!(
            compiled.kernels[0].name.contains(&format!("sort{k}")),
            "the register template: {}",
            compiled.kernels[0].name
        );
    }
}

#[test]
fn the_median_is_one_kernel_reading_u_and_writing_p() {
    let module = module();
    for (s, k) in KS.into_iter().enumerate() {
        let u = awkward(&[k, LINES], 21 + s as u64);
        let compiled = check_backends(&module, &format!("median_k{k}"), &[u], true);
        assert_eq!(compiled.kernels.len(), 1, "median_k{k}");
        assert_eq!(launches(&compiled), 1, "median_k{k}");
        let buffers: Vec<(&str, kiln_kir::Access)> = compiled.kernels[0]
            .params
            .iter()
            .filter_map(|p| match p {
                Param::Buffer { name, access, .. } => Some((name.as_str(), *access)),
                _ => None,
            })
            .collect();
        assert_eq!(
            buffers.len(),
            2,
            "median_k{k}: U and the result only: {buffers:?}"
        );
        assert_eq!(buffers[0].1, kiln_kir::Access::Read);
        assert_eq!(buffers[1].1, kiln_kir::Access::Write);
    }
}

#[test]
fn the_trimmed_mean_is_one_kernel() {
    let module = module();
    for (s, k) in KS.into_iter().enumerate() {
        let u = finite(&[k, LINES], 31 + s as u64);
        let compiled = check_backends(&module, &format!("trimmed_k{k}"), &[u], false);
        assert_eq!(launches(&compiled), 1, "trimmed_k{k}");
    }
}

#[test]
fn consumers_of_the_line_fuse_and_the_others_read_the_stored_lines() {
    let module = module();
    let compiled = check_backends(&module, "centered", &[finite(&[LINES, 7], 41)], false);
    assert_eq!(launches(&compiled), 1, "centered");
    let compiled = check_backends(&module, "spread", &[finite(&[LINES, 9], 42)], true);
    assert_eq!(launches(&compiled), 1, "spread");
    // The column sum cannot join the sorting kernel: the sorted lines are stored and a
    // second kernel reads them.
    let compiled = check_backends(
        &module,
        "stored_and_fused",
        &[finite(&[LINES, 8], 43)],
        false,
    );
    assert_eq!(launches(&compiled), 2, "stored_and_fused");
}

#[test]
fn other_axes_dtypes_and_lengths() {
    let module = module();
    check_backends(&module, "columns", &[awkward(&[6, 257], 51)], true);
    let ints = Tensor::from_ints(
        kiln_ir::DType::I32,
        &[LINES, 5],
        (0..LINES as i64 * 5).map(|i| (i * 7919) % 13 - 6).collect(),
    );
    check_backends(&module, "ints", &[ints], true);
    // A symbolic axis and one longer than 32: the rank loop.
    for k in [1, 5, 33] {
        let compiled = check_backends(&module, "any_k", &[awkward(&[LINES, k], 52)], true);
        assert!(
            compiled.kernels[0].name.contains("_sort_"),
            "{}",
            compiled.kernels[0].name
        );
    }
    check_backends(&module, "long_k", &[awkward(&[LINES, 40], 53)], true);
}

#[test]
fn the_median_kernel_equals_the_interpreter_through_check() {
    // The shared helper's path too (kernel interpreter, relative error).
    let module = module();
    let u = finite(&[16, LINES], 61);
    check(
        &module,
        "median_k16",
        &[u],
        &BTreeMap::new(),
        &Options::default(),
    );
}

fn kernels_of(module: &Module, functions: &[&str]) -> Vec<Kernel> {
    functions
        .iter()
        .flat_map(|f| {
            compile_function(module, f, &Options::default())
                .unwrap_or_else(|e| panic!("{f}: {e}"))
                .kernels
        })
        .collect()
}

#[test]
fn the_median_kernel_snapshot() {
    let module = module();
    let kernels = kernels_of(&module, &["median_k16"]);
    assert_eq!(kernels.len(), 1);
    let ptx = kiln_ptx::emit_ptx(&kernels, kiln_ptx::Target::Sm90a, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    insta::assert_snapshot!(ptx);
}

#[test]
fn sort_kernels_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    let module = module();
    let kernels = kernels_of(
        &module,
        &[
            "median_k16",
            "trimmed_k16",
            "sort_k16",
            "median_k32",
            "trimmed_k32",
            "sort_k32",
            "any_k",
        ],
    );
    common::assert_assembles_without_spills(&toolchain, &kernels);
}
