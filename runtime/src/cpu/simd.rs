//! Inner kernels of the small-`m` matmuls, where the weight is streamed from memory once:
//!
//! - [`nt_rows`], for `x · Wᵀ` with `W` stored `[n, k]`: each weight row is read once and dotted
//!   with up to four `x` rows at a time while it is in registers;
//! - [`axpy_block`], for `x · B` with `B` stored `[k, n]`: rows of `B` are scaled and added into
//!   accumulators that stay in L1, four rows per pass.
//!
//! On x86-64 with AVX2 and FMA (detected at run time) they are compiled for 256-bit vectors (the
//! dot products with explicit FMA intrinsics and several independent accumulators); elsewhere the
//! portable versions, of the same structure, are used.

use std::ops::Range;

/// `dst[j·m + i] = x_i · w_r` for each weight row `r = rows.start + j` (at `w[off + r·rs ..][..k]`),
/// where `m = x.len()` and every `x_i` has at least `k` elements.
pub(crate) fn nt_rows(
    x: &[&[f32]],
    w: &[f32],
    off: usize,
    rs: usize,
    k: usize,
    rows: Range<usize>,
    dst: &mut [f32],
) {
    assert!(x.iter().all(|xi| xi.len() >= k), "x rows shorter than k");
    assert!(dst.len() >= rows.len() * x.len(), "destination too short");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the kernel is compiled for; lengths are checked above
        // and inside (each weight row is sliced with bounds checks).
        return unsafe { avx2::nt_rows(x, w, off, rs, k, rows, dst) };
    }
    portable_nt_rows(x, w, off, rs, k, rows, dst)
}

fn portable_nt_rows(
    x: &[&[f32]],
    w: &[f32],
    off: usize,
    rs: usize,
    k: usize,
    rows: Range<usize>,
    dst: &mut [f32],
) {
    let m = x.len();
    for (j, r) in rows.enumerate() {
        let row = &w[off + r * rs..off + r * rs + k];
        for (i, xi) in x.iter().enumerate() {
            dst[j * m + i] = portable_dot(&xi[..k], row);
        }
    }
}

/// Dot product with independent accumulators (so that it can vectorize).
fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..L {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A row-major right operand's block: `acc[i·width + c] += Σ_kk a[a_off + i·a_rs + kk·a_cs] ·
/// b[b_off + kk·b_rs + c]` for `i < m`, `c < width`, where `acc` holds `m·width` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn axpy_block(
    m: usize,
    k: usize,
    a: (&[f32], usize, usize, usize),
    b: (&[f32], usize, usize),
    width: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the kernel is compiled for; all accesses are checked.
        return unsafe { avx2::axpy_block(m, k, a, b, width, acc) };
    }
    axpy_block_body(m, k, a, b, width, acc)
}

