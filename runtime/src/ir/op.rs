//! The primitive op set of a kiln graph. Every model family is written with these; fused ops
//! found by the rewriter are added beside them. Shape rules live in `infer.rs`.

use super::dim::Dim;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of a tensor.
///
/// Besides the compute types, a weight read by a linear op (`Linear`, `LinearAdd`, `LinearBias`,
/// `GatedMlp`) may have a *weight format*: a quantized storage that the op dequantizes as it
/// reads it (`runtime/src/quant.rs` defines each format's layout and arithmetic). The precision
/// rules choose them (`kiln build --quant`); no other op reads or produces them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer (token ids, positions).
    I32,
    /// Boolean (results of comparisons).
    Bool,
    /// Weight format: int8, symmetric, one f32 scale per output row (W8A16).
    Int8,
    /// Weight format: int4 in groups of `group` consecutive input columns, one f16 scale per
    /// group, with a u8 zero point per group (asymmetric) or the fixed zero 8 (symmetric).
    Int4 {
        /// Input columns per scale: 32, 64 or 128 ([`INT4_GROUPS`]).
        group: u16,
        /// Asymmetric, with a zero point per group.
        zero_point: bool,
    },
    /// Weight format: FP8 E4M3 (NVIDIA's `e4m3fn`: no infinities, largest value 448), one f32
    /// scale per output row. Read in W8A8: a linear op with an fp8 weight rounds its
    /// activations to E4M3 too, with one dynamic scale per row (token), as an FP8 GEMM does.
    Fp8,
    /// Weight format: activation-aware int4 (AWQ): `Int4` with zero points, of the weight with
    /// each input column `c` multiplied by a calibrated factor `s[c]`, which the product divides
    /// back out (an f32 vector `[k]` stored beside the codes).
    Int4Awq {
        /// Input columns per scale: 32, 64 or 128 ([`INT4_GROUPS`]).
        group: u16,
    },
    /// Weight format: int8 in groups of `group` consecutive input columns, one f16 scale per
    /// group (llama.cpp's Q8_0 at group 32).
    Int8Group {
        /// Input columns per scale: 32, 64 or 128 ([`INT4_GROUPS`]).
        group: u16,
    },
    /// Weight format: int4 codes `0..=15` in groups of `group` consecutive input columns, an f16
    /// scale and an f16 minimum per group, `w = q · scale + min` (llama.cpp's Q4_1 at group 32).
    Int4Min {
        /// Input columns per scale: 32, 64 or 128 ([`INT4_GROUPS`]).
        group: u16,
    },
}

/// The group sizes an `Int4` weight format may have.
pub const INT4_GROUPS: [u16; 3] = [32, 64, 128];

