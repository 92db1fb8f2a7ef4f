//! The RMSNorm computed in the GEMV's prologue (`templates::NormPrologues`,
//! `GemmTuning::norm_prologue`): where every reader of an RMSNorm's rows is a GEMV, each
//! warp of the GEMV computes the rows' statistic itself and A in registers, and the norm
//! kernel launches nothing. The plans with and without it run on the kir interpreter
//! (against the graph interpreter) and on Cranelift and give the same bits here: the rows
//! are rounded to their dtype as the row kernel stores them, and the statistic of a row of
//! at most 1024 elements is added in the row kernel's order (longer rows in a warp's order,
//! which these inputs' results do not show). M = 1 to 4 through a symbolic row count and a
//! constant one, rows of a warp (K ≤ 1024, a ragged last chunk) and of a block (K = 2048,
//! and 1040 with a ragged last chunk), bf16 and f16, q/k/v segments, gate/up, a residual
//! add before the norm, the gathered rows of an LM head; the norm kept where something else
//! reads its rows and from five rows on. The 1.1B decode step at one token: 17 kernels
//! fewer (the q/k/v GEMV writing the caches keeps its norm); no barrier and no shared
//! array in the `_norm` GEMVs; ptxas for the five targets without spills.

mod common;

use common::{
    assert_assembles_without_spills, count, inputs_for, llama_1b, llama_decode_launches, lower,
    same_bits_with_and_without, toolchain,
};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use kiln_kir::Stmt;
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn qkv(h: bf16[T, 1024], g: bf16[1024], q: bf16[64, 1024], k: bf16[32, 1024], v: bf16[32, 1024]) -> (bf16[T, 64], bf16[T, 32], bf16[T, 32]) {
    let x = rms_norm(h, g, 0.00001)
    (linear(x, q), linear(x, k), linear(x, v))
}
fn mlp(h: bf16[T, 2048], g: bf16[2048], gate: bf16[40, 2048], up: bf16[40, 2048]) -> bf16[T, 40] {
    let x = rms_norm(h, g, 0.00001)
    silu(linear(x, gate)) * linear(x, up)
}
fn ragged(x: f16[T, 264], w: f16[264, 264], g: f16[264], w2: f16[37, 264]) -> (f16[T, 264], f16[T, 37]) {
    let h = x + linear(x, w)
    (h, linear(rms_norm(h, g, 0.00001), w2))
}
fn head(h: bf16[4, 1040], last: i32[T], g: bf16[1040], w: bf16[45, 1040]) -> bf16[T, 45] {
    linear(rms_norm(h[last], g, 0.00001), w)
}
fn shared(h: bf16[T, 264], g: bf16[264], w: bf16[37, 264]) -> (bf16[T, 264], bf16[T, 37]) {
    let x = rms_norm(h, g, 0.00001)
    (x, linear(x, w))
}
fn two(h: bf16[2, 2048], g: bf16[2048], w: bf16[30, 2048]) -> bf16[2, 30] {
    linear(rms_norm(h, g, 0.00001), w)
}
";

fn options(on: bool) -> Options {
    Options {
        gemm: GemmTuning {
            norm_prologue: on,
            ..GemmTuning::default()
        },
        ..Options::default()
    }
}

