//! The paged-decode partial kernel that merges the partitions itself
//! (`PagedTuning::fused_merge`): each block counts itself in a zeroed per-(token, key/value
//! head) counter with an atomic add, the last to arrive merges the partitions' states and
//! stores the output, then resets the counter. Against the graph interpreter and the
//! two-kernel path (the same bits) on the kernel-IR interpreter and on Cranelift (whose
//! blocks run on several threads at once; the plan run twice on one executor): ragged
//! contexts, a prefill chunk beside decode tokens, a padding token, GQA and MHA, head dims
//! 64 and 128, f32 and bf16, several partitions (short tables of 32 positions a partition,
//! long ones of 1024), two layers' attention in one plan sharing the counters (a counter
//! left non-zero loses the second layer's output); the 1.1B decode step's launches at one
//! token (16 merge kernels fewer); ptxas for every target without spills.

mod common;

use common::{
    assert_assembles_without_spills, count, launches, llama_1b, llama_decode_launches,
    llama_step_launches, lower, run_plan,
};
use kiln_gpu_kernels::{Options, PagedTuning};
use kiln_ir::{DType, Tensor};
use std::collections::BTreeMap;

/// `attend`: layer 0's attention plus layer 1's (one plan, two launches sharing the
/// counters), symbolic block tables `[B, MB]` and cache `[2, NB, bs, kv, d]`.
fn source(dtype: &str, heads: usize, kv: usize, d: usize, bs: usize) -> String {
    format!(
        "import nn\n\
         fn attend(q: {dtype}[N, {heads}, {d}], k_cache: {dtype}[2, NB, {bs}, {kv}, {d}], \
         v_cache: {dtype}[2, NB, {bs}, {kv}, {d}], block_tables: i32[B, MB], seq: i32[N], \
         pos: i32[N]) -> ({dtype}[N, {heads}, {d}], {dtype}[N, {heads}, {d}]) {{\n\
         (paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 0), \
         paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 1))\n}}\n"
    )
}

/// Inputs for block tables of `positions` positions: three sequences; tokens 0..3 a
/// prefill chunk of sequence 0, then its last position, a padding token, sequence 2's
/// first position, a short context of sequence 1 and one of half the table.
fn inputs(
    dtype: &str,
    heads: usize,
    kv: usize,
    d: usize,
    bs: usize,
    positions: usize,
) -> Vec<Tensor> {
    let (batch, width) = (3usize, positions / bs);
    let blocks = batch * width + 3;
    let mut rng = common::Rng(0x3E46 + (d + heads + bs + positions) as u64);
    let dt = DType::from_name(dtype).expect("dtype");
    let mut random = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_f32(
            shape,
            (0..n).map(|_| (rng.next() * 2.0 - 1.0) as f32).collect(),
        )
        .cast(dt)
    };
    let tokens = 8;
    let last = positions as i64 - 1;
    let int = |shape: &[usize], v: Vec<i64>| Tensor::from_ints(DType::I32, shape, v);
    vec![
        random(&[tokens, heads, d]),
        random(&[2, blocks, bs, kv, d]),
        random(&[2, blocks, bs, kv, d]),
        int(
            &[batch, width],
            (0..batch * width)
                .map(|i| ((i * 5 + 1) % blocks) as i64)
                .collect(),
        ),
        int(&[tokens], vec![0, 0, 0, 0, -1, 2, 1, 1]),
        int(
            &[tokens],
            vec![last - 3, last - 2, last - 1, last, 5, 0, 18, last / 2],
        ),
    ]
}

fn options(fused: bool) -> Options {
    Options {
        paged: PagedTuning {
            fused_merge: fused,
            ..PagedTuning::default()
        },
        ..Options::default()
    }
}

/// Runs `attend` with the fused merge on and off, each on the kernel-IR interpreter
/// (checked against the graph interpreter) and twice on Cranelift; asserts that every
/// result is the same bits; returns the launched kernels' names (on, off).
fn run(
    (dtype, heads, kv, d, bs): (&str, usize, usize, usize, usize),
    positions: usize,
) -> (Vec<String>, Vec<String>) {
    let module = lower(
        "paged_fused_merge.kiln",
        &source(dtype, heads, kv, d, bs),
        None,
        None,
    );
    let inputs = inputs(dtype, heads, kv, d, bs, positions);
    let weights = BTreeMap::new();
    let func = module.function("attend").expect("attend");
    let want = kiln_ir::interpret(func, &inputs, &weights).expect("graph interpreter");
    let mut results: Vec<(String, Vec<Tensor>)> = Vec::new();
    let mut names = Vec::new();
    for fused in [true, false] {
        let compiled = common::check(&module, "attend", &inputs, &weights, &options(fused));
        let got = run_plan(&compiled.kernels, &compiled.plan, &inputs, &weights).unwrap();
        results.push((format!("fused {fused}, kir interpreter"), got));
        let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
        for launch in 0..2 {
            let got = cpu
                .run(&compiled.plan, &inputs, &|name| weights.get(name))
                .unwrap_or_else(|e| panic!("Cranelift: {e}"));
            for (g, w) in got.iter().zip(&want) {
                let (err, tol) = (common::rel_err(g, w), common::tolerance(w.dtype));
                assert!(err <= tol, "Cranelift: relative error {err:e} > {tol:e}");
            }
            results.push((format!("fused {fused}, Cranelift run {launch}"), got));
        }
        let sizes = BTreeMap::from([
            ("N".to_string(), inputs[0].shape[0] as u64),
            ("B".to_string(), 3),
            ("MB".to_string(), inputs[3].shape[1] as u64),
            ("NB".to_string(), inputs[1].shape[1] as u64),
        ]);
        names.push(launches(&compiled.plan, &compiled.kernels, &sizes));
    }
    // Each backend gives the fused path the two-kernel path's bits (the backends' `exp`
    // may differ from each other in the last bit), and a second run the first run's.
    let fused = results.len() / 2;
    for (k, (what, got)) in results.iter().enumerate() {
        let (first, want) = &results[k % fused];
        if k == k % fused {
            continue;
        }
        same_bits(got, want, &format!("{what} against {first}"));
    }
    same_bits(
        &results[2].1,
        &results[1].1,
        "the second Cranelift run of the fused path",
    );
    let off = names.pop().unwrap();
    (names.pop().unwrap(), off)
}

