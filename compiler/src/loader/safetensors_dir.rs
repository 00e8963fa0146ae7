//! A HuggingFace checkpoint folder: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, memory-mapped; tensors converted to f32 on read.

use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::LoadError;

/// The safetensors files of a checkpoint folder.
pub struct SafetensorsDir {
    shards: Vec<(PathBuf, Mmap)>,
    /// Tensor name → (shard index, shape).
    index: BTreeMap<String, (usize, Vec<usize>)>,
}

fn open_shard(path: &Path) -> Result<Mmap, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
    // SAFETY: the mapping is read-only; a checkpoint modified while kiln reads it is not supported.
    unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Vec<usize>)>, LoadError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| LoadError::Corrupt {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect())
}

/// The path of a shard named by the index: a plain file name or a relative path that stays
/// inside the checkpoint folder (symlinks resolved); anything else is refused, so an index can
/// never make kiln read a file outside the folder it was given.
fn shard_path(dir: &Path, index_path: &Path, name: &str) -> Result<PathBuf, LoadError> {
    use std::path::Component;
    let outside = |why: &str| LoadError::Corrupt {
        file: index_path.display().to_string(),
        message: format!("shard `{name}` {why}; shards must lie inside the checkpoint folder"),
    };
    let rel = Path::new(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside("is not a relative path without `..`"));
    }
    let path = dir.join(rel);
    if let (Ok(root), Ok(real)) = (dir.canonicalize(), path.canonicalize()) {
        if !real.starts_with(&root) {
            return Err(outside("resolves outside the folder (a symlink)"));
        }
    }
    Ok(path)
}

impl SafetensorsDir {
    /// Opens `model.safetensors` or the shards named by `model.safetensors.index.json` in `dir`.
    pub fn open(dir: &Path) -> Result<SafetensorsDir, LoadError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| LoadError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::Corrupt {
                    file: index_path.display().to_string(),
                    message: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LoadError::Corrupt {
                    file: index_path.display().to_string(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<&str> = map
                .iter()
                .map(|(tensor, v)| {
                    v.as_str().ok_or_else(|| LoadError::Corrupt {
                        file: index_path.display().to_string(),
                        message: format!("`weight_map` entry `{tensor}` is {v}, not a file name"),
                    })
                })
                .collect::<Result<_, _>>()?;
            names.sort();
            names.dedup();
            names
                .into_iter()
                .map(|n| shard_path(dir, &index_path, n))
                .collect::<Result<_, _>>()?
        } else {
            return Err(LoadError::NotFound(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        };
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        for path in files {
            let mmap = open_shard(&path)?;
            for (name, shape) in parse(&path, &mmap)? {
                index.insert(name, (shards.len(), shape));
            }
            shards.push((path, mmap));
        }
        Ok(SafetensorsDir { shards, index })
    }

    /// Tensor names and shapes.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.index
            .iter()
            .map(|(n, (_, s))| (n.clone(), s.clone()))
            .collect()
    }

    /// Whether the folder holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// A tensor's element type, shape and bytes as stored (little-endian).
    pub fn read_raw(
        &self,
        name: &str,
    ) -> Result<(safetensors::Dtype, Vec<usize>, Vec<u8>), LoadError> {
        let (shard, _) = self
            .index
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let (path, mmap) = &self.shards[*shard];
        let st = SafeTensors::deserialize(mmap).map_err(|e| LoadError::Corrupt {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| LoadError::Corrupt {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok((view.dtype(), view.shape().to_vec(), view.data().to_vec()))
    }

    /// Reads a tensor as f32 (from F32, F16 or BF16).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        let (shard, _) = self
            .index
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let (path, mmap) = &self.shards[*shard];
        let corrupt = |message: String| LoadError::Corrupt {
            file: path.display().to_string(),
            message,
        };
        let st = SafeTensors::deserialize(mmap).map_err(|e| corrupt(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| corrupt(e.to_string()))?;
        let bytes = view.data();
        kiln_runtime::engine::widen_to_f32(view.dtype(), bytes).ok_or_else(|| {
            corrupt(format!(
                "tensor `{name}` has unsupported dtype {:?}",
                view.dtype()
            ))
        })
    }
}
