//! Kernel instances: which template of `kernels_templates/` with which constants, how to launch
//! it, and compiling a set of instances to CUBIN images.
//!
//! A [`KernelInstance`] is a template family plus its template arguments, rendered as the C++
//! *name expression* (`gemv<4096, 1, 0, __nv_bfloat16>`) that NVRTC instantiates and maps to the
//! lowered (mangled) symbol the driver loads (`cuModuleGetFunction`). The lowering builds instances
//! with the constructors ([`KernelInstance::rmsnorm`], [`KernelInstance::gemv`], …), reads their
//! launch shape from [`KernelInstance::launch_dims`], and [`compile`] turns a list of them into
//! [`CompiledKernel`]s: one NVRTC program per template file, so every instance of a file shares
//! one CUBIN module. Kernel argument lists are documented in each template file's header and on
//! the constructors below.

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::nvrtc::{self, CompileOptions, NvrtcError};

/// The shared header every template includes as `"common.cuh"`.
pub const COMMON_HEADER: &str = include_str!("../../../kernels_templates/common.cuh");

/// One file of `kernels_templates/`: one NVRTC program, one CUBIN module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TemplateFile {
    /// `embedding.cu`
    Embedding,
    /// `rmsnorm.cu`
    RmsNorm,
    /// `gemv.cu`
    Gemv,
    /// `gemv_tc.cu`
    GemvTc,
    /// `elementwise.cu`
    Elementwise,
    /// `rope.cu`
    Rope,
    /// `attention_decode.cu`
    AttentionDecode,
    /// `attention_prefill.cu`
    AttentionPrefill,
    /// `attention_prefill_simple.cu`
    AttentionPrefillSimple,
    /// `sampling.cu`
    Sampling,
}

impl TemplateFile {
    /// Every template file.
    pub const ALL: [TemplateFile; 10] = [
        TemplateFile::Embedding,
        TemplateFile::RmsNorm,
        TemplateFile::Gemv,
        TemplateFile::GemvTc,
        TemplateFile::Elementwise,
        TemplateFile::Rope,
        TemplateFile::AttentionDecode,
        TemplateFile::AttentionPrefill,
        TemplateFile::AttentionPrefillSimple,
        TemplateFile::Sampling,
    ];

    /// The file name inside `kernels_templates/`.
    pub fn file_name(self) -> &'static str {
        match self {
            TemplateFile::Embedding => "embedding.cu",
            TemplateFile::RmsNorm => "rmsnorm.cu",
            TemplateFile::Gemv => "gemv.cu",
            TemplateFile::GemvTc => "gemv_tc.cu",
            TemplateFile::Elementwise => "elementwise.cu",
            TemplateFile::Rope => "rope.cu",
            TemplateFile::AttentionDecode => "attention_decode.cu",
            TemplateFile::AttentionPrefill => "attention_prefill.cu",
            TemplateFile::AttentionPrefillSimple => "attention_prefill_simple.cu",
            TemplateFile::Sampling => "sampling.cu",
        }
    }

    /// The CUDA source (embedded at build time).
    pub fn source(self) -> &'static str {
        match self {
            TemplateFile::Embedding => include_str!("../../../kernels_templates/embedding.cu"),
            TemplateFile::RmsNorm => include_str!("../../../kernels_templates/rmsnorm.cu"),
            TemplateFile::Gemv => include_str!("../../../kernels_templates/gemv.cu"),
            TemplateFile::GemvTc => include_str!("../../../kernels_templates/gemv_tc.cu"),
            TemplateFile::Elementwise => include_str!("../../../kernels_templates/elementwise.cu"),
            TemplateFile::Rope => include_str!("../../../kernels_templates/rope.cu"),
            TemplateFile::AttentionDecode => {
                include_str!("../../../kernels_templates/attention_decode.cu")
            }
            TemplateFile::AttentionPrefill => {
                include_str!("../../../kernels_templates/attention_prefill.cu")
            }
            TemplateFile::AttentionPrefillSimple => {
                include_str!("../../../kernels_templates/attention_prefill_simple.cu")
            }
            TemplateFile::Sampling => include_str!("../../../kernels_templates/sampling.cu"),
        }
    }
}

