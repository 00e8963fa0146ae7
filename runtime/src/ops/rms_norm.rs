//! `RmsNorm { eps }` of `[x[…, h], w[h]]` → `x / √(mean(x², last axis) + eps) · w`, statistics in
//! f32 (accumulated in f64 on the CPU, as `Mean` of `x·x` does, so it matches the primitive
//! chain it replaces). On the GPU it is an `RmsNorm` launch, which the `fold_norms` peephole
//! moves into the prologue of the projections that alone read it.

use crate::cpu::rows::{check_float, for_rows};
use crate::cpu::tensor::Tensor;
use crate::ir::{same_float, NodeId, Op, TensorType};
use crate::lower::{Nodes, Val};
use crate::plan::{BufType, Launch};

/// A finite, non-negative `eps`; `w` a vector of `x`'s last axis, one float dtype.
pub(super) fn infer(eps: f32, x: &TensorType, w: &TensorType) -> Result<TensorType, String> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(format!(
            "RmsNorm epsilon {eps} is not a finite, non-negative number"
        ));
    }
    same_float(&Op::RmsNorm { eps }, x, w)?;
    if w.rank() != 1 || x.shape.last() != w.shape.last() {
        return Err(format!(
            "RmsNorm weight {w} does not match the last axis of {x}"
        ));
    }
    Ok(x.clone())
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

/// CPU reference: each row scaled by `1 / √(mean square + eps)`, then by `w`.
pub(super) fn eval(eps: f32, x: Tensor, w: Tensor) -> Result<Tensor, String> {
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

/// GPU: an `RmsNorm` launch over a whole buffer, its weight in bf16.
pub(super) fn lower(n: &mut Nodes, id: NodeId, eps: f32) -> Result<Val, String> {
    let ins = n.graph().nodes[id].inputs.clone();
    let (x, w) = (n.whole(id, ins[0])?, n.weight(id, ins[1])?);
    let rows = n.buffer(x).rows;
    n.launch(id, rows, BufType::Bf16, |out| Launch::RmsNorm {
        x,
        w,
        eps,
        out,
    })
}
