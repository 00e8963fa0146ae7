//! Ops that move data without arithmetic: `Gather` (rows of a table by id) and `Concat`.
//! (Transpose, Slice and the Reshape of a contiguous view are free views: see `tensor.rs`.)

use super::pool;
use super::tensor::{contiguous_strides, is_int_storage, Elem, Tensor};
use std::sync::Arc;

/// Rows of `table` (axis 0) picked by the `i32` `ids`: shape `ids.shape ++ table.shape[1..]`.
pub(crate) fn gather(table: Tensor, ids: Tensor) -> Result<Tensor, String> {
    if ids.dtype != crate::ir::DType::I32 || table.rank() < 1 {
        return Err(format!(
            "Gather needs a table and i32 ids, got {:?} and {}",
            table.shape,
            ids.dtype.name()
        ));
    }
    let rows = table.shape[0];
    let ids_v = ids.values::<i32>();
    if let Some(&bad) = ids_v.iter().find(|&&i| i < 0 || i as usize >= rows) {
        return Err(format!("id {bad} out of range for a table of {rows} rows"));
    }
    fn pick<T: Elem>(table: &Tensor, ids: &[i32]) -> Vec<T> {
        let row_len: usize = table.shape[1..].iter().product();
        let data = table.values::<T>();
        let mut out = pool::with_capacity(ids.len() * row_len);
        for &i in ids {
            let s = i as usize * row_len;
            out.extend_from_slice(&data[s..s + row_len]);
        }
        out
    }
    let mut shape = ids.shape.clone();
    shape.extend_from_slice(&table.shape[1..]);
    Ok(if is_int_storage(table.dtype) {
        Tensor::new(table.dtype, shape, pick::<i32>(&table, &ids_v))
    } else {
        Tensor::new(table.dtype, shape, pick::<f32>(&table, &ids_v))
    })
}

/// One rank's share of a vocabulary-parallel embedding: row `id - first` of the float `table`
/// for ids in `first..first + rows`, zeros for the others.
pub(crate) fn gather_shard(table: Tensor, ids: Tensor, first: i64) -> Result<Tensor, String> {
    if ids.dtype != crate::ir::DType::I32 || table.rank() < 1 || is_int_storage(table.dtype) {
        return Err(format!(
            "GatherShard needs a float table and i32 ids, got {:?} and {}",
            table.shape,
            ids.dtype.name()
        ));
    }
    let rows = table.shape[0] as i64;
    let row_len: usize = table.shape[1..].iter().product();
    let data = table.values::<f32>();
    let ids_v = ids.values::<i32>();
    let mut out = pool::with_capacity(ids_v.len() * row_len);
    for &i in ids_v.iter() {
        let local = i64::from(i) - first;
        if (0..rows).contains(&local) {
            let s = local as usize * row_len;
            out.extend_from_slice(&data[s..s + row_len]);
        } else {
            out.extend(std::iter::repeat_n(0.0, row_len));
        }
    }
    let mut shape = ids.shape.clone();
    shape.extend_from_slice(&table.shape[1..]);
    Ok(Tensor::new(table.dtype, shape, out))
}

/// The shape of the concatenation of `xs` along `axis`, or why they do not concatenate.
pub(crate) fn concat_shape(xs: &[Tensor], axis: usize) -> Result<Vec<usize>, String> {
    let first = xs.first().ok_or("Concat needs at least one input")?;
    if axis >= first.rank() {
        return Err(format!(
            "axis {axis} out of range for rank {}",
            first.rank()
        ));
    }
    for x in xs {
        let same = x.dtype == first.dtype
            && x.rank() == first.rank()
            && (0..x.rank()).all(|i| i == axis || x.shape[i] == first.shape[i]);
        if !same {
            let (a, b) = (&first.shape, &x.shape);
            return Err(format!(
                "Concat along axis {axis} of {a:?} and {b:?}: shapes differ"
            ));
        }
    }
    let mut shape = first.shape.clone();
    shape[axis] = xs.iter().map(|x| x.shape[axis]).sum();
    Ok(shape)
}