impl DType {
    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
    /// Bytes per element in device memory: a weight format's codes with its scales (and zero
    /// points or minimums) spread over them (an int8 row's one scale is negligible).
    pub fn bytes_per_element(self) -> f64 {
        match self {
            DType::F32 | DType::I32 => 4.0,
            DType::F16 | DType::BF16 => 2.0,
            DType::Bool | DType::Int8 | DType::Fp8 => 1.0,
            DType::Int4 { group, zero_point } => {
                0.5 + (2.0 + f64::from(u8::from(zero_point))) / f64::from(group)
            }
            DType::Int4Awq { group } => 0.5 + 3.0 / f64::from(group),
            DType::Int8Group { group } => 1.0 + 2.0 / f64::from(group),
            DType::Int4Min { group } => 0.5 + 4.0 / f64::from(group),
        }
    }
    /// True for the weight formats (quantized weights read by linear ops).
    pub fn is_weight_format(self) -> bool {
        matches!(
            self,
            DType::Int8
                | DType::Fp8
                | DType::Int4 { .. }
                | DType::Int4Awq { .. }
                | DType::Int8Group { .. }
                | DType::Int4Min { .. }
        )
    }
    /// Lower-case name (`f32`, `bf16`, `int8`, `int4g128` (symmetric), `int4g128z` (with zero
    /// points), `int8g32` (grouped int8), `int4g32m` (int4 with a minimum), ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::Bool => "bool",
            DType::Int8 => "int8",
            DType::Fp8 => "fp8",
            DType::Int4 { group, zero_point } => match (group, zero_point) {
                (32, false) => "int4g32",
                (64, false) => "int4g64",
                (128, false) => "int4g128",
                (32, true) => "int4g32z",
                (64, true) => "int4g64z",
                (128, true) => "int4g128z",
                _ => "int4(unsupported group)",
            },
            DType::Int4Awq { group } => match group {
                32 => "int4g32awq",
                64 => "int4g64awq",
                128 => "int4g128awq",
                _ => "int4awq(unsupported group)",
            },
            DType::Int8Group { group } => match group {
                32 => "int8g32",
                64 => "int8g64",
                128 => "int8g128",
                _ => "int8g(unsupported group)",
            },
            DType::Int4Min { group } => match group {
                32 => "int4g32m",
                64 => "int4g64m",
                128 => "int4g128m",
                _ => "int4m(unsupported group)",
            },
        }
    }
    /// The dtype named `s` (the inverse of [`DType::name`]).
    pub fn from_name(s: &str) -> Option<DType> {
        Some(match s {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "i32" => DType::I32,
            "bool" => DType::Bool,
            "int8" => DType::Int8,
            "fp8" => DType::Fp8,
            _ => {
                let group_of = |digits: &str| {
                    digits
                        .parse::<u16>()
                        .ok()
                        .filter(|g| INT4_GROUPS.contains(g))
                };
                if let Some(digits) = s.strip_prefix("int8g") {
                    return group_of(digits).map(|group| DType::Int8Group { group });
                }
                let rest = s.strip_prefix("int4g")?;
                if let Some(digits) = rest.strip_suffix('m') {
                    return group_of(digits).map(|group| DType::Int4Min { group });
                }
                if let Some(digits) = rest.strip_suffix("awq") {
                    let group: u16 = digits.parse().ok()?;
                    return INT4_GROUPS
                        .contains(&group)
                        .then_some(DType::Int4Awq { group });
                }
                let (digits, zero_point) = match rest.strip_suffix('z') {
                    Some(d) => (d, true),
                    None => (rest, false),
                };
                let group: u16 = digits.parse().ok()?;
                if !INT4_GROUPS.contains(&group) {
                    return None;
                }
                DType::Int4 { group, zero_point }
            }
        })
    }
}

/// What a graph input carries; the executor fills each kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InputKind {
    /// Token ids of the new tokens, `[batch, seq]` i32.
    Tokens,
    /// Absolute positions of the new tokens, `[seq]` i32 (`past .. past+seq`).
    Positions,
    /// A recurrent state (a KV cache); its next value is the graph's `State::update` node.
    State,
    /// A value the previous pipeline stage computed (`kiln build --pp`): the output of that
    /// stage named like this node, supplied by the caller with the step.
    Activation,
}

/// Element-wise functions of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnaryOp {
    /// `-x`
    Neg,
    /// `e^x`
    Exp,
    /// `√x`
    Sqrt,
    /// `1/√x`
    Rsqrt,
    /// `1/x`
    Recip,
    /// `sin x`
    Sin,
    /// `cos x`
    Cos,
}

/// Element-wise functions of two tensors, with numpy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a · b`
    Mul,
    /// `a / b`
    Div,
    /// `a ^ b`
    Pow,
    /// `max(a, b)`
    Max,
    /// `a > b` (bool)
    Greater,
}

/// Reductions along one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    /// Σ
    Sum,
    /// arithmetic mean
    Mean,
    /// maximum
    Max,
}

