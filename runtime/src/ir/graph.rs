//! A typed DAG of ops, stored in topological order: a node's inputs always come before it.
//! This is both the compiler's working form and the form stored in an engine file (as RON).

use super::infer::{infer, TensorType};
use super::op::{InputKind, Op};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::{self, Write as _};

/// Index of a node in `Graph::nodes`.
pub type NodeId = usize;

/// One op application with its inferred type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique name, e.g. `layers.3.q`.
    pub name: String,
    /// The operation.
    pub op: Op,
    /// Input nodes, in the op's documented order.
    pub inputs: Vec<NodeId>,
    /// Output type.
    pub ty: TensorType,
}

/// A recurrent state (KV cache): `input` is read at the start of a step, `update` is its value
/// for the next step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBinding {
    /// The `Input { kind: State }` node.
    pub input: NodeId,
    /// The node whose value becomes the state after the step.
    pub update: NodeId,
}

/// The whole model as a typed DAG.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Named results of a step (e.g. `logits`).
    pub outputs: Vec<(String, NodeId)>,
    /// State inputs and their updates.
    pub states: Vec<StateBinding>,
}

/// A graph construction or validation error; the message names the node and shapes.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// An op's inputs do not fit its shape rule.
    #[error("node `{node}` ({op}): {message}")]
    Shape {
        /// Node name.
        node: String,
        /// Op name.
        op: String,
        /// What is wrong, with shapes.
        message: String,
    },
    /// A structural problem (duplicate name, dangling input, cycle).
    #[error("invalid graph: {0}")]
    Invalid(String),
}