/// The body of [`axpy_block`]: four rows of `b` per pass over the accumulators, so that each
/// accumulator is loaded and stored once per four products.
#[inline(always)]
fn axpy_block_body(
    m: usize,
    k: usize,
    a: (&[f32], usize, usize, usize),
    b: (&[f32], usize, usize),
    width: usize,
    acc: &mut [f32],
) {
    let (ad, ao, ars, acs) = a;
    let (bd, bo, brs) = b;
    let row = |kk: usize| &bd[bo + kk * brs..bo + kk * brs + width];
    let mut kk = 0;
    while kk + 4 <= k {
        let (b0, b1, b2, b3) = (row(kk), row(kk + 1), row(kk + 2), row(kk + 3));
        for i in 0..m {
            let at = |t: usize| ad[ao + i * ars + (kk + t) * acs];
            let (s0, s1, s2, s3) = (at(0), at(1), at(2), at(3));
            let dst = &mut acc[i * width..(i + 1) * width];
            for c in 0..width {
                dst[c] += s0 * b0[c] + s1 * b1[c] + s2 * b2[c] + s3 * b3[c];
            }
        }
        kk += 4;
    }
    while kk < k {
        let b0 = row(kk);
        for i in 0..m {
            let s0 = ad[ao + i * ars + kk * acs];
            for (d, &v) in acc[i * width..(i + 1) * width].iter_mut().zip(b0) {
                *d += s0 * v;
            }
        }
        kk += 1;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_block(
        m: usize,
        k: usize,
        a: (&[f32], usize, usize, usize),
        b: (&[f32], usize, usize),
        width: usize,
        acc: &mut [f32],
    ) {
        super::axpy_block_body(m, k, a, b, width, acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nt_rows(
        x: &[&[f32]],
        w: &[f32],
        off: usize,
        rs: usize,
        k: usize,
        rows: Range<usize>,
        dst: &mut [f32],
    ) {
        let m = x.len();
        for (j, r) in rows.enumerate() {
            let row = &w[off + r * rs..off + r * rs + k];
            let out = &mut dst[j * m..(j + 1) * m];
            let mut i = 0;
            while i + 4 <= m {
                out[i..i + 4]
                    .copy_from_slice(&dots::<4, 2>([x[i], x[i + 1], x[i + 2], x[i + 3]], row));
                i += 4;
            }
            match m - i {
                3 => out[i..].copy_from_slice(&dots::<3, 2>([x[i], x[i + 1], x[i + 2]], row)),
                2 => out[i..].copy_from_slice(&dots::<2, 2>([x[i], x[i + 1]], row)),
                1 => out[i..].copy_from_slice(&dots::<1, 4>([x[i]], row)),
                _ => {}
            }
        }
    }

    /// Eight lanes of `s` from `j`, as one unaligned load. (Written as an array copy rather than
    /// `_mm256_loadu_ps`, whose debug-build pointer checks would slow test builds several times.)
    #[inline(always)]
    fn load(s: &[f32], j: usize) -> __m256 {
        let a: [f32; 8] = s[j..j + 8].try_into().expect("eight lanes");
        // SAFETY: `__m256` is eight `f32` lanes; every bit pattern is valid.
        unsafe { std::mem::transmute::<[f32; 8], __m256>(a) }
    }

    /// `[x_r · w]` for `R` rows, `U` 8-lane accumulators per row.
    #[allow(clippy::needless_range_loop)] // lanes and rows index several arrays at once
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots<const R: usize, const U: usize>(x: [&[f32]; R], w: &[f32]) -> [f32; R] {
        let k = w.len();
        let x: [&[f32]; R] = std::array::from_fn(|r| &x[r][..k]);
        let mut acc = [[_mm256_setzero_ps(); U]; R];
        let step = 8 * U;
        let mut j = 0;
        while j + step <= k {
            for u in 0..U {
                let wv = load(w, j + 8 * u);
                for r in 0..R {
                    acc[r][u] = _mm256_fmadd_ps(load(x[r], j + 8 * u), wv, acc[r][u]);
                }
            }
            j += step;
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let mut v = acc[r][0];
            for u in 1..U {
                v = _mm256_add_ps(v, acc[r][u]);
            }
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            let mut total = _mm_cvtss_f32(s);
            for t in j..k {
                total += x[r][t] * w[t];
            }
            out[r] = total;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_with_a_plain_dot() {
        for (m, k) in [
            (1, 1),
            (1, 37),
            (2, 64),
            (3, 100),
            (4, 16),
            (5, 129),
            (8, 576),
        ] {
            let x: Vec<Vec<f32>> = (0..m)
                .map(|i| {
                    (0..k)
                        .map(|t| ((i * 31 + t * 7) % 13) as f32 - 6.0)
                        .collect()
                })
                .collect();
            let w: Vec<f32> = (0..3 * k + 5)
                .map(|t| ((t * 5) % 11) as f32 - 5.0)
                .collect();
            let xr: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
            let mut dst = vec![0f32; 2 * m];
            nt_rows(&xr, &w, 5, k, k, 1..3, &mut dst);
            let mut port = vec![0f32; 2 * m];
            portable_nt_rows(&xr, &w, 5, k, k, 1..3, &mut port);
            for j in 0..2 {
                for i in 0..m {
                    let row = &w[5 + (1 + j) * k..5 + (2 + j) * k];
                    let want: f32 = x[i].iter().zip(row).map(|(a, b)| a * b).sum();
                    // Small integers: every order of summation is exact.
                    assert_eq!(dst[j * m + i], want, "m={m} k={k}");
                    assert_eq!(port[j * m + i], want, "m={m} k={k}");
                }
            }
        }
    }
}
