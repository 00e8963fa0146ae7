//! The CPU executor: runs a [`Graph`] in `f32` on the host. It is the numerical oracle for every
//! rewrite and kernel of the project, and the fallback where no GPU exists.
//!
//! - Values are strided views over shared buffers (`tensor.rs`): Transpose, Slice and Reshape
//!   (wherever the strides allow, always for contiguous data) copy nothing; an op that needs
//!   contiguous data makes a copy itself. Floats (`f32`, `f16`, `bf16`) are computed in `f32`;
//!   `Cast` to `f16`/`bf16` rounds to that precision. `i32` and `bool` values are stored as `i32`,
//!   so integers are exact.
//! - Weight-only subgraphs (weights, constants and any node computed only from them, e.g. the
//!   transpose or concatenation of weights) are evaluated once by [`CpuExecutor::new`]; only the
//!   values that step-time nodes read are kept (a tap of another one is refused).
//! - A step evaluates the other nodes in order and frees each intermediate value once its last
//!   reader has run, except outputs, state updates and tapped nodes. Element-wise ops write into
//!   their input's buffer when nothing else holds it, and large freed buffers are reused within
//!   the step (`pool.rs`).
//! - Kernels: `matmul.rs` (batched products; the streaming `x · Wᵀ` kernel of `simd.rs` for the
//!   few rows of a decode step, `gemm` otherwise), `elementwise.rs`, `reduce.rs` (reductions and
//!   softmax, with the `exp` of `math.rs`), `movement.rs` (gather, concat, KV append); the ops'
//!   CPU references, the fused ones included, are their op modules' (`crate::ops`), over these. Large work is spread over rayon's threads.
//! - State inputs (KV caches) start empty (their shape with `past = 0`; zeros if that is not
//!   empty) and take the value of their update node after each step. An update that is a
//!   `Concat` of the state with new entries appends in place into spare room of the state's
//!   buffer (which grows by doubling), so a decode step does not copy the cache. A failed step
//!   leaves the session as it was.

pub(crate) mod elementwise;
mod eval;
mod math;
pub(crate) mod matmul;
pub(crate) mod movement;
pub mod paged;
mod pool;
pub(crate) mod reduce;
pub(crate) mod rows;
mod simd;
pub(crate) mod tensor;
#[cfg(test)]
mod tests;

use crate::collective::Collective;
use crate::ir::dim::eval_shape;
use crate::ir::{DType, Graph, GraphError, InputKind, NodeId, Op, SymValues};
use crate::ops::eval as eval_op;
use eval::{check_type, into_host, weight_tensor};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use tensor::{is_int_storage, Tensor};

/// A host tensor in `f32`, row-major. Integer and bool values are converted to `f32` (exact for
/// magnitudes up to 2^24; bools are 0 and 1).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Extent of each axis.
    pub shape: Vec<usize>,
    /// The elements, row-major; `len = Π shape`.
    pub data: Vec<f32>,
}

/// What a step returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    /// The graph outputs by name (e.g. `logits` `[batch, seq, vocab]`).
    pub outputs: BTreeMap<String, HostTensor>,
    /// The values of the tapped nodes, by node name.
    pub taps: BTreeMap<String, HostTensor>,
}

/// An error of construction or of a step; messages name the weight, node or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The graph does not validate.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// The graph uses something this executor cannot run.
    #[error("unsupported graph: {0}")]
    Unsupported(String),
    /// A weight could not be loaded (returned by loaders, or for unusable weight data).
    #[error("weight `{name}`: {message}")]
    Weight {
        /// Checkpoint name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// The loader returned the wrong number of values for a weight.
    #[error("weight `{name}`: expected shape {expected:?} ({} values), the loader returned {found} values", expected.iter().product::<usize>())]
    WeightShape {
        /// Checkpoint name.
        name: String,
        /// The shape the graph declares.
        expected: Vec<usize>,
        /// Number of values returned.
        found: usize,
    },
    /// A tap names no node of the graph.
    #[error("unknown tap `{0}`: the graph has no node of that name")]
    UnknownTap(String),
    /// A tap names a weight-only node whose value was not kept after construction.
    #[error("tap `{0}` is a weight-only node, evaluated once at load time and not kept; tap a node that reads it")]
    FoldedTap(String),
    /// The step's arguments do not fit the session or the graph.
    #[error("bad step input: {0}")]
    Input(String),
    /// A node failed while running.
    #[error("node `{node}` ({op}): {message}")]
    Node {
        /// Node name.
        node: String,
        /// The op, as printed in graphs.
        op: String,
        /// What went wrong, with shapes.
        message: String,
    },
}

