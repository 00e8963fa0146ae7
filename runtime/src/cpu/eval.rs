//! One node at a time: the dispatch of an op to its kernel, the check of the result against the
//! node's declared type, and the conversions at the executor's edges (loaded weights in, host
//! tensors out).

use super::tensor::{is_int_storage, Tensor};
use super::{elementwise, fused, matmul, movement, reduce, ExecError, HostTensor};
use crate::ir::dim::eval_shape;
use crate::ir::{DType, Op, SymValues, TensorType};

/// True if the op's result depends on no run-time symbol (given inputs that do not).
pub(super) fn op_is_static(op: &Op) -> bool {
    match op {
        Op::Input { .. } | Op::AllReduce { .. } | Op::AllGather { .. } => false,
        Op::Iota { len } => len.as_const().is_some(),
        Op::Reshape { shape } => shape.iter().all(|d| d.as_const().is_some()),
        Op::Slice { start, end, .. } => start.as_const().is_some() && end.as_const().is_some(),
        _ => true,
    }
}

/// Evaluates one non-leaf op on its input values.
pub(super) fn eval_op(op: &Op, mut ins: Vec<Tensor>, syms: &SymValues) -> Result<Tensor, String> {
    let dim = |d: &crate::ir::Dim| -> Result<usize, String> {
        let v = d.eval(syms);
        usize::try_from(v).map_err(|_| {
            format!(
                "{d} evaluates to {v} (batch={}, seq={}, past={})",
                syms.batch, syms.seq, syms.past
            )
        })
    };
    let one = |ins: &mut Vec<Tensor>| ins.pop().expect("arity checked by validation");
    Ok(match op {
        Op::Input { .. } | Op::Weight { .. } => {
            return Err("leaf values are supplied, not computed".into())
        }
        Op::Constant { value } => Tensor::new(DType::F32, vec![], vec![*value]),
        Op::Iota { len } => {
            let n = dim(len)?;
            let n32 = i32::try_from(n).map_err(|_| format!("Iota length {n} exceeds i32"))?;
            Tensor::new(DType::I32, vec![n], (0..n32).collect())
        }
        Op::Unary(u) => elementwise::unary(*u, one(&mut ins))?,
        Op::Binary(b) => {
            let y = one(&mut ins);
            elementwise::binary(*b, one(&mut ins), y)?
        }
        Op::Where => {
            let (b, a) = (one(&mut ins), one(&mut ins));
            elementwise::where_(one(&mut ins), a, b)?
        }
        Op::Reduce { op, axis, keep_dim } => reduce::reduce(*op, one(&mut ins), *axis, *keep_dim)?,
        Op::Softmax { axis } => reduce::softmax(one(&mut ins), *axis)?,
        Op::MatMul => {
            let b = one(&mut ins);
            matmul::matmul(one(&mut ins), b)?
        }
        Op::Reshape { shape } => {
            let x = one(&mut ins);
            let shape = shape.iter().map(dim).collect::<Result<Vec<_>, _>>()?;
            if shape.iter().product::<usize>() != x.numel() {
                return Err(format!("cannot reshape {:?} to {shape:?}", x.shape));
            }
            x.reshape(shape)
        }
        Op::Transpose { perm } => {
            let x = one(&mut ins);
            if perm.len() != x.rank() {
                return Err(format!(
                    "{perm:?} does not permute the {} axes of {:?}",
                    x.rank(),
                    x.shape
                ));
            }
            x.permute(perm)
        }
        Op::Gather => {
            let ids = one(&mut ins);
            movement::gather(one(&mut ins), ids)?
        }
        Op::Concat { axis } => movement::concat(ins, *axis)?,
        Op::GatherShard { first } => {
            let ids = one(&mut ins);
            movement::gather_shard(one(&mut ins), ids, *first)?
        }
        Op::KvQuant { format } => {
            let x = one(&mut ins);
            let (dtype, shape) = (x.dtype, x.shape.clone());
            let d = *shape.last().unwrap_or(&1);
            let mut v = x.into_vec::<f32>();
            crate::quant::kv_round(&mut v, d, *format)?;
            Tensor::new(dtype, shape, v)
        }
        Op::AllReduce { ranks: 1 } | Op::AllGather { ranks: 1, .. } => one(&mut ins),
        Op::AllReduce { ranks } | Op::AllGather { ranks, .. } => {
            return Err(format!(
                "this graph is one rank of {ranks} (built with --tp {ranks}): run it with its \
                 group, every rank's engine together"
            ))
        }
        Op::Slice { axis, start, end } => {
            let x = one(&mut ins);
            let (s, e) = (dim(start)?, dim(end)?);
            if *axis >= x.rank() || s > e || e > x.shape[*axis] {
                return Err(format!(
                    "slice {s}..{e} of axis {axis} is out of range for {:?}",
                    x.shape
                ));
            }
            x.slice_axis(*axis, s, e)
        }
        Op::Cast { dtype } if dtype.is_weight_format() => {
            let x = one(&mut ins);
            let &[rows, cols] = x.shape.as_slice() else {
                return Err(format!("cannot store {:?} as {}", x.shape, dtype.name()));
            };
            let values = crate::quant::round_trip(*dtype, &x.into_vec::<f32>(), rows, cols)?;
            Tensor::new(*dtype, vec![rows, cols], values)
        }
        Op::Cast { dtype } => elementwise::cast(one(&mut ins), *dtype),
        Op::RmsNorm { .. }
        | Op::Linear
        | Op::LinearAdd
        | Op::LinearBias
        | Op::GatedMlp
        | Op::GatedGelu
        | Op::Rope { .. }
        | Op::FusedAttention { .. } => fused::eval(op, ins)?,
    })
}

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
