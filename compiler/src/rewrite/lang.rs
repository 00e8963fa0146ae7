//! The e-graph language: one e-node per graph op (primitive and fused), plus leaves for weights,
//! inputs, scalar constants and attributes, plus a few *helper* nodes that exist only inside the
//! e-graph to keep rules short (they never reach an extracted graph).
//!
//! An op's non-tensor parameters (axes, permutations, shapes, slice bounds, dtypes) are leaf
//! children of kind [`Attr`], so that rules can match and build them like any other child:
//! `(transpose ?w perm:[1,0])`, `(slice ?x axis:2 dim:0 dim:576)`, `(cast ?x dtype:bf16)`. A fused
//! op's float parameter (`eps`, `theta`, `scale`) is the scalar-constant child it was matched
//! from, e.g. `(rmsnorm ?x ?w ?eps)` with `?eps` the class of `Const(1e-5)`.
//!
//! Leaf spellings: weights `@model.layers.0.mlp.up_proj.weight`, inputs `$layers.0.k_cache`
//! (the input node's name), constants as `f32` text (`1`, `-inf`, `0.00001`), attributes
//! `axis:2`, `keep`/`drop`, `perm:[0,2,1,3]`, `shape:[batch,seq,9,64]`, `dim:seq+past`,
//! `dtype:bf16`.

use egg::{define_language, Id, Symbol};
use kiln_runtime::ir::{DType, Dim, Sym};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

define_language! {
    /// An e-node: a graph op over e-class children, or a leaf.
    pub enum Node {
        "neg" = Neg(Id),
        "exp" = Exp(Id),
        "sqrt" = Sqrt(Id),
        "rsqrt" = Rsqrt(Id),
        "recip" = Recip(Id),
        "sin" = Sin(Id),
        "cos" = Cos(Id),
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "pow" = Pow([Id; 2]),
        "max" = Max([Id; 2]),
        "gt" = Greater([Id; 2]),
        // [cond, a, b]
        "where" = Where([Id; 3]),
        // [x, axis, keep]
        "sum" = Sum([Id; 3]),
        "mean" = Mean([Id; 3]),
        "rmax" = ReduceMax([Id; 3]),
        // [x, axis]
        "softmax" = Softmax([Id; 2]),
        "matmul" = MatMul([Id; 2]),
        // [x, shape]
        "reshape" = Reshape([Id; 2]),
        // [x, perm]
        "transpose" = Transpose([Id; 2]),
        // [table, ids]
        "gather" = Gather([Id; 2]),
        // [axis, x0, x1, …]
        "concat" = Concat(Box<[Id]>),
        // [x, axis, start, end]
        "slice" = Slice([Id; 4]),
        // [x, dtype]
        "cast" = Cast([Id; 2]),
        // [len]
        "iota" = Iota(Id),
        // Collectives and shards of a tensor-parallel rank. [x, dim:ranks]
        "all_reduce" = AllReduce([Id; 2]),
        // [x, axis, dim:ranks]
        "all_gather" = AllGather([Id; 3]),
        // [table, ids, dim:first]
        "gather_shard" = GatherShard([Id; 3]),
        // A quantized KV cache's rounding. [x, dtype:int8|fp8]
        "kv_quant" = KvQuant([Id; 2]),
        // Fused ops. [x, w, eps]
        "rmsnorm" = RmsNorm([Id; 3]),
        // [x, w, b, eps]
        "layer_norm" = LayerNorm([Id; 4]),
        // [x, w]
        "linear" = Linear([Id; 2]),
        // [x, w, residual]
        "linear_add" = LinearAdd([Id; 3]),
        // [x, w, bias]
        "linear_bias" = LinearBias([Id; 3]),
        // [x, w_gate_up]
        "gated_mlp" = GatedMlp([Id; 2]),
        // [x, w_gate_up]
        "gated_gelu" = GatedGelu([Id; 2]),
        // [x, pos, inv_freq, seq_axis]
        "rope" = Rope([Id; 4]),
        // [q, k, v, scale, lag, softcap]: keys up to `lag` positions back are seen (`inf`: all,
        // causal); scores soft-capped at `softcap` (0: none)
        "attention" = Attention([Id; 6]),
        // cap · tanh(x / cap), cap a scalar: [x, cap] (Gemma-2's final-logit soft-cap).
        "softcap" = Softcap([Id; 2]),
        // gelu_tanh(g) = g · σ(2√(2/π)·(g + 0.044715·g³)): [x]
        "gelu_tanh" = GeluTanh(Id),
        // Helpers (never extracted). silu(g) = g · σ(g).
        "silu" = Silu(Id),

        // RoPE angle table [s, 2·half] of positions `pos`: `pos · inv_freq`, twice: [pos, inv_freq]
        "rope_angles" = RopeAngles([Id; 2]),
        // Causal mask [s, t]: -inf where key j > pos[i], else 0: [pos, t]
        "causal_mask" = CausalMask([Id; 2]),
        // Sliding-window mask [s, t]: causal_mask, and -inf where pos[i] - j > lag: [pos, t, lag]
        "window_mask" = WindowMask([Id; 3]),
        Const(ConstValue),
        Weight(WeightName),
        Input(InputName),
        Attr(Attr),
    }
}