/// Runs a graph on the CPU in `f32`. Shareable between threads; each sequence batch has its own
/// [`CpuSession`].
pub struct CpuExecutor {
    graph: Graph,
    /// Weight-only nodes (evaluated at construction).
    is_const: Vec<bool>,
    /// Kept values of weight-only nodes that step-time nodes, outputs or states read.
    consts: Vec<Option<Tensor>>,
    /// For step-time nodes: readers, plus one per output and state binding naming the node.
    uses: Vec<usize>,
    /// Nodes whose value survives the step: outputs and state updates.
    pinned: Vec<bool>,
    /// For each `State` input node, the index of its binding in `graph.states`.
    state_index: Vec<Option<usize>>,
    /// For each state update that concatenates new entries to its state (a KV-cache append):
    /// the binding and the axis.
    appends: Vec<Option<(usize, usize)>>,
    /// The group of a sharded graph's `AllReduce`/`AllGather` ops (none: one rank).
    collective: Option<Arc<dyn Collective>>,
}

/// Runs one collective op over `group`.
fn collective(group: &dyn Collective, op: &Op, mut ins: Vec<Tensor>) -> Result<Tensor, String> {
    let x = ins.pop().expect("arity checked by validation");
    let (dtype, shape) = (x.dtype, x.shape.clone());
    let mut data = x.into_vec::<f32>();
    match *op {
        Op::AllReduce { .. } => {
            group.all_reduce_sum(&mut data)?;
            Ok(Tensor::new(dtype, shape, data))
        }
        Op::AllGather { axis, .. } => {
            let pieces = group
                .all_gather(&data)?
                .into_iter()
                .map(|p| {
                    if p.len() != data.len() {
                        return Err(format!(
                            "all-gather of {} values, a rank sent {}",
                            data.len(),
                            p.len()
                        ));
                    }
                    Ok(Tensor::new(dtype, shape.clone(), p))
                })
                .collect::<Result<Vec<_>, String>>()?;
            movement::concat(pieces, axis)
        }
        _ => unreachable!("only collectives are dispatched here"),
    }
}

/// The per-sequence-batch state of a run: the KV caches and the number of tokens they hold.
pub struct CpuSession {
    batch: usize,
    past: usize,
    /// Value of each state binding, `None` before the first step.
    states: Vec<Option<Tensor>>,
}

impl CpuSession {
    /// Tokens already processed per sequence (the `past` symbol of the next step).
    pub fn past(&self) -> usize {
        self.past
    }
    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

impl fmt::Debug for CpuSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuSession")
            .field("batch", &self.batch)
            .field("past", &self.past)
            .finish()
    }
}

impl fmt::Debug for CpuExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self.consts.iter().flatten().count();
        f.debug_struct("CpuExecutor")
            .field("nodes", &self.graph.nodes.len())
            .field("kept_constants", &kept)
            .finish()
    }
}

