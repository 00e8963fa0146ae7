//! Stage 1 of the GPU lowering: each graph node on its own, in graph order, to a value ([`Val`])
//! and at most one [`Step`]. What each op lowers to is its op module's (`crate::ops`); this
//! module holds what they share: the buffers, the values of the nodes lowered so far, and the
//! logits.
//!
//! Activations become packed `[tokens, columns]` buffers. A projection's weight may be stored in
//! a weight format the GPU kernels read (int8, fp8, int4, GGUF Q4_1/Q8_0: recorded as
//! `Launch::Linear::format`, run by `gemv_q.cu` and the prefill dequantization); any other weight
//! format is an error naming the weight. Logits are computed for each sequence's last token
//! only, in f32.

use super::{Lowered, Step, Val};
use crate::ir::{DType, Graph, NodeId, Op};
use crate::kernels::QuantFormat;
use crate::plan::{AttentionDims, BufId, BufType, Buffer, Epilogue, Launch, Rows};

/// The lowering context the op modules' `lower` functions work in.
pub(crate) struct Nodes<'g> {
    l: Lowered<'g>,
    vals: Vec<Val>,
}

impl<'g> Nodes<'g> {
    /// The graph being lowered.
    pub(crate) fn graph(&self) -> &'g Graph {
        self.l.g
    }

    /// The value of a node lowered already.
    pub(crate) fn val(&self, id: NodeId) -> &Val {
        &self.vals[id]
    }

    /// A buffer.
    pub(crate) fn buffer(&self, b: BufId) -> &Buffer {
        &self.l.buffers[b]
    }

    /// An error naming node `id`.
    pub(crate) fn err(&self, id: NodeId, msg: &str) -> String {
        self.l.err(id, msg)
    }

    /// Appends a step.
    pub(crate) fn push(&mut self, step: Step) {
        self.l.steps.push(step);
    }

    /// Adds a buffer.
    pub(crate) fn push_buffer(&mut self, b: Buffer) -> BufId {
        self.l.buffers.push(b);
        self.l.buffers.len() - 1
    }

    /// A new buffer for node `id`'s value (its last axis the columns).
    pub(crate) fn new_buf(
        &mut self,
        id: NodeId,
        rows: Rows,
        dtype: BufType,
    ) -> Result<BufId, String> {
        let ty = &self.l.g.nodes[id].ty;
        let cols = ty
            .shape
            .last()
            .and_then(|d| d.as_const())
            .ok_or_else(|| self.err(id, &format!("{ty} has no constant last axis")))?;
        Ok(self.push_buffer(Buffer {
            name: self.l.g.nodes[id].name.clone(),
            rows,
            cols: cols as usize,
            dtype,
            slot: 0,
        }))
    }

    /// A new buffer for node `id`'s value, written by the launch `launch(out)`.
    pub(crate) fn launch(
        &mut self,
        id: NodeId,
        rows: Rows,
        dtype: BufType,
        launch: impl FnOnce(BufId) -> Launch,
    ) -> Result<Val, String> {
        let out = self.new_buf(id, rows, dtype)?;
        self.push(Step::Launch(launch(out)));
        Ok(self.whole_val(out))
    }

    /// All columns of a buffer.
    pub(crate) fn whole_val(&self, buf: BufId) -> Val {
        Val::Cols {
            buf,
            off: 0,
            len: self.l.buffers[buf].cols,
        }
    }

    /// Input `input` of node `id` as a whole activation buffer.
    pub(crate) fn whole(&self, id: NodeId, input: NodeId) -> Result<BufId, String> {
        match &self.vals[input] {
            Val::Cols { buf, off: 0, len } if *len == self.l.buffers[*buf].cols => Ok(*buf),
            Val::Host => Err(self.err(
                id,
                &format!(
                    "reads `{}`, computed from positions, constants and weights alone (or a \
                     step input the GPU kernels do not take), which no GPU kernel computes",
                    self.l.g.nodes[input].name
                ),
            )),
            other => Err(self.err(
                id,
                &format!("needs a whole activation buffer as input, got {other:?}"),
            )),
        }
    }

    /// A weight read by a norm or embedding kernel, or a bias (stored in bf16).
    pub(crate) fn weight(&self, id: NodeId, input: NodeId) -> Result<String, String> {
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
    pub(crate) fn linear_weight(
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

    /// The next KV-cache layer, for an attention of geometry `dims` (one for every layer).
    pub(crate) fn next_layer(&mut self, id: NodeId, dims: AttentionDims) -> Result<usize, String> {
        if *self.l.attention.get_or_insert(dims) != dims {
            return Err(self.err(id, "attention geometry differs between layers"));
        }
        self.l.layers += 1;
        Ok(self.l.layers - 1)
    }

    fn node(&mut self, id: NodeId) -> Result<Val, String> {
        let ins = &self.l.g.nodes[id].inputs;
        let host = |v: &Val| {
            matches!(
                v,
                Val::Scalar(_) | Val::Weight(_) | Val::Positions | Val::Host
            )
        };
        if !ins.is_empty() && ins.iter().all(|&i| host(&self.vals[i])) {
            // Position or constant arithmetic (what a kernel needs of it, it computes from the
            // step's metadata): no launch, and an error where a launch reads it.
            return Ok(Val::Host);
        }
        crate::ops::lower(self, id)
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
        let last = self.push_buffer(Buffer {
            name: format!("{}.last", self.l.buffers[x].name),
            rows: Rows::Sequences,
            cols: self.l.buffers[x].cols,
            dtype: BufType::Bf16,
            slot: 0,
        });
        self.push(Step::Launch(Launch::GatherLast { x, out: last }));
        self.launch(id, Rows::Sequences, BufType::F32, |out| Launch::Linear {
            x: last,
            norm: None,
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
