//! AWQ's scale search (Lin et al., "AWQ: Activation-aware Weight Quantization", 2023): for one
//! linear weight `W [n, k]` and the activations `X` that reach it during calibration, find
//! per-input-column factors `s = mean|x|^α` (normalized) such that quantizing `W · diag(s)` and
//! dividing `s` back out changes the layer's output `X Wᵀ` least. `α = 0` is plain
//! round-to-nearest, so the search is never worse than RTN on the calibration rows. Then, as
//! AutoAWQ's `auto_clip`, each group's range is clipped to the fraction of its largest magnitude
//! (1, 0.95, …, 0.55) whose quantized group output on the sample rows is closest; clipping is
//! kept only if it lowers the layer's output error.

use kiln_runtime::quant::quantize_awq;
use rayon::prelude::*;

/// The exponents tried (AWQ's grid of 20 over [0, 1) thinned to 10).
const ALPHAS: [f32; 10] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// What calibration saw at the input of one linear op.
#[derive(Clone, Debug, Default)]
pub struct InputStats {
    /// Mean absolute value per input column `[k]`.
    pub mean_abs: Vec<f32>,
    /// Sample rows of the input, row-major `[rows, k]`.
    pub sample: Vec<f32>,
    /// `Σ xᵀx` over every calibration row, `[k, k]` (GPTQ's Hessian, up to a factor 2), when
    /// asked for; else empty.
    pub gram: Vec<f32>,
}

impl InputStats {
    /// Sample rows held.
    pub fn rows(&self) -> usize {
        self.sample.len() / self.mean_abs.len().max(1)
    }
}

/// The search's result for one weight.
#[derive(Clone, Debug)]
pub struct Scales {
    /// The weight to quantize with `s` (`quantize_awq(weight, …, s)`): the original one with
    /// each group's range clipped where that helps.
    pub weight: Vec<f32>,
    /// The factors `s [k]`.
    pub s: Vec<f32>,
    /// The chosen exponent.
    pub alpha: f32,
    /// Squared output error on the sample rows with `s` …
    pub error: f64,
    /// … and with plain round-to-nearest (`α = 0`).
    pub rtn_error: f64,
}

/// `X · Wᵀ` for `X [m, k]`, `W [n, k]`, row-major, into `[m, n]`.
pub(crate) fn product(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    // SAFETY: the pointers cover `[m, k]`, `[n, k]` and `[m, n]` with the strides given
    // (column stride first, then row stride, in elements); `out` does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    out
}

/// The factors for `mean|x|^α`, normalized so that `max · min = 1` (AWQ's normalization).
fn factors(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = mean_abs
        .iter()
        .map(|&a| a.max(1e-4).powf(alpha).max(1e-4))
        .collect();
    let hi = s.iter().copied().fold(f32::MIN, f32::max);
    let lo = s.iter().copied().fold(f32::MAX, f32::min);
    let norm = (hi * lo).sqrt();
    s.iter().map(|v| v / norm).collect()
}

/// Searches the factors of `w [n, k]` quantized as int4 in groups of `group` with zero points.
pub fn search(
    w: &[f32],
    n: usize,
    k: usize,
    group: u16,
    stats: &InputStats,
) -> Result<Scales, String> {
    if stats.mean_abs.len() != k {
        return Err(format!(
            "calibration saw {} input columns, the weight has {k}",
            stats.mean_abs.len()
        ));
    }
    let m = stats.rows();
    let want = product(&stats.sample, m, w, n, k);
    let mut best: Option<Scales> = None;
    let mut rtn_error = f64::NAN;
    for alpha in ALPHAS {
        let s = factors(&stats.mean_abs, alpha);
        let wq = quantize_awq(w, n, k, group, &s)?.dequantize();
        let got = product(&stats.sample, m, &wq, n, k);
        let error: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        if alpha == 0.0 {
            rtn_error = error;
        }
        if best.as_ref().is_none_or(|b| error < b.error) {
            best = Some(Scales {
                weight: Vec::new(),
                s,
                alpha,
                error,
                rtn_error: f64::NAN,
            });
        }
    }
    let mut best = best.expect("the grid is not empty");
    best.rtn_error = rtn_error;
    let clipped = clip(w, n, k, group, &best.s, stats);
    let wq = quantize_awq(&clipped, n, k, group, &best.s)?.dequantize();
    let error: f64 = product(&stats.sample, m, &wq, n, k)
        .iter()
        .zip(&want)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    if error < best.error {
        best.error = error;
        best.weight = clipped;
    } else {
        best.weight = w.to_vec();
    }
    Ok(best)
}

