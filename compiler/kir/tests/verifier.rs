//! The verifier: every invariant of its documentation rejected by a kernel that breaks only
//! that one, the example kernels accepted, and the block-uniformity rules that decide where
//! barriers and warp shuffles may go.

use kiln_ir::DType;
use kiln_kir::examples::{
    binary_map, convert, divergent_branches, fma_select, prefix_sums_by_loop, reverse_blocks,
    rms_norm_rows, unary_map, vector_add,
};
use kiln_kir::{
    uniformity, verify_kernel, Access, BinOp, Buf, Expr, Kernel, KernelBuilder, Shared, Special,
    Stmt, Ty, UnOp, VarId,
};

/// A kernel `k` with buffers `inp: f32 read`, `out: f32 write`, `both: i32 read_write`, a
/// scalar `n: i64`, a shared array `tile: f32[64]` and registers `f: f32`, `i: i32`,
/// `l: i64`, `p: pred`, `g: f32`.
struct Fixture {
    builder: KernelBuilder,
    inp: Buf,
    out: Buf,
    both: Buf,
    n: Expr,
    tile: Buf,
    f: VarId,
    i: VarId,
    l: VarId,
    p: VarId,
    g: VarId,
}

fn fixture() -> Fixture {
    let mut builder = KernelBuilder::new("k", 64);
    let inp = builder.buffer("inp", DType::F32, Access::Read);
    let out = builder.buffer("out", DType::F32, Access::Write);
    let both = builder.buffer("both", DType::I32, Access::ReadWrite);
    let n = builder.scalar("n", Ty::I64);
    let tile = builder.shared("tile", DType::F32, 64);
    let f = builder.var("f", Ty::F32);
    let i = builder.var("i", Ty::I32);
    let l = builder.var("l", Ty::I64);
    let p = builder.var("p", Ty::Pred);
    let g = builder.var("g", Ty::F32);
    Fixture {
        builder,
        inp,
        out,
        both,
        n,
        tile,
        f,
        i,
        l,
        p,
        g,
    }
}

/// The fixture kernel with `body`.
fn kernel_with(body: impl FnOnce(&Fixture) -> Vec<Stmt>) -> Kernel {
    let fx = fixture();
    let body = body(&fx);
    fx.builder.finish(body)
}

fn accepts(kernel: &Kernel) {
    if let Err(e) = verify_kernel(kernel) {
        panic!("rejected: {e}\n{kernel}");
    }
}

fn rejects(kernel: &Kernel, expected: &str) {
    match verify_kernel(kernel) {
        Ok(()) => panic!("accepted, expected an error containing {expected:?}:\n{kernel}"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(expected),
                "error {message:?} does not contain {expected:?}"
            );
        }
    }
}

fn rejects_body(body: impl FnOnce(&Fixture) -> Vec<Stmt>, expected: &str) {
    rejects(&kernel_with(body), expected);
}

fn rejects_expr(expr: impl FnOnce(&Fixture) -> Expr, target: Ty, expected: &str) {
    rejects_body(
        |fx| {
            let var = match target {
                Ty::F32 => fx.f,
                Ty::I32 => fx.i,
                Ty::I64 => fx.l,
                Ty::Pred => fx.p,
            };
            vec![Stmt::assign(var, expr(fx))]
        },
        expected,
    );
}

#[test]
fn the_example_kernels_verify() {
    let mut kernels = vec![
        vector_add(DType::BF16),
        vector_add(DType::F32),
        vector_add(DType::I64),
        vector_add(DType::F8E5M2),
        rms_norm_rows(DType::BF16, 4096, 256),
        rms_norm_rows(DType::F32, 7, 32),
        divergent_branches(),
        prefix_sums_by_loop(),
        reverse_blocks(DType::F16, 1024),
        fma_select(),
        convert(DType::F32, DType::F8E4M3),
        convert(DType::Bool, DType::I8),
    ];
    for op in [UnOp::Exp, UnOp::Tanh, UnOp::Recip] {
        kernels.push(unary_map(op, DType::F32));
    }
    kernels.push(unary_map(UnOp::Not, DType::Bool));
    kernels.push(unary_map(UnOp::Abs, DType::I8));
    for op in [BinOp::Add, BinOp::Shl, BinOp::Lt, BinOp::Xor] {
        kernels.push(binary_map(op, DType::I32));
    }
    kernels.push(binary_map(BinOp::And, DType::Bool));
    kernels.push(binary_map(BinOp::Pow, DType::BF16));
    for kernel in &kernels {
        accepts(kernel);
    }
}

