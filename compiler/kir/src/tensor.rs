//! The fragment layouts of the warp-level tensor-core statements (`Mma`, `LdMatrix`) and
//! their reference arithmetic, shared by the interpreter and the CPU backend so that both
//! compute the same bits.
//!
//! A warp is 32 lanes; `g = lane / 4` and `t = lane % 4`. A packed register holds two 16-bit
//! values, the one with the lower row or column index in its low half, or four 8-bit (FP8)
//! values, the lowest index in the lowest byte. In bytes the m16n8k32 FP8 layout is the
//! m16n8k16 one: each 16-bit pair position holds two consecutive FP8 values.

use crate::kernel::MmaInput;
use half::{bf16, f16};
use kiln_ir::fp8::{E4M3, E5M2};

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
        MmaInput::E4M3 | MmaInput::E5M2 => {
            unreachable!("16-bit halves only: the verifier rejects packing 8-bit inputs")
        }
    }
}

/// `Stmt::PackHalves`: `lo` and `hi` rounded to `input` and packed (`lo` in bits 0..16).
pub fn pack_halves(input: MmaInput, lo: f32, hi: f32) -> u32 {
    pack(f32_to_half(input, lo), f32_to_half(input, hi))
}

/// A 16-bit `input` value as f32 (exact).
pub fn half_to_f32(input: MmaInput, bits: u16) -> f32 {
    element_to_f32(input, u32::from(bits))
}

/// One `input` element (its bits in the low 8 or 16 bits of `bits`) as f32 (exact).
pub fn element_to_f32(input: MmaInput, bits: u32) -> f32 {
    match input {
        MmaInput::F16 => f16::from_bits(bits as u16).to_f32(),
        MmaInput::Bf16 => bf16::from_bits(bits as u16).to_f32(),
        MmaInput::E4M3 => E4M3.decode(bits as u8),
        MmaInput::E5M2 => E5M2.decode(bits as u8),
    }
}

/// The (row, k) of each value (lowest bits first) of A register `reg` (0..4) of `lane` for
/// `input` (2 values for 16-bit types, 4 for FP8).
pub fn a_elements(input: MmaInput, lane: usize, reg: usize) -> Vec<(usize, usize)> {
    let p = input.per_register();
    let (g, t) = (lane / 4, lane % 4);
    let row = g + 8 * (reg % 2);
    let k = p * t + 4 * p * (reg / 2);
    (0..p).map(|i| (row, k + i)).collect()
}

/// The (k, column) of each value of B register `reg` (0..2) of `lane` for `input`.
pub fn b_elements(input: MmaInput, lane: usize, reg: usize) -> Vec<(usize, usize)> {
    let p = input.per_register();
    let (g, t) = (lane / 4, lane % 4);
    let k = p * t + 4 * p * reg;
    (0..p).map(|i| (k + i, g)).collect()
}

/// Value `i` (lowest bits first) of a register word holding `input` values.
pub fn element_bits(input: MmaInput, word: u32, i: usize) -> u32 {
    let bits = input.bits();
    (word >> (bits * i)) & ((1u32 << bits) - 1)
}

/// The reference m16n8k16 product of one warp for 16-bit `input` (see [`mma`]).
pub fn mma_m16n8k16(
    input: MmaInput,
    a: &[[u32; 4]; WARP],
    b: &[[u32; 2]; WARP],
    c: &[[f32; 4]; WARP],
) -> [[f32; 4]; WARP] {
    mma(input, a, b, c)
}

