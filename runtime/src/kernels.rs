//! Kernel instances: a template family of `kernels_templates/` with its constants, the C++ name
//! expression NVRTC instantiates, and its launch shape for a step's sizes. The compiler compiles
//! instances to CUBINs (`kiln_compiler::codegen`); the CUDA executor launches them with the
//! shapes computed here, so the launch geometry of every template lives in one place.

use serde::{Deserialize, Serialize};

pub use crate::quant_format::QuantFormat;

/// A kernel template (a `__global__` function of a template file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KernelFamily {
    /// `embedding<H>`
    Embedding,
    /// `rmsnorm<H>`
    RmsNorm,
    /// `add_rmsnorm<H>`
    AddRmsNorm,
    /// `gemv<K, MMAX, EPI, NORM, OutT>` (CUDA cores)
    Gemv,
    /// `gemv_tc<K, MMAX, EPI, OutT>` (tensor cores)
    GemvTc,
    /// `gemv_q<K, EPI, FMT, G, OutT>` (quantized weights, tensor cores)
    GemvQ,
    /// `dequant<K, FMT, G>` (a quantized weight to bf16, for the prefill GEMM)
    Dequant,
    /// `act_fp8<K, CODES>` (activations rounded to E4M3 per row: in bf16 or as codes and row scales)
    ActFp8,
    /// `silu_mul<F>`
    SiluMul,
    /// `gelu_mul<F>`
    GeluMul,
    /// `bias_rows<N>`
    BiasRows,
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
    /// `attention_prefill_sm90<HEADS, KV_HEADS, HEAD_DIM, BLOCK>` (Hopper wgmma, compiled for
    /// sm_90a; HEAD_DIM 64 or 128)
    AttentionPrefillSm90,
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
            KernelFamily::GemvQ => "gemv_q",
            KernelFamily::Dequant => "dequant",
            KernelFamily::ActFp8 => "act_fp8",
            KernelFamily::SiluMul => "silu_mul",
            KernelFamily::GeluMul => "gelu_mul",
            KernelFamily::BiasRows => "bias_rows",
            KernelFamily::RopeAppend => "rope_append",
            KernelFamily::AttentionDecode => "attention_decode",
            KernelFamily::AttentionDecodeMerge => "attention_decode_merge",
            KernelFamily::AttentionPrefill => "attention_prefill",
            KernelFamily::AttentionPrefillSimple => "attention_prefill_simple",
            KernelFamily::AttentionPrefillSm90 => "attention_prefill_sm90",
            KernelFamily::Argmax => "argmax",
            KernelFamily::Sample => "sample",
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
    /// `out = x·Wᵀ + bias` (bias `[N]`, passed as the residual pointer)
    Bias = 3,
    /// Gated with GELU (tanh approximation): `out = gelu(x·W_gᵀ) * (x·W_uᵀ)` (GeGLU).
    GatedGelu = 4,
}

impl GemvEpilogue {
    /// Gated (SiLU or GELU): the weight holds the gate rows, then the up rows.
    pub fn is_gated(self) -> bool {
        matches!(self, GemvEpilogue::Gated | GemvEpilogue::GatedGelu)
    }

    /// Weight rows of a product with `n` outputs: `2n` when gated.
    pub fn weight_rows(self, n: usize) -> usize {
        if self.is_gated() {
            2 * n
        } else {
            n
        }
    }
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

/// The shape constants of the attention templates: `<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Tokens per KV-cache block.
    pub block: usize,
}

