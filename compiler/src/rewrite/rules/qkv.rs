//! QKV fusion, a horizontal fusion: the three projections `x·Wqᵀ`, `x·Wkᵀ`, `x·Wvᵀ` of one input
//! become one `Linear[x, concat(Wq, Wk, Wv)]` followed by three slices of its last axis (views).
//! The concatenation is weight-only: the build folds it into one derived weight.
//!
//! It is a multi-pattern — `?q = (linear ?x ?wq), ?k = (linear ?x ?wk), ?v = (linear ?x ?wv)` —
//! matched only where the three results are distinct e-classes in e-class order (one match per
//! triple instead of six permutations, and none where two sides are already one class), the
//! weights are constant matrices but no concatenation (checkpoint weights or row slices of one,
//! as Phi-3's fused `qkv_proj` is sliced; the fused product, whose weight is a concatenation, is
//! not fused again), and `x` does not depend on any of the three results (a fused node reading its
//! own output would be a cycle).
//!
//! Sound because row block `i` of the concatenated weight is `W_i`, so columns
//! `o_i .. o_i + n_i` of `x·concat(W)ᵀ` are exactly `x·W_iᵀ` (each output column is one dot
//! product of `x` with one weight row).
//!
//! `fuse-qkv-bias` does the same for three `LinearBias` (Qwen2's q/k/v biases), concatenating
//! the biases as the weights: entry `o_i + j` of `concat(b)` is `b_i[j]`, the bias of column
//! `o_i + j`.

use super::guards::ty;
use super::{try_add, union_typed, var, Rule};
use crate::rewrite::analysis::{KilnGraph, TypeAnalysis};
use crate::rewrite::lang::{Attr, Node};
use egg::{Applier, Id, Language, MultiPattern, PatternAst, Rewrite, Subst, Symbol, Var};
use kiln_runtime::ir::Dim;
use std::collections::HashSet;

/// Fuses the projections bound to `outs` (by weights `weights`, and biases `biases` when the
/// projections are `LinearBias`) of one input `x`.
pub struct Horizontal {
    x: Var,
    outs: Vec<Var>,
    weights: Vec<Var>,
    biases: Vec<Var>,
}

/// True if e-class `from` depends on any of `targets` (through any node of any class).
fn depends_on(eg: &KilnGraph, from: Id, targets: &[Id]) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![eg.find(from)];
    while let Some(c) = stack.pop() {
        if targets.contains(&c) {
            return true;
        }
        if !seen.insert(c) {
            continue;
        }
        for n in &eg[c].nodes {
            stack.extend(n.children().iter().map(|&ch| eg.find(ch)));
        }
    }
    false
}

impl Applier<Node, TypeAnalysis> for Horizontal {
    fn apply_one(
        &self,
        eg: &mut KilnGraph,
        _eclass: Id,
        s: &Subst,
        _ast: Option<&PatternAst<Node>>,
        rule: Symbol,
    ) -> Vec<Id> {
        let outs: Vec<Id> = self.outs.iter().map(|&v| eg.find(s[v])).collect();
        if outs.windows(2).any(|w| w[0] >= w[1]) {
            return vec![];
        }
        let weights: Vec<Id> = self.weights.iter().map(|&w| s[w]).collect();
        // Build-time constant matrices that are no concatenation: a product over an already
        // concatenated weight is not fused again (that would nest concatenations without end).
        // Checkpoint weights, and row slices of one (Phi-3's `qkv_proj`), qualify.
        let plain = self.weights.iter().all(|&w| {
            let class = &eg[s[w]];
            !class.nodes.iter().any(|n| matches!(n, Node::Concat(_)))
                && class
                    .data
                    .tensor()
                    .is_some_and(|t| t.konst && t.ty.rank() == 2)
        });
        if !plain || depends_on(eg, s[self.x], &outs) {
            return vec![];
        }
        let Some(x_rank) = ty(eg, s, self.x).map(|t| t.rank()) else {
            return vec![];
        };
        let mut rows = Vec::new();
        for &w in &self.weights {
            match ty(eg, s, w).and_then(|t| t.shape[0].as_const()) {
                Some(n) => rows.push(n),
                None => return vec![],
            }
        }
        let axis0 = eg.add(Node::Attr(Attr::Axis(0)));
        let mut cat = vec![axis0];
        cat.extend(&weights);
        let Some(cat) = try_add(eg, Node::Concat(cat.into_boxed_slice())) else {
            return vec![];
        };
        let lin = if self.biases.is_empty() {
            try_add(eg, Node::Linear([s[self.x], cat]))
        } else {
            let mut bs = vec![axis0];
            bs.extend(self.biases.iter().map(|&b| s[b]));
            try_add(eg, Node::Concat(bs.into_boxed_slice()))
                .and_then(|bcat| try_add(eg, Node::LinearBias([s[self.x], cat, bcat])))
        };
        let Some(lin) = lin else {
            return vec![];
        };
        let last = eg.add(Node::Attr(Attr::Axis(x_rank - 1)));
        let mut start = 0;
        let mut changed = vec![];
        for (&out, &n) in outs.iter().zip(&rows) {
            let a = eg.add(Node::Attr(Attr::Dim(Dim::c(start))));
            let b = eg.add(Node::Attr(Attr::Dim(Dim::c(start + n))));
            start += n;
            let Some(slice) = try_add(eg, Node::Slice([lin, last, a, b])) else {
                return changed;
            };
            if union_typed(eg, out, slice, rule) {
                changed.push(out);
            }
        }
        if let Some(&first) = changed.first() {
            eg.analysis.applied.push((rule, first));
        }
        changed
    }
}

/// The rules of this set.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    let fuse = |name: &str, pattern: &str, biased: bool| {
        let proj = |w: &str, b: &str| -> PatternAst<Node> {
            pattern.replace("?w", w).replace("?b", b).parse().expect("a valid pattern")
        };
        let searcher = MultiPattern::new(vec![
            (var("?q"), proj("?wq", "?bq")),
            (var("?k"), proj("?wk", "?bk")),
            (var("?v"), proj("?wv", "?bv")),
        ]);
        let applier = Horizontal {
            x: var("?x"),
            outs: vec![var("?q"), var("?k"), var("?v")],
            weights: vec![var("?wq"), var("?wk"), var("?wv")],
            biases: if biased {
                vec![var("?bq"), var("?bk"), var("?bv")]
            } else {
                vec![]
            },
        };
        Rewrite::new(name, searcher, applier).expect("a valid rule")
    };
    vec![
        fuse("fuse-qkv", "(linear ?x ?w)", false),
        fuse("fuse-qkv-bias", "(linear_bias ?x ?w ?b)", true),
    ]
}