/// A kernel template (a `__global__` function of a template file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KernelFamily {
    /// `embedding<H>`
    Embedding,
    /// `rmsnorm<H>`
    RmsNorm,
    /// `add_rmsnorm<H>`
    AddRmsNorm,
    /// `gemv<K, MMAX, EPI, OutT>` (CUDA cores)
    Gemv,
    /// `gemv_tc<K, MMAX, EPI, OutT>` (tensor cores; same arguments as `gemv`)
    GemvTc,
    /// `add_inplace` (not a template)
    AddInplace,
    /// `silu_mul<F>`
    SiluMul,
    /// `rope_append<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`
    RopeAppend,
    /// `attention_decode<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`
    AttentionDecode,
    /// `attention_decode_merge<HEADS, HEAD_DIM>`
    AttentionDecodeMerge,
    /// `attention_prefill<HEADS, KV_HEADS, HEAD_DIM, BLOCK>` (tensor cores, HEAD_DIM 64 or 128)
    AttentionPrefill,
    /// `attention_prefill_simple<HEADS, KV_HEADS, HEAD_DIM, BLOCK>` (CUDA cores, HEAD_DIM % 32 == 0)
    AttentionPrefillSimple,
    /// `argmax` (not a template)
    Argmax,
    /// `sample` (not a template)
    Sample,
}

impl KernelFamily {
    /// The C++ function name.
    pub fn function(self) -> &'static str {
        match self {
            KernelFamily::Embedding => "embedding",
            KernelFamily::RmsNorm => "rmsnorm",
            KernelFamily::AddRmsNorm => "add_rmsnorm",
            KernelFamily::Gemv => "gemv",
            KernelFamily::GemvTc => "gemv_tc",
            KernelFamily::AddInplace => "add_inplace",
            KernelFamily::SiluMul => "silu_mul",
            KernelFamily::RopeAppend => "rope_append",
            KernelFamily::AttentionDecode => "attention_decode",
            KernelFamily::AttentionDecodeMerge => "attention_decode_merge",
            KernelFamily::AttentionPrefill => "attention_prefill",
            KernelFamily::AttentionPrefillSimple => "attention_prefill_simple",
            KernelFamily::Argmax => "argmax",
            KernelFamily::Sample => "sample",
        }
    }

    /// The template file that defines it.
    pub fn file(self) -> TemplateFile {
        match self {
            KernelFamily::Embedding => TemplateFile::Embedding,
            KernelFamily::RmsNorm | KernelFamily::AddRmsNorm => TemplateFile::RmsNorm,
            KernelFamily::Gemv => TemplateFile::Gemv,
            KernelFamily::GemvTc => TemplateFile::GemvTc,
            KernelFamily::AddInplace | KernelFamily::SiluMul => TemplateFile::Elementwise,
            KernelFamily::RopeAppend => TemplateFile::Rope,
            KernelFamily::AttentionDecode | KernelFamily::AttentionDecodeMerge => {
                TemplateFile::AttentionDecode
            }
            KernelFamily::AttentionPrefill => TemplateFile::AttentionPrefill,
            KernelFamily::AttentionPrefillSimple => TemplateFile::AttentionPrefillSimple,
            KernelFamily::Argmax | KernelFamily::Sample => TemplateFile::Sampling,
        }
    }
}

/// The epilogue of a decode GEMV (`EPI` template argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GemvEpilogue {
    /// `out = x·Wᵀ`
    Plain = 0,
    /// `out = x·Wᵀ + residual` (residual `[M, N]`, may alias `out`)
    Residual = 1,
    /// Gated MLP: W has 2N rows (gate, then up); `out = silu(x·W_gᵀ) * (x·W_uᵀ)`.
    Gated = 2,
}

/// Element type of a kernel output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutType {
    /// `__nv_bfloat16`
    Bf16,
    /// `float` (logits)
    F32,
}

impl OutType {
    /// The C++ type name.
    pub fn cuda_name(self) -> &'static str {
        match self {
            OutType::Bf16 => "__nv_bfloat16",
            OutType::F32 => "float",
        }
    }
}

/// One template argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TemplateArg {
    /// An integer constant.
    Int(i64),
    /// A type.
    Type(OutType),
}

