//! The matmul template for every matmul the tensor-core template does not take (f32, integer,
//! and half-precision operands behind a prologue): `[.., M, K] @ [.., K, N]` with broadcast
//! batch dims, a register-blocked SIMT GEMM. Several matmuls sharing the left operand are
//! computed by one kernel (horizontal fusion: each thread keeps accumulators for all of
//! them), the element-wise prologue of each operand is inlined into its tile loads
//! (transposes, casts, scales) and the element-wise epilogue (bias, activation, residual
//! add, cast, or a combination of the fused matmuls such as `silu(gate) * up`) is applied to
//! the accumulators before the store. Ragged edges are bounds-checked; sizes may be
//! symbolic.
//!
//! The kernel (tile sizes from [`MatmulTiling::choose`]; a symbolic row count gets both the
//! small and the large tile, the plan choosing by its value, [`large_tile_rows`]):
//! - A block computes a `bm × bn` output tile; each thread a `tm × tn` sub-block (4 or 8 a
//!   side) made of 4×4 pieces spaced half a tile apart, so the 4 values of a piece that a
//!   thread reads from a shared row are one 16-byte `ld.shared.v4`, and the 8 lanes of a
//!   quarter warp read 8 consecutive pieces (128 bytes, every bank once) or one piece
//!   (broadcast): the warps are 4 × 8 threads of the thread grid.
//! - Both staged tiles are K-major in shared memory (`A` transposed: `[bk][bm + 4]`, `B` as
//!   `[bk][bn + 4]`; the 4 padding floats keep the transposing scalar stores of a warp in
//!   distinct banks), two stages each: while the block multiplies one stage, each thread
//!   loads its share of the next K step from global memory into registers, and stores it
//!   into the other stage after the multiply, one barrier per K step.
//! - Global loads follow each operand's contiguous axis: K for `A` and for a transposed `B`
//!   (`x @ w.T`, read through the permute from its source), M or N otherwise (a transposed
//!   `A`, a plain `B`): a thread reads 4 consecutive elements, one 16-byte vector when that
//!   axis has a constant size divisible by 4 (one bounds check for the vector), else 4
//!   scalar loads each checked alone. Tile-local indices (threads, shared memory) are `I32`;
//!   the reads index in `I32` too where every value they touch fits, even when the result
//!   needs 64-bit indices (`x @ x.T` of many rows).
//! - The multiply of a K step is fully unrolled: per k, `tm / 4 + tn / 4` vector reads from
//!   shared memory and `tm · tn` FMAs.
//! - The epilogue runs on 4 consecutive columns at once (vector loads of its operands,
//!   vector stores) when every stored value's last axis is a multiple of 4 (a run-time
//!   branch where it is symbolic), else element by element.
//! - The large tile asks for two blocks an SM (`Kernel::blocks_per_sm`): ptxas fits it in
//!   128 registers, so an SM runs 16 warps.

use super::{ceil_div_size, size_of_dims, Body};
use crate::emit::{add, and, bin, div, lt, mul, rem, sub, Binding, EResult, Emitter};
use crate::graph::FuncGraph;
use crate::partition::Group;
use kiln_ir::{DType, Dim, Op, Value};
use kiln_kir::{BinOp, Buf, Const, Expr, Special, Stmt, Ty, VarId};

/// The tiling of the matmul template, in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulTiling {
    /// Output rows per block.
    pub bm: u32,
    /// Output columns per block.
    pub bn: u32,
    /// The K step staged in shared memory.
    pub bk: u32,
    /// Output rows per thread (4 or 8).
    pub tm: u32,
    /// Output columns per thread (4 or 8).
    pub tn: u32,
}

impl Default for MatmulTiling {
    fn default() -> MatmulTiling {
        MatmulTiling::SMALL
    }
}

