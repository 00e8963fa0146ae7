//! Strided tensor views over shared buffers.
//!
//! A [`Tensor`] is a shape, element strides and an offset into an `Arc`'d [`Buffer`]. Transpose,
//! slice and reshape of a contiguous view only rewrite that header; data is copied only where an
//! op needs it contiguous ([`Tensor::contiguous`]). Floating-point values (`f32`, `f16`, `bf16`)
//! are stored as `f32` (the narrow types hold values already rounded to their precision); `i32`
//! and `bool` are stored as `i32` (bools as 0 and 1), so integers stay exact.

use super::pool::{self, Pool};
use crate::ir::DType;
use rayon::prelude::*;
use std::sync::Arc;

/// Elements per parallel task of element-wise work; below twice this, work stays on one thread.
pub(crate) const PAR_ELEMS: usize = 1 << 15;

/// The storage of one or more views.
#[derive(Debug)]
pub(crate) enum Buffer {
    /// Storage of `f32`, `f16` and `bf16` values.
    F32(Vec<f32>),
    /// Storage of `i32` and `bool` (0 or 1) values.
    I32(Vec<i32>),
}

/// An element type of a [`Buffer`].
pub(crate) trait Elem: Copy + Default + PartialEq + Send + Sync + 'static {
    /// The buffer's data if it stores this type.
    fn of(buf: &Buffer) -> Option<&[Self]>;
    /// Mutable access, if the buffer stores this type.
    fn of_mut(buf: &mut Buffer) -> Option<&mut Vec<Self>>;
    /// Wraps data in a buffer.
    fn wrap(v: Vec<Self>) -> Buffer;
    /// The pool's free buffers of this type.
    fn pooled(pool: &mut Pool) -> &mut Vec<Vec<Self>>;
}

impl Drop for Buffer {
    /// Hands large buffers to the step's pool, if one is active.
    fn drop(&mut self) {
        match self {
            Buffer::F32(v) => pool::recycle(std::mem::take(v)),
            Buffer::I32(v) => pool::recycle(std::mem::take(v)),
        }
    }
}

impl Elem for f32 {
    fn of(buf: &Buffer) -> Option<&[f32]> {
        match buf {
            Buffer::F32(v) => Some(v),
            Buffer::I32(_) => None,
        }
    }
    fn of_mut(buf: &mut Buffer) -> Option<&mut Vec<f32>> {
        match buf {
            Buffer::F32(v) => Some(v),
            Buffer::I32(_) => None,
        }
    }
    fn wrap(v: Vec<f32>) -> Buffer {
        Buffer::F32(v)
    }
    fn pooled(pool: &mut Pool) -> &mut Vec<Vec<f32>> {
        &mut pool.f32s
    }
}

impl Elem for i32 {
    fn of(buf: &Buffer) -> Option<&[i32]> {
        match buf {
            Buffer::I32(v) => Some(v),
            Buffer::F32(_) => None,
        }
    }
    fn of_mut(buf: &mut Buffer) -> Option<&mut Vec<i32>> {
        match buf {
            Buffer::I32(v) => Some(v),
            Buffer::F32(_) => None,
        }
    }
    fn wrap(v: Vec<i32>) -> Buffer {
        Buffer::I32(v)
    }
    fn pooled(pool: &mut Pool) -> &mut Vec<Vec<i32>> {
        &mut pool.i32s
    }
}

/// True if values of this dtype live in an `i32` buffer.
pub(crate) fn is_int_storage(dtype: DType) -> bool {
    matches!(dtype, DType::I32 | DType::Bool)
}

/// Row-major strides of a shape.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// A strided view of a buffer.
#[derive(Clone, Debug)]
pub(crate) struct Tensor {
    /// Logical element type.
    pub dtype: DType,
    /// Extent of each axis.
    pub shape: Vec<usize>,
    /// Step in elements between neighbours along each axis (0 for a broadcast axis).
    pub strides: Vec<usize>,
    /// Index of element `[0, …, 0]` in the buffer.
    pub offset: usize,
    /// The shared storage.
    pub buf: Arc<Buffer>,
}

