//! Hand-written example kernels: small, verified programs that exercise the kernel IR
//! (grid-stride loops, vector memory access, divergence, warp shuffles, shared memory and
//! barriers, dtype conversions, the tensor-core statements). The backends' tests run them and compare against the
//! reference interpreter ([`run_kernel`](crate::interp::run_kernel)).
//!
//! Launch conventions: scalar parameters named `n` are element counts (`I64`); grids
//! are given as [`SizeExpr`]s over the symbols named in each function's doc.

use crate::build::KernelBuilder;
use crate::kernel::{Access, BinOp, Buf, Expr, Kernel, MmaInput, SizeExpr, Stmt, Ty, UnOp, VarId};
use kiln_ir::DType;

/// Blocks of [`vector_add`]'s fixed grid.
pub const VECTOR_ADD_BLOCKS: u32 = 4;
/// Threads per block of [`vector_add`].
pub const VECTOR_ADD_BLOCK_DIM: u32 = 128;
/// The epsilon that [`rms_norm_rows`] adds to the mean square.
pub const RMS_NORM_EPS: f32 = 1e-5;

/// Elements per vector access for `dtype`: 8, but at most 16 bytes.
pub fn vector_width(dtype: DType) -> u32 {
    (16 / dtype.size_bytes() as u32).min(8)
}

/// A grid of `blocks` along x.
fn grid_x(blocks: SizeExpr) -> [SizeExpr; 3] {
    [blocks, SizeExpr::Const(1), SizeExpr::Const(1)]
}

/// One block per `block_dim` elements of the symbol `n`.
fn grid_over_n(block_dim: u32) -> [SizeExpr; 3] {
    grid_x(SizeExpr::CeilDiv(
        Box::new(SizeExpr::Sym("n".to_string())),
        Box::new(SizeExpr::Const(u64::from(block_dim))),
    ))
}

/// `blockIdx.x * blockDim + threadIdx` as an `I64`.
fn global_thread_index() -> Expr {
    Expr::block_idx(0).cast(Ty::I64) * Expr::block_dim().cast(Ty::I64)
        + Expr::thread_idx().cast(Ty::I64)
}

/// A lower-case name for an operator, for kernel names.
fn op_name(op: impl std::fmt::Debug) -> String {
    format!("{op:?}").to_lowercase()
}

/// `out = a + b` over `n` elements of `dtype` (not `Bool`), with [`VECTOR_ADD_BLOCKS`]
/// blocks of [`VECTOR_ADD_BLOCK_DIM`] threads: see [`vector_add_sized`].
pub fn vector_add(dtype: DType) -> Kernel {
    vector_add_sized(dtype, VECTOR_ADD_BLOCKS, VECTOR_ADD_BLOCK_DIM)
}

