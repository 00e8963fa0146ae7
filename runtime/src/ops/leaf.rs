//! The ops without inputs: `Input` (a value supplied per step), `Weight` (a checkpoint tensor),
//! `Constant` (a scalar) and `Iota` (`[0, 1, …, len-1]` as i32). Inputs and weights have declared
//! types: they are supplied, never inferred or computed.

use crate::cpu::tensor::Tensor;
use crate::ir::{DType, Dim, InputKind, TensorType, MAX_IOTA};
use crate::lower::Val;

/// `Constant`: an f32 scalar; NaN is refused.
pub(super) fn infer_constant(value: f32) -> Result<TensorType, String> {
    if value.is_nan() {
        return Err("a constant is NaN".into());
    }
    Ok(TensorType::new(DType::F32, vec![]))
}

/// `Iota`: an i32 vector of `len` elements, at most [`MAX_IOTA`].
pub(super) fn infer_iota(len: &Dim) -> Result<TensorType, String> {
    if let Some(n) = len.as_const() {
        if !(0..=MAX_IOTA).contains(&n) {
            return Err(format!("Iota length {n} is outside 0..={MAX_IOTA}"));
        }
    }
    Ok(TensorType::new(DType::I32, vec![len.clone()]))
}

/// CPU: the scalar.
pub(super) fn eval_constant(value: f32) -> Tensor {
    Tensor::new(DType::F32, vec![], vec![value])
}

/// CPU: `[0, 1, …, n-1]`.
pub(super) fn eval_iota(n: usize) -> Result<Tensor, String> {
    let n32 = i32::try_from(n).map_err(|_| format!("Iota length {n} exceeds i32"))?;
    Ok(Tensor::new(DType::I32, vec![n], (0..n32).collect()))
}

/// GPU: what each input is to the kernels. Token ids feed the embedding, positions are read
/// from the step's metadata, states are the KV cache; a pipeline stage's activation input has no
/// GPU path (a launch reading it fails the build).
pub(super) fn lower_input(kind: InputKind) -> Val {
    match kind {
        InputKind::Tokens => Val::Tokens,
        InputKind::Positions => Val::Positions,
        InputKind::State => Val::State,
        InputKind::Activation => Val::Host,
    }
}
