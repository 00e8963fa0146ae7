//! Types of values and the entry to the shape and dtype rules: `infer(op, input types) → output
//! type` checks what every op shares (arity, weight formats read only by linear ops) and hands
//! the op to its module's rule (`crate::ops`).

use super::dim::{fmt_shape, Dim};
use super::op::{DType, Op};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type and symbolic shape of a value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<Dim>,
}

impl TensorType {
    /// Builds a type.
    pub fn new(dtype: DType, shape: Vec<Dim>) -> TensorType {
        TensorType { dtype, shape }
    }
    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype.name(), fmt_shape(&self.shape))
    }
}

/// Numpy broadcasting of two shapes (right-aligned; a dimension of 1 stretches).
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, String> {
    let n = a.len().max(b.len());
    let one = Dim::c(1);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n {
            &a[i + a.len() - n]
        } else {
            &one
        };
        let db = if i + b.len() >= n {
            &b[i + b.len() - n]
        } else {
            &one
        };
        out.push(if da == db || *db == one {
            da.clone()
        } else if *da == one {
            db.clone()
        } else {
            return Err(format!(
                "cannot broadcast {} with {}",
                fmt_shape(a),
                fmt_shape(b)
            ));
        });
    }
    Ok(out)
}

fn arity(op: &Op, n: usize) -> Result<(), String> {
    match op.arity() {
        Some(want) if n != want => Err(format!("{} takes {want} input(s), got {n}", op.name())),
        None if n == 0 => Err(format!("{} needs at least one input", op.name())),
        _ => Ok(()),
    }
}

/// An error unless `axis` is an axis of a value of rank `rank`.
pub(crate) fn check_axis(axis: usize, rank: usize) -> Result<(), String> {
    if axis < rank {
        Ok(())
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

/// The common dtype of two operands of `op`, or an error naming both.
pub(crate) fn same_float(op: &Op, a: &TensorType, b: &TensorType) -> Result<DType, String> {
    if a.dtype != b.dtype {
        return Err(format!("{} of {} and {}: dtypes differ", op.name(), a, b));
    }
    Ok(a.dtype)
}

/// The longest constant `Iota` a graph may hold (2^24 elements): longer ones are refused
/// before anything is allocated.
pub const MAX_IOTA: i64 = 1 << 24;

/// The output type of `op` applied to inputs of types `ins`, or a message saying what is wrong.
/// Leaf ops (`Input`, `Weight`) have declared types and are not inferred here.
pub fn infer(op: &Op, ins: &[&TensorType]) -> Result<TensorType, String> {
    arity(op, ins.len())?;
    let linear = op.is_linear();
    if let Some(i) = ins.iter().position(|t| t.dtype.is_weight_format()) {
        if !(linear && i == 1) {
            return Err(format!(
                "{} cannot read the {} value {} (a weight format is read only as the weight of \
                 a linear op)",
                op.name(),
                ins[i].dtype.name(),
                ins[i]
            ));
        }
    }
    crate::ops::infer(op, ins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::dim::Sym;

    fn ty(shape: &[Dim]) -> TensorType {
        TensorType::new(DType::F32, shape.to_vec())
    }

    #[test]
    fn matmul_broadcasts_batch_dims() {
        let b = Dim::sym(Sym::Batch);
        let s = Dim::sym(Sym::Seq);
        let x = ty(&[b.clone(), s.clone(), Dim::c(576)]);
        let w = ty(&[Dim::c(576), Dim::c(192)]);
        let out = infer(&Op::MatMul, &[&x, &w]).unwrap();
        assert_eq!(out.shape, vec![b, s, Dim::c(192)]);
        let bad = ty(&[Dim::c(575), Dim::c(192)]);
        assert!(infer(&Op::MatMul, &[&x, &bad])
            .unwrap_err()
            .contains("inner dimensions"));
    }

    #[test]
    fn concat_adds_symbolic_lengths() {
        let past = ty(&[Dim::c(3), Dim::sym(Sym::Past), Dim::c(64)]);
        let new = ty(&[Dim::c(3), Dim::sym(Sym::Seq), Dim::c(64)]);
        let out = infer(&Op::Concat { axis: 1 }, &[&past, &new]).unwrap();
        assert_eq!(out.shape[1].to_string(), "seq+past");
    }

    #[test]
    fn broadcast_errors_name_both_shapes() {
        let e = broadcast(&[Dim::c(3)], &[Dim::c(4)]).unwrap_err();
        assert!(e.contains("[3]") && e.contains("[4]"));
    }
}
