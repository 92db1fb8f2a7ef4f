//! The PTX the emitter writes, as reviewed snapshots (`tests/snapshots/`, re-blessed with
//! `INSTA_UPDATE=always` or `cargo insta review`), and the properties every module has:
//! byte-identical output for the same kernels, the lowest `.version` covering the target
//! and the features used, the JIT cap respected, and clear errors.

mod kernels;

use kiln_ir::DType;
use kiln_kir::examples;
use kiln_kir::{Access, Expr, KernelBuilder, Stmt, Ty};
use kiln_ptx::{
    emit_module, emit_ptx, EmitError, EmitOptions, Feature, PtxVersion, Target, JIT_PTX_VERSION_CAP,
};

fn emit(kernel: &kiln_kir::Kernel, target: Target) -> String {
    emit_ptx(
        std::slice::from_ref(kernel),
        target,
        &EmitOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{} for {target}: {e}", kernel.name))
}

#[test]
fn representative_kernels_for_every_target() {
    for target in Target::ALL {
        for (name, kernel) in kernels::representative() {
            let ptx = emit(&kernel, target);
            insta::assert_snapshot!(format!("{name}_{}", target.sm_name()), ptx);
        }
    }
}

#[test]
fn the_same_kernels_give_the_same_bytes() {
    let all: Vec<_> = kernels::representative()
        .into_iter()
        .map(|(_, kernel)| kernel)
        .collect();
    for target in Target::ALL {
        let first = emit_ptx(&all, target, &EmitOptions::default()).unwrap();
        let rebuilt: Vec<_> = kernels::representative()
            .into_iter()
            .map(|(_, kernel)| kernel)
            .collect();
        let second = emit_ptx(&rebuilt, target, &EmitOptions::default()).unwrap();
        assert_eq!(first, second, "{target}");
        assert_eq!(
            first,
            emit_ptx(&all, target, &EmitOptions::default()).unwrap()
        );
    }
}

#[test]
fn one_module_holds_every_kernel_and_one_table() {
    let all: Vec<_> = kernels::representative()
        .into_iter()
        .map(|(_, kernel)| kernel)
        .collect();
    let ptx = emit_ptx(&all, Target::Sm90a, &EmitOptions::default()).unwrap();
    for kernel in &all {
        assert_eq!(
            ptx.matches(&format!(".visible .entry {}(", kernel.name))
                .count(),
            1
        );
    }
    assert_eq!(
        ptx.matches(".const .align 4 .b32 __kiln_two_over_pi_windows[384]")
            .count(),
        1
    );
    assert_eq!(ptx.matches(".version ").count(), 1);
}

#[test]
fn header_parameters_and_shared_arrays() {
    let ptx = emit(
        &examples::rms_norm_rows(DType::F32, 1024, 256),
        Target::Sm90a,
    );
    assert!(
        ptx.contains("\n.version 8.0\n.target sm_90a\n.address_size 64\n"),
        "{ptx}"
    );
    assert!(ptx.contains(".visible .entry rms_norm_rows_f32_1024(\n\t.param .u64 x,\n\t.param .u64 weight,\n\t.param .u64 out\n)\n.maxntid 256, 1, 1\n"), "{ptx}");
    assert!(ptx.contains("\t.shared .align 16 .b8 smem_partials[32];\n"));
    assert!(ptx.contains("\t.shared .align 16 .b8 smem_inv_rms[4];\n"));
    assert!(ptx.contains("bar.sync 0;"));
    assert!(ptx.contains("shfl.sync.bfly.b32"));
    // Read-only buffers use the non-coherent path; written ones do not.
    assert!(ptx.contains("ld.global.nc.f32"));
    assert!(ptx.contains("st.global.f32"));

    let scalars = {
        let mut k = KernelBuilder::new("scalars", 32);
        let out = k.buffer("out", DType::F32, Access::Write);
        let flag = k.scalar("flag", Ty::Pred);
        let count = k.scalar("count", Ty::I32);
        let size = k.scalar("size", Ty::I64);
        let scale = k.scalar("scale", Ty::F32);
        let value = Expr::select(flag, scale * count.cast(Ty::F32), size.cast(Ty::F32));
        k.finish(vec![Stmt::store(out, Expr::thread_idx(), value)])
    };
    let ptx = emit(&scalars, Target::Sm80);
    assert!(ptx.contains("\t.param .u64 out,\n\t.param .u8 flag,\n\t.param .s32 count,\n\t.param .s64 size,\n\t.param .f32 scale\n)"), "{ptx}");
}

#[test]
fn streaming_kernels_may_ask_for_more_blocks_per_sm() {
    let options = EmitOptions {
        streaming_blocks_per_sm: 5,
        ..EmitOptions::default()
    };
    let with = |kernel: &kiln_kir::Kernel, options: &EmitOptions| {
        emit_ptx(std::slice::from_ref(kernel), Target::Sm90a, options).expect("emits")
    };
    // Without shared memory the option applies; a kernel with shared memory keeps one block.
    let plain = examples::vector_add(DType::F32);
    assert!(with(&plain, &EmitOptions::default()).contains("\n.minnctapersm 1\n"));
    assert!(with(&plain, &options).contains("\n.minnctapersm 5\n"));
    let shared = examples::rms_norm_rows(DType::F32, 1024, 256);
    assert!(with(&shared, &options).contains("\n.minnctapersm 1\n"));
}

#[test]
fn the_version_is_the_lowest_covering_target_and_features() {
    let version = |kernel: &kiln_kir::Kernel, target: Target, options: &EmitOptions| {
        let module = emit_module(std::slice::from_ref(kernel), target, options).unwrap();
        (module.version.to_string(), module.features)
    };
    let plain = examples::vector_add(DType::F32);
    let bf16 = examples::vector_add(DType::BF16);
    let f8 = kernels::f8_stores();
    let none = EmitOptions::default();
    // Only the target's minimum without version-dependent features; sm_90a and later start
    // every kernel with the grid-dependency wait (within their minimum version).
    for target in Target::ALL {
        let dependent = if target.compute_capability().0 >= 9 {
            vec![Feature::GridDependencyControl]
        } else {
            vec![]
        };
        assert_eq!(
            version(&plain, target, &none),
            (target.min_ptx_version().to_string(), dependent)
        );
    }
    // cvt.f32.bf16 lifts sm_80 from 7.0 to 7.1; the later targets already have it.
    assert_eq!(
        version(&bf16, Target::Sm80, &none),
        ("7.1".into(), vec![Feature::Bf16ToF32])
    );
    assert_eq!(
        version(&bf16, Target::Sm89, &none),
        ("7.8".into(), vec![Feature::Bf16ToF32])
    );
    // The f8 conversions need 8.1 on sm_89, and do not exist on sm_80.
    assert_eq!(
        version(&f8, Target::Sm89, &none),
        ("8.1".into(), vec![Feature::Fp8Convert])
    );
    assert_eq!(
        version(&f8, Target::Sm90a, &none),
        (
            "8.0".into(),
            vec![Feature::Fp8Convert, Feature::GridDependencyControl]
        )
    );
    assert_eq!(version(&f8, Target::Sm80, &none), ("7.0".into(), vec![]));
    // Under a cap the emitter falls back to exact sequences instead.
    let cap = |v: PtxVersion| EmitOptions {
        max_ptx_version: Some(v),
        ..EmitOptions::default()
    };
    assert_eq!(
        version(&bf16, Target::Sm80, &cap(PtxVersion::new(7, 0))),
        ("7.0".into(), vec![])
    );
    assert_eq!(
        version(&f8, Target::Sm89, &cap(PtxVersion::new(7, 8))),
        ("7.8".into(), vec![])
    );
    let capped = emit_ptx(
        std::slice::from_ref(&f8),
        Target::Sm89,
        &cap(PtxVersion::new(7, 8)),
    )
    .unwrap();
    assert!(!capped.contains("e4m3x2") && !capped.contains("e5m2x2"));
    let full = emit_ptx(&[f8], Target::Sm89, &none).unwrap();
    assert!(full.contains("cvt.rn.satfinite.e4m3x2.f32") && full.contains("cvt.rn.f16x2.e4m3x2"));
    let capped = emit_ptx(&[bf16], Target::Sm80, &cap(PtxVersion::new(7, 0))).unwrap();
    assert!(!capped.contains("cvt.f32.bf16"));
}

#[test]
fn the_jit_copy_declares_at_most_9_0() {
    let all = kernels::everything();
    for target in Target::ALL {
        let module = emit_module(&all, target, &EmitOptions::for_jit()).unwrap();
        assert!(
            module.version <= JIT_PTX_VERSION_CAP,
            "{target}: {}",
            module.version
        );
        let header = kiln_ptx::PtxHeader::parse(&module.text).unwrap();
        assert_eq!(header.version, module.version);
        assert_eq!(header.target, target.sm_name());
    }
}

#[test]
fn errors_say_what_is_wrong() {
    let kernel = examples::vector_add(DType::F32);
    let capped = EmitOptions {
        max_ptx_version: Some(PtxVersion::new(8, 0)),
        ..EmitOptions::default()
    };
    let error = emit_ptx(std::slice::from_ref(&kernel), Target::Sm120, &capped).unwrap_err();
    assert_eq!(
        error,
        EmitError::TargetAboveCap {
            target: Target::Sm120,
            needed: PtxVersion::new(8, 7),
            cap: PtxVersion::new(8, 0)
        }
    );
    assert_eq!(
        error.to_string(),
        "sm_120 needs PTX ISA 8.7, but the module is capped at 8.0"
    );
    let twice = emit_ptx(
        &[kernel.clone(), kernel.clone()],
        Target::Sm80,
        &EmitOptions::default(),
    );
    assert_eq!(
        twice,
        Err(EmitError::DuplicateKernel("vector_add_f32".into()))
    );

    let mut broken = kernel.clone();
    broken.block_dim = 100;
    let error = emit_ptx(&[broken], Target::Sm80, &EmitOptions::default()).unwrap_err();
    assert!(matches!(error, EmitError::InvalidKernel(_)), "{error:?}");
    assert!(error.to_string().contains("block_dim 100"), "{error}");

    let mut reserved = kernel;
    reserved.name = "__kiln_two_over_pi_windows".into();
    let error = emit_ptx(&[reserved], Target::Sm80, &EmitOptions::default()).unwrap_err();
    assert!(matches!(error, EmitError::ReservedName(_)));
}

#[test]
fn an_empty_module_is_just_the_header() {
    let ptx = emit_ptx(&[], Target::Sm100a, &EmitOptions::default()).unwrap();
    assert_eq!(
        ptx,
        "//\n// Generated by kiln for sm_100a.\n//\n\n.version 8.6\n.target sm_100a\n.address_size 64\n"
    );
}

#[test]
fn fp8_mma_is_m16n8k32_from_sm_89_with_ptx_8_4_and_an_error_for_sm_80() {
    let tile = examples::mma_tile(kiln_kir::MmaInput::E4M3, false);
    let none = EmitOptions::default();
    for target in [Target::Sm89, Target::Sm90a, Target::Sm100a, Target::Sm120] {
        let module = emit_module(std::slice::from_ref(&tile), target, &none).unwrap();
        assert!(module.features.contains(&Feature::Fp8Mma), "{target}");
        assert!(module.version >= PtxVersion::new(8, 4), "{target}");
        let ptx = emit(&tile, target);
        assert!(
            ptx.contains("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"),
            "{target}"
        );
        // 8-bit rows move through the same b16 ldmatrix.
        assert!(ptx.contains("ldmatrix.sync.aligned.m8n8.x4.shared.b16"));
    }
    insta::assert_snapshot!("mma_tile_e4m3_nk_sm_89", emit(&tile, Target::Sm89));
    let e5m2 = emit(
        &examples::mma_tile(kiln_kir::MmaInput::E5M2, false),
        Target::Sm120,
    );
    assert!(e5m2.contains("mma.sync.aligned.m16n8k32.row.col.f32.e5m2.e5m2.f32"));
    let error = emit_ptx(std::slice::from_ref(&tile), Target::Sm80, &none).unwrap_err();
    assert!(
        matches!(error, EmitError::Unsupported { .. }) && error.to_string().contains("sm_89"),
        "{error}"
    );
}

#[test]
fn shared_arrays_beyond_48_kib_take_one_dynamic_window() {
    // 12 + 64 KiB: beyond the static limit, within every target's.
    let kernel = kernels::dynamic_shared(16 * 1024);
    let ptx = emit(&kernel, Target::Sm80);
    insta::assert_snapshot!("dynamic_shared_sm_80", ptx);
    for target in Target::ALL {
        let ptx = emit(&kernel, target);
        assert!(
            ptx.contains(".extern .shared .align 16 .b8 dynamic_shared$smem[];\n"),
            "{target}"
        );
        assert!(
            !ptx.contains("\t.shared "),
            "{target}: a static array is left"
        );
        // `tile` starts at 16 (after `bias`'s 12 bytes): its base and the constant offset
        // of `bias[2]`.
        assert!(ptx.contains("dynamic_shared$smem+16;"), "{target}");
        assert!(ptx.contains("[dynamic_shared$smem+8]"), "{target}");
    }
    // A kernel at the static limit keeps its static arrays.
    let small = kernels::dynamic_shared(12 * 1024 - 3);
    let ptx = emit(&small, Target::Sm80);
    assert!(!ptx.contains(".extern"));
    assert!(
        ptx.contains("\t.shared .align 16 .b8 smem_tile[49140];"),
        "{ptx}"
    );
}

#[test]
fn shared_memory_beyond_a_targets_block_limit_is_an_error() {
    // 12 + 120 KiB: sm_80, sm_90a and sm_100a take it; sm_89 and sm_120 (99 KiB) do not.
    let kernel = kernels::dynamic_shared(30 * 1024);
    for target in Target::ALL {
        let result = emit_ptx(
            std::slice::from_ref(&kernel),
            target,
            &EmitOptions::default(),
        );
        if target.max_shared_bytes_per_block() >= 12 + 120 * 1024 {
            assert!(result.is_ok(), "{target}: {result:?}");
            continue;
        }
        let error = result.unwrap_err();
        assert_eq!(
            error,
            EmitError::SharedMemory {
                kernel: "dynamic_shared".into(),
                bytes: 16 + 120 * 1024,
                target,
                limit: 99 * 1024,
            }
        );
        assert_eq!(
            error.to_string(),
            format!(
                "kernel `dynamic_shared`: its shared arrays take 122896 bytes, more than the \
                 101376 a block may use on {target}"
            )
        );
    }
    // A kernel named like another's window.
    let mut clash = examples::vector_add(DType::F32);
    clash.name = "dynamic_shared$smem".into();
    let error = emit_ptx(&[kernel, clash], Target::Sm90a, &EmitOptions::default()).unwrap_err();
    assert_eq!(error, EmitError::ReservedName("dynamic_shared$smem".into()));
}

#[test]
fn wgmma_is_sm_90a_only_with_1024_byte_aligned_tiles() {
    let tile = examples::wgmma_tile(kiln_kir::MmaInput::Bf16, 64, true);
    let none = EmitOptions::default();
    let module = emit_module(std::slice::from_ref(&tile), Target::Sm90a, &none).unwrap();
    assert!(module.features.contains(&Feature::Wgmma));
    let ptx = emit(&tile, Target::Sm90a);
    for line in [
        "wgmma.fence.sync.aligned;",
        "fence.proxy.async.shared::cta;",
        "wgmma.commit_group.sync.aligned;",
        "wgmma.wait_group.sync.aligned 0;",
        ".shared .align 1024 .b8 smem_a_tile[8192];",
    ] {
        assert!(ptx.contains(line), "{line}");
    }
    assert_eq!(
        ptx.matches("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16")
            .count(),
        4
    );
    insta::assert_snapshot!("wgmma_tile_bf16_n64_sm_90a", ptx);
    for target in [Target::Sm80, Target::Sm89, Target::Sm100a, Target::Sm120] {
        let error = emit_ptx(std::slice::from_ref(&tile), target, &none).unwrap_err();
        assert!(
            matches!(error, EmitError::Unsupported { .. }) && error.to_string().contains("sm_90a"),
            "{target}: {error}"
        );
    }
}
