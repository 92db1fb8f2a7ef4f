//! The type rule of every op: what it accepts (and the result types) and what it rejects
//! (and the message), written as `check(op, operand types, expected)`.

use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{parse_type, DType, Dim, Op, RegionSignature, Shape, TensorType};

fn ty(text: &str) -> TensorType {
    parse_type(text).unwrap_or_else(|e| panic!("bad type {text:?}: {e}"))
}

fn shape(dims: &[&str]) -> Shape {
    Shape(
        dims.iter()
            .map(|d| match d.parse::<u64>() {
                Ok(n) => Dim::Const(n),
                Err(_) => Dim::sym(d),
            })
            .collect(),
    )
}

/// The result types joined by ", ", or the error message.
fn infer(op: &Op, operands: &[&str], regions: &[RegionSignature]) -> String {
    let types: Vec<TensorType> = operands.iter().map(|t| ty(t)).collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    match op.infer(&refs, regions) {
        Ok(results) => results
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => e.message,
    }
}

#[track_caller]
fn check(op: Op, operands: &[&str], expected: &str) {
    assert_eq!(
        infer(&op, operands, &[]),
        expected,
        "{op:?} on {operands:?}"
    );
}

#[test]
fn names_are_unique_and_cover_every_op() {
    let mut ops = vec![
        Op::Param {
            name: "w".into(),
            ty: ty("f32[]"),
        },
        Op::Full {
            value: 0.0,
            dtype: DType::F32,
            shape: shape(&[]),
        },
        Op::Arange {
            len: Dim::Const(4),
            dtype: DType::I64,
        },
        Op::Select,
        Op::Cast { to: DType::F16 },
        Op::ArgMax {
            axis: 0,
            keep: false,
        },
        Op::ArgMin {
            axis: 0,
            keep: false,
        },
        Op::Sort { axis: 0 },
        Op::MatMul,
        Op::Reshape { shape: shape(&[]) },
        Op::Permute { perm: vec![] },
        Op::BroadcastTo { shape: shape(&[]) },
        Op::Slice {
            axis: 0,
            start: 0,
            end: Dim::Const(1),
            step: 1,
        },
        Op::Concat { axis: 0 },
        Op::Gather { axis: 0 },
        Op::Loop,
    ];
    ops.extend(UnaryOp::ALL.iter().map(|&u| Op::Unary(u)));
    ops.extend(BinaryOp::ALL.iter().map(|&b| Op::Binary(b)));
    ops.extend(ReduceOp::ALL.iter().map(|&op| Op::Reduce {
        op,
        axes: vec![],
        keep: false,
    }));
    let mut names: Vec<&str> = ops.iter().map(Op::name).collect();
    names.sort_unstable();
    let count = names.len();
    names.dedup();
    assert_eq!(names.len(), count, "duplicate op names: {names:?}");
    assert_eq!(
        count,
        16 + UnaryOp::ALL.len() + BinaryOp::ALL.len() + ReduceOp::ALL.len()
    );
}

#[test]
fn operand_and_region_counts() {
    check(
        Op::Binary(BinaryOp::Add),
        &["f32[]"],
        "add: expects 2 operands, got 1",
    );
    check(
        Op::Unary(UnaryOp::Exp),
        &[],
        "exp: expects 1 operand, got 0",
    );
    check(
        Op::Concat { axis: 0 },
        &[],
        "concat: expects at least 1 operand, got 0",
    );
    check(Op::Loop, &["i64[]"], "loop: expects 1 region, got 0");
    check(
        Op::Param {
            name: "w".into(),
            ty: ty("f32[4]"),
        },
        &["f32[4]"],
        "param: expects 0 operands, got 1",
    );
}

#[test]
fn sources() {
    check(
        Op::Param {
            name: "w".into(),
            ty: ty("bf16[V, 64]"),
        },
        &[],
        "bf16[V, 64]",
    );
    check(
        Op::Full {
            value: 1.5,
            dtype: DType::F16,
            shape: shape(&["S", "4"]),
        },
        &[],
        "f16[S, 4]",
    );
    check(
        Op::Arange {
            len: Dim::sym("T"),
            dtype: DType::I32,
        },
        &[],
        "i32[T]",
    );
    check(
        Op::Arange {
            len: Dim::Const(3),
            dtype: DType::Bool,
        },
        &[],
        "arange: expects a numeric dtype, got bool",
    );
}

