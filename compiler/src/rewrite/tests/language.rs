//! The e-graph language against the IR's op list (`Op::examples`, one op of every kind): every
//! op raises to an e-node that lowers back to the same op over the same inputs, no two ops share
//! an e-node, and every e-node of `lang.rs` is an op's or one of the helpers (which never lower
//! to an op). An op added to the IR without its e-node, or an e-node without its op, fails here.

use crate::rewrite::analysis::{KilnGraph, TypeAnalysis};
use crate::rewrite::lang::{Node, WeightName};
use crate::rewrite::ops::{lower, raise, Lowered};
use egg::Id;
use kiln_runtime::ir::Op;
use std::collections::BTreeSet;

/// The spellings of `lang.rs`'s e-nodes (`"name" = Variant`), read from its source.
fn language_names() -> BTreeSet<String> {
    let src = include_str!("../lang.rs");
    let block = &src[src.find("define_language!").unwrap()..];
    let block = &block[..block.find("\n    }\n}").unwrap()];
    block
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix('"')?;
            let (name, tail) = rest.split_once('"')?;
            tail.trim_start().starts_with('=').then(|| name.to_string())
        })
        .collect()
}

fn egraph() -> KilnGraph {
    KilnGraph::new(TypeAnalysis {
        permissive: true,
        ..Default::default()
    })
}

#[test]
fn every_op_has_one_e_node_and_every_e_node_an_op_or_a_helper() {
    let mut names = BTreeSet::new();
    for op in Op::examples() {
        if matches!(op, Op::Input { .. } | Op::Weight { .. }) {
            continue; // leaves: the converter adds them from its tables
        }
        let mut eg = egraph();
        let ins: Vec<Id> = (0..op.arity().unwrap_or(2))
            .map(|i| eg.add(Node::Weight(WeightName(format!("x{i}").into()))))
            .collect();
        let id = raise(&mut eg, &op, &ins);
        let node = eg[id].nodes[0].clone();
        if matches!(op, Op::Constant { .. }) {
            assert!(matches!(node, Node::Const(_)), "{op}: {node:?}");
            continue;
        }
        let back = lower(&node, &|c| eg[c].data.clone()).unwrap();
        assert_eq!(back, Lowered::Op(op.clone(), ins), "{op} raised to {node}");
        assert!(
            names.insert(node.to_string()),
            "{op} shares its e-node `{node}` with another op"
        );
    }
    // The helpers exist only inside the e-graph: they lower to no op.
    let x = Id::from(0);
    for helper in [
        Node::Silu(x),
        Node::RopeAngles([x, x]),
        Node::CausalMask([x, x]),
        Node::WindowMask([x, x, x]),
    ] {
        let mut eg = egraph();
        eg.add(Node::Weight(WeightName("x".into())));
        assert_eq!(
            lower(&helper, &|c| eg[c].data.clone()),
            Ok(Lowered::Helper),
            "{helper:?}"
        );
        assert!(names.insert(helper.to_string()), "{helper:?}");
    }
    assert_eq!(names, language_names());
}
