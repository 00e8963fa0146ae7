//! RoPE recognition: the rotate-half rotary embedding with its angle table computed from the
//! positions becomes one `Rope{seq_axis}[x, pos, inv_freq]` (fusable later into the QKV
//! epilogue). Whatever the model file computes as the frequencies — plain `theta^(-2i/d)`,
//! linear or Llama-3 scaling, partial tables — the rule keeps as the op's third input: a
//! build-time constant that weight folding stores in the engine.
//!
//! - `rope-angles` (helper): the table `concat(f, f)` with `f = reshape(cast(pos), [s, 1]) ·
//!   inv_freq` is `rope_angles(pos, inv_freq)`: row `i` holds the angles `pos[i] · inv_freq`,
//!   twice. Guards: `inv_freq` is a constant f32 vector, `pos` a vector of integers.
//! - `fuse-rope`: `x·cos(A) + concat(-x₂, x₁)·sin(A)`, with `A` such a table, `x₁`/`x₂` the two
//!   halves of `x`'s last axis, is `Rope` by definition (HF "rotate_half" pairing `(j, j+d/2)`).
//!   Guards: `x` is `[b, h, s, d]` (the table `[s, d]` broadcasts along axes 0–1, so the sequence
//!   is axis 2), the slice bounds are `0..d/2` and `d/2..d` of the last axis, `inv_freq` has
//!   `d/2` entries. The shape rule of `Rope` requires `pos` to index axis 2.
//!
//! The CPU reference computes the angles with the same `f32` operations in the same order, so the
//! fused op matches the model file's math bit for bit.

use super::guards::{attr, dim_const, rank, ty};
use super::{var, Rule};
use crate::rewrite::analysis::KilnGraph;
use crate::rewrite::lang::Attr;
use crate::rule;
use egg::Subst;
use kiln_runtime::ir::{DType, Dim};

/// `f` is a constant f32 vector, `col` is `[len(pos), 1]`, `ax` is axis 1, `pos` is i32 `[s]`.
fn angle_table(
    f: &str,
    col: &str,
    ax: &str,
    pos: &str,
) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (f, col, ax, pos) = (var(f), var(col), var(ax), var(pos));
    move |eg, s| {
        let (Some(p), Some(fd)) = (ty(eg, s, pos), eg[s[f]].data.tensor()) else {
            return false;
        };
        p.dtype == DType::I32
            && p.rank() == 1
            && fd.konst
            && fd.ty.dtype == DType::F32
            && fd.ty.rank() == 1
            && attr(eg, s, col) == Some(&Attr::Shape(vec![p.shape[0].clone(), Dim::c(1)]))
            && attr(eg, s, ax) == Some(&Attr::Axis(1))
    }
}

/// `ax` is the last axis of `x`, `d` its length, `half` half of it and the length of `f`.
fn halves(
    x: &str,
    ax: &str,
    half: &str,
    d: &str,
    f: &str,
) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (x, ax, half, d, f) = (var(x), var(ax), var(half), var(d), var(f));
    move |eg, s| {
        let Some(t) = ty(eg, s, x) else { return false };
        let Some(last) = t.shape.last().and_then(|l| l.as_const()) else {
            return false;
        };
        attr(eg, s, ax) == Some(&Attr::Axis(t.rank() - 1))
            && dim_const(eg, s, d) == Some(last)
            && dim_const(eg, s, half).map(|h| 2 * h) == Some(last)
            && ty(eg, s, f).and_then(|t| t.shape.first()?.as_const()) == Some(last / 2)
    }
}

const TABLE_HALF: &str = "(mul (reshape (cast ?pos dtype:f32) ?col) ?f)";

/// The rules of this set.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rule!("rope-angles";
            (format!("(concat ?ax {TABLE_HALF} {TABLE_HALF})")) => "(rope_angles ?pos ?f)"
            if angle_table("?f", "?col", "?ax", "?pos")),
        rule!("fuse-rope";
            "(add (mul ?x (cos (rope_angles ?pos ?f)))
                  (mul (concat ?ax (neg (slice ?x ?ax ?half ?d)) (slice ?x ?ax dim:0 ?half))
                       (sin (rope_angles ?pos ?f))))"
            => "(rope ?x ?pos ?f axis:2)"
            if rank("?x", 4) if halves("?x", "?ax", "?half", "?d", "?f")),
    ]
}
