//! Extraction and bad input: DAG cost stays linear in depth on a shared residual chain (where a
//! tree cost doubles per layer); a phase that cannot saturate within its limits still yields a
//! valid graph and says so; an unsound rule panics in strict mode; an extracted graph that fails
//! type checking fails with the node named.

use super::{executor, model, rel_l2, verified};
use crate::rewrite::analysis::KilnGraph;
use crate::rewrite::convert::{to_egraph, Roots};
use crate::rewrite::extract::extract;
use crate::rewrite::lang::Node;
use crate::rewrite::phases::{enode_cost, standard, Limits, Phase};
use crate::rewrite::rules::Rule;
use crate::rewrite::verify::verify;
use crate::rewrite::{optimize_with, RewriteOptions};
use crate::rule;
use egg::{CostFunction, Id, Language, Runner};
use kiln_runtime::ir::{DType, Dim, Graph};

/// A decoder-like chain: every layer's output feeds the next norm and the next residual add.
fn residual_chain(layers: usize) -> Graph {
    model(&format!(
        r#"Model(family: "t", params: [("layers", Expr("{layers}"))],
        functions: [
            Function(name: "rms_norm", args: ["x", "w"], body: [
                Let("sq", Mul("x", "x")),
                Let("ms", Mean(x: "sq", axis: -1)),
                Let("eps", Const("1e-5")),
                Let("var", Add("ms", "eps")),
                Let("inv", Rsqrt("var")),
                Let("xn", Mul("x", "inv")),
                Let("y", Mul("xn", "w")),
            ], result: "y"),
        ],
        body: [
            Let("tokens", Tokens),
            Let("embed", Weight("embed", ["16", "8"])),
            Let("x", Gather("embed", "tokens")),
            Repeat(count: "layers", index: "i", scope: "layers", body: [
                Let("g", Weight("g.{{i}}", ["8"])),
                Let("w", Weight("w.{{i}}", ["8", "8"])),
                Let("h", Call("rms_norm", ["x", "g"])),
                Let("wt", Transpose(x: "w", perm: [1, 0])),
                Let("p", MatMul("h", "wt")),
                Let("x", Add("x", "p")),
            ]),
            Output("x", "x"),
        ])"#
    ))
}

/// egg-style tree cost: a class read twice is paid twice.
struct TreeCost<'a>(&'a KilnGraph);

impl CostFunction<Node> for TreeCost<'_> {
    type Cost = f64;
    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &Node, mut costs: C) -> f64 {
        enode_cost(self.0, enode) + enode.children().iter().map(|&c| costs(c)).sum::<f64>()
    }
}

/// (DAG cost, tree cost) of the fused chain of `layers` layers.
fn chain_costs(layers: usize) -> (f64, f64) {
    let g = residual_chain(layers);
    let loaded = to_egraph(&g, false);
    let phase = &standard(DType::F32, None)[0];
    let runner = Runner::default()
        .with_egraph(loaded.egraph)
        .run(&phase.rules);
    let eg = runner.egraph;
    let roots = Roots::of(&g, &loaded.classes).ids();
    let dag = extract(&eg, &roots, &|n| enode_cost(&eg, n)).unwrap().cost;
    let tree = egg::Extractor::new(&eg, TreeCost(&eg))
        .find_best(roots[0])
        .0;
    (dag, tree)
}

#[test]
fn dag_extraction_cost_is_linear_in_depth_where_tree_cost_doubles() {
    let (d8, t8) = chain_costs(8);
    let (d16, t16) = chain_costs(16);
    let (d32, _) = chain_costs(32);
    // Each layer adds the same work: the cost of 32 layers is twice that of 16, within the
    // constant part (embedding) shared by both.
    let per_layer = (d32 - d16) / 16.0;
    assert!(
        ((d16 - d8) / 8.0 - per_layer).abs() < 1e-6 * per_layer,
        "{d8} {d16} {d32}"
    );
    assert!(d32 < 2.1 * d16 && d16 < 2.1 * d8, "{d8} {d16} {d32}");
    // The tree cost of the same e-graph counts the residual twice per layer.
    assert!(t16 > 100.0 * t8, "tree costs {t8} → {t16}");
}

