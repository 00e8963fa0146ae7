//! Lowering for the GPU: the optimized graph → a launch plan (`crate::plan::Plan`), in
//! three stages, data flowing one way:
//!
//! 1. [`nodes`]: every graph node lowers on its own, through its op module's `lower`
//!    (`crate::ops`) — a view of a buffer (`Reshape`, `Transpose`, `Cast`, `Slice` of the last
//!    axis cost nothing), or one [`Step`]: a launch as the plan runs it (`Embedding`, `RmsNorm`,
//!    `Linear` with its epilogue, `GatherLast` of the logits' rows), or an op that has no kernel
//!    of its own (`Rope`, a KV-cache append, a constant scale, `FusedAttention` over roped and
//!    appended columns).
//! 2. [`peephole`]: the merges that save launches, each a pass with its own tests — the
//!    embedding's constant scale into the embedding, RoPE and both cache appends into one
//!    `RopeAppend` before the attention, the logits' row gather before the final norm, an
//!    `RmsNorm` read only by projections into their GEMV prologue.
//! 3. [`finish`]: a step left without a kernel fails the build naming its node; buffers no
//!    launch uses are dropped and the rest get arena slots.
//!
//! [`interpret`] runs a plan on the CPU, launch by launch: the lowering's oracle in the tests.
//!
//! Any op with no lowering fails naming the node, and a value computed from positions,
//! constants and weights alone (which no kernel computes) fails where a launch needs it: nothing
//! the graph says is absorbed silently.

pub mod interpret;
mod nodes;
mod peephole;

pub(crate) use nodes::Nodes;

use crate::ir::{Graph, NodeId};
use crate::plan::{AttentionDims, BufId, Buffer, Launch, Plan};

/// What a graph node is, seen from the GPU.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Val {
    /// Token ids.
    Tokens,
    /// The step's positions (kernels read them from the step's metadata).
    Positions,
    /// A KV-cache state input.
    State,
    /// A weight (stored, or derived at build time).
    Weight(String),
    /// A scalar constant.
    Scalar(f32),
    /// Computed from positions, constants and weights alone, or a step input no kernel takes:
    /// fine where nothing on the GPU reads it, an error where a launch would.
    Host,
    /// Columns `off..off+len` of an activation buffer.
    Cols { buf: BufId, off: usize, len: usize },
    /// Columns of a buffer after node `rope`'s in-place RoPE with table `freq` (a weight).
    Roped {
        rope: NodeId,
        buf: BufId,
        off: usize,
        len: usize,
        freq: String,
    },
    /// A KV cache after node `append` appended columns `off..` of `buf` (roped by node `rope`).
    Appended {
        append: NodeId,
        buf: BufId,
        off: usize,
        rope: Option<(NodeId, String)>,
    },
}

/// One graph op lowered on its own, before the peepholes merge neighbours.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    /// A launch as the plan runs it.
    Launch(Launch),
    /// `out = x · c`, `c` a scalar constant (Gemma's `embedding · √hidden`). No kernel: folded
    /// into the embedding that writes `x`.
    Scale {
        node: NodeId,
        x: BufId,
        c: f32,
        out: BufId,
    },
    /// RoPE in place on columns `off..off+len` of `buf`. No kernel: part of `RopeAppend`.
    Rope {
        node: NodeId,
        buf: BufId,
        off: usize,
        len: usize,
    },
    /// Columns `off..off+len` of `buf` appended to a KV cache. No kernel: part of `RopeAppend`.
    Append {
        node: NodeId,
        buf: BufId,
        off: usize,
        len: usize,
    },
    /// Causal attention of q over the caches k and v of KV-cache layer `layer`.
    Attention {
        node: NodeId,
        q: Val,
        k: Val,
        v: Val,
        layer: usize,
        scale: f32,
        window: u32,
        out: BufId,
    },
}

