//! Graph → e-graph → graph.
//!
//! [`to_egraph`] adds every node of a graph (leaves by name, ops through their attribute leaves);
//! identical nodes share one e-class (hash-consing). [`to_graph`] emits the extracted nodes in
//! topological order and re-infers every type, so an e-class whose picked node does not have the
//! type the rewriter gave the class is an error naming the node.
//!
//! Names: an e-class that holds nodes of the input graph takes the name of the first of them, so
//! that names such as `layers.3.x` survive rewriting. A new e-class is named after the named
//! classes that read it through a cast (`layers.0.x_attn.bf16`) or a view (the fused QKV product
//! sliced by `layers.0.q_flat`, `…k_flat`, `…v_flat` is `layers.0.q_flat+k_flat+v_flat`), and
//! otherwise after its inputs (`layers.0.wq.cast`).

use super::analysis::{KilnGraph, Leaves, TypeAnalysis};
use super::lang::{ConstValue, InputName, Node, WeightName};
use super::ops::{lower, raise, Lowered};
use egg::{Id, Symbol};
use kiln_runtime::ir::{Graph, NodeId, Op, StateBinding};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A graph loaded into an e-graph.
pub struct Loaded {
    /// The e-graph (rebuilt).
    pub egraph: KilnGraph,
    /// The e-class of each graph node, in graph order.
    pub classes: Vec<Id>,
}

/// Loads a graph into a fresh e-graph.
pub fn to_egraph(graph: &Graph, permissive: bool) -> Loaded {
    let mut leaves = Leaves::default();
    for n in &graph.nodes {
        match &n.op {
            Op::Weight { name } => {
                leaves
                    .weights
                    .insert(Symbol::from(name.as_str()), n.ty.clone());
            }
            Op::Input { kind } => {
                leaves
                    .inputs
                    .insert(Symbol::from(n.name.as_str()), (*kind, n.ty.clone()));
            }
            _ => {}
        }
    }
    let mut analysis = TypeAnalysis::new(leaves);
    analysis.permissive = permissive;
    let mut eg = KilnGraph::new(analysis);
    let mut classes = Vec::with_capacity(graph.nodes.len());
    for n in &graph.nodes {
        let ins: Vec<Id> = n.inputs.iter().map(|&i| classes[i]).collect();
        let id = match &n.op {
            Op::Weight { name } => eg.add(Node::Weight(WeightName(Symbol::from(name.as_str())))),
            Op::Input { .. } => eg.add(Node::Input(InputName(Symbol::from(n.name.as_str())))),
            Op::Constant { value } => eg.add(Node::Const(ConstValue::new(*value))),
            op => raise(&mut eg, op, &ins),
        };
        classes.push(id);
    }
    eg.rebuild();
    Loaded {
        egraph: eg,
        classes,
    }
}

/// The name of each e-class holding nodes of the source graph: its first node's name.
pub fn class_names(eg: &KilnGraph, graph: &Graph, classes: &[Id]) -> HashMap<Id, String> {
    let mut names = HashMap::new();
    for (n, &c) in graph.nodes.iter().zip(classes) {
        names.entry(eg.find(c)).or_insert_with(|| n.name.clone());
    }
    names
}

/// The roots of a graph as e-classes: outputs, then state (input, update) pairs.
pub struct Roots {
    /// Output names and their classes.
    pub outputs: Vec<(String, Id)>,
    /// State input and update classes.
    pub states: Vec<(Id, Id)>,
}

impl Roots {
    /// The roots of `graph` loaded as `classes`.
    pub fn of(graph: &Graph, classes: &[Id]) -> Roots {
        Roots {
            outputs: graph
                .outputs
                .iter()
                .map(|(n, id)| (n.clone(), classes[*id]))
                .collect(),
            states: graph
                .states
                .iter()
                .map(|s| (classes[s.input], classes[s.update]))
                .collect(),
        }
    }
    /// All root classes, outputs first.
    pub fn ids(&self) -> Vec<Id> {
        let mut v: Vec<Id> = self.outputs.iter().map(|(_, id)| *id).collect();
        for &(i, u) in &self.states {
            v.push(u);
            v.push(i);
        }
        v
    }
}

fn common_prefix<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut prefix: Option<Vec<&str>> = None;
    for n in names {
        let parts: Vec<&str> = n.split('.').collect();
        prefix = Some(match prefix {
            None => parts,
            Some(p) => p
                .iter()
                .zip(&parts)
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| *a)
                .collect(),
        });
    }
    prefix.unwrap_or_default().join(".")
}

/// Names for the new (unnamed) classes read by a cast or a view in a named class.
fn names_from_readers(
    eg: &KilnGraph,
    names: &HashMap<Id, String>,
    wanted: &HashSet<Id>,
) -> HashMap<Id, String> {
    let mut readers: BTreeMap<Id, (Option<String>, Vec<String>)> = BTreeMap::new();
    let mut named: Vec<(&Id, &String)> = names.iter().collect();
    named.sort();
    for (&c, name) in named {
        for n in &eg[c].nodes {
            let (x, cast) = match n {
                Node::Cast([x, _]) => (*x, true),
                Node::Slice([x, ..]) | Node::Reshape([x, _]) | Node::Transpose([x, _]) => {
                    (*x, false)
                }
                _ => continue,
            };
            let x = eg.find(x);
            if names.contains_key(&x) || !wanted.contains(&x) {
                continue;
            }
            let entry = readers.entry(x).or_default();
            if cast && entry.0.is_none() {
                let dtype = eg[x].data.ty().map_or("x", |t| t.dtype.name());
                entry.0 = Some(format!("{name}.{dtype}"));
            }
            if !entry.1.contains(name) {
                entry.1.push(name.clone());
            }
        }
    }
    readers
        .into_iter()
        .map(|(x, (cast, views))| {
            let name = cast.unwrap_or_else(|| {
                if views.len() == 1 {
                    return format!("{}.src", views[0]);
                }
                let prefix = common_prefix(views.iter().map(|s| s.as_str()));
                let rests: Vec<&str> = views
                    .iter()
                    .map(|v| v[prefix.len()..].trim_start_matches('.'))
                    .collect();
                if prefix.is_empty() {
                    rests.join("+")
                } else {
                    format!("{prefix}.{}", rests.join("+"))
                }
            });
            (x, name)
        })
        .collect()
}

