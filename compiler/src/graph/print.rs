//! Readable forms of a graph: text with inputs by name and each node's execution kind (kernel,
//! view, cache append, weight-only), and Graphviz DOT. Both can be restricted to the nodes whose
//! names start with a prefix (one decoder layer: `layers.0.`).

use crate::rewrite::cost::{graph_cost, Kind};
use kiln_runtime::ir::{Graph, Op};
use std::fmt::Write as _;

fn kind_tag(k: Kind) -> &'static str {
    match k {
        Kind::Leaf => "leaf",
        Kind::WeightOnly => "weight-only",
        Kind::View => "view",
        Kind::CacheAppend => "cache append",
        Kind::Kernel => "kernel",
    }
}

/// One line per node: `name: type = Op(input names)  # kind`, then outputs and states. With a
/// `prefix`, only the nodes whose names start with it (outputs and states are then omitted).
pub fn text(graph: &Graph, prefix: Option<&str>) -> String {
    let costs = graph_cost(graph);
    let mut s = String::new();
    for (n, (kind, _)) in graph.nodes.iter().zip(&costs.nodes) {
        if prefix.is_some_and(|p| !n.name.starts_with(p)) {
            continue;
        }
        let ins: Vec<&str> = n
            .inputs
            .iter()
            .map(|&i| graph.nodes[i].name.as_str())
            .collect();
        let _ = write!(s, "{}: {} = {}", n.name, n.ty, n.op);
        if !ins.is_empty() {
            let _ = write!(s, " ({})", ins.join(", "));
        }
        let _ = writeln!(s, "  # {}", kind_tag(*kind));
    }
    if prefix.is_none() {
        for (name, id) in &graph.outputs {
            let _ = writeln!(s, "output {name} = {}", graph.nodes[*id].name);
        }
        for st in &graph.states {
            let _ = writeln!(
                s,
                "state {} <- {}",
                graph.nodes[st.input].name, graph.nodes[st.update].name
            );
        }
    }
    s
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Graphviz DOT: kernels as boxes, views dashed, weights and inputs as ellipses. With a
/// `prefix`, the nodes it selects plus the nodes they read (drawn grey).
pub fn dot(graph: &Graph, prefix: Option<&str>) -> String {
    let costs = graph_cost(graph);
    let selected: Vec<bool> = graph
        .nodes
        .iter()
        .map(|n| prefix.is_none_or(|p| n.name.starts_with(p)))
        .collect();
    let mut shown = selected.clone();
    for (id, n) in graph.nodes.iter().enumerate() {
        if selected[id] {
            for &i in &n.inputs {
                shown[i] = true;
            }
        }
    }
    let mut s = String::from(
        "digraph kiln {\n  rankdir=TB;\n  node [fontname=\"monospace\", fontsize=10];\n",
    );
    for (id, n) in graph.nodes.iter().enumerate() {
        if !shown[id] {
            continue;
        }
        let (shape, style) = match (costs.nodes[id].0, &n.op) {
            (Kind::Leaf, Op::Weight { .. } | Op::Input { .. }) => ("ellipse", "solid"),
            (Kind::Leaf, _) => ("plaintext", "solid"),
            (Kind::WeightOnly, _) => ("ellipse", "dotted"),
            (Kind::View, _) => ("box", "dashed"),
            (Kind::CacheAppend, _) => ("box", "rounded"),
            (Kind::Kernel, _) => ("box", "bold"),
        };
        let color = if selected[id] { "black" } else { "grey60" };
        let _ = writeln!(
            s,
            "  n{id} [label=\"{}\\n{}\\n{}\", shape={shape}, style={style}, color={color}, fontcolor={color}];",
            quote(&n.name),
            quote(&n.op.to_string()),
            quote(&n.ty.to_string())
        );
    }
    for (id, n) in graph.nodes.iter().enumerate() {
        if !selected[id] {
            continue;
        }
        for &i in &n.inputs {
            let _ = writeln!(s, "  n{i} -> n{id};");
        }
    }
    for (k, (name, id)) in graph.outputs.iter().enumerate() {
        if selected[*id] {
            let _ = writeln!(s, "  out{k} [label=\"{}\", shape=plaintext];", quote(name));
            let _ = writeln!(s, "  n{id} -> out{k};");
        }
    }
    s.push_str("}\n");
    s
}