impl Tensor {
    /// A contiguous tensor owning `data`.
    pub fn new<T: Elem>(dtype: DType, shape: Vec<usize>, data: Vec<T>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        debug_assert_eq!(is_int_storage(dtype), T::of(&Buffer::I32(vec![])).is_some());
        let strides = contiguous_strides(&shape);
        Tensor {
            dtype,
            shape,
            strides,
            offset: 0,
            buf: Arc::new(T::wrap(data)),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The whole underlying buffer as `T` (an internal invariant: the dtype decides the storage).
    pub fn raw<T: Elem>(&self) -> &[T] {
        T::of(&self.buf).expect("tensor storage matches its dtype")
    }

    /// True if the view is row-major without gaps (strides of size-1 axes do not matter).
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && s != expect {
                return false;
            }
            expect *= n;
        }
        true
    }

    /// The elements as a slice, if the view is contiguous.
    pub fn as_slice<T: Elem>(&self) -> Option<&[T]> {
        self.is_contiguous()
            .then(|| &self.raw::<T>()[self.offset..self.offset + self.numel()])
    }

    /// The elements in row-major order, borrowed when contiguous and copied otherwise.
    pub fn values<T: Elem>(&self) -> std::borrow::Cow<'_, [T]> {
        match self.as_slice() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(self.to_vec()),
        }
    }

    /// Copies the elements out in row-major order.
    pub fn to_vec<T: Elem>(&self) -> Vec<T> {
        if let Some(s) = self.as_slice() {
            return s.to_vec();
        }
        let src = self.raw::<T>();
        let mut out = pool::with_capacity(self.numel());
        for_each_run(
            &self.shape,
            [&self.strides],
            [self.offset],
            |[o], len, [s]| {
                if s == 1 {
                    out.extend_from_slice(&src[o..o + len]);
                } else {
                    out.extend((0..len).map(|i| src[o + i * s]));
                }
            },
        );
        out
    }

    /// The elements as an owned row-major vector, reusing the buffer when this view is its only
    /// owner and covers it exactly.
    pub fn into_vec<T: Elem>(self) -> Vec<T> {
        let n = self.numel();
        if self.offset == 0 && self.is_contiguous() && self.raw::<T>().len() == n {
            match Arc::try_unwrap(self.buf) {
                Ok(mut b) => {
                    return std::mem::take(T::of_mut(&mut b).expect("storage matches dtype"))
                }
                Err(buf) => return T::of(&buf).expect("storage matches dtype").to_vec(),
            }
        }
        self.to_vec()
    }

    /// A contiguous tensor with the same values (this one, if already contiguous).
    pub fn contiguous(self) -> Tensor {
        if self.is_contiguous() {
            return self;
        }
        let (dtype, shape) = (self.dtype, self.shape.clone());
        if is_int_storage(dtype) {
            Tensor::new(dtype, shape, self.to_vec::<i32>())
        } else {
            Tensor::new(dtype, shape, self.to_vec::<f32>())
        }
    }

    /// The same data seen with another dtype of the same storage.
    pub fn with_dtype(mut self, dtype: DType) -> Tensor {
        debug_assert_eq!(is_int_storage(dtype), is_int_storage(self.dtype));
        self.dtype = dtype;
        self
    }

    /// Axis permutation: output axis `i` is input axis `perm[i]`. No data moves.
    pub fn permute(&self, perm: &[usize]) -> Tensor {
        let mut t = self.clone();
        t.shape = perm.iter().map(|&p| self.shape[p]).collect();
        t.strides = perm.iter().map(|&p| self.strides[p]).collect();
        t
    }

    /// Reshape; free when the view's strides allow it (always for a contiguous view; also for
    /// splitting an axis, adding or removing size-1 axes, and merging axes that are laid out
    /// one inside the other), a copy otherwise.
    pub fn reshape(self, shape: Vec<usize>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), self.numel());
        if let Some(strides) = view_strides(&self.shape, &self.strides, &shape) {
            return Tensor {
                shape,
                strides,
                ..self
            };
        }
        let mut t = self.contiguous();
        t.strides = contiguous_strides(&shape);
        t.shape = shape;
        t
    }

    /// The view restricted to `start..end` along `axis` (bounds checked by the caller).
    pub fn slice_axis(&self, axis: usize, start: usize, end: usize) -> Tensor {
        let mut t = self.clone();
        if end > start {
            t.offset += start * self.strides[axis];
        }
        t.shape[axis] = end - start;
        t
    }

    /// Strides that read this tensor broadcast to `out` (right-aligned; size-1 axes get 0).
    pub fn broadcast_strides(&self, out: &[usize]) -> Vec<usize> {
        let lead = out.len() - self.rank();
        (0..out.len())
            .map(|i| {
                if i < lead || self.shape[i - lead] == 1 {
                    0
                } else {
                    self.strides[i - lead]
                }
            })
            .collect()
    }
}

