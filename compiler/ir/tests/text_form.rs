//! The text form: printing, parsing back (`parse(print(m)) == m` and
//! `print(parse(print(m))) == print(m)`), snapshots of printed modules, and parse errors
//! with their line:column.

use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{
    parse_module, parse_type, verify_module, Builder, DType, Dim, Function, Module, Op, Shape,
    TensorType, Value,
};

fn ty(text: &str) -> TensorType {
    parse_type(text).unwrap()
}

/// Prints, parses back and checks both round-trip invariants; returns the text.
#[track_caller]
fn round_trip(module: &Module) -> String {
    let text = module.to_string();
    let parsed = parse_module(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        parsed.to_string(),
        text,
        "print(parse(print(m))) != print(m)"
    );
    assert_eq!(&parsed, module, "parse(print(m)) != m\n{text}");
    text
}

/// A function that uses every op of the table, with a loop nested in a loop.
fn every_op() -> Function {
    let mut f = Function::new("every_op");
    let x = f.add_param(ty("f32[S, 4]"), Some("x"));
    let tokens = f.add_param(ty("i32[S]"), Some("tokens"));
    let count = f.add_param(ty("i64[]"), None);
    let flags = f.add_param(ty("bool[S, 4]"), Some("flags"));
    let mut b = Builder::new(&mut f);
    let w = b
        .push1(
            Op::Param {
                name: "model.layers.0.w \"q\"\n\t\\".into(),
                ty: ty("f32[4, 4]"),
            },
            &[],
        )
        .unwrap();
    b.name(w, "weight");
    let mut last = x;
    for &u in UnaryOp::ALL {
        if u == UnaryOp::Not {
            b.push1(Op::Unary(u), &[flags]).unwrap();
        } else {
            last = b.push1(Op::Unary(u), &[last]).unwrap();
        }
    }
    for &op in BinaryOp::ALL {
        let operands = if op.operand_class() == kiln_ir::DTypeClass::Bool {
            [flags, flags]
        } else {
            [last, x]
        };
        let r = b.push1(Op::Binary(op), &operands).unwrap();
        if !op.is_comparison() && op.operand_class() != kiln_ir::DTypeClass::Bool {
            last = r;
        }
    }
    let picked = b.push1(Op::Select, &[flags, last, x]).unwrap();
    let half = b.push1(Op::Cast { to: DType::F16 }, &[picked]).unwrap();
    for &op in ReduceOp::ALL {
        b.push1(
            Op::Reduce {
                op,
                axes: vec![0, 1],
                keep: op == ReduceOp::Max,
            },
            &[half],
        )
        .unwrap();
    }
    b.push1(
        Op::ArgMax {
            axis: 1,
            keep: true,
        },
        &[x],
    )
    .unwrap();
    b.push1(
        Op::ArgMin {
            axis: 0,
            keep: false,
        },
        &[x],
    )
    .unwrap();
    b.push1(Op::Sort { axis: 1 }, &[x]).unwrap();
    let y = b.push1(Op::MatMul, &[x, w]).unwrap();
    b.name(y, "y");
    let r = b
        .push1(
            Op::Reshape {
                shape: Shape(vec![Dim::Const(2), Dim::sym("S"), Dim::Const(2)]),
            },
            &[y],
        )
        .unwrap();
    b.push1(
        Op::Permute {
            perm: vec![2, 0, 1],
        },
        &[r],
    )
    .unwrap();
    let wide = b
        .push1(
            Op::BroadcastTo {
                shape: Shape(vec![Dim::Const(3), Dim::sym("S"), Dim::Const(4)]),
            },
            &[y],
        )
        .unwrap();
    let part = b
        .push1(
            Op::Slice {
                axis: 2,
                start: 1,
                end: Dim::Const(4),
                step: 2,
            },
            &[wide],
        )
        .unwrap();
    b.push1(Op::Concat { axis: 2 }, &[part, wide, part])
        .unwrap();
    b.push1(Op::Gather { axis: 0 }, &[w, tokens]).unwrap();
    for value in [
        0.1,
        -0.0,
        1e-12,
        1e300,
        f64::MAX,
        5e-324,
        f64::INFINITY,
        -f64::INFINITY,
    ] {
        b.push1(
            Op::Full {
                value,
                dtype: DType::BF16,
                shape: Shape(vec![Dim::sym("S")]),
            },
            &[],
        )
        .unwrap();
    }
    b.push1(
        Op::Arange {
            len: Dim::sym("S"),
            dtype: DType::I64,
        },
        &[],
    )
    .unwrap();

    // loop count with (acc = x, n = 0.0) { inner loop 2 times: acc = acc @ w; n + 1 }
    let zero = b
        .push1(
            Op::Full {
                value: 0.0,
                dtype: DType::F32,
                shape: Shape::scalar(),
            },
            &[],
        )
        .unwrap();
    let outer_args = b.begin_region(vec![ty("i64[]"), ty("f32[S, 4]"), ty("f32[]")]);
    let two = b
        .push1(
            Op::Full {
                value: 2.0,
                dtype: DType::I32,
                shape: Shape::scalar(),
            },
            &[],
        )
        .unwrap();
    let inner_args = b.begin_region(vec![ty("i64[]"), ty("f32[S, 4]")]);
    let next = b.push1(Op::MatMul, &[inner_args[1], w]).unwrap();
    b.name(next, "next");
    let inner = b.end_region(vec![next]);
    let acc = b
        .push_with_regions(Op::Loop, &[two, outer_args[1]], vec![inner])
        .unwrap();
    let one = b
        .push1(
            Op::Full {
                value: 1.0,
                dtype: DType::F32,
                shape: Shape::scalar(),
            },
            &[],
        )
        .unwrap();
    let n = b
        .push1(Op::Binary(BinaryOp::Add), &[outer_args[2], one])
        .unwrap();
    let outer = b.end_region(vec![acc[0], n]);
    let results = b
        .push_with_regions(Op::Loop, &[count, x, zero], vec![outer])
        .unwrap();
    b.name(results[0], "acc");
    // A loop with no carried state and an empty body.
    let empty = b.begin_region(vec![ty("i64[]")]);
    let _ = empty;
    let body = b.end_region(vec![]);
    b.push_with_regions(Op::Loop, &[count], vec![body]).unwrap();
    f.body.yields = vec![results[0], results[1], last];
    f
}

