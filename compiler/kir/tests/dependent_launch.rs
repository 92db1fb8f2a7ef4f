//! Programmatic dependent launch in the kernel IR: the grid-dependency wait marker, L2
//! prefetches before it and the early-launch trigger — where the verifier allows them, how
//! they print, and the interpreter running them as no-ops that still check each prefetch's
//! range, size and alignment; settled buffers loaded before the wait, and the interpreter
//! giving those loads the memory from before the previous kernel.

mod common;

use common::{floats, run};
use kiln_ir::{DType, Tensor};
use kiln_kir::examples::prefetch_copy;
use kiln_kir::{
    run_kernel_across_wait, run_kernel_prefetching, verify_kernel, Access, Const, Expr, Kernel,
    KernelBuilder, Prefetch, Stmt, Ty,
};

fn copy_of(dtype: DType, n: usize) -> Vec<f32> {
    let kernel = prefetch_copy(dtype);
    verify_kernel(&kernel).unwrap();
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
    let buffers = [floats(dtype, &x), Tensor::zeros(dtype, &[n])];
    let grid = [n.div_ceil(64) as u64, 1, 1];
    let out = run(&kernel, grid, &buffers, &[Const::I64(n as i64)]).unwrap();
    out[1].to_f32_vec()
}

#[test]
fn the_prefetching_copy_copies_ragged_sizes() {
    for dtype in [DType::F32, DType::BF16, DType::F8E4M3] {
        for n in [1, 8, 64, 100, 130] {
            let x: Vec<f32> =
                Tensor::from_floats(dtype, &[n], (0..n).map(|i| i as f32 * 0.5 - 7.0).collect())
                    .to_f32_vec();
            assert_eq!(copy_of(dtype, n), x, "{dtype} n = {n}");
        }
    }
}

#[test]
fn a_run_reports_each_prefetch() {
    // 100 bf16: block 0 asks for its 128 bytes, block 1 for the whole chunks of its 36
    // elements (64 bytes; the last 8 bytes are no whole chunk).
    let kernel = prefetch_copy(DType::BF16);
    let mut memory = [vec![0u8; 200], vec![0u8; 200]];
    let mut slices: Vec<&mut [u8]> = memory.iter_mut().map(Vec::as_mut_slice).collect();
    let prefetches =
        run_kernel_prefetching(&kernel, [2, 1, 1], &mut slices, &[Const::I64(100)]).unwrap();
    let at = |block: u64, first_byte: u64, bytes: u64| Prefetch {
        block: [block, 0, 0],
        param: 0,
        first_byte,
        bytes,
    };
    assert_eq!(prefetches, vec![at(0, 0, 128), at(1, 128, 64)]);
}

#[test]
fn the_statements_print() {
    let text = prefetch_copy(DType::BF16).to_string();
    for line in [
        "prefetch_l2(x[base], bytes)",
        "grid_dependency_wait",
        "launch_dependents",
    ] {
        assert!(text.contains(line), "{line:?} missing from\n{text}");
    }
}

/// A kernel of 32 threads over `x: f32[n]` (read), `out: f32` (write), `w: f32[n]`
/// (constant), `tile: f32[32]` (shared) and registers `a: i32`, `f: f32`, `b: i64`,
/// `v0..v3: f32`.
fn kernel_with(body: impl FnOnce(&Regs) -> Vec<Stmt>) -> Kernel {
    let mut k = KernelBuilder::new("k", 32);
    let regs = Regs {
        x: k.buffer("x", DType::F32, Access::Read),
        out: k.buffer("out", DType::F32, Access::Write),
        w: k.buffer("w", DType::F32, Access::Constant),
        tile: k.shared("tile", DType::F32, 32),
        a: k.var("a", Ty::I32),
        f: k.var("f", Ty::F32),
        b: k.var("b", Ty::I64),
        v: (0..4).map(|i| k.var(format!("v{i}"), Ty::F32)).collect(),
    };
    let body = body(&regs);
    k.finish(body)
}

struct Regs {
    x: kiln_kir::Buf,
    out: kiln_kir::Buf,
    w: kiln_kir::Buf,
    tile: kiln_kir::Buf,
    a: kiln_kir::VarId,
    f: kiln_kir::VarId,
    b: kiln_kir::VarId,
    v: Vec<kiln_kir::VarId>,
}

fn prefetch(r: &Regs, index: Expr, bytes: Expr) -> Stmt {
    Stmt::PrefetchL2 {
        buf: r.x,
        index,
        bytes,
    }
}

