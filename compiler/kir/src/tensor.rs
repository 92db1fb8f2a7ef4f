//! The fragment layouts of the warp-level tensor-core statements (`Mma`, `LdMatrix`) and
//! their reference arithmetic, shared by the interpreter and the CPU backend so that both
//! compute the same bits.
//!
//! A warp is 32 lanes; `g = lane / 4` and `t = lane % 4`. A packed register holds two 16-bit
//! values, the one with the lower row or column index in its low half.

use crate::kernel::MmaInput;
use half::{bf16, f16};

/// Lanes in a warp.
pub const WARP: usize = 32;

/// The (row, k) of the low and high half of A register `reg` (0..4) of `lane` in an
/// m16n8k16 product.
pub fn a_element(lane: usize, reg: usize) -> [(usize, usize); 2] {
    let (g, t) = (lane / 4, lane % 4);
    let row = g + 8 * (reg % 2);
    let k = 2 * t + 8 * (reg / 2);
    [(row, k), (row, k + 1)]
}

/// The (k, column) of the low and high half of B register `reg` (0..2) of `lane`.
pub fn b_element(lane: usize, reg: usize) -> [(usize, usize); 2] {
    let (g, t) = (lane / 4, lane % 4);
    let k = 2 * t + 8 * reg;
    [(k, g), (k + 1, g)]
}

/// The (row, column) of accumulator element `j` (0..4) of `lane` (C and D).
pub fn c_element(lane: usize, j: usize) -> (usize, usize) {
    let (g, t) = (lane / 4, lane % 4);
    (g + 8 * (j / 2), 2 * t + j % 2)
}

/// Where `ldmatrix` takes the low and high half of destination `matrix` of `lane`: the
/// lane whose index names the source row (`8 · matrix + row`) and the element offset from
/// that row's start.
pub fn ldmatrix_source(lane: usize, matrix: usize, trans: bool) -> [(usize, usize); 2] {
    let (g, t) = (lane / 4, lane % 4);
    if trans {
        [(8 * matrix + 2 * t, g), (8 * matrix + 2 * t + 1, g)]
    } else {
        [(8 * matrix + g, 2 * t), (8 * matrix + g, 2 * t + 1)]
    }
}

/// Two 16-bit values packed into a register word (`low` in bits 0..16).
pub fn pack(low: u16, high: u16) -> u32 {
    u32::from(low) | (u32::from(high) << 16)
}

/// The 16-bit value in half `half` (0 low, 1 high) of `word`.
pub fn unpack(word: u32, half: usize) -> u16 {
    (word >> (16 * half)) as u16
}

/// `value` rounded to `input`'s 16-bit type (nearest even), as bits.
pub fn f32_to_half(input: MmaInput, value: f32) -> u16 {
    match input {
        MmaInput::F16 => f16::from_f32(value).to_bits(),
        MmaInput::Bf16 => bf16::from_f32(value).to_bits(),
    }
}

/// `Stmt::PackHalves`: `lo` and `hi` rounded to `input` and packed (`lo` in bits 0..16).
pub fn pack_halves(input: MmaInput, lo: f32, hi: f32) -> u32 {
    pack(f32_to_half(input, lo), f32_to_half(input, hi))
}

/// A 16-bit `input` value as f32 (exact).
pub fn half_to_f32(input: MmaInput, bits: u16) -> f32 {
    match input {
        MmaInput::F16 => f16::from_bits(bits).to_f32(),
        MmaInput::Bf16 => bf16::from_bits(bits).to_f32(),
    }
}