/// One operation of the graph. Inputs are the node's `inputs`, in the order documented here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A value supplied per step (no inputs).
    Input {
        /// What it carries.
        kind: InputKind,
    },
    /// A checkpoint tensor, by its checkpoint name (no inputs).
    Weight {
        /// Checkpoint name, e.g. `model.layers.3.self_attn.q_proj.weight`.
        name: String,
    },
    /// A scalar constant of shape `[]` (no inputs).
    Constant {
        /// The value.
        value: f32,
    },
    /// `[0, 1, …, len-1]` as i32 (no inputs).
    Iota {
        /// The length.
        len: Dim,
    },
    /// Element-wise unary function of `[x]`.
    Unary(UnaryOp),
    /// Element-wise binary function of `[a, b]`, broadcasting.
    Binary(BinaryOp),
    /// `[cond, a, b]` → `cond ? a : b`, broadcasting.
    Where,
    /// Reduction of `[x]` along `axis`, keeping it as size 1 when `keep_dim`.
    Reduce {
        /// Which reduction.
        op: ReduceOp,
        /// Axis (non-negative).
        axis: usize,
        /// Keep the reduced axis with size 1.
        keep_dim: bool,
    },
    /// Softmax of `[x]` along `axis`.
    Softmax {
        /// Axis (non-negative).
        axis: usize,
    },
    /// `[a, b]`: `a[…, m, k] · b[…, k, n]`, leading dims broadcast.
    MatMul,
    /// Reshape of `[x]` to `shape` (same element count).
    Reshape {
        /// Target shape.
        shape: Vec<Dim>,
    },
    /// Axis permutation of `[x]`: output axis `i` is input axis `perm[i]`.
    Transpose {
        /// The permutation.
        perm: Vec<usize>,
    },
    /// `[table, ids]`: rows of `table` (axis 0) picked by integer `ids` → `ids.shape ++ table.shape[1..]`.
    Gather,
    /// Concatenation of all inputs along `axis`.
    Concat {
        /// Axis (non-negative).
        axis: usize,
    },
    /// `[x]` restricted to `start..end` along `axis`.
    Slice {
        /// Axis (non-negative).
        axis: usize,
        /// First index kept.
        start: Dim,
        /// One past the last index kept.
        end: Dim,
    },
    /// Conversion of `[x]` to `dtype`.
    Cast {
        /// Target type.
        dtype: DType,
    },

    // ---- Collectives and shards: introduced by the sharding pass (`kiln build --tp`). ----
    /// `[x]` → the element-wise sum of `x` over the `ranks` ranks of a tensor-parallel group
    /// (every rank gets the same result; row-parallel products end in one).
    AllReduce {
        /// Ranks in the group.
        ranks: u32,
    },
    /// `[x]` → the concatenation along `axis` of every rank's `x`, in rank order (column-split
    /// logits become whole).
    AllGather {
        /// The axis the pieces are joined along.
        axis: usize,
        /// Ranks in the group.
        ranks: u32,
    },
    /// `[table[r, …], ids]` → one rank's share of a vocabulary-parallel embedding: row
    /// `id - first` of `table` for ids in `first..first + r`, zeros for every other id (the sum
    /// over the ranks is the whole `Gather`).
    GatherShard {
        /// The vocabulary id of the table's first row.
        first: i64,
    },

    // ---- Cache formats: introduced by `kiln build --kv-cache`. ----
    /// `[x[…, d]]` → `x` as a quantized KV cache holds it: each vector along the last axis (one
    /// head of one token) rounded to `format` (`Int8`: codes in -127..=127, `Fp8`: E4M3) with
    /// its own scale `max|vector| / 127` (`/ 448`), then scaled back.
    KvQuant {
        /// `Int8` or `Fp8`.
        format: DType,
    },

    // ---- Fused ops: introduced by the rewriter, never written in model files. ----
    /// `[x[…, h], w[h]]` → `x / √(mean(x², last axis) + eps) · w`; statistics in f32.
    RmsNorm {
        /// Added to the mean square.
        eps: f32,
    },
    /// `[x[…, h], w[h], b[h]]` → `(x − mean(x)) / √(var(x) + eps) · w + b` over the last axis
    /// (LayerNorm: GPT-2); statistics in f32.
    LayerNorm {
        /// Added to the variance.
        eps: f32,
    },
    /// `[x]` → `x · σ(2√(2/π) · (x + 0.044715 · x³))`, element-wise: GELU's tanh approximation
    /// (GPT-2's MLP activation; Gemma's gated one is `GatedGelu`).
    GeluTanh,
    /// `[x[…, k], w[n, k]]` → `x · wᵀ` (`w` in checkpoint layout, `[out, in]`).
    Linear,
    /// `[x[…, k], w[n, k], r[…, n]]` → `x · wᵀ + r` (a GEMM with a residual-add epilogue).
    LinearAdd,
    /// `[x[…, k], w[n, k], b[n]]` → `x · wᵀ + b` (a GEMM with a bias epilogue: Qwen2's q/k/v).
    LinearBias,
    /// `[x[…, k], w[2f, k]]` → `silu(x · w[0..f]ᵀ) ⊙ (x · w[f..2f]ᵀ)`: gate and up projections
    /// as one GEMM over the stacked weight, with a SiLU·mul epilogue.
    GatedMlp,
    /// `[x[…, k], w[2f, k]]` → `gelu(x · w[0..f]ᵀ) ⊙ (x · w[f..2f]ᵀ)` with GELU's tanh
    /// approximation `gelu(g) = g · σ(2√(2/π) · (g + 0.044715 · g³))` (GeGLU: Gemma's MLP), as
    /// `GatedMlp` with a GELU·mul epilogue.
    GatedGelu,
    /// `[x[…, d], pos[s], inv_freq[d/2]]` → rotary embedding of `x` over its last axis (HF
    /// "rotate_half" pairing `(i, i + d/2)`), angle `pos · inv_freq[i]` in f32; axis `seq_axis`
    /// of `x` has length `s` and is indexed by `pos`. `inv_freq` is whatever table the model
    /// file computes (plain `theta^(-2i/d)`, linear or Llama-3 scaling, …): a constant f32
    /// vector, stored in the engine as a weight.
    Rope {
        /// The axis of `x` that `pos` indexes.
        seq_axis: usize,
    },
    /// `[x]` → `cap · tanh(x / cap)`, element-wise (Gemma-2's final-logit soft-cap; its
    /// attention scores' cap is part of `FusedAttention`).
    Softcap {
        /// The cap, a positive number.
        cap: f32,
    },
    /// `[q[b, h, s, d], k[b, kh, t, d], v[b, kh, t, d]]` → `softmax(cap(q·kᵀ·scale) + mask)·v`,
    /// `[b, h, s, d]`, `cap(x) = softcap · tanh(x / softcap)` (Gemma-2's logit soft-cap; the
    /// identity when `softcap` is 0). Query `i` sits at absolute position `p = t - s + i` and
    /// sees keys `0..=p` (causal), or with a sliding window `w > 0` only the `w` most recent of
    /// them, `p-w+1..=p` (Mistral). Grouped-query: query head `j` reads KV head `j / (h / kh)`.
    FusedAttention {
        /// Multiplies the scores (usually `1/√d`).
        scale: f32,
        /// Sliding window: how many keys up to its own position a query sees (0: all).
        window: u32,
        /// Soft-cap of the scaled scores (0: none).
        #[serde(default)]
        softcap: f32,
    },
}