/// Concatenation along `axis`. The output is built in row-major order: for each index of the
/// axes before `axis`, each input's block in turn.
pub(crate) fn concat(xs: Vec<Tensor>, axis: usize) -> Result<Tensor, String> {
    let shape = concat_shape(&xs, axis)?;
    let outer: usize = shape[..axis].iter().product();
    let dtype = xs[0].dtype;
    fn join<T: Elem>(xs: &[Tensor], axis: usize, outer: usize, total: usize) -> Vec<T> {
        let parts: Vec<_> = xs.iter().map(|x| x.values::<T>()).collect();
        let blocks: Vec<usize> = xs
            .iter()
            .map(|x| x.shape[axis..].iter().product())
            .collect();
        let mut out = pool::with_capacity(total);
        for o in 0..outer {
            for (p, &b) in parts.iter().zip(&blocks) {
                out.extend_from_slice(&p[o * b..(o + 1) * b]);
            }
        }
        out
    }
    let total = shape.iter().product();
    Ok(if is_int_storage(dtype) {
        Tensor::new(dtype, shape, join::<i32>(&xs, axis, outer, total))
    } else {
        Tensor::new(dtype, shape, join::<f32>(&xs, axis, outer, total))
    })
}

/// The length along `axis` that the buffer of `t` has room for, if `t` is a row-major buffer
/// holding the first `t.shape[axis]` of that many entries along `axis` (the layout [`append`]
/// builds).
fn capacity(t: &Tensor, axis: usize) -> Option<usize> {
    let inner: usize = t.shape[axis + 1..].iter().product();
    let outer: usize = t.shape[..axis].iter().product();
    if t.offset != 0 || inner == 0 || outer == 0 || t.strides[axis] != inner {
        return None;
    }
    let buf_len = if is_int_storage(t.dtype) {
        t.raw::<i32>().len()
    } else {
        t.raw::<f32>().len()
    };
    let cap = if axis == 0 {
        buf_len / inner
    } else {
        t.strides[axis - 1] / inner
    };
    let mut full = t.shape.clone();
    full[axis] = cap;
    let want = contiguous_strides(&full);
    let fits = buf_len == outer * cap * inner
        && (0..t.rank()).all(|d| t.shape[d] == 1 || t.strides[d] == want[d]);
    fits.then_some(cap)
}

