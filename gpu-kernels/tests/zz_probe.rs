//! Scratch probe (not committed): registers and spills of the 1.1B decode step's GEMVs.
mod common;
use common::{llama_1b, llama_decode_launches, toolchain};

#[test]
fn probe() {
    let Some(toolchain) = toolchain() else { return };
    let mut options = kiln_gpu_kernels::Options::default();
    options.gemm.norm_prologue = std::env::var("PROBE_NORM").as_deref() != Ok("0");
    options.gemm.preload = std::env::var("PROBE_PRELOAD").as_deref() == Ok("1");
    if let Ok(b) = std::env::var("PROBE_BLOCKS") {
        options.gemm.gemv_blocks = b.parse().unwrap();
    }
    let (_, kernels) = llama_decode_launches(&llama_1b(), &options);
    let mut seen = std::collections::BTreeSet::new();
    for target in kiln_ptx::Target::ALL {
        for k in kernels.iter().filter(|k| k.name.contains("gemv")) {
            let ptx =
                kiln_ptx::emit_ptx(std::slice::from_ref(k), target, &Default::default()).unwrap();
            let body: String = ptx
                .lines()
                .filter(|l| !l.contains("// ") && !l.contains(".entry") && !l.contains("// kernel"))
                .collect::<Vec<_>>()
                .join("\n");
            let name = k.name.split_once('_').unwrap().1.to_string();
            if !seen.insert((target.sm_name().to_string(), name, body)) {
                continue;
            }
            let a = toolchain
                .assemble(&ptx, target, &Default::default())
                .unwrap();
            let r = a
                .report
                .functions
                .iter()
                .find(|f| f.name == k.name)
                .unwrap();
            println!(
                "PROBE {:>7} {:<48} {:>3} regs spill {}/{}",
                target.sm_name(),
                k.name,
                r.registers,
                r.spill_store_bytes,
                r.spill_load_bytes
            );
        }
    }
}
