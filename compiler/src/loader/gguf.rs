//! GGUF (v2/v3) reader: metadata, tensor infos, and tensors dequantized to f32 in HuggingFace
//! naming and layout, so a llama.cpp checkpoint can be compiled like a HF one.
//!
//! Layout of a GGUF file (little-endian): magic `"GGUF"`, `u32` version, `u64` tensor count,
//! `u64` metadata count, the metadata key/value pairs, the tensor infos (name, dims listed
//! innermost first, type, offset), then — at the next multiple of `general.alignment` (default
//! 32) — the data section that the tensor offsets are relative to.
//!
//! The reader never trusts the file: every length, count and offset is checked against the file
//! size with checked arithmetic before anything is allocated or sliced, and every problem is a
//! [`GgufError`] naming the file and the key or tensor involved.
//!
//! For architecture `llama`, tensor names are mapped to HF names (`blk.3.attn_q.weight` →
//! `model.layers.3.self_attn.q_proj.weight`, …) and the Q/K row permutation that llama.cpp's
//! converter applies is undone, so [`GgufFile::read_f32`] returns exactly what a HF checkpoint
//! holds (up to quantization).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{json, Value};

use super::gguf_quant::{self, GgmlType};

/// The four bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays accepted (guards the recursive parser's stack).
const MAX_ARRAY_DEPTH: usize = 8;

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
    #[error("GGUF file {path}: cannot read it: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("GGUF file {path}: bad magic: expected the bytes \"GGUF\", found {found:?}")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes of the file (fewer than 4 if it is shorter).
        found: Vec<u8>,
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
    #[error("GGUF file {path}: tensor '{tensor}' has unknown GGML type id {type_id}")]
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

