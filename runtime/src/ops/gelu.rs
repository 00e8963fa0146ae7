//! `GeluTanh` of `[x]` → `x · σ(2√(2/π) · (x + 0.044715 · x³))` element-wise: GELU's tanh
//! approximation in the sigmoid form model files write (GPT-2's MLP activation; the rewriter's
//! `gelu-tanh-from-sigmoid` finds it). Gemma's gated MLP uses the same function inside
//! `GatedGelu`. No GPU lowering yet: refused by name.

use crate::cpu::tensor::Tensor;
use crate::ir::TensorType;

/// A float value; the type is kept.
pub(super) fn infer(x: &TensorType) -> Result<TensorType, String> {
    if !x.dtype.is_float() {
        return Err(format!("GeluTanh needs a float input, got {x}"));
    }
    Ok(x.clone())
}

/// `g · 1/(e^-z + 1)`, `z = 2√(2/π) · (g + 0.044715 · g³)`, in the order the model files write
/// it.
pub(crate) fn gelu_tanh(g: f32) -> f32 {
    let k = 2.0 * (2.0 / std::f32::consts::PI).sqrt();
    let z = k * (g + 0.044715 * (g * g * g));
    g * (1.0 / ((-z).exp() + 1.0))
}

/// CPU reference: [`gelu_tanh`] of every element, rounded to the value's dtype.
pub(super) fn eval(x: Tensor) -> Result<Tensor, String> {
    let (dtype, shape) = (x.dtype, x.shape.clone());
    let v = x
        .into_vec::<f32>()
        .into_iter()
        .map(|e| crate::cpu::elementwise::round_to(dtype, gelu_tanh(e)))
        .collect();
    Ok(Tensor::new(dtype, shape, v))
}