impl Op {
    /// True for the collectives (`AllReduce`, `AllGather`): they exchange data between ranks at
    /// run time, so they are never evaluated at build time, even over weights.
    pub fn is_collective(&self) -> bool {
        matches!(self, Op::AllReduce { .. } | Op::AllGather { .. })
    }

    /// How many inputs the op takes (`None`: one or more, `Concat`).
    pub fn arity(&self) -> Option<usize> {
        Some(match self {
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Iota { .. } => 0,
            Op::Unary(_) | Op::Reduce { .. } | Op::Softmax { .. } | Op::Reshape { .. } => 1,
            Op::Transpose { .. } | Op::Slice { .. } | Op::Cast { .. } => 1,
            Op::AllReduce { .. } | Op::AllGather { .. } | Op::KvQuant { .. } => 1,
            Op::Softcap { .. } | Op::GeluTanh => 1,
            Op::Binary(_) | Op::MatMul | Op::Gather | Op::GatherShard { .. } => 2,
            Op::RmsNorm { .. } | Op::Linear | Op::GatedMlp | Op::GatedGelu => 2,
            Op::Where
            | Op::LayerNorm { .. }
            | Op::LinearAdd
            | Op::LinearBias
            | Op::FusedAttention { .. }
            | Op::Rope { .. } => 3,
            Op::Concat { .. } => return None,
        })
    }