impl Graph {
    /// Adds a node whose type is inferred from its inputs.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: Vec<NodeId>,
    ) -> Result<NodeId, GraphError> {
        let name = name.into();
        if let Some(&bad) = inputs.iter().find(|&&i| i >= self.nodes.len()) {
            return Err(GraphError::Invalid(format!(
                "node `{name}` reads missing node #{bad}"
            )));
        }
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| &self.nodes[i].ty).collect();
        let ty = infer(&op, &tys).map_err(|message| {
            let ins: Vec<String> = inputs
                .iter()
                .map(|&i| format!("{} {}", self.nodes[i].name, self.nodes[i].ty))
                .collect();
            GraphError::Shape {
                node: name.clone(),
                op: op.name(),
                message: format!("{message} (inputs: {})", ins.join(", ")),
            }
        })?;
        Ok(self.push(Node {
            name,
            op,
            inputs,
            ty,
        }))
    }

    /// Adds a leaf (`Input` or `Weight`) with a declared type.
    pub fn add_leaf(&mut self, name: impl Into<String>, op: Op, ty: TensorType) -> NodeId {
        self.push(Node {
            name: name.into(),
            op,
            inputs: vec![],
            ty,
        })
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The node with this name.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The output with this name.
    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    /// Checks that the graph can generate text: an output named `logits`, float, shaped
    /// `[batch, seq, vocab]` (the shape the decoders read the last row of).
    pub fn check_logits(&self) -> Result<(), GraphError> {
        let id = self.output("logits").ok_or_else(|| {
            GraphError::Invalid(
                "no output named `logits` (declare one with `Output(\"logits\", …)`)".into(),
            )
        })?;
        let ty = &self.nodes[id].ty;
        if !ty.dtype.is_float() || ty.rank() != 3 {
            return Err(GraphError::Invalid(format!(
                "output `logits` (node `{}`) is {ty}; it must be float [batch, seq, vocab]",
                self.nodes[id].name
            )));
        }
        Ok(())
    }

    /// The vocabulary size: the constant last axis of the `logits` output, if there is one.
    pub fn vocab(&self) -> Option<i64> {
        let id = self.output("logits")?;
        self.nodes[id].ty.shape.last()?.as_const()
    }

    /// The input node of the given kind (`Tokens` or `Positions`), if the graph has one.
    pub fn input(&self, kind: InputKind) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.op == Op::Input { kind })
    }

    /// Weight nodes: (node id, checkpoint name).
    pub fn weights(&self) -> impl Iterator<Item = (NodeId, &str)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::Weight { name } => Some((i, name.as_str())),
                _ => None,
            })
    }

    /// Sets this graph's outputs and state bindings to those of `from`, whose node `i` is node
    /// `map(i)` here (for passes that rebuild a graph node by node).
    pub fn copy_bindings(&mut self, from: &Graph, map: impl Fn(NodeId) -> NodeId) {
        self.outputs = (from.outputs.iter())
            .map(|(n, o)| (n.clone(), map(*o)))
            .collect();
        self.states = (from.states.iter())
            .map(|s| StateBinding {
                input: map(s.input),
                update: map(s.update),
            })
            .collect();
    }

    /// Number of nodes that read each node (outputs and state updates count as readers).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.nodes.len()];
        for n in &self.nodes {
            for &i in &n.inputs {
                uses[i] += 1;
            }
        }
        for &(_, o) in &self.outputs {
            uses[o] += 1;
        }
        for s in &self.states {
            uses[s.update] += 1;
        }
        uses
    }

    /// Checks the invariants: unique names, inputs before users, every non-leaf type equal to its
    /// inferred type, outputs and states in range, state updates typed like their inputs.
    pub fn validate(&self) -> Result<(), GraphError> {
        let mut names: HashMap<&str, NodeId> = HashMap::new();
        for (id, n) in self.nodes.iter().enumerate() {
            if let Some(prev) = names.insert(&n.name, id) {
                return Err(GraphError::Invalid(format!(
                    "duplicate node name `{}` (#{prev} and #{id})",
                    n.name
                )));
            }
            if let Some(&bad) = n.inputs.iter().find(|&&i| i >= id) {
                return Err(GraphError::Invalid(format!(
                    "node `{}` reads #{bad}, which is not before it",
                    n.name
                )));
            }
            if matches!(n.op, Op::Input { .. } | Op::Weight { .. }) {
                continue;
            }
            let tys: Vec<&TensorType> = n.inputs.iter().map(|&i| &self.nodes[i].ty).collect();
            let ty = infer(&n.op, &tys).map_err(|message| GraphError::Shape {
                node: n.name.clone(),
                op: n.op.name(),
                message,
            })?;
            if ty != n.ty {
                return Err(GraphError::Invalid(format!(
                    "node `{}` is typed {} but its op gives {ty}",
                    n.name, n.ty
                )));
            }
        }
        let len = self.nodes.len();
        if let Some((name, _)) = self.outputs.iter().find(|(_, o)| *o >= len) {
            return Err(GraphError::Invalid(format!(
                "output `{name}` points past the graph"
            )));
        }
        for s in &self.states {
            if s.input >= len || s.update >= len {
                return Err(GraphError::Invalid(
                    "state binding points past the graph".into(),
                ));
            }
            let (i, u) = (&self.nodes[s.input], &self.nodes[s.update]);
            if i.op
                != (Op::Input {
                    kind: InputKind::State,
                })
            {
                return Err(GraphError::Invalid(format!(
                    "state `{}` is not a state input",
                    i.name
                )));
            }
            if i.ty.dtype != u.ty.dtype || i.ty.rank() != u.ty.rank() {
                return Err(GraphError::Invalid(format!(
                    "state `{}` {} is updated by `{}` {}",
                    i.name, i.ty, u.name, u.ty
                )));
            }
        }
        Ok(())
    }

    /// Serializes the graph as RON (the form stored in engine files).
    pub fn to_ron(&self) -> String {
        ron::ser::to_string(self).expect("graph serializes")
    }

    /// Parses a graph from RON and validates it.
    pub fn from_ron(text: &str) -> Result<Graph, GraphError> {
        let g: Graph =
            ron::from_str(text).map_err(|e| GraphError::Invalid(format!("graph RON: {e}")))?;
        g.validate()?;
        Ok(g)
    }
}

impl fmt::Display for Graph {
    /// One line per node: `%id name: type = Op(inputs)`, then outputs and states.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (id, n) in self.nodes.iter().enumerate() {
            let mut args = String::new();
            for (k, &i) in n.inputs.iter().enumerate() {
                let _ = write!(args, "{}%{i}", if k == 0 { "" } else { ", " });
            }
            writeln!(f, "%{id} {}: {} = {} ({args})", n.name, n.ty, n.op)?;
        }
        for (name, id) in &self.outputs {
            writeln!(f, "output {name} = %{id}")?;
        }
        for s in &self.states {
            writeln!(f, "state %{} <- %{}", s.input, s.update)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Dim, Sym, UnaryOp};

    #[test]
    fn ron_round_trip_and_validation() {
        let mut g = Graph::default();
        let x = g.add_leaf(
            "x",
            Op::Input {
                kind: InputKind::State,
            },
            TensorType::new(DType::F32, vec![Dim::sym(Sym::Past), Dim::c(4)]),
        );
        let y = g.add("y", Op::Unary(UnaryOp::Exp), vec![x]).unwrap();
        g.outputs.push(("y".into(), y));
        g.states.push(StateBinding {
            input: x,
            update: y,
        });
        let back = Graph::from_ron(&g.to_ron()).unwrap();
        assert_eq!(back, g);
        let mut bad = g.clone();
        bad.nodes[1].inputs = vec![1];
        assert!(bad.validate().is_err());
    }
}
