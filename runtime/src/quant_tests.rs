//! The weight formats' arithmetic: round trips, error bounds, byte layouts and names.

use super::*;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f32 = b.iter().map(|y| y * y).sum();
    (d / n).sqrt()
}

#[test]
fn e4m3_codes_round_to_nearest_even_and_saturate() {
    for (v, code) in [
        (0.0, 0x00),
        (1.0, 0x38),
        (-1.0, 0xb8),
        (448.0, 0x7e),
        (1e9, 0x7e),
        (-1e9, 0xfe),
        (1.0 / 512.0, 0x01),
        (1.0 / 64.0, 0x08),
        // 1.0625 is halfway between 1 and 1.125: to even (1.0); 1.1875 to 1.25.
        (1.0625, 0x38),
        (1.1875, 0x3a),
        (240.0, 0x77),
    ] {
        assert_eq!(e4m3(v), code, "{v}");
    }
    for b in 0..=255u8 {
        let v = from_e4m3(b);
        if v.is_nan() {
            assert_eq!(b & 0x7f, 0x7f);
        } else {
            assert_eq!(e4m3(v), if v == 0.0 { b & 0x80 } else { b }, "{b:#x} = {v}");
        }
    }
    let mut x = vec![3.0, -0.001, 1.0, 0.0, 0.0, 0.0];
    fp8_rows(&mut x, 3);
    assert_eq!(x[0], 3.0);
    assert!((x[2] - 1.0).abs() <= 1.0 / 16.0);
    assert_eq!(&x[3..], &[0.0; 3]);
}

#[test]
fn fp8_weights_round_trip_within_the_format_step() {
    let (n, k) = (5, 40);
    let w = random(n * k, 3);
    let p = quantize(DType::Fp8, &w, n, k).unwrap();
    let back = Packed::from_bytes(
        DType::Fp8,
        n,
        k,
        &p.to_bytes()
            .iter()
            .map(|b| b.as_slice())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(back, p);
    let e = rel_l2(&p.dequantize(), &w);
    assert!(e > 0.0 && e < 0.04, "{e}");
}

const INT4: [DType; 2] = [
    DType::Int4 {
        group: 32,
        zero_point: false,
    },
    DType::Int4 {
        group: 128,
        zero_point: true,
    },
];

#[test]
fn int8_error_is_within_half_a_step_per_row() {
    let (n, k) = (7, 100);
    let w = random(n * k, 1);
    let p = quantize(DType::Int8, &w, n, k).unwrap();
    let d = p.dequantize();
    for r in 0..n {
        for c in 0..k {
            assert!((d[r * k + c] - w[r * k + c]).abs() <= p.scale[r] * 0.5 + 1e-7);
        }
    }
    assert!(rel_l2(&d, &w) < 1e-2, "{}", rel_l2(&d, &w));
}

#[test]
fn int4_error_is_bounded_and_groups_may_be_partial() {
    // 576 columns = 4.5 groups of 128: the last group has 64 columns.
    let (n, k) = (3, 576);
    let w = random(n * k, 2);
    for f in INT4.into_iter().chain([DType::Int4 {
        group: 128,
        zero_point: false,
    }]) {
        let p = quantize(f, &w, n, k).unwrap();
        let DType::Int4 { group, .. } = f else {
            unreachable!()
        };
        assert_eq!(p.scale.len(), n * groups(k, group));
        let d = p.dequantize();
        let e = rel_l2(&d, &w);
        assert!(e > 1e-3 && e < 0.15, "{} rel L2 {e}", f.name());
        for (r, row) in d.chunks(k).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let s = p.scale[r * groups(k, group) + c / group as usize].abs();
                // Half a step, or one where a clamped end of the code range is reached.
                assert!((v - w[r * k + c]).abs() <= s * 1.01 + 1e-6, "{}", f.name());
            }
        }
    }
}

