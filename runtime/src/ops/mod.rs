//! Every op of the IR in a module of its own (ops that share their rules, like the five products
//! with a weight, share one): its shape and dtype rule, its CPU reference, its cost (arithmetic
//! and device bytes) and its GPU lowering, each a function documented with what it computes.
//!
//! The `Op` enum (`ir/op.rs`) names the ops and their attributes; the four dispatchers below are
//! the one list that hands a node to its op's module — [`infer`] (every graph that is built,
//! loaded or rewritten), [`eval`] (the CPU executor), [`work`] (the rewriter's cost model) and
//! [`lower`] (the GPU lowering) — each an exhaustive `match`, so an op missing from one does not
//! compile. Adding an op: its variant in `Op`, its module here and its lines below, its e-graph
//! node (`kiln_compiler::rewrite::lang`, checked against [`Op::examples`] by the rewriter's
//! tests) and its rules; `docs/adding-an-op.md` walks a real one.

mod attention;
mod cast;
mod collective;
mod concat;
mod elementwise;
mod gather;
pub(crate) mod gelu;
mod kv_quant;
mod layer_norm;
mod leaf;
pub(crate) mod linear;
mod matmul;
mod reduce;
mod rms_norm;
mod rope;
mod softcap;
#[cfg(test)]
mod tests;
mod view;

use crate::cpu::tensor::Tensor;
use crate::ir::{BinaryOp, Dim, NodeId, Op, SymValues, TensorType};
use crate::lower::{Nodes, Val};

/// The output type of `op` on inputs of types `ins` (arity and weight formats already checked
/// by `ir::infer`).
pub(crate) fn infer(op: &Op, ins: &[&TensorType]) -> Result<TensorType, String> {
    match op {
        Op::Input { .. } | Op::Weight { .. } => Err("leaf types are declared, not inferred".into()),
        Op::Constant { value } => leaf::infer_constant(*value),
        Op::Iota { len } => leaf::infer_iota(len),
        Op::Unary(_) => elementwise::infer_unary(op, ins[0]),
        Op::Binary(_) => elementwise::infer_binary(op, ins[0], ins[1]),
        Op::Where => elementwise::infer_where(op, ins[0], ins[1], ins[2]),
        Op::Reduce { axis, keep_dim, .. } => reduce::infer_reduce(*axis, *keep_dim, ins[0]),
        Op::Softmax { axis } => reduce::infer_softmax(*axis, ins[0]),
        Op::MatMul => matmul::infer(ins),
        Op::Reshape { shape } => view::infer_reshape(shape, ins[0]),
        Op::Transpose { perm } => view::infer_transpose(perm, ins[0]),
        Op::Slice { axis, start, end } => view::infer_slice(*axis, start, end, ins[0]),
        Op::Cast { dtype } => cast::infer(*dtype, ins[0]),
        Op::Gather | Op::GatherShard { .. } => gather::infer(ins[0], ins[1]),
        Op::Concat { axis } => concat::infer(*axis, ins),
        Op::AllReduce { ranks } => collective::infer_all_reduce(*ranks, ins[0]),
        Op::AllGather { axis, ranks } => collective::infer_all_gather(*axis, *ranks, ins[0]),
        Op::KvQuant { format } => kv_quant::infer(*format, ins[0]),
        Op::RmsNorm { eps } => rms_norm::infer(*eps, ins[0], ins[1]),
        Op::LayerNorm { eps } => layer_norm::infer(*eps, ins[0], ins[1], ins[2]),
        Op::GeluTanh => gelu::infer(ins[0]),
        Op::Linear | Op::LinearAdd | Op::LinearBias | Op::GatedMlp | Op::GatedGelu => {
            linear::infer(op, ins)
        }
        Op::Rope { seq_axis } => rope::infer(*seq_axis, ins[0], ins[1], ins[2]),
        Op::Softcap { cap } => softcap::infer(*cap, ins[0]),
        Op::FusedAttention { scale, softcap, .. } => {
            attention::infer(op, (*scale, *softcap), ins[0], ins[1], ins[2])
        }
    }
}

