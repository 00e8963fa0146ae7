//! Code generation: CUDA kernel templates (`kernels_templates/`) specialized into kernel
//! instances and compiled with NVRTC into CUBIN images for the engine file.
//!
//! - [`kernels`]: the instance descriptions, their launch shapes, the instance list of a Llama
//!   model, and [`kernels::compile`].
//! - [`nvrtc`]: the NVRTC driver (library and header discovery, CUBIN output, lowered names).
//! - [`gpu`]: the engine's GPU artifacts: the launch plan (lowered by `kiln_runtime::lower`),
//!   its kernels compiled, the GEMM algorithm table.

pub mod gpu;
pub mod kernels;
pub mod nvrtc;

pub use kernels::{
    compile, llama_kernels, CompiledKernel, KernelFamily, KernelInstance, LlamaDims,
};
pub use nvrtc::NvrtcError;