#[test]
fn unary_dtype_classes() {
    for &u in UnaryOp::ALL {
        let op = Op::Unary(u);
        let name = u.name();
        match u {
            UnaryOp::Not => {
                check(op.clone(), &["bool[S]"], "bool[S]");
                check(op, &["f32[S]"], "not: expects a bool operand, got f32[S]");
            }
            UnaryOp::Neg | UnaryOp::Abs => {
                check(op.clone(), &["i8[3]"], "i8[3]");
                check(op.clone(), &["bf16[3]"], "bf16[3]");
                check(
                    op,
                    &["bool[3]"],
                    &format!("{name}: expects a numeric (non-bool) operand, got bool[3]"),
                );
            }
            _ => {
                check(op.clone(), &["f8e4m3[B, 2]"], "f8e4m3[B, 2]");
                check(
                    op,
                    &["i32[B, 2]"],
                    &format!("{name}: expects a float operand, got i32[B, 2]"),
                );
            }
        }
    }
}

#[test]
fn binary_broadcasting() {
    let add = || Op::Binary(BinaryOp::Add);
    check(add(), &["f32[S, 64]", "f32[S, 64]"], "f32[S, 64]");
    check(add(), &["f32[S, 64]", "f32[64]"], "f32[S, 64]");
    check(add(), &["f32[S, 1]", "f32[1, 64]"], "f32[S, 64]");
    check(add(), &["f32[1, 64]", "f32[S, 1]"], "f32[S, 64]");
    check(add(), &["f32[]", "f32[B, S]"], "f32[B, S]");
    check(add(), &["f32[1]", "f32[S]"], "f32[S]");
    check(
        add(),
        &["f32[S, 64]", "f32[S, 32]"],
        "add: cannot broadcast f32[S, 64] with f32[S, 32]",
    );
    check(
        add(),
        &["f32[S]", "f32[T]"],
        "add: cannot broadcast f32[S] with f32[T]",
    );
    check(
        add(),
        &["f32[S]", "f32[4]"],
        "add: cannot broadcast f32[S] with f32[4]",
    );
    check(
        add(),
        &["f32[4]", "f16[4]"],
        "add: operand dtypes differ: f32[4] and f16[4]",
    );
}

#[test]
fn binary_dtype_classes() {
    use BinaryOp::*;
    for &b in BinaryOp::ALL {
        let op = || Op::Binary(b);
        let name = b.name();
        let on = |dtype: &str| {
            infer(
                &op(),
                &[&format!("{dtype}[2]"), &format!("{dtype}[2]")],
                &[],
            )
        };
        let result = |dtype: &str| {
            if b.is_comparison() {
                "bool[2]".to_string()
            } else {
                format!("{dtype}[2]")
            }
        };
        let rejected = |dtype: &str, class: &str| {
            format!("{name}: expects {class} operands, got {dtype}[2] and {dtype}[2]")
        };
        match b {
            Add | Sub | Mul | Div | Rem | Max | Min | Lt | Le | Gt | Ge => {
                assert_eq!(on("f16"), result("f16"));
                assert_eq!(on("i32"), result("i32"));
                assert_eq!(on("bool"), rejected("bool", "a numeric (non-bool)"));
            }
            Pow => {
                assert_eq!(on("f32"), result("f32"));
                assert_eq!(on("i32"), rejected("i32", "a float"));
            }
            Eq | Ne => {
                assert_eq!(on("bf16"), result("bf16"));
                assert_eq!(on("i64"), result("i64"));
                assert_eq!(on("bool"), result("bool"));
            }
            And | Or => {
                assert_eq!(on("bool"), result("bool"));
                assert_eq!(on("i32"), rejected("i32", "a bool"));
            }
        }
    }
    check(
        Op::Binary(BinaryOp::Lt),
        &["i32[S, 1]", "i32[4]"],
        "bool[S, 4]",
    );
}

