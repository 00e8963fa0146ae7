//! Element-wise ops: unary functions, broadcasting binary ops, `Where`, and `Cast`.
//!
//! Every op walks its (possibly strided, broadcast) operands run by run with
//! [`write_runs`], which also spreads large tensors over threads; the inner loops are specialized
//! for the common stride patterns (contiguous, or one operand a repeated value) and each op's
//! function is a distinct closure, so they compile to straight vectorized loops. Unary and binary
//! float ops write into their (first) input's buffer when nothing else shares it.

use super::math;
use super::pool;
use super::tensor::{contiguous_strides, is_int_storage, write_runs, Elem, Tensor, PAR_ELEMS};
use crate::ir::{BinaryOp, DType, UnaryOp};
use rayon::prelude::*;
use std::sync::Arc;

/// Numpy broadcast of two concrete shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let n = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        if i + s.len() >= n {
            s[i + s.len() - n]
        } else {
            1
        }
    };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (da, db) if da == db || db == 1 => Ok(da),
            (1, db) => Ok(db),
            _ => Err(format!("cannot broadcast {a:?} with {b:?}")),
        })
        .collect()
}

/// Takes the tensor's buffer as an owned vector when nothing else shares it and the view covers it
/// exactly in row-major order, so that the result can be written in place.
fn take_unique<T: Elem>(t: Tensor) -> Result<(Vec<usize>, Vec<T>), Tensor> {
    if t.offset != 0
        || !t.is_contiguous()
        || t.raw::<T>().len() != t.numel()
        || Arc::strong_count(&t.buf) != 1
    {
        return Err(t);
    }
    let shape = t.shape.clone();
    Ok((shape, t.into_vec()))
}

/// `f` of each element of `x`, in row-major order.
fn map_new<A: Elem, O: Elem>(x: &Tensor, f: impl Fn(A) -> O + Sync) -> Vec<O> {
    let mut out = pool::buffer(x.numel());
    let rx = x.raw::<A>();
    write_runs(
        &mut out,
        &x.shape,
        [&x.strides],
        [x.offset],
        |d, [o], [i]| {
            let n = d.len();
            if i == 1 {
                for (e, &v) in d.iter_mut().zip(&rx[o..o + n]) {
                    *e = f(v);
                }
            } else {
                for (j, e) in d.iter_mut().enumerate() {
                    *e = f(rx[o + j * i]);
                }
            }
        },
    );
    out
}

/// `f` applied to a float tensor, in place when its buffer is unshared.
fn map_f32(x: Tensor, dtype: DType, f: impl Fn(f32) -> f32 + Sync) -> Tensor {
    match take_unique::<f32>(x) {
        Ok((shape, mut v)) => {
            let st = contiguous_strides(&shape);
            write_runs(&mut v, &shape, [&st], [0], |d, _, _| {
                d.iter_mut().for_each(|e| *e = f(*e))
            });
            Tensor::new(dtype, shape, v)
        }
        Err(x) => Tensor::new(dtype, x.shape.clone(), map_new(&x, f)),
    }
}

/// An element-wise function of a float tensor.
pub(crate) fn unary(op: UnaryOp, x: Tensor) -> Result<Tensor, String> {
    if !x.dtype.is_float() {
        return Err(format!(
            "{op:?} needs a float input, got {}",
            x.dtype.name()
        ));
    }
    let dtype = x.dtype;
    Ok(match op {
        UnaryOp::Neg => map_f32(x, dtype, |v| -v),
        UnaryOp::Exp => {
            let (shape, mut v) = match take_unique::<f32>(x) {
                Ok(owned) => owned,
                Err(x) => (x.shape.clone(), x.to_vec()),
            };
            if v.len() >= 2 * PAR_ELEMS {
                let exp = |c: &mut [f32]| math::exp_in_place(c, false);
                v.par_chunks_mut(PAR_ELEMS).for_each(exp);
            } else {
                math::exp_in_place(&mut v, false);
            }
            Tensor::new(dtype, shape, v)
        }
        UnaryOp::Sqrt => map_f32(x, dtype, f32::sqrt),
        UnaryOp::Rsqrt => map_f32(x, dtype, |v| 1.0 / v.sqrt()),
        UnaryOp::Recip => map_f32(x, dtype, |v| 1.0 / v),
        UnaryOp::Sin => map_f32(x, dtype, f32::sin),
        UnaryOp::Cos => map_f32(x, dtype, f32::cos),
    })
}

