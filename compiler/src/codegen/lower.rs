//! Lowering for the GPU: the optimized graph → a launch plan (`kiln_runtime::plan::Plan`).
//!
//! Activations become packed `[tokens, columns]` buffers. View ops (`Reshape`, `Transpose`,
//! `Slice` of the last axis, `Cast`) cost nothing: they change how later kernels index a buffer,
//! not its bytes. A Llama attention block — q/k/v as column ranges of one fused projection,
//! `Rope` on q and k, `Concat(State, ·)` cache appends, `FusedAttention` — lowers to two
//! launches: `RopeAppend` (RoPE in place, k/v written into the paged cache) and `Attention`.
//! Logits are computed for each sequence's last token only. An `RmsNorm` is folded into the
//! `Linear` that consumes it (the GEMV normalizes its input as it loads it, the prefill path
//! runs the norm just before its GEMM); it becomes a launch of its own only when something else
//! reads it. A projection's weight may be stored in a weight format the GPU kernels read (int8,
//! int4: recorded as `Launch::Linear::format`, run by `gemv_q.cu`); any other weight format is
//! an error naming the weight. Any op with no GPU lowering is an error that names the node, so
//! an unfused graph fails the build instead of running slowly.

use kiln_runtime::ir::{BinaryOp, DType, Graph, InputKind, NodeId, Op};
use kiln_runtime::kernels::QuantFormat;
use kiln_runtime::plan::{
    AttentionDims, BufId, BufType, Buffer, Epilogue, Launch, Norm, Plan, Rows,
};

/// What a graph node is, seen from the GPU.
#[derive(Clone, Debug, PartialEq)]
enum Val {
    /// A run-time input of no interest to kernels (positions: kernels read them from metadata).
    Positions,
    /// Token ids.
    Tokens,
    /// A weight.
    Weight(String),
    /// A KV-cache state input.
    State,
    /// A scalar or weight-only constant the lowering does not need.
    Const,
    /// Columns `off..off+len` of an activation buffer.
    Cols { buf: BufId, off: usize, len: usize },
    /// `RmsNorm` of a whole buffer, not yet launched: folded into a consuming `Linear`.
    Normed { x: BufId, norm: Norm },
    /// `Rope` applied to columns of a buffer, with the frequency table `freq` (a weight).
    Roped {
        buf: BufId,
        off: usize,
        len: usize,
        freq: String,
    },
    /// A state extended by new keys or values (columns of a buffer, possibly roped).
    CacheAppend {
        buf: BufId,
        off: usize,
        freq: Option<String>,
    },
}

struct Lowering<'g> {
    g: &'g Graph,
    vals: Vec<Val>,
    buffers: Vec<Buffer>,
    launches: Vec<Launch>,
    attention: Option<AttentionDims>,
    layers: usize,
}

fn last_cols(g: &Graph, id: NodeId) -> Result<usize, String> {
    let ty = &g.nodes[id].ty;
    ty.shape
        .last()
        .and_then(|d| d.as_const())
        .map(|c| c as usize)
        .ok_or_else(|| format!("node `{}` {ty} has no constant last axis", g.nodes[id].name))
}

impl<'g> Lowering<'g> {
    fn err(&self, id: NodeId, msg: &str) -> String {
        let n = &self.g.nodes[id];
        format!("GPU lowering: node `{}` ({}): {msg}", n.name, n.op)
    }

    fn new_buf(&mut self, id: NodeId, rows: Rows, dtype: BufType) -> Result<BufId, String> {
        let cols = last_cols(self.g, id)?;
        self.buffers.push(Buffer {
            name: self.g.nodes[id].name.clone(),
            rows,
            cols,
            dtype,
            slot: 0,
        });
        Ok(self.buffers.len() - 1)
    }

    /// The input as a whole buffer; a pending norm is launched (once) to produce it.
    fn whole(&mut self, id: NodeId, input: NodeId) -> Result<BufId, String> {
        if let Val::Normed { x, norm } = self.vals[input].clone() {
            let out = self.new_buf(input, self.buffers[x].rows, BufType::Bf16)?;
            self.launches.push(Launch::RmsNorm {
                x,
                w: norm.w,
                eps: norm.eps,
                out,
            });
            self.vals[input] = Val::Cols {
                buf: out,
                off: 0,
                len: self.buffers[out].cols,
            };
        }
        match &self.vals[input] {
            Val::Cols { buf, off: 0, len } if *len == self.buffers[*buf].cols => Ok(*buf),
            other => Err(self.err(
                id,
                &format!("needs a whole activation buffer as input, got {other:?}"),
            )),
        }
    }

