//! The engine file (`.kiln`): a safetensors container. Its tensors are the weights (f32 in
//! format v1); its metadata holds the format version, the target, the model config, the graph
//! (RON), the tokenizer and chat template, and a checksum over every metadata entry and every
//! tensor's name and bytes, so an edited graph or config is refused like a damaged weight.
//! Any safetensors tool can read it.

use crate::ir::Graph;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The engine format this runtime reads and the compiler writes.
/// v2: the checksum covers the metadata too; the context window is always recorded.
/// v3: `Rope` reads its frequency table as an input (stored as an f32 weight, also in GPU
/// engines); `LinearBias`; the plan's `Linear` may carry a bias epilogue.
/// v4: parallel ranks: `AllReduce`, `AllGather` and `GatherShard` ops, `Activation` inputs
/// (pipeline stages), and `kiln.parallel`.
pub const FORMAT_VERSION: u32 = 4;

/// The context window recorded for a checkpoint whose config gives none (no
/// `max_position_embeddings`, no GGUF `context_length`): every engine bounds its prompts.
pub const DEFAULT_CONTEXT: usize = 4096;

/// The largest context window an engine may declare (2^24 positions).
pub const MAX_CONTEXT: usize = 1 << 24;

/// Metadata keys of an engine file.
pub mod keys {
    /// Format version (decimal).
    pub const FORMAT: &str = "kiln.format_version";
    /// Execution target (`cpu` in v1).
    pub const TARGET: &str = "kiln.target";
    /// Model family (`llama`).
    pub const FAMILY: &str = "kiln.family";
    /// HF-style config JSON.
    pub const CONFIG: &str = "kiln.config";
    /// The graph, RON.
    pub const GRAPH: &str = "kiln.graph";
    /// HF tokenizer.json text.
    pub const TOKENIZER: &str = "kiln.tokenizer";
    /// JSON: `{chat_template, bos_token, eos_token, stop_token_ids}`.
    pub const GENERATION: &str = "kiln.generation";
    /// GPU engines: the launch plan (RON, `crate::plan::Plan`).
    pub const PLAN: &str = "kiln.plan";
    /// GPU engines: the architecture the kernels were compiled for (`sm_90`).
    pub const ARCH: &str = "kiln.arch";
    /// GPU engines: the NVRTC version that compiled the kernels.
    pub const CUDA_VERSION: &str = "kiln.cuda_version";
    /// GPU engines: JSON list of kernels `{module, name, lowered}`; module `m` is the U8 tensor
    /// `kernels.m` (a CUBIN).
    pub const KERNELS: &str = "kiln.kernels";
    /// GPU engines built where their GPU is: JSON `GemmAlgos`, the cuBLASLt algorithm chosen
    /// for each prefill GEMM shape (`crate::cuda::gemm_algos`); absent elsewhere.
    pub const GEMM_ALGOS: &str = "kiln.gemm_algos";
    /// Rank engines of a parallel build (`kiln build --tp N --pp M`): `rank=R tp=N pp=M
    /// group=G` (`crate::parallel::RankInfo`); absent in a whole engine.
    pub const PARALLEL: &str = "kiln.parallel";
    /// xxh3-64 (hex) over the other metadata entries (sorted by key: key, value) and the
    /// tensors (sorted by name: name, bytes), each item length-prefixed (`checksum`).
    pub const CHECKSUM: &str = "kiln.checksum";
}

/// Generation settings stored in the engine.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GenerationConfig {
    /// Jinja chat template.
    pub chat_template: Option<String>,
    /// BOS token text, for templates.
    pub bos_token: Option<String>,
    /// EOS token text, for templates.
    pub eos_token: Option<String>,
    /// Token ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// Context window (max positions): the config's, or `DEFAULT_CONTEXT` where it gives none.
    pub max_context: usize,
}

/// An engine file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// I/O error.
    #[error("{file}")]
    Io {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not an engine, truncated or corrupt.
    #[error("{file}: not a valid kiln engine ({message})")]
    Corrupt {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Built by another version of kiln or for another target.
    #[error("{file}: {message}; rebuild it with `kiln build`")]
    Incompatible {
        /// The file.
        file: String,
        /// What differs.
        message: String,
    },
}

/// Checksum of an engine's contents: its metadata entries (all but `keys::CHECKSUM`, in key
/// order) and its named tensor bytes (in name order), every item length-prefixed.
pub fn checksum<'a>(
    metadata: &HashMap<String, String>,
    tensors: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut item = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    let mut meta: Vec<(&String, &String)> = metadata
        .iter()
        .filter(|(k, _)| k.as_str() != keys::CHECKSUM)
        .collect();
    meta.sort();
    for (key, value) in meta {
        item(key.as_bytes());
        item(value.as_bytes());
    }
    let mut items: Vec<(&str, &[u8])> = tensors.into_iter().collect();
    items.sort_by(|a, b| a.0.cmp(b.0));
    for (name, data) in items {
        item(name.as_bytes());
        item(data);
    }
    format!("{:016x}", h.digest())
}