/// NaN-propagating maximum (as numpy's `maximum`).
fn max_f32(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// One run of a binary op: `d[j] = f(a[oa + j·ia], b[ob + j·ib])`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn zip_run<A: Copy, O>(
    d: &mut [O],
    a: &[A],
    oa: usize,
    ia: usize,
    b: &[A],
    ob: usize,
    ib: usize,
    f: &impl Fn(A, A) -> O,
) {
    let n = d.len();
    match (ia, ib) {
        (1, 1) => {
            for ((e, &p), &q) in d.iter_mut().zip(&a[oa..oa + n]).zip(&b[ob..ob + n]) {
                *e = f(p, q);
            }
        }
        (1, 0) => {
            let q = b[ob];
            for (e, &p) in d.iter_mut().zip(&a[oa..oa + n]) {
                *e = f(p, q);
            }
        }
        (0, 1) => {
            let p = a[oa];
            for (e, &q) in d.iter_mut().zip(&b[ob..ob + n]) {
                *e = f(p, q);
            }
        }
        _ => {
            for (j, e) in d.iter_mut().enumerate() {
                *e = f(a[oa + j * ia], b[ob + j * ib]);
            }
        }
    }
}

/// `f(a, b)` with `a` and `b` broadcast to `shape`, in row-major order.
fn zip_new<A: Elem, O: Elem>(
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    f: impl Fn(A, A) -> O + Sync,
) -> Vec<O> {
    let mut out = pool::buffer(shape.iter().product());
    let (ra, rb) = (a.raw::<A>(), b.raw::<A>());
    let (sa, sb) = (a.broadcast_strides(shape), b.broadcast_strides(shape));
    write_runs(
        &mut out,
        shape,
        [&sa, &sb],
        [a.offset, b.offset],
        |d, [oa, ob], [ia, ib]| zip_run(d, ra, oa, ia, rb, ob, ib, &f),
    );
    out
}

