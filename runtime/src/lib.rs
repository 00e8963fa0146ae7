//! kiln runtime: what an engine is and how it runs. The graph IR, the engine file reader, the
//! CPU executor (the numerical oracle), sampling, and the tokenizer with its chat template.

pub mod chat;
pub mod collective;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod generate;
pub mod ir;
pub mod kernel_args;
pub mod kernels;
pub mod lower;
pub mod ops;
pub mod parallel;
pub mod plan;
pub mod quant;
pub mod quant_format;
pub mod sampling;
pub mod serving;
pub mod tokenizer;
