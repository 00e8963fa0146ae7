//! What the rewriter did, for `kiln inspect --explain` and `--json`: per phase the rules that fired
//! (how often, where), the saturation stop reason and e-graph size, and costs before and after;
//! per decoder layer the ops before and the kernels after.

use super::cost::{graph_cost, Cost, Kind};
use kiln_runtime::ir::Graph;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A rule's applications in one phase.
#[derive(Clone, Debug, Serialize)]
pub struct Fired {
    /// Rule name.
    pub rule: String,
    /// Applications that changed the e-graph.
    pub count: usize,
    /// Where: the names of the rewritten nodes, layer indices folded (`layers.*.h ×30`).
    pub locations: Vec<String>,
}

/// One phase of the rewriter.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    /// Phase name.
    pub name: String,
    /// Rules in the phase.
    pub rules: usize,
    /// Saturation iterations run.
    pub iterations: usize,
    /// Why saturation stopped (`saturated`, or the limit that was hit).
    pub stop: String,
    /// True if no rule could apply any more.
    pub saturated: bool,
    /// E-nodes in the e-graph at the end.
    pub egraph_nodes: usize,
    /// E-classes in the e-graph at the end.
    pub egraph_classes: usize,
    /// Graph nodes before the phase.
    pub nodes_before: usize,
    /// Graph nodes after the phase.
    pub nodes_after: usize,
    /// Cost (ns per reference decode step) before the phase.
    pub cost_before: f64,
    /// Cost after the phase.
    pub cost_after: f64,
    /// Improvement moves kept by the extractor.
    pub extraction_moves: usize,
    /// Wall time of the phase, milliseconds.
    pub time_ms: f64,
    /// Rules that fired.
    pub fired: Vec<Fired>,
}

/// A cost with its breakdown.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CostSummary {
    /// Estimated nanoseconds per reference decode step.
    pub time_ns: f64,
    /// Bytes moved.
    pub bytes: f64,
    /// Flops.
    pub flops: f64,
    /// Kernel launches.
    pub kernels: usize,
}

impl From<Cost> for CostSummary {
    fn from(c: Cost) -> Self {
        CostSummary {
            time_ns: c.time_ns(),
            bytes: c.bytes,
            flops: c.flops,
            kernels: c.launches as usize,
        }
    }
}

/// Everything the rewriter reports.
#[derive(Clone, Debug, Serialize)]
pub struct RewriteReport {
    /// The phases, in order.
    pub phases: Vec<PhaseReport>,
    /// Cost of the input graph.
    pub cost_before: CostSummary,
    /// Cost of the final graph (after weight folding).
    pub cost_after: CostSummary,
    /// Names of the derived weights.
    pub derived_weights: Vec<String>,
    /// Total wall time, milliseconds.
    pub total_ms: f64,
}

impl RewriteReport {
    /// Applications per rule over all phases.
    pub fn rules_fired(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for p in &self.phases {
            for f in &p.fired {
                *m.entry(f.rule.clone()).or_default() += f.count;
            }
        }
        m
    }

    /// The `--explain` text.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        let c = |c: &CostSummary| {
            format!(
                "{:.1} µs ({} kernels, {:.2} MB, {:.2} MFLOP)",
                c.time_ns / 1e3,
                c.kernels,
                c.bytes / 1e6,
                c.flops / 1e6
            )
        };
        let _ = writeln!(s, "cost before: {}", c(&self.cost_before));
        let _ = writeln!(s, "cost after:  {}", c(&self.cost_after));
        let _ = writeln!(
            s,
            "(estimated per decode step: batch 1, 1 new token, 1023 cached; see rewrite/cost.rs)"
        );
        for p in &self.phases {
            let _ = writeln!(
                s,
                "\nphase `{}`: {} rules, {} iterations, {}; e-graph {} nodes / {} classes; \
                 graph {} → {} nodes; cost {:.1} → {:.1} µs; {} extraction moves; {:.1} ms",
                p.name,
                p.rules,
                p.iterations,
                if p.saturated {
                    "saturated".to_string()
                } else {
                    format!("NOT saturated: {}", p.stop)
                },
                p.egraph_nodes,
                p.egraph_classes,
                p.nodes_before,
                p.nodes_after,
                p.cost_before / 1e3,
                p.cost_after / 1e3,
                p.extraction_moves,
                p.time_ms
            );
            for f in &p.fired {
                let _ = writeln!(
                    s,
                    "  {:<28} ×{:<5} at {}",
                    f.rule,
                    f.count,
                    f.locations.join(", ")
                );
            }
        }
        if !self.derived_weights.is_empty() {
            let _ = writeln!(s, "\nderived weights: {}", self.derived_weights.len());
            for w in self.derived_weights.iter().take(8) {
                let _ = writeln!(s, "  {w}");
            }
            if self.derived_weights.len() > 8 {
                let _ = writeln!(s, "  …");
            }
        }
        let _ = writeln!(s, "\nrewrite time: {:.1} ms", self.total_ms);
        s
    }
}

