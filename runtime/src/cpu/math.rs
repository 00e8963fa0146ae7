//! A vectorizable `exp` for `f32` slices (softmax and the `Exp` op spend most of their time in
//! it).
//!
//! Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by a degree-7 polynomial, and
//! `2^n` put into the exponent bits. The relative error is below 2 ulp over the whole range
//! where the result is a normal `f32` (tested against `f64` below). Written without branches in
//! the inner loop so that it compiles to SIMD; on x86-64 with AVX2 and FMA (detected at run time)
//! it uses 256-bit vectors and fused multiply-adds. Arguments outside that range (NaN, results
//! that overflow or are subnormal) go through `f32::exp`, except that [`exp_in_place`] with
//! `flush_tiny` gives 0 below `e^-87.3` (the smallest normal), which keeps `-inf` entries of
//! masked softmax rows on the fast path.

/// Below this, `e^x` is not a normal `f32`.
const LO: f32 = -87.336_54;
/// Above this, `e^x` may overflow in the `2^n` factor.
const HI: f32 = 88.0;

#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` for `x` in `[LO, HI]`; `flush` maps everything below `LO` (including `-inf`) to 0.
#[inline(always)]
fn exp_poly<const FMA: bool>(x: f32, flush: bool) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // `t`'s low mantissa bits hold `n` as an integer: no float-to-int conversion needed.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = mul_add::<FMA>(n, -C2, mul_add::<FMA>(n, -C1, xc));
    let mut p = 1.987_569_1e-4;
    p = mul_add::<FMA>(p, r, 1.398_199_9e-3);
    p = mul_add::<FMA>(p, r, 8.333_452e-3);
    p = mul_add::<FMA>(p, r, 4.166_579_6e-2);
    p = mul_add::<FMA>(p, r, 0.166_666_65);
    p = mul_add::<FMA>(p, r, 0.5);
    let y = mul_add::<FMA>(p, r * r, r) + 1.0;
    let scaled = y * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if flush && x < LO {
        0.0
    } else {
        scaled
    }
}

#[inline(always)]
fn exp_body<const FMA: bool>(v: &mut [f32], flush: bool) {
    for chunk in v.chunks_mut(256) {
        // NaN fails both comparisons and takes the exact path.
        let fast = if flush {
            chunk.iter().fold(true, |ok, &x| ok & (x <= HI))
        } else {
            chunk.iter().fold(true, |ok, x| ok & (LO..=HI).contains(x))
        };
        if fast {
            chunk
                .iter_mut()
                .for_each(|x| *x = exp_poly::<FMA>(*x, flush));
        } else {
            chunk.iter_mut().for_each(|x| *x = x.exp());
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(v: &mut [f32], flush: bool) {
    exp_body::<true>(v, flush)
}

/// `x ← e^x` for every element (see the module documentation for accuracy). With
/// `flush_tiny`, results below the smallest normal `f32` are 0.
pub(crate) fn exp_in_place(v: &mut [f32], flush_tiny: bool) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { exp_avx2(v, flush_tiny) };
    }
    exp_body::<false>(v, flush_tiny)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w).abs() as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let n = 200_001;
        let xs: Vec<f32> = (0..n)
            .map(|i| LO + (HI - LO) * i as f32 / (n - 1) as f32)
            .collect();
        for flush in [false, true] {
            let mut v = xs.clone();
            exp_in_place(&mut v, flush);
            let mut portable = xs.clone();
            exp_body::<false>(&mut portable, flush);
            for ((&x, &g), &p) in xs.iter().zip(&v).zip(&portable) {
                let want = (x as f64).exp();
                assert!(ulps(g, want) <= 2.0, "exp({x}) = {g}, want {want}");
                assert!(ulps(p, want) <= 2.0, "portable exp({x}) = {p}, want {want}");
            }
        }
    }

    #[test]
    fn exp_edge_cases() {
        let xs = [
            f32::NEG_INFINITY,
            -100.0,
            -87.5,
            0.0,
            88.5,
            89.0,
            f32::INFINITY,
            f32::NAN,
        ];
        let mut exact = xs;
        exp_in_place(&mut exact, false);
        for (x, g) in xs.iter().zip(exact) {
            let want = x.exp();
            assert!(
                g == want || (g.is_nan() && want.is_nan()),
                "exp({x}) = {g}, want {want}"
            );
        }
        // A block with a large or NaN value takes the exact path as a whole.
        let mut low = [f32::NEG_INFINITY, -100.0, -87.5, 0.0];
        exp_in_place(&mut low, true);
        assert_eq!(low, [0.0, 0.0, 0.0, 1.0]);
        let mut high = [-100.0, 88.5, 89.0, f32::INFINITY, f32::NAN];
        exp_in_place(&mut high, true);
        assert_eq!(
            &high[..4],
            &[(-100f32).exp(), 88.5f32.exp(), 89f32.exp(), f32::INFINITY]
        );
        assert!(high[4].is_nan());
    }
}
