//! `Rope { seq_axis }` of `[x[…, d], pos[s], inv_freq[d/2]]`: the rotary embedding of `x` over
//! its last axis, HF's "rotate_half" pairing `(i, i + d/2)`, angle `pos · inv_freq[i]` in f32;
//! axis `seq_axis` of `x` has length `s` and is indexed by `pos`. `inv_freq` is whatever table
//! the model file computes (plain `theta^(-2i/d)`, linear or Llama-3 scaling, …), stored as an
//! f32 weight. On the GPU it is a `Rope` step that the `rope_append` peephole merges into the
//! attention block's `RopeAppend`; the kernels rotate each token at its own position, so RoPE at
//! anything but the step's positions is refused.

use crate::cpu::rows::{check_float, for_rows};
use crate::cpu::tensor::Tensor;
use crate::ir::{check_axis, DType, NodeId, TensorType};
use crate::lower::{Nodes, Step, Val};

/// Positions: i32 indexing `seq_axis`; an even, constant last axis; an f32 table of half of it.
pub(super) fn infer(
    seq_axis: usize,
    x: &TensorType,
    pos: &TensorType,
    freq: &TensorType,
) -> Result<TensorType, String> {
    check_axis(seq_axis, x.rank())?;
    if pos.dtype != DType::I32 || pos.rank() != 1 || pos.shape[0] != x.shape[seq_axis] {
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
    if freq.dtype != DType::F32 || freq.rank() != 1 || freq.shape[0].as_const() != Some(half) {
        return Err(format!(
            "Rope frequencies {freq} are not an f32 vector of half the last axis of {x}"
        ));
    }
    Ok(x.clone())
}

/// CPU reference: cos/sin tables `[s, d/2]` computed as the model file computes them, then each
/// row's halves rotated.
pub(super) fn eval(
    seq_axis: usize,
    x: Tensor,
    pos: Tensor,
    inv_freq: Tensor,
) -> Result<Tensor, String> {
    check_float("Rope", &[&x])?;
    let r = x.rank();
    let d = *x.shape.last().ok_or("Rope of a scalar")?;
    if seq_axis + 1 >= r || pos.rank() != 1 || pos.shape[0] != x.shape[seq_axis] || d % 2 != 0 {
        return Err(format!(
            "Rope of {:?} with positions {:?} along axis {seq_axis}: shapes do not fit",
            x.shape, pos.shape
        ));
    }
    let half = d / 2;
    let s = pos.shape[0];
    if inv_freq.dtype != DType::F32 || inv_freq.shape != [half] {
        return Err(format!(
            "Rope frequencies {:?} {:?} are not f32 [{half}]",
            inv_freq.dtype, inv_freq.shape
        ));
    }
    let inv_freq = inv_freq.into_vec::<f32>();
    let mut cos = Vec::with_capacity(s * half);
    let mut sin = Vec::with_capacity(s * half);
    for &p in pos.values::<i32>().iter() {
        for &f in &inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    // Rows of d elements; the sequence index of row `i` is `(i / inner) % s`, where `inner` is
    // the number of rows per step of the sequence axis.
    let inner: usize = x.shape[seq_axis + 1..r - 1].iter().product();
    let (dtype, shape) = (x.dtype, x.shape.clone());
    let mut v = x.into_vec::<f32>();
    for_rows(&mut v, d, |i, row| {
        let j = (i / inner.max(1)) % s;
        let (c, sn) = (
            &cos[j * half..(j + 1) * half],
            &sin[j * half..(j + 1) * half],
        );
        let (x1, x2) = row.split_at_mut(half);
        for k in 0..half {
            let (a, b) = (x1[k], x2[k]);
            x1[k] = a * c[k] + (-b) * sn[k];
            x2[k] = b * c[k] + a * sn[k];
        }
    });
    Ok(Tensor::new(dtype, shape, v))
}

/// GPU: a `Rope` step on columns of a buffer at the step's positions, its table a stored f32
/// weight.
pub(super) fn lower(n: &mut Nodes, id: NodeId) -> Result<Val, String> {
    let ins = n.graph().nodes[id].inputs.clone();
    if *n.val(ins[1]) != Val::Positions {
        return Err(n.err(
            id,
            &format!(
                "RoPE at positions `{}`: the GPU kernels rotate each token at its own position \
                 (the step's position input), nothing computed from it",
                n.graph().nodes[ins[1]].name
            ),
        ));
    }
    match (n.val(ins[0]).clone(), n.val(ins[2]).clone()) {
        (Val::Cols { buf, off, len }, Val::Weight(freq)) => {
            n.push(Step::Rope {
                node: id,
                buf,
                off,
                len,
            });
            Ok(Val::Roped {
                rope: id,
                buf,
                off,
                len,
                freq,
            })
        }
        (Val::Cols { .. }, _) => Err(n.err(id, "RoPE frequencies that are not a stored table")),
        _ => Err(n.err(id, "RoPE of something that is not a column range")),
    }
}
