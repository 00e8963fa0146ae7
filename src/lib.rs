//! kiln: a declarative LLM inference compiler. This facade re-exports the compiler (model file +
//! checkpoint → engine) and the runtime (engine → tokens); the `kiln` binary is the CLI.

pub use kiln_compiler as compiler;
pub use kiln_runtime as runtime;

pub mod serve;