/// `neg(x) = neg(x · 1)` — exact, and it applies again to every new product: never saturates.
fn growing() -> Vec<Rule> {
    vec![rule!("grow"; "(neg ?x)" => "(neg (mul ?x 1))")]
}

#[test]
fn a_phase_that_does_not_saturate_still_yields_a_valid_graph_and_says_so() {
    let text = r#"Model(family: "t", params: [], body: [
        Let("tokens", Tokens),
        Let("embed", Weight("embed", ["16", "8"])),
        Let("x", Gather("embed", "tokens")),
        Let("y", Neg("x")),
        Output("y", "y"),
    ])"#;
    let g = model(text);
    for limits in [
        Limits {
            nodes: 40,
            ..Limits::default()
        },
        Limits {
            iterations: 3,
            ..Limits::default()
        },
    ] {
        let phase = Phase {
            name: "grow",
            rules: growing(),
            limits,
        };
        let out = optimize_with(&g, vec![phase], &RewriteOptions::default()).unwrap();
        let p = &out.report.phases[0];
        assert!(!p.saturated, "{p:?}");
        assert!(p.stop.contains("limit"), "{}", p.stop);
        assert!(out.report.explain().contains("NOT saturated"));
        verified(&out.graph, &g);
        let (a, b) = (executor(&out.graph, &out.derived, 1), executor(&g, &[], 1));
        let (mut sa, mut sb) = (a.session(1), b.session(1));
        let ya = &a.step(&mut sa, &[1, 2, 3], &[]).unwrap().outputs["y"];
        let yb = &b.step(&mut sb, &[1, 2, 3], &[]).unwrap().outputs["y"];
        assert_eq!(rel_l2(&ya.data, &yb.data), 0.0);
    }
}

/// `y = w + x` with `w [8]` broadcast against `x [batch, seq, 8]`; `z = -y`.
fn broadcast_add() -> Graph {
    model(
        r#"Model(family: "t", params: [], body: [
            Let("tokens", Tokens),
            Let("embed", Weight("embed", ["16", "8"])),
            Let("x", Gather("embed", "tokens")),
            Let("w", Weight("w", ["8"])),
            Let("y", Add("w", "x")),
            Let("z", Neg("y")),
            Output("z", "z"),
        ])"#,
    )
}

#[test]
#[should_panic(
    expected = "unsound rewrite: rule `drop-addend` rewrites a value of type f32[batch, seq, 8] into one of type f32[8]"
)]
fn an_unsound_rule_panics_in_strict_mode() {
    let phase = Phase {
        name: "bad",
        rules: vec![rule!("drop-addend"; "(add ?a ?b)" => "?a")],
        limits: Limits::default(),
    };
    let _ = optimize_with(&broadcast_add(), vec![phase], &RewriteOptions::default());
}

#[test]
fn an_ill_typed_extraction_fails_naming_the_node() {
    // A raw egg rewrite bypasses the checks of `rule!`; permissive mode records the conflict.
    let phase = Phase {
        name: "bad",
        rules: vec![egg::rewrite!("drop-addend"; "(add ?a ?b)" => "?a")],
        limits: Limits::default(),
    };
    let opts = RewriteOptions {
        permissive: true,
        ..RewriteOptions::default()
    };
    let err = optimize_with(&broadcast_add(), vec![phase], &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rewrite phase `bad`"), "{err}");
    assert!(
        err.contains("node `w`") || err.contains("node `z`"),
        "{err}"
    );
    assert!(err.contains("f32[batch, seq, 8]"), "{err}");
}

#[test]
fn the_verifier_names_the_node_at_fault() {
    let g = broadcast_add();
    let mut bad = g.clone();
    let z = bad.find("z").unwrap();
    bad.nodes[z].ty.shape = vec![Dim::c(8)];
    let err = verify(&bad, &g).unwrap_err().to_string();
    assert!(err.contains("node `z`"), "{err}");
}
