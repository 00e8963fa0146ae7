//! The model description language: RON files in `models/` declaring a family as math over
//! primitive ops, with parameters bound from a checkpoint's `config.json`.

pub mod ast;
pub mod expr;
pub mod params;

pub use ast::ModelFile;
pub use expr::{Expr, ParamValue, Params};

use std::path::Path;

/// An error in a model file or its parameters.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file is not valid RON for the model language (unknown ops land here too).
    #[error("{file}:{line}:{col}: {message}")]
    Syntax {
        /// File name.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What the parser expected.
        message: String,
    },
    /// The file could not be read.
    #[error("cannot read model file {file}")]
    Io {
        /// File name.
        file: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A parameter could not be bound.
    #[error("parameter `{name}`: {message}")]
    Param {
        /// Parameter name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// An error while expanding statements into the graph.
    #[error("{family}: {context}: {message}")]
    Expand {
        /// Model family.
        family: String,
        /// Where (statement / node name).
        context: String,
        /// What is wrong.
        message: String,
    },
}

impl ModelFile {
    /// Parses model-language text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ModelFile, ModelError> {
        ron::from_str(text).map_err(|e| ModelError::Syntax {
            file: file.to_string(),
            line: e.span.start.line,
            col: e.span.start.col,
            message: e.code.to_string(),
        })
    }

    /// Reads and parses a model file.
    pub fn load(path: &Path) -> Result<ModelFile, ModelError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            file: file.clone(),
            source,
        })?;
        ModelFile::parse(&text, &file)
    }
}

/// The Llama family description shipped with kiln (`models/llama.ron`): Llama 2/3/3.1/3.2,
/// Mistral, SmolLM2.
pub const LLAMA_RON: &str = include_str!("../../../models/llama.ron");
/// Qwen2 and Qwen2.5 (`models/qwen2.ron`).
pub const QWEN2_RON: &str = include_str!("../../../models/qwen2.ron");
/// Gemma (`models/gemma.ron`).
pub const GEMMA_RON: &str = include_str!("../../../models/gemma.ron");
/// Gemma-2 (`models/gemma2.ron`).
pub const GEMMA2_RON: &str = include_str!("../../../models/gemma2.ron");
/// Phi-3 (`models/phi3.ron`).
pub const PHI3_RON: &str = include_str!("../../../models/phi3.ron");
/// GPT-2 (`models/gpt2.ron`).
pub const GPT2_RON: &str = include_str!("../../../models/gpt2.ron");

/// The built-in model file for a `config.json` `model_type`, if kiln ships one: its path in
/// the repository and its text.
pub fn builtin_for(model_type: &str) -> Option<(&'static str, &'static str)> {
    match model_type {
        "llama" | "mistral" => Some(("models/llama.ron", LLAMA_RON)),
        "qwen2" => Some(("models/qwen2.ron", QWEN2_RON)),
        "gemma" => Some(("models/gemma.ron", GEMMA_RON)),
        "gemma2" => Some(("models/gemma2.ron", GEMMA2_RON)),
        "phi3" => Some(("models/phi3.ron", PHI3_RON)),
        "gpt2" => Some(("models/gpt2.ron", GPT2_RON)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_have_line_and_column() {
        let text =
            "Model(\n  family: \"x\",\n  params: [],\n  body: [Let(\"a\", Frobnicate(\"b\"))],\n)";
        let err = ModelFile::parse(text, "bad.ron").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("bad.ron:4:"), "{msg}");
        assert!(msg.contains("Frobnicate"), "{msg}");
    }

    #[test]
    fn llama_file_parses() {
        let m = ModelFile::parse(LLAMA_RON, "models/llama.ron").unwrap();
        assert_eq!(m.family, "llama");
    }
}