    /// A `Linear`'s input: a whole buffer and the norm to fold into the product, if any.
    fn linear_input(&mut self, id: NodeId, input: NodeId) -> Result<(BufId, Option<Norm>), String> {
        match &self.vals[input] {
            Val::Normed { x, norm } => Ok((*x, Some(norm.clone()))),
            _ => Ok((self.whole(id, input)?, None)),
        }
    }

    /// A weight read by a norm or embedding kernel, or a bias (stored in bf16).
    fn weight(&self, id: NodeId, input: NodeId) -> Result<String, String> {
        match &self.vals[input] {
            Val::Weight(w) if !self.g.nodes[input].ty.dtype.is_weight_format() => Ok(w.clone()),
            Val::Weight(w) => Err(self.err(
                id,
                &format!(
                    "reads weight `{w}` stored as {}, which only the GPU's linear kernels read",
                    self.g.nodes[input].ty.dtype.name()
                ),
            )),
            other => Err(self.err(id, &format!("needs a weight, got {other:?}"))),
        }
    }

    /// The weight of a `Linear`-like op and its storage: bf16, or a weight format the GPU
    /// kernels read (int8, int4 with `k` a multiple of the kernels' 32-code vectors).
    fn linear_weight(
        &self,
        id: NodeId,
        input: NodeId,
        k: usize,
    ) -> Result<(String, DType), String> {
        let dtype = self.g.nodes[input].ty.dtype;
        let Val::Weight(w) = &self.vals[input] else {
            return Err(self.err(id, &format!("needs a weight, got {:?}", self.vals[input])));
        };
        if !dtype.is_weight_format() {
            return Ok((w.clone(), DType::BF16));
        }
        let Some(f) = QuantFormat::of(dtype) else {
            return Err(self.err(
                id,
                &format!(
                    "weight `{w}` is stored as {}, which the GPU kernels do not read yet (they \
                     read int8, fp8, int4 with or without zero points and GGUF Q4_1/Q8_0: --quant \
                     int8|fp8|int4|int4-sym|int4-gptq|q4_1|q8_0); \
                     build this quantization for the CPU (--target cpu)",
                    dtype.name()
                ),
            ));
        };
        if !k.is_multiple_of(f.codes_per_vector()) {
            return Err(self.err(
                id,
                &format!(
                    "weight `{w}` ({}) has {k} input columns; the GPU kernels need a multiple \
                     of {}",
                    dtype.name(),
                    f.codes_per_vector()
                ),
            ));
        }
        Ok((w.clone(), dtype))
    }

    /// `embedding · c` with `c` a scalar constant (Gemma's `sqrt(hidden)`): the scale folds into
    /// the embedding launch, which is the only reader of the gathered rows.
    fn scaled_embedding(&mut self, id: NodeId) -> Result<Val, String> {
        let ins = &self.g.nodes[id].inputs;
        let scalar = |i: NodeId| match self.g.nodes[i].op {
            Op::Constant { value } => Some(value),
            _ => None,
        };
        let (rows, c) = match (scalar(ins[0]), scalar(ins[1])) {
            (None, Some(c)) => (ins[0], c),
            (Some(c), None) => (ins[1], c),
            _ => return Err(self.err(id, "has no GPU kernel (only an embedding times a constant)")),
        };
        let readers = self
            .g
            .nodes
            .iter()
            .filter(|n| n.inputs.contains(&rows))
            .count();
        let Val::Cols { buf, off: 0, len } = self.vals[rows].clone() else {
            return Err(self.err(id, "has no GPU kernel (only an embedding times a constant)"));
        };
        match self.launches.last_mut() {
            Some(Launch::Embedding { scale, out, .. })
                if *out == buf && len == self.buffers[buf].cols && readers == 1 =>
            {
                *scale *= c;
                // The buffer now holds this node's value (`kiln diff` compares it with it).
                self.buffers[buf].name = self.g.nodes[id].name.clone();
                Ok(Val::Cols { buf, off: 0, len })
            }
            _ => Err(self.err(
                id,
                "has no GPU kernel (only an embedding times a constant, read by nothing else)",
            )),
        }
    }

