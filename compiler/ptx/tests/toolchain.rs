//! Assembles hand-written PTX with the real ptxas and packs fatbins with the real
//! fatbinary, both found by `Toolchain::discover()`.
//!
//! Without the tools these tests fail with the install instructions, unless
//! `KILN_ALLOW_NO_PTXAS=1` is set: then each prints that it was not run.

use kiln_ptx::{
    AssembleOptions, NoticeSeverity, PtxVersion, Target, ToolError, Toolchain, FATBIN_MAGIC,
    JIT_PTX_VERSION_CAP,
};

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

fn header(target: Target) -> String {
    format!(
        ".version {}\n.target {}\n.address_size 64\n",
        target.min_ptx_version(),
        target.sm_name()
    )
}

/// out[i] = a[i] + b[i] for i < n.
fn vector_add(target: Target) -> String {
    header(target)
        + r#"
.visible .entry vector_add(
    .param .u64 a_ptr,
    .param .u64 b_ptr,
    .param .u64 out_ptr,
    .param .u32 n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<11>;

    ld.param.u64 %rd1, [a_ptr];
    ld.param.u64 %rd2, [b_ptr];
    ld.param.u64 %rd3, [out_ptr];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd4, %rd1;
    cvta.to.global.u64 %rd5, %rd2;
    cvta.to.global.u64 %rd6, %rd3;
    mul.wide.u32 %rd7, %r5, 4;
    add.s64 %rd8, %rd4, %rd7;
    add.s64 %rd9, %rd5, %rd7;
    add.s64 %rd10, %rd6, %rd7;
    ld.global.f32 %f1, [%rd8];
    ld.global.f32 %f2, [%rd9];
    add.f32 %f3, %f1, %f2;
    st.global.f32 [%rd10], %f3;
DONE:
    ret;
}
"#
}

#[test]
fn reports_the_ptxas_version() {
    let Some(toolchain) = toolchain("reports_the_ptxas_version") else {
        return;
    };
    let version = toolchain.ptxas_version().unwrap();
    eprintln!(
        "ptxas {version} at {} ({:?})",
        toolchain.ptxas_path().display(),
        toolchain.source()
    );
    assert!(
        version.major >= 13,
        "kiln needs a CUDA 13 ptxas, found {version}"
    );
}

#[test]
fn assembles_vector_add_for_sm80() {
    let Some(toolchain) = toolchain("assembles_vector_add_for_sm80") else {
        return;
    };
    let ptx = vector_add(Target::Sm80);
    assert!(ptx.starts_with(".version 7.0\n.target sm_80\n"));
    let assembled = toolchain
        .assemble(&ptx, Target::Sm80, &AssembleOptions::default())
        .unwrap();
    assert!(assembled.cubin.starts_with(b"\x7fELF"));
    assert!(assembled
        .log
        .contains("Compiling entry function 'vector_add' for 'sm_80'"));
    let kernels: Vec<_> = assembled.report.entries().collect();
    assert_eq!(kernels.len(), 1);
    let kernel = kernels[0];
    assert_eq!(kernel.name, "vector_add");
    assert_eq!(kernel.arch.as_deref(), Some("sm_80"));
    assert!(kernel.registers > 0, "{kernel:?}");
    assert!(!kernel.has_spills(), "{kernel:?}");
    assert_eq!(kernel.shared_memory_bytes, 0);
    assert_eq!(kernel.stack_frame_bytes, 0);
    assert!(
        assembled.report.notices.is_empty(),
        "{:?}",
        assembled.report.notices
    );
}

#[test]
fn assembles_vector_add_for_every_target_at_its_minimum_version() {
    let Some(toolchain) = toolchain("assembles_vector_add_for_every_target_at_its_minimum_version")
    else {
        return;
    };
    for target in Target::ALL {
        let assembled = toolchain
            .assemble(&vector_add(target), target, &AssembleOptions::default())
            .unwrap_or_else(|error| panic!("{target}: {error}"));
        assert_eq!(assembled.target, target);
        let kernel = assembled.report.function("vector_add").unwrap();
        assert_eq!(kernel.arch.as_deref(), Some(target.sm_name()));
        assert!(kernel.registers > 0, "{target}: {kernel:?}");
        assert!(!kernel.has_spills(), "{target}: {kernel:?}");
    }
}

#[test]
fn a_version_below_the_targets_minimum_is_rejected() {
    let Some(toolchain) = toolchain("a_version_below_the_targets_minimum_is_rejected") else {
        return;
    };
    // the minimum really is the minimum: one step lower fails
    for target in [Target::Sm89, Target::Sm90a, Target::Sm100a, Target::Sm120] {
        let PtxVersion { major, minor } = target.min_ptx_version();
        let older = if minor == 0 {
            PtxVersion::new(major - 1, 8)
        } else {
            PtxVersion::new(major, minor - 1)
        };
        let ptx = vector_add(target).replacen(
            &format!(".version {}", target.min_ptx_version()),
            &format!(".version {older}"),
            1,
        );
        let result = toolchain.assemble(&ptx, target, &AssembleOptions::default());
        assert!(
            matches!(result, Err(ToolError::PtxasFailed { .. })),
            "{target} accepted .version {older}"
        );
    }
}