#[test]
fn select() {
    check(
        Op::Select,
        &["bool[S, 1]", "f32[S, 4]", "f32[4]"],
        "f32[S, 4]",
    );
    check(Op::Select, &["bool[]", "i32[]", "i32[3]"], "i32[3]");
    check(
        Op::Select,
        &["f32[4]", "f32[4]", "f32[4]"],
        "select: condition must be bool, got f32[4]",
    );
    check(
        Op::Select,
        &["bool[4]", "f32[4]", "f16[4]"],
        "select: branch dtypes differ: f32[4] and f16[4]",
    );
    check(
        Op::Select,
        &["bool[3]", "f32[4]", "f32[4]"],
        "select: cannot broadcast bool[3] with f32[4] and f32[4]",
    );
}

#[test]
fn cast() {
    check(
        Op::Cast { to: DType::F8E5M2 },
        &["f32[S, 2]"],
        "f8e5m2[S, 2]",
    );
    check(Op::Cast { to: DType::Bool }, &["i8[]"], "bool[]");
}

#[test]
fn reductions() {
    let reduce = |op, axes: &[usize], keep| Op::Reduce {
        op,
        axes: axes.to_vec(),
        keep,
    };
    check(
        reduce(ReduceOp::Sum, &[1], false),
        &["f32[S, 64]"],
        "f32[S]",
    );
    check(
        reduce(ReduceOp::Max, &[0, 2], true),
        &["i32[B, S, 4]"],
        "i32[1, S, 1]",
    );
    check(reduce(ReduceOp::Prod, &[], false), &["f16[3]"], "f16[3]");
    check(reduce(ReduceOp::Min, &[0], false), &["f32[3]"], "f32[]");
    check(
        reduce(ReduceOp::Mean, &[1], true),
        &["bf16[S, D]"],
        "bf16[S, 1]",
    );
    check(
        reduce(ReduceOp::Mean, &[0], false),
        &["i32[4]"],
        "reduce_mean: expects a float operand, got i32[4]",
    );
    check(
        reduce(ReduceOp::Sum, &[0], false),
        &["bool[4]"],
        "reduce_sum: expects a numeric (non-bool) operand, got bool[4]",
    );
    check(
        reduce(ReduceOp::Sum, &[2], false),
        &["f32[S, 64]"],
        "reduce_sum: axis 2 out of range for f32[S, 64]",
    );
    check(
        reduce(ReduceOp::Sum, &[1, 0], false),
        &["f32[S, 64]"],
        "reduce_sum: axes must be sorted and unique, got [1, 0]",
    );
    check(
        reduce(ReduceOp::Sum, &[1, 1], false),
        &["f32[S, 64]"],
        "reduce_sum: axes must be sorted and unique, got [1, 1]",
    );
}

#[test]
fn arg_reductions() {
    check(
        Op::ArgMax {
            axis: 1,
            keep: false,
        },
        &["f32[B, V]"],
        "i64[B]",
    );
    check(
        Op::ArgMin {
            axis: 0,
            keep: true,
        },
        &["i8[B, V]"],
        "i64[1, V]",
    );
    check(
        Op::ArgMax {
            axis: 2,
            keep: false,
        },
        &["f32[B, V]"],
        "argmax: axis 2 out of range for f32[B, V]",
    );
    check(
        Op::ArgMin {
            axis: 0,
            keep: false,
        },
        &["bool[4]"],
        "argmin: expects a numeric (non-bool) operand, got bool[4]",
    );
    check(Op::Sort { axis: 1 }, &["f32[P, 16]"], "f32[P, 16]");
    check(Op::Sort { axis: 0 }, &["i32[K]"], "i32[K]");
    check(
        Op::Sort { axis: 2 },
        &["f32[P, 16]"],
        "sort: axis 2 out of range for f32[P, 16]",
    );
    check(
        Op::Sort { axis: 0 },
        &["bool[4]"],
        "sort: expects a numeric (non-bool) operand, got bool[4]",
    );
}

