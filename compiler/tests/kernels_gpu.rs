//! The GPU checks of `kernel_check` (`compiler/examples/kernel_check/`) as tests: each kernel
//! family on fresh random inputs against its f64 reference, outputs poisoned with NaN before
//! every launch. They run where an NVIDIA GPU is present (one context and one NVRTC compilation
//! for all of them, on GPU 0's architecture) and are skipped, with a message, where not — as on
//! CI. The benchmarks stay in `kernel_check` (`bench/kernels/run.sh`).

#[allow(dead_code)]
#[path = "../examples/kernel_check/main.rs"]
mod kernel_check;

use kernel_check::{kernel_instances, run_step, Gpu, Report, Rng};
use std::sync::{Mutex, OnceLock};

/// The shared GPU, or `None` (with the reason printed) where there is no CUDA device.
fn gpu() -> Option<&'static Mutex<Gpu>> {
    static GPU: OnceLock<Option<Mutex<Gpu>>> = OnceLock::new();
    GPU.get_or_init(|| {
        let arch = match kiln_runtime::cuda::device_arch() {
            Ok(arch) => arch,
            Err(e) => {
                eprintln!("skipped: {e}");
                return None;
            }
        };
        // A GPU that is present but cannot compile or load the kernels is a failure.
        let g = Gpu::new(&kernel_instances(&arch), &arch)
            .unwrap_or_else(|e| panic!("GPU setup on {arch} failed: {e}"));
        Some(Mutex::new(g))
    })
    .as_ref()
}

/// Runs one check step of `kernel_check` and fails with every failed check named.
fn check(step: &str) {
    let Some(gpu) = gpu() else {
        eprintln!("skipped `{step}`: no CUDA GPU on this machine");
        return;
    };
    // One step at a time on the shared stream; a panicked step leaves the lock usable.
    let g = gpu.lock().unwrap_or_else(|e| e.into_inner());
    let mut rep = Report::default();
    let result = g
        .bind()
        .and_then(|()| run_step(&g, &mut rep, &mut Rng::from_clock(), step));
    if let Err(e) = result {
        panic!("{step}: {e}");
    }
    let failed = rep.failures();
    assert!(failed.is_empty(), "{step}: {}", failed.join("; "));
}

#[test]
fn embedding() {
    check("embedding");
}

#[test]
fn rmsnorm() {
    check("rmsnorm");
}

#[test]
fn gemv() {
    check("gemv");
}

#[test]
fn elementwise() {
    check("elementwise");
}

#[test]
fn quantized_gemv_and_prefill_helpers() {
    check("quant");
}

#[test]
fn rope_append() {
    check("rope");
}

#[test]
fn decode_attention() {
    check("decode");
}

#[test]
fn prefill_attention() {
    check("prefill");
}

#[test]
fn argmax() {
    check("argmax");
}

#[test]
fn sample() {
    check("sample");
}