fn rejects(kernel: &Kernel, expected: &str) {
    match verify_kernel(kernel) {
        Ok(()) => panic!("accepted, expected {expected:?}:\n{kernel}"),
        Err(e) => assert!(
            e.to_string().contains(expected),
            "{e} does not contain {expected:?}"
        ),
    }
}

#[test]
fn only_address_arithmetic_and_prefetches_run_before_the_wait() {
    let copy = |r: &Regs| Stmt::store(r.out, Expr::i32(0), Expr::load(r.x, Expr::i32(0)));
    // Arithmetic, loops and branches of it, prefetches: accepted.
    let fine = kernel_with(|r| {
        vec![
            Stmt::assign(r.a, Expr::thread_idx() * Expr::i32(4)),
            Stmt::for_range(
                r.b,
                Expr::i64(0),
                Expr::i64(2),
                Expr::i64(1),
                vec![Stmt::if_then(
                    Expr::var(r.a).lt(Expr::i32(8)),
                    vec![prefetch(r, Expr::var(r.a), Expr::i32(16))],
                )],
            ),
            Stmt::GridDependencyWait,
            copy(r),
            Stmt::LaunchDependents,
        ]
    });
    verify_kernel(&fine).unwrap();
    // A load, a store, a barrier, a loop bound that loads, the trigger: rejected.
    let before = |stmt: fn(&Regs) -> Stmt| kernel_with(|r| vec![stmt(r), Stmt::GridDependencyWait]);
    rejects(
        &before(|r| Stmt::assign(r.f, Expr::load(r.x, Expr::i32(0)))),
        "touches memory before the grid-dependency wait",
    );
    rejects(
        &before(|r| Stmt::store(r.out, Expr::i32(0), Expr::f32(1.0))),
        "statement body[0]",
    );
    rejects(
        &before(|_| Stmt::Barrier),
        "touches memory before the grid-dependency wait",
    );
    rejects(
        &before(|r| {
            Stmt::for_range(
                r.a,
                Expr::i32(0),
                Expr::load(r.x, Expr::i32(0)).cast(Ty::I32),
                Expr::i32(1),
                vec![],
            )
        }),
        "touches memory before",
    );
    rejects(
        &before(|r| {
            Stmt::if_then(
                Expr::thread_idx().equals(Expr::i32(0)),
                vec![Stmt::store(r.tile, Expr::i32(0), Expr::f32(0.0))],
            )
        }),
        "statement body[0].then[0]",
    );
    rejects(&before(|_| Stmt::LaunchDependents), "touches memory before");
    // One wait, at the top level.
    rejects(
        &kernel_with(|_| vec![Stmt::GridDependencyWait, Stmt::GridDependencyWait]),
        "a second grid-dependency wait",
    );
    rejects(
        &kernel_with(|_| {
            vec![Stmt::if_then(
                Expr::thread_idx().equals(Expr::i32(0)),
                vec![Stmt::GridDependencyWait],
            )]
        }),
        "below the top level",
    );
    // Loads of a constant buffer (a checkpoint tensor no kernel writes) may precede it,
    // also inside branches and loops; their indices may load only constant buffers too.
    let constant = kernel_with(|r| {
        vec![
            Stmt::LoadVec {
                dsts: r.v.clone(),
                buf: r.w,
                index: Expr::thread_idx() * Expr::i32(4),
            },
            Stmt::if_then(
                Expr::load(r.w, Expr::i32(0)).lt(Expr::f32(1.0)),
                vec![Stmt::assign(r.f, Expr::load(r.w, Expr::i32(4)))],
            ),
            Stmt::GridDependencyWait,
            copy(r),
        ]
    });
    verify_kernel(&constant).unwrap();
    rejects(
        &before(|r| Stmt::LoadVec {
            dsts: r.v.clone(),
            buf: r.x,
            index: Expr::i32(0),
        }),
        "loads of constant or settled buffers",
    );
    rejects(
        &before(|r| Stmt::LoadVec {
            dsts: r.v.clone(),
            buf: r.w,
            index: Expr::load(r.x, Expr::i32(0)).cast(Ty::I32),
        }),
        "touches memory before",
    );
    // After the wait (or without one) anything goes, prefetches included.
    let after = kernel_with(|r| vec![copy(r), prefetch(r, Expr::i32(4), Expr::i32(32))]);
    verify_kernel(&after).unwrap();
}

