//! Decode GEMMs ask L2 for their weights before the grid-dependency wait: each block of the
//! M ≤ 16 tile (split-K, segmented q/k/v and shared-grid gate/up grids, the lm head)
//! prefetches exactly its `[N, K]` weight slice — rows `n0..n0 + 32` clamped to N, its k
//! range — one bulk prefetch a row, while the weights fit the budget, and the start of it
//! (at most the budget in all) when they do not; after its main loop it lets the next
//! kernel launch. The GEMV of at most 4 rows does the same, each warp for its weight row
//! (lane 0, one prefetch a row). The prefetches are checked by running the statements before each
//! kernel's wait in the interpreter (which also checks each range lies inside its weight);
//! the PTX of a split decode GEMM for sm_90a is a reviewed snapshot, and the prefetching
//! kernels assemble for every target without spills. The tensor-core GEMV of 5 to 16 rows
//! (`GemmTuning::mma_gemv`, off by default) does the same for its 8 columns a block (the
//! lanes `t = 0` of warp 0, one prefetch a row) when switched on in place of the decode
//! tile.

mod common;

use common::lower;
use kiln_gpu_kernels::{GemmTuning, Options};
use kiln_kir::{launch_grid, run_kernel_prefetching, Const, Kernel, Param, Stmt, Ty};
use kiln_ptx::{emit_ptx, EmitOptions, Target};
use std::collections::BTreeMap;

const SRC: &str = "import nn
fn o_proj(x: bf16[T, 2048], w: bf16[2048, 2048], r: bf16[T, 2048]) -> bf16[T, 2048] { linear(x, w) + r }
fn qkv(x: bf16[T, 2048], q: bf16[2048, 2048], k: bf16[512, 2048], v: bf16[512, 2048]) -> (bf16[T, 2048], bf16[T, 512], bf16[T, 512]) { (linear(x, q), linear(x, k), linear(x, v)) }
fn gate_up(x: bf16[T, 2048], gate: bf16[8192, 2048], up: bf16[8192, 2048]) -> bf16[T, 8192] { silu(linear(x, gate)) * linear(x, up) }
fn down(x: bf16[T, 8192], w: bf16[2048, 8192], r: bf16[T, 2048]) -> bf16[T, 2048] { linear(x, w) + r }
fn lm_head(x: bf16[T, 2048], w: bf16[32000, 2048]) -> bf16[T, 32000] { linear(x, w) }
fn ragged(x: bf16[T, 264], w: bf16[100, 264]) -> bf16[T, 100] { linear(x, w) }
";

/// The weights of each function: (parameter name, N, K).
fn weights(function: &str) -> Vec<(&'static str, u64, u64)> {
    match function {
        "o_proj" => vec![("w", 2048, 2048)],
        "qkv" => vec![("q", 2048, 2048), ("k", 512, 2048), ("v", 512, 2048)],
        "gate_up" => vec![("gate", 8192, 2048), ("up", 8192, 2048)],
        "down" => vec![("w", 2048, 8192)],
        "lm_head" => vec![("w", 32000, 2048)],
        "ragged" => vec![("w", 100, 264)],
        _ => unreachable!(),
    }
}

/// Options with the weight prefetch and the early trigger on (both off by default).
fn prefetching() -> Options {
    Options {
        gemm: GemmTuning {
            prefetch: true,
            trigger: true,
            mma_gemv: false,
            ..GemmTuning::default()
        },
        ..Options::default()
    }
}

/// [`prefetching`] with the tensor-core GEMV taking 5 to 16 rows.
fn prefetching_mma_gemv() -> Options {
    let mut options = prefetching();
    options.gemm.mma_gemv = true;
    options
}

/// The decode-sized tensor-core kernel of `function` (the `T ≤ 16` variant).
fn decode_kernel(module: &kiln_ir::Module, function: &str, options: &Options) -> Kernel {
    variant_kernel(module, function, options, "mma_gemm_16x")
}

