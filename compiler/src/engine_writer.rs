//! Writes an engine file (format described in `kiln_runtime::engine`).

use kiln_runtime::engine::{checksum, keys, GenerationConfig, FORMAT_VERSION};
use kiln_runtime::ir::Graph;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// Everything an engine holds.
pub struct EngineContents<'a> {
    /// Model family name.
    pub family: &'a str,
    /// HF-style config.
    pub config: &'a serde_json::Value,
    /// The graph to execute; its weight names are the tensor names.
    pub graph: &'a Graph,
    /// Tokenizer JSON.
    pub tokenizer_json: Option<&'a str>,
    /// Generation settings.
    pub generation: &'a GenerationConfig,
    /// Tensors: weights (f32 for CPU engines, bf16 for GPU engines) and kernel binaries.
    pub tensors: Vec<EngineTensor>,
    /// `cpu` or `cuda`.
    pub target: &'a str,
    /// Further metadata (GPU engines: arch, CUDA version, launch plan, kernel table).
    pub extra_metadata: Vec<(String, String)>,
}

/// One tensor of an engine file.
pub struct EngineTensor {
    /// Name (checkpoint name for weights, `kernels.<module>` for CUBINs).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub bytes: Vec<u8>,
}

impl EngineTensor {
    /// A weight from f32 values, stored as `dtype` (F32 or BF16).
    pub fn weight(name: &str, shape: Vec<usize>, data: &[f32], dtype: Dtype) -> EngineTensor {
        let bytes = match dtype {
            Dtype::BF16 => data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let dtype = if dtype == Dtype::BF16 {
            Dtype::BF16
        } else {
            Dtype::F32
        };
        EngineTensor {
            name: name.to_string(),
            dtype,
            shape,
            bytes,
        }
    }
}

/// Writes the engine to `path` with `crate::output::write_output`: refused if `path` is one of
/// `inputs` or inside an input folder; written to a unique temporary file, flushed and renamed,
/// so a failed or interrupted build never leaves a half-written engine or replaces a file.
pub fn write_engine(path: &Path, inputs: &[&Path], c: &EngineContents) -> Result<(), String> {
    let mut meta = HashMap::new();
    meta.insert(keys::FORMAT.to_string(), FORMAT_VERSION.to_string());
    meta.insert(keys::TARGET.to_string(), c.target.to_string());
    meta.extend(c.extra_metadata.iter().cloned());
    meta.insert(keys::FAMILY.to_string(), c.family.to_string());
    meta.insert(keys::CONFIG.to_string(), c.config.to_string());
    meta.insert(keys::GRAPH.to_string(), c.graph.to_ron());
    if let Some(t) = c.tokenizer_json {
        meta.insert(keys::TOKENIZER.to_string(), t.to_string());
    }
    meta.insert(
        keys::GENERATION.to_string(),
        serde_json::to_string(c.generation).map_err(|e| e.to_string())?,
    );
    let sum = checksum(
        &meta,
        c.tensors
            .iter()
            .map(|t| (t.name.as_str(), t.bytes.as_slice())),
    );
    meta.insert(keys::CHECKSUM.to_string(), sum);
    let views = c
        .tensors
        .iter()
        .map(|t| TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map(|v| (t.name.as_str(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    crate::output::write_output(path, inputs, |tmp| {
        safetensors::tensor::serialize_to_file(views, Some(meta), tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        sort_header(tmp)
    })
}

/// Rewrites the safetensors header of `path` with its keys sorted, in place (same length):
/// `serialize_to_file` writes the metadata map in hash order, and the same build must give the
/// same bytes.
fn sort_header(path: &Path) -> Result<(), String> {
    use std::collections::BTreeMap;
    use std::io::{Read, Seek, SeekFrom, Write};
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let json = |e: serde_json::Error| format!("{}: engine header: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = usize::try_from(u64::from_le_bytes(len)).map_err(|e| e.to_string())?;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(io)?;
    let mut top: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(json)?;
    if let Some(m) = top.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> = serde_json::from_value(m.take()).map_err(json)?;
        *m = serde_json::to_value(sorted).map_err(json)?;
    }
    let mut out = serde_json::to_vec(&top).map_err(json)?;
    if out.len() > n {
        return Err(format!("{}: the sorted engine header grew", path.display()));
    }
    out.resize(n, b' ');
    f.seek(SeekFrom::Start(8)).map_err(io)?;
    f.write_all(&out).map_err(io)
}
