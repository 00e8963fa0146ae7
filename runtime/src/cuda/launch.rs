//! Host side of the kernel ABI: which kernel instance each plan launch uses, its grid, and its
//! arguments. The CUDA side is `kernels_templates/`; both follow the contract in the header
//! comment of each template file. Prefill GEMMs (more than `GEMV_MAX_ROWS` rows) go to cuBLAS.

use super::kv_cache::BLOCK;
use super::{CudaError, CudaOptions};
use crate::engine::{keys, Engine};
use crate::plan::{BufId, BufType, Epilogue, Launch, Plan};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::Arc;

/// Rows up to which a `Linear` runs as a GEMV kernel rather than a cuBLAS GEMM.
pub const GEMV_MAX_ROWS: usize = 8;

/// Tokens per split tile of the decode attention (`DEC_TILE` in attention_decode.cu).
const DECODE_TILE: usize = 64;
/// Streaming multiprocessors to fill (H100 SXM).
const SM_COUNT: usize = 132;

/// Split-KV count of decode attention: enough (kv head, split) CTAs to cover the GPU twice,
/// at most one split per tile of the longest context.
pub fn decode_splits(batch: usize, kv_heads: usize, max_context: usize) -> usize {
    let want = (2 * SM_COUNT).div_ceil(batch.max(1) * kv_heads.max(1));
    want.clamp(1, max_context.div_ceil(DECODE_TILE).max(1))
}

/// Threads of `rmsnorm<H>` (`RmsCfg<H>::THREADS`).
fn rmsnorm_threads(h: usize) -> u32 {
    let vec = h / 8;
    (if vec >= 256 {
        256
    } else {
        vec.div_ceil(32) * 32
    })
    .max(32) as u32
}

/// The decode GEMV for `rows` rows and its output columns per CTA: the CUDA-core `gemv<K, 1>`
/// (8 warps, one column each) for one row, the tensor-core `gemv_tc<K, 8>` (16 columns per CTA,
/// cost nearly independent of the rows) for 2..=8 rows.
fn gemv_instance(rows: usize, k: usize, epi: u32, ty: &str) -> (String, usize) {
    if rows == 1 {
        (format!("gemv<{k}, 1, {epi}, {ty}>"), 8)
    } else {
        (format!("gemv_tc<{k}, {GEMV_MAX_ROWS}, {epi}, {ty}>"), 16)
    }
}

/// Whether the tensor-core prefill attention supports this head dimension.
fn prefill_tc(head_dim: usize) -> bool {
    head_dim == 64 || head_dim == 128
}

/// Device pointers and sizes of one step.
pub struct Ptrs<'a> {
    pub plan: &'a Plan,
    pub weights: &'a HashMap<String, u64>,
    pub slot_base: &'a [u64],
    pub kv_base: u64,
    pub kv_layer_bytes: u64,
    pub tokens: u64,
    pub positions: u64,
    pub slots: u64,
    pub seq_lens: u64,
    pub query_start: u64,
    pub block_tables: u64,
    pub max_blocks: i32,
    pub last_index: u64,
    pub out_tokens: u64,
    /// Longest context a sequence may reach (sizes the decode splits).
    pub max_seq_len: usize,
    /// Tokens in the step.
    pub t: usize,
    /// Sequences in the step.
    pub b: usize,
}

impl Ptrs<'_> {
    /// Device address of a buffer.
    pub fn buf(&self, id: BufId) -> u64 {
        self.slot_base[self.plan.buffers[id].slot]
    }
    fn rows(&self, id: BufId) -> usize {
        match self.plan.buffers[id].rows {
            crate::plan::Rows::Tokens => self.t,
            crate::plan::Rows::Sequences => self.b,
        }
    }
    fn w(&self, name: &str) -> Result<u64, CudaError> {
        self.weights
            .get(name)
            .copied()
            .ok_or_else(|| CudaError::Engine(format!("weight `{name}` missing")))
    }
    fn k_cache(&self, layer: usize) -> u64 {
        self.kv_base + (2 * layer) as u64 * self.kv_layer_bytes
    }
    fn v_cache(&self, layer: usize) -> u64 {
        self.kv_base + (2 * layer + 1) as u64 * self.kv_layer_bytes
    }
}

