//! The plain (SIMT) matmul template against the graph interpreter, on the kir interpreter
//! and on Cranelift, with each of its tilings forced and with the one chosen by shape: both
//! layouts of each operand (`x @ w`, `x @ w.T`, `x.T @ w`), M, N and K that are not
//! multiples of a tile or of 4 (scalar loads and element-by-element epilogues), symbolic K,
//! broadcast batch dims, fused prologues (cosine similarity's row normalization, a cast)
//! and epilogues (bias + gelu, a residual), horizontal fusion of two, three and five
//! matmuls, integer matmuls; what each kernel reads as vectors; and ptxas reports (registers,
//! at most 128 for the large tile, no spills) for all five targets.

mod common;

use common::{check, inputs_for, lower, rel_err, tolerance};
use kiln_gpu_kernels::{MatmulTiling, Options};
use kiln_kir::Stmt;
use std::collections::BTreeMap;

const SRC: &str = "import nn
import consensus
fn nn_f32(a: f32[M, 36], b: f32[36, 200]) -> f32[M, 200] { a @ b }
fn nt(a: f32[M, 36], b: f32[N, 36]) -> f32[M, N] { a @ b.T }
fn tn(a: f32[20, M], b: f32[20, 136]) -> f32[M, 136] { a.T @ b }
fn odd(a: f32[M, 21], b: f32[37, 21]) -> f32[M, 37] { linear(a, b) }
fn sym_k(a: f32[M, K], b: f32[K, 24]) -> f32[M, 24] { a @ b }
fn cosine(x: f32[132, 44]) -> f32[132, 132] { cosine_similarity(x) }
fn cosine_rows(x: f32[M, 44]) -> f32[M, M] { cosine_similarity(x) }
fn scaled_nt(a: f32[M, 24], b: f32[40, 24]) -> f32[M, 40] { (a * 0.5) @ (b * 0.5).T }
fn cast_prologue(x: bf16[M, 40], w: f32[40, 72]) -> f32[M, 72] { f32(x) @ w }
fn bias_gelu(x: f32[M, 72], w: f32[200, 72], b: f32[200]) -> f32[M, 200] { gelu(linear_bias(x, w, b)) }
fn residual(x: f32[M, 48], w: f32[41, 48], r: f32[M, 41]) -> f32[M, 41] { linear(x, w) + r }
fn batched(x: f32[2, 1, M, 20], y: f32[3, 20, 36]) -> f32[2, 3, M, 36] { x @ y }
fn gate_up(x: f32[M, 32], gate: f32[72, 32], up: f32[72, 32]) -> f32[M, 72] { silu(linear(x, gate)) * linear(x, up) }
fn qkv(x: f32[M, 64], q: f32[64, 64], k: f32[32, 64], v: f32[32, 64]) -> (f32[M, 64], f32[M, 32], f32[M, 32]) { (linear(x, q), linear(x, k), linear(x, v)) }
fn five(x: f32[M, 16], a: f32[8, 16], b: f32[8, 16], c: f32[8, 16], d: f32[8, 16], e: f32[8, 16]) -> f32[M, 8] { linear(x, a) + linear(x, b) + linear(x, c) + linear(x, d) + linear(x, e) }
fn int_mm(a: i32[M, 12], b: i32[12, 20]) -> i32[M, 20] { a @ b }
fn long_mm(a: i64[M, 12], b: i64[12, 20]) -> i64[M, 20] { a @ b }
fn batched_rows(a: f32[16, M, 4], b: f32[4, 1024]) -> f32[16, M, 1024] { a @ b }
fn to_bf16(x: f32[M, 40], w: f32[40, 72]) -> bf16[M, 72] { bf16(x @ w) }
";