impl MatmulTiling {
    /// Large shapes: 128 × 128 tiles, 8 × 8 outputs a thread (64 FMAs per 4 shared reads),
    /// 256 threads.
    pub const LARGE: MatmulTiling = MatmulTiling {
        bm: 128,
        bn: 128,
        bk: 8,
        tm: 8,
        tn: 8,
    };
    /// Small or symbolic shapes and horizontal fusion: 64 × 64 tiles, 4 × 4 a thread, 256
    /// threads (four times the blocks of the large tile, a quarter of the registers).
    pub const SMALL: MatmulTiling = MatmulTiling {
        bm: 64,
        bn: 64,
        bk: 16,
        tm: 4,
        tn: 4,
    };

    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Many horizontally fused matmuls: 64 × 32 tiles, 4 × 4 a thread, 128 threads (less
    /// shared memory per fused matmul).
    pub const NARROW: MatmulTiling = MatmulTiling {
        bm: 64,
        bn: 32,
        bk: 16,
        tm: 4,
        tn: 4,
    };

    /// The static shared memory of the kernel for `matmuls` fused matmuls of elements of
    /// `elem_bytes`: two stages of each padded tile.
    pub fn shared_bytes(&self, matmuls: usize, elem_bytes: usize) -> u64 {
        let stage = |extent: u32| 2 * u64::from(self.bk) * (u64::from(extent) + PAD as u64);
        (stage(self.bm) + matmuls as u64 * stage(self.bn)) * elem_bytes as u64
    }

    /// The tiling for a group of `matmuls` fused matmuls with `rows × cols` outputs in
    /// `batch` (`None` where symbolic) computed in `ty`: the large tile for a single f32
    /// matmul whose large tiles number at least 128 (about one per SM of an H100: below
    /// that the small tile's four times as many blocks fill the GPU better), else the small
    /// one. A symbolic size (a token count that may be 1) takes the small tile; so does
    /// horizontal fusion (8 × 8 accumulators per matmul would not fit in registers), or
    /// the narrow one where the small one's tiles would not fit in 48 KiB of shared memory.
    pub fn choose(
        rows: Option<u64>,
        cols: Option<u64>,
        batch: Option<u64>,
        matmuls: usize,
        ty: Ty,
    ) -> MatmulTiling {
        let large = MatmulTiling::LARGE;
        let tiles = match (rows, cols, batch) {
            (Some(m), Some(n), Some(b)) => {
                m.div_ceil(u64::from(large.bm)) * n.div_ceil(u64::from(large.bn)) * b
            }
            _ => 0,
        };
        if ty == Ty::F32 && matmuls == 1 && tiles >= 128 {
            return large;
        }
        let bytes = if ty == Ty::I64 { 8 } else { 4 };
        let small = MatmulTiling::SMALL;
        if small.shared_bytes(matmuls, bytes) <= MAX_SHARED {
            small
        } else {
            MatmulTiling::NARROW
        }
    }

    /// Whether the template can use this tiling: 4 or 8 outputs a thread each way, whole
    /// warps laid out as 4 × 8 (or 8 × 4) threads, and every thread loading whole groups of
    /// 4 elements of each tile.
    pub fn is_valid(&self) -> bool {
        let per_thread = |t: u32| t == 4 || t == 8;
        if !per_thread(self.tm)
            || !per_thread(self.tn)
            || !self.bk.is_multiple_of(4)
            || self.bk == 0
        {
            return false;
        }
        if !self.bm.is_multiple_of(self.tm) || !self.bn.is_multiple_of(self.tn) {
            return false;
        }
        let (cols, rows) = (self.bn / self.tn, self.bm / self.tm);
        let wx = cols.min(8);
        let threads = self.threads();
        threads.is_multiple_of(32)
            && cols.is_multiple_of(wx)
            && rows.is_multiple_of(32 / wx)
            && (self.bm * self.bk).is_multiple_of(4 * threads)
            && (self.bn * self.bk).is_multiple_of(4 * threads)
    }
}

/// For a plain group of one f32 matmul whose row count is a symbol (its other sizes
/// constant, or its column count the same symbol, as in `x @ x.T`): the symbol and the most
/// rows for which the small tile is kept, chosen at run time (`Step::BySize`) — fewer rows
/// than give the large tile the 128 blocks [`MatmulTiling::choose`] asks for, and always
/// fewer than 128 (one mostly empty large tile).
pub(crate) fn large_tile_rows(g: &FuncGraph<'_>, group: &Group) -> Option<(String, u64)> {
    let [m] = group.roots[..] else {
        return None;
    };
    if Ty::compute_type_of(g.ty(m).dtype) != Ty::F32 {
        return None;
    }
    let shape = g.shape(m);
    let r = shape.len();
    let Dim::Sym(rows) = &shape[r - 2] else {
        return None;
    };
    let batch = shape[..r - 2]
        .iter()
        .try_fold(1u64, |acc, d| d.as_const().map(|n| acc * n))?;
    let tile = u64::from(MatmulTiling::LARGE.bm);
    // The large tiles of `k` tile rows.
    let tiles = |k: u64| match &shape[r - 1] {
        Dim::Const(n) => Some(k * n.div_ceil(tile) * batch),
        Dim::Sym(s) if s == rows => Some(k * k * batch),
        Dim::Sym(_) => None,
    };
    if tiles(1)? == 0 {
        return None;
    }
    let mut k = 1;
    while tiles(k)? < 128 {
        k += 1;
    }
    Some((rows.clone(), ((k - 1) * tile).max(tile - 1)))
}

/// The operand index for batch index `batch` of the result (numpy-broadcast batch dims).
pub(crate) fn batch_index(
    e: &Emitter<'_, '_>,
    operand: Value,
    out_batch: &[Dim],
    batch: &[Expr],
) -> Vec<Expr> {
    let shape = e.g.shape(operand);
    let ob = &shape[..shape.len() - 2];
    let pad = out_batch.len() - ob.len();
    ob.iter()
        .enumerate()
        .map(|(d, dim)| {
            if *dim == Dim::Const(1) && out_batch[d + pad] != Dim::Const(1) {
                e.ix(0)
            } else {
                batch[d + pad].clone()
            }
        })
        .collect()
}

/// The source of `v` when `v` is computed inline as a transpose of the last two axes (batch
/// axes in place): `x.T` of `a @ x.T` is read from `x`, along its contiguous axis.
fn transposed_source(e: &Emitter<'_, '_>, v: Value) -> Option<Value> {
    if e.is_loaded(v) {
        return None;
    }
    let Some(Op::Permute { perm }) = e.g.op(v) else {
        return None;
    };
    let r = perm.len();
    let swaps = r >= 2
        && perm[r - 1] == r - 2
        && perm[r - 2] == r - 1
        && perm[..r - 2].iter().enumerate().all(|(i, p)| *p == i);
    swaps.then(|| e.g.inst(v).expect("a permute").operands[0])
}

/// How the threads of a block read one operand's tile from global memory: each thread
/// `loads` groups of 4 consecutive elements along the contiguous axis of `src`.
struct TileRead {
    /// The value read: the operand, or the source of its transpose.
    src: Value,
    /// The index type of the reads (`I32` where every value they touch is small enough,
    /// even when the kernel's index type is `I64` for its result).
    ity: Ty,
    /// `src`'s batch index (of `ity`).
    batch: Vec<Expr>,
    /// Whether `src`'s last axis is K (else the operand's outer axis, M of A or N of B).
    k_last: bool,
    /// Whether that axis has a constant size divisible by 4 (one vector, one check).
    vector: bool,
    /// The outer size (of `ity`) and the tile's extent along it.
    outer: Expr,
    extent: i64,
    /// Whether the grid's tiles cover the outer axis exactly (a constant multiple of
    /// `extent`, not narrower than the grid of horizontally fused wider matmuls): no bounds
    /// check along it.
    exact: bool,
    /// Per group: the tile-local outer and K coordinates of its first element (`I32`), and
    /// its global outer index (of `ity`).
    groups: Vec<(Expr, Expr, Expr)>,
    /// The shared array (two stages of `[bk][extent + PAD]`).
    tile: Buf,
    /// Per group, the 4 registers the loads land in.
    regs: Vec<[VarId; 4]>,
}

/// Padding of each K row of a staged tile, in elements.
const PAD: i64 = 4;

/// The static shared memory a kernel may declare.
const MAX_SHARED: u64 = 48 * 1024;

/// Runs `f` with the emitter's index type set to `ity`.
fn with_index_ty<T>(
    e: &mut Emitter<'_, '_>,
    ity: Ty,
    f: impl FnOnce(&mut Emitter<'_, '_>) -> T,
) -> T {
    let saved = e.index_ty;
    e.index_ty = ity;
    let result = f(e);
    e.index_ty = saved;
    result
}

impl TileRead {
    /// The reads of `operand` (`A` when `is_a`): its tile spans `extent` along the outer
    /// axis `outer` (M or N; the grid covers `grid`), from block coordinate
    /// `BlockIdx(axis) · extent`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        e: &mut Emitter<'_, '_>,
        body: &mut Vec<Stmt>,
        operand: Value,
        is_a: bool,
        out_batch: &[Dim],
        outer: &Dim,
        grid: &Dim,
        extent: i64,
        t: &MatmulTiling,
        sdtype: DType,
        ty: Ty,
        ity: Ty,
    ) -> TileRead {
        let (src, transposed) = match transposed_source(e, operand) {
            Some(s) => {
                // The kernel computes the transpose (by reading its source).
                e.fused.insert(operand);
                (s, true)
            }
            None => (operand, false),
        };
        // A is [.., M, K] (K last) unless transposed; B is [.., K, N] (N last) unless
        // transposed.
        let k_last = is_a != transposed;
        let vector = matches!(e.g.shape(src).last(), Some(Dim::Const(n)) if n % 4 == 0);
        let threads = i64::from(t.threads());
        let bk = i64::from(t.bk);
        let tid = Expr::Special(Special::ThreadIdx);
        let count = (extent * bk / 4 / threads) as usize;
        let mut locals = Vec::new();
        for q in 0..count {
            let flat = add(tid.clone(), c32(q as i64 * threads));
            let (o, k) = if k_last {
                let per_row = bk / 4;
                (
                    div(flat.clone(), c32(per_row)),
                    mul(rem(flat, c32(per_row)), c32(4)),
                )
            } else {
                let per_row = extent / 4;
                (
                    mul(rem(flat.clone(), c32(per_row)), c32(4)),
                    div(flat, c32(per_row)),
                )
            };
            let o = e.bind(body, "to", Ty::I32, o);
            let k = e.bind(body, "tk", Ty::I32, k);
            locals.push((o, k));
        }
        let exact = matches!(outer, Dim::Const(n) if (*n as i64) % extent == 0) && outer == grid;
        let axis = if is_a { 1 } else { 0 };
        let (batch, outer, groups) = with_index_ty(e, ity, |e| {
            let origin = mul(e.special(Special::BlockIdx(axis)), e.ix(extent));
            let origin = e.bind(body, "origin", ity, origin);
            let outer = e.dim(outer);
            let bz = e.special(Special::BlockIdx(2));
            let batch = e.delinearize(body, bz, out_batch);
            let batch = batch_index(e, src, out_batch, &batch);
            let groups = locals
                .into_iter()
                .map(|(o, k)| {
                    let go = e.bind(body, "go", ity, add(origin.clone(), widen(e, o.clone())));
                    (o, k, go)
                })
                .collect();
            (batch, outer, groups)
        });
        let len = (2 * bk * (extent + PAD)) as u32;
        let tile = e.shared_array(if is_a { "a_tile" } else { "b_tile" }, sdtype, len);
        let regs = (0..count)
            .map(|_| std::array::from_fn(|_| e.var(if is_a { "ga" } else { "gb" }, ty)))
            .collect();
        TileRead {
            src,
            ity,
            batch,
            k_last,
            vector,
            outer,
            extent,
            exact,
            groups,
            tile,
            regs,
        }
    }