/// Strides that show data laid out as (`shape`, `strides`) with the shape `new` without moving
/// it, if they exist (numpy's no-copy reshape rule).
fn view_strides(shape: &[usize], strides: &[usize], new: &[usize]) -> Option<Vec<usize>> {
    if shape.contains(&0) {
        return Some(contiguous_strides(new));
    }
    let (od, os): (Vec<usize>, Vec<usize>) = shape
        .iter()
        .zip(strides)
        .filter(|(&n, _)| n != 1)
        .map(|(&n, &s)| (n, s))
        .unzip();
    let mut ns = vec![1; new.len()];
    let (mut oi, mut ni) = (0, 0);
    while ni < new.len() && oi < od.len() {
        // The smallest groups of old axes [oi, oj) and new axes [ni, nj) of equal size.
        let (mut oj, mut nj) = (oi + 1, ni + 1);
        let (mut op, mut np) = (od[oi], new[ni]);
        while np != op {
            if np < op {
                np *= new[nj];
                nj += 1;
            } else {
                op *= od[oj];
                oj += 1;
            }
        }
        // The old axes of the group must nest (C order) to be seen as one.
        if (oi..oj - 1).any(|k| os[k] != od[k + 1] * os[k + 1]) {
            return None;
        }
        ns[nj - 1] = os[oj - 1];
        for k in (ni + 1..nj).rev() {
            ns[k - 1] = ns[k] * new[k];
        }
        (oi, ni) = (oj, nj);
    }
    // Remaining new axes have size 1; any stride does.
    Some(ns)
}

/// Walks `shape` in row-major order for `N` operands, each read with its own strides from its base
/// offset. Calls `f(offsets, len, inner_strides)` once per innermost run: the elements
/// `offsets[j] + i·inner_strides[j]` for `i < len`. Adjacent axes that every operand can walk as
/// one are merged first, so contiguous data is a single run. Nothing is called for an empty shape
/// of zero elements; a rank-0 shape is one run of length 1.
pub(crate) fn for_each_run<const N: usize>(
    shape: &[usize],
    strides: [&[usize]; N],
    base: [usize; N],
    mut f: impl FnMut([usize; N], usize, [usize; N]),
) {
    if shape.contains(&0) {
        return;
    }
    // Merged axes, outermost first: (extent, stride per operand).
    let mut dims: Vec<(usize, [usize; N])> = Vec::with_capacity(shape.len());
    for (d, &n) in shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let st: [usize; N] = std::array::from_fn(|j| strides[j][d]);
        if let Some((pn, ps)) = dims.last_mut() {
            if (0..N).all(|j| ps[j] == st[j] * n) {
                *pn *= n;
                *ps = st;
                continue;
            }
        }
        dims.push((n, st));
    }
    let Some(&(len, inner)) = dims.last() else {
        f(base, 1, [0; N]);
        return;
    };
    let outer = &dims[..dims.len() - 1];
    let mut idx = vec![0usize; outer.len()];
    let mut off = base;
    loop {
        f(off, len, inner);
        // Odometer increment of the outer axes.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            let (extent, step) = outer[d];
            off.iter_mut().zip(step).for_each(|(o, s)| *o += s);
            if idx[d] < extent {
                break;
            }
            off.iter_mut().zip(step).for_each(|(o, s)| *o -= s * extent);
            idx[d] = 0;
        }
    }
}

