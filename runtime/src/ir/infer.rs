//! Shape and dtype rules of every op: `infer(op, input types) → output type`.

use super::dim::{fmt_shape, same_numel, Dim};
use super::op::{BinaryOp, DType, Op};
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
    let want = match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Iota { .. } => 0,
        Op::Unary(_) | Op::Reduce { .. } | Op::Softmax { .. } | Op::Reshape { .. } => 1,
        Op::Transpose { .. } | Op::Slice { .. } | Op::Cast { .. } => 1,
        Op::AllReduce { .. } | Op::AllGather { .. } | Op::KvQuant { .. } => 1,
        Op::Binary(_) | Op::MatMul | Op::Gather | Op::GatherShard { .. } => 2,
        Op::RmsNorm { .. } | Op::Linear | Op::GatedMlp | Op::GatedGelu => 2,
        Op::Where
        | Op::LinearAdd
        | Op::LinearBias
        | Op::FusedAttention { .. }
        | Op::Rope { .. } => 3,
        Op::Concat { .. } => {
            return if n >= 1 {
                Ok(())
            } else {
                Err("Concat needs at least one input".into())
            }
        }
    };
    if n == want {
        Ok(())
    } else {
        Err(format!("{} takes {want} input(s), got {n}", op.name()))
    }
}

