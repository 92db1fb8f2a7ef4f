//! The tensor-core GEMM kernels at LLM shapes (Llama-3-8B projections, a fused gate/up pair,
//! decode-sized M, f16) assemble with ptxas for all five targets without spilling a register
//! (ptxas's own `-v` report). Without ptxas the test fails with the install command, unless
//! `KILN_ALLOW_NO_PTXAS=1`, when it says it was not run.

mod common;

use common::lower;
use kiln_gpu_kernels::Options;
use kiln_ptx::{emit_ptx, AssembleOptions, EmitOptions, Target, Toolchain};

const SRC: &str = "import nn
fn q_proj(x: bf16[T, 4096], w: bf16[4096, 4096]) -> bf16[T, 4096] { linear(x, w) }
fn down(x: bf16[T, 14336], w: bf16[4096, 14336], r: bf16[T, 4096]) -> bf16[T, 4096] { linear(x, w) + r }
fn gate_up(x: bf16[T, 4096], gate: bf16[14336, 4096], up: bf16[14336, 4096]) -> bf16[T, 14336] { silu(linear(x, gate)) * linear(x, up) }
fn decode(x: bf16[16, 4096], w: bf16[14336, 4096]) -> bf16[16, 14336] { linear(x, w) }
fn square(a: f16[4096, 4096], b: f16[4096, 4096]) -> f16[4096, 4096] { a @ b }
";

#[test]
fn llm_shaped_gemms_assemble_for_every_target_without_spills() {
    let toolchain = match Toolchain::discover() {
        Ok(t) => t,
        Err(e) if std::env::var("KILN_ALLOW_NO_PTXAS").as_deref() == Ok("1") => {
            eprintln!("NOT RUN (no ptxas): {e}");
            return;
        }
        Err(e) => panic!("{e}\n(set KILN_ALLOW_NO_PTXAS=1 to skip)"),
    };
    let module = lower("llm_gemms.kiln", SRC, None, None);
    let mut kernels = Vec::new();
    for function in ["q_proj", "down", "gate_up", "decode", "square"] {
        let compiled =
            kiln_gpu_kernels::compile_function(&module, function, &Options::default()).unwrap();
        let gemms: Vec<_> = compiled
            .kernels
            .into_iter()
            .filter(|k| k.name.contains("mma_gemm"))
            .collect();
        assert_eq!(gemms.len(), 1, "{function}: one tensor-core kernel");
        kernels.extend(gemms);
    }
    for target in Target::ALL {
        for kernel in &kernels {
            let ptx = emit_ptx(std::slice::from_ref(kernel), target, &EmitOptions::default())
                .unwrap_or_else(|e| panic!("{e}"));
            let assembled = toolchain
                .assemble(&ptx, target, &AssembleOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
            let report = assembled
                .report
                .functions
                .iter()
                .find(|f| f.name == kernel.name)
                .unwrap_or_else(|| panic!("no report for {}:\n{}", kernel.name, assembled.log));
            println!(
                "{:>7} {:<50} {:>3} registers, {} bytes smem",
                target.sm_name(),
                kernel.name,
                report.registers,
                report.shared_memory_bytes
            );
            assert!(
                !report.has_spills(),
                "{} spills on {target}:\n{}",
                kernel.name,
                assembled.log
            );
        }
    }
}