/// A symbolic size at the step's symbol values.
fn size(d: &Dim, syms: &SymValues) -> Result<usize, String> {
    let v = d.eval(syms);
    usize::try_from(v).map_err(|_| {
        format!(
            "{d} evaluates to {v} (batch={}, seq={}, past={})",
            syms.batch, syms.seq, syms.past
        )
    })
}

/// The CPU reference: `op` on its input values (arity checked by graph validation).
pub(crate) fn eval(op: &Op, ins: Vec<Tensor>, syms: &SymValues) -> Result<Tensor, String> {
    let mut ins = ins.into_iter();
    let mut next = || {
        ins.next()
            .ok_or_else(|| format!("{} is missing an input", op.name()))
    };
    match op {
        Op::Input { .. } | Op::Weight { .. } => {
            Err("leaf values are supplied, not computed".into())
        }
        Op::Constant { value } => Ok(leaf::eval_constant(*value)),
        Op::Iota { len } => leaf::eval_iota(size(len, syms)?),
        Op::Unary(u) => elementwise::eval_unary(*u, next()?),
        Op::Binary(b) => elementwise::eval_binary(*b, next()?, next()?),
        Op::Where => elementwise::eval_where(next()?, next()?, next()?),
        Op::Reduce { op, axis, keep_dim } => reduce::eval_reduce(*op, *axis, *keep_dim, next()?),
        Op::Softmax { axis } => reduce::eval_softmax(*axis, next()?),
        Op::MatMul => matmul::eval(next()?, next()?),
        Op::Reshape { shape } => {
            let shape = shape
                .iter()
                .map(|d| size(d, syms))
                .collect::<Result<_, _>>()?;
            view::eval_reshape(shape, next()?)
        }
        Op::Transpose { perm } => view::eval_transpose(perm, next()?),
        Op::Slice { axis, start, end } => {
            view::eval_slice(*axis, size(start, syms)?, size(end, syms)?, next()?)
        }
        Op::Cast { dtype } => cast::eval(*dtype, next()?),
        Op::Gather => gather::eval(next()?, next()?),
        Op::GatherShard { first } => gather::eval_shard(next()?, next()?, *first),
        Op::Concat { axis } => concat::eval(*axis, ins.collect()),
        Op::AllReduce { ranks } | Op::AllGather { ranks, .. } => collective::eval(*ranks, next()?),
        Op::KvQuant { format } => kv_quant::eval(*format, next()?),
        Op::RmsNorm { eps } => rms_norm::eval(*eps, next()?, next()?),
        Op::LayerNorm { eps } => layer_norm::eval(*eps, next()?, next()?, next()?),
        Op::GeluTanh => gelu::eval(next()?),
        Op::Linear | Op::LinearAdd | Op::LinearBias | Op::GatedMlp | Op::GatedGelu => {
            linear::eval(op, ins.collect())
        }
        Op::Rope { seq_axis } => rope::eval(*seq_axis, next()?, next()?, next()?),
        Op::Softcap { cap } => softcap::eval(*cap, next()?),
        Op::FusedAttention {
            scale,
            window,
            softcap,
        } => attention::eval(
            next()?,
            next()?,
            next()?,
            *scale,
            *window as usize,
            *softcap,
        ),
    }
}

/// Element counts and bytes of types at given symbol values (the cost model's reference step).
pub struct Sizes<'a> {
    /// The symbol values.
    pub syms: &'a SymValues,
}

impl Sizes<'_> {
    /// A dimension's size (negative sizes count 0).
    pub fn dim(&self, d: &Dim) -> f64 {
        d.eval(self.syms).max(0) as f64
    }
    /// Elements of a value.
    pub fn numel(&self, ty: &TensorType) -> f64 {
        ty.shape.iter().map(|d| self.dim(d)).product()
    }
    /// Bytes of a value in device memory (a weight format's codes with its scales).
    pub fn bytes(&self, ty: &TensorType) -> f64 {
        self.numel(ty) * ty.dtype.bytes_per_element()
    }
}