/// `out = a + b` over `n` elements of `dtype` (not `Bool`) on a fixed grid of `blocks`
/// blocks. A grid-stride loop handles whole vectors of [`vector_width`] elements
/// (`LoadVec`/`StoreVec`), then a second grid-stride loop handles the `n % width` tail one
/// element at a time.
///
/// Parameters: `a`, `b` (read), `out` (write), all `dtype`; `n: i64`.
pub fn vector_add_sized(dtype: DType, blocks: u32, block_dim: u32) -> Kernel {
    assert!(dtype != DType::Bool, "vector_add adds numbers, not bools");
    let ty = Ty::compute_type_of(dtype);
    let width = vector_width(dtype);
    let threads_in_grid = i64::from(blocks) * i64::from(block_dim);

    let mut k = KernelBuilder::new(format!("vector_add_{dtype}"), block_dim);
    k.grid(grid_x(SizeExpr::Const(u64::from(blocks))));
    let a = k.buffer("a", dtype, Access::Read);
    let b = k.buffer("b", dtype, Access::Read);
    let out = k.buffer("out", dtype, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let thread = k.var("thread", Ty::I64);
    let vector_end = k.var("vector_end", Ty::I64);
    let base = k.var("base", Ty::I64);
    let a_lanes: Vec<VarId> = (0..width).map(|j| k.var(format!("a{j}"), ty)).collect();
    let b_lanes: Vec<VarId> = (0..width).map(|j| k.var(format!("b{j}"), ty)).collect();
    let i = k.var("i", Ty::I64);

    let width_i64 = Expr::i64(i64::from(width));
    let vector_body = vec![
        Stmt::LoadVec {
            dsts: a_lanes.clone(),
            buf: a,
            index: base.into(),
        },
        Stmt::LoadVec {
            dsts: b_lanes.clone(),
            buf: b,
            index: base.into(),
        },
        Stmt::StoreVec {
            buf: out,
            index: base.into(),
            values: a_lanes
                .iter()
                .zip(&b_lanes)
                .map(|(&x, &y)| Expr::var(x) + y)
                .collect(),
        },
    ];
    let tail_body = vec![Stmt::store(out, i, Expr::load(a, i) + Expr::load(b, i))];
    k.finish(vec![
        Stmt::assign(thread, global_thread_index()),
        Stmt::assign(
            vector_end,
            (n.clone() / width_i64.clone()) * width_i64.clone(),
        ),
        Stmt::for_range(
            base,
            Expr::var(thread) * width_i64,
            vector_end,
            Expr::i64(threads_in_grid * i64::from(width)),
            vector_body,
        ),
        Stmt::for_range(
            i,
            Expr::var(vector_end) + thread,
            n,
            Expr::i64(threads_in_grid),
            tail_body,
        ),
    ])
}

/// Statements that sum `value` over the 32 lanes of each warp (a butterfly of
/// `ShuffleXor`s), leaving the total in every lane; `partner` is scratch.
fn warp_all_reduce_sum(value: VarId, partner: VarId) -> Vec<Stmt> {
    [16, 8, 4, 2, 1]
        .into_iter()
        .flat_map(|mask| {
            [
                Stmt::ShuffleXor {
                    dst: partner,
                    src: value,
                    mask,
                },
                Stmt::assign(value, Expr::var(value) + partner),
            ]
        })
        .collect()
}

/// RMSNorm of each row of `x: dtype[rows, cols]`, one block per row:
/// `out[r, c] = x[r, c] * rsqrt(mean_c(x[r, c]^2) + RMS_NORM_EPS) * weight[c]`, computed in
/// f32 and rounded once on the store.
///
/// Threads accumulate the squares of a strided slice of the row, reduce within their warp
/// with a `ShuffleXor` butterfly, publish one partial per warp in shared memory, and after
/// a `Barrier` every warp reduces the partials again; thread 0 broadcasts the inverse RMS
/// through shared memory behind a second `Barrier`.
///
/// Parameters: `x`, `weight: dtype[cols]` (read), `out` (write). Grid: `[rows, 1, 1]`.
/// `block_dim` is a multiple of 32.
pub fn rms_norm_rows(dtype: DType, cols: u32, block_dim: u32) -> Kernel {
    assert!(
        dtype.is_float(),
        "rms_norm_rows normalizes floats, not {dtype}"
    );
    assert!(
        block_dim.is_multiple_of(32) && (32..=1024).contains(&block_dim),
        "block_dim {block_dim} is not a multiple of 32 in 32..=1024"
    );
    let warps = block_dim / 32;
    let cols_i64 = Expr::i64(i64::from(cols));

    let mut k = KernelBuilder::new(format!("rms_norm_rows_{dtype}_{cols}"), block_dim);
    k.grid(grid_x(SizeExpr::Sym("rows".to_string())));
    let x = k.buffer("x", dtype, Access::Read);
    let weight = k.buffer("weight", dtype, Access::Read);
    let out = k.buffer("out", dtype, Access::Write);
    let partials = k.shared("partials", DType::F32, warps);
    let inv_rms_shared = k.shared("inv_rms", DType::F32, 1);
    let row_base = k.var("row_base", Ty::I64);
    let col = k.var("col", Ty::I64);
    let value = k.var("value", Ty::F32);
    let sum_sq = k.var("sum_sq", Ty::F32);
    let partner = k.var("partner", Ty::F32);
    let total = k.var("total", Ty::F32);
    let inv_rms = k.var("inv_rms", Ty::F32);

    let first_col = Expr::thread_idx().cast(Ty::I64);
    let col_step = Expr::i64(i64::from(block_dim));
    let mut body = vec![
        Stmt::assign(
            row_base,
            Expr::block_idx(0).cast(Ty::I64) * cols_i64.clone(),
        ),
        Stmt::assign(sum_sq, Expr::f32(0.0)),
        Stmt::for_range(
            col,
            first_col.clone(),
            cols_i64.clone(),
            col_step.clone(),
            vec![
                Stmt::assign(value, Expr::load(x, Expr::var(row_base) + col)),
                Stmt::assign(sum_sq, Expr::fma(value, value, sum_sq)),
            ],
        ),
    ];
    body.extend(warp_all_reduce_sum(sum_sq, partner));
    body.extend([
        Stmt::if_then(
            Expr::lane_id().equals(Expr::i32(0)),
            vec![Stmt::store(partials, Expr::warp_id(), sum_sq)],
        ),
        Stmt::Barrier,
        Stmt::assign(
            total,
            Expr::select(
                Expr::lane_id().lt(Expr::i32(warps as i32)),
                Expr::load(partials, Expr::lane_id().min(Expr::i32(warps as i32 - 1))),
                Expr::f32(0.0),
            ),
        ),
    ]);
    body.extend(warp_all_reduce_sum(total, partner));
    body.extend([
        Stmt::if_then(
            Expr::thread_idx().equals(Expr::i32(0)),
            vec![Stmt::store(
                inv_rms_shared,
                Expr::i32(0),
                (Expr::var(total) / Expr::f32(cols as f32) + Expr::f32(RMS_NORM_EPS))
                    .apply(UnOp::Rsqrt),
            )],
        ),
        Stmt::Barrier,
        Stmt::assign(inv_rms, Expr::load(inv_rms_shared, Expr::i32(0))),
        Stmt::for_range(
            col,
            first_col,
            cols_i64,
            col_step,
            vec![Stmt::store(
                out,
                Expr::var(row_base) + col,
                Expr::load(x, Expr::var(row_base) + col) * inv_rms * Expr::load(weight, col),
            )],
        ),
    ]);
    k.finish(body)
}

/// `out[i] = op(x[i])` for `i < n`, one thread per element; `x` and `out` are `dtype`
/// (whose compute type `op` must accept).
///
/// Parameters: `x` (read), `out` (write), `n: i64`. Grid: `[ceil_div(n, 128), 1, 1]`.
pub fn unary_map(op: UnOp, dtype: DType) -> Kernel {
    let block_dim = 128;
    let mut k = KernelBuilder::new(format!("unary_{}_{dtype}", op_name(op)), block_dim);
    k.grid(grid_over_n(block_dim));
    let x = k.buffer("x", dtype, Access::Read);
    let out = k.buffer("out", dtype, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let i = k.var("i", Ty::I64);
    k.finish(vec![
        Stmt::assign(i, global_thread_index()),
        Stmt::if_then(
            Expr::var(i).lt(n),
            vec![Stmt::store(out, i, Expr::load(x, i).apply(op))],
        ),
    ])
}

/// `out[i] = x[i] op y[i]` for `i < n`, one thread per element; `x` and `y` are `dtype`,
/// `out` is `bool` for comparisons and `dtype` otherwise.
///
/// Parameters: `x`, `y` (read), `out` (write), `n: i64`. Grid: `[ceil_div(n, 128), 1, 1]`.
pub fn binary_map(op: BinOp, dtype: DType) -> Kernel {
    let block_dim = 128;
    let out_dtype = if op.is_comparison() {
        DType::Bool
    } else {
        dtype
    };
    let mut k = KernelBuilder::new(format!("binary_{}_{dtype}", op_name(op)), block_dim);
    k.grid(grid_over_n(block_dim));
    let x = k.buffer("x", dtype, Access::Read);
    let y = k.buffer("y", dtype, Access::Read);
    let out = k.buffer("out", out_dtype, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let i = k.var("i", Ty::I64);
    k.finish(vec![
        Stmt::assign(i, global_thread_index()),
        Stmt::if_then(
            Expr::var(i).lt(n),
            vec![Stmt::store(
                out,
                i,
                Expr::binary(op, Expr::load(x, i), Expr::load(y, i)),
            )],
        ),
    ])
}

/// `out[i] = x[i]` converted from `from` to `to` for `i < n`: a load into `from`'s compute
/// type, a `Cast` to `to`'s, and the store's conversion (rounding to nearest even,
/// saturating for f8).
///
/// Parameters: `x: from` (read), `out: to` (write), `n: i64`.
/// Grid: `[ceil_div(n, 128), 1, 1]`.
pub fn convert(from: DType, to: DType) -> Kernel {
    let block_dim = 128;
    let mut k = KernelBuilder::new(format!("convert_{from}_to_{to}"), block_dim);
    k.grid(grid_over_n(block_dim));
    let x = k.buffer("x", from, Access::Read);
    let out = k.buffer("out", to, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let i = k.var("i", Ty::I64);
    k.finish(vec![
        Stmt::assign(i, global_thread_index()),
        Stmt::if_then(
            Expr::var(i).lt(n),
            vec![Stmt::store(
                out,
                i,
                Expr::load(x, i).cast(Ty::compute_type_of(to)),
            )],
        ),
    ])
}

/// `out[i] = x[i] > 0 ? fma(x[i], y[i], z[i]) : f32(i32(x[i]) * 3)` for `i < n` over f32:
/// `Fma`, `Select` and `Cast` both ways.
///
/// Parameters: `x`, `y`, `z: f32` (read), `out: f32` (write), `n: i64`.
/// Grid: `[ceil_div(n, 128), 1, 1]`.
pub fn fma_select() -> Kernel {
    let block_dim = 128;
    let mut k = KernelBuilder::new("fma_select", block_dim);
    k.grid(grid_over_n(block_dim));
    let x = k.buffer("x", DType::F32, Access::Read);
    let y = k.buffer("y", DType::F32, Access::Read);
    let z = k.buffer("z", DType::F32, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let i = k.var("i", Ty::I64);
    let value = k.var("value", Ty::F32);
    k.finish(vec![
        Stmt::assign(i, global_thread_index()),
        Stmt::if_then(
            Expr::var(i).lt(n),
            vec![
                Stmt::assign(value, Expr::load(x, i)),
                Stmt::store(
                    out,
                    i,
                    Expr::select(
                        Expr::var(value).gt(Expr::f32(0.0)),
                        Expr::fma(value, Expr::load(y, i), Expr::load(z, i)),
                        (Expr::var(value).cast(Ty::I32) * Expr::i32(3)).cast(Ty::F32),
                    ),
                ),
            ],
        ),
    ])
}

/// Divergent control flow in one block of 64 threads over `x, out: f32[64]`:
///
/// ```text
/// v = x[t]
/// if t % 2 == 0 { if t < 16 { v = v * 2 } else { v = -v } }
/// else { v = v + 100; if lane == 31 { v = 0 } }
/// out[t] = v
/// ```
pub fn divergent_branches() -> Kernel {
    let mut k = KernelBuilder::new("divergent_branches", 64);
    let x = k.buffer("x", DType::F32, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let v = k.var("v", Ty::F32);
    let t = Expr::thread_idx;
    k.finish(vec![
        Stmt::assign(v, Expr::load(x, t())),
        Stmt::if_else(
            (t() % Expr::i32(2)).equals(Expr::i32(0)),
            vec![Stmt::if_else(
                t().lt(Expr::i32(16)),
                vec![Stmt::assign(v, Expr::var(v) * Expr::f32(2.0))],
                vec![Stmt::assign(v, -Expr::var(v))],
            )],
            vec![
                Stmt::assign(v, Expr::var(v) + Expr::f32(100.0)),
                Stmt::if_then(
                    Expr::lane_id().equals(Expr::i32(31)),
                    vec![Stmt::assign(v, Expr::f32(0.0))],
                ),
            ],
        ),
        Stmt::store(out, t(), v),
    ])
}

/// A loop whose trip count differs per thread, in one block of 64 threads over
/// `x, out: f32[64]`: `out[t] = sum(x[0..=t])`.
pub fn prefix_sums_by_loop() -> Kernel {
    let mut k = KernelBuilder::new("prefix_sums_by_loop", 64);
    let x = k.buffer("x", DType::F32, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let acc = k.var("acc", Ty::F32);
    let j = k.var("j", Ty::I32);
    k.finish(vec![
        Stmt::assign(acc, Expr::f32(0.0)),
        Stmt::for_range(
            j,
            Expr::i32(0),
            Expr::thread_idx() + Expr::i32(1),
            Expr::i32(1),
            vec![Stmt::assign(acc, Expr::var(acc) + Expr::load(x, j))],
        ),
        Stmt::store(out, Expr::thread_idx(), acc),
    ])
}

/// Each block reverses its `block_dim` elements of `x` through shared memory:
/// `out[b * block_dim + t] = x[b * block_dim + (block_dim - 1 - t)]` (a store to shared
/// memory, a `Barrier`, a load of another thread's element).
///
/// Parameters: `x` (read), `out` (write), both `dtype`. Grid: `[blocks, 1, 1]`.
pub fn reverse_blocks(dtype: DType, block_dim: u32) -> Kernel {
    let mut k = KernelBuilder::new(format!("reverse_blocks_{dtype}"), block_dim);
    k.grid(grid_x(SizeExpr::Sym("blocks".to_string())));
    let x = k.buffer("x", dtype, Access::Read);
    let out = k.buffer("out", dtype, Access::Write);
    let staged = k.shared("staged", dtype, block_dim);
    let base = k.var("base", Ty::I32);
    k.finish(vec![
        Stmt::assign(base, Expr::block_idx(0) * Expr::block_dim()),
        Stmt::store(
            staged,
            Expr::thread_idx(),
            Expr::load(x, Expr::var(base) + Expr::thread_idx()),
        ),
        Stmt::Barrier,
        Stmt::store(
            out,
            Expr::var(base) + Expr::thread_idx(),
            Expr::load(
                staged,
                Expr::block_dim() - Expr::i32(1) - Expr::thread_idx(),
            ),
        ),
    ])
}

/// Each thread packs two f32 values into one register of `input` halves (`PackHalves`) and
/// stores the word: `out[t] = pack(x[2t], x[2t + 1])`.
///
/// Parameters: `x` (f32, 2 per thread), `out` (i32, written). Grid: one block of 64 threads.
pub fn pack_halves(input: MmaInput) -> Kernel {
    let mut kb = KernelBuilder::new(format!("pack_halves_{}", input.name()), 64);
    kb.grid(grid_x(SizeExpr::Const(1)));
    let x = kb.buffer("x", DType::F32, Access::Read);
    let out = kb.buffer("out", DType::I32, Access::Write);
    let word = kb.var("word", Ty::I32);
    let pair = Expr::thread_idx() * Expr::i32(2);
    kb.finish(vec![
        Stmt::PackHalves {
            dst: word,
            input,
            lo: Expr::load(x, pair.clone()),
            hi: Expr::load(x, pair + Expr::i32(1)),
        },
        Stmt::store(out, Expr::thread_idx(), Expr::var(word)),
    ])
}

/// One warp computes `out = a · b` for a 16×K `a` and a K×8 `b` of `input` (K =
/// `input.k()`: 16, or 32 for FP8) through the tensor-core statements: `CpAsync` of both
/// tiles into shared memory, with the rows of `a` at or beyond `m` and the k indices at or
/// beyond `k` zero-filled through the copy's source length; `LdMatrix` ×4 for A and ×2 for
/// B (`.trans` when `b` is stored k-major, 16-bit inputs only); one `Mma` from zero
/// accumulators; the f32 result stored from the accumulator layout.
///
/// Parameters: `a` (16×K row-major), `b` (`[k][n]` K×8 row-major when `b_k_major`, else
/// `[n][k]` 8×K), `out` (16×8 f32, written); `m: i32`, `k: i32` (0..=K). Grid: one block
/// of one warp.
pub fn mma_tile(input: MmaInput, b_k_major: bool) -> Kernel {
    assert!(
        !(b_k_major && input.is_fp8()),
        "FP8 B tiles are k-contiguous"
    );
    let dtype = input.dtype();
    let kdim = input.k() as i32;
    // Elements of one 16-byte chunk.
    let chunk = (16 / dtype.size_bytes()) as i32;
    let layout = if b_k_major { "kn" } else { "nk" };
    let mut kb = KernelBuilder::new(format!("mma_tile_{}_{layout}", input.name()), 32);
    kb.grid(grid_x(SizeExpr::Const(1)));
    let a = kb.buffer("a", dtype, Access::Read);
    let b = kb.buffer("b", dtype, Access::Read);
    let out = kb.buffer("out", DType::F32, Access::Write);
    let m = kb.scalar("m", Ty::I32);
    let k = kb.scalar("k", Ty::I32);
    let a_tile = kb.shared("a_tile", dtype, 16 * kdim as u32);
    let b_tile = kb.shared("b_tile", dtype, 8 * kdim as u32);
    let lane = kb.var("lane", Ty::I32);
    let a_frag: Vec<VarId> = (0..4).map(|i| kb.var(format!("a{i}"), Ty::I32)).collect();
    let b_frag: Vec<VarId> = (0..2).map(|i| kb.var(format!("b{i}"), Ty::I32)).collect();
    let acc: Vec<VarId> = (0..4).map(|i| kb.var(format!("c{i}"), Ty::F32)).collect();
    let lane_e = || Expr::var(lane);
    // The number of k indices of a chunk starting at `first` that lie below `k`.
    let k_len = |first: Expr| (k.clone() - first).max(Expr::i32(0)).min(Expr::i32(chunk));

    // A: 32 chunks, one per lane: row lane / 2, k from chunk * (lane % 2).
    let a_row = lane_e() / Expr::i32(2);
    let a_col = (lane_e() % Expr::i32(2)) * Expr::i32(chunk);
    let a_copy = Stmt::CpAsync {
        dst: a_tile,
        dst_index: a_row.clone() * Expr::i32(kdim) + a_col.clone(),
        src: a,
        src_index: a_row.clone() * Expr::i32(kdim) + a_col.clone(),
        src_len: Expr::select(a_row.lt(m), k_len(a_col), Expr::i32(0)),
    };
    // B: 16 chunks, lanes 0..16.
    let b_copy = if b_k_major {
        Stmt::CpAsync {
            dst: b_tile,
            dst_index: lane_e() * Expr::i32(8),
            src: b,
            src_index: lane_e() * Expr::i32(8),
            src_len: Expr::select(lane_e().lt(k.clone()), Expr::i32(8), Expr::i32(0)),
        }
    } else {
        let b_row = lane_e() / Expr::i32(2);
        let b_col = (lane_e() % Expr::i32(2)) * Expr::i32(chunk);
        Stmt::CpAsync {
            dst: b_tile,
            dst_index: b_row.clone() * Expr::i32(kdim) + b_col.clone(),
            src: b,
            src_index: b_row * Expr::i32(kdim) + b_col.clone(),
            src_len: k_len(b_col),
        }
    };
    // ldmatrix row addresses: lane 8i + r names row r of matrix i.
    let matrix = lane_e() / Expr::i32(8);
    let row_in_matrix = lane_e() % Expr::i32(8);
    let a_index = (row_in_matrix.clone() + (matrix.clone() % Expr::i32(2)) * Expr::i32(8))
        * Expr::i32(kdim)
        + (matrix.clone() / Expr::i32(2)) * Expr::i32(chunk);
    // Matrix i of B (lanes 0..16 matter): k rows 8i.. (k-major), or n rows with k from
    // chunk * i.
    let b_matrix = matrix % Expr::i32(2);
    let b_index = if b_k_major {
        (b_matrix * Expr::i32(8) + row_in_matrix) * Expr::i32(8)
    } else {
        row_in_matrix * Expr::i32(kdim) + b_matrix * Expr::i32(chunk)
    };
    let g = lane_e() / Expr::i32(4);
    let t = lane_e() % Expr::i32(4);
    let mut body = vec![
        Stmt::assign(lane, Expr::lane_id()),
        a_copy,
        Stmt::if_then(lane_e().lt(Expr::i32(16)), vec![b_copy]),
        Stmt::CpAsyncCommit,
        Stmt::CpAsyncWait(0),
        Stmt::Barrier,
        Stmt::LdMatrix {
            dsts: a_frag.clone(),
            trans: false,
            buf: a_tile,
            index: a_index,
        },
        Stmt::LdMatrix {
            dsts: b_frag.clone(),
            trans: b_k_major,
            buf: b_tile,
            index: b_index,
        },
    ];
    body.extend(acc.iter().map(|&c| Stmt::assign(c, Expr::f32(0.0))));
    body.push(Stmt::Mma {
        input,
        d: [acc[0], acc[1], acc[2], acc[3]],
        a: [a_frag[0], a_frag[1], a_frag[2], a_frag[3]],
        b: [b_frag[0], b_frag[1]],
        c: [acc[0], acc[1], acc[2], acc[3]],
    });
    for (j, &c) in acc.iter().enumerate() {
        let row = g.clone() + Expr::i32(8 * (j as i32 / 2));
        let col = t.clone() * Expr::i32(2) + Expr::i32(j as i32 % 2);
        body.push(Stmt::store(out, row * Expr::i32(8) + col, c));
    }
    kb.finish(body)
}

/// Programmatic dependent launch: each block asks L2 for its 64 elements of `x` before the
/// grid-dependency wait (thread 0, one `PrefetchL2` of the whole 16-byte chunks below `n`),
/// then copies them (`out[i] = x[i]` for `i < n`) and lets the next kernel launch
/// (`LaunchDependents`).
///
/// Parameters: `x` (read), `out` (write), both `dtype`; `n: i64`. Grid: `ceil(n / 64)`
/// blocks of 64 threads.
pub fn prefetch_copy(dtype: DType) -> Kernel {
    let mut k = KernelBuilder::new(format!("prefetch_copy_{dtype}"), 64);
    k.grid(grid_over_n(64));
    let x = k.buffer("x", dtype, Access::Read);
    let out = k.buffer("out", dtype, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let base = k.var("base", Ty::I64);
    let bytes = k.var("bytes", Ty::I32);
    let i = k.var("i", Ty::I64);
    let size = dtype.size_bytes() as i32;
    let left = (n.clone() - Expr::var(base))
        .min(Expr::i64(64))
        .cast(Ty::I32);
    k.finish(vec![
        Stmt::assign(base, Expr::block_idx(0).cast(Ty::I64) * Expr::i64(64)),
        Stmt::if_then(
            Expr::thread_idx().equals(Expr::i32(0)),
            vec![
                Stmt::assign(
                    bytes,
                    left * Expr::i32(size) / Expr::i32(16) * Expr::i32(16),
                ),
                Stmt::if_then(
                    Expr::var(bytes).gt(Expr::i32(0)),
                    vec![Stmt::PrefetchL2 {
                        buf: x,
                        index: Expr::var(base),
                        bytes: Expr::var(bytes),
                    }],
                ),
            ],
        ),
        Stmt::GridDependencyWait,
        Stmt::assign(i, Expr::var(base) + Expr::thread_idx().cast(Ty::I64)),
        Stmt::if_then(
            Expr::var(i).lt(n),
            vec![Stmt::store(out, Expr::var(i), Expr::load(x, Expr::var(i)))],
        ),
        Stmt::LaunchDependents,
    ])
}

/// The "last block" pattern (`AtomicAdd`, `Fence`): block b of 32 threads stores the sum
/// of its 32 elements of `x` as `partial[b]` (thread 0, in order), counts itself in
/// `counter[0]` (thread 0: `Fence`, `AtomicAdd`, `Fence`), records the count it saw in
/// `arrival[b]` and tells its threads through shared memory across a barrier whether it
/// came last; the last block's thread 0 adds the partials in block order into `out[0]` and
/// sets the counter back to zero (unless `reset` is false).
///
/// Parameters: `x` (f32 read), `partial` (f32 read-write), `counter` (i32 read-write, one
/// element, zero before the launch), `arrival` (i32 write), `out` (f32 write, one
/// element); `n: i64` blocks. Grid: `n` blocks of 32 threads.
pub fn last_block_total(reset: bool) -> Kernel {
    let mut k = KernelBuilder::new("last_block_total", 32);
    k.grid(grid_x(SizeExpr::Sym("n".to_string())));
    let x = k.buffer("x", DType::F32, Access::Read);
    let partial = k.buffer("partial", DType::F32, Access::ReadWrite);
    let counter = k.buffer("counter", DType::I32, Access::ReadWrite);
    let arrival = k.buffer("arrival", DType::I32, Access::Write);
    let out = k.buffer("out", DType::F32, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let last = k.shared("last", DType::I32, 1);
    let (sum, i, old) = (
        k.var("sum", Ty::F32),
        k.var("i", Ty::I64),
        k.var("old", Ty::I32),
    );
    let block = Expr::block_idx(0).cast(Ty::I64);
    let thread0 = Expr::thread_idx().equals(Expr::i32(0));
    let mut total = vec![Stmt::assign(sum, Expr::f32(0.0))];
    total.push(Stmt::for_range(
        i,
        Expr::i64(0),
        n.clone(),
        Expr::i64(1),
        vec![Stmt::assign(
            sum,
            Expr::var(sum) + Expr::load(partial, Expr::var(i)),
        )],
    ));
    total.push(Stmt::store(out, Expr::i64(0), Expr::var(sum)));
    if reset {
        total.push(Stmt::store(counter, Expr::i64(0), Expr::i32(0)));
    }
    k.finish(vec![
        Stmt::if_then(
            thread0.clone(),
            vec![
                Stmt::assign(sum, Expr::f32(0.0)),
                Stmt::for_range(
                    i,
                    Expr::i64(0),
                    Expr::i64(32),
                    Expr::i64(1),
                    vec![Stmt::assign(
                        sum,
                        Expr::var(sum)
                            + Expr::load(x, block.clone() * Expr::i64(32) + Expr::var(i)),
                    )],
                ),
                Stmt::store(partial, block.clone(), Expr::var(sum)),
            ],
        ),
        Stmt::Barrier,
        Stmt::if_then(
            thread0.clone(),
            vec![
                Stmt::Fence,
                Stmt::AtomicAdd {
                    dst: old,
                    buf: counter,
                    index: Expr::i64(0),
                    value: Expr::i32(1),
                },
                Stmt::Fence,
                Stmt::store(arrival, block, Expr::var(old)),
                Stmt::store(
                    last,
                    Expr::i32(0),
                    Expr::var(old)
                        .equals((n - Expr::i64(1)).cast(Ty::I32))
                        .cast(Ty::I32),
                ),
            ],
        ),
        Stmt::Barrier,
        Stmt::if_then(
            Expr::load(last, Expr::i32(0)).equals(Expr::i32(1)),
            vec![Stmt::if_then(thread0, total)],
        ),
    ])
}

/// Hopper's warpgroup product ([`crate::wgmma`]): one warpgroup copies a 64 × 64 A and an
/// `n` × 64 B (both K-major, `[rows, 64]` row-major in memory) into 128-byte swizzled shared
/// tiles with `cp.async`, fences the async proxy (unless `fence` is false: a kernel the
/// interpreter rejects), and multiplies them with four m64n`n`k16 `wgmma`s whose
/// descriptors start 32 bytes apart; each thread stores its `n / 2` accumulators to `out`
/// (`[64, n]` f32, `out = A · Bᵀ`).
///
/// Parameters: `a`, `b` (read, `input`'s dtype), `out` (write). Grid: one block of 128
/// threads. `n` a multiple of 16 in 16..=256.
pub fn wgmma_tile(input: MmaInput, n: u32, fence: bool) -> Kernel {
    use crate::wgmma::{WgmmaOp, WgmmaTile};
    let mut kb = KernelBuilder::new(format!("wgmma_tile_{}_n{n}", input.name()), 128);
    let dtype = input.dtype();
    let a = kb.buffer("a", dtype, Access::Read);
    let b = kb.buffer("b", dtype, Access::Read);
    let out = kb.buffer("out", DType::F32, Access::Write);
    let a_tile = kb.shared("a_tile", dtype, 64 * 64);
    let b_tile = kb.shared("b_tile", dtype, n * 64);
    let acc: Vec<VarId> = (0..n / 2)
        .map(|i| kb.var(format!("d{i}"), Ty::F32))
        .collect();
    let mut body = Vec::new();
    // Chunk c of the tile (row c / 8, 16-byte chunk c % 8) from thread t: c = t + 128 q.
    let copies = |body: &mut Vec<Stmt>, rows: u32, src: Buf, dst: Buf| {
        for q in 0..rows * 8 / 128 {
            let c = Expr::thread_idx() + Expr::i32(128 * q as i32);
            let row = c.clone() / Expr::i32(8);
            let chunk = c.clone() % Expr::i32(8);
            // `wgmma::swizzled_chunk(row, chunk)` in elements: row · 64 + (chunk ^ row % 8) · 8.
            let swizzled = Expr::binary(BinOp::Xor, chunk, row.clone() % Expr::i32(8));
            body.push(Stmt::CpAsync {
                dst,
                dst_index: row * Expr::i32(64) + swizzled * Expr::i32(8),
                src,
                src_index: c * Expr::i32(8),
                src_len: Expr::i32(8),
            });
        }
    };
    copies(&mut body, 64, a, a_tile);
    copies(&mut body, n, b, b_tile);
    body.extend([Stmt::CpAsyncCommit, Stmt::CpAsyncWait(0)]);
    if fence {
        body.push(Stmt::Wgmma(WgmmaOp::FenceProxyAsync));
    }
    body.push(Stmt::Barrier);
    body.extend(acc.iter().map(|&d| Stmt::assign(d, Expr::f32(0.0))));
    body.push(Stmt::Wgmma(WgmmaOp::Fence));
    for step in 0..4 {
        let tile = |buf: Buf| WgmmaTile {
            buf,
            index: Expr::i32(16 * step),
            sbo: 1024,
        };
        body.push(Stmt::Wgmma(WgmmaOp::Mma {
            input,
            n,
            d: acc.clone(),
            a: tile(a_tile),
            b: tile(b_tile),
            accumulate: step > 0,
        }));
    }
    body.extend([Stmt::Wgmma(WgmmaOp::Commit), Stmt::Wgmma(WgmmaOp::Wait(0))]);
    // Register i of thread t: row 16 w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2 q + i % 2.
    let lane = Expr::lane_id();
    let row0 = Expr::warp_id() * Expr::i32(16) + lane.clone() / Expr::i32(4);
    let col0 = (lane % Expr::i32(4)) * Expr::i32(2);
    for (i, &d) in acc.iter().enumerate() {
        let i = i as i32;
        let row = row0.clone() + Expr::i32(8 * ((i / 2) % 2));
        let col = col0.clone() + Expr::i32(8 * (i / 4) + i % 2);
        body.push(Stmt::store(out, row * Expr::i32(n as i32) + col, d));
    }
    kb.finish(body)
}

/// A copy through raw element pairs (`kiln_kir::loads_raw_pairs`): thread t loads `words`
/// (1, 2 or 4) `I32` registers of `x` (bf16 or f16) from element `2 * words * t` (one
/// `LoadVec`, two elements a register, no conversion) and stores them to `out` (i32) from
/// word `words * t`: `out` ends with the bytes of `x`.
///
/// Parameters: `x` (read, `dtype`), `out` (write, i32). Grid: any number of 32-thread
/// blocks; `x` holds `64 * words` elements a block, `out` `32 * words` words.
pub fn raw_pairs_copy(dtype: DType, words: usize) -> Kernel {
    let mut k = KernelBuilder::new(format!("raw_pairs_copy_{dtype}_x{words}"), 32);
    let x = k.buffer("x", dtype, Access::Read);
    let out = k.buffer("out", DType::I32, Access::Write);
    let t = k.var("t", Ty::I64);
    let dsts: Vec<VarId> = (0..words)
        .map(|i| k.var(format!("w{i}"), Ty::I32))
        .collect();
    let mut body = vec![
        Stmt::assign(
            t,
            (Expr::block_idx(0) * Expr::i32(32) + Expr::thread_idx()).cast(Ty::I64),
        ),
        Stmt::LoadVec {
            dsts: dsts.clone(),
            buf: x,
            index: Expr::var(t) * Expr::i64(2 * words as i64),
        },
    ];
    for (i, &w) in dsts.iter().enumerate() {
        let at = Expr::var(t) * Expr::i64(words as i64) + Expr::i64(i as i64);
        body.push(Stmt::store(out, at, Expr::var(w)));
    }
    k.finish(body)
}
