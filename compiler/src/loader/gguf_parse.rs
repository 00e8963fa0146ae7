//! Bounds-checked little-endian reading of GGUF header fields and metadata values.

use std::fmt;
use std::path::Path;

use super::gguf_value::{GgufError, GgufValue};

/// Deepest nesting of metadata arrays accepted (guards the recursive parser's stack).
const MAX_ARRAY_DEPTH: usize = 8;

/// A bounds-checked little-endian reader over the file bytes.
pub(super) struct Cursor<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
}

impl<'a> Cursor<'a> {
    pub(super) fn truncated(&self, what: &dyn fmt::Display, n: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            start: self.pos as u64,
            end: (self.pos as u64).saturating_add(n),
            file_len: self.data.len() as u64,
        }
    }

    pub(super) fn corrupt(
        &self,
        what: &dyn fmt::Display,
        expected: String,
        found: String,
    ) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            expected,
            found,
        }
    }

    pub(super) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub(super) fn take(&mut self, n: u64, what: &dyn fmt::Display) -> Result<&'a [u8], GgufError> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let s = &self.data[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(self.truncated(what, n)),
        }
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        what: &dyn fmt::Display,
    ) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(super) fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string: `u64` length, then that many UTF-8 bytes.
    pub(super) fn string(&mut self, what: &dyn fmt::Display) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.corrupt(
                what,
                "a UTF-8 string".into(),
                format!("invalid UTF-8 ({e})"),
            )),
        }
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in the rest of the
    /// file, so that a corrupt count fails here instead of driving a huge loop or allocation.
    pub(super) fn check_count(
        &self,
        count: u64,
        min_size: u64,
        what: &dyn fmt::Display,
    ) -> Result<usize, GgufError> {
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|need| need <= self.remaining() as u64);
        match usize::try_from(count) {
            Ok(c) if fits => Ok(c),
            _ => Err(self.corrupt(
                what,
                format!(
                    "a count that fits in the {} bytes left (each item takes at least {min_size})",
                    self.remaining()
                ),
                count.to_string(),
            )),
        }
    }

    /// A metadata value of GGUF type `ty`.
    pub(super) fn value(
        &mut self,
        ty: u32,
        what: &dyn fmt::Display,
        depth: usize,
    ) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => {
                let [b] = self.array(what)?;
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    _ => {
                        return Err(self.corrupt(what, "a bool byte 0 or 1".into(), b.to_string()))
                    }
                }
            }
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(
                        what,
                        format!("arrays nested at most {MAX_ARRAY_DEPTH} deep"),
                        "deeper nesting".into(),
                    ));
                }
                let elem_ty = self.u32(what)?;
                let min_size = value_min_size(elem_ty).ok_or_else(|| {
                    self.corrupt(
                        what,
                        "an array element type 0..=12".into(),
                        elem_ty.to_string(),
                    )
                })?;
                let count = self.u64(what)?;
                let count = self.check_count(count, min_size, what)?;
                let mut items = Vec::with_capacity(count.min(1 << 16));
                for _ in 0..count {
                    items.push(self.value(elem_ty, what, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            _ => {
                return Err(self.corrupt(what, "a value type 0..=12".into(), ty.to_string()));
            }
        })
    }
}

/// The fewest bytes a value of GGUF type `ty` occupies, or `None` for an unknown type.
fn value_min_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

/// Lazily formatted "what" descriptions for error messages, so the hot parse loop formats
/// nothing unless it fails.
pub(super) struct What<F: Fn(&mut fmt::Formatter<'_>) -> fmt::Result>(pub(super) F);

impl<F: Fn(&mut fmt::Formatter<'_>) -> fmt::Result> fmt::Display for What<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (self.0)(f)
    }
}
