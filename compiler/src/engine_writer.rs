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
    /// Weights: (name, shape, little-endian f32 bytes).
    pub weights: Vec<(String, Vec<usize>, Vec<u8>)>,
}

/// Writes the engine to `path` (through a temporary file, renamed at the end, so a failed build
/// never leaves a half-written engine behind).
pub fn write_engine(path: &Path, c: &EngineContents) -> Result<(), String> {
    let mut meta = HashMap::new();
    meta.insert(keys::FORMAT.to_string(), FORMAT_VERSION.to_string());
    meta.insert(keys::TARGET.to_string(), "cpu".to_string());
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
    meta.insert(
        keys::CHECKSUM.to_string(),
        checksum(c.weights.iter().map(|(n, _, d)| (n.as_str(), d.as_slice()))),
    );
    let views = c
        .weights
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (name.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let tmp = path.with_extension("kiln.partial");
    safetensors::tensor::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