/// One tensor info, validated against the file.
#[derive(Debug, Clone)]
struct TensorInfo {
    gguf_name: String,
    /// GGUF dims, innermost (contiguous) first.
    dims: Vec<usize>,
    ty: GgmlType,
    n_elements: usize,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// An opened GGUF file (memory-mapped).
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    /// HF name → index into `tensors`, sorted by name.
    by_hf_name: BTreeMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, what: &dyn fmt::Display, n: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            start: self.pos as u64,
            end: (self.pos as u64).saturating_add(n),
            file_len: self.data.len() as u64,
        }
    }

    fn corrupt(&self, what: &dyn fmt::Display, expected: String, found: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            expected,
            found,
        }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &dyn fmt::Display) -> Result<&'a [u8], GgufError> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let s = &self.data[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(self.truncated(what, n)),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string: `u64` length, then that many UTF-8 bytes.
    fn string(&mut self, what: &dyn fmt::Display) -> Result<String, GgufError> {
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
    fn check_count(
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
    fn value(
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
struct What<F: Fn(&mut fmt::Formatter<'_>) -> fmt::Result>(F);

impl<F: Fn(&mut fmt::Formatter<'_>) -> fmt::Result> fmt::Display for What<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (self.0)(f)
    }
}

/// Maps a llama-architecture GGUF tensor name to its HF name; unknown names are kept as they are.
fn llama_hf_name(gguf: &str) -> String {
    let (stem, suffix) = match gguf.rsplit_once('.') {
        Some((stem, s @ ("weight" | "bias"))) => (stem, s),
        _ => return gguf.to_owned(),
    };
    let fixed = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(hf) = fixed {
        return format!("{hf}.{suffix}");
    }
    let Some(rest) = stem.strip_prefix("blk.") else {
        return gguf.to_owned();
    };
    let Some((layer, part)) = rest.split_once('.') else {
        return gguf.to_owned();
    };
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return gguf.to_owned();
    }
    let hf_part = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return gguf.to_owned(),
    };
    format!("model.layers.{layer}.{hf_part}.{suffix}")
}

/// Whether a llama GGUF tensor had its rows permuted by llama.cpp's converter, and with which
/// head-count key: Some(true) for Q (`head_count`), Some(false) for K (`head_count_kv`).
fn llama_qk(gguf: &str) -> Option<bool> {
    let rest = gguf.strip_prefix("blk.")?;
    let (_, part) = rest.split_once('.')?;
    match part {
        "attn_q.weight" | "attn_q.bias" => Some(true),
        "attn_k.weight" | "attn_k.bias" => Some(false),
        _ => None,
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: parses the header, all metadata and all tensor infos, and
    /// checks that every tensor's data lies inside the file. Tensor data is not read until
    /// [`GgufFile::read_f32`].
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < MAGIC.len() as u64 {
            let mut found = Vec::new();
            std::io::Read::read_to_end(&mut &file, &mut found).map_err(io)?;
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                found,
            });
        }
        // SAFETY: the map is read-only and private to this struct; as with every mmap-based
        // reader, the file must not be truncated or rewritten while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_path_buf(), mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<GgufFile, GgufError> {
        let data: &[u8] = &mmap;
        let mut c = Cursor {
            data,
            pos: 0,
            path: &path,
        };
        let magic = c.take(4, &"the magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: magic.to_vec(),
            });
        }
        let version = c.u32(&"the version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                found: version,
            });
        }
        let tensor_count = c.u64(&"the tensor count")?;
        let kv_count = c.u64(&"the metadata count")?;
        // Smallest metadata entry: key length (8) + type (4) + a 1-byte value.
        let kv_count = c.check_count(kv_count, 13, &"the metadata count")?;

        let mut metadata = Vec::with_capacity(kv_count.min(1024));
        let mut meta_index = HashMap::new();
        for i in 0..kv_count {
            let key = c.string(&What(|f| write!(f, "the key of metadata entry {i}")))?;
            let what = What(|f| write!(f, "metadata key '{key}'"));
            let ty = c.u32(&what)?;
            let value = c.value(ty, &what, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.corrupt(&what, "each key once".into(), "a duplicate".into()));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let v = &metadata[i].1;
                match v.as_u64() {
                    Some(a) if a.is_power_of_two() => a,
                    _ => {
                        return Err(GgufError::BadKey {
                            path: path.clone(),
                            key: "general.alignment".into(),
                            expected: "a power of two".into(),
                            found: format!("{v:?}"),
                        })
                    }
                }
            }
        };

        // Smallest tensor info: name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
        let tensor_count = c.check_count(tensor_count, 32, &"the tensor count")?;
        let mut infos = Vec::with_capacity(tensor_count.min(1024));
        for i in 0..tensor_count {
            let name = c.string(&What(|f| write!(f, "the name of tensor info {i}")))?;
            let what = What(|f| write!(f, "tensor info '{name}'"));
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.corrupt(
                    &what,
                    format!("1..={MAX_DIMS} dimensions"),
                    n_dims.to_string(),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64(&what)?;
                let d = usize::try_from(d).map_err(|_| {
                    c.corrupt(
                        &what,
                        "a dimension that fits in memory".into(),
                        d.to_string(),
                    )
                })?;
                dims.push(d);
            }
            let type_id = c.u32(&what)?;
            let offset = c.u64(&what)?;
            let ty =
                gguf_quant::ggml_type(type_id).ok_or_else(|| GgufError::UnknownTensorType {
                    path: path.clone(),
                    tensor: name.clone(),
                    type_id,
                })?;
            infos.push((name, dims, ty, offset));
        }

        let data_offset = (c.pos as u64)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| {
                c.corrupt(
                    &"the data section offset",
                    "a 64-bit offset".into(),
                    "overflow".into(),
                )
            })?;

        let architecture = meta_index
            .get("general.architecture")
            .and_then(|&i| metadata[i].1.as_str());
        let is_llama = architecture == Some("llama");

        let file_len = data.len() as u64;
        let mut tensors = Vec::with_capacity(infos.len());
        let mut by_hf_name = BTreeMap::new();
        let mut gguf_names = HashMap::new();
        for (gguf_name, dims, ty, offset) in infos {
            let shape_err = |expected: String, found: String| GgufError::BadTensorShape {
                path: path.clone(),
                tensor: gguf_name.clone(),
                expected,
                found,
            };
            let n_elements = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    shape_err(
                        "an element count that fits in memory".into(),
                        format!("dims {dims:?}"),
                    )
                })?;
            if !dims[0].is_multiple_of(ty.block) {
                return Err(shape_err(
                    format!(
                        "a row length (dims[0]) that is a multiple of the {} block size {}",
                        ty.name, ty.block
                    ),
                    format!("dims {dims:?}"),
                ));
            }
            if !offset.is_multiple_of(alignment) {
                return Err(c.corrupt(
                    &What(|f| write!(f, "offset of tensor '{gguf_name}'")),
                    format!("a multiple of the alignment {alignment}"),
                    offset.to_string(),
                ));
            }
            let n_bytes = ((n_elements / ty.block) as u64).checked_mul(ty.bytes as u64);
            let start = data_offset.checked_add(offset);
            let end = start.zip(n_bytes).and_then(|(s, n)| s.checked_add(n));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= file_len => (s as usize, e as usize),
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        path: path.clone(),
                        tensor: gguf_name.clone(),
                        start: data_offset.saturating_add(offset),
                        end: data_offset
                            .saturating_add(offset)
                            .saturating_add(n_bytes.unwrap_or(u64::MAX)),
                        file_len,
                    })
                }
            };
            if gguf_names.insert(gguf_name.clone(), ()).is_some() {
                return Err(c.corrupt(
                    &What(|f| write!(f, "tensor info '{gguf_name}'")),
                    "each tensor name once".into(),
                    "a duplicate".into(),
                ));
            }
            let hf_name = if is_llama {
                llama_hf_name(&gguf_name)
            } else {
                gguf_name.clone()
            };
            if let Some(&other) = by_hf_name.get(&hf_name) {
                let other: &TensorInfo = &tensors[other];
                return Err(c.corrupt(
                    &What(|f| write!(f, "tensor info '{gguf_name}'")),
                    format!("a HF name ('{hf_name}') not already taken"),
                    format!("it is also the name of tensor '{}'", other.gguf_name),
                ));
            }
            by_hf_name.insert(hf_name, tensors.len());
            tensors.push(TensorInfo {
                gguf_name,
                dims,
                ty,
                n_elements,
                start,
                end,
            });
        }

        Ok(GgufFile {
            path,
            mmap,
            version,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            by_hf_name,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the data section and tensor offsets (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The byte offset of the data section in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Metadata value by key (e.g. "llama.block_count").
    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All metadata keys, in file order.
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.iter().map(|(k, _)| k.as_str())
    }

    /// A required metadata key.
    pub(crate) fn require(
        &self,
        key: &str,
        expected: &'static str,
    ) -> Result<&GgufValue, GgufError> {
        self.metadata(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.into(),
            expected,
        })
    }

    /// The error for a key holding the wrong kind of value.
    pub(crate) fn bad_key(
        &self,
        key: &str,
        expected: impl Into<String>,
        found: &GgufValue,
    ) -> GgufError {
        let mut found = format!("{} {found:?}", found.type_name());
        if found.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| found.is_char_boundary(i))
                .unwrap_or(0);
            found.truncate(cut);
            found.push('…');
        }
        GgufError::BadKey {
            path: self.path.clone(),
            key: key.into(),
            expected: expected.into(),
            found,
        }
    }

    /// A metadata key as a non-negative integer, if present.
    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.metadata(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.bad_key(key, "a non-negative integer", v))
            })
            .transpose()
    }

    /// A required metadata key as a non-negative integer.
    fn req_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key, "a non-negative integer")?;
        v.as_u64()
            .ok_or_else(|| self.bad_key(key, "a non-negative integer", v))
    }

    /// A metadata key as a number, if present.
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.metadata(key)
            .map(|v| v.as_f64().ok_or_else(|| self.bad_key(key, "a number", v)))
            .transpose()
    }

    /// The architecture string ("general.architecture").
    pub fn architecture(&self) -> Result<&str, GgufError> {
        let v = self.require("general.architecture", "the architecture name, a string")?;
        v.as_str()
            .ok_or_else(|| self.bad_key("general.architecture", "a string", v))
    }

    /// HuggingFace-style config.json synthesized from `{arch}.*` metadata, for arch "llama"
    /// (error for others). Keys: `model_type` "llama", `architectures`, `hidden_size`,
    /// `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`
    /// (default = heads), `head_dim` (`llama.attention.key_length`, else hidden / heads),
    /// `rms_norm_eps`, `rope_theta` (`llama.rope.freq_base`, default 10000.0; also given as
    /// `rope_parameters.rope_theta` like transformers ≥ 5), `rope_scaling` (only when
    /// `llama.rope.scaling.type` is present and not "none"), `max_position_embeddings`,
    /// `vocab_size` (`llama.vocab_size`, else the token list length, else the embedding rows),
    /// `tie_word_embeddings` (true iff there is no `output.weight` tensor), `hidden_act` "silu",
    /// `attention_bias` / `mlp_bias` (whether such bias tensors exist), and `bos_token_id`,
    /// `eos_token_id`, `pad_token_id`, `unk_token_id` from `tokenizer.ggml.*` when present.
    pub fn hf_config(&self) -> Result<Value, GgufError> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(GgufError::Unsupported {
                path: self.path.clone(),
                what: "architecture for hf_config",
                expected: "\"llama\"",
                found: arch.into(),
            });
        }
        let hidden = self.req_u64("llama.embedding_length")?;
        let intermediate = self.req_u64("llama.feed_forward_length")?;
        let layers = self.req_u64("llama.block_count")?;
        let heads = self.req_u64("llama.attention.head_count")?;
        if heads == 0 {
            let v = self.require("llama.attention.head_count", "")?;
            return Err(self.bad_key("llama.attention.head_count", "a positive integer", v));
        }
        let kv_heads = self
            .opt_u64("llama.attention.head_count_kv")?
            .unwrap_or(heads);
        let head_dim = match self.opt_u64("llama.attention.key_length")? {
            Some(d) => d,
            None if hidden.is_multiple_of(heads) => hidden / heads,
            None => {
                let v = self.require("llama.embedding_length", "")?;
                return Err(self.bad_key(
                    "llama.embedding_length",
                    format!("a multiple of llama.attention.head_count ({heads}) when llama.attention.key_length is absent"),
                    v,
                ));
            }
        };
        let eps_key = "llama.attention.layer_norm_rms_epsilon";
        let eps = self.require(eps_key, "the RMSNorm epsilon, a float")?;
        let eps = eps
            .as_f64()
            .ok_or_else(|| self.bad_key(eps_key, "a number", eps))?;
        let rope_theta = self.opt_f64("llama.rope.freq_base")?.unwrap_or(10000.0);
        let context = self.req_u64("llama.context_length")?;
        let vocab = match self.opt_u64("llama.vocab_size")? {
            Some(v) => v,
            None => match self.metadata("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
                Some(tokens) => tokens.len() as u64,
                None => match self.tensor_info("model.embed_tokens.weight") {
                    Some(t) if t.dims.len() == 2 => t.dims[1] as u64,
                    _ => {
                        return Err(GgufError::MissingKey {
                            path: self.path.clone(),
                            key: "llama.vocab_size".into(),
                            expected: "the vocabulary size (or a tokenizer.ggml.tokens list or a 2-D token_embd.weight)",
                        })
                    }
                },
            },
        };
        let has = |pred: &dyn Fn(&str) -> bool| self.tensors.iter().any(|t| pred(&t.gguf_name));
        let mut obj = serde_json::Map::new();
        let fields = [
            ("architectures", json!(["LlamaForCausalLM"])),
            ("model_type", json!("llama")),
            ("hidden_act", json!("silu")),
            ("hidden_size", json!(hidden)),
            ("intermediate_size", json!(intermediate)),
            ("num_hidden_layers", json!(layers)),
            ("num_attention_heads", json!(heads)),
            ("num_key_value_heads", json!(kv_heads)),
            ("head_dim", json!(head_dim)),
            ("rms_norm_eps", json!(eps)),
            ("rope_theta", json!(rope_theta)),
            (
                "rope_parameters",
                json!({ "rope_theta": rope_theta, "rope_type": "default" }),
            ),
            ("max_position_embeddings", json!(context)),
            ("vocab_size", json!(vocab)),
            (
                "tie_word_embeddings",
                json!(!has(&|n| n == "output.weight")),
            ),
            (
                "attention_bias",
                json!(has(
                    &|n| n.starts_with("blk.") && n.ends_with(".attn_q.bias")
                )),
            ),
            (
                "mlp_bias",
                json!(has(
                    &|n| n.starts_with("blk.") && n.ends_with(".ffn_up.bias")
                )),
            ),
        ];
        for (k, v) in fields {
            obj.insert(k.into(), v);
        }
        if let Some(v) = self.metadata("llama.rope.scaling.type") {
            let kind = v
                .as_str()
                .ok_or_else(|| self.bad_key("llama.rope.scaling.type", "a string", v))?;
            if kind != "none" {
                let factor = self.opt_f64("llama.rope.scaling.factor")?.unwrap_or(1.0);
                obj.insert(
                    "rope_scaling".into(),
                    json!({ "rope_type": kind, "type": kind, "factor": factor }),
                );
            }
        }
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
            ("tokenizer.ggml.unknown_token_id", "unk_token_id"),
        ] {
            if let Some(id) = self.opt_u64(gguf_key)? {
                obj.insert(hf_key.into(), json!(id));
            }
        }
        Ok(Value::Object(obj))
    }

    fn tensor_info(&self, hf_name: &str) -> Option<&TensorInfo> {
        self.by_hf_name.get(hf_name).map(|&i| &self.tensors[i])
    }

    /// Tensor names in HF naming (GGUF names kept for tensors without a HF equivalent), sorted,
    /// with their HF-layout shapes (row-major, outermost first: the GGUF dims reversed).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.by_hf_name
            .iter()
            .map(|(name, &i)| {
                let mut shape = self.tensors[i].dims.clone();
                shape.reverse();
                (name.clone(), shape)
            })
            .collect()
    }

    /// The GGUF name and ggml type name (e.g. `"Q4_1"`) of the tensor with this HF name.
    pub fn tensor_storage(&self, hf_name: &str) -> Option<(&str, &'static str)> {
        self.tensor_info(hf_name)
            .map(|t| (t.gguf_name.as_str(), t.ty.name))
    }

    /// Reads one tensor by its HF name, dequantized to f32, in HF layout (row-major in the shape
    /// [`GgufFile::tensors`] reports; for llama, the Q/K row permutation of llama.cpp undone).
    pub fn read_f32(&self, hf_name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self
            .tensor_info(hf_name)
            .ok_or_else(|| GgufError::TensorNotFound {
                path: self.path.clone(),
                name: hf_name.into(),
            })?;
        // Bounds were validated at open; `get` keeps this panic-free regardless.
        let bytes = self
            .mmap
            .get(t.start..t.end)
            .ok_or_else(|| GgufError::TensorOutOfBounds {
                path: self.path.clone(),
                tensor: t.gguf_name.clone(),
                start: t.start as u64,
                end: t.end as u64,
                file_len: self.mmap.len() as u64,
            })?;
        let values = gguf_quant::dequantize(t.ty, bytes, t.n_elements).ok_or_else(|| {
            GgufError::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: hf_name.into(),
                type_name: t.ty.name,
                supported: gguf_quant::SUPPORTED_TYPES,
            }
        })?;
        let is_llama = self.architecture().ok() == Some("llama");
        let Some(is_q) = llama_qk(&t.gguf_name).filter(|_| is_llama) else {
            return Ok(values);
        };
        let heads_key = "llama.attention.head_count";
        let heads = self.req_u64(heads_key)?;
        let (n_head, key) = if is_q {
            (heads, heads_key)
        } else {
            let kv_key = "llama.attention.head_count_kv";
            (self.opt_u64(kv_key)?.unwrap_or(heads), kv_key)
        };
        // HF rows = outermost GGUF dim; everything inside it is one row.
        let rows = *t.dims.last().unwrap_or(&1);
        let cols = t.n_elements.checked_div(rows).unwrap_or(0);
        let n_head = usize::try_from(n_head).unwrap_or(usize::MAX);
        gguf_quant::unpermute_qk(&values, rows, cols, n_head).map_err(|msg| {
            GgufError::BadTensorShape {
                path: self.path.clone(),
                tensor: hf_name.into(),
                expected: format!("rows that split into {key} = {n_head} heads of an even size"),
                found: msg,
            }
        })
    }

    /// A HuggingFace `tokenizer.json` (as a JSON string) rebuilt from `tokenizer.ggml.*`
    /// (model "gpt2": byte-level BPE), laid out like the one transformers writes for this file.
    pub fn tokenizer_json(&self) -> Result<String, GgufError> {
        super::gguf_tokenizer::tokenizer_json(self)
    }

    /// tokenizer.chat_template, if present (and a string).
    pub fn chat_template(&self) -> Option<&str> {
        self.metadata("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
    }
}

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
