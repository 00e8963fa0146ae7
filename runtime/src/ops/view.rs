//! The views: `Reshape` of `[x]` to `shape` (same element count), `Transpose` by `perm` (output
//! axis `i` is input axis `perm[i]`) and `Slice` of `start..end` along `axis`. The CPU executor
//! makes them strided views wherever it can; the cost model counts them free (their reader reads
//! through the view); on the GPU they change how later kernels index a buffer, not its bytes.

use crate::cpu::tensor::Tensor;
use crate::ir::{check_axis, fmt_shape, same_numel, Dim, NodeId, TensorType};
use crate::lower::{Nodes, Val};

/// `Reshape`: the same number of elements.
pub(super) fn infer_reshape(shape: &[Dim], x: &TensorType) -> Result<TensorType, String> {
    if !same_numel(&x.shape, shape) {
        return Err(format!("cannot reshape {x} to {}", fmt_shape(shape)));
    }
    Ok(TensorType::new(x.dtype, shape.to_vec()))
}

/// `Transpose`: `perm` a permutation of the input's axes.
pub(super) fn infer_transpose(perm: &[usize], x: &TensorType) -> Result<TensorType, String> {
    let mut seen = vec![false; x.rank()];
    for &p in perm {
        if p >= seen.len() || std::mem::replace(&mut seen[p], true) {
            return Err(format!(
                "{perm:?} is not a permutation of {} axes",
                seen.len()
            ));
        }
    }
    if perm.len() != seen.len() {
        return Err(format!(
            "{perm:?} is not a permutation of {} axes",
            seen.len()
        ));
    }
    let shape = perm.iter().map(|&p| x.shape[p].clone()).collect();
    Ok(TensorType::new(x.dtype, shape))
}

/// `Slice`: the axis exists and `start..end` lies inside it (where the sizes are known).
pub(super) fn infer_slice(
    axis: usize,
    start: &Dim,
    end: &Dim,
    x: &TensorType,
) -> Result<TensorType, String> {
    check_axis(axis, x.rank())?;
    let len = &x.shape[axis];
    let bad = match (start.as_const(), end.as_const(), len.as_const()) {
        (Some(s), _, _) if s < 0 => true,
        (Some(s), Some(e), _) if s > e => true,
        (_, Some(e), Some(n)) if e > n => true,
        _ => false,
    };
    if bad {
        return Err(format!(
            "Slice {start}..{end} of axis {axis} is not a range inside {x}"
        ));
    }
    let mut shape = x.shape.clone();
    shape[axis] = end.sub(start);
    Ok(TensorType::new(x.dtype, shape))
}

/// CPU: a view when the strides allow, else a copy.
pub(super) fn eval_reshape(shape: Vec<usize>, x: Tensor) -> Result<Tensor, String> {
    if shape.iter().product::<usize>() != x.numel() {
        return Err(format!("cannot reshape {:?} to {shape:?}", x.shape));
    }
    Ok(x.reshape(shape))
}

/// CPU: a strided view.
pub(super) fn eval_transpose(perm: &[usize], x: Tensor) -> Result<Tensor, String> {
    if perm.len() != x.rank() {
        return Err(format!(
            "{perm:?} does not permute the {} axes of {:?}",
            x.rank(),
            x.shape
        ));
    }
    Ok(x.permute(perm))
}

/// CPU: a strided view of `s..e` along `axis`.
pub(super) fn eval_slice(axis: usize, s: usize, e: usize, x: Tensor) -> Result<Tensor, String> {
    if axis >= x.rank() || s > e || e > x.shape[axis] {
        return Err(format!(
            "slice {s}..{e} of axis {axis} is out of range for {:?}",
            x.shape
        ));
    }
    Ok(x.slice_axis(axis, s, e))
}

/// GPU: a reshape or transpose (or a cast, `cast.rs`) of an activation is the same columns.
pub(super) fn lower_same(n: &Nodes, id: NodeId) -> Result<Val, String> {
    match n.val(n.graph().nodes[id].inputs[0]) {
        v @ (Val::Cols { .. } | Val::Roped { .. } | Val::Appended { .. } | Val::Host) => {
            Ok(v.clone())
        }
        _ => Err(n.err(id, "is a view of something that is not an activation")),
    }
}

/// GPU: a constant slice of the last (column) axis narrows the columns.
pub(super) fn lower_slice(
    n: &Nodes,
    id: NodeId,
    axis: usize,
    start: &Dim,
    end: &Dim,
) -> Result<Val, String> {
    let x = n.graph().nodes[id].inputs[0];
    let rank = n.graph().nodes[x].ty.rank();
    let (Val::Cols { buf, off, .. }, Some(s), Some(e)) =
        (n.val(x), start.as_const(), end.as_const())
    else {
        return Err(n.err(id, "only constant slices of activations are supported"));
    };
    if axis != rank - 1 {
        return Err(n.err(id, "only slices of the last (column) axis are supported"));
    }
    Ok(Val::Cols {
        buf: *buf,
        off: off + s as usize,
        len: (e - s) as usize,
    })
}
