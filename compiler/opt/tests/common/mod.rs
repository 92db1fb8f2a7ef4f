//! The `check` helper of the pass tests: runs passes on IR in the text form, compares the
//! printed result with the expected text, and runs the interpreter on both with generated
//! inputs to check that the results are bit-identical.

// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use kiln_ir::{interpret, parse_module, Dim, Module, Tensor, TensorData, TensorType};
use kiln_opt::{Pipeline, RunOptions};
use std::collections::BTreeMap;

/// Runs the named passes (each once, verifying after each) on `input` and asserts that the
/// printed module is `expected` (both compared without their common indentation), and that
/// every function computes the same results as before on generated inputs.
#[track_caller]
pub fn check(passes: &[&str], input: &str, expected: &str) {
    let before = parse_module(&dedent(input)).unwrap_or_else(|e| panic!("input: {e}"));
    let mut after = before.clone();
    let options = RunOptions {
        verify_each_pass: true,
        print_after: None,
    };
    Pipeline::from_names(passes)
        .expect("known passes")
        .run_with(&mut after, &options)
        .unwrap_or_else(|e| panic!("{e}"));
    let actual = after.to_string();
    let expected = dedent(expected);
    assert!(
        actual == expected,
        "after {passes:?}:\n--- expected\n{expected}--- actual\n{actual}"
    );
    assert_same_results(&before, &after);
}

/// Removes the indentation common to all non-blank lines, and blank lines at both ends;
/// the result ends with one newline.
pub fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.iter().position(|l| !l.trim().is_empty());
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    let (Some(first), Some(last)) = (first, last) else {
        return String::new();
    };
    let lines = &lines[first..=last];
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for line in lines {
        out.push_str(line.get(indent..).unwrap_or("").trim_end());
        out.push('\n');
    }
    out
}

/// Every symbolic dim is bound to this size in generated inputs.
const SYMBOL_SIZE: usize = 3;

/// Deterministic elements of `ty` (symbols bound to `SYMBOL_SIZE`), mixing signs and zeros
/// of both signs.
pub fn generated_tensor(ty: &TensorType, seed: usize) -> Tensor {
    let shape: Vec<usize> = ty
        .shape
        .dims()
        .iter()
        .map(|d| match d {
            Dim::Const(n) => *n as usize,
            Dim::Sym(_) => SYMBOL_SIZE,
        })
        .collect();
    let n: usize = shape.iter().product();
    const FLOATS: [f32; 8] = [1.5, -0.0, -2.25, 0.0, 3.0, -1.0, 0.5, 7.0];
    const INTS: [i64; 6] = [2, 1, 0, 3, -1, 5];
    let at = |i: usize, len: usize| (i + seed) % len;
    match ty.dtype {
        d if d.is_float() => Tensor::from_floats(
            d,
            &shape,
            (0..n).map(|i| FLOATS[at(i, FLOATS.len())]).collect(),
        ),
        d if d.is_int() => {
            Tensor::from_ints(d, &shape, (0..n).map(|i| INTS[at(i, INTS.len())]).collect())
        }
        _ => Tensor::from_bool(&shape, (0..n).map(|i| at(i, 3) != 0).collect()),
    }
}

/// Runs every function of both modules on generated inputs (and generated checkpoint
/// params); where `before` succeeds, `after` must give bit-identical results.
pub fn assert_same_results(before: &Module, after: &Module) {
    for (f_before, f_after) in before.functions.iter().zip(&after.functions) {
        let inputs: Vec<Tensor> = f_before
            .params()
            .iter()
            .enumerate()
            .map(|(i, &v)| generated_tensor(f_before.ty(v), i))
            .collect();
        let params: BTreeMap<String, Tensor> = f_before
            .checkpoint_params()
            .into_iter()
            .enumerate()
            .map(|(i, (name, ty))| (name.to_string(), generated_tensor(ty, i + 5)))
            .collect();
        let Ok(want) = interpret(f_before, &inputs, &params) else {
            continue;
        };
        let got = interpret(f_after, &inputs, &params)
            .unwrap_or_else(|e| panic!("@{}: fails after the passes: {e}", f_after.name));
        assert_eq!(want.len(), got.len());
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert!(
                bitwise_equal(w, g),
                "@{} result {i} changed:\n before {w:?}\n after  {g:?}",
                f_after.name
            );
        }
    }
}

/// Whether two tensors are equal bit for bit.
pub fn bitwise_equal(a: &Tensor, b: &Tensor) -> bool {
    a.dtype == b.dtype
        && a.shape == b.shape
        && match (&a.data, &b.data) {
            (TensorData::Float(x), TensorData::Float(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
            }
            (x, y) => x == y,
        }
}

/// Like [`check`] when the passes must leave `input` exactly as it is (comments aside).
#[track_caller]
pub fn check_unchanged(passes: &[&str], input: &str) {
    let printed = parse_module(input).unwrap_or_else(|e| panic!("input: {e}"));
    check(passes, input, &printed.to_string());
}
