//! The collectives of a tensor-parallel rank (`kiln build --tp`): `AllReduce { ranks }` of `[x]`,
//! the element-wise sum over the group (every rank gets it), and `AllGather { axis, ranks }`, the
//! concatenation along `axis` of every rank's `x` in rank order. They exchange data at run time,
//! so they are never evaluated at build time; the CPU executor runs them with its group
//! (`collective.rs`), and a graph of one rank is the identity.

use super::Sizes;
use crate::cpu::tensor::Tensor;
use crate::ir::{check_axis, TensorType};

/// `AllReduce`: a float value, its type kept; at least one rank.
pub(super) fn infer_all_reduce(ranks: u32, x: &TensorType) -> Result<TensorType, String> {
    if ranks == 0 {
        return Err("AllReduce over 0 ranks".into());
    }
    if !x.dtype.is_float() {
        return Err(format!("AllReduce needs a float input, got {x}"));
    }
    Ok(x.clone())
}

/// `AllGather`: the axis grows `ranks` times; at least one rank.
pub(super) fn infer_all_gather(
    axis: usize,
    ranks: u32,
    x: &TensorType,
) -> Result<TensorType, String> {
    if ranks == 0 {
        return Err("AllGather over 0 ranks".into());
    }
    check_axis(axis, x.rank())?;
    let mut shape = x.shape.clone();
    shape[axis] = shape[axis].scale(i64::from(ranks));
    Ok(TensorType::new(x.dtype, shape))
}

/// CPU, outside a group: the identity for one rank, else an error (the executor runs a
/// collective with its group before it gets here).
pub(super) fn eval(ranks: u32, x: Tensor) -> Result<Tensor, String> {
    if ranks == 1 {
        return Ok(x);
    }
    Err(format!(
        "this graph is one rank of {ranks} (built with --tp {ranks}): run it with its group, \
         every rank's engine together"
    ))
}

/// Bytes sent between GPUs: a ring all-reduce sends and receives 2·(n-1)/n of the buffer per
/// rank, an all-gather (n-1)/n of the result.
pub(super) fn link_bytes(s: &Sizes, ranks: u32, reduce: bool, out: &TensorType) -> f64 {
    let share = f64::from(ranks.saturating_sub(1)) / f64::from(ranks);
    let times = if reduce { 2.0 } else { 1.0 };
    times * share * s.bytes(out)
}
