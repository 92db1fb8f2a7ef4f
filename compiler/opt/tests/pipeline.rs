//! The pipeline: the default order of passes, running to a fixed point within its bound,
//! verification after every pass, `print_after`, and its errors.

mod common;

use common::{assert_same_results, dedent};
use kiln_ir::{parse_module, IrError, Module, TensorType};
use kiln_opt::{default_pipeline, pass_by_name, OptError, Pass, Pipeline, RunOptions};

/// A small program with work for every pass: a constant that folds to 1 only after
/// constfold, repeated subexpressions, and an identity reshape.
const PROGRAM: &str = r#"
    func @norm(%0 "x": f32[S, 4]) -> (f32[S, 4]) {
      %1 = full {value = 1.0, dtype = f32, shape = []} : f32[]
      %2 = full {value = 16.0, dtype = f32, shape = []} : f32[]
      %3 = sqrt %2 : f32[]
      %4 = div %1, %3 : f32[]
      %5 = full {value = 4.0, dtype = f32, shape = []} : f32[]
      %6 = mul %4, %5 : f32[]
      %7 "scaled" = mul %6, %0 : f32[S, 4]
      %8 = reshape {shape = [S, 4]} %7 : f32[S, 4]
      %9 = exp %0 : f32[S, 4]
      %10 = exp %0 : f32[S, 4]
      %11 = add %9, %10 : f32[S, 4]
      %12 = add %8, %11 : f32[S, 4]
      return %12
    }
"#;

fn program() -> Module {
    parse_module(&dedent(PROGRAM)).expect("PROGRAM parses")
}

fn verifying<'a>(print_after: Option<&'a str>) -> RunOptions<'a> {
    RunOptions {
        verify_each_pass: true,
        print_after,
    }
}

#[test]
fn the_default_pipeline_runs_the_four_passes() {
    assert_eq!(
        default_pipeline().pass_names(),
        ["canonicalize", "constfold", "cse", "dce"]
    );
}

#[test]
fn the_default_pipeline_iterates_to_a_fixed_point_then_removes_dead_code() {
    let before = program();
    let mut module = before.clone();
    let report = default_pipeline()
        .run_with(&mut module, &verifying(None))
        .unwrap();
    // Round 1 folds the constant to 1.0 (constfold runs after canonicalize); round 2 sees
    // `x * 1`; round 3 changes nothing.
    let expected = dedent(
        r#"
        func @norm(%0 "x": f32[S, 4]) -> (f32[S, 4]) {
          %1 = exp %0 : f32[S, 4]
          %2 = add %1, %1 : f32[S, 4]
          %3 = add %0, %2 : f32[S, 4]
          return %3
        }
        "#,
    );
    assert_eq!(module.to_string(), expected);
    assert_same_results(&before, &module);
    let rounds: Vec<(&str, usize, bool)> = report
        .runs
        .iter()
        .map(|r| (r.pass, r.round, r.changed))
        .collect();
    assert_eq!(
        rounds,
        [
            ("canonicalize", 1, true),
            ("constfold", 1, true),
            ("cse", 1, true),
            ("canonicalize", 2, true),
            ("constfold", 2, false),
            ("cse", 2, false),
            ("canonicalize", 3, false),
            ("constfold", 3, false),
            ("cse", 3, false),
            ("dce", 1, true),
        ]
    );
}

#[test]
fn running_the_pipeline_twice_changes_nothing() {
    let mut module = program();
    default_pipeline().run(&mut module).unwrap();
    let once = module.to_string();
    let report = default_pipeline().run(&mut module).unwrap();
    assert_eq!(module.to_string(), once);
    assert!(report.runs.iter().all(|r| !r.changed), "{:?}", report.runs);
}

