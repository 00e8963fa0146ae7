//! How a value of the unsharded graph is spread over the ranks of a tensor-parallel group.

use kiln_runtime::ir::Dim;

/// The layout of one value over `n` ranks: some axes split into equal contiguous parts, and
/// possibly a partial sum (the whole value is the sum of the parts).
///
/// Rank `r` holds part `d = r / (n / parts())` (the group is `n / parts()`-fold replicated, the
/// replicas being consecutive ranks), read as mixed-radix digits, most significant first: one
/// digit per split in `splits` order, then the partial index. So `splits: [(1, 2), (2, 2)]` on
/// four ranks gives rank 1 part 0 of axis 1 and part 1 of axis 2.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Split axes, in digit order (most significant first): `(axis, parts)`.
    pub splits: Vec<(usize, u32)>,
    /// Number of partial-sum parts (1: each rank holds complete values).
    pub partial: u32,
}

impl Layout {
    /// Every rank holds the whole value.
    pub fn replicated() -> Layout {
        Layout {
            splits: vec![],
            partial: 1,
        }
    }

    /// Split on one axis.
    pub fn split(axis: usize, parts: u32) -> Layout {
        Layout {
            splits: if parts > 1 {
                vec![(axis, parts)]
            } else {
                vec![]
            },
            partial: 1,
        }
    }

    /// A partial sum over `parts` parts, no axis split.
    pub fn partial(parts: u32) -> Layout {
        Layout {
            splits: vec![],
            partial: parts,
        }
    }

    /// True if every rank holds the whole value.
    pub fn is_replicated(&self) -> bool {
        self.splits.is_empty() && self.partial == 1
    }

    /// Number of distinct parts.
    pub fn parts(&self) -> u32 {
        self.splits.iter().map(|s| s.1).product::<u32>() * self.partial
    }

    /// The parts `axis` is split into (1 if it is not).
    pub fn parts_of(&self, axis: usize) -> u32 {
        self.splits.iter().find(|s| s.0 == axis).map_or(1, |s| s.1)
    }

    /// Rank `rank`'s digits: one per split, then the partial index.
    fn digits(&self, rank: u32, n: u32) -> Vec<u32> {
        let mut d = rank / (n / self.parts());
        let mut radix: Vec<u32> = self.splits.iter().map(|s| s.1).collect();
        radix.push(self.partial);
        let mut out = vec![0; radix.len()];
        for i in (0..radix.len()).rev() {
            out[i] = d % radix[i];
            d /= radix[i];
        }
        out
    }

    /// Which part of `axis` rank `rank` holds: `(index, parts)`.
    pub fn chunk(&self, axis: usize, rank: u32, n: u32) -> (u32, u32) {
        match self.splits.iter().position(|s| s.0 == axis) {
            Some(i) => (self.digits(rank, n)[i], self.splits[i].1),
            None => (0, 1),
        }
    }

    /// The layout with its splits moved to other axes (`map[old] = new`, `None` dropping it).
    pub fn remap(&self, map: impl Fn(usize) -> Option<usize>) -> Layout {
        Layout {
            splits: self
                .splits
                .iter()
                .filter_map(|&(a, p)| map(a).map(|b| (b, p)))
                .collect(),
            partial: self.partial,
        }
    }

    /// The local shape of a value of shape `full` under this layout.
    pub fn local_shape(&self, full: &[Dim]) -> Vec<Dim> {
        let mut shape = full.to_vec();
        for &(a, p) in &self.splits {
            shape[a] = shape[a]
                .div(i64::from(p))
                .expect("only constant axes divisible by their parts are split");
        }
        shape
    }
}

/// A product of dimensions: a constant times symbolic factors (kept sorted), so that the
/// trailing sizes of two shapes can be compared.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Prod {
    constant: i64,
    symbolic: Vec<Dim>,
}

impl Prod {
    fn one() -> Prod {
        Prod {
            constant: 1,
            symbolic: vec![],
        }
    }
    fn times(&self, d: &Dim) -> Prod {
        let mut p = self.clone();
        match d.as_const() {
            Some(c) => p.constant *= c,
            None => {
                p.symbolic.push(d.clone());
                p.symbolic.sort();
            }
        }
        p
    }
    /// True if `self` divides `other` (same symbolic factors as a sub-multiset, constant ratio).
    fn divides(&self, other: &Prod) -> bool {
        let mut rest = other.symbolic.clone();
        for s in &self.symbolic {
            match rest.iter().position(|r| r == s) {
                Some(i) => {
                    rest.remove(i);
                }
                None => return false,
            }
        }
        self.constant != 0 && other.constant % self.constant == 0
    }
}

/// The groups of a reshape: runs of input axes and of output axes whose sizes multiply to the
/// same product, in order. `None` if the shapes do not pair up that way.
pub fn reshape_groups(
    input: &[Dim],
    output: &[Dim],
) -> Option<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
    let (mut i, mut j) = (0, 0);
    let mut groups = Vec::new();
    while i < input.len() || j < output.len() {
        let (i0, j0) = (i, j);
        let (mut pi, mut pj) = (Prod::one(), Prod::one());
        // Take at least one axis from a side that has any left.
        if i < input.len() {
            pi = pi.times(&input[i]);
            i += 1;
        }
        if j < output.len() {
            pj = pj.times(&output[j]);
            j += 1;
        }
        while pi != pj {
            if pi.divides(&pj) && i < input.len() {
                pi = pi.times(&input[i]);
                i += 1;
            } else if pj.divides(&pi) && j < output.len() {
                pj = pj.times(&output[j]);
                j += 1;
            } else {
                return None;
            }
        }
        // Trailing size-1 axes join the group they follow.
        while i < input.len() && input[i] == Dim::c(1) && (j == output.len()) {
            i += 1;
        }
        while j < output.len() && output[j] == Dim::c(1) && (i == input.len()) {
            j += 1;
        }
        groups.push((i0..i, j0..j));
    }
    Some(groups)
}

