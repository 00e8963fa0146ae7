//! The weight formats (`DType::Int8`, `DType::Int4`): how a `[n, k]` weight is quantized, packed
//! into an engine, and dequantized. One place for the arithmetic, so that the build (packing),
//! the CPU executor (which computes with the dequantized values) and the GPU kernels' checks
//! agree bit for bit on what a quantized weight means.
//!
//! Layouts (row-major, `n` output rows of `k` input columns):
//! - `Int8`: `q` i8 `[n, k]`; `scale` f32 `[n]`; `w = q · scale`. `scale = max|w_row| / 127`,
//!   `q = round(w / scale)` in `-127..=127` (round to nearest, ties away from zero).
//! - `Int4 { group: g, zero_point: false }` (symmetric, llama.cpp's Q4_0 rule): per group of `g`
//!   consecutive columns, `m` is the element of largest magnitude (with its sign) and
//!   `scale = m / -8`; `q = clamp(round(w / scale) + 8, 0, 15)`; `w = (q - 8) · scale`, so the
//!   extreme element is exact and the range `[-8, 7]` is used on its side.
//! - `Int4 { group: g, zero_point: true }` (AutoAWQ's rule): `scale = max(max - min, 1e-5) / 15`,
//!   `zero = clamp(round(-min / scale), 0, 15)`, `q = clamp(round(w / scale) + zero, 0, 15)`,
//!   `w = (q - zero) · scale`.
//!
//! - `Fp8`: `q` E4M3 `[n, k]` (NVIDIA's `e4m3fn`: 4 exponent bits, bias 7, 3 mantissa bits,
//!   no infinities, ±448 at most); `scale` f32 `[n]`; `w = e4m3(q) · scale`, `scale =
//!   max|w_row| / 448`, `q` the nearest E4M3 value to `w / scale` (ties to even). A linear op
//!   reading it rounds its activations the same way, one scale per row ([`fp8_rows`]).
//! - `Int4Awq { group: g }` (activation-aware, AWQ): the weight's columns are multiplied by
//!   calibrated factors `s[c]` (`quantize_awq`), quantized as `Int4` with zero points, and
//!   `w = (q - zero) · scale / s[c]`; `s` is stored as an f32 vector `colscale` `[k]`.
//!   Without calibration (`quantize`), `s = 1`.
//!
//! - `Int8Group { group: g }` (llama.cpp's Q8_0 rule at `g` = 32): per group, `scale =
//!   max|w| / 127` in f16, `q = clamp(round(w / scale), -127, 127)` i8 `[n, k]`, `w = q · scale`;
//!   `scale` f16 `[n, ceil(k/g)]`.
//! - `Int4Min { group: g }` (llama.cpp's Q4_1 rule at `g` = 32): per group, `min` and
//!   `scale = (max - min) / 15` in f16, `q = clamp(round((w - min) / scale), 0, 15)`,
//!   `w = q · scale + min` (in f32: the product is exact, so the sum rounds once); `min` f16
//!   `[n, ceil(k/g)]` beside the scales.
//!
//!   Int4 codes: `q` u8 `[n, ceil(k/2)]`, column `2j` in the low nibble of byte `j`, `2j+1` in the
//!   high one; `scale` f16 `[n, ceil(k/g)]`; `zero` u8 `[n, ceil(k/g)]` (asymmetric only). The
//!   last group of a row may be shorter than `g` when `g` does not divide `k` (SmolLM2's 576).
//!
//! Every scale is rounded to its stored precision *before* the codes are computed, so the codes
//! are the best ones for the scale the kernels read.

use crate::ir::DType;
use half::f16;

/// A quantized `[rows, cols]` weight: its codes and scales (and zero points), as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed {
    /// The format.
    pub format: DType,
    /// Output rows `n`.
    pub rows: usize,
    /// Input columns `k`.
    pub cols: usize,
    /// Codes: i8 per element (`Int8`) or two u4 per byte (`Int4`).
    pub q: Vec<u8>,
    /// Scales: f32 per row (`Int8`) or f16 per group (`Int4`), as f32 values.
    pub scale: Vec<f32>,
    /// Zero points per group (`Int4` with zero points, `Int4Awq`), else empty.
    pub zero: Vec<u8>,
    /// Per-input-column factors the weight was multiplied by (`Int4Awq`), else empty.
    pub col_scale: Vec<f32>,
    /// Per-group minimums, f16 values as f32 (`Int4Min`), else empty.
    pub min: Vec<f32>,
}

