//! The verifier: one test per invariant, each with a function that breaks it.

use kiln_ir::{parse_module, parse_type, verify_function, verify_module, Function, Module, Value};

/// Parses `text` (which must parse) and returns the verifier's message.
#[track_caller]
fn verify_error(text: &str) -> String {
    let module = parse_module(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    match verify_module(&module) {
        Ok(()) => panic!("verified:\n{text}"),
        Err(e) => e.message,
    }
}

#[test]
fn a_valid_function_passes() {
    let text = r#"func @f(%0 "x": f32[S, 4], %1: i64[]) -> (f32[S, 4]) {
  %2 = exp %0 : f32[S, 4]
  %3 = loop %1, %2 : f32[S, 4] {
  ^(%4: i64[], %5: f32[S, 4]):
    %6 = add %5, %0 : f32[S, 4]
    %7 = loop %1, %6 : f32[S, 4] {
    ^(%8: i64[], %9: f32[S, 4]):
      %10 = mul %9, %2 : f32[S, 4]
      yield %10
    }
    yield %7
  }
  return %3
}
"#;
    verify_module(&parse_module(text).unwrap()).unwrap();
}

#[test]
fn use_before_definition() {
    let text = "func @f(%0: f32[4]) -> (f32[4]) {
  %1 = add %0, %2 : f32[4]
  %2 = neg %0 : f32[4]
  return %1
}
";
    assert_eq!(
        verify_error(text),
        "in @f: %1 = add uses %2, which is not defined before it in this region or an \
         enclosing one"
    );
}

#[test]
fn an_instruction_cannot_use_its_own_result() {
    let text = "func @f(%0: f32[4]) -> (f32[4]) {
  %1 = add %0, %1 : f32[4]
  return %1
}
";
    assert!(verify_error(text).contains("%1 = add uses %1"));
    let inside_its_region = "func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
  %2 = loop %0, %1 : f32[4] {
  ^(%3: i64[], %4: f32[4]):
    %5 = add %4, %2 : f32[4]
    yield %5
  }
  return %2
}
";
    assert!(verify_error(inside_its_region).contains("%5 = add uses %2"));
}

#[test]
fn values_of_a_region_are_not_visible_after_it() {
    let text = "func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
  %2 = loop %0, %1 : f32[4] {
  ^(%3: i64[], %4: f32[4]):
    %5 = neg %4 : f32[4]
    yield %5
  }
  %6 = add %2, %5 : f32[4]
  return %6
}
";
    assert!(verify_error(text).contains("%6 = add uses %5"));
    let returned = "func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
  %2 = loop %0, %1 : f32[4] {
  ^(%3: i64[], %4: f32[4]):
    %5 = neg %4 : f32[4]
    yield %5
  }
  return %5
}
";
    assert_eq!(
        verify_error(returned),
        "in @f: the yield of the function body uses %5, which is not defined before it in \
         this region or an enclosing one"
    );
}

#[test]
fn wrong_stored_type() {
    let text = "func @f(%0: f32[S, 64], %1: f32[64]) -> (f32[S, 32]) {
  %2 = add %0, %1 : f32[S, 32]
  return %2
}
";
    assert_eq!(
        verify_error(text),
        "in @f: %2 = add: stored result types (f32[S, 32]) differ from the op's type rule \
         (f32[S, 64])"
    );
    let param = r#"func @f() -> (f32[4]) {
  %0 = param {name = "w", ty = f32[8]} : f32[4]
  return %0
}
"#;
    assert!(verify_error(param).contains("stored result types (f32[4]) differ"));
}

#[test]
fn type_rule_failures_are_reported() {
    let text = "func @f(%0: f32[S, 64], %1: f32[S, 32]) -> (f32[S, 64]) {
  %2 = add %0, %1 : f32[S, 64]
  return %2
}
";
    assert_eq!(
        verify_error(text),
        "in @f: %2 = add: cannot broadcast f32[S, 64] with f32[S, 32]"
    );
}

#[test]
fn bad_yield_types() {
    let text = "func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
  %2 = loop %0, %1 : f32[4] {
  ^(%3: i64[], %4: f32[4]):
    %5 = cast {to = f16} %4 : f16[4]
    yield %5
  }
  return %2
}
";
    assert_eq!(
        verify_error(text),
        "in @f: %2 = loop: the body yields f16[4] for carried value 0 of type f32[4]"
    );
    let wrong_args = "func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
  %2 = loop %0, %1 : f32[4] {
  ^(%3: i32[], %4: f32[4]):
    yield %4
  }
  return %2
}
";
    assert!(verify_error(wrong_args).contains("the index) must be i64[], got i32[]"));
}

