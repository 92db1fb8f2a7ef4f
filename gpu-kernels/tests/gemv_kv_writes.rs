//! `kv_write`s performed by the GEMV of a grid of segments (`templates::KvWrites`,
//! `GemmTuning::gemv_kv_writes`): decode q/k/v of one to four tokens whose k (RoPE'd: a warp
//! owns both columns of a rotary pair) and v values only a layer's `kv_write`s read. The
//! plans with and without it are run on the kir interpreter (each checked against the graph
//! interpreter) and on Cranelift: the same bits (lane 0 stores, reads back and writes each
//! value as the GEMV and the `kv_write` kernel did), padding slots (-1) storing nothing, and
//! one kernel fewer per layer; rows reading other columns than a rotary pair keep the
//! `kv_write` kernel. The 1.1B Llama decode step: 16 kernels fewer, its GEMVs assembled by
//! ptxas without spills.

mod common;

use common::{
    assert_assembles_without_spills, count, inputs_for, llama_1b, llama_decode_launches, lower,
    same_bits_with_and_without, toolchain,
};
use kiln_gpu_kernels::{GemmTuning, Options};
use kiln_ir::{DType, Tensor};
use kiln_kir::Kernel;
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn qkv(x: bf16[T, 264], wq: bf16[256, 264], wk: bf16[128, 264], wv: bf16[128, 264],
       pos: i32[T], slots: i32[T], kc: bf16[2, 6, 4, 2, 64], vc: bf16[2, 6, 4, 2, 64]) -> (bf16[T, 256], bf16[2, 6, 4, 2, 64], bf16[2, 6, 4, 2, 64]) {
    let q = linear(x, wq)
    let k = rope(linear(x, wk).view(T, 2, 64), pos, 10000.0)
    let v = linear(x, wv).view(T, 2, 64)
    (q, kv_write(kc, k, slots, 1), kv_write(vc, v, slots, 1))
}
fn qkv_bias(x: bf16[T, 520], wq: bf16[72, 520], wk: bf16[36, 520], wv: bf16[36, 520],
       bq: bf16[72], bk: bf16[36], bv: bf16[36],
       pos: i32[T], slots: i32[T], kc: bf16[1, 5, 4, 3, 12], vc: bf16[1, 5, 4, 3, 12]) -> (bf16[T, 72], bf16[1, 5, 4, 3, 12], bf16[1, 5, 4, 3, 12]) {
    let q = linear_bias(x, wq, bq)
    let k = rope(linear_bias(x, wk, bk).view(T, 3, 12), pos, 500000.0, scaling: \"llama3\", factor: 8.0)
    let v = linear_bias(x, wv, bv).view(T, 3, 12)
    (q, kv_write(kc, k, slots, 0), kv_write(vc, v, slots, 0))
}
fn shifted(x: bf16[T, 264], wq: bf16[256, 264], wk: bf16[128, 264], wv: bf16[128, 264],
       slots: i32[T], kc: bf16[2, 6, 4, 2, 64], vc: bf16[2, 6, 4, 2, 64]) -> (bf16[T, 256], bf16[2, 6, 4, 2, 64], bf16[2, 6, 4, 2, 64]) {
    let k = linear(x, wk).view(T, 2, 64)
    let turned = concat([k[..., 1:], k[..., :1]], axis: -1)
    (linear(x, wq), kv_write(kc, turned, slots, 1), kv_write(vc, linear(x, wv).view(T, 2, 64), slots, 1))
}
";

fn options(on: bool) -> Options {
    let mut options = Options::default();
    options.gemm = GemmTuning {
        gemv_kv_writes: on,
        ..options.gemm
    };
    options
}

/// Runs `function` at `t` tokens with and without the GEMV's writes (see
/// `same_bits_with_and_without`) and returns the launches of both plans. Slots: padding
/// (-1) for the second token, the rest scattered over the cache's blocks and offsets.
fn same_bits(function: &str, t: usize) -> (Vec<String>, Vec<String>) {
    let module = lower("gemv_kv_writes.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("T".to_string(), t)]);
    let mut inputs = inputs_for(func, &symbols, t, 23);
    let slots: Vec<i64> = (0..t as i64)
        .map(|i| if i == 1 { -1 } else { (i * 7 + 3) % 20 })
        .collect();
    let at = match function {
        "qkv" => 5,
        "qkv_bias" => 8,
        _ => 4,
    };
    inputs[at] = Tensor::from_ints(DType::I32, &[t], slots);
    same_bits_with_and_without(&module, function, &inputs, &BTreeMap::new(), t, options)
}

#[test]
fn the_qkv_gemv_writes_rotated_k_and_v_into_the_caches() {
    // GQA widths 256/128/128 (2 key heads of 64): one GEMV of segments, the k segment's
    // warps a rotary pair each; no kv_write kernel.
    for t in 1..=4 {
        let (with, without) = same_bits("qkv", t);
        assert_eq!(count(&without, "kv_write_x2"), 1, "T={t}: {without:?}");
        assert_eq!(count(&with, "kv_write_x2"), 0, "T={t}: {with:?}");
        assert_eq!(count(&with, "_seg_x3_kv_write_bf16"), 1, "T={t}: {with:?}");
        assert_eq!(with.len() + 1, without.len(), "T={t}: {with:?}");
    }
}

#[test]
fn biases_and_llama3_rope_scaling_give_the_kv_write_kernels_bits() {
    // Qwen2's q/k/v biases in the epilogue, llama3 RoPE scaling, 3 key heads of 12: 18
    // rotary pairs and 36 v columns, so blocks with warps past the segment's end.
    for t in [1, 2, 4] {
        let (with, without) = same_bits("qkv_bias", t);
        assert_eq!(count(&with, "kv_write"), 1, "T={t}: {with:?}");
        assert_eq!(count(&with, "_kv_write_bf16"), 1, "T={t}: {with:?}");
        assert_eq!(with.len() + 1, without.len(), "T={t}: {with:?}");
    }
}

#[test]
fn rows_reading_other_columns_keep_the_kv_write_kernel() {
    // Key rows turned by one column read another warp's column: the writes stay apart.
    let (with, without) = same_bits("shifted", 3);
    assert_eq!(with, without);
    assert_eq!(count(&with, "kv_write_x2"), 1, "{with:?}");
}

/// The 1.1B Llama decode step's launches and kernels with the GEMV's writes on and off.
fn llama_step(on: bool) -> (Vec<String>, Vec<Kernel>) {
    llama_decode_launches(&llama_1b(), &options(on))
}

#[test]
fn the_1b_llama_decode_step_launches_16_kernels_fewer() {
    let (with, _) = llama_step(true);
    let (without, _) = llama_step(false);
    println!(
        "decode step launches: {} with the GEMV's kv writes, {} without",
        with.len(),
        without.len()
    );
    assert_eq!(
        count(&with, "gemv_w4_u8_m1_seg_x3_kv_write"),
        16,
        "{with:?}"
    );
    assert_eq!(count(&with, "kv_write_x2"), 0, "{with:?}");
    assert_eq!(count(&without, "kv_write_x2"), 16, "{without:?}");
    assert_eq!(with.len() + 16, without.len());
}

#[test]
fn the_kv_writing_gemvs_of_the_1b_llama_assemble_without_spills() {
    let Some(toolchain) = toolchain() else { return };
    let (_, kernels) = llama_step(true);
    let fused: Vec<Kernel> = kernels
        .into_iter()
        .filter(|k| k.name.contains("gemv") && k.name.contains("_kv_write"))
        .collect();
    assert!(!fused.is_empty());
    for (target, name, regs) in assert_assembles_without_spills(&toolchain, &fused) {
        println!("{target:?} {name}: {regs} registers");
    }
}
