//! Checkpoint loaders: HF folders (safetensors) and GGUF files, behind one `Checkpoint`.

pub mod checkpoint;
pub mod gguf;
mod gguf_gpt2;
mod gguf_kquants;
mod gguf_llama;
mod gguf_parse;
mod gguf_quant;
mod gguf_tokenizer;
mod gguf_value;
pub mod gguf_write;
pub mod prequant;
pub mod safetensors_dir;

pub use checkpoint::Checkpoint;

use std::path::Path;

/// A checkpoint that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// An I/O error on a named file.
    #[error("{file}")]
    Io {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The checkpoint is not where it was said to be.
    #[error("{0}")]
    NotFound(String),
    /// A file is malformed or truncated.
    #[error("{file}: corrupt or truncated: {message}")]
    Corrupt {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is absent.
    #[error("checkpoint has no tensor `{0}`")]
    MissingTensor(String),
    /// A GGUF file problem.
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
}

impl LoadError {
    fn io(path: &Path, source: std::io::Error) -> LoadError {
        LoadError::Io {
            file: path.display().to_string(),
            source,
        }
    }
}