impl CpuExecutor {
    /// Validates the graph, loads every weight with `load(name, expected_shape)` (row-major `f32`
    /// data, `len = Π shape`) and evaluates the weight-only subgraphs once.
    pub fn new(
        graph: Graph,
        mut load: impl FnMut(&str, &[usize]) -> Result<Vec<f32>, ExecError>,
    ) -> Result<CpuExecutor, ExecError> {
        graph.validate()?;
        let n = graph.nodes.len();
        let mut state_index = vec![None; n];
        for (j, s) in graph.states.iter().enumerate() {
            if state_index[s.input].replace(j).is_some() {
                return Err(ExecError::Unsupported(format!(
                    "state `{}` has two bindings",
                    graph.nodes[s.input].name
                )));
            }
        }
        let mut is_const = vec![false; n];
        for (id, node) in graph.nodes.iter().enumerate() {
            if node.op
                == (Op::Input {
                    kind: InputKind::State,
                })
                && state_index[id].is_none()
            {
                return Err(ExecError::Unsupported(format!(
                    "state input `{}` has no binding (no update node)",
                    node.name
                )));
            }
            is_const[id] = node.op.is_static() && node.inputs.iter().all(|&i| is_const[i]);
        }
        // Readers of each node among step-time nodes (plus outputs and states), and among
        // weight-only nodes.
        let mut uses = vec![0usize; n];
        let mut const_uses = vec![0usize; n];
        for (id, node) in graph.nodes.iter().enumerate() {
            for &i in &node.inputs {
                if is_const[id] {
                    const_uses[i] += 1;
                } else {
                    uses[i] += 1;
                }
            }
        }
        let mut pinned = vec![false; n];
        for &id in graph
            .outputs
            .iter()
            .map(|(_, id)| id)
            .chain(graph.states.iter().map(|s| &s.update))
        {
            uses[id] += 1;
            pinned[id] = true;
        }
        let no_syms = SymValues {
            batch: 0,
            seq: 0,
            past: 0,
        };
        let mut consts: Vec<Option<Tensor>> = vec![None; n];
        for (id, node) in graph.nodes.iter().enumerate() {
            if !is_const[id] {
                continue;
            }
            let value = if let Op::Weight { name } = &node.op {
                let Some(shape) = node
                    .ty
                    .shape
                    .iter()
                    .map(|d| d.as_const().and_then(|c| usize::try_from(c).ok()))
                    .collect::<Option<Vec<usize>>>()
                else {
                    return Err(ExecError::Unsupported(format!(
                        "weight `{name}` has the symbolic type {}",
                        node.ty
                    )));
                };
                let data = load(name, &shape)?;
                weight_tensor(name, &node.ty, shape, data)?
            } else {
                let ins = node
                    .inputs
                    .iter()
                    .map(|&i| {
                        consts[i]
                            .clone()
                            .expect("weight-only inputs are kept until read")
                    })
                    .collect();
                let err = |message| ExecError::Node {
                    node: node.name.clone(),
                    op: node.op.to_string(),
                    message,
                };
                let v = eval_op(&node.op, ins, &no_syms).map_err(err)?;
                check_type(&v, &node.ty, &no_syms).map_err(err)?;
                v
            };
            consts[id] = Some(value);
            for &i in &node.inputs {
                const_uses[i] -= 1;
                if const_uses[i] == 0 && uses[i] == 0 {
                    consts[i] = None;
                }
            }
            if const_uses[id] == 0 && uses[id] == 0 {
                consts[id] = None;
            }
        }
        let mut appends = vec![None; n];
        for (j, s) in graph.states.iter().enumerate() {
            let u = &graph.nodes[s.update];
            if let Op::Concat { axis } = u.op {
                if u.inputs.first() == Some(&s.input) && appends[s.update].is_none() {
                    appends[s.update] = Some((j, axis));
                }
            }
        }
        Ok(CpuExecutor {
            graph,
            is_const,
            consts,
            uses,
            pinned,
            state_index,
            appends,
            collective: None,
        })
    }

    /// Runs the graph's collectives (`AllReduce`, `AllGather`: a graph sharded by
    /// `kiln build --tp`) over `group`, whose size must be the graph's.
    pub fn with_collective(mut self, group: Arc<dyn Collective>) -> Result<CpuExecutor, ExecError> {
        for n in &self.graph.nodes {
            if let Op::AllReduce { ranks } | Op::AllGather { ranks, .. } = n.op {
                if ranks as usize != group.ranks() {
                    return Err(ExecError::Unsupported(format!(
                        "node `{}` is a collective of {ranks} ranks, the group has {}",
                        n.name,
                        group.ranks()
                    )));
                }
            }
        }
        self.collective = Some(group);
        Ok(self)
    }

    /// The graph this executor runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// A fresh session (empty KV caches) for `batch` sequences.
    pub fn session(&self, batch: usize) -> CpuSession {
        CpuSession {
            batch,
            past: 0,
            states: vec![None; self.graph.states.len()],
        }
    }