#[test]
fn matmul() {
    check(Op::MatMul, &["f32[4, 8]", "f32[8, 2]"], "f32[4, 2]");
    check(Op::MatMul, &["f32[G, M, K]", "f32[K, N]"], "f32[G, M, N]");
    check(
        Op::MatMul,
        &["f16[2, 1, S, K]", "f16[3, K, S]"],
        "f16[2, 3, S, S]",
    );
    check(Op::MatMul, &["i8[4, 8]", "i8[8, 2]"], "i8[4, 2]");
    check(
        Op::MatMul,
        &["f32[4, 8]", "f32[16, 2]"],
        "matmul: inner dims differ: f32[4, 8] @ f32[16, 2]",
    );
    check(
        Op::MatMul,
        &["f32[S, K]", "f32[T, 2]"],
        "matmul: inner dims differ: f32[S, K] @ f32[T, 2]",
    );
    check(
        Op::MatMul,
        &["f32[8]", "f32[8, 2]"],
        "matmul: operands must have rank >= 2: f32[8] @ f32[8, 2]",
    );
    check(
        Op::MatMul,
        &["f32[4, 8]", "bf16[8, 2]"],
        "matmul: operand dtypes differ: f32[4, 8] @ bf16[8, 2]",
    );
    check(
        Op::MatMul,
        &["f32[2, 4, 8]", "f32[3, 8, 2]"],
        "matmul: cannot broadcast batch dims of f32[2, 4, 8] @ f32[3, 8, 2]",
    );
    check(
        Op::MatMul,
        &["bool[4, 8]", "bool[8, 2]"],
        "matmul: expects numeric (non-bool) operands, got bool[4, 8] @ bool[8, 2]",
    );
}

#[test]
fn reshape() {
    let reshape = |dims: &[&str]| Op::Reshape { shape: shape(dims) };
    check(reshape(&["S", "8", "8"]), &["f32[S, 64]"], "f32[S, 8, 8]");
    check(reshape(&["64", "S"]), &["f32[S, 64]"], "f32[64, S]");
    check(reshape(&["B", "S", "2"]), &["f32[S, B, 2]"], "f32[B, S, 2]");
    check(reshape(&[]), &["f32[1, 1]"], "f32[]");
    check(reshape(&["0", "S"]), &["f32[T, 0]"], "f32[0, S]");
    check(
        reshape(&["S", "4", "8"]),
        &["f32[S, 64]"],
        "reshape: f32[S, 64] has a different element count than [S, 4, 8]",
    );
    check(
        reshape(&["T", "64"]),
        &["f32[S, 64]"],
        "reshape: f32[S, 64] has a different element count than [T, 64]",
    );
}

#[test]
fn permute() {
    check(
        Op::Permute { perm: vec![1, 0] },
        &["f32[S, 64]"],
        "f32[64, S]",
    );
    check(
        Op::Permute {
            perm: vec![0, 2, 1],
        },
        &["i32[B, H, D]"],
        "i32[B, D, H]",
    );
    check(
        Op::Permute { perm: vec![0, 0] },
        &["f32[4, 8]"],
        "permute: [0, 0] is not a permutation of the 2 dims of f32[4, 8]",
    );
    check(
        Op::Permute { perm: vec![0] },
        &["f32[4, 8]"],
        "permute: [0] is not a permutation of the 2 dims of f32[4, 8]",
    );
}

#[test]
fn broadcast_to() {
    let to = |dims: &[&str]| Op::BroadcastTo { shape: shape(dims) };
    check(to(&["S", "4"]), &["f32[4]"], "f32[S, 4]");
    check(to(&["S", "4"]), &["f32[1, 4]"], "f32[S, 4]");
    check(to(&["S", "4"]), &["f32[S, 1]"], "f32[S, 4]");
    check(
        to(&["4", "5"]),
        &["f32[4, 3]"],
        "broadcast_to: cannot broadcast f32[4, 3] to [4, 5]",
    );
    check(
        to(&["4"]),
        &["f32[2, 4]"],
        "broadcast_to: cannot broadcast f32[2, 4] to [4]",
    );
    check(
        to(&["1"]),
        &["f32[S]"],
        "broadcast_to: cannot broadcast f32[S] to [1]",
    );
}