/// The loaded kernels and the cuBLAS handle.
pub struct Kernels {
    funcs: HashMap<String, CudaFunction>,
    blas: CudaBlas,
    /// Scratch space at the start of the arena (prefill gate/up product, attention partials).
    scratch: u64,
    weight_cols: HashMap<String, (usize, usize)>,
}

/// Name expression of a kernel instance (as given to NVRTC).
pub fn instance_names(plan: &Plan) -> Vec<String> {
    let a = plan.attention;
    let (h, kh, d) = (a.heads, a.kv_heads, a.head_dim);
    let mut names = vec![
        format!("rope_append<{h}, {kh}, {d}, {BLOCK}>"),
        format!("attention_decode<{h}, {kh}, {d}, {BLOCK}>"),
        format!("attention_decode_merge<{h}, {d}>"),
        if prefill_tc(d) {
            format!("attention_prefill<{h}, {kh}, {d}, {BLOCK}>")
        } else {
            format!("attention_prefill_simple<{h}, {kh}, {d}, {BLOCK}>")
        },
        "argmax".to_string(),
        "add_inplace".to_string(),
    ];
    for l in &plan.launches {
        match l {
            Launch::Embedding { out, .. } | Launch::GatherLast { out, .. } => {
                names.push(format!("embedding<{}>", plan.buffers[*out].cols))
            }
            Launch::RmsNorm { out, .. } => {
                names.push(format!("rmsnorm<{}>", plan.buffers[*out].cols))
            }
            Launch::Linear {
                x, epilogue, out, ..
            } => {
                let k = plan.buffers[*x].cols;
                let (epi, out_t) = gemv_kind(*epilogue, plan.buffers[*out].dtype);
                names.push(format!("gemv<{k}, 1, {epi}, {out_t}>"));
                names.push(format!("gemv_tc<{k}, {GEMV_MAX_ROWS}, {epi}, {out_t}>"));
                if *epilogue == Epilogue::Gated {
                    names.push(format!("silu_mul<{}>", plan.buffers[*out].cols));
                }
            }
            Launch::RopeAppend { .. } | Launch::Attention { .. } => {}
        }
    }
    names.sort();
    names.dedup();
    names
}