#[test]
fn every_op_round_trips() {
    let module = Module {
        functions: vec![every_op(), Function::new("empty")],
    };
    verify_module(&module).unwrap();
    let text = round_trip(&module);
    // Every op name appears in the text.
    for name in [
        "param", "full", "arange", "select", "cast", "argmax", "argmin", "matmul",
    ] {
        assert!(text.contains(&format!(" {name}")), "{name} missing");
    }
    insta::assert_snapshot!("every_op", text);
}

#[test]
fn small_module_snapshot() {
    let text = r#"func @forward(%0 "tokens": i32[B, S]) -> (f32[B, S, 256]) {
  %1 "embed" = param {name = "model.embed_tokens.weight", ty = f32[256, 64]} : f32[256, 64]
  %2 "h" = gather {axis = 0} %1, %0 : f32[B, S, 64]
  %3 = permute {perm = [1, 0]} %1 : f32[64, 256]
  %4 "logits" = matmul %2, %3 : f32[B, S, 256]
  return %4
}

func @solve(%0 "n": i64[], %1 "a": f32[G, M], %2 "b": f32[G, N]) -> (f32[G, M], f32[G, N]) {
  %3, %4 = loop %0, %1, %2 : f32[G, M], f32[G, N] {
  ^(%5 "i": i64[], %6: f32[G, M], %7: f32[G, N]):
    %8 = reduce_sum {axes = [1], keep = true} %6 : f32[G, 1]
    %9 = div %6, %8 : f32[G, M]
    yield %9, %7
  }
  return %3, %4
}
"#;
    let module = parse_module(text).unwrap();
    verify_module(&module).unwrap();
    assert_eq!(round_trip(&module), text);
    insta::assert_snapshot!("small_module", text);
}

#[test]
fn nan_and_special_names_round_trip_textually() {
    let mut f = Function::new("odd name");
    let mut b = Builder::new(&mut f);
    let v = b
        .push1(
            Op::Full {
                value: f64::NAN,
                dtype: DType::F32,
                shape: Shape(vec![Dim::sym("weird dim"), Dim::sym("64")]),
            },
            &[],
        )
        .unwrap();
    b.name(v, "a \"name\"\u{1}");
    f.body.yields = vec![v];
    let module = Module { functions: vec![f] };
    let text = module.to_string();
    assert!(
        text.starts_with("func @\"odd name\"() -> (f32[\"weird dim\", \"64\"]) {"),
        "{text}"
    );
    assert!(text.contains("value = nan"), "{text}");
    assert!(
        text.contains("%0 \"a \\\"name\\\"\\u{1}\" = full"),
        "{text}"
    );
    let parsed = parse_module(&text).unwrap();
    assert_eq!(parsed.to_string(), text);
    let Op::Full { value, .. } = &parsed.functions[0].body.insts[0].op else {
        panic!("not a full");
    };
    assert!(value.is_nan());
    assert_eq!(parsed.functions[0].names, module.functions[0].names);
    assert_eq!(parsed.functions[0].values, module.functions[0].values);
}

