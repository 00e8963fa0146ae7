//! `MatMul`: `[a, b]` → `a[…, m, k] · b[…, k, n]`, leading dims broadcast. A primitive of model
//! files; the rewriter turns products with a weight into `Linear` and attention's two products
//! into `FusedAttention`, so it has no GPU lowering of its own.

use super::Sizes;
use crate::cpu::tensor::Tensor;
use crate::ir::{broadcast, same_float, Op, TensorType};

/// Same float dtype, rank ≥ 2, inner dimensions equal; batch dims broadcast.
pub(super) fn infer(ins: &[&TensorType]) -> Result<TensorType, String> {
    let (a, b) = (ins[0], ins[1]);
    let dtype = same_float(&Op::MatMul, a, b)?;
    if a.rank() < 2 || b.rank() < 2 {
        return Err(format!("MatMul needs rank ≥ 2, got {a} and {b}"));
    }
    let (ra, rb) = (a.rank(), b.rank());
    if a.shape[ra - 1] != b.shape[rb - 2] {
        return Err(format!("MatMul inner dimensions differ: {a} · {b}"));
    }
    let mut shape = broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2])?;
    shape.push(a.shape[ra - 2].clone());
    shape.push(b.shape[rb - 1].clone());
    Ok(TensorType::new(dtype, shape))
}

/// CPU: the executor's batched product (`cpu/matmul.rs`).
pub(super) fn eval(a: Tensor, b: Tensor) -> Result<Tensor, String> {
    crate::cpu::matmul::matmul(a, b)
}

/// `2·m·n·k` flops.
pub(super) fn flops(s: &Sizes, ins: &[&TensorType], out: &TensorType) -> f64 {
    2.0 * s.numel(out) * ins[0].shape.last().map_or(1.0, |k| s.dim(k))
}
