//! Hand-written kernels for what the examples do not reach (block-level loops and branches
//! around barriers, registers carried across barriers, vector accesses, narrow stores, 3-D
//! grids) and for the errors: out-of-bounds and misaligned accesses, undefined arithmetic,
//! invalid kernels and bad launches. Each kernel runs through the Cranelift backend and the
//! reference interpreter.

mod common;

use common::{check, floats_as, random_buffer, run_native, Arg, Rng, Tolerance};
use kiln_cpu::{CpuError, CpuKernel, FaultBuffer, KernelArg};
use kiln_ir::DType;
use kiln_kir::{Access, BinOp, Const, Expr, KernelBuilder, SizeExpr, Stmt, Ty, UnOp};

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    floats_as(DType::F32, values)
}

/// `y = A x` with `A: f32[rows, cols]`, one row per thread, `x` staged through shared
/// memory one 64-element tile at a time: a uniform `For` whose body is split by two
/// barriers, with a per-thread loop (whose trip count depends on the tile) inside.
fn tiled_matvec(rows: i64, cols: i64) -> kiln_kir::Kernel {
    let tile = 64;
    let mut k = KernelBuilder::new("tiled_matvec", tile);
    k.grid([
        SizeExpr::Const((rows as u64).div_ceil(u64::from(tile))),
        SizeExpr::Const(1),
        SizeExpr::Const(1),
    ]);
    let a = k.buffer("a", DType::F32, Access::Read);
    let x = k.buffer("x", DType::F32, Access::Read);
    let y = k.buffer("y", DType::F32, Access::Write);
    let xs = k.shared("xs", DType::F32, tile);
    let row = k.var("row", Ty::I64);
    let k0 = k.var("k0", Ty::I64);
    let j = k.var("j", Ty::I64);
    let acc = k.var("acc", Ty::F32);
    let t64 = || Expr::thread_idx().cast(Ty::I64);
    let tile64 = Expr::i64(i64::from(tile));
    k.finish(vec![
        Stmt::assign(
            row,
            Expr::block_idx(0).cast(Ty::I64) * tile64.clone() + t64(),
        ),
        Stmt::assign(acc, Expr::f32(0.0)),
        Stmt::for_range(
            k0,
            Expr::i64(0),
            Expr::i64(cols),
            tile64.clone(),
            vec![
                Stmt::if_else(
                    (Expr::var(k0) + t64()).lt(Expr::i64(cols)),
                    vec![Stmt::store(xs, t64(), Expr::load(x, Expr::var(k0) + t64()))],
                    vec![Stmt::store(xs, t64(), Expr::f32(0.0))],
                ),
                Stmt::Barrier,
                Stmt::if_then(
                    Expr::var(row).lt(Expr::i64(rows)),
                    vec![Stmt::for_range(
                        j,
                        Expr::i64(0),
                        tile64.clone().min(Expr::i64(cols) - k0),
                        Expr::i64(1),
                        vec![Stmt::assign(
                            acc,
                            Expr::fma(
                                Expr::load(a, Expr::var(row) * Expr::i64(cols) + k0 + j),
                                Expr::load(xs, j),
                                acc,
                            ),
                        )],
                    )],
                ),
                Stmt::Barrier,
            ],
        ),
        Stmt::if_then(
            Expr::var(row).lt(Expr::i64(rows)),
            vec![Stmt::store(y, row, acc)],
        ),
    ])
}

#[test]
fn tiled_loop_with_shared_memory_and_barriers_in_a_uniform_for() {
    let mut rng = Rng::new(20);
    for (rows, cols) in [(64, 64), (100, 130), (5, 1), (200, 257)] {
        let kernel = tiled_matvec(rows, cols);
        let a = random_buffer(&mut rng, DType::F32, (rows * cols) as usize);
        let x = random_buffer(&mut rng, DType::F32, cols as usize);
        let args = [
            Arg::Buffer(a.clone()),
            Arg::Buffer(x.clone()),
            Arg::Buffer(vec![0; rows as usize * 4]),
        ];
        let grid = [(rows as u64).div_ceil(64), 1, 1];
        check(&kernel, grid, &args, Tolerance::Exact);

        // And against the plain product, computed the same way (fma in column order).
        let out = run_native(&kernel, grid, &args).expect("runs");
        let (a, x) = (common::f32_values(&a), common::f32_values(&x));
        let y = common::f32_values(&out[2]);
        for r in 0..rows as usize {
            let mut expected = 0f32;
            for c in 0..cols as usize {
                expected = a[r * cols as usize + c].mul_add(x[c], expected);
            }
            assert_eq!(y[r].to_bits(), expected.to_bits(), "row {r}");
        }
    }
}