/// Checks `function` at `symbols` with `tiling` (`None`: chosen by shape) on the kir
/// interpreter and on Cranelift; returns the kernels.
fn run(
    function: &str,
    symbols: &[(&str, usize)],
    tiling: Option<MatmulTiling>,
) -> Vec<kiln_kir::Kernel> {
    let module = lower("sgemm.kiln", SRC, None, None);
    let func = module.function(function).unwrap();
    let symbols: BTreeMap<String, usize> =
        symbols.iter().map(|(s, v)| (s.to_string(), *v)).collect();
    let inputs = inputs_for(func, &symbols, 1, 11);
    let weights = BTreeMap::new();
    let options = Options {
        matmul_tiling: tiling,
        ..Options::default()
    };
    let compiled = check(&module, function, &inputs, &weights, &options);
    let want = kiln_ir::interpret(func, &inputs, &weights).unwrap();
    let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
    let got = cpu
        .run(&compiled.plan, &inputs, &|name| weights.get(name))
        .unwrap_or_else(|e| panic!("@{function} on Cranelift: {e}"));
    for (g, w) in got.iter().zip(&want) {
        let err = rel_err(g, w);
        assert!(
            err <= tolerance(w.dtype),
            "@{function} on Cranelift: relative error {err:e}"
        );
    }
    compiled.kernels
}

/// The matmul kernel of a compiled function: the large-tile one where a symbolic row count
/// gets both tiles (the small one is checked with its tiling forced).
fn matmul_kernel(kernels: &[kiln_kir::Kernel]) -> &kiln_kir::Kernel {
    let found: Vec<_> = kernels
        .iter()
        .filter(|k| k.name.contains("_matmul_"))
        .collect();
    let names: Vec<_> = kernels.iter().map(|k| &k.name).collect();
    assert!(matches!(found.len(), 1 | 2), "{names:?}");
    found[found.len() - 1]
}

/// Every statement of `stmts`, nested ones included.
fn walk<'a>(stmts: &'a [Stmt], out: &mut Vec<&'a Stmt>) {
    for s in stmts {
        out.push(s);
        match s {
            Stmt::For { body, .. } => walk(body, out),
            Stmt::If {
                then, otherwise, ..
            } => {
                walk(then, out);
                walk(otherwise, out);
            }
            _ => {}
        }
    }
}

/// (global vector loads, global scalar loads, vector stores, scalar global stores) of a
/// kernel, counted over its statements.
fn access_counts(k: &kiln_kir::Kernel) -> (usize, usize, usize, usize) {
    use kiln_kir::{Buf, Expr};
    let mut all = Vec::new();
    walk(&k.body, &mut all);
    fn scalar_loads(e: &Expr) -> usize {
        match e {
            Expr::Load {
                buf: Buf::Global(_),
                index,
            } => 1 + scalar_loads(index),
            Expr::Load { index, .. } => scalar_loads(index),
            Expr::Unary(_, a) | Expr::Cast(_, a) => scalar_loads(a),
            Expr::Binary(_, a, b) => scalar_loads(a) + scalar_loads(b),
            Expr::Fma(a, b, c) | Expr::Select(a, b, c) => {
                scalar_loads(a) + scalar_loads(b) + scalar_loads(c)
            }
            _ => 0,
        }
    }
    let mut counts = (0, 0, 0, 0);
    for s in all {
        match s {
            Stmt::LoadVec {
                buf: Buf::Global(_),
                ..
            } => counts.0 += 1,
            Stmt::Assign(_, e) => counts.1 += scalar_loads(e),
            Stmt::StoreVec {
                buf: Buf::Global(_),
                ..
            } => counts.2 += 1,
            Stmt::Store {
                buf: Buf::Global(_),
                ..
            } => counts.3 += 1,
            _ => {}
        }
    }
    counts
}

const TILINGS: [Option<MatmulTiling>; 4] = [
    None,
    Some(MatmulTiling::LARGE),
    Some(MatmulTiling::SMALL),
    Some(MatmulTiling::NARROW),
];