impl std::fmt::Display for TemplateArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateArg::Int(v) => write!(f, "{v}"),
            TemplateArg::Type(t) => f.write_str(t.cuda_name()),
        }
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchDims {
    /// Grid dimensions (every one at least 1).
    pub grid: (u32, u32, u32),
    /// Block dimensions.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes (0 for every current template: all use static memory).
    pub shared_bytes: u32,
}

/// The runtime sizes a launch depends on; each family reads only the fields its
/// [`KernelInstance::launch_dims`] documentation names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeSizes {
    /// T: tokens of the step.
    pub tokens: usize,
    /// B: sequences of the step (decode: equal to the tokens).
    pub batch: usize,
    /// N: output columns of a GEMV.
    pub n: usize,
    /// Element count of `add_inplace`.
    pub elements: usize,
    /// Split-KV count of decode attention (see [`decode_splits`]).
    pub max_splits: usize,
}

/// Threads per CTA of the templates (mirrors the `#define`s in the template files).
mod threads {
    pub const EMBEDDING: u32 = 128;
    pub const GEMV_WARPS: u32 = 8;
    pub const ELEMENTWISE: u32 = 256;
    pub const ROPE: u32 = 128;
    pub const DECODE: u32 = 128;
    pub const PREFILL: u32 = 128;
    pub const PREFILL_ROWS: usize = 64;
    pub const PREFILL_SIMPLE: u32 = 128;
    pub const PREFILL_SIMPLE_ROWS: usize = 32;
    pub const SAMPLE: u32 = 1024;
}

/// Tokens per decode split tile (`DEC_TILE` in `attention_decode.cu`).
pub const DECODE_TILE: usize = 64;

/// A good `max_splits` for decode attention: enough (kv head, split) CTAs to cover the GPU
/// twice over for a batch of `batch` sequences, with no split shorter than one 64-token tile of
/// `max_context` tokens. `sm_count` is 132 on an H100 SXM.
pub fn decode_splits(batch: usize, kv_heads: usize, max_context: usize, sm_count: usize) -> usize {
    let ctas = batch.max(1) * kv_heads.max(1);
    let want = (2 * sm_count).div_ceil(ctas);
    let most = max_context.div_ceil(DECODE_TILE).max(1);
    want.clamp(1, most)
}

fn clamp_grid(v: usize) -> u32 {
    v.clamp(1, u32::MAX as usize) as u32
}

/// One kernel template with its constants: what codegen compiles and the runtime launches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelInstance {
    /// The template.
    pub family: KernelFamily,
    /// Its template arguments, in order.
    pub args: Vec<TemplateArg>,
    /// The C++ name expression NVRTC instantiates (`rmsnorm<4096>`).
    pub name_expr: String,
}

impl KernelInstance {
    fn new(family: KernelFamily, args: Vec<TemplateArg>) -> Self {
        let name_expr = if args.is_empty() {
            family.function().to_string()
        } else {
            let list: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            format!("{}<{}>", family.function(), list.join(", "))
        };
        Self {
            family,
            args,
            name_expr,
        }
    }

    fn ints(family: KernelFamily, vals: &[usize]) -> Self {
        Self::new(
            family,
            vals.iter().map(|&v| TemplateArg::Int(v as i64)).collect(),
        )
    }

    fn int_arg(&self, i: usize) -> usize {
        match self.args.get(i) {
            Some(TemplateArg::Int(v)) => *v as usize,
            _ => 0,
        }
    }

    /// `embedding<H>(const bf16* table, const int* ids, bf16* out, int T)`.
    pub fn embedding(hidden: usize) -> Self {
        Self::ints(KernelFamily::Embedding, &[hidden])
    }

    /// `rmsnorm<H>(const bf16* x, const bf16* w, bf16* out, int T, float eps)`.
    pub fn rmsnorm(hidden: usize) -> Self {
        Self::ints(KernelFamily::RmsNorm, &[hidden])
    }

    /// `add_rmsnorm<H>(bf16* residual, const bf16* x, const bf16* w, bf16* out, int T, float eps)`:
    /// `residual += x` (bf16), then `out = rmsnorm(residual)`.
    pub fn add_rmsnorm(hidden: usize) -> Self {
        Self::ints(KernelFamily::AddRmsNorm, &[hidden])
    }