/// Checks generation settings against the graph: a context window in `1..=MAX_CONTEXT`, and
/// stop ids inside the vocabulary (the last axis of `logits`, where it is a constant).
pub fn check_generation(g: &GenerationConfig, graph: &Graph) -> Result<(), String> {
    if !(1..=MAX_CONTEXT).contains(&g.max_context) {
        return Err(format!(
            "context window {} is outside 1..={MAX_CONTEXT}",
            g.max_context
        ));
    }
    if let (Some(vocab), Some(&bad)) = (graph.vocab(), g.stop_token_ids.iter().max()) {
        if i64::from(bad) >= vocab {
            return Err(format!(
                "stop token id {bad} is outside the vocabulary of {vocab} tokens"
            ));
        }
    }
    Ok(())
}

/// Little-endian F32, F16 or BF16 bytes widened to f32; `None` for another dtype.
pub fn widen_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Where a tensor lies in the engine file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range in the file.
    pub range: std::ops::Range<usize>,
}

/// An opened, verified engine file (memory-mapped).
pub struct Engine {
    path: PathBuf,
    mmap: Mmap,
    meta: HashMap<String, String>,
    index: HashMap<String, TensorEntry>,
    /// The graph to execute.
    pub graph: Graph,
    /// HF-style model config.
    pub config: serde_json::Value,
    /// Tokenizer JSON, if the engine has one.
    pub tokenizer_json: Option<String>,
    /// Generation settings.
    pub generation: GenerationConfig,
}