#[test]
fn both_b_layouts_over_ragged_tiles() {
    // 130 x 200 x 36 (two 128-row tiles, the second with 2 rows) and 130 x 77 x 36 with B
    // read through its transpose (K-contiguous).
    for tiling in TILINGS {
        let k = run("nn_f32", &[("M", 130)], tiling);
        let (vec_loads, scalar_loads, vec_stores, _) = access_counts(matmul_kernel(&k));
        assert!(vec_loads > 0 && vec_stores > 0, "{tiling:?}");
        assert_eq!(scalar_loads, 0, "{tiling:?}");
        run("nt", &[("M", 130), ("N", 77)], tiling);
    }
}

#[test]
fn a_transposed_left_operand_is_read_along_m() {
    for tiling in TILINGS {
        let k = run("tn", &[("M", 131)], tiling);
        let (vec_loads, scalar_loads, _, _) = access_counts(matmul_kernel(&k));
        assert!(vec_loads > 0, "{tiling:?}");
        // M = 131 is no multiple of 4: A's lanes are loaded one by one, B's as vectors.
        assert!(scalar_loads > 0, "{tiling:?}");
    }
}

#[test]
fn k_and_n_not_multiples_of_four_use_scalar_loads_and_stores() {
    for tiling in TILINGS {
        let k = run("odd", &[("M", 67)], tiling);
        let (vec_loads, scalar_loads, vec_stores, scalar_stores) = access_counts(matmul_kernel(&k));
        assert_eq!((vec_loads, vec_stores), (0, 0), "{tiling:?}");
        assert!(scalar_loads > 0 && scalar_stores > 0, "{tiling:?}");
    }
}

#[test]
fn a_symbolic_k() {
    for tiling in TILINGS {
        for kk in [1, 8, 13, 40] {
            run("sym_k", &[("M", 70), ("K", kk)], tiling);
        }
    }
}

#[test]
fn cosine_similarity_reads_both_operands_as_vectors() {
    // The normalized rows (a prologue with a transcendental) are computed once by the row
    // kernel; both operands, `n` and `n.T` (through its source), are then K-contiguous
    // reads of that buffer: 16-byte loads only.
    for tiling in TILINGS {
        // A symbolic row count: the output's last axis is symbolic, the epilogue stores
        // vectors when it is a multiple of 4 at run time, else elements.
        for m in [67, 68] {
            let k = run("cosine_rows", &[("M", m)], tiling);
            let (_, _, vec_stores, scalar_stores) = access_counts(matmul_kernel(&k));
            assert!(vec_stores > 0 && scalar_stores > 0, "{tiling:?}");
        }
        let k = run("cosine", &[], tiling);
        let mm = matmul_kernel(&k);
        let (vec_loads, scalar_loads, vec_stores, scalar_stores) = access_counts(mm);
        assert!(vec_loads >= 4 && scalar_loads == 0, "{tiling:?}\n{mm}");
        assert!(vec_stores > 0 && scalar_stores == 0, "{tiling:?}");
    }
}

#[test]
fn a_cheap_prologue_is_inlined_into_vector_loads() {
    for tiling in TILINGS {
        let k = run("scaled_nt", &[("M", 70)], tiling);
        let mm = matmul_kernel(&k);
        let (vec_loads, scalar_loads, _, _) = access_counts(mm);
        assert!(vec_loads >= 4 && scalar_loads == 0, "{tiling:?}\n{mm}");
        assert!(mm.to_string().contains("* 0.5"), "{mm}");
    }
}

#[test]
fn prologue_cast_and_epilogues() {
    for tiling in TILINGS {
        run("cast_prologue", &[("M", 45)], tiling);
        let k = run("bias_gelu", &[("M", 130)], tiling);
        let (_, _, vec_stores, scalar_stores) = access_counts(matmul_kernel(&k));
        assert!(vec_stores > 0 && scalar_stores == 0, "{tiling:?}");
        run("residual", &[("M", 66)], tiling);
        let k = run("to_bf16", &[("M", 35)], tiling);
        let (_, _, vec_stores, scalar_stores) = access_counts(matmul_kernel(&k));
        assert!(vec_stores > 0 && scalar_stores == 0, "{tiling:?}");
    }
}

