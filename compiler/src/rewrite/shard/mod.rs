//! Tensor parallelism as a graph pass: the unsharded model graph → the graph of one rank of an
//! `n`-rank group (`kiln build --tp n`, `kiln inspect --tp n`), before any fusion.
//!
//! The pass follows, op by op, how each value is spread over the ranks ([`Layout`]: axes split
//! into contiguous parts, or partial sums) and emits each rank's share of the work, in the
//! Megatron-LM pattern, found from the math rather than from names:
//!
//! - a product of a replicated activation by a weight is **column-parallel**: each rank computes
//!   a contiguous part of the output columns from the matching rows of the checkpoint matrix.
//!   The parts follow what the result becomes: split into heads, a part is whole heads (so a
//!   fused QKV stays per-rank, and with fewer KV heads than ranks each KV head is replicated on
//!   `n / kv_heads` consecutive ranks, as TensorRT-LLM does);
//! - a product whose contraction axis is split (the attention output projection, the MLP's down
//!   projection) is **row-parallel**: each rank multiplies by its rows of the weight and holds a
//!   partial sum, completed by an `AllReduce` just before the first op that is not the sum
//!   itself (so a residual add comes after the all-reduce, never inside it);
//! - an embedding table whose rows divide among the ranks is **vocabulary-parallel**: each rank
//!   keeps its rows (`GatherShard`: zeros for other ids) and an `AllReduce` completes the rows;
//!   a tied `lm_head` reads the same rows, column-parallel, and the logits end in an `AllGather`;
//! - element-wise ops, RoPE, attention (per head), reshapes and transposes run on each rank's
//!   part; a KV cache takes the layout of what is appended to it.
//!
//! A column split is only worth it if its parts stay split until a row-parallel product (or an
//! output). Where a part would have to be gathered back (a norm over a split axis, a slice of a
//! fused projection), the pass marks that column split as replicated and runs again, until no
//! gather remains but at the outputs. Every choice depends on `n` only, never on the rank, so
//! the ranks' graphs agree; weights are sliced by `Slice` ops over the checkpoint's tensors,
//! which the rewriter folds into per-rank derived weights.

pub mod layout;

use crate::rewrite::cost::weight_only;
use kiln_runtime::ir::{BinaryOp, Dim, Graph, InputKind, NodeId, Op, StateBinding};
use layout::reshape_layout;
pub use layout::Layout;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Why a graph cannot be sharded.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The group size or rank is out of range.
    #[error("{0}")]
    Options(String),
    /// A node of the graph cannot be emitted for a rank.
    #[error("sharding node `{node}`: {message}")]
    Node {
        /// The node of the unsharded graph.
        node: String,
        /// What went wrong.
        message: String,
    },
}

/// How the pass spread the model's weights over the ranks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardPlan {
    /// Products whose output columns are split (by the product node's name).
    pub column: Vec<String>,
    /// Products whose contraction is split, ending in an all-reduce.
    pub row: Vec<String>,
    /// Embedding lookups split by vocabulary rows.
    pub vocab: Vec<String>,
    /// Column splits tried and given up (their parts would have been gathered back).
    pub replicated: Vec<String>,
    /// `AllReduce` ops of a step.
    pub all_reduces: usize,
    /// `AllGather` ops of a step.
    pub all_gathers: usize,
}

impl ShardPlan {
    /// One line for `kiln build`: how many products of each kind, the collectives per step.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "tensor parallel: {} column-parallel and {} row-parallel products, {} \
             vocabulary-parallel lookup(s); {} all-reduce(s) and {} all-gather(s) per step",
            self.column.len(),
            self.row.len(),
            self.vocab.len(),
            self.all_reduces,
            self.all_gathers
        );
        if !self.replicated.is_empty() {
            s += &format!(
                "; replicated on every rank (their parts would be gathered back): {}",
                self.replicated.join(", ")
            );
        }
        s
    }
}

