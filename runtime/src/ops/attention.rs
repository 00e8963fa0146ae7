//! `FusedAttention { scale, window, softcap }` of `[q[b, h, s, d], k[b, kh, t, d], v]` →
//! `softmax(cap(q·kᵀ·scale) + mask)·v`, `[b, h, s, d]`, `cap(x) = softcap · tanh(x / softcap)`
//! (Gemma-2's logit soft-cap; none when 0). Query `i` sits at position `p = t - s + i` and sees
//! keys `0..=p` (causal), or with a sliding window `w > 0` only `p-w+1..=p`; query head `j` reads
//! KV head `j / (h / kh)` (grouped-query). On the GPU it is an `Attention` step over the layer's
//! paged KV cache, which the `rope_append` peephole turns into `RopeAppend` + `Attention`.

use super::Sizes;
use crate::cpu::matmul::matmul;
use crate::cpu::reduce::softmax;
use crate::cpu::rows::{check_float, for_rows};
use crate::cpu::tensor::Tensor;
use crate::ir::{same_float, NodeId, Op, TensorType};
use crate::lower::{Nodes, Step, Val};
use crate::plan::{AttentionDims, BufType, Buffer, Rows};

/// A finite scale, a finite non-negative soft-cap; q `[b, h, s, d]`, k = v `[b, kh, t, d]` with
/// `kh` dividing `h`, one float dtype.
pub(super) fn infer(
    op: &Op,
    (scale, softcap): (f32, f32),
    q: &TensorType,
    k: &TensorType,
    v: &TensorType,
) -> Result<TensorType, String> {
    if !scale.is_finite() {
        return Err(format!("FusedAttention scale {scale} is not finite"));
    }
    if !(softcap.is_finite() && softcap >= 0.0) {
        return Err(format!(
            "FusedAttention soft-cap {softcap} is not a finite non-negative number"
        ));
    }
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

/// CPU reference: two batched products per KV head with its query-head group folded into the
/// rows, the scaled (and capped) scores masked, softmax between them.
pub(super) fn eval(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: f32,
    window: usize,
    softcap: f32,
) -> Result<Tensor, String> {
    check_float("FusedAttention", &[&q, &k, &v])?;
    let ok = q.rank() == 4
        && k.rank() == 4
        && k.shape == v.shape
        && q.shape[0] == k.shape[0]
        && q.shape[3] == k.shape[3]
        && k.shape[1] > 0
        && q.shape[1].is_multiple_of(k.shape[1])
        && k.shape[2] >= q.shape[2];
    if !ok {
        return Err(format!(
            "FusedAttention needs q [b, h, s, d], k = v [b, kh, t ≥ s, d] with kh dividing h; \
             got {:?}, {:?}, {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    let (b, h, s, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (kh, t) = (k.shape[1], k.shape[2]);
    let g = h / kh;
    let dtype = q.dtype;
    // Query heads of one KV head become rows of one product: [b, kh, g·s, d].
    let qg = q.reshape(vec![b, kh, g * s, d]);
    let scores = matmul(qg, k.permute(&[0, 1, 3, 2]))?;
    let mut sc = scores.into_vec::<f32>();
    for_rows(&mut sc, t, |row, r| {
        let i = row % s;
        let last = t - s + i;
        // The first key a sliding window keeps (a key `window` or more positions back is out).
        let first = if window > 0 {
            (last + 1).saturating_sub(window)
        } else {
            0
        };
        for (j, e) in r.iter_mut().enumerate() {
            *e = if j > last || j < first {
                f32::NEG_INFINITY
            } else if softcap > 0.0 {
                softcap * (*e * scale / softcap).tanh()
            } else {
                *e * scale
            };
        }
    });
    let probs = softmax(Tensor::new(dtype, vec![b, kh, g * s, t], sc), 3)?;
    let ctx = matmul(probs, v)?;
    Ok(ctx.reshape(vec![b, h, s, d]))
}

/// `(4d + 5)` flops per (query row, key).
pub(super) fn flops(s: &Sizes, q: &TensorType, k: &TensorType) -> f64 {
    let t = s.dim(&k.shape[2]);
    let d = s.dim(&q.shape[3]);
    s.numel(q) / d.max(1.0) * t * (4.0 * d + 5.0)
}

/// GPU: checks the kernels' limits (head size, grouped heads, one geometry for every layer),
/// takes the next KV-cache layer and an output buffer; a soft-capped attention has no kernel yet.
pub(super) fn lower(
    n: &mut Nodes,
    id: NodeId,
    (scale, window, softcap): (f32, u32, f32),
) -> Result<Val, String> {
    let g = n.graph();
    let node = &g.nodes[id];
    if softcap > 0.0 {
        return Err(n.err(
            id,
            "attention with a logit soft-cap (Gemma-2) has no GPU kernel yet; build this model \
             for the CPU (--target cpu)",
        ));
    }
    let ins = &node.inputs;
    let (qt, kt) = (&g.nodes[ins[0]].ty, &g.nodes[ins[1]].ty);
    let dims = AttentionDims {
        heads: qt.shape[1].as_const().unwrap_or(0) as usize,
        kv_heads: kt.shape[1].as_const().unwrap_or(0) as usize,
        head_dim: qt.shape[3].as_const().unwrap_or(0) as usize,
    };
    // The attention kernels' limits, checked here so the user reads them instead of an NVRTC
    // static-assert: the decode kernel splits a head over 32 / (d / 8) lanes and the prefill
    // kernels tile d in 32-wide steps.
    if !matches!(dims.head_dim, 32 | 64 | 128 | 256) {
        return Err(n.err(
            id,
            &format!(
                "head size {} is not supported by the GPU attention kernels (32, 64, 128 or \
                 256); build for the CPU (--target cpu)",
                dims.head_dim
            ),
        ));
    }
    if dims.kv_heads == 0 || !dims.heads.is_multiple_of(dims.kv_heads) {
        return Err(n.err(
            id,
            &format!(
                "{} query heads are not a multiple of {} KV heads",
                dims.heads, dims.kv_heads
            ),
        ));
    }
    let layer = n.next_layer(id, dims)?;
    let out = n.push_buffer(Buffer {
        name: node.name.clone(),
        rows: Rows::Tokens,
        cols: dims.heads * dims.head_dim,
        dtype: BufType::Bf16,
        slot: 0,
    });
    let (q, k, v) = (
        n.val(ins[0]).clone(),
        n.val(ins[1]).clone(),
        n.val(ins[2]).clone(),
    );
    n.push(Step::Attention {
        node: id,
        q,
        k,
        v,
        layer,
        scale,
        window,
        out,
    });
    Ok(n.whole_val(out))
}
