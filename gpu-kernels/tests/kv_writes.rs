//! `kv_write`s performed by a split-K GEMM's sum kernel (`templates::KvWrites`): decode
//! q/k/v as a split grid of segments whose k (RoPE'd) and v values only a layer's
//! `kv_write`s read. The plans with and without it are run on the kir interpreter (each
//! checked against the graph interpreter) and on Cranelift: the same bits (the sum kernel
//! adds, stores and reads back each value as the sum kernel and the `kv_write` kernel did),
//! and one kernel fewer per layer. The 1.1B Llama decode step: 16 kernels fewer, its sum
//! kernels assembled by ptxas without spills.

mod common;

use common::{
    assert_assembles_without_spills, count, inputs_for, launches, llama_1b, llama_decode_launches,
    lower, same_bits_with_and_without, toolchain,
};
use kiln_gpu_kernels::{compile_function, GemmTuning, Options};
use kiln_ir::{DType, Tensor};
use kiln_kir::Kernel;
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn qkv(x: bf16[T, 2048], wq: bf16[256, 2048], wk: bf16[128, 2048], wv: bf16[128, 2048],
       pos: i32[T], slots: i32[T], kc: bf16[2, 6, 4, 2, 64], vc: bf16[2, 6, 4, 2, 64]) -> (bf16[T, 256], bf16[2, 6, 4, 2, 64], bf16[2, 6, 4, 2, 64]) {
    let q = linear(x, wq)
    let k = rope(linear(x, wk).view(T, 2, 64), pos, 10000.0)
    let v = linear(x, wv).view(T, 2, 64)
    (q, kv_write(kc, k, slots, 1), kv_write(vc, v, slots, 1))
}
fn k_read_twice(x: bf16[T, 2048], wq: bf16[256, 2048], wk: bf16[128, 2048], wv: bf16[128, 2048],
       slots: i32[T], kc: bf16[2, 6, 4, 2, 64], vc: bf16[2, 6, 4, 2, 64]) -> (bf16[T, 256], bf16[T, 128], bf16[2, 6, 4, 2, 64], bf16[2, 6, 4, 2, 64]) {
    let k = linear(x, wk)
    (linear(x, wq), k * 2.0, kv_write(kc, k.view(T, 2, 64), slots, 1),
     kv_write(vc, linear(x, wv).view(T, 2, 64), slots, 1))
}
";

fn options(kv_writes: bool) -> Options {
    Options {
        gemm: GemmTuning {
            kv_writes,
            ..common::mma_options().gemm
        },
        ..common::mma_options()
    }
}

/// The caches' slots: 6 blocks of 4.
const SLOTS: i64 = 24;

/// The slots of `t` tokens: padding (-1) for two tokens in seven, the rest scattered over
/// the caches' blocks and offsets, each slot taken once: a token whose slot an earlier one
/// took is padding too. Two tokens writing one slot would race: the blocks of a `kv_write`
/// kernel run in no set order (on a GPU, and on the CPU backend's worker threads), so which
/// token's row a shared slot keeps depends on timing, and the runs of one plan differ.
fn slots(t: usize) -> Vec<i64> {
    let mut taken = [false; SLOTS as usize];
    (0..t as i64)
        .map(|i| match i % 7 {
            2 | 5 => -1,
            _ => {
                let slot = (i * 5 + 3) % SLOTS;
                if std::mem::replace(&mut taken[slot as usize], true) {
                    -1
                } else {
                    slot
                }
            }
        })
        .collect()
}