#[test]
fn broadcast_batch_dims() {
    for tiling in TILINGS {
        run("batched", &[("M", 9)], tiling);
    }
}

#[test]
fn horizontal_fusion_and_integers() {
    for tiling in TILINGS {
        let k = run("gate_up", &[("M", 70)], tiling);
        assert!(matmul_kernel(&k).name.contains("_x2"));
        let k = run("qkv", &[("M", 33)], tiling);
        assert!(matmul_kernel(&k).name.contains("_x3"));
        run("int_mm", &[("M", 19)], tiling);
        run("long_mm", &[("M", 19)], tiling);
    }
    // Five fused matmuls: the small tile's shared arrays would exceed 48 KiB.
    let k = run("five", &[("M", 20)], None);
    let mm = matmul_kernel(&k);
    assert!(mm.name.contains("matmul_64x32_x5"), "{}", mm.name);
}

#[test]
fn a_symbolic_row_count_chooses_the_tile_at_run_time() {
    use kiln_kir::Step;
    let module = lower("sgemm.kiln", SRC, None, None);
    // (function, the most rows of the small tile): x @ x.T of M rows has 128 large tiles
    // from 12 · 128 + 1 rows on; 16 batches of 1024 columns from 128 rows on.
    for (function, at_most) in [("cosine_rows", 11 * 128), ("batched_rows", 127)] {
        let compiled =
            kiln_gpu_kernels::compile_function(&module, function, &Options::default()).unwrap();
        let choice = compiled
            .plan
            .steps
            .iter()
            .find_map(|s| match s {
                Step::BySize {
                    symbol,
                    at_most,
                    small,
                    large,
                } => Some((symbol.clone(), *at_most, small.len(), large.len())),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{function}: {:?}", compiled.plan.steps));
        assert_eq!(choice, ("M".to_string(), at_most, 1, 1), "{function}");
        let names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
        assert!(
            names.iter().any(|n| n.contains("matmul_64x64")),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n.contains("matmul_128x128")),
            "{names:?}"
        );
    }
    // Both sides of the choice.
    for m in [127, 130] {
        run("batched_rows", &[("M", m)], None);
    }
}

#[test]
fn the_tiling_is_chosen_by_shape() {
    use kiln_kir::Ty;
    let large = MatmulTiling::LARGE;
    let small = MatmulTiling::SMALL;
    assert_eq!(
        MatmulTiling::choose(Some(16384), Some(16384), Some(1), 1, Ty::F32),
        large
    );
    assert_eq!(
        MatmulTiling::choose(Some(2048), Some(1024), Some(1), 1, Ty::F32),
        large
    );
    // 64 tiles of 128 x 128: 256 of 64 x 64 fill the GPU better.
    assert_eq!(
        MatmulTiling::choose(Some(1024), Some(1024), Some(1), 1, Ty::F32),
        small
    );
    assert_eq!(
        MatmulTiling::choose(None, Some(4096), Some(1), 1, Ty::F32),
        small
    );
    assert_eq!(
        MatmulTiling::choose(Some(4096), Some(4096), Some(1), 2, Ty::F32),
        small
    );
    assert_eq!(
        MatmulTiling::choose(Some(4096), Some(4096), Some(1), 8, Ty::F32),
        MatmulTiling::NARROW
    );
    for t in [large, small, MatmulTiling::NARROW] {
        assert!(t.is_valid(), "{t:?}");
        assert!(t.shared_bytes(1, 4) <= 48 * 1024);
    }
    assert!(!MatmulTiling {
        tm: 6,
        ..MatmulTiling::LARGE
    }
    .is_valid());
}

const BIG: &str = "import nn
import consensus
fn cosine(x: f32[16384, 768]) -> f32[16384, 16384] { cosine_similarity(x) }
fn cosine_rows(x: f32[N, 768]) -> f32[N, N] { cosine_similarity(x) }
fn nn_f32(a: f32[4096, 4096], b: f32[4096, 4096]) -> f32[4096, 4096] { a @ b }
fn tn(a: f32[4096, 4096], b: f32[4096, 4096]) -> f32[4096, 4096] { a.T @ b }
fn bias_gelu(x: f32[T, 4096], w: f32[4096, 4096], b: f32[4096]) -> f32[T, 4096] { gelu(linear_bias(x, w, b)) }
fn gate_up(x: f32[T, 2048], gate: f32[5632, 2048], up: f32[5632, 2048]) -> f32[T, 5632] { silu(linear(x, gate)) * linear(x, up) }
fn five(x: f32[T, 64], a: f32[64, 64], b: f32[64, 64], c: f32[64, 64], d: f32[64, 64], e: f32[64, 64]) -> f32[T, 64] { linear(x, a) + linear(x, b) + linear(x, c) + linear(x, d) + linear(x, e) }
";

#[test]
fn the_cosine_kernel_is_the_large_tile_with_vector_loads() {
    let module = lower("sgemm_big.kiln", BIG, None, None);
    let compiled =
        kiln_gpu_kernels::compile_function(&module, "cosine", &Options::default()).unwrap();
    let mm = matmul_kernel(&compiled.kernels);
    assert!(mm.name.contains("matmul_128x128"), "{}", mm.name);
    assert_eq!(mm.block_dim, 256);
    let (vec_loads, _, vec_stores, scalar_stores) = access_counts(mm);
    // One 16-byte load of `x` per operand, in the first K step and in the loop.
    assert_eq!(vec_loads, 4, "{mm}");
    assert_eq!((vec_stores, scalar_stores), (16, 0), "{mm}");
}

#[test]
fn f32_gemms_assemble_for_every_target_without_spills() {
    let Some(toolchain) = common::toolchain() else {
        return;
    };
    let module = lower("sgemm_big.kiln", BIG, None, None);
    let mut kernels = Vec::new();
    // `cosine_rows` (as `kiln bench consensus` compiles it) and `bias_gelu` have a symbolic
    // row count: both their tiles, 64-bit indices for `cosine_rows`'s N × N result.
    for function in [
        "cosine",
        "cosine_rows",
        "nn_f32",
        "tn",
        "bias_gelu",
        "gate_up",
        "five",
    ] {
        let compiled =
            kiln_gpu_kernels::compile_function(&module, function, &Options::default()).unwrap();
        kernels.extend(
            compiled
                .kernels
                .into_iter()
                .filter(|k| k.name.contains("_matmul_"))
                .map(|mut k| {
                    k.name = format!("{function}_{}", k.name);
                    k
                }),
        );
    }
    // The large tile in the forced form too, over a symbolic row count with an epilogue.
    let options = Options {
        matmul_tiling: Some(MatmulTiling::LARGE),
        ..Options::default()
    };
    let compiled = kiln_gpu_kernels::compile_function(&module, "bias_gelu", &options).unwrap();
    let mut forced = matmul_kernel(&compiled.kernels).clone();
    forced.name = format!("{}_forced", forced.name);
    kernels.push(forced);
    let registers = common::assert_assembles_without_spills(&toolchain, &kernels);
    // The large tile asks for two blocks an SM (16 warps): ptxas fits it in 128 registers.
    for kernel in kernels.iter().filter(|k| k.name.contains("128x128")) {
        assert_eq!(kernel.blocks_per_sm, 2, "{}", kernel.name);
    }
    for (target, name, count) in registers.iter().filter(|r| r.1.contains("128x128")) {
        assert!(*count <= 128, "{name} on {target}: {count} registers");
    }
}