#[test]
fn slice() {
    let slice = |axis, start, end: Dim, step| Op::Slice {
        axis,
        start,
        end,
        step,
    };
    check(
        slice(1, 0, Dim::Const(32), 1),
        &["f32[S, 64]"],
        "f32[S, 32]",
    );
    check(
        slice(1, 1, Dim::Const(64), 2),
        &["f32[S, 64]"],
        "f32[S, 32]",
    );
    check(slice(1, 1, Dim::Const(8), 3), &["f32[S, 64]"], "f32[S, 3]");
    check(slice(0, 2, Dim::Const(2), 1), &["f32[4]"], "f32[0]");
    check(slice(0, 0, Dim::sym("S"), 1), &["f32[S, 4]"], "f32[S, 4]");
    check(slice(0, 0, Dim::Const(2), 1), &["f32[S, 4]"], "f32[2, 4]");
    check(
        slice(1, 0, Dim::Const(65), 1),
        &["f32[S, 64]"],
        "slice: [0:65:1] is out of range for axis 1 of f32[S, 64]",
    );
    check(
        slice(1, 5, Dim::Const(4), 1),
        &["f32[S, 64]"],
        "slice: start > end in [5:4:1] of axis 1 of f32[S, 64]",
    );
    check(
        slice(1, 0, Dim::Const(4), 0),
        &["f32[S, 64]"],
        "slice: step must be >= 1, got [0:4:0] of f32[S, 64]",
    );
    check(
        slice(2, 0, Dim::Const(4), 1),
        &["f32[S, 64]"],
        "slice: axis 2 out of range for f32[S, 64]",
    );
    check(
        slice(0, 0, Dim::sym("T"), 1),
        &["f32[S, 64]"],
        "slice: a symbolic end must be the whole dim: [0:T:1] of axis 0 of f32[S, 64]",
    );
    check(
        slice(0, 1, Dim::sym("S"), 1),
        &["f32[S, 64]"],
        "slice: [1:S:1] of axis 0 of f32[S, 64] has a symbolic length",
    );
}

#[test]
fn concat() {
    check(
        Op::Concat { axis: 1 },
        &["f32[S, 2]", "f32[S, 3]"],
        "f32[S, 5]",
    );
    check(Op::Concat { axis: 0 }, &["i32[4]"], "i32[4]");
    check(
        Op::Concat { axis: 0 },
        &["f32[2]", "f16[3]"],
        "concat: operand dtypes differ: f32[2], f16[3]",
    );
    check(
        Op::Concat { axis: 0 },
        &["f32[2, 4]", "f32[3]"],
        "concat: operand ranks differ: f32[2, 4], f32[3]",
    );
    check(
        Op::Concat { axis: 1 },
        &["f32[S, 2]", "f32[T, 3]"],
        "concat: dim 0 differs between operands: f32[S, 2], f32[T, 3]",
    );
    check(
        Op::Concat { axis: 0 },
        &["f32[S, 2]", "f32[3, 2]"],
        "concat: the joined dim 0 must be constant: f32[S, 2], f32[3, 2]",
    );
    check(
        Op::Concat { axis: 1 },
        &["f32[2]", "f32[3]"],
        "concat: axis 1 out of range for f32[2], f32[3]",
    );
}

#[test]
fn gather() {
    check(
        Op::Gather { axis: 0 },
        &["f32[256, 64]", "i32[B, S]"],
        "f32[B, S, 64]",
    );
    check(
        Op::Gather { axis: 1 },
        &["f32[4, 5, 6]", "i64[]"],
        "f32[4, 6]",
    );
    check(
        Op::Gather { axis: 1 },
        &["f32[4, 5, 6]", "i8[2]"],
        "f32[4, 2, 6]",
    );
    check(
        Op::Gather { axis: 0 },
        &["f32[256, 64]", "f32[S]"],
        "gather: indices must be integers: f32[256, 64], f32[S]",
    );
    check(
        Op::Gather { axis: 2 },
        &["f32[256, 64]", "i32[S]"],
        "gather: axis 2 out of range for table f32[256, 64]",
    );
}

