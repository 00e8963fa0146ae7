//! Precision lowering: a declared-`f32` graph computes in `bf16` or `f16` (`kiln build --dtype`),
//! keeping `f32` where accuracy needs it, and redundant casts disappear.
//!
//! - `lower-*`: each fused op on `f32` inputs gets an alternative that casts its inputs down, runs
//!   in the low precision, and casts the result back up: `linear`, `linear_add`, `gated_mlp`,
//!   `gated_gelu`, `rmsnorm`, `layer_norm`, `gelu_tanh`, `rope`, `attention`, `gather` (the
//!   embedding lookup). This is *not* an exact
//!   equality — it is the policy "these ops may run in low precision" — and the analysis checks it
//!   like any rule: same shape, same (`f32`) dtype on both sides. What stays `f32` by construction:
//!   RMSNorm statistics, the softmax inside `FusedAttention` and RoPE angles (the ops' kernels
//!   compute them in `f32` whatever their I/O type), and the logits (the graph's outputs keep their
//!   `f32` type; the last GEMM accumulates in `f32` and its up-cast fuses into its epilogue).
//!   Primitive ops left unfused are not lowered, but one:
//! - `lower-add`: the sum of two `f32` activations of one shape (a residual add that no
//!   projection's epilogue took: Gemma-2's `x + norm(attn)`, GPT-2's token + position embeddings)
//!   runs in the low precision too, as transformers runs it in a bf16 model and the GPU computes
//!   it; without it the residual stream, and every op after it, would stay `f32` on the CPU.
//! - `cast-roundtrip`: `cast(cast(x, f32), t) = x` when `x` has type `t` ∈ {bf16, f16}: widening to
//!   `f32` is exact, so narrowing back returns `x`. This removes the casts between two lowered ops.
//! - `cast-before-*`: a cast commutes with views (`reshape`, `transpose`, `slice`, and a two-input
//!   `concat` of like casts): casting element-wise and moving elements are independent. Pushing
//!   casts through views lets `cast-roundtrip` meet them.
//!
//! The KV caches are retyped to the low precision before this phase (`phases.rs`), so the cache
//! appends and attention read and write `bf16`/`f16` directly.

use super::guards::{dtype, konst, ty};
use super::{var, Rule};
use crate::rewrite::analysis::KilnGraph;
use crate::rewrite::lang::Attr;
use crate::rule;
use egg::Subst;
use kiln_runtime::ir::DType;

/// `x` has the dtype named by attribute `d`, and it is a 16-bit float.
fn narrow_of(x: &str, d: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (x, d) = (var(x), var(d));
    move |eg, s| match (ty(eg, s, x), super::guards::attr(eg, s, d)) {
        (Some(t), Some(Attr::DType(d))) => t.dtype == *d && matches!(d, DType::BF16 | DType::F16),
        _ => false,
    }
}

/// `x` and `y` are `f32` run-time values (not weight-only) of one shape.
fn f32_activations(x: &str, y: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (xv, yv) = (var(x), var(y));
    let (kx, ky) = (konst(x), konst(y));
    move |eg, s| {
        matches!((ty(eg, s, xv), ty(eg, s, yv)), (Some(a), Some(b))
            if a.dtype == DType::F32 && a == b)
            && !kx(eg, s)
            && !ky(eg, s)
    }
}

fn same_dtype(x: &str, y: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (x, y) = (var(x), var(y));
    move |eg, s| matches!((ty(eg, s, x), ty(eg, s, y)), (Some(a), Some(b)) if a.dtype == b.dtype)
}

/// The rules lowering to `lo` (`bf16` or `f16`).
#[rustfmt::skip]
pub fn rules(lo: DType) -> Vec<Rule> {
    let lo = lo.name();
    vec![
        rule!("lower-linear";     "(linear ?x ?w)"
            => (format!("(cast (linear (cast ?x dtype:{lo}) (cast ?w dtype:{lo})) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-linear-add"; "(linear_add ?x ?w ?r)"
            => (format!("(cast (linear_add (cast ?x dtype:{lo}) (cast ?w dtype:{lo}) (cast ?r dtype:{lo})) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-linear-bias"; "(linear_bias ?x ?w ?b)"
            => (format!("(cast (linear_bias (cast ?x dtype:{lo}) (cast ?w dtype:{lo}) (cast ?b dtype:{lo})) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-gated-mlp";  "(gated_mlp ?x ?w)"
            => (format!("(cast (gated_mlp (cast ?x dtype:{lo}) (cast ?w dtype:{lo})) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-gated-gelu"; "(gated_gelu ?x ?w)"
            => (format!("(cast (gated_gelu (cast ?x dtype:{lo}) (cast ?w dtype:{lo})) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-rmsnorm";    "(rmsnorm ?x ?w ?eps)"
            => (format!("(cast (rmsnorm (cast ?x dtype:{lo}) (cast ?w dtype:{lo}) ?eps) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-layer-norm"; "(layer_norm ?x ?w ?b ?eps)"
            => (format!("(cast (layer_norm (cast ?x dtype:{lo}) (cast ?w dtype:{lo}) (cast ?b dtype:{lo}) ?eps) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-gelu";       "(gelu_tanh ?x)"
            => (format!("(cast (gelu_tanh (cast ?x dtype:{lo})) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-rope";       "(rope ?x ?pos ?f ?ax)"
            => (format!("(cast (rope (cast ?x dtype:{lo}) ?pos ?f ?ax) dtype:f32)")) if dtype("?x", DType::F32)),
        rule!("lower-attention";  "(attention ?q ?k ?v ?s ?lag ?cap)"
            => (format!("(cast (attention (cast ?q dtype:{lo}) (cast ?k dtype:{lo}) (cast ?v dtype:{lo}) ?s ?lag ?cap) dtype:f32)")) if dtype("?q", DType::F32)),
        rule!("lower-gather";     "(gather ?t ?ids)"
            => (format!("(cast (gather (cast ?t dtype:{lo}) ?ids) dtype:f32)")) if dtype("?t", DType::F32)),
        rule!("lower-add";        "(add ?a ?b)"
            => (format!("(cast (add (cast ?a dtype:{lo}) (cast ?b dtype:{lo})) dtype:f32)")) if f32_activations("?a", "?b")),
        rule!("cast-roundtrip";          "(cast (cast ?x dtype:f32) ?d)"          => "?x"                                if narrow_of("?x", "?d")),
        rule!("cast-before-reshape";     "(reshape (cast ?x ?d) ?s)"             => "(cast (reshape ?x ?s) ?d)"),
        rule!("cast-before-transpose";   "(transpose (cast ?x ?d) ?p)"           => "(cast (transpose ?x ?p) ?d)"),
        rule!("cast-before-slice";       "(slice (cast ?x ?d) ?a ?b ?e)"         => "(cast (slice ?x ?a ?b ?e) ?d)"),
        rule!("cast-before-concat";      "(concat ?a (cast ?x ?d) (cast ?y ?d))" => "(cast (concat ?a ?x ?y) ?d)"      if same_dtype("?x", "?y")),
    ]
}