/// The reference m16n8k16 product of one warp: `d[lane][j]` for fragments `a[lane]`,
/// `b[lane]` and `c[lane]` (raw register words for A and B). Each element is `c` plus the
/// 16 products in k order, each added by one `fma` (the products are exact).
pub fn mma_m16n8k16(
    input: MmaInput,
    a: &[[u32; 4]; WARP],
    b: &[[u32; 2]; WARP],
    c: &[[f32; 4]; WARP],
) -> [[f32; 4]; WARP] {
    let mut a_matrix = [[0f32; 16]; 16];
    let mut b_matrix = [[0f32; 8]; 16];
    for lane in 0..WARP {
        for (reg, &word) in a[lane].iter().enumerate() {
            for (half, (row, k)) in a_element(lane, reg).into_iter().enumerate() {
                a_matrix[row][k] = half_to_f32(input, unpack(word, half));
            }
        }
        for (reg, &word) in b[lane].iter().enumerate() {
            for (half, (k, col)) in b_element(lane, reg).into_iter().enumerate() {
                b_matrix[k][col] = half_to_f32(input, unpack(word, half));
            }
        }
    }
    let mut d = [[0f32; 4]; WARP];
    for (lane, out) in d.iter_mut().enumerate() {
        for (j, value) in out.iter_mut().enumerate() {
            let (row, col) = c_element(lane, j);
            let mut acc = c[lane][j];
            for k in 0..16 {
                acc = libm::fmaf(a_matrix[row][k], b_matrix[k][col], acc);
            }
            *value = acc;
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fragment_element_is_held_by_exactly_one_lane_and_half() {
        let mut a_seen = [[0u32; 16]; 16];
        let mut b_seen = [[0u32; 8]; 16];
        let mut c_seen = [[0u32; 8]; 16];
        for lane in 0..WARP {
            for reg in 0..4 {
                for (row, k) in a_element(lane, reg) {
                    a_seen[row][k] += 1;
                }
                let (row, col) = c_element(lane, reg);
                c_seen[row][col] += 1;
            }
            for reg in 0..2 {
                for (k, col) in b_element(lane, reg) {
                    b_seen[k][col] += 1;
                }
            }
        }
        assert!(a_seen.iter().flatten().all(|&n| n == 1));
        assert!(b_seen.iter().flatten().all(|&n| n == 1));
        assert!(c_seen.iter().flatten().all(|&n| n == 1));
    }

    #[test]
    fn ldmatrix_of_a_row_major_tile_gives_the_a_fragment_layout() {
        // Four 8x8 matrices of a row-major 16x16 A tile, in the order a0..a3 needs
        // them: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
        for lane in 0..WARP {
            for matrix in 0..4 {
                let expected = a_element(lane, matrix);
                for (half, (source_lane, offset)) in
                    ldmatrix_source(lane, matrix, false).into_iter().enumerate()
                {
                    let row_in_matrix = source_lane % 8;
                    let row = row_in_matrix + 8 * (matrix % 2);
                    let k = offset + 8 * (matrix / 2);
                    assert_eq!((row, k), expected[half]);
                }
            }
        }
    }

    #[test]
    fn mma_equals_the_matrix_product() {
        // Small integers: every sum is exact, so any order gives the same result.
        let a_value = |row: usize, k: usize| ((row * 3 + k * 5) % 7) as f32 - 3.0;
        let b_value = |k: usize, col: usize| ((k * 2 + col * 7) % 5) as f32 - 2.0;
        let c_value = |row: usize, col: usize| (row * 8 + col) as f32;
        let bits = |x: f32| bf16::from_f32(x).to_bits();
        let mut a = [[0u32; 4]; WARP];
        let mut b = [[0u32; 2]; WARP];
        let mut c = [[0f32; 4]; WARP];
        for lane in 0..WARP {
            for reg in 0..4 {
                let [(r0, k0), (r1, k1)] = a_element(lane, reg);
                a[lane][reg] = pack(bits(a_value(r0, k0)), bits(a_value(r1, k1)));
                let (row, col) = c_element(lane, reg);
                c[lane][reg] = c_value(row, col);
            }
            for (reg, word) in b[lane].iter_mut().enumerate() {
                let [(k0, c0), (k1, c1)] = b_element(lane, reg);
                *word = pack(bits(b_value(k0, c0)), bits(b_value(k1, c1)));
            }
        }
        let d = mma_m16n8k16(MmaInput::Bf16, &a, &b, &c);
        for (lane, out) in d.iter().enumerate() {
            for (j, &value) in out.iter().enumerate() {
                let (row, col) = c_element(lane, j);
                let expected: f32 = c_value(row, col)
                    + (0..16)
                        .map(|k| a_value(row, k) * b_value(k, col))
                        .sum::<f32>();
                assert_eq!(value, expected, "lane {lane} element {j}");
            }
        }
    }
}