#[test]
fn errors_name_the_kernel_and_the_statement() {
    let kernel = kernel_with(|fx| {
        vec![
            Stmt::assign(fx.i, Expr::i32(0)),
            Stmt::if_then(
                Expr::thread_idx().lt(Expr::i32(32)),
                vec![Stmt::assign(fx.f, Expr::f32(1.0)), Stmt::Barrier],
            ),
        ]
    });
    let error = verify_kernel(&kernel).unwrap_err();
    assert_eq!(
        error.to_string(),
        "kernel `k`, statement body[1].then[1] `barrier`: \
         a barrier under control flow that is not block-uniform"
    );
    let nested = kernel_with(|fx| {
        vec![Stmt::for_range(
            fx.l,
            Expr::i64(0),
            fx.n.clone(),
            Expr::i64(1),
            vec![Stmt::store(fx.out, fx.l, Expr::i32(1))],
        )]
    });
    assert_eq!(
        verify_kernel(&nested).unwrap_err().to_string(),
        "kernel `k`, statement body[0].body[0] `out[l] = 1`: \
         stores a i32 value, but the buffer's elements are stored from f32"
    );
}

#[test]
fn header_invariants() {
    let with = |edit: &dyn Fn(&mut Kernel)| {
        let mut kernel = kernel_with(|_| Vec::new());
        edit(&mut kernel);
        kernel
    };
    for bad in ["", "9lives", "has space", "dash-name", "_", "$", "%r1", "π"] {
        rejects(
            &with(&|k| k.name = bad.to_string()),
            "is not a PTX identifier",
        );
    }
    for good in ["k", "rms_norm_bf16", "_k1", "$tmp", "A$b_9"] {
        accepts(&with(&|k| k.name = good.to_string()));
    }
    for bad in [0, 16, 48, 1056, 2048] {
        rejects(
            &with(&|k| k.block_dim = bad),
            "is not a multiple of 32 in 32..=1024",
        );
    }
    for good in [32, 96, 1024] {
        accepts(&with(&|k| k.block_dim = good));
    }
    // The test kernel has 64 threads: 24 blocks fill 1536 threads, 25 do not.
    for good in [1, 2, 24] {
        accepts(&with(&|k| k.blocks_per_sm = good));
    }
    for bad in [0, 25, 64] {
        rejects(&with(&|k| k.blocks_per_sm = bad), "threads an SM");
    }
    rejects(
        &with(&|k| k.shared[0].len = 0),
        "shared array `tile` has no elements",
    );
    rejects(
        &with(&|k| {
            k.shared.push(Shared {
                name: "big".to_string(),
                dtype: DType::F32,
                len: 227 * 256,
            })
        }),
        "more than the 232448 a block of any target may use",
    );
    // Beyond the static 48 KiB: the dynamic window (the PTX emitter checks each target).
    accepts(&with(&|k| {
        k.shared.push(Shared {
            name: "dynamic".to_string(),
            dtype: DType::F32,
            len: 12 * 1024,
        })
    }));
    accepts(&with(&|k| {
        k.shared.push(Shared {
            name: "fits".to_string(),
            dtype: DType::F32,
            len: 12 * 1024 - 64,
        })
    }));
}