/// Asserts that `got` and `want` are the same bits, naming the first element that differs.
fn same_bits(got: &[Tensor], want: &[Tensor], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64_vec(), w.to_f64_vec());
        let differ = g
            .iter()
            .zip(&w)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            differ.is_none(),
            "{what}: result {i} differs at element {differ:?} ({:?} against {:?})",
            differ.map(|at| g[at]),
            differ.map(|at| w[at]),
        );
    }
}

const SHAPES: [(&str, usize, usize, usize, usize); 5] = [
    ("bf16", 8, 2, 128, 16),
    ("bf16", 8, 2, 64, 4),
    ("f32", 4, 4, 64, 16),
    ("f32", 8, 2, 128, 4),
    ("bf16", 32, 8, 64, 16),
];

#[test]
fn short_tables_merge_in_the_last_block_with_the_merge_kernels_bits() {
    // 160 positions: the short variant, five partitions of 32.
    for shape in SHAPES {
        let (on, off) = run(shape, 160);
        assert_eq!(count(&on, "paged_attention_partial_merge"), 2, "{on:?}");
        assert_eq!(count(&on, "paged_attention_merge"), 0, "{on:?}");
        assert_eq!(count(&off, "paged_attention_partial_merge"), 0, "{off:?}");
        assert_eq!(count(&off, "paged_attention_merge"), 2, "{off:?}");
        assert_eq!(on.len() + 2, off.len(), "{on:?} {off:?}");
    }
}

#[test]
fn long_tables_merge_in_the_last_block_with_the_merge_kernels_bits() {
    // 2080 positions: the long-context kernel (tensor cores for bf16 at d 64 and 128), three
    // partitions of 1024.
    for shape in [SHAPES[0], SHAPES[2], SHAPES[4]] {
        let (on, off) = run(shape, 2080);
        assert_eq!(count(&on, "paged_attention_partial_merge"), 2, "{on:?}");
        assert_eq!(count(&on, "paged_attention_merge"), 0, "{on:?}");
        assert_eq!(count(&off, "paged_attention_merge"), 2, "{off:?}");
    }
}

#[test]
fn the_1b_llama_decode_step_launches_16_kernels_fewer() {
    let module = llama_1b();
    let (on, kernels) = llama_decode_launches(&module, &options(true));
    let (off, _) = llama_decode_launches(&module, &options(false));
    assert_eq!(count(&on, "paged_attention_partial_merge"), 16, "{on:?}");
    assert_eq!(count(&on, "paged_attention_merge"), 0, "{on:?}");
    assert_eq!(count(&off, "paged_attention_merge"), 16, "{off:?}");
    assert_eq!(on.len() + 16, off.len());
    // The long-context variant merges in its last block too.
    let sizes = [("T", 1), ("B", 1), ("MB", 40), ("NB", 64)];
    let (long, _) = llama_step_launches(&module, &options(true), &sizes);
    assert_eq!(
        count(&long, "paged_attention_partial_merge"),
        16,
        "{long:?}"
    );
    assert_eq!(count(&long, "paged_attention_merge"), 0, "{long:?}");
    let fused: Vec<_> = kernels
        .iter()
        .filter(|k| k.name.contains("partial_merge"))
        .collect();
    assert!(!fused.is_empty());
    for kernel in fused {
        let text = format!("{kernel}");
        assert!(text.contains("atomic_add("), "{}", kernel.name);
        assert!(text.contains("fence_gpu"), "{}", kernel.name);
    }
}

#[test]
fn fused_merge_kernels_assemble_for_every_target_without_spills() {
    let module = llama_1b();
    let compiled = kiln_gpu_kernels::compile_function(&module, "step", &options(true)).unwrap();
    // Layer 0's kernels (each layer has its own: the layer is a constant): the short
    // variant's register design and the long one's tensor-core design.
    let fused: Vec<kiln_kir::Kernel> = compiled
        .kernels
        .iter()
        .filter(|k| k.name.contains("partial_merge"))
        .take(2)
        .cloned()
        .collect();
    assert_eq!(fused.len(), 2);
    assert_ne!(fused[0].block_dim, fused[1].block_dim);
    assert!(!fused.is_empty());
    for kernel in &fused {
        let ptx = kiln_ptx::emit_ptx(
            std::slice::from_ref(kernel),
            kiln_ptx::Target::ALL[0],
            &kiln_ptx::EmitOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains("atom.global.add.u32"), "{}", kernel.name);
        assert_eq!(
            ptx.matches("fence.acq_rel.gpu;").count(),
            2,
            "{}",
            kernel.name
        );
    }
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    assert_assembles_without_spills(&toolchain, &fused);
}
