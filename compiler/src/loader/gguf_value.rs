//! The metadata value type and the error type of the GGUF reader (re-exported by
//! [`super::gguf`]).

use std::path::PathBuf;

/// A metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7 (one byte, 0 or 1).
    Bool(bool),
    /// Type 8 (`u64` length + UTF-8 bytes).
    String(String),
    /// Type 9 (`u32` element type + `u64` count + elements, all of that one type).
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The GGUF name of this value's type (`"u32"`, `"string"`, `"array"`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// The value as a `u64` if it is an integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `i64` if it is an integer of any width that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as an `f64` if it is a float (f32 values are widened exactly) or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description for error messages: the type and the value (strings cut at 100
    /// characters, arrays by their length).
    pub fn describe(&self) -> String {
        match self {
            GgufValue::String(s) => {
                let cut: String = s.chars().take(100).collect();
                let more = if cut.len() < s.len() { "…" } else { "" };
                format!("string {cut:?}{more}")
            }
            GgufValue::Array(a) => match a.first() {
                Some(first) => format!("array of {} {}", a.len(), first.type_name()),
                None => "empty array".into(),
            },
            GgufValue::U8(v) => format!("u8 {v}"),
            GgufValue::I8(v) => format!("i8 {v}"),
            GgufValue::U16(v) => format!("u16 {v}"),
            GgufValue::I16(v) => format!("i16 {v}"),
            GgufValue::U32(v) => format!("u32 {v}"),
            GgufValue::I32(v) => format!("i32 {v}"),
            GgufValue::F32(v) => format!("f32 {v}"),
            GgufValue::Bool(v) => format!("bool {v}"),
            GgufValue::U64(v) => format!("u64 {v}"),
            GgufValue::I64(v) => format!("i64 {v}"),
            GgufValue::F64(v) => format!("f64 {v}"),
        }
    }

    /// The value as a bool if it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// Everything that can go wrong reading a GGUF file. Each message names the file and the key
/// or tensor concerned, and says what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, inspected or memory-mapped.
    #[error("GGUF file {path}: cannot read it")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("GGUF file {path}: bad magic: expected the bytes \"GGUF\", found \"{found}\"")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes of the file (fewer than 4 if it is shorter), ASCII-escaped.
        found: String,
    },
    /// The header's version is not one this reader understands.
    #[error("GGUF file {path}: unsupported version {found}: expected 2 or 3 (little-endian)")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version read (as little-endian).
        found: u32,
    },
    /// The file ends before something it declares.
    #[error(
        "GGUF file {path}: truncated: {what} needs bytes {start}..{end}, but the file is {file_len} bytes long"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read (names the metadata key or tensor).
        what: String,
        /// First byte needed.
        start: u64,
        /// One past the last byte needed.
        end: u64,
        /// The file size.
        file_len: u64,
    },
    /// A structurally invalid value (absurd count, unknown value type, invalid UTF-8, …).
    #[error("GGUF file {path}: corrupt {what}: expected {expected}, found {found}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where (names the metadata key or tensor).
        what: String,
        /// What a valid file has there.
        expected: String,
        /// What this file has.
        found: String,
    },
    /// A tensor info's type id is not any GGML type.
    #[error("GGUF file {path}: tensor '{tensor}' has unknown GGML type id {type_id} (expected one of ggml's type ids, e.g. 0 = F32, 1 = F16, 8 = Q8_0)")]
    UnknownTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor (GGUF name).
        tensor: String,
        /// The type id found.
        type_id: u32,
    },
    /// A tensor's GGML type is valid but cannot be dequantized by this reader.
    #[error(
        "GGUF file {path}: tensor '{tensor}' has GGML type {type_name}, which cannot be converted to f32 (supported: {supported})"
    )]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor (HF name).
        tensor: String,
        /// The type's ggml name.
        type_name: &'static str,
        /// The supported type names.
        supported: &'static str,
    },
    /// A tensor's data lies (partly) outside the file.
    #[error(
        "GGUF file {path}: tensor '{tensor}' data at bytes {start}..{end} runs past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor (GGUF name).
        tensor: String,
        /// First byte of its data.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The file size.
        file_len: u64,
    },
    /// A tensor's shape does not fit its type or its use.
    #[error("GGUF file {path}: tensor '{tensor}': bad shape: expected {expected}, found {found}")]
    BadTensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What was required.
        expected: String,
        /// What the file has.
        found: String,
    },
    /// No tensor of this (HF) name.
    #[error(
        "GGUF file {path}: no tensor named '{name}' (names are HF names, see GgufFile::tensors)"
    )]
    TensorNotFound {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// A required metadata key is absent.
    #[error("GGUF file {path}: missing metadata key '{key}' (expected {expected})")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What it should hold.
        expected: &'static str,
    },
    /// A metadata key holds a value of the wrong type or range.
    #[error("GGUF file {path}: metadata key '{key}': expected {expected}, found {found}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What it should hold.
        expected: String,
        /// What it holds.
        found: String,
    },
    /// The operation does not support this file's architecture or tokenizer model.
    #[error("GGUF file {path}: unsupported {what} '{found}' (expected {expected})")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported (e.g. "architecture for hf_config").
        what: &'static str,
        /// What is supported.
        expected: &'static str,
        /// What the file has.
        found: String,
    },
}