    /// `gemv<K, MMAX, EPI, OutT>(const bf16* x, int M, const bf16* w, int N,
    /// const bf16* residual, OutT* out)` for `M <= mmax` rows, on CUDA cores. The fastest choice
    /// at M = 1 (use `mmax = 1`); from M = 2 it becomes ALU-bound: use
    /// [`KernelInstance::gemv_tc`] there (measured in `bench/RESULTS.md`).
    pub fn gemv(k: usize, mmax: usize, epi: GemvEpilogue, out: OutType) -> Self {
        Self::new(
            KernelFamily::Gemv,
            vec![
                TemplateArg::Int(k as i64),
                TemplateArg::Int(mmax as i64),
                TemplateArg::Int(epi as i64),
                TemplateArg::Type(out),
            ],
        )
    }

    /// `gemv_tc<K, MMAX, EPI, OutT>`: the [`KernelInstance::gemv`] contract on tensor cores
    /// (`K % 32 == 0`, `mmax <= 8`; its cost does not depend on M).
    pub fn gemv_tc(k: usize, mmax: usize, epi: GemvEpilogue, out: OutType) -> Self {
        Self::new(
            KernelFamily::GemvTc,
            vec![
                TemplateArg::Int(k as i64),
                TemplateArg::Int(mmax as i64),
                TemplateArg::Int(epi as i64),
                TemplateArg::Type(out),
            ],
        )
    }

    /// `add_inplace(bf16* out, const bf16* r, long long n)`.
    pub fn add_inplace() -> Self {
        Self::new(KernelFamily::AddInplace, Vec::new())
    }

    /// `silu_mul<F>(const bf16* gu, bf16* out, int T)`.
    pub fn silu_mul(ffn: usize) -> Self {
        Self::ints(KernelFamily::SiluMul, &[ffn])
    }

    /// `rope_append<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(bf16* qkv, const int* positions,
    /// const int* slot_mapping, bf16* k_cache, bf16* v_cache, int T, float theta)`.
    pub fn rope_append(heads: usize, kv_heads: usize, head_dim: usize, block: usize) -> Self {
        Self::ints(
            KernelFamily::RopeAppend,
            &[heads, kv_heads, head_dim, block],
        )
    }

    /// `attention_decode<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(const bf16* qkv, const bf16* k_cache,
    /// const bf16* v_cache, const int* block_tables, int max_blocks, const int* seq_lens,
    /// bf16* out, int B, float scale, float* partial_o, float* partial_ml, int max_splits)`.
    pub fn attention_decode(heads: usize, kv_heads: usize, head_dim: usize, block: usize) -> Self {
        Self::ints(
            KernelFamily::AttentionDecode,
            &[heads, kv_heads, head_dim, block],
        )
    }

    /// `attention_decode_merge<HEADS, HEAD_DIM>(const float* partial_o, const float* partial_ml,
    /// const int* seq_lens, bf16* out, int B, int max_splits)`.
    pub fn attention_decode_merge(heads: usize, head_dim: usize) -> Self {
        Self::ints(KernelFamily::AttentionDecodeMerge, &[heads, head_dim])
    }

    /// `attention_prefill<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(const bf16* qkv, const bf16* k_cache,
    /// const bf16* v_cache, const int* block_tables, int max_blocks, const int* seq_lens,
    /// const int* query_start, bf16* out, int B, float scale)`; HEAD_DIM 64 or 128.
    pub fn attention_prefill(heads: usize, kv_heads: usize, head_dim: usize, block: usize) -> Self {
        Self::ints(
            KernelFamily::AttentionPrefill,
            &[heads, kv_heads, head_dim, block],
        )
    }

    /// Same signature as [`KernelInstance::attention_prefill`], on CUDA cores (any
    /// `HEAD_DIM % 32 == 0`).
    pub fn attention_prefill_simple(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block: usize,
    ) -> Self {
        Self::ints(
            KernelFamily::AttentionPrefillSimple,
            &[heads, kv_heads, head_dim, block],
        )
    }

    /// The prefill attention for a head size: tensor cores for 64 and 128, else the CUDA-core one.
    pub fn attention_prefill_for(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block: usize,
    ) -> Self {
        if head_dim == 64 || head_dim == 128 {
            Self::attention_prefill(heads, kv_heads, head_dim, block)
        } else {
            Self::attention_prefill_simple(heads, kv_heads, head_dim, block)
        }
    }