    fn node(&mut self, id: NodeId) -> Result<Val, String> {
        let n = &self.g.nodes[id];
        let ins = &n.inputs;
        // A widening cast of a pending norm stays pending (exact: the kernels read the bf16 norm
        // output either way), so the f32 logits product of a bf16 graph folds the final norm.
        let widening = matches!(n.op, Op::Cast { dtype: DType::F32 });
        if !widening && !n.op.is_linear() {
            // Only a projection folds a norm into its product; anything else reads it launched.
            for &i in ins {
                if matches!(self.vals[i], Val::Normed { .. }) {
                    self.whole(id, i)?;
                }
            }
        }
        let input = |k: usize| self.vals[ins[k]].clone();
        Ok(match &n.op {
            Op::Input {
                kind: InputKind::Tokens,
            } => Val::Tokens,
            Op::Input {
                kind: InputKind::Positions,
            } => Val::Positions,
            Op::Input {
                kind: InputKind::State,
            } => Val::State,
            Op::Weight { name } => Val::Weight(name.clone()),
            Op::Constant { .. } | Op::Iota { .. } => Val::Const,
            _ if ins
                .iter()
                .all(|&i| matches!(self.vals[i], Val::Const | Val::Weight(_) | Val::Positions)) =>
            {
                // Weight-only or position-only subgraphs (RoPE tables, masks): kernels compute
                // what they need from metadata; only weights read by kernels matter.
                Val::Const
            }
            Op::Gather => {
                let (Val::Weight(_), Val::Tokens) = (input(0), input(1)) else {
                    return Err(self.err(id, "only an embedding lookup of token ids is supported"));
                };
                let table = self.weight(id, ins[0])?;
                let out = self.new_buf(id, Rows::Tokens, BufType::Bf16)?;
                self.launches.push(Launch::Embedding {
                    table,
                    scale: 1.0,
                    out,
                });
                Val::Cols {
                    buf: out,
                    off: 0,
                    len: self.buffers[out].cols,
                }
            }
            Op::RmsNorm { eps } => Val::Normed {
                x: self.whole(id, ins[0])?,
                norm: Norm {
                    w: self.weight(id, ins[1])?,
                    eps: *eps,
                },
            },
            Op::Linear | Op::LinearAdd | Op::LinearBias | Op::GatedMlp | Op::GatedGelu => {
                let (x, norm) = self.linear_input(id, ins[0])?;
                let (w, format) = self.linear_weight(id, ins[1], self.buffers[x].cols)?;
                let epilogue = match n.op {
                    Op::LinearAdd => Epilogue::Residual(self.whole(id, ins[2])?),
                    Op::LinearBias => Epilogue::Bias(self.weight(id, ins[2])?),
                    Op::GatedMlp => Epilogue::Gated,
                    Op::GatedGelu => Epilogue::GatedGelu,
                    _ => Epilogue::None,
                };
                let out = self.new_buf(id, self.buffers[x].rows, BufType::Bf16)?;
                self.launches.push(Launch::Linear {
                    x,
                    norm,
                    w,
                    format,
                    epilogue,
                    out,
                });
                Val::Cols {
                    buf: out,
                    off: 0,
                    len: self.buffers[out].cols,
                }
            }
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Cast { .. } => match input(0) {
                v @ (Val::Cols { .. } | Val::Roped { .. } | Val::CacheAppend { .. }) => v,
                v @ Val::Normed { .. } if widening => v,
                _ => return Err(self.err(id, "is a view of something that is not an activation")),
            },
            Op::Slice { axis, start, end } => {
                let rank = self.g.nodes[ins[0]].ty.rank();
                let (Val::Cols { buf, off, .. }, Some(s), Some(e)) =
                    (input(0), start.as_const(), end.as_const())
                else {
                    return Err(self.err(id, "only constant slices of activations are supported"));
                };
                if *axis != rank - 1 {
                    return Err(self.err(id, "only slices of the last (column) axis are supported"));
                }
                Val::Cols {
                    buf,
                    off: off + s as usize,
                    len: (e - s) as usize,
                }
            }
            Op::Rope { .. } => match (input(0), input(2)) {
                (Val::Cols { buf, off, len }, Val::Weight(freq)) => Val::Roped {
                    buf,
                    off,
                    len,
                    freq,
                },
                (Val::Cols { .. }, _) => {
                    return Err(self.err(id, "RoPE frequencies that are not a stored table"))
                }
                _ => return Err(self.err(id, "RoPE of something that is not a column range")),
            },
            Op::Concat { .. } => match (
                ins.len(),
                input(0),
                ins.get(1).map(|&i| self.vals[i].clone()),
            ) {
                (2, Val::State, Some(Val::Cols { buf, off, .. })) => Val::CacheAppend {
                    buf,
                    off,
                    freq: None,
                },
                (2, Val::State, Some(Val::Roped { buf, off, freq, .. })) => Val::CacheAppend {
                    buf,
                    off,
                    freq: Some(freq),
                },
                _ => {
                    return Err(self.err(
                        id,
                        "only KV-cache appends (Concat(State, new)) are supported",
                    ))
                }
            },
            Op::FusedAttention { softcap, .. } if *softcap > 0.0 => {
                return Err(self.err(
                    id,
                    "attention with a logit soft-cap (Gemma-2) has no GPU kernel yet; build \
                     this model for the CPU (--target cpu)",
                ))
            }
            Op::FusedAttention { scale, window, .. } => self.attention(id, *scale, *window)?,
            Op::Binary(BinaryOp::Mul) => self.scaled_embedding(id)?,
            _ => {
                return Err(self.err(
                    id,
                    "has no GPU kernel: the GPU backend runs the fused ops of Llama-shaped layers \
                     (with the rewriter on); build this model for the CPU (--target cpu)",
                ))
            }
        })
    }