    /// Runs one step: `tokens` is `[batch, seq]` row-major (`batch` from the session, `seq =
    /// tokens.len() / batch`), at positions `past .. past+seq` where `past = session.past()`.
    /// Appends to the states and advances `past` by `seq`. Returns the graph outputs by name and
    /// the values of the nodes named in `taps`. On error the session is unchanged.
    pub fn step(
        &self,
        session: &mut CpuSession,
        tokens: &[i32],
        taps: &[&str],
    ) -> Result<StepOutput, ExecError> {
        self.step_with(session, tokens, &BTreeMap::new(), taps)
    }

    /// [`CpuExecutor::step`] of a pipeline stage: `activations` holds, by node name, the values
    /// of its `Activation` inputs (the previous stage's outputs).
    pub fn step_with(
        &self,
        session: &mut CpuSession,
        tokens: &[i32],
        activations: &BTreeMap<String, HostTensor>,
        taps: &[&str],
    ) -> Result<StepOutput, ExecError> {
        let out = pool::with_pool(|| self.step_pooled(session, tokens, activations, taps));
        if let (Err(e), Some(group)) = (&out, &self.collective) {
            // The other ranks would wait for this one at their next collective.
            group.abort(&e.to_string());
        }
        out
    }

    /// [`CpuExecutor::step`], with large buffers recycled through the step's pool.
    fn step_pooled(
        &self,
        session: &mut CpuSession,
        tokens: &[i32],
        activations: &BTreeMap<String, HostTensor>,
        taps: &[&str],
    ) -> Result<StepOutput, ExecError> {
        let batch = session.batch;
        if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) {
            return Err(ExecError::Input(format!(
                "{} tokens do not form [batch={batch}, seq ≥ 1]",
                tokens.len()
            )));
        }
        let seq = tokens.len() / batch;
        let past = session.past;
        if i32::try_from(past + seq).is_err() {
            return Err(ExecError::Input(format!(
                "position {} exceeds i32",
                past + seq
            )));
        }
        let syms = SymValues { batch, seq, past };
        let mut pinned = self.pinned.clone();
        let mut tap_ids = Vec::with_capacity(taps.len());
        for &name in taps {
            let id = self
                .graph
                .find(name)
                .ok_or_else(|| ExecError::UnknownTap(name.into()))?;
            if self.is_const[id] && self.consts[id].is_none() {
                return Err(ExecError::FoldedTap(name.into()));
            }
            pinned[id] = true;
            tap_ids.push((name, id));
        }

        let mut vals: Vec<Option<Tensor>> = vec![None; self.graph.nodes.len()];
        // States appended in place: (binding, update node, axis, length before the step).
        let mut appended = Vec::new();
        let ran = self.run_nodes(
            session,
            tokens,
            activations,
            syms,
            &pinned,
            &mut vals,
            &mut appended,
        );
        if let Err(e) = ran {
            // Give back the states whose buffers the step took: their old entries are intact.
            for (j, update, axis, len) in appended {
                let t: &Tensor = vals[update].as_ref().expect("state updates are pinned");
                session.states[j] = Some(t.slice_axis(axis, 0, len));
            }
            return Err(e);
        }

