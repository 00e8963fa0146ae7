//! Attention fusion: scores, scale, causal mask, softmax and the value product, with the
//! grouped-query head broadcast, become one `FusedAttention{scale}[q, k, v]`. The KV-cache append
//! (`Concat(state, k_new)`) stays outside, feeding `k` and `v`, so the state bindings still point
//! at it (the CUDA backend lowers it to an in-place paged-cache append).
//!
//! - `causal-mask` (helper): `where(iota(t) > reshape(pos, [s, 1]), -inf, 0)` is
//!   `causal_mask(pos, t)`: `-inf` where key `j` comes after query position `pos[i]`.
//! - `window-mask` (helper): `where(cast(reshape(pos, [s, 1])) - cast(iota(t)) > c, -inf,
//!   causal_mask(pos, t))` with `c ≥ 0` a whole literal is `window_mask(pos, t, c)`: a query also
//!   loses the keys more than `c` positions back (Mistral's sliding window of `c + 1` keys).
//! - `fuse-attention`: with `q [b, h, s, d]`, `k = v [b, kh, t, d]`, query heads grouped as
//!   `[b, kh, h/kh, s, d]` against keys and values reshaped to `[b, kh, 1, t, d]` (query head `j`
//!   meets KV head `j / (h/kh)`: GQA, MHA when `kh = h`, MQA when `kh = 1`),
//!   `reshape(softmax(q·kᵀ·scale + causal_mask(pos, t), last)·v, [b, h, s, d])` is
//!   `FusedAttention` by definition — *provided* the mask is the op's implicit one: query `i` sees
//!   keys `0..=t-s+i`. That holds when `pos` is the step's positions input (`past + i`, filled by
//!   the executor) and `t = past + seq`, `s = seq`; the guards check exactly that, symbolically.
//! - `fuse-attention-window`: the same with `window_mask(pos, t, c)`: `FusedAttention` with a
//!   window of `c + 1` keys (the op's lag operand is `c`; `inf` for the causal one).
//! - `softcap`: `c · (2σ(2x/c) − 1)` with `c > 0` a literal, Gemma-2's `c · tanh(x / c)` as its
//!   model file writes it, is `Softcap{c}` (one kernel for the final logits' cap).
//! - `fuse-attention-softcap`, `fuse-attention-window-softcap`: the two fusions over
//!   soft-capped scores, `FusedAttention` with that soft-cap (Gemma-2).

use super::guards::{attr, input, scalar, ty};
use super::{var, Rule};
use crate::rewrite::analysis::KilnGraph;
use crate::rewrite::lang::Attr;
use crate::rule;
use egg::Subst;
use kiln_runtime::ir::{Dim, InputKind, Sym};

/// `col` is `[len(pos), 1]`.
fn column_of(col: &str, pos: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (col, pos) = (var(col), var(pos));
    move |eg, s| match ty(eg, s, pos) {
        Some(p) if p.rank() == 1 => {
            attr(eg, s, col) == Some(&Attr::Shape(vec![p.shape[0].clone(), Dim::c(1)]))
        }
        _ => false,
    }
}

/// The shapes of grouped-query attention over a cache of `past + seq` keys (see the module doc).
fn grouped_shapes(
    [q, k, v, qs, ks, vs, os, t]: [&str; 8],
) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let [q, k, v, qs, ks, vs, os, t] = [q, k, v, qs, ks, vs, os, t].map(var);
    move |eg, s| {
        let (Some(q), Some(k), Some(v)) = (ty(eg, s, q), ty(eg, s, k), ty(eg, s, v)) else {
            return false;
        };
        if q.rank() != 4 || k.rank() != 4 || k != v {
            return false;
        }
        let [b, h, sq, d] = [0, 1, 2, 3].map(|i| q.shape[i].clone());
        let [kb, kh, kt, kd] = [0, 1, 2, 3].map(|i| k.shape[i].clone());
        let (Some(hn), Some(khn)) = (h.as_const(), kh.as_const()) else {
            return false;
        };
        let seq = Dim::sym(Sym::Seq);
        let kv_len = seq.add(&Dim::sym(Sym::Past));
        let is = |var, dims: Vec<Dim>| attr(eg, s, var) == Some(&Attr::Shape(dims));
        khn > 0
            && hn % khn == 0
            && kb == b
            && kd == d
            && sq == seq
            && kt == kv_len
            && attr(eg, s, t) == Some(&Attr::Dim(kv_len.clone()))
            && is(
                qs,
                vec![
                    b.clone(),
                    kh.clone(),
                    Dim::c(hn / khn),
                    sq.clone(),
                    d.clone(),
                ],
            )
            && is(
                ks,
                vec![b.clone(), kh.clone(), Dim::c(1), kt.clone(), d.clone()],
            )
            && attr(eg, s, vs) == attr(eg, s, ks)
            && is(os, vec![b, h, sq, d])
    }
}

