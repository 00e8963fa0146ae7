//! Symbolic dimensions: an affine combination of the run-time symbols (`batch`, `seq`, `past`)
//! plus a constant. `kv_len` is `past + seq`. Everything a Llama-family graph needs (concatenating
//! the KV cache, slicing the last position) stays affine, so shapes are checked at build time.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A run-time size symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Sym {
    /// Number of sequences in the step.
    Batch,
    /// Number of new tokens per sequence in the step.
    Seq,
    /// Number of tokens already in the KV cache.
    Past,
}

impl Sym {
    /// The name used in model files and printed graphs.
    pub fn name(self) -> &'static str {
        match self {
            Sym::Batch => "batch",
            Sym::Seq => "seq",
            Sym::Past => "past",
        }
    }
}

/// Values of the run-time symbols for one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymValues {
    /// Sequences in the step.
    pub batch: usize,
    /// New tokens per sequence.
    pub seq: usize,
    /// Tokens already cached per sequence.
    pub past: usize,
}

impl SymValues {
    fn get(&self, s: Sym) -> i64 {
        (match s {
            Sym::Batch => self.batch,
            Sym::Seq => self.seq,
            Sym::Past => self.past,
        }) as i64
    }
}

/// `constant + Σ coef·sym`, with terms sorted by symbol and no zero coefficients.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dim {
    /// The constant part.
    pub constant: i64,
    /// The symbolic part.
    pub terms: Vec<(Sym, i64)>,
}

impl Dim {
    /// A constant dimension.
    pub fn c(n: i64) -> Dim {
        Dim {
            constant: n,
            terms: vec![],
        }
    }
    /// A dimension equal to one symbol.
    pub fn sym(s: Sym) -> Dim {
        Dim {
            constant: 0,
            terms: vec![(s, 1)],
        }
    }
    /// The constant value, if the dimension has no symbols.
    pub fn as_const(&self) -> Option<i64> {
        self.terms.is_empty().then_some(self.constant)
    }
    /// True if this is exactly one symbol (coefficient 1, no constant).
    pub fn as_sym(&self) -> Option<Sym> {
        match self.terms.as_slice() {
            [(s, 1)] if self.constant == 0 => Some(*s),
            _ => None,
        }
    }
    /// Evaluates the dimension for concrete symbol values.
    pub fn eval(&self, v: &SymValues) -> i64 {
        self.constant + self.terms.iter().map(|(s, c)| c * v.get(*s)).sum::<i64>()
    }
    fn normalized(mut self) -> Dim {
        self.terms.sort();
        let mut out: Vec<(Sym, i64)> = Vec::new();
        for (s, c) in self.terms {
            match out.last_mut() {
                Some((ls, lc)) if *ls == s => *lc += c,
                _ => out.push((s, c)),
            }
        }
        out.retain(|(_, c)| *c != 0);
        Dim {
            constant: self.constant,
            terms: out,
        }
    }
    /// `self + other`.
    pub fn add(&self, other: &Dim) -> Dim {
        let mut terms = self.terms.clone();
        terms.extend(other.terms.iter().cloned());
        Dim {
            constant: self.constant + other.constant,
            terms,
        }
        .normalized()
    }
    /// `self - other`.
    pub fn sub(&self, other: &Dim) -> Dim {
        self.add(&other.scale(-1))
    }
    /// `k · self`.
    pub fn scale(&self, k: i64) -> Dim {
        Dim {
            constant: self.constant * k,
            terms: self.terms.iter().map(|(s, c)| (*s, c * k)).collect(),
        }
        .normalized()
    }
    /// `self · other`; `None` when both are symbolic (the result would not be affine).
    pub fn mul(&self, other: &Dim) -> Option<Dim> {
        match (self.as_const(), other.as_const()) {
            (Some(a), _) => Some(other.scale(a)),
            (_, Some(b)) => Some(self.scale(b)),
            _ => None,
        }
    }
    /// `self / k` when every coefficient divides exactly.
    pub fn div(&self, k: i64) -> Option<Dim> {
        if k == 0 || self.constant % k != 0 || self.terms.iter().any(|(_, c)| c % k != 0) {
            return None;
        }
        Some(Dim {
            constant: self.constant / k,
            terms: self.terms.iter().map(|(s, c)| (*s, c / k)).collect(),
        })
    }
}

impl From<i64> for Dim {
    fn from(n: i64) -> Dim {
        Dim::c(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (s, c) in &self.terms {
            let sign = if *c < 0 {
                "-"
            } else if first {
                ""
            } else {
                "+"
            };
            let mag = c.unsigned_abs();
            if mag == 1 {
                write!(f, "{sign}{}", s.name())?;
            } else {
                write!(f, "{sign}{mag}*{}", s.name())?;
            }
            first = false;
        }
        if first {
            write!(f, "{}", self.constant)
        } else if self.constant != 0 {
            write!(
                f,
                "{}{}",
                if self.constant < 0 { "-" } else { "+" },
                self.constant.unsigned_abs()
            )
        } else {
            Ok(())
        }
    }
}

/// A tensor shape of symbolic dimensions.
pub type Shape = Vec<Dim>;

/// Formats a shape as `[batch, seq, 576]`.
pub fn fmt_shape(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// True if two shapes hold the same number of elements for every symbol value: the symbolic
/// factors must match as a multiset and the constant factors multiply to the same number.
pub fn same_numel(a: &[Dim], b: &[Dim]) -> bool {
    fn split(s: &[Dim]) -> (i64, Vec<Dim>) {
        let mut k = 1;
        let mut syms = vec![];
        for d in s {
            match d.as_const() {
                Some(c) => k *= c,
                None => syms.push(d.clone()),
            }
        }
        syms.sort();
        (k, syms)
    }
    split(a) == split(b)
}

/// Evaluates a shape for concrete symbol values.
pub fn eval_shape(shape: &[Dim], v: &SymValues) -> Vec<usize> {
    shape.iter().map(|d| d.eval(v).max(0) as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_arithmetic_and_display() {
        let kv = Dim::sym(Sym::Past).add(&Dim::sym(Sym::Seq));
        assert_eq!(kv.to_string(), "seq+past");
        let last = Dim::sym(Sym::Seq).sub(&Dim::c(1));
        assert_eq!(last.to_string(), "seq-1");
        assert_eq!(kv.sub(&Dim::sym(Sym::Seq)), Dim::sym(Sym::Past));
        let v = SymValues {
            batch: 2,
            seq: 5,
            past: 7,
        };
        assert_eq!(kv.eval(&v), 12);
        assert_eq!(Dim::c(576).div(9), Some(Dim::c(64)));
        assert_eq!(Dim::c(10).div(3), None);
        assert!(kv.mul(&kv).is_none());
        // The extremes of i64 print without overflowing (found by the `expr` fuzz target).
        let low = Dim::sym(Sym::Past).sub(&Dim::c(i64::MAX)).sub(&Dim::c(1));
        assert_eq!(low.to_string(), "past-9223372036854775808");
        assert_eq!(
            Dim::sym(Sym::Seq).scale(i64::MIN).to_string(),
            "-9223372036854775808*seq"
        );
    }

    #[test]
    fn numel_equality() {
        let b = Dim::sym(Sym::Batch);
        let s = Dim::sym(Sym::Seq);
        assert!(same_numel(
            &[b.clone(), s.clone(), Dim::c(576)],
            &[b.clone(), s.clone(), Dim::c(9), Dim::c(64)]
        ));
        assert!(!same_numel(&[b.clone(), Dim::c(576)], &[s, Dim::c(576)]));
    }
}