    /// `argmax(const float* logits, int V, int* out)`.
    pub fn argmax() -> Self {
        Self::new(KernelFamily::Argmax, Vec::new())
    }

    /// `sample(const float* logits, int V, const float* temperature, const int* top_k,
    /// const float* top_p, const unsigned long long* seed_and_step /*[B,2]*/, int* out)`.
    pub fn sample() -> Self {
        Self::new(KernelFamily::Sample, Vec::new())
    }

    /// Launch shape for these runtime sizes:
    /// - embedding, rmsnorm, add_rmsnorm, rope_append: grid `tokens`;
    /// - gemv, gemv_tc: grid from `n` (output columns);
    /// - add_inplace: from `elements`; silu_mul: from `tokens`;
    /// - attention_decode: (`max_splits`, kv heads, `batch`); the merge: (heads, `batch`);
    /// - attention_prefill(_simple): (from `tokens`, heads, `batch`);
    /// - argmax, sample: grid `batch`.
    ///
    /// Grid dimensions are at least 1, so a step with no work still launches validly (the
    /// kernels bounds-check and exit).
    pub fn launch_dims(&self, rt: &RuntimeSizes) -> LaunchDims {
        let one = |grid: (usize, usize, usize), block: u32| LaunchDims {
            grid: (clamp_grid(grid.0), clamp_grid(grid.1), clamp_grid(grid.2)),
            block: (block, 1, 1),
            shared_bytes: 0,
        };
        match self.family {
            KernelFamily::Embedding => one((rt.tokens, 1, 1), threads::EMBEDDING),
            KernelFamily::RmsNorm | KernelFamily::AddRmsNorm => {
                let vec = self.int_arg(0) / 8;
                let t = if vec >= 256 {
                    256
                } else {
                    vec.div_ceil(32) * 32
                };
                one((rt.tokens, 1, 1), t.max(32) as u32)
            }
            KernelFamily::Gemv => {
                let per_cta = threads::GEMV_WARPS as usize * self.gemv_cols_per_warp();
                one((rt.n.div_ceil(per_cta), 1, 1), threads::GEMV_WARPS * 32)
            }
            KernelFamily::GemvTc => one((rt.n.div_ceil(16), 1, 1), threads::GEMV_WARPS * 32),
            KernelFamily::AddInplace => {
                let work = rt.elements.div_ceil(8);
                one(
                    (work.div_ceil(threads::ELEMENTWISE as usize).min(8192), 1, 1),
                    threads::ELEMENTWISE,
                )
            }
            KernelFamily::SiluMul => {
                let work = rt.tokens * self.int_arg(0) / 8;
                one(
                    (work.div_ceil(threads::ELEMENTWISE as usize).min(8192), 1, 1),
                    threads::ELEMENTWISE,
                )
            }
            KernelFamily::RopeAppend => one((rt.tokens, 1, 1), threads::ROPE),
            KernelFamily::AttentionDecode => {
                one((rt.max_splits, self.int_arg(1), rt.batch), threads::DECODE)
            }
            KernelFamily::AttentionDecodeMerge => {
                one((self.int_arg(0), rt.batch, 1), self.int_arg(1) as u32)
            }
            KernelFamily::AttentionPrefill => one(
                (
                    rt.tokens.div_ceil(threads::PREFILL_ROWS),
                    self.int_arg(0),
                    rt.batch,
                ),
                threads::PREFILL,
            ),
            KernelFamily::AttentionPrefillSimple => one(
                (
                    rt.tokens.div_ceil(threads::PREFILL_SIMPLE_ROWS),
                    self.int_arg(0),
                    rt.batch,
                ),
                threads::PREFILL_SIMPLE,
            ),
            KernelFamily::Argmax | KernelFamily::Sample => one((rt.batch, 1, 1), threads::SAMPLE),
        }
    }

    /// Output columns per warp of a GEMV instance (`GemvCfg::ROWS` in `gemv.cu`).
    fn gemv_cols_per_warp(&self) -> usize {
        let mmax = self.int_arg(1);
        let epi = self.int_arg(2);
        if mmax >= 4 && epi != GemvEpilogue::Gated as usize {
            2
        } else {
            1
        }
    }
}

