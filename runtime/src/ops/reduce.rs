//! Reductions: `Reduce(Σ | mean | max)` of `[x]` along `axis` (kept as size 1 with `keep_dim`)
//! and `Softmax` along `axis`. Primitives of model files (RMSNorm's mean, attention's softmax);
//! the rewriter fuses them, so they have no GPU lowering.

use super::Sizes;
use crate::cpu::tensor::Tensor;
use crate::ir::{check_axis, Dim, ReduceOp, TensorType};

/// `Reduce`: the axis must exist; it is dropped, or kept as 1 with `keep_dim`.
pub(super) fn infer_reduce(
    axis: usize,
    keep_dim: bool,
    x: &TensorType,
) -> Result<TensorType, String> {
    check_axis(axis, x.rank())?;
    let mut shape = x.shape.clone();
    if keep_dim {
        shape[axis] = Dim::c(1);
    } else {
        shape.remove(axis);
    }
    Ok(TensorType::new(x.dtype, shape))
}

/// `Softmax`: the axis must exist; the shape is kept.
pub(super) fn infer_softmax(axis: usize, x: &TensorType) -> Result<TensorType, String> {
    check_axis(axis, x.rank())?;
    Ok(x.clone())
}

/// CPU: `cpu/reduce.rs` (sums accumulate in f64).
pub(super) fn eval_reduce(
    op: ReduceOp,
    axis: usize,
    keep_dim: bool,
    x: Tensor,
) -> Result<Tensor, String> {
    crate::cpu::reduce::reduce(op, x, axis, keep_dim)
}

/// CPU: `cpu/reduce.rs` (the row's max subtracted, the executor's `exp`).
pub(super) fn eval_softmax(axis: usize, x: Tensor) -> Result<Tensor, String> {
    crate::cpu::reduce::softmax(x, axis)
}

/// About 5 flops per input element.
pub(super) fn flops(s: &Sizes, x: &TensorType) -> f64 {
    5.0 * s.numel(x)
}
