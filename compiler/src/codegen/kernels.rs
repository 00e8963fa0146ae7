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
pub use kiln_runtime::kernels::{
    decode_splits, AttentionShape, GemvEpilogue, Kernel, KernelFamily, KernelInstance, LaunchDims,
    OutType, QuantFormat, RuntimeSizes, DECODE_TILE,
};

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
    /// `gemv_q.cu`
    GemvQ,
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
    /// `attention_prefill_sm90.cu` (compiled for the arch-specific target, `sm_90a`)
    AttentionPrefillSm90,
    /// `sampling.cu`
    Sampling,
}

impl TemplateFile {
    /// Every template file.
    pub const ALL: [TemplateFile; 12] = [
        TemplateFile::Embedding,
        TemplateFile::RmsNorm,
        TemplateFile::Gemv,
        TemplateFile::GemvTc,
        TemplateFile::GemvQ,
        TemplateFile::Elementwise,
        TemplateFile::Rope,
        TemplateFile::AttentionDecode,
        TemplateFile::AttentionPrefill,
        TemplateFile::AttentionPrefillSimple,
        TemplateFile::AttentionPrefillSm90,
        TemplateFile::Sampling,
    ];

    /// The file name inside `kernels_templates/`.
    pub fn file_name(self) -> &'static str {
        match self {
            TemplateFile::Embedding => "embedding.cu",
            TemplateFile::RmsNorm => "rmsnorm.cu",
            TemplateFile::Gemv => "gemv.cu",
            TemplateFile::GemvTc => "gemv_tc.cu",
            TemplateFile::GemvQ => "gemv_q.cu",
            TemplateFile::Elementwise => "elementwise.cu",
            TemplateFile::Rope => "rope.cu",
            TemplateFile::AttentionDecode => "attention_decode.cu",
            TemplateFile::AttentionPrefill => "attention_prefill.cu",
            TemplateFile::AttentionPrefillSimple => "attention_prefill_simple.cu",
            TemplateFile::AttentionPrefillSm90 => "attention_prefill_sm90.cu",
            TemplateFile::Sampling => "sampling.cu",
        }
    }

    /// The NVRTC target for this file on `arch`: the arch-specific `sm_90a` (wgmma) for the
    /// Hopper kernels, else `arch` itself.
    pub fn target(self, arch: &str) -> String {
        match self {
            TemplateFile::AttentionPrefillSm90 => format!("{arch}a"),
            _ => arch.to_string(),
        }
    }

    /// The CUDA source (embedded at build time).
    pub fn source(self) -> &'static str {
        match self {
            TemplateFile::Embedding => include_str!("../../../kernels_templates/embedding.cu"),
            TemplateFile::RmsNorm => include_str!("../../../kernels_templates/rmsnorm.cu"),
            TemplateFile::Gemv => include_str!("../../../kernels_templates/gemv.cu"),
            TemplateFile::GemvTc => include_str!("../../../kernels_templates/gemv_tc.cu"),
            TemplateFile::GemvQ => include_str!("../../../kernels_templates/gemv_q.cu"),
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
            TemplateFile::AttentionPrefillSm90 => {
                include_str!("../../../kernels_templates/attention_prefill_sm90.cu")
            }
            TemplateFile::Sampling => include_str!("../../../kernels_templates/sampling.cu"),
        }
    }
}

/// The weight formats (and groups) whose `gemv_q`, `dequant` (and `act_fp8`) instances
/// [`llama_kernels`] lists for the Llama shapes.
pub const LISTED_WEIGHT_FORMATS: [QuantFormat; 7] = [
    QuantFormat::Int8,
    QuantFormat::Int4 {
        group: 128,
        zero_point: true,
    },
    QuantFormat::Int4 {
        group: 128,
        zero_point: false,
    },
    QuantFormat::Int4 {
        group: 32,
        zero_point: true,
    },
    QuantFormat::Int4Min { group: 32 },
    QuantFormat::Int8Group { group: 32 },
    QuantFormat::Fp8,
];

