//! Reductions along one axis and softmax.
//!
//! The reduced axis is moved last (a free view), the data made contiguous (a copy only when the
//! view is not), and each row is processed with a straight loop. Float sums accumulate in `f64`.
//! Softmax subtracts the row maximum, so `-inf` entries give exactly 0; a row that is entirely
//! `-inf` gives NaN, as `exp(x - max)` does in PyTorch and numpy.

use super::tensor::{is_int_storage, Tensor};
use crate::ir::{DType, ReduceOp};
use rayon::prelude::*;

/// Rows per parallel task are chosen so that one task covers about this many elements.
const PAR_GRAIN: usize = 1 << 15;

/// The permutation moving `axis` last, and its inverse.
fn axis_last(rank: usize, axis: usize) -> (Vec<usize>, Vec<usize>) {
    let perm: Vec<usize> = (0..rank).filter(|&i| i != axis).chain([axis]).collect();
    let mut inv = vec![0; rank];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    (perm, inv)
}

/// Output shape of a reduction.
fn reduced_shape(shape: &[usize], axis: usize, keep_dim: bool) -> Vec<usize> {
    let mut s = shape.to_vec();
    if keep_dim {
        s[axis] = 1;
    } else {
        s.remove(axis);
    }
    s
}

/// Σ of a row in `f64`, with independent accumulators so that the loop vectorizes.
#[inline(always)]
fn sum_f64(row: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for j in 0..8 {
            acc[j] += c[j] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Maximum of a row; NaN if the row holds a NaN, `-inf` if it is empty.
#[inline(always)]
fn max_f32(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for j in 0..8 {
            acc[j] = acc[j].max(c[j]);
        }
    }
    // `f32::max` skips NaN: look for one (without early exit, so that the loop vectorizes).
    let m = acc.iter().fold(tail, |m, &x| m.max(x));
    if row.iter().fold(false, |nan, x| nan | x.is_nan()) {
        f32::NAN
    } else {
        m
    }
}

fn reduce_row_f32(op: ReduceOp, row: &[f32]) -> f32 {
    match op {
        ReduceOp::Sum => sum_f64(row) as f32,
        ReduceOp::Mean => (sum_f64(row) / row.len() as f64) as f32,
        ReduceOp::Max => max_f32(row),
    }
}

/// `Sum`, `Mean` or `Max` of `x` along `axis`. Integer `Sum` wraps; integer `Mean` is refused.
pub(crate) fn reduce(
    op: ReduceOp,
    x: Tensor,
    axis: usize,
    keep_dim: bool,
) -> Result<Tensor, String> {
    if axis >= x.rank() {
        return Err(format!("axis {axis} out of range for rank {}", x.rank()));
    }
    let out_shape = reduced_shape(&x.shape, axis, keep_dim);
    let len = x.shape[axis];
    let (perm, _) = axis_last(x.rank(), axis);
    let moved = x.permute(&perm);
    if is_int_storage(x.dtype) {
        let v = moved.values::<i32>();
        let f = |row: &[i32]| -> i32 {
            match op {
                ReduceOp::Sum => row.iter().fold(0i32, |a, &b| a.wrapping_add(b)),
                ReduceOp::Max => row.iter().copied().max().unwrap_or(i32::MIN),
                ReduceOp::Mean => unreachable!(),
            }
        };
        if op == ReduceOp::Mean {
            return Err(format!("Mean of {} values is not defined", x.dtype.name()));
        }
        let mut out: Vec<i32> = if len == 0 {
            vec![f(&[]); out_shape.iter().product()]
        } else {
            v.chunks(len).map(f).collect()
        };
        if x.dtype == DType::Bool {
            out.iter_mut().for_each(|e| *e = (*e != 0) as i32);
        }
        return Ok(Tensor::new(x.dtype, out_shape, out));
    }
    let v = moved.values::<f32>();
    let out: Vec<f32> = if len == 0 {
        vec![reduce_row_f32(op, &[]); out_shape.iter().product()]
    } else if v.len() >= 2 * PAR_GRAIN {
        v.par_chunks(len)
            .with_min_len(PAR_GRAIN.div_ceil(len))
            .map(|r| reduce_row_f32(op, r))
            .collect()
    } else {
        v.chunks(len).map(|r| reduce_row_f32(op, r)).collect()
    };
    Ok(Tensor::new(x.dtype, out_shape, out))
}

/// `exp(x - max) / Σ exp(x - max)` over a row. A NaN anywhere makes the row NaN; a row of only
/// `-inf` is NaN (`-inf - -inf`).
#[inline(always)]
fn softmax_row_body(row: &mut [f32]) {
    let max = max_f32(row);
    if max.is_finite() {
        row.iter_mut().for_each(|x| *x -= max);
        // Entries below e^-87 (e.g. masked ones) are 0 whatever their sum is.
        super::math::exp_in_place(row, true);
    } else {
        row.iter_mut().for_each(|x| *x = (*x - max).exp());
    }
    let sum = sum_f64(row) as f32;
    row.iter_mut().for_each(|x| *x /= sum);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    softmax_row_body(row)
}

/// [`softmax_row_body`], compiled for AVX2 where the CPU has it.
fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { softmax_row_avx2(row) };
    }
    softmax_row_body(row)
}

