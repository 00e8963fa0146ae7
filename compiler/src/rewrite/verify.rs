//! The verifier: runs on the input of the rewriter, after every phase, after weight folding, and
//! before every snapshot, so that no stage can hand on (or bless) a broken graph.
//!
//! It checks that every node's type is what its op's shape rule gives for its inputs (shapes and
//! dtypes), that inputs come before their readers (so the graph is acyclic), that names are
//! unique, that weights have constant shapes, and that the interface is the reference graph's:
//! the same outputs with the same types, the same states with the same shapes, and every state
//! that was updated by a cache append (`Concat(state, new)`) still is — the CUDA backend lowers
//! those appends in place. Helper e-nodes cannot appear in a graph at all: extracting one is an
//! error of the converter.

use kiln_runtime::ir::{Graph, GraphError, Op};

/// Why a graph fails verification; the message names the node.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A node's type or order is wrong.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// The graph's interface differs from the reference's.
    #[error("{0}")]
    Interface(String),
}

fn is_append(g: &Graph, update: usize, input: usize) -> bool {
    let n = &g.nodes[update];
    matches!(n.op, Op::Concat { .. }) && n.inputs.first() == Some(&input)
}

/// Verifies `graph` against the interface of `reference` (the graph before rewriting).
pub fn verify(graph: &Graph, reference: &Graph) -> Result<(), VerifyError> {
    graph.validate()?;
    let bad = |m: String| Err(VerifyError::Interface(m));
    for (id, name) in graph.weights() {
        if graph.nodes[id]
            .ty
            .shape
            .iter()
            .any(|d| d.as_const().is_none())
        {
            return bad(format!(
                "weight node `{}` (`{name}`) has the run-time shape {}",
                graph.nodes[id].name, graph.nodes[id].ty
            ));
        }
    }
    if graph.outputs.len() != reference.outputs.len() {
        return bad(format!(
            "the graph has {} outputs, the model {}",
            graph.outputs.len(),
            reference.outputs.len()
        ));
    }
    for ((name, id), (rname, rid)) in graph.outputs.iter().zip(&reference.outputs) {
        let (got, want) = (&graph.nodes[*id], &reference.nodes[*rid]);
        if name != rname || got.ty != want.ty {
            return bad(format!(
                "output `{name}` is node `{}` {}, the model's output `{rname}` is {}",
                got.name, got.ty, want.ty
            ));
        }
    }
    if graph.states.len() != reference.states.len() {
        return bad(format!(
            "the graph has {} states, the model {}",
            graph.states.len(),
            reference.states.len()
        ));
    }
    for (s, r) in graph.states.iter().zip(&reference.states) {
        let (input, rinput) = (&graph.nodes[s.input], &reference.nodes[r.input]);
        if input.name != rinput.name || input.ty.shape != rinput.ty.shape {
            return bad(format!(
                "state `{}` {} does not match the model's state `{}` {}",
                input.name, input.ty, rinput.name, rinput.ty
            ));
        }
        if is_append(reference, r.update, r.input) && !is_append(graph, s.update, s.input) {
            let u = &graph.nodes[s.update];
            return bad(format!(
                "state `{}` is updated by node `{}` ({}), no longer a cache append",
                input.name, u.name, u.op
            ));
        }
    }
    Ok(())
}
