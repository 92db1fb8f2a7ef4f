//! Snapshots of the printed kernels of representative fusions: residual add + RMSNorm in
//! one row kernel, softmax in one row kernel, a matmul with a bias + gelu epilogue, RoPE as
//! the inverse frequencies and one rotation kernel.
//! Re-bless with `INSTA_UPDATE=always`.

mod common;

use common::{check, inputs_for, lower};
use kiln_gpu_kernels::{Options, PointwiseTuning};
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn add_rms(h: bf16[T, 4096], x: bf16[T, 4096], w: bf16[4096]) -> (bf16[T, 4096], bf16[T, 4096]) {
    let r = h + x
    (r, rms_norm(r, w, 1e-5))
}
fn probs(x: f32[B, 1000]) -> f32[B, 1000] { softmax(x, axis: -1) }
fn dense_gelu(x: f32[T, 96], w: f32[80, 96], b: f32[80]) -> f32[T, 80] { gelu(linear_bias(x, w, b)) }
fn rotary(q: bf16[T, 32, 128], pos: i64[T]) -> bf16[T, 32, 128] { rope(q, pos, 500000.0) }
";

fn printed(function: &str) -> String {
    printed_with(function, &Options::default())
}

fn printed_with(function: &str, options: &Options) -> String {
    let module = lower("kernels.kiln", SRC, None, None);
    let func = module.function(function).expect("function");
    let inputs = inputs_for(func, &BTreeMap::new(), 5, 3);
    let compiled = check(&module, function, &inputs, &BTreeMap::new(), options);
    let mut text = String::new();
    for k in &compiled.kernels {
        text.push_str(&k.to_string());
        text.push('\n');
    }
    text.push_str(&compiled.plan.to_string());
    text
}

#[test]
fn residual_add_and_rms_norm_is_one_kernel() {
    let text = printed("add_rms");
    assert_eq!(
        text.matches("\nkernel ").count() + usize::from(text.starts_with("kernel ")),
        1
    );
    insta::assert_snapshot!(text);
}

#[test]
fn softmax_is_one_kernel() {
    insta::assert_snapshot!(printed("probs"));
}

#[test]
fn matmul_with_bias_and_gelu_epilogue() {
    insta::assert_snapshot!(printed("dense_gelu"));
}

fn kernel_count(text: &str) -> usize {
    text.matches("\nkernel ").count() + usize::from(text.starts_with("kernel "))
}

#[test]
fn rope_is_one_rotation_kernel_reading_constant_inverse_frequencies() {
    let text = printed("rotary");
    // The inverse frequencies depend on no input: the plan holds them as a constant buffer
    // (computed by the compiler), so one kernel remains. The angles are computed inline (no
    // table), each thread covers both halves of a head's vector position: every element of
    // `q` is loaded once (two vector loads per walked head), the rotate-half concat needs no
    // select, and cos/sin are computed once.
    assert_eq!(kernel_count(&text), 1, "{text}");
    assert!(
        text.contains("f32[64] constant (256 bytes)"),
        "the inverse frequencies are a plan constant: {text}"
    );
    let rotation = text.split("\nkernel ").next().expect("a kernel");
    let q_loads = rotation.lines().filter(|l| l.contains("] = q1[")).count();
    assert_eq!(q_loads, 4, "{rotation}");
    assert!(!rotation.contains("select("), "{rotation}");
    assert_eq!(rotation.matches("= cos(").count(), 8, "{rotation}");
    assert_eq!(rotation.matches("= sin(").count(), 8, "{rotation}");
    insta::assert_snapshot!(text);
}

