//! One node at a time, beside the ops' CPU references (`crate::ops::eval`): the check of the
//! result against the node's declared type, and the conversions at the executor's edges (loaded
//! weights in, host tensors out).

use super::tensor::{is_int_storage, Tensor};
use super::{elementwise, ExecError, HostTensor};
use crate::ir::dim::eval_shape;
use crate::ir::{DType, SymValues, TensorType};

/// Checks a computed value against the node's declared type.
pub(super) fn check_type(value: &Tensor, ty: &TensorType, syms: &SymValues) -> Result<(), String> {
    let want = eval_shape(&ty.shape, syms);
    if value.dtype != ty.dtype || value.shape != want {
        return Err(format!(
            "computed {}{:?} but the node is typed {ty} = {}{want:?}",
            value.dtype.name(),
            value.shape,
            ty.dtype.name()
        ));
    }
    Ok(())
}

/// Converts a weight's loaded `f32` data to its declared dtype.
pub(super) fn weight_tensor(
    name: &str,
    ty: &TensorType,
    shape: Vec<usize>,
    data: Vec<f32>,
) -> Result<Tensor, ExecError> {
    let n: usize = shape.iter().product();
    if data.len() != n {
        return Err(ExecError::WeightShape {
            name: name.into(),
            expected: shape,
            found: data.len(),
        });
    }
    Ok(match ty.dtype {
        DType::F32 => Tensor::new(DType::F32, shape, data),
        DType::F16 | DType::BF16 => {
            let v = data
                .into_iter()
                .map(|x| elementwise::round_to(ty.dtype, x))
                .collect();
            Tensor::new(ty.dtype, shape, v)
        }
        DType::I32 | DType::Bool => {
            let mut v = Vec::with_capacity(n);
            for x in data {
                if x.fract() != 0.0 || !(i32::MIN as f32..=i32::MAX as f32).contains(&x) {
                    let message = format!("declared {} but holds the value {x}", ty.dtype.name());
                    return Err(ExecError::Weight {
                        name: name.into(),
                        message,
                    });
                }
                v.push(if ty.dtype == DType::Bool {
                    (x != 0.0) as i32
                } else {
                    x as i32
                });
            }
            Tensor::new(ty.dtype, shape, v)
        }
        // A weight format: `data` holds the dequantized values (`Engine::read_weight`).
        _ => Tensor::new(ty.dtype, shape, data),
    })
}

/// Converts a value to a host tensor (without a copy when it owns its contiguous buffer).
pub(super) fn into_host(t: Tensor) -> HostTensor {
    let shape = t.shape.clone();
    let data = if is_int_storage(t.dtype) {
        t.values::<i32>().iter().map(|&x| x as f32).collect()
    } else {
        t.into_vec::<f32>()
    };
    HostTensor { shape, data }
}
