//! `LayerNorm { eps }` of `[x[…, h], w[h], b[h]]` → `(x − μ) / √(σ² + eps) · w + b`, μ and σ²
//! the mean and variance of each row (the last axis), statistics accumulated in f64 as the
//! primitive chain it replaces computes them (`Mean` of `x`, then the mean square of `x − μ`:
//! GPT-2's model file writes LayerNorm as an RMSNorm of the centred row plus the bias, which the
//! rewriter's `fuse-layernorm` finds). No GPU lowering yet: refused by name.

use crate::cpu::rows::{check_float, for_rows};
use crate::cpu::tensor::Tensor;
use crate::ir::{same_float, Op, TensorType};

/// A finite, non-negative `eps`; `w` and `b` vectors of `x`'s last axis, one float dtype.
pub(super) fn infer(
    eps: f32,
    x: &TensorType,
    w: &TensorType,
    b: &TensorType,
) -> Result<TensorType, String> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(format!(
            "LayerNorm epsilon {eps} is not a finite, non-negative number"
        ));
    }
    let op = Op::LayerNorm { eps };
    same_float(&op, x, w)?;
    same_float(&op, x, b)?;
    for v in [w, b] {
        if v.rank() != 1 || x.shape.last() != v.shape.last() {
            return Err(format!(
                "LayerNorm weight or bias {v} does not match the last axis of {x}"
            ));
        }
    }
    Ok(x.clone())
}

/// The mean of a row, accumulated in f64 (as `Mean`).
fn mean(row: &[f32]) -> f32 {
    (row.iter().map(|&x| x as f64).sum::<f64>() / row.len() as f64) as f32
}

/// CPU reference: each row centred (f32), scaled by `1 / √(mean square + eps)` (f64 sum), then
/// by `w`, plus `b`.
pub(super) fn eval(eps: f32, x: Tensor, w: Tensor, b: Tensor) -> Result<Tensor, String> {
    check_float("LayerNorm", &[&x, &w, &b])?;
    let h = *x.shape.last().ok_or("LayerNorm of a scalar")?;
    if w.shape != [h] || b.shape != [h] {
        return Err(format!(
            "LayerNorm weight {:?} or bias {:?} does not match the last axis of {:?}",
            w.shape, b.shape, x.shape
        ));
    }
    let (dtype, shape) = (x.dtype, x.shape.clone());
    let (w, b) = (
        w.values::<f32>().into_owned(),
        b.values::<f32>().into_owned(),
    );
    let mut v = x.into_vec::<f32>();
    for_rows(&mut v, h, |_, row| {
        let mu = mean(row);
        for e in row.iter_mut() {
            *e -= mu;
        }
        let ms = row.iter().map(|&x| (x * x) as f64).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms as f32 + eps).sqrt();
        for ((e, &wi), &bi) in row.iter_mut().zip(&w).zip(&b) {
            *e = (*e * inv) * wi + bi;
        }
    });
    Ok(Tensor::new(dtype, shape, v))
}
