//! Attention on `mma.sync` m16n8k16 fragments for a warp that owns several m16 row tiles
//! (the flash prefill's `AttentionTuning::m_tiles`): every K or V fragment a lane loads
//! from shared memory feeds the `mma` of each of the warp's row tiles, so the shared
//! memory read per row is divided by the tiles. The Q fragments are not kept in
//! registers (two tiles of head dim 128 would take 64 of them beside 128 output and 64
//! score accumulators): they are loaded again by `ldmatrix` from the swizzled Q tile for
//! each 16 columns of the head dim, the tiles' fragments of that slice at a time.
//!
//! Layouts as in `mma_softmax.rs`; the online softmax and the packing of P run per tile
//! through its helpers.

use super::mma_gemm::{i32c, CHUNK};
use kiln_kir::{BinOp, Buf, Expr, MmaInput, Stmt, VarId};

/// The element offset of chunk pair `c` of a fragment row at `row_at` (a multiple of the
/// row length `d`, 64 or 128) with chunk XOR `x` (below 8): `row_at + (2c ^ x) · 8`
/// written as `(row_at + 8x) ^ 16c`, which `row_at`'s alignment makes equal, so that
/// every pair's offset is one XOR of the lane's `row_at + 8x` (the row offsets added
/// after it are multiples of `d` too).
fn chunk_pair(row_at: &Expr, x: &Expr, c: i64) -> Expr {
    Expr::binary(
        BinOp::Xor,
        row_at.clone() + x.clone() * i32c(CHUNK),
        i32c(2 * c * CHUNK),
    )
}

/// `s_acc[t] += Q_t Kᵀ` for the warp's row tiles `t` (`s_acc[t]`: 8 keys a tile, in slabs
/// of 16 rows of `k_tile`, rows of `d`; `k_at`, `k_x` the lane's K row offset and chunk
/// XOR as `mma_softmax::kv_addresses`). Tile `t`'s Q rows start `16 t` rows after the
/// lane's `ldmatrix` row of the Q tile, `q_at` (rows of `d`), `q_x` its chunk XOR; `qf[t]`
/// holds tile `t`'s fragment of a 16-column slice, `kb` a K fragment.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores_from_shared(
    out: &mut Vec<Stmt>,
    input: MmaInput,
    q_tile: Buf,
    q_at: &Expr,
    q_x: &Expr,
    qf: &[[VarId; 4]],
    s_acc: &[Vec<[VarId; 4]>],
    kb: [VarId; 4],
    k_tile: Buf,
    k_at: &Expr,
    k_x: &Expr,
    d: i64,
) {
    assert_eq!(qf.len(), s_acc.len(), "a Q fragment a row tile");
    let pairs = s_acc[0].len() / 2;
    for kk in 0..d / 16 {
        for (t, f) in qf.iter().enumerate() {
            out.push(Stmt::LdMatrix {
                dsts: f.to_vec(),
                trans: false,
                buf: q_tile,
                index: chunk_pair(q_at, q_x, kk) + i32c(t as i64 * 16 * d),
            });
        }
        for pair in 0..pairs {
            out.push(Stmt::LdMatrix {
                dsts: kb.to_vec(),
                trans: false,
                buf: k_tile,
                index: chunk_pair(k_at, k_x, kk) + i32c(pair as i64 * 16 * d),
            });
            for (f, s) in qf.iter().zip(s_acc) {
                for half in 0..2 {
                    let acc = s[2 * pair + half];
                    out.push(Stmt::Mma {
                        input,
                        d: acc,
                        a: *f,
                        b: [kb[2 * half], kb[2 * half + 1]],
                        c: acc,
                    });
                }
            }
        }
    }
}

/// `o_acc[t] += P_t V` for the warp's row tiles `t`: `p_frag[t]` the tile's P fragments
/// (16 keys each, rows of `v_tile` of `d` elements; `v_at`, `v_x` as
/// `mma_softmax::kv_addresses`); each V fragment (`vb`, `ldmatrix.trans`) feeds every tile.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weigh_values_tiles(
    out: &mut Vec<Stmt>,
    input: MmaInput,
    p_frag: &[Vec<[VarId; 4]>],
    o_acc: &[Vec<[VarId; 4]>],
    vb: [VarId; 4],
    v_tile: Buf,
    v_at: &Expr,
    v_x: &Expr,
    d: i64,
) {
    assert_eq!(p_frag.len(), o_acc.len(), "P fragments a row tile");
    for kk in 0..p_frag[0].len() {
        for pair in 0..o_acc[0].len() / 2 {
            out.push(Stmt::LdMatrix {
                dsts: vb.to_vec(),
                trans: true,
                buf: v_tile,
                index: chunk_pair(v_at, v_x, pair as i64) + i32c(kk as i64 * 16 * d),
            });
            for (p, o) in p_frag.iter().zip(o_acc) {
                for half in 0..2 {
                    let acc = o[2 * pair + half];
                    out.push(Stmt::Mma {
                        input,
                        d: acc,
                        a: p[kk],
                        b: [vb[2 * half], vb[2 * half + 1]],
                        c: acc,
                    });
                }
            }
        }
    }
}
