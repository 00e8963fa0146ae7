//! The correspondence between graph ops and e-nodes: [`lower`] reads an e-node back as an
//! [`Op`] with its tensor inputs (attributes come from the attribute children's e-classes),
//! [`raise`] adds the e-node of an op (and its attribute leaves) to an e-graph.

use super::analysis::{Data, KilnGraph};
use super::lang::{Attr, ConstValue, Node};
use egg::Id;
use kiln_runtime::ir::{BinaryOp, Dim, Op, ReduceOp, UnaryOp};

/// What an e-node is, seen from the graph.
#[derive(Clone, Debug, PartialEq)]
pub enum Lowered {
    /// A graph op and the e-classes of its tensor inputs, in the op's input order.
    Op(Op, Vec<Id>),
    /// A weight, step input or constant leaf (emitted by the converter from the leaf tables).
    Leaf,
    /// A helper node: it exists only inside the e-graph.
    Helper,
    /// An attribute leaf.
    Attr,
}

fn attr(data: &dyn Fn(Id) -> Data, id: Id) -> Result<Attr, String> {
    data(id)
        .attr()
        .cloned()
        .ok_or_else(|| "a tensor where an attribute belongs".to_string())
}

fn axis(data: &dyn Fn(Id) -> Data, id: Id) -> Result<usize, String> {
    match attr(data, id)? {
        Attr::Axis(a) => Ok(a),
        other => Err(format!("expected an axis, got {other}")),
    }
}

fn dim(data: &dyn Fn(Id) -> Data, id: Id) -> Result<kiln_runtime::ir::Dim, String> {
    match attr(data, id)? {
        Attr::Dim(d) => Ok(d),
        other => Err(format!("expected a dim, got {other}")),
    }
}

fn ranks(data: &dyn Fn(Id) -> Data, id: Id) -> Result<u32, String> {
    dim(data, id)?
        .as_const()
        .and_then(|r| u32::try_from(r).ok())
        .ok_or_else(|| "a rank count that is not a whole number".to_string())
}

/// The sliding window of an attention whose queries see keys up to `lag` positions back: `inf`
/// is no window (0), a whole `lag ≥ 0` a window of `lag + 1` keys.
fn window_of_lag(lag: f32) -> Result<u32, String> {
    if lag == f32::INFINITY {
        Ok(0)
    } else if lag >= 0.0 && lag.fract() == 0.0 && lag < u32::MAX as f32 {
        Ok(lag as u32 + 1)
    } else {
        Err(format!(
            "attention lag {lag} is not a whole number of positions"
        ))
    }
}

fn scalar(data: &dyn Fn(Id) -> Data, id: Id) -> Result<f32, String> {
    data(id)
        .scalar()
        .ok_or_else(|| "expected a scalar constant".to_string())
}