/// Softmax of a float tensor along `axis`. The result is a view with `x`'s axis order (its data
/// is laid out with `axis` last).
pub(crate) fn softmax(x: Tensor, axis: usize) -> Result<Tensor, String> {
    if !x.dtype.is_float() {
        return Err(format!(
            "Softmax needs a float input, got {}",
            x.dtype.name()
        ));
    }
    if axis >= x.rank() {
        return Err(format!("axis {axis} out of range for rank {}", x.rank()));
    }
    let len = x.shape[axis];
    let (perm, inv) = axis_last(x.rank(), axis);
    let moved = x.permute(&perm);
    let shape = moved.shape.clone();
    let dtype = x.dtype;
    drop(x);
    let mut v = moved.into_vec::<f32>();
    if len > 0 {
        if v.len() >= 2 * PAR_GRAIN {
            v.par_chunks_mut(len)
                .with_min_len(PAR_GRAIN.div_ceil(len))
                .for_each(softmax_row);
        } else {
            v.chunks_mut(len).for_each(softmax_row);
        }
    }
    Ok(Tensor::new(dtype, shape, v).permute(&inv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_handles_neg_infinity() {
        let ninf = f32::NEG_INFINITY;
        let x = Tensor::new(
            DType::F32,
            vec![2, 3],
            vec![1.0, ninf, 1.0, ninf, ninf, ninf],
        );
        let y = softmax(x, 1).unwrap().to_vec::<f32>();
        assert_eq!(&y[..3], &[0.5, 0.0, 0.5]);
        assert!(
            y[3..].iter().all(|v| v.is_nan()),
            "a fully masked row is NaN, as in PyTorch"
        );
        // Large values do not overflow.
        let x = Tensor::new(DType::F32, vec![2], vec![1000.0, 1000.0]);
        assert_eq!(softmax(x, 0).unwrap().to_vec::<f32>(), vec![0.5, 0.5]);
    }

    #[test]
    fn reductions_along_inner_and_outer_axes() {
        let x = Tensor::new(DType::F32, vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(
            reduce(ReduceOp::Sum, x.clone(), 0, false)
                .unwrap()
                .to_vec::<f32>(),
            vec![5., 7., 9.]
        );
        let m = reduce(ReduceOp::Mean, x.clone(), 1, true).unwrap();
        assert_eq!(
            (m.shape.clone(), m.to_vec::<f32>()),
            (vec![2, 1], vec![2., 5.])
        );
        assert_eq!(
            reduce(ReduceOp::Max, x, 0, false).unwrap().to_vec::<f32>(),
            vec![4., 5., 6.]
        );
        let i = Tensor::new(DType::I32, vec![3], vec![16_777_217, 1, -3]);
        assert_eq!(
            reduce(ReduceOp::Sum, i.clone(), 0, false)
                .unwrap()
                .to_vec::<i32>(),
            vec![16_777_215]
        );
        assert!(reduce(ReduceOp::Mean, i, 0, false).is_err());
    }
}
