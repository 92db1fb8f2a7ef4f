//! The pieces of attention on `mma.sync` m16n8k16 fragments that the flash prefill and the
//! paged decode templates share: `S = Q Kᵀ` over a warp's keys of a swizzled shared tile,
//! the online softmax (base 2) of a warp's 16 rows in the accumulator layout, P packed to
//! A fragments and `P V`.
//!
//! Layouts: lane `4g + t` holds rows `g` and `g + 8` of the warp's 16, columns `2t, 2t + 1`
//! of each 8-column accumulator tile (cells 0, 1 of row `g`, 2, 3 of row `g + 8`). Shared
//! tiles hold rows of `d` elements in 16-byte chunks, chunk `c` of row `r` at chunk
//! position `c ^ (r & 7)` (`mma_gemm::swizzle` for rows of 8 chunks or more).

use super::mma_gemm::{and_mask, i32c, shr, CHUNK};
use kiln_kir::{BinOp, Buf, Expr, MmaInput, Stmt, Ty, UnOp, VarId};

/// The `ldmatrix` addresses of a lane (lane `8q + r` gives row `r` of matrix `q` of an
/// `ldmatrix` x4; every row a fragment reads is a multiple of 8 plus `r`, so the swizzle of
/// chunk `2c + x`, x of 0 or 1, is `2c ^ (x ^ r)`): the offsets of its K row (key
/// `8·(lane >> 4) + r` of a 16-key slab) and V row (key `8·((lane >> 3) & 1) + r`) in
/// rows of `d` elements, with their chunk XORs; `lane` an I32 lane id.
pub(crate) fn kv_addresses(
    e: &mut crate::emit::Emitter<'_, '_>,
    body: &mut Vec<Stmt>,
    lane: &Expr,
    d: i64,
) -> [Expr; 4] {
    let lr = e.bind(body, "ld_row", Ty::I32, and_mask(lane.clone(), 7));
    let lq = e.bind(body, "ld_q", Ty::I32, and_mask(shr(lane.clone(), 3), 1));
    let lh = e.bind(body, "ld_h", Ty::I32, shr(lane.clone(), 4));
    let xor = |a: &Expr, b: &Expr| Expr::binary(BinOp::Xor, a.clone(), b.clone());
    let k_base = (lh.clone() * i32c(8) + lr.clone()) * i32c(d);
    let k_base = e.bind(body, "k_ld", Ty::I32, k_base);
    let k_x = e.bind(body, "k_x", Ty::I32, xor(&lq, &lr));
    let v_base = (lq.clone() * i32c(8) + lr.clone()) * i32c(d);
    let v_base = e.bind(body, "v_ld", Ty::I32, v_base);
    let v_x = e.bind(body, "v_x", Ty::I32, xor(&lh, &lr));
    [k_base, k_x, v_base, v_x]
}

/// The element offset of chunk pair `c` (chunks `2c`, `2c + 1`) of a fragment's row, `x`
/// its XOR ([`kv_addresses`]).
pub(crate) fn chunk_at(c: i64, x: &Expr) -> Expr {
    Expr::binary(BinOp::Xor, i32c(2 * c), x.clone()) * i32c(CHUNK)
}

/// `s_acc += Q Kᵀ` for the keys of `s_acc` (8 a tile, in slabs of 16 rows of `k_tile`,
/// rows of `d`; `k_at` the lane's row offset of the first slab, `k_x` its chunk XOR, as
/// [`kv_addresses`]), the Q A fragments `q_frag` (one per 16 columns of the head dim);
/// `kb` holds a K fragment.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores(
    out: &mut Vec<Stmt>,
    input: MmaInput,
    q_frag: &[[VarId; 4]],
    s_acc: &[[VarId; 4]],
    kb: [VarId; 4],
    k_tile: Buf,
    k_at: &Expr,
    k_x: &Expr,
    d: i64,
) {
    for (kk, qf) in q_frag.iter().enumerate() {
        for pair in 0..s_acc.len() / 2 {
            out.push(Stmt::LdMatrix {
                dsts: kb.to_vec(),
                trans: false,
                buf: k_tile,
                index: k_at.clone() + i32c(pair as i64 * 16 * d) + chunk_at(kk as i64, k_x),
            });
            for (half, s) in [&s_acc[2 * pair], &s_acc[2 * pair + 1]]
                .into_iter()
                .enumerate()
            {
                out.push(Stmt::Mma {
                    input,
                    d: *s,
                    a: *qf,
                    b: [kb[2 * half], kb[2 * half + 1]],
                    c: *s,
                });
            }
        }
    }
}

/// The running state of a warp's two rows a lane: the max (base 2, scaled) and the lane's
/// part of the row sums (added across the quad once at the end).
pub(crate) struct Rows {
    pub max: [VarId; 2],
    pub sum: [VarId; 2],
}

impl Rows {
    /// New state, -inf maxima and zero sums assigned in `body`.
    pub(crate) fn new(e: &mut crate::emit::Emitter<'_, '_>, body: &mut Vec<Stmt>) -> Rows {
        let max = [0; 2].map(|_| e.var("m", Ty::F32));
        let sum = [0; 2].map(|_| e.var("l", Ty::F32));
        for r in 0..2 {
            body.push(Stmt::Assign(max[r], Expr::f32(f32::NEG_INFINITY)));
            body.push(Stmt::Assign(sum[r], Expr::f32(0.0)));
        }
        Rows { max, sum }
    }
}

