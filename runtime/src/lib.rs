//! kiln runtime: what an engine is and how it runs. The graph IR, the engine file reader, the
//! CPU executor (the numerical oracle), sampling, and the tokenizer with its chat template.

pub mod ir;
pub mod tokenizer;
pub mod chat;
pub mod sampling;
pub mod engine;