/// Runs `function` at `t` tokens with and without the fused writes on the kir interpreter
/// (against the graph interpreter) and on Cranelift; asserts the four results are the same
/// bits and returns the launches of both plans. Slots: [`slots`].
fn same_bits(function: &str, t: usize) -> (Vec<String>, Vec<String>) {
    let module = lower("kv_writes.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols = BTreeMap::from([("T".to_string(), t)]);
    let mut inputs = inputs_for(func, &symbols, t, 17);
    let slots = slots(t);
    let at = if function == "qkv" { 5 } else { 4 };
    inputs[at] = Tensor::from_ints(DType::I32, &[t], slots);
    same_bits_with_and_without(&module, function, &inputs, &BTreeMap::new(), t, options)
}

#[test]
fn no_two_tokens_write_one_slot() {
    // The bits compared across plans and backends are defined only when every slot is
    // written at most once (see `slots`); 40 tokens outnumber the 24 slots.
    for t in [1, 3, 7, 16, 24, 25, 40, 64] {
        let slots = slots(t);
        let written: Vec<i64> = slots.iter().copied().filter(|&s| s >= 0).collect();
        let distinct: std::collections::BTreeSet<i64> = written.iter().copied().collect();
        assert_eq!(distinct.len(), written.len(), "T={t}: {slots:?}");
        assert!(written.iter().all(|&s| s < SLOTS), "T={t}: {slots:?}");
        // Up to one token a slot, only the two tokens in seven are padding.
        if t <= SLOTS as usize {
            let tokens = (0..t).filter(|i| !matches!(i % 7, 2 | 5)).count();
            assert_eq!(written.len(), tokens, "T={t}: {slots:?}");
        }
    }
}

#[test]
fn the_sum_kernel_of_a_split_qkv_grid_writes_k_and_v_into_the_caches() {
    // K = 2048, widths 256/128/128: a split grid of segments at decode sizes. The sum
    // kernel stores q and writes RoPE'd k and v at their slots; no kv_write kernel.
    for t in [1, 7, 16] {
        let (with, without) = same_bits("qkv", t);
        assert_eq!(count(&without, "kv_write_x2"), 1, "T={t}: {without:?}");
        assert_eq!(count(&with, "kv_write_x2"), 0, "T={t}: {with:?}");
        assert_eq!(count(&with, "_sum_x3_kv_write"), 1, "T={t}: {with:?}");
        assert_eq!(with.len() + 1, without.len(), "T={t}: {with:?}");
    }
}

#[test]
fn the_gemv_variant_writes_k_and_v_itself() {
    // With the GEMV on (the default), at most four tokens take it: q/k/v in one kernel of
    // segments that also writes RoPE'd k and v into the caches (`GemmTuning::gemv_kv_writes`,
    // tests/gemv_kv_writes.rs), the same bits whether this switch is on or off (it is moot:
    // the GEMV never splits); 7 and 16 tokens take the split grid whose sum kernel performs
    // the writes with the switch on, the kv_write kernel without.
    let module = lower("kv_writes.kiln", SRC, None, None);
    let func = module.function("qkv").unwrap();
    for t in [1, 4, 7, 16] {
        let symbols = BTreeMap::from([("T".to_string(), t)]);
        let mut inputs = inputs_for(func, &symbols, t, 17);
        let slots: Vec<i64> = (0..t as i64).map(|i| (i * 5 + 3) % 24).collect();
        inputs[5] = Tensor::from_ints(DType::I32, &[t], slots);
        let with_gemv = |kv_writes: bool| {
            let mut o = options(kv_writes);
            o.gemm.gemv = true;
            o
        };
        let (with, without) =
            same_bits_with_and_without(&module, "qkv", &inputs, &BTreeMap::new(), t, with_gemv);
        if t <= 4 {
            assert_eq!(with, without, "T={t}");
            assert_eq!(count(&with, "_seg_x3_kv_write"), 1, "T={t}: {with:?}");
            assert_eq!(count(&with, "kv_write_x2"), 0, "T={t}: {with:?}");
        } else {
            assert_eq!(count(&with, "_sum_x3_kv_write"), 1, "T={t}: {with:?}");
            assert_eq!(with.len() + 1, without.len(), "T={t}: {with:?}");
        }
    }
}

#[test]
fn prefill_sizes_keep_the_kv_write_kernel() {
    // 40 rows take the prefill tile (no split, no sum kernel): the kv_write kernel runs.
    let (with, without) = same_bits("qkv", 40);
    assert_eq!(with, without);
    assert_eq!(count(&with, "kv_write_x2"), 1, "{with:?}");
}

#[test]
fn a_key_read_by_another_kernel_keeps_the_kv_write_kernel() {
    // k is also a result (k * 2.0): its buffer must be stored, the writes stay apart.
    let (with, without) = same_bits("k_read_twice", 3);
    assert_eq!(with, without);
    assert_eq!(count(&with, "kv_write_x2"), 1, "{with:?}");
}

#[test]
fn the_1b_llama_decode_step_launches_16_kernels_fewer() {
    // Every layer's k and v writes go into its q/k/v sum kernel (layer 0's computing
    // RoPE's angles inline: their kernel runs after the GEMM).
    let module = llama_1b();
    let mut counts = Vec::new();
    for kv_writes in [true, false] {
        let (names, _) = llama_decode_launches(&module, &options(kv_writes));
        counts.push((
            names.len(),
            count(&names, "_kv_write_bf16"),
            count(&names, "kv_write_x2"),
        ));
    }
    println!("decode step launches (kernels, fused sums, kv_write kernels): {counts:?}");
    let (with, fused, left) = counts[0];
    let (without, _, writes) = counts[1];
    assert_eq!((fused, left, writes), (16, 0, 16));
    assert_eq!(with + 16, without);
    // Prefill sizes keep every kv_write kernel.
    let compiled = compile_function(&module, "step", &common::mma_options()).unwrap();
    let sizes = BTreeMap::from([
        ("T".to_string(), 128),
        ("B".to_string(), 1),
        ("MB".to_string(), 8),
        ("NB".to_string(), 64),
    ]);
    let names = launches(&compiled.plan, &compiled.kernels, &sizes);
    assert_eq!(count(&names, "kv_write_x2"), 16);
}

#[test]
fn the_kv_writing_sum_kernels_of_the_1b_llama_assemble_without_spills() {
    let Some(toolchain) = toolchain() else { return };
    let compiled = compile_function(&llama_1b(), "step", &options(true)).unwrap();
    let fused: Vec<Kernel> = compiled
        .kernels
        .into_iter()
        .filter(|k| k.name.contains("_kv_write_bf16"))
        .collect();
    assert!(!fused.is_empty());
    assert_assembles_without_spills(&toolchain, &fused);
}
