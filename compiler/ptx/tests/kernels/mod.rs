//! The kernels the emitter tests run: the representative set that is snapshotted (bf16
//! vector add, RMSNorm rows, every unary op, f8 stores, a tiled loop, a tensor-core tile
//! through cp.async, ldmatrix and mma) and a wider set
//! (every dtype through vector add and conversions, the interpreter's examples) that only
//! has to assemble.

#![allow(dead_code)]

use kiln_ir::DType;
use kiln_kir::examples;
use kiln_kir::{
    Access, BinOp, Expr, Kernel, KernelBuilder, MmaInput, SizeExpr, Stmt, Ty, UnOp, VarId,
};

/// `blockIdx.x * blockDim + threadIdx` as an i64.
fn global_index() -> Expr {
    Expr::block_idx(0).cast(Ty::I64) * Expr::block_dim().cast(Ty::I64)
        + Expr::thread_idx().cast(Ty::I64)
}

fn grid_over(symbol: &str, block_dim: u32) -> [SizeExpr; 3] {
    [
        SizeExpr::CeilDiv(
            Box::new(SizeExpr::Sym(symbol.to_string())),
            Box::new(SizeExpr::Const(u64::from(block_dim))),
        ),
        SizeExpr::Const(1),
        SizeExpr::Const(1),
    ]
}

