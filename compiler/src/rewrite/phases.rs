//! The phases of the rewriter and how one runs: graph → e-graph → bounded saturation → DAG
//! extraction → graph → verification. Each phase starts from the graph the previous one
//! extracted, so its rules see the chosen form and its e-graph stays small.
//!
//! 1. `fuse` — vertical fusions: GEMM recognition and residual epilogues, RMSNorm, RoPE,
//!    attention, plus the exact view/cast simplifications.
//! 2. `horizontal` — fusions that merge several GEMMs over one input (QKV, gate/up), with their
//!    own node budget, since multi-patterns match combinatorially.
//! 3. `precision` — only for a `bf16`/`f16` build: the KV caches are retyped to the low
//!    precision, then the lowering and cast-cleanup rules run.
//! 4. `quantize` — only with `--quant`: linear weights move to a weight format.
//!
//! Saturation is bounded by nodes, iterations and time; a phase that hits a limit still yields a
//! valid graph (extraction picks among what the e-graph holds) and its report says which limit.
//! The node and iteration limits make the result deterministic: egg's hashing is unseeded and
//! every choice here breaks ties by e-class order. The time limit is a safety net only.

use super::analysis::KilnGraph;
use super::convert::{class_names, to_egraph, to_graph, Roots};
use super::cost::{graph_cost, op_cost, InputInfo};
use super::extract::{assert_acyclic, extract};
use super::lang::Node;
use super::ops::{lower, Lowered};
use super::report::{group_locations, Fired, PhaseReport};
use super::rules::{self, Rule};
use super::verify::verify;
use super::RewriteError;
use egg::{Runner, SimpleScheduler, StopReason};
use kiln_runtime::ir::{DType, Graph, Op, StateBinding};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Bounds of one phase's saturation.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most e-nodes.
    pub nodes: usize,
    /// Most iterations.
    pub iterations: usize,
    /// Most wall time (a safety net: hitting it makes the result timing-dependent).
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nodes: 400_000,
            iterations: 12,
            time: Duration::from_secs(60),
        }
    }
}

/// A named rule set with its limits.
pub struct Phase {
    /// Name shown in reports.
    pub name: &'static str,
    /// Its rules.
    pub rules: Vec<Rule>,
    /// Its bounds.
    pub limits: Limits,
}

/// The standard phases for a build computing in `dtype`, storing linear weights as
/// `quant.format` when asked.
pub fn standard(dtype: DType, quant: Option<&rules::quant::QuantOptions>) -> Vec<Phase> {
    let mut fuse = rules::linear::rules();
    fuse.extend(rules::norm::rules());
    fuse.extend(rules::rope::rules());
    fuse.extend(rules::attention::rules());
    fuse.extend(rules::fold::rules());
    let mut horizontal = rules::qkv::rules();
    horizontal.extend(rules::gated_mlp::rules());
    let mut phases = vec![
        Phase {
            name: "fuse",
            rules: fuse,
            limits: Limits::default(),
        },
        Phase {
            name: "horizontal",
            rules: horizontal,
            limits: Limits {
                nodes: 200_000,
                iterations: 4,
                ..Limits::default()
            },
        },
    ];
    if matches!(dtype, DType::BF16 | DType::F16) {
        let mut precision = rules::precision::rules(dtype);
        precision.extend(rules::fold::rules());
        phases.push(Phase {
            name: "precision",
            rules: precision,
            limits: Limits::default(),
        });
    }
    if let Some(q) = quant {
        phases.push(Phase {
            name: "quantize",
            rules: rules::quant::rules(q),
            limits: Limits::default(),
        });
    }
    phases
}

/// The run-time cost of an e-node (infinite for helpers), in nanoseconds.
pub fn enode_cost(eg: &KilnGraph, n: &Node) -> f64 {
    let data = |id| eg[id].data.clone();
    let (op, ins) = match lower(n, &data) {
        Ok(Lowered::Op(op, ins)) => (op, ins),
        Ok(Lowered::Leaf | Lowered::Attr) => return 0.0,
        Ok(Lowered::Helper) | Err(_) => return f64::INFINITY,
    };
    let Ok(me) = super::analysis::node_data(n, &data, &eg.analysis.leaves) else {
        return f64::INFINITY;
    };
    let Some(me) = me.tensor() else {
        return f64::INFINITY;
    };
    let infos: Option<Vec<InputInfo>> = ins
        .iter()
        .map(|&i| {
            eg[i].data.tensor().map(|t| InputInfo {
                ty: &t.ty,
                konst: t.konst,
                input: t.input,
            })
        })
        .collect();
    match infos {
        Some(infos) => op_cost(&op, &infos, &me.ty, me.konst).time_ns(),
        None => f64::INFINITY,
    }
}

fn stop_text(s: &Option<StopReason>) -> (String, bool) {
    match s {
        Some(StopReason::Saturated) | None => ("saturated".into(), true),
        Some(StopReason::IterationLimit(n)) => (format!("iteration limit ({n})"), false),
        Some(StopReason::NodeLimit(n)) => (format!("node limit ({n} e-nodes)"), false),
        Some(StopReason::TimeLimit(t)) => (format!("time limit ({t:.1} s)"), false),
        Some(StopReason::Other(o)) => (o.clone(), false),
    }
}