/// One stored part of a packed weight: suffix of its engine tensor name, element type, shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Appended to the weight's name (`""` for the codes, `.scale`, `.zero`, `.colscale`,
    /// `.min`).
    pub suffix: &'static str,
    /// Stored element type.
    pub dtype: safetensors::Dtype,
    /// Stored shape.
    pub shape: Vec<usize>,
}

impl Part {
    /// Stored bytes.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Groups per row of an `Int4` weight with `cols` columns.
pub fn groups(cols: usize, group: u16) -> usize {
    cols.div_ceil(group as usize)
}

/// The parts a `[rows, cols]` weight of `format` is stored as; `None` if `format` is not a
/// weight format.
pub fn parts(format: DType, rows: usize, cols: usize) -> Option<Vec<Part>> {
    use safetensors::Dtype as S;
    let part = |suffix, dtype, shape| Part {
        suffix,
        dtype,
        shape,
    };
    Some(match format {
        DType::Int8 => vec![
            part("", S::I8, vec![rows, cols]),
            part(".scale", S::F32, vec![rows]),
        ],
        DType::Fp8 => vec![
            part("", S::F8_E4M3, vec![rows, cols]),
            part(".scale", S::F32, vec![rows]),
        ],
        DType::Int4 { group, zero_point } => {
            let g = groups(cols, group);
            let mut v = vec![
                part("", S::U8, vec![rows, cols.div_ceil(2)]),
                part(".scale", S::F16, vec![rows, g]),
            ];
            if zero_point {
                v.push(part(".zero", S::U8, vec![rows, g]));
            }
            v
        }
        DType::Int4Awq { group } => {
            let g = groups(cols, group);
            vec![
                part("", S::U8, vec![rows, cols.div_ceil(2)]),
                part(".scale", S::F16, vec![rows, g]),
                part(".zero", S::U8, vec![rows, g]),
                part(".colscale", S::F32, vec![cols]),
            ]
        }
        DType::Int8Group { group } => vec![
            part("", S::I8, vec![rows, cols]),
            part(".scale", S::F16, vec![rows, groups(cols, group)]),
        ],
        DType::Int4Min { group } => {
            let g = groups(cols, group);
            vec![
                part("", S::U8, vec![rows, cols.div_ceil(2)]),
                part(".scale", S::F16, vec![rows, g]),
                part(".min", S::F16, vec![rows, g]),
            ]
        }
        _ => return None,
    })
}

/// Bytes a `[rows, cols]` weight of `format` occupies (codes, scales and zero points).
pub fn stored_bytes(format: DType, rows: usize, cols: usize) -> Option<usize> {
    Some(parts(format, rows, cols)?.iter().map(Part::bytes).sum())
}

/// Quantizes row-major `[rows, cols]` values to `format` (`Int4Awq` with factors 1: see
/// [`quantize_awq`]).
pub fn quantize(format: DType, w: &[f32], rows: usize, cols: usize) -> Result<Packed, String> {
    if let DType::Int4Awq { group } = format {
        return quantize_awq(w, rows, cols, group, &vec![1.0; cols]);
    }
    check(w, rows, cols)?;
    let mut p = Packed {
        format,
        rows,
        cols,
        q: Vec::new(),
        scale: Vec::new(),
        zero: Vec::new(),
        col_scale: Vec::new(),
        min: Vec::new(),
    };
    match format {
        DType::Int8 => {
            p.q.reserve(rows * cols);
            for row in w.chunks_exact(cols.max(1)).take(rows) {
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = amax / 127.0;
                p.scale.push(s);
                p.q.extend(row.iter().map(|&v| code(v, s, 0, -127, 127) as i8 as u8));
            }
        }
        DType::Fp8 => {
            p.q.reserve(rows * cols);
            for row in w.chunks_exact(cols.max(1)).take(rows) {
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
                p.scale.push(s);
                p.q.extend(row.iter().map(|&v| e4m3(v / s)));
            }
        }
        DType::Int4 { group, zero_point } => int4(&mut p, w, group, zero_point)?,
        DType::Int8Group { group } => {
            p.q.reserve(rows * cols);
            for row in w.chunks_exact(cols.max(1)).take(rows) {
                for vals in row.chunks(group as usize) {
                    let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let s = f16_scale(amax / 127.0, format)?;
                    p.scale.push(s);
                    p.q.extend(vals.iter().map(|&v| code(v, s, 0, -127, 127) as i8 as u8));
                }
            }
        }
        DType::Int4Min { group } => {
            let half = cols.div_ceil(2);
            p.q = vec![0u8; rows * half];
            for (r, row) in w.chunks_exact(cols.max(1)).take(rows).enumerate() {
                for (gi, vals) in row.chunks(group as usize).enumerate() {
                    let lo = vals.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                    let hi = vals.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let m = f16_scale(lo, format)?;
                    let s = f16_scale((hi - m) / 15.0, format)?;
                    p.scale.push(s);
                    p.min.push(m);
                    for (j, &v) in vals.iter().enumerate() {
                        let c = gi * group as usize + j;
                        let q = if s == 0.0 {
                            0
                        } else {
                            ((v - m) / s).round().clamp(0.0, 15.0) as u8
                        };
                        p.q[r * half + c / 2] |= if c.is_multiple_of(2) { q } else { q << 4 };
                    }
                }
            }
        }
        other => return Err(format!("{} is not a weight format", other.name())),
    }
    Ok(p)
}

/// `v` rounded to f16 (a stored scale or minimum), or an error naming `format` if it overflows.
fn f16_scale(v: f32, format: DType) -> Result<f32, String> {
    let s = f16::from_f32(v).to_f32();
    if s.is_finite() {
        Ok(s)
    } else {
        Err(format!(
            "a weight has values too large for the f16 scales of {}",
            format.name()
        ))
    }
}

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The E4M3 (`e4m3fn`) code nearest to `v` (ties to even), saturating at ±448; NaN stays NaN.
pub fn e4m3(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    if a.is_nan() {
        return 0x7f;
    }
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    // Subnormals (and zero): steps of 2^-9 below 2^-6; 8 steps is the smallest normal.
    if a < 1.0 / 64.0 {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
    let q = (a / 2f32.powi(e - 3)).round_ties_even() as i32;
    let (e, q) = if q == 16 { (e + 1, 8) } else { (e, q) };
    sign | (((e + 7) as u8) << 3) | (q - 8) as u8
}

/// The value of an E4M3 (`e4m3fn`) code.
pub fn from_e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((b >> 3) & 0xf), f32::from(b & 7));
    sign * match (e, m as u8) {
        (15, 7) => f32::NAN,
        (0, _) => m / 512.0,
        _ => (1.0 + m / 8.0) * 2f32.powi(e - 7),
    }
}

