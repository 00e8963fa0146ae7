//! The quantized weight formats the GPU kernels read: `FMT` and `G` of `gemv_q.cu`, each
//! format's stored parts, and its correspondence with the graph's weight dtypes.

use serde::{Deserialize, Serialize};

/// A quantized weight format the GPU kernels read (`FMT` and `G` of `gemv_q.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QuantFormat {
    /// int8 codes, one f32 scale per row.
    Int8,
    /// int4 codes in groups of `group` columns, one f16 scale per group, with a u8 zero point
    /// per group or the fixed zero 8.
    Int4 {
        /// Columns per group (32, 64 or 128).
        group: usize,
        /// With zero points.
        zero_point: bool,
    },
    /// int4 codes in groups of `group` columns, an f16 scale and an f16 minimum per group
    /// (GGUF Q4_1).
    Int4Min {
        /// Columns per group (32, 64 or 128).
        group: usize,
    },
    /// int8 codes in groups of `group` columns, one f16 scale per group (GGUF Q8_0).
    Int8Group {
        /// Columns per group (32, 64 or 128).
        group: usize,
    },
    /// E4M3 codes, one f32 scale per row; the activations rounded to E4M3 per row (W8A8).
    Fp8,
}

impl QuantFormat {
    /// The format of a weight dtype, if the GPU kernels read it.
    pub fn of(dtype: crate::ir::DType) -> Option<QuantFormat> {
        use crate::ir::DType;
        match dtype {
            DType::Int8 => Some(QuantFormat::Int8),
            DType::Int4 { group, zero_point } => Some(QuantFormat::Int4 {
                group: group as usize,
                zero_point,
            }),
            DType::Int4Min { group } => Some(QuantFormat::Int4Min {
                group: group as usize,
            }),
            DType::Int8Group { group } => Some(QuantFormat::Int8Group {
                group: group as usize,
            }),
            DType::Fp8 => Some(QuantFormat::Fp8),
            _ => None,
        }
    }

    /// The weight dtype of this format (the inverse of [`QuantFormat::of`]).
    pub fn dtype(self) -> crate::ir::DType {
        use crate::ir::DType;
        let g = |group: usize| group as u16;
        match self {
            QuantFormat::Int8 => DType::Int8,
            QuantFormat::Int4 { group, zero_point } => DType::Int4 {
                group: g(group),
                zero_point,
            },
            QuantFormat::Int4Min { group } => DType::Int4Min { group: g(group) },
            QuantFormat::Int8Group { group } => DType::Int8Group { group: g(group) },
            QuantFormat::Fp8 => DType::Fp8,
        }
    }

    /// `FMT`: 1 int8, 2 int4 symmetric, 3 int4 with zero points, 4 int4 with a minimum, 5
    /// grouped int8, 6 fp8 (W8A8).
    pub fn code(self) -> usize {
        match self {
            QuantFormat::Int8 => 1,
            QuantFormat::Int4 {
                zero_point: false, ..
            } => 2,
            QuantFormat::Int4 {
                zero_point: true, ..
            } => 3,
            QuantFormat::Int4Min { .. } => 4,
            QuantFormat::Int8Group { .. } => 5,
            QuantFormat::Fp8 => 6,
        }
    }

    /// `G`: the group size (0 for int8 and fp8, whose scale is per row).
    pub fn group(self) -> usize {
        match self {
            QuantFormat::Int8 | QuantFormat::Fp8 => 0,
            QuantFormat::Int4 { group, .. }
            | QuantFormat::Int4Min { group }
            | QuantFormat::Int8Group { group } => group,
        }
    }

    /// Codes per 16-byte vector: `K` must be a multiple of it.
    pub fn codes_per_vector(self) -> usize {
        Self::codes_per_vector_of(self.code())
    }

    /// Codes per 16-byte vector of the format with `FMT` code `code`: 16 int8 and fp8, 32 int4.
    pub fn codes_per_vector_of(code: usize) -> usize {
        if matches!(code, 1 | 5 | 6) {
            16
        } else {
            32
        }
    }

    /// The suffix of the stored part the kernels' third weight operand reads (`zero`): the
    /// zero points or the minimums; `None` for formats without one.
    pub fn third_part(self) -> Option<&'static str> {
        match self {
            QuantFormat::Int4 {
                zero_point: true, ..
            } => Some(".zero"),
            QuantFormat::Int4Min { .. } => Some(".min"),
            _ => None,
        }
    }
}
