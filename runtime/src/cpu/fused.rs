//! Reference implementations of the fused ops the rewriter introduces (`RmsNorm`, `Linear`,
//! `LinearAdd`, `LinearBias`, `GatedMlp`, `GatedGelu`, `Rope`, `FusedAttention`), with exactly the semantics documented on
//! [`Op`].
//!
//! Each one computes what the chain of primitive ops it replaces computes, in the same order of
//! floating-point operations wherever that is cheap to keep (RMSNorm statistics accumulate in `f64`
//! like `Mean`; RoPE angles are `pos · (1 / theta^(2i/d))` in `f32` like the model file's tables;
//! SiLU is `g · 1/(e^-g + 1)`), so the optimized graph matches the unoptimized one to rounding of
//! the matrix products. The products reuse the executor's matmul kernels (`matmul.rs`): a
//! `[out, in]` weight is read as the transposed view `wᵀ`, which takes the streaming `x · Wᵀ` path
//! for small batches and `gemm` otherwise; attention runs as two batched products per KV head
//! with its query-head group folded into the rows.

use super::elementwise;
use super::matmul::matmul;
use super::reduce::softmax;
use super::tensor::Tensor;
use crate::ir::{BinaryOp, Op};
use rayon::prelude::*;

/// Rows per parallel task are chosen so that one task covers about this many elements.
const PAR_GRAIN: usize = 1 << 15;

/// Evaluates a fused op on its input values (arity already checked by graph validation).
pub(crate) fn eval(op: &Op, ins: Vec<Tensor>) -> Result<Tensor, String> {
    let mut ins = ins.into_iter();
    let mut next = || {
        ins.next()
            .ok_or_else(|| format!("{} is missing an input", op.name()))
    };
    match op {
        Op::RmsNorm { eps } => rms_norm(next()?, next()?, *eps),
        Op::Linear => linear(next()?, next()?),
        Op::LinearAdd => {
            let (x, w, r) = (next()?, next()?, next()?);
            elementwise::binary(BinaryOp::Add, linear(x, w)?, r)
        }
        Op::LinearBias => {
            let (x, w, b) = (next()?, next()?, next()?);
            elementwise::binary(BinaryOp::Add, linear(x, w)?, b)
        }
        Op::GatedMlp => gated(next()?, next()?, silu),
        Op::GatedGelu => gated(next()?, next()?, gelu_tanh),
        Op::Rope { seq_axis } => rope(next()?, next()?, next()?, *seq_axis),
        Op::FusedAttention {
            scale,
            window,
            softcap,
        } => attention(
            next()?,
            next()?,
            next()?,
            *scale,
            *window as usize,
            *softcap,
        ),
        other => Err(format!("{} is not a fused op", other.name())),
    }
}

fn check_float(what: &str, ts: &[&Tensor]) -> Result<(), String> {
    let d = ts[0].dtype;
    if ts.iter().any(|t| t.dtype != d || !t.dtype.is_float()) {
        let names: Vec<&str> = ts.iter().map(|t| t.dtype.name()).collect();
        return Err(format!(
            "{what} needs float inputs of one dtype, got {names:?}"
        ));
    }
    Ok(())
}