/// A kernel template with its template arguments, named: one variant per family, its fields in
/// the template's parameter order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kernel {
    /// `embedding<H>`
    Embedding { hidden: usize },
    /// `rmsnorm<H>`
    RmsNorm { hidden: usize },
    /// `add_rmsnorm<H>`
    AddRmsNorm { hidden: usize },
    /// `gemv<K, MMAX, EPI, NORM, OutT>`
    Gemv {
        k: usize,
        mmax: usize,
        epi: GemvEpilogue,
        norm: bool,
        out: OutType,
    },
    /// `gemv_tc<K, MMAX, EPI, OutT>`
    GemvTc {
        k: usize,
        mmax: usize,
        epi: GemvEpilogue,
        out: OutType,
    },
    /// `gemv_q<K, EPI, FMT, G, NORM, OutT>` (`FMT` and `G` from the format)
    GemvQ {
        k: usize,
        epi: GemvEpilogue,
        format: QuantFormat,
        norm: bool,
        out: OutType,
    },
    /// `dequant<K, FMT, G>`
    Dequant { k: usize, format: QuantFormat },
    /// `act_fp8<K, CODES>`
    ActFp8 { k: usize, codes: bool },
    /// `silu_mul<F>`
    SiluMul { ffn: usize },
    /// `gelu_mul<F>`
    GeluMul { ffn: usize },
    /// `bias_rows<N>`
    BiasRows { n: usize },
    /// `rope_append<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`
    RopeAppend(AttentionShape),
    /// `attention_decode<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`
    AttentionDecode(AttentionShape),
    /// `attention_decode_merge<HEADS, HEAD_DIM>`
    AttentionDecodeMerge { heads: usize, head_dim: usize },
    /// `attention_prefill<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`
    AttentionPrefill(AttentionShape),
    /// `attention_prefill_simple<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`
    AttentionPrefillSimple(AttentionShape),
    /// `attention_prefill_sm90<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`
    AttentionPrefillSm90(AttentionShape),
    /// `argmax` (not a template)
    Argmax,
    /// `sample` (not a template)
    Sample,
}

impl Kernel {
    /// The template this is an instance of.
    pub fn family(&self) -> KernelFamily {
        use KernelFamily as F;
        match self {
            Kernel::Embedding { .. } => F::Embedding,
            Kernel::RmsNorm { .. } => F::RmsNorm,
            Kernel::AddRmsNorm { .. } => F::AddRmsNorm,
            Kernel::Gemv { .. } => F::Gemv,
            Kernel::GemvTc { .. } => F::GemvTc,
            Kernel::GemvQ { .. } => F::GemvQ,
            Kernel::Dequant { .. } => F::Dequant,
            Kernel::ActFp8 { .. } => F::ActFp8,
            Kernel::SiluMul { .. } => F::SiluMul,
            Kernel::GeluMul { .. } => F::GeluMul,
            Kernel::BiasRows { .. } => F::BiasRows,
            Kernel::RopeAppend(_) => F::RopeAppend,
            Kernel::AttentionDecode(_) => F::AttentionDecode,
            Kernel::AttentionDecodeMerge { .. } => F::AttentionDecodeMerge,
            Kernel::AttentionPrefill(_) => F::AttentionPrefill,
            Kernel::AttentionPrefillSimple(_) => F::AttentionPrefillSimple,
            Kernel::AttentionPrefillSm90(_) => F::AttentionPrefillSm90,
            Kernel::Argmax => F::Argmax,
            Kernel::Sample => F::Sample,
        }
    }

