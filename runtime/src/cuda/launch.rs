//! Host side of the kernel ABI: which kernel instance each plan launch uses for a step and its
//! arguments (`crate::kernel_args`, checked against the templates' signatures). Launch shapes
//! come from `crate::kernels::KernelInstance::launch_dims`, the one place that mirrors the
//! templates' launch rules; the instances a plan can use and the weights it reads are listed in
//! `plan_needs.rs`. Prefill GEMMs (more than `GEMV_MAX_ROWS` rows) go to cuBLAS(Lt).

use super::fp8_gemm::{Fp8Gemm, Fp8Shape};
use super::gemm_algos::{run_default, GemmAlgos, GemmShape, LtGemm};
use super::kv_cache::BLOCK;
use super::plan_needs::{
    allow_dynamic_smem, epilogue_kind, gemv_instance, out_type, plan_instances, GEMV_MAX_ROWS,
};
use super::{CudaError, CudaOptions};
use crate::engine::{keys, Engine};
use crate::ir::DType;
use crate::kernel_args::*;
use crate::kernels::{
    decode_splits, KernelFamily, KernelInstance, LaunchDims, QuantFormat, RuntimeSizes,
};
use crate::plan::{BufId, BufType, Epilogue, Launch, Norm, Plan};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// Streaming multiprocessors to fill when sizing decode splits (H100 SXM).
pub const SM_COUNT: usize = 132;

/// Split-KV count of decode attention for a step of `batch` sequences.
pub fn splits(batch: usize, kv_heads: usize, max_seq_len: usize) -> usize {
    decode_splits(batch, kv_heads, max_seq_len, SM_COUNT)
}

/// Sizes of one launch (each kernel family reads the fields its launch rule names).
fn sizes(tokens: usize, batch: usize, n: usize, max_splits: usize) -> RuntimeSizes {
    RuntimeSizes {
        tokens,
        batch,
        n,
        max_splits,
        longest_query: 0,
    }
}

