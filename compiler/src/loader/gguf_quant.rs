//! GGML tensor types as stored in GGUF files: the size table of every known type, dequantization
//! to `f32` of the supported ones (F32, F16, BF16, Q8_0, Q4_0, Q4_1; Q5_0, Q5_1 and the k-quants
//! Q4_K, Q5_K, Q6_K in `gguf_kquants.rs`), and llama.cpp's Q/K row permutation and its inverse.
//!
//! Dequantization follows ggml's reference code (`dequantize_row_*` in `ggml-quants.c`) exactly:
//! the block scale `d` (and minimum `m`) are converted f16 → f32, and each value is computed in
//! f32 as `q as f32 * d` (plus `m` for Q4_1), rounding after the multiply and after the add (no
//! fused multiply-add), which is also what transformers' and gguf-py's numpy code computes.

use half::{bf16, f16};
use rayon::prelude::*;

/// One GGML tensor type: its id in GGUF tensor infos, its name, and its block layout
/// (`block` elements are stored in `bytes` bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    /// The type id as written in a GGUF tensor info.
    pub id: u32,
    /// ggml's name of the type, e.g. `"Q4_1"`.
    pub name: &'static str,
    /// Elements per block (1 for plain types).
    pub block: usize,
    /// Bytes per block.
    pub bytes: usize,
}

const fn t(id: u32, name: &'static str, block: usize, bytes: usize) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        bytes,
    }
}

/// Every type id ggml has assigned (retired ids 4, 5, 31..=33 and 36..=38 are absent), with its
/// block layout as in gguf-py's `GGML_QUANT_SIZES`.
const TYPES: &[GgmlType] = &[
    t(0, "F32", 1, 4),
    t(1, "F16", 1, 2),
    t(2, "Q4_0", 32, 18),
    t(3, "Q4_1", 32, 20),
    t(6, "Q5_0", 32, 22),
    t(7, "Q5_1", 32, 24),
    t(8, "Q8_0", 32, 34),
    t(9, "Q8_1", 32, 40),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(16, "IQ2_XXS", 256, 66),
    t(17, "IQ2_XS", 256, 74),
    t(18, "IQ3_XXS", 256, 98),
    t(19, "IQ1_S", 256, 50),
    t(20, "IQ4_NL", 32, 18),
    t(21, "IQ3_S", 256, 110),
    t(22, "IQ2_S", 256, 82),
    t(23, "IQ4_XS", 256, 136),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(29, "IQ1_M", 256, 56),
    t(30, "BF16", 1, 2),
    t(34, "TQ1_0", 256, 54),
    t(35, "TQ2_0", 256, 66),
    t(39, "MXFP4", 32, 17),
    t(40, "NVFP4", 64, 36),
    t(41, "Q1_0", 128, 18),
];

/// The GGML type with this id, if ggml defines one.
pub fn ggml_type(id: u32) -> Option<GgmlType> {
    TYPES.iter().copied().find(|ty| ty.id == id)
}

/// Names of the types [`dequantize`] supports, for error messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K";

/// Elements each parallel task converts (a multiple of every supported block size).
const ELEMS_PER_TASK: usize = 64 * 1024;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from(b[i]) | (u16::from(b[i + 1]) << 8)).to_f32()
}

