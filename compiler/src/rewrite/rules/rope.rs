//! RoPE recognition: the rotate-half rotary embedding with its angle table computed from the
//! positions becomes one `Rope{theta, seq_axis}[x, pos]` (fusable later into the QKV epilogue).
//!
//! - `rope-angles` (helper): the table `concat(f, f)` with `f = reshape(cast(pos), [s, 1]) ·
//!   1/theta^((2·iota(half))/d)` is `rope_angles(pos, theta, half)`: row `i` holds the angles
//!   `pos[i] · theta^(-2j/d)`, twice. Guards: `theta` and `d` are literal scalars with
//!   `d = 2·half`, `pos` is a vector of integers.
//! - `fuse-rope`: `x·cos(A) + concat(-x₂, x₁)·sin(A)`, with `A` such a table, `x₁`/`x₂` the two
//!   halves of `x`'s last axis, is `Rope` by definition (HF "rotate_half" pairing `(j, j+d/2)`).
//!   Guards: `x` is `[b, h, s, d]` (the table `[s, d]` broadcasts along axes 0–1, so the sequence
//!   is axis 2), the slice bounds are `0..d/2` and `d/2..d` of the last axis. The shape rule of
//!   `Rope` requires `pos` to index axis 2.
//!
//! The CPU reference computes the table with the same `f32` operations in the same order, so the
//! fused op matches the model file's math bit for bit.

use super::guards::{attr, dim_const, rank, scalar, ty};
use super::{var, Rule};
use crate::rewrite::analysis::KilnGraph;
use crate::rewrite::lang::Attr;
use crate::rule;
use egg::Subst;
use kiln_runtime::ir::{DType, Dim};

/// `d` is the scalar `2·half`, `col` is `[len(pos), 1]`, `ax` is axis 1, `pos` is i32 `[s]`.
fn angle_table(
    d: &str,
    half: &str,
    col: &str,
    ax: &str,
    pos: &str,
) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (d, half, col, ax, pos) = (var(d), var(half), var(col), var(ax), var(pos));
    move |eg, s| {
        let Some(p) = ty(eg, s, pos) else {
            return false;
        };
        let two_half = dim_const(eg, s, half).map(|h| 2 * h);
        let d_val = eg[s[d]].data.scalar();
        p.dtype == DType::I32
            && p.rank() == 1
            && matches!((two_half, d_val), (Some(a), Some(b)) if a as f32 == b)
            && attr(eg, s, col) == Some(&Attr::Shape(vec![p.shape[0].clone(), Dim::c(1)]))
            && attr(eg, s, ax) == Some(&Attr::Axis(1))
    }
}

/// `ax` is the last axis of `x`, `d` its length and `half` half of it.
fn halves(
    x: &str,
    ax: &str,
    half: &str,
    d: &str,
) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (x, ax, half, d) = (var(x), var(ax), var(half), var(d));
    move |eg, s| {
        let Some(t) = ty(eg, s, x) else { return false };
        let Some(last) = t.shape.last().and_then(|l| l.as_const()) else {
            return false;
        };
        attr(eg, s, ax) == Some(&Attr::Axis(t.rank() - 1))
            && dim_const(eg, s, d) == Some(last)
            && dim_const(eg, s, half).map(|h| 2 * h) == Some(last)
    }
}

const TABLE_HALF: &str = "(mul (reshape (cast ?pos dtype:f32) ?col) (recip (pow ?theta (div (mul (cast (iota ?half) dtype:f32) 2) ?d))))";

/// The rules of this set.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rule!("rope-angles";
            (format!("(concat ?ax {TABLE_HALF} {TABLE_HALF})")) => "(rope_angles ?pos ?theta ?half)"
            if scalar("?theta") if angle_table("?d", "?half", "?col", "?ax", "?pos")),
        rule!("fuse-rope";
            "(add (mul ?x (cos (rope_angles ?pos ?theta ?half)))
                  (mul (concat ?ax (neg (slice ?x ?ax ?half ?d)) (slice ?x ?ax dim:0 ?half))
                       (sin (rope_angles ?pos ?theta ?half))))"
            => "(rope ?x ?pos ?theta axis:2)"
            if rank("?x", 4) if halves("?x", "?ax", "?half", "?d")),
    ]
}
