//! `Softcap { cap }` of `[x]` → `cap · tanh(x / cap)`, element-wise: Gemma-2's final-logit
//! soft-cap, which its model file writes as `cap · (2σ(2x/cap) − 1)` (the rewriter's `softcap`
//! rule finds it). The attention scores' soft-cap is part of `FusedAttention`. No GPU lowering
//! yet: the lowering refuses it by name.

use crate::cpu::tensor::Tensor;
use crate::ir::TensorType;

/// A finite, positive cap over a float value; the type is kept.
pub(super) fn infer(cap: f32, x: &TensorType) -> Result<TensorType, String> {
    if !(cap.is_finite() && cap > 0.0) {
        return Err(format!("Softcap {cap} is not a finite positive number"));
    }
    if !x.dtype.is_float() {
        return Err(format!("Softcap needs a float input, got {x}"));
    }
    Ok(x.clone())
}

/// CPU reference: `cap · tanh(x / cap)` in f32, rounded to the value's dtype.
pub(super) fn eval(cap: f32, x: Tensor) -> Result<Tensor, String> {
    let (dtype, shape) = (x.dtype, x.shape.clone());
    let v = x
        .into_vec::<f32>()
        .into_iter()
        .map(|e| crate::cpu::elementwise::round_to(dtype, cap * (e / cap).tanh()))
        .collect();
    Ok(Tensor::new(dtype, shape, v))
}