        let value = |vals: &[Option<Tensor>], id: NodeId| -> Tensor {
            if self.is_const[id] {
                self.consts[id].clone().expect("kept")
            } else {
                vals[id].clone().expect("pinned values survive the step")
            }
        };
        session.states = self
            .graph
            .states
            .iter()
            .map(|s| Some(value(&vals, s.update)))
            .collect();
        session.past += seq;
        // Outputs and taps, handing buffers over without a copy at their last use.
        let mut reads: HashMap<NodeId, usize> = HashMap::new();
        let named: Vec<(String, NodeId, bool)> = (self.graph.outputs.iter())
            .map(|(name, id)| (name.clone(), *id, true))
            .chain(
                tap_ids
                    .iter()
                    .map(|(name, id)| (name.to_string(), *id, false)),
            )
            .collect();
        for (_, id, _) in &named {
            *reads.entry(*id).or_default() += 1;
        }
        let mut out = StepOutput::default();
        for (name, id, is_output) in named {
            let left = reads.get_mut(&id).expect("counted");
            *left -= 1;
            let t = if *left == 0 && !self.is_const[id] {
                vals[id].take().expect("pinned values survive the step")
            } else {
                value(&vals, id)
            };
            let map = if is_output {
                &mut out.outputs
            } else {
                &mut out.taps
            };
            map.insert(name, into_host(t));
        }
        Ok(out)
    }

    /// Evaluates the step-time nodes in order into `vals`, freeing each value after its last
    /// reader unless it is `pinned`.
    #[allow(clippy::too_many_arguments)]
    fn run_nodes(
        &self,
        session: &mut CpuSession,
        tokens: &[i32],
        activations: &BTreeMap<String, HostTensor>,
        syms: SymValues,
        pinned: &[bool],
        vals: &mut [Option<Tensor>],
        appended: &mut Vec<(usize, NodeId, usize, usize)>,
    ) -> Result<(), ExecError> {
        let SymValues { batch, seq, past } = syms;
        let mut remaining = self.uses.clone();
        for (id, node) in self.graph.nodes.iter().enumerate() {
            if self.is_const[id] {
                continue;
            }
            let err = |message| ExecError::Node {
                node: node.name.clone(),
                op: node.op.to_string(),
                message,
            };
            let value = match &node.op {
                Op::Input {
                    kind: InputKind::Tokens,
                } => Tensor::new(DType::I32, vec![batch, seq], tokens.to_vec()),
                Op::Input {
                    kind: InputKind::Positions,
                } => {
                    let pos = (past as i32..(past + seq) as i32).collect();
                    Tensor::new(DType::I32, vec![seq], pos)
                }
                Op::Input {
                    kind: InputKind::Activation,
                } => {
                    let t = activations.get(&node.name).ok_or_else(|| {
                        ExecError::Input(format!(
                            "the step needs `{}` from the previous pipeline stage",
                            node.name
                        ))
                    })?;
                    Tensor::new(node.ty.dtype, t.shape.clone(), t.data.clone())
                }
                Op::Input {
                    kind: InputKind::State,
                } => {
                    let j = self.state_index[id].expect("checked at construction");
                    match &session.states[j] {
                        Some(t) => t.clone(),
                        None => {
                            let shape = eval_shape(&node.ty.shape, &SymValues { past: 0, ..syms });
                            let numel = shape.iter().product();
                            if is_int_storage(node.ty.dtype) {
                                Tensor::new(node.ty.dtype, shape, vec![0i32; numel])
                            } else {
                                Tensor::new(node.ty.dtype, shape, vec![0f32; numel])
                            }
                        }
                    }
                }
                op => {
                    let ins: Vec<Tensor> = node
                        .inputs
                        .iter()
                        .map(|&i| {
                            if self.is_const[i] {
                                self.consts[i]
                                    .clone()
                                    .expect("weight-only values read at step time are kept")
                            } else {
                                vals[i]
                                    .clone()
                                    .expect("inputs are evaluated before their readers")
                            }
                        })
                        .collect();
                    for &i in &node.inputs {
                        if !self.is_const[i] {
                            remaining[i] -= 1;
                            if remaining[i] == 0 && !pinned[i] {
                                vals[i] = None;
                            }
                        }
                    }
                    if let (Some(group), Op::AllReduce { .. } | Op::AllGather { .. }) =
                        (&self.collective, op)
                    {
                        collective(group.as_ref(), op, ins).map_err(err)?
                    } else if let Some((j, axis)) = self.appends[id] {
                        // A state's own update: append to its buffer, in place if the session's
                        // reference was the only other one.
                        let shape = movement::concat_shape(&ins, axis).map_err(err)?;
                        appended.push((j, id, axis, ins[0].shape[axis]));
                        session.states[j] = None;
                        movement::append(ins, axis, shape)
                    } else {
                        eval_op(op, ins, &syms).map_err(err)?
                    }
                }
            };
            let checked = check_type(&value, &node.ty, &syms);
            // Stored even when mistyped: a state update's buffer may hold the session's state.
            vals[id] = Some(value);
            checked.map_err(err)?;
        }
        Ok(())
    }
}
