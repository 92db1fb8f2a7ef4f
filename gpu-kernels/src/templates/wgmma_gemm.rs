//! The Hopper GEMM template (sm_90a `wgmma`) for prefill-sized bf16 and f16 matmuls of the
//! `linear` layout, `A [.., M, K] @ W[N, K].T` with f32 accumulation; taken instead of the
//! `mma.sync` template ([`super::mma_gemm`], whose plan it starts from) when every compiled
//! target has `wgmma` ([`crate::Options::wgmma`], set by the driver) and
//! [`crate::GemmTuning::wgmma`] allows it.
//!
//! A block of two warpgroups (256 threads) computes a `128 × bn` output tile (`bn` 256 for
//! one matmul, 128 for two horizontally fused ones), each warpgroup 64 rows of it with
//! `wgmma.m64n{bn}k16` products whose accumulators (`bn / 2` f32 registers a thread per
//! matmul) never leave registers until the epilogue:
//! - a `stages`-deep ring of `cp.async` copies stages 64-wide k slices of A (`128 × 64`)
//!   and of each weight (`bn × 64`), both K-major, in shared memory with the 128-byte
//!   swizzle the `wgmma` descriptors read (16-byte chunk c of row r at chunk `c ^ (r % 8)`
//!   of its 128-byte row; every stage starts 1024-byte aligned); rows or k past the matrix
//!   are zero-filled with a source length of 0, so ragged M, N and K (a multiple of 8) need
//!   no other guard;
//! - each thread fences the async proxy after its copies of a slice land
//!   (`fence.proxy.async`), then the block's barrier; the copies of slice `kt + stages - 2`
//!   go out after that barrier into the stage the product of slice `kt - 2` read, which
//!   every warpgroup has waited for (`wgmma.wait_group 1` at the end of each slice keeps the
//!   slice's own batch of four k16 products in flight while the next slice is prepared);
//! - the epilogue maps each accumulator register to its (row, column) (the `wgmma`
//!   fragment layout, [`kiln_kir::wgmma::accumulator_element`]) and runs the fused
//!   element-wise work of the `mma.sync` template's epilogue (bias, activation, residual,
//!   cast), pairs of adjacent columns together where every stored width is even.
//!
//! The kernel name carries the tile: `wgmma_gemm_128x256x64_s4_r8`. TMA, mbarriers and a
//! producer warpgroup (`setmaxnreg`) are the next step; this one keeps the copy scheme of
//! the `mma.sync` template.

use super::matmul::{batch_index, epilogue_at, epilogue_lanes, kernel_name, OutputElement};
use super::mma_gemm::{and_mask, i32c, raster, shr, MmaPlan};
use super::{ceil_div_size, size_of_dims, Body};
use crate::emit::{add, and, lt, mul, EResult, Emitter};
use crate::graph::FuncGraph;
use crate::partition::Group;
use kiln_ir::{Dim, Value};
use kiln_kir::wgmma::{WgmmaOp, WgmmaTile};
use kiln_kir::{BinOp, Buf, Expr, MmaInput, Special, Stmt, Ty, VarId};

/// Rows of a block tile (two warpgroups of 64).
const BM: u32 = 128;
/// Width of a k slice: one 128-byte swizzle row of 16-bit elements.
const BK: u32 = 64;
/// Threads of a block.
const THREADS: u32 = 256;
/// The most columns of accumulators a thread holds over all fused matmuls (`bn / 2`
/// registers each).
const MAX_COLUMNS: u32 = 256;

/// The `wgmma` plan of a GEMM group the `mma.sync` template planned as `plan`: the same
/// plan with the block tile of this template, or `None` when it does not apply (knobs off,
/// a decode-sized or split-K plan, FP8, a `[K, N]` B, more than two fused matmuls, or a
/// tile whose stages do not fit the shared memory `options` allows).
pub(crate) fn plan(
    g: &FuncGraph<'_>,
    plan: &MmaPlan,
    options: &crate::Options,
    small: bool,
) -> Option<MmaPlan> {
    let tuning = &options.gemm;
    if !(options.wgmma && tuning.wgmma) || small {
        return None;
    }
    if plan.split().is_some() || plan.segmented() || plan.tile.warps_k != 1 {
        return None;
    }
    if !matches!(plan.input, MmaInput::Bf16 | MmaInput::F16) {
        return None;
    }
    let sets = plan.b.len() as u32;
    if sets == 0 || sets > 2 || plan.b.iter().any(|s| s.k_rows) {
        return None;
    }
    // A matmul of rows known to be few is better served by the mma.sync tiles.
    let out = g.shape(plan.a);
    if out[out.len() - 2].as_const().is_some_and(|m| m <= 64) {
        return None;
    }
    let bn = MAX_COLUMNS / sets;
    let stage = 2 * BK * (BM + sets * bn);
    let limit = match tuning.shared_kib {
        0 => 99 * 1024,
        kib => kib * 1024,
    };
    let stages = (limit / stage).min(4);
    if stages < 3 {
        return None;
    }
    let mut tile = plan.tile;
    tile.bm = BM;
    tile.bn = bn;
    tile.bk = BK;
    tile.warps_m = 2;
    tile.warps_n = 1;
    tile.stages = stages;
    Some(MmaPlan {
        tile,
        raster: tuning.raster.max(1),
        ..plan.clone()
    })
}

