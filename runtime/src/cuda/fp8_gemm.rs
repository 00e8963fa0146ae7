//! FP8 GEMMs on cuBLASLt for the W8A8 (`fp8`) products of steps beyond the decode GEMV's rows:
//! `out[m, n] (+)= sx[m] · sw[n] · Σ_k x[m, k] · w[n, k]`, with `x` the activations rounded to
//! E4M3 per row (`act_fp8<K, 1>`: codes and the row scales `sx`) and `w` the weight's E4M3 codes
//! with their per-channel scales `sw`, both applied by cuBLASLt's outer-vector scaling on Hopper's
//! FP8 tensor cores, accumulating in f32, bf16 out. Where cuBLASLt offers no algorithm for a
//! shape (a GPU without FP8 tensor cores, an older cuBLASLt), [`Fp8Gemm::supports`] says so and
//! the caller dequantizes the weight for a bf16 GEMM instead.

use super::gemm_algos::{heuristic, lt_err, LtGemm, WORKSPACE_BYTES};
use super::CudaError;
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{CudaStream, DevicePtr};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// One FP8 product's sizes: `n` weight rows, `k` inputs, `m` activation rows, and whether it
/// accumulates onto its output (a residual or bias projection, beta = 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fp8Shape {
    /// Weight rows (output columns).
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// Activation rows.
    pub m: usize,
    /// `out += …` instead of `out = …`.
    pub accumulate: bool,
}

/// A cuBLASLt handle for FP8 products and the algorithm its heuristic gave each shape.
pub struct Fp8Gemm {
    lt: LtGemm,
    algos: RefCell<HashMap<Fp8Shape, Option<[u64; 8]>>>,
}

/// The descriptors of one FP8 product (destroyed on drop).
struct Descs {
    op: lt_sys::cublasLtMatmulDesc_t,
    layouts: [lt_sys::cublasLtMatrixLayout_t; 3],
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: created in `Descs::new` (or null), destroyed once.
        unsafe {
            for l in self.layouts {
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

impl Descs {
    /// Column-major `outᵀ[n, m] = wᵀᵀ · xᵀ` ("TN"): `w` E4M3 `[k, n]` transposed, `x` E4M3
    /// `[k, m]`, out bf16 `[n, m]`; both operands scaled by a vector along their outer dimension.
    fn new(s: &Fp8Shape, w_scale: u64, x_scale: u64) -> Result<Descs, CudaError> {
        use lt_sys::cublasLtMatmulDescAttributes_t as A;
        use lt_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F, CUDA_R_8F_E4M3};
        let (n, k, m) = (s.n as u64, s.k as u64, s.m as u64);
        let mut d = Descs {
            op: std::ptr::null_mut(),
            layouts: [std::ptr::null_mut(); 3],
        };
        d.op = lt::create_matmul_desc(lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(lt_err)?;
        d.layouts[0] = lt::create_matrix_layout(CUDA_R_8F_E4M3, k, n, k as i64).map_err(lt_err)?;
        d.layouts[1] = lt::create_matrix_layout(CUDA_R_8F_E4M3, k, m, k as i64).map_err(lt_err)?;
        d.layouts[2] = lt::create_matrix_layout(CUDA_R_16BF, n, m, n as i64).map_err(lt_err)?;
        let trans: i32 = 1; // CUBLAS_OP_T on the weight
        let outer = lt_sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
        let set = |attr: A, v: *const std::ffi::c_void, len: usize| {
            // SAFETY: `op` is live and `v` points at `len` bytes of the attribute's type.
            unsafe { lt::set_matmul_desc_attribute(d.op, attr, v, len) }.map_err(lt_err)
        };
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, &trans as *const i32 as _, 4)?;
        for (mode, ptr, scale) in [
            (
                A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                &w_scale,
            ),
            (
                A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                &x_scale,
            ),
        ] {
            set(mode, &outer as *const _ as _, 4)?;
            set(ptr, scale as *const u64 as _, 8)?;
        }
        Ok(d)
    }
}

impl Fp8Gemm {
    /// A handle with its workspace on `stream`.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Fp8Gemm, CudaError> {
        Ok(Fp8Gemm {
            lt: LtGemm::new(stream)?,
            algos: RefCell::new(HashMap::new()),
        })
    }

    /// The algorithm for `s` (cuBLASLt's heuristic, asked once per shape), or `None` where
    /// cuBLASLt has none for it on this GPU.
    pub fn supports(&self, s: &Fp8Shape) -> Option<[u64; 8]> {
        if let Some(a) = self.algos.borrow().get(s) {
            return *a;
        }
        let found = self.heuristic(s).ok().flatten();
        self.algos.borrow_mut().insert(*s, found);
        found
    }

    fn heuristic(&self, s: &Fp8Shape) -> Result<Option<[u64; 8]>, CudaError> {
        // Any non-null scale pointers: the heuristic reads the modes, not the values.
        let d = Descs::new(s, 256, 256)?;
        // SAFETY: the descriptors are live.
        let found = unsafe { heuristic(self.lt.handle, d.op, d.layouts, 1)? };
        Ok(found.first().copied())
    }

    /// `out[m, n] (+)= x_scale[m] · w_scale[n] · x[m, k] · w[n, k]ᵀ` with `algo` (from
    /// [`supports`](Self::supports)).
    ///
    /// # Safety
    /// `w` must address `n·k` E4M3 codes and `w_scale` `n` f32, `x` `m·k` codes and `x_scale`
    /// `m` f32, `out` `m·n` bf16, every one 16-byte aligned, on `stream`'s device.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        stream: &Arc<CudaStream>,
        s: &Fp8Shape,
        algo: &[u64; 8],
        (w, w_scale): (u64, u64),
        (x, x_scale): (u64, u64),
        out: u64,
    ) -> Result<(), CudaError> {
        let d = Descs::new(s, w_scale, x_scale)?;
        let (alpha, beta) = (1f32, if s.accumulate { 1f32 } else { 0f32 });
        let algo = lt_sys::cublasLtMatmulAlgo_t { data: *algo };
        let (ws, _g) = self.lt.workspace.device_ptr(stream);
        lt::matmul(
            self.lt.handle,
            d.op,
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
            w as *const _,
            d.layouts[0],
            x as *const _,
            d.layouts[1],
            out as *const _,
            d.layouts[2],
            out as *mut _,
            d.layouts[2],
            &algo,
            ws as *mut _,
            WORKSPACE_BYTES,
            stream.cu_stream() as *mut _,
        )
        .map_err(lt_err)
    }
}
