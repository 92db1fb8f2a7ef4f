//! The one-pass kernel of short paged-decode block tables (`PagedTuning::one_pass`): one
//! block per (token, key/value head) over the whole table, the warps merged in shared
//! memory, no workspace and no merge kernel. Against the graph interpreter on the kernel-IR
//! interpreter and on Cranelift (run twice on one executor): ragged contexts, a prefill
//! chunk of one sequence beside decode tokens, a padding token, GQA and MHA, head dims 64
//! and 128, f32 and bf16, blocks of 16 (a warp's keys in one block) and of 4 (a block-table
//! entry per key), short tables (one pass) and long ones (partial and merge kernels) of one
//! plan; the 1.1B decode step's launches at one token (16 merge kernels fewer); its PTX
//! snapshot and ptxas for every target without spills.

mod common;

use common::{check, count, llama_1b, llama_decode_launches, llama_step_launches, lower};
use kiln_gpu_kernels::{Options, PagedTuning};
use kiln_ir::{DType, Tensor};
use std::collections::BTreeMap;

/// `attend` with symbolic block tables `[B, MB]` and cache `[2, NB, bs, kv, d]`.
fn source(dtype: &str, heads: usize, kv: usize, d: usize, bs: usize) -> String {
    format!(
        "import nn\n\
         fn attend(q: {dtype}[N, {heads}, {d}], k_cache: {dtype}[2, NB, {bs}, {kv}, {d}], \
         v_cache: {dtype}[2, NB, {bs}, {kv}, {d}], block_tables: i32[B, MB], seq: i32[N], \
         pos: i32[N]) -> {dtype}[N, {heads}, {d}] {{\n\
         paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 1)\n}}\n"
    )
}

/// Inputs of [`source`] for block tables of `positions` key positions: three sequences,
/// tokens 0..3 a prefill chunk of sequence 0, then its last position, a padding token,
/// sequence 2's first position and a short context of sequence 1.
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
    let mut rng = common::Rng(0x0E9A + (d + heads + bs + positions) as u64);
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
        // A permutation of the cache blocks (each sequence its own).
        int(
            &[batch, width],
            (0..batch * width)
                .map(|i| ((i * 7 + 2) % blocks) as i64)
                .collect(),
        ),
        int(&[tokens], vec![0, 0, 0, 1, -1, 2, 1, 0]),
        int(
            &[tokens],
            vec![last - 3, last - 2, last - 1, last, 5, 0, 18, last / 2],
        ),
    ]
}

/// Runs `attend` on [`inputs`] for tables of `positions` positions with `options`: the
/// plan on the kernel-IR interpreter and twice on Cranelift against the graph interpreter;
/// returns the launched kernels' names.
fn run(
    (dtype, heads, kv, d, bs): (&str, usize, usize, usize, usize),
    positions: usize,
    options: &Options,
) -> Vec<String> {
    let module = lower(
        "paged_one_pass.kiln",
        &source(dtype, heads, kv, d, bs),
        None,
        None,
    );
    let inputs = inputs(dtype, heads, kv, d, bs, positions);
    let weights = BTreeMap::new();
    let compiled = check(&module, "attend", &inputs, &weights, options);
    let func = module.function("attend").expect("attend");
    let want = kiln_ir::interpret(func, &inputs, &weights).expect("graph interpreter");
    let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
    let mut runs = Vec::new();
    for _ in 0..2 {
        let got = cpu
            .run(&compiled.plan, &inputs, &|name| weights.get(name))
            .unwrap_or_else(|e| panic!("Cranelift: {e}"));
        let err = common::rel_err(&got[0], &want[0]);
        let tol = common::tolerance(want[0].dtype);
        assert!(err <= tol, "Cranelift: relative error {err:e} > {tol:e}");
        runs.push(got[0].to_le_bytes());
    }
    assert_eq!(runs[0], runs[1], "a second launch gives other bits");
    let sizes = BTreeMap::from([
        ("N".to_string(), inputs[0].shape[0] as u64),
        ("B".to_string(), 3),
        ("MB".to_string(), inputs[3].shape[1] as u64),
        ("NB".to_string(), inputs[1].shape[1] as u64),
    ]);
    common::launches(&compiled.plan, &compiled.kernels, &sizes)
}

const SHAPES: [(&str, usize, usize, usize, usize); 5] = [
    ("bf16", 8, 2, 128, 16),
    ("bf16", 8, 2, 64, 4),
    ("f32", 4, 4, 64, 16),
    ("f32", 8, 2, 128, 4),
    ("bf16", 32, 8, 64, 16),
];

#[test]
fn short_tables_take_one_pass_and_equal_the_interpreter() {
    let options = switched(16);
    for shape in SHAPES {
        // 160 positions: one pass of 16 warps (two steps of 128 keys at most).
        let names = run(shape, 160, &options);
        assert_eq!(
            count(&names, "paged_attention_one_pass"),
            1,
            "{shape:?}: {names:?}"
        );
        assert_eq!(
            count(&names, "paged_attention_merge"),
            0,
            "{shape:?}: {names:?}"
        );
        assert_eq!(names.len(), 1, "{shape:?}: {names:?}");
    }
}

