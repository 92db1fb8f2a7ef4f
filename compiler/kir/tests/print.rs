//! The text form of kernels and plans, as insta snapshots (re-bless with
//! `INSTA_UPDATE=always cargo test -p kiln-kir --test print` and review the diff).

use kiln_ir::DType;
use kiln_kir::examples::{divergent_branches, rms_norm_rows, vector_add};
use kiln_kir::print::format_stmt;
use kiln_kir::{
    Arg, BufferDecl, BufferId, BufferKind, Expr, KernelBuilder, Plan, SizeExpr, Step, Stmt,
    SymBinding, Ty,
};

#[test]
fn rms_norm_kernel() {
    insta::assert_snapshot!(
        "rms_norm_bf16",
        rms_norm_rows(DType::BF16, 4096, 256).to_string()
    );
}

#[test]
fn vector_add_kernel() {
    insta::assert_snapshot!("vector_add_bf16", vector_add(DType::BF16).to_string());
}

#[test]
fn tensor_core_kernel() {
    insta::assert_snapshot!(
        "mma_tile_bf16_kn",
        kiln_kir::examples::mma_tile(kiln_kir::MmaInput::Bf16, true).to_string()
    );
}

#[test]
fn divergent_kernel() {
    insta::assert_snapshot!("divergent_branches", divergent_branches().to_string());
}

#[test]
fn printing_is_deterministic_and_disambiguates_names() {
    let kernel = rms_norm_rows(DType::F32, 7, 32);
    assert_eq!(kernel.to_string(), kernel.clone().to_string());

    // Registers that share a name (or have none) print with their id.
    let mut k = KernelBuilder::new("names", 32);
    let a = k.var("x", Ty::F32);
    let b = k.var("x", Ty::F32);
    let c = k.var("", Ty::I64);
    let kernel = k.finish(vec![
        Stmt::assign(a, Expr::var(b) * Expr::f32(-0.0) + Expr::f32(f32::NAN)),
        Stmt::assign(c, Expr::i64(3) << (Expr::i64(1) + Expr::i64(2))),
    ]);
    let text = kernel.to_string();
    assert!(
        text.contains("  var x%0: f32\n  var x%1: f32\n  var %2: i64\n"),
        "{text}"
    );
    assert!(text.contains("  x%0 = (x%1 * -0.0) + nan\n"), "{text}");
    assert!(text.contains("  %2 = 3i64 << (1i64 + 2i64)\n"), "{text}");
    // Out-of-range ids print instead of panicking.
    let broken = Stmt::store(
        kiln_kir::Buf::Global(7),
        Expr::var(kiln_kir::VarId(9)),
        Expr::param(4),
    );
    assert_eq!(format_stmt(&kernel, &broken), "global7?[%9?] = $param4?\n");
}

#[test]
fn plan_text_form() {
    let t = || SizeExpr::Sym("T".to_string());
    let plan = Plan {
        function: "step".to_string(),
        symbols: vec![SymBinding {
            name: "T".to_string(),
            input: 0,
            axis: 0,
        }],
        buffers: vec![
            BufferDecl {
                id: BufferId(0),
                dtype: DType::BF16,
                shape: vec![t(), SizeExpr::Const(4096)],
                kind: BufferKind::Input(0),
                offset: None,
            },
            BufferDecl {
                id: BufferId(1),
                dtype: DType::BF16,
                shape: vec![SizeExpr::Const(4096)],
                kind: BufferKind::Weight("model.norm.weight".to_string()),
                offset: None,
            },
            BufferDecl {
                id: BufferId(2),
                dtype: DType::F32,
                shape: vec![t(), SizeExpr::Const(4096)],
                kind: BufferKind::Temp,
                offset: Some(SizeExpr::Const(0)),
            },
            BufferDecl {
                id: BufferId(3),
                dtype: DType::F32,
                shape: vec![SizeExpr::Mul(
                    Box::new(t()),
                    Box::new(SizeExpr::Const(4096)),
                )],
                kind: BufferKind::View(BufferId(2)),
                offset: None,
            },
            BufferDecl {
                id: BufferId(4),
                dtype: DType::I64,
                shape: vec![],
                kind: BufferKind::Input(1),
                offset: None,
            },
            BufferDecl {
                id: BufferId(5),
                dtype: DType::I64,
                shape: vec![],
                kind: BufferKind::Temp,
                offset: Some(SizeExpr::Mul(
                    Box::new(t()),
                    Box::new(SizeExpr::Const(16384)),
                )),
            },
            BufferDecl {
                id: BufferId(6),
                dtype: DType::F32,
                shape: vec![t(), SizeExpr::Const(4096)],
                kind: BufferKind::Output(0),
                offset: None,
            },
        ],
        inputs: vec![BufferId(0), BufferId(4)],
        outputs: vec![BufferId(6)],
        steps: vec![
            Step::Launch {
                kernel: 0,
                args: vec![
                    Arg::Buffer(BufferId(0)),
                    Arg::Buffer(BufferId(1)),
                    Arg::Buffer(BufferId(2)),
                    Arg::Sym("T".to_string()),
                ],
            },
            Step::Loop {
                count: BufferId(4),
                carried: vec![BufferId(6)],
                init: vec![BufferId(3)],
                next: vec![BufferId(2)],
                counter: BufferId(5),
                body: vec![
                    Step::Launch {
                        kernel: 1,
                        args: vec![Arg::Buffer(BufferId(6)), Arg::Buffer(BufferId(2))],
                    },
                    Step::Copy {
                        src: BufferId(2),
                        dst: BufferId(3),
                    },
                ],
            },
        ],
        arena_bytes: SizeExpr::Add(
            Box::new(SizeExpr::Mul(
                Box::new(t()),
                Box::new(SizeExpr::Const(16384)),
            )),
            Box::new(SizeExpr::Const(8)),
        ),
        symbol_bound: None,
    };
    insta::assert_snapshot!("plan", plan.to_string());
}

#[test]
fn blocks_per_sm_is_printed_when_not_one() {
    let mut kernel = vector_add(DType::F32);
    assert!(!kernel.to_string().contains("blocks_per_sm"));
    kernel.blocks_per_sm = 2;
    let text = kernel.to_string();
    let header = text.find("  block_dim ").expect("a block_dim line");
    let hint = text.find("  blocks_per_sm 2\n").expect("the hint");
    assert!(header < hint, "{text}");
}
