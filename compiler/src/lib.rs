//! kiln compiler: model description (RON) + checkpoint → typed graph → engine file.

pub mod build;
pub mod codegen;
pub mod engine_writer;
pub mod graph;
pub mod loader;
pub mod model;
pub mod output;
pub mod quantize;
pub mod rewrite;

pub use build::{build, BuildError, BuildOptions};
