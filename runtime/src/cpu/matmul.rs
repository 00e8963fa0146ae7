//! Batched matrix products `a[…, m, k] · b[…, k, n]` with numpy broadcasting of the leading axes.
//!
//! The leading axes along which `b` is broadcast are folded into `m` wherever `a`'s strides allow
//! (all of them for a 2-D weight, where `a` is made contiguous if needed: one product of
//! `M = batch·seq` rows; the query-group axis in grouped-query attention). What remains is a loop
//! over independent products, run in parallel when there are enough of them (otherwise each
//! product parallelizes inside). Each product picks a kernel by shape and layout:
//!
//! - small `m` with `b`'s rows of `bᵀ` contiguous (the `x · Wᵀ` of a `[out, in]` weight, the decode
//!   hot path): [`gemv_nt`] streams each weight row once and takes `m` dot products with it;
//! - small `m` with `b` row-major: [`gemv_nn`], `m` rows accumulated over column blocks;
//! - otherwise the `gemm` crate, which reads any strides.
//!
//! All products accumulate in `f32`.

use super::tensor::Tensor;
use rayon::prelude::*;

/// Largest `m` handled by the streaming kernels; above it `gemm`'s packing pays for itself.
const SMALL_M: usize = 8;
/// Multiply-adds below which a batch of products runs on one thread.
const PAR_WORK: usize = 1 << 17;
/// Elements of `b` read per parallel task, at least (keeps rayon's per-task cost negligible).
const TASK_ELEMS: usize = 1 << 15;
/// Accumulators of one [`gemv_nn`] block (they stay in L1).
const NN_ACC: usize = 4096;

/// A strided matrix inside a slice: element `(r, c)` is `data[off + r·rs + c·cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    off: usize,
    rs: usize,
    cs: usize,
}

/// `dst[j·m + i] = x_i · w_r` for the weight rows `r` in `rows` (see [`super::simd::nt_rows`]).
fn nt_rows(x: &[&[f32]], w: Mat, k: usize, rows: std::ops::Range<usize>, dst: &mut [f32]) {
    super::simd::nt_rows(x, w.data, w.off, w.rs, k, rows, dst)
}

/// Rows (or columns) per parallel task for `n` of them, each `k` elements long.
fn task_len(n: usize, k: usize, par: bool) -> usize {
    if !par {
        return n.max(1);
    }
    let threads = rayon::current_num_threads().max(1);
    let per_task = TASK_ELEMS.div_ceil(k.max(1));
    n.div_ceil(4 * threads).max(per_task).max(1)
}

/// `out[i, c] = Σ_k a[i, k]·b[k, c]` where `b[k, c] = w.data[w.off + c·w.rs + k]`: the weight is
/// `[n, k]` row-major and each of its rows is read once. `a` rows must be contiguous (`a.cs == 1`).
fn gemv_nt(m: usize, k: usize, n: usize, a: Mat, w: Mat, out: &mut [f32], par: bool) {
    let x: Vec<&[f32]> = (0..m)
        .map(|i| &a.data[a.off + i * a.rs..a.off + i * a.rs + k])
        .collect();
    let rows = task_len(n, k, par);
    if m == 1 {
        // The output row is the transposed output: write it directly.
        let job =
            |(t, dst): (usize, &mut [f32])| nt_rows(&x, w, k, t * rows..t * rows + dst.len(), dst);
        if par && n > rows {
            out.par_chunks_mut(rows).enumerate().for_each(job);
        } else {
            out.chunks_mut(rows).enumerate().for_each(job);
        }
        return;
    }
    let mut out_t = vec![0f32; n * m];
    let job =
        |(t, dst): (usize, &mut [f32])| nt_rows(&x, w, k, t * rows..t * rows + dst.len() / m, dst);
    if par && n > rows {
        out_t.par_chunks_mut(rows * m).enumerate().for_each(job);
    } else {
        out_t.chunks_mut(rows * m).enumerate().for_each(job);
    }
    for (c, col) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + c] = v;
        }
    }
}

/// Columns `c0..c0+width` of `a · b` for a row-major `b` (`b.cs == 1`), as `[m, width]`.
fn nn_block(m: usize, k: usize, a: Mat, b: Mat, c0: usize, width: usize) -> Vec<f32> {
    let mut acc = vec![0f32; m * width];
    super::simd::axpy_block(
        m,
        k,
        (a.data, a.off, a.rs, a.cs),
        (b.data, b.off + c0, b.rs),
        width,
        &mut acc,
    );
    acc
}

/// `a · b` for small `m` and a row-major `b`, over column blocks of `b` whose accumulators stay
/// in L1 (`m·width ≤ NN_ACC` values).
fn gemv_nn(m: usize, k: usize, n: usize, a: Mat, b: Mat, out: &mut [f32], par: bool) {
    let mut width = (NN_ACC / m.max(1)).max(16);
    if par {
        // At least two blocks per thread.
        let threads = rayon::current_num_threads().max(1);
        width = width.min(n.div_ceil(2 * threads).div_ceil(16) * 16);
    }
    let width = width.min(n).max(1);
    let blocks: Vec<usize> = (0..n).step_by(width).collect();
    let run = |&c0: &usize| (c0, nn_block(m, k, a, b, c0, width.min(n - c0)));
    let parts: Vec<(usize, Vec<f32>)> = if par && blocks.len() > 1 {
        blocks.par_iter().map(run).collect()
    } else {
        blocks.iter().map(run).collect()
    };
    for (c0, part) in parts {
        let w = part.len() / m.max(1);
        for i in 0..m {
            out[i * n + c0..i * n + c0 + w].copy_from_slice(&part[i * w..(i + 1) * w]);
        }
    }
}