#[test]
fn registers_parameters_and_specials_must_exist() {
    rejects_expr(
        |_| Expr::var(VarId(99)),
        Ty::F32,
        "register %99 is not declared",
    );
    rejects_body(
        |_| vec![Stmt::assign(VarId(7), Expr::f32(0.0))],
        "register %7 is not declared (the kernel has 5)",
    );
    rejects_expr(|_| Expr::param(0), Ty::F32, "is a buffer, read as a scalar");
    rejects_expr(
        |_| Expr::param(9),
        Ty::I64,
        "scalar parameter 9 does not exist",
    );
    rejects_expr(
        |_| Expr::Special(Special::BlockIdx(3)),
        Ty::I32,
        "block index axis 3 is not 0, 1 or 2",
    );
    rejects_expr(
        |_| Expr::lane_id(),
        Ty::I64,
        "assigns a i32 value to l of type i64",
    );
}

#[test]
fn unary_operand_types() {
    rejects_expr(
        |_| Expr::i32(1).apply(UnOp::Exp),
        Ty::I32,
        "exp does not take a i32",
    );
    rejects_expr(
        |fx| Expr::var(fx.f).apply(UnOp::Not),
        Ty::F32,
        "not does not take a f32",
    );
    rejects_expr(|fx| -Expr::var(fx.p), Ty::Pred, "neg does not take a pred");
    rejects_expr(
        |fx| Expr::var(fx.p).apply(UnOp::Abs),
        Ty::Pred,
        "abs does not take a pred",
    );
}

#[test]
fn binary_operand_types() {
    rejects_expr(
        |fx| Expr::var(fx.f) + Expr::i32(1),
        Ty::F32,
        "`+` has operands of two types, f32 and i32",
    );
    rejects_expr(
        |_| Expr::i32(2).pow(Expr::i32(3)),
        Ty::I32,
        "`pow` does not take i32",
    );
    rejects_expr(
        |fx| Expr::var(fx.f) & fx.g,
        Ty::F32,
        "`&` does not take f32",
    );
    rejects_expr(
        |fx| Expr::var(fx.f) << fx.g,
        Ty::F32,
        "`<<` does not take f32",
    );
    rejects_expr(
        |fx| Expr::var(fx.p) << fx.p,
        Ty::Pred,
        "`<<` does not take pred",
    );
    rejects_expr(
        |fx| Expr::var(fx.p).lt(fx.p),
        Ty::Pred,
        "`<` does not take pred",
    );
    rejects_expr(
        |fx| Expr::var(fx.p) + fx.p,
        Ty::Pred,
        "`+` does not take pred",
    );
    // A comparison gives a pred, not its operands' type.
    rejects_expr(
        |fx| Expr::var(fx.f).lt(fx.g),
        Ty::F32,
        "assigns a pred value to f of type f32",
    );
    accepts(&kernel_with(|fx| {
        vec![
            Stmt::assign(fx.p, Expr::var(fx.p).equals(fx.p) ^ Expr::var(fx.p)),
            Stmt::assign(fx.i, (Expr::i32(1) << Expr::i32(3)) | Expr::i32(5)),
            Stmt::assign(fx.p, Expr::var(fx.f).not_equals(fx.g)),
        ]
    }));
}

#[test]
fn fma_select_cast_and_load_types() {
    rejects_expr(
        |fx| Expr::fma(fx.f, fx.g, Expr::i32(1)),
        Ty::F32,
        "fma takes three operands of one numeric type, not f32, f32, i32",
    );
    rejects_expr(
        |fx| Expr::fma(fx.p, fx.p, fx.p),
        Ty::Pred,
        "fma takes three operands of one numeric type",
    );
    rejects_expr(
        |fx| Expr::select(fx.i, fx.f, fx.g),
        Ty::F32,
        "select's condition is i32, not pred",
    );
    rejects_expr(
        |fx| Expr::select(fx.p, fx.f, fx.i),
        Ty::F32,
        "select's arms are f32 and i32",
    );
    // Cast goes from any type to any type.
    accepts(&kernel_with(|fx| {
        vec![
            Stmt::assign(fx.p, Expr::var(fx.f).cast(Ty::Pred)),
            Stmt::assign(fx.l, Expr::var(fx.p).cast(Ty::I64)),
            Stmt::assign(fx.f, Expr::var(fx.l).cast(Ty::F32)),
            Stmt::assign(fx.i, Expr::var(fx.f).cast(Ty::I32)),
        ]
    }));
    rejects_expr(
        |fx| Expr::load(fx.inp, fx.f),
        Ty::F32,
        "the index is f32, not i32 or i64",
    );
    rejects_expr(
        |fx| Expr::load(fx.both, Expr::i32(0)),
        Ty::F32,
        "assigns a i32 value to f of type f32",
    );
}