/// The template file that defines a kernel family.
pub fn template_file(family: KernelFamily) -> TemplateFile {
    match family {
        KernelFamily::Embedding => TemplateFile::Embedding,
        KernelFamily::RmsNorm | KernelFamily::AddRmsNorm => TemplateFile::RmsNorm,
        KernelFamily::Gemv => TemplateFile::Gemv,
        KernelFamily::GemvTc => TemplateFile::GemvTc,
        KernelFamily::GemvQ | KernelFamily::Dequant | KernelFamily::ActFp8 => TemplateFile::GemvQ,
        KernelFamily::SiluMul | KernelFamily::GeluMul | KernelFamily::BiasRows => {
            TemplateFile::Elementwise
        }
        KernelFamily::RopeAppend => TemplateFile::Rope,
        KernelFamily::AttentionDecode | KernelFamily::AttentionDecodeMerge => {
            TemplateFile::AttentionDecode
        }
        KernelFamily::AttentionPrefill => TemplateFile::AttentionPrefill,
        KernelFamily::AttentionPrefillSimple => TemplateFile::AttentionPrefillSimple,
        KernelFamily::AttentionPrefillSm90 => TemplateFile::AttentionPrefillSm90,
        KernelFamily::Argmax | KernelFamily::Sample => TemplateFile::Sampling,
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
/// buckets 1 (the first, third and fifth with the RMSNorm folded in) and `max_gemv_rows`, and on
/// tensor cores for `max_gemv_rows`; the quantized GEMVs and prefill dequantizations of the four
/// fused projections (int8, int4 g128 with and without zero points, int4 g32 with zero points);
/// the prefill gated-GEMM epilogue silu_mul; rope_append; decode
/// attention and its merge; prefill attention (when the head size allows, on Hopper's warpgroup
/// MMA and on mma.sync tensor cores; always the CUDA-core fallback); argmax and sample.
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
        (h, Plain, true, OutType::Bf16),           // norm → QKV
        (attn, Residual, false, OutType::Bf16),    // O + residual
        (h, Gated, true, OutType::Bf16),           // norm → gate_up → silu·mul
        (cfg.ffn, Residual, false, OutType::Bf16), // down + residual
        (h, Plain, true, OutType::F32),            // norm → lm_head
        (h, Plain, false, OutType::Bf16),          // a projection of a launched norm
        (attn, Plain, false, OutType::Bf16),       // unfused O
        (cfg.ffn, Plain, false, OutType::Bf16),    // unfused down
    ];
    for &m in &buckets {
        for &(k, epi, norm, ty) in &gemvs {
            out.push(KernelInstance::gemv(k, m, epi, norm && m == 1, ty));
        }
    }
    for &(k, epi, _, ty) in &gemvs {
        if k % 32 == 0 {
            out.push(KernelInstance::gemv_tc(k, mmax, epi, ty));
        }
    }
    // Quantized projections (`--quant`, GGUF Q4_1/Q8_0): the decode GEMV and the prefill
    // dequantization of the four fused projections, in each listed format.
    for f in LISTED_WEIGHT_FORMATS {
        for &(k, epi, norm, ty) in &gemvs[..4] {
            if k.is_multiple_of(f.codes_per_vector()) {
                out.push(KernelInstance::gemv_q(k, epi, f, false, ty));
                if norm {
                    out.push(KernelInstance::gemv_q(k, epi, f, true, ty));
                }
                out.push(KernelInstance::dequant(k, f));
                if f == QuantFormat::Fp8 {
                    out.push(KernelInstance::act_fp8(k, false));
                    out.push(KernelInstance::act_fp8(k, true));
                }
            }
        }
    }
    out.extend([
        KernelInstance::silu_mul(cfg.ffn),
        KernelInstance::rope_append(heads, kv, hd, blk),
        KernelInstance::attention_decode(heads, kv, hd, blk),
        KernelInstance::attention_decode_merge(heads, hd),
        KernelInstance::attention_prefill_for(heads, kv, hd, blk, "sm_90"),
        KernelInstance::attention_prefill_for(heads, kv, hd, blk, "sm_80"),
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
        let g = groups.entry(template_file(k.family())).or_default();
        if !g.contains(&k.name_expr) {
            g.push(k.name_expr.clone());
        }
    }
    let groups: Vec<(TemplateFile, Vec<String>)> = groups.into_iter().collect();
    let modules: Vec<(TemplateFile, nvrtc::Cubin)> = groups
        .par_iter()
        .map(|(file, exprs)| {
            let opts = CompileOptions {
                arch: file.target(&opts.arch),
                ..opts.clone()
            };
            let cubin = nvrtc::compile_cubin(
                file.file_name(),
                file.source(),
                &[("common.cuh", COMMON_HEADER)],
                exprs,
                &opts,
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
            KernelInstance::gemv(4096, 1, GemvEpilogue::Gated, true, OutType::Bf16).name_expr,
            "gemv<4096, 1, 2, 1, __nv_bfloat16>"
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
            template_file(KernelInstance::silu_mul(14336).family()),
            TemplateFile::Elementwise
        );
    }

    #[test]
    fn prefill_uses_tensor_cores_only_for_supported_head_sizes() {
        let family = |hd, arch| KernelInstance::attention_prefill_for(32, 8, hd, 16, arch).family();
        assert_eq!(family(128, "sm_90"), KernelFamily::AttentionPrefillSm90);
        assert_eq!(family(64, "sm_90"), KernelFamily::AttentionPrefillSm90);
        assert_eq!(family(128, "sm_80"), KernelFamily::AttentionPrefill);
        assert_eq!(family(128, "sm_89"), KernelFamily::AttentionPrefill);
        assert_eq!(family(96, "sm_90"), KernelFamily::AttentionPrefillSimple);
        assert_eq!(TemplateFile::AttentionPrefillSm90.target("sm_90"), "sm_90a");
        assert_eq!(TemplateFile::AttentionPrefill.target("sm_90"), "sm_90");
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
            let families: std::collections::HashSet<_> = ks.iter().map(|k| k.family()).collect();
            for f in [
                KernelFamily::Embedding,
                KernelFamily::RmsNorm,
                KernelFamily::AddRmsNorm,
                KernelFamily::Gemv,
                KernelFamily::GemvTc,
                KernelFamily::GemvQ,
                KernelFamily::Dequant,
                KernelFamily::ActFp8,
                KernelFamily::SiluMul,
                KernelFamily::RopeAppend,
                KernelFamily::AttentionDecode,
                KernelFamily::AttentionDecodeMerge,
                KernelFamily::AttentionPrefill,
                KernelFamily::AttentionPrefillSimple,
                KernelFamily::AttentionPrefillSm90,
                KernelFamily::Argmax,
                KernelFamily::Sample,
            ] {
                assert!(families.contains(&f), "{f:?} missing for {cfg:?}");
            }
            // Every template file's source is embedded and declares what the instances name.
            for k in &ks {
                assert!(
                    template_file(k.family())
                        .source()
                        .contains(k.family().function()),
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
            max_splits: 32,
            longest_query: 0,
        };
        let d = KernelInstance::rmsnorm(576).launch_dims(&rt);
        assert_eq!((d.grid, d.block), ((2048, 1, 1), (96, 1, 1)));
        assert_eq!(
            KernelInstance::rmsnorm(4096).launch_dims(&rt).block,
            (256, 1, 1)
        );
        let g1 = KernelInstance::gemv(4096, 1, GemvEpilogue::Plain, true, OutType::Bf16)
            .launch_dims(&rt);
        assert_eq!((g1.grid, g1.block), ((512, 1, 1), (256, 1, 1)));
        // Residual GEMVs at M = 1 split K over 4 warps up to K = 4096, else over 2.
        let res = |k| KernelInstance::gemv(k, 1, GemvEpilogue::Residual, false, OutType::Bf16);
        assert_eq!(res(4096).launch_dims(&rt).grid, (2048, 1, 1));
        assert_eq!(res(14336).launch_dims(&rt).grid, (1024, 1, 1));
        let tc_res = KernelInstance::gemv_tc(4096, 8, GemvEpilogue::Residual, OutType::Bf16);
        assert_eq!(tc_res.launch_dims(&rt).grid, (512, 1, 1)); // 8 weight rows per CTA
        let g8 = KernelInstance::gemv(4096, 8, GemvEpilogue::Residual, false, OutType::Bf16)
            .launch_dims(&rt);
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
        // 128-row CTAs; Q (128 rows) + 4 stages of K and V (64 keys) of 256-byte rows,
        // alignment, barriers.
        let h = KernelInstance::attention_prefill_sm90(32, 8, 128, 16).launch_dims(&rt);
        assert_eq!(
            (h.grid, h.block, h.shared_bytes),
            ((32, 16, 3), (384, 1, 1), (128 + 512) * 256 + 1024 + 128)
        );
        // Prefill tiles cover the longest sequence, not every token of the step: a step of 2048
        // tokens whose longest chunk is 300 rows needs 3 tiles of 128 (5 of 64, 10 of 32).
        let chunked = RuntimeSizes {
            longest_query: 300,
            ..rt
        };
        let tiles = |k: KernelInstance| k.launch_dims(&chunked).grid.1;
        assert_eq!(
            tiles(KernelInstance::attention_prefill_sm90(32, 8, 128, 16)),
            3
        );
        assert_eq!(tiles(KernelInstance::attention_prefill(32, 8, 128, 16)), 5);
        assert_eq!(
            tiles(KernelInstance::attention_prefill_simple(32, 8, 256, 16)),
            10
        );
        let silu = KernelInstance::silu_mul(14336).launch_dims(&rt);
        assert_eq!(silu.grid, (8192, 1, 1)); // 2048·14336/8 vectors, capped grid-stride
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