/// Runs `function` at `T = t` with and without the prologue (kir interpreter against the
/// graph interpreter, and Cranelift; the same bits) and returns both plans' launches.
fn same_bits(function: &str, t: usize) -> (Vec<String>, Vec<String>) {
    let module = lower("norm_gemv.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("T".to_string(), t)]);
    let inputs = inputs_for(func, &symbols, t, 23);
    same_bits_with_and_without(&module, function, &inputs, &BTreeMap::new(), t, options)
}

#[test]
fn one_to_four_rows_compute_the_norm_in_the_gemv() {
    for function in ["qkv", "mlp", "ragged", "head"] {
        for t in 1..=4 {
            let (with, without) = same_bits(function, t);
            assert_eq!(count(&with, "rms_norm"), 0, "{function} T={t}: {with:?}");
            assert_eq!(count(&with, "_norm"), 1, "{function} T={t}: {with:?}");
            assert_eq!(
                count(&without, "rms_norm"),
                1,
                "{function} T={t}: {without:?}"
            );
            assert_eq!(count(&without, "_norm"), 1, "{function} T={t}: {without:?}");
            assert_eq!(with.len() + 1, without.len(), "{function} T={t}: {with:?}");
        }
    }
    // The segments of q/k/v and the shared warp of gate/up keep their shapes.
    let (with, _) = same_bits("qkv", 2);
    assert!(with[0].starts_with("gemv_w4_u4_m4_seg_norm_x3"), "{with:?}");
    let (with, _) = same_bits("mlp", 3);
    // At most 48 weight registers a step for the pair (`gemv::NORM_WEIGHT_REGISTERS`).
    assert!(with[0].starts_with("gemv_w4_u3_m4_norm_x2"), "{with:?}");
}

#[test]
fn five_rows_and_more_keep_the_norm_kernel() {
    for function in ["qkv", "mlp", "ragged"] {
        for t in [5, 16] {
            let (with, without) = same_bits(function, t);
            assert_eq!(with, without, "{function} T={t}");
            assert_eq!(count(&with, "rms_norm"), 1, "{function} T={t}: {with:?}");
            // Past four rows no GEMV (the tensor-core GEMV or the decode tile).
            let gemvs = with.iter().filter(|n| n.starts_with("gemv")).count();
            assert_eq!(gemvs, 0, "{function} T={t}: {with:?}");
        }
    }
}

#[test]
fn rows_read_by_anything_else_keep_the_norm_kernel() {
    for t in 1..=4 {
        let (with, without) = same_bits("shared", t);
        assert_eq!(with, without, "T={t}");
        assert_eq!(count(&with, "rms_norm"), 1, "T={t}: {with:?}");
    }
}

#[test]
fn constant_rows_lose_the_norm_kernel_outright() {
    let module = lower("norm_gemv.kiln", SRC, None, None);
    let compiled = compile_function(&module, "two", &options(true)).unwrap();
    let names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["k0_gemv_w4_u4_m2_norm_bf16"]);
    let (with, without) = same_bits("two", 2);
    assert_eq!((with.len(), without.len()), (1, 2), "{with:?} {without:?}");
}

#[test]
fn the_knob_parses() {
    let mut tuning = GemmTuning::default();
    assert!(!tuning.norm_prologue, "off by default (slower on the H100)");
    tuning.set("normgemv", "1").unwrap();
    assert!(tuning.norm_prologue);
    tuning.set("normgemv", "0").unwrap();
    assert!(!tuning.norm_prologue);
    tuning.set("normgemv", "1").unwrap();
    assert!(tuning.norm_prologue);
}

#[test]
fn the_1b_llama_decode_step_launches_no_norm_kernel_at_one_token() {
    let module = llama_1b();
    let (with, kernels) = llama_decode_launches(&module, &options(true));
    let (without, _) = llama_decode_launches(&module, &options(false));
    println!(
        "decode step launches: {} with the norm prologue, {} without",
        with.len(),
        without.len()
    );
    // Two norms a layer and the final one. The gate/up GEMVs and the LM head compute
    // theirs (the final one reads the gathered last rows through the GEMV's element
    // expressions); the q/k/v GEMV, which writes the caches, keeps its norm kernel.
    assert_eq!(count(&without, "rms_norm"), 33, "{without:?}");
    assert_eq!(count(&with, "rms_norm"), 16, "{with:?}");
    assert_eq!(with.len() + 17, without.len(), "{with:?}");
    assert_eq!(count(&with, "_norm_x2"), 16, "{with:?}");
    assert_eq!(count(&with, "gemv_w4_u4_m1_norm_epilogue"), 1, "{with:?}");
    assert_eq!(count(&with, "seg_norm"), 0, "{with:?}");
    // The prefill-sized variants keep their norm kernels.
    assert!(
        kernels.iter().any(|k| k.name.contains("rms_norm")),
        "no norm kernel left for the larger variants"
    );
}

#[test]
fn the_norm_gemv_kernels_assemble_without_spills() {
    let Some(toolchain) = toolchain() else { return };
    let (_, kernels) = llama_decode_launches(&llama_1b(), &options(true));
    let mut norms: Vec<kiln_kir::Kernel> = kernels
        .into_iter()
        .filter(|k| k.name.contains("gemv") && k.name.contains("_norm"))
        .collect();
    // And q/k/v's where its GEMV leaves the cache writes to the kv_write kernel.
    let mut no_kv = options(true);
    no_kv.gemm.gemv_kv_writes = false;
    let (names, kernels) = llama_decode_launches(&llama_1b(), &no_kv);
    assert_eq!(count(&names, "seg_norm_x3"), 16, "{names:?}");
    assert_eq!(count(&names, "rms_norm"), 0, "{names:?}");
    norms.extend(
        kernels
            .into_iter()
            .filter(|k| k.name.contains("gemv") && k.name.contains("seg_norm")),
    );
    // One of each distinct body (layers differ: the first layer's norm reads the
    // embedding rows).
    let mut seen = std::collections::BTreeSet::new();
    norms.retain(|k| seen.insert(format!("{:?}{:?}", k.params, k.body)));
    let module = lower("norm_gemv.kiln", SRC, None, None);
    for function in ["qkv", "ragged", "head"] {
        let compiled = compile_function(&module, function, &options(true)).unwrap();
        norms.extend(
            compiled
                .kernels
                .into_iter()
                .filter(|k| k.name.contains("gemv") && k.name.contains("_norm")),
        );
    }
    assert!(
        norms.len() >= 5,
        "{:?}",
        norms.iter().map(|k| &k.name).collect::<Vec<_>>()
    );
    let registers = assert_assembles_without_spills(&toolchain, &norms);
    for (target, name, regs) in &registers {
        println!("{target:?} {name}: {regs} registers");
    }
}