/// llama.cpp's Q8_0 and Q4_1 rules (`int8g32`, `int4g32m`): every value within half a step
/// of its group (Q4_1: plus the minimum's f16 rounding), and the dequantization is ggml's
/// `q · d (+ m)`.
#[test]
fn grouped_int8_and_int4_with_a_minimum_follow_llama_cpp() {
    let (n, k) = (3, 96);
    let w = random(n * k, 5);
    for f in [DType::Int8Group { group: 32 }, DType::Int4Min { group: 32 }] {
        let p = quantize(f, &w, n, k).unwrap();
        assert_eq!(p.scale.len(), n * 3, "{}", f.name());
        let d = p.dequantize();
        for (i, (&got, &want)) in d.iter().zip(&w).enumerate() {
            let gi = i / 32;
            let step = p.scale[gi];
            let slack = p.min.get(gi).map_or(0.0, |m| m.abs() * 1e-3);
            assert!(
                (got - want).abs() <= step * 0.5 + slack + 1e-7,
                "{} [{i}]: {got} vs {want} (step {step})",
                f.name()
            );
            let q = if p.min.is_empty() {
                f32::from(p.q[i] as i8) * step
            } else {
                let c = (p.q[i / 2] >> (4 * (i % 2))) & 15;
                f32::from(c) * step + p.min[gi]
            };
            assert_eq!(got, q);
        }
        let e = rel_l2(&d, &w);
        let bound = if p.min.is_empty() { 1e-2 } else { 0.1 };
        assert!(e > 0.0 && e < bound, "{} rel L2 {e}", f.name());
    }
    assert_eq!(DType::from_name("int8g48"), None);
}

#[test]
fn symmetric_int4_keeps_the_extreme_exactly() {
    let mut w = vec![0.01f32; 32];
    w[5] = -0.8;
    w[9] = 0.5;
    let f = INT4[0];
    let d = round_trip(f, &w, 1, 32).unwrap();
    let s = half::f16::from_f32(-0.8 / -8.0).to_f32();
    assert_eq!(d[5], -8.0 * s);
    assert!((d[9] - 0.5).abs() <= s * 0.5);
}

#[test]
fn nibbles_are_low_first_and_bytes_round_trip() {
    let w = [0.0f32, 7.0, -8.0, 1.0, 3.0];
    let f = INT4[0];
    let p = quantize(f, &w, 1, 5).unwrap();
    // scale = -8 / -8 = 1: codes are w + 8.
    assert_eq!(p.scale, vec![1.0]);
    assert_eq!(p.q, vec![8 | (15 << 4), 9 << 4, 11]);
    let bytes = p.to_bytes();
    let refs: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
    assert_eq!(Packed::from_bytes(f, 1, 5, &refs).unwrap(), p);
    assert!(Packed::from_bytes(f, 1, 7, &refs).is_err());
    for f in INT4.into_iter().chain([
        DType::Int8,
        DType::Int8Group { group: 32 },
        DType::Int4Min { group: 32 },
    ]) {
        let w = random(4 * 40, 3);
        let p = quantize(f, &w, 4, 40).unwrap();
        let bytes = p.to_bytes();
        let refs: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
        let back = Packed::from_bytes(f, 4, 40, &refs).unwrap();
        assert_eq!(back.dequantize(), p.dequantize(), "{}", f.name());
        let sizes: Vec<usize> = bytes.iter().map(Vec::len).collect();
        let want: Vec<usize> = parts(f, 4, 40).unwrap().iter().map(Part::bytes).collect();
        assert_eq!(sizes, want);
    }
}

#[test]
fn zero_groups_and_bad_values() {
    for f in INT4.into_iter().chain([
        DType::Int8,
        DType::Int8Group { group: 32 },
        DType::Int4Min { group: 32 },
    ]) {
        assert_eq!(round_trip(f, &[0.0; 64], 2, 32).unwrap(), vec![0.0; 64]);
        assert!(quantize(f, &[f32::NAN; 4], 1, 4).is_err());
        assert!(quantize(f, &[1.0; 3], 1, 4).is_err());
    }
    assert!(quantize(DType::BF16, &[1.0; 4], 1, 4).is_err());
}

#[test]
fn names_round_trip() {
    for g in crate::ir::op::INT4_GROUPS {
        for zero_point in [false, true] {
            let d = DType::Int4 {
                group: g,
                zero_point,
            };
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        for d in [
            DType::Int4Awq { group: g },
            DType::Int8Group { group: g },
            DType::Int4Min { group: g },
        ] {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
    }
    assert_eq!(DType::from_name("int8"), Some(DType::Int8));
    assert_eq!(DType::from_name("int4g100"), None);
}