/// The graph op of an e-node; `data` gives the analysis data of an e-class.
pub fn lower(node: &Node, data: &dyn Fn(Id) -> Data) -> Result<Lowered, String> {
    use Node as N;
    let op = |op: Op, ins: &[Id]| Ok(Lowered::Op(op, ins.to_vec()));
    let reduce = |r: ReduceOp, [x, a, k]: [Id; 3]| {
        let Attr::Keep(keep_dim) = attr(data, k)? else {
            return Err("expected keep/drop".to_string());
        };
        let axis = axis(data, a)?;
        op(
            Op::Reduce {
                op: r,
                axis,
                keep_dim,
            },
            &[x],
        )
    };
    match node {
        N::Const(_) | N::Weight(_) | N::Input(_) => Ok(Lowered::Leaf),
        N::Attr(_) => Ok(Lowered::Attr),
        N::Silu(_) | N::RopeAngles(_) | N::CausalMask(_) | N::WindowMask(_) => Ok(Lowered::Helper),
        N::Neg(x) => op(Op::Unary(UnaryOp::Neg), &[*x]),
        N::Exp(x) => op(Op::Unary(UnaryOp::Exp), &[*x]),
        N::Sqrt(x) => op(Op::Unary(UnaryOp::Sqrt), &[*x]),
        N::Rsqrt(x) => op(Op::Unary(UnaryOp::Rsqrt), &[*x]),
        N::Recip(x) => op(Op::Unary(UnaryOp::Recip), &[*x]),
        N::Sin(x) => op(Op::Unary(UnaryOp::Sin), &[*x]),
        N::Cos(x) => op(Op::Unary(UnaryOp::Cos), &[*x]),
        N::Add(xs) => op(Op::Binary(BinaryOp::Add), xs),
        N::Sub(xs) => op(Op::Binary(BinaryOp::Sub), xs),
        N::Mul(xs) => op(Op::Binary(BinaryOp::Mul), xs),
        N::Div(xs) => op(Op::Binary(BinaryOp::Div), xs),
        N::Pow(xs) => op(Op::Binary(BinaryOp::Pow), xs),
        N::Max(xs) => op(Op::Binary(BinaryOp::Max), xs),
        N::Greater(xs) => op(Op::Binary(BinaryOp::Greater), xs),
        N::Where(xs) => op(Op::Where, xs),
        N::Sum(xs) => reduce(ReduceOp::Sum, *xs),
        N::Mean(xs) => reduce(ReduceOp::Mean, *xs),
        N::ReduceMax(xs) => reduce(ReduceOp::Max, *xs),
        N::Softmax([x, a]) => op(
            Op::Softmax {
                axis: axis(data, *a)?,
            },
            &[*x],
        ),
        N::MatMul(xs) => op(Op::MatMul, xs),
        N::Reshape([x, s]) => match attr(data, *s)? {
            Attr::Shape(shape) => op(Op::Reshape { shape }, &[*x]),
            other => Err(format!("expected a shape, got {other}")),
        },
        N::Transpose([x, p]) => match attr(data, *p)? {
            Attr::Perm(perm) => op(Op::Transpose { perm }, &[*x]),
            other => Err(format!("expected a permutation, got {other}")),
        },
        N::Gather(xs) => op(Op::Gather, xs),
        N::AllReduce([x, r]) => op(
            Op::AllReduce {
                ranks: ranks(data, *r)?,
            },
            &[*x],
        ),
        N::AllGather([x, a, r]) => op(
            Op::AllGather {
                axis: axis(data, *a)?,
                ranks: ranks(data, *r)?,
            },
            &[*x],
        ),
        N::KvQuant([x, d]) => match attr(data, *d)? {
            Attr::DType(format) => op(Op::KvQuant { format }, &[*x]),
            other => Err(format!("expected a dtype, got {other}")),
        },
        N::GatherShard([t, ids, f]) => match dim(data, *f)?.as_const() {
            Some(first) => op(Op::GatherShard { first }, &[*t, *ids]),
            None => Err("a symbolic first row of a gather shard".into()),
        },
        N::Concat(xs) => {
            let (a, ins) = xs.split_first().ok_or("concat without an axis")?;
            op(
                Op::Concat {
                    axis: axis(data, *a)?,
                },
                ins,
            )
        }
        N::Slice([x, a, s, e]) => op(
            Op::Slice {
                axis: axis(data, *a)?,
                start: dim(data, *s)?,
                end: dim(data, *e)?,
            },
            &[*x],
        ),
        N::Cast([x, d]) => match attr(data, *d)? {
            Attr::DType(dtype) => op(Op::Cast { dtype }, &[*x]),
            other => Err(format!("expected a dtype, got {other}")),
        },
        N::Iota(len) => op(
            Op::Iota {
                len: dim(data, *len)?,
            },
            &[],
        ),
        N::RmsNorm([x, w, eps]) => op(
            Op::RmsNorm {
                eps: scalar(data, *eps)?,
            },
            &[*x, *w],
        ),
        N::LayerNorm([x, w, b, eps]) => op(
            Op::LayerNorm {
                eps: scalar(data, *eps)?,
            },
            &[*x, *w, *b],
        ),
        N::GeluTanh(x) => op(Op::GeluTanh, &[*x]),
        N::Linear(xs) => op(Op::Linear, xs),
        N::LinearAdd(xs) => op(Op::LinearAdd, xs),
        N::LinearBias(xs) => op(Op::LinearBias, xs),
        N::GatedMlp(xs) => op(Op::GatedMlp, xs),
        N::GatedGelu(xs) => op(Op::GatedGelu, xs),
        N::Rope([x, pos, freq, a]) => op(
            Op::Rope {
                seq_axis: axis(data, *a)?,
            },
            &[*x, *pos, *freq],
        ),
        N::Softcap([x, cap]) => op(
            Op::Softcap {
                cap: scalar(data, *cap)?,
            },
            &[*x],
        ),
        N::Attention([q, k, v, s, lag, cap]) => op(
            Op::FusedAttention {
                scale: scalar(data, *s)?,
                window: window_of_lag(scalar(data, *lag)?)?,
                softcap: scalar(data, *cap)?,
            },
            &[*q, *k, *v],
        ),
    }
}