#[test]
fn prefetch_operands_are_checked() {
    rejects(
        &kernel_with(|r| {
            vec![Stmt::PrefetchL2 {
                buf: r.tile,
                index: Expr::i32(0),
                bytes: Expr::i32(16),
            }]
        }),
        "an L2 prefetch of a shared array",
    );
    rejects(
        &kernel_with(|r| {
            vec![Stmt::PrefetchL2 {
                buf: r.out,
                index: Expr::i32(0),
                bytes: Expr::i32(16),
            }]
        }),
        "whose access is Write",
    );
    rejects(
        &kernel_with(|r| vec![prefetch(r, Expr::i32(0), Expr::i64(16))]),
        "the L2 prefetch size is i64, not i32",
    );
    rejects(
        &kernel_with(|r| vec![prefetch(r, Expr::f32(0.0), Expr::i32(16))]),
        "the index is f32",
    );
}

/// Runs a kernel of one prefetch by thread 0 over `x: f32[40]`.
fn run_prefetch(index: i32, bytes: i32) -> Result<(), String> {
    let kernel = kernel_with(|r| {
        vec![
            Stmt::if_then(
                Expr::thread_idx().equals(Expr::i32(0)),
                vec![prefetch(r, Expr::i32(index), Expr::i32(bytes))],
            ),
            Stmt::GridDependencyWait,
        ]
    });
    verify_kernel(&kernel).unwrap();
    let buffers = [
        Tensor::zeros(DType::F32, &[40]),
        Tensor::zeros(DType::F32, &[1]),
        Tensor::zeros(DType::F32, &[8]),
    ];
    run(&kernel, [1, 1, 1], &buffers, &[])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn the_interpreter_checks_each_prefetch() {
    // 40 f32 = 160 bytes: the whole buffer, its last 16 bytes, a middle piece.
    for (index, bytes) in [(0, 160), (36, 16), (8, 64)] {
        run_prefetch(index, bytes).unwrap_or_else(|e| panic!("{index}, {bytes}: {e}"));
    }
    for (index, bytes, expected) in [
        (0, 176, "bytes 0..176 of buffer `x` (160 bytes)"),
        (36, 32, "bytes 144..176 of buffer `x`"),
        (-4, 16, "bytes -16..0"),
        (2, 16, "start index 2 is not 16-byte aligned"),
        (
            0,
            24,
            "an L2 prefetch of 24 bytes (a positive multiple of 16)",
        ),
        (0, 0, "an L2 prefetch of 0 bytes"),
    ] {
        let error = run_prefetch(index, bytes).expect_err("out of range");
        assert!(error.contains(expected), "{error} lacks {expected:?}");
        assert!(error.contains("thread 0"), "{error} names no thread");
    }
}

/// One thread loads `s[0]` before the wait and again after it, and stores both into `out`;
/// `s` is declared `access`.
fn early_and_late(access: Access) -> Kernel {
    let mut k = KernelBuilder::new("early_and_late", 32);
    let s = k.buffer("s", DType::F32, access);
    let out = k.buffer("out", DType::F32, Access::Write);
    let (early, late) = (k.var("early", Ty::F32), k.var("late", Ty::F32));
    let first = Expr::thread_idx().equals(Expr::i32(0));
    k.finish(vec![
        Stmt::assign(early, Expr::load(s, Expr::i32(0))),
        Stmt::GridDependencyWait,
        Stmt::assign(late, Expr::load(s, Expr::i32(0))),
        Stmt::if_then(
            first,
            vec![
                Stmt::store(out, Expr::i32(0), Expr::var(early)),
                Stmt::store(out, Expr::i32(1), Expr::var(late)),
            ],
        ),
    ])
}

#[test]
fn settled_loads_may_precede_the_wait_and_read_the_memory_before_the_previous_kernel() {
    rejects(&early_and_late(Access::Read), "touches memory before");
    let kernel = early_and_late(Access::Settled);
    verify_kernel(&kernel).unwrap();
    assert!(kernel.to_string().contains("settled"), "{kernel}");
    let before = 1.5f32.to_le_bytes();
    let mut s = 2.5f32.to_le_bytes();
    let mut out = [0u8; 8];
    run_kernel_across_wait(
        &kernel,
        [1, 1, 1],
        &[&before, &[0u8; 8]],
        &mut [&mut s, &mut out],
        &[],
    )
    .unwrap();
    let got: Vec<f32> = out
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, vec![1.5, 2.5]);
}
