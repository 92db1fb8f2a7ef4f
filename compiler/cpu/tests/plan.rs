//! Plans run by `CpuExecutor`: symbols bound from input shapes, weights by name, launches
//! over temps and views, a loop with carried buffers and a counter, a copy; and the errors
//! that name the step and the kernel.

mod common;

use common::Rng;
use kiln_cpu::{CpuError, CpuExecutor};
use kiln_ir::{DType, Tensor};
use kiln_kir::{
    examples, Access, Arg, BufferDecl, BufferId, BufferKind, Expr, Kernel, KernelBuilder, Plan,
    SizeExpr, Step, Stmt, SymBinding, Ty, UnOp,
};
use std::collections::BTreeMap;

/// `next[i] = acc[i] + t[i] * f32(counter[0])` for `i < n`.
fn accumulate_scaled_by_counter() -> Kernel {
    let mut k = KernelBuilder::new("accumulate_scaled", 64);
    k.grid([
        SizeExpr::CeilDiv(
            Box::new(SizeExpr::Sym("n".to_string())),
            Box::new(SizeExpr::Const(64)),
        ),
        SizeExpr::Const(1),
        SizeExpr::Const(1),
    ]);
    let acc = k.buffer("acc", DType::F32, Access::Read);
    let t = k.buffer("t", DType::F32, Access::Read);
    let counter = k.buffer("counter", DType::I64, Access::Read);
    let next = k.buffer("next", DType::F32, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let i = k.var("i", Ty::I64);
    k.finish(vec![
        Stmt::assign(
            i,
            (Expr::block_idx(0) * Expr::i32(64) + Expr::thread_idx()).cast(Ty::I64),
        ),
        Stmt::if_then(
            Expr::var(i).lt(n),
            vec![Stmt::store(
                next,
                i,
                Expr::load(acc, i)
                    + Expr::load(t, i) * Expr::load(counter, Expr::i32(0)).cast(Ty::F32),
            )],
        ),
    ])
}

fn n() -> SizeExpr {
    SizeExpr::Sym("n".to_string())
}

fn decl(id: u32, dtype: DType, shape: Vec<SizeExpr>, kind: BufferKind) -> BufferDecl {
    BufferDecl {
        id: BufferId(id),
        dtype,
        shape,
        kind,
        offset: None,
    }
}

/// The kernels of the test package, in launch-index order.
fn package() -> Vec<Kernel> {
    vec![
        examples::vector_add(DType::F32),
        examples::unary_map(UnOp::Neg, DType::F32),
        accumulate_scaled_by_counter(),
    ]
}

/// ```text
/// t = x + w                      (launch 0 over a temp)
/// y = -view(t)                   (launch 1 reading t through a [1, n] view)
/// acc = x; for c in 0..count { acc = acc + t * c }   (loop of launch 2)
/// z = copy(acc)
/// return (y, z)
/// ```
fn plan() -> Plan {
    let b = BufferId;
    Plan {
        function: "step".to_string(),
        symbols: vec![SymBinding {
            name: "n".to_string(),
            input: 0,
            axis: 0,
        }],
        buffers: vec![
            decl(0, DType::F32, vec![n()], BufferKind::Input(0)),
            decl(
                1,
                DType::F32,
                vec![n()],
                BufferKind::Weight("w".to_string()),
            ),
            decl(2, DType::F32, vec![n()], BufferKind::Temp),
            decl(3, DType::F32, vec![n()], BufferKind::Output(0)),
            decl(4, DType::I64, vec![], BufferKind::Input(1)),
            decl(5, DType::I64, vec![], BufferKind::Temp),
            decl(6, DType::F32, vec![n()], BufferKind::Temp),
            decl(7, DType::F32, vec![n()], BufferKind::Temp),
            decl(8, DType::F32, vec![n()], BufferKind::Output(1)),
            decl(
                9,
                DType::F32,
                vec![SizeExpr::Const(1), n()],
                BufferKind::View(b(2)),
            ),
        ],
        inputs: vec![b(0), b(4)],
        outputs: vec![b(3), b(8)],
        steps: vec![
            Step::Launch {
                kernel: 0,
                args: vec![
                    Arg::Buffer(b(0)),
                    Arg::Buffer(b(1)),
                    Arg::Buffer(b(2)),
                    Arg::Sym("n".to_string()),
                ],
            },
            Step::Launch {
                kernel: 1,
                args: vec![
                    Arg::Buffer(b(9)),
                    Arg::Buffer(b(3)),
                    Arg::Sym("n".to_string()),
                ],
            },
            Step::Loop {
                count: b(4),
                carried: vec![b(6)],
                init: vec![b(0)],
                next: vec![b(7)],
                counter: b(5),
                body: vec![Step::Launch {
                    kernel: 2,
                    args: vec![
                        Arg::Buffer(b(6)),
                        Arg::Buffer(b(2)),
                        Arg::Buffer(b(5)),
                        Arg::Buffer(b(7)),
                        Arg::Sym("n".to_string()),
                    ],
                }],
            },
            Step::Copy {
                src: b(6),
                dst: b(8),
            },
        ],
        arena_bytes: SizeExpr::Mul(Box::new(n()), Box::new(SizeExpr::Const(16))),
        symbol_bound: None,
    }
}

fn random_f32(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.f32_in(-2.0, 2.0)).collect()
}

