//! Every test kernel's PTX assembles with the real ptxas for all five targets (also the
//! JIT copies and the capped fallbacks), and the pointwise and reduction kernels keep all
//! their registers (no spills in the `ptxas -v` report).
//!
//! Without ptxas these tests fail with the install instructions, unless
//! `KILN_ALLOW_NO_PTXAS=1` is set: then each prints that it was not run.

mod kernels;

use kiln_kir::Kernel;
use kiln_ptx::{emit_ptx, AssembleOptions, Assembled, EmitOptions, PtxVersion, Target, Toolchain};

/// The toolchain, or `None` (after saying so) when it is absent and that is allowed.
fn toolchain(test: &str) -> Option<Toolchain> {
    match Toolchain::discover() {
        Ok(toolchain) => Some(toolchain),
        Err(error) if std::env::var("KILN_ALLOW_NO_PTXAS").as_deref() == Ok("1") => {
            eprintln!("NOT RUN: {test}: no ptxas ({error}); KILN_ALLOW_NO_PTXAS=1");
            None
        }
        Err(error) => panic!("{test} needs ptxas: {error}\n(set KILN_ALLOW_NO_PTXAS=1 to skip)"),
    }
}

fn assemble(
    toolchain: &Toolchain,
    kernels: &[Kernel],
    target: Target,
    options: &EmitOptions,
) -> Assembled {
    let ptx = emit_ptx(kernels, target, options).unwrap_or_else(|e| panic!("{target}: {e}"));
    toolchain
        .assemble(&ptx, target, &AssembleOptions::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The snapshotted kernels whose registers must all fit: the pointwise and reduction ones
/// and the tensor-core tile.
const NO_SPILLS: [&str; 5] = [
    "vector_add_bf16",
    "rms_norm_rows_bf16",
    "every_unary_op",
    "f8_quantize",
    "mma_tile_bf16_kn",
];

#[test]
fn representative_kernels_assemble_for_every_target_without_spills() {
    let Some(toolchain) =
        toolchain("representative_kernels_assemble_for_every_target_without_spills")
    else {
        return;
    };
    for target in Target::ALL {
        for (name, kernel) in kernels::representative() {
            let assembled = assemble(
                &toolchain,
                std::slice::from_ref(&kernel),
                target,
                &EmitOptions::default(),
            );
            let report = assembled
                .report
                .functions
                .iter()
                .find(|f| f.name == kernel.name)
                .unwrap_or_else(|| panic!("no report for {name}:\n{}", assembled.log));
            println!(
                "{:>7} {name:<20} {:>3} registers, {} bytes spill stores, {} bytes spill loads, {} bytes smem",
                target.sm_name(), report.registers, report.spill_store_bytes, report.spill_load_bytes, report.shared_memory_bytes
            );
            if NO_SPILLS.contains(&name) {
                assert!(
                    !report.has_spills(),
                    "{name} spills on {target}:\n{}",
                    assembled.log
                );
            }
            let errors: Vec<_> = assembled
                .report
                .notices
                .iter()
                .filter(|n| n.severity >= kiln_ptx::NoticeSeverity::Warning)
                .collect();
            assert!(errors.is_empty(), "{name} on {target}: {errors:?}");
        }
    }
}

#[test]
fn every_dtype_operator_and_example_assembles_for_every_target() {
    let Some(toolchain) = toolchain("every_dtype_operator_and_example_assembles_for_every_target")
    else {
        return;
    };
    let coverage = kernels::coverage();
    for target in Target::ALL {
        let assembled = assemble(&toolchain, &coverage, target, &EmitOptions::default());
        assert_eq!(assembled.report.functions.len(), coverage.len(), "{target}");
    }
}

#[test]
fn jit_copies_and_capped_fallbacks_assemble() {
    let Some(toolchain) = toolchain("jit_copies_and_capped_fallbacks_assemble") else {
        return;
    };
    let all = kernels::everything();
    for target in Target::ALL {
        let ptx = emit_ptx(&all, target, &EmitOptions::for_jit()).unwrap();
        let assembled = toolchain
            .assemble(&ptx, target, &AssembleOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        // The JIT copy packs into a fatbin next to its cubin.
        if toolchain.fatbinary_path().is_some() {
            toolchain
                .fatbin(&[(target, &assembled.cubin)], Some((&ptx, target)))
                .unwrap_or_else(|e| panic!("{target}: {e}"));
        }
    }
    // The fallbacks: bf16 widening at PTX 7.0 on sm_80, f8 conversions at 7.8 on sm_89.
    for (target, cap) in [
        (Target::Sm80, PtxVersion::new(7, 0)),
        (Target::Sm89, PtxVersion::new(7, 8)),
    ] {
        let options = EmitOptions {
            max_ptx_version: Some(cap),
            ..EmitOptions::default()
        };
        assemble(&toolchain, &all, target, &options);
    }
}

#[test]
fn blocks_per_sm_is_declared_and_caps_the_registers() {
    let (_, mut kernel) = kernels::representative()
        .into_iter()
        .find(|(name, _)| *name == "tiled_matmul")
        .expect("the tiled matmul");
    kernel.blocks_per_sm = 6;
    let cap = 65536 / (6 * kernel.block_dim);
    let toolchain = toolchain("blocks_per_sm_is_declared_and_caps_the_registers");
    for target in Target::ALL {
        let ptx = emit_ptx(
            std::slice::from_ref(&kernel),
            target,
            &EmitOptions::default(),
        )
        .unwrap();
        assert!(ptx.contains(".minnctapersm 6\n"), "{ptx}");
        if let Some(toolchain) = &toolchain {
            let assembled = toolchain
                .assemble(&ptx, target, &AssembleOptions::default())
                .unwrap_or_else(|e| panic!("{e}"));
            let report = &assembled.report.functions[0];
            assert!(
                report.registers <= cap,
                "{target}: {} registers, more than {cap}",
                report.registers
            );
        }
    }
}

#[test]
fn blocks_per_sm_is_cut_to_the_blocks_whose_shared_memory_an_sm_holds() {
    let (_, mut kernel) = kernels::representative()
        .into_iter()
        .find(|(name, _)| *name == "tiled_matmul")
        .expect("the tiled matmul");
    // Lengthen its first shared array (the tail unused) to 40 KiB of shared memory in all.
    let others: u64 = kernel.shared[1..]
        .iter()
        .map(|s| u64::from(s.len) * s.dtype.size_bytes() as u64)
        .sum();
    let first = &mut kernel.shared[0];
    first.len = ((40 * 1024 - others) / first.dtype.size_bytes() as u64) as u32;
    let shared = 40 * 1024;
    kernel.blocks_per_sm = 6;
    for target in Target::ALL {
        let ptx = emit_ptx(
            std::slice::from_ref(&kernel),
            target,
            &EmitOptions::default(),
        )
        .unwrap();
        let fit = target.shared_bytes_per_sm() / (shared + 1024);
        assert!(fit < 6, "{target}: {fit}");
        assert!(
            ptx.contains(&format!(".minnctapersm {fit}\n")),
            "{target}: {ptx}"
        );
    }
}

#[test]
fn fp8_mma_tiles_assemble_from_sm_89_without_spills() {
    let Some(toolchain) = toolchain("fp8_mma_tiles_assemble_from_sm_89_without_spills") else {
        return;
    };
    let tiles = [
        kiln_kir::examples::mma_tile(kiln_kir::MmaInput::E4M3, false),
        kiln_kir::examples::mma_tile(kiln_kir::MmaInput::E5M2, false),
    ];
    for target in [Target::Sm89, Target::Sm90a, Target::Sm100a, Target::Sm120] {
        let assembled = assemble(&toolchain, &tiles, target, &EmitOptions::default());
        assert_eq!(assembled.report.functions.len(), 2, "{target}");
        for report in &assembled.report.functions {
            println!(
                "{:>7} {} {} registers",
                target.sm_name(),
                report.name,
                report.registers
            );
            assert!(!report.has_spills(), "{} spills on {target}", report.name);
        }
        // The JIT copy (PTX at most 9.0) keeps the FP8 mma.
        let jit = assemble(&toolchain, &tiles, target, &EmitOptions::for_jit());
        assert_eq!(jit.report.functions.len(), 2, "{target}");
    }
}

#[test]
fn dynamic_shared_windows_assemble_for_every_target() {
    let Some(toolchain) = toolchain("dynamic_shared_windows_assemble_for_every_target") else {
        return;
    };
    // 12 + 96 KiB: within every target's opt-in limit (99 KiB on sm_89 and sm_120).
    let kernel = kernels::dynamic_shared(24 * 1024);
    for target in Target::ALL {
        let assembled = assemble(
            &toolchain,
            std::slice::from_ref(&kernel),
            target,
            &EmitOptions::default(),
        );
        let report = &assembled.report.functions[0];
        assert!(!report.has_spills(), "{target}: {}", assembled.log);
        // Dynamic shared memory is sized at launch: ptxas reports no static bytes.
        assert_eq!(report.shared_memory_bytes, 0, "{target}: {}", assembled.log);
    }
}

#[test]
fn wgmma_tiles_assemble_for_sm_90a_without_spills_or_serialization() {
    let Some(toolchain) =
        toolchain("wgmma_tiles_assemble_for_sm_90a_without_spills_or_serialization")
    else {
        return;
    };
    let tiles = [
        kiln_kir::examples::wgmma_tile(kiln_kir::MmaInput::Bf16, 256, true),
        kiln_kir::examples::wgmma_tile(kiln_kir::MmaInput::F16, 128, true),
    ];
    for options in [EmitOptions::default(), EmitOptions::for_jit()] {
        let assembled = assemble(&toolchain, &tiles, Target::Sm90a, &options);
        assert_eq!(assembled.report.functions.len(), 2);
        for report in &assembled.report.functions {
            println!("{} {} registers", report.name, report.registers);
            assert!(!report.has_spills(), "{} spills", report.name);
        }
        for code in ["C7515", "C7511", "C7510"] {
            assert!(!assembled.log.contains(code), "{}", assembled.log);
        }
    }
}
