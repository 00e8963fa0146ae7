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

/// Every kernel instance a plan launches on `arch` (`sm_90`, …): what the compiler compiles into
/// the engine and the executor resolves by name expression.
pub fn plan_instances(plan: &Plan, arch: &str) -> Vec<KernelInstance> {
    let a = plan.attention;
    let (h, kh, d) = (a.heads, a.kv_heads, a.head_dim);
    let mut out = vec![
        KernelInstance::rope_append(h, kh, d, BLOCK),
        KernelInstance::attention_decode(h, kh, d, BLOCK),
        KernelInstance::attention_decode_merge(h, d),
        KernelInstance::attention_prefill_for(h, kh, d, BLOCK, arch),
        KernelInstance::argmax(),
        KernelInstance::sample(),
    ];
    for l in &plan.launches {
        match l {
            Launch::Embedding { out: o, .. } | Launch::GatherLast { out: o, .. } => {
                out.push(KernelInstance::embedding(plan.buffers[*o].cols))
            }
            Launch::RmsNorm { out: o, .. } => {
                out.push(KernelInstance::rmsnorm(plan.buffers[*o].cols))
            }
            Launch::Linear {
                x,
                norm,
                format,
                epilogue,
                out: o,
                ..
            } => {
                let (k, epi, ty) = (
                    plan.buffers[*x].cols,
                    epilogue_kind(epilogue),
                    out_type(plan.buffers[*o].dtype),
                );
                match QuantFormat::of(*format) {
                    Some(f) => {
                        out.push(KernelInstance::gemv_q(k, epi, f, norm.is_some(), ty));
                        if norm.is_some() {
                            out.push(KernelInstance::gemv_q(k, epi, f, false, ty));
                        }
                        out.push(KernelInstance::dequant(k, f));
                        if f == QuantFormat::Fp8 {
                            out.push(KernelInstance::act_fp8(k, false));
                            out.push(KernelInstance::act_fp8(k, true));
                        }
                    }
                    None => {
                        out.push(gemv_instance(1, k, epi, norm.is_some(), ty));
                        out.push(gemv_instance(GEMV_MAX_ROWS, k, epi, norm.is_some(), ty));
                    }
                }
                if norm.is_some() {
                    // Batched GEMVs and prefill GEMMs run the folded norm as a kernel of its own.
                    out.push(KernelInstance::rmsnorm(k));
                }
                match epilogue {
                    Epilogue::Gated => out.push(KernelInstance::silu_mul(plan.buffers[*o].cols)),
                    Epilogue::GatedGelu => {
                        out.push(KernelInstance::gelu_mul(plan.buffers[*o].cols))
                    }
                    Epilogue::Bias(_) => out.push(KernelInstance::bias_rows(plan.buffers[*o].cols)),
                    _ => {}
                }
            }
            Launch::RopeAppend { .. } | Launch::Attention { .. } => {}
        }
    }
    out.sort_by(|a, b| a.name_expr.cmp(&b.name_expr));
    out.dedup_by(|a, b| a.name_expr == b.name_expr);
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