    fn attention(&mut self, id: NodeId, scale: f32, window: u32) -> Result<Val, String> {
        let ins = self.g.nodes[id].inputs.clone();
        let (q, k, v) = (
            self.vals[ins[0]].clone(),
            self.vals[ins[1]].clone(),
            self.vals[ins[2]].clone(),
        );
        let qt = &self.g.nodes[ins[0]].ty;
        let kt = &self.g.nodes[ins[1]].ty;
        let dims = AttentionDims {
            heads: qt.shape[1].as_const().unwrap_or(0) as usize,
            kv_heads: kt.shape[1].as_const().unwrap_or(0) as usize,
            head_dim: qt.shape[3].as_const().unwrap_or(0) as usize,
        };
        let (hd, kd) = (dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim);
        let ok = matches!((&q, &k, &v),
            (Val::Roped { buf: qb, off: 0, freq: qt, .. },
             Val::CacheAppend { buf: kb, off: ko, freq: Some(kt) },
             Val::CacheAppend { buf: vb, off: vo, freq: None })
            if qb == kb && kb == vb && *ko == hd && *vo == hd + kd && qt == kt && self.buffers[*qb].cols == hd + 2 * kd);
        if !ok {
            return Err(self.err(id, &format!("needs q, k, v as column ranges 0, {hd}, {} of one fused QKV projection with RoPE on q and k; got {q:?}, {k:?}, {v:?}", hd + kd)));
        }
        // The attention kernels' limits, checked here so the user reads them instead of an
        // NVRTC static-assert: the decode kernel splits a head over 32 / (d / 8) lanes and the
        // prefill kernels tile d in 32-wide steps.
        if !matches!(dims.head_dim, 32 | 64 | 128 | 256) {
            return Err(self.err(
                id,
                &format!(
                    "head size {} is not supported by the GPU attention kernels (32, 64, 128 \
                     or 256); build for the CPU (--target cpu)",
                    dims.head_dim
                ),
            ));
        }
        if dims.kv_heads == 0 || !dims.heads.is_multiple_of(dims.kv_heads) {
            return Err(self.err(
                id,
                &format!(
                    "{} query heads are not a multiple of {} KV heads",
                    dims.heads, dims.kv_heads
                ),
            ));
        }
        if *self.attention.get_or_insert(dims) != dims {
            return Err(self.err(id, "attention geometry differs between layers"));
        }
        let Val::Roped {
            buf: qkv,
            freq: inv_freq,
            ..
        } = q
        else {
            unreachable!()
        };
        let layer = self.layers;
        self.layers += 1;
        self.launches.push(Launch::RopeAppend {
            qkv,
            layer,
            inv_freq: inv_freq.clone(),
        });
        let out = self.buffers.len();
        self.buffers.push(Buffer {
            name: self.g.nodes[id].name.clone(),
            rows: Rows::Tokens,
            cols: hd,
            dtype: BufType::Bf16,
            slot: 0,
        });
        self.launches.push(Launch::Attention {
            qkv,
            layer,
            inv_freq,
            scale,
            window,
            out,
        });
        Ok(Val::Cols {
            buf: out,
            off: 0,
            len: hd,
        })
    }
}

