//! Stage 1 of the GPU lowering: each graph node on its own, in graph order, to a value ([`Val`])
//! and at most one [`Step`].
//!
//! Activations become packed `[tokens, columns]` buffers. Views (`Reshape`, `Transpose`,
//! `Cast`, a constant `Slice` of the last axis) change how later kernels index a buffer, not its
//! bytes. A projection's weight may be stored in a weight format the GPU kernels read (int8,
//! fp8, int4, GGUF Q4_1/Q8_0: recorded as `Launch::Linear::format`, run by `gemv_q.cu` and the
//! prefill dequantization); any other weight format is an error naming the weight. Logits are
//! computed for each sequence's last token only, in f32.

use super::{Lowered, Step, Val};
use kiln_runtime::ir::{DType, Graph, InputKind, NodeId, Op};
use kiln_runtime::kernels::QuantFormat;
use kiln_runtime::plan::{AttentionDims, BufId, BufType, Buffer, Epilogue, Launch, Norm, Rows};

fn last_cols(g: &Graph, id: NodeId) -> Result<usize, String> {
    let ty = &g.nodes[id].ty;
    ty.shape
        .last()
        .and_then(|d| d.as_const())
        .map(|c| c as usize)
        .ok_or_else(|| format!("node `{}` {ty} has no constant last axis", g.nodes[id].name))
}

struct Nodes<'g> {
    l: Lowered<'g>,
    vals: Vec<Val>,
}

impl<'g> Nodes<'g> {
    fn err(&self, id: NodeId, msg: &str) -> String {
        self.l.err(id, msg)
    }

    fn new_buf(&mut self, id: NodeId, rows: Rows, dtype: BufType) -> Result<BufId, String> {
        let cols = last_cols(self.l.g, id)?;
        self.l.buffers.push(Buffer {
            name: self.l.g.nodes[id].name.clone(),
            rows,
            cols,
            dtype,
            slot: 0,
        });
        Ok(self.l.buffers.len() - 1)
    }

    /// A new buffer for node `id`'s value, written by `launch(out)`.
    fn launch(
        &mut self,
        id: NodeId,
        rows: Rows,
        dtype: BufType,
        launch: impl FnOnce(BufId) -> Launch,
    ) -> Result<Val, String> {
        let out = self.new_buf(id, rows, dtype)?;
        self.l.steps.push(Step::Launch(launch(out)));
        Ok(self.whole_val(out))
    }

    fn whole_val(&self, buf: BufId) -> Val {
        Val::Cols {
            buf,
            off: 0,
            len: self.l.buffers[buf].cols,
        }
    }

    /// Input `input` of node `id` as a whole activation buffer.
    fn whole(&self, id: NodeId, input: NodeId) -> Result<BufId, String> {
        match &self.vals[input] {
            Val::Cols { buf, off: 0, len } if *len == self.l.buffers[*buf].cols => Ok(*buf),
            Val::Host => Err(self.host_read(id, input)),
            other => Err(self.err(
                id,
                &format!("needs a whole activation buffer as input, got {other:?}"),
            )),
        }
    }

    /// The error of a launch that would read a value no kernel computes.
    fn host_read(&self, id: NodeId, input: NodeId) -> String {
        self.err(
            id,
            &format!(
                "reads `{}`, computed from positions, constants and weights alone (or a step \
                 input the GPU kernels do not take), which no GPU kernel computes",
                self.l.g.nodes[input].name
            ),
        )
    }

    /// A weight read by a norm or embedding kernel, or a bias (stored in bf16).
    fn weight(&self, id: NodeId, input: NodeId) -> Result<String, String> {
        match &self.vals[input] {
            Val::Weight(w) if !self.l.g.nodes[input].ty.dtype.is_weight_format() => Ok(w.clone()),
            Val::Weight(w) => Err(self.err(
                id,
                &format!(
                    "reads weight `{w}` stored as {}, which only the GPU's linear kernels read",
                    self.l.g.nodes[input].ty.dtype.name()
                ),
            )),
            other => Err(self.err(id, &format!("needs a weight, got {other:?}"))),
        }
    }