fn gemv_kind(e: Epilogue, out: BufType) -> (u32, &'static str) {
    let epi = match e {
        Epilogue::None => 0,
        Epilogue::Residual(_) => 1,
        Epilogue::Gated => 2,
    };
    (
        epi,
        if out == BufType::F32 {
            "float"
        } else {
            "__nv_bfloat16"
        },
    )
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

impl Kernels {
    /// Loads the engine's CUBIN modules and resolves every instance the plan needs.
    pub fn load(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        engine: &Engine,
        plan: &Plan,
    ) -> Result<Kernels, CudaError> {
        #[derive(serde::Deserialize)]
        struct Entry {
            module: String,
            name: String,
            lowered: String,
        }
        let list: Vec<Entry> = serde_json::from_str(
            engine
                .metadata(keys::KERNELS)
                .ok_or_else(|| CudaError::Engine("no kernel table".into()))?,
        )
        .map_err(|e| CudaError::Engine(format!("kernel table: {e}")))?;
        let mut modules = HashMap::new();
        let mut funcs = HashMap::new();
        for e in list {
            if !modules.contains_key(&e.module) {
                let (_, cubin) = engine
                    .tensor(&format!("kernels.{}", e.module))
                    .map_err(|e| CudaError::Engine(e.to_string()))?;
                modules.insert(
                    e.module.clone(),
                    ctx.load_module(Ptx::from_binary(cubin.to_vec()))?,
                );
            }
            funcs.insert(e.name, modules[&e.module].load_function(&e.lowered)?);
        }
        for name in instance_names(plan) {
            if !funcs.contains_key(&name) {
                return Err(CudaError::Engine(format!(
                    "kernel `{name}` missing from the engine; rebuild it"
                )));
            }
        }
        let weight_cols = engine
            .tensor_names()
            .filter_map(|n| {
                let (e, _) = engine.tensor(n).ok()?;
                (e.shape.len() == 2).then(|| (n.to_string(), (e.shape[0], e.shape[1])))
            })
            .collect();
        Ok(Kernels {
            funcs,
            blas: CudaBlas::new(stream.clone())?,
            scratch: 0,
            weight_cols,
        })
    }

    /// Bytes of scratch the plan needs at the start of the arena.
    pub fn scratch_bytes(&self, plan: &Plan, opts: &CudaOptions) -> usize {
        let gated = plan.launches.iter().filter_map(|l| match l {
            Launch::Linear {
                out,
                epilogue: Epilogue::Gated,
                ..
            } => Some(plan.buffers[*out].cols * 2),
            _ => None,
        });
        let gu = gated.max().unwrap_or(0) * 2 * opts.max_step_tokens;
        let a = plan.attention;
        let splits = decode_splits(1, a.kv_heads, opts.max_seq_len);
        let partials = opts.max_batch * a.heads * splits * (a.head_dim + 2) * 4;
        gu.max(partials) + 1024
    }

    /// Sets where the scratch space starts.
    pub fn set_scratch(&mut self, addr: u64) {
        self.scratch = addr;
    }

    fn f(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.funcs
            .get(name)
            .ok_or_else(|| CudaError::Engine(format!("kernel `{name}` not loaded")))
    }

    /// Launches every step of the plan.
    pub fn run_plan(&self, stream: &Arc<CudaStream>, p: &Ptrs) -> Result<(), CudaError> {
        for l in &p.plan.launches {
            self.launch(stream, p, l)?;
        }
        Ok(())
    }

    /// Greedy next token per sequence from the logits into `out_tokens`.
    pub fn argmax(&self, stream: &Arc<CudaStream>, p: &Ptrs) -> Result<(), CudaError> {
        let f = self.f("argmax")?;
        let (logits, v, b) = (p.buf(p.plan.logits), p.plan.vocab as i32, p.b as u32);
        let mut l = stream.launch_builder(f);
        l.arg(&logits).arg(&v).arg(&p.out_tokens);
        // SAFETY: arguments match `argmax(const float*, int, int*)`.
        unsafe { l.launch(cfg((b, 1, 1), 1024, 0)) }?;
        Ok(())
    }

    fn launch(&self, stream: &Arc<CudaStream>, p: &Ptrs, launch: &Launch) -> Result<(), CudaError> {
        let plan = p.plan;
        let a = plan.attention;
        let (t, b) = (p.t as i32, p.b as i32);
        match launch {
            Launch::Embedding { table, out } => {
                let cols = plan.buffers[*out].cols;
                let (tab, o) = (p.w(table)?, p.buf(*out));
                let mut l = stream.launch_builder(self.f(&format!("embedding<{cols}>"))?);
                l.arg(&tab).arg(&p.tokens).arg(&o).arg(&t);
                // SAFETY: matches `embedding<H>(const bf16*, const int*, bf16*, int)`.
                unsafe { l.launch(cfg((p.t as u32, 1, 1), 128, 0)) }?;
            }
            Launch::GatherLast { x, out } => {
                let cols = plan.buffers[*out].cols;
                let (src, o) = (p.buf(*x), p.buf(*out));
                let mut l = stream.launch_builder(self.f(&format!("embedding<{cols}>"))?);
                l.arg(&src).arg(&p.last_index).arg(&o).arg(&b);
                // SAFETY: as above, gathering rows of an activation by last-token index.
                unsafe { l.launch(cfg((p.b as u32, 1, 1), 128, 0)) }?;
            }
            Launch::RmsNorm { x, w, eps, out } => {
                let cols = plan.buffers[*out].cols;
                let rows = p.rows(*out) as i32;
                let (xp, wp, o) = (p.buf(*x), p.w(w)?, p.buf(*out));
                let mut l = stream.launch_builder(self.f(&format!("rmsnorm<{cols}>"))?);
                l.arg(&xp).arg(&wp).arg(&o).arg(&rows).arg(eps);
                // SAFETY: matches `rmsnorm<H>(const bf16*, const bf16*, bf16*, int, float)`.
                unsafe { l.launch(cfg((rows.max(1) as u32, 1, 1), rmsnorm_threads(cols), 0)) }?;
            }
            Launch::Linear {
                x,
                w,
                epilogue,
                out,
            } => self.linear(stream, p, *x, w, *epilogue, *out)?,
            Launch::RopeAppend { qkv, layer, theta } => {
                let name = format!(
                    "rope_append<{}, {}, {}, {BLOCK}>",
                    a.heads, a.kv_heads, a.head_dim
                );
                let (q, kc, vc) = (p.buf(*qkv), p.k_cache(*layer), p.v_cache(*layer));
                let mut l = stream.launch_builder(self.f(&name)?);
                l.arg(&q)
                    .arg(&p.positions)
                    .arg(&p.slots)
                    .arg(&kc)
                    .arg(&vc)
                    .arg(&t)
                    .arg(theta);
                // SAFETY: matches `rope_append<...>(bf16*, const int*, const int*, bf16*, bf16*, int, float)`.
                unsafe { l.launch(cfg((p.t as u32, 1, 1), 128, 0)) }?;
            }
            Launch::Attention {
                qkv,
                layer,
                scale,
                out,
            } => {
                let (q, kc, vc, o) = (
                    p.buf(*qkv),
                    p.k_cache(*layer),
                    p.v_cache(*layer),
                    p.buf(*out),
                );
                if p.t == p.b {
                    let splits = decode_splits(p.b, a.kv_heads, p.max_seq_len);
                    let name = format!(
                        "attention_decode<{}, {}, {}, {BLOCK}>",
                        a.heads, a.kv_heads, a.head_dim
                    );
                    let po = self.scratch;
                    let pml = po + (p.b * a.heads * splits * a.head_dim * 4) as u64;
                    let ns = splits as i32;
                    let mut l = stream.launch_builder(self.f(&name)?);
                    l.arg(&q)
                        .arg(&kc)
                        .arg(&vc)
                        .arg(&p.block_tables)
                        .arg(&p.max_blocks)
                        .arg(&p.seq_lens)
                        .arg(&o)
                        .arg(&b)
                        .arg(scale)
                        .arg(&po)
                        .arg(&pml)
                        .arg(&ns);
                    // SAFETY: matches attention_decode in kernels_templates/attention_decode.cu.
                    unsafe {
                        l.launch(cfg((splits as u32, a.kv_heads as u32, p.b as u32), 128, 0))
                    }?;
                    if splits > 1 {
                        let name = format!("attention_decode_merge<{}, {}>", a.heads, a.head_dim);
                        let mut l = stream.launch_builder(self.f(&name)?);
                        l.arg(&po)
                            .arg(&pml)
                            .arg(&p.seq_lens)
                            .arg(&o)
                            .arg(&b)
                            .arg(&ns);
                        // SAFETY: matches attention_decode_merge.
                        unsafe {
                            l.launch(cfg((a.heads as u32, p.b as u32, 1), a.head_dim as u32, 0))
                        }?;
                    }
                } else {
                    let (family, rows) = if prefill_tc(a.head_dim) {
                        ("attention_prefill", 64)
                    } else {
                        ("attention_prefill_simple", 32)
                    };
                    let name = format!(
                        "{family}<{}, {}, {}, {BLOCK}>",
                        a.heads, a.kv_heads, a.head_dim
                    );
                    let mut l = stream.launch_builder(self.f(&name)?);
                    l.arg(&q)
                        .arg(&kc)
                        .arg(&vc)
                        .arg(&p.block_tables)
                        .arg(&p.max_blocks)
                        .arg(&p.seq_lens)
                        .arg(&p.query_start)
                        .arg(&o)
                        .arg(&b)
                        .arg(scale);
                    // SAFETY: matches attention_prefill(_simple) (same signature).
                    unsafe {
                        l.launch(cfg(
                            (p.t.div_ceil(rows) as u32, a.heads as u32, p.b as u32),
                            128,
                            0,
                        ))
                    }?;
                }
            }
        }
        Ok(())
    }

    fn linear(
        &self,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        x: BufId,
        w: &str,
        epi: Epilogue,
        out: BufId,
    ) -> Result<(), CudaError> {
        let plan = p.plan;
        let rows = p.rows(out);
        let k = plan.buffers[x].cols;
        let (n_rows, _) = *self
            .weight_cols
            .get(w)
            .ok_or_else(|| CudaError::Engine(format!("weight `{w}` is not a matrix")))?;
        let (xp, wp, o) = (p.buf(x), p.w(w)?, p.buf(out));
        let out_t = plan.buffers[out].dtype;
        if rows <= GEMV_MAX_ROWS {
            let (e, ty) = gemv_kind(epi, out_t);
            let n = plan.buffers[out].cols as i32;
            let r = match epi {
                Epilogue::Residual(r) => p.buf(r),
                _ => 0,
            };
            let m = rows as i32;
            let (name, cols_per_cta) = gemv_instance(rows, k, e, ty);
            let mut l = stream.launch_builder(self.f(&name)?);
            l.arg(&xp).arg(&m).arg(&wp).arg(&n).arg(&r).arg(&o);
            let grid = (n as usize).div_ceil(cols_per_cta) as u32;
            // SAFETY: matches `gemv<K, MMAX, EPI, OutT>(const bf16*, int, const bf16*, int, const bf16*, OutT*)`.
            unsafe { l.launch(cfg((grid, 1, 1), 256, 0)) }?;
            return Ok(());
        }
        // cuBLAS: row-major C[rows, n] = X[rows, k] · W[n, k]ᵀ  ⇔  column-major Cᵀ = W · Xᵀ ("TN").
        let gated = epi == Epilogue::Gated;
        let dst = if gated { self.scratch } else { o };
        let (c_type, alpha, beta) = match out_t {
            BufType::F32 => (blas_sys::cudaDataType::CUDA_R_32F, 1f32, 0f32),
            BufType::Bf16 => (blas_sys::cudaDataType::CUDA_R_16BF, 1f32, 0f32),
        };
        // SAFETY: pointers address device buffers of the sizes the plan declares.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n_rows as i32,
                rows as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                wp as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                xp as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                dst as *mut _,
                c_type,
                n_rows as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        match epi {
            Epilogue::Gated => {
                let f = plan.buffers[out].cols;
                let (src, r) = (dst, rows as i32);
                let mut l = stream.launch_builder(self.f(&format!("silu_mul<{f}>"))?);
                l.arg(&src).arg(&o).arg(&r);
                let grid = (rows * f / 8).div_ceil(256).clamp(1, 8192) as u32;
                // SAFETY: matches `silu_mul<F>(const bf16*, bf16*, int)`.
                unsafe { l.launch(cfg((grid, 1, 1), 256, 0)) }?;
            }
            Epilogue::Residual(r) => {
                let (rp, n) = (p.buf(r), (rows * plan.buffers[out].cols) as i64);
                let mut l = stream.launch_builder(self.f("add_inplace")?);
                l.arg(&o).arg(&rp).arg(&n);
                let grid = (n as usize).div_ceil(8).div_ceil(256).clamp(1, 8192) as u32;
                // SAFETY: matches `add_inplace(bf16*, const bf16*, long long)`.
                unsafe { l.launch(cfg((grid, 1, 1), 256, 0)) }?;
            }
            Epilogue::None => {}
        }
        Ok(())
    }
}
