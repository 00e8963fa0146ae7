//! The launch schedule of a GPU engine: the lowered graph as a list of kernel launches over
//! activation buffers, with the arena layout decided at build time from buffer liveness.
//!
//! Every activation buffer is a row-major `[rows, cols]` matrix whose rows are the step's packed
//! tokens (`T`, sequences of different lengths one after another) or its sequences (`B`).
//! The KV cache is not a buffer: `RopeAppend` writes a layer's cache, `Attention` reads it.

use crate::ir::DType;
use serde::{Deserialize, Serialize};

/// Index into `Plan::buffers`.
pub type BufId = usize;

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufType {
    /// bfloat16 activations.
    Bf16,
    /// f32 (logits).
    F32,
}

impl BufType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            BufType::Bf16 => 2,
            BufType::F32 => 4,
        }
    }
}

/// What a buffer's rows are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rows {
    /// One row per token of the step.
    Tokens,
    /// One row per sequence of the step (e.g. last-token logits).
    Sequences,
}

/// An activation buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    /// Name of the graph node it holds (for messages and inspection).
    pub name: String,
    /// Row kind.
    pub rows: Rows,
    /// Columns.
    pub cols: usize,
    /// Element type.
    pub dtype: BufType,
    /// Arena slot (buffers whose lifetimes do not overlap share a slot).
    pub slot: usize,
}

/// What a `Linear` does after the product.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Epilogue {
    /// `y = x·wᵀ`
    None,
    /// `y = x·wᵀ + r`
    Residual(BufId),
    /// `y = x·wᵀ + b`, `b` a bf16 `[n]` weight broadcast over the rows.
    Bias(String),
    /// `w` stacks gate over up rows: `y = silu(x·gᵀ) ⊙ (x·uᵀ)`.
    Gated,
    /// `w` stacks gate over up rows: `y = gelu(x·gᵀ) ⊙ (x·uᵀ)`, GELU's tanh approximation
    /// (GeGLU: Gemma).
    GatedGelu,
}

impl Epilogue {
    /// True for the gated MLPs, whose weight has twice the output's rows (gate, then up).
    pub fn is_gated(&self) -> bool {
        matches!(self, Epilogue::Gated | Epilogue::GatedGelu)
    }

    /// Weight rows of a product with `cols` outputs: twice `cols` for a gated MLP.
    pub fn weight_rows(&self, cols: usize) -> usize {
        if self.is_gated() {
            2 * cols
        } else {
            cols
        }
    }
}

fn one() -> f32 {
    1.0
}

/// An RMSNorm folded into the `Linear` that consumes it: the one-row GEMV normalizes its input
/// in its prologue; batched GEMVs and prefill GEMMs run the norm into scratch first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Norm {
    /// Norm weight name.
    pub w: String,
    /// Epsilon.
    pub eps: f32,
}

/// One kernel launch (or, for prefill GEMMs, a cuBLAS call plus its epilogue kernel).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Launch {
    /// `out[t] = table[tokens[t]]`.
    Embedding {
        /// Embedding table (weight name).
        table: String,
        /// Multiplies every gathered row (Gemma's `sqrt(hidden)`; 1 for a plain lookup).
        #[serde(default = "one")]
        scale: f32,
        /// Output buffer.
        out: BufId,
    },
    /// `out[b] = x[last token of sequence b]`.
    GatherLast {
        /// Token rows.
        x: BufId,
        /// Sequence rows.
        out: BufId,
    },
    /// Row-wise RMSNorm.
    RmsNorm {
        /// Input.
        x: BufId,
        /// Weight name.
        w: String,
        /// Epsilon.
        eps: f32,
        /// Output.
        out: BufId,
    },
    /// `out = epilogue(norm(x) · wᵀ)`, `w` `[n, k]`.
    Linear {
        /// Input `[rows, k]`.
        x: BufId,
        /// The RMSNorm applied to `x` first, if any.
        norm: Option<Norm>,
        /// Weight name.
        w: String,
        /// How the weight is stored: `BF16`, or a weight format the GPU kernels read (`Int8`,
        /// `Int4`): its parts are `w`, `w.scale` (and `w.zero`), laid out as
        /// `kiln_runtime::quant` says. Absent in plans written before quantized GPU engines
        /// (all bf16).
        #[serde(default = "bf16")]
        format: DType,
        /// Epilogue.
        epilogue: Epilogue,
        /// Output `[rows, n]` (or `n/2` when gated).
        out: BufId,
    },
    /// RoPE on the q and k parts of a fused `qkv` buffer (q in place), writing k and v into
    /// layer `layer`'s KV cache at each token's slot.
    RopeAppend {
        /// The fused projection `[T, (h + 2·kh)·d]`.
        qkv: BufId,
        /// KV-cache layer.
        layer: usize,
        /// RoPE inverse frequencies: an f32 `[d/2]` weight.
        inv_freq: String,
    },
    /// Causal attention of the q part of `qkv` over layer `layer`'s cache → `[T, h·d]`, over the
    /// `window` most recent keys of each query when `window > 0` (per layer: Mistral, Gemma-2).
    /// In a decode step (one token per sequence) the attention kernel also does the preceding
    /// `RopeAppend`'s work, and that launch is skipped.
    Attention {
        /// The fused projection (q read from it).
        qkv: BufId,
        /// KV-cache layer.
        layer: usize,
        /// RoPE inverse frequencies (the preceding `RopeAppend`'s).
        inv_freq: String,
        /// Score scale.
        scale: f32,
        /// Sliding window in keys (0: all keys up to the query).
        window: u32,
        /// Output.
        out: BufId,
    },
}