/// The layout of a reshape's result, from its input's layout, or `None` if the input's splits
/// do not stay contiguous parts of single output axes.
pub fn reshape_layout(input: &[Dim], output: &[Dim], layout: &Layout) -> Option<Layout> {
    let groups = reshape_groups(input, output)?;
    let size = |d: &Dim| d.as_const();
    let mut splits: Vec<(usize, u32)> = Vec::new();
    let mut digit_pos = 0;
    for (gi, go) in groups {
        // The group's input splits, in axis order, must be consecutive digits.
        let in_group: Vec<(usize, u32)> = layout
            .splits
            .iter()
            .copied()
            .filter(|(a, _)| gi.contains(a))
            .collect();
        if in_group.is_empty() {
            continue;
        }
        let first_digit = layout.splits.iter().position(|s| gi.contains(&s.0))?;
        if first_digit != digit_pos
            || layout.splits[first_digit..first_digit + in_group.len()] != in_group[..]
            || in_group.windows(2).any(|w| w[0].0 >= w[1].0)
        {
            return None;
        }
        digit_pos += in_group.len();
        // Leading axes fully split, then at most one partly split axis, then none: the parts
        // are contiguous ranges of the group's flattened index.
        let mut total = 1u32;
        let mut open = true;
        for a in gi.clone() {
            let p = layout.parts_of(a);
            if input[a] == Dim::c(1) {
                continue;
            }
            if !open {
                if p > 1 {
                    return None;
                }
                continue;
            }
            if p == 1 {
                if total == 1 {
                    // Nothing split before an unsplit leading axis: the split axes come later.
                    if in_group.iter().any(|&(b, _)| b > a) {
                        return None;
                    }
                }
                open = false;
                continue;
            }
            total *= p;
            if i64::from(p) != size(&input[a])? {
                open = false;
            }
        }
        // Spread `total` parts over the output axes, most significant first.
        let mut left = total;
        for b in go {
            if left == 1 {
                break;
            }
            if output[b] == Dim::c(1) {
                continue;
            }
            let s = u32::try_from(size(&output[b])?).ok()?;
            if s.is_multiple_of(left) {
                splits.push((b, left));
                left = 1;
            } else if left.is_multiple_of(s) {
                splits.push((b, s));
                left /= s;
            } else {
                return None;
            }
        }
        if left != 1 {
            return None;
        }
    }
    if digit_pos != layout.splits.len() {
        return None;
    }
    Some(Layout {
        splits,
        partial: layout.partial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::ir::Sym;

    fn c(n: i64) -> Dim {
        Dim::c(n)
    }

    #[test]
    fn digits_put_replicas_on_consecutive_ranks() {
        let kv = Layout::split(1, 2);
        let chunks: Vec<u32> = (0..4).map(|r| kv.chunk(1, r, 4).0).collect();
        assert_eq!(chunks, [0, 0, 1, 1]);
        let two = Layout {
            splits: vec![(1, 2), (2, 2)],
            partial: 1,
        };
        let got: Vec<(u32, u32)> = (0..4)
            .map(|r| (two.chunk(1, r, 4).0, two.chunk(2, r, 4).0))
            .collect();
        assert_eq!(got, [(0, 0), (0, 1), (1, 0), (1, 1)]);
    }

    #[test]
    fn head_split_and_merge_through_reshapes() {
        let seq = Dim::sym(Sym::Seq);
        let b = Dim::sym(Sym::Batch);
        // [b, s, 8·64] split 4 → [b, s, 8, 64]: the heads axis.
        let flat = [b.clone(), seq.clone(), c(512)];
        let heads = [b.clone(), seq.clone(), c(8), c(64)];
        assert_eq!(
            reshape_layout(&flat, &heads, &Layout::split(2, 4)),
            Some(Layout::split(2, 4))
        );
        // [b, 8, s, 64] split 4 on heads → [b, kv=1, group=8, s, 64]: the group axis.
        let q = [b.clone(), c(8), seq.clone(), c(64)];
        let grouped = [b.clone(), c(1), c(8), seq.clone(), c(64)];
        assert_eq!(
            reshape_layout(&q, &grouped, &Layout::split(1, 4)),
            Some(Layout::split(2, 4))
        );
        // kv=2 of 4 ranks: both axes.
        let grouped2 = [b.clone(), c(2), c(4), seq.clone(), c(64)];
        let both = Layout {
            splits: vec![(1, 2), (2, 2)],
            partial: 1,
        };
        assert_eq!(
            reshape_layout(&q, &grouped2, &Layout::split(1, 4)),
            Some(both.clone())
        );
        // …and back.
        assert_eq!(
            reshape_layout(&grouped2, &q, &both),
            Some(Layout::split(1, 4))
        );
        // A split of the minor axis of a merge is not contiguous.
        let minor = Layout::split(3, 2);
        assert_eq!(reshape_layout(&heads, &flat, &minor), None);
        // Splitting 6 heads in 4 does not divide.
        let (flat6, six) = ([b.clone(), seq.clone(), c(384)], [b, seq, c(6), c(64)]);
        assert_eq!(reshape_layout(&flat6, &six, &Layout::split(2, 4)), None);
    }
}