/// `c` is a literal scalar for which `ok` holds.
fn literal(c: &str, ok: fn(f32) -> bool) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let c = var(c);
    move |eg, s| eg[s[c]].data.scalar().is_some_and(ok)
}

/// `c` is a whole, non-negative literal scalar (a window's lag bound).
fn whole(c: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    literal(c, |v| v >= 0.0 && v.fract() == 0.0 && v < u32::MAX as f32)
}

/// `c` is a positive, finite literal scalar (a soft-cap).
fn positive(c: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    literal(c, |v| v > 0.0 && v.is_finite())
}

/// Grouped attention's product chain over the scaled scores (soft-capped at `?cap` when
/// `capped`) plus `mask`.
fn attention_pattern(mask: &str, capped: bool) -> String {
    let scores =
        "(mul (matmul (reshape ?q ?qs) (transpose (reshape ?k ?ks) perm:[0,1,2,4,3])) ?scale)";
    let scores = if capped {
        format!("(softcap {scores} ?cap)")
    } else {
        scores.to_string()
    };
    format!(
        "(reshape
           (matmul
             (softmax
               (add {scores}
                    {mask})
               axis:4)
             (reshape ?v ?vs))
           ?os)"
    )
}

/// The rules of this set.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rule!("causal-mask";
            "(where (gt (iota ?t) (reshape ?pos ?col)) -inf 0)" => "(causal_mask ?pos ?t)"
            if input("?pos", InputKind::Positions) if column_of("?col", "?pos")),
        rule!("window-mask";
            "(where (gt (sub (cast (reshape ?pos ?col) dtype:f32) (cast (iota ?t) dtype:f32)) ?c) -inf (causal_mask ?pos ?t))"
            => "(window_mask ?pos ?t ?c)"
            if input("?pos", InputKind::Positions) if column_of("?col", "?pos") if whole("?c")),
        rule!("softcap";
            "(mul (sub (mul (recip (add (exp (neg (mul (div ?x ?c) 2))) 1)) 2) 1) ?c)"
                => "(softcap ?x ?c)"
            if positive("?c")),
        rule!("fuse-attention";
            (attention_pattern("(causal_mask ?pos ?t)", false)) => "(attention ?q ?k ?v ?scale inf 0)"
            if scalar("?scale") if input("?pos", InputKind::Positions)
            if grouped_shapes(["?q", "?k", "?v", "?qs", "?ks", "?vs", "?os", "?t"])),
        rule!("fuse-attention-window";
            (attention_pattern("(window_mask ?pos ?t ?c)", false)) => "(attention ?q ?k ?v ?scale ?c 0)"
            if scalar("?scale") if input("?pos", InputKind::Positions)
            if grouped_shapes(["?q", "?k", "?v", "?qs", "?ks", "?vs", "?os", "?t"])),
        rule!("fuse-attention-softcap";
            (attention_pattern("(causal_mask ?pos ?t)", true)) => "(attention ?q ?k ?v ?scale inf ?cap)"
            if scalar("?scale") if input("?pos", InputKind::Positions)
            if grouped_shapes(["?q", "?k", "?v", "?qs", "?ks", "?vs", "?os", "?t"])),
        rule!("fuse-attention-window-softcap";
            (attention_pattern("(window_mask ?pos ?t ?c)", true)) => "(attention ?q ?k ?v ?scale ?c ?cap)"
            if scalar("?scale") if input("?pos", InputKind::Positions)
            if grouped_shapes(["?q", "?k", "?v", "?qs", "?ks", "?vs", "?os", "?t"])),
    ]
}
