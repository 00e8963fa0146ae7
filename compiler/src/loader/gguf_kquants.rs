//! Dequantization of ggml's 5-bit blocks (Q5_0, Q5_1) and k-quant super-blocks (Q4_K, Q5_K,
//! Q6_K: the types of llama.cpp's `Q4_K_M`, `Q5_K_M` and `Q6_K` files), following ggml's
//! reference `dequantize_row_*` (`ggml-quants.c`): f16 scales widened to f32, then f32
//! arithmetic in the reference's order, one rounding per operation.
//!
//! Layouts (little-endian; `QK_K` = 256 values per super-block):
//! - Q5_0 (22 bytes / 32): `d` f16, `qh` u32 (bit `j` = fifth bit of value `j`), `qs[16]` (value
//!   `j` in the low nibble of byte `j`, value `j + 16` in the high one); `y = (q − 16) · d`.
//! - Q5_1 (24 bytes / 32): `d`, `m` f16, `qh`, `qs` as Q5_0; `y = q · d + m`.
//! - Q4_K (144 bytes / 256): `d`, `dmin` f16, `scales[12]` (eight 6-bit scales and mins,
//!   [`scale_min`]), `qs[128]`: each 64 values are two sub-blocks of 32, the low nibbles of 32
//!   bytes then their high nibbles; `y = (d · sc) · q − (dmin · m)`.
//! - Q5_K (176 bytes / 256): `d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`: Q4_K with a fifth
//!   bit, bit `2i` (`2i + 1`) of `qh[l]` for value `l` of the low (high) nibbles of the `i`-th
//!   64 values.
//! - Q6_K (210 bytes / 256): `ql[128]`, `qh[64]`, `scales[16]` i8, `d` f16: each 128 values
//!   take 64 bytes of `ql` (low 4 bits) and 32 of `qh` (2 high bits each), in four runs of 32;
//!   the scale changes every 16 values; `y = (d · sc) · (q − 32)`.

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from(b[i]) | (u16::from(b[i + 1]) << 8)).to_f32()
}

