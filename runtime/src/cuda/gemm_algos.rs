//! Prefill GEMM algorithms chosen per shape. At engine build, where the target GPU is present,
//! every cuBLASLt candidate for each projection shape is timed at a few row counts against
//! cuBLAS's default, and the table goes into the engine (`kiln.gemm_algos`). The runtime runs
//! the recorded algorithm for a step whose rows round up to a tuned row count, where it beat the
//! default, and `cublasGemmEx`'s default algorithm everywhere else (or if the call fails).
//!
//! Every GEMM is the plan's projection `out[m, n] (+)= x[m, k] · w[n, k]ᵀ` (bf16 in, f32
//! accumulation), run column-major as `outᵀ = w · xᵀ` ("TN").

use super::CudaError;
use crate::plan::{BufType, Epilogue, Launch, Plan, Rows};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{CudaSlice, CudaStream};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Row counts (prompt tokens of a step) the algorithms are chosen at.
pub const TUNED_ROWS: [usize; 4] = [256, 1024, 2048, 4096];
/// cuBLASLt workspace the candidates may use (NVIDIA's advice for Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;
/// Candidates asked of cuBLASLt's heuristic per shape and row count.
const CANDIDATES: usize = 16;

/// One projection shape of a prefill step.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GemmShape {
    /// Output columns (weight rows).
    pub n: usize,
    /// Reduction length (weight columns).
    pub k: usize,
    /// f32 output (the logits) instead of bf16.
    pub f32_out: bool,
    /// The output accumulates into what it holds (beta = 1: a residual projection).
    pub accumulate: bool,
}

/// The fastest candidate for a shape at a row count, with the times that chose it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChosenAlgo {
    /// The shape.
    pub shape: GemmShape,
    /// Rows it was timed at.
    pub rows: usize,
    /// The opaque `cublasLtMatmulAlgo_t`.
    pub algo: [u64; 8],
    /// Its median time, µs.
    pub us: f64,
    /// `cublasGemmEx`'s default algorithm on the same operands, µs.
    pub default_us: f64,
    /// Candidates timed.
    pub candidates: usize,
}

/// The table an engine carries.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct GemmAlgos {
    /// One entry per (shape, tuned row count).
    pub chosen: Vec<ChosenAlgo>,
}

impl GemmShape {
    /// The GEMM a prefill step runs for a projection of `k` inputs onto a `n`-row weight.
    pub fn of(n: usize, k: usize, epilogue: &Epilogue, out: BufType) -> GemmShape {
        GemmShape {
            n,
            k,
            // A gated projection's GEMM writes the gate/up product in bf16 (silu_mul follows).
            f32_out: out == BufType::F32 && !epilogue.is_gated(),
            accumulate: matches!(epilogue, Epilogue::Residual(_) | Epilogue::Bias(_)),
        }
    }
}

