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
use serde_json::Value;

use super::gguf_llama::{llama_hf_name, llama_qk};
use super::gguf_parse::{Cursor, What};
use super::gguf_quant::{self, GgmlType};
pub use super::gguf_value::{GgufError, GgufValue};

/// The four bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

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
    /// The block format the layer matrices are kept in ([`GgufFile::kept_format`]).
    kept: Option<(kiln_runtime::ir::DType, &'static str)>,
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
                found: found.escape_ascii().to_string(),
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
                found: magic.escape_ascii().to_string(),
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
                            found: v.describe(),
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
        // Architectures whose tensors follow llama's GGUF names (`blk.N.attn_q` …).
        let llama_names = matches!(
            architecture,
            Some("llama" | "qwen2" | "phi3" | "gemma" | "gemma2")
        );

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
            let hf_name = if llama_names {
                llama_hf_name(&gguf_name, architecture.unwrap_or_default())
            } else if architecture == Some("gpt2") {
                super::gguf_gpt2::hf_name(&gguf_name)
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

        // GPT-2's converter writes the tied output as a copy of the embedding: not a tensor of
        // its own (the model file reads the embedding).
        if architecture == Some("gpt2") {
            let same = |a: &TensorInfo, b: &TensorInfo| {
                a.dims == b.dims
                    && a.ty == b.ty
                    && data.get(a.start..a.end) == data.get(b.start..b.end)
            };
            if let (Some(&o), Some(&e)) = (
                by_hf_name.get("lm_head.weight"),
                by_hf_name.get("transformer.wte.weight"),
            ) {
                if same(&tensors[o], &tensors[e]) {
                    by_hf_name.remove("lm_head.weight");
                }
            }
        }

        let kept = blocks::kept_format(architecture, &tensors);
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
            kept,
        })
    }

    /// Whether this tensor is stored transposed from the layout the HF checkpoint (and the
    /// model file) has: GPT-2's Conv1D matrices.
    fn transposed(&self, t: &TensorInfo) -> bool {
        t.dims.len() == 2
            && self.architecture().ok() == Some("gpt2")
            && super::gguf_gpt2::is_transposed(&t.gguf_name)
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
        GgufError::BadKey {
            path: self.path.clone(),
            key: key.into(),
            expected: expected.into(),
            found: found.describe(),
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
    pub(crate) fn req_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key, "a non-negative integer")?;
        v.as_u64()
            .ok_or_else(|| self.bad_key(key, "a non-negative integer", v))
    }

    /// A metadata key as a number, if present.
    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
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

    /// HuggingFace-style config.json synthesized from `{arch}.*` metadata, for the archs
    /// "llama", "qwen2", "phi3", "gemma" and "gemma2" (and "gpt2": `gguf_gpt2.rs`; error for
    /// others). Keys: `model_type` (the arch),
    /// `architectures`, `hidden_size`,
    /// `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`
    /// (default = heads), `head_dim` (`llama.attention.key_length`, else hidden / heads),
    /// `rms_norm_eps`, `rope_theta` (`llama.rope.freq_base`, default 10000.0; also given as
    /// `rope_parameters.rope_theta` like transformers ≥ 5), `rope_scaling` (only when
    /// `llama.rope.scaling.type` is present and not "none"), `max_position_embeddings`,
    /// `vocab_size` (`llama.vocab_size`, else the token list length, else the embedding rows),
    /// `tie_word_embeddings` (true iff there is no `output.weight` tensor), `hidden_act` ("silu"; Gemma's "gelu_pytorch_tanh"),
    /// Gemma-2's soft-caps and `query_pre_attn_scalar` (which GGUF does not store: llama.cpp's
    /// rule, the head size, or hidden / heads for the 46-layer 27B),
    /// `attention_bias` / `mlp_bias` (whether such bias tensors exist), and `bos_token_id`,
    /// `eos_token_id`, `pad_token_id`, `unk_token_id` from `tokenizer.ggml.*` when present.
    pub fn hf_config(&self) -> Result<Value, GgufError> {
        super::gguf_llama::hf_config(self)
    }

    /// Whether the GGUF name of some tensor satisfies `pred`.
    pub(crate) fn any_gguf_tensor(&self, pred: &dyn Fn(&str) -> bool) -> bool {
        self.tensors.iter().any(|t| pred(&t.gguf_name))
    }

    /// The GGUF dims (innermost first) of the tensor with this HF name.
    pub(crate) fn gguf_dims(&self, hf_name: &str) -> Option<&[usize]> {
        self.tensor_info(hf_name).map(|t| t.dims.as_slice())
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
                let t = &self.tensors[i];
                let mut shape = t.dims.clone();
                if !self.transposed(t) {
                    shape.reverse();
                }
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
        if self.transposed(t) {
            // GGUF [out, in] (dims [in, out]) back to Conv1D's [in, out].
            let (cols, rows) = (t.dims[0], t.dims[1]);
            let mut out = vec![0f32; values.len()];
            for r in 0..rows {
                for c in 0..cols {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
            return Ok(out);
        }
        if matches!(self.architecture(), Ok("gemma" | "gemma2"))
            && t.gguf_name.ends_with("norm.weight")
        {
            // Stored as 1 + w by llama.cpp's converter; gemma(2).ron adds the one itself.
            return Ok(values.into_iter().map(|v| v - 1.0).collect());
        }
        let Some((n_head, key)) = self.qk_heads(t)? else {
            return Ok(values);
        };
        // HF rows = outermost GGUF dim; everything inside it is one row.
        let rows = *t.dims.last().unwrap_or(&1);
        let cols = t.n_elements.checked_div(rows).unwrap_or(0);
        gguf_quant::unpermute_qk(&values, rows, cols, n_head).map_err(|msg| {
            GgufError::BadTensorShape {
                path: self.path.clone(),
                tensor: hf_name.into(),
                expected: format!("rows that split into {key} = {n_head} heads of an even size"),
                found: msg,
            }
        })
    }

    /// For each HF row of a `rows`-row tensor, the GGUF row it is read from (llama's Q/K
    /// permutation undone, else the identity).
    fn hf_row_sources(
        &self,
        t: &TensorInfo,
        hf_name: &str,
        rows: usize,
    ) -> Result<Vec<usize>, GgufError> {
        let Some((n_head, key)) = self.qk_heads(t)? else {
            return Ok((0..rows).collect());
        };
        let index: Vec<f32> = (0..rows).map(|r| r as f32).collect();
        gguf_quant::unpermute_qk(&index, rows, 1, n_head)
            .map(|v| v.into_iter().map(|r| r as usize).collect())
            .map_err(|msg| GgufError::BadTensorShape {
                path: self.path.clone(),
                tensor: hf_name.into(),
                expected: format!("rows that split into {key} = {n_head} heads of an even size"),
                found: msg,
            })
    }

    /// For a llama Q or K projection, the head count its rows were permuted with and the
    /// metadata key that gives it; `None` for every other tensor.
    fn qk_heads(&self, t: &TensorInfo) -> Result<Option<(usize, &'static str)>, GgufError> {
        let is_llama = self.architecture().ok() == Some("llama");
        let Some(is_q) = llama_qk(&t.gguf_name).filter(|_| is_llama) else {
            return Ok(None);
        };
        let heads_key = "llama.attention.head_count";
        let heads = self.req_u64(heads_key)?;
        let (n_head, key) = if is_q {
            (heads, heads_key)
        } else {
            let kv_key = "llama.attention.head_count_kv";
            (self.opt_u64(kv_key)?.unwrap_or(heads), kv_key)
        };
        Ok(Some((usize::try_from(n_head).unwrap_or(usize::MAX), key)))
    }

    /// A HuggingFace `tokenizer.json` (as a JSON string) rebuilt from `tokenizer.ggml.*`
    /// (model "gpt2": byte-level BPE; "llama"/"gemma4": SentencePiece), laid out like the one
    /// transformers writes for this file.
    pub fn tokenizer_json(&self) -> Result<String, GgufError> {
        super::gguf_tokenizer::tokenizer_json(self)
    }

    /// tokenizer.chat_template, if present (and a string).
    pub fn chat_template(&self) -> Option<&str> {
        self.metadata("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
    }
}

#[path = "gguf_blocks.rs"]
mod blocks;

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