/// The name of a new node of op `op` that nobody named: after its inputs, `layers.0.wq.cast` for
/// one input, `layers.0.wq+wk+wv` for several sharing the prefix `layers.0`.
fn fallback_name(g: &Graph, inputs: &[NodeId], op: &str) -> String {
    let names: Vec<&str> = inputs.iter().map(|&i| g.nodes[i].name.as_str()).collect();
    match names.as_slice() {
        [] => op.to_string(),
        [one] => format!("{one}.{op}"),
        many => {
            let prefix = common_prefix(many.iter().copied());
            let rests: Vec<&str> = many
                .iter()
                .map(|n| n[prefix.len()..].trim_start_matches('.'))
                .collect();
            if prefix.is_empty() {
                let joined = many.join("+");
                if joined.len() <= 64 {
                    joined
                } else {
                    op.to_string()
                }
            } else if rests.iter().any(|r| r.is_empty()) {
                format!("{prefix}.{op}")
            } else {
                format!("{prefix}.{}", rests.join("+"))
            }
        }
    }
}

/// Builds the graph of the extracted nodes. `names` names the classes of source-graph nodes.
pub fn to_graph(
    eg: &KilnGraph,
    choice: &HashMap<Id, Node>,
    roots: &Roots,
    names: &HashMap<Id, String>,
) -> Result<Graph, String> {
    let wanted: HashSet<Id> = choice.keys().copied().collect();
    let derived = names_from_readers(eg, names, &wanted);
    let data = |id: Id| eg[id].data.clone();
    let mut g = Graph::default();
    let mut emitted: HashMap<Id, NodeId> = HashMap::new();
    let mut used: HashSet<String> = HashSet::new();
    let mut unique = |base: String| {
        let mut name = base.clone();
        let mut k = 2;
        while !used.insert(name.clone()) {
            name = format!("{base}.{k}");
            k += 1;
        }
        name
    };
    for root in roots.ids() {
        let mut stack = vec![(eg.find(root), false)];
        while let Some((c, expanded)) = stack.pop() {
            if emitted.contains_key(&c) {
                continue;
            }
            let node = choice
                .get(&c)
                .ok_or_else(|| format!("e-class {c} was not extracted"))?;
            let lowered = lower(node, &data)?;
            let ins: Vec<Id> = match &lowered {
                Lowered::Op(_, ins) => ins.iter().map(|&i| eg.find(i)).collect(),
                Lowered::Leaf => vec![],
                Lowered::Helper => {
                    return Err(format!("helper node `{node}` left in the extracted graph"))
                }
                Lowered::Attr => return Err(format!("attribute `{node}` used as a tensor")),
            };
            if !expanded {
                stack.push((c, true));
                stack.extend(ins.iter().rev().map(|&i| (i, false)));
                continue;
            }
            let want = eg[c]
                .data
                .ty()
                .cloned()
                .ok_or_else(|| format!("e-class {c} is an attribute"))?;
            let inputs: Vec<NodeId> = ins.iter().map(|i| emitted[i]).collect();
            let base = match (names.get(&c), derived.get(&c)) {
                (Some(n), _) | (None, Some(n)) => n.clone(),
                _ => {
                    let op = match &lowered {
                        Lowered::Op(op, _) => op.name().to_lowercase(),
                        _ => node.to_string(),
                    };
                    fallback_name(&g, &inputs, &op)
                }
            };
            let name = unique(base);
            let id = match (&lowered, node) {
                (Lowered::Op(op, _), _) => g
                    .add(name.clone(), op.clone(), inputs)
                    .map_err(|e| e.to_string())?,
                (_, Node::Weight(w)) => g.add_leaf(
                    name.clone(),
                    Op::Weight {
                        name: w.0.to_string(),
                    },
                    want.clone(),
                ),
                (_, Node::Input(i)) => {
                    let (kind, ty) = eg.analysis.leaves.inputs[&i.0].clone();
                    g.add_leaf(name.clone(), Op::Input { kind }, ty)
                }
                (_, Node::Const(v)) => g
                    .add(name.clone(), Op::Constant { value: v.value() }, vec![])
                    .map_err(|e| e.to_string())?,
                _ => unreachable!("leaves are weights, inputs and constants"),
            };
            let got = &g.nodes[id].ty;
            if *got != want {
                let n = &g.nodes[id];
                return Err(format!(
                    "node `{}` ({}): extracted with type {got}, but rewriting typed it {want}",
                    n.name, n.op
                ));
            }
            emitted.insert(c, id);
        }
    }
    g.outputs = roots
        .outputs
        .iter()
        .map(|(n, c)| (n.clone(), emitted[&eg.find(*c)]))
        .collect();
    g.states = roots
        .states
        .iter()
        .map(|&(i, u)| StateBinding {
            input: emitted[&eg.find(i)],
            update: emitted[&eg.find(u)],
        })
        .collect();
    Ok(g)
}