/// Rounds each vector of `d` values as a quantized KV cache stores it (`Op::KvQuant`): int8
/// codes or E4M3 with the vector's own scale `max|v| / 127` (`/ 448`), in place.
pub fn kv_round(x: &mut [f32], d: usize, format: DType) -> Result<(), String> {
    match format {
        DType::Fp8 => fp8_rows(x, d),
        DType::Int8 => {
            for v in x.chunks_mut(d.max(1)) {
                let amax = v.iter().fold(0f32, |m, e| m.max(e.abs()));
                if amax > 0.0 && amax.is_finite() {
                    let s = amax / 127.0;
                    for e in v {
                        *e = (*e / s).round().clamp(-127.0, 127.0) * s;
                    }
                }
            }
        }
        other => {
            return Err(format!(
                "a KV cache holds int8 or fp8, not {}",
                other.name()
            ))
        }
    }
    Ok(())
}

/// Rounds each row of `cols` values to E4M3 with its own scale (`max|row| / 448`), in place:
/// the per-token dynamic quantization of the activations of a W8A8 product.
pub fn fp8_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_mut(cols.max(1)) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax > 0.0 && amax.is_finite() {
            let s = amax / E4M3_MAX;
            for v in row {
                *v = from_e4m3(e4m3(*v / s)) * s;
            }
        }
    }
}