/// A scalar `f32` constant, stored as its bits so that it can be hashed and ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConstValue(pub u32);

impl ConstValue {
    /// The constant of this value.
    pub fn new(v: f32) -> ConstValue {
        ConstValue(v.to_bits())
    }
    /// Its value.
    pub fn value(self) -> f32 {
        f32::from_bits(self.0)
    }
}

impl fmt::Display for ConstValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value())
    }
}

impl FromStr for ConstValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<f32>()
            .map(ConstValue::new)
            .map_err(|_| format!("`{s}` is not a constant"))
    }
}

/// A checkpoint (or derived) weight by name: `@name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WeightName(pub Symbol);

impl fmt::Display for WeightName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

impl FromStr for WeightName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.strip_prefix('@')
            .map(|n| WeightName(Symbol::from(n)))
            .ok_or_else(|| format!("`{s}` is not a weight"))
    }
}

/// A step input (tokens, positions or a state) by its node name: `$name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InputName(pub Symbol);

impl fmt::Display for InputName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}", self.0)
    }
}

impl FromStr for InputName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.strip_prefix('$')
            .map(|n| InputName(Symbol::from(n)))
            .ok_or_else(|| format!("`{s}` is not an input"))
    }
}

/// A non-tensor parameter of an op.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Attr {
    /// An axis (non-negative): `axis:2`.
    Axis(usize),
    /// Whether a reduction keeps its axis: `keep` / `drop`.
    Keep(bool),
    /// An axis permutation: `perm:[0,2,1,3]`.
    Perm(Vec<usize>),
    /// A shape: `shape:[batch,seq,9,64]`.
    Shape(Vec<Dim>),
    /// One size or index: `dim:32`, `dim:seq+past`.
    Dim(Dim),
    /// An element type: `dtype:bf16`.
    DType(DType),
}

impl Attr {
    fn rank(&self) -> u8 {
        match self {
            Attr::Axis(_) => 0,
            Attr::Keep(_) => 1,
            Attr::Perm(_) => 2,
            Attr::Shape(_) => 3,
            Attr::Dim(_) => 4,
            Attr::DType(_) => 5,
        }
    }
}

impl PartialOrd for Attr {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Attr {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Attr::Axis(a), Attr::Axis(b)) => a.cmp(b),
            (Attr::Keep(a), Attr::Keep(b)) => a.cmp(b),
            (Attr::Perm(a), Attr::Perm(b)) => a.cmp(b),
            (Attr::Shape(a), Attr::Shape(b)) => a.cmp(b),
            (Attr::Dim(a), Attr::Dim(b)) => a.cmp(b),
            (Attr::DType(a), Attr::DType(b)) => a.name().cmp(b.name()),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

fn join<T: fmt::Display>(xs: &[T]) -> String {
    let parts: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(","))
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Axis(a) => write!(f, "axis:{a}"),
            Attr::Keep(k) => f.write_str(if *k { "keep" } else { "drop" }),
            Attr::Perm(p) => write!(f, "perm:{}", join(p)),
            Attr::Shape(s) => write!(f, "shape:{}", join(s)),
            Attr::Dim(d) => write!(f, "dim:{d}"),
            Attr::DType(d) => write!(f, "dtype:{}", d.name()),
        }
    }
}

