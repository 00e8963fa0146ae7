//! `kiln build --kv-cache int8|fp8`: the KV cache in 8 bits. Every state whose update appends
//! new entries to it (`Concat(state, new)`, a KV-cache append) gets its new entries through a
//! `KvQuant` op, which rounds each head vector of each token to int8 or E4M3 with its own scale
//! (`max|v| / 127`, `/ 448`), as a cache storing codes plus one scale per head and token holds
//! them. Attention then reads the rounded keys and values, old and new alike.

use kiln_runtime::ir::{DType, Graph, NodeId, Op};
use std::collections::HashMap;

/// The graph with its KV-cache appends rounded to `format` (`Int8` or `Fp8`).
pub fn quantize_kv_cache(graph: &Graph, format: DType) -> Result<Graph, String> {
    if !matches!(format, DType::Int8 | DType::Fp8) {
        return Err(format!(
            "--kv-cache {}: a KV cache can be int8 or fp8",
            format.name()
        ));
    }
    // The append nodes: state updates that concatenate new entries to their state.
    let appends: HashMap<NodeId, NodeId> = graph
        .states
        .iter()
        .filter(|s| {
            let u = &graph.nodes[s.update];
            matches!(u.op, Op::Concat { .. }) && u.inputs.first() == Some(&s.input)
        })
        .map(|s| (s.update, s.input))
        .collect();
    if appends.is_empty() {
        return Err(
            "--kv-cache: the graph has no KV-cache append (a state updated by Concat(state, new))"
                .into(),
        );
    }
    let mut out = Graph::default();
    let mut map: Vec<NodeId> = Vec::with_capacity(graph.nodes.len());
    for (id, n) in graph.nodes.iter().enumerate() {
        let new_id = if n.inputs.is_empty() {
            out.add_leaf(n.name.clone(), n.op.clone(), n.ty.clone())
        } else {
            let mut ins: Vec<NodeId> = n.inputs.iter().map(|&i| map[i]).collect();
            if appends.contains_key(&id) {
                for (k, &i) in n.inputs.iter().enumerate().skip(1) {
                    let name = format!("{}.{}", graph.nodes[i].name, format.name());
                    ins[k] = out
                        .add(name, Op::KvQuant { format }, vec![map[i]])
                        .map_err(|e| e.to_string())?;
                }
            }
            out.add(n.name.clone(), n.op.clone(), ins)
                .map_err(|e| e.to_string())?
        };
        map.push(new_id);
    }
    out.copy_bindings(graph, |i| map[i]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::tests::{executor, llama, rel_l2, run, tiny_config};
    use crate::rewrite::{optimize, RewriteOptions};

    #[test]
    fn appends_are_rounded_and_attention_reads_them() {
        let g = llama(&tiny_config(32, 2, 4, 2, 8, 48, 64, false));
        let (prompt, next) = ([3, 9, 27, 61, 5], [vec![8], vec![40]]);
        let want = run(&executor(&g, &[], 4), 1, &prompt, &next);
        for (format, tol) in [(DType::Int8, 2e-2), (DType::Fp8, 6e-2)] {
            let q = quantize_kv_cache(&g, format).unwrap();
            let rounding = q
                .nodes
                .iter()
                .filter(|n| n.op == Op::KvQuant { format })
                .count();
            assert_eq!(rounding, 4, "k and v of 2 layers");
            // Through the rewriter too: the appends and the fused attention stay.
            let opt = optimize(&q, &RewriteOptions::default()).unwrap();
            assert!(opt
                .graph
                .nodes
                .iter()
                .any(|n| matches!(n.op, Op::FusedAttention { .. })));
            for graph in [&q, &opt.graph] {
                let derived = if std::ptr::eq(graph, &opt.graph) {
                    &opt.derived[..]
                } else {
                    &[]
                };
                let got = run(&executor(graph, derived, 4), 1, &prompt, &next);
                for (a, b) in got.iter().zip(&want) {
                    let e = rel_l2(a, b);
                    assert!(e > 0.0 && e <= tol, "{}: {e:e}", format.name());
                }
            }
        }
        assert!(quantize_kv_cache(&g, DType::BF16).is_err());
    }
}
