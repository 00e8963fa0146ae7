//! `Cast` of `[x]` to `dtype`. To a float type it rounds (the CPU computes in f32 and rounds to
//! f16/bf16); to a weight format it is the storage of a `[rows, columns]` weight in that format
//! (the precision rules' `kiln build --quant`), which the CPU reads back dequantized. On the GPU
//! a cast of an activation is the same columns (every activation buffer is bf16, the logits f32).

use crate::cpu::tensor::Tensor;
use crate::ir::{DType, TensorType};

/// To a weight format only a float `[rows, columns]` weight; to anything else any value.
pub(super) fn infer(dtype: DType, x: &TensorType) -> Result<TensorType, String> {
    if dtype.is_weight_format() && (!x.dtype.is_float() || x.rank() != 2) {
        return Err(format!(
            "only a [rows, columns] float weight can be stored as {}, not {x}",
            dtype.name()
        ));
    }
    Ok(TensorType::new(dtype, x.shape.clone()))
}

/// CPU: rounding to the float type, or the weight format's round trip (`quant.rs`).
pub(super) fn eval(dtype: DType, x: Tensor) -> Result<Tensor, String> {
    if !dtype.is_weight_format() {
        return Ok(crate::cpu::elementwise::cast(x, dtype));
    }
    let &[rows, cols] = x.shape.as_slice() else {
        return Err(format!("cannot store {:?} as {}", x.shape, dtype.name()));
    };
    let values = crate::quant::round_trip(dtype, &x.into_vec::<f32>(), rows, cols)?;
    Ok(Tensor::new(dtype, vec![rows, cols], values))
}
