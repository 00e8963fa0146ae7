//! Element-wise ops: unary functions, broadcasting binary ops, `Where`, and `Cast`.
//!
//! Each op has a fast path for contiguous operands (a plain loop the compiler vectorizes; it works
//! in place when the input's buffer is not shared) and a strided path that walks broadcast views
//! run by run ([`for_each_run`]), with the common inner-stride patterns (both 1, one 0)
//! specialized.

use super::tensor::{for_each_run, is_int_storage, Elem, Tensor};
use crate::ir::{BinaryOp, DType, UnaryOp};
use std::sync::Arc;

/// Numpy broadcast of two concrete shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n {
                a[i + a.len() - n]
            } else {
                1
            };
            let db = if i + b.len() >= n {
                b[i + b.len() - n]
            } else {
                1
            };
            match (da, db) {
                _ if da == db || db == 1 => Ok(da),
                (1, _) => Ok(db),
                _ => Err(format!("cannot broadcast {a:?} with {b:?}")),
            }
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

fn unary_fn(op: UnaryOp) -> fn(f32) -> f32 {
    match op {
        UnaryOp::Neg => |x| -x,
        UnaryOp::Exp => f32::exp,
        UnaryOp::Sqrt => f32::sqrt,
        UnaryOp::Rsqrt => |x| 1.0 / x.sqrt(),
        UnaryOp::Recip => |x| 1.0 / x,
        UnaryOp::Sin => f32::sin,
        UnaryOp::Cos => f32::cos,
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
    let f = unary_fn(op);
    let dtype = x.dtype;
    Ok(match take_unique::<f32>(x) {
        Ok((shape, mut v)) => {
            v.iter_mut().for_each(|e| *e = f(*e));
            Tensor::new(dtype, shape, v)
        }
        Err(x) => {
            let v: Vec<f32> = x.values::<f32>().iter().map(|&e| f(e)).collect();
            Tensor::new(dtype, x.shape.clone(), v)
        }
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

/// Applies `f` to `a` and `b` broadcast to `out_shape`, in row-major order.
fn zip_broadcast<A: Elem, O: Elem>(
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
    f: impl Fn(A, A) -> O,
) -> Vec<O> {
    let n: usize = out_shape.iter().product();
    // Both contiguous with the same shape, or one a single value: straight loops.
    if let (Some(x), Some(y)) = (a.as_slice::<A>(), b.as_slice::<A>()) {
        if x.len() == n && y.len() == n {
            return x.iter().zip(y).map(|(&p, &q)| f(p, q)).collect();
        }
        if y.len() == 1 && x.len() == n {
            let q = y[0];
            return x.iter().map(|&p| f(p, q)).collect();
        }
        if x.len() == 1 && y.len() == n {
            let p = x[0];
            return y.iter().map(|&q| f(p, q)).collect();
        }
    }
    let (ra, rb) = (a.raw::<A>(), b.raw::<A>());
    let (sa, sb) = (
        a.broadcast_strides(out_shape),
        b.broadcast_strides(out_shape),
    );
    let mut out = Vec::with_capacity(n);
    for_each_run(
        out_shape,
        [&sa, &sb],
        [a.offset, b.offset],
        |[oa, ob], len, [ia, ib]| match (ia, ib) {
            (1, 1) => out.extend(
                ra[oa..oa + len]
                    .iter()
                    .zip(&rb[ob..ob + len])
                    .map(|(&p, &q)| f(p, q)),
            ),
            (1, 0) => {
                let q = rb[ob];
                out.extend(ra[oa..oa + len].iter().map(|&p| f(p, q)))
            }
            (0, 1) => {
                let p = ra[oa];
                out.extend(rb[ob..ob + len].iter().map(|&q| f(p, q)))
            }
            _ => out.extend((0..len).map(|i| f(ra[oa + i * ia], rb[ob + i * ib]))),
        },
    );
    out
}

/// Like [`zip_broadcast`] for a float result, writing into `a`'s buffer when it is unshared and
/// already has the output's shape.
fn zip_f32(
    a: Tensor,
    b: &Tensor,
    out_shape: &[usize],
    dtype: DType,
    f: impl Fn(f32, f32) -> f32,
) -> Tensor {
    if a.shape == out_shape {
        if let Some(y) = b.as_slice::<f32>() {
            if y.len() == a.numel() || y.len() == 1 {
                match take_unique::<f32>(a) {
                    Ok((shape, mut v)) => {
                        if y.len() == 1 {
                            let q = y[0];
                            v.iter_mut().for_each(|p| *p = f(*p, q));
                        } else {
                            v.iter_mut().zip(y).for_each(|(p, &q)| *p = f(*p, q));
                        }
                        return Tensor::new(dtype, shape, v);
                    }
                    Err(a) => {
                        return Tensor::new(
                            dtype,
                            out_shape.to_vec(),
                            zip_broadcast(&a, b, out_shape, f),
                        )
                    }
                }
            }
        }
    }
    Tensor::new(
        dtype,
        out_shape.to_vec(),
        zip_broadcast(&a, b, out_shape, f),
    )
}

/// A broadcasting binary op. Float ops compute in `f32`; `i32` ops are exact (wrapping on
/// overflow; division truncates toward zero and refuses a zero divisor; `Pow` refuses a negative
/// exponent). `Greater` gives a bool (0/1); arithmetic on bools gives 0/1 again.
pub(crate) fn binary(op: BinaryOp, a: Tensor, b: Tensor) -> Result<Tensor, String> {
    if a.dtype != b.dtype {
        return Err(format!(
            "{op:?} of {} and {}: dtypes differ",
            a.dtype.name(),
            b.dtype.name()
        ));
    }
    let shape = broadcast_shape(&a.shape, &b.shape)?;
    let dtype = a.dtype;
    if !is_int_storage(dtype) {
        let f: fn(f32, f32) -> f32 = match op {
            BinaryOp::Add => |p, q| p + q,
            BinaryOp::Sub => |p, q| p - q,
            BinaryOp::Mul => |p, q| p * q,
            BinaryOp::Div => |p, q| p / q,
            BinaryOp::Pow => f32::powf,
            BinaryOp::Max => max_f32,
            BinaryOp::Greater => {
                let v = zip_broadcast(&a, &b, &shape, |p: f32, q: f32| (p > q) as i32);
                return Ok(Tensor::new(DType::Bool, shape, v));
            }
        };
        return Ok(zip_f32(a, &b, &shape, dtype, f));
    }
    if matches!(op, BinaryOp::Div | BinaryOp::Pow) {
        let bad = |q: i32| if op == BinaryOp::Div { q == 0 } else { q < 0 };
        if b.values::<i32>().iter().any(|&q| bad(q)) {
            let what = if op == BinaryOp::Div {
                "integer division by zero"
            } else {
                "integer power with a negative exponent"
            };
            return Err(what.to_string());
        }
    }
    let f: fn(i32, i32) -> i32 = match op {
        BinaryOp::Add => i32::wrapping_add,
        BinaryOp::Sub => i32::wrapping_sub,
        BinaryOp::Mul => i32::wrapping_mul,
        BinaryOp::Div => i32::wrapping_div,
        BinaryOp::Pow => |p, q| p.wrapping_pow(q as u32),
        BinaryOp::Max => i32::max,
        BinaryOp::Greater => |p, q| (p > q) as i32,
    };
    let mut v = zip_broadcast(&a, &b, &shape, f);
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
        return Err(format!(
            "Where of {} and {}: dtypes differ",
            a.dtype.name(),
            b.dtype.name()
        ));
    }
    let shape = broadcast_shape(&broadcast_shape(&cond.shape, &a.shape)?, &b.shape)?;
    fn run<T: Elem>(c: &Tensor, a: &Tensor, b: &Tensor, shape: &[usize]) -> Vec<T> {
        let (rc, ra, rb) = (c.raw::<i32>(), a.raw::<T>(), b.raw::<T>());
        let st = [
            c.broadcast_strides(shape),
            a.broadcast_strides(shape),
            b.broadcast_strides(shape),
        ];
        let mut out = Vec::with_capacity(shape.iter().product());
        for_each_run(
            shape,
            [&st[0], &st[1], &st[2]],
            [c.offset, a.offset, b.offset],
            |[oc, oa, ob], len, [ic, ia, ib]| {
                out.extend((0..len).map(|i| {
                    if rc[oc + i * ic] != 0 {
                        ra[oa + i * ia]
                    } else {
                        rb[ob + i * ib]
                    }
                }))
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
    match (is_int_storage(from), is_int_storage(to)) {
        (false, false) => {
            if matches!(to, DType::F16 | DType::BF16) {
                let v: Vec<f32> = x.values::<f32>().iter().map(|&e| round_to(to, e)).collect();
                Tensor::new(to, x.shape.clone(), v)
            } else {
                x.with_dtype(to)
            }
        }
        (false, true) => {
            let v: Vec<i32> = x
                .values::<f32>()
                .iter()
                .map(|&e| {
                    if to == DType::Bool {
                        (e != 0.0) as i32
                    } else {
                        e as i32
                    }
                })
                .collect();
            Tensor::new(to, x.shape.clone(), v)
        }
        (true, false) => {
            let v: Vec<f32> = x
                .values::<i32>()
                .iter()
                .map(|&e| round_to(to, e as f32))
                .collect();
            Tensor::new(to, x.shape.clone(), v)
        }
        (true, true) => {
            if to == DType::Bool && from != DType::Bool {
                let v: Vec<i32> = x.values::<i32>().iter().map(|&e| (e != 0) as i32).collect();
                Tensor::new(to, x.shape.clone(), v)
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
