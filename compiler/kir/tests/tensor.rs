//! The tensor-core statements in the reference interpreter: one warp's `cp.async` →
//! `ldmatrix` → `mma` tile equals the matrix product computed here (both input types, both
//! B layouts, zero-filled ragged edges), the pending-copy race is reported, and the
//! verifier's rules for the new statements.

mod common;

use common::run;
use kiln_ir::{DType, Tensor};
use kiln_kir::examples::mma_tile;
use kiln_kir::{verify_kernel, Access, Const, Expr, KernelBuilder, MmaInput, Stmt, Ty, VarId};

/// Small integers: every product and partial sum is exact, in f16 and bf16, in any order.
fn small_ints(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + seed * 13) % 9) as f32 - 4.0)
        .collect()
}

fn run_tile(input: MmaInput, b_k_major: bool, m: usize, k: usize) {
    let kernel = mma_tile(input, b_k_major);
    let kdim = input.k();
    let a = small_ints(16 * kdim, 1);
    let b = small_ints(8 * kdim, 2);
    let dtype = input.dtype();
    let buffers = [
        Tensor::from_floats(dtype, &[16 * kdim], a.clone()),
        Tensor::from_floats(dtype, &[8 * kdim], b.clone()),
        Tensor::zeros(DType::F32, &[128]),
    ];
    let out = run(
        &kernel,
        [1, 1, 1],
        &buffers,
        &[Const::I32(m as i32), Const::I32(k as i32)],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = out[2].to_f32_vec();
    for row in 0..16 {
        for col in 0..8 {
            let mut expected = 0.0;
            if row < m {
                for kk in 0..k {
                    let b_value = if b_k_major {
                        b[kk * 8 + col]
                    } else {
                        b[col * kdim + kk]
                    };
                    expected += a[row * kdim + kk] * b_value;
                }
            }
            assert_eq!(
                out[row * 8 + col],
                expected,
                "{} row {row} col {col} (m {m}, k {k}, k-major b {b_k_major})",
                kernel.name
            );
        }
    }
}

#[test]
fn one_warp_tile_equals_the_matrix_product() {
    for input in [MmaInput::Bf16, MmaInput::F16] {
        for b_k_major in [false, true] {
            run_tile(input, b_k_major, 16, 16);
        }
    }
}

#[test]
fn one_warp_fp8_tile_is_an_m16n8k32_product() {
    for input in [MmaInput::E4M3, MmaInput::E5M2] {
        run_tile(input, false, 16, 32);
        for (m, k) in [(13, 27), (1, 32), (16, 5), (0, 0), (9, 16), (16, 17)] {
            run_tile(input, false, m, k);
        }
    }
}

#[test]
fn ragged_rows_and_k_are_zero_filled_by_the_copy() {
    for b_k_major in [false, true] {
        for (m, k) in [(13, 11), (1, 16), (16, 3), (0, 0), (9, 8)] {
            run_tile(MmaInput::Bf16, b_k_major, m, k);
        }
    }
}

/// A one-warp kernel that copies 8 bf16 elements asynchronously and then loads one of
/// them, with `wait` (or not) between.
fn copy_then_read(wait: bool) -> kiln_kir::Kernel {
    let mut kb = KernelBuilder::new("copy_then_read", 32);
    let src = kb.buffer("src", DType::BF16, Access::Read);
    let out = kb.buffer("out", DType::F32, Access::Write);
    let tile = kb.shared("tile", DType::BF16, 256);
    let mut body = vec![
        Stmt::CpAsync {
            dst: tile,
            dst_index: Expr::lane_id() * Expr::i32(8),
            src,
            src_index: Expr::lane_id() * Expr::i32(8),
            src_len: Expr::i32(8),
        },
        Stmt::CpAsyncCommit,
    ];
    if wait {
        body.push(Stmt::CpAsyncWait(0));
    }
    body.push(Stmt::store(
        out,
        Expr::lane_id(),
        Expr::load(tile, Expr::lane_id() * Expr::i32(8)),
    ));
    kb.finish(body)
}

#[test]
fn reading_a_pending_copy_is_an_error_and_waiting_completes_it() {
    let values: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let buffers = [
        Tensor::from_floats(DType::BF16, &[256], values),
        Tensor::zeros(DType::F32, &[32]),
    ];
    let error = run(&copy_then_read(false), [1, 1, 1], &buffers, &[]).unwrap_err();
    assert!(error.to_string().contains("pending"), "{error}");
    let out = run(&copy_then_read(true), [1, 1, 1], &buffers, &[]).unwrap();
    let expected: Vec<f32> = (0..32).map(|lane| (lane * 8) as f32).collect();
    assert_eq!(out[1].to_f32_vec(), expected);
}

#[test]
fn wait_n_leaves_the_newest_groups_pending() {
    // Two groups; `wait(1)` completes the first only.
    let mut kb = KernelBuilder::new("two_groups", 32);
    let src = kb.buffer("src", DType::BF16, Access::Read);
    let out = kb.buffer("out", DType::F32, Access::Write);
    let tile = kb.shared("tile", DType::BF16, 512);
    let copy = |offset: i32| Stmt::CpAsync {
        dst: tile,
        dst_index: Expr::lane_id() * Expr::i32(8) + Expr::i32(offset),
        src,
        src_index: Expr::lane_id() * Expr::i32(8),
        src_len: Expr::i32(8),
    };
    let read = |offset: i32| {
        Stmt::store(
            out,
            Expr::lane_id(),
            Expr::load(tile, Expr::lane_id() * Expr::i32(8) + Expr::i32(offset)),
        )
    };
    let buffers = [
        Tensor::from_floats(DType::BF16, &[256], vec![1.0; 256]),
        Tensor::zeros(DType::F32, &[32]),
    ];
    let first_ok = kb.finish(vec![
        copy(0),
        Stmt::CpAsyncCommit,
        copy(256),
        Stmt::CpAsyncCommit,
        Stmt::CpAsyncWait(1),
        read(0),
    ]);
    assert!(run(&first_ok, [1, 1, 1], &buffers, &[]).is_ok());
    let second_pending = kb.finish(vec![
        copy(0),
        Stmt::CpAsyncCommit,
        copy(256),
        Stmt::CpAsyncCommit,
        Stmt::CpAsyncWait(1),
        read(256),
    ]);
    let error = run(&second_pending, [1, 1, 1], &buffers, &[]).unwrap_err();
    assert!(error.to_string().contains("pending"), "{error}");
}

/// A kernel with a bf16 shared tile, `I32` registers `w0..w3`, `F32` registers `f0..f3`
/// and a global bf16 buffer, whose body is `body(tile, src, w, f)`.
fn tensor_fixture(
    body: impl FnOnce(kiln_kir::Buf, kiln_kir::Buf, &[VarId], &[VarId]) -> Vec<Stmt>,
) -> kiln_kir::Kernel {
    let mut kb = KernelBuilder::new("k", 64);
    let src = kb.buffer("src", DType::BF16, Access::Read);
    let tile = kb.shared("tile", DType::BF16, 512);
    let w: Vec<VarId> = (0..4).map(|i| kb.var(format!("w{i}"), Ty::I32)).collect();
    let f: Vec<VarId> = (0..4).map(|i| kb.var(format!("f{i}"), Ty::F32)).collect();
    kb.finish(body(tile, src, &w, &f))
}

fn mma_of(w: &[VarId], f: &[VarId]) -> Stmt {
    Stmt::Mma {
        input: MmaInput::Bf16,
        d: [f[0], f[1], f[2], f[3]],
        a: [w[0], w[1], w[2], w[3]],
        b: [w[0], w[1]],
        c: [f[0], f[1], f[2], f[3]],
    }
}

fn rejected(kernel: &kiln_kir::Kernel, expected: &str) {
    let error = verify_kernel(kernel).expect_err("the verifier accepted it");
    assert!(error.to_string().contains(expected), "{error}");
}

#[test]
fn verifier_rules_for_the_tensor_statements() {
    assert!(verify_kernel(&tensor_fixture(|_, _, w, f| vec![mma_of(w, f)])).is_ok());
    // Operand types.
    rejected(
        &tensor_fixture(|_, _, w, f| vec![mma_of(f, w)]),
        "mma operand",
    );
    // Warp collectives need block-uniform control flow.
    rejected(
        &tensor_fixture(|_, _, w, f| {
            vec![Stmt::if_then(
                Expr::thread_idx().lt(Expr::i32(32)),
                vec![mma_of(w, f)],
            )]
        }),
        "not block-uniform",
    );
    let ldmatrix = |count: usize, buf| {
        move |tile, src, w: &[VarId], _: &[VarId]| {
            let buf = if buf { tile } else { src };
            vec![Stmt::LdMatrix {
                dsts: w[..count].to_vec(),
                trans: false,
                buf,
                index: Expr::i32(0),
            }]
        }
    };
    assert!(verify_kernel(&tensor_fixture(ldmatrix(4, true))).is_ok());
    rejected(&tensor_fixture(ldmatrix(3, true)), "1, 2 or 4");
    rejected(&tensor_fixture(ldmatrix(2, false)), "shared array only");
    rejected(
        &tensor_fixture(|tile, _, w, _| {
            vec![Stmt::if_then(
                Expr::thread_idx().lt(Expr::i32(32)),
                vec![Stmt::LdMatrix {
                    dsts: w[..1].to_vec(),
                    trans: true,
                    buf: tile,
                    index: Expr::i32(0),
                }],
            )]
        }),
        "not block-uniform",
    );
    // cp.async: shared destination, global source, i32 length; fine under divergence.
    let copy = |dst_shared: bool, len: Expr| {
        move |tile, src, _: &[VarId], _: &[VarId]| {
            let dst = if dst_shared { tile } else { src };
            vec![Stmt::if_then(
                Expr::thread_idx().lt(Expr::i32(7)),
                vec![Stmt::CpAsync {
                    dst,
                    dst_index: Expr::i32(0),
                    src,
                    src_index: Expr::i32(0),
                    src_len: len,
                }],
            )]
        }
    };
    assert!(verify_kernel(&tensor_fixture(copy(true, Expr::i32(8)))).is_ok());
    rejected(
        &tensor_fixture(copy(false, Expr::i32(8))),
        "global buffer to a shared",
    );
    rejected(&tensor_fixture(copy(true, Expr::i64(8))), "not i32");
}

#[test]
fn ldmatrix_row_alignment_is_checked() {
    let kernel = tensor_fixture(|tile, src, w, _| {
        vec![
            Stmt::CpAsync {
                dst: tile,
                dst_index: Expr::thread_idx() * Expr::i32(8),
                src,
                src_index: Expr::thread_idx() * Expr::i32(8),
                src_len: Expr::i32(8),
            },
            Stmt::CpAsyncCommit,
            Stmt::CpAsyncWait(0),
            Stmt::Barrier,
            Stmt::LdMatrix {
                dsts: w[..1].to_vec(),
                trans: false,
                buf: tile,
                index: Expr::lane_id() * Expr::i32(8) + Expr::i32(4),
            },
        ]
    });
    let buffers = [Tensor::from_floats(DType::BF16, &[512], vec![0.5; 512])];
    let error = run(&kernel, [1, 1, 1], &buffers, &[]).unwrap_err();
    assert!(error.to_string().contains("not a multiple of 8"), "{error}");
}

#[test]
fn ldmatrix_of_8_bit_elements_moves_rows_of_16_and_never_transposes() {
    let kernel = |trans: bool| {
        let mut kb = KernelBuilder::new("k", 32);
        let tile = kb.shared("tile", DType::F8E4M3, 512);
        let w: Vec<VarId> = (0..4).map(|i| kb.var(format!("w{i}"), Ty::I32)).collect();
        kb.finish(vec![Stmt::LdMatrix {
            dsts: w,
            trans,
            buf: tile,
            index: Expr::lane_id() * Expr::i32(16),
        }])
    };
    assert!(verify_kernel(&kernel(false)).is_ok());
    rejected(&kernel(true), "transposing ldmatrix");
}

#[test]
fn pack_halves_rounds_to_nearest_even_and_puts_the_first_value_low() {
    // Exact values, ties to even in both formats, overflow, infinities and NaN.
    let values: Vec<f32> = [
        1.0,
        -2.5,
        1.0 + 1.0 / 256.0,  // bf16 tie: rounds to 1.0
        1.0 + 3.0 / 256.0,  // bf16 tie: rounds up to 1 + 4/256
        1.0 + 1.0 / 2048.0, // f16 tie: rounds to 1.0
        70000.0,            // f16 overflow: inf
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        3.0e-41,
    ]
    .into_iter()
    .cycle()
    .take(128)
    .collect();
    for input in [MmaInput::Bf16, MmaInput::F16] {
        let kernel = kiln_kir::examples::pack_halves(input);
        verify_kernel(&kernel).unwrap_or_else(|e| panic!("{e}"));
        let buffers = [
            Tensor::from_f32(&[128], values.clone()),
            Tensor::zeros(DType::I32, &[64]),
        ];
        let out = run(&kernel, [1, 1, 1], &buffers, &[]).unwrap_or_else(|e| panic!("{e}"));
        let words = out[1].as_i64().unwrap();
        for (t, &word) in words.iter().enumerate() {
            let word = word as u32;
            let want = |x: f32| -> u32 {
                u32::from(match input {
                    MmaInput::Bf16 => half::bf16::from_f32(x).to_bits(),
                    MmaInput::F16 => half::f16::from_f32(x).to_bits(),
                    MmaInput::E4M3 | MmaInput::E5M2 => unreachable!("16-bit inputs only"),
                })
            };
            let (lo, hi) = (values[2 * t], values[2 * t + 1]);
            assert_eq!(word & 0xffff, want(lo), "{input:?} low half of {lo}");
            assert_eq!(word >> 16, want(hi), "{input:?} high half of {hi}");
        }
    }
}

#[test]
fn packing_8_bit_halves_is_rejected() {
    let mut kernel = kiln_kir::examples::pack_halves(MmaInput::Bf16);
    for stmt in &mut kernel.body {
        if let Stmt::PackHalves { input, .. } = stmt {
            *input = MmaInput::E4M3;
        }
    }
    rejected(&kernel, "packs halves of e4m3");
}