/// The kernel of `group` under a plan from [`plan`].
pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    stores: &[Value],
    plan: &MmaPlan,
) -> EResult<Body> {
    let g = e.g;
    let matmuls = group.roots.clone();
    let out_shape = g.shape(matmuls[0]).to_vec();
    let rank = out_shape.len();
    let batch_dims = out_shape[..rank - 2].to_vec();
    let t = plan.tile;
    let dtype = plan.input.dtype();
    let sets = plan.b.len();
    let (bm, bn, bk) = (i64::from(t.bm), i64::from(t.bn), i64::from(t.bk));
    let stages = i64::from(t.stages);
    let threads = i64::from(THREADS);
    let ity = e.index_ty;
    let index = |x: Expr| -> Expr {
        if ity == Ty::I64 {
            Expr::Cast(Ty::I64, Box::new(x))
        } else {
            x
        }
    };
    let mut body = Vec::new();

    let tid = Expr::Special(Special::ThreadIdx);
    let lane = e.bind(&mut body, "lane", Ty::I32, Expr::Special(Special::LaneId));
    let warp = e.bind(&mut body, "warp", Ty::I32, Expr::Special(Special::WarpId));
    let warpgroup = e.bind(&mut body, "warpgroup", Ty::I32, shr(warp.clone(), 2));
    let grid_n = plan
        .b
        .iter()
        .map(|s| s.n.clone())
        .max_by_key(|d| d.as_const().unwrap_or(u64::MAX))
        .unwrap_or(Dim::Const(1));
    let (m0, n0) = if plan.raster > 1 {
        let (m_tile, n_tile) = raster(e, &mut body, plan, &out_shape, &grid_n);
        (mul(index(m_tile), e.ix(bm)), mul(index(n_tile), e.ix(bn)))
    } else {
        (
            mul(e.special(Special::BlockIdx(1)), e.ix(bm)),
            mul(e.special(Special::BlockIdx(0)), e.ix(bn)),
        )
    };
    let m0 = e.bind(&mut body, "m0", ity, m0);
    let n0 = e.bind(&mut body, "n0", ity, n0);
    let bz = e.special(Special::BlockIdx(2));
    let batch = e.delinearize(&mut body, bz, &batch_dims);
    let m_size = e.dim(&out_shape[rank - 2]);
    let k_size = e.ix(plan.k as i64);
    let k_tiles = plan.k.div_ceil(bk as u64) as i64;

    // Accumulators: per matmul, bn / 2 registers a thread.
    let acc: Vec<Vec<VarId>> = (0..sets)
        .map(|_| (0..bn / 2).map(|_| e.var("acc", Ty::F32)).collect())
        .collect();
    for &c in acc.iter().flatten() {
        body.push(Stmt::Assign(c, Expr::f32(0.0)));
    }
    let a_stage = bm * bk;
    let b_stage = bn * bk;
    let a_tile = e.shared_array("a_tile", dtype, (stages * a_stage) as u32);
    let b_tiles: Vec<Buf> = (0..sets)
        .map(|_| e.shared_array("b_tile", dtype, (stages * b_stage) as u32))
        .collect();
    let a_buf = e.buffer(plan.a_source, kiln_kir::Access::Read);
    let b_bufs: Vec<Buf> = plan
        .b
        .iter()
        .map(|s| e.buffer(s.value, kiln_kir::Access::Read))
        .collect();

    // ---- the copies of a stage: thread t takes chunk t % 8 of rows t / 8 + 32 q. The
    // swizzle sees row % 8 only, the same for every q.
    let chunk = e.bind(&mut body, "chunk", Ty::I32, and_mask(tid.clone(), 7));
    let row = e.bind(&mut body, "copy_row", Ty::I32, shr(tid.clone(), 3));
    let col = e.bind(&mut body, "copy_col", Ty::I32, chunk.clone() * i32c(8));
    let swizzled = Expr::binary(BinOp::Xor, chunk.clone(), and_mask(row.clone(), 7));
    let dst = e.bind(
        &mut body,
        "copy_dst",
        Ty::I32,
        row.clone() * i32c(bk) + swizzled * i32c(8),
    );
    let rows_per_pass = threads / 8;
    struct Copies {
        /// Per pass q: the source index at k = 0 and whether the row is inside.
        rows: Vec<(Expr, Expr)>,
    }
    let a_batch = batch_index(e, plan.a, &batch_dims, &batch);
    let a_shape = g.shape(plan.a).to_vec();
    let mut a_copies = Copies { rows: Vec::new() };
    for q in 0..bm / rows_per_pass {
        let gm = add(m0.clone(), index(row.clone() + i32c(q * rows_per_pass)));
        let mut idx = a_batch.clone();
        idx.extend([gm.clone(), index(col.clone())]);
        let src = e.linear(&a_shape, &idx);
        let src = e.bind(&mut body, "a_src", ity, src);
        let ok = e.bind(&mut body, "a_ok", Ty::Pred, lt(gm, m_size.clone()));
        a_copies.rows.push((src, ok));
    }
    let mut b_copies = Vec::new();
    for source in &plan.b {
        let w_shape = g.shape(source.value).to_vec();
        let b_batch = batch_index(
            e,
            source.permute.unwrap_or(source.value),
            &batch_dims,
            &batch,
        );
        let n_size = e.dim(&source.n);
        let mut copies = Copies { rows: Vec::new() };
        for q in 0..bn / rows_per_pass {
            let gn = add(n0.clone(), index(row.clone() + i32c(q * rows_per_pass)));
            let mut idx = b_batch.clone();
            idx.extend([gn.clone(), index(col.clone())]);
            let src = e.linear(&w_shape, &idx);
            let src = e.bind(&mut body, "b_src", ity, src);
            let ok = e.bind(&mut body, "b_ok", Ty::Pred, lt(gn, n_size.clone()));
            copies.rows.push((src, ok));
        }
        b_copies.push(copies);
    }
    // The copies of k slice `kt` into stage `stage` (I32 expressions); slices past K are
    // zero-filled without reading memory.
    let load_stage = |e: &mut Emitter<'_, '_>, stage: Expr, kt: Expr| -> Vec<Stmt> {
        let mut out = Vec::new();
        let k0 = e.bind(&mut out, "k0", ity, mul(index(kt), e.ix(bk)));
        let k_ok = lt(add(k0.clone(), index(col.clone())), k_size.clone());
        let k_ok = e.bind(&mut out, "k_ok", Ty::Pred, k_ok);
        let mut copy = |tile: Buf, stage_len: i64, src_buf: Buf, copies: &Copies| {
            for (q, (src, row_ok)) in copies.rows.iter().enumerate() {
                let valid = and(row_ok.clone(), k_ok.clone());
                out.push(Stmt::CpAsync {
                    dst: tile,
                    dst_index: stage.clone() * i32c(stage_len)
                        + dst.clone()
                        + i32c(q as i64 * rows_per_pass * bk),
                    src: src_buf,
                    src_index: Expr::select(valid.clone(), add(src.clone(), k0.clone()), e.ix(0)),
                    src_len: Expr::select(valid, i32c(8), i32c(0)),
                });
            }
        };
        copy(a_tile, a_stage, a_buf, &a_copies);
        for (i, copies) in b_copies.iter().enumerate() {
            copy(b_tiles[i], b_stage, b_bufs[i], copies);
        }
        out
    };

    // ---- the pipeline.
    for s in 0..stages - 2 {
        let copies = load_stage(e, i32c(s), i32c(s));
        body.extend(copies);
        body.push(Stmt::CpAsyncCommit);
    }
    let kt = e.var("kt", Ty::I32);
    let mut kloop = vec![
        Stmt::CpAsyncWait((stages - 3) as u32),
        Stmt::Wgmma(WgmmaOp::FenceProxyAsync),
        Stmt::Barrier,
    ];
    let next = Expr::var(kt) + i32c(stages - 2);
    let next_stage = e.bind(
        &mut kloop,
        "next_stage",
        Ty::I32,
        Expr::binary(BinOp::Rem, next.clone(), i32c(stages)),
    );
    let copies = load_stage(e, next_stage, next);
    kloop.extend(copies);
    kloop.push(Stmt::CpAsyncCommit);
    let stage = Expr::binary(BinOp::Rem, Expr::var(kt), i32c(stages));
    let a_base = e.bind(
        &mut kloop,
        "a_base",
        Ty::I32,
        stage.clone() * i32c(a_stage) + warpgroup.clone() * i32c(64 * bk),
    );
    let b_base = e.bind(&mut kloop, "b_base", Ty::I32, stage * i32c(b_stage));
    kloop.push(Stmt::Wgmma(WgmmaOp::Fence));
    for step in 0..bk / 16 {
        for (i, d) in acc.iter().enumerate() {
            kloop.push(Stmt::Wgmma(WgmmaOp::Mma {
                input: plan.input,
                n: bn as u32,
                d: d.clone(),
                a: WgmmaTile {
                    buf: a_tile,
                    index: a_base.clone() + i32c(16 * step),
                    sbo: 1024,
                },
                b: WgmmaTile {
                    buf: b_tiles[i],
                    index: b_base.clone() + i32c(16 * step),
                    sbo: 1024,
                },
                accumulate: true,
            }));
        }
    }
    kloop.push(Stmt::Wgmma(WgmmaOp::Commit));
    kloop.push(Stmt::Wgmma(WgmmaOp::Wait(1)));
    body.push(Stmt::For {
        var: kt,
        start: i32c(0),
        end: i32c(k_tiles),
        step: i32c(1),
        body: kloop,
    });
    body.push(Stmt::Wgmma(WgmmaOp::Wait(0)));
    body.push(Stmt::CpAsyncWait(0));

    // ---- epilogue: register i of a thread holds row 16 (warp % 4) + lane / 4 + 8 ((i / 2)
    // % 2) of its warpgroup's 64, column 8 (i / 4) + 2 (lane % 4) + i % 2.
    let row0 = e.bind(
        &mut body,
        "row0",
        Ty::I32,
        warpgroup * i32c(64) + and_mask(warp, 3) * i32c(16) + shr(lane.clone(), 2),
    );
    let col0 = e.bind(&mut body, "col0", Ty::I32, and_mask(lane, 3) * i32c(2));
    let paired = plan.paired
        && stores
            .iter()
            .all(|&o| matches!(g.shape(o).last(), Some(Dim::Const(n)) if n % 2 == 0));
    for j in 0..bn / 8 {
        for half in 0..2 {
            let row = row0.clone() + i32c(8 * half);
            let gm = e.bind(&mut body, "row", ity, add(m0.clone(), index(row)));
            let first = (4 * j + 2 * half) as usize;
            let at_col = |e: &mut Emitter<'_, '_>, body: &mut Vec<Stmt>, c: i64| {
                let col = col0.clone() + i32c(8 * j + c);
                e.bind(body, "col", ity, add(n0.clone(), index(col)))
            };
            if paired {
                let gn = at_col(e, &mut body, 0);
                let accs: Vec<Vec<VarId>> =
                    acc.iter().map(|a| a[first..first + 2].to_vec()).collect();
                let at = OutputElement {
                    batch: &batch,
                    row: &gm,
                    col: &gn,
                    rows: &m_size,
                };
                epilogue_lanes(e, &mut body, &matmuls, &accs, &at, None, stores)?;
                continue;
            }
            for c in 0..2 {
                let gn = at_col(e, &mut body, c);
                let accs: Vec<VarId> = acc.iter().map(|a| a[first + c as usize]).collect();
                let at = OutputElement {
                    batch: &batch,
                    row: &gm,
                    col: &gn,
                    rows: &m_size,
                };
                epilogue_at(e, &mut body, &matmuls, &accs, &at, None, stores)?;
            }
        }
    }
    for &m in &matmuls {
        e.fused.insert(m);
    }
    for source in &plan.b {
        if let Some(p) = source.permute {
            e.fused.insert(p);
        }
    }
    e.fused.extend(plan.casts.iter().copied());
    let raster_name = if plan.raster > 1 {
        format!("_r{}", plan.raster)
    } else {
        String::new()
    };
    let paired_name = if paired { "_p2" } else { "" };
    let what = kernel_name(
        &format!(
            "wgmma_gemm_{}x{}x{}_s{}{raster_name}{paired_name}",
            t.bm, t.bn, t.bk, t.stages
        ),
        &matmuls,
        stores,
    );
    Ok(Body {
        what,
        block_dim: THREADS,
        grid: [
            ceil_div_size(size_of_dims(&[grid_n]), t.bn as u64),
            ceil_div_size(size_of_dims(&out_shape[rank - 2..rank - 1]), t.bm as u64),
            size_of_dims(&batch_dims),
        ],
        stmts: body,
    })
}
