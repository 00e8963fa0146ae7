//! RMSNorm fusion: the chain `x · rsqrt(mean(x², last axis) + eps) · w` becomes one
//! `RmsNorm{eps}[x, w]`.
//!
//! Sound because `RmsNorm` is defined as exactly that expression (statistics over the last axis,
//! `w` broadcast along it); the guards pin what the definition needs: the mean runs over the last
//! axis and keeps it, `eps` is a literal scalar (it becomes the op's attribute), `w` is a weight.
//! The shape rule of `RmsNorm` (checked on every match) requires `w` to be `[h]` with `h` the last
//! axis of `x`, so the final product is the broadcast the definition means. Three spellings are
//! matched: `x·rsqrt(…)·w`, `w·(x·rsqrt(…))` and `x/√(…)·w`.
//!
//! `fuse-layernorm`: LayerNorm as GPT-2's model file writes it — the row centred, RMS-normalized
//! and shifted, `rmsnorm(x − mean(x, last axis), w) + b` — is `LayerNorm{eps}[x, w, b]`: the
//! mean square of the centred row is the row's variance, so the expression is LayerNorm's
//! definition; `b` must be a constant vector (the shape rule checks its length).
//!
//! A residual add followed by RMSNorm (`AddRmsNorm`, two outputs) is not fused: the graph IR has
//! single-output nodes, and the residual add already fuses into the preceding GEMM
//! (`LinearAdd`, see `linear.rs`).

use super::guards::{konst, last_axis, rank, scalar};
use super::Rule;
use crate::rule;

/// The rules of this set.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rule!("fuse-rmsnorm";
            "(mul (mul ?x (rsqrt (add (mean (mul ?x ?x) ?ax keep) ?eps))) ?w)" => "(rmsnorm ?x ?w ?eps)"
            if last_axis("?ax", "?x") if scalar("?eps") if konst("?w")),
        rule!("fuse-rmsnorm-weight-first";
            "(mul ?w (mul ?x (rsqrt (add (mean (mul ?x ?x) ?ax keep) ?eps))))" => "(rmsnorm ?x ?w ?eps)"
            if last_axis("?ax", "?x") if scalar("?eps") if konst("?w")),
        rule!("fuse-layernorm";
            "(add (rmsnorm (sub ?x (mean ?x ?ax keep)) ?w ?eps) ?b)" => "(layer_norm ?x ?w ?b ?eps)"
            if last_axis("?ax", "?x") if konst("?b") if rank("?b", 1)),
        rule!("fuse-rmsnorm-div-sqrt";
            "(mul (div ?x (sqrt (add (mean (mul ?x ?x) ?ax keep) ?eps))) ?w)" => "(rmsnorm ?x ?w ?eps)"
            if last_axis("?ax", "?x") if scalar("?eps") if konst("?w")),
    ]
}