impl Step {
    /// The buffers the step reads (a RoPE reads and writes its buffer in place).
    fn reads(&self) -> Vec<BufId> {
        let buf_of = |v: &Val| match v {
            Val::Cols { buf, .. } | Val::Roped { buf, .. } | Val::Appended { buf, .. } => {
                Some(*buf)
            }
            _ => None,
        };
        match self {
            Step::Launch(l) => Plan::reads_writes(l).0,
            Step::Scale { x, .. } => vec![*x],
            Step::Rope { buf, .. } | Step::Append { buf, .. } => vec![*buf],
            Step::Attention { q, k, v, .. } => [q, k, v].into_iter().filter_map(buf_of).collect(),
        }
    }
}

/// The lowered graph between the stages: buffers, steps in order, and what the plan records.
pub(super) struct Lowered<'g> {
    pub g: &'g Graph,
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    pub attention: Option<AttentionDims>,
    pub layers: usize,
    pub logits: BufId,
}

impl Lowered<'_> {
    /// An error naming graph node `id`.
    pub fn err(&self, id: NodeId, msg: &str) -> String {
        let n = &self.g.nodes[id];
        format!("GPU lowering: node `{}` ({}): {msg}", n.name, n.op)
    }

    /// Indices of the steps that read `buf`.
    pub fn readers(&self, buf: BufId) -> Vec<usize> {
        (0..self.steps.len())
            .filter(|&i| self.steps[i].reads().contains(&buf))
            .collect()
    }
}

/// Lowers an optimized graph with a `logits` output to a launch plan.
pub fn lower(g: &Graph) -> Result<Plan, String> {
    let mut l = nodes::lower_nodes(g)?;
    peephole::run(&mut l)?;
    finish(l)
}

/// The plan of the merged steps: every step must be a launch now; buffers that no launch uses
/// are dropped (keeping the others' order) and the rest get arena slots.
fn finish(l: Lowered) -> Result<Plan, String> {
    let mut launches = Vec::with_capacity(l.steps.len());
    for s in &l.steps {
        match s {
            Step::Launch(launch) => launches.push(launch.clone()),
            Step::Scale { node, .. } => {
                return Err(l.err(
                    *node,
                    "has no GPU kernel (only an embedding times a constant, read by nothing \
                     else, folds into the embedding)",
                ))
            }
            Step::Rope { node, .. } | Step::Append { node, .. } => {
                return Err(l.err(
                    *node,
                    "has no GPU kernel of its own: RoPE and the KV-cache appends run in the \
                     attention block's rope_append, over q, k, v of one fused QKV projection",
                ))
            }
            Step::Attention { node, .. } => {
                return Err(l.err(*node, "attention was not merged with its RoPE and appends"))
            }
        }
    }
    let attention = l
        .attention
        .ok_or("GPU lowering: the graph has no FusedAttention (was the rewriter run?)")?;
    let mut used = vec![false; l.buffers.len()];
    used[l.logits] = true;
    for launch in &launches {
        let (reads, write) = Plan::reads_writes(launch);
        for b in reads.into_iter().chain(write) {
            used[b] = true;
        }
    }
    let mut new_id = vec![usize::MAX; l.buffers.len()];
    let mut buffers = Vec::new();
    for (b, buffer) in l.buffers.into_iter().enumerate() {
        if used[b] {
            new_id[b] = buffers.len();
            buffers.push(buffer);
        }
    }
    for launch in &mut launches {
        renumber(launch, &new_id);
    }
    let logits = new_id[l.logits];
    let mut plan = Plan {
        attention,
        layers: l.layers,
        vocab: buffers[logits].cols,
        buffers,
        launches,
        logits,
    };
    plan.assign_slots();
    Ok(plan)
}

/// Rewrites a launch's buffer ids through `new_id`.
fn renumber(launch: &mut Launch, new_id: &[BufId]) {
    use crate::plan::Epilogue;
    let mut ids: Vec<&mut BufId> = match launch {
        Launch::Embedding { out, .. } => vec![out],
        Launch::GatherLast { x, out } | Launch::RmsNorm { x, out, .. } => vec![x, out],
        Launch::Linear {
            x, epilogue, out, ..
        } => match epilogue {
            Epilogue::Residual(r) => vec![x, r, out],
            _ => vec![x, out],
        },
        Launch::RopeAppend { qkv, .. } => vec![qkv],
        Launch::Attention { qkv, out, .. } => vec![qkv, out],
    };
    for id in ids.iter_mut() {
        **id = new_id[**id];
    }
}
