//! The bits of 2/π that the large-argument reduction of `sin`/`cos` needs (Payne–Hanek).
//!
//! An f32 `x = m · 2^(E - 150)` (`m` the 24-bit significand, `E` the biased exponent) has
//! `x · 2/π · 2^94 = m · K_E` with `K_E = 2/π · 2^(E - 56)`. Only `x · 2/π` modulo 4 matters
//! (the quadrant and the fraction), so the table keeps for each exponent the 96-bit window
//! `W_E = floor(K_E) mod 2^96`: its top two bits are the integer part of `K_E · 2^-94`
//! modulo 4 and the other 94 bits its fraction. Then `(m · W_E mod 2^96) · 2^-94` is
//! `x · 2/π mod 4` to within `2^-70`.

/// The first 288 bits of the fraction of 2/π = 0.A2F9836E… (computed with mpmath to 200
/// digits: `floor(2/pi * 2**288)` in hexadecimal).
const TWO_OVER_PI_BITS: [u32; 9] = [
    0xA2F9_836E,
    0x4E44_1529,
    0xFC27_57D1,
    0xF534_DDC0,
    0xDB62_9599,
    0x3C43_9041,
    0xFE51_63AB,
    0xDEBB_C561,
    0xB724_6E3A,
];

/// The biased exponent of the first window (1.0); every finite f32 at or above 1.0 has one.
pub const FIRST_EXPONENT: u32 = 127;
/// The biased exponent of the last window (the largest finite f32s).
pub const LAST_EXPONENT: u32 = 254;
const WINDOW_COUNT: usize = (LAST_EXPONENT - FIRST_EXPONENT + 1) as usize;

/// Bit `i` (1-based, weight 2^-i) of the fraction of 2/π.
const fn fraction_bit(i: i64) -> u32 {
    if i < 1 {
        return 0;
    }
    assert!(i <= 288, "2/pi is stored to 288 bits");
    let index = (i - 1) as usize;
    (TWO_OVER_PI_BITS[index / 32] >> (31 - index % 32)) & 1
}

/// `[hi, mid, lo]` words of `W_E` for each exponent from [`FIRST_EXPONENT`].
const fn build_windows() -> [u32; 3 * WINDOW_COUNT] {
    let mut words = [0u32; 3 * WINDOW_COUNT];
    let mut n = 0;
    while n < WINDOW_COUNT {
        let shift = (FIRST_EXPONENT as i64 + n as i64) - 56;
        let mut k = 0;
        while k < 96 {
            // Bit k of W_E is bit (shift - k) of 2/π.
            let bit = fraction_bit(shift - k);
            let word = 2 - (k / 32) as usize;
            words[3 * n + word] |= bit << (k % 32);
            k += 1;
        }
        n += 1;
    }
    words
}

static WINDOWS: [u32; 3 * WINDOW_COUNT] = build_windows();

/// Three words (`hi`, `mid`, `lo`) per exponent, from [`FIRST_EXPONENT`] to
/// [`LAST_EXPONENT`].
pub fn windows() -> &'static [u32] {
    &WINDOWS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_slide_over_the_bits_of_two_over_pi() {
        // E = 56 + 96 = 152 puts the first 96 fraction bits exactly in the window.
        let n = (152 - FIRST_EXPONENT) as usize;
        assert_eq!(&windows()[3 * n..3 * n + 3], &TWO_OVER_PI_BITS[..3]);
        // One exponent higher shifts the window left by one bit.
        let next = &windows()[3 * n + 3..3 * n + 6];
        let bits = TWO_OVER_PI_BITS;
        assert_eq!(next[0], (bits[0] << 1) | (bits[1] >> 31));
        assert_eq!(next[2], (bits[2] << 1) | (bits[3] >> 31));
        // E = 127 (x = 1.0): 2/π · 2^71 has 71 fraction bits in the window.
        let first = &windows()[..3];
        assert_eq!(first[0], TWO_OVER_PI_BITS[0] >> 25);
        assert_eq!(
            first[2],
            (TWO_OVER_PI_BITS[1] << 7) | (TWO_OVER_PI_BITS[2] >> 25)
        );
        assert_eq!(windows().len(), 3 * 128);
    }

    #[test]
    fn the_stored_bits_agree_with_f64() {
        let approx = (f64::from(TWO_OVER_PI_BITS[0]) * 2f64.powi(32)
            + f64::from(TWO_OVER_PI_BITS[1]))
            * 2f64.powi(-64);
        assert!((approx - std::f64::consts::FRAC_2_PI).abs() < 1e-16);
    }
}