#[test]
fn floats_round_trip_exactly() {
    let samples = [
        0.1,
        1.0 / 3.0,
        -2.5e-8,
        1e22,
        123_456_789.123_456_79,
        f64::MIN_POSITIVE,
        f64::EPSILON,
        -f64::MAX,
        std::f64::consts::PI,
    ];
    for value in samples {
        let mut f = Function::new("f");
        let mut b = Builder::new(&mut f);
        let v = b
            .push1(
                Op::Full {
                    value,
                    dtype: DType::F32,
                    shape: Shape::scalar(),
                },
                &[],
            )
            .unwrap();
        f.body.yields = vec![v];
        let module = Module { functions: vec![f] };
        let parsed = parse_module(&module.to_string()).unwrap();
        let Op::Full { value: back, .. } = parsed.functions[0].body.insts[0].op else {
            panic!("not a full");
        };
        assert_eq!(back.to_bits(), value.to_bits(), "{value:?}");
    }
}

#[test]
fn value_numbering_is_kept_as_written() {
    // Numbers out of order and a region argument numbered after the loop's results.
    let text = "func @f(%3: f32[4], %0: i64[]) -> (f32[4]) {
  %1 = loop %0, %3 : f32[4] {
  ^(%4: i64[], %2: f32[4]):
    yield %2
  }
  return %1
}
";
    let module = parse_module(text).unwrap();
    let f = &module.functions[0];
    assert_eq!(f.params(), &[Value(3), Value(0)]);
    assert_eq!(f.body.insts[0].results, vec![Value(1)]);
    assert_eq!(f.body.insts[0].regions[0].args, vec![Value(4), Value(2)]);
    verify_module(&module).unwrap();
    assert_eq!(round_trip(&module), text);
}

#[test]
fn undefined_values_survive_a_round_trip() {
    let mut f = Function::new("f");
    let x = f.add_param(ty("f32[4]"), None);
    f.new_value(ty("i8[2]"));
    f.body.yields = vec![x];
    let module = Module { functions: vec![f] };
    let text = round_trip(&module);
    assert!(text.contains("  undefined %1: i8[2]\n"), "{text}");
}

/// Parses `text` and returns the error message.
#[track_caller]
fn parse_error(text: &str) -> String {
    match parse_module(text) {
        Ok(m) => panic!("parsed:\n{m}"),
        Err(e) => e.message,
    }
}

#[test]
fn parse_errors_point_at_the_token() {
    assert_eq!(
        parse_error("func @f() -> () {\n  %0 = frobnicate : f32[]\n  return\n}\n"),
        "2:8: unknown op `frobnicate`"
    );
    assert_eq!(
        parse_error(
            "func @f() -> () {\n  %0 = full {value = 1.0, dtype = f32} : f32[]\n  return\n}\n"
        ),
        "2:8: full: missing attribute `shape`"
    );
    assert_eq!(
        parse_error("func @f() -> () {\n  %0 = exp {axis = 1} %0 : f32[]\n  return\n}\n"),
        "2:8: exp: unknown attribute `axis`"
    );
    assert_eq!(
        parse_error(
            "func @f(%0: f32[4]) -> (f32[4]) {\n  %1 = exp %0 : f32[4], f32[4]\n  return %1\n}\n"
        ),
        "2:15: exp defines 1 values but lists 2 result types"
    );
    assert_eq!(
        parse_error("func @f(%0: f32[4]) -> (f32[4]) {\n  return %2\n}\n"),
        "2:10: %2 is never defined"
    );
    assert_eq!(
        parse_error("func @f(%0: f32[4]) -> (f32[5]) {\n  return %0\n}\n"),
        "1:25: @f's header result types differ from the types it returns"
    );
    assert_eq!(
        parse_error("func @f(%0: f33[4]) -> () {\n  return\n}\n"),
        "1:13: unknown dtype `f33`"
    );
    assert_eq!(
        parse_error("func @f(%0: f32[4]) -> () {\n  %1 = neg %0 : f32[4]\n"),
        "2:23: expected `return`, found the end of the text"
    );
    assert_eq!(
        parse_error("func @f() -> () {\n  %0 = param {name = \"abc} : f32[]\n  return\n}\n"),
        "2:22: unterminated string"
    );
    assert_eq!(
        parse_error("func @f(%0: f32[4], %0: f16[4]) -> () {\n  return\n}\n"),
        "1:21: %0 is defined again with a different type or name"
    );
    assert_eq!(
        parse_error("func @f() -> () {\n  $\n}\n"),
        "2:3: unexpected character '$'"
    );
}

#[test]
fn comments_are_ignored() {
    let module = parse_module(
        "// a comment\nfunc @f(%0: f32[4]) -> (f32[4]) { // another\n  return %0 // last\n}\n",
    )
    .unwrap();
    assert_eq!(
        module.to_string(),
        "func @f(%0: f32[4]) -> (f32[4]) {\n  return %0\n}\n"
    );
}
