//! Ops that move data without arithmetic: `Gather` (rows of a table by id) and `Concat`.
//! (Transpose, Slice and the Reshape of a contiguous view are free views: see `tensor.rs`.)

use super::tensor::{is_int_storage, Elem, Tensor};

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
        let mut out = Vec::with_capacity(ids.len() * row_len);
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

/// Concatenation along `axis`. The output is built in row-major order: for each index of the
/// axes before `axis`, each input's block in turn.
pub(crate) fn concat(xs: Vec<Tensor>, axis: usize) -> Result<Tensor, String> {
    let first = xs.first().ok_or("Concat needs at least one input")?;
    if axis >= first.rank() {
        return Err(format!(
            "axis {axis} out of range for rank {}",
            first.rank()
        ));
    }
    for x in &xs {
        let same = x.dtype == first.dtype
            && x.rank() == first.rank()
            && (0..x.rank()).all(|i| i == axis || x.shape[i] == first.shape[i]);
        if !same {
            return Err(format!(
                "Concat along axis {axis} of {:?} and {:?}: shapes differ",
                first.shape, x.shape
            ));
        }
    }
    let mut shape = first.shape.clone();
    shape[axis] = xs.iter().map(|x| x.shape[axis]).sum();
    let outer: usize = shape[..axis].iter().product();
    let dtype = first.dtype;
    fn join<T: Elem>(xs: &[Tensor], axis: usize, outer: usize, total: usize) -> Vec<T> {
        let parts: Vec<_> = xs.iter().map(|x| x.values::<T>()).collect();
        let blocks: Vec<usize> = xs
            .iter()
            .map(|x| x.shape[axis..].iter().product())
            .collect();
        let mut out = Vec::with_capacity(total);
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
    fn concat_of_strided_views() {
        let a = Tensor::new(DType::F32, vec![2, 2], vec![1., 2., 3., 4.]).permute(&[1, 0]); // [[1,3],[2,4]]
        let b = Tensor::new(DType::F32, vec![2, 1], vec![5., 6.]);
        let c = concat(vec![a, b], 1).unwrap();
        assert_eq!(c.shape, vec![2, 3]);
        assert_eq!(c.to_vec::<f32>(), vec![1., 3., 5., 2., 4., 6.]);
    }
}