#[test]
fn registers_carried_across_iterations_of_a_block_level_loop() {
    // `count` is touched by one thread loop only, but that loop runs once per iteration of
    // a uniform `For` split by a barrier, so it must keep its value between iterations.
    let mut k = KernelBuilder::new("carried_count", 64);
    let out = k.buffer("out", DType::I32, Access::Write);
    let marks = k.buffer("marks", DType::I32, Access::Write);
    let trips = k.scalar("trips", Ty::I32);
    let count = k.var("count", Ty::I32);
    let flag = k.var("flag", Ty::Pred);
    let i = k.var("i", Ty::I32);
    let kernel = k.finish(vec![
        Stmt::assign(
            flag,
            (Expr::thread_idx() % Expr::i32(3)).equals(Expr::i32(0)),
        ),
        Stmt::for_range(
            i,
            Expr::i32(0),
            trips,
            Expr::i32(1),
            vec![
                Stmt::assign(count, Expr::var(count) + Expr::thread_idx() + i),
                Stmt::store(out, Expr::thread_idx(), count),
                Stmt::Barrier,
            ],
        ),
        // A predicate carried over the loop's barriers.
        Stmt::if_then(
            Expr::var(flag),
            vec![Stmt::store(marks, Expr::thread_idx(), Expr::i32(1))],
        ),
    ]);
    for trips in [0, 1, 5] {
        let args = [
            Arg::Buffer(vec![0; 64 * 4]),
            Arg::Buffer(vec![0; 64 * 4]),
            Arg::Scalar(Const::I32(trips)),
        ];
        check(&kernel, [2, 1, 1], &args, Tolerance::Exact);
    }
}

#[test]
fn uniform_branch_around_a_barrier_and_shuffles_of_every_type() {
    let mut k = KernelBuilder::new("uniform_branch", 64);
    let x = k.buffer("x", DType::I64, Access::Read);
    let out = k.buffer("out", DType::I64, Access::Write);
    let flags = k.buffer("flags", DType::Bool, Access::Write);
    let reverse = k.scalar("reverse", Ty::Pred);
    let staged = k.shared("staged", DType::I64, 64);
    let v = k.var("v", Ty::I64);
    let w = k.var("w", Ty::I64);
    let small = k.var("small", Ty::I32);
    let small_partner = k.var("small_partner", Ty::I32);
    let p = k.var("p", Ty::Pred);
    let q = k.var("q", Ty::Pred);
    let f = k.var("f", Ty::F32);
    let g = k.var("g", Ty::F32);
    let t = Expr::thread_idx;
    let kernel = k.finish(vec![
        Stmt::assign(v, Expr::load(x, t())),
        Stmt::if_else(
            reverse,
            vec![
                Stmt::store(staged, t(), v),
                Stmt::Barrier,
                Stmt::assign(v, Expr::load(staged, Expr::i32(63) - t())),
            ],
            vec![Stmt::assign(v, Expr::var(v) * Expr::i64(2))],
        ),
        Stmt::ShuffleXor {
            dst: w,
            src: v,
            mask: 5,
        },
        Stmt::assign(small, t() * Expr::i32(7)),
        Stmt::ShuffleXor {
            dst: small_partner,
            src: small,
            mask: 31,
        },
        Stmt::assign(p, (t() % Expr::i32(4)).equals(Expr::i32(1))),
        Stmt::ShuffleXor {
            dst: q,
            src: p,
            mask: 1,
        },
        Stmt::assign(f, t().cast(Ty::F32) * Expr::f32(0.5)),
        Stmt::ShuffleXor {
            dst: g,
            src: f,
            mask: 16,
        },
        Stmt::store(
            out,
            t(),
            Expr::var(w) * Expr::i64(1000)
                + Expr::var(small_partner).cast(Ty::I64)
                + Expr::var(g).cast(Ty::I64),
        ),
        Stmt::store(flags, t(), q),
    ]);
    let mut rng = Rng::new(21);
    for reverse in [false, true] {
        let args = [
            Arg::Buffer(random_buffer(&mut rng, DType::I64, 64)),
            Arg::Buffer(vec![0; 64 * 8]),
            Arg::Buffer(vec![0; 64]),
            Arg::Scalar(Const::Pred(reverse)),
        ];
        check(&kernel, [1, 1, 1], &args, Tolerance::Exact);
    }
}