/// Folds numeric name components: `layers.12.h` → `layers.*.h`.
pub fn fold_indices(name: &str) -> String {
    name.split('.')
        .map(|p| {
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                p
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Groups names by [`fold_indices`]: `["layers.*.h ×30", "final"]`, in first-seen order.
pub fn group_locations(names: &[String]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in names {
        let k = fold_indices(n);
        let c = counts.entry(k.clone()).or_default();
        if *c == 0 {
            order.push(k);
        }
        *c += 1;
    }
    order
        .into_iter()
        .map(|k| match counts[&k] {
            1 => k,
            n => format!("{k} ×{n}"),
        })
        .collect()
}

/// What one decoder layer of a graph holds, by [`Kind`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LayerStats {
    /// Non-leaf nodes (ops) of the layer.
    pub ops: usize,
    /// Kernel launches.
    pub kernels: usize,
    /// Views (reshape, transpose, slice), read strided by their consumers.
    pub views: usize,
    /// KV-cache appends.
    pub cache_appends: usize,
    /// Weight-only nodes (evaluated at build time).
    pub weight_only: usize,
    /// Kernels by op name.
    pub kernel_ops: BTreeMap<String, usize>,
}

/// The stats of the nodes whose names start with `prefix` (e.g. `layers.0.`).
pub fn layer_stats(graph: &Graph, prefix: &str) -> LayerStats {
    let costs = graph_cost(graph);
    let mut s = LayerStats::default();
    for (n, (kind, _)) in graph.nodes.iter().zip(&costs.nodes) {
        if !n.name.starts_with(prefix) || *kind == Kind::Leaf {
            continue;
        }
        s.ops += 1;
        match kind {
            Kind::Kernel => {
                s.kernels += 1;
                *s.kernel_ops.entry(n.op.name()).or_default() += 1;
            }
            Kind::View => s.views += 1,
            Kind::CacheAppend => s.cache_appends += 1,
            Kind::WeightOnly => s.weight_only += 1,
            Kind::Leaf => {}
        }
    }
    s
}

/// The machine-readable summary of `kiln inspect --json`: the decoder layer `prefix` before and
/// after rewriting, the rules fired, costs and phases.
pub fn summary(parsed: &Graph, out: &super::Optimized, prefix: &str) -> serde_json::Value {
    let (before, after) = (layer_stats(parsed, prefix), layer_stats(&out.graph, prefix));
    let r = &out.report;
    serde_json::json!({
        "layer": prefix.trim_end_matches('.'),
        "ops_per_layer_before": before.ops,
        "kernels_per_layer_before": before.kernels,
        "kernels_per_layer_after": after.kernels,
        "layer_before": before,
        "layer_after": after,
        "rules_fired": r.rules_fired(),
        "cost_before": r.cost_before.time_ns,
        "cost_after": r.cost_after.time_ns,
        "cost_before_detail": r.cost_before,
        "cost_after_detail": r.cost_after,
        "nodes_before": parsed.nodes.len(),
        "nodes_after": out.graph.nodes.len(),
        "derived_weights": r.derived_weights.len(),
        "phases": r.phases,
        "rewrite_ms": r.total_ms,
    })
}