/// The reference product of one warp, m16n8k16 or (FP8 `input`) m16n8k32: `d[lane][j]` for
/// fragments `a[lane]`, `b[lane]` and `c[lane]` (raw register words for A and B). Each
/// element is `c` plus the K products in k order, each added by one `fma` (the products
/// are exact).
pub fn mma(
    input: MmaInput,
    a: &[[u32; 4]; WARP],
    b: &[[u32; 2]; WARP],
    c: &[[f32; 4]; WARP],
) -> [[f32; 4]; WARP] {
    let k_len = input.k();
    let mut a_matrix = [[0f32; 32]; 16];
    let mut b_matrix = [[0f32; 8]; 32];
    for lane in 0..WARP {
        for (reg, &word) in a[lane].iter().enumerate() {
            for (i, (row, k)) in a_elements(input, lane, reg).into_iter().enumerate() {
                a_matrix[row][k] = element_to_f32(input, element_bits(input, word, i));
            }
        }
        for (reg, &word) in b[lane].iter().enumerate() {
            for (i, (k, col)) in b_elements(input, lane, reg).into_iter().enumerate() {
                b_matrix[k][col] = element_to_f32(input, element_bits(input, word, i));
            }
        }
    }
    let mut d = [[0f32; 4]; WARP];
    for (lane, out) in d.iter_mut().enumerate() {
        for (j, value) in out.iter_mut().enumerate() {
            let (row, col) = c_element(lane, j);
            let mut acc = c[lane][j];
            for k in 0..k_len {
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

    #[test]
    fn fp8_fragments_are_the_16_bit_ones_in_bytes() {
        // Byte b of a 16-bit layout register (value b / 2, byte b % 2) holds FP8 value b:
        // the k of FP8 value b is 2 * (k of 16-bit value b / 2) + b % 2.
        for lane in 0..WARP {
            for reg in 0..4 {
                let wide = a_elements(MmaInput::Bf16, lane, reg);
                let narrow = a_elements(MmaInput::E4M3, lane, reg);
                for (b, &(row, k)) in narrow.iter().enumerate() {
                    assert_eq!((row, k), (wide[b / 2].0, 2 * wide[b / 2].1 + b % 2));
                }
            }
            for reg in 0..2 {
                let wide = b_elements(MmaInput::F16, lane, reg);
                let narrow = b_elements(MmaInput::E5M2, lane, reg);
                for (b, &(k, col)) in narrow.iter().enumerate() {
                    assert_eq!((k, col), (2 * wide[b / 2].0 + b % 2, wide[b / 2].1));
                }
            }
        }
        let mut a_seen = [[0u32; 32]; 16];
        let mut b_seen = [[0u32; 8]; 32];
        for lane in 0..WARP {
            for reg in 0..4 {
                for (row, k) in a_elements(MmaInput::E4M3, lane, reg) {
                    a_seen[row][k] += 1;
                }
            }
            for reg in 0..2 {
                for (k, col) in b_elements(MmaInput::E4M3, lane, reg) {
                    b_seen[k][col] += 1;
                }
            }
        }
        assert!(a_seen.iter().flatten().all(|&n| n == 1));
        assert!(b_seen.iter().flatten().all(|&n| n == 1));
    }

    /// Every e4m3 (or e5m2) value decoded exactly, by its fields, with the NaN encodings.
    fn decode_by_fields(input: MmaInput, bits: u8) -> f32 {
        let (exp_bits, bias) = match input {
            MmaInput::E4M3 => (4, 7),
            _ => (5, 15),
        };
        let man_bits = 7 - exp_bits;
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((bits >> man_bits) & ((1 << exp_bits) - 1));
        let m = f64::from(bits & ((1 << man_bits) - 1));
        let max_e = (1 << exp_bits) - 1;
        let scale = f64::from(1u32 << man_bits);
        let value = match input {
            MmaInput::E4M3 if e == max_e && m == scale - 1.0 => f64::NAN,
            MmaInput::E5M2 if e == max_e && m == 0.0 => f64::INFINITY,
            MmaInput::E5M2 if e == max_e => f64::NAN,
            _ if e == 0 => m / scale * 2f64.powi(1 - bias),
            _ => (1.0 + m / scale) * 2f64.powi(e - bias),
        };
        (sign * value) as f32
    }

    #[test]
    fn fp8_mma_equals_the_product_of_exactly_decoded_values() {
        for input in [MmaInput::E4M3, MmaInput::E5M2] {
            for bits in 0..=255u8 {
                let expected = decode_by_fields(input, bits);
                let got = element_to_f32(input, u32::from(bits));
                assert!(
                    got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan()),
                    "{input:?} {bits:#04x}: {got} vs {expected}"
                );
            }
            // Finite bytes of mixed magnitudes and signs; C non-zero.
            let byte = |x: usize| {
                let b = ((x * 37 + 11) % 256) as u8;
                let finite =
                    !decode_by_fields(input, b).is_nan() && decode_by_fields(input, b).is_finite();
                if finite {
                    b
                } else {
                    0x38
                }
            };
            let mut a = [[0u32; 4]; WARP];
            let mut b = [[0u32; 2]; WARP];
            let mut c = [[0f32; 4]; WARP];
            let a_byte = |row: usize, k: usize| byte(row * 32 + k);
            let b_byte = |k: usize, col: usize| byte(1000 + k * 8 + col);
            for lane in 0..WARP {
                for reg in 0..4 {
                    for (i, (row, k)) in a_elements(input, lane, reg).into_iter().enumerate() {
                        a[lane][reg] |= u32::from(a_byte(row, k)) << (8 * i);
                    }
                    let (row, col) = c_element(lane, reg);
                    c[lane][reg] = (row as f32) - (col as f32) * 0.5;
                }
                for (reg, word) in b[lane].iter_mut().enumerate() {
                    for (i, (k, col)) in b_elements(input, lane, reg).into_iter().enumerate() {
                        *word |= u32::from(b_byte(k, col)) << (8 * i);
                    }
                }
            }
            let d = mma(input, &a, &b, &c);
            for (lane, out) in d.iter().enumerate() {
                for (j, &value) in out.iter().enumerate() {
                    let (row, col) = c_element(lane, j);
                    let mut acc = c[lane][j];
                    for k in 0..32 {
                        let x = decode_by_fields(input, a_byte(row, k));
                        let y = decode_by_fields(input, b_byte(k, col));
                        acc = libm::fmaf(x, y, acc);
                    }
                    assert_eq!(value.to_bits(), acc.to_bits(), "{input:?} lane {lane} {j}");
                }
            }
        }
    }
}
