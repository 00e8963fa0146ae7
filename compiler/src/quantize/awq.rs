//! AWQ's scale search (Lin et al., "AWQ: Activation-aware Weight Quantization", 2023): for one
//! linear weight `W [n, k]` and the activations `X` that reach it during calibration, find
//! per-input-column factors `s = mean|x|^α` (normalized) such that quantizing `W · diag(s)` and
//! dividing `s` back out changes the layer's output `X Wᵀ` least. `α = 0` is plain
//! round-to-nearest, so the search is never worse than RTN on the calibration rows.

use kiln_runtime::quant::quantize_awq;

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
                s,
                alpha,
                error,
                rtn_error: f64::NAN,
            });
        }
    }
    let mut best = best.expect("the grid is not empty");
    best.rtn_error = rtn_error;
    Ok(best)
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