    /// The weight of a `Linear`-like op and its storage: bf16, or a weight format the GPU
    /// kernels read (with `k` a multiple of the format's code vectors).
    fn linear_weight(
        &self,
        id: NodeId,
        input: NodeId,
        k: usize,
    ) -> Result<(String, DType), String> {
        let dtype = self.l.g.nodes[input].ty.dtype;
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

    /// A product with a weight (`x · wᵀ` and its epilogue) into a new buffer of node `id`.
    fn linear(&mut self, id: NodeId, epilogue_of: Option<Epilogue>) -> Result<Val, String> {
        let n = &self.l.g.nodes[id];
        let ins = n.inputs.clone();
        let x = self.whole(id, ins[0])?;
        let (w, format) = self.linear_weight(id, ins[1], self.l.buffers[x].cols)?;
        let epilogue = match (&n.op, epilogue_of) {
            (_, Some(e)) => e,
            (Op::LinearAdd, None) => Epilogue::Residual(self.whole(id, ins[2])?),
            (Op::LinearBias, None) => Epilogue::Bias(self.weight(id, ins[2])?),
            (Op::GatedMlp, None) => Epilogue::Gated,
            (Op::GatedGelu, None) => Epilogue::GatedGelu,
            _ => Epilogue::None,
        };
        let rows = self.l.buffers[x].rows;
        self.launch(id, rows, BufType::Bf16, |out| Launch::Linear {
            x,
            norm: None,
            w,
            format,
            epilogue,
            out,
        })
    }

    fn node(&mut self, id: NodeId) -> Result<Val, String> {
        let g = self.l.g;
        let n = &g.nodes[id];
        let ins = &n.inputs;
        let input = |k: usize| self.vals[ins[k]].clone();
        Ok(match &n.op {
            Op::Input { kind } => match kind {
                InputKind::Tokens => Val::Tokens,
                InputKind::Positions => Val::Positions,
                InputKind::State => Val::State,
                InputKind::Activation => Val::Host,
            },
            Op::Weight { name } => Val::Weight(name.clone()),
            Op::Constant { value } => Val::Scalar(*value),
            _ if ins.iter().all(|&i| {
                matches!(
                    self.vals[i],
                    Val::Scalar(_) | Val::Weight(_) | Val::Positions | Val::Host
                )
            }) =>
            {
                // Position or constant arithmetic (what a kernel needs of it, it computes from
                // the step's metadata): no launch, and an error if a launch reads it.
                Val::Host
            }
            Op::Gather => {
                let (Val::Weight(_), Val::Tokens) = (input(0), input(1)) else {
                    return Err(self.err(id, "only an embedding lookup of token ids is supported"));
                };
                let table = self.weight(id, ins[0])?;
                self.launch(id, Rows::Tokens, BufType::Bf16, |out| Launch::Embedding {
                    table,
                    scale: 1.0,
                    out,
                })?
            }
            Op::RmsNorm { eps } => {
                let (x, w, eps) = (self.whole(id, ins[0])?, self.weight(id, ins[1])?, *eps);
                let rows = self.l.buffers[x].rows;
                self.launch(id, rows, BufType::Bf16, |out| Launch::RmsNorm {
                    x,
                    w,
                    eps,
                    out,
                })?
            }
            Op::Linear | Op::LinearAdd | Op::LinearBias | Op::GatedMlp | Op::GatedGelu => {
                self.linear(id, None)?
            }
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Cast { .. } => match input(0) {
                v @ (Val::Cols { .. } | Val::Roped { .. } | Val::Appended { .. }) => v,
                Val::Host => Val::Host,
                _ => return Err(self.err(id, "is a view of something that is not an activation")),
            },
            Op::Slice { axis, start, end } => {
                let rank = g.nodes[ins[0]].ty.rank();
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
            Op::Rope { .. } => {
                if input(1) != Val::Positions {
                    return Err(self.err(
                        id,
                        &format!(
                            "RoPE at positions `{}`: the GPU kernels rotate each token at its \
                             own position (the step's position input), nothing computed from it",
                            g.nodes[ins[1]].name
                        ),
                    ));
                }
                match (input(0), input(2)) {
                    (Val::Cols { buf, off, len }, Val::Weight(freq)) => {
                        self.l.steps.push(Step::Rope {
                            node: id,
                            buf,
                            off,
                            len,
                        });
                        Val::Roped {
                            rope: id,
                            buf,
                            off,
                            len,
                            freq,
                        }
                    }
                    (Val::Cols { .. }, _) => {
                        return Err(self.err(id, "RoPE frequencies that are not a stored table"))
                    }
                    _ => return Err(self.err(id, "RoPE of something that is not a column range")),
                }
            }
            Op::Concat { .. } => {
                let (buf, off, len, rope) = match (
                    ins.len(),
                    input(0),
                    ins.get(1).map(|&i| self.vals[i].clone()),
                ) {
                    (2, Val::State, Some(Val::Cols { buf, off, len })) => (buf, off, len, None),
                    (
                        2,
                        Val::State,
                        Some(Val::Roped {
                            rope,
                            buf,
                            off,
                            len,
                            freq,
                        }),
                    ) => (buf, off, len, Some((rope, freq))),
                    _ => {
                        return Err(self.err(
                            id,
                            "only KV-cache appends (Concat(State, new)) are supported",
                        ))
                    }
                };
                self.l.steps.push(Step::Append {
                    node: id,
                    buf,
                    off,
                    len,
                });
                Val::Appended {
                    append: id,
                    buf,
                    off,
                    rope,
                }
            }
            Op::FusedAttention { softcap, .. } if *softcap > 0.0 => {
                return Err(self.err(
                    id,
                    "attention with a logit soft-cap (Gemma-2) has no GPU kernel yet; build \
                     this model for the CPU (--target cpu)",
                ))
            }
            Op::FusedAttention { scale, window, .. } => self.attention(id, *scale, *window)?,
            Op::Binary(kiln_runtime::ir::BinaryOp::Mul) => {
                let (x, c) = match (input(0), input(1)) {
                    (Val::Scalar(c), _) => (ins[1], c),
                    (_, Val::Scalar(c)) => (ins[0], c),
                    _ => {
                        return Err(
                            self.err(id, "has no GPU kernel (only an embedding times a constant)")
                        )
                    }
                };
                let x = self.whole(id, x)?;
                let out = self.new_buf(id, self.l.buffers[x].rows, BufType::Bf16)?;
                self.l.steps.push(Step::Scale {
                    node: id,
                    x,
                    c,
                    out,
                });
                self.whole_val(out)
            }
            _ => {
                return Err(self.err(
                    id,
                    "has no GPU kernel: the GPU backend runs the fused ops of Llama-shaped layers \
                     (with the rewriter on); build this model for the CPU (--target cpu)",
                ))
            }
        })
    }

    /// `FusedAttention`: checks the kernels' limits (head size, grouped heads, one geometry for
    /// every layer), takes the next KV-cache layer and an output buffer.
    fn attention(&mut self, id: NodeId, scale: f32, window: u32) -> Result<Val, String> {
        let g = self.l.g;
        let ins = &g.nodes[id].inputs;
        let (qt, kt) = (&g.nodes[ins[0]].ty, &g.nodes[ins[1]].ty);
        let dims = AttentionDims {
            heads: qt.shape[1].as_const().unwrap_or(0) as usize,
            kv_heads: kt.shape[1].as_const().unwrap_or(0) as usize,
            head_dim: qt.shape[3].as_const().unwrap_or(0) as usize,
        };
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
        if *self.l.attention.get_or_insert(dims) != dims {
            return Err(self.err(id, "attention geometry differs between layers"));
        }
        let layer = self.l.layers;
        self.l.layers += 1;
        let out = self.l.buffers.len();
        self.l.buffers.push(Buffer {
            name: g.nodes[id].name.clone(),
            rows: Rows::Tokens,
            cols: dims.heads * dims.head_dim,
            dtype: BufType::Bf16,
            slot: 0,
        });
        let (q, k, v) = (
            self.vals[ins[0]].clone(),
            self.vals[ins[1]].clone(),
            self.vals[ins[2]].clone(),
        );
        self.l.steps.push(Step::Attention {
            node: id,
            q,
            k,
            v,
            layer,
            scale,
            window,
            out,
        });
        Ok(self.whole_val(out))
    }

    /// The logits: the product's rows of each sequence's last token (`GatherLast`), then the
    /// f32 product (the lm_head GEMV writes f32 in an f32 and a bf16 graph alike).
    fn logits(&mut self, id: NodeId, product: NodeId) -> Result<Val, String> {
        let n = &self.l.g.nodes[product];
        if n.op != Op::Linear {
            return Err(self.err(id, "the logits must come from a Linear"));
        }
        let (x_in, w_in) = (n.inputs[0], n.inputs[1]);
        let x = self.whole(id, x_in)?;
        let (w, format) = self.linear_weight(id, w_in, self.l.buffers[x].cols)?;
        let last = self.l.buffers.len();
        self.l.buffers.push(Buffer {
            name: format!("{}.last", self.l.buffers[x].name),
            rows: Rows::Sequences,
            cols: self.l.buffers[x].cols,
            dtype: BufType::Bf16,
            slot: 0,
        });
        self.l
            .steps
            .push(Step::Launch(Launch::GatherLast { x, out: last }));
        self.launch(id, Rows::Sequences, BufType::F32, |out| Launch::Linear {
            x: last,
            norm: None::<Norm>,
            w,
            format,
            epilogue: Epilogue::None,
            out,
        })
    }
}

/// Stage 1: every node the logits depend on, in graph order.
pub(super) fn lower_nodes(g: &Graph) -> Result<Lowered<'_>, String> {
    let logits_id = g
        .output("logits")
        .ok_or("GPU lowering: the graph has no `logits` output")?;
    if g.nodes.iter().any(|n| n.ty.dtype == DType::F16) {
        return Err("GPU lowering: f16 graphs are not supported yet; use --dtype bf16".into());
    }
    let mut s = Nodes {
        l: Lowered {
            g,
            buffers: vec![],
            steps: vec![],
            attention: None,
            layers: 0,
            logits: 0,
        },
        vals: Vec::with_capacity(g.nodes.len()),
    };
    // The product the logits come from: the output itself, or (a bf16 graph) the Linear under
    // its widening cast.
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
            Val::Host
        } else if id == logits_id {
            s.logits(id, product)?
        } else {
            s.node(id)?
        };
        s.vals.push(v);
    }
    let Val::Cols { buf, .. } = s.vals[logits_id] else {
        unreachable!("the logits lower to a buffer")
    };
    s.l.logits = buf;
    Ok(s.l)
}