/// Applies `f(row_index, row)` to each row of `len` elements, in parallel when there is enough work.
fn for_rows(v: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if len == 0 {
        return;
    }
    if v.len() >= 2 * PAR_GRAIN {
        v.par_chunks_mut(len)
            .with_min_len(PAR_GRAIN.div_ceil(len))
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        v.chunks_mut(len).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Mean of the squares of a row, accumulated in `f64` exactly as `Mean` of `x·x` does.
fn mean_square(row: &[f32]) -> f32 {
    let mut acc = [0f64; 4];
    let chunks = row.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..4 {
            acc[j] += (c[j] * c[j]) as f64;
        }
    }
    let s = acc.iter().sum::<f64>() + tail.iter().map(|&x| (x * x) as f64).sum::<f64>();
    (s / row.len() as f64) as f32
}

/// `x / √(mean(x², last axis) + eps) · w`.
fn rms_norm(x: Tensor, w: Tensor, eps: f32) -> Result<Tensor, String> {
    check_float("RmsNorm", &[&x, &w])?;
    let h = *x.shape.last().ok_or("RmsNorm of a scalar")?;
    if w.shape != [h] {
        return Err(format!(
            "RmsNorm weight {:?} does not match the last axis of {:?}",
            w.shape, x.shape
        ));
    }
    let (dtype, shape) = (x.dtype, x.shape.clone());
    let w = w.values::<f32>().into_owned();
    let mut v = x.into_vec::<f32>();
    for_rows(&mut v, h, |_, row| {
        let inv = 1.0 / (mean_square(row) + eps).sqrt();
        for (e, &wi) in row.iter_mut().zip(&w) {
            *e = (*e * inv) * wi;
        }
    });
    Ok(Tensor::new(dtype, shape, v))
}

/// `x · wᵀ` for a weight `w [n, k]`.
fn linear(x: Tensor, w: Tensor) -> Result<Tensor, String> {
    // A quantized weight holds its dequantized values (`quant.rs`): the product reads them as
    // they are, in f32, as the GPU kernels do after dequantizing in registers.
    // An fp8 weight is read in W8A8: the activations are rounded to E4M3 per row first.
    let x = if w.dtype == crate::ir::DType::Fp8 {
        let (dtype, shape) = (x.dtype, x.shape.clone());
        let cols = *shape.last().unwrap_or(&1);
        let mut v = x.into_vec::<f32>();
        crate::quant::fp8_rows(&mut v, cols);
        Tensor::new(dtype, shape, v)
    } else {
        x
    };
    let w = if w.dtype.is_weight_format() {
        w.with_dtype(x.dtype)
    } else {
        w
    };
    check_float("Linear", &[&x, &w])?;
    if w.rank() != 2 || x.rank() == 0 || x.shape.last() != Some(&w.shape[1]) {
        return Err(format!(
            "Linear of {:?} by weight {:?}: needs w [n, k] with k the last axis of x",
            x.shape, w.shape
        ));
    }
    if x.rank() >= 2 {
        return matmul(x, w.permute(&[1, 0]));
    }
    // A single row: treat it as a [1, k] matrix.
    let k = x.shape[0];
    let y = matmul(x.reshape(vec![1, k]), w.permute(&[1, 0]))?;
    let n = y.shape[1];
    Ok(y.reshape(vec![n]))
}

/// `silu(g) = g · 1/(e^-g + 1)`.
fn silu(g: f32) -> f32 {
    g * (1.0 / ((-g).exp() + 1.0))
}

/// GELU's tanh approximation in its sigmoid form, as Gemma's model file writes it:
/// `g · 1/(e^-z + 1)`, `z = 2√(2/π) · (g + 0.044715 · g³)`.
fn gelu_tanh(g: f32) -> f32 {
    let k = 2.0 * (2.0 / std::f32::consts::PI).sqrt();
    let z = k * (g + 0.044715 * (g * g * g));
    g * (1.0 / ((-z).exp() + 1.0))
}

/// `act(x · w[0..f]ᵀ) ⊙ (x · w[f..2f]ᵀ)`: `GatedMlp` (`silu`) and `GatedGelu` (`gelu_tanh`).
fn gated(x: Tensor, w: Tensor, act: fn(f32) -> f32) -> Result<Tensor, String> {
    let y = linear(x, w)?;
    let two_f = *y.shape.last().expect("linear keeps the rank");
    if two_f % 2 != 0 {
        return Err(format!(
            "a gated MLP weight has an odd number of rows ({two_f})"
        ));
    }
    let f = two_f / 2;
    let dtype = y.dtype;
    let mut shape = y.shape.clone();
    *shape.last_mut().expect("rank ≥ 1") = f;
    let gu = y.into_vec::<f32>();
    let mut out = vec![0f32; gu.len() / 2];
    let rows = |(o, r): (&mut [f32], &[f32])| {
        let (g, u) = r.split_at(f);
        for ((d, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *d = act(g) * u;
        }
    };
    if f > 0 && out.len() >= 2 * PAR_GRAIN {
        out.par_chunks_mut(f)
            .zip(gu.par_chunks(two_f))
            .with_min_len(PAR_GRAIN.div_ceil(f))
            .for_each(rows);
    } else if f > 0 {
        out.chunks_mut(f).zip(gu.chunks(two_f)).for_each(rows);
    }
    Ok(Tensor::new(dtype, shape, out))
}

/// Rotary embedding over the last axis of `x`, HF "rotate_half" pairing `(i, i + d/2)`, angle
/// `pos · inv_freq[i]` (f32); axis `seq_axis` of `x` is indexed by `pos`.
fn rope(x: Tensor, pos: Tensor, inv_freq: Tensor, seq_axis: usize) -> Result<Tensor, String> {
    check_float("Rope", &[&x])?;
    let r = x.rank();
    let d = *x.shape.last().ok_or("Rope of a scalar")?;
    if seq_axis + 1 >= r || pos.rank() != 1 || pos.shape[0] != x.shape[seq_axis] || d % 2 != 0 {
        return Err(format!(
            "Rope of {:?} with positions {:?} along axis {seq_axis}: shapes do not fit",
            x.shape, pos.shape
        ));
    }
    let half = d / 2;
    let s = pos.shape[0];
    if inv_freq.dtype != crate::ir::DType::F32 || inv_freq.shape != [half] {
        return Err(format!(
            "Rope frequencies {:?} {:?} are not f32 [{half}]",
            inv_freq.dtype, inv_freq.shape
        ));
    }
    let inv_freq = inv_freq.into_vec::<f32>();
    // cos/sin tables [s, half], computed as the model file computes them.
    let mut cos = Vec::with_capacity(s * half);
    let mut sin = Vec::with_capacity(s * half);
    for &p in pos.values::<i32>().iter() {
        for &f in &inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    // Rows of d elements; the sequence index of row `i` is `(i / inner) % s`, where `inner` is
    // the number of rows per step of the sequence axis.
    let inner: usize = x.shape[seq_axis + 1..r - 1].iter().product();
    let (dtype, shape) = (x.dtype, x.shape.clone());
    let mut v = x.into_vec::<f32>();
    for_rows(&mut v, d, |i, row| {
        let j = (i / inner.max(1)) % s;
        let (c, sn) = (
            &cos[j * half..(j + 1) * half],
            &sin[j * half..(j + 1) * half],
        );
        let (x1, x2) = row.split_at_mut(half);
        for k in 0..half {
            let (a, b) = (x1[k], x2[k]);
            x1[k] = a * c[k] + (-b) * sn[k];
            x2[k] = b * c[k] + a * sn[k];
        }
    });
    Ok(Tensor::new(dtype, shape, v))
}

/// `softmax(cap(q·kᵀ·scale) + causal)·v` with grouped-query heads: `q [b, h, s, d]`, `k = v
/// [b, kh, t, d]`; query `i` sees keys `0..=t-s+i`; query head `j` reads KV head `j / (h/kh)`;
/// `cap(x) = softcap · tanh(x / softcap)` when `softcap > 0`.
fn attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: f32,
    window: usize,
    softcap: f32,
) -> Result<Tensor, String> {
    check_float("FusedAttention", &[&q, &k, &v])?;
    let ok = q.rank() == 4
        && k.rank() == 4
        && k.shape == v.shape
        && q.shape[0] == k.shape[0]
        && q.shape[3] == k.shape[3]
        && k.shape[1] > 0
        && q.shape[1].is_multiple_of(k.shape[1])
        && k.shape[2] >= q.shape[2];
    if !ok {
        return Err(format!(
            "FusedAttention needs q [b, h, s, d], k = v [b, kh, t ≥ s, d] with kh dividing h; \
             got {:?}, {:?}, {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    let (b, h, s, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (kh, t) = (k.shape[1], k.shape[2]);
    let g = h / kh;
    let dtype = q.dtype;
    // Query heads of one KV head become rows of one product: [b, kh, g·s, d].
    let qg = q.reshape(vec![b, kh, g * s, d]);
    let scores = matmul(qg, k.permute(&[0, 1, 3, 2]))?;
    let mut sc = scores.into_vec::<f32>();
    for_rows(&mut sc, t, |row, r| {
        let i = row % s;
        let last = t - s + i;
        // The first key a sliding window keeps (a key `window` or more positions back is out).
        let first = if window > 0 {
            (last + 1).saturating_sub(window)
        } else {
            0
        };
        for (j, e) in r.iter_mut().enumerate() {
            *e = if j > last || j < first {
                f32::NEG_INFINITY
            } else if softcap > 0.0 {
                softcap * (*e * scale / softcap).tanh()
            } else {
                *e * scale
            };
        }
    });
    let probs = softmax(Tensor::new(dtype, vec![b, kh, g * s, t], sc), 3)?;
    let ctx = matmul(probs, v)?;
    Ok(ctx.reshape(vec![b, h, s, d]))
}

#[cfg(test)]
#[path = "fused_tests.rs"]
mod tests;