/// `Concat` of a state (the first input, e.g. a KV cache) with the new entries along `axis`, for
/// inputs that [`concat_shape`] accepts. The new entries are written into spare room of the
/// state's buffer when nothing else shares it; otherwise everything is copied into a new buffer
/// with room for as many entries again. The result is a view of that buffer: the old views of it
/// never see the appended entries, so appending in place is invisible to them.
pub(crate) fn append(xs: Vec<Tensor>, axis: usize, shape: Vec<usize>) -> Tensor {
    fn run<T: Elem>(mut xs: Vec<Tensor>, axis: usize, shape: Vec<usize>) -> Tensor {
        let mut state = xs.remove(0);
        let (len, total) = (state.shape[axis], shape[axis]);
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let room = capacity(&state, axis).filter(|&c| c >= total);
        let (mut buf, cap) = match room {
            Some(cap) if Arc::get_mut(&mut state.buf).is_some() => (state.buf, cap),
            _ => {
                let cap = total.max(2 * len).max(16);
                let mut v = pool::buffer(outer * cap * inner);
                let old = state.values::<T>();
                let row = len * inner;
                for o in 0..outer {
                    v[o * cap * inner..o * cap * inner + row]
                        .copy_from_slice(&old[o * row..(o + 1) * row]);
                }
                (Arc::new(T::wrap(v)), cap)
            }
        };
        let data =
            T::of_mut(Arc::get_mut(&mut buf).expect("unshared")).expect("storage matches dtype");
        let mut at = len;
        for x in &xs {
            let (xv, n) = (x.values::<T>(), x.shape[axis] * inner);
            for o in 0..outer {
                let dst = (o * cap + at) * inner;
                data[dst..dst + n].copy_from_slice(&xv[o * n..(o + 1) * n]);
            }
            at += x.shape[axis];
        }
        let mut full = shape.clone();
        full[axis] = cap;
        let strides = contiguous_strides(&full);
        Tensor {
            dtype: state.dtype,
            shape,
            strides,
            offset: 0,
            buf,
        }
    }
    let (dtype, numel) = (xs[0].dtype, shape.iter().product::<usize>());
    if numel == 0 {
        return concat(xs, axis).expect("checked by concat_shape");
    }
    if is_int_storage(dtype) {
        run::<i32>(xs, axis, shape)
    } else {
        run::<f32>(xs, axis, shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::DType;

    #[test]
    fn gather_rows_and_range_errors() {
        let table = Tensor::new(DType::F32, vec![3, 2], vec![0., 1., 10., 11., 20., 21.]);
        let ids = Tensor::new(DType::I32, vec![2, 2], vec![2, 0, 1, 1]);
        let g = gather(table.clone(), ids).unwrap();
        assert_eq!(g.shape, vec![2, 2, 2]);
        assert_eq!(
            g.to_vec::<f32>(),
            vec![20., 21., 0., 1., 10., 11., 10., 11.]
        );
        let bad = Tensor::new(DType::I32, vec![1], vec![3]);
        assert!(gather(table, bad)
            .unwrap_err()
            .contains("id 3 out of range"));
    }

    #[test]
    fn append_writes_in_place_when_unshared() {
        // A [2, len, 3] cache grown along axis 1.
        let f = |shape: &[usize], v: Vec<f32>| Tensor::new(DType::F32, shape.to_vec(), v);
        let empty = f(&[2, 0, 3], vec![]);
        let a = f(&[2, 2, 3], (0..12).map(|i| i as f32).collect());
        let c1 = append(vec![empty, a.clone()], 1, vec![2, 2, 3]);
        assert_eq!(c1.to_vec::<f32>(), a.to_vec::<f32>());
        assert_eq!(capacity(&c1, 1), Some(16));
        let b = f(&[2, 1, 3], (100..106).map(|i| i as f32).collect());
        let keep = c1.slice_axis(1, 0, 2); // an old view: forces a copy
        let c2 = append(vec![c1.clone(), b.clone()], 1, vec![2, 3, 3]);
        assert!(!Arc::ptr_eq(&c2.buf, &keep.buf));
        drop((keep, c1));
        let want = concat(vec![a.clone(), b.clone()], 1)
            .unwrap()
            .to_vec::<f32>();
        assert_eq!(c2.to_vec::<f32>(), want);
        let ptr = Arc::as_ptr(&c2.buf);
        let c3 = append(vec![c2, b.clone()], 1, vec![2, 4, 3]);
        assert_eq!(Arc::as_ptr(&c3.buf), ptr, "unshared with room: in place");
        let want = concat(vec![a, b.clone(), b], 1).unwrap().to_vec::<f32>();
        assert_eq!(c3.to_vec::<f32>(), want);
        let r = c3.reshape(vec![2, 1, 4, 3]);
        assert_eq!(
            Arc::as_ptr(&r.buf),
            ptr,
            "reshapes of the cache view are free"
        );
    }

    #[test]
    fn concat_of_strided_views() {
        let a = Tensor::new(DType::F32, vec![2, 2], vec![1., 2., 3., 4.]).permute(&[1, 0]); // [[1,3],[2,4]]
        let b = Tensor::new(DType::F32, vec![2, 1], vec![5., 6.]);
        let c = concat(vec![a, b], 1).unwrap();
        assert_eq!(c.shape, vec![2, 3]);
        assert_eq!(c.to_vec::<f32>(), vec![1., 3., 5., 2., 4., 6.]);
    }
}