#[test]
fn memory_operands_and_access_modes() {
    rejects_expr(
        |fx| Expr::load(fx.out, Expr::i32(0)),
        Ty::F32,
        "reads buffer `out`, whose access is Write",
    );
    rejects_body(
        |fx| vec![Stmt::store(fx.inp, Expr::i32(0), Expr::f32(1.0))],
        "writes buffer `inp`, whose access is Read",
    );
    rejects_expr(
        |_| Expr::load(Buf::Global(3), Expr::i32(0)),
        Ty::I64,
        "parameter 3 (`n`) is a scalar, not a buffer",
    );
    rejects_expr(
        |_| Expr::load(Buf::Global(8), Expr::i32(0)),
        Ty::F32,
        "global buffer 8 is not a parameter",
    );
    rejects_expr(
        |_| Expr::load(Buf::Shared(1), Expr::i32(0)),
        Ty::F32,
        "shared array 1 is not declared",
    );
    accepts(&kernel_with(|fx| {
        vec![
            Stmt::store(fx.both, Expr::i32(1), Expr::load(fx.both, Expr::i64(0))),
            Stmt::store(
                fx.tile,
                Expr::thread_idx(),
                Expr::load(fx.inp, Expr::thread_idx()),
            ),
        ]
    }));
}

#[test]
fn vector_access_rules() {
    let load_vec = |dsts: Vec<VarId>, buf: Buf| Stmt::LoadVec {
        dsts,
        buf,
        index: Expr::i32(0),
    };
    rejects_body(
        |fx| vec![load_vec(vec![fx.f, fx.g, fx.f], fx.inp)],
        "a vector of 3 f32 elements (12 bytes)",
    );
    rejects_body(
        |fx| vec![load_vec(vec![fx.f; 8], fx.inp)],
        "a vector of 8 f32 elements (32 bytes)",
    );
    rejects_body(
        |fx| vec![load_vec(vec![fx.f, fx.f], fx.inp)],
        "f is a destination twice",
    );
    rejects_body(
        |fx| vec![load_vec(vec![fx.f, fx.i], fx.inp)],
        "destination i is i32, but the buffer's elements load as f32",
    );
    rejects_body(
        |fx| vec![load_vec(vec![fx.f, fx.g], fx.out)],
        "reads buffer `out`",
    );
    rejects_body(
        |fx| {
            vec![Stmt::LoadVec {
                dsts: vec![fx.f, fx.g],
                buf: fx.inp,
                index: Expr::f32(0.0),
            }]
        },
        "the index is f32",
    );
    rejects_body(
        |fx| {
            vec![Stmt::StoreVec {
                buf: fx.out,
                index: Expr::i32(0),
                values: vec![Expr::var(fx.f), Expr::var(fx.i)],
            }]
        },
        "stores a i32 value",
    );
    rejects_body(
        |fx| {
            vec![Stmt::StoreVec {
                buf: fx.out,
                index: Expr::i32(0),
                values: vec![Expr::f32(0.0)],
            }]
        },
        "a vector of 1 f32 elements",
    );
    accepts(&kernel_with(|fx| {
        vec![
            load_vec(vec![fx.f, fx.g], fx.tile),
            Stmt::StoreVec {
                buf: fx.out,
                index: Expr::i64(4),
                values: vec![
                    Expr::var(fx.f),
                    Expr::var(fx.g),
                    Expr::f32(0.0),
                    Expr::f32(1.0),
                ],
            },
        ]
    }));
}