/// Runs one phase on `graph`; `reference` is the graph the interface is checked against.
pub fn run(
    graph: &Graph,
    phase: &Phase,
    reference: &Graph,
    permissive: bool,
) -> Result<(Graph, PhaseReport), RewriteError> {
    let t0 = Instant::now();
    let loaded = to_egraph(graph, permissive);
    let runner = Runner::default()
        .with_egraph(loaded.egraph)
        .with_node_limit(phase.limits.nodes)
        .with_iter_limit(phase.limits.iterations)
        .with_time_limit(phase.limits.time)
        .with_scheduler(SimpleScheduler)
        .run(&phase.rules);
    let (stop, saturated) = stop_text(&runner.stop_reason);
    let iterations = runner.iterations.len();
    let eg = runner.egraph;
    // In permissive mode, conflicts are reported after extraction, so that an ill-typed
    // extracted graph is reported by the node at fault.
    let conflicts = eg.analysis.conflicts.join("; ");
    let err = |message: String| {
        let message = if conflicts.is_empty() {
            message
        } else {
            format!("{message} (after an unsound rewrite: {conflicts})")
        };
        RewriteError::Phase {
            phase: phase.name.to_string(),
            message,
        }
    };
    let names = class_names(&eg, graph, &loaded.classes);
    let roots = Roots::of(graph, &loaded.classes);
    let ids = roots.ids();
    let extracted = extract(&eg, &ids, &|n| enode_cost(&eg, n)).map_err(err)?;
    assert_acyclic(&eg, &extracted.choice, &ids);
    let out = to_graph(&eg, &extracted.choice, &roots, &names).map_err(err)?;
    verify(&out, reference).map_err(|e| err(format!("extracted graph fails verification: {e}")))?;
    if !conflicts.is_empty() {
        return Err(err("unsound rewrite".into()));
    }
    let mut fired: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (rule, class) in &eg.analysis.applied {
        let at = names
            .get(&eg.find(*class))
            .cloned()
            .unwrap_or_else(|| "(new node)".into());
        fired.entry(rule.to_string()).or_default().push(at);
    }
    let report = PhaseReport {
        name: phase.name.to_string(),
        rules: phase.rules.len(),
        iterations,
        stop,
        saturated,
        egraph_nodes: eg.total_number_of_nodes(),
        egraph_classes: eg.number_of_classes(),
        nodes_before: graph.nodes.len(),
        nodes_after: out.nodes.len(),
        cost_before: graph_cost(graph).total.time_ns(),
        cost_after: graph_cost(&out).total.time_ns(),
        extraction_moves: extracted.moves,
        time_ms: t0.elapsed().as_secs_f64() * 1e3,
        fired: fired
            .into_iter()
            .map(|(rule, at)| Fired {
                rule,
                count: at.len(),
                locations: group_locations(&at),
            })
            .collect(),
    };
    Ok((out, report))
}

/// Retypes the KV-cache states to `lo`: each state input becomes `lo`, its append
/// `Concat(state, new)` appends `cast(new, lo)`, and the append's readers read it cast back to
/// `f32` (casts that the precision rules then remove).
pub fn retype_states(g: &Graph, lo: DType) -> Result<Graph, RewriteError> {
    let appends: Vec<(usize, usize)> = g
        .states
        .iter()
        .filter(|s| {
            let u = &g.nodes[s.update];
            matches!(u.op, Op::Concat { .. })
                && u.inputs.first() == Some(&s.input)
                && g.nodes[s.input].ty.dtype == DType::F32
        })
        .map(|s| (s.input, s.update))
        .collect();
    let bad = |e: kiln_runtime::ir::GraphError| RewriteError::Phase {
        phase: "precision".into(),
        message: e.to_string(),
    };
    let mut out = Graph::default();
    let mut map: Vec<usize> = Vec::with_capacity(g.nodes.len());
    // For an append: its new (low-precision) node; `map` points readers at the f32 cast.
    let mut low: BTreeMap<usize, usize> = BTreeMap::new();
    for (id, n) in g.nodes.iter().enumerate() {
        let ins: Vec<usize> = n.inputs.iter().map(|&i| map[i]).collect();
        let new = if appends.iter().any(|&(i, _)| i == id) {
            let mut ty = n.ty.clone();
            ty.dtype = lo;
            out.add_leaf(n.name.clone(), n.op.clone(), ty)
        } else if appends.iter().any(|&(_, u)| u == id) {
            let mut parts = vec![ins[0]];
            for (&orig, &x) in n.inputs[1..].iter().zip(&ins[1..]) {
                let c = out
                    .add(
                        format!("{}.{}", g.nodes[orig].name, lo.name()),
                        Op::Cast { dtype: lo },
                        vec![x],
                    )
                    .map_err(bad)?;
                parts.push(c);
            }
            let a = out.add(n.name.clone(), n.op.clone(), parts).map_err(bad)?;
            low.insert(id, a);
            out.add(
                format!("{}.f32", n.name),
                Op::Cast { dtype: DType::F32 },
                vec![a],
            )
            .map_err(bad)?
        } else if matches!(n.op, Op::Input { .. } | Op::Weight { .. }) {
            out.add_leaf(n.name.clone(), n.op.clone(), n.ty.clone())
        } else {
            out.add(n.name.clone(), n.op.clone(), ins).map_err(bad)?
        };
        map.push(new);
    }
    out.outputs = g
        .outputs
        .iter()
        .map(|(n, o)| (n.clone(), map[*o]))
        .collect();
    out.states = g
        .states
        .iter()
        .map(|s| StateBinding {
            input: map[s.input],
            update: low.get(&s.update).copied().unwrap_or(map[s.update]),
        })
        .collect();
    Ok(out)
}