#[test]
fn broken_ptx_gives_ptxas_messages_and_the_offending_lines() {
    let Some(toolchain) = toolchain("broken_ptx_gives_ptxas_messages_and_the_offending_lines")
    else {
        return;
    };
    let ptx = header(Target::Sm80)
        + "
.visible .entry broken(.param .u64 a_ptr)
{
    .reg .b32 %r<4>;
    mov.u32 %r1, %tid.x;
    frobnicate.u32 %r3, %r1;
    ret;
}
";
    let error = toolchain
        .assemble(&ptx, Target::Sm80, &AssembleOptions::default())
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("ptxas rejected the PTX for sm_80"),
        "{message}"
    );
    assert!(
        message.contains("Not a name of any known instruction: 'frobnicate'"),
        "{message}"
    );
    assert!(
        message.contains(">    9 |     frobnicate.u32 %r3, %r1;"),
        "{message}"
    );
    let ToolError::PtxasFailed { report, .. } = error else {
        panic!("expected PtxasFailed")
    };
    assert_eq!(report.first_error_line(), Some(9));
}

#[test]
fn reports_spills_under_a_register_cap() {
    let Some(toolchain) = toolchain("reports_spills_under_a_register_cap") else {
        return;
    };
    // 48 values loaded up front and all used at the end cannot live in 24 registers
    let count = 48;
    let mut ptx = header(Target::Sm80);
    ptx += ".visible .entry spiller(.param .u64 in_ptr, .param .u64 out_ptr)\n{\n";
    ptx += &format!("    .reg .f32 %f<{}>;\n    .reg .b64 %rd<3>;\n", count + 1);
    ptx += "    ld.param.u64 %rd1, [in_ptr];\n    ld.param.u64 %rd2, [out_ptr];\n";
    ptx += "    cvta.to.global.u64 %rd1, %rd1;\n    cvta.to.global.u64 %rd2, %rd2;\n";
    for i in 0..count {
        ptx += &format!("    ld.global.volatile.f32 %f{i}, [%rd1+{}];\n", 4 * i);
    }
    ptx += &format!("    mov.f32 %f{count}, 0f00000000;\n");
    for i in 0..count {
        let j = count - 1 - i;
        ptx += &format!("    fma.rn.f32 %f{count}, %f{count}, %f{j}, %f{i};\n");
    }
    for i in 0..count {
        ptx += &format!("    st.global.volatile.f32 [%rd2+{}], %f{i};\n", 4 * i);
    }
    ptx += &format!("    st.global.f32 [%rd2], %f{count};\n    ret;\n}}\n");

    let uncapped = toolchain
        .assemble(&ptx, Target::Sm80, &AssembleOptions::default())
        .unwrap();
    assert!(!uncapped.report.function("spiller").unwrap().has_spills());

    let capped = AssembleOptions {
        max_register_count: Some(24),
        extra_args: vec!["--warn-on-spills".to_string()],
        ..AssembleOptions::default()
    };
    let assembled = toolchain.assemble(&ptx, Target::Sm80, &capped).unwrap();
    let kernel = assembled.report.function("spiller").unwrap();
    assert!(kernel.registers <= 24, "{kernel:?}");
    assert!(
        kernel.spill_store_bytes > 0 && kernel.spill_load_bytes > 0,
        "{kernel:?}"
    );
    assert!(
        kernel
            .notices
            .iter()
            .any(|n| n.severity == NoticeSeverity::Warning && n.message.contains("spilled")),
        "{:?}",
        kernel.notices
    );
}

#[test]
fn reports_shared_memory_and_performance_notices() {
    let Some(toolchain) = toolchain("reports_shared_memory_and_performance_notices") else {
        return;
    };
    let ptx = header(Target::Sm90a)
        + r#"
.visible .entry staged(.param .u64 out_ptr)
{
    .shared .align 16 .b8 tile[4096];
    .reg .b32 %r<4>;
    .reg .f32 %f<2>;
    .reg .b64 %rd<4>;
    mov.u32 %r1, %tid.x;
    shl.b32 %r2, %r1, 2;
    mov.u32 %r3, tile;
    add.u32 %r3, %r3, %r2;
    cvt.rn.f32.u32 %f1, %r1;
    st.shared.f32 [%r3], %f1;
    bar.sync 0;
    ld.shared.f32 %f1, [%r3+4];
    ld.param.u64 %rd1, [out_ptr];
    cvta.to.global.u64 %rd1, %rd1;
    mul.wide.u32 %rd2, %r1, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.f32 [%rd3], %f1;
    ret;
}

.visible .entry grows_registers()
{
    setmaxnreg.inc.sync.aligned.u32 232;
    ret;
}
"#;
    let assembled = toolchain
        .assemble(&ptx, Target::Sm90a, &AssembleOptions::default())
        .unwrap();
    let staged = assembled.report.function("staged").unwrap();
    assert_eq!(staged.shared_memory_bytes, 4096);
    assert_eq!(staged.barriers, 1);
    // setmaxnreg without .maxnreg is ignored, and ptxas says so only in the log
    assert!(
        assembled
            .report
            .notices
            .iter()
            .any(|n| n.code.as_deref() == Some("C7508")),
        "{}",
        assembled.log
    );
}