#[test]
fn store_and_assign_types() {
    rejects_body(
        |fx| vec![Stmt::store(fx.both, Expr::i32(0), Expr::f32(1.0))],
        "stores a f32 value, but the buffer's elements are stored from i32",
    );
    rejects_body(
        |fx| vec![Stmt::store(fx.out, Expr::pred(true), Expr::f32(1.0))],
        "the index is pred",
    );
    rejects_body(
        |fx| vec![Stmt::assign(fx.i, Expr::i64(1))],
        "assigns a i64 value to i of type i32",
    );
}

#[test]
fn loop_rules() {
    let simple_loop = |var: VarId, start: Expr, end: Expr, step: Expr, body: Vec<Stmt>| Stmt::For {
        var,
        start,
        end,
        step,
        body,
    };
    rejects_body(
        |fx| {
            vec![simple_loop(
                fx.f,
                Expr::f32(0.0),
                Expr::f32(1.0),
                Expr::f32(0.5),
                vec![],
            )]
        },
        "the loop register f is f32, not an integer",
    );
    rejects_body(
        |fx| {
            vec![simple_loop(
                fx.i,
                Expr::i32(0),
                fx.n.clone(),
                Expr::i32(1),
                vec![],
            )]
        },
        "the loop's end is i64, but its register is i32",
    );
    rejects_body(
        |fx| {
            vec![simple_loop(
                fx.l,
                Expr::i64(0),
                fx.n.clone(),
                Expr::i64(0),
                vec![],
            )]
        },
        "the loop's step is not positive",
    );
    rejects_body(
        |fx| {
            vec![simple_loop(
                fx.i,
                Expr::i32(0),
                Expr::i32(9),
                Expr::i32(-1),
                vec![],
            )]
        },
        "the loop's step is not positive",
    );
    rejects_body(
        |fx| {
            vec![simple_loop(
                fx.i,
                Expr::i32(0),
                Expr::i32(9),
                Expr::i32(1),
                vec![Stmt::assign(fx.i, Expr::var(fx.i) + Expr::i32(1))],
            )]
        },
        "the body writes i, which the loop's register, end or step depends on",
    );
    rejects_body(
        |fx| {
            vec![simple_loop(
                fx.l,
                Expr::i64(0),
                (Expr::load(fx.both, Expr::i32(0)) + fx.i).cast(Ty::I64),
                Expr::i64(1),
                vec![Stmt::assign(fx.i, Expr::i32(0))],
            )]
        },
        "the body writes i",
    );
    rejects_body(
        |fx| {
            vec![simple_loop(
                fx.l,
                Expr::i64(0),
                Expr::i64(10),
                Expr::var(fx.i).cast(Ty::I64),
                vec![Stmt::if_then(
                    Expr::pred(true),
                    vec![Stmt::LoadVec {
                        dsts: vec![fx.i, fx.i],
                        buf: fx.both,
                        index: Expr::i32(0),
                    }],
                )],
            )]
        },
        "depends on",
    );
    // The start may be recomputed by the body: it is evaluated once, before the loop.
    accepts(&kernel_with(|fx| {
        vec![simple_loop(
            fx.l,
            Expr::var(fx.i).cast(Ty::I64),
            fx.n.clone(),
            Expr::i64(2),
            vec![Stmt::assign(fx.i, Expr::i32(0))],
        )]
    }));
}

#[test]
fn if_and_shuffle_rules() {
    rejects_body(
        |fx| vec![Stmt::if_then(Expr::var(fx.i), vec![])],
        "the condition is i32, not pred",
    );
    rejects_body(
        |fx| {
            vec![Stmt::ShuffleXor {
                dst: fx.f,
                src: fx.i,
                mask: 1,
            }]
        },
        "shuffles a i32 register into a f32 one",
    );
    rejects_body(
        |fx| {
            vec![Stmt::ShuffleXor {
                dst: fx.f,
                src: fx.g,
                mask: 32,
            }]
        },
        "lane mask 32 is not below 32",
    );
}