/// Activation-aware int4 (`Int4Awq`): quantizes `w · diag(s)` with zero points and keeps `s`,
/// so that the dequantized weight is `Q(w · diag(s)) · diag(1/s)`. Input columns with large
/// activations get large `s`: their weights are quantized with relatively finer steps.
pub fn quantize_awq(
    w: &[f32],
    rows: usize,
    cols: usize,
    group: u16,
    s: &[f32],
) -> Result<Packed, String> {
    check(w, rows, cols)?;
    if s.len() != cols || s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(format!(
            "AWQ needs {cols} finite positive column factors, got {}",
            s.len()
        ));
    }
    let scaled: Vec<f32> = w
        .chunks_exact(cols.max(1))
        .flat_map(|row| row.iter().zip(s).map(|(v, f)| v * f))
        .collect();
    let mut p = Packed {
        format: DType::Int4Awq { group },
        rows,
        cols,
        q: Vec::new(),
        scale: Vec::new(),
        zero: Vec::new(),
        col_scale: s.to_vec(),
        min: Vec::new(),
    };
    int4(&mut p, &scaled, group, true)?;
    Ok(p)
}

fn check(w: &[f32], rows: usize, cols: usize) -> Result<(), String> {
    if w.len() != rows * cols {
        return Err(format!("{} values for a [{rows}, {cols}] weight", w.len()));
    }
    if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
        return Err(format!("cannot quantize a weight holding {bad}"));
    }
    Ok(())
}

/// Fills the int4 codes, scales (and zero points) of `p` from `w`.
fn int4(p: &mut Packed, w: &[f32], group: u16, zero_point: bool) -> Result<(), String> {
    let (rows, cols) = (p.rows, p.cols);
    let g = group as usize;
    let ng = groups(cols, group);
    let half = cols.div_ceil(2);
    p.q = vec![0u8; rows * half];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let codes = &mut p.q[r * half..(r + 1) * half];
        for gi in 0..ng {
            let span = gi * g..((gi + 1) * g).min(cols);
            let vals = &row[span.clone()];
            let (s, z) = int4_group(vals, zero_point);
            if !s.is_finite() {
                return Err(format!(
                    "row {r} has values too large for the f16 scales of {}",
                    p.format.name()
                ));
            }
            p.scale.push(s);
            if zero_point {
                p.zero.push(z as u8);
            }
            for (c, &v) in span.zip(vals) {
                let q = int4_code(v, s, z);
                codes[c / 2] |= if c % 2 == 0 { q } else { q << 4 };
            }
        }
    }
    Ok(())
}

/// The scale and zero point of one int4 group of values (see the module doc); the zero point
/// is 8 without `zero_point`.
pub fn int4_group(vals: &[f32], zero_point: bool) -> (f32, i32) {
    if zero_point {
        let lo = vals.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let hi = vals.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let s = f16::from_f32((hi - lo).max(1e-5) / 15.0).to_f32();
        let z = (-lo / s).round().clamp(0.0, 15.0) as i32;
        (s, z)
    } else {
        let m = vals
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        (f16::from_f32(m / -8.0).to_f32(), 8)
    }
}

/// The int4 code of `v` with scale `s` and zero point `z`: `clamp(round(v / s) + z, 0, 15)`.
pub fn int4_code(v: f32, s: f32, z: i32) -> u8 {
    code(v, s, z, 0, 15) as u8
}

/// `clamp(round(v / s) + z, lo, hi)`, 0 when `s` is 0 (an all-zero row or group).
fn code(v: f32, s: f32, z: i32, lo: i32, hi: i32) -> i32 {
    if s == 0.0 {
        return z.clamp(lo, hi);
    }
    ((v / s).round() as i32 + z).clamp(lo, hi)
}