/// The graph of rank `rank` of `ranks`, and the plan (the same for every rank).
pub fn shard(graph: &Graph, ranks: u32, rank: u32) -> Result<(Graph, ShardPlan), ShardError> {
    if ranks == 0 || !ranks.is_power_of_two() || ranks > 64 {
        return Err(ShardError::Options(format!(
            "a tensor-parallel group of {ranks} ranks: use a power of two up to 64"
        )));
    }
    if rank >= ranks {
        return Err(ShardError::Options(format!(
            "rank {rank} of a group of {ranks}"
        )));
    }
    if let Some(n) = graph
        .nodes
        .iter()
        .find(|n| n.op.is_collective() || matches!(n.op, Op::GatherShard { .. }))
    {
        return Err(ShardError::Node {
            node: n.name.clone(),
            message: "the graph is already sharded".into(),
        });
    }
    let mut vetoed = BTreeSet::new();
    loop {
        let mut pass = Pass::new(graph, ranks, rank, &vetoed);
        pass.run()?;
        if pass.veto.is_subset(&vetoed) {
            let mut plan = pass.plan;
            plan.replicated = vetoed
                .iter()
                .map(|&id| graph.nodes[id].name.clone())
                .filter(|n| !plan.row.contains(n))
                .collect();
            return Ok((pass.out, plan));
        }
        vetoed.extend(pass.veto);
    }
}

/// A value of the unsharded graph as one rank holds it.
#[derive(Clone, Debug)]
struct Val {
    /// Its node in the rank's graph.
    id: NodeId,
    layout: Layout,
    /// The column splits its parts come from.
    origins: BTreeSet<NodeId>,
}

struct Pass<'a> {
    g: &'a Graph,
    n: u32,
    rank: u32,
    konst: Vec<bool>,
    readers: Vec<Vec<NodeId>>,
    vetoed: &'a BTreeSet<NodeId>,
    /// Column splits whose parts had to be gathered back.
    veto: BTreeSet<NodeId>,
    out: Graph,
    names: HashSet<String>,
    vals: Vec<Option<Val>>,
    /// Weight-only nodes emitted whole, and their slices, by (node, chunks).
    konst_ids: HashMap<NodeId, NodeId>,
    slices: HashMap<(NodeId, Vec<Chunk>), NodeId>,
    /// Values already converted to another layout ([`Pass::make`]), so each conversion (an
    /// all-reduce, say) is emitted once however many ops read it.
    converted: HashMap<(NodeId, Layout), NodeId>,
    plan: ShardPlan,
}

type R<T> = Result<T, ShardError>;

/// One rank's part of an axis: `(axis, index, parts)`.
type Chunk = (usize, u32, u32);