#[test]
fn rope_variants_match_the_interpreter() {
    // The tuning knobs `kiln bench kernels` may set: no walk, no segments, a short walk,
    // unrolled walks.
    for (max_walk, segments, unroll) in [
        (1, true, 1),
        (8, false, 1),
        (4, true, 1),
        (1, false, 1),
        (8, true, 2),
        (8, false, 4),
    ] {
        let options = Options {
            pointwise: PointwiseTuning {
                max_walk,
                segments,
                unroll,
            },
            ..Options::default()
        };
        let text = printed_with("rotary", &options);
        let selects = text.contains("select(");
        assert_eq!(
            selects, !segments,
            "walk {max_walk}, segments {segments}:\n{text}"
        );
    }
}

#[test]
fn symbols_past_the_bound_the_kernels_assume_are_refused() {
    // Widths chosen from the shapes assume every symbol at most `symbol_bound`: the plan
    // says so, and the CPU executor refuses a larger value instead of indexing wrongly.
    let module = lower(
        "bound.kiln",
        "fn double(x: f32[N, 4]) -> f32[N, 4] { x * 2.0 }\n",
        None,
        None,
    );
    let options = Options {
        symbol_bound: 8,
        ..Options::default()
    };
    let compiled = kiln_gpu_kernels::compile_function(&module, "double", &options).unwrap();
    assert_eq!(compiled.plan.symbol_bound, Some(8));
    assert!(compiled.plan.to_string().contains("symbols at most 8"));
    let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap();
    let input = |n: usize| kiln_ir::Tensor::from_f32(&[n, 4], vec![1.0; n * 4]);
    let weights: BTreeMap<String, kiln_ir::Tensor> = BTreeMap::new();
    let ok = cpu
        .run(&compiled.plan, &[input(8)], &|name| weights.get(name))
        .unwrap();
    assert_eq!(ok[0].to_f32_vec(), vec![2.0; 32]);
    let err = cpu
        .run(&compiled.plan, &[input(9)], &|name| weights.get(name))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`N` is 9, more than 8"), "{err}");
    // With a fixed index width nothing is assumed.
    let wide = Options {
        index_width: kiln_gpu_kernels::IndexWidth::I64,
        ..options
    };
    let compiled = kiln_gpu_kernels::compile_function(&module, "double", &wide).unwrap();
    assert_eq!(compiled.plan.symbol_bound, None);
}

#[test]
fn paged_attention_has_a_short_context_variant_chosen_by_the_block_table_width() {
    let src = "import nn
fn attend(q: bf16[N, 32, 128], k_cache: bf16[2, NB, 16, 8, 128], v_cache: bf16[2, NB, 16, 8, 128],
          block_tables: i32[B, MB], seq: i32[N], pos: i32[N]) -> bf16[N, 32, 128] {
    paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 1)
}
";
    let module = lower("paged.kiln", src, None, None);
    let partial_grid = |steps: &[kiln_kir::Step], kernels: &[kiln_kir::Kernel]| {
        let [kiln_kir::Step::Launch { kernel, .. }, kiln_kir::Step::Launch { .. }] = steps else {
            panic!("a partial and a merge kernel: {steps:?}");
        };
        kernels[*kernel].grid.clone()
    };
    // With `PagedTuning::one_pass` the short tables take one pass: one kernel.
    let mut one_pass = Options::default();
    one_pass.paged.one_pass = 16;
    let compiled = kiln_gpu_kernels::compile_function(&module, "attend", &one_pass).unwrap();
    let [kiln_kir::Step::BySize { small, large, .. }] = compiled.plan.steps.as_slice() else {
        panic!("one choice by size: {:?}", compiled.plan.steps);
    };
    let [kiln_kir::Step::Launch { kernel, .. }] = small.as_slice() else {
        panic!("one kernel for short tables: {small:?}");
    };
    assert!(compiled.kernels[*kernel]
        .name
        .contains("paged_attention_one_pass"));
    partial_grid(large, &compiled.kernels);
    let mut options = Options::default();
    options.paged.one_pass = 0;
    let compiled = kiln_gpu_kernels::compile_function(&module, "attend", &options).unwrap();
    let [kiln_kir::Step::BySize {
        symbol,
        at_most,
        small,
        large,
    }] = compiled.plan.steps.as_slice()
    else {
        panic!("one choice by size: {:?}", compiled.plan.steps);
    };
    // Up to 512 positions (32 blocks of 16) the partitions are 32 positions, else 1024.
    assert_eq!((symbol.as_str(), *at_most), ("MB", 32));
    let (small, large) = (
        partial_grid(small, &compiled.kernels),
        partial_grid(large, &compiled.kernels),
    );
    assert_ne!(small, large);
    assert!(format!("{small:?}").contains("32"), "{small:?}");
    assert!(format!("{large:?}").contains("1024"), "{large:?}");
    // Without the variant (short partitions as long as the others) one pair of kernels.
    let mut off = Options::default();
    off.paged.short_part = off.paged.part;
    let compiled = kiln_gpu_kernels::compile_function(&module, "attend", &off).unwrap();
    partial_grid(&compiled.plan.steps, &compiled.kernels);
}