fn check_axis(axis: usize, rank: usize) -> Result<(), String> {
    if axis < rank {
        Ok(())
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

fn same_float(op: &Op, a: &TensorType, b: &TensorType) -> Result<DType, String> {
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
    let t = |dtype, shape| Ok(TensorType::new(dtype, shape));
    match op {
        Op::Input { .. } | Op::Weight { .. } => Err("leaf types are declared, not inferred".into()),
        Op::Constant { value } => {
            if value.is_nan() {
                return Err("a constant is NaN".into());
            }
            t(DType::F32, vec![])
        }
        Op::Iota { len } => {
            if let Some(n) = len.as_const() {
                if !(0..=MAX_IOTA).contains(&n) {
                    return Err(format!("Iota length {n} is outside 0..={MAX_IOTA}"));
                }
            }
            t(DType::I32, vec![len.clone()])
        }
        Op::Unary(_) => {
            if !ins[0].dtype.is_float() {
                return Err(format!("{} needs a float input, got {}", op.name(), ins[0]));
            }
            Ok(ins[0].clone())
        }
        Op::Binary(b) => {
            let dtype = same_float(op, ins[0], ins[1])?;
            let shape = broadcast(&ins[0].shape, &ins[1].shape)?;
            t(
                if *b == BinaryOp::Greater {
                    DType::Bool
                } else {
                    dtype
                },
                shape,
            )
        }
        Op::Where => {
            if ins[0].dtype != DType::Bool {
                return Err(format!("Where condition must be bool, got {}", ins[0]));
            }
            let dtype = same_float(op, ins[1], ins[2])?;
            let shape = broadcast(&broadcast(&ins[0].shape, &ins[1].shape)?, &ins[2].shape)?;
            t(dtype, shape)
        }
        Op::Reduce { axis, keep_dim, .. } => {
            check_axis(*axis, ins[0].rank())?;
            let mut shape = ins[0].shape.clone();
            if *keep_dim {
                shape[*axis] = Dim::c(1);
            } else {
                shape.remove(*axis);
            }
            t(ins[0].dtype, shape)
        }
        Op::Softmax { axis } => {
            check_axis(*axis, ins[0].rank())?;
            Ok(ins[0].clone())
        }
        Op::MatMul => {
            let (a, b) = (ins[0], ins[1]);
            let dtype = same_float(op, a, b)?;
            if a.rank() < 2 || b.rank() < 2 {
                return Err(format!("MatMul needs rank ≥ 2, got {a} and {b}"));
            }
            let (ra, rb) = (a.rank(), b.rank());
            if a.shape[ra - 1] != b.shape[rb - 2] {
                return Err(format!("MatMul inner dimensions differ: {a} · {b}"));
            }
            let mut shape = broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2])?;
            shape.push(a.shape[ra - 2].clone());
            shape.push(b.shape[rb - 1].clone());
            t(dtype, shape)
        }
        Op::Reshape { shape } => {
            if !same_numel(&ins[0].shape, shape) {
                return Err(format!("cannot reshape {} to {}", ins[0], fmt_shape(shape)));
            }
            t(ins[0].dtype, shape.clone())
        }
        Op::Transpose { perm } => {
            let mut seen = vec![false; ins[0].rank()];
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
            t(
                ins[0].dtype,
                perm.iter().map(|&p| ins[0].shape[p].clone()).collect(),
            )
        }
        Op::AllReduce { ranks } | Op::AllGather { ranks, .. } if *ranks == 0 => {
            Err(format!("{} over 0 ranks", op.name()))
        }
        Op::AllReduce { .. } => {
            if !ins[0].dtype.is_float() {
                return Err(format!("AllReduce needs a float input, got {}", ins[0]));
            }
            Ok(ins[0].clone())
        }
        Op::KvQuant { format } => {
            if !matches!(format, DType::Int8 | DType::Fp8) {
                return Err(format!(
                    "a KV cache holds int8 or fp8, not {}",
                    format.name()
                ));
            }
            if !ins[0].dtype.is_float() || ins[0].rank() == 0 {
                return Err(format!("KvQuant needs float vectors, got {}", ins[0]));
            }
            Ok(ins[0].clone())
        }
        Op::AllGather { axis, ranks } => {
            check_axis(*axis, ins[0].rank())?;
            let mut shape = ins[0].shape.clone();
            shape[*axis] = shape[*axis].scale(i64::from(*ranks));
            t(ins[0].dtype, shape)
        }
        Op::Gather | Op::GatherShard { .. } => {
            let (table, ids) = (ins[0], ins[1]);
            if ids.dtype != DType::I32 || table.rank() < 1 {
                return Err(format!(
                    "Gather needs a table and i32 ids, got {table} and {ids}"
                ));
            }
            let mut shape = ids.shape.clone();
            shape.extend(table.shape[1..].iter().cloned());
            t(table.dtype, shape)
        }
        Op::Concat { axis } => {
            let first = ins[0];
            check_axis(*axis, first.rank())?;
            let mut total = Dim::c(0);
            for x in ins {
                let compatible = x.dtype == first.dtype
                    && x.rank() == first.rank()
                    && (0..x.rank()).all(|i| i == *axis || x.shape[i] == first.shape[i]);
                if !compatible {
                    return Err(format!(
                        "Concat along axis {axis} of {first} and {x}: shapes differ"
                    ));
                }
                total = total.add(&x.shape[*axis]);
            }
            let mut shape = first.shape.clone();
            shape[*axis] = total;
            t(first.dtype, shape)
        }
        Op::Slice { axis, start, end } => {
            check_axis(*axis, ins[0].rank())?;
            let len = &ins[0].shape[*axis];
            let bad = match (start.as_const(), end.as_const(), len.as_const()) {
                (Some(s), _, _) if s < 0 => true,
                (Some(s), Some(e), _) if s > e => true,
                (_, Some(e), Some(n)) if e > n => true,
                _ => false,
            };
            if bad {
                return Err(format!(
                    "Slice {start}..{end} of axis {axis} is not a range inside {}",
                    ins[0]
                ));
            }
            let mut shape = ins[0].shape.clone();
            shape[*axis] = end.sub(start);
            t(ins[0].dtype, shape)
        }
        Op::Cast { dtype } if dtype.is_weight_format() => {
            let w = ins[0];
            if !w.dtype.is_float() || w.rank() != 2 {
                return Err(format!(
                    "only a [rows, columns] float weight can be stored as {}, not {w}",
                    dtype.name()
                ));
            }
            t(*dtype, w.shape.clone())
        }
        Op::Cast { dtype } => t(*dtype, ins[0].shape.clone()),
        Op::RmsNorm { eps } => {
            if !(eps.is_finite() && *eps >= 0.0) {
                return Err(format!(
                    "RmsNorm epsilon {eps} is not a finite, non-negative number"
                ));
            }
            let (x, w) = (ins[0], ins[1]);
            same_float(op, x, w)?;
            if w.rank() != 1 || x.shape.last() != w.shape.last() {
                return Err(format!(
                    "RmsNorm weight {w} does not match the last axis of {x}"
                ));
            }
            Ok(x.clone())
        }
        Op::Linear | Op::LinearAdd | Op::LinearBias | Op::GatedMlp | Op::GatedGelu => {
            let (x, w) = (ins[0], ins[1]);
            let dtype = if w.dtype.is_weight_format() && x.dtype.is_float() {
                x.dtype
            } else {
                same_float(op, x, w)?
            };
            if w.rank() != 2 || x.rank() < 1 || x.shape.last() != Some(&w.shape[1]) {
                return Err(format!(
                    "{} of {x} by weight {w}: needs w [n, k] with k the last axis of x",
                    op.name()
                ));
            }
            let mut shape = x.shape.clone();
            let n = w.shape[0].clone();
            *shape.last_mut().expect("rank ≥ 1") = match op {
                Op::GatedMlp | Op::GatedGelu => n
                    .div(2)
                    .ok_or_else(|| format!("{} weight {w} has an odd number of rows", op.name()))?,
                _ => n,
            };
            if let Op::LinearBias = op {
                let b = ins[2];
                if b.rank() != 1 || b.shape[0] != w.shape[0] || b.dtype != dtype {
                    return Err(format!(
                        "LinearBias bias {b} is not a {} vector of the weight's {} rows",
                        dtype.name(),
                        w.shape[0]
                    ));
                }
            }
            if let Op::LinearAdd = op {
                if ins[2].shape != shape || ins[2].dtype != dtype {
                    return Err(format!(
                        "LinearAdd residual {} does not match the product {}",
                        ins[2],
                        TensorType::new(dtype, shape)
                    ));
                }
            }
            t(dtype, shape)
        }
        Op::Rope { seq_axis } => {
            let (x, pos, freq) = (ins[0], ins[1], ins[2]);
            check_axis(*seq_axis, x.rank())?;
            if pos.dtype != DType::I32 || pos.rank() != 1 || pos.shape[0] != x.shape[*seq_axis] {
                return Err(format!(
                    "Rope positions {pos} do not index axis {seq_axis} of {x}"
                ));
            }
            if x.shape
                .last()
                .and_then(|d| d.as_const())
                .is_none_or(|d| d % 2 != 0)
            {
                return Err(format!("Rope needs an even, constant last axis, got {x}"));
            }
            let half = x.shape[x.rank() - 1].as_const().unwrap_or(0) / 2;
            if freq.dtype != DType::F32
                || freq.rank() != 1
                || freq.shape[0].as_const() != Some(half)
            {
                return Err(format!(
                    "Rope frequencies {freq} are not an f32 vector of half the last axis of {x}"
                ));
            }
            Ok(x.clone())
        }
        Op::FusedAttention { scale, softcap, .. } => {
            if !scale.is_finite() {
                return Err(format!("FusedAttention scale {scale} is not finite"));
            }
            if !(softcap.is_finite() && *softcap >= 0.0) {
                return Err(format!(
                    "FusedAttention soft-cap {softcap} is not a finite non-negative number"
                ));
            }
            let (q, k, v) = (ins[0], ins[1], ins[2]);
            same_float(op, q, k)?;
            same_float(op, q, v)?;
            let ok = q.rank() == 4
                && k.shape == v.shape
                && k.rank() == 4
                && q.shape[0] == k.shape[0]
                && q.shape[3] == k.shape[3]
                && matches!((q.shape[1].as_const(), k.shape[1].as_const()), (Some(h), Some(kh)) if kh > 0 && h % kh == 0);
            if !ok {
                return Err(format!("FusedAttention needs q [b, h, s, d], k = v [b, kh, t, d] with kh dividing h; got {q}, {k}, {v}"));
            }
            Ok(q.clone())
        }
    }
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
