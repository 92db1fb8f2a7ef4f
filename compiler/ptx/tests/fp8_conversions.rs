//! The 8-bit float conversions the emitter inlines on targets without the f8 `cvt`
//! instructions, evaluated with the GPU's exact semantics and compared bit for bit with
//! `kiln_ir::fp8` (the reference the interpreter uses).

use kiln_ir::fp8::{E4M3, E5M2};
use kiln_ptx::numeric::{e4m3_decode_routine, Fp8, Routine, Scalar};

fn encode(routine: &Routine, x: f32) -> u8 {
    match routine.eval(&[Scalar::F32(x)])[0] {
        Scalar::I32(byte) => {
            assert!((0..=255).contains(&byte), "{x:e} gave {byte:#x}");
            byte as u8
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn e4m3_decoding_matches_for_every_byte() {
    let routine = e4m3_decode_routine();
    for byte in 0..=255u8 {
        let got = match routine.eval(&[Scalar::I32(i32::from(byte))])[0] {
            Scalar::F32(v) => v,
            other => panic!("{other:?}"),
        };
        let expected = E4M3.decode(byte);
        assert!(
            got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan()),
            "{byte:#04x}: {got:e} != {expected:e}"
        );
    }
}

/// f32 inputs that exercise every rounding decision: every f32 near each format value and
/// midpoint, a sweep over all bit patterns, and the specials.
fn inputs(format: kiln_ir::fp8::Fp8Format) -> Vec<f32> {
    let mut values = Vec::new();
    let finite: Vec<f32> = (0..=0x7Fu8)
        .map(|b| format.decode(b))
        .filter(|v| v.is_finite())
        .collect();
    let mut anchors = finite.clone();
    for pair in finite.windows(2) {
        anchors.push((pair[0] + pair[1]) / 2.0);
    }
    anchors.extend([
        format.max_finite() * 1.03125,
        format.max_finite() * 1.0625,
        1e30,
    ]);
    for anchor in anchors {
        for delta in -3i32..=3 {
            let bits = anchor.to_bits().wrapping_add_signed(delta);
            let x = f32::from_bits(bits);
            values.extend([x, -x]);
        }
    }
    values.extend((0..u32::MAX).step_by(65_537).map(f32::from_bits));
    values.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
    ]);
    values
}

fn check_encoding(format: Fp8, reference: kiln_ir::fp8::Fp8Format) {
    let routine = format.encode_routine();
    for x in inputs(reference) {
        let got = encode(&routine, x);
        let expected = reference.encode(x);
        assert_eq!(
            got,
            expected,
            "{}({x:e}): {got:#04x} != {expected:#04x}",
            format.name()
        );
    }
}

#[test]
fn e4m3_encoding_rounds_saturates_and_keeps_nan_like_the_reference() {
    check_encoding(Fp8::E4M3, E4M3);
}

#[test]
fn e5m2_encoding_rounds_saturates_and_keeps_nan_like_the_reference() {
    check_encoding(Fp8::E5M2, E5M2);
}