/// One product `out[m, n] = a[m, k] · b[k, n]` into a contiguous `out`; `par` allows threads.
fn product(m: usize, k: usize, n: usize, a: Mat, b: Mat, out: &mut [f32], par: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m <= SMALL_M && (b.rs == 1 || k == 1) && (a.cs == 1 || k == 1) {
        let w = Mat { rs: b.cs, ..b };
        return gemv_nt(m, k, n, a, w, out, par);
    }
    if m <= SMALL_M && (b.cs == 1 || n == 1) {
        return gemv_nn(m, k, n, a, b, out, par);
    }
    let big = m * n * k >= 1 << 18;
    let parallelism = if par && big {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every (row, col) the strides reach lies inside the slices: the tensor views were
    // built from in-bounds shapes, strides and offsets, and `out` holds m·n elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `a[…, m, k] · b[…, k, n]`, leading axes broadcast.
pub(crate) fn matmul(a: Tensor, b: Tensor) -> Result<Tensor, String> {
    if a.dtype != b.dtype || !a.dtype.is_float() {
        return Err(format!(
            "MatMul needs two float inputs of one dtype, got {} and {}",
            a.dtype.name(),
            b.dtype.name()
        ));
    }
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || rb < 2 || a.shape[ra - 1] != b.shape[rb - 2] {
        return Err(format!(
            "MatMul of {:?} and {:?}: inner dimensions differ",
            a.shape, b.shape
        ));
    }
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    let batch = super::elementwise::broadcast_shape(&a.shape[..ra - 2], &b.shape[..rb - 2])?;
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    let dtype = a.dtype;
    let b_is_2d = b.shape[..rb - 2].iter().all(|&d| d == 1);
    // Against a shared 2-D matrix, rows of `a` are worth making contiguous (cheap next to `b`).
    let a = if b_is_2d && k > 1 && a.strides[ra - 1] != 1 {
        a.contiguous()
    } else {
        a
    };

    // Fold the innermost batch axes along which b is broadcast into m.
    let fold = |a: &Tensor| {
        let sa = a.broadcast_strides(&out_shape);
        let sb = b.broadcast_strides(&out_shape);
        let (mut mf, mut sam) = (m, a.strides[ra - 2]);
        let mut nb = batch.len();
        while nb > 0 {
            let d = nb - 1;
            let ok = batch[d] == 1 || (sb[d] == 0 && (mf == 1 || sa[d] == sam * mf));
            if !ok {
                break;
            }
            if batch[d] != 1 {
                if mf == 1 {
                    sam = sa[d];
                }
                mf *= batch[d];
            }
            nb -= 1;
        }
        (nb, mf, sam, sa, sb)
    };
    let (a, (nb, mf, sam, sa, sb)) = {
        let f = fold(&a);
        if b_is_2d && f.0 > 0 {
            let a = a.contiguous();
            let f = fold(&a);
            (a, f)
        } else {
            (a, f)
        }
    };
    let items: usize = batch[..nb].iter().product();
    // Every element is written below.
    let mut out = super::pool::buffer::<f32>(items * mf * n);
    let (ad, bd) = (a.raw::<f32>(), b.raw::<f32>());
    let (sak, sbk, sbn) = (a.strides[ra - 1], b.strides[rb - 2], b.strides[rb - 1]);
    let block = mf * n;
    let run = |(item, dst): (usize, &mut [f32]), par: bool| {
        let (mut ao, mut bo, mut rest) = (a.offset, b.offset, item);
        for d in (0..nb).rev() {
            let i = rest % batch[d];
            rest /= batch[d];
            ao += i * sa[d];
            bo += i * sb[d];
        }
        let am = Mat {
            data: ad,
            off: ao,
            rs: sam,
            cs: sak,
        };
        let bm = Mat {
            data: bd,
            off: bo,
            rs: sbk,
            cs: sbn,
        };
        product(mf, k, n, am, bm, dst, par);
    };
    if block > 0 {
        let threads = rayon::current_num_threads();
        let work = items * block * k;
        if items == 1 || (items < 2 * threads && block * k >= 1 << 20) {
            // Few large products: parallelize inside each one.
            out.chunks_mut(block).enumerate().for_each(|x| run(x, true));
        } else if work < PAR_WORK {
            // Too little work to be worth waking other threads.
            out.chunks_mut(block)
                .enumerate()
                .for_each(|x| run(x, false));
        } else {
            out.par_chunks_mut(block)
                .enumerate()
                .for_each(|x| run(x, false));
        }
    }
    Ok(Tensor::new(dtype, out_shape, out))
}