    /// True if the op's result depends on no run-time symbol and no step (given inputs that do
    /// not): what the CPU executor evaluates at load time and the cost model counts as a
    /// build-time weight when all its inputs are weights or constants. Step inputs and the
    /// collectives (which exchange data at run time) are not.
    pub fn is_static(&self) -> bool {
        match self {
            Op::Input { .. } | Op::AllReduce { .. } | Op::AllGather { .. } => false,
            Op::Iota { len } => len.as_const().is_some(),
            Op::Reshape { shape } => shape.iter().all(|d| d.as_const().is_some()),
            Op::Slice { start, end, .. } => start.as_const().is_some() && end.as_const().is_some(),
            _ => true,
        }
    }

    /// One op of every kind (every variant, every unary, binary and reduction function), with
    /// representative attributes: the list that the rewriter's e-graph language is checked
    /// against.
    pub fn examples() -> Vec<Op> {
        let mut ops = vec![
            Op::Input {
                kind: InputKind::Tokens,
            },
            Op::Weight { name: "w".into() },
            Op::Constant { value: 0.5 },
            Op::Iota { len: Dim::c(4) },
            Op::Where,
            Op::Softmax { axis: 1 },
            Op::MatMul,
            Op::Reshape {
                shape: vec![Dim::c(2), Dim::c(3)],
            },
            Op::Transpose { perm: vec![1, 0] },
            Op::Gather,
            Op::Concat { axis: 0 },
            Op::Slice {
                axis: 1,
                start: Dim::c(1),
                end: Dim::c(3),
            },
            Op::Cast { dtype: DType::BF16 },
            Op::AllReduce { ranks: 2 },
            Op::AllGather { axis: 1, ranks: 2 },
            Op::GatherShard { first: 8 },
            Op::KvQuant { format: DType::Fp8 },
            Op::RmsNorm { eps: 1e-5 },
            Op::LayerNorm { eps: 1e-5 },
            Op::GeluTanh,
            Op::Linear,
            Op::LinearAdd,
            Op::LinearBias,
            Op::GatedMlp,
            Op::GatedGelu,
            Op::Rope { seq_axis: 2 },
            Op::Softcap { cap: 30.0 },
            Op::FusedAttention {
                scale: 0.125,
                window: 4,
                softcap: 30.0,
            },
        ];
        use BinaryOp as B;
        use ReduceOp as R;
        use UnaryOp as U;
        ops.extend([U::Neg, U::Exp, U::Sqrt, U::Rsqrt, U::Recip, U::Sin, U::Cos].map(Op::Unary));
        ops.extend([B::Add, B::Sub, B::Mul, B::Div, B::Pow, B::Max, B::Greater].map(Op::Binary));
        ops.extend([R::Sum, R::Mean, R::Max].map(|op| Op::Reduce {
            op,
            axis: 1,
            keep_dim: true,
        }));
        ops
    }

    /// True for the products with a weight (`x · wᵀ` and its fused epilogues): the ops whose
    /// second input may be a weight format, whose norm input folds into the GEMV, and which
    /// calibration observes.
    pub fn is_linear(&self) -> bool {
        matches!(
            self,
            Op::Linear | Op::LinearAdd | Op::LinearBias | Op::GatedMlp | Op::GatedGelu
        )
    }