/// Dequantizes `n` elements of type `ty` from `data` (ggml order: block after block).
///
/// Returns `None` if the type is not one of [`SUPPORTED_TYPES`]. The caller guarantees that
/// `n` is a multiple of `ty.block` and `data.len() == n / ty.block * ty.bytes`; if not, the
/// elements without data are left at zero (never a panic).
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Option<Vec<f32>> {
    let out = match ty.name {
        "F32" => blocks(data, n, 1, 4, |b, o| {
            o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }),
        "F16" => blocks(data, n, 1, 2, |b, o| o[0] = f16_at(b, 0)),
        "BF16" => blocks(data, n, 1, 2, |b, o| {
            o[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        }),
        "Q8_0" => blocks(data, n, 32, 34, |b, o| {
            let d = f16_at(b, 0);
            for (y, &q) in o.iter_mut().zip(&b[2..34]) {
                *y = f32::from(q as i8) * d;
            }
        }),
        "Q4_0" => blocks(data, n, 32, 18, |b, o| {
            let d = f16_at(b, 0);
            let (lo, hi) = o.split_at_mut(16);
            for ((y0, y1), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..18]) {
                *y0 = f32::from(i16::from(q & 0x0F) - 8) * d;
                *y1 = f32::from(i16::from(q >> 4) - 8) * d;
            }
        }),
        "Q4_1" => blocks(data, n, 32, 20, |b, o| {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let (lo, hi) = o.split_at_mut(16);
            for ((y0, y1), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..20]) {
                *y0 = f32::from(q & 0x0F) * d + m;
                *y1 = f32::from(q >> 4) * d + m;
            }
        }),
        "Q5_0" => blocks(data, n, 32, 22, |b, o| super::gguf_kquants::q5(b, o, false)),
        "Q5_1" => blocks(data, n, 32, 24, |b, o| super::gguf_kquants::q5(b, o, true)),
        "Q4_K" => blocks(data, n, 256, 144, |b, o| {
            super::gguf_kquants::q45_k(b, o, false)
        }),
        "Q5_K" => blocks(data, n, 256, 176, |b, o| {
            super::gguf_kquants::q45_k(b, o, true)
        }),
        "Q6_K" => blocks(data, n, 256, 210, super::gguf_kquants::q6_k),
        _ => return None,
    };
    Some(out)
}

/// Runs `f(block_bytes, block_out)` over every block, in parallel over runs of blocks.
fn blocks(
    data: &[u8],
    n: usize,
    block: usize,
    bytes: usize,
    f: impl Fn(&[u8], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let blocks_per_task = (ELEMS_PER_TASK / block).max(1);
    out.par_chunks_mut(block * blocks_per_task)
        .zip(data.par_chunks(bytes * blocks_per_task))
        .for_each(|(o, d)| {
            for (ob, db) in o.chunks_exact_mut(block).zip(d.chunks_exact(bytes)) {
                f(db, ob);
            }
        });
    out
}

/// Reorders the rows of a row-major `rows × cols` matrix: output row `r` is input row
/// `src(r)`. Requires `w.len() == rows * cols` and `src` to be a permutation of `0..rows`.
fn reorder_rows(w: &[f32], cols: usize, src: impl Fn(usize) -> usize + Sync) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let s = src(r) * cols;
        row.copy_from_slice(&w[s..s + cols]);
    });
    out
}

/// Checks that a `rows × cols` matrix of `len` elements can be split into `n_head` heads of an
/// even number of rows; returns the rows per head.
fn head_rows(len: usize, rows: usize, cols: usize, n_head: usize) -> Result<usize, String> {
    if rows.checked_mul(cols) != Some(len) {
        return Err(format!("expected {rows}×{cols} elements, found {len}"));
    }
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(format!(
            "expected the row count {rows} to be a multiple of 2 × n_head (n_head = {n_head})"
        ));
    }
    Ok(rows / n_head)
}

#[cfg(test)]
/// llama.cpp's convert permutation of Q/K projection rows (HF → GGUF):
/// `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn permute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>, String> {
    let hd = head_rows(w.len(), rows, cols, n_head)?;
    let half = hd / 2;
    // Output (h, b, a) comes from input (h, a, b).
    Ok(reorder_rows(w, cols, |r| {
        let (h, i) = (r / hd, r % hd);
        let (b, a) = (i / 2, i % 2);
        h * hd + a * half + b
    }))
}

/// The inverse of [`permute_qk`] (GGUF → HF):
/// `w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn unpermute_qk(
    w: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>, String> {
    let hd = head_rows(w.len(), rows, cols, n_head)?;
    let half = hd / 2;
    // Output (h, a, b) comes from input (h, b, a).
    Ok(reorder_rows(w, cols, |r| {
        let (h, i) = (r / hd, r % hd);
        let (a, b) = (i / half, i % half);
        h * hd + b * 2 + a
    }))
}