#[test]
fn a_plan_with_temps_a_view_a_loop_and_a_copy_matches_values_computed_here() {
    let executor = CpuExecutor::new(&package()).expect("kernels compile");
    let mut rng = Rng::new(30);
    for (n, count) in [(1000usize, 3i64), (1, 0), (129, 5)] {
        let x = random_f32(&mut rng, n);
        let w = random_f32(&mut rng, n);
        let mut weights = BTreeMap::new();
        weights.insert("w".to_string(), Tensor::from_f32(&[n], w.clone()));
        let inputs = [
            Tensor::from_f32(&[n], x.clone()),
            Tensor::scalar_int(DType::I64, count),
        ];
        let outputs = executor
            .run(&plan(), &inputs, &|name| weights.get(name))
            .expect("the plan runs");
        assert_eq!(outputs.len(), 2);

        let t: Vec<f32> = x.iter().zip(&w).map(|(a, b)| a + b).collect();
        let y: Vec<f32> = t.iter().map(|v| -v).collect();
        let mut acc = x.clone();
        for c in 0..count {
            for (a, t) in acc.iter_mut().zip(&t) {
                *a += t * c as f32;
            }
        }
        assert_eq!(outputs[0], Tensor::from_f32(&[n], y));
        assert_eq!(outputs[1], Tensor::from_f32(&[n], acc));
    }
}

#[test]
fn plan_errors_name_the_step_and_the_kernel() {
    let executor = CpuExecutor::new(&package()).expect("kernels compile");
    let n = 100;
    let inputs = [
        Tensor::from_f32(&[n], vec![1.0; n]),
        Tensor::scalar_int(DType::I64, 2),
    ];
    let w = Tensor::from_f32(&[n], vec![2.0; n]);

    // A missing weight.
    let error = executor
        .run(&plan(), &inputs, &|_| None)
        .expect_err("no weights");
    assert!(
        matches!(&error, CpuError::Plan { step, .. } if step == "setup"),
        "{error}"
    );
    assert!(error.to_string().contains("weight `w`"), "{error}");

    // A weight of the wrong shape.
    let short = Tensor::from_f32(&[n - 1], vec![2.0; n - 1]);
    let error = executor
        .run(&plan(), &inputs, &|_| Some(&short))
        .expect_err("short weight");
    assert!(error.to_string().contains("weight `w`"), "{error}");

    // A temp too small for the kernel that writes it: the launch faults.
    let mut small_temp = plan();
    small_temp.buffers[2].shape = vec![SizeExpr::Const(10)];
    small_temp.buffers[9].shape = vec![SizeExpr::Const(10)];
    let error = executor
        .run(&small_temp, &inputs, &|_| Some(&w))
        .expect_err("an overrun");
    match &error {
        CpuError::Step { step, source, .. } => {
            assert_eq!(step, "step 0 (launch of `vector_add_f32`)");
            assert!(
                matches!(**source, CpuError::OutOfBounds { len: 10, .. }),
                "{source}"
            );
        }
        other => panic!("expected a step error, got {other}"),
    }

    // A launch inside the loop whose argument has the wrong dtype.
    let mut wrong_dtype = plan();
    wrong_dtype.buffers[5].dtype = DType::I32;
    let error = executor
        .run(&wrong_dtype, &inputs, &|_| Some(&w))
        .expect_err("counter of the wrong dtype");
    let message = error.to_string();
    assert!(
        message.contains("step 2 (loop) iteration 0 step 0 (launch of `accumulate_scaled`)"),
        "{message}"
    );
    assert!(message.contains("`counter`"), "{message}");

    // An input of the wrong dtype, and the wrong number of inputs.
    let error = executor
        .run(
            &plan(),
            &[inputs[0].clone(), Tensor::scalar_int(DType::I32, 2)],
            &|_| Some(&w),
        )
        .expect_err("count as i32");
    assert!(error.to_string().contains("input 1"), "{error}");
    let error = executor
        .run(&plan(), &inputs[..1], &|_| Some(&w))
        .expect_err("one input");
    assert!(error.to_string().contains("1 inputs given"), "{error}");
}
