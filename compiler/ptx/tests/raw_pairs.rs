//! Raw element-pair loads (`kiln_kir::loads_raw_pairs`: a `LoadVec` of `I32` registers
//! from bf16/f16 memory) are one `ld.global.nc[.v2|.v4].b32` into the registers, with no
//! conversion, and assemble with ptxas for every target.

use kiln_ir::DType;
use kiln_kir::examples::raw_pairs_copy;
use kiln_ptx::{emit_module, AssembleOptions, EmitOptions, Target, Toolchain};

fn kernels() -> Vec<kiln_kir::Kernel> {
    [DType::BF16, DType::F16]
        .into_iter()
        .flat_map(|dtype| [1, 2, 4].map(|words| raw_pairs_copy(dtype, words)))
        .collect()
}

#[test]
fn a_raw_pair_load_is_one_b32_load_without_conversions() {
    for kernel in kernels() {
        let module = emit_module(
            std::slice::from_ref(&kernel),
            Target::Sm90a,
            &EmitOptions::default(),
        )
        .unwrap();
        let lines: Vec<&str> = module
            .text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("ld.global"))
            .collect();
        let words = kernel.name.rsplit("_x").next().unwrap();
        let want = match words {
            "1" => "ld.global.nc.b32 %r",
            "2" => "ld.global.nc.v2.b32 {",
            _ => "ld.global.nc.v4.b32 {",
        };
        assert_eq!(lines.len(), 1, "{}: {lines:?}", kernel.name);
        assert!(lines[0].starts_with(want), "{}: {lines:?}", kernel.name);
        // No element conversion (only the address arithmetic's integer `cvt`s).
        for conversion in ["cvt.f32", "cvt.rn", ".f16", ".bf16"] {
            assert!(
                !module.text.contains(conversion),
                "{}:\n{}",
                kernel.name,
                module.text
            );
        }
    }
}

#[test]
fn raw_pair_loads_assemble_for_every_target() {
    let toolchain = match Toolchain::discover() {
        Ok(toolchain) => toolchain,
        Err(error) if std::env::var("KILN_ALLOW_NO_PTXAS").as_deref() == Ok("1") => {
            eprintln!("NOT RUN: no ptxas ({error}); KILN_ALLOW_NO_PTXAS=1");
            return;
        }
        Err(error) => panic!("needs ptxas: {error}\n(set KILN_ALLOW_NO_PTXAS=1 to skip)"),
    };
    let kernels = kernels();
    for target in Target::ALL {
        let module = emit_module(&kernels, target, &EmitOptions::default()).unwrap();
        let assembled = toolchain
            .assemble(&module.text, target, &AssembleOptions::default())
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(assembled.report.functions.len(), kernels.len(), "{target}");
    }
}