#[test]
fn divergent_nested_branches_and_thread_dependent_loops() {
    let mut k = KernelBuilder::new("divergent_loops", 96);
    let x = k.buffer("x", DType::F32, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let i = k.var("i", Ty::I64);
    let j = k.var("j", Ty::I64);
    let m = k.var("m", Ty::I32);
    let acc = k.var("acc", Ty::F32);
    let t = Expr::thread_idx;
    let kernel = k.finish(vec![
        Stmt::assign(
            i,
            Expr::block_idx(0).cast(Ty::I64) * Expr::i64(96) + t().cast(Ty::I64),
        ),
        Stmt::if_then(
            Expr::var(i).lt(n.clone()),
            vec![
                Stmt::assign(acc, Expr::f32(1.0)),
                // A trip count of i % 7, and a nested loop of (m % 3) steps of 2.
                Stmt::for_range(
                    j,
                    Expr::i64(0),
                    Expr::var(i) % Expr::i64(7),
                    Expr::i64(1),
                    vec![
                        Stmt::assign(m, Expr::var(j).cast(Ty::I32) * Expr::i32(5)),
                        Stmt::if_else(
                            (Expr::var(m) & Expr::i32(1)).equals(Expr::i32(0)),
                            vec![Stmt::assign(
                                acc,
                                Expr::var(acc) * Expr::load(x, Expr::var(i)),
                            )],
                            vec![Stmt::if_else(
                                Expr::var(acc).gt(Expr::f32(0.0)),
                                vec![Stmt::assign(acc, Expr::var(acc).apply(UnOp::Sqrt))],
                                vec![Stmt::assign(acc, -Expr::var(acc))],
                            )],
                        ),
                    ],
                ),
                Stmt::store(out, i, acc),
            ],
        ),
    ]);
    let mut rng = Rng::new(22);
    for count in [1i64, 95, 96, 97, 500] {
        let args = [
            Arg::Buffer(random_buffer(&mut rng, DType::F32, count as usize)),
            Arg::Buffer(vec![0; count as usize * 4]),
            Arg::Scalar(Const::I64(count)),
        ];
        let grid = [(count as u64).div_ceil(96), 1, 1];
        check(&kernel, grid, &args, Tolerance::Exact);
    }
}

#[test]
fn vector_loads_and_stores_with_narrow_float_rounding() {
    // out (f8/bf16/f16, 8 or 4 lanes) = x (f32, 4 lanes at a time) * scale, rounded on store.
    let mut rng = Rng::new(23);
    for out_dtype in [DType::BF16, DType::F16, DType::F8E4M3, DType::F8E5M2] {
        let width = if out_dtype.size_bytes() == 1 { 8 } else { 4 };
        let mut k = KernelBuilder::new(format!("scale_to_{out_dtype}"), 32);
        let x = k.buffer("x", DType::F32, Access::Read);
        let out = k.buffer("out", out_dtype, Access::Write);
        let scale = k.scalar("scale", Ty::F32);
        let base = k.var("base", Ty::I64);
        let lanes: Vec<_> = (0..width)
            .map(|l| k.var(format!("x{l}"), Ty::F32))
            .collect();
        let mut loads = Vec::new();
        for half in 0..width / 4 {
            loads.push(Stmt::LoadVec {
                dsts: lanes[half * 4..half * 4 + 4].to_vec(),
                buf: x,
                index: Expr::var(base) + Expr::i64(half as i64 * 4),
            });
        }
        let mut body = vec![Stmt::assign(
            base,
            (Expr::block_idx(0) * Expr::i32(32) + Expr::thread_idx()).cast(Ty::I64)
                * Expr::i64(width as i64),
        )];
        body.extend(loads);
        body.push(Stmt::StoreVec {
            buf: out,
            index: Expr::var(base),
            values: lanes
                .iter()
                .map(|&lane| Expr::var(lane) * scale.clone())
                .collect(),
        });
        let kernel = k.finish(body);
        let n = 2 * 32 * width;
        let mut values: Vec<f32> = (0..n).map(|_| rng.f32_in(-100.0, 100.0)).collect();
        // Ties, saturation, NaN, subnormals of each format.
        values[..10].copy_from_slice(&[
            1.0625,
            1.1875,
            500.0,
            -1e6,
            f32::NAN,
            f32::INFINITY,
            2f32.powi(-10),
            1.0 + 2f32.powi(-8),
            65520.0,
            -0.0,
        ]);
        let args = [
            Arg::Buffer(f32_bytes(&values)),
            Arg::Buffer(vec![0; n * out_dtype.size_bytes()]),
            Arg::Scalar(Const::F32(1.0)),
        ];
        check(&kernel, [2, 1, 1], &args, Tolerance::Exact);
        let args = [
            Arg::Buffer(f32_bytes(&values)),
            Arg::Buffer(vec![0; n * out_dtype.size_bytes()]),
            Arg::Scalar(Const::F32(3.3)),
        ];
        check(&kernel, [2, 1, 1], &args, Tolerance::Exact);
    }
}

#[test]
fn raw_pair_loads_copy_the_bits_of_16_bit_elements() {
    // `LoadVec` of I32 registers from bf16/f16 memory: two elements' bits a register, in
    // both the interpreter and Cranelift (NaN payloads and subnormals pass unchanged).
    let mut rng = Rng::new(29);
    for dtype in [DType::BF16, DType::F16] {
        for words in [1, 2, 4] {
            let kernel = kiln_kir::examples::raw_pairs_copy(dtype, words);
            let blocks = 3u64;
            let mut x: Vec<u8> = (0..blocks as usize * 64 * words * 2)
                .map(|_| rng.f32_in(0.0, 256.0) as u8)
                .collect();
            x[..8].copy_from_slice(&[0x01, 0x7f, 0xc1, 0xff, 0x01, 0x00, 0x00, 0x80]);
            let args = [
                Arg::Buffer(x.clone()),
                Arg::Buffer(vec![0; blocks as usize * 32 * words * 4]),
            ];
            check(&kernel, [blocks, 1, 1], &args, Tolerance::Exact);
            let native = run_native(&kernel, [blocks, 1, 1], &args).unwrap();
            assert_eq!(native[1], x, "{}", kernel.name);
            let interpreted = common::run_interpreter(&kernel, [blocks, 1, 1], &args);
            assert_eq!(interpreted[1], x, "{}", kernel.name);
        }
    }
}

#[test]
fn three_dimensional_grid_with_min_max_and_casts() {
    let mut k = KernelBuilder::new("grid_3d", 32);
    let out = k.buffer("out", DType::I32, Access::Write);
    let fl = k.buffer("fl", DType::F32, Access::Write);
    let linear = k.var("linear", Ty::I32);
    let t = Expr::thread_idx;
    let kernel = k.finish(vec![
        Stmt::assign(
            linear,
            ((Expr::block_idx(2) * Expr::i32(3) + Expr::block_idx(1)) * Expr::i32(4)
                + Expr::block_idx(0))
                * Expr::i32(32)
                + t(),
        ),
        Stmt::store(
            out,
            linear,
            (Expr::var(linear) * Expr::i32(7))
                .min(Expr::i32(500))
                .max(Expr::warp_id() + Expr::lane_id()),
        ),
        Stmt::store(
            fl,
            linear,
            (Expr::var(linear).cast(Ty::F32) * Expr::f32(-0.37))
                .apply(UnOp::Floor)
                .min(Expr::f32(3.5))
                .max(Expr::f32(-20.25)),
        ),
    ]);
    let n = 4 * 3 * 2 * 32;
    let args = [Arg::Buffer(vec![0; n * 4]), Arg::Buffer(vec![0; n * 4])];
    check(&kernel, [4, 3, 2], &args, Tolerance::Exact);
}

/// `out[t] = x[t + offset]` over one block of 32: faults when `offset` pushes past `x`.
fn shifted_copy() -> kiln_kir::Kernel {
    let mut k = KernelBuilder::new("shifted_copy", 32);
    let x = k.buffer("x", DType::F32, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let offset = k.scalar("offset", Ty::I32);
    k.finish(vec![Stmt::store(
        out,
        Expr::thread_idx() + Expr::block_idx(0) * Expr::i32(32),
        Expr::load(x, Expr::thread_idx() + offset),
    )])
}

#[test]
fn an_out_of_bounds_load_is_an_error_naming_the_buffer_block_and_thread() {
    let kernel = shifted_copy();
    let args = [
        Arg::Buffer(vec![0; 40 * 4]),
        Arg::Buffer(vec![0; 32 * 4]),
        Arg::Scalar(Const::I32(9)),
    ];
    match run_native(&kernel, [1, 1, 1], &args) {
        Err(CpuError::OutOfBounds {
            kernel,
            buffer,
            index,
            len,
            block,
            thread,
            width,
        }) => {
            assert_eq!(kernel, "shifted_copy");
            assert_eq!(
                buffer,
                FaultBuffer::Global {
                    param: 0,
                    name: "x".to_string()
                }
            );
            assert_eq!(
                (index, len, block, thread, width),
                (40, 40, [0, 0, 0], 31, 1)
            );
        }
        other => panic!("expected an out-of-bounds error, got {other:?}"),
    }
    // Negative indices too.
    let args = [
        Arg::Buffer(vec![0; 40 * 4]),
        Arg::Buffer(vec![0; 32 * 4]),
        Arg::Scalar(Const::I32(-1)),
    ];
    let error = run_native(&kernel, [1, 1, 1], &args).expect_err("index -1");
    assert!(
        matches!(
            error,
            CpuError::OutOfBounds {
                index: -1,
                thread: 0,
                ..
            }
        ),
        "{error}"
    );
    // A store past the end in the second block (the first block's stores happened).
    let args = [
        Arg::Buffer(vec![0; 40 * 4]),
        Arg::Buffer(vec![0; 40 * 4]),
        Arg::Scalar(Const::I32(0)),
    ];
    let error = run_native(&kernel, [2, 1, 1], &args).expect_err("store past the end");
    assert!(
        matches!(
            &error,
            CpuError::OutOfBounds {
                index: 40,
                len: 40,
                block: [1, 0, 0],
                thread: 8,
                buffer: FaultBuffer::Global { param: 1, .. },
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("buffer `out`"), "{error}");
}

#[test]
fn shared_memory_overruns_misaligned_vectors_and_undefined_arithmetic_are_errors() {
    let mut k = KernelBuilder::new("faults", 32);
    let x = k.buffer("x", DType::I32, Access::ReadWrite);
    let mode = k.scalar("mode", Ty::I32);
    let s = k.shared("s", DType::I32, 32);
    let lanes: Vec<_> = (0..4).map(|l| k.var(format!("v{l}"), Ty::I32)).collect();
    let i = k.var("i", Ty::I32);
    let t = Expr::thread_idx;
    let when = |m: i32, body: Vec<Stmt>| Stmt::if_then(mode.clone().equals(Expr::i32(m)), body);
    let kernel = k.finish(vec![
        when(0, vec![Stmt::store(s, t() + Expr::i32(1), t())]),
        when(
            1,
            vec![Stmt::LoadVec {
                dsts: lanes.clone(),
                buf: x,
                index: t() * Expr::i32(4) + Expr::i32(2),
            }],
        ),
        when(
            2,
            vec![Stmt::store(x, t(), Expr::i32(100) / (t() - Expr::i32(3)))],
        ),
        when(
            3,
            vec![Stmt::for_range(
                i,
                Expr::i32(0),
                Expr::i32(10),
                Expr::i32(5) - t(),
                vec![],
            )],
        ),
        when(
            4,
            vec![Stmt::for_range(
                i,
                Expr::i32(i32::MAX - 10),
                Expr::i32(i32::MAX),
                Expr::i32(7),
                vec![],
            )],
        ),
    ]);
    let compiled = CpuKernel::compile(&kernel).expect("compiles");
    let run = |mode: i32| {
        let mut memory = vec![0u8; 32 * 4 * 4];
        let mut args = [KernelArg::Buffer(&mut memory), KernelArg::I32(mode)];
        compiled.launch([1, 1, 1], &mut args)
    };
    let error = run(0).expect_err("shared overrun");
    assert!(
        matches!(
            &error,
            CpuError::OutOfBounds {
                index: 32,
                len: 32,
                thread: 31,
                buffer: FaultBuffer::Shared { array: 0, .. },
                ..
            }
        ),
        "{error}"
    );
    let error = run(1).expect_err("misaligned");
    assert!(
        matches!(
            &error,
            CpuError::Misaligned {
                index: 2,
                width: 4,
                thread: 0,
                ..
            }
        ),
        "{error}"
    );
    let error = run(2).expect_err("division by zero");
    assert!(
        matches!(&error, CpuError::KernelFault { thread: 3, .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("division of 100 by zero"),
        "{error}"
    );
    let error = run(3).expect_err("zero step");
    assert!(
        matches!(&error, CpuError::KernelFault { thread: 5, .. }),
        "{error}"
    );
    let error = run(4).expect_err("overflow");
    assert!(error.to_string().contains("overflows"), "{error}");
    run(5).expect("no fault without a faulting mode");
}

#[test]
fn invalid_kernels_and_bad_launches_are_errors() {
    // A barrier under thread-dependent control flow.
    let k = KernelBuilder::new("divergent_barrier", 32);
    let kernel = k.finish(vec![Stmt::if_then(
        Expr::thread_idx().lt(Expr::i32(3)),
        vec![Stmt::Barrier],
    )]);
    assert!(matches!(
        CpuKernel::compile(&kernel),
        Err(CpuError::InvalidKernel { .. })
    ));
    // A type error.
    let mut k = KernelBuilder::new("type_error", 32);
    let v = k.var("v", Ty::F32);
    let kernel = k.finish(vec![Stmt::assign(v, Expr::i32(1))]);
    assert!(matches!(
        CpuKernel::compile(&kernel),
        Err(CpuError::InvalidKernel { .. })
    ));

    let compiled = CpuKernel::compile(&shifted_copy()).expect("compiles");
    let (mut x, mut out) = (vec![0u8; 128], vec![0u8; 128]);
    let error = compiled
        .launch([1, 1, 1], &mut [KernelArg::Buffer(&mut x)])
        .expect_err("too few arguments");
    assert!(matches!(error, CpuError::BadLaunch { .. }), "{error}");
    let error = compiled
        .launch(
            [1, 1, 1],
            &mut [
                KernelArg::Buffer(&mut x),
                KernelArg::Buffer(&mut out),
                KernelArg::I64(0),
            ],
        )
        .expect_err("an i64 for an i32");
    assert!(matches!(error, CpuError::BadLaunch { .. }), "{error}");
    let error = compiled
        .launch(
            [1 << 31, 1, 1],
            &mut [
                KernelArg::Buffer(&mut x),
                KernelArg::Buffer(&mut out),
                KernelArg::I32(0),
            ],
        )
        .expect_err("too many blocks");
    assert!(matches!(error, CpuError::BadLaunch { .. }), "{error}");
    // An empty grid runs nothing.
    compiled
        .launch(
            [0, 1, 1],
            &mut [
                KernelArg::Buffer(&mut x),
                KernelArg::Buffer(&mut out),
                KernelArg::I32(1000),
            ],
        )
        .expect("no blocks, no faults");
}

#[test]
fn one_compiled_kernel_runs_many_launches_with_any_worker_count() {
    let kernel = kiln_kir::examples::vector_add(DType::F32);
    let mut rng = Rng::new(24);
    let n = 5000;
    let a = random_buffer(&mut rng, DType::F32, n);
    let b = random_buffer(&mut rng, DType::F32, n);
    let expected: Vec<f32> = common::f32_values(&a)
        .iter()
        .zip(common::f32_values(&b))
        .map(|(x, y)| x + y)
        .collect();
    for workers in [1, 2, 3, 16] {
        let compiled = CpuKernel::compile(&kernel)
            .expect("compiles")
            .with_workers(workers);
        for _ in 0..3 {
            let (mut a, mut b) = (a.clone(), b.clone());
            let mut out = vec![0u8; n * 4];
            compiled
                .launch(
                    [4, 1, 1],
                    &mut [
                        KernelArg::Buffer(&mut a),
                        KernelArg::Buffer(&mut b),
                        KernelArg::Buffer(&mut out),
                        KernelArg::I64(n as i64),
                    ],
                )
                .expect("runs");
            assert_eq!(common::f32_values(&out), expected);
        }
    }
    // Bit patterns of binary ops the examples do not reach: integer min/max of extremes.
    let kernel = kiln_kir::examples::binary_map(BinOp::Min, DType::I64);
    let x = common::ints_as(DType::I64, &[i64::MIN, i64::MAX, 0, -1]);
    let y = common::ints_as(DType::I64, &[i64::MAX, i64::MIN, -1, 0]);
    let args = [
        Arg::Buffer(x),
        Arg::Buffer(y),
        Arg::Buffer(vec![0; 32]),
        Arg::Scalar(Const::I64(4)),
    ];
    check(&kernel, [1, 1, 1], &args, Tolerance::Exact);
}