/// The dimensions of a Llama-family model that its kernels are specialized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlamaDims {
    /// hidden_size
    pub hidden: usize,
    /// num_attention_heads
    pub heads: usize,
    /// num_key_value_heads
    pub kv_heads: usize,
    /// head_dim
    pub head_dim: usize,
    /// intermediate_size
    pub ffn: usize,
    /// vocab_size
    pub vocab: usize,
    /// Tokens per KV-cache block.
    pub kv_block: usize,
    /// Most rows a decode GEMV serves (larger decode batches go to cuBLAS); at most 8.
    pub max_gemv_rows: usize,
}

impl LlamaDims {
    /// SmolLM2-135M: hidden 576, 9 heads, 3 KV heads, head_dim 64, FFN 1536, vocab 49152.
    pub fn smollm2_135m() -> Self {
        Self {
            hidden: 576,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            ffn: 1536,
            vocab: 49152,
            kv_block: 16,
            max_gemv_rows: 8,
        }
    }

    /// Llama-2-7B: hidden 4096, 32/32 heads, head_dim 128, FFN 11008, vocab 32000.
    pub fn llama2_7b() -> Self {
        Self {
            hidden: 4096,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            ffn: 11008,
            vocab: 32000,
            kv_block: 16,
            max_gemv_rows: 8,
        }
    }

    /// Llama-3-8B: hidden 4096, 32/8 heads, head_dim 128, FFN 14336, vocab 128256.
    pub fn llama3_8b() -> Self {
        Self {
            hidden: 4096,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            ffn: 14336,
            vocab: 128256,
            kv_block: 16,
            max_gemv_rows: 8,
        }
    }

    /// Width of the fused QKV projection.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// Every kernel instance the compiler can emit for a Llama-family model, without duplicates:
/// embedding; rmsnorm and add_rmsnorm; the decode GEMVs (QKV, O + residual, gate_up gated,
/// down + residual, lm_head in f32, and plain bf16 forms of each K) on CUDA cores for MMAX
/// buckets 1 and `max_gemv_rows`, and on tensor cores for `max_gemv_rows`; the prefill GEMM epilogues (add_inplace, silu_mul); rope_append; decode
/// attention and its merge; prefill attention (tensor-core when the head size allows, and the
/// CUDA-core fallback); argmax and sample.
pub fn llama_kernels(cfg: &LlamaDims) -> Vec<KernelInstance> {
    let (h, hd, heads, kv, blk) = (
        cfg.hidden,
        cfg.head_dim,
        cfg.heads,
        cfg.kv_heads,
        cfg.kv_block,
    );
    let attn = heads * hd;
    let mut out = vec![
        KernelInstance::embedding(h),
        KernelInstance::rmsnorm(h),
        KernelInstance::add_rmsnorm(h),
    ];
    let mmax = cfg.max_gemv_rows.clamp(1, 8);
    let mut buckets = vec![1, mmax];
    buckets.dedup();
    use GemvEpilogue::*;
    let gemvs = [
        (h, Plain, OutType::Bf16),          // QKV
        (attn, Residual, OutType::Bf16),    // O + residual
        (h, Gated, OutType::Bf16),          // gate_up -> silu·mul
        (cfg.ffn, Residual, OutType::Bf16), // down + residual
        (h, Plain, OutType::F32),           // lm_head
        (attn, Plain, OutType::Bf16),       // unfused O
        (cfg.ffn, Plain, OutType::Bf16),    // unfused down
    ];
    for &m in &buckets {
        for &(k, epi, ty) in &gemvs {
            out.push(KernelInstance::gemv(k, m, epi, ty));
        }
    }
    for &(k, epi, ty) in &gemvs {
        if k % 32 == 0 {
            out.push(KernelInstance::gemv_tc(k, mmax, epi, ty));
        }
    }
    out.extend([
        KernelInstance::add_inplace(),
        KernelInstance::silu_mul(cfg.ffn),
        KernelInstance::rope_append(heads, kv, hd, blk),
        KernelInstance::attention_decode(heads, kv, hd, blk),
        KernelInstance::attention_decode_merge(heads, hd),
        KernelInstance::attention_prefill_for(heads, kv, hd, blk),
        KernelInstance::attention_prefill_simple(heads, kv, hd, blk),
        KernelInstance::argmax(),
        KernelInstance::sample(),
    ]);
    let mut seen = std::collections::HashSet::new();
    out.retain(|k| seen.insert(k.name_expr.clone()));
    out
}

/// A compiled kernel: its lowered symbol inside a CUBIN module shared by every instance of the
/// same template file.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    /// The instance's name expression (`rmsnorm<4096>`).
    pub name_expr: String,
    /// The symbol to load (`cuModuleGetFunction`, cudarc `module.load_function`).
    pub lowered_name: String,
    /// The template file (the module) it lives in.
    pub file: TemplateFile,
    /// The module's CUBIN image (shared by the kernels of one file).
    pub cubin: Arc<[u8]>,
}

