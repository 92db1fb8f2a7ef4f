//! Hopper's warpgroup product in the reference interpreter: a warpgroup's `cp.async` →
//! swizzled tiles → four m64nNk16 `wgmma`s equals the matrix product computed here (both
//! input types, several n), a missing async-proxy fence and a write to a tile a pending
//! batch reads are reported, and the verifier's rules for the statements.

mod common;

use common::run;
use kiln_ir::{DType, Tensor};
use kiln_kir::examples::wgmma_tile;
use kiln_kir::{verify_kernel, Expr, KernelBuilder, MmaInput, Stmt, WgmmaOp, WgmmaTile};

/// Small integers: every product and partial sum is exact, in f16 and bf16, in any order.
fn small_ints(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + seed * 13 + i / 64) % 9) as f32 - 4.0)
        .collect()
}

fn inputs(input: MmaInput, n: usize) -> (Vec<f32>, Vec<f32>, [Tensor; 3]) {
    let a = small_ints(64 * 64, 1);
    let b = small_ints(n * 64, 2);
    let dtype = input.dtype();
    let buffers = [
        Tensor::from_floats(dtype, &[64 * 64], a.clone()),
        Tensor::from_floats(dtype, &[n * 64], b.clone()),
        Tensor::zeros(DType::F32, &[64 * n]),
    ];
    (a, b, buffers)
}

#[test]
fn one_warpgroup_tile_equals_the_matrix_product() {
    for input in [MmaInput::Bf16, MmaInput::F16] {
        for n in [16usize, 48, 128, 256] {
            let kernel = wgmma_tile(input, n as u32, true);
            let (a, b, buffers) = inputs(input, n);
            let out = run(&kernel, [1, 1, 1], &buffers, &[]).unwrap_or_else(|e| panic!("{e}"));
            let out = out[2].to_f32_vec();
            for row in 0..64 {
                for col in 0..n {
                    let expected: f32 = (0..64).map(|k| a[row * 64 + k] * b[col * 64 + k]).sum();
                    assert_eq!(
                        out[row * n + col],
                        expected,
                        "{input:?} n {n} ({row}, {col})"
                    );
                }
            }
        }
    }
}

#[test]
fn a_read_without_the_async_proxy_fence_is_an_error() {
    let kernel = wgmma_tile(MmaInput::Bf16, 16, false);
    let (_, _, buffers) = inputs(MmaInput::Bf16, 16);
    let err = run(&kernel, [1, 1, 1], &buffers, &[]).expect_err("unfenced");
    assert!(err.to_string().contains("fence_proxy_async"), "{err}");
}

#[test]
fn a_write_to_a_tile_a_pending_batch_reads_is_an_error() {
    let mut kernel = wgmma_tile(MmaInput::Bf16, 16, true);
    let wait = kernel
        .body
        .iter()
        .position(|s| *s == Stmt::Wgmma(WgmmaOp::Wait(0)))
        .expect("a wait");
    let b_tile = kiln_kir::Buf::Shared(1);
    kernel.body.insert(
        wait,
        Stmt::store(b_tile, Expr::thread_idx(), Expr::f32(1.0)),
    );
    let (_, _, buffers) = inputs(MmaInput::Bf16, 16);
    let err = run(&kernel, [1, 1, 1], &buffers, &[]).expect_err("a race");
    assert!(err.to_string().contains("pending wgmma"), "{err}");
    // After the wait the same store is fine.
    let mut kernel = wgmma_tile(MmaInput::Bf16, 16, true);
    kernel.body.insert(
        wait + 1,
        Stmt::store(b_tile, Expr::thread_idx(), Expr::f32(1.0)),
    );
    run(&kernel, [1, 1, 1], &buffers, &[]).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_verifier_checks_wgmma_shapes_and_warpgroups() {
    let good = wgmma_tile(MmaInput::F16, 32, true);
    verify_kernel(&good).unwrap();
    let with = |f: &dyn Fn(&mut kiln_kir::Kernel)| {
        let mut k = good.clone();
        f(&mut k);
        verify_kernel(&k).map_err(|e| e.to_string())
    };
    let mma_at = good
        .body
        .iter()
        .position(|s| matches!(s, Stmt::Wgmma(WgmmaOp::Mma { .. })))
        .unwrap();
    let edit = |k: &mut kiln_kir::Kernel, f: &dyn Fn(&mut WgmmaOp)| {
        if let Stmt::Wgmma(op) = &mut k.body[mma_at] {
            f(op);
        }
    };
    let err = with(&|k| {
        edit(k, &|op| {
            if let WgmmaOp::Mma { n, .. } = op {
                *n = 24;
            }
        })
    })
    .unwrap_err();
    assert!(err.contains("accumulators"), "{err}");
    let err = with(&|k| {
        edit(k, &|op| {
            if let WgmmaOp::Mma { a, .. } = op {
                *a = WgmmaTile {
                    sbo: 1000,
                    ..a.clone()
                };
            }
        })
    })
    .unwrap_err();
    assert!(err.contains("stride offset"), "{err}");
    let err = with(&|k| {
        edit(k, &|op| {
            if let WgmmaOp::Mma { input, .. } = op {
                *input = MmaInput::Bf16;
            }
        })
    })
    .unwrap_err();
    assert!(err.contains("reading f16"), "{err}");
    let err = with(&|k| k.block_dim = 96).unwrap_err();
    assert!(err.contains("warpgroups"), "{err}");
    // A collective under thread-dependent control flow.
    let kb = KernelBuilder::new("divergent", 128);
    let body = vec![Stmt::if_then(
        Expr::thread_idx().lt(Expr::i32(64)),
        vec![Stmt::Wgmma(WgmmaOp::Commit)],
    )];
    let err = verify_kernel(&kb.finish(body)).unwrap_err().to_string();
    assert!(err.contains("block-uniform"), "{err}");
}

#[test]
fn touching_an_accumulator_before_its_wait_is_an_error() {
    let mut kernel = wgmma_tile(MmaInput::Bf16, 16, true);
    let wait = kernel
        .body
        .iter()
        .position(|s| *s == Stmt::Wgmma(WgmmaOp::Wait(0)))
        .expect("a wait");
    let Some(Stmt::Wgmma(WgmmaOp::Mma { d, .. })) = kernel
        .body
        .iter()
        .find(|s| matches!(s, Stmt::Wgmma(WgmmaOp::Mma { .. })))
        .cloned()
    else {
        panic!("an mma");
    };
    let read = Stmt::assign(d[1], Expr::var(d[1]) + Expr::f32(1.0));
    kernel.body.insert(wait, read.clone());
    let (_, _, buffers) = inputs(MmaInput::Bf16, 16);
    let err = run(&kernel, [1, 1, 1], &buffers, &[]).expect_err("in flight");
    assert!(
        err.to_string().contains("no wgmma_wait has completed"),
        "{err}"
    );
    // After the wait it is an ordinary register.
    let mut kernel = wgmma_tile(MmaInput::Bf16, 16, true);
    kernel.body.insert(wait + 1, read);
    run(&kernel, [1, 1, 1], &buffers, &[]).unwrap_or_else(|e| panic!("{e}"));
}