/// Every unary operator (and the two binary ones with routines, `pow` and float `%`):
/// `out[i * 20 + k]` is the k-th result for `x[i]`, `y[i]`:
/// k = 0..15: the f32 ops of [`UnOp::FLOAT`]; 15: pow(x, y); 16: fmod(x, y);
/// 17: f32(-(i32(x))), 18: f32(abs(i32(x))), 19: select(!(x > 0), 1, 0) and
/// `bits[i] = !(i32 bits)`.
pub fn every_unary_op() -> Kernel {
    let block_dim = 128;
    let mut k = KernelBuilder::new("every_unary_op", block_dim);
    k.grid(grid_over("n", block_dim));
    let x = k.buffer("x", DType::F32, Access::Read);
    let y = k.buffer("y", DType::F32, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let bits = k.buffer("bits", DType::I64, Access::Write);
    let n = k.scalar("n", Ty::I64);
    let i = k.var("i", Ty::I64);
    let base = k.var("base", Ty::I64);
    let value = k.var("value", Ty::F32);
    let other = k.var("other", Ty::F32);
    let whole = k.var("whole", Ty::I32);
    let store = |slot: i64, e: Expr| Stmt::store(out, Expr::var(base) + Expr::i64(slot), e);
    let mut body = vec![
        Stmt::assign(value, Expr::load(x, i)),
        Stmt::assign(other, Expr::load(y, i)),
        Stmt::assign(base, Expr::var(i) * Expr::i64(20)),
    ];
    for (slot, op) in UnOp::FLOAT.iter().enumerate() {
        body.push(store(slot as i64, Expr::var(value).apply(*op)));
    }
    body.extend([
        store(15, Expr::var(value).pow(other)),
        store(16, Expr::var(value) % other),
        Stmt::assign(whole, Expr::var(value).cast(Ty::I32)),
        store(17, (-Expr::var(whole)).cast(Ty::F32)),
        store(18, Expr::var(whole).apply(UnOp::Abs).cast(Ty::F32)),
        store(
            19,
            Expr::select(
                !Expr::var(value).gt(Expr::f32(0.0)),
                Expr::f32(1.0),
                Expr::f32(0.0),
            ),
        ),
        Stmt::store(bits, i, !Expr::var(whole).cast(Ty::I64)),
    ]);
    k.finish(vec![
        Stmt::assign(i, global_index()),
        Stmt::if_then(Expr::var(i).lt(n), body),
    ])
}

/// Quantizes f32 to both f8 formats and back: for each group of 4 elements at `4 * i`,
/// `q4 = e4m3(x * scale)` (one vector store of 4), `q5[4i + j] = e5m2(x)` (scalar
/// stores), and `back = f32(e4m3 group)` read back as a vector of 4 and scalar e5m2 loads.
pub fn f8_stores() -> Kernel {
    let block_dim = 128;
    let mut k = KernelBuilder::new("f8_quantize", block_dim);
    k.grid(grid_over("groups", block_dim));
    let x = k.buffer("x", DType::F32, Access::Read);
    let q4 = k.buffer("q4", DType::F8E4M3, Access::ReadWrite);
    let q5 = k.buffer("q5", DType::F8E5M2, Access::ReadWrite);
    let back = k.buffer("back", DType::F32, Access::Write);
    let scale = k.scalar("scale", Ty::F32);
    let groups = k.scalar("groups", Ty::I64);
    let g = k.var("g", Ty::I64);
    let lanes: Vec<VarId> = (0..4).map(|j| k.var(format!("x{j}"), Ty::F32)).collect();
    let decoded: Vec<VarId> = (0..4).map(|j| k.var(format!("d{j}"), Ty::F32)).collect();
    let first = Expr::var(g) * Expr::i64(4);
    let mut body = vec![Stmt::LoadVec {
        dsts: lanes.clone(),
        buf: x,
        index: first.clone(),
    }];
    body.push(Stmt::StoreVec {
        buf: q4,
        index: first.clone(),
        values: lanes
            .iter()
            .map(|&v| Expr::var(v) * scale.clone())
            .collect(),
    });
    for (j, &lane) in lanes.iter().enumerate() {
        body.push(Stmt::store(q5, first.clone() + Expr::i64(j as i64), lane));
    }
    body.push(Stmt::LoadVec {
        dsts: decoded.clone(),
        buf: q4,
        index: first.clone(),
    });
    for (j, &d) in decoded.iter().enumerate() {
        let at = first.clone() + Expr::i64(j as i64);
        body.push(Stmt::store(
            back,
            at.clone(),
            Expr::var(d) + Expr::load(q5, at),
        ));
    }
    k.finish(vec![
        Stmt::assign(g, global_index()),
        Stmt::if_then(Expr::var(g).lt(groups), body),
    ])
}

/// Tile edge of [`tiled_matmul`].
pub const TILE: u32 = 16;

/// `c[m, n] = sum_k a[m, k] * b[k, n]` (f32, row-major, sizes multiples of 16) with 16×16
/// tiles staged in shared memory: one block of 256 threads per output tile, an outer loop
/// over the k tiles with two barriers, an inner loop over the tile.
///
/// Parameters: `a`, `b` (read), `c` (write), `m`, `n`, `k` (i32). Grid: `[n/16, m/16, 1]`.
pub fn tiled_matmul() -> Kernel {
    let tile = TILE as i32;
    let mut kb = KernelBuilder::new("tiled_matmul", TILE * TILE);
    kb.grid([
        SizeExpr::CeilDiv(
            Box::new(SizeExpr::Sym("n".into())),
            Box::new(SizeExpr::Const(16)),
        ),
        SizeExpr::CeilDiv(
            Box::new(SizeExpr::Sym("m".into())),
            Box::new(SizeExpr::Const(16)),
        ),
        SizeExpr::Const(1),
    ]);
    let a = kb.buffer("a", DType::F32, Access::Read);
    let b = kb.buffer("b", DType::F32, Access::Read);
    let c = kb.buffer("c", DType::F32, Access::Write);
    let _m = kb.scalar("m", Ty::I32);
    let n = kb.scalar("n", Ty::I32);
    let kdim = kb.scalar("k", Ty::I32);
    let a_tile = kb.shared("a_tile", DType::F32, TILE * TILE);
    let b_tile = kb.shared("b_tile", DType::F32, TILE * TILE);
    let row = kb.var("row", Ty::I32);
    let col = kb.var("col", Ty::I32);
    let ty_ = kb.var("ty", Ty::I32);
    let tx = kb.var("tx", Ty::I32);
    let k0 = kb.var("k0", Ty::I32);
    let kk = kb.var("kk", Ty::I32);
    let acc = kb.var("acc", Ty::F32);
    let t = Expr::thread_idx;
    let inner = vec![Stmt::assign(
        acc,
        Expr::fma(
            Expr::load(a_tile, Expr::var(ty_) * Expr::i32(tile) + kk),
            Expr::load(b_tile, Expr::var(kk) * Expr::i32(tile) + tx),
            acc,
        ),
    )];
    let outer = vec![
        Stmt::store(
            a_tile,
            t(),
            Expr::load(a, Expr::var(row) * kdim.clone() + Expr::var(k0) + tx),
        ),
        Stmt::store(
            b_tile,
            t(),
            Expr::load(b, (Expr::var(k0) + ty_) * n.clone() + col),
        ),
        Stmt::Barrier,
        Stmt::for_range(kk, Expr::i32(0), Expr::i32(tile), Expr::i32(1), inner),
        Stmt::Barrier,
    ];
    kb.finish(vec![
        Stmt::assign(ty_, t() / Expr::i32(tile)),
        Stmt::assign(tx, t() % Expr::i32(tile)),
        Stmt::assign(row, Expr::block_idx(1) * Expr::i32(tile) + ty_),
        Stmt::assign(col, Expr::block_idx(0) * Expr::i32(tile) + tx),
        Stmt::assign(acc, Expr::f32(0.0)),
        Stmt::for_range(k0, Expr::i32(0), kdim.clone(), Expr::i32(tile), outer),
        Stmt::store(c, Expr::var(row) * n + col, acc),
    ])
}

/// Threads per block of [`odds_and_ends`] (one block).
pub const ODDS_BLOCK: u32 = 64;

/// The less common paths in one block of 64 threads, thread `t`: vector accesses of 2,
/// 4 and 8 elements of f16, bool, i8, f8 (global and shared), predicate logic and
/// selects, shuffles of i64, predicates and i32, 64-bit shifts by a parameter, and
/// predicate and i32 parameters.
///
/// Buffers (elements per thread): `h: f16` (4), `flags: bool` (8), `small: i8` (4),
/// `e4: f8e4m3` (8), `e5: f8e5m2` (4) read; `out: f32` (8), `out_flags: bool` (8),
/// `out_small: i8` (4), `out_e4` (8), `out_e5` (4), `out_wide: i64` (4) written; scalars
/// `flag: pred`, `shift: i64`, `count: i32`.
pub fn odds_and_ends() -> Kernel {
    let mut k = KernelBuilder::new("odds_and_ends", ODDS_BLOCK);
    let h = k.buffer("h", DType::F16, Access::Read);
    let flags = k.buffer("flags", DType::Bool, Access::Read);
    let small = k.buffer("small", DType::I8, Access::Read);
    let e4 = k.buffer("e4", DType::F8E4M3, Access::Read);
    let e5 = k.buffer("e5", DType::F8E5M2, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let out_flags = k.buffer("out_flags", DType::Bool, Access::Write);
    let out_small = k.buffer("out_small", DType::I8, Access::Write);
    let out_e4 = k.buffer("out_e4", DType::F8E4M3, Access::Write);
    let out_e5 = k.buffer("out_e5", DType::F8E5M2, Access::Write);
    let out_wide = k.buffer("out_wide", DType::I64, Access::Write);
    let flag = k.scalar("flag", Ty::Pred);
    let shift = k.scalar("shift", Ty::I64);
    let count = k.scalar("count", Ty::I32);
    let staged = k.shared("staged", DType::F32, ODDS_BLOCK * 4);
    let vars = |k: &mut KernelBuilder, prefix: &str, n: usize, ty: Ty| -> Vec<VarId> {
        (0..n).map(|j| k.var(format!("{prefix}{j}"), ty)).collect()
    };
    let hv = vars(&mut k, "h", 4, Ty::F32);
    let bv = vars(&mut k, "b", 8, Ty::Pred);
    let cv = vars(&mut k, "c", 4, Ty::I32);
    let ev = vars(&mut k, "e", 8, Ty::F32);
    let gv = vars(&mut k, "g", 4, Ty::F32);
    let sv = vars(&mut k, "s", 4, Ty::F32);
    let wide = k.var("wide", Ty::I64);
    let wide_partner = k.var("wide_partner", Ty::I64);
    let p = k.var("p", Ty::Pred);
    let p_partner = k.var("p_partner", Ty::Pred);
    let w = k.var("w", Ty::I32);
    let w_partner = k.var("w_partner", Ty::I32);
    let t = || Expr::thread_idx().cast(Ty::I64);
    let at = |n: i64, offset: i64| t() * Expr::i64(n) + Expr::i64(offset);
    let v = |ids: &[VarId]| ids.iter().map(|&id| Expr::var(id)).collect::<Vec<_>>();
    let load = |dsts: &[VarId], buf, index| Stmt::LoadVec {
        dsts: dsts.to_vec(),
        buf,
        index,
    };
    let store = |buf, index, values| Stmt::StoreVec { buf, index, values };
    let b = |j: usize| Expr::var(bv[j]);
    k.finish(vec![
        load(&hv, h, at(4, 0)),
        store(out, at(8, 0), v(&hv)),
        load(&bv, flags, at(8, 0)),
        store(
            out_flags,
            at(8, 0),
            vec![
                !b(0),
                b(1).equals(flag.clone()),
                b(2).not_equals(b(3)),
                Expr::select(b(4), b(5), b(6)),
                b(7) & flag.clone(),
                b(0) | b(1),
                b(2) ^ b(3),
                b(4),
            ],
        ),
        load(&cv[..2], small, at(4, 0)),
        load(&cv[2..], small, at(4, 2)),
        store(
            out_small,
            at(4, 0),
            vec![
                Expr::var(cv[0]) + Expr::i32(1),
                -Expr::var(cv[1]),
                Expr::var(cv[2]) << Expr::i32(1),
                !Expr::var(cv[3]),
            ],
        ),
        load(&ev, e4, at(8, 0)),
        store(
            out_e4,
            at(8, 0),
            vec![Expr::var(ev[0]) * Expr::f32(2.0), Expr::var(ev[1])],
        ),
        store(out_e4, at(8, 2), v(&ev[2..4])),
        store(out_e4, at(8, 4), v(&ev[4..])),
        load(&gv, e5, at(4, 0)),
        store(out_e5, at(4, 0), v(&gv[..2])),
        Stmt::store(out_e5, at(4, 2), gv[2]),
        Stmt::store(out_e5, at(4, 3), Expr::var(gv[3]) * Expr::f32(0.5)),
        store(staged, at(4, 0), v(&hv)),
        Stmt::Barrier,
        load(
            &sv,
            staged,
            (Expr::i64(i64::from(ODDS_BLOCK) - 1) - t()) * Expr::i64(4),
        ),
        store(out, at(8, 4), v(&sv)),
        Stmt::assign(wide, t() << shift.clone()),
        Stmt::ShuffleXor {
            dst: wide_partner,
            src: wide,
            mask: 1,
        },
        Stmt::store(out_wide, at(4, 0), wide_partner),
        Stmt::assign(p, (Expr::thread_idx() % Expr::i32(3)).equals(Expr::i32(0))),
        Stmt::ShuffleXor {
            dst: p_partner,
            src: p,
            mask: 2,
        },
        Stmt::store(out_wide, at(4, 1), Expr::var(p_partner).cast(Ty::I64)),
        Stmt::assign(w, Expr::thread_idx() * count),
        Stmt::ShuffleXor {
            dst: w_partner,
            src: w,
            mask: 5,
        },
        Stmt::store(out_wide, at(4, 2), Expr::var(w_partner).cast(Ty::I64)),
        Stmt::store(out_wide, at(4, 3), (t() << Expr::i64(58)) >> shift),
    ])
}

/// Operands that are all constants, which PTX takes as immediates only in some places:
/// comparisons, arithmetic, shifts by out-of-range amounts, fma, select, casts, math.
pub fn constant_operands() -> Kernel {
    let mut k = KernelBuilder::new("constant_operands", 32);
    let out = k.buffer("out", DType::F32, Access::Write);
    let wide = k.buffer("wide", DType::I64, Access::Write);
    let flags = k.buffer("flags", DType::Bool, Access::Write);
    let f = Expr::f32;
    let i = Expr::i32;
    let l = Expr::i64;
    k.finish(vec![
        Stmt::store(
            out,
            i(0),
            Expr::select(i(3).lt(i(5)), f(1.0) + f(2.0), f(1.0).apply(UnOp::Exp)),
        ),
        Stmt::store(out, i(1), Expr::fma(f(2.0), f(3.0), f(4.0))),
        Stmt::store(out, i(2), f(2.0).pow(f(0.5)) + (f(7.0) % f(3.0))),
        Stmt::store(
            out,
            i(3),
            (i(7) * i(3)).cast(Ty::F32) + (-f(1.5)).apply(UnOp::Floor),
        ),
        Stmt::store(out, i(4), Expr::fma(i(2), i(3), i(4)).cast(Ty::F32)),
        Stmt::store(wide, i(0), l(1) << l(70)),
        Stmt::store(wide, i(1), l(-8) >> l(-1)),
        Stmt::store(
            wide,
            i(2),
            (i(1) << i(40)).cast(Ty::I64) + (i(-16) >> i(2)).cast(Ty::I64),
        ),
        Stmt::store(wide, i(3), (l(1) << l(3)) + Expr::pred(true).cast(Ty::I64)),
        Stmt::store(flags, i(0), Expr::pred(true) & Expr::pred(false)),
        Stmt::store(flags, i(1), Expr::pred(true).equals(Expr::pred(false))),
        Stmt::store(flags, i(2), f(1.0).not_equals(f(2.0))),
        Stmt::store(
            flags,
            i(3),
            Expr::select(Expr::pred(false), Expr::pred(true), l(3).cast(Ty::Pred)),
        ),
    ])
}

/// The snapshotted kernels, by snapshot name.
pub fn representative() -> Vec<(&'static str, Kernel)> {
    vec![
        ("vector_add_bf16", examples::vector_add(DType::BF16)),
        (
            "rms_norm_rows_bf16",
            examples::rms_norm_rows(DType::BF16, 4096, 256),
        ),
        ("every_unary_op", every_unary_op()),
        ("f8_quantize", f8_stores()),
        ("tiled_matmul", tiled_matmul()),
        ("mma_tile_bf16_kn", examples::mma_tile(MmaInput::Bf16, true)),
    ]
}

/// Kernels that must only assemble: every dtype through the vector add and conversions,
/// every binary operator, and the interpreter's other examples.
pub fn coverage() -> Vec<Kernel> {
    let mut kernels = Vec::new();
    for dtype in DType::ALL {
        if dtype != DType::Bool {
            kernels.push(examples::vector_add(dtype));
        }
        kernels.push(examples::reverse_blocks(dtype, 64));
        kernels.push(examples::prefetch_copy(dtype));
        for to in DType::ALL {
            if to != dtype {
                kernels.push(examples::convert(dtype, to));
            }
        }
    }
    // Blocks that count themselves (`atom`, `fence.acq_rel.gpu`).
    kernels.push(examples::last_block_total(true));
    let binary_ops = [
        BinOp::Add,
        BinOp::Sub,
        BinOp::Mul,
        BinOp::Div,
        BinOp::Rem,
        BinOp::Min,
        BinOp::Max,
        BinOp::Pow,
        BinOp::And,
        BinOp::Or,
        BinOp::Xor,
        BinOp::Shl,
        BinOp::Shr,
        BinOp::Eq,
        BinOp::Ne,
        BinOp::Lt,
        BinOp::Le,
        BinOp::Gt,
        BinOp::Ge,
    ];
    for op in binary_ops {
        for dtype in [DType::F32, DType::I32, DType::I64, DType::Bool] {
            let candidate = examples::binary_map(op, dtype);
            if kiln_kir::verify_kernel(&candidate).is_ok() {
                kernels.push(candidate);
            }
        }
    }
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3] {
        kernels.push(examples::rms_norm_rows(dtype, 1000, 128));
    }
    kernels.extend([
        odds_and_ends(),
        constant_operands(),
        examples::fma_select(),
        examples::divergent_branches(),
        examples::prefix_sums_by_loop(),
        examples::mma_tile(MmaInput::F16, false),
        examples::mma_tile(MmaInput::Bf16, false),
        examples::mma_tile(MmaInput::F16, true),
        examples::pack_halves(MmaInput::Bf16),
        examples::pack_halves(MmaInput::F16),
    ]);
    kernels
}

/// The representative kernels and the coverage set in one list, each name once.
pub fn everything() -> Vec<Kernel> {
    let mut seen = std::collections::BTreeSet::new();
    representative()
        .into_iter()
        .map(|(_, kernel)| kernel)
        .chain(coverage())
        .filter(|kernel| seen.insert(kernel.name.clone()))
        .collect()
}

/// A kernel whose shared arrays exceed the static 48 KiB, so they live in the dynamic
/// window: a 12-byte `bias` (the next array's offset is rounded up to 16) and a `tile` of
/// `tile_len` f32. Each block stages its `block_dim` elements of `x` at the far end of
/// `tile` (a register-addressed store), thread 0 writes `bias[2]` (a constant offset),
/// and after a barrier `out[b * block_dim + t] = tile[end - 1 - t] + bias[2]`.
pub fn dynamic_shared(tile_len: u32) -> Kernel {
    let block_dim = 128;
    let mut k = KernelBuilder::new("dynamic_shared", block_dim);
    k.grid(grid_over("n", block_dim));
    let x = k.buffer("x", DType::F32, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let bias = k.shared("bias", DType::F32, 3);
    let tile = k.shared("tile", DType::F32, tile_len);
    let base = k.var("base", Ty::I32);
    let start = tile_len as i32 - block_dim as i32;
    k.finish(vec![
        Stmt::assign(base, Expr::block_idx(0) * Expr::block_dim()),
        Stmt::store(
            tile,
            Expr::i32(start) + Expr::thread_idx(),
            Expr::load(x, Expr::var(base) + Expr::thread_idx()),
        ),
        Stmt::if_then(
            Expr::thread_idx().equals(Expr::i32(0)),
            vec![Stmt::store(bias, Expr::i32(2), Expr::f32(0.5))],
        ),
        Stmt::Barrier,
        Stmt::store(
            out,
            Expr::var(base) + Expr::thread_idx(),
            Expr::load(tile, Expr::i32(tile_len as i32 - 1) - Expr::thread_idx())
                + Expr::load(bias, Expr::i32(2)),
        ),
    ])
}