/// Q5_0 / Q5_1 block (`with_min`: Q5_1).
pub(super) fn q5(b: &[u8], o: &mut [f32], with_min: bool) {
    let d = f16_at(b, 0);
    let (m, at) = if with_min {
        (f16_at(b, 2), 4)
    } else {
        (0.0, 2)
    };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        let (x0, x1) = (u32::from(qs[j] & 15) | h0, u32::from(qs[j] >> 4) | h1);
        if with_min {
            o[j] = x0 as f32 * d + m;
            o[j + 16] = x1 as f32 * d + m;
        } else {
            o[j] = (x0 as i32 - 16) as f32 * d;
            o[j + 16] = (x1 as i32 - 16) as f32 * d;
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block: sub-blocks 0..4
/// in the low 6 bits of bytes `j` and `j + 4`; 4..8 in the nibbles of byte `j + 4` with their
/// two high bits in the top bits of bytes `j − 4` and `j`.
pub(super) fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K (`qh` None) or Q5_K super-block.
pub(super) fn q45_k(b: &[u8], o: &mut [f32], five: bool) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let (qh, qs) = if five {
        (Some(&b[16..48]), &b[48..176])
    } else {
        (None, &b[16..144])
    };
    for i in 0..4 {
        let q = &qs[32 * i..32 * i + 32];
        for half in 0..2 {
            let (sc, m) = scale_min(2 * i + half, scales);
            let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
            for l in 0..32 {
                let mut v = if half == 0 { q[l] & 15 } else { q[l] >> 4 };
                if let Some(qh) = qh {
                    v |= ((qh[l] >> (2 * i + half)) & 1) << 4;
                }
                o[64 * i + 32 * half + l] = d1 * f32::from(v) - m1;
            }
        }
    }
}

/// Q6_K super-block.
pub(super) fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let y = &mut o[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 15) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &q) in q.iter().enumerate() {
                let s = f32::from(sc[is + 2 * k] as i8);
                y[l + 32 * k] = d * s * f32::from(i16::from(q) - 32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Round trips through encoders written in the form of ggml's reference quantizers' packing
    //! loops (`quantize_row_*_ref`): integer codes and 6/8-bit scales in, the exact values out.
    use super::*;
    use half::f16;

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u32) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % u64::from(n)) as u8
        }
    }

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q5_blocks() {
        let mut r = Rng(1);
        let codes: Vec<u8> = (0..32).map(|_| r.below(32)).collect();
        let (mut qh, mut qs) = (0u32, [0u8; 16]);
        for j in 0..16 {
            qs[j] = (codes[j] & 15) | ((codes[j + 16] & 15) << 4);
            qh |= u32::from(codes[j] >> 4) << j;
            qh |= u32::from(codes[j + 16] >> 4) << (j + 16);
        }
        let mut b0 = h(0.25).to_vec();
        b0.extend(qh.to_le_bytes());
        b0.extend(qs);
        let mut o = [0f32; 32];
        q5(&b0, &mut o, false);
        for j in 0..32 {
            assert_eq!(o[j], (i32::from(codes[j]) - 16) as f32 * 0.25, "Q5_0 [{j}]");
        }
        let mut b1 = h(0.5).to_vec();
        b1.extend(h(-3.0));
        b1.extend(qh.to_le_bytes());
        b1.extend(qs);
        q5(&b1, &mut o, true);
        for j in 0..32 {
            assert_eq!(o[j], f32::from(codes[j]) * 0.5 - 3.0, "Q5_1 [{j}]");
        }
    }

    /// Q4_K/Q5_K super-block of `codes` (4 or 5 bits), sub-block scales `ls` and mins `lm`
    /// (6 bits), packed as `quantize_row_q4_K_ref` / `q5_K` pack them.
    fn k45(codes: &[u8], ls: &[u8; 8], lm: &[u8; 8], d: f32, dmin: f32, five: bool) -> Vec<u8> {
        let mut scales = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                scales[j] = ls[j];
                scales[j + 4] = lm[j];
            } else {
                scales[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
                scales[j - 4] |= (ls[j] >> 4) << 6;
                scales[j] |= (lm[j] >> 4) << 6;
            }
        }
        let (mut qh, mut qs) = ([0u8; 32], [0u8; 128]);
        let (mut m1, mut m2) = (1u8, 2u8);
        for n in (0..256).step_by(64) {
            for j in 0..32 {
                let (mut l1, mut l2) = (codes[n + j], codes[n + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                qs[n / 2 + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
        let mut b = h(d).to_vec();
        b.extend(h(dmin));
        b.extend(scales);
        if five {
            b.extend(qh);
        }
        b.extend(qs);
        b
    }

    #[test]
    fn q4_k_and_q5_k_super_blocks() {
        let mut r = Rng(2);
        for five in [false, true] {
            let codes: Vec<u8> = (0..256)
                .map(|_| r.below(if five { 32 } else { 16 }))
                .collect();
            let ls: [u8; 8] = std::array::from_fn(|_| r.below(64));
            let lm: [u8; 8] = std::array::from_fn(|_| r.below(64));
            let (d, dmin) = (
                f16::from_f32(0.0123).to_f32(),
                f16::from_f32(0.0456).to_f32(),
            );
            let b = k45(&codes, &ls, &lm, d, dmin, five);
            assert_eq!(b.len(), if five { 176 } else { 144 });
            for j in 0..8 {
                assert_eq!(scale_min(j, &b[4..16]), (ls[j], lm[j]), "sub-block {j}");
            }
            let mut o = [0f32; 256];
            q45_k(&b, &mut o, five);
            for (i, &v) in o.iter().enumerate() {
                let j = i / 32;
                let want = (d * f32::from(ls[j])) * f32::from(codes[i]) - dmin * f32::from(lm[j]);
                assert_eq!(v, want, "five={five} [{i}]");
            }
        }
    }

    #[test]
    fn q6_k_super_block() {
        let mut r = Rng(3);
        let codes: Vec<u8> = (0..256).map(|_| r.below(64)).collect();
        let sc: [i8; 16] = std::array::from_fn(|_| r.below(255) as i8);
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for j in (0..256).step_by(128) {
            let (ql, qh) = (&mut ql[j / 2..], &mut qh[j / 4..]);
            for l in 0..32 {
                let q = |k: usize| codes[j + l + 32 * k];
                ql[l] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
                ql[l + 32] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
                qh[l] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
            }
        }
        let d = f16::from_f32(0.0078).to_f32();
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(sc.iter().map(|&s| s as u8));
        b.extend(h(d));
        assert_eq!(b.len(), 210);
        let mut o = [0f32; 256];
        q6_k(&b, &mut o);
        for (i, &v) in o.iter().enumerate() {
            let want = d * f32::from(sc[i / 16]) * f32::from(i16::from(codes[i]) - 32);
            assert_eq!(v, want, "[{i}]");
        }
    }
}
