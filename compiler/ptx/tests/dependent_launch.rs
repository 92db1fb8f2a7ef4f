//! Programmatic dependent launch in the PTX: a kernel with a `GridDependencyWait` waits
//! there (its L2 prefetches before it), `LaunchDependents` is
//! `griddepcontrol.launch_dependents`, and sm_80 / sm_89 (no grid-dependency control, no
//! bulk prefetch) get neither; the result assembles with ptxas for every target. A settled
//! buffer (loaded before the wait, and again after it) is read through L2 only
//! (`ld.global.cg`), never the non-coherent path.

use kiln_ir::DType;
use kiln_kir::examples::prefetch_copy;
use kiln_kir::{Access, Expr, Kernel, KernelBuilder, Stmt, Ty};
use kiln_ptx::{emit_module, AssembleOptions, EmitOptions, Feature, Target, Toolchain};

/// The instruction lines of `ptx` (comments and blank lines dropped), trimmed.
fn instructions(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .collect()
}

/// `kernel` alone, emitted for `target` with the default options.
fn emit_one(kernel: &Kernel, target: Target) -> kiln_ptx::PtxModule {
    emit_module(
        std::slice::from_ref(kernel),
        target,
        &EmitOptions::default(),
    )
    .unwrap()
}

#[test]
fn the_wait_follows_the_prefetch_on_targets_with_dependent_launch() {
    let kernel = prefetch_copy(DType::BF16);
    for target in Target::ALL {
        let module = emit_one(&kernel, target);
        let lines = instructions(&module.text);
        let find = |prefix: &str| -> Vec<usize> {
            (0..lines.len())
                .filter(|&i| lines[i].starts_with(prefix))
                .collect()
        };
        let prefetch = find("cp.async.bulk.prefetch.L2.global");
        let wait = find("griddepcontrol.wait");
        let launch = find("griddepcontrol.launch_dependents");
        let load = find("ld.global");
        if target.compute_capability().0 >= 9 {
            assert_eq!(
                (prefetch.len(), wait.len(), launch.len()),
                (1, 1, 1),
                "{target}"
            );
            assert!(prefetch[0] < wait[0] && wait[0] < load[0], "{target}");
            assert!(launch[0] > load[0], "{target}");
            // Start address register, byte count register.
            assert!(
                lines[prefetch[0]].ends_with(';') && lines[prefetch[0]].contains("], %r"),
                "{}",
                lines[prefetch[0]]
            );
            assert_eq!(
                module.features,
                vec![
                    Feature::Bf16ToF32,
                    Feature::GridDependencyControl,
                    Feature::BulkPrefetchL2
                ]
            );
            assert_eq!(module.version, target.min_ptx_version(), "{target}");
        } else {
            assert!(
                prefetch.is_empty() && wait.is_empty() && launch.is_empty(),
                "{target}"
            );
        }
    }
}

#[test]
fn prefetching_kernels_assemble_for_every_target() {
    let toolchain = match Toolchain::discover() {
        Ok(toolchain) => toolchain,
        Err(error) if std::env::var("KILN_ALLOW_NO_PTXAS").as_deref() == Ok("1") => {
            eprintln!("NOT RUN: no ptxas ({error}); KILN_ALLOW_NO_PTXAS=1");
            return;
        }
        Err(error) => panic!("needs ptxas: {error}\n(set KILN_ALLOW_NO_PTXAS=1 to skip)"),
    };
    let kernels = [
        prefetch_copy(DType::BF16),
        prefetch_copy(DType::F32),
        prefetch_copy(DType::F8E4M3),
        early_and_late(),
    ];
    for target in Target::ALL {
        for options in [EmitOptions::default(), EmitOptions::for_jit()] {
            let module = emit_module(&kernels, target, &options).unwrap();
            let assembled = toolchain
                .assemble(&module.text, target, &AssembleOptions::default())
                .unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!(assembled.report.functions.len(), 4, "{target}");
            assert!(
                assembled.report.functions.iter().all(|f| !f.has_spills()),
                "{target}: {}",
                assembled.log
            );
        }
    }
}

/// Each thread loads `s[t]` (settled) before the wait and again after it, and stores both.
fn early_and_late() -> Kernel {
    let mut k = KernelBuilder::new("early_and_late", 32);
    let s = k.buffer("s", DType::F32, Access::Settled);
    let out = k.buffer("out", DType::F32, Access::Write);
    let (early, late) = (k.var("early", Ty::F32), k.var("late", Ty::F32));
    let t = Expr::thread_idx();
    k.finish(vec![
        Stmt::assign(early, Expr::load(s, t.clone())),
        Stmt::GridDependencyWait,
        Stmt::assign(late, Expr::load(s, t.clone())),
        Stmt::store(out, t.clone() * Expr::i32(2), Expr::var(early)),
        Stmt::store(out, t * Expr::i32(2) + Expr::i32(1), Expr::var(late)),
    ])
}

#[test]
fn settled_loads_bypass_the_non_coherent_cache() {
    let kernel = early_and_late();
    for target in Target::ALL {
        let module = emit_one(&kernel, target);
        let lines = instructions(&module.text);
        let loads: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("ld.global"))
            .collect();
        assert_eq!(loads.len(), 2, "{target}: {loads:?}");
        assert!(
            loads.iter().all(|l| l.starts_with("ld.global.cg.f32")),
            "{target}: {loads:?}"
        );
        let wait = lines
            .iter()
            .position(|l| l.starts_with("griddepcontrol.wait"));
        if target.compute_capability().0 >= 9 {
            let first = lines
                .iter()
                .position(|l| l.starts_with("ld.global"))
                .unwrap();
            assert!(wait.is_some_and(|w| first < w), "{target}");
        }
    }
}