    /// Loads this thread's groups of the K step starting at `k0` (a K position of any
    /// index type) into the registers (zeros outside the operand).
    fn load(
        &self,
        e: &mut Emitter<'_, '_>,
        out: &mut Vec<Stmt>,
        k0: (&Expr, Ty),
        k_dim: &Dim,
        zero: &Expr,
    ) -> EResult<()> {
        // The K position in the reads' index type.
        let k0 = match (k0.1, self.ity) {
            (from, to) if from == to => k0.0.clone(),
            (_, to) => Expr::Cast(to, Box::new(k0.0.clone())),
        };
        with_index_ty(e, self.ity, |e| self.load_in(e, out, &k0, k_dim, zero))
    }

    fn load_in(
        &self,
        e: &mut Emitter<'_, '_>,
        out: &mut Vec<Stmt>,
        k0: &Expr,
        k_dim: &Dim,
        zero: &Expr,
    ) -> EResult<()> {
        let ity = self.ity;
        let k_size = e.dim(k_dim);
        for ((_, k, go), regs) in self.groups.iter().zip(&self.regs) {
            let go = go.clone();
            let gk = add(k0.clone(), widen(e, k.clone()));
            let gk = e.bind(out, "gk", ity, gk);
            // (slow, fast) axes of `src`: lanes run along the fast one.
            let (slow, slow_size, fast, fast_size) = if self.k_last {
                (go, self.outer.clone(), gk, k_size.clone())
            } else {
                (gk, k_size.clone(), go, self.outer.clone())
            };
            let index = |fast: Expr| {
                let mut idx = self.batch.clone();
                idx.extend([slow.clone(), fast]);
                idx
            };
            let check = |at: Expr, size: Expr, along_outer: bool| {
                if along_outer && self.exact {
                    Expr::Const(Const::Pred(true))
                } else {
                    lt(at, size)
                }
            };
            let slow_inside = check(slow.clone(), slow_size, self.k_last);
            if self.vector {
                let mut then = Vec::new();
                e.push_scope();
                let vals = e.elem(&mut then, self.src, &index(fast.clone()), 4)?;
                e.pop_scope();
                for (r, v) in regs.iter().zip(vals) {
                    then.push(Stmt::Assign(*r, v));
                }
                out.push(Stmt::If {
                    cond: and_folded(slow_inside, check(fast, fast_size, !self.k_last)),
                    then,
                    otherwise: regs
                        .iter()
                        .map(|r| Stmt::Assign(*r, zero.clone()))
                        .collect(),
                });
            } else {
                for (j, r) in regs.iter().enumerate() {
                    let at = add(fast.clone(), e.ix(j as i64));
                    let mut then = Vec::new();
                    e.push_scope();
                    let v = e
                        .elem(&mut then, self.src, &index(at.clone()), 1)?
                        .remove(0);
                    e.pop_scope();
                    then.push(Stmt::Assign(*r, v));
                    out.push(Stmt::If {
                        cond: and_folded(
                            slow_inside.clone(),
                            check(at, fast_size.clone(), !self.k_last),
                        ),
                        then,
                        otherwise: vec![Stmt::Assign(*r, zero.clone())],
                    });
                }
            }
        }
        Ok(())
    }

