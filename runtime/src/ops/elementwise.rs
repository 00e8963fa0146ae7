//! The element-wise primitives: `Unary(f)` of `[x]` (`-x`, `eˣ`, `√x`, `1/√x`, `1/x`, `sin`,
//! `cos`), `Binary(f)` of `[a, b]` with numpy broadcasting (`+ − · / ^ max >`; `>` gives bool)
//! and `Where` of `[cond, a, b]`. The rewriter folds them into fused ops; on the GPU only a
//! product of an embedding by a constant (Gemma's `√hidden`) lowers, folded into the embedding.

use crate::cpu::elementwise as cpu;
use crate::cpu::tensor::Tensor;
use crate::ir::{broadcast, same_float, BinaryOp, DType, NodeId, Op, TensorType, UnaryOp};
use crate::lower::{Nodes, Step, Val};
use crate::plan::BufType;

/// `Unary`: a float input, its type kept.
pub(super) fn infer_unary(op: &Op, x: &TensorType) -> Result<TensorType, String> {
    if !x.dtype.is_float() {
        return Err(format!("{} needs a float input, got {x}", op.name()));
    }
    Ok(x.clone())
}

/// `Binary`: float operands of one dtype, shapes broadcast; `Greater` gives bool.
pub(super) fn infer_binary(op: &Op, a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    let dtype = same_float(op, a, b)?;
    let shape = broadcast(&a.shape, &b.shape)?;
    let dtype = match op {
        Op::Binary(BinaryOp::Greater) => DType::Bool,
        _ => dtype,
    };
    Ok(TensorType::new(dtype, shape))
}

/// `Where`: a bool condition, branches of one float dtype, the three shapes broadcast.
pub(super) fn infer_where(
    op: &Op,
    cond: &TensorType,
    a: &TensorType,
    b: &TensorType,
) -> Result<TensorType, String> {
    if cond.dtype != DType::Bool {
        return Err(format!("Where condition must be bool, got {cond}"));
    }
    let dtype = same_float(op, a, b)?;
    let shape = broadcast(&broadcast(&cond.shape, &a.shape)?, &b.shape)?;
    Ok(TensorType::new(dtype, shape))
}

/// CPU: `cpu/elementwise.rs` (in place when the input's buffer is not shared).
pub(super) fn eval_unary(u: UnaryOp, x: Tensor) -> Result<Tensor, String> {
    cpu::unary(u, x)
}

/// CPU: `cpu/elementwise.rs`, broadcasting.
pub(super) fn eval_binary(b: BinaryOp, x: Tensor, y: Tensor) -> Result<Tensor, String> {
    cpu::binary(b, x, y)
}

/// CPU: `cpu/elementwise.rs`, broadcasting.
pub(super) fn eval_where(cond: Tensor, a: Tensor, b: Tensor) -> Result<Tensor, String> {
    cpu::where_(cond, a, b)
}

/// GPU: `x · c` with `c` a scalar constant is a `Scale` step, which the `fold_embedding_scale`
/// peephole folds into the embedding that writes `x`; no other element-wise op has a kernel.
pub(super) fn lower_mul(n: &mut Nodes, id: NodeId) -> Result<Val, String> {
    let ins = n.graph().nodes[id].inputs.clone();
    let (x, c) = match (n.val(ins[0]), n.val(ins[1])) {
        (Val::Scalar(c), _) => (ins[1], *c),
        (_, Val::Scalar(c)) => (ins[0], *c),
        _ => return Err(n.err(id, "has no GPU kernel (only an embedding times a constant)")),
    };
    let x = n.whole(id, x)?;
    let out = n.new_buf(id, n.buffer(x).rows, BufType::Bf16)?;
    n.push(Step::Scale {
        node: id,
        x,
        c,
        out,
    });
    Ok(n.whole_val(out))
}