    /// The template arguments as C++ spells them, in order (empty for a plain function).
    pub fn template_args(&self) -> Vec<String> {
        let n = |v: usize| v.to_string();
        let flag = |b: bool| n(usize::from(b));
        let epi = |e: GemvEpilogue| n(e as usize);
        let ty = |t: OutType| t.cuda_name().to_string();
        match *self {
            Kernel::Embedding { hidden }
            | Kernel::RmsNorm { hidden }
            | Kernel::AddRmsNorm { hidden } => vec![n(hidden)],
            Kernel::Gemv {
                k,
                mmax,
                epi: e,
                norm,
                out,
            } => vec![n(k), n(mmax), epi(e), flag(norm), ty(out)],
            Kernel::GemvTc {
                k,
                mmax,
                epi: e,
                out,
            } => vec![n(k), n(mmax), epi(e), ty(out)],
            Kernel::GemvQ {
                k,
                epi: e,
                format,
                norm,
                out,
            } => vec![
                n(k),
                epi(e),
                n(format.code()),
                n(format.group()),
                flag(norm),
                ty(out),
            ],
            Kernel::Dequant { k, format } => vec![n(k), n(format.code()), n(format.group())],
            Kernel::ActFp8 { k, codes } => vec![n(k), flag(codes)],
            Kernel::SiluMul { ffn } | Kernel::GeluMul { ffn } => vec![n(ffn)],
            Kernel::BiasRows { n: cols } => vec![n(cols)],
            Kernel::RopeAppend(a)
            | Kernel::AttentionDecode(a)
            | Kernel::AttentionPrefill(a)
            | Kernel::AttentionPrefillSimple(a)
            | Kernel::AttentionPrefillSm90(a) => {
                vec![n(a.heads), n(a.kv_heads), n(a.head_dim), n(a.block)]
            }
            Kernel::AttentionDecodeMerge { heads, head_dim } => vec![n(heads), n(head_dim)],
            Kernel::Argmax | Kernel::Sample => Vec::new(),
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
    /// Dynamic shared memory in bytes (0 except for attention_prefill_sm90; above 48 KB the
    /// function's limit must be raised before launch).
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
    /// Split-KV count of decode attention (see [`decode_splits`]).
    pub max_splits: usize,
    /// Q: query rows of the step's longest sequence, which sizes the prefill attention grid
    /// (0: not known, every tile of T).
    pub longest_query: usize,
}

impl RuntimeSizes {
    /// Query tiles of `rows` rows that the step's longest sequence needs.
    fn query_tiles(&self, rows: usize) -> usize {
        let q = if self.longest_query == 0 {
            self.tokens
        } else {
            self.longest_query.min(self.tokens)
        };
        q.div_ceil(rows)
    }
}

/// Threads per CTA of the templates (mirrors the `#define`s in the template files).
mod threads {
    pub const EMBEDDING: u32 = 128;
    pub const GEMV_WARPS: u32 = 8;
    pub const ELEMENTWISE: u32 = 256;
    pub const DEQUANT: u32 = 256;
    pub const ROPE_WARPS: u32 = 4;
    /// CTAs enough to fill an H100 (2 per SM): rope_append splits heads across CTAs up to this.
    pub const ROPE_CTAS: usize = 264;
    pub const DECODE: u32 = 128;
    pub const PREFILL: u32 = 128;
    pub const PREFILL_ROWS: usize = 64;
    pub const PREFILL_SIMPLE: u32 = 128;
    pub const PREFILL_SIMPLE_ROWS: usize = 32;
    /// attention_prefill_sm90: a producer and two consumer warpgroups, 128 query rows per CTA,
    /// `STAGES` = 4 stages of `BC` = 64 keys.
    pub const PREFILL_SM90: u32 = 384;
    pub const PREFILL_SM90_ROWS: usize = 128;
    pub const PREFILL_SM90_STAGE_KEYS: usize = 4 * 64;
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
    /// The template and its arguments.
    pub kernel: Kernel,
    /// The C++ name expression NVRTC instantiates (`rmsnorm<4096>`).
    pub name_expr: String,
}

impl From<Kernel> for KernelInstance {
    fn from(kernel: Kernel) -> Self {
        let family = kernel.family();
        let args = kernel.template_args();
        let name_expr = if args.is_empty() {
            family.function().to_string()
        } else {
            format!("{}<{}>", family.function(), args.join(", "))
        };
        Self { kernel, name_expr }
    }
}

impl KernelInstance {
    /// The template this is an instance of.
    pub fn family(&self) -> KernelFamily {
        self.kernel.family()
    }

    /// `embedding<H>(const bf16* table, const int* ids, bf16* out, int T, float scale)`: rows of
    /// `table` by id, times `scale` (1: an exact copy).
    pub fn embedding(hidden: usize) -> Self {
        Kernel::Embedding { hidden }.into()
    }

    /// `rmsnorm<H>(const bf16* x, const bf16* w, bf16* out, int T, float eps)`.
    pub fn rmsnorm(hidden: usize) -> Self {
        Kernel::RmsNorm { hidden }.into()
    }

    /// `add_rmsnorm<H>(bf16* residual, const bf16* x, const bf16* w, bf16* out, int T, float eps)`:
    /// `residual += x` (bf16), then `out = rmsnorm(residual)`.
    pub fn add_rmsnorm(hidden: usize) -> Self {
        Kernel::AddRmsNorm { hidden }.into()
    }

    /// `gemv<K, MMAX, EPI, NORM, OutT>(const bf16* x, int M, const bf16* w, int N,
    /// const bf16* residual, OutT* out, const bf16* norm_w, float eps)` for `M <= mmax` rows, on
    /// CUDA cores; with `norm` (`mmax` 1 only) each CTA first RMS-normalizes x (weight `norm_w`)
    /// into shared memory. The fastest choice at M = 1 (use `mmax = 1`); from M = 2 it becomes
    /// ALU-bound: use [`KernelInstance::gemv_tc`] there (measured in `bench/RESULTS.md`).
    pub fn gemv(k: usize, mmax: usize, epi: GemvEpilogue, norm: bool, out: OutType) -> Self {
        Kernel::Gemv {
            k,
            mmax,
            epi,
            norm,
            out,
        }
        .into()
    }

    /// `gemv_tc<K, MMAX, EPI, OutT>(const bf16* x, int M, const bf16* w, int N,
    /// const bf16* residual, OutT* out)`: the un-normalized [`KernelInstance::gemv`] contract on
    /// tensor cores (`K % 32 == 0`, `mmax <= 8`; its cost does not depend on M).
    pub fn gemv_tc(k: usize, mmax: usize, epi: GemvEpilogue, out: OutType) -> Self {
        Kernel::GemvTc { k, mmax, epi, out }.into()
    }

    /// `gemv_q<K, EPI, FMT, G, NORM, OutT>(const bf16* x, int M, const u8* q, const void* scale,
    /// const u8* zero, int N, const bf16* residual, OutT* out, const bf16* norm_w, float eps)`:
    /// the [`KernelInstance::gemv_tc`] contract (M ≤ 8) with a quantized weight of `format`
    /// (`gemv_q.cu`'s header gives each format's layout and arithmetic); with `norm` (M = 1
    /// only) each CTA first RMS-normalizes x into shared memory, as [`KernelInstance::gemv`].
    pub fn gemv_q(
        k: usize,
        epi: GemvEpilogue,
        format: QuantFormat,
        norm: bool,
        out: OutType,
    ) -> Self {
        Kernel::GemvQ {
            k,
            epi,
            format,
            norm,
            out,
        }
        .into()
    }

    /// `dequant<K, FMT, G>(const u8* q, const void* scale, const u8* zero, int R, bf16* out)`:
    /// the `[R, K]` weight of `format` in bf16, as `gemv_q` reads it.
    pub fn dequant(k: usize, format: QuantFormat) -> Self {
        Kernel::Dequant { k, format }.into()
    }

    /// `act_fp8<K, CODES>(const bf16* x, void* out, float* scales, int T)`: each of the `T` rows
    /// of `x` rounded to E4M3 with its own scale (`max|row| / 448`): back in bf16 (`codes`
    /// false: the activations of a W8A8 product on a bf16 GEMM; `out` may alias `x`), or as
    /// E4M3 bytes with the row scales in `scales` (`codes`: the operands of an FP8 GEMM).
    pub fn act_fp8(k: usize, codes: bool) -> Self {
        Kernel::ActFp8 { k, codes }.into()
    }

    /// `silu_mul<F>(const bf16* gu, bf16* out, int T)`.
    pub fn silu_mul(ffn: usize) -> Self {
        Kernel::SiluMul { ffn }.into()
    }

    /// `gelu_mul<F>(const bf16* gu, bf16* out, int T)`: `silu_mul` with GELU's tanh
    /// approximation (GeGLU).
    pub fn gelu_mul(ffn: usize) -> Self {
        Kernel::GeluMul { ffn }.into()
    }

    /// `bias_rows<N>(const bf16* bias, bf16* out, int T)`: every row of `out` set to `bias`
    /// (the prefill GEMM then accumulates onto it).
    pub fn bias_rows(n: usize) -> Self {
        Kernel::BiasRows { n }.into()
    }

    /// `rope_append<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(bf16* qkv, const int* positions,
    /// const int* slot_mapping, bf16* k_cache, bf16* v_cache, int T, const float* inv_freq)`.
    pub fn rope_append(heads: usize, kv_heads: usize, head_dim: usize, block: usize) -> Self {
        Kernel::RopeAppend(AttentionShape {
            heads,
            kv_heads,
            head_dim,
            block,
        })
        .into()
    }

    /// `attention_decode<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(const bf16* qkv, bf16* k_cache,
    /// bf16* v_cache, const int* block_tables, int max_blocks, const int* seq_lens,
    /// const int* slot_mapping, const float* inv_freq, bf16* out, int B, float scale, float* partial_o,
    /// float* partial_ml, int max_splits, int window)`: RoPE and the KV-cache append of the step's
    /// token included; `window > 0` limits each query to its `window` most recent keys.
    pub fn attention_decode(heads: usize, kv_heads: usize, head_dim: usize, block: usize) -> Self {
        Kernel::AttentionDecode(AttentionShape {
            heads,
            kv_heads,
            head_dim,
            block,
        })
        .into()
    }

    /// `attention_decode_merge<HEADS, HEAD_DIM>(const float* partial_o, const float* partial_ml,
    /// const int* seq_lens, bf16* out, int B, int max_splits, int window)`.
    pub fn attention_decode_merge(heads: usize, head_dim: usize) -> Self {
        Kernel::AttentionDecodeMerge { heads, head_dim }.into()
    }

    /// `attention_prefill<HEADS, KV_HEADS, HEAD_DIM, BLOCK>(const bf16* qkv, const bf16* k_cache,
    /// const bf16* v_cache, const int* block_tables, int max_blocks, const int* seq_lens,
    /// const int* query_start, bf16* out, int B, float scale, int window)`; HEAD_DIM 64 or 128.
    pub fn attention_prefill(heads: usize, kv_heads: usize, head_dim: usize, block: usize) -> Self {
        Kernel::AttentionPrefill(AttentionShape {
            heads,
            kv_heads,
            head_dim,
            block,
        })
        .into()
    }

    /// Same signature as [`KernelInstance::attention_prefill`], on CUDA cores (any
    /// `HEAD_DIM % 32 == 0`).
    pub fn attention_prefill_simple(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block: usize,
    ) -> Self {
        Kernel::AttentionPrefillSimple(AttentionShape {
            heads,
            kv_heads,
            head_dim,
            block,
        })
        .into()
    }

    /// `attention_prefill_sm90<HEADS, KV_HEADS, HEAD_DIM, BLOCK>`: the
    /// [`KernelInstance::attention_prefill`] contract on Hopper's warpgroup MMA (sm_90 only);
    /// HEAD_DIM 64 or 128.
    pub fn attention_prefill_sm90(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block: usize,
    ) -> Self {
        Kernel::AttentionPrefillSm90(AttentionShape {
            heads,
            kv_heads,
            head_dim,
            block,
        })
        .into()
    }

    /// The prefill attention for a head size on `arch` (`sm_90`, …): for head sizes 64 and 128
    /// the warpgroup-MMA kernel on sm_90, mma.sync tensor cores elsewhere; else the CUDA-core
    /// one.
    pub fn attention_prefill_for(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        block: usize,
        arch: &str,
    ) -> Self {
        if (head_dim == 64 || head_dim == 128) && arch == "sm_90" {
            Self::attention_prefill_sm90(heads, kv_heads, head_dim, block)
        } else if head_dim == 64 || head_dim == 128 {
            Self::attention_prefill(heads, kv_heads, head_dim, block)
        } else {
            Self::attention_prefill_simple(heads, kv_heads, head_dim, block)
        }
    }

    /// `argmax(const float* logits, int V, int* out)`.
    pub fn argmax() -> Self {
        Kernel::Argmax.into()
    }

    /// `sample(const float* logits, int V, const float* temperature, const int* top_k,
    /// const float* top_p, const unsigned long long* seed_and_step /*[B,2]*/, int* out)`.
    pub fn sample() -> Self {
        Kernel::Sample.into()
    }

    /// Launch shape for these runtime sizes:
    /// - embedding, rmsnorm, add_rmsnorm: grid `tokens`; rope_append: (`tokens`, head groups of
    ///   4, fewer as `tokens` grows);
    /// - gemv, gemv_tc: grid from `n` (output columns);
    /// - silu_mul: from `tokens`;
    /// - attention_decode: (`max_splits`, kv heads, `batch`); the merge: (heads, `batch`);
    /// - attention_prefill(_simple, _sm90): (heads, query tiles of `longest_query` (of `tokens`
    ///   when 0), `batch`): the longest query tiles of every head start first (`kiln::prefill_tile` in common.cuh);
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
        match self.kernel {
            Kernel::Embedding { .. } => one((rt.tokens, 1, 1), threads::EMBEDDING),
            Kernel::RmsNorm { hidden } | Kernel::AddRmsNorm { hidden } => {
                let vec = hidden / 8;
                let t = if vec >= 256 {
                    256
                } else {
                    vec.div_ceil(32) * 32
                };
                one((rt.tokens, 1, 1), t.max(32) as u32)
            }
            Kernel::Gemv { .. } => {
                let per_cta =
                    threads::GEMV_WARPS as usize / self.gemv_k_split() * self.gemv_cols_per_warp();
                one((rt.n.div_ceil(per_cta), 1, 1), threads::GEMV_WARPS * 32)
            }
            // 8 weight rows per CTA for the residual epilogue, else 16 (`HR` in gemv_tc.cu and
            // gemv_q.cu).
            Kernel::GemvTc { epi, .. } | Kernel::GemvQ { epi, .. } => {
                let rows = if epi == GemvEpilogue::Residual { 8 } else { 16 };
                one((rt.n.div_ceil(rows), 1, 1), threads::GEMV_WARPS * 32)
            }
            Kernel::ActFp8 { .. } => one((rt.tokens, 1, 1), threads::DEQUANT),
            Kernel::Dequant { k, format } => {
                // One thread per 16-byte code vector (16 int8 or 32 int4 codes) of `n` rows.
                let vectors = rt.n * k / format.codes_per_vector();
                one(
                    (vectors.div_ceil(threads::DEQUANT as usize), 1, 1),
                    threads::DEQUANT,
                )
            }
            Kernel::SiluMul { ffn: width }
            | Kernel::GeluMul { ffn: width }
            | Kernel::BiasRows { n: width } => {
                let work = rt.tokens * width / 8;
                one(
                    (work.div_ceil(threads::ELEMENTWISE as usize).min(8192), 1, 1),
                    threads::ELEMENTWISE,
                )
            }
            Kernel::RopeAppend(a) => {
                // A warp per head while there are few tokens (decode); fewer head groups as the
                // tokens alone fill the GPU (each lane's cos/sin then serve more heads).
                let groups = (a.heads + a.kv_heads).div_ceil(threads::ROPE_WARPS as usize);
                let want = threads::ROPE_CTAS.div_ceil(rt.tokens.max(1));
                one(
                    (rt.tokens, want.clamp(1, groups), 1),
                    threads::ROPE_WARPS * 32,
                )
            }
            Kernel::AttentionDecode(a) => {
                one((rt.max_splits, a.kv_heads, rt.batch), threads::DECODE)
            }
            Kernel::AttentionDecodeMerge { heads, head_dim } => {
                one((heads, rt.batch, 1), head_dim as u32)
            }
            Kernel::AttentionPrefill(a) => one(
                (a.heads, rt.query_tiles(threads::PREFILL_ROWS), rt.batch),
                threads::PREFILL,
            ),
            Kernel::AttentionPrefillSm90(a) => {
                let rows = threads::PREFILL_SM90_ROWS;
                let mut dims = one(
                    (a.heads, rt.query_tiles(rows), rt.batch),
                    threads::PREFILL_SM90,
                );
                // Q tile, the K and V stages, 1024 bytes to align the swizzled tiles, barriers.
                let tiles = rows + 2 * threads::PREFILL_SM90_STAGE_KEYS;
                dims.shared_bytes = (tiles * a.head_dim * 2 + 1024 + 128) as u32;
                dims
            }
            Kernel::AttentionPrefillSimple(a) => one(
                (
                    a.heads,
                    rt.query_tiles(threads::PREFILL_SIMPLE_ROWS),
                    rt.batch,
                ),
                threads::PREFILL_SIMPLE,
            ),
            Kernel::Argmax | Kernel::Sample => one((rt.batch, 1, 1), threads::SAMPLE),
        }
    }

    /// Warps sharing one output of a `gemv` instance (`GemvCfg::KS` in `gemv.cu`): for the
    /// residual GEMVs at M = 1 (N is the model width: too few rows to fill the GPU with a warp
    /// per row) 4 when K ≤ 4096, else 2; 1 for the others and for other families.
    pub fn gemv_k_split(&self) -> usize {
        match self.kernel {
            Kernel::Gemv {
                k,
                mmax: 1,
                epi: GemvEpilogue::Residual,
                ..
            } => match k {
                k if k <= 4096 && k % 32 == 0 => 4,
                k if k % 16 == 0 => 2,
                _ => 1,
            },
            _ => 1,
        }
    }

    /// Output columns per warp of a `gemv` instance (`GemvCfg::ROWS` in `gemv.cu`): 2 from
    /// four rows up except for the gated epilogues, else 1 (and 1 for other families).
    pub fn gemv_cols_per_warp(&self) -> usize {
        match self.kernel {
            Kernel::Gemv { mmax, epi, .. } if mmax >= 4 && !epi.is_gated() => 2,
            _ => 1,
        }
    }
}