    /// Stores the registers into the stage starting at element `stage` of the tile
    /// (K-major: element (k, o) at `k · (extent + PAD) + o`).
    fn store(&self, out: &mut Vec<Stmt>, stage: &Expr, chunk: usize) {
        let ld = self.extent + PAD;
        for ((o, k, _), regs) in self.groups.iter().zip(&self.regs) {
            let at = |k: Expr, o: Expr| add(stage.clone(), add(mul(k, c32(ld)), o));
            if self.k_last {
                // Four K values of one outer index: a column of the K-major tile.
                for (j, r) in regs.iter().enumerate() {
                    out.push(Stmt::Store {
                        buf: self.tile,
                        index: at(add(k.clone(), c32(j as i64)), o.clone()),
                        value: Expr::Var(*r),
                    });
                }
            } else {
                let base = at(k.clone(), o.clone());
                store_run(out, self.tile, &base, regs, chunk);
            }
        }
    }
}

/// `a & b`, without a constant `true` operand.
fn and_folded(a: Expr, b: Expr) -> Expr {
    let known = Expr::Const(Const::Pred(true));
    if a == known {
        b
    } else if b == known {
        a
    } else {
        and(a, b)
    }
}

/// An `I32` constant: tile-local indices (threads, shared memory) are `I32` whatever the
/// kernel's index type.
fn c32(n: i64) -> Expr {
    Expr::Const(Const::I32(i32::try_from(n).expect("a tile-local index")))
}

