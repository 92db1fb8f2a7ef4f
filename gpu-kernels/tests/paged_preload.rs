//! The paged partial kernel's loads before its grid-dependency wait
//! (`PagedTuning::preload`): a step that writes its tokens' keys and values into the caches
//! (`kv_write`, the kernel launched just before the partial kernel) and attends over them.
//! The test plan runner gives each kernel's statements before its wait the memory as it was
//! before the previous launch (programmatic dependent launch may run them that early), so
//! a key row of the step's own tokens that the kernel failed to load again after the wait
//! would be the cache's stale row here. Decode tokens of three sequences, a prefill chunk
//! of four consecutive positions of a fourth (the `j ≤ p - T` bound of earlier steps' rows)
//! and a padding token, against the graph interpreter; the kernel's early statements hold
//! the cache loads and its query loads follow the wait; without the knob nothing precedes
//! the wait.

mod common;

use common::{check, lower};
use kiln_gpu_kernels::{Options, PagedTuning};
use kiln_ir::{DType, Tensor};
use kiln_kir::{Access, Buf, Kernel, Param, Stmt};
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn step(q: bf16[T, 8, 64], k: bf16[T, 2, 64], v: bf16[T, 2, 64],
        k_cache: bf16[1, 12, 16, 2, 64], v_cache: bf16[1, 12, 16, 2, 64],
        block_tables: i32[4, W], seq: i32[T], pos: i32[T], slots: i32[T]) -> bf16[T, 8, 64] {
    let kc = kv_write(k_cache, k, slots, 0)
    let vc = kv_write(v_cache, v, slots, 0)
    paged_attention(q, kc, vc, block_tables, seq, pos, 0)
}
";

/// Sequence, position: three decode tokens, a padding token, four consecutive positions
/// of one sequence (a prefill chunk whose keys span a cache block's end).
const TOKENS: [(i64, i64); 8] = [
    (0, 40),
    (1, 3),
    (2, 16),
    (-1, 0),
    (3, 14),
    (3, 15),
    (3, 16),
    (3, 17),
];

fn inputs() -> Vec<Tensor> {
    let t = TOKENS.len();
    let mut rng = common::Rng(0x9e1);
    let mut random = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_f32(
            shape,
            (0..n).map(|_| (rng.next() * 2.0 - 1.0) as f32).collect(),
        )
        .cast(DType::BF16)
    };
    // Each sequence's three cache blocks, distinct across sequences.
    let tables: Vec<i64> = (0..12).map(|i| (i * 5 + 2) % 12).collect();
    let slots: Vec<i64> = TOKENS
        .iter()
        .map(|&(s, p)| {
            if s < 0 {
                -1
            } else {
                tables[(s * 3 + p / 16) as usize] * 16 + p % 16
            }
        })
        .collect();
    vec![
        random(&[t, 8, 64]),
        random(&[t, 2, 64]),
        random(&[t, 2, 64]),
        // The rows the step writes hold other (stale) values before it.
        random(&[1, 12, 16, 2, 64]),
        random(&[1, 12, 16, 2, 64]),
        Tensor::from_ints(DType::I32, &[4, 3], tables),
        Tensor::from_ints(DType::I32, &[t], TOKENS.iter().map(|x| x.0).collect()),
        Tensor::from_ints(DType::I32, &[t], TOKENS.iter().map(|x| x.1).collect()),
        Tensor::from_ints(DType::I32, &[t], slots),
    ]
}

fn compile(preload: bool) -> Kernel {
    let module = lower("paged_preload.kiln", SRC, None, None);
    let options = Options {
        paged: PagedTuning {
            preload,
            ..PagedTuning::default()
        },
        ..Options::default()
    };
    let compiled = check(&module, "step", &inputs(), &BTreeMap::new(), &options);
    // The short-context variant (the register design) beside the long-context one.
    let partial: Vec<&Kernel> = compiled
        .kernels
        .iter()
        .filter(|k| k.name.contains("paged_attention_partial"))
        .filter(|k| !k.shared.iter().any(|s| s.name == "k_tiles"))
        .collect();
    assert_eq!(partial.len(), 1, "{:?}", compiled.plan.steps);
    partial[0].clone()
}

/// The statements before the kernel's explicit grid-dependency wait (none without one).
fn before_wait(kernel: &Kernel) -> &[Stmt] {
    let wait = kernel
        .body
        .iter()
        .position(|s| *s == Stmt::GridDependencyWait);
    &kernel.body[..wait.unwrap_or(0)]
}

/// The buffer parameters `kernel` declares settled, by name.
fn settled(kernel: &Kernel) -> Vec<String> {
    kernel
        .params
        .iter()
        .filter_map(|p| match p {
            Param::Buffer {
                name,
                access: Access::Settled,
                ..
            } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// `LoadVec`s of `buf` in `stmts`, nested ones included.
fn loads_of(stmts: &[Stmt], buf: Buf) -> usize {
    stmts
        .iter()
        .map(|s| match s {
            Stmt::LoadVec { buf: b, .. } => usize::from(*b == buf),
            Stmt::If {
                then, otherwise, ..
            } => loads_of(then, buf) + loads_of(otherwise, buf),
            Stmt::For { body, .. } => loads_of(body, buf),
            _ => 0,
        })
        .sum()
}

#[test]
fn early_cache_loads_see_the_steps_own_rows_after_the_wait() {
    let kernel = compile(true);
    let names = settled(&kernel);
    assert_eq!(
        names.len(),
        5,
        "caches, tables, sequences, positions: {names:?}"
    );
    let param = |prefix: &str| {
        let i = kernel
            .params
            .iter()
            .position(|p| matches!(p, Param::Buffer { name, .. } if name.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no parameter {prefix}"));
        Buf::Global(i as u32)
    };
    let early = before_wait(&kernel);
    assert!(!early.is_empty(), "no explicit wait");
    for cache in ["kc", "vc"] {
        // One step of the short variant's keys a warp before the wait.
        let keys = PagedTuning::default().short_unroll;
        assert_eq!(loads_of(early, param(cache)), keys, "{cache}");
    }
    assert_eq!(loads_of(early, param("q")), 0, "queries before the wait");
}

#[test]
fn without_the_knob_nothing_precedes_the_wait() {
    let kernel = compile(false);
    assert!(before_wait(&kernel).is_empty());
    assert!(settled(&kernel).is_empty());
}