/// `stmt` nested under an `If` on `cond`.
fn under_if(cond: Expr, stmt: Stmt) -> Vec<Stmt> {
    vec![Stmt::if_then(cond, vec![stmt])]
}

#[test]
fn barriers_need_block_uniform_control_flow() {
    let not_uniform = "a barrier under control flow that is not block-uniform";
    // Thread-dependent conditions.
    for cond in [
        Expr::thread_idx().lt(Expr::i32(32)),
        Expr::lane_id().equals(Expr::i32(0)),
        Expr::warp_id().equals(Expr::i32(1)),
    ] {
        rejects_body(|_| under_if(cond, Stmt::Barrier), not_uniform);
    }
    // In the else branch too, and in nested uniform code under a divergent branch.
    rejects_body(
        |_| {
            vec![Stmt::if_else(
                Expr::thread_idx().lt(Expr::i32(7)),
                vec![],
                under_if(Expr::block_idx(0).equals(Expr::i32(0)), Stmt::Barrier),
            )]
        },
        not_uniform,
    );
    // Block-uniform conditions.
    for cond in [
        Expr::block_idx(0).equals(Expr::i32(0)),
        Expr::block_idx(2).gt(Expr::block_dim()),
        Expr::param(3).lt(Expr::i64(100)),
        Expr::load(Buf::Global(0), Expr::block_idx(1)).gt(Expr::f32(0.0)),
    ] {
        accepts(&kernel_with(|_| under_if(cond, Stmt::Barrier)));
    }
    // Memory that threads may see differently: shared memory, and buffers the kernel writes.
    rejects_body(
        |fx| {
            under_if(
                Expr::load(fx.tile, Expr::i32(0)).gt(Expr::f32(0.0)),
                Stmt::Barrier,
            )
        },
        not_uniform,
    );
    rejects_body(
        |fx| {
            let mut body = under_if(
                Expr::load(fx.both, Expr::i32(0)).gt(Expr::i32(0)),
                Stmt::Barrier,
            );
            body.push(Stmt::store(fx.both, Expr::thread_idx(), Expr::i32(1)));
            body
        },
        not_uniform,
    );
    // Loops: thread-dependent bounds make the body divergent; uniform bounds do not.
    rejects_body(
        |fx| {
            vec![Stmt::for_range(
                fx.i,
                Expr::thread_idx(),
                Expr::i32(64),
                Expr::i32(32),
                vec![Stmt::Barrier],
            )]
        },
        not_uniform,
    );
    accepts(&kernel_with(|fx| {
        vec![Stmt::for_range(
            fx.l,
            Expr::i64(0),
            fx.n.clone(),
            Expr::i64(1),
            vec![
                Stmt::store(fx.tile, Expr::thread_idx(), Expr::f32(0.0)),
                Stmt::Barrier,
                Stmt::if_then(Expr::var(fx.l).lt(Expr::i64(4)), vec![Stmt::Barrier]),
            ],
        )]
    }));
}