impl<'a> Pass<'a> {
    fn new(g: &'a Graph, n: u32, rank: u32, vetoed: &'a BTreeSet<NodeId>) -> Pass<'a> {
        let mut readers = vec![Vec::new(); g.nodes.len()];
        for (id, node) in g.nodes.iter().enumerate() {
            for &i in &node.inputs {
                readers[i].push(id);
            }
        }
        Pass {
            g,
            n,
            rank,
            konst: weight_only(g),
            readers,
            vetoed,
            veto: BTreeSet::new(),
            out: Graph::default(),
            names: HashSet::new(),
            vals: vec![None; g.nodes.len()],
            konst_ids: HashMap::new(),
            slices: HashMap::new(),
            converted: HashMap::new(),
            plan: ShardPlan::default(),
        }
    }

    fn err(&self, id: NodeId, message: impl Into<String>) -> ShardError {
        ShardError::Node {
            node: self.g.nodes[id].name.clone(),
            message: message.into(),
        }
    }

    /// Adds a node to the rank's graph under a fresh name derived from `base`.
    fn emit(&mut self, base: &str, op: Op, inputs: Vec<NodeId>) -> R<NodeId> {
        let mut name = base.to_string();
        let mut k = 1;
        while self.names.contains(&name) {
            k += 1;
            name = format!("{base}.{k}");
        }
        self.names.insert(name.clone());
        self.out
            .add(name, op, inputs)
            .map_err(|e| ShardError::Options(format!("sharded graph: {e}")))
    }

    fn run(&mut self) -> R<()> {
        for id in 0..self.g.nodes.len() {
            if self.konst[id] {
                continue;
            }
            self.visit(id)?;
        }
        let outputs = self.g.outputs.clone();
        for (name, id) in outputs {
            // Outputs are whole on every rank; gathering them is expected, not a veto.
            let v = self.operand_at_output(id)?;
            self.out.outputs.push((name, v));
        }
        for s in self.g.states.clone() {
            let input = self.vals[s.input]
                .clone()
                .ok_or_else(|| self.err(s.input, "a state that nothing reads"))?;
            let update = self.make(s.update, &input.layout)?;
            self.out.states.push(StateBinding {
                input: input.id,
                update,
            });
        }
        Ok(())
    }

    fn val(&self, id: NodeId) -> Option<&Val> {
        self.vals[id].as_ref()
    }

    fn set(&mut self, id: NodeId, out: NodeId, layout: Layout, origins: BTreeSet<NodeId>) {
        self.vals[id] = Some(Val {
            id: out,
            layout,
            origins,
        });
    }

    /// The whole value of a weight-only node in the rank's graph (emitted on first use).
    fn konst_whole(&mut self, id: NodeId) -> R<NodeId> {
        if let Some(&k) = self.konst_ids.get(&id) {
            return Ok(k);
        }
        let node = &self.g.nodes[id];
        let k = if node.inputs.is_empty() && matches!(node.op, Op::Weight { .. }) {
            let name = node.name.clone();
            self.names.insert(name.clone());
            self.out.add_leaf(name, node.op.clone(), node.ty.clone())
        } else {
            let inputs = node.inputs.clone();
            let mut ins = Vec::with_capacity(inputs.len());
            for i in inputs {
                ins.push(self.konst_whole(i)?);
            }
            let node = &self.g.nodes[id];
            let (name, op) = (node.name.clone(), node.op.clone());
            self.emit(&name, op, ins)?
        };
        self.konst_ids.insert(id, k);
        Ok(k)
    }

    /// Rank's chunks of a weight-only node under `layout` (complete values only): slices pushed
    /// below transposes and casts, so `Slice(Weight)` is what the rewriter sees and folds.
    fn konst_slice(&mut self, id: NodeId, chunks: Vec<Chunk>) -> R<NodeId> {
        let chunks: Vec<Chunk> = chunks.into_iter().filter(|c| c.2 > 1).collect();
        if chunks.is_empty() {
            return self.konst_whole(id);
        }
        let key = (id, chunks.clone());
        if let Some(&k) = self.slices.get(&key) {
            return Ok(k);
        }
        let node = self.g.nodes[id].clone();
        let k = match &node.op {
            Op::Transpose { perm } => {
                let inner = chunks.iter().map(|&(a, i, p)| (perm[a], i, p)).collect();
                let x = self.konst_slice(node.inputs[0], inner)?;
                self.emit(&node.name, node.op.clone(), vec![x])?
            }
            Op::Cast { dtype } if !dtype.is_weight_format() => {
                let x = self.konst_slice(node.inputs[0], chunks.clone())?;
                self.emit(&node.name, node.op.clone(), vec![x])?
            }
            _ => {
                let mut x = self.konst_whole(id)?;
                for &(axis, i, p) in &chunks {
                    let size = node.ty.shape[axis].as_const().ok_or_else(|| {
                        self.err(id, format!("axis {axis} of {} is not constant", node.ty))
                    })?;
                    let len = size / i64::from(p);
                    let op = Op::Slice {
                        axis,
                        start: Dim::c(len * i64::from(i)),
                        end: Dim::c(len * i64::from(i + 1)),
                    };
                    x = self.emit(&format!("{}.tp{i}of{p}", node.name), op, vec![x])?;
                }
                x
            }
        };
        self.slices.insert(key, k);
        Ok(k)
    }

    /// This rank's chunks of every split axis of `layout`.
    fn chunks(&self, layout: &Layout) -> Vec<Chunk> {
        layout
            .splits
            .iter()
            .map(|&(a, _)| {
                let (i, p) = layout.chunk(a, self.rank, self.n);
                (a, i, p)
            })
            .collect()
    }

    fn rank_of(&self, id: NodeId) -> usize {
        self.g.nodes[id].ty.rank()
    }

    fn const_size(&self, id: NodeId, axis: usize) -> Option<i64> {
        self.g.nodes[id].ty.shape[axis].as_const()
    }

    /// True if `layout` may hold the value of `id`: its split axes are constant and divide.
    fn fits(&self, id: NodeId, layout: &Layout) -> bool {
        self.n.is_multiple_of(layout.parts())
            && layout.splits.iter().all(|&(a, p)| {
                a < self.rank_of(id)
                    && self
                        .const_size(id, a)
                        .is_some_and(|s| s % i64::from(p) == 0)
            })
    }

    /// The value of `id` in layout `want` (complete values): weight-only values are sliced,
    /// partial sums all-reduced, split values gathered (vetoing the column splits they came
    /// from) and replicated ones sliced locally.
    fn make(&mut self, id: NodeId, want: &Layout) -> R<NodeId> {
        if self.konst[id] {
            return self.konst_slice(id, self.chunks(want));
        }
        let v = self
            .val(id)
            .cloned()
            .ok_or_else(|| self.err(id, "read before it is computed"))?;
        if v.layout == *want {
            return Ok(v.id);
        }
        if let Some(&done) = self.converted.get(&(id, want.clone())) {
            return Ok(done);
        }
        let axes = self.rank_of(id);
        let mut cur = v.id;
        let mut lay = v.layout.clone();
        let name = self.g.nodes[id].name.clone();
        if lay.partial > 1 {
            if !lay.splits.is_empty() {
                return Err(self.err(id, "a partial sum that is also split"));
            }
            cur = self.emit(
                &format!("{name}.all_reduce"),
                Op::AllReduce { ranks: self.n },
                vec![cur],
            )?;
            self.plan.all_reduces += 1;
            let replicas = self.n / lay.partial;
            if replicas > 1 {
                // Each part was summed once per replica.
                let c = self.emit(
                    &format!("{name}.replicas"),
                    Op::Constant {
                        value: 1.0 / replicas as f32,
                    },
                    vec![],
                )?;
                cur = self.emit(
                    &format!("{name}.mean"),
                    Op::Binary(BinaryOp::Mul),
                    vec![cur, c],
                )?;
            }
            lay = Layout::replicated();
        }
        // Gather what `want` does not split the same way.
        let refines = lay.splits.iter().all(|&(a, p)| {
            let q = want.parts_of(a);
            q.is_multiple_of(p)
                && (0..self.n)
                    .all(|r| want.chunk(a, r, self.n).0 / (q / p) == lay.chunk(a, r, self.n).0)
        });
        if !refines {
            self.veto.extend(v.origins.iter().copied());
            cur = self.gather(id, cur, &lay)?;
            lay = Layout::replicated();
        }
        // Slice locally to the finer parts.
        for &(a, q) in &want.splits {
            let p = lay.parts_of(a);
            if q == p {
                continue;
            }
            let sub = q / p;
            let (i, _) = want.chunk(a, self.rank, self.n);
            let size = self.g.nodes[id].ty.shape[a]
                .as_const()
                .ok_or_else(|| self.err(id, format!("axis {a} is not constant")))?;
            let len = size / i64::from(q);
            cur = self.part(
                &format!("{name}.tp{i}of{q}"),
                cur,
                a,
                len,
                i64::from(i % sub),
            )?;
        }
        debug_assert!(axes == self.out.nodes[cur].ty.rank());
        self.converted.insert((id, want.clone()), cur);
        Ok(cur)
    }

    /// Part `j` of length `len` of axis `axis` of `cur` (a rank-local slice).
    fn part(&mut self, name: &str, cur: NodeId, axis: usize, len: i64, j: i64) -> R<NodeId> {
        let op = Op::Slice {
            axis,
            start: Dim::c(len * j),
            end: Dim::c(len * (j + 1)),
        };
        self.emit(name, op, vec![cur])
    }

    /// `cur` (the value of `id` in layout `lay`, complete) made whole on every rank.
    fn gather(&mut self, id: NodeId, mut cur: NodeId, lay: &Layout) -> R<NodeId> {
        let name = self.g.nodes[id].name.clone();
        match lay.splits.as_slice() {
            [] => Ok(cur),
            &[(a, p)] => {
                if p < self.n {
                    // Replicated parts: each replica keeps a finer part, so the n pieces of the
                    // gather are distinct.
                    let finer = Layout::split(a, self.n);
                    if !self.fits(id, &finer) {
                        return Err(self.err(
                            id,
                            format!(
                                "cannot gather axis {a} of {} split in {p} over {} ranks",
                                self.g.nodes[id].ty, self.n
                            ),
                        ));
                    }
                    let sub = self.n / p;
                    let size = self.const_size(id, a).expect("fits");
                    let len = size / i64::from(self.n);
                    let j = i64::from(self.rank % sub);
                    cur = self.part(
                        &format!("{name}.tp{}of{}", self.rank, self.n),
                        cur,
                        a,
                        len,
                        j,
                    )?;
                }
                self.plan.all_gathers += 1;
                self.emit(
                    &format!("{name}.all_gather"),
                    Op::AllGather {
                        axis: a,
                        ranks: self.n,
                    },
                    vec![cur],
                )
            }
            _ => Err(self.err(
                id,
                format!(
                    "cannot gather {} split on several axes",
                    self.g.nodes[id].ty
                ),
            )),
        }
    }

    fn operand_at_output(&mut self, id: NodeId) -> R<NodeId> {
        let before = self.veto.clone();
        let out = self.make(id, &Layout::replicated())?;
        self.veto = before;
        Ok(out)
    }

    /// A complete layout of `id` (its own, all-reduced if it is a partial sum).
    fn complete(&mut self, id: NodeId) -> Layout {
        match self.val(id) {
            Some(v) if v.layout.partial == 1 => v.layout.clone(),
            _ => Layout::replicated(),
        }
    }

    fn origins(&self, ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter()
            .filter_map(|&i| self.val(i))
            .flat_map(|v| v.origins.iter().copied())
            .collect()
    }

    /// Emits node `id` on inputs in the given layouts, its result in `layout`.
    fn emit_as(&mut self, id: NodeId, wants: &[Layout], op: Op, layout: Layout) -> R<()> {
        let inputs = self.g.nodes[id].inputs.clone();
        let mut ins = Vec::with_capacity(inputs.len());
        for (&i, w) in inputs.iter().zip(wants) {
            ins.push(self.operand(i, w)?);
        }
        let origins = self.origins(&inputs);
        let name = self.g.nodes[id].name.clone();
        let out = self.emit(&name, op, ins)?;
        self.set(id, out, layout, origins);
        Ok(())
    }

    /// Like [`Pass::make`], but a state input not read yet takes the layout `want`.
    fn operand(&mut self, id: NodeId, want: &Layout) -> R<NodeId> {
        let node = &self.g.nodes[id];
        if node.op
            == (Op::Input {
                kind: InputKind::State,
            })
            && self.vals[id].is_none()
        {
            let ty =
                kiln_runtime::ir::TensorType::new(node.ty.dtype, want.local_shape(&node.ty.shape));
            let (name, op) = (node.name.clone(), node.op.clone());
            self.names.insert(name.clone());
            let out = self.out.add_leaf(name, op, ty);
            self.set(id, out, want.clone(), BTreeSet::new());
            return Ok(out);
        }
        self.make(id, want)
    }

    fn visit(&mut self, id: NodeId) -> R<()> {
        let node = self.g.nodes[id].clone();
        let all_replicated = |k: usize| vec![Layout::replicated(); k];
        match &node.op {
            Op::Input {
                kind: InputKind::State,
            } => Ok(()), // emitted at its first reader
            Op::Input { .. } => {
                self.names.insert(node.name.clone());
                let out = self
                    .out
                    .add_leaf(&node.name, node.op.clone(), node.ty.clone());
                self.set(id, out, Layout::replicated(), BTreeSet::new());
                Ok(())
            }
            Op::Unary(_) | Op::Cast { .. } => {
                let l = self.complete(node.inputs[0]);
                self.emit_as(id, std::slice::from_ref(&l), node.op.clone(), l.clone())
            }
            Op::Softmax { axis } | Op::Reduce { axis, .. } => {
                let l = self.complete(node.inputs[0]);
                let l = l.remap(|a| (a != *axis).then_some(a));
                let out = match node.op {
                    Op::Reduce {
                        keep_dim: false, ..
                    } => l.remap(|a| Some(if a > *axis { a - 1 } else { a })),
                    _ => l.clone(),
                };
                self.emit_as(id, &[l], node.op.clone(), out)
            }
            Op::Binary(_) | Op::Where | Op::Concat { .. } => self.elementwise(id, &node.op),
            Op::Transpose { perm } => {
                let l = match self.val(node.inputs[0]) {
                    Some(v) if !self.konst[node.inputs[0]] => v.layout.clone(),
                    _ => Layout::replicated(),
                };
                let out = l.remap(|a| perm.iter().position(|&p| p == a));
                self.emit_as(id, &[l], node.op.clone(), out)
            }
            Op::Reshape { shape } => {
                let x = node.inputs[0];
                let l = match self.val(x) {
                    Some(v) => v.layout.clone(),
                    None => Layout::replicated(),
                };
                let full_in = &self.g.nodes[x].ty.shape;
                match reshape_layout(full_in, shape, &l) {
                    Some(out) if self.fits(id, &out) => {
                        let op = Op::Reshape {
                            shape: out.local_shape(shape),
                        };
                        self.emit_as(id, &[l], op, out)
                    }
                    _ => {
                        let l = Layout::replicated();
                        self.emit_as(id, std::slice::from_ref(&l), node.op.clone(), l.clone())
                    }
                }
            }
            Op::Slice { axis, .. } => {
                let l = match self.val(node.inputs[0]) {
                    Some(v) => v.layout.clone(),
                    None => Layout::replicated(),
                };
                let l = l.remap(|a| (a != *axis).then_some(a));
                self.emit_as(id, std::slice::from_ref(&l), node.op.clone(), l.clone())
            }
            Op::MatMul => self.matmul(id),
            Op::Gather => self.gather_rows(id),
            _ => {
                let k = node.inputs.len();
                self.emit_as(
                    id,
                    &all_replicated(k),
                    node.op.clone(),
                    Layout::replicated(),
                )
            }
        }
    }

    /// Element-wise ops (broadcasting) and concatenation: every operand follows the most split
    /// one; an operand without an axis (broadcast) is replicated along it.
    fn elementwise(&mut self, id: NodeId, op: &Op) -> R<()> {
        let node = self.g.nodes[id].clone();
        let out_rank = node.ty.rank();
        // The sum of two vocabulary-parallel lookups (GPT-2's token and position embeddings)
        // stays a partial sum: one all-reduce for both. (A residual add is never summed before
        // its all-reduce: the residual stream stays whole on every rank.)
        let lookups = node
            .inputs
            .iter()
            .all(|&i| self.g.nodes[i].op == Op::Gather);
        if lookups && matches!(op, Op::Binary(BinaryOp::Add)) {
            let ls: Vec<Option<Layout>> = node
                .inputs
                .iter()
                .map(|&i| {
                    let v = self.val(i).filter(|_| !self.konst[i])?;
                    (v.layout.partial > 1 && v.layout.splits.is_empty()).then(|| v.layout.clone())
                })
                .collect();
            if let [Some(a), Some(b)] = ls.as_slice() {
                if a == b {
                    let l = a.clone();
                    return self.emit_as(id, &[l.clone(), l.clone()], op.clone(), l);
                }
            }
        }
        let concat_axis = match op {
            Op::Concat { axis } => Some(*axis),
            _ => None,
        };
        // The target: the complete layout with the most parts among computed operands.
        let mut target = Layout::replicated();
        for &i in &node.inputs {
            if self.konst[i] {
                continue;
            }
            let Some(v) = self.val(i) else { continue };
            if v.layout.partial > 1 {
                continue;
            }
            let shift = out_rank - self.rank_of(i);
            let l = v.layout.remap(|a| Some(a + shift));
            if l.parts() > target.parts() {
                target = l;
            }
        }
        if let Some(axis) = concat_axis {
            if target.parts_of(axis) > 1 {
                target = Layout::replicated();
            }
        }
        let wants: Option<Vec<Layout>> = node
            .inputs
            .iter()
            .map(|&i| self.operand_layout(&target, i, out_rank))
            .collect();
        let (wants, target) = match wants {
            Some(w) => (w, target),
            None => (
                vec![Layout::replicated(); node.inputs.len()],
                Layout::replicated(),
            ),
        };
        self.emit_as(id, &wants, op.clone(), target)
    }

    /// The layout operand `i` needs so that, broadcast to `out_rank` axes (right-aligned), it
    /// lines up with `target`: `target`'s splits on the operand's own axes, none on the axes it
    /// broadcasts (size 1 or absent). `None` if its parts would then not be the ones every rank
    /// needs.
    fn operand_layout(&self, target: &Layout, i: NodeId, out_rank: usize) -> Option<Layout> {
        let shift = out_rank - self.rank_of(i);
        let shape = &self.g.nodes[i].ty.shape;
        let w = target.remap(|a| (a >= shift && shape[a - shift] != Dim::c(1)).then(|| a - shift));
        let lines_up = (0..self.n).all(|r| {
            w.splits
                .iter()
                .all(|&(a, _)| w.chunk(a, r, self.n) == target.chunk(a + shift, r, self.n))
        });
        lines_up.then_some(w)
    }

    /// `a · b`: column- or row-parallel against a weight, per head for two activations.
    fn matmul(&mut self, id: NodeId) -> R<()> {
        let node = self.g.nodes[id].clone();
        let (a, b) = (node.inputs[0], node.inputs[1]);
        let (ra, rb) = (self.rank_of(a), self.rank_of(b));
        let out_rank = node.ty.rank();
        let op = Op::MatMul;
        if self.konst[b] && !self.konst[a] && rb == 2 {
            let la = self.complete(a);
            let k_axis = ra - 1;
            let pk = la.parts_of(k_axis);
            if pk > 1 && la.splits.len() == 1 {
                // Row-parallel: this rank's rows of the weight, a partial sum.
                self.plan.row.push(node.name.clone());
                let wb = Layout::split(0, pk);
                return self.emit_as(id, &[la, wb], op, Layout::partial(pk));
            }
            if pk == 1 && la.is_replicated() && !self.vetoed.contains(&id) {
                let q = self.column_parts(id);
                if q > 1 {
                    self.plan.column.push(node.name.clone());
                    let out = Layout::split(out_rank - 1, q);
                    let wb = Layout::split(1, q);
                    self.emit_as(id, &[la, wb], op, out)?;
                    self.vals[id].as_mut().expect("just set").origins = BTreeSet::from([id]);
                    return Ok(());
                }
            }
            if pk == 1 {
                // The weight whole; the activation's leading splits carry through.
                let out = la.clone();
                return self.emit_as(id, &[la, Layout::replicated()], op, out);
            }
            let r = Layout::replicated();
            return self.emit_as(id, &[r.clone(), r.clone()], op, r);
        }
        if !self.konst[a] && !self.konst[b] {
            // Two activations (attention): split batch axes only, lined up by broadcasting.
            let la = self.complete(a);
            let lb = self.complete(b);
            let batch_only = |l: &Layout, r: usize| l.splits.iter().all(|&(x, _)| x + 2 < r);
            if batch_only(&la, ra) && batch_only(&lb, rb) {
                let (sa, sb) = (out_rank - ra, out_rank - rb);
                let ta = la.remap(|x| Some(x + sa));
                let tb = lb.remap(|x| Some(x + sb));
                let target = if ta.parts() >= tb.parts() { ta } else { tb };
                if let (Some(wa), Some(wb)) = (
                    self.operand_layout(&target, a, out_rank),
                    self.operand_layout(&target, b, out_rank),
                ) {
                    return self.emit_as(id, &[wa, wb], op, target);
                }
            }
        }
        let r = Layout::replicated();
        self.emit_as(id, &[r.clone(), r.clone()], op, r)
    }

    /// How many parts a column-parallel product's output columns split into: whole heads when
    /// the result is reshaped into heads (through element-wise ops such as a bias), one part
    /// per rank otherwise, none when a slice takes it apart (a fused projection).
    fn column_parts(&self, id: NodeId) -> u32 {
        let gcd = |mut a: i64, mut b: i64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let n = i64::from(self.n);
        let ty = &self.g.nodes[id].ty;
        let Some(cols) = ty.shape.last().and_then(|d| d.as_const()) else {
            return 1;
        };
        let mut cur = id;
        loop {
            let readers = &self.readers[cur];
            let [next] = readers.as_slice() else {
                return gcd(n, cols) as u32;
            };
            let reader = &self.g.nodes[*next];
            match &reader.op {
                Op::Binary(_) | Op::Unary(_) | Op::Where if reader.ty.shape == ty.shape => {
                    cur = *next
                }
                Op::Reshape { shape } => {
                    let from = &self.g.nodes[cur].ty.shape;
                    let Some(groups) = layout::reshape_groups(from, shape) else {
                        return 1;
                    };
                    let last = from.len() - 1;
                    let Some((_, go)) = groups.iter().find(|(gi, _)| gi.contains(&last)) else {
                        return 1;
                    };
                    // The leading axis of the split (heads; 1 for a single KV head).
                    return shape[go.start].as_const().map_or(1, |s| gcd(n, s) as u32);
                }
                Op::Slice { .. } => return 1,
                _ => return gcd(n, cols) as u32,
            }
        }
    }

    /// An embedding lookup: vocabulary-parallel when the table's rows divide among the ranks.
    fn gather_rows(&mut self, id: NodeId) -> R<()> {
        let node = self.g.nodes[id].clone();
        let (table, ids) = (node.inputs[0], node.inputs[1]);
        let rows = self.const_size(table, 0).unwrap_or(0);
        let float = self.g.nodes[table].ty.dtype.is_float();
        let ids_whole = self.konst[ids] || self.val(ids).is_some_and(|v| v.layout.is_replicated());
        if self.konst[table] && ids_whole && float && rows > 0 && rows % i64::from(self.n) == 0 {
            self.plan.vocab.push(node.name.clone());
            let first = rows / i64::from(self.n) * i64::from(self.rank);
            let part = Layout::split(0, self.n);
            return self.emit_as(
                id,
                &[part, Layout::replicated()],
                Op::GatherShard { first },
                Layout::partial(self.n),
            );
        }
        let r = Layout::replicated();
        self.emit_as(id, &[r.clone(), r.clone()], Op::Gather, r)
    }
}

#[cfg(test)]
mod tests;
