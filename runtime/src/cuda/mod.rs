//! The CUDA executor: runs a GPU engine's launch plan (`crate::plan`) with the engine's CUBIN
//! kernels, bf16 weights in device memory, one activation arena sized from the plan's liveness
//! slots, and a paged KV cache. Steps allocate nothing and never synchronize with the host
//! until their sampled tokens are read back, so a decode step can be captured as a CUDA graph.
//!
//! cudarc is loaded dynamically: where no CUDA driver exists, `CudaExecutor::new` returns
//! `CudaError::NoDevice` and the rest of kiln (the CPU path) works as before.

mod executor;
mod fp8_gemm;
pub mod gemm_algos;
pub mod kv_cache;
mod launch;
mod plan_needs;

pub use executor::{
    CudaExecutor, CudaOptions, SampleParams, SeqId, StepResult, StepSeq, TracedBuffer, Want,
};
pub use plan_needs::{
    allow_dynamic_smem, describe_plan, launch_kernels, plan_instances, KernelUse, LaunchStep,
    GEMV_MAX_ROWS,
};

/// The architecture name (`sm_90`) of a compute capability.
fn sm_name((major, minor): (i32, i32)) -> String {
    format!("sm_{major}{minor}")
}

/// The architecture (`sm_90`) of GPU 0, if a CUDA driver and a GPU are present.
pub fn device_arch() -> Result<String, CudaError> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDevice(
            "the CUDA driver library (libcuda) was not found".into(),
        ));
    }
    let ctx =
        cudarc::driver::CudaContext::new(0).map_err(|e| CudaError::NoDevice(e.to_string()))?;
    Ok(sm_name(ctx.compute_capability()?))
}

/// A GPU failure, with what to do about it where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No CUDA driver or no GPU.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// The engine was compiled for another GPU architecture.
    #[error("engine built for {engine}, but this GPU is {device}; rebuild it with `kiln build --target cuda --arch {device}`")]
    ArchMismatch {
        /// The engine's arch.
        engine: String,
        /// The GPU's arch.
        device: String,
    },
    /// The engine is not a GPU engine or lacks something.
    #[error("engine: {0}")]
    Engine(String),
    /// Not enough device memory.
    #[error("not enough GPU memory: {what} needs {need_mib} MiB, {free_mib} MiB free")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
        /// MiB needed.
        need_mib: usize,
        /// MiB free.
        free_mib: usize,
    },
    /// A step's request does not fit (batch, tokens, KV cache).
    #[error("{0}")]
    Request(String),
    /// A driver or cuBLAS call failed.
    #[error("CUDA: {0}")]
    Driver(String),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Driver(format!("cuBLAS: {e}"))
    }
}
