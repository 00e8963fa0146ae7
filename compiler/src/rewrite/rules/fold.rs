//! Simplifications of views and casts, exact by construction; they keep weight-only subgraphs
//! and activation view chains short. The weight-only subgraphs left after extraction (QKV and
//! gate/up concatenations, casts of weights) are then evaluated once at build time and stored as
//! derived weights (`rewrite/derive.rs`).
//!
//! - `transpose-involution`: `transpose(transpose(x, p), q) = x` when `q ∘ p` is the identity.
//! - `reshape-identity`: a reshape to the shape the value already has is the value.
//! - `reshape-reshape`: reshaping twice is reshaping once to the last shape (row-major order is
//!   preserved by both).
//! - `slice-full`: `x[0..n]` along an axis of length `n` is `x`.
//! - `cast-identity`: a cast to the dtype the value already has is the value.

use super::guards::{attr, ty};
use super::{var, Rule};
use crate::rewrite::analysis::KilnGraph;
use crate::rewrite::lang::Attr;
use crate::rule;
use egg::Subst;

fn inverse_perms(p: &str, q: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (p, q) = (var(p), var(q));
    move |eg, s| match (attr(eg, s, p), attr(eg, s, q)) {
        (Some(Attr::Perm(p)), Some(Attr::Perm(q))) => {
            p.len() == q.len() && q.iter().enumerate().all(|(i, &qi)| p.get(qi) == Some(&i))
        }
        _ => false,
    }
}

fn shape_of(sh: &str, x: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (sh, x) = (var(sh), var(x));
    move |eg, s| match (attr(eg, s, sh), ty(eg, s, x)) {
        (Some(Attr::Shape(sh)), Some(t)) => *sh == t.shape,
        _ => false,
    }
}

fn full_slice(ax: &str, end: &str, x: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (ax, end, x) = (var(ax), var(end), var(x));
    move |eg, s| match (attr(eg, s, ax), attr(eg, s, end), ty(eg, s, x)) {
        (Some(Attr::Axis(a)), Some(Attr::Dim(e)), Some(t)) => t.shape.get(*a) == Some(e),
        _ => false,
    }
}

fn same_dtype(x: &str, d: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (x, d) = (var(x), var(d));
    move |eg, s| match (ty(eg, s, x), attr(eg, s, d)) {
        (Some(t), Some(Attr::DType(d))) => t.dtype == *d,
        _ => false,
    }
}

/// The rules of this set.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rule!("transpose-involution"; "(transpose (transpose ?x ?p) ?q)" => "?x"                if inverse_perms("?p", "?q")),
        rule!("reshape-identity";     "(reshape ?x ?s)"                  => "?x"                if shape_of("?s", "?x")),
        rule!("reshape-reshape";      "(reshape (reshape ?x ?a) ?b)"     => "(reshape ?x ?b)"),
        rule!("slice-full";           "(slice ?x ?ax dim:0 ?e)"          => "?x"                if full_slice("?ax", "?e", "?x")),
        rule!("cast-identity";        "(cast ?x ?d)"                     => "?x"                if same_dtype("?x", "?d")),
    ]
}
