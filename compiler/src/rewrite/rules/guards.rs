//! Named side conditions shared by the rule sets. Each takes pattern variable names and returns
//! a guard over the matched substitution.

use super::var;
use crate::rewrite::analysis::{Data, KilnGraph};
use crate::rewrite::lang::Attr;
use egg::Subst;
use kiln_runtime::ir::{DType, Dim, InputKind, TensorType};

/// The data of a variable's e-class.
pub fn data<'a>(eg: &'a KilnGraph, s: &Subst, v: egg::Var) -> &'a Data {
    &eg[s[v]].data
}

/// The tensor type of a variable's e-class (`None` for an attribute).
pub fn ty<'a>(eg: &'a KilnGraph, s: &Subst, v: egg::Var) -> Option<&'a TensorType> {
    data(eg, s, v).ty()
}

/// The attribute of a variable's e-class (`None` for a tensor).
pub fn attr<'a>(eg: &'a KilnGraph, s: &Subst, v: egg::Var) -> Option<&'a Attr> {
    data(eg, s, v).attr()
}

/// The constant size of a `dim:` attribute.
pub fn dim_const(eg: &KilnGraph, s: &Subst, v: egg::Var) -> Option<i64> {
    match attr(eg, s, v)? {
        Attr::Dim(d) => d.as_const(),
        _ => None,
    }
}

/// `x` is a build-time constant (weight-only).
pub fn konst(x: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let x = var(x);
    move |eg, s| data(eg, s, x).tensor().is_some_and(|t| t.konst)
}

/// `c` is a literal scalar constant.
pub fn scalar(c: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let c = var(c);
    move |eg, s| data(eg, s, c).scalar().is_some()
}

/// `c` is a literal scalar constant within a relative `1e-6` of `value` (a constant a model
/// file computes, such as `2 * sqrt(2 / pi)`).
pub fn scalar_near(c: &str, value: f32) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let c = var(c);
    move |eg, s| {
        data(eg, s, c)
            .scalar()
            .is_some_and(|v| (v - value).abs() <= value.abs() * 1e-6)
    }
}

/// `x` has exactly `r` axes.
pub fn rank(x: &str, r: usize) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let x = var(x);
    move |eg, s| ty(eg, s, x).is_some_and(|t| t.rank() == r)
}

/// `x` has dtype `d`.
pub fn dtype(x: &str, d: DType) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let x = var(x);
    move |eg, s| ty(eg, s, x).is_some_and(|t| t.dtype == d)
}

/// The attribute `a` is `axis:r-1` where `r` is the rank of `x` (the last axis).
pub fn last_axis(a: &str, x: &str) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let (a, x) = (var(a), var(x));
    move |eg, s| match (attr(eg, s, a), ty(eg, s, x)) {
        (Some(Attr::Axis(k)), Some(t)) => t.rank() > 0 && *k == t.rank() - 1,
        _ => false,
    }
}

/// `x` is the step input of kind `kind`.
pub fn input(x: &str, kind: InputKind) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let x = var(x);
    move |eg, s| {
        data(eg, s, x)
            .tensor()
            .is_some_and(|t| t.input == Some(kind))
    }
}

/// The `shape:` attribute `sh` equals `f(types of xs)` (e.g. a reshape's expected target).
pub fn shape_is(
    sh: &str,
    xs: &[&str],
    f: impl Fn(&[&TensorType]) -> Option<Vec<Dim>> + Send + Sync,
) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let sh = var(sh);
    let xs: Vec<egg::Var> = xs.iter().map(|x| var(x)).collect();
    move |eg, s| {
        let Some(Attr::Shape(got)) = attr(eg, s, sh) else {
            return false;
        };
        let tys: Option<Vec<&TensorType>> = xs.iter().map(|&x| ty(eg, s, x)).collect();
        tys.and_then(|t| f(&t)).is_some_and(|want| *got == want)
    }
}