/// The GEMM shapes of a plan's prefill steps: each projection whose rows are the step's tokens
/// (the logits of the gathered last rows are left to cuBLAS's default), without repeats.
pub fn plan_shapes(plan: &Plan) -> Vec<GemmShape> {
    let mut out: Vec<GemmShape> = plan
        .launches
        .iter()
        .filter_map(|l| match l {
            Launch::Linear {
                x, epilogue, out, ..
            } if plan.buffers[*out].rows == Rows::Tokens => {
                let cols = plan.buffers[*out].cols;
                let n = epilogue.weight_rows(cols);
                Some(GemmShape::of(
                    n,
                    plan.buffers[*x].cols,
                    epilogue,
                    plan.buffers[*out].dtype,
                ))
            }
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

impl GemmAlgos {
    /// The algorithm to run `shape` with at `m` rows: the one chosen at the smallest tuned row
    /// count ≥ m (the largest beyond them), if it beat cuBLAS's default there.
    pub fn lookup(&self, shape: &GemmShape, m: usize) -> Option<&ChosenAlgo> {
        let rows = TUNED_ROWS
            .iter()
            .copied()
            .find(|&r| r >= m)
            .unwrap_or(TUNED_ROWS[TUNED_ROWS.len() - 1]);
        self.chosen
            .iter()
            .find(|c| c.shape == *shape && c.rows == rows)
            .filter(|c| c.us < c.default_us)
    }

    /// Total time of the chosen algorithms against the defaults at `rows` (µs), for reports.
    pub fn totals(&self, rows: usize) -> (f64, f64) {
        self.chosen
            .iter()
            .filter(|c| c.rows == rows)
            .fold((0.0, 0.0), |(a, b), c| {
                (a + c.us.min(c.default_us), b + c.default_us)
            })
    }
}

/// A cuBLASLt handle and its workspace.
pub struct LtGemm {
    pub(super) handle: lt_sys::cublasLtHandle_t,
    pub(super) workspace: CudaSlice<u8>,
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `new` and is destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// The descriptors of one GEMM (destroyed on drop).
struct Descs {
    op: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
}

impl Descs {
    fn new(shape: &GemmShape, m: usize) -> Result<Descs, CudaError> {
        use lt_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        let out_type = if shape.f32_out {
            CUDA_R_32F
        } else {
            CUDA_R_16BF
        };
        let (n, k, m) = (shape.n as u64, shape.k as u64, m as u64);
        // Filled one by one, so an error part-way destroys what was made (Drop skips nulls).
        let mut d = Descs {
            op: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
        };
        d.op = lt::create_matmul_desc(lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(lt_err)?;
        d.a = lt::create_matrix_layout(CUDA_R_16BF, k, n, k as i64).map_err(lt_err)?;
        d.b = lt::create_matrix_layout(CUDA_R_16BF, k, m, k as i64).map_err(lt_err)?;
        d.c = lt::create_matrix_layout(out_type, n, m, n as i64).map_err(lt_err)?;
        // CUBLAS_OP_T on the weight.
        let trans: i32 = 1;
        // SAFETY: `op` is live; the attribute takes a 4-byte cublasOperation_t.
        unsafe {
            lt::set_matmul_desc_attribute(
                d.op,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const i32 as *const _,
                4,
            )
            .map_err(lt_err)?;
        }
        Ok(d)
    }
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: created in `new` (or null), destroyed once.
        unsafe {
            for l in [self.c, self.b, self.a] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.op.is_null() {
                let _ = lt::destroy_matmul_desc(self.op);
            }
        }
    }
}

/// Up to `most` algorithms cuBLASLt's heuristic offers for a product (`layouts`: A, B, and C = D),
/// best guess first, each within [`WORKSPACE_BYTES`].
///
/// # Safety
/// The handle and descriptors must be live.
pub(super) unsafe fn heuristic(
    handle: lt_sys::cublasLtHandle_t,
    op: lt_sys::cublasLtMatmulDesc_t,
    [a, b, c]: [lt_sys::cublasLtMatrixLayout_t; 3],
    most: usize,
) -> Result<Vec<[u64; 8]>, CudaError> {
    let pref = lt::create_matmul_pref().map_err(lt_err)?;
    let ws = WORKSPACE_BYTES;
    let set = lt::set_matmul_pref_attribute(
        pref,
        lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
        &ws as *const usize as *const _,
        std::mem::size_of::<usize>(),
    );
    let mut results = vec![std::mem::zeroed::<lt_sys::cublasLtMatmulHeuristicResult_t>(); most];
    let mut count = 0i32;
    let got = set.and_then(|_| {
        lt_sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            op,
            a,
            b,
            c,
            c,
            pref,
            most as i32,
            results.as_mut_ptr(),
            &mut count,
        )
        .result()
    });
    let _ = lt::destroy_matmul_pref(pref);
    got.map_err(lt_err)?;
    Ok(results[..count.max(0) as usize]
        .iter()
        .filter(|r| {
            r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && r.workspaceSize <= WORKSPACE_BYTES
        })
        .map(|r| r.algo.data)
        .collect())
}

pub(super) fn lt_err(e: lt::CublasError) -> CudaError {
    CudaError::Driver(format!("cuBLASLt: {e}"))
}

impl LtGemm {
    /// A handle with its workspace on `stream`.
    pub fn new(stream: &Arc<CudaStream>) -> Result<LtGemm, CudaError> {
        Ok(LtGemm {
            handle: lt::create_handle().map_err(lt_err)?,
            workspace: stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?,
        })
    }

    /// cuBLASLt's candidates for `shape` at `m` rows, best guess first.
    fn candidates(&self, shape: &GemmShape, m: usize) -> Result<Vec<[u64; 8]>, CudaError> {
        let d = Descs::new(shape, m)?;
        // SAFETY: the descriptors are live.
        unsafe { heuristic(self.handle, d.op, [d.a, d.b, d.c], CANDIDATES) }
    }

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ (+ out when shape.accumulate)` with algorithm `algo`.
    ///
    /// # Safety
    /// `w`, `x` and `out` must address device buffers of `n·k`, `m·k` bf16 and `m·n` outputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        stream: &Arc<CudaStream>,
        shape: &GemmShape,
        m: usize,
        algo: &[u64; 8],
        w: u64,
        x: u64,
        out: u64,
    ) -> Result<(), CudaError> {
        use cudarc::driver::DevicePtr;
        let d = Descs::new(shape, m)?;
        let (alpha, beta) = (1f32, if shape.accumulate { 1f32 } else { 0f32 });
        let algo = lt_sys::cublasLtMatmulAlgo_t { data: *algo };
        let (ws, _g) = self.workspace.device_ptr(stream);
        lt::matmul(
            self.handle,
            d.op,
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
            w as *const _,
            d.a,
            x as *const _,
            d.b,
            out as *const _,
            d.c,
            out as *mut _,
            d.c,
            &algo,
            ws as *mut _,
            WORKSPACE_BYTES,
            stream.cu_stream() as *mut _,
        )
        .map_err(lt_err)
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ (+ out when shape.accumulate)` with `cublasGemmEx`'s default
/// algorithm: what a GEMM runs without a recorded winner, and what the candidates are timed against.
///
/// # Safety
/// As [`LtGemm::run`].
pub unsafe fn run_default(
    blas: &CudaBlas,
    shape: &GemmShape,
    m: usize,
    w: u64,
    x: u64,
    out: u64,
) -> Result<(), CudaError> {
    let (alpha, beta) = (1f32, if shape.accumulate { 1f32 } else { 0f32 });
    let c_type = if shape.f32_out {
        blas_sys::cudaDataType::CUDA_R_32F
    } else {
        blas_sys::cudaDataType::CUDA_R_16BF
    };
    blas::gemm_ex(
        *blas.handle(),
        blas_sys::cublasOperation_t::CUBLAS_OP_T,
        blas_sys::cublasOperation_t::CUBLAS_OP_N,
        shape.n as i32,
        m as i32,
        shape.k as i32,
        &alpha as *const f32 as *const _,
        w as *const _,
        blas_sys::cudaDataType::CUDA_R_16BF,
        shape.k as i32,
        x as *const _,
        blas_sys::cudaDataType::CUDA_R_16BF,
        shape.k as i32,
        &beta as *const f32 as *const _,
        out as *mut _,
        c_type,
        shape.n as i32,
        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )?;
    Ok(())
}

/// Times every cuBLASLt candidate for each shape at each of [`TUNED_ROWS`] against
/// `cublasGemmEx`'s default on random operands, on the current GPU (device 0).
pub fn tune(shapes: &[GemmShape]) -> Result<GemmAlgos, CudaError> {
    use cudarc::driver::{CudaContext, DevicePtr};
    let ctx = CudaContext::new(0).map_err(|e| CudaError::NoDevice(e.to_string()))?;
    // SAFETY: called before any allocation, as cudarc requires; everything runs on one stream.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    let gemm = LtGemm::new(&stream)?;
    let blas = CudaBlas::new(stream.clone())?;
    let most_w = shapes.iter().map(|s| s.n * s.k).max().unwrap_or(0);
    let most_x = shapes.iter().map(|s| s.k).max().unwrap_or(0) * TUNED_ROWS[TUNED_ROWS.len() - 1];
    let most_o = shapes.iter().map(|s| s.n).max().unwrap_or(0) * TUNED_ROWS[TUNED_ROWS.len() - 1];
    // Random bf16 in [-1/16, 1/16): timings on zeros flatter the tensor cores.
    let random = |n: usize, seed: u64| -> Vec<half::bf16> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                half::bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) / 8.0)
            })
            .collect()
    };
    let wbuf = stream.clone_htod(&random(most_w, 0x9E37_79B9))?;
    let xbuf = stream.clone_htod(&random(most_x, 0x2545_F491))?;
    let obuf = stream.alloc_zeros::<f32>(most_o)?; // large enough for either output type
    let (wp, _g1) = wbuf.device_ptr(&stream);
    let (xp, _g2) = xbuf.device_ptr(&stream);
    let (op, _g3) = obuf.device_ptr(&stream);
    let time = |f: &dyn Fn() -> Result<(), CudaError>| -> Result<f64, CudaError> {
        for _ in 0..2 {
            f()?;
        }
        let mut us = Vec::new();
        for _ in 0..7 {
            let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            let a = stream.record_event(timing)?;
            f()?;
            let b = stream.record_event(timing)?;
            b.synchronize()?;
            us.push(a.elapsed_ms(&b)? as f64 * 1e3);
        }
        us.sort_by(f64::total_cmp);
        Ok(us[us.len() / 2])
    };
    let mut out = GemmAlgos::default();
    for shape in shapes {
        for &m in &TUNED_ROWS {
            // SAFETY: the buffers hold at least n·k, m·k and m·n elements.
            let default = || unsafe { run_default(&blas, shape, m, wp, xp, op) };
            let default_us = time(&default)?;
            let mut best: Option<([u64; 8], f64)> = None;
            let cands = gemm.candidates(shape, m)?;
            for algo in &cands {
                // SAFETY: as above. A candidate that fails to run is skipped.
                let run = || unsafe { gemm.run(&stream, shape, m, algo, wp, xp, op) };
                if let Ok(us) = time(&run) {
                    if best.is_none_or(|(_, b)| us < b) {
                        best = Some((*algo, us));
                    }
                }
            }
            if let Some((algo, us)) = best {
                out.chosen.push(ChosenAlgo {
                    shape: *shape,
                    rows: m,
                    algo,
                    us,
                    default_us,
                    candidates: cands.len(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize, rows: usize, us: f64, default_us: f64) -> ChosenAlgo {
        ChosenAlgo {
            shape: GemmShape {
                n,
                k: 64,
                f32_out: false,
                accumulate: false,
            },
            rows,
            algo: [rows as u64; 8],
            us,
            default_us,
            candidates: 3,
        }
    }

    #[test]
    fn lookup_rounds_rows_up_to_a_tuned_count_and_keeps_only_winners() {
        let t = GemmAlgos {
            chosen: vec![
                entry(128, 256, 10.0, 12.0),
                entry(128, 1024, 30.0, 29.0), // lost to the default: not used
                entry(128, 2048, 50.0, 60.0),
                entry(128, 4096, 90.0, 99.0),
            ],
        };
        let s = t.chosen[0].shape;
        assert_eq!(t.lookup(&s, 1).map(|c| c.rows), Some(256));
        assert_eq!(t.lookup(&s, 256).map(|c| c.rows), Some(256));
        assert!(t.lookup(&s, 257).is_none());
        assert_eq!(t.lookup(&s, 2000).map(|c| c.rows), Some(2048));
        assert_eq!(t.lookup(&s, 100_000).map(|c| c.rows), Some(4096));
        let other = GemmShape { n: 256, ..s };
        assert!(t.lookup(&other, 256).is_none());
        assert_eq!(t.totals(1024), (29.0, 29.0));
        // What the engine stores reads back the same.
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<GemmAlgos>(&json).unwrap(), t);
    }
}
