//! The cost model, in one place. It drives extraction and is what `kiln inspect --explain`
//! reports before and after rewriting.
//!
//! **What a node costs.** The estimated time, in nanoseconds, of one decode step at the reference
//! sizes [`REFERENCE`] (batch 1, one new token, 1023 cached tokens) on an H100-class GPU:
//!
//! ```text
//! cost = launches · LAUNCH_NS + max(bytes / BYTES_PER_NS, flops / FLOPS_PER_NS)
//! ```
//!
//! - `bytes`: device-memory traffic: every input read once (a weight input is read in full, a
//!   `Gather` reads only the rows it picks) plus the output written once;
//! - `flops`: arithmetic (`2·m·n·k` for products, a few per element otherwise);
//! - `launches`: 1 for a kernel, 0 otherwise;
//! - a collective (`AllReduce`, `AllGather` of a tensor-parallel rank) adds the bytes it sends
//!   between GPUs, scaled by the ratio of device to NVLink bandwidth ([`LINK_BYTES_PER_NS`]).
//!
//! The constants come from the H100 measurements in `DESIGN.md`: 3 TB/s of copy bandwidth,
//! 800 TFLOP/s of bf16 tensor-core throughput, and about 1 µs of per-kernel overhead (the gap
//! between 291 kernels run eagerly and as a CUDA graph).
//!
//! **What is a kernel.** [`classify`] sorts every node into one [`Kind`]:
//!
//! - leaves (weights, step inputs, scalar constants) and *weight-only* nodes (computed from
//!   weights and constants alone: the QKV weight concatenation, transposes and casts of weights)
//!   cost nothing at run time: the build evaluates weight-only nodes once and stores the results
//!   as derived weights. Each such node costs [`DERIVE_NS`], so that among equal plans the one
//!   with fewer derived weights wins;
//! - *views* — `Reshape`, `Transpose`, `Slice` of a run-time value — cost nothing: the consumer
//!   reads its input through the view's strides (the QKV split, the head split and merge around
//!   attention). This is a choice about the backend: a kernel that cannot read a given view
//!   strided must copy it, and that copy is not counted here;
//! - a *cache append* — `Concat(state, new, axis)` whose first input is a state — writes only the
//!   new rows and launches nothing: the CUDA backend lowers it to an in-place append into the
//!   paged KV cache done by the attention step;
//! - everything else is a *kernel*: one launch.
//!
//! Helper e-nodes cost infinity, so they are never extracted.

use kiln_runtime::ir::{Graph, InputKind, Op, SymValues, TensorType};
use kiln_runtime::ops::Sizes;
use serde::Serialize;

/// Symbol values at which costs are evaluated: one decode step of one sequence, 1k context.
pub const REFERENCE: SymValues = SymValues {
    batch: 1,
    seq: 1,
    past: 1023,
};
/// Per-kernel launch overhead, nanoseconds.
pub const LAUNCH_NS: f64 = 1000.0;
/// Device-memory bandwidth, bytes per nanosecond (3 TB/s).
pub const BYTES_PER_NS: f64 = 3000.0;
/// Arithmetic throughput, flops per nanosecond (800 TFLOP/s).
pub const FLOPS_PER_NS: f64 = 800_000.0;
/// Bandwidth between two GPUs, bytes per nanosecond (NVLink 4: 450 GB/s each way).
pub const LINK_BYTES_PER_NS: f64 = 450.0;
/// Cost of deriving one weight at build time: a tie-breaker, not a run-time cost.
pub const DERIVE_NS: f64 = 0.001;

/// How a node executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    /// A weight, step input or scalar constant.
    Leaf,
    /// Computed from weights and constants only; evaluated at build time.
    WeightOnly,
    /// A reshape, transpose or slice, read strided by its consumer.
    View,
    /// A `Concat` onto a state: an in-place KV-cache append.
    CacheAppend,
    /// A kernel launch.
    Kernel,
}

/// What the cost model needs to know about an input.
#[derive(Clone, Copy, Debug)]
pub struct InputInfo<'a> {
    /// Its type.
    pub ty: &'a TensorType,
    /// Weight-only (a build-time constant).
    pub konst: bool,
    /// The step input kind, if it is one.
    pub input: Option<InputKind>,
}