#[test]
fn a_key_and_a_value_write_share_one_kernel_and_equal_the_interpreter() {
    // Both writes read the same slots; each branch of the shared kernel loads them itself.
    let src = "import nn
fn write_both(kc: f32[2, 6, 4, 2, 8], vc: f32[2, 6, 4, 2, 8], k: f32[T, 2, 8], v: f32[T, 2, 8],
              slots: i32[T]) -> (f32[2, 6, 4, 2, 8], f32[2, 6, 4, 2, 8]) {
    (kv_write(kc, k * 2.0, slots, 1), kv_write(vc, v + 1.0, slots, 1))
}
";
    let module = lower("kv.kiln", src, None, None);
    let func = module.function("write_both").expect("function");
    let mut inputs = inputs_for(func, &BTreeMap::from([("T".to_string(), 5)]), 5, 7);
    inputs[4] = kiln_ir::Tensor::from_ints(kiln_ir::DType::I32, &[5], vec![3, 17, -1, 0, 23]);
    let compiled = check(
        &module,
        "write_both",
        &inputs,
        &BTreeMap::new(),
        &Options::default(),
    );
    let names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
    assert!(names.iter().any(|n| n.contains("kv_write_x2")), "{names:?}");
}

#[test]
fn temps_of_one_symbolic_size_with_disjoint_lifetimes_share_arena_space() {
    // Four matmul results of one symbolic shape [T, 64], each dead once the next softmax
    // has read it: they take turns in one slot instead of four.
    let src = "import nn
fn chain(x: f32[T, 64], w: f32[64, 64]) -> f32[T, 64] {
    let a = softmax(x @ w, axis: -1)
    let b = softmax(a @ w, axis: -1)
    let c = softmax(b @ w, axis: -1)
    softmax(c @ w, axis: -1)
}
";
    let module = lower("chain.kiln", src, None, None);
    let func = module.function("chain").expect("function");
    let inputs = inputs_for(func, &BTreeMap::from([("T".to_string(), 37)]), 5, 11);
    let compiled = check(
        &module,
        "chain",
        &inputs,
        &BTreeMap::new(),
        &Options::default(),
    );
    let plan = &compiled.plan;
    let temps: Vec<&kiln_kir::BufferDecl> = plan
        .buffers
        .iter()
        .filter(|b| b.kind == kiln_kir::BufferKind::Temp)
        .collect();
    let t = |name: &str| (name == "T").then_some(1000);
    let bytes = |b: &kiln_kir::BufferDecl| {
        b.shape.iter().map(|d| d.eval(&t).unwrap()).product::<u64>() * b.dtype.size_bytes() as u64
    };
    let sum: u64 = temps.iter().map(|b| bytes(b)).sum();
    let arena = plan.arena_bytes.eval(&t).unwrap();
    assert!(temps.len() >= 2, "{temps:?}");
    assert!(arena < sum, "arena {arena} bytes, temps {sum} bytes");
}