/// What one kernel of an op does, for the cost model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    /// Floating-point operations.
    pub flops: f64,
    /// Device-memory bytes read (the output's bytes are the cost model's to add).
    pub read: f64,
    /// Bytes sent between GPUs (the collectives).
    pub link: f64,
}

/// The work of `op` run as one kernel on inputs `ins` giving `out`, at the sizes of `s`: every
/// input read once and about 4 flops per output element, unless the op says otherwise.
pub fn work(op: &Op, ins: &[&TensorType], out: &TensorType, s: &Sizes) -> Work {
    let mut w = Work {
        flops: 4.0 * s.numel(out),
        read: ins.iter().map(|t| s.bytes(t)).sum(),
        link: 0.0,
    };
    match op {
        Op::MatMul => w.flops = matmul::flops(s, ins, out),
        Op::Linear | Op::LinearAdd | Op::LinearBias | Op::GatedMlp | Op::GatedGelu => {
            w.flops = linear::flops(s, ins, out)
        }
        Op::FusedAttention { .. } => w.flops = attention::flops(s, ins[0], ins[1]),
        Op::Reduce { .. } | Op::Softmax { .. } => w.flops = reduce::flops(s, ins[0]),
        Op::Gather => w.read = gather::read_bytes(s, ins[1], out),
        Op::AllReduce { ranks } => w.link = collective::link_bytes(s, *ranks, true, out),
        Op::AllGather { ranks, .. } => w.link = collective::link_bytes(s, *ranks, false, out),
        Op::Input { .. }
        | Op::Weight { .. }
        | Op::Constant { .. }
        | Op::Iota { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Where
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Cast { .. }
        | Op::GatherShard { .. }
        | Op::Concat { .. }
        | Op::KvQuant { .. }
        | Op::RmsNorm { .. }
        | Op::LayerNorm { .. }
        | Op::GeluTanh
        | Op::Rope { .. }
        | Op::Softcap { .. } => {}
    }
    w
}

/// The GPU lowering of node `id` (inputs lowered already): a view, a launch or a step for the
/// peepholes; an op with no GPU lowering is an error naming the node.
pub(crate) fn lower(n: &mut Nodes, id: NodeId) -> Result<Val, String> {
    let op = n.graph().nodes[id].op.clone();
    match &op {
        Op::Input { kind } => Ok(leaf::lower_input(*kind)),
        Op::Weight { name } => Ok(Val::Weight(name.clone())),
        Op::Constant { value } => Ok(Val::Scalar(*value)),
        // Position arithmetic: the kernels read positions from the step's metadata.
        Op::Iota { .. } => Ok(Val::Host),
        Op::Gather => gather::lower(n, id),
        Op::RmsNorm { eps } => rms_norm::lower(n, id, *eps),
        Op::Linear | Op::LinearAdd | Op::LinearBias | Op::GatedMlp | Op::GatedGelu => {
            linear::lower(n, id)
        }
        Op::Reshape { .. } | Op::Transpose { .. } | Op::Cast { .. } => view::lower_same(n, id),
        Op::Slice { axis, start, end } => view::lower_slice(n, id, *axis, start, end),
        Op::Rope { .. } => rope::lower(n, id),
        Op::Concat { .. } => concat::lower(n, id),
        Op::FusedAttention {
            scale,
            window,
            softcap,
        } => attention::lower(n, id, (*scale, *window, *softcap)),
        Op::Binary(BinaryOp::Mul) => elementwise::lower_mul(n, id),
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Where
        | Op::Reduce { .. }
        | Op::Softmax { .. }
        | Op::MatMul
        | Op::GatherShard { .. }
        | Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::KvQuant { .. }
        | Op::LayerNorm { .. }
        | Op::GeluTanh
        | Op::Softcap { .. } => Err(n.err(
            id,
            "has no GPU kernel: the GPU backend runs the fused ops of Llama-shaped layers (with \
             the rewriter on); build this model for the CPU (--target cpu)",
        )),
    }
}
