//! The GGML block types that are kiln weight formats exactly (Q4_0, Q4_1, Q8_0): which one a
//! GGUF's layer matrices are kept in, and a matrix of that type re-packed into kiln's layout
//! with its codes and scales unchanged.

use super::{GgufError, GgufFile, TensorInfo};
use kiln_runtime::ir::DType;
use kiln_runtime::quant::Packed;

/// The weight format the build keeps a file's layer matrices in: the most common of Q4_0,
/// Q4_1 and Q8_0 among the 2-D `blk.*` tensors, each exactly a kiln format (Q4_0 `int4g32`,
/// Q4_1 `int4g32m`, Q8_0 `int8g32`), with the GGML type's name; `None` if the layers hold none
/// of them, or for GPT-2 (its matrices are stored transposed from its model file's layout).
pub(super) fn kept_format(
    architecture: Option<&str>,
    tensors: &[TensorInfo],
) -> Option<(DType, &'static str)> {
    if architecture == Some("gpt2") {
        return None;
    }
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for t in tensors {
        if t.dims.len() == 2 && t.gguf_name.starts_with("blk.") && format_of(t.ty.name).is_some() {
            match counts.iter_mut().find(|(n, _)| *n == t.ty.name) {
                Some((_, c)) => *c += 1,
                None => counts.push((t.ty.name, 1)),
            }
        }
    }
    let (name, _) = counts.into_iter().max_by_key(|&(_, c)| c)?;
    Some((format_of(name)?, name))
}

/// The kiln weight format a GGML block type is exactly, if any.
fn format_of(ggml_type: &str) -> Option<DType> {
    match ggml_type {
        "Q4_0" => Some(DType::Int4 {
            group: 32,
            zero_point: false,
        }),
        "Q4_1" => Some(DType::Int4Min { group: 32 }),
        "Q8_0" => Some(DType::Int8Group { group: 32 }),
        _ => None,
    }
}

impl GgufFile {
    /// The weight format the build keeps this file's layer matrices in, with the GGML type's
    /// name ([`kept_format`], computed once at open).
    pub fn kept_format(&self) -> Option<(DType, &'static str)> {
        self.kept
    }

    /// A 2-D tensor of [`GgufFile::kept_format`]'s type in that kiln format, exactly: ggml's
    /// block of 32 columns is one group, its f16 `d` the group's scale (and its f16 `m` the
    /// group's minimum: Q4_1); Q8_0's int8 codes are kept in order, and byte `j` of a Q4 block
    /// holds columns `j` (low nibble) and `j + 16` (high), which kiln stores as columns `2j`,
    /// `2j + 1` of a byte. llama's Q/K rows are unpermuted as [`GgufFile::read_f32`] does.
    /// `None` for any other tensor.
    pub fn packed_matrix(&self, hf_name: &str) -> Option<Result<Packed, GgufError>> {
        if !self.is_kept_matrix(hf_name) {
            return None;
        }
        let (format, _) = self.kept_format()?;
        let t = self.tensor_info(hf_name)?;
        let (cols, rows) = (t.dims[0], t.dims[1]);
        let bytes = self.mmap.get(t.start..t.end)?;
        let blocks = cols / 32;
        let block_bytes = t.ty.bytes;
        if bytes.len() != rows * blocks * block_bytes {
            return None;
        }
        // The GGUF row each HF row comes from: unpermuting a column of row indices.
        let src: Vec<usize> = match self.hf_row_sources(t, hf_name, rows) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let int8 = matches!(format, DType::Int8Group { .. });
        let row_bytes = if int8 { cols } else { cols / 2 };
        let mut p = Packed {
            format,
            rows,
            cols,
            q: vec![0; rows * row_bytes],
            scale: vec![0.0; rows * blocks],
            zero: Vec::new(),
            col_scale: Vec::new(),
            min: Vec::new(),
        };
        if matches!(format, DType::Int4Min { .. }) {
            p.min = vec![0.0; rows * blocks];
        }
        let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        for (r, &g) in src.iter().enumerate() {
            for b in 0..blocks {
                let blk = &bytes[(g * blocks + b) * block_bytes..][..block_bytes];
                p.scale[r * blocks + b] = f16_at(blk, 0);
                let per_block = if int8 { 32 } else { 16 };
                let dst = &mut p.q[r * row_bytes + b * per_block..];
                if int8 {
                    dst[..32].copy_from_slice(&blk[2..34]);
                    continue;
                }
                let qs = if p.min.is_empty() {
                    &blk[2..18]
                } else {
                    p.min[r * blocks + b] = f16_at(blk, 2);
                    &blk[4..20]
                };
                let code = |j: usize| {
                    if j < 16 {
                        qs[j] & 15
                    } else {
                        qs[j - 16] >> 4
                    }
                };
                for (i, byte) in dst[..16].iter_mut().enumerate() {
                    *byte = code(2 * i) | (code(2 * i + 1) << 4);
                }
            }
        }
        Some(Ok(p))
    }

    /// Whether [`GgufFile::packed_matrix`] reads this tensor (a 2-D matrix of
    /// [`GgufFile::kept_format`]'s type).
    pub fn is_kept_matrix(&self, hf_name: &str) -> bool {
        let Some((_, ty)) = self.kept_format() else {
            return false;
        };
        self.tensor_info(hf_name)
            .is_some_and(|t| t.ty.name == ty && t.dims.len() == 2 && t.dims[0].is_multiple_of(32))
    }
}