/// One online-softmax step (base 2) over the scores `s_acc` (masked cells at -inf): the
/// row maxima over the quad by shuffles, `exp2(s · scale2 − m)` in place, the rescaled
/// running sums and output accumulators `o_acc` (`other`, `red`: shuffle scratch).
#[allow(clippy::too_many_arguments)]
pub(crate) fn online_softmax(
    e: &mut crate::emit::Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    s_acc: &[[VarId; 4]],
    rows: &Rows,
    o_acc: &[[VarId; 4]],
    scale2: f32,
    other: VarId,
    red: VarId,
) {
    let neg_inf = Expr::f32(f32::NEG_INFINITY);
    let exp2 = |x: Expr| x.apply(UnOp::Exp2);
    for r in 0..2 {
        let mut most = None::<Expr>;
        for cells in s_acc {
            for &c in &cells[2 * r..2 * r + 2] {
                most = Some(match most {
                    Some(m) => m.max(Expr::var(c)),
                    None => Expr::var(c),
                });
            }
        }
        out.push(Stmt::Assign(red, most.expect("a tile has keys")));
        for mask in [1, 2] {
            out.push(Stmt::ShuffleXor {
                dst: other,
                src: red,
                mask,
            });
            out.push(Stmt::Assign(red, Expr::var(red).max(Expr::var(other))));
        }
        let m_new = e.bind(
            out,
            "m_new",
            Ty::F32,
            Expr::var(rows.max[r]).max(Expr::var(red) * Expr::f32(scale2)),
        );
        // A row with every key masked so far subtracts 0 (its terms are all 0).
        let m_use = e.bind(
            out,
            "m_use",
            Ty::F32,
            Expr::select(
                m_new.clone().equals(neg_inf.clone()),
                Expr::f32(0.0),
                m_new.clone(),
            ),
        );
        let alpha = e.bind(
            out,
            "alpha",
            Ty::F32,
            exp2(Expr::var(rows.max[r]) - m_use.clone()),
        );
        out.push(Stmt::Assign(rows.max[r], m_new));
        let neg_m = e.bind(out, "neg_m", Ty::F32, -m_use);
        let mut sum = None::<Expr>;
        for cells in s_acc {
            for &c in &cells[2 * r..2 * r + 2] {
                out.push(Stmt::Assign(
                    c,
                    exp2(Expr::fma(Expr::var(c), Expr::f32(scale2), neg_m.clone())),
                ));
                sum = Some(match sum {
                    Some(s) => s + Expr::var(c),
                    None => Expr::var(c),
                });
            }
        }
        out.push(Stmt::Assign(
            rows.sum[r],
            Expr::fma(
                Expr::var(rows.sum[r]),
                alpha.clone(),
                sum.expect("a tile has keys"),
            ),
        ));
        for cells in o_acc {
            for &c in &cells[2 * r..2 * r + 2] {
                out.push(Stmt::Assign(c, Expr::var(c) * alpha.clone()));
            }
        }
    }
}

/// The probabilities `s_acc` packed to the input type as the A fragments of `P V` (the
/// accumulator layout of S is the A fragment layout): k16 step `kk` covers score tiles
/// `2kk` and `2kk + 1`.
pub(crate) fn pack_probabilities(
    e: &mut crate::emit::Emitter<'_, '_>,
    out: &mut Vec<Stmt>,
    s_acc: &[[VarId; 4]],
    input: MmaInput,
) -> Vec<[VarId; 4]> {
    let p_frag: Vec<[VarId; 4]> = (0..s_acc.len() / 2)
        .map(|_| [0; 4].map(|_| e.var("fp", Ty::I32)))
        .collect();
    for (kk, frag) in p_frag.iter().enumerate() {
        let (lo, hi) = (&s_acc[2 * kk], &s_acc[2 * kk + 1]);
        for (reg, (cells, first)) in [(lo, 0), (lo, 2), (hi, 0), (hi, 2)].into_iter().enumerate() {
            out.push(Stmt::PackHalves {
                dst: frag[reg],
                input,
                lo: Expr::var(cells[first]),
                hi: Expr::var(cells[first + 1]),
            });
        }
    }
    p_frag
}

/// `o_acc += P V` for the P fragments `p_frag` (16 keys each, rows of `v_tile` of `d`
/// elements; `v_at` the lane's row offset of the first slab, `v_x` its chunk XOR, as
/// [`kv_addresses`]); `vb` holds a V fragment (`ldmatrix.trans`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn weigh_values(
    out: &mut Vec<Stmt>,
    input: MmaInput,
    p_frag: &[[VarId; 4]],
    o_acc: &[[VarId; 4]],
    vb: [VarId; 4],
    v_tile: Buf,
    v_at: &Expr,
    v_x: &Expr,
    d: i64,
) {
    for (kk, pf) in p_frag.iter().enumerate() {
        for pair in 0..o_acc.len() / 2 {
            out.push(Stmt::LdMatrix {
                dsts: vb.to_vec(),
                trans: true,
                buf: v_tile,
                index: v_at.clone() + i32c(kk as i64 * 16 * d) + chunk_at(pair as i64, v_x),
            });
            for half in 0..2 {
                let o = o_acc[2 * pair + half];
                out.push(Stmt::Mma {
                    input,
                    d: o,
                    a: *pf,
                    b: [vb[2 * half], vb[2 * half + 1]],
                    c: o,
                });
            }
        }
    }
}

/// `var` summed over the four lanes of its quad (every lane gets the sum).
pub(crate) fn quad_sum(out: &mut Vec<Stmt>, var: VarId, other: VarId) {
    for mask in [1, 2] {
        out.push(Stmt::ShuffleXor {
            dst: other,
            src: var,
            mask,
        });
        out.push(Stmt::Assign(var, Expr::var(var) + Expr::var(other)));
    }
}