/// Parses a dimension as printed by `Dim`'s `Display`: `32`, `seq`, `seq+past`, `2*seq-1`.
pub fn parse_dim(s: &str) -> Result<Dim, String> {
    let bad = || format!("`{s}` is not a dimension");
    let mut total = Dim::c(0);
    let mut rest = s;
    let mut sign = 1;
    if let Some(r) = rest.strip_prefix('-') {
        sign = -1;
        rest = r;
    }
    loop {
        let end = rest.find(['+', '-']).unwrap_or(rest.len());
        let (term, tail) = rest.split_at(end);
        let (coef, name) = match term.split_once('*') {
            Some((c, n)) => (c.parse::<i64>().map_err(|_| bad())?, n),
            None => (1, term),
        };
        let value = match name {
            "batch" => Dim::sym(Sym::Batch).scale(coef),
            "seq" => Dim::sym(Sym::Seq).scale(coef),
            "past" => Dim::sym(Sym::Past).scale(coef),
            n => Dim::c(coef * n.parse::<i64>().map_err(|_| bad())?),
        };
        total = total.add(&value.scale(sign));
        if tail.is_empty() {
            return Ok(total);
        }
        sign = if tail.starts_with('-') { -1 } else { 1 };
        rest = &tail[1..];
    }
}

fn parse_list<T>(s: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| format!("`{s}` is not a [list]"))?;
    if inner.is_empty() {
        return Ok(vec![]);
    }
    inner.split(',').map(item).collect()
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::from_name(s).ok_or_else(|| format!("`{s}` is not a dtype"))
}

impl FromStr for Attr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.parse::<usize>()
                .map_err(|_| format!("`{t}` is not an index"))
        };
        Ok(match s.split_once(':') {
            Some(("axis", a)) => Attr::Axis(num(a)?),
            Some(("perm", p)) => Attr::Perm(parse_list(p, num)?),
            Some(("shape", p)) => Attr::Shape(parse_list(p, parse_dim)?),
            Some(("dim", d)) => Attr::Dim(parse_dim(d)?),
            Some(("dtype", d)) => Attr::DType(parse_dtype(d)?),
            None if s == "keep" => Attr::Keep(true),
            None if s == "drop" => Attr::Keep(false),
            _ => return Err(format!("`{s}` is not an attribute")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_print_and_parse_back() {
        let kv = Dim::sym(Sym::Past).add(&Dim::sym(Sym::Seq));
        let attrs = [
            Attr::Axis(3),
            Attr::Keep(true),
            Attr::Keep(false),
            Attr::Perm(vec![0, 2, 1, 3]),
            Attr::Shape(vec![Dim::sym(Sym::Batch), kv.clone(), Dim::c(64)]),
            Attr::Dim(Dim::sym(Sym::Seq).scale(2).sub(&Dim::c(1))),
            Attr::Dim(Dim::c(-3)),
            Attr::DType(DType::BF16),
        ];
        for a in attrs {
            let text = a.to_string();
            assert_eq!(text.parse::<Attr>().unwrap(), a, "{text}");
        }
        let pattern: egg::Pattern<Node> = "(slice (cast ?x dtype:bf16) axis:2 dim:0 dim:seq+past)"
            .parse()
            .unwrap();
        assert_eq!(
            pattern.to_string(),
            "(slice (cast ?x dtype:bf16) axis:2 dim:0 dim:seq+past)"
        );
        let e: egg::RecExpr<Node> = "(mul @w (add $tokens -inf))".parse().unwrap();
        assert_eq!(e.to_string(), "(mul @w (add $tokens -inf))");
    }
}
