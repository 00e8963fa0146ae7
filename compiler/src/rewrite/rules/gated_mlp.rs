//! Gated-MLP fusion: `silu(x·W_gateᵀ) ⊙ (x·W_upᵀ)` becomes one `GatedMlp[x, concat(W_gate, W_up)]`
//! — one GEMM over the stacked weight with a SiLU·mul epilogue — and Gemma's GeGLU
//! `gelu(x·W_gateᵀ) ⊙ (x·W_upᵀ)` one `GatedGelu` likewise. The concatenation is weight-only
//! and is folded into a derived weight at build time.
//!
//! - `silu-from-sigmoid` (helper): `g · 1/(e^-g + 1)` is `silu(g)`, by definition. `silu` is a
//!   helper e-node: it only shortens the next rule and is never extracted.
//! - `gelu-tanh-from-sigmoid`: `g · 1/(e^-(k·(g + c·g³)) + 1)` with `k = 2√(2/π)` and
//!   `c = 0.044715` (literal constants, guarded) is `gelu_tanh(g)`, GELU's tanh approximation
//!   (`(1 + tanh(z/2)) / 2 = σ(z)`), written as `models/gemma.ron` writes it.
//! - `fuse-gated-mlp`: `GatedMlp[x, w]` is defined as `silu(x·w[0..f]ᵀ) ⊙ (x·w[f..2f]ᵀ)`; with
//!   `w = concat(W_gate, W_up)` along rows, `w[0..f] = W_gate` and `w[f..2f] = W_up` exactly when the
//!   two weights have the same shape (guarded). The two projections read the same `x` — the
//!   horizontal part — and the product that reads both is the anchor, so no multi-pattern is
//!   needed; the rule runs in the horizontal phase because it creates a concatenated weight.
//! - `fuse-gated-gelu`: the same with `gelu_tanh` for `GatedGelu`.

use super::guards::{konst, scalar_near, ty};
use super::{var, Rule};
use crate::rewrite::analysis::KilnGraph;
use crate::rule;
use egg::Subst;

fn same_shape(a: &str, b: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (a, b) = (var(a), var(b));
    move |eg, s| ty(eg, s, a).is_some() && ty(eg, s, a) == ty(eg, s, b)
}

/// The rules of this set.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rule!("silu-from-sigmoid"; "(mul ?g (recip (add (exp (neg ?g)) 1)))" => "(silu ?g)"),
        rule!("fuse-gated-mlp";
            "(mul (silu (linear ?x ?wg)) (linear ?x ?wu))" => "(gated_mlp ?x (concat axis:0 ?wg ?wu))"
            if konst("?wg") if konst("?wu") if same_shape("?wg", "?wu")),
        rule!("gelu-tanh-from-sigmoid";
            "(mul ?g (recip (add (exp (neg (mul ?k (add ?g (mul ?c (mul (mul ?g ?g) ?g)))))) 1)))"
                => "(gelu_tanh ?g)"
            if scalar_near("?k", 2.0 * (2.0 / std::f32::consts::PI).sqrt())
            if scalar_near("?c", 0.044715)),
        rule!("fuse-gated-gelu";
            "(mul (gelu_tanh (linear ?x ?wg)) (linear ?x ?wu))" => "(gated_gelu ?x (concat axis:0 ?wg ?wu))"
            if konst("?wg") if konst("?wu") if same_shape("?wg", "?wu")),
    ]
}