/// Fills `dst`, row-major over `shape`, run by run: `f(piece, offsets, inner_strides)` gets
/// consecutive pieces of `dst` and where the `N` operands' elements for them are (as in
/// [`for_each_run`]). Large work is cut into pieces of at most [`PAR_ELEMS`] elements that run in
/// parallel.
pub(crate) fn write_runs<O: Send, const N: usize>(
    dst: &mut [O],
    shape: &[usize],
    strides: [&[usize]; N],
    base: [usize; N],
    f: impl Fn(&mut [O], [usize; N], [usize; N]) + Sync,
) {
    debug_assert_eq!(dst.len(), shape.iter().product::<usize>());
    if dst.len() < 2 * PAR_ELEMS {
        let mut pos = 0;
        for_each_run(shape, strides, base, |o, len, st| {
            f(&mut dst[pos..pos + len], o, st);
            pos += len;
        });
        return;
    }
    let total = dst.len();
    let mut pieces = Vec::new();
    let mut rest = dst;
    for_each_run(shape, strides, base, |o, len, st| {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PAR_ELEMS);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            pieces.push((head, std::array::from_fn(|j| o[j] + done * st[j]), st));
            rest = tail;
            done += n;
        }
    });
    let per_task = (PAR_ELEMS * pieces.len() / total).max(1);
    pieces
        .into_par_iter()
        .with_min_len(per_task)
        .for_each(|(d, o, st)| f(d, o, st));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::new(
            DType::F32,
            shape.to_vec(),
            (0..n).map(|i| i as f32).collect(),
        )
    }

    #[test]
    fn views_permute_slice_reshape() {
        let t = iota(&[2, 3, 4]);
        let p = t.permute(&[2, 0, 1]); // [4, 2, 3]
        assert!(!p.is_contiguous());
        let v = p.to_vec::<f32>();
        // p[i][j][k] = t[j][k][i] = j*12 + k*4 + i
        for i in 0..4 {
            for j in 0..2 {
                for k in 0..3 {
                    assert_eq!(v[i * 6 + j * 3 + k], (j * 12 + k * 4 + i) as f32);
                }
            }
        }
        let s = t.slice_axis(1, 1, 3); // [2, 2, 4]
        assert_eq!(
            s.to_vec::<f32>(),
            vec![4., 5., 6., 7., 8., 9., 10., 11., 16., 17., 18., 19., 20., 21., 22., 23.]
        );
        let r = t.clone().reshape(vec![6, 4]);
        assert!(
            Arc::ptr_eq(&r.buf, &t.buf),
            "reshape of a contiguous view is free"
        );
        let rp = p.reshape(vec![24]);
        assert_eq!(rp.to_vec::<f32>(), v);
        let e = t.slice_axis(1, 2, 2);
        assert_eq!(e.numel(), 0);
        assert!(e.to_vec::<f32>().is_empty());
    }

    #[test]
    fn reshape_keeps_strided_views_when_it_can() {
        // A [2, 3 of capacity 5, 2] buffer seen as [2, 3, 2].
        let buf = iota(&[2, 5, 2]);
        let view = buf.slice_axis(1, 0, 3);
        let want = view.to_vec::<f32>();
        for (shape, free) in [
            (vec![2, 1, 3, 2], true),
            (vec![2, 3, 2, 1], true),
            (vec![1, 2, 3, 1, 2], true),
            (vec![2, 6], true),
            (vec![12], false),
            (vec![6, 2], false),
        ] {
            let r = view.clone().reshape(shape.clone());
            assert_eq!(Arc::ptr_eq(&r.buf, &buf.buf), free, "{shape:?}");
            assert_eq!(r.to_vec::<f32>(), want, "{shape:?}");
        }
        // Splitting and merging nested axes of a transposed view.
        let t = iota(&[4, 6]).permute(&[1, 0]); // [6, 4]
        let r = t.clone().reshape(vec![2, 3, 4]);
        assert!(Arc::ptr_eq(&r.buf, &t.buf));
        assert_eq!(r.to_vec::<f32>(), t.to_vec::<f32>());
    }

    #[test]
    fn into_vec_reuses_unique_buffers() {
        let t = iota(&[3, 2]);
        let ptr = t.raw::<f32>().as_ptr();
        let v = t.into_vec::<f32>();
        assert_eq!(v.as_ptr(), ptr);
        let t = iota(&[3, 2]);
        let keep = t.clone();
        assert_eq!(t.into_vec::<f32>(), keep.to_vec::<f32>());
    }

    #[test]
    fn runs_merge_contiguous_axes() {
        let shape = [2, 3, 4];
        let st = contiguous_strides(&shape);
        let mut runs = vec![];
        for_each_run(&shape, [&st], [5], |o, n, s| runs.push((o[0], n, s[0])));
        assert_eq!(runs, vec![(5, 24, 1)]);
        let mut count = 0;
        for_each_run(&[], [&[][..]], [0], |_, n, _| count += n);
        assert_eq!(count, 1);
    }
}