/// A tile-local `I32` index as the kernel's index type.
fn widen(e: &Emitter<'_, '_>, x: Expr) -> Expr {
    if e.index_ty == Ty::I64 {
        Expr::Cast(Ty::I64, Box::new(x))
    } else {
        x
    }
}

/// Stores 4 consecutive registers from `base` as vectors of `chunk` elements.
fn store_run(out: &mut Vec<Stmt>, buf: Buf, base: &Expr, regs: &[VarId], chunk: usize) {
    for (c, part) in regs.chunks(chunk).enumerate() {
        let index = add(base.clone(), c32((c * chunk) as i64));
        if part.len() == 1 {
            out.push(Stmt::Store {
                buf,
                index,
                value: Expr::Var(part[0]),
            });
        } else {
            out.push(Stmt::StoreVec {
                buf,
                index,
                values: part.iter().map(|v| Expr::Var(*v)).collect(),
            });
        }
    }
}

/// Loads 4 consecutive shared elements from `base` into `dsts` as vectors of `chunk`.
fn load_run(out: &mut Vec<Stmt>, buf: Buf, base: &Expr, dsts: &[VarId], chunk: usize) {
    for (c, part) in dsts.chunks(chunk).enumerate() {
        let index = add(base.clone(), c32((c * chunk) as i64));
        if part.len() == 1 {
            out.push(Stmt::Assign(
                part[0],
                Expr::Load {
                    buf,
                    index: Box::new(index),
                },
            ));
        } else {
            out.push(Stmt::LoadVec {
                dsts: part.to_vec(),
                buf,
                index,
            });
        }
    }
}

