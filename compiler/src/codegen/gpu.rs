//! GPU engine artifacts: the launch plan of an optimized graph, every kernel instance it uses
//! compiled to CUBIN, and the engine metadata that ties them together.

use super::kernels::{compile, GemvEpilogue, KernelInstance, OutType};
use super::lower::lower;
use super::nvrtc;
use crate::engine_writer::EngineTensor;
use kiln_runtime::cuda::kv_cache::BLOCK;
use kiln_runtime::engine::keys;
use kiln_runtime::ir::Graph;
use kiln_runtime::plan::{BufType, Epilogue, Launch, Plan};
use std::collections::BTreeMap;

/// What a GPU engine adds to a CPU one.
pub struct GpuArtifacts {
    /// The launch plan.
    pub plan: Plan,
    /// One `kernels.<module>` U8 tensor per template file (a CUBIN).
    pub tensors: Vec<EngineTensor>,
    /// Arch, NVRTC version, plan and kernel table.
    pub metadata: Vec<(String, String)>,
}

/// Every kernel instance a plan launches (the runtime resolves exactly these names).
pub fn plan_instances(plan: &Plan) -> Vec<KernelInstance> {
    let a = plan.attention;
    let (h, kh, d) = (a.heads, a.kv_heads, a.head_dim);
    let mut out = vec![
        KernelInstance::rope_append(h, kh, d, BLOCK),
        KernelInstance::attention_decode(h, kh, d, BLOCK),
        KernelInstance::attention_decode_merge(h, d),
        KernelInstance::attention_prefill_for(h, kh, d, BLOCK),
        KernelInstance::argmax(),
        KernelInstance::add_inplace(),
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
                epilogue,
                out: o,
                ..
            } => {
                let k = plan.buffers[*x].cols;
                let epi = match epilogue {
                    Epilogue::None => GemvEpilogue::Plain,
                    Epilogue::Residual(_) => GemvEpilogue::Residual,
                    Epilogue::Gated => GemvEpilogue::Gated,
                };
                let ty = if plan.buffers[*o].dtype == BufType::F32 {
                    OutType::F32
                } else {
                    OutType::Bf16
                };
                out.push(KernelInstance::gemv(k, 1, epi, ty));
                out.push(KernelInstance::gemv_tc(
                    k,
                    kiln_runtime::cuda::GEMV_MAX_ROWS,
                    epi,
                    ty,
                ));
                if *epilogue == Epilogue::Gated {
                    out.push(KernelInstance::silu_mul(plan.buffers[*o].cols));
                }
            }
            Launch::RopeAppend { .. } | Launch::Attention { .. } => {}
        }
    }
    out.sort_by(|a, b| a.name_expr.cmp(&b.name_expr));
    out.dedup_by(|a, b| a.name_expr == b.name_expr);
    out
}

/// Lowers `graph`, compiles its kernels for `arch` and describes them for the engine.
pub fn gpu_artifacts(graph: &Graph, arch: &str) -> Result<GpuArtifacts, String> {
    let plan = lower(graph)?;
    let instances = plan_instances(&plan);
    let compiled = compile(&instances, arch).map_err(|e| e.to_string())?;
    let (major, minor) = nvrtc::version().map_err(|e| e.to_string())?;
    let mut modules: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut table = Vec::new();
    for k in &compiled {
        let module = format!("{:?}", k.file).to_lowercase();
        modules
            .entry(module.clone())
            .or_insert_with(|| k.cubin.to_vec());
        table.push(
            serde_json::json!({"module": module, "name": k.name_expr, "lowered": k.lowered_name}),
        );
    }
    let tensors = modules
        .into_iter()
        .map(|(m, bytes)| EngineTensor {
            name: format!("kernels.{m}"),
            dtype: safetensors::Dtype::U8,
            shape: vec![bytes.len()],
            bytes,
        })
        .collect();
    let metadata = vec![
        (keys::ARCH.to_string(), arch.to_string()),
        (keys::CUDA_VERSION.to_string(), format!("{major}.{minor}")),
        (keys::PLAN.to_string(), plan.to_ron()),
        (
            keys::KERNELS.to_string(),
            serde_json::Value::Array(table).to_string(),
        ),
    ];
    Ok(GpuArtifacts {
        plan,
        tensors,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiler_and_runtime_agree_on_kernel_names() {
        let cfg: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/smollm2-135m/config.json"
        ))
        .unwrap();
        let g =
            crate::build::graph_for(&crate::build::model_for(&cfg, None).unwrap(), &cfg).unwrap();
        let o = crate::rewrite::optimize(&g, &crate::rewrite::RewriteOptions::default()).unwrap();
        let plan = lower(&o.graph).unwrap();
        assert_eq!(plan.layers, 30);
        assert_eq!(plan.launches.len(), 30 * 8 + 4);
        let ours: Vec<String> = plan_instances(&plan)
            .into_iter()
            .map(|k| k.name_expr)
            .collect();
        assert_eq!(ours, kiln_runtime::cuda::instance_names(&plan));
    }
}
