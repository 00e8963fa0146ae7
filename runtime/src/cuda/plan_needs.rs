//! What a launch plan needs from its engine and the GPU: the kernel instance of every launch
//! (what the compiler compiles into the engine and the executor resolves by name expression) and
//! the weights its kernels read, with their element types. The launches themselves are in
//! `launch.rs`.

use super::kv_cache::BLOCK;
use super::CudaError;
use crate::engine::Engine;
use crate::ir::DType;
use crate::kernels::{GemvEpilogue, KernelInstance, OutType, QuantFormat, RuntimeSizes};
use crate::plan::{BufType, Epilogue, Launch, Plan};
use cudarc::driver::sys as cu;
use cudarc::driver::CudaFunction;

/// Rows up to which a `Linear` runs as a GEMV kernel rather than a cuBLAS GEMM.
pub const GEMV_MAX_ROWS: usize = 8;

/// The GEMV epilogue of a plan epilogue.
pub(super) fn epilogue_kind(e: &Epilogue) -> GemvEpilogue {
    match e {
        Epilogue::None => GemvEpilogue::Plain,
        Epilogue::Residual(_) => GemvEpilogue::Residual,
        Epilogue::Gated => GemvEpilogue::Gated,
        Epilogue::GatedGelu => GemvEpilogue::GatedGelu,
        Epilogue::Bias(_) => GemvEpilogue::Bias,
    }
}

/// The element type of a kernel's output buffer.
pub(super) fn out_type(t: BufType) -> OutType {
    match t {
        BufType::F32 => OutType::F32,
        BufType::Bf16 => OutType::Bf16,
    }
}

/// The decode GEMV for `rows` rows: the CUDA-core `gemv<K, 1>` for one row (with a folded norm
/// in its prologue), the tensor-core `gemv_tc<K, 8>` (cost nearly independent of the rows; a
/// folded norm runs before it as a kernel of its own) for 2..=8 rows.
pub(super) fn gemv_instance(
    rows: usize,
    k: usize,
    epi: GemvEpilogue,
    norm: bool,
    ty: OutType,
) -> KernelInstance {
    if rows == 1 {
        KernelInstance::gemv(k, 1, epi, norm, ty)
    } else {
        KernelInstance::gemv_tc(k, GEMV_MAX_ROWS, epi, ty)
    }
}