/// A float binary op, written into `a`'s buffer when it is unshared and already has the output's
/// shape (`b` may broadcast).
fn zip_f32(
    a: Tensor,
    b: &Tensor,
    shape: &[usize],
    dtype: DType,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Tensor {
    if a.shape != shape {
        return Tensor::new(dtype, shape.to_vec(), zip_new(&a, b, shape, f));
    }
    match take_unique::<f32>(a) {
        Ok((shape, mut v)) => {
            let (st, sb, rb) = (
                contiguous_strides(&shape),
                b.broadcast_strides(&shape),
                b.raw::<f32>(),
            );
            write_runs(
                &mut v,
                &shape,
                [&st, &sb],
                [0, b.offset],
                |d, [_, ob], [_, ib]| {
                    let n = d.len();
                    match ib {
                        1 => d
                            .iter_mut()
                            .zip(&rb[ob..ob + n])
                            .for_each(|(p, &q)| *p = f(*p, q)),
                        0 => {
                            let q = rb[ob];
                            d.iter_mut().for_each(|p| *p = f(*p, q))
                        }
                        _ => d
                            .iter_mut()
                            .enumerate()
                            .for_each(|(j, p)| *p = f(*p, rb[ob + j * ib])),
                    }
                },
            );
            Tensor::new(dtype, shape, v)
        }
        Err(a) => Tensor::new(dtype, shape.to_vec(), zip_new(&a, b, shape, f)),
    }
}

/// A broadcasting binary op. Float ops compute in `f32`; `i32` ops are exact (wrapping on
/// overflow; division truncates toward zero and refuses a zero divisor; `Pow` refuses a negative
/// exponent). `Greater` gives a bool (0/1); arithmetic on bools gives 0/1 again.
pub(crate) fn binary(op: BinaryOp, a: Tensor, b: Tensor) -> Result<Tensor, String> {
    if a.dtype != b.dtype {
        let (x, y) = (a.dtype.name(), b.dtype.name());
        return Err(format!("{op:?} of {x} and {y}: dtypes differ"));
    }
    let shape = broadcast_shape(&a.shape, &b.shape)?;
    let dtype = a.dtype;
    if !is_int_storage(dtype) {
        return Ok(match op {
            BinaryOp::Add => zip_f32(a, &b, &shape, dtype, |p, q| p + q),
            BinaryOp::Sub => zip_f32(a, &b, &shape, dtype, |p, q| p - q),
            BinaryOp::Mul => zip_f32(a, &b, &shape, dtype, |p, q| p * q),
            BinaryOp::Div => zip_f32(a, &b, &shape, dtype, |p, q| p / q),
            BinaryOp::Pow => zip_f32(a, &b, &shape, dtype, f32::powf),
            BinaryOp::Max => zip_f32(a, &b, &shape, dtype, max_f32),
            BinaryOp::Greater => {
                let v = zip_new(&a, &b, &shape, |p: f32, q: f32| (p > q) as i32);
                Tensor::new(DType::Bool, shape, v)
            }
        });
    }
    if matches!(op, BinaryOp::Div | BinaryOp::Pow) {
        let bad = |q: i32| if op == BinaryOp::Div { q == 0 } else { q < 0 };
        if b.values::<i32>().iter().any(|&q| bad(q)) {
            return Err(if op == BinaryOp::Div {
                "integer division by zero".to_string()
            } else {
                "integer power with a negative exponent".to_string()
            });
        }
    }
    let mut v = match op {
        BinaryOp::Add => zip_new(&a, &b, &shape, i32::wrapping_add),
        BinaryOp::Sub => zip_new(&a, &b, &shape, i32::wrapping_sub),
        BinaryOp::Mul => zip_new(&a, &b, &shape, i32::wrapping_mul),
        BinaryOp::Div => zip_new(&a, &b, &shape, i32::wrapping_div),
        BinaryOp::Pow => zip_new(&a, &b, &shape, |p: i32, q: i32| p.wrapping_pow(q as u32)),
        BinaryOp::Max => zip_new(&a, &b, &shape, i32::max),
        BinaryOp::Greater => zip_new(&a, &b, &shape, |p: i32, q: i32| (p > q) as i32),
    };
    let out_dtype = if op == BinaryOp::Greater {
        DType::Bool
    } else {
        dtype
    };
    if out_dtype == DType::Bool {
        v.iter_mut().for_each(|e| *e = (*e != 0) as i32);
    }
    Ok(Tensor::new(out_dtype, shape, v))
}

/// `cond ? a : b` with broadcasting; `cond` is a bool tensor.
pub(crate) fn where_(cond: Tensor, a: Tensor, b: Tensor) -> Result<Tensor, String> {
    if cond.dtype != DType::Bool {
        return Err(format!(
            "Where condition must be bool, got {}",
            cond.dtype.name()
        ));
    }
    if a.dtype != b.dtype {
        let (x, y) = (a.dtype.name(), b.dtype.name());
        return Err(format!("Where of {x} and {y}: dtypes differ"));
    }
    let shape = broadcast_shape(&broadcast_shape(&cond.shape, &a.shape)?, &b.shape)?;
    fn run<T: Elem>(c: &Tensor, a: &Tensor, b: &Tensor, shape: &[usize]) -> Vec<T> {
        let (rc, ra, rb) = (c.raw::<i32>(), a.raw::<T>(), b.raw::<T>());
        let sc = c.broadcast_strides(shape);
        let (sa, sb) = (a.broadcast_strides(shape), b.broadcast_strides(shape));
        let mut out = pool::buffer(shape.iter().product());
        let base = [c.offset, a.offset, b.offset];
        write_runs(
            &mut out,
            shape,
            [&sc, &sa, &sb],
            base,
            |d, [oc, oa, ob], [ic, ia, ib]| {
                for (j, e) in d.iter_mut().enumerate() {
                    *e = if rc[oc + j * ic] != 0 {
                        ra[oa + j * ia]
                    } else {
                        rb[ob + j * ib]
                    };
                }
            },
        );
        out
    }
    let dtype = a.dtype;
    Ok(if is_int_storage(dtype) {
        Tensor::new(dtype, shape.clone(), run::<i32>(&cond, &a, &b, &shape))
    } else {
        Tensor::new(dtype, shape.clone(), run::<f32>(&cond, &a, &b, &shape))
    })
}

/// Rounds an `f32` to the precision of a float dtype (round to nearest even, as the `half` crate).
pub(crate) fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Conversion to `to`. To `f16`/`bf16`: values are rounded to that precision and stay `f32`.
/// Float to `i32` truncates toward zero (saturating; NaN gives 0); anything to `bool` tests ≠ 0.
pub(crate) fn cast(x: Tensor, to: DType) -> Tensor {
    let from = x.dtype;
    let shape = x.shape.clone();
    match (is_int_storage(from), is_int_storage(to)) {
        (false, false) => match to {
            DType::F16 => map_f32(x, to, |e| half::f16::from_f32(e).to_f32()),
            DType::BF16 => map_f32(x, to, |e| half::bf16::from_f32(e).to_f32()),
            _ => x.with_dtype(to),
        },
        (false, true) => {
            let v = if to == DType::Bool {
                map_new(&x, |e: f32| (e != 0.0) as i32)
            } else {
                map_new(&x, |e: f32| e as i32)
            };
            Tensor::new(to, shape, v)
        }
        (true, false) => Tensor::new(to, shape, map_new(&x, |e: i32| round_to(to, e as f32))),
        (true, true) => {
            if to == DType::Bool && from != DType::Bool {
                Tensor::new(to, shape, map_new(&x, |e: i32| (e != 0) as i32))
            } else {
                x.with_dtype(to)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::new(DType::F32, shape.to_vec(), v)
    }

    #[test]
    fn broadcast_shapes() {
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
        assert!(broadcast_shape(&[3], &[4]).is_err());
    }

    #[test]
    fn in_place_only_when_unshared() {
        let a = f(&[3], vec![1., 2., 3.]);
        let keep = a.clone();
        let r = binary(BinaryOp::Add, a, f(&[], vec![1.])).unwrap();
        assert_eq!(r.to_vec::<f32>(), vec![2., 3., 4.]);
        assert_eq!(
            keep.to_vec::<f32>(),
            vec![1., 2., 3.],
            "a shared input is not overwritten"
        );
        let a = f(&[3], vec![1., 2., 3.]);
        let ptr = a.raw::<f32>().as_ptr();
        let r = unary(UnaryOp::Neg, a).unwrap();
        assert_eq!(r.raw::<f32>().as_ptr(), ptr);
        assert_eq!(r.to_vec::<f32>(), vec![-1., -2., -3.]);
    }

    #[test]
    fn integer_ops_are_exact() {
        let big = 16_777_217; // 2^24 + 1: not representable in f32
        let a = Tensor::new(DType::I32, vec![2], vec![big, 7]);
        let b = Tensor::new(DType::I32, vec![], vec![2]);
        assert_eq!(
            binary(BinaryOp::Add, a.clone(), b.clone())
                .unwrap()
                .to_vec::<i32>(),
            vec![big + 2, 9]
        );
        assert_eq!(
            binary(BinaryOp::Div, a.clone(), b.clone())
                .unwrap()
                .to_vec::<i32>(),
            vec![big / 2, 3]
        );
        let g = binary(
            BinaryOp::Greater,
            a.clone(),
            Tensor::new(DType::I32, vec![], vec![8]),
        )
        .unwrap();
        assert_eq!((g.dtype, g.to_vec::<i32>()), (DType::Bool, vec![1, 0]));
        let zero = Tensor::new(DType::I32, vec![], vec![0]);
        assert!(binary(BinaryOp::Div, a, zero)
            .unwrap_err()
            .contains("by zero"));
    }

    #[test]
    fn casts_round_to_half_precisions() {
        let x = f(&[3], vec![1.0 + 1.0 / 4096.0, 65520.0, -2.5]);
        assert_eq!(
            cast(x.clone(), DType::F16).to_vec::<f32>(),
            vec![1.0, f32::INFINITY, -2.5]
        );
        assert_eq!(
            cast(x.clone(), DType::BF16).to_vec::<f32>(),
            vec![1.0, 65536.0, -2.5]
        );
        assert_eq!(
            cast(x.clone(), DType::I32).to_vec::<i32>(),
            vec![1, 65520, -2]
        );
        let b = cast(f(&[2], vec![0.0, -0.5]), DType::Bool);
        assert_eq!(cast(b, DType::F32).to_vec::<f32>(), vec![0.0, 1.0]);
    }
}