/// The one kernel of `function` whose name holds `kind` (`mma_gemm_16x`: the decode tile;
/// `_m1_` / `_m4_`: the GEMV of one row / at most 4 rows).
fn variant_kernel(
    module: &kiln_ir::Module,
    function: &str,
    options: &Options,
    kind: &str,
) -> Kernel {
    let compiled = kiln_gpu_kernels::compile_function(module, function, options).unwrap();
    let mut decode: Vec<Kernel> = compiled
        .kernels
        .into_iter()
        .filter(|k| k.name.contains(kind))
        .collect();
    assert_eq!(decode.len(), 1, "{function}");
    decode.remove(0)
}

/// The statements before the kernel's grid-dependency wait, as a kernel of their own.
fn before_wait(kernel: &Kernel) -> Kernel {
    let at = kernel
        .body
        .iter()
        .position(|s| *s == Stmt::GridDependencyWait)
        .unwrap_or_else(|| panic!("{}: no grid-dependency wait", kernel.name));
    let mut prefix = kernel.clone();
    prefix.body.truncate(at);
    prefix
}

/// `(splits, k elements of a split)` from a kernel name's `_splitkS`, for `k`.
fn split_of(name: &str, k: u64) -> (u64, u64) {
    match name.split("_splitk").nth(1) {
        Some(rest) => {
            let splits: u64 = rest.split('_').next().unwrap().parse().unwrap();
            let slices = k.div_ceil(128);
            (splits, slices.div_ceil(splits) * 128)
        }
        None => (1, k),
    }
}

