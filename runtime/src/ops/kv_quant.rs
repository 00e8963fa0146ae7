//! `KvQuant { format }` of `[x[…, d]]`: `x` as a quantized KV cache holds it (`kiln build
//! --kv-cache`): each vector along the last axis (one head of one token) rounded to `format`
//! (`Int8`: codes in -127..=127, `Fp8`: E4M3) with its own scale `max|vector| / 127` (`/ 448`),
//! then scaled back. The GPU kernels do not read 8-bit caches yet.

use crate::cpu::tensor::Tensor;
use crate::ir::{DType, TensorType};

/// Int8 or fp8, over float vectors; the type is kept.
pub(super) fn infer(format: DType, x: &TensorType) -> Result<TensorType, String> {
    if !matches!(format, DType::Int8 | DType::Fp8) {
        return Err(format!(
            "a KV cache holds int8 or fp8, not {}",
            format.name()
        ));
    }
    if !x.dtype.is_float() || x.rank() == 0 {
        return Err(format!("KvQuant needs float vectors, got {x}"));
    }
    Ok(x.clone())
}

/// CPU: `quant::kv_round` on each vector.
pub(super) fn eval(format: DType, x: Tensor) -> Result<Tensor, String> {
    let (dtype, shape) = (x.dtype, x.shape.clone());
    let d = *shape.last().unwrap_or(&1);
    let mut v = x.into_vec::<f32>();
    crate::quant::kv_round(&mut v, d, format)?;
    Ok(Tensor::new(dtype, shape, v))
}