/// The kernel of a matmul group with the given tiling (`None`: [`MatmulTiling::choose`]);
/// `load_ty` is the index type of the operand reads (`I32` where every value they touch is
/// below 2^31 elements, even when the result needs `I64`).
pub(crate) fn emit(
    e: &mut Emitter<'_, '_>,
    group: &Group,
    stores: &[Value],
    forced: Option<&MatmulTiling>,
    load_ty: Ty,
) -> EResult<Body> {
    let g = e.g;
    let matmuls = group.roots.clone();
    let first = matmuls[0];
    let out_shape = g.shape(first).to_vec();
    let rank = out_shape.len();
    let batch_dims = out_shape[..rank - 2].to_vec();
    let a = g.inst(first).expect("matmul").operands[0];
    let a_shape = g.shape(a).to_vec();
    let k_dim = a_shape[a_shape.len() - 1].clone();
    let dtype = g.ty(first).dtype;
    let ty = Ty::compute_type_of(dtype);
    let sdtype = match ty {
        Ty::F32 => DType::F32,
        Ty::I64 => DType::I64,
        _ => DType::I32,
    };
    let n_dims: Vec<Dim> = matmuls
        .iter()
        .map(|m| g.shape(*m)[rank - 1].clone())
        .collect();
    let grid_n = if n_dims.iter().all(|d| d.as_const().is_some()) {
        Dim::Const(n_dims.iter().filter_map(Dim::as_const).max().unwrap_or(1))
    } else if n_dims.iter().all(|d| *d == n_dims[0]) {
        n_dims[0].clone()
    } else {
        return Err(e.internal(
            first,
            "horizontally fused matmuls with different symbolic N",
        ));
    };
    let t = match forced {
        Some(t) => *t,
        None => {
            let batch = batch_dims
                .iter()
                .try_fold(1u64, |acc, d| d.as_const().map(|n| acc * n));
            MatmulTiling::choose(
                out_shape[rank - 2].as_const(),
                grid_n.as_const(),
                batch,
                matmuls.len(),
                ty,
            )
        }
    };
    if !t.is_valid() || t.shared_bytes(matmuls.len(), sdtype.size_bytes()) > MAX_SHARED {
        return Err(e.internal(first, format!("an unusable matmul tiling {t:?}")));
    }
    let threads = t.threads();
    if t.tm * t.tn >= 64 {
        // 8 × 8 accumulators: ptxas fits the registers of two blocks (at most 128 a thread
        // for 256 threads), so that an SM runs 16 warps rather than 8.
        e.blocks_per_sm = 65536 / (128 * threads);
    }
    let (bm, bn, bk, tm, tn) = (
        i64::from(t.bm),
        i64::from(t.bn),
        i64::from(t.bk),
        t.tm as usize,
        t.tn as usize,
    );
    let ity = e.index_ty;
    let chunk = crate::emit::vector_chunk(4, sdtype.size_bytes());
    let mut body = Vec::new();
    // The thread grid is (bm / tm) × (bn / tn); a warp covers wy × wx of it.
    let cols = bn / tn as i64;
    let wx = cols.min(8);
    let wy = 32 / wx;
    let warps_n = cols / wx;
    let lane = Expr::Special(Special::LaneId);
    let warp = Expr::Special(Special::WarpId);
    let tx = add(
        mul(rem(warp.clone(), c32(warps_n)), c32(wx)),
        rem(lane.clone(), c32(wx)),
    );
    let tx = e.bind(&mut body, "tx", Ty::I32, tx);
    let ty_ = add(mul(div(warp, c32(warps_n)), c32(wy)), div(lane, c32(wx)));
    let ty_ = e.bind(&mut body, "ty", Ty::I32, ty_);
    // K steps count in `I32` when K is a constant that fits or the reads index in `I32`.
    let k_ty = match k_dim {
        Dim::Const(n) if n < (1 << 30) => Ty::I32,
        _ => load_ty,
    };
    let k_size = match k_dim {
        Dim::Const(n) if k_ty == Ty::I32 => c32(n as i64),
        _ => with_index_ty(e, k_ty, |e| e.dim(&k_dim)),
    };
    let k_const = |n: i64| crate::emit::int_const(k_ty, n);
    let zero = Expr::Const(crate::emit::zero_of(ty));
    // Accumulators: acc[matmul][row * tn + col] over the thread's tm × tn outputs.
    let mut acc: Vec<Vec<VarId>> = Vec::new();
    for _ in &matmuls {
        let cells: Vec<VarId> = (0..tm * tn).map(|_| e.var("acc", ty)).collect();
        for c in &cells {
            body.push(Stmt::Assign(*c, zero.clone()));
        }
        acc.push(cells);
    }
    let a_read = TileRead::new(
        e,
        &mut body,
        a,
        true,
        &batch_dims,
        &out_shape[rank - 2],
        &out_shape[rank - 2],
        bm,
        &t,
        sdtype,
        ty,
        load_ty,
    );
    let mut b_reads = Vec::new();
    for (i, &m) in matmuls.iter().enumerate() {
        let b = g.inst(m).expect("matmul").operands[1];
        b_reads.push(TileRead::new(
            e,
            &mut body,
            b,
            false,
            &batch_dims,
            &n_dims[i],
            &grid_n,
            bn,
            &t,
            sdtype,
            ty,
            load_ty,
        ));
    }
    let reads: Vec<&TileRead> = std::iter::once(&a_read).chain(&b_reads).collect();
    let stage_len = |r: &TileRead| bk * (r.extent + PAD);
    // The first K step into stage 0.
    let k_first = k_const(0);
    for r in &reads {
        r.load(e, &mut body, (&k_first, k_ty), &k_dim, &zero)?;
    }
    let stage0 = c32(0);
    for r in &reads {
        r.store(&mut body, &stage0, chunk);
    }
    body.push(Stmt::Barrier);
    // Each K step: load the next step into registers, multiply the current stage, store
    // the registers into the other stage, one barrier.
    let parity = e.var("stage", Ty::I32);
    body.push(Stmt::Assign(parity, c32(0)));
    let k0 = e.var("k0", k_ty);
    let mut kloop = Vec::new();
    let next = e.bind(&mut kloop, "knext", k_ty, add(Expr::Var(k0), k_const(bk)));
    for r in &reads {
        r.load(e, &mut kloop, (&next, k_ty), &k_dim, &zero)?;
    }
    let mut read_at = Vec::new();
    let mut write_at = Vec::new();
    for (i, r) in reads.iter().enumerate() {
        let len = stage_len(r);
        let rd = e.bind(&mut kloop, "rd", Ty::I32, mul(Expr::Var(parity), c32(len)));
        let wr = e.bind(&mut kloop, "wr", Ty::I32, sub(c32(len), rd.clone()));
        // The thread's first row (A) or column (B) in the stage it reads.
        let own = if i == 0 { &ty_ } else { &tx };
        let base = add(rd, mul(own.clone(), c32(4)));
        read_at.push(e.bind(&mut kloop, "frag", Ty::I32, base));
        write_at.push(wr);
    }
    let a_frag: Vec<VarId> = (0..tm).map(|_| e.var("a", ty)).collect();
    let b_frag: Vec<VarId> = (0..tn).map(|_| e.var("b", ty)).collect();
    let (m_gap, n_gap) = (bm / (tm as i64 / 4), bn / (tn as i64 / 4));
    for kk in 0..bk {
        for p in 0..tm / 4 {
            let at = add(read_at[0].clone(), c32(kk * (bm + PAD) + p as i64 * m_gap));
            load_run(
                &mut kloop,
                a_read.tile,
                &at,
                &a_frag[4 * p..4 * p + 4],
                chunk,
            );
        }
        for (i, cells) in acc.iter().enumerate() {
            for p in 0..tn / 4 {
                let at = add(
                    read_at[i + 1].clone(),
                    c32(kk * (bn + PAD) + p as i64 * n_gap),
                );
                load_run(
                    &mut kloop,
                    b_reads[i].tile,
                    &at,
                    &b_frag[4 * p..4 * p + 4],
                    chunk,
                );
            }
            for (r, a_r) in a_frag.iter().enumerate() {
                for (c, b_c) in b_frag.iter().enumerate() {
                    let cell = cells[r * tn + c];
                    let value = if ty == Ty::F32 {
                        Expr::Fma(
                            Box::new(Expr::Var(*a_r)),
                            Box::new(Expr::Var(*b_c)),
                            Box::new(Expr::Var(cell)),
                        )
                    } else {
                        bin(
                            BinOp::Add,
                            Expr::Var(cell),
                            bin(BinOp::Mul, Expr::Var(*a_r), Expr::Var(*b_c)),
                        )
                    };
                    kloop.push(Stmt::Assign(cell, value));
                }
            }
        }
    }
    for (r, wr) in reads.iter().zip(&write_at) {
        r.store(&mut kloop, wr, chunk);
    }
    kloop.push(Stmt::Barrier);
    kloop.push(Stmt::Assign(parity, sub(c32(1), Expr::Var(parity))));
    body.push(Stmt::For {
        var: k0,
        start: k_const(0),
        end: k_size,
        step: k_const(bk),
        body: kloop,
    });
    // Epilogue: each row of 4 consecutive columns the thread holds, as vectors when every
    // stored value's last axis is a multiple of 4 (checked at run time where symbolic).
    // Its indices are computed here, not kept through the loop.
    let m0 = mul(e.special(Special::BlockIdx(1)), e.ix(bm));
    let m0 = e.bind(&mut body, "m0", ity, m0);
    let n0 = mul(e.special(Special::BlockIdx(0)), e.ix(bn));
    let n0 = e.bind(&mut body, "n0", ity, n0);
    let bz = e.special(Special::BlockIdx(2));
    let batch = e.delinearize(&mut body, bz, &batch_dims);
    let m_size = e.dim(&out_shape[rank - 2]);
    let mut rows = Vec::new();
    for p in 0..tm / 4 {
        for r in 0..4 {
            let row = add(
                m0.clone(),
                widen(
                    e,
                    add(mul(ty_.clone(), c32(4)), c32(p as i64 * m_gap + r as i64)),
                ),
            );
            rows.push((4 * p + r, row));
        }
    }
    let cols: Vec<(usize, Expr)> = (0..tn / 4)
        .map(|q| {
            let col = add(
                n0.clone(),
                widen(e, add(mul(tx.clone(), c32(4)), c32(q as i64 * n_gap))),
            );
            (4 * q, col)
        })
        .collect();
    let mut widths = Vec::new();
    for &o in stores {
        let last = g.shape(o).last().cloned().unwrap_or(Dim::Const(1));
        if !widths.contains(&last) {
            widths.push(last);
        }
    }
    let vectors = !widths
        .iter()
        .any(|d| matches!(d, Dim::Const(n) if n % 4 != 0));
    let symbolic = widths.iter().any(|d| d.as_const().is_none());
    let mut paths = Vec::new();
    for vector in [true, false] {
        if vector && !vectors || !vector && vectors && !symbolic {
            continue;
        }
        let mut out = Vec::new();
        // Each row index is computed where its outputs are stored (kept from the start,
        // the rows would hold registers beside the accumulators).
        let cols: Vec<(usize, Expr)> = cols
            .iter()
            .map(|(c, col)| (*c, e.bind(&mut out, "col", ity, col.clone())))
            .collect();
        for (row_cell, row) in &rows {
            let row = &e.bind(&mut out, "row", ity, row.clone());
            for (col_cell, col) in &cols {
                let cell = |cells: &Vec<VarId>, c: usize| cells[row_cell * tn + col_cell + c];
                if vector {
                    let accs: Vec<Vec<VarId>> = acc
                        .iter()
                        .map(|cells| (0..4).map(|c| cell(cells, c)).collect())
                        .collect();
                    let at = OutputElement {
                        batch: &batch,
                        row,
                        col,
                        rows: &m_size,
                    };
                    epilogue_lanes(e, &mut out, &matmuls, &accs, &at, None, stores)?;
                } else {
                    for c in 0..4 {
                        let col_c = e.bind(&mut out, "col", ity, add(col.clone(), e.ix(c as i64)));
                        let accs: Vec<VarId> = acc.iter().map(|cells| cell(cells, c)).collect();
                        let at = OutputElement {
                            batch: &batch,
                            row,
                            col: &col_c,
                            rows: &m_size,
                        };
                        epilogue_at(e, &mut out, &matmuls, &accs, &at, None, stores)?;
                    }
                }
            }
        }
        paths.push(out);
    }
    let divisible: Vec<Expr> = widths
        .iter()
        .filter(|d| d.as_const().is_none())
        .map(|d| {
            let size = e.dim(d);
            bin(BinOp::Eq, rem(size, e.ix(4)), e.ix(0))
        })
        .collect();
    match (paths.len(), divisible.into_iter().reduce(and)) {
        (2, Some(cond)) => {
            let scalar = paths.pop().expect("two paths");
            let vector = paths.pop().expect("two paths");
            body.push(Stmt::If {
                cond,
                then: vector,
                otherwise: scalar,
            });
        }
        _ => body.extend(paths.into_iter().next().expect("a path")),
    }
    for &m in &matmuls {
        e.fused.insert(m);
    }
    let what = kernel_name(&format!("matmul_{}x{}", t.bm, t.bn), &matmuls, stores);
    Ok(Body {
        what,
        block_dim: threads,
        grid: [
            ceil_div_size(size_of_dims(&[grid_n]), u64::from(t.bn)),
            ceil_div_size(
                size_of_dims(&out_shape[rank - 2..rank - 1]),
                u64::from(t.bm),
            ),
            size_of_dims(&batch_dims),
        ],
        stmts: body,
    })
}