#[test]
fn each_decode_block_prefetches_its_weight_slice() {
    let module = lower("prefetch.kiln", SRC, None, None);
    let budget = 24u64 << 20;
    // (kernel kind, weight rows a block column covers): the tensor-core decode tile's 32
    // columns, the GEMV's 4 warps of one column each (its one-row and four-row variants),
    // the tensor-core GEMV's 8 columns.
    let kinds = [
        ("mma_gemm_16x", 32u64),
        ("_m1_", 4),
        ("_m4_", 4),
        ("mma_gemv_", 8),
    ];
    for (kind, block_rows) in kinds {
        let options = if kind == "mma_gemv_" {
            prefetching_mma_gemv()
        } else {
            prefetching()
        };
        for function in ["o_proj", "qkv", "gate_up", "down", "lm_head", "ragged"] {
            let kernel = variant_kernel(&module, function, &options, kind);
            let prefix = before_wait(&kernel);
            let weights = weights(function);
            // Zeroed buffers: each weight exactly its size (the interpreter checks every
            // prefetch lies inside), every other buffer one element (nothing reads them).
            let mut memory = Vec::new();
            let mut scalars = Vec::new();
            let mut weight_of_param = BTreeMap::new();
            for (index, param) in kernel.params.iter().enumerate() {
                match param {
                    Param::Buffer { name, dtype, .. } => {
                        // Parameter names end with a number (`w2`).
                        let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
                        let bytes = match weights.iter().position(|(w, _, _)| *w == base) {
                            Some(i) => {
                                weight_of_param.insert(index as u32, i);
                                let (_, n, k) = weights[i];
                                (n * k * 2) as usize
                            }
                            None => dtype.size_bytes(),
                        };
                        memory.push(vec![0u8; bytes]);
                    }
                    Param::Scalar { ty, .. } => scalars.push(match ty {
                        Ty::I64 => Const::I64(1),
                        _ => Const::I32(1),
                    }),
                }
            }
            let names: Vec<&str> = kernel.params.iter().map(Param::name).collect();
            assert_eq!(
                weight_of_param.len(),
                weights.len(),
                "{function}: {names:?}"
            );
            let grid = launch_grid(&kernel, &|s| (s == "T").then_some(1)).unwrap();
            let mut slices: Vec<&mut [u8]> = memory.iter_mut().map(Vec::as_mut_slice).collect();
            let prefetches = run_kernel_prefetching(&prefix, grid, &mut slices, &scalars)
                .unwrap_or_else(|e| panic!("{function}: {e}"));

            let k = weights[0].2;
            let row_bytes = k * 2;
            let (splits, per_split) = split_of(&kernel.name, k);
            assert_eq!(grid[1], splits, "{function}: {}", kernel.name);
            let segmented = kernel.name.contains("_seg");
            let total: u64 = weights.iter().map(|(_, n, k)| n * k * 2).sum();
            // Each block column's first block of a weight: its segment's start, or 0.
            let mut starts = Vec::new();
            let mut start = 0;
            for (_, n, _) in &weights {
                starts.push(if segmented { start } else { 0 });
                start += n.div_ceil(block_rows);
            }
            let mut ranges: Vec<(usize, u64, u64)> = Vec::new();
            let mut per_row = BTreeMap::new();
            for p in &prefetches {
                let w = weight_of_param[&p.param];
                let row = p.first_byte / row_bytes;
                let k_first = (p.first_byte % row_bytes) / 2;
                // One row, its block's column tile and split.
                assert_eq!(
                    row,
                    (p.first_byte + p.bytes - 1) / row_bytes,
                    "{function}: {p:?}"
                );
                assert_eq!(
                    row / block_rows,
                    p.block[0] - starts[w],
                    "{function}: {p:?}"
                );
                assert_eq!(k_first, p.block[1] * per_split, "{function}: {p:?}");
                assert!(k_first * 2 + p.bytes <= (k_first + per_split).min(k) * 2);
                assert_eq!(p.bytes % 16, 0);
                *per_row.entry((w, row)).or_insert(0u64) += 1;
                ranges.push((w, p.first_byte, p.bytes));
            }
            // Every row of every weight, once per split; no byte twice.
            for (w, (_, n, _)) in weights.iter().enumerate() {
                for row in 0..*n {
                    assert_eq!(
                        per_row.get(&(w, row)),
                        Some(&splits),
                        "{function} row {row}"
                    );
                }
            }
            ranges.sort();
            for pair in ranges.windows(2) {
                let ((w0, at0, len0), (w1, at1, _)) = (pair[0], pair[1]);
                assert!(
                    w0 != w1 || at0 + len0 <= at1,
                    "{function}: overlap {pair:?}"
                );
            }
            let prefetched: u64 = ranges.iter().map(|r| r.2).sum();
            if total <= budget {
                assert_eq!(prefetched, total, "{function}: the whole weights");
            } else {
                assert!(
                    prefetched <= budget && prefetched > budget / 10 * 9,
                    "{function}: {prefetched} bytes of {total} (budget {budget})"
                );
            }
            println!(
                "{function:<8} {:<55} grid {grid:?}: {} prefetches, {prefetched} of {total} bytes",
                kernel.name,
                prefetches.len()
            );
        }
    }
}

/// Whether a statement list holds `stmt` at its top level.
fn holds(kernel: &Kernel, stmt: &Stmt) -> usize {
    kernel.body.iter().filter(|s| *s == stmt).count()
}