fn bf16() -> DType {
    DType::BF16
}

/// Attention geometry shared by every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttentionDims {
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// The lowered graph of a GPU engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Attention geometry.
    pub attention: AttentionDims,
    /// Number of KV-cache layers.
    pub layers: usize,
    /// Activation buffers.
    pub buffers: Vec<Buffer>,
    /// Launches in order.
    pub launches: Vec<Launch>,
    /// The `[B, vocab]` f32 logits buffer.
    pub logits: BufId,
    /// Vocabulary size.
    pub vocab: usize,
}

impl Plan {
    /// Bytes of one row of each arena slot (the widest buffer assigned to it).
    pub fn slot_row_bytes(&self) -> Vec<usize> {
        let n = self.buffers.iter().map(|b| b.slot + 1).max().unwrap_or(0);
        let mut sizes = vec![0; n];
        for b in &self.buffers {
            sizes[b.slot] = sizes[b.slot].max(b.cols * b.dtype.size());
        }
        sizes
    }

    /// The weights that launches read in f32 (RoPE frequency tables); every other weight is
    /// stored and read in bf16.
    pub fn f32_weights(&self) -> std::collections::BTreeSet<&str> {
        self.launches
            .iter()
            .filter_map(|l| match l {
                Launch::RopeAppend { inv_freq, .. } | Launch::Attention { inv_freq, .. } => {
                    Some(inv_freq.as_str())
                }
                _ => None,
            })
            .collect()
    }

    /// Serializes as RON.
    pub fn to_ron(&self) -> String {
        ron::ser::to_string(self).expect("plan serializes")
    }

    /// Parses RON.
    pub fn from_ron(text: &str) -> Result<Plan, String> {
        ron::from_str(text).map_err(|e| format!("launch plan: {e}"))
    }

    /// The plan's first line for `kiln inspect --plan`: attention shape, layers, vocabulary,
    /// buffers and arena slots.
    pub fn describe_header(&self) -> String {
        let a = self.attention;
        format!(
            "attention: {} heads, {} KV heads, head_dim {}; {} layers; vocab {}; {} buffers in {} arena slots",
            a.heads,
            a.kv_heads,
            a.head_dim,
            self.layers,
            self.vocab,
            self.buffers.len(),
            self.slot_row_bytes().len()
        )
    }

    /// Launch `i` as text, its buffers named (`name bf16[T, 576] (slot 0)`).
    pub fn describe_launch(&self, i: usize) -> String {
        let buf = |id: BufId| {
            let b = &self.buffers[id];
            let rows = match b.rows {
                Rows::Tokens => "T",
                Rows::Sequences => "B",
            };
            let ty = match b.dtype {
                BufType::Bf16 => "bf16",
                BufType::F32 => "f32",
            };
            format!("{} {ty}[{rows}, {}] (slot {})", b.name, b.cols, b.slot)
        };
        match &self.launches[i] {
            Launch::Embedding { table, scale, out } => {
                let scale = if *scale == 1.0 {
                    String::new()
                } else {
                    format!(" ×{scale}")
                };
                format!("Embedding table={table}{scale} -> {}", buf(*out))
            }
            Launch::GatherLast { x, out } => format!("GatherLast {} -> {}", buf(*x), buf(*out)),
            Launch::RmsNorm { x, w, eps, out } => {
                format!("RmsNorm w={w} eps={eps:e} {} -> {}", buf(*x), buf(*out))
            }
            Launch::Linear {
                x,
                norm,
                w,
                format,
                epilogue,
                out,
            } => {
                let w = if *format == DType::BF16 {
                    w.clone()
                } else {
                    format!("{w}:{}", format.name())
                };
                let norm = norm.as_ref().map_or(String::new(), |n| {
                    format!(" norm(w={}, eps={:e})", n.w, n.eps)
                });
                let epi = match epilogue {
                    Epilogue::None => String::new(),
                    Epilogue::Residual(r) => format!(" +residual {}", buf(*r)),
                    Epilogue::Bias(b) => format!(" +bias {b}"),
                    Epilogue::Gated => " gated(silu·up)".into(),
                    Epilogue::GatedGelu => " gated(gelu·up)".into(),
                };
                format!("Linear w={w}{norm}{epi} {} -> {}", buf(*x), buf(*out))
            }
            Launch::RopeAppend {
                qkv,
                layer,
                inv_freq,
            } => {
                format!(
                    "RopeAppend layer={layer} inv_freq={inv_freq} {} -> KV cache",
                    buf(*qkv)
                )
            }
            Launch::Attention {
                qkv,
                layer,
                inv_freq,
                scale,
                window,
                out,
            } => format!(
                "Attention layer={layer} inv_freq={inv_freq} scale={scale}{} {} -> {}",
                if *window > 0 {
                    format!(" window={window}")
                } else {
                    String::new()
                },
                buf(*qkv),
                buf(*out)
            ),
        }
    }