impl Engine {
    /// Opens an engine: checks format, target and checksum, parses the graph.
    pub fn open(path: &Path) -> Result<Engine, EngineError> {
        let file_name = path.display().to_string();
        let corrupt = |message: String| EngineError::Corrupt {
            file: file_name.clone(),
            message,
        };
        let io = |source| EngineError::Io {
            file: file_name.clone(),
            source,
        };
        let kind = std::fs::metadata(path).map_err(io)?.file_type();
        if !kind.is_file() {
            let what = if kind.is_dir() {
                "a folder"
            } else {
                "not a regular file"
            };
            return Err(corrupt(format!("{what}, not an engine file")));
        }
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only mapping; an engine modified while running is not supported.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io {
            file: file_name.clone(),
            source,
        })?;
        let (_, header) = SafeTensors::read_metadata(&mmap).map_err(|e| corrupt(e.to_string()))?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| corrupt("no kiln metadata".into()))?;
        let get = |key: &str| {
            meta.get(key)
                .ok_or_else(|| corrupt(format!("metadata `{key}` missing")))
        };
        let version: u32 = get(keys::FORMAT)?
            .parse()
            .map_err(|_| corrupt("bad format version".into()))?;
        if version != FORMAT_VERSION {
            return Err(EngineError::Incompatible {
                file: file_name,
                message: format!("engine format v{version}, this kiln reads v{FORMAT_VERSION}"),
            });
        }
        let target = get(keys::TARGET)?;
        if target != "cpu" && target != "cuda" {
            return Err(EngineError::Incompatible {
                file: file_name,
                message: format!("unknown engine target `{target}`"),
            });
        }
        let st = SafeTensors::deserialize(&mmap).map_err(|e| corrupt(e.to_string()))?;
        let tensors = st.tensors();
        let sum = checksum(&meta, tensors.iter().map(|(n, v)| (n.as_str(), v.data())));
        if &sum != get(keys::CHECKSUM)? {
            return Err(corrupt(format!(
                "checksum mismatch (stored {}, computed {sum}): the file is damaged or was edited",
                get(keys::CHECKSUM)?
            )));
        }
        let graph = Graph::from_ron(get(keys::GRAPH)?).map_err(|e| corrupt(e.to_string()))?;
        // A pipeline stage before the last hands its outputs to the next stage: no logits.
        let rank = match meta.get(keys::PARALLEL) {
            Some(v) => Some(crate::parallel::RankInfo::parse(v).map_err(corrupt)?),
            None => None,
        };
        if rank.as_ref().is_none_or(|r| r.is_last_stage()) {
            graph
                .check_logits()
                .map_err(|e| corrupt(format!("graph: {e}")))?;
        } else if graph.outputs.is_empty() {
            return Err(corrupt("a pipeline stage with no outputs".into()));
        }
        let config = serde_json::from_str(get(keys::CONFIG)?)
            .map_err(|e| corrupt(format!("config: {e}")))?;
        let generation = match meta.get(keys::GENERATION) {
            Some(g) => {
                serde_json::from_str(g).map_err(|e| corrupt(format!("generation config: {e}")))?
            }
            None => return Err(corrupt(format!("metadata `{}` missing", keys::GENERATION))),
        };
        check_generation(&generation, &graph)
            .map_err(|m| corrupt(format!("generation config: {m}")))?;
        let tokenizer_json = meta.get(keys::TOKENIZER).cloned();
        let base = mmap.as_ptr() as usize;
        let index = tensors
            .iter()
            .map(|(name, v)| {
                let start = v.data().as_ptr() as usize - base;
                let entry = TensorEntry {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    range: start..start + v.data().len(),
                };
                (name.clone(), entry)
            })
            .collect();
        drop(tensors);
        drop(st);
        Ok(Engine {
            path: path.to_path_buf(),
            mmap,
            meta,
            index,
            graph,
            config,
            tokenizer_json,
            generation,
        })
    }

    /// The file this engine was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(String::as_str)
    }

    /// The execution target the engine was built for (`cpu` or `cuda`).
    pub fn target(&self) -> &str {
        self.metadata(keys::TARGET).unwrap_or("cpu")
    }

    /// A tensor's entry and bytes.
    pub fn tensor(&self, name: &str) -> Result<(&TensorEntry, &[u8]), EngineError> {
        let e = self.index.get(name).ok_or_else(|| EngineError::Corrupt {
            file: self.path.display().to_string(),
            message: format!("tensor `{name}` missing"),
        })?;
        Ok((e, &self.mmap[e.range.clone()]))
    }

    /// Names of all tensors.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Reads a weight as f32 (stored as F32 or BF16), checking its shape.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError> {
        let (e, bytes) = self.tensor(name)?;
        let bad = || EngineError::Corrupt {
            file: self.path.display().to_string(),
            message: format!(
                "weight `{name}` is {:?}{:?}, expected {shape:?}",
                e.dtype, e.shape
            ),
        };
        if e.shape != shape {
            return Err(bad());
        }
        // Engines store f32 (CPU) or bf16 (GPU) weights.
        match e.dtype {
            Dtype::F32 | Dtype::BF16 => widen_to_f32(e.dtype, bytes).ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

impl Engine {
    /// Reads a weight of the graph as the f32 values its dtype holds: a weight format
    /// (`quant.rs`) is read from its stored parts (codes, scales, zero points) and dequantized.
    pub fn read_weight(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError> {
        let dtype = self
            .graph
            .weights()
            .find(|&(_, n)| n == name)
            .map(|(id, _)| self.graph.nodes[id].ty.dtype);
        let Some(format) = dtype.filter(|d| d.is_weight_format()) else {
            return self.read_f32(name, shape);
        };
        let corrupt = |message: String| EngineError::Corrupt {
            file: self.path.display().to_string(),
            message: format!("{} weight `{name}`: {message}", format.name()),
        };
        let &[rows, cols] = shape else {
            return Err(corrupt(format!("shape {shape:?} is not [rows, columns]")));
        };
        let parts = crate::quant::parts(format, rows, cols).expect("a weight format");
        let mut stored = Vec::with_capacity(parts.len());
        for p in &parts {
            let part = format!("{name}{}", p.suffix);
            let (e, bytes) = self.tensor(&part)?;
            if e.dtype != p.dtype || e.shape != p.shape {
                return Err(corrupt(format!(
                    "`{part}` is {:?}{:?}, expected {:?}{:?}",
                    e.dtype, e.shape, p.dtype, p.shape
                )));
            }
            stored.push(bytes);
        }
        crate::quant::Packed::from_bytes(format, rows, cols, &stored)
            .map(|p| p.dequantize())
            .map_err(corrupt)
    }

    /// A CPU executor over this engine's graph and weights.
    pub fn cpu_executor(&self) -> Result<crate::cpu::CpuExecutor, crate::cpu::ExecError> {
        crate::cpu::CpuExecutor::new(self.graph.clone(), |name, shape| {
            self.read_weight(name, shape)
                .map_err(|e| crate::cpu::ExecError::Weight {
                    name: name.to_string(),
                    message: e.to_string(),
                })
        })
    }
}