    /// The op's name as written in model files (`MatMul`, `Add`, ...).
    pub fn name(&self) -> String {
        match self {
            Op::Unary(u) => format!("{u:?}"),
            Op::Binary(b) => format!("{b:?}"),
            Op::Reduce { op, .. } => format!("{op:?}"),
            other => {
                let s = format!("{other:?}");
                s.split([' ', '(', '{'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            }
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Input { kind } => write!(f, "Input({kind:?})"),
            Op::Weight { name } => write!(f, "Weight({name})"),
            Op::Constant { value } => write!(f, "Constant({value})"),
            Op::Iota { len } => write!(f, "Iota({len})"),
            Op::Reduce { op, axis, keep_dim } => {
                write!(
                    f,
                    "{op:?}(axis={axis}{})",
                    if *keep_dim { ", keep" } else { "" }
                )
            }
            Op::Softmax { axis } => write!(f, "Softmax(axis={axis})"),
            Op::Reshape { shape } => write!(f, "Reshape({})", super::dim::fmt_shape(shape)),
            Op::Transpose { perm } => write!(f, "Transpose({perm:?})"),
            Op::Concat { axis } => write!(f, "Concat(axis={axis})"),
            Op::Slice { axis, start, end } => write!(f, "Slice(axis={axis}, {start}..{end})"),
            Op::Cast { dtype } => write!(f, "Cast({})", dtype.name()),
            Op::AllReduce { ranks } => write!(f, "AllReduce(ranks={ranks})"),
            Op::AllGather { axis, ranks } => write!(f, "AllGather(axis={axis}, ranks={ranks})"),
            Op::GatherShard { first } => write!(f, "GatherShard(first={first})"),
            Op::KvQuant { format } => write!(f, "KvQuant({})", format.name()),
            Op::RmsNorm { eps } => write!(f, "RmsNorm(eps={eps:e})"),
            Op::LayerNorm { eps } => write!(f, "LayerNorm(eps={eps:e})"),
            Op::Rope { seq_axis } => write!(f, "Rope(seq_axis={seq_axis})"),
            Op::Softcap { cap } => write!(f, "Softcap({cap})"),
            Op::FusedAttention {
                scale,
                window,
                softcap,
            } => {
                write!(f, "FusedAttention(scale={scale}")?;
                if *window > 0 {
                    write!(f, ", window={window}")?;
                }
                if *softcap > 0.0 {
                    write!(f, ", softcap={softcap}")?;
                }
                write!(f, ")")
            }
            other => write!(f, "{}", other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Op::examples` holds every variant: the index of each variant (an exhaustive match, so
    /// a new variant fails to compile here until it is listed) is covered.
    #[test]
    fn examples_cover_every_variant() {
        fn index(op: &Op) -> usize {
            match op {
                Op::Input { .. } => 0,
                Op::Weight { .. } => 1,
                Op::Constant { .. } => 2,
                Op::Iota { .. } => 3,
                Op::Unary(_) => 4,
                Op::Binary(_) => 5,
                Op::Where => 6,
                Op::Reduce { .. } => 7,
                Op::Softmax { .. } => 8,
                Op::MatMul => 9,
                Op::Reshape { .. } => 10,
                Op::Transpose { .. } => 11,
                Op::Gather => 12,
                Op::Concat { .. } => 13,
                Op::Slice { .. } => 14,
                Op::Cast { .. } => 15,
                Op::AllReduce { .. } => 16,
                Op::AllGather { .. } => 17,
                Op::GatherShard { .. } => 18,
                Op::KvQuant { .. } => 19,
                Op::RmsNorm { .. } => 20,
                Op::Linear => 21,
                Op::LinearAdd => 22,
                Op::LinearBias => 23,
                Op::GatedMlp => 24,
                Op::GatedGelu => 25,
                Op::Rope { .. } => 26,
                Op::FusedAttention { .. } => 27,
                Op::Softcap { .. } => 28,
                Op::LayerNorm { .. } => 29,
                Op::GeluTanh => 30,
            }
        }
        let mut seen = [false; 31];
        for op in Op::examples() {
            seen[index(&op)] = true;
        }
        assert!(seen.iter().all(|&s| s), "{seen:?}");
        // And every unary, binary and reduction function.
        assert_eq!(Op::examples().len(), 31 - 3 + 7 + 7 + 3);
    }
}