/// The clip fractions tried per group.
const CLIPS: [f32; 10] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55];

/// Sample rows used by the clip search.
const CLIP_ROWS: usize = 32;

/// `w` with each group of `w·diag(s)` clipped to `±c·max|group|`, `c` chosen per group to
/// minimize `Σ_t (x_t/s · (Q(clipped) − w·s))²` over the group's columns of sample rows `x_t`.
fn clip(w: &[f32], n: usize, k: usize, group: u16, s: &[f32], stats: &InputStats) -> Vec<f32> {
    use kiln_runtime::quant::{int4_code, int4_group};
    let g = group as usize;
    let m = stats.rows().min(CLIP_ROWS);
    // The sample rows divided by s, transposed per group for contiguous access: xs[t * k + c].
    let xs: Vec<f32> = stats.sample[..m * k]
        .chunks_exact(k)
        .flat_map(|row| row.iter().zip(s).map(|(x, f)| x / f))
        .collect();
    let mut out = w.to_vec();
    let rows: Vec<(usize, Vec<f32>)> = (0..n)
        .into_par_iter()
        .map(|r| {
            let scaled: Vec<f32> = w[r * k..(r + 1) * k]
                .iter()
                .zip(s)
                .map(|(v, f)| v * f)
                .collect();
            let mut row = scaled.clone();
            for start in (0..k).step_by(g) {
                let end = (start + g).min(k);
                let vals = &scaled[start..end];
                let amax = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
                let mut best = (f64::INFINITY, 1.0f32);
                for c in CLIPS {
                    let lim = amax * c;
                    let clipped: Vec<f32> = vals.iter().map(|v| v.clamp(-lim, lim)).collect();
                    let (sc, z) = int4_group(&clipped, true);
                    // The quantized group's deviation from the unclipped weights.
                    let d: Vec<f32> = clipped
                        .iter()
                        .zip(vals)
                        .map(|(cv, v)| (i32::from(int4_code(*cv, sc, z)) - z) as f32 * sc - v)
                        .collect();
                    let err: f64 = (0..m)
                        .map(|t| {
                            let x = &xs[t * k + start..t * k + end];
                            let e: f32 = x.iter().zip(&d).map(|(a, b)| a * b).sum();
                            f64::from(e).powi(2)
                        })
                        .sum();
                    if err < best.0 {
                        best = (err, c);
                    }
                }
                let lim = amax * best.1;
                for v in &mut row[start..end] {
                    *v = v.clamp(-lim, lim);
                }
            }
            (r, row)
        })
        .collect();
    for (r, row) in rows {
        for ((o, v), f) in out[r * k..(r + 1) * k].iter_mut().zip(&row).zip(s) {
            *o = v / f;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::tests::random;
    use kiln_runtime::ir::DType;
    use kiln_runtime::quant::quantize;

    /// Activations with a few large ("salient") channels, as trained LLMs have: AWQ's factors
    /// protect those channels' weights and cut the output error well below round-to-nearest.
    #[test]
    fn salient_channels_make_awq_beat_round_to_nearest() {
        let (n, k, m) = (48, 256, 64);
        let w = random(n * k, 3);
        let mut x = random(m * k, 4);
        for row in x.chunks_mut(k) {
            for c in [3, 70, 200] {
                row[c] *= 40.0;
            }
        }
        let mut mean_abs = vec![0f32; k];
        for row in x.chunks(k) {
            for (a, v) in mean_abs.iter_mut().zip(row) {
                *a += v.abs() / m as f32;
            }
        }
        let stats = InputStats {
            mean_abs,
            sample: x,
            gram: Vec::new(),
        };
        let r = search(&w, n, k, 128, &stats).unwrap();
        assert!(r.alpha > 0.0, "α = {}", r.alpha);
        assert!(
            r.error < 0.8 * r.rtn_error,
            "{} vs {}",
            r.error,
            r.rtn_error
        );
        // α = 0 is exactly round-to-nearest int4 with zero points.
        let rtn = quantize(
            DType::Int4 {
                group: 128,
                zero_point: true,
            },
            &w,
            n,
            k,
        )
        .unwrap()
        .dequantize();
        let awq0 = quantize_awq(&w, n, k, 128, &factors(&stats.mean_abs, 0.0))
            .unwrap()
            .dequantize();
        assert_eq!(rtn, awq0);
    }

    #[test]
    fn mismatched_statistics_are_an_error() {
        let stats = InputStats {
            mean_abs: vec![1.0; 8],
            sample: vec![1.0; 8],
            gram: Vec::new(),
        };
        assert!(search(&[0.5; 32], 2, 16, 32, &stats).is_err());
    }
}