#[test]
fn operand_and_region_counts() {
    let text = "func @f(%0: f32[4]) -> (f32[4]) {
  %1 = add %0 : f32[4]
  return %1
}
";
    assert_eq!(
        verify_error(text),
        "in @f: %1 = add: expects 2 operands, got 1"
    );
    let region = "func @f(%0: f32[4]) -> (f32[4]) {
  %1 = exp %0 : f32[4] {
  ^():
    yield
  }
  return %1
}
";
    assert_eq!(
        verify_error(region),
        "in @f: %1 = exp: expects 0 regions, got 1"
    );
}

#[test]
fn values_defined_twice() {
    let text = "func @f(%0: f32[4]) -> (f32[4]) {
  %1 = neg %0 : f32[4]
  %1 = neg %0 : f32[4]
  return %1
}
";
    assert_eq!(
        verify_error(text),
        "in @f: %1 is defined more than once (%1 = neg)"
    );
    let arg_and_result = "func @f(%0: i64[], %1: f32[4]) -> (f32[4]) {
  %2 = loop %0, %1 : f32[4] {
  ^(%3: i64[], %1: f32[4]):
    yield %1
  }
  return %2
}
";
    assert!(verify_error(arg_and_result).contains("%1 is defined more than once"));
}

fn ty(text: &str) -> kiln_ir::TensorType {
    parse_type(text).unwrap()
}

#[test]
fn values_never_defined() {
    let mut f = Function::new("f");
    let x = f.add_param(ty("f32[4]"), None);
    f.new_value(ty("i8[2]"));
    f.body.yields = vec![x];
    assert_eq!(
        verify_function(&f).unwrap_err().message,
        "in @f: %1: i8[2] is never defined"
    );
}

#[test]
fn table_consistency() {
    let mut f = Function::new("f");
    let x = f.add_param(ty("f32[4]"), None);
    f.body.yields = vec![Value(7)];
    assert_eq!(
        verify_function(&f).unwrap_err().message,
        "in @f: the yield of the function body refers to %7, beyond the value table (1 values)"
    );
    f.body.yields = vec![x];
    f.names.push(None);
    assert_eq!(
        verify_function(&f).unwrap_err().message,
        "in @f: the name table has 2 entries for 1 values"
    );
}

#[test]
fn function_names_are_unique() {
    let module = Module {
        functions: vec![Function::new("f"), Function::new("f")],
    };
    assert_eq!(
        verify_module(&module).unwrap_err().message,
        "function @f is defined twice"
    );
}

/// A cache written in place, then read through the value the write returns: valid, and the
/// result is reported as the input it updates.
const CACHE_WRITE_THEN_READ: &str = r#"func @f(%0: f32[2, NB, 4, 1, 8], %1: f32[T, 1, 8], %2: i32[T], %3: i32[B, MB], %4: i32[T], %5: i32[T]) -> (f32[T, 1, 8], f32[2, NB, 4, 1, 8]) {
  %6 = kv_write {layer = 1} %0, %1, %2 : f32[2, NB, 4, 1, 8]
  %7 = paged_attention {layer = 1, scale = 0.5} %1, %6, %6, %3, %4, %5 : f32[T, 1, 8]
  return %7, %6
}
"#;

#[test]
fn a_cache_written_in_place_and_read_after_verifies() {
    let module = parse_module(CACHE_WRITE_THEN_READ).unwrap();
    verify_module(&module).unwrap();
    assert_eq!(
        kiln_ir::in_place_inputs(&module.functions[0]),
        vec![None, Some(0)]
    );
}

#[test]
fn the_old_cache_cannot_be_read_after_its_in_place_write() {
    // %7 reads %0, the cache before the write, and does not come before the write.
    let text = CACHE_WRITE_THEN_READ.replace("%1, %6, %6, %3", "%1, %0, %6, %3");
    assert!(verify_error(&text).contains("kv_write updates %0 in place, but paged_attention"));
    // Returning the old cache is reading it after the write too.
    let text = CACHE_WRITE_THEN_READ.replace("return %7, %6", "return %7, %0");
    assert!(verify_error(&text).contains("is written in place by kv_write but is also a result"));
}

#[test]
fn a_cache_read_before_its_write_may_be_updated_in_place() {
    // The write's rows depend on an attention over the old cache: it comes first.
    let text = r#"func @f(%0: f32[2, NB, 4, 1, 8], %1: f32[T, 1, 8], %2: i32[T], %3: i32[B, MB], %4: i32[T], %5: i32[T]) -> (f32[2, NB, 4, 1, 8]) {
  %6 = paged_attention {layer = 0, scale = 0.5} %1, %0, %0, %3, %4, %5 : f32[T, 1, 8]
  %7 = kv_write {layer = 0} %0, %6, %2 : f32[2, NB, 4, 1, 8]
  return %7
}
"#;
    verify_module(&parse_module(text).unwrap()).unwrap();
}
