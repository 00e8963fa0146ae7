//! GEMM recognition: a product against a transposed weight is a `Linear`, and a residual add of
//! a `Linear` is a `LinearAdd` (the add runs in the GEMM's epilogue, as TensorRT-LLM does; kiln
//! has no two-output `AddRmsNorm`, so this is where residual adds fuse).
//!
//! - `linear-from-matmul`: `x · Transpose(w, [1, 0])` with `w` a weight `[n, k]` is by definition
//!   `Linear[x, w] = x · wᵀ`.
//! - `linear-from-matmul-in-out`: `x · w` with `w` a checkpoint weight `[k, n]` (GPT-2's Conv1D
//!   weights, stored `[in, out]`) is `Linear[x, wᵀ]`; the transpose is weight-only, so the build
//!   stores the weight in the `[out, in]` layout the GEMMs read. (A product with a transposed
//!   weight is `linear-from-matmul`'s.)
//! - `linear-add-residual-right` / `-left`: `r + x·wᵀ` (either operand order; addition commutes
//!   exactly in IEEE arithmetic) is `LinearAdd[x, w, r]`. The shape rule of `LinearAdd` requires
//!   `r` to have exactly the product's shape, so a broadcasting add is never fused.
//! - `linear-bias-right` / `-left`: `x·wᵀ + b` with `b` a constant vector is `LinearBias[x, w,
//!   b]` (the shape rule of `LinearBias` requires `b` to have one entry per weight row; the
//!   broadcast add over the rows is what the bias epilogue computes).

use super::guards::{konst, rank};
use super::{var, Rule};
use crate::rewrite::analysis::KilnGraph;
use crate::rewrite::lang::Node;
use crate::rule;
use egg::Subst;

/// `w`'s class holds a checkpoint weight (a leaf, not a computed weight such as a transpose).
fn weight_leaf(w: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let w = var(w);
    move |eg, s| eg[s[w]].nodes.iter().any(|n| matches!(n, Node::Weight(_)))
}

/// The rules of this set.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rule!("linear-from-matmul";        "(matmul ?x (transpose ?w perm:[1,0]))" => "(linear ?x ?w)" if konst("?w")),
        rule!("linear-from-matmul-in-out"; "(matmul ?x ?w)"                         => "(linear ?x (transpose ?w perm:[1,0]))" if weight_leaf("?w") if rank("?w", 2)),
        rule!("linear-add-residual-right"; "(add ?r (linear ?x ?w))"                => "(linear_add ?x ?w ?r)"),
        rule!("linear-add-residual-left";  "(add (linear ?x ?w) ?r)"                => "(linear_add ?x ?w ?r)"),
        rule!("linear-bias-right";         "(add ?b (linear ?x ?w))"                => "(linear_bias ?x ?w ?b)" if konst("?b") if rank("?b", 1)),
        rule!("linear-bias-left";          "(add (linear ?x ?w) ?b)"                => "(linear_bias ?x ?w ?b)" if konst("?b") if rank("?b", 1)),
    ]
}