impl Packed {
    /// Rows `start..end` (a slice of a fused projection); `None` if out of range or the format
    /// carries column factors.
    pub fn row_range(&self, start: usize, end: usize) -> Option<Packed> {
        if start > end || end > self.rows || !self.col_scale.is_empty() {
            return None;
        }
        let per = |len: usize| len / self.rows.max(1);
        let rows = |v: &[f32]| v[start * per(v.len())..end * per(v.len())].to_vec();
        let (q, z) = (per(self.q.len()), per(self.zero.len()));
        Some(Packed {
            format: self.format,
            rows: end - start,
            cols: self.cols,
            q: self.q[start * q..end * q].to_vec(),
            scale: rows(&self.scale),
            zero: self.zero[start * z..end * z].to_vec(),
            col_scale: Vec::new(),
            min: rows(&self.min),
        })
    }

    /// The rows of `parts` one after another (a fused projection of weights quantized
    /// separately); `None` if they differ in format or columns, or carry column factors.
    pub fn stack_rows(parts: Vec<Packed>) -> Option<Packed> {
        let first = parts.first()?;
        let (format, cols) = (first.format, first.cols);
        if parts
            .iter()
            .any(|p| p.format != format || p.cols != cols || !p.col_scale.is_empty())
        {
            return None;
        }
        let mut out = Packed {
            format,
            rows: 0,
            cols,
            q: Vec::new(),
            scale: Vec::new(),
            zero: Vec::new(),
            col_scale: Vec::new(),
            min: Vec::new(),
        };
        for p in parts {
            out.rows += p.rows;
            out.q.extend(p.q);
            out.scale.extend(p.scale);
            out.zero.extend(p.zero);
            out.min.extend(p.min);
        }
        Some(out)
    }

    /// An `Int4` weight from codes chosen elsewhere (GPTQ), one per element row-major, with
    /// their groups' scales (rounded to f16 here) and zero points.
    pub fn from_int4_codes(
        format: DType,
        rows: usize,
        cols: usize,
        codes: &[u8],
        scale: Vec<f32>,
        zero: Vec<u8>,
    ) -> Result<Packed, String> {
        let DType::Int4 { group, zero_point } = format else {
            return Err(format!("{} is not an int4 format", format.name()));
        };
        let ng = rows * groups(cols, group);
        if codes.len() != rows * cols
            || scale.len() != ng
            || zero.len() != if zero_point { ng } else { 0 }
            || codes.iter().chain(&zero).any(|&c| c > 15)
        {
            return Err(format!(
                "int4 codes, scales or zero points do not fit a [{rows}, {cols}] {} weight",
                format.name()
            ));
        }
        let half = cols.div_ceil(2);
        let mut q = vec![0u8; rows * half];
        for (r, row) in codes.chunks_exact(cols.max(1)).enumerate().take(rows) {
            for (c, &v) in row.iter().enumerate() {
                q[r * half + c / 2] |= if c % 2 == 0 { v } else { v << 4 };
            }
        }
        Ok(Packed {
            format,
            rows,
            cols,
            q,
            scale: scale.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            zero,
            col_scale: Vec::new(),
            min: Vec::new(),
        })
    }

    /// The values the kernels compute with (see the module doc), in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let half = cols.div_ceil(2);
        let byte = |r: usize, c: usize| self.q[r * cols + c];
        let nibble = |r: usize, c: usize| {
            let b = self.q[r * half + c / 2];
            if c.is_multiple_of(2) {
                b & 15
            } else {
                b >> 4
            }
        };
        // The index of the scale (and zero point, minimum) of element (r, c).
        let group = |r: usize, c: usize, g: u16| r * groups(cols, g) + c / g as usize;
        let value = |r: usize, c: usize| match self.format {
            DType::Int8 => byte(r, c) as i8 as f32 * self.scale[r],
            DType::Fp8 => from_e4m3(byte(r, c)) * self.scale[r],
            DType::Int8Group { group: g } => byte(r, c) as i8 as f32 * self.scale[group(r, c, g)],
            DType::Int4 { group: g, .. } | DType::Int4Awq { group: g } => {
                let gi = group(r, c, g);
                let z = self.zero.get(gi).copied().unwrap_or(8);
                let v = (nibble(r, c) as i32 - z as i32) as f32 * self.scale[gi];
                match self.col_scale.get(c) {
                    Some(f) => v / f,
                    None => v,
                }
            }
            DType::Int4Min { group: g } => {
                let gi = group(r, c, g);
                f32::from(nibble(r, c)) * self.scale[gi] + self.min[gi]
            }
            _ => unreachable!("a Packed holds a weight format"),
        };
        (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .map(|(r, c)| value(r, c))
            .collect()
    }