    /// The plan as text, one launch per line with its buffers named, for `kiln inspect --plan`.
    pub fn describe(&self) -> String {
        let mut out = self.describe_header();
        out.push('\n');
        for i in 0..self.launches.len() {
            out += &format!("{i:>4}  {}\n", self.describe_launch(i));
        }
        out
    }

    /// Reads of each launch (buffers it consumes) and its write.
    pub fn reads_writes(l: &Launch) -> (Vec<BufId>, Option<BufId>) {
        match l {
            Launch::Embedding { out, .. } => (vec![], Some(*out)),
            Launch::GatherLast { x, out } | Launch::RmsNorm { x, out, .. } => {
                (vec![*x], Some(*out))
            }
            Launch::Linear {
                x, epilogue, out, ..
            } => match epilogue {
                Epilogue::Residual(r) => (vec![*x, *r], Some(*out)),
                _ => (vec![*x], Some(*out)),
            },
            Launch::RopeAppend { qkv, .. } => (vec![*qkv], None),
            Launch::Attention { qkv, out, .. } => (vec![*qkv], Some(*out)),
        }
    }

    /// Assigns arena slots by liveness: a buffer's slot is free again after its last reader, so
    /// buffers whose lifetimes do not overlap (and whose row kinds match) share memory. A
    /// residual `Linear` whose residual input dies there writes in place over it (the GEMV
    /// epilogue allows the alias; the prefill GEMM then accumulates with beta = 1).
    pub fn assign_slots(&mut self) {
        let n = self.buffers.len();
        let mut last_use = vec![0usize; n];
        let mut first_def = vec![usize::MAX; n];
        for (i, l) in self.launches.iter().enumerate() {
            let (reads, write) = Self::reads_writes(l);
            for r in reads {
                last_use[r] = last_use[r].max(i);
            }
            if let Some(w) = write {
                first_def[w] = first_def[w].min(i);
                last_use[w] = last_use[w].max(i);
            }
        }
        last_use[self.logits] = usize::MAX;
        // Slots: (rows kind, busy-until launch index).
        let mut slots: Vec<(Rows, usize)> = Vec::new();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&b| first_def[b]);
        let in_place: Vec<Option<BufId>> = (0..n)
            .map(|b| match self.launches.get(first_def[b]) {
                Some(Launch::Linear {
                    epilogue: Epilogue::Residual(r),
                    out,
                    ..
                }) if *out == b
                    && last_use[*r] == first_def[b]
                    && self.buffers[*r].rows == self.buffers[b].rows =>
                {
                    Some(*r)
                }
                _ => None,
            })
            .collect();
        for b in order {
            let rows = self.buffers[b].rows;
            let start = first_def[b];
            let free = match in_place[b] {
                Some(r) => Some(self.buffers[r].slot),
                None => slots
                    .iter()
                    .position(|&(r, until)| r == rows && until < start),
            };
            let slot = match free {
                Some(s) => s,
                None => {
                    slots.push((rows, 0));
                    slots.len() - 1
                }
            };
            slots[slot] = (rows, last_use[b]);
            self.buffers[b].slot = slot;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Linear` records its weight's storage; plans written before quantized GPU engines (no
    /// `format`) read as bf16, so their engines keep loading.
    #[test]
    fn linear_weight_format_round_trips_and_defaults_to_bf16() {
        let mut plan = Plan {
            attention: AttentionDims {
                heads: 2,
                kv_heads: 1,
                head_dim: 64,
            },
            layers: 0,
            buffers: vec![
                Buffer {
                    name: "x".into(),
                    rows: Rows::Tokens,
                    cols: 128,
                    dtype: BufType::Bf16,
                    slot: 0,
                },
                Buffer {
                    name: "y".into(),
                    rows: Rows::Tokens,
                    cols: 64,
                    dtype: BufType::Bf16,
                    slot: 0,
                },
            ],
            launches: vec![Launch::Linear {
                x: 0,
                norm: None,
                w: "w".into(),
                format: DType::Int4 {
                    group: 64,
                    zero_point: true,
                },
                epilogue: Epilogue::None,
                out: 1,
            }],
            logits: 1,
            vocab: 64,
        };
        assert_eq!(Plan::from_ron(&plan.to_ron()).unwrap(), plan);
        assert!(plan.describe().contains("Linear w=w:int4g64z"));
        let old = plan
            .to_ron()
            .replace("format:Int4(group:64,zero_point:true),", "");
        assert!(!old.contains("format"), "{old}");
        let Launch::Linear { format, .. } = &mut plan.launches[0] else {
            unreachable!()
        };
        *format = DType::BF16;
        assert_eq!(Plan::from_ron(&old).unwrap(), plan);
    }
}