#[test]
fn print_after_captures_the_module_after_the_first_run_of_the_pass() {
    let mut module = program();
    let report = default_pipeline()
        .run_with(&mut module, &verifying(Some("constfold")))
        .unwrap();
    // The same as canonicalize then constfold, once each.
    let mut expected = program();
    Pipeline::from_names(&["canonicalize", "constfold"])
        .unwrap()
        .run(&mut expected)
        .unwrap();
    assert_eq!(report.printed, Some(expected.to_string()));
    assert!(report.printed.unwrap().contains("full {value = 1.0"));

    let mut module = program();
    let report = default_pipeline()
        .run_with(&mut module, &verifying(Some("dce")))
        .unwrap();
    assert_eq!(report.printed, Some(module.to_string()));

    let mut module = program();
    let report = default_pipeline().run(&mut module).unwrap();
    assert_eq!(report.printed, None);
}

#[test]
fn print_after_an_unknown_pass_is_an_error_listing_the_known_ones() {
    let mut module = program();
    let error = default_pipeline()
        .run_with(&mut module, &verifying(Some("gvn")))
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "unknown pass `gvn`; the known passes are: canonicalize, constfold, cse, dce"
    );
    assert_eq!(module, program(), "the module is left untouched");

    let error = Pipeline::from_names(&["dce"])
        .unwrap()
        .run_with(&mut module, &verifying(Some("cse")))
        .unwrap_err();
    assert_eq!(
        error,
        OptError::UnknownPass {
            name: "cse".into(),
            known: vec!["dce"],
        }
    );
}

#[test]
fn passes_are_found_by_name() {
    assert_eq!(pass_by_name("cse").unwrap().name, "cse");
    let error = pass_by_name("fuse").unwrap_err();
    assert_eq!(
        error.to_string(),
        "unknown pass `fuse`; the known passes are: canonicalize, constfold, cse, dce"
    );
    assert!(Pipeline::from_names(&["dce", "fuse"]).is_err());
}

/// A pass that leaves a value nothing defines in the function's table.
fn add_undefined_value(func: &mut kiln_ir::Function) -> Result<bool, IrError> {
    func.new_value(TensorType::scalar(kiln_ir::DType::F32));
    Ok(true)
}

#[test]
fn the_verifier_runs_after_every_pass() {
    let broken = Pass {
        name: "broken",
        summary: "adds an undefined value",
        run: add_undefined_value,
    };
    let pipeline = Pipeline::new()
        .then(pass_by_name("cse").unwrap())
        .then(broken);
    let error = pipeline
        .run_with(&mut program(), &verifying(None))
        .unwrap_err();
    let OptError::InvalidAfterPass { pass, error } = &error else {
        panic!("unexpected error {error:?}");
    };
    assert_eq!(*pass, "broken");
    assert!(error.message.contains("is never defined"), "{error}");
}

#[test]
fn invalid_input_is_reported_before_any_pass_runs() {
    let mut module = program();
    add_undefined_value(&mut module.functions[0]).unwrap();
    let error = default_pipeline()
        .run_with(&mut module, &verifying(None))
        .unwrap_err();
    assert!(matches!(error, OptError::InvalidInput(_)), "{error:?}");
}

fn fail(_: &mut kiln_ir::Function) -> Result<bool, IrError> {
    Err(IrError::new("cannot do that"))
}

#[test]
fn a_failing_pass_names_itself_and_the_function() {
    let failing = Pass {
        name: "failing",
        summary: "always fails",
        run: fail,
    };
    let error = Pipeline::new()
        .then(failing)
        .run(&mut program())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "pass failing failed on @norm: cannot do that"
    );
}

fn always_changed(_: &mut kiln_ir::Function) -> Result<bool, IrError> {
    Ok(true)
}

#[test]
fn fixed_point_groups_stop_at_their_round_bound() {
    let restless = Pass {
        name: "restless",
        summary: "claims a change every time",
        run: always_changed,
    };
    let report = Pipeline::new()
        .repeat_until_fixed_point(&[restless], 3)
        .run(&mut program())
        .unwrap();
    let rounds: Vec<usize> = report.runs.iter().map(|r| r.round).collect();
    assert_eq!(rounds, [1, 2, 3]);
}