/// One output element a thread holds: its batch index, row and column, and the row count.
pub(crate) struct OutputElement<'a> {
    pub batch: &'a [Expr],
    pub row: &'a Expr,
    pub col: &'a Expr,
    pub rows: &'a Expr,
}

/// The epilogue at one output element: binds each matmul's value there to its accumulator
/// (`accs[i]` for `matmuls[i]`) and stores every stored value of the group at that index,
/// when the element is inside the output (and `guard`, if any, holds).
pub(crate) fn epilogue_at(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    matmuls: &[Value],
    accs: &[VarId],
    at: &OutputElement<'_>,
    guard: Option<&Expr>,
    stores: &[Value],
) -> EResult<()> {
    let accs: Vec<Vec<VarId>> = accs.iter().map(|a| vec![*a]).collect();
    epilogue_lanes(e, body, matmuls, &accs, at, guard, stores)
}

/// [`epilogue_at`] for `accs[i].len()` consecutive columns from `at.col` (each stored
/// value's last axis a constant multiple of that count when it is more than one): the
/// operands are read and the results stored as vectors, one bounds check for all.
pub(crate) fn epilogue_lanes(
    e: &mut Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    matmuls: &[Value],
    accs: &[Vec<VarId>],
    at: &OutputElement<'_>,
    guard: Option<&Expr>,
    stores: &[Value],
) -> EResult<()> {
    let lanes = accs.first().map_or(1, Vec::len);
    let mut idx = at.batch.to_vec();
    idx.extend([at.row.clone(), at.col.clone()]);
    let last = idx.len() - 1;
    // The kernel's own bindings (a norm's statistic the GEMV computed) stay.
    let held = e.bindings.len();
    for (&m, cells) in matmuls.iter().zip(accs) {
        for (c, &a) in cells.iter().enumerate() {
            let mut index = idx.clone();
            index[last] = add(at.col.clone(), e.ix(c as i64));
            e.bindings.push(Binding {
                value: m,
                index,
                expr: Expr::Var(a),
            });
        }
    }
    for &o in stores {
        let shape = e.g.shape(o);
        let n_size = e.dim(&shape[shape.len() - 1]);
        let mut then = Vec::new();
        e.push_scope();
        let vals = e.elem(&mut then, o, &idx, lanes)?;
        e.store(&mut then, o, &idx, vals);
        e.pop_scope();
        let mut cond = and(
            lt(at.row.clone(), at.rows.clone()),
            lt(at.col.clone(), n_size),
        );
        if let Some(guard) = guard {
            cond = and(cond, guard.clone());
        }
        body.push(Stmt::If {
            cond,
            then,
            otherwise: Vec::new(),
        });
    }
    e.bindings.truncate(held);
    Ok(())
}

/// A matmul kernel's name: `prefix`, `_xN` for N horizontally fused matmuls, `_epilogue`
/// when it stores more than the matmuls' own results.
pub(crate) fn kernel_name(prefix: &str, matmuls: &[Value], stores: &[Value]) -> String {
    let mut what = prefix.to_string();
    if matmuls.len() > 1 {
        what = format!("{what}_x{}", matmuls.len());
    }
    if stores.iter().any(|s| !matmuls.contains(s)) {
        what = format!("{what}_epilogue");
    }
    what
}