/// The time of one op, broken down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Cost {
    /// Bytes moved through device memory.
    pub bytes: f64,
    /// Floating-point operations.
    pub flops: f64,
    /// Kernel launches.
    pub launches: f64,
    /// Build-time derivations (tie-breaker only).
    pub derived: f64,
}

impl Cost {
    /// Estimated nanoseconds (see the module doc).
    pub fn time_ns(&self) -> f64 {
        self.launches * LAUNCH_NS
            + (self.bytes / BYTES_PER_NS).max(self.flops / FLOPS_PER_NS)
            + self.derived * DERIVE_NS
    }
    /// The sum of two costs.
    pub fn plus(self, o: Cost) -> Cost {
        Cost {
            bytes: self.bytes + o.bytes,
            flops: self.flops + o.flops,
            launches: self.launches + o.launches,
            derived: self.derived + o.derived,
        }
    }
}

fn bytes(ty: &TensorType) -> f64 {
    SIZES.bytes(ty)
}

/// Sizes at the reference step.
const SIZES: Sizes = Sizes { syms: &REFERENCE };

/// The kind of a node with op `op` (no inputs for leaves), given its inputs and whether it is
/// weight-only itself.
pub fn classify(op: &Op, ins: &[InputInfo], konst: bool) -> Kind {
    match op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => Kind::Leaf,
        _ if konst => Kind::WeightOnly,
        Op::Reshape { .. } | Op::Transpose { .. } | Op::Slice { .. } => Kind::View,
        Op::Concat { .. }
            if ins
                .first()
                .is_some_and(|i| i.input == Some(InputKind::State)) =>
        {
            Kind::CacheAppend
        }
        _ => Kind::Kernel,
    }
}

/// The cost of one node: its op, its inputs, its output type and whether it is weight-only.
pub fn op_cost(op: &Op, ins: &[InputInfo], out: &TensorType, konst: bool) -> Cost {
    let kind = classify(op, ins, konst);
    match kind {
        Kind::Leaf | Kind::View => return Cost::default(),
        Kind::WeightOnly => {
            return Cost {
                derived: 1.0,
                ..Cost::default()
            }
        }
        Kind::CacheAppend => {
            let new: f64 = ins[1..].iter().map(|i| bytes(i.ty)).sum();
            return Cost {
                bytes: 2.0 * new,
                ..Cost::default()
            };
        }
        Kind::Kernel => {}
    }
    let tys: Vec<&TensorType> = ins.iter().map(|i| i.ty).collect();
    let w = kiln_runtime::ops::work(op, &tys, out, &SIZES);
    Cost {
        bytes: w.read + bytes(out) + w.link * BYTES_PER_NS / LINK_BYTES_PER_NS,
        flops: w.flops,
        launches: 1.0,
        derived: 0.0,
    }
}

/// Whether each node of a graph is weight-only, as the CPU executor decides what it evaluates at
/// load time: weights and constants are; an op is if its sizes are not symbolic and all its
/// inputs are.
pub fn weight_only(graph: &Graph) -> Vec<bool> {
    let mut konst = vec![false; graph.nodes.len()];
    for (id, n) in graph.nodes.iter().enumerate() {
        konst[id] = match &n.op {
            Op::Input { .. } => false,
            op if op.is_collective() => false,
            Op::Weight { .. } | Op::Constant { .. } => true,
            op => op.is_static() && n.inputs.iter().all(|&i| konst[i]),
        };
    }
    konst
}

/// The kind and cost of every node of a graph, and their sum (each node counted once: a DAG).
pub struct GraphCost {
    /// Per node, in graph order.
    pub nodes: Vec<(Kind, Cost)>,
    /// The sum over nodes.
    pub total: Cost,
}

/// Classifies and costs every node of `graph`.
pub fn graph_cost(graph: &Graph) -> GraphCost {
    let konst = weight_only(graph);
    let mut total = Cost::default();
    let nodes = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(id, n)| {
            let ins: Vec<InputInfo> = n
                .inputs
                .iter()
                .map(|&i| InputInfo {
                    ty: &graph.nodes[i].ty,
                    konst: konst[i],
                    input: match graph.nodes[i].op {
                        Op::Input { kind } => Some(kind),
                        _ => None,
                    },
                })
                .collect();
            let kind = classify(&n.op, &ins, konst[id]);
            let cost = op_cost(&n.op, &ins, &n.ty, konst[id]);
            total = total.plus(cost);
            (kind, cost)
        })
        .collect();
    GraphCost { nodes, total }
}