#[test]
fn uniformity_follows_registers_to_a_fixed_point() {
    // `i` is set uniformly first, but a later (flow-insensitive) write makes it
    // thread-dependent; `l` copies `i` before that write, and the barrier depends on `l`.
    let kernel = kernel_with(|fx| {
        vec![
            Stmt::assign(fx.i, Expr::block_idx(0)),
            Stmt::assign(fx.l, Expr::var(fx.i).cast(Ty::I64)),
            Stmt::if_then(Expr::var(fx.l).gt(Expr::i64(0)), vec![Stmt::Barrier]),
            Stmt::assign(fx.i, Expr::thread_idx()),
        ]
    });
    rejects(
        &kernel,
        "a barrier under control flow that is not block-uniform",
    );
    let analysis = uniformity(&kernel);
    let fx = fixture();
    assert!(!analysis.is_uniform_var(fx.i));
    assert!(!analysis.is_uniform_var(fx.l));
    assert!(analysis.is_uniform_var(fx.f), "never written: always 0");

    // A uniform value assigned under divergent control flow is not uniform.
    let kernel = kernel_with(|fx| {
        vec![
            Stmt::if_then(
                Expr::thread_idx().equals(Expr::i32(0)),
                vec![Stmt::assign(fx.i, Expr::i32(5))],
            ),
            Stmt::if_then(Expr::var(fx.i).equals(Expr::i32(5)), vec![Stmt::Barrier]),
        ]
    });
    rejects(&kernel, "not block-uniform");

    // Loop registers: uniform with uniform bounds, not otherwise.
    let kernel = kernel_with(|fx| {
        vec![
            Stmt::for_range(fx.l, Expr::i64(0), fx.n.clone(), Expr::i64(1), vec![]),
            Stmt::for_range(
                fx.i,
                Expr::lane_id(),
                Expr::i32(32),
                Expr::i32(32),
                vec![Stmt::assign(fx.f, Expr::f32(1.0))],
            ),
        ]
    });
    let analysis = uniformity(&kernel);
    assert!(analysis.is_uniform_var(fx.l));
    assert!(!analysis.is_uniform_var(fx.i));
    assert!(
        !analysis.is_uniform_var(fx.f),
        "written in a divergent loop"
    );

    // Shuffles and vector loads keep uniform values uniform; loads from a buffer that the
    // kernel stores to do not.
    let kernel = kernel_with(|fx| {
        vec![
            Stmt::assign(fx.f, Expr::load(fx.inp, Expr::block_idx(0))),
            Stmt::ShuffleXor {
                dst: fx.g,
                src: fx.f,
                mask: 3,
            },
            Stmt::assign(fx.i, Expr::load(fx.both, Expr::i32(0))),
        ]
    });
    let analysis = uniformity(&kernel);
    assert!(analysis.is_uniform_var(fx.g));
    assert!(
        analysis.is_uniform_var(fx.i),
        "the kernel never stores to `both`"
    );
    let kernel = kernel_with(|fx| {
        vec![
            Stmt::LoadVec {
                dsts: vec![fx.f, fx.g],
                buf: fx.inp,
                index: Expr::i32(0),
            },
            Stmt::assign(fx.i, Expr::load(fx.both, Expr::i32(0))),
            Stmt::store(fx.both, Expr::i32(1), Expr::i32(0)),
        ]
    });
    let analysis = uniformity(&kernel);
    assert!(analysis.is_uniform_var(fx.f) && analysis.is_uniform_var(fx.g));
    assert!(
        !analysis.is_uniform_var(fx.i),
        "loaded from a buffer the kernel writes"
    );
}

#[test]
fn the_rms_norm_registers() {
    let kernel = rms_norm_rows(DType::BF16, 1024, 256);
    let analysis = uniformity(&kernel);
    let uniform: Vec<(&str, bool)> = kernel
        .vars
        .iter()
        .enumerate()
        .map(|(id, var)| (var.name.as_str(), analysis.is_uniform_var(VarId(id as u32))))
        .collect();
    assert_eq!(
        uniform,
        [
            ("row_base", true),
            ("col", false),
            ("value", false),
            ("sum_sq", false),
            ("partner", false),
            ("total", false),
            ("inv_rms", false),
        ]
    );
}

#[test]
fn shuffles_need_block_uniform_control_flow() {
    let shuffle = |fx: &Fixture| Stmt::ShuffleXor {
        dst: fx.f,
        src: fx.g,
        mask: 16,
    };
    rejects_body(
        |fx| under_if(Expr::lane_id().lt(Expr::i32(16)), shuffle(fx)),
        "a warp shuffle under control flow that is not block-uniform",
    );
    // Even a condition that is uniform within each warp: the verifier asks for the block.
    rejects_body(
        |fx| under_if(Expr::warp_id().equals(Expr::i32(0)), shuffle(fx)),
        "a warp shuffle under control flow that is not block-uniform",
    );
    accepts(&kernel_with(|fx| {
        under_if(Expr::block_idx(0).lt(Expr::i32(16)), shuffle(fx))
    }));
}