fn region(args: &[&str], yields: &[&str]) -> RegionSignature {
    RegionSignature {
        args: args.iter().map(|t| ty(t)).collect(),
        yields: yields.iter().map(|t| ty(t)).collect(),
    }
}

#[test]
fn loops() {
    let run = |operands: &[&str], body: RegionSignature| infer(&Op::Loop, operands, &[body]);
    assert_eq!(
        run(
            &["i64[]", "f32[G, M]", "f32[G, N]"],
            region(
                &["i64[]", "f32[G, M]", "f32[G, N]"],
                &["f32[G, M]", "f32[G, N]"]
            ),
        ),
        "f32[G, M], f32[G, N]"
    );
    assert_eq!(run(&["i32[]"], region(&["i64[]"], &[])), "");
    assert_eq!(
        run(
            &["f32[]", "f32[4]"],
            region(&["i64[]", "f32[4]"], &["f32[4]"])
        ),
        "loop: count must be an integer scalar, got f32[]"
    );
    assert_eq!(
        run(
            &["i64[1]", "f32[4]"],
            region(&["i64[]", "f32[4]"], &["f32[4]"])
        ),
        "loop: count must be an integer scalar, got i64[1]"
    );
    assert_eq!(
        run(&["i64[]", "f32[4]"], region(&["f32[4]"], &["f32[4]"])),
        "loop: the body takes 1 arguments, expected 2 (the i64[] index and 1 carried)"
    );
    assert_eq!(
        run(
            &["i64[]", "f32[4]"],
            region(&["i32[]", "f32[4]"], &["f32[4]"])
        ),
        "loop: the body's first argument (the index) must be i64[], got i32[]"
    );
    assert_eq!(
        run(
            &["i64[]", "f32[4]"],
            region(&["i64[]", "f32[8]"], &["f32[4]"])
        ),
        "loop: body argument 1 has type f32[8], but carried value 0 is f32[4]"
    );
    assert_eq!(
        run(
            &["i64[]", "f32[4]"],
            region(&["i64[]", "f32[4]"], &["f16[4]"])
        ),
        "loop: the body yields f16[4] for carried value 0 of type f32[4]"
    );
    assert_eq!(
        run(&["i64[]", "f32[4]"], region(&["i64[]", "f32[4]"], &[])),
        "loop: the body yields 0 values, expected 1 (the carried state)"
    );
}

#[test]
fn attention() {
    let op = Op::Attention { scale: 0.25 };
    let (q, k) = ("bf16[B, S, 8, 16]", "bf16[B, T, 2, 16]");
    check(op.clone(), &[q, k, k, "bool[]"], "bf16[B, S, 8, 16]");
    check(
        op.clone(),
        &[q, k, k, "bool[B, 1, 1, T]"],
        "bf16[B, S, 8, 16]",
    );
    check(
        op.clone(),
        &[q, k, k, "bool[S, S]"],
        "attention: the mask bool[S, S] does not broadcast to the scores [B, 8, S, T]",
    );
    check(
        op.clone(),
        &[q, "bf16[B, T, 3, 16]", "bf16[B, T, 3, 16]", "bool[]"],
        "attention: query heads must be a constant multiple of key/value heads: bf16[B, S, 8, 16], bf16[B, T, 3, 16]",
    );
    check(
        op.clone(),
        &[q, "f32[B, T, 2, 16]", "f32[B, T, 2, 16]", "bool[]"],
        "attention: q, k and v must share one float dtype, got bf16[B, S, 8, 16], f32[B, T, 2, 16], f32[B, T, 2, 16]",
    );
    check(
        op,
        &[q, k, k, "i32[]"],
        "attention: the mask must be bool, got i32[]",
    );
}