    /// The stored tensors, in [`parts`] order: little-endian bytes of each.
    pub fn to_bytes(&self) -> Vec<Vec<u8>> {
        let mut v = vec![self.q.clone()];
        v.push(match self.format {
            DType::Int8 | DType::Fp8 => self.scale.iter().flat_map(|s| s.to_le_bytes()).collect(),
            _ => self
                .scale
                .iter()
                .flat_map(|&s| f16::from_f32(s).to_le_bytes())
                .collect(),
        });
        if !self.zero.is_empty() {
            v.push(self.zero.clone());
        }
        if !self.col_scale.is_empty() {
            v.push(
                self.col_scale
                    .iter()
                    .flat_map(|s| s.to_le_bytes())
                    .collect(),
            );
        }
        if !self.min.is_empty() {
            v.push(
                self.min
                    .iter()
                    .flat_map(|&m| f16::from_f32(m).to_le_bytes())
                    .collect(),
            );
        }
        v
    }

    /// Reassembles a packed weight from its stored tensors (as [`Packed::to_bytes`] wrote
    /// them), checking every size.
    pub fn from_bytes(
        format: DType,
        rows: usize,
        cols: usize,
        stored: &[&[u8]],
    ) -> Result<Packed, String> {
        let parts = parts(format, rows, cols)
            .ok_or_else(|| format!("{} is not a weight format", format.name()))?;
        if stored.len() != parts.len() {
            return Err(format!(
                "{} stored as {} tensors, expected {}",
                format.name(),
                stored.len(),
                parts.len()
            ));
        }
        for (p, b) in parts.iter().zip(stored) {
            let want = p.bytes();
            if b.len() != want {
                return Err(format!(
                    "part `{}` of a {} weight [{rows}, {cols}] has {} bytes, expected {want}",
                    if p.suffix.is_empty() {
                        "codes"
                    } else {
                        p.suffix
                    },
                    format.name(),
                    b.len()
                ));
            }
        }
        if format == DType::Fp8 && stored[0].iter().any(|&b| b & 0x7f == 0x7f) {
            return Err("an fp8 weight holds a NaN code".into());
        }
        // A part's values as f32 (f32 or f16 little-endian), empty if the format has none.
        let floats = |suffix: &str| -> Vec<f32> {
            let Some((p, b)) = parts.iter().zip(stored).find(|(p, _)| p.suffix == suffix) else {
                return Vec::new();
            };
            match p.dtype {
                safetensors::Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                _ => b
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            }
        };
        let (scale, min) = (floats(".scale"), floats(".min"));
        if let Some(bad) = scale.iter().chain(&min).find(|s| !s.is_finite()) {
            return Err(format!("a {} scale is {bad}", format.name()));
        }
        let zero = parts
            .iter()
            .zip(stored)
            .find(|(p, _)| p.suffix == ".zero")
            .map(|(_, z)| z.to_vec())
            .unwrap_or_default();
        if zero.iter().any(|&z| z > 15) {
            return Err(format!("a {} zero point is above 15", format.name()));
        }
        let col_scale = floats(".colscale");
        if col_scale.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(format!(
                "a {} column factor is not a finite positive number",
                format.name()
            ));
        }
        Ok(Packed {
            format,
            rows,
            cols,
            q: stored[0].to_vec(),
            scale,
            zero,
            col_scale,
            min,
        })
    }
}

/// `dequantize(quantize(w))`: the values a weight of `format` holds once quantized.
pub fn round_trip(format: DType, w: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, String> {
    Ok(quantize(format, w, rows, cols)?.dequantize())
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