/// (kind, sm, payload size) of each entry of a fatbin: kind 1 is PTX, 2 is a cubin.
/// The layout is undocumented; this reads only what PTX-NOTES.md records.
fn fatbin_entries(fatbin: &[u8]) -> Vec<(u16, u32, u64)> {
    let u16_at = |at: usize| u16::from_le_bytes(fatbin[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(fatbin[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(fatbin[at..at + 8].try_into().unwrap());
    assert_eq!(u32_at(0), FATBIN_MAGIC);
    let header_size = usize::from(u16_at(6));
    let body_size = u64_at(8) as usize;
    assert_eq!(header_size + body_size, fatbin.len());
    let mut entries = Vec::new();
    let mut at = header_size;
    while at < fatbin.len() {
        let kind = u16_at(at);
        let entry_header_size = u32_at(at + 4) as usize;
        let payload_size = u64_at(at + 8);
        let sm = u32_at(at + 28);
        entries.push((kind, sm, payload_size));
        at += entry_header_size + payload_size as usize;
    }
    assert_eq!(at, fatbin.len());
    entries
}

#[test]
fn packs_two_cubins_and_a_ptx_fallback_into_a_fatbin() {
    let Some(toolchain) = toolchain("packs_two_cubins_and_a_ptx_fallback_into_a_fatbin") else {
        return;
    };
    let options = AssembleOptions::default();
    let sm80 = toolchain
        .assemble(&vector_add(Target::Sm80), Target::Sm80, &options)
        .unwrap();
    let sm90a = toolchain
        .assemble(&vector_add(Target::Sm90a), Target::Sm90a, &options)
        .unwrap();
    let fallback = vector_add(Target::Sm80);
    let cubins = [
        (Target::Sm80, sm80.cubin.clone()),
        (Target::Sm90a, sm90a.cubin.clone()),
    ];

    let only_cubins = toolchain.fatbin(&cubins, None).unwrap();
    let with_ptx = toolchain
        .fatbin(&cubins, Some((&fallback, Target::Sm80)))
        .unwrap();
    for fatbin in [&only_cubins, &with_ptx] {
        assert_eq!(
            u32::from_le_bytes(fatbin[..4].try_into().unwrap()),
            0xBA55_ED50
        );
    }
    let cubin_bytes = sm80.cubin.len() + sm90a.cubin.len();
    assert!(only_cubins.len() > cubin_bytes);
    assert!(with_ptx.len() > only_cubins.len());

    let entries = fatbin_entries(&with_ptx);
    let kinds_and_sms: Vec<_> = entries.iter().map(|&(kind, sm, _)| (kind, sm)).collect();
    assert_eq!(kinds_and_sms, [(2, 80), (2, 90), (1, 80)]);
    assert!(entries[0].2 >= sm80.cubin.len() as u64);
    assert!(entries[1].2 >= sm90a.cubin.len() as u64);
    assert!(entries[2].2 > 0);

    // slices work as well as vectors
    let borrowed = [(Target::Sm80, sm80.cubin.as_slice())];
    let single = toolchain.fatbin(&borrowed, None).unwrap();
    assert_eq!(fatbin_entries(&single), [(2, 80, entries[0].2)]);
}

#[test]
fn fatbin_refuses_ptx_the_driver_cannot_jit() {
    let Some(toolchain) = toolchain("fatbin_refuses_ptx_the_driver_cannot_jit") else {
        return;
    };
    let too_new = vector_add(Target::Sm80).replacen(".version 7.0", ".version 9.1", 1);
    let no_cubins: &[(Target, Vec<u8>)] = &[];
    let error = toolchain
        .fatbin(no_cubins, Some((&too_new, Target::Sm80)))
        .unwrap_err();
    assert!(matches!(error, ToolError::PtxTooNewForJit { cap, .. } if cap == JIT_PTX_VERSION_CAP));
    // PTX alone at the cap is fine
    let at_cap = vector_add(Target::Sm80).replacen(".version 7.0", ".version 9.0", 1);
    let fatbin = toolchain
        .fatbin(no_cubins, Some((&at_cap, Target::Sm80)))
        .unwrap();
    assert_eq!(fatbin_entries(&fatbin).len(), 1);
}

#[test]
fn fatbinary_rejects_a_cubin_labelled_with_the_wrong_target() {
    let Some(toolchain) = toolchain("fatbinary_rejects_a_cubin_labelled_with_the_wrong_target")
    else {
        return;
    };
    let sm80 = toolchain
        .assemble(
            &vector_add(Target::Sm80),
            Target::Sm80,
            &AssembleOptions::default(),
        )
        .unwrap();
    let error = toolchain
        .fatbin(&[(Target::Sm120, sm80.cubin)], None)
        .unwrap_err();
    assert!(
        matches!(error, ToolError::FatbinaryFailed { .. }),
        "{error}"
    );
}