#[test]
fn long_tables_keep_the_partial_and_merge_kernels() {
    // 1040 positions: past the short variant's 512, two partitions of 1024.
    let options = switched(16);
    for shape in [SHAPES[0], SHAPES[1], SHAPES[2]] {
        let names = run(shape, 1040, &options);
        assert_eq!(
            count(&names, "paged_attention_one_pass"),
            0,
            "{shape:?}: {names:?}"
        );
        assert_eq!(
            count(&names, "paged_attention_partial"),
            1,
            "{shape:?}: {names:?}"
        );
        assert_eq!(
            count(&names, "paged_attention_merge"),
            1,
            "{shape:?}: {names:?}"
        );
    }
}

#[test]
fn one_pass_warps_and_table_sizes_equal_the_interpreter() {
    // (warps, unroll, short_context, positions): odd warp counts, unrolls that do not
    // divide the blocks of 16, a table at the variant's bound.
    for (warps, unroll, short_context, positions) in [
        (3, 8, 512, 512),
        (1, 5, 256, 256),
        (16, 4, 512, 96),
        (32, 1, 128, 128),
    ] {
        let options = Options {
            paged: PagedTuning {
                one_pass: warps,
                unroll,
                short_context,
                ..PagedTuning::default()
            },
            ..Options::default()
        };
        for shape in [SHAPES[0], SHAPES[3]] {
            let names = run(shape, positions, &options);
            assert_eq!(
                names,
                ["paged_attention_one_pass_f32"].map(|n| n.replace("f32", shape.0))
            );
        }
    }
}

#[test]
fn the_switch_restores_the_partial_and_merge_kernels() {
    let options = Options {
        paged: PagedTuning {
            one_pass: 0,
            fused_merge: false,
            ..PagedTuning::default()
        },
        ..Options::default()
    };
    for shape in [SHAPES[0], SHAPES[3]] {
        let names = run(shape, 160, &options);
        assert_eq!(count(&names, "paged_attention_one_pass"), 0, "{names:?}");
        assert_eq!(count(&names, "paged_attention_partial"), 1, "{names:?}");
        assert_eq!(count(&names, "paged_attention_merge"), 1, "{names:?}");
    }
}

/// The one-pass kernel of `one_pass` warps (0: off) against the partial and merge kernels
/// (the partial kernel's own merge, `PagedTuning::fused_merge`, off).
fn switched(one_pass: u32) -> Options {
    let mut options = Options::default();
    options.paged.one_pass = one_pass;
    options.paged.fused_merge = false;
    options
}

#[test]
fn the_1b_llama_decode_step_launches_16_kernels_fewer() {
    let module = llama_1b();
    let (with, kernels) = llama_decode_launches(&module, &switched(16));
    let (without, _) = llama_decode_launches(&module, &switched(0));
    assert_eq!(count(&with, "paged_attention_one_pass"), 16, "{with:?}");
    assert_eq!(count(&with, "paged_attention_merge"), 0, "{with:?}");
    assert_eq!(count(&without, "paged_attention_merge"), 16, "{without:?}");
    assert_eq!(with.len() + 16, without.len());
    let one_pass: Vec<_> = kernels
        .iter()
        .filter(|k| k.name.contains("one_pass"))
        .collect();
    assert_eq!(
        one_pass.len(),
        16,
        "a kernel a layer (the layer is a constant)"
    );
    assert!(one_pass.iter().all(|k| k.block_dim == 512));
    // Tables past 512 positions keep both kernels (the long-context variant).
    let sizes = [("T", 1), ("B", 1), ("MB", 40), ("NB", 64)];
    let (long, _) = llama_step_launches(&module, &switched(16), &sizes);
    assert_eq!(count(&long, "paged_attention_one_pass"), 0, "{long:?}");
    assert_eq!(count(&long, "paged_attention_merge"), 16, "{long:?}");
}

const BENCH_SRC: &str = "import nn
fn paged_decode(q: bf16[B, 32, 128], k_cache: bf16[1, NB, 16, 8, 128], v_cache: bf16[1, NB, 16, 8, 128],
                block_tables: i32[B, MB], seq: i32[B], pos: i32[B]) -> bf16[B, 32, 128] {
    paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 0)
}
";

/// The one-pass kernels of the benchmark's shape (D 128) and of the 1.1B step (D 64).
fn one_pass_kernels(options: &Options) -> Vec<kiln_kir::Kernel> {
    let module = lower("paged_bench.kiln", BENCH_SRC, None, None);
    let compiled = kiln_gpu_kernels::compile_function(&module, "paged_decode", options)
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, step) = llama_decode_launches(&llama_1b(), options);
    let one_pass = |k: &kiln_kir::Kernel| k.name.contains("paged_attention_one_pass");
    let bench = compiled.kernels.into_iter().filter(one_pass);
    bench
        .chain(step.into_iter().filter(one_pass).take(1))
        .collect()
}

#[test]
fn the_one_pass_kernel_snapshot() {
    let kernels = one_pass_kernels(&switched(16));
    assert_eq!(kernels.len(), 2);
    let ptx = kiln_ptx::emit_ptx(&kernels[..1], kiln_ptx::Target::Sm90a, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!ptx.contains("workspace"), "{ptx}");
    insta::assert_snapshot!(ptx);
}

#[test]
fn one_pass_kernels_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    let mut kernels = one_pass_kernels(&switched(16));
    kernels.extend(one_pass_kernels(&switched(8)));
    let registers = common::assert_assembles_without_spills(&toolchain, &kernels);
    assert_eq!(registers.len(), 5 * kernels.len());
}