/// Raises `f`'s dynamic shared-memory limit to what instance `k` launches with, where that is
/// above the 48 KB every function gets by default (attention_prefill_sm90).
pub fn allow_dynamic_smem(
    f: &CudaFunction,
    k: &KernelInstance,
) -> Result<(), cudarc::driver::DriverError> {
    let smem = k.launch_dims(&RuntimeSizes::default()).shared_bytes;
    if smem > 48 * 1024 {
        f.set_attribute(
            cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    Ok(())
}

/// One step of a launch: a kernel instance, or a library product between them.
#[derive(Debug, Clone, PartialEq)]
pub enum LaunchStep {
    /// A kernel of the engine.
    Kernel(KernelInstance),
    /// A cuBLAS(Lt) product, described.
    Library(String),
}

/// The kernels one plan launch runs for steps of one kind (`when`), in launch order.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelUse {
    /// Which steps: "1 row", "2-8 rows", "> 8 rows", "decodes", "prompt chunks", "every step", …
    pub when: &'static str,
    /// What runs, in order.
    pub steps: Vec<LaunchStep>,
}

/// What launch `l` of `plan` runs on `arch`, by the kind of step: the choices `launch.rs` makes
/// at run time (GEMV or GEMM by rows, the folded norm's own kernel beyond one row, decode or
/// prefill attention), listed once for the compiler ([`plan_instances`]) and `kiln inspect
/// --plan`.
pub fn launch_kernels(plan: &Plan, l: &Launch, arch: &str) -> Vec<KernelUse> {
    use LaunchStep::{Kernel as K, Library as Lib};
    let a = plan.attention;
    let (h, kh, d) = (a.heads, a.kv_heads, a.head_dim);
    let every = |k: KernelInstance| {
        vec![KernelUse {
            when: "every step",
            steps: vec![K(k)],
        }]
    };
    match l {
        Launch::Embedding { out, .. } | Launch::GatherLast { out, .. } => {
            every(KernelInstance::embedding(plan.buffers[*out].cols))
        }
        Launch::RmsNorm { out, .. } => every(KernelInstance::rmsnorm(plan.buffers[*out].cols)),
        // A decode step's attention kernel rotates and appends its token itself.
        Launch::RopeAppend { .. } => vec![KernelUse {
            when: "rows after the leading one-row sequences",
            steps: vec![K(KernelInstance::rope_append(h, kh, d, BLOCK))],
        }],
        Launch::Attention { .. } => vec![
            KernelUse {
                when: "leading one-row sequences (decodes)",
                steps: vec![
                    K(KernelInstance::attention_decode(h, kh, d, BLOCK)),
                    K(KernelInstance::attention_decode_merge(h, d)),
                ],
            },
            KernelUse {
                when: "the other sequences (prompt chunks)",
                steps: vec![K(KernelInstance::attention_prefill_for(
                    h, kh, d, BLOCK, arch,
                ))],
            },
        ],
        Launch::Linear {
            x,
            norm,
            format,
            epilogue,
            out,
            ..
        } => {
            let (k, cols) = (plan.buffers[*x].cols, plan.buffers[*out].cols);
            let (epi, ty) = (epilogue_kind(epilogue), out_type(plan.buffers[*out].dtype));
            let folded = norm.is_some();
            // Beyond one row a folded norm runs first, as a kernel of its own.
            let norm_first = || folded.then(|| K(KernelInstance::rmsnorm(k)));
            let n_rows = epilogue.weight_rows(cols);
            // The prefill product with its epilogue: bias rows first, the gate after.
            let gemm = |what: String| {
                let bias = matches!(epilogue, Epilogue::Bias(_))
                    .then(|| K(KernelInstance::bias_rows(cols)));
                let gate = match epilogue {
                    Epilogue::Gated => Some(K(KernelInstance::silu_mul(cols))),
                    Epilogue::GatedGelu => Some(K(KernelInstance::gelu_mul(cols))),
                    _ => None,
                };
                bias.into_iter()
                    .chain([Lib(format!("{what} [rows, {n_rows}, {k}]"))])
                    .chain(gate)
                    .collect::<Vec<_>>()
            };
            let uses = |one: KernelInstance,
                        few: KernelInstance,
                        many: Vec<(&'static str, Vec<LaunchStep>)>| {
                let mut v = vec![
                    KernelUse {
                        when: "1 row",
                        steps: vec![K(one)],
                    },
                    KernelUse {
                        when: "2-8 rows",
                        steps: norm_first().into_iter().chain([K(few)]).collect(),
                    },
                ];
                for (when, steps) in many {
                    v.push(KernelUse {
                        when,
                        steps: norm_first().into_iter().chain(steps).collect(),
                    });
                }
                v
            };
            match QuantFormat::of(*format) {
                None => uses(
                    gemv_instance(1, k, epi, folded, ty),
                    gemv_instance(GEMV_MAX_ROWS, k, epi, folded, ty),
                    vec![("> 8 rows", gemm("cuBLAS(Lt) bf16 GEMM".into()))],
                ),
                Some(f) => {
                    let dequant = K(KernelInstance::dequant(k, f));
                    let many = if f == QuantFormat::Fp8 {
                        vec![
                            (
                                "> 8 rows",
                                [K(KernelInstance::act_fp8(k, true))]
                                    .into_iter()
                                    .chain(gemm("cuBLASLt FP8 GEMM".into()))
                                    .collect(),
                            ),
                            (
                                "> 8 rows, no FP8 GEMM algorithm for the shape",
                                [K(KernelInstance::act_fp8(k, false)), dequant]
                                    .into_iter()
                                    .chain(gemm("cuBLAS(Lt) bf16 GEMM".into()))
                                    .collect(),
                            ),
                        ]
                    } else {
                        vec![(
                            "> 8 rows",
                            [dequant]
                                .into_iter()
                                .chain(gemm("cuBLAS(Lt) bf16 GEMM".into()))
                                .collect(),
                        )]
                    };
                    uses(
                        KernelInstance::gemv_q(k, epi, f, folded, ty),
                        KernelInstance::gemv_q(k, epi, f, false, ty),
                        many,
                    )
                }
            }
        }
    }
}

/// Every kernel instance a plan launches on `arch` (`sm_90`, …): what the compiler compiles into
/// the engine and the executor resolves by name expression — those of every launch
/// ([`launch_kernels`]) and sampling's.
pub fn plan_instances(plan: &Plan, arch: &str) -> Vec<KernelInstance> {
    let mut out = vec![KernelInstance::argmax(), KernelInstance::sample()];
    for l in &plan.launches {
        for u in launch_kernels(plan, l, arch) {
            for s in u.steps {
                if let LaunchStep::Kernel(k) = s {
                    out.push(k);
                }
            }
        }
    }
    out.sort_by(|a, b| a.name_expr.cmp(&b.name_expr));
    out.dedup_by(|a, b| a.name_expr == b.name_expr);
    out
}

/// The plan as `kiln inspect --plan` prints it: each launch, then what it runs on `arch` by
/// the kind of step, every kernel with its template arguments named.
pub fn describe_plan(plan: &Plan, arch: &str) -> String {
    let mut out = format!("{}\nkernels for {arch}\n", plan.describe_header());
    for (i, l) in plan.launches.iter().enumerate() {
        out += &format!("{i:>4}  {}\n", plan.describe_launch(i));
        for u in launch_kernels(plan, l, arch) {
            let steps: Vec<String> = u
                .steps
                .iter()
                .map(|s| match s {
                    LaunchStep::Kernel(k) => format!("{:?}", k.kernel),
                    LaunchStep::Library(what) => what.clone(),
                })
                .collect();
            out += &format!("          {}: {}\n", u.when, steps.join(" → "));
        }
    }
    out
}

/// Checks that every weight a launch reads is in the engine with the element type its kernel
/// reads: bf16 matrices, norms and tables, f32 RoPE frequencies of `head_dim / 2` entries.
pub fn check_weights(plan: &Plan, engine: &Engine) -> Result<(), CudaError> {
    use safetensors::Dtype;
    let half = plan.attention.head_dim / 2;
    let want = |name: &str, dtype: Dtype, len: Option<usize>| {
        let (e, _) = engine
            .tensor(name)
            .map_err(|e| CudaError::Engine(format!("weight `{name}`: {e}")))?;
        let n: usize = e.shape.iter().product();
        if e.dtype != dtype || len.is_some_and(|l| l != n) {
            return Err(CudaError::Engine(format!(
                "weight `{name}` is {:?} {:?}; the plan reads it as {dtype:?}{}",
                e.dtype,
                e.shape,
                len.map_or(String::new(), |l| format!(" [{l}]"))
            )));
        }
        Ok(())
    };
    for l in &plan.launches {
        match l {
            Launch::Embedding { table, .. } => want(table, Dtype::BF16, None)?,
            Launch::RmsNorm { w, .. } => want(w, Dtype::BF16, None)?,
            Launch::Linear {
                x,
                w,
                format,
                norm,
                epilogue,
                out,
            } => {
                if *format == DType::BF16 {
                    want(w, Dtype::BF16, None)?;
                } else {
                    let k = plan.buffers[*x].cols;
                    let n = epilogue.weight_rows(plan.buffers[*out].cols);
                    let parts = crate::quant::parts(*format, n, k).ok_or_else(|| {
                        CudaError::Engine(format!(
                            "weight `{w}`: the plan reads it as {}, not a weight format",
                            format.name()
                        ))
                    })?;
                    for p in parts {
                        let name = format!("{w}{}", p.suffix);
                        let (e, _) = engine
                            .tensor(&name)
                            .map_err(|e| CudaError::Engine(format!("weight `{name}`: {e}")))?;
                        if e.dtype != p.dtype || e.shape != p.shape {
                            return Err(CudaError::Engine(format!(
                                "weight `{name}` is {:?} {:?}; the plan reads it as {:?} {:?} ({})",
                                e.dtype,
                                e.shape,
                                p.dtype,
                                p.shape,
                                format.name()
                            )));
                        }
                    }
                }
                if let Epilogue::Bias(b) = epilogue {
                    let rows = engine.tensor(w).map(|(e, _)| e.shape[0]).ok();
                    want(b, Dtype::BF16, rows)?;
                }
                if let Some(n) = norm {
                    want(&n.w, Dtype::BF16, None)?;
                }
            }
            Launch::RopeAppend { inv_freq, .. } | Launch::Attention { inv_freq, .. } => {
                want(inv_freq, Dtype::F32, Some(half))?
            }
            Launch::GatherLast { .. } => {}
        }
    }
    Ok(())
}