/// The `residual` argument of a GEMV: the residual buffer, the bias weight, or null.
fn epilogue_operand(p: &Ptrs, epi: &Epilogue) -> Result<u64, CudaError> {
    Ok(match epi {
        Epilogue::Residual(r) => p.buf(*r),
        Epilogue::Bias(b) => p.w(b)?,
        _ => 0,
    })
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
    /// Query rows of the step's longest sequence (sizes the prefill attention grid).
    pub longest_query: usize,
    /// Leading sequences with one query row each (every sequence of a decode step): the decode
    /// attention kernel serves them and rotates and appends their token itself; the prefill
    /// kernel serves the rest.
    pub decodes: usize,
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

/// Events recorded after each launch while a timeline is on.
struct Timeline {
    start: CudaEvent,
    marks: Vec<(String, CudaEvent)>,
}

/// The operands of a GEMM.
enum Product {
    /// bf16 activations `x` `[rows, k]` and weight `w` `[n_rows, k]`.
    Bf16 { x: u64, w: u64 },
    /// E4M3 codes with per-row scales: the weight's (codes, scales) and the activations'.
    Fp8 {
        shape: Fp8Shape,
        algo: [u64; 8],
        w: (u64, u64),
        x: (u64, u64),
    },
}

/// Bytes of `rows × k` E4M3 activation codes, rounded up so that the row scales after them
/// start 256-aligned.
fn fp8_codes_bytes(rows: usize, k: usize) -> usize {
    (rows * k).div_ceil(256) * 256
}

/// Bytes of an FP8 GEMM's activation operands: the codes, then one f32 scale per row.
fn fp8_operand_bytes(rows: usize, k: usize) -> usize {
    fp8_codes_bytes(rows, k) + rows * 4
}

/// The loaded kernels and the cuBLAS handle.
pub struct Kernels {
    funcs: HashMap<String, CudaFunction>,
    blas: CudaBlas,
    /// Scratch space at the start of the arena (prefill gate/up product, attention partials).
    scratch: u64,
    /// Scratch for a prefill GEMM's normalized input (after `scratch`).
    norm_scratch: u64,
    /// Scratch for the bf16 copy of a quantized weight that a prefill GEMM reads (after
    /// `norm_scratch`).
    weight_scratch: u64,
    /// While set, an event is recorded after every launch (`Kernels::timeline`).
    timeline: RefCell<Option<Timeline>>,
    weight_cols: HashMap<String, (usize, usize)>,
    /// The engine's per-shape cuBLASLt algorithms for prefill GEMMs, with a cuBLASLt handle
    /// (absent: cuBLAS's default algorithm for every GEMM).
    gemm_algos: Option<(GemmAlgos, LtGemm)>,
    /// FP8 GEMMs for the W8A8 products of steps beyond the GEMV's rows (a plan with `fp8`
    /// weights; absent, or without an algorithm for a shape: dequantize and run bf16).
    fp8: Option<Fp8Gemm>,
    /// Launch with programmatic stream serialization (sm_90+): each kernel may start while the
    /// previous one drains, and waits for it in `kiln::pdl_sync()` (kernels_templates/common.cuh).
    pdl: bool,
    /// The prefill attention kernel for the engine's architecture.
    prefill_attention: KernelInstance,
}

impl Kernels {
    /// Loads the engine's CUBIN modules and resolves every instance the plan needs.
    pub fn load(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        engine: &Engine,
        plan: &Plan,
        pdl: bool,
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
        let arch = engine.metadata(keys::ARCH).unwrap_or_default();
        for k in plan_instances(plan, arch) {
            let f = funcs.get(&k.name_expr).ok_or_else(|| {
                CudaError::Engine(format!(
                    "kernel `{}` missing from the engine; rebuild it",
                    k.name_expr
                ))
            })?;
            allow_dynamic_smem(f, &k)?;
        }
        let a = plan.attention;
        let prefill_attention =
            KernelInstance::attention_prefill_for(a.heads, a.kv_heads, a.head_dim, BLOCK, arch);
        let weight_cols = engine
            .tensor_names()
            .filter_map(|n| {
                let (e, _) = engine.tensor(n).ok()?;
                (e.shape.len() == 2).then(|| (n.to_string(), (e.shape[0], e.shape[1])))
            })
            .collect();
        let gemm_algos = match engine.metadata(keys::GEMM_ALGOS) {
            Some(json) => {
                let t: GemmAlgos = serde_json::from_str(json)
                    .map_err(|e| CudaError::Engine(format!("GEMM algorithm table: {e}")))?;
                Some((t, LtGemm::new(stream)?))
            }
            None => None,
        };
        let has_fp8 = plan
            .launches
            .iter()
            .any(|l| matches!(l, Launch::Linear { format, .. } if *format == DType::Fp8));
        let fp8 = if has_fp8 {
            Some(Fp8Gemm::new(stream)?)
        } else {
            None
        };
        Ok(Kernels {
            funcs,
            blas: CudaBlas::new(stream.clone())?,
            gemm_algos,
            fp8,
            scratch: 0,
            norm_scratch: 0,
            weight_scratch: 0,
            timeline: RefCell::new(None),
            weight_cols,
            pdl,
            prefill_attention,
        })
    }

    /// Bytes of scratch the plan needs at the start of the arena: the gate/up product of a
    /// prefill GEMM or the split-KV partial results of decode attention, then the normalized
    /// input of a prefill GEMM with a folded norm (or of any product with a quantized weight),
    /// then the bf16 copy of a quantized weight that a prefill GEMM reads.
    pub fn scratch_bytes(plan: &Plan, opts: &CudaOptions) -> usize {
        let (first, normed) = Self::scratch_regions(plan, opts);
        let rows = opts.max_step_tokens.max(opts.max_batch);
        let dequantized = plan.launches.iter().filter_map(|l| match l {
            Launch::Linear {
                x,
                format,
                epilogue,
                out,
                ..
            } if *format != DType::BF16 => {
                let (n, k) = (
                    epilogue.weight_rows(plan.buffers[*out].cols),
                    plan.buffers[*x].cols,
                );
                // An FP8 GEMM's activation codes and row scales instead, where larger.
                let fp8 = if *format == DType::Fp8 {
                    fp8_operand_bytes(rows, k)
                } else {
                    0
                };
                Some((n * k * 2).max(fp8))
            }
            _ => None,
        });
        first + normed + dequantized.max().unwrap_or(0)
    }

    /// Bytes of the first two scratch regions (gate/up product or attention partials; the
    /// normalized input), each 256-aligned.
    fn scratch_regions(plan: &Plan, opts: &CudaOptions) -> (usize, usize) {
        let gated = plan.launches.iter().filter_map(|l| match l {
            Launch::Linear { out, epilogue, .. } if epilogue.is_gated() => {
                Some(plan.buffers[*out].cols * 2)
            }
            _ => None,
        });
        let gu = gated.max().unwrap_or(0) * 2 * opts.max_step_tokens;
        let a = plan.attention;
        let most = splits(1, a.kv_heads, opts.max_seq_len);
        let partials = opts.max_batch * a.heads * most * (a.head_dim + 2) * 4;
        // The normalized input of a folded norm, or the E4M3-rounded input of a W8A8 product.
        let normed = plan.launches.iter().filter_map(|l| match l {
            Launch::Linear {
                x, norm, format, ..
            } if norm.is_some() || *format == DType::Fp8 => Some(plan.buffers[*x].cols * 2),
            _ => None,
        });
        let rows = opts.max_step_tokens.max(opts.max_batch);
        let align = |b: usize| b.div_ceil(256) * 256;
        (
            align(gu.max(partials) + 1024),
            align(normed.max().unwrap_or(0) * rows),
        )
    }

    /// Sets where the scratch space of [`Kernels::scratch_bytes`] starts.
    pub fn set_scratch(&mut self, addr: u64, plan: &Plan, opts: &CudaOptions) {
        let (first, normed) = Self::scratch_regions(plan, opts);
        self.scratch = addr;
        self.norm_scratch = addr + first as u64;
        self.weight_scratch = self.norm_scratch + normed as u64;
    }

    /// Starts recording an event after every launch (a per-kernel timeline of the next steps;
    /// the events sit between launches, so use it to attribute time, not to time whole steps).
    pub fn timeline_start(&self, stream: &Arc<CudaStream>) -> Result<(), CudaError> {
        let start = stream.record_event(Some(cu::CUevent_flags::CU_EVENT_DEFAULT))?;
        *self.timeline.borrow_mut() = Some(Timeline {
            start,
            marks: Vec::new(),
        });
        Ok(())
    }

    /// Stops recording and returns (kernel, µs) for every launch since `timeline_start`: the
    /// time from the previous launch's end event to this one's.
    pub fn timeline_take(&self) -> Result<Vec<(String, f64)>, CudaError> {
        let Some(t) = self.timeline.borrow_mut().take() else {
            return Ok(Vec::new());
        };
        let mut prev = &t.start;
        let mut out = Vec::with_capacity(t.marks.len());
        for (name, e) in &t.marks {
            out.push((name.clone(), f64::from(prev.elapsed_ms(e)?) * 1e3));
            prev = e;
        }
        Ok(out)
    }

    /// Whether a timeline is being recorded.
    pub fn timeline_on(&self) -> bool {
        self.timeline.borrow().is_some()
    }

    fn mark(&self, stream: &Arc<CudaStream>, name: &str) -> Result<(), CudaError> {
        if let Some(t) = self.timeline.borrow_mut().as_mut() {
            let e = stream.record_event(Some(cu::CUevent_flags::CU_EVENT_DEFAULT))?;
            t.marks.push((name.to_string(), e));
        }
        Ok(())
    }

    /// Launches one kernel instance with its shape for `rt` and these arguments (the
    /// struct of its template's signature: a struct of another signature is an error).
    fn go<A: KernelArgs>(
        &self,
        stream: &Arc<CudaStream>,
        k: &KernelInstance,
        rt: RuntimeSizes,
        args: &A,
    ) -> Result<(), CudaError> {
        let f: &CudaFunction = self
            .funcs
            .get(&k.name_expr)
            .ok_or_else(|| CudaError::Engine(format!("kernel `{}` not loaded", k.name_expr)))?;
        A::check(k).map_err(CudaError::Engine)?;
        // Addresses of the argument values, in `args`: no allocation per launch.
        let mut params = args.addresses().ptrs;
        let d: LaunchDims = k.launch_dims(&rt);
        let mut attr = cu::CUlaunchAttribute {
            id: cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: cu::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        };
        let cfg = cu::CUlaunchConfig {
            gridDimX: d.grid.0,
            gridDimY: d.grid.1,
            gridDimZ: d.grid.2,
            blockDimX: d.block.0,
            blockDimY: d.block.1,
            blockDimZ: d.block.2,
            sharedMemBytes: d.shared_bytes,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.pdl),
        };
        // SAFETY: `args` is the struct of this template's signature (checked above; the struct
        // against the template source by `kernel_args`'s test), its pointers address device
        // buffers sized by the plan; `params` points into `args`, which outlives the call (the
        // driver copies the values at launch).
        unsafe {
            cu::cuLaunchKernelEx(
                &cfg,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()?;
        self.mark(stream, &k.name_expr)
    }

    /// Launches every step of the plan.
    pub fn run_plan(&self, stream: &Arc<CudaStream>, p: &Ptrs) -> Result<(), CudaError> {
        self.run_plan_with(stream, p, |_| Ok(()))
    }

    /// Launches every step of the plan, calling `after(i)` once launch `i` is queued (`kiln
    /// diff` reads each launch's output there).
    pub fn run_plan_with(
        &self,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        mut after: impl FnMut(usize) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        for (i, l) in p.plan.launches.iter().enumerate() {
            self.launch(stream, p, l)?;
            after(i)?;
        }
        Ok(())
    }

    /// Greedy next token per sequence from the logits into `out_tokens`.
    pub fn argmax(&self, stream: &Arc<CudaStream>, p: &Ptrs) -> Result<(), CudaError> {
        let (logits, v) = (p.buf(p.plan.logits), p.plan.vocab as i32);
        self.go(
            stream,
            &KernelInstance::argmax(),
            sizes(0, p.b, 0, 0),
            &ArgmaxArgs {
                logits,
                v,
                out: p.out_tokens,
            },
        )
    }

    /// Next token per sequence drawn from the logits with per-sequence settings into
    /// `out_tokens`; `settings` = device pointers of temperature [B] f32, top-k [B] i32, top-p
    /// [B] f32 and (seed, step) [B, 2] u64.
    pub fn sample(
        &self,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        settings: [u64; 4],
    ) -> Result<(), CudaError> {
        let (logits, v) = (p.buf(p.plan.logits), p.plan.vocab as i32);
        let [temperature, top_k, top_p, seeds] = settings;
        self.go(
            stream,
            &KernelInstance::sample(),
            sizes(0, p.b, 0, 0),
            &SampleArgs {
                logits,
                v,
                temperature,
                top_k,
                top_p,
                seed_and_step: seeds,
                out: p.out_tokens,
            },
        )
    }

    fn launch(&self, stream: &Arc<CudaStream>, p: &Ptrs, launch: &Launch) -> Result<(), CudaError> {
        let plan = p.plan;
        let a = plan.attention;
        match launch {
            // Both are row gathers (`embedding`): table rows by token id, or each sequence's
            // last token row.
            Launch::Embedding { out, .. } | Launch::GatherLast { out, .. } => {
                let (src, ids, rows, scale) = match launch {
                    Launch::Embedding { table, scale, .. } => (p.w(table)?, p.tokens, p.t, *scale),
                    Launch::GatherLast { x, .. } => (p.buf(*x), p.last_index, p.b, 1.0),
                    _ => unreachable!(),
                };
                let k = KernelInstance::embedding(plan.buffers[*out].cols);
                self.go(
                    stream,
                    &k,
                    sizes(rows, p.b, 0, 0),
                    &EmbeddingArgs {
                        table: src,
                        ids,
                        out: p.buf(*out),
                        t: rows as i32,
                        scale,
                    },
                )
            }
            Launch::RmsNorm { x, w, eps, out } => {
                let rows = p.rows(*out);
                let k = KernelInstance::rmsnorm(plan.buffers[*out].cols);
                let args = RmsNormArgs {
                    x: p.buf(*x),
                    w: p.w(w)?,
                    out: p.buf(*out),
                    t: rows as i32,
                    eps: *eps,
                };
                self.go(stream, &k, sizes(rows, p.b, 0, 0), &args)
            }
            Launch::Linear {
                x,
                norm,
                w,
                format,
                epilogue,
                out,
            } => match QuantFormat::of(*format) {
                Some(f) => self.linear_quant(stream, p, *x, norm.as_ref(), w, f, epilogue, *out),
                None => self.linear(stream, p, *x, norm.as_ref(), w, epilogue, *out),
            },
            // The decode attention kernel rotates and appends the leading one-row sequences'
            // tokens itself (a decode step's every token).
            Launch::RopeAppend { .. } if p.decodes == p.b => Ok(()),
            Launch::RopeAppend {
                qkv,
                layer,
                inv_freq,
            } => {
                let d = p.decodes;
                let row_bytes = plan.buffers[*qkv].cols * 2;
                let q = p.buf(*qkv) + (d * row_bytes) as u64;
                let (kc, vc) = (p.k_cache(*layer), p.v_cache(*layer));
                let k = KernelInstance::rope_append(a.heads, a.kv_heads, a.head_dim, BLOCK);
                self.go(
                    stream,
                    &k,
                    sizes(p.t - d, p.b - d, 0, 0),
                    &RopeAppendArgs {
                        qkv: q,
                        positions: p.positions + (d * 4) as u64,
                        slot_mapping: p.slots + (d * 4) as u64,
                        k_cache: kc,
                        v_cache: vc,
                        t: (p.t - d) as i32,
                        inv_freq: p.w(inv_freq)?,
                    },
                )
            }
            Launch::Attention {
                qkv,
                layer,
                inv_freq,
                scale,
                window,
                out,
            } => {
                let w = *window as i32;
                let (q, kc, vc, o) = (
                    p.buf(*qkv),
                    p.k_cache(*layer),
                    p.v_cache(*layer),
                    p.buf(*out),
                );
                let d = p.decodes;
                if d < p.b {
                    // Sequences d.. (prompt chunks, and any one-row sequence after the first
                    // chunk): their rows' keys are in the cache already (rope_append).
                    let rest = |ptr: u64, stride: usize| ptr + (d * stride * 4) as u64;
                    let rt = RuntimeSizes {
                        longest_query: p.longest_query,
                        ..sizes(p.t - d, p.b - d, 0, 0)
                    };
                    self.go(
                        stream,
                        &self.prefill_attention,
                        rt,
                        &AttentionPrefillArgs {
                            qkv: q,
                            k_cache: kc,
                            v_cache: vc,
                            block_tables: rest(p.block_tables, p.max_blocks as usize),
                            max_blocks: p.max_blocks,
                            seq_lens: rest(p.seq_lens, 1),
                            query_start: rest(p.query_start, 1),
                            out: o,
                            b: (p.b - d) as i32,
                            scale: *scale,
                            window: w,
                        },
                    )?;
                }
                if d == 0 {
                    return Ok(());
                }
                // Sequences ..d: one token each, rows 0..d of the step.
                let n = splits(d, a.kv_heads, p.max_seq_len);
                let (po, ns) = (self.scratch, n as i32);
                let pml = po + (d * a.heads * n * a.head_dim * 4) as u64;
                let k = KernelInstance::attention_decode(a.heads, a.kv_heads, a.head_dim, BLOCK);
                self.go(
                    stream,
                    &k,
                    sizes(d, d, 0, n),
                    &AttentionDecodeArgs {
                        qkv: q,
                        k_cache: kc,
                        v_cache: vc,
                        block_tables: p.block_tables,
                        max_blocks: p.max_blocks,
                        seq_lens: p.seq_lens,
                        slot_mapping: p.slots,
                        inv_freq: p.w(inv_freq)?,
                        out: o,
                        b: d as i32,
                        scale: *scale,
                        partial_o: po,
                        partial_ml: pml,
                        max_splits: ns,
                        window: w,
                    },
                )?;
                if n > 1 {
                    let k = KernelInstance::attention_decode_merge(a.heads, a.head_dim);
                    self.go(
                        stream,
                        &k,
                        sizes(d, d, 0, n),
                        &DecodeMergeArgs {
                            partial_o: po,
                            partial_ml: pml,
                            seq_lens: p.seq_lens,
                            out: o,
                            b: d as i32,
                            max_splits: ns,
                            window: w,
                        },
                    )?;
                }
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        x: BufId,
        norm: Option<&Norm>,
        w: &str,
        epi: &Epilogue,
        out: BufId,
    ) -> Result<(), CudaError> {
        let plan = p.plan;
        let rows = p.rows(out);
        let k = plan.buffers[x].cols;
        let (n_rows, _) = *self
            .weight_cols
            .get(w)
            .ok_or_else(|| CudaError::Engine(format!("weight `{w}` is not a matrix")))?;
        let (wp, o) = (p.w(w)?, p.buf(out));
        let (xp, fold) = self.normed_input(stream, p, x, norm, rows)?;
        let (norm_w, eps) = fold.unwrap_or((0, 0.0));
        let fold = fold.is_some();
        let out_t = plan.buffers[out].dtype;
        let cols = plan.buffers[out].cols;
        if rows <= GEMV_MAX_ROWS {
            let r = epilogue_operand(p, epi)?;
            let (m, n) = (rows as i32, cols as i32);
            let inst = gemv_instance(rows, k, epilogue_kind(epi), fold, out_type(out_t));
            let rt = sizes(rows, p.b, cols, 0);
            let (x, w, residual, out) = (xp, wp, r, o);
            return if inst.family() == KernelFamily::Gemv {
                let args = GemvArgs {
                    x,
                    m,
                    w,
                    n,
                    residual,
                    out,
                    norm_w,
                    eps,
                };
                self.go(stream, &inst, rt, &args)
            } else {
                let args = GemvTcArgs {
                    x,
                    m,
                    w,
                    n,
                    residual,
                    out,
                };
                self.go(stream, &inst, rt, &args)
            };
        }
        self.gemm(
            stream,
            p,
            Product::Bf16 { x: xp, w: wp },
            n_rows,
            k,
            epi,
            out,
        )
    }

    /// The input a projection's product reads and the norm its GEMV folds: at one row a folded
    /// norm stays in the GEMV's prologue (returned as its weight pointer and epsilon); at more
    /// rows it runs first as `rmsnorm` into scratch, which the product then reads.
    fn normed_input(
        &self,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        x: BufId,
        norm: Option<&Norm>,
        rows: usize,
    ) -> Result<(u64, Option<(u64, f32)>), CudaError> {
        let xp = p.buf(x);
        let Some(nm) = norm else {
            return Ok((xp, None));
        };
        let (w, eps) = (p.w(&nm.w)?, nm.eps);
        match rows {
            0 => return Ok((xp, None)),
            1 => return Ok((xp, Some((w, eps)))),
            _ => {}
        }
        let (k, dst) = (p.plan.buffers[x].cols, self.norm_scratch);
        let args = RmsNormArgs {
            x: xp,
            w,
            out: dst,
            t: rows as i32,
            eps,
        };
        self.go(
            stream,
            &KernelInstance::rmsnorm(k),
            sizes(rows, p.b, 0, 0),
            &args,
        )?;
        Ok((dst, None))
    }

    /// A `Linear` whose weight is in a weight format (`gemv_q.cu`): for one row the quantized
    /// GEMV with the norm, if any, folded into its prologue; up to `GEMV_MAX_ROWS` rows the norm
    /// into scratch, then the quantized GEMV; beyond, the norm into scratch (fp8: the input
    /// rounded to E4M3 there), the weight dequantized to bf16 scratch and the prefill GEMM.
    #[allow(clippy::too_many_arguments)]
    fn linear_quant(
        &self,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        x: BufId,
        norm: Option<&Norm>,
        w: &str,
        f: QuantFormat,
        epi: &Epilogue,
        out: BufId,
    ) -> Result<(), CudaError> {
        let plan = p.plan;
        let rows = p.rows(out);
        let k = plan.buffers[x].cols;
        let cols = plan.buffers[out].cols;
        let n_rows = epi.weight_rows(cols);
        let (xp, fold) = self.normed_input(stream, p, x, norm, rows)?;
        let (norm_w, eps) = fold.unwrap_or((0, 0.0));
        let fold = fold.is_some();
        let q = p.w(w)?;
        let scale = p.w(&format!("{w}.scale"))?;
        let zero = match f.third_part() {
            Some(part) => p.w(&format!("{w}{part}"))?,
            None => 0,
        };
        if rows <= GEMV_MAX_ROWS {
            let r = epilogue_operand(p, epi)?;
            let ty = out_type(plan.buffers[out].dtype);
            let inst = KernelInstance::gemv_q(k, epilogue_kind(epi), f, fold, ty);
            let (m, n, o) = (rows as i32, cols as i32, p.buf(out));
            return self.go(
                stream,
                &inst,
                sizes(rows, p.b, cols, 0),
                &GemvQArgs {
                    x: xp,
                    m,
                    q,
                    scale,
                    zero,
                    n,
                    residual: r,
                    out: o,
                    norm_w,
                    eps,
                },
            );
        }
        if f == QuantFormat::Fp8 {
            let shape = Fp8Shape {
                n: n_rows,
                k,
                m: rows,
                accumulate: matches!(epi, Epilogue::Residual(_) | Epilogue::Bias(_)),
            };
            let bf16_out = plan.buffers[out].dtype == BufType::Bf16 || epi.is_gated();
            let algo = self.fp8.as_ref().and_then(|g| g.supports(&shape));
            if let (Some(algo), true) = (algo, bf16_out) {
                // W8A8 on FP8 tensor cores: the activations' E4M3 codes and row scales (in the
                // weight scratch, which this product does not need), then cuBLASLt.
                let codes = self.weight_scratch;
                let scales = codes + fp8_codes_bytes(rows, k) as u64;
                self.go(
                    stream,
                    &KernelInstance::act_fp8(k, true),
                    sizes(rows, p.b, 0, 0),
                    &ActFp8Args {
                        x: xp,
                        out: codes,
                        scales,
                        t: rows as i32,
                    },
                )?;
                let product = Product::Fp8 {
                    shape,
                    algo,
                    w: (q, scale),
                    x: (codes, scales),
                };
                return self.gemm(stream, p, product, n_rows, k, epi, out);
            }
        }
        let xp = if f == QuantFormat::Fp8 {
            // W8A8: the activations rounded to E4M3 per row (in place over the normalized input).
            let dst = self.norm_scratch;
            self.go(
                stream,
                &KernelInstance::act_fp8(k, false),
                sizes(rows, p.b, 0, 0),
                &ActFp8Args {
                    x: xp,
                    out: dst,
                    scales: 0,
                    t: rows as i32,
                },
            )?;
            dst
        } else {
            xp
        };
        let wq = self.weight_scratch;
        self.go(
            stream,
            &KernelInstance::dequant(k, f),
            sizes(0, p.b, n_rows, 0),
            &DequantArgs {
                q,
                scale,
                zero,
                r: n_rows as i32,
                out: wq,
            },
        )?;
        self.gemm(
            stream,
            p,
            Product::Bf16 { x: xp, w: wq },
            n_rows,
            k,
            epi,
            out,
        )
    }

    /// A prefill product on cuBLAS(Lt) with its epilogue: `out = epi(x · wᵀ)` for a `[n_rows, k]`
    /// weight, `x` already normalized.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        stream: &Arc<CudaStream>,
        p: &Ptrs,
        product: Product,
        n_rows: usize,
        k: usize,
        epi: &Epilogue,
        out: BufId,
    ) -> Result<(), CudaError> {
        let plan = p.plan;
        let rows = p.rows(out);
        let o = p.buf(out);
        let out_t = plan.buffers[out].dtype;
        let cols = plan.buffers[out].cols;
        // cuBLAS: row-major C[rows, n] = X[rows, k] · W[n, k]ᵀ  ⇔  column-major Cᵀ = W · Xᵀ ("TN").
        // A residual is accumulated by the GEMM itself (beta = 1 over C = out), in place where
        // the plan put the output over the residual, else over a copy of it.
        let dst = if epi.is_gated() { self.scratch } else { o };
        if let Epilogue::Bias(b) = epi {
            // The bias rows first: the GEMM accumulates onto them (beta = 1).
            self.go(
                stream,
                &KernelInstance::bias_rows(cols),
                sizes(rows, p.b, 0, 0),
                &BiasRowsArgs {
                    bias: p.w(b)?,
                    out: o,
                    t: rows as i32,
                },
            )?;
        }
        if let Epilogue::Residual(res) = epi {
            let rp = p.buf(*res);
            if rp != o {
                // SAFETY: both buffers hold rows × cols bf16 (arena slots sized by the plan).
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        o,
                        rp,
                        rows * cols * 2,
                        stream.cu_stream(),
                    )?;
                }
            }
        }
        let how = match product {
            Product::Fp8 { shape, algo, w, x } => {
                let fp8 = self.fp8.as_ref().expect("an FP8 product has its handle");
                // SAFETY: the codes and scales were written for these sizes (weights by the
                // engine, activations by act_fp8); dst holds rows × n_rows bf16.
                unsafe { fp8.run(stream, &shape, &algo, w, x, dst)? };
                "cublasLt fp8"
            }
            Product::Bf16 { x: xp, w: wp } => {
                // The algorithm chosen for this shape at build where there is one and it runs,
                // else cuBLAS's default.
                let shape = GemmShape::of(n_rows, k, epi, out_t);
                let tuned = self.gemm_algos.as_ref().and_then(|(t, lt)| {
                    let c = t.lookup(&shape, rows)?;
                    // SAFETY: pointers address device buffers of the sizes the plan declares.
                    unsafe { lt.run(stream, &shape, rows, &c.algo, wp, xp, dst) }.ok()
                });
                match tuned {
                    Some(()) => "cublasLt",
                    None => {
                        // SAFETY: as above.
                        unsafe { run_default(&self.blas, &shape, rows, wp, xp, dst)? };
                        "cublas"
                    }
                }
            }
        };
        self.mark(stream, &format!("{how} gemm {rows}x{n_rows}x{k}"))?;
        let gate = match epi {
            Epilogue::Gated => Some(KernelInstance::silu_mul(cols)),
            Epilogue::GatedGelu => Some(KernelInstance::gelu_mul(cols)),
            _ => None,
        };
        if let Some(k) = gate {
            let args = GatedRowsArgs {
                gu: dst,
                out: o,
                t: rows as i32,
            };
            self.go(stream, &k, sizes(rows, p.b, 0, 0), &args)?;
        }
        Ok(())
    }
}