#[test]
fn the_knobs_turn_the_prefetch_and_the_trigger_off() {
    let module = lower("prefetch.kiln", SRC, None, None);
    for (prefetch, trigger) in [(true, true), (true, false), (false, true), (false, false)] {
        let options = Options {
            gemm: GemmTuning {
                prefetch,
                trigger,
                // The early trigger (on by default) would add a trigger to every kernel.
                early_trigger: false,
                mma_gemv: false,
                ..GemmTuning::default()
            },
            ..Options::default()
        };
        for function in ["o_proj", "qkv", "gate_up"] {
            let kernel = decode_kernel(&module, function, &options);
            let text = kernel.to_string();
            assert_eq!(
                holds(&kernel, &Stmt::GridDependencyWait),
                usize::from(prefetch)
            );
            assert_eq!(text.contains("prefetch_l2("), prefetch, "{function}");
            assert_eq!(
                holds(&kernel, &Stmt::LaunchDependents),
                usize::from(trigger)
            );
            if trigger {
                // After the main loop (the last top-level `for`), before the epilogue.
                let trigger_at = kernel
                    .body
                    .iter()
                    .position(|s| *s == Stmt::LaunchDependents)
                    .unwrap();
                let last_loop = kernel
                    .body
                    .iter()
                    .rposition(|s| matches!(s, Stmt::For { .. }))
                    .unwrap();
                assert_eq!(trigger_at, last_loop + 1, "{function}");
            }
        }
        // Prefill tiles never prefetch nor trigger.
        let compiled = kiln_gpu_kernels::compile_function(&module, "o_proj", &options).unwrap();
        for kernel in compiled
            .kernels
            .iter()
            .filter(|k| k.name.contains("mma_gemm") && !k.name.contains("mma_gemm_16x"))
        {
            assert_eq!(
                holds(kernel, &Stmt::GridDependencyWait),
                0,
                "{}",
                kernel.name
            );
            assert_eq!(holds(kernel, &Stmt::LaunchDependents), 0, "{}", kernel.name);
        }
    }
    // A smaller budget prefetches less of a weight that fits the default one.
    let options = Options {
        gemm: GemmTuning {
            prefetch_mib: 4,
            ..prefetching().gemm
        },
        ..Options::default()
    };
    let kernel = decode_kernel(&module, "o_proj", &options);
    let text = kernel.to_string();
    // 8 MiB of weights, 4 MiB budget: half of each split's 512 elements.
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("pf_bytes") && l.contains(" = "))
        .unwrap();
    assert!(line.contains("min(256, 2048 - pf_k0"), "{line}");
}

#[test]
fn the_split_decode_gemm_ptx_for_sm_90a() {
    let module = lower("prefetch.kiln", SRC, None, None);
    let kernel = decode_kernel(&module, "o_proj", &prefetching());
    let ptx = emit_ptx(
        std::slice::from_ref(&kernel),
        Target::Sm90a,
        &EmitOptions::default(),
    )
    .unwrap();
    let prefetch = ptx.find("cp.async.bulk.prefetch.L2.global").unwrap();
    let wait = ptx.find("griddepcontrol.wait").unwrap();
    let first_copy = ptx.find("cp.async.cg.shared.global").unwrap();
    let trigger = ptx.find("griddepcontrol.launch_dependents").unwrap();
    let last_mma = ptx.rfind("mma.sync").unwrap();
    assert!(prefetch < wait && wait < first_copy && last_mma < trigger);
    insta::assert_snapshot!("split_decode_gemm_sm_90a", ptx);
}

#[test]
fn prefetching_decode_gemms_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    let module = lower("prefetch.kiln", SRC, None, None);
    let functions = ["o_proj", "qkv", "gate_up", "down", "lm_head", "ragged"];
    let kernels = |options: &Options| -> Vec<Kernel> {
        functions
            .into_iter()
            .map(|f| decode_kernel(&module, f, options))
            .collect()
    };
    let off = Options {
        gemm: GemmTuning {
            prefetch: false,
            trigger: false,
            mma_gemv: false,
            ..GemmTuning::default()
        },
        ..Options::default()
    };
    let with = common::assert_assembles_without_spills(&toolchain, &kernels(&prefetching()));
    let without = common::assert_assembles_without_spills(&toolchain, &kernels(&off));
    // The prefetch's address arithmetic costs few registers (and none where it is absent).
    for (((target, name, on), (_, _, plain)), function) in
        with.iter().zip(&without).zip(functions.iter().cycle())
    {
        println!("{target:>7} {function:<8} {name:<55} {plain:>3} -> {on:>3} registers");
        assert!(
            *on <= plain + 8,
            "{target} {name}: {plain} -> {on} registers"
        );
        if target.compute_capability().0 < 9 {
            assert_eq!(on, plain, "{target} {name}");
        }
    }
}