/// Compiles `instances` for `arch` (`sm_90`, …): one NVRTC program per template file (compiled
/// in parallel), returned in the order of `instances` (duplicates compiled once).
pub fn compile(
    instances: &[KernelInstance],
    arch: &str,
) -> Result<Vec<CompiledKernel>, NvrtcError> {
    let opts = CompileOptions::for_arch(arch)?;
    compile_with(instances, &opts)
}

/// [`compile`] with explicit NVRTC options.
pub fn compile_with(
    instances: &[KernelInstance],
    opts: &CompileOptions,
) -> Result<Vec<CompiledKernel>, NvrtcError> {
    nvrtc::ensure_nvrtc()?;
    let mut groups: BTreeMap<TemplateFile, Vec<String>> = BTreeMap::new();
    for k in instances {
        let g = groups.entry(k.family.file()).or_default();
        if !g.contains(&k.name_expr) {
            g.push(k.name_expr.clone());
        }
    }
    let groups: Vec<(TemplateFile, Vec<String>)> = groups.into_iter().collect();
    let modules: Vec<(TemplateFile, nvrtc::Cubin)> = groups
        .par_iter()
        .map(|(file, exprs)| {
            let cubin = nvrtc::compile_cubin(
                file.file_name(),
                file.source(),
                &[("common.cuh", COMMON_HEADER)],
                exprs,
                opts,
            )?;
            Ok((*file, cubin))
        })
        .collect::<Result<_, NvrtcError>>()?;

    let mut by_expr: BTreeMap<&str, (TemplateFile, &str, Arc<[u8]>)> = BTreeMap::new();
    for (file, cubin) in &modules {
        let image: Arc<[u8]> = Arc::from(cubin.image.as_slice());
        for (expr, lowered) in &cubin.lowered_names {
            by_expr.insert(expr.as_str(), (*file, lowered.as_str(), image.clone()));
        }
    }
    Ok(instances
        .iter()
        .map(|k| {
            let (file, lowered, cubin) = by_expr[k.name_expr.as_str()].clone();
            CompiledKernel {
                name_expr: k.name_expr.clone(),
                lowered_name: lowered.to_string(),
                file,
                cubin,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_expressions_render_template_arguments() {
        assert_eq!(KernelInstance::rmsnorm(4096).name_expr, "rmsnorm<4096>");
        assert_eq!(
            KernelInstance::gemv(4096, 1, GemvEpilogue::Gated, OutType::Bf16).name_expr,
            "gemv<4096, 1, 2, __nv_bfloat16>"
        );
        assert_eq!(
            KernelInstance::gemv_tc(14336, 8, GemvEpilogue::Residual, OutType::F32).name_expr,
            "gemv_tc<14336, 8, 1, float>"
        );
        assert_eq!(
            KernelInstance::rope_append(32, 8, 128, 16).name_expr,
            "rope_append<32, 8, 128, 16>"
        );
        assert_eq!(
            KernelInstance::attention_decode_merge(32, 128).name_expr,
            "attention_decode_merge<32, 128>"
        );
        assert_eq!(KernelInstance::argmax().name_expr, "argmax");
        assert_eq!(
            KernelInstance::add_inplace().family.file(),
            TemplateFile::Elementwise
        );
    }

    #[test]
    fn prefill_uses_tensor_cores_only_for_supported_head_sizes() {
        assert_eq!(
            KernelInstance::attention_prefill_for(32, 8, 128, 16).family,
            KernelFamily::AttentionPrefill
        );
        assert_eq!(
            KernelInstance::attention_prefill_for(8, 8, 96, 16).family,
            KernelFamily::AttentionPrefillSimple
        );
    }

    #[test]
    fn llama_kernel_lists_have_no_duplicates_and_cover_every_family() {
        for cfg in [
            LlamaDims::smollm2_135m(),
            LlamaDims::llama2_7b(),
            LlamaDims::llama3_8b(),
        ] {
            let ks = llama_kernels(&cfg);
            let names: std::collections::HashSet<_> = ks.iter().map(|k| &k.name_expr).collect();
            assert_eq!(names.len(), ks.len());
            let families: std::collections::HashSet<_> = ks.iter().map(|k| k.family).collect();
            for f in [
                KernelFamily::Embedding,
                KernelFamily::RmsNorm,
                KernelFamily::AddRmsNorm,
                KernelFamily::Gemv,
                KernelFamily::GemvTc,
                KernelFamily::AddInplace,
                KernelFamily::SiluMul,
                KernelFamily::RopeAppend,
                KernelFamily::AttentionDecode,
                KernelFamily::AttentionDecodeMerge,
                KernelFamily::AttentionPrefill,
                KernelFamily::AttentionPrefillSimple,
                KernelFamily::Argmax,
                KernelFamily::Sample,
            ] {
                assert!(families.contains(&f), "{f:?} missing for {cfg:?}");
            }
            // Every template file's source is embedded and declares what the instances name.
            for k in &ks {
                assert!(
                    k.family.file().source().contains(k.family.function()),
                    "{}",
                    k.name_expr
                );
            }
        }
    }

    #[test]
    fn launch_dims_follow_the_template_headers() {
        let rt = RuntimeSizes {
            tokens: 2048,
            batch: 3,
            n: 4096,
            elements: 1_000_003,
            max_splits: 32,
        };
        let d = KernelInstance::rmsnorm(576).launch_dims(&rt);
        assert_eq!((d.grid, d.block), ((2048, 1, 1), (96, 1, 1)));
        assert_eq!(
            KernelInstance::rmsnorm(4096).launch_dims(&rt).block,
            (256, 1, 1)
        );
        let g1 = KernelInstance::gemv(4096, 1, GemvEpilogue::Plain, OutType::Bf16).launch_dims(&rt);
        assert_eq!((g1.grid, g1.block), ((512, 1, 1), (256, 1, 1)));
        let g8 =
            KernelInstance::gemv(4096, 8, GemvEpilogue::Residual, OutType::Bf16).launch_dims(&rt);
        assert_eq!(g8.grid, (256, 1, 1)); // two columns per warp
        let tc =
            KernelInstance::gemv_tc(4096, 8, GemvEpilogue::Gated, OutType::Bf16).launch_dims(&rt);
        assert_eq!(tc.grid, (256, 1, 1));
        let dec = KernelInstance::attention_decode(32, 8, 128, 16).launch_dims(&rt);
        assert_eq!((dec.grid, dec.block), ((32, 8, 3), (128, 1, 1)));
        let merge = KernelInstance::attention_decode_merge(32, 128).launch_dims(&rt);
        assert_eq!((merge.grid, merge.block), ((32, 3, 1), (128, 1, 1)));
        let pf = KernelInstance::attention_prefill(32, 8, 128, 16).launch_dims(&rt);
        assert_eq!((pf.grid, pf.shared_bytes), ((32, 32, 3), 0));
        let add = KernelInstance::add_inplace().launch_dims(&rt);
        assert_eq!(add.grid, (489, 1, 1));
        // No work still gives a valid (non-zero) grid.
        let empty = KernelInstance::embedding(576).launch_dims(&RuntimeSizes::default());
        assert_eq!(empty.grid, (1, 1, 1));
    }

    #[test]
    fn decode_splits_fill_the_gpu_without_tiny_chunks() {
        assert_eq!(decode_splits(1, 8, 8192, 132), 33);
        assert_eq!(decode_splits(1, 8, 256, 132), 4); // no split shorter than a 64-token tile
        assert_eq!(decode_splits(8, 8, 2048, 132), 5);
        assert_eq!(decode_splits(64, 32, 4096, 132), 1);
    }
}