/// Adds the e-node of `op` over the tensor-input e-classes `ins` (adding its attribute leaves)
/// and returns its e-class. Leaves (`Input`, `Weight`, `Constant`) are added by the caller.
pub fn raise(eg: &mut KilnGraph, op: &Op, ins: &[Id]) -> Id {
    let mut a = |x: Attr| eg.add(Node::Attr(x));
    let n = match op {
        Op::Input { .. } | Op::Weight { .. } => unreachable!("leaves are added by the converter"),
        Op::Constant { value } => Node::Const(ConstValue::new(*value)),
        Op::Iota { len } => Node::Iota(a(Attr::Dim(len.clone()))),
        Op::Unary(u) => {
            let x = ins[0];
            match u {
                UnaryOp::Neg => Node::Neg(x),
                UnaryOp::Exp => Node::Exp(x),
                UnaryOp::Sqrt => Node::Sqrt(x),
                UnaryOp::Rsqrt => Node::Rsqrt(x),
                UnaryOp::Recip => Node::Recip(x),
                UnaryOp::Sin => Node::Sin(x),
                UnaryOp::Cos => Node::Cos(x),
            }
        }
        Op::Binary(b) => {
            let xs = [ins[0], ins[1]];
            match b {
                BinaryOp::Add => Node::Add(xs),
                BinaryOp::Sub => Node::Sub(xs),
                BinaryOp::Mul => Node::Mul(xs),
                BinaryOp::Div => Node::Div(xs),
                BinaryOp::Pow => Node::Pow(xs),
                BinaryOp::Max => Node::Max(xs),
                BinaryOp::Greater => Node::Greater(xs),
            }
        }
        Op::Where => Node::Where([ins[0], ins[1], ins[2]]),
        Op::Reduce { op, axis, keep_dim } => {
            let xs = [ins[0], a(Attr::Axis(*axis)), a(Attr::Keep(*keep_dim))];
            match op {
                ReduceOp::Sum => Node::Sum(xs),
                ReduceOp::Mean => Node::Mean(xs),
                ReduceOp::Max => Node::ReduceMax(xs),
            }
        }
        Op::Softmax { axis } => Node::Softmax([ins[0], a(Attr::Axis(*axis))]),
        Op::MatMul => Node::MatMul([ins[0], ins[1]]),
        Op::Reshape { shape } => Node::Reshape([ins[0], a(Attr::Shape(shape.clone()))]),
        Op::Transpose { perm } => Node::Transpose([ins[0], a(Attr::Perm(perm.clone()))]),
        Op::Gather => Node::Gather([ins[0], ins[1]]),
        Op::AllReduce { ranks } => {
            Node::AllReduce([ins[0], a(Attr::Dim(Dim::c(i64::from(*ranks))))])
        }
        Op::AllGather { axis, ranks } => Node::AllGather([
            ins[0],
            a(Attr::Axis(*axis)),
            a(Attr::Dim(Dim::c(i64::from(*ranks)))),
        ]),
        Op::KvQuant { format } => Node::KvQuant([ins[0], a(Attr::DType(*format))]),
        Op::GatherShard { first } => {
            Node::GatherShard([ins[0], ins[1], a(Attr::Dim(Dim::c(*first)))])
        }
        Op::Concat { axis } => {
            let mut xs = vec![a(Attr::Axis(*axis))];
            xs.extend_from_slice(ins);
            Node::Concat(xs.into_boxed_slice())
        }
        Op::Slice { axis, start, end } => Node::Slice([
            ins[0],
            a(Attr::Axis(*axis)),
            a(Attr::Dim(start.clone())),
            a(Attr::Dim(end.clone())),
        ]),
        Op::Cast { dtype } => Node::Cast([ins[0], a(Attr::DType(*dtype))]),
        Op::RmsNorm { eps } => {
            let e = eg.add(Node::Const(ConstValue::new(*eps)));
            Node::RmsNorm([ins[0], ins[1], e])
        }
        Op::LayerNorm { eps } => {
            let e = eg.add(Node::Const(ConstValue::new(*eps)));
            Node::LayerNorm([ins[0], ins[1], ins[2], e])
        }
        Op::GeluTanh => Node::GeluTanh(ins[0]),
        Op::Linear => Node::Linear([ins[0], ins[1]]),
        Op::LinearAdd => Node::LinearAdd([ins[0], ins[1], ins[2]]),
        Op::LinearBias => Node::LinearBias([ins[0], ins[1], ins[2]]),
        Op::GatedMlp => Node::GatedMlp([ins[0], ins[1]]),
        Op::GatedGelu => Node::GatedGelu([ins[0], ins[1]]),
        Op::Rope { seq_axis } => {
            let s = eg.add(Node::Attr(Attr::Axis(*seq_axis)));
            Node::Rope([ins[0], ins[1], ins[2], s])
        }
        Op::Softcap { cap } => {
            let c = eg.add(Node::Const(ConstValue::new(*cap)));
            Node::Softcap([ins[0], c])
        }
        Op::FusedAttention {
            scale,
            window,
            softcap,
        } => {
            let s = eg.add(Node::Const(ConstValue::new(*scale)));
            let cap = eg.add(Node::Const(ConstValue::new(*softcap)));
            let lag = match window {
                0 => f32::INFINITY,
                w => (w - 1) as f32,
            };
            let lag = eg.add(Node::Const(ConstValue::new(lag)));
            Node::Attention([ins[0], ins[1], ins[2], s, lag, cap])
        }
    };
    eg.add(n)
}