#[test]
fn the_norm_gemv_kernels_have_no_barrier_and_no_shared_array() {
    // Every warp computes the statistic itself and A in registers: nothing is shared
    // between the block's warps. The first step's weights are loaded before the statistic.
    let module = lower("norm_gemv.kiln", SRC, None, None);
    let mut kernels = Vec::new();
    for function in ["qkv", "mlp", "ragged", "head", "two"] {
        let compiled = compile_function(&module, function, &options(true)).unwrap();
        kernels.extend(compiled.kernels);
    }
    kernels.extend(llama_decode_launches(&llama_1b(), &options(true)).1);
    let norms: Vec<&kiln_kir::Kernel> = kernels
        .iter()
        .filter(|k| k.name.contains("gemv") && k.name.contains("_norm"))
        .collect();
    assert!(norms.len() >= 8, "{}", norms.len());
    for kernel in norms {
        kiln_kir::verify_kernel(kernel).unwrap_or_else(|e| panic!("{e}"));
        let barrier = kernel.body.iter().any(|s| s.any(&|s| *s == Stmt::Barrier));
        assert!(!barrier, "{}: a barrier", kernel.name);
        assert!(
            kernel.shared.is_empty(),
            "{}: {:?}",
            kernel.name,
            kernel.shared
        );
        // The first weight loads come before the first shuffle (the statistic's).
        let mut order = Vec::new();
        first_events(&kernel.body, &mut order);
        let load = order.iter().position(|&e| e == "load");
        let shuffle = order.iter().position(|&e| e == "shuffle");
        assert!(
            load.is_some() && load < shuffle,
            "{}: {order:?}",
            kernel.name
        );
    }
}

/// The weight loads and shuffles of `stmts` in order (nested ones included).
fn first_events(stmts: &[Stmt], out: &mut Vec<&'static str>) {
    for stmt in stmts {
        match stmt {
            Stmt::LoadVec { .. } => out.push("load"),
            Stmt::ShuffleXor { .. } => out.push("shuffle"),
            Stmt::If {
                then, otherwise, ..
            } => {
                first_events(then, out);
                first_events(otherwise, out);
            }
            Stmt::For { body, .. } => first_events(body, out),
            _ => {}
        }
    }
}

#[test]
fn the_norm_gemv_kernel_snapshot() {
    // Two rows of 2048: each warp's statistic of both rows, A computed in registers.
    let module = lower("norm_gemv.kiln", SRC, None, None);
    let compiled = compile_function(&module, "two", &options(true)).unwrap();
    let ptx = kiln_ptx::emit_ptx(
        &compiled.kernels,
        kiln_ptx::Target::Sm90a,
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!ptx.contains("bar.sync"), "{ptx}");
    assert!(!ptx.contains(".shared"), "{ptx}");
    assert!(ptx.contains("cvt.rn.bf16.f32"), "{ptx}");
    insta::assert_snapshot!(ptx);
}

#[test]
fn with_normqkv_the_cache_writing_qkv_gemv_computes_its_norm_too_without_spills() {
    let module = llama_1b();
    let mut with_qkv = options(true);
    with_qkv.gemm.norm_prologue_kv_writes = true;
    let (names, kernels) = llama_decode_launches(&module, &with_qkv);
    // Every norm of the step is computed by the GEMVs reading it.
    assert_eq!(count(&names, "rms_norm"), 0, "{names:?}");
    assert_eq!(count(&names, "seg_norm_x3_kv_write"), 16, "{names:?}");
    let Some(toolchain) = toolchain() else { return };
    let mut seen = std::collections::BTreeSet::new();
    let qkv: Vec<kiln_kir::Kernel> = kernels
        .into_iter()
        .filter(|k| k.name.contains("seg_norm"))
        .filter(|k| seen.insert(format!("{:?}{:?}", k.params, k.body)))
        .collect();
    assert!(!qkv.is_empty());
    assert_assembles_without_spills(&toolchain, &qkv);
}