/// Lowers an optimized graph with a `logits` output to a launch plan.
pub fn lower(g: &Graph) -> Result<Plan, String> {
    let logits_id = g
        .output("logits")
        .ok_or("GPU lowering: the graph has no `logits` output")?;
    let mut l = Lowering {
        g,
        vals: Vec::with_capacity(g.nodes.len()),
        buffers: vec![],
        launches: vec![],
        attention: None,
        layers: 0,
    };
    // The product the logits come from: the output itself, or (a bf16 graph) the Linear under
    // its widening cast; the GEMV writes f32 either way.
    let product = match &g.nodes[logits_id].op {
        Op::Cast { dtype: DType::F32 }
            if g.nodes[g.nodes[logits_id].inputs[0]].op == Op::Linear =>
        {
            g.nodes[logits_id].inputs[0]
        }
        _ => logits_id,
    };
    // Only nodes that the logits depend on are lowered (other outputs are CPU diagnostics).
    let mut needed = vec![false; g.nodes.len()];
    needed[logits_id] = true;
    for i in (0..g.nodes.len()).rev() {
        if needed[i] {
            for &j in &g.nodes[i].inputs {
                needed[j] = true;
            }
        }
    }
    for (id, &need) in needed.iter().enumerate() {
        let v = if !need || (id == product && id != logits_id) {
            // Not needed, or the logits' product, lowered at the logits.
            Val::Const
        } else if id == logits_id {
            // Logits: only each sequence's last token, in f32.
            let n = &g.nodes[product];
            if n.op != Op::Linear {
                return Err(l.err(id, "the logits must come from a Linear"));
            }
            // Gathering the last rows first also shrinks the final norm to them.
            let (x, norm) = l.linear_input(id, n.inputs[0])?;
            let (w, format) = l.linear_weight(id, n.inputs[1], l.buffers[x].cols)?;
            let last = l.buffers.len();
            l.buffers.push(Buffer {
                name: format!("{}.last", l.buffers[x].name),
                rows: Rows::Sequences,
                cols: l.buffers[x].cols,
                dtype: BufType::Bf16,
                slot: 0,
            });
            l.launches.push(Launch::GatherLast { x, out: last });
            let out = l.new_buf(id, Rows::Sequences, BufType::F32)?;
            l.launches.push(Launch::Linear {
                x: last,
                norm,
                w,
                format,
                epilogue: Epilogue::None,
                out,
            });
            Val::Cols {
                buf: out,
                off: 0,
                len: l.buffers[out].cols,
            }
        } else {
            l.node(id)?
        };
        l.vals.push(v);
    }
    let Val::Cols { buf: logits, .. } = l.vals[logits_id] else {
        unreachable!()
    };
    let attention = l
        .attention
        .ok_or("GPU lowering: the graph has no FusedAttention (was the rewriter run?)")?;
    if g.nodes.iter().any(|n| n.ty.dtype == DType::F16) {
        return Err("GPU lowering: f16 graphs are not supported yet; use --dtype bf16".into());
    }
    let mut plan = Plan {
        attention,
        layers: l.layers,
        vocab: l.buffers[logits].cols,
        buffers: l.buffers,
        launches: l.launches,
        logits,
    };
    plan.assign_slots();
    Ok(plan)
}
