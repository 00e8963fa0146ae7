//! GPU engine artifacts: the launch plan of an optimized graph, every kernel instance it uses
//! compiled to CUBIN, and the engine metadata that ties them together.

use super::kernels::compile;
use super::nvrtc;
use crate::engine_writer::EngineTensor;
use kiln_runtime::cuda::gemm_algos::{self, GemmAlgos};
use kiln_runtime::cuda::plan_instances;
use kiln_runtime::engine::keys;
use kiln_runtime::ir::Graph;
use kiln_runtime::lower::lower;
use kiln_runtime::plan::Plan;
use std::collections::BTreeMap;

/// What a GPU engine adds to a CPU one.
pub struct GpuArtifacts {
    /// The launch plan.
    pub plan: Plan,
    /// One `kernels.<module>` U8 tensor per template file (a CUBIN).
    pub tensors: Vec<EngineTensor>,
    /// Arch, NVRTC version, plan, kernel table and (where tuned) the GEMM algorithm table.
    pub metadata: Vec<(String, String)>,
    /// One line on how the prefill GEMMs' algorithms were chosen.
    pub gemm_note: String,
}

/// Lowers `graph`, compiles its kernels for `arch` and describes them for the engine.
pub fn gpu_artifacts(graph: &Graph, arch: &str) -> Result<GpuArtifacts, String> {
    let plan = lower(graph)?;
    let instances = plan_instances(&plan, arch);
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
    let (algos, gemm_note) = tune_gemms(&plan, arch);
    let mut metadata = vec![
        (keys::ARCH.to_string(), arch.to_string()),
        (keys::CUDA_VERSION.to_string(), format!("{major}.{minor}")),
        (keys::PLAN.to_string(), plan.to_ron()),
        (
            keys::KERNELS.to_string(),
            serde_json::Value::Array(table).to_string(),
        ),
    ];
    if let Some(a) = algos {
        let json = serde_json::to_string(&a).map_err(|e| e.to_string())?;
        metadata.push((keys::GEMM_ALGOS.to_string(), json));
    }
    Ok(GpuArtifacts {
        plan,
        tensors,
        metadata,
        gemm_note,
    })
}

/// Chooses the prefill GEMMs' cuBLASLt algorithms by timing them, when this machine has the GPU
/// the engine is for; elsewhere the engine keeps cuBLAS's default algorithm.
fn tune_gemms(plan: &Plan, arch: &str) -> (Option<GemmAlgos>, String) {
    let default = "prefill GEMMs: cuBLAS's default algorithms";
    match kiln_runtime::cuda::device_arch() {
        Ok(a) if a == arch => {}
        Ok(a) => return (None, format!("{default} (this GPU is {a}, not {arch})")),
        Err(_) => return (None, format!("{default} (no GPU here to time them on)")),
    }
    let shapes = gemm_algos::plan_shapes(plan);
    let t = std::time::Instant::now();
    match gemm_algos::tune(&shapes) {
        Ok(a) => {
            let rows = 2048;
            let (best, dflt) = a.totals(rows);
            let won = a.chosen.iter().filter(|c| c.us < c.default_us).count();
            let note = format!(
                "prefill GEMMs: {} shapes x {} row counts timed in {:.1} s; cuBLASLt beat the \
                 default in {won} of {}; one layer's GEMMs at {rows} rows {:.0} -> {:.0} us",
                shapes.len(),
                gemm_algos::TUNED_ROWS.len(),
                t.elapsed().as_secs_f64(),
                a.chosen.len(),
                dflt,
                best
            );
            (Some(a), note)
        }
        Err(e) => (None, format!("{default} (timing them failed: {e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::ir::{BinaryOp, InputKind, Node, Op};

    #[test]
    fn every_kernel_the_runtime_launches_is_one_the_compiler_lists() {
        let cfg: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/smollm2-135m/config.json"
        ))
        .unwrap();
        let g =
            crate::build::graph_for(&crate::build::model_for(&cfg, None).unwrap(), &cfg).unwrap();
        let o = crate::rewrite::optimize(&g, &crate::rewrite::RewriteOptions::default()).unwrap();
        let plan = lower(&o.graph).unwrap();
        assert_eq!(plan.layers, 30);
        // Per layer: qkv (norm folded in), rope_append, attention, o + residual, gate_up (norm
        // folded in), down + residual; then embedding, gather-last, lm_head (final norm folded).
        assert_eq!(plan.launches.len(), 30 * 6 + 3);
        assert!(!plan
            .launches
            .iter()
            .any(|l| matches!(l, kiln_runtime::plan::Launch::RmsNorm { .. })));
        let normed = plan
            .launches
            .iter()
            .filter(|l| matches!(l, kiln_runtime::plan::Launch::Linear { norm: Some(_), .. }))
            .count();
        assert_eq!(normed, 30 * 2 + 1);
        // Every residual projection writes in place over the residual stream it adds.
        for l in &plan.launches {
            if let kiln_runtime::plan::Launch::Linear {
                epilogue: kiln_runtime::plan::Epilogue::Residual(r),
                out,
                ..
            } = l
            {
                assert_eq!(plan.buffers[*r].slot, plan.buffers[*out].slot);
            }
        }
        // The prefill GEMMs the build times: qkv, o + residual, gate_up, down + residual.
        let shapes: Vec<(usize, usize, bool)> = gemm_algos::plan_shapes(&plan)
            .iter()
            .map(|s| (s.n, s.k, s.accumulate))
            .collect();
        let mut want = vec![
            (960, 576, false),
            (576, 576, true),
            (3072, 576, false),
            (576, 1536, true),
        ];
        want.sort();
        assert_eq!(shapes, want);
        let listed: Vec<String> =
            super::super::kernels::llama_kernels(&super::super::kernels::LlamaDims::smollm2_135m())
                .into_iter()
                .map(|k| k.name_expr)
                .collect();
        for k in plan_instances(&plan, "sm_90") {
            assert!(
                listed.contains(&k.name_expr),
                "{} is launched but not in llama_kernels",
                k.name_expr
            );
        }
    }

    /// The `config.json` of `tests/fixtures/families/<family>`.
    fn family_config(family: &str) -> serde_json::Value {
        let path = format!(
            "{}/../tests/fixtures/families/{family}/config.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn bf16_options() -> crate::rewrite::RewriteOptions {
        crate::rewrite::RewriteOptions {
            dtype: kiln_runtime::ir::DType::BF16,
            ..Default::default()
        }
    }

    /// The graph of a config's built-in model file, and its bf16 rewrite.
    fn bf16_graph(cfg: &serde_json::Value) -> (Graph, crate::rewrite::Optimized) {
        let model = crate::build::model_for(cfg, None).unwrap();
        let g = crate::build::graph_for(&model, cfg).unwrap();
        let o = crate::rewrite::optimize(&g, &bf16_options()).unwrap();
        (g, o)
    }

    /// The families whose layers differ from Llama's in a RoPE table (Llama 3.1's `llama3`
    /// scaling), q/k/v biases (Qwen2), a sliding window (Mistral, 4 keys in the fixture; Phi-3,
    /// 5) or fused checkpoint projections (Phi-3) lower to the Llama launches: the table is an f32 weight that rope_append and decode attention
    /// read, the biases one bias epilogue on the fused QKV, the window an attribute of each
    /// layer's attention.
    #[test]
    fn llama31_qwen2_mistral_and_phi3_lower_to_the_llama_launches() {
        use kiln_runtime::plan::{Epilogue, Launch};
        for (family, biased) in [
            ("llama31", false),
            ("qwen2", true),
            ("mistral", false),
            ("phi3", false),
        ] {
            let mut cfg = family_config(family);
            // A head size the attention kernels take (the fixtures' is 16).
            cfg["hidden_size"] = 128.into();
            if cfg.get("head_dim").is_some() {
                cfg["head_dim"] = 32.into();
            }
            let (_, o) = bf16_graph(&cfg);
            let plan = lower(&o.graph).unwrap_or_else(|e| panic!("{family}: {e}"));
            // Six launches per layer; embedding, gather-last and lm_head (the final norm folded
            // into it through the widening cast of the bf16 graph).
            assert_eq!(
                plan.launches.len(),
                2 * 6 + 3,
                "{family}: {}",
                plan.describe()
            );
            let tables = plan.f32_weights();
            assert_eq!(tables.len(), 1, "{family}: {tables:?}");
            let table = *tables.iter().next().unwrap();
            let derived = o.derived.iter().find(|d| d.name == table).unwrap();
            let value = crate::rewrite::derive::evaluate(derived, |n, _| {
                Err(kiln_runtime::cpu::ExecError::Weight {
                    name: n.into(),
                    message: "no checkpoint".into(),
                })
            })
            .unwrap();
            assert_eq!(value.len(), 16, "{family}");
            // Llama 3.1 divides the low frequencies (long wavelengths) by the factor 8.
            let plain = |i: usize| 1.0 / cfg_theta(&cfg).powf(2.0 * i as f32 / 32.0);
            let scaled = (0..16)
                .filter(|&i| (value[i] - plain(i)).abs() > 1e-9)
                .count();
            assert_eq!(scaled > 0, family == "llama31", "{family}: {value:?}");
            let biases = plan
                .launches
                .iter()
                .filter(|l| {
                    matches!(
                        l,
                        Launch::Linear {
                            epilogue: Epilogue::Bias(_),
                            ..
                        }
                    )
                })
                .count();
            assert_eq!(biases, if biased { 2 } else { 0 }, "{family}");
            let windows: Vec<u32> = plan
                .launches
                .iter()
                .filter_map(|l| match l {
                    Launch::Attention { window, .. } => Some(*window),
                    _ => None,
                })
                .collect();
            let want = match family {
                "mistral" => 4,
                "phi3" => 5,
                _ => 0,
            };
            assert_eq!(windows, [want, want], "{family}");
        }
    }

    /// Gemma lowers to the Llama launches with its differences in the launches' attributes:
    /// the embedding scaled by `sqrt(hidden)` (8 in the fixture), the GeGLU MLP one gated
    /// GEMV/GEMM with the GELU epilogue, the RMSNorm gain `1 + w` a derived weight, head size 32.
    #[test]
    fn gemma_lowers_with_a_scaled_embedding_and_a_gelu_gate() {
        use kiln_runtime::plan::{Epilogue, Launch};
        let (g, o) = bf16_graph(&family_config("gemma"));
        let plan = lower(&o.graph).unwrap();
        assert_eq!(plan.launches.len(), 2 * 6 + 3, "{}", plan.describe());
        let Launch::Embedding { scale, out, .. } = plan.launches[0] else {
            panic!("{}", plan.describe());
        };
        assert_eq!(scale, 8.0);
        // The buffer holds the scaled value: it is named for the product, which `kiln diff`
        // compares it with.
        assert_eq!(plan.buffers[out].name, "x");
        let gates: Vec<&Epilogue> = plan
            .launches
            .iter()
            .filter_map(|l| match l {
                Launch::Linear { epilogue, .. } if epilogue.is_gated() => Some(epilogue),
                _ => None,
            })
            .collect();
        assert_eq!(gates, [&Epilogue::GatedGelu, &Epilogue::GatedGelu]);
        assert!(plan
            .describe()
            .contains("add(1,model.layers.0.input_layernorm.weight)"));
        // The gated projection's kernels by rows: the GEMV with the folded norm and the GELU
        // epilogue at one row; the norm, then the tensor-core GEMV, up to 8; the norm, the
        // GEMM and `gelu_mul` beyond.
        let text = kiln_runtime::cuda::describe_plan(&plan, "sm_90");
        for line in [
            "1 row: Gemv { k: 64, mmax: 1, epi: GatedGelu, norm: true, out: Bf16 }",
            "2-8 rows: RmsNorm { hidden: 64 } → GemvTc { k: 64, mmax: 8, epi: GatedGelu, out: Bf16 }",
            "> 8 rows: RmsNorm { hidden: 64 } → cuBLAS(Lt) bf16 GEMM [rows, 192, 64] → GeluMul { ffn: 96 }",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        let instances = plan_instances(&plan, "sm_90");
        for family in [
            kiln_runtime::kernels::KernelFamily::GeluMul,
            kiln_runtime::kernels::KernelFamily::Gemv,
        ] {
            assert!(instances.iter().any(|k| k.family() == family), "{family:?}");
        }
        // An embedding read unscaled by anything else, or scaled by a tensor, is refused by name.
        let mut g2 = g.clone();
        let mul = g2
            .nodes
            .iter()
            .position(|n| n.name == "x")
            .expect("gemma.ron names the scaled embedding `x`");
        let embedded = g2.nodes[mul].inputs[0];
        g2.nodes[mul].inputs[1] = embedded;
        let o2 = crate::rewrite::optimize(&g2, &bf16_options()).unwrap();
        let err = lower(&o2.graph).unwrap_err();
        assert!(err.contains("only an embedding times a constant"), "{err}");
    }

    /// Deterministic values in [-0.5, 0.5) for a checkpoint weight, from its name (norm gains
    /// around 1, as trained models have them).
    fn random_weight(name: &str, shape: &[usize]) -> Vec<f32> {
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let gain = name.contains("norm") || name.contains("ln_");
        crate::quantize::tests::random(shape.iter().product(), seed)
            .into_iter()
            .map(|u| if gain { 1.0 + 0.2 * u } else { 0.1 * u })
            .collect()
    }

    /// The launch plan of each family that lowers, run on the CPU launch by launch
    /// (`kiln_runtime::lower::interpret`), against the CPU executor on its graph with the same
    /// random weights: a prefill of 7 tokens, then two decode steps; the last token's logits
    /// agree to bf16's rounding. This checks on any machine what the lowering and its
    /// peepholes (the folded norms and scale, RoPE + appends, the logits' gather) compute,
    /// and that no buffer is read after its arena slot was reused.
    #[test]
    fn lowered_plans_compute_their_graphs_on_the_cpu() {
        use kiln_runtime::cpu::CpuExecutor;
        use kiln_runtime::lower::interpret::PlanInterpreter;
        let smol: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/smollm2-135m/config.json"
        ))
        .unwrap();
        let mut smol = smol;
        smol["num_hidden_layers"] = 2.into();
        let mut cases = vec![("smollm2", smol, None)];
        for family in ["llama31", "qwen2", "mistral", "phi3", "gemma"] {
            let mut cfg = family_config(family);
            cfg["hidden_size"] = 128.into();
            if cfg.get("head_dim").is_some() {
                cfg["head_dim"] = 32.into();
            }
            cases.push((family, cfg, None));
        }
        let fp8 = kiln_runtime::ir::DType::Fp8;
        let mut q = family_config("llama31");
        q["hidden_size"] = 128.into();
        q["head_dim"] = 32.into();
        cases.push(("llama31 fp8", q, Some(fp8)));
        for (name, cfg, quant) in cases {
            let model = crate::build::model_for(&cfg, None).unwrap();
            let g = crate::build::graph_for(&model, &cfg).unwrap();
            let opts = crate::rewrite::RewriteOptions {
                quant: quant.map(|format| crate::rewrite::rules::quant::QuantOptions {
                    format,
                    skip: crate::rewrite::rules::quant::DEFAULT_SKIP
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                }),
                ..bf16_options()
            };
            let o = crate::rewrite::optimize(&g, &opts).unwrap();
            let value = |w: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
                match o.derived.iter().find(|d| d.name == w) {
                    Some(d) => {
                        crate::rewrite::derive::evaluate(d, |src, s| Ok(random_weight(src, s)))
                            .map_err(|e| e.to_string())
                    }
                    None => Ok(random_weight(w, shape)),
                }
            };
            let shape_of = |w: &str| -> Vec<usize> {
                let (id, _) = o.graph.weights().find(|&(_, n)| n == w).unwrap();
                let ty = &o.graph.nodes[id].ty;
                ty.shape
                    .iter()
                    .map(|d| d.as_const().unwrap() as usize)
                    .collect()
            };
            let exec = CpuExecutor::new(o.graph.clone(), |w, shape| {
                value(w, shape).map_err(|message| kiln_runtime::cpu::ExecError::Weight {
                    name: w.into(),
                    message,
                })
            })
            .unwrap();
            let plan = lower(&o.graph).unwrap_or_else(|e| panic!("{name}: {e}"));
            let read = |w: &str| {
                let shape = shape_of(w);
                value(w, &shape).map(|v| (v, shape))
            };
            let mut interp = PlanInterpreter::new(&plan, &read).unwrap();
            let mut session = exec.session(1);
            let vocab = plan.vocab;
            for (step, tokens) in [vec![3u32, 17, 5, 9, 60, 2, 11], vec![7], vec![30]]
                .into_iter()
                .enumerate()
            {
                let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
                let out = exec.step(&mut session, &ids, &[]).unwrap();
                let logits = &out.outputs["logits"].data;
                let want = &logits[logits.len() - vocab..];
                let got = interp.step(&tokens).unwrap();
                let (num, den) = got.iter().zip(want).fold((0f64, 0f64), |(n, d), (a, b)| {
                    (n + ((a - b) as f64).powi(2), d + (*b as f64).powi(2))
                });
                let err = (num / den).sqrt();
                // fp8 activations: a value within a bf16 rounding of an E4M3 boundary takes the
                // neighbouring code (as on the GPU, `bench/RESULTS.md`).
                let tol = if quant.is_some() { 1e-1 } else { 2e-2 };
                eprintln!("{name} step {step}: logits relative L2 {err:.3e}");
                assert!(
                    err < tol,
                    "{name} step {step}: logits differ by {err:.3e} (relative L2)"
                );
            }
        }
    }

    /// A bf16 graph of a tied model: the logits are a widening cast of a bf16 product; they
    /// lower to the same f32 lm_head GEMV (final norm folded) as the f32 graph's.
    #[test]
    fn bf16_graphs_lower_to_the_same_launches() {
        let cfg: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/smollm2-135m/config.json"
        ))
        .unwrap();
        let g =
            crate::build::graph_for(&crate::build::model_for(&cfg, None).unwrap(), &cfg).unwrap();
        let launches = |dtype| {
            let opts = crate::rewrite::RewriteOptions {
                dtype,
                ..Default::default()
            };
            let o = crate::rewrite::optimize(&g, &opts).unwrap();
            lower(&o.graph).unwrap().launches.len()
        };
        assert_eq!(launches(kiln_runtime::ir::DType::BF16), 30 * 6 + 3);
        assert_eq!(launches(kiln_runtime::ir::DType::F32), 30 * 6 + 3);
    }

    /// `--quant` GPU engines: every projection but the output one (kept in 16 bits) records its
    /// weight format in the plan; the launch count does not change (the quantized GEMV takes the
    /// place of the bf16 one, folding the norm at one row as the bf16 GEMV does; from two rows
    /// the norm runs as its own kernel, as for bf16); the
    /// instances include the quantized GEMV and the prefill dequantization, each one the kernel
    /// lists compile. Formats the kernels do not read are refused naming the weight.
    #[test]
    fn quantized_graphs_lower_with_their_weight_formats() {
        use kiln_runtime::ir::DType;
        use kiln_runtime::plan::Launch;
        let cfg: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/smollm2-135m/config.json"
        ))
        .unwrap();
        let g =
            crate::build::graph_for(&crate::build::model_for(&cfg, None).unwrap(), &cfg).unwrap();
        let optimize = |format| {
            let opts = crate::rewrite::RewriteOptions {
                dtype: DType::BF16,
                quant: Some(crate::rewrite::rules::quant::QuantOptions {
                    format,
                    skip: crate::rewrite::rules::quant::DEFAULT_SKIP
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                }),
                ..Default::default()
            };
            crate::rewrite::optimize(&g, &opts).unwrap().graph
        };
        let listed: Vec<String> =
            super::super::kernels::llama_kernels(&super::super::kernels::LlamaDims::smollm2_135m())
                .into_iter()
                .map(|k| k.name_expr)
                .collect();
        for format in [
            DType::Int8,
            DType::Int4 {
                group: 128,
                zero_point: true,
            },
            DType::Int4 {
                group: 128,
                zero_point: false,
            },
            DType::Int4Min { group: 32 },
            DType::Int8Group { group: 32 },
            DType::Fp8,
        ] {
            let plan = lower(&optimize(format)).unwrap();
            assert_eq!(plan.launches.len(), 30 * 6 + 3, "{}", format.name());
            let formats: Vec<DType> = plan
                .launches
                .iter()
                .filter_map(|l| match l {
                    Launch::Linear { format, .. } => Some(*format),
                    _ => None,
                })
                .collect();
            assert_eq!(formats.len(), 30 * 4 + 1);
            assert_eq!(formats.iter().filter(|&&f| f == format).count(), 30 * 4);
            assert_eq!(*formats.last().unwrap(), DType::BF16, "lm_head stays bf16");
            assert!(plan.describe().contains(&format!(":{}", format.name())));
            let instances = plan_instances(&plan, "sm_90");
            for family in [
                kiln_runtime::kernels::KernelFamily::GemvQ,
                kiln_runtime::kernels::KernelFamily::Dequant,
            ] {
                assert!(instances.iter().any(|k| k.family() == family), "{family:?}");
            }
            for k in instances {
                assert!(
                    listed.contains(&k.name_expr),
                    "{} is launched but not in llama_kernels",
                    k.name_expr
                );
            }
        }
        {
            let format = DType::Int4Awq { group: 128 };
            let err = lower(&optimize(format)).unwrap_err();
            assert!(
                err.contains(format.name()) && err.contains("--target cpu"),
                "{err}"
            );
        }
    }

    fn cfg_theta(cfg: &serde_json::Value) -> f32 {
        cfg["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32
    }

    /// The SmolLM2 fixture's optimized graph.
    fn smollm2_optimized() -> Graph {
        let cfg: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/smollm2-135m/config.json"
        ))
        .unwrap();
        let model = crate::build::model_for(&cfg, None).unwrap();
        let g = crate::build::graph_for(&model, &cfg).unwrap();
        let opts = crate::rewrite::RewriteOptions::default();
        crate::rewrite::optimize(&g, &opts).unwrap().graph
    }

    /// `g` with a node `positions+1` inserted before the first node that `pick` selects, read
    /// by every selected node as its input `pick(node)`.
    fn with_shifted_positions(g: &Graph, pick: impl Fn(&Node) -> Option<usize>) -> Graph {
        let pos = g.input(InputKind::Positions).unwrap();
        let mut out = Graph::default();
        let mut map = Vec::with_capacity(g.nodes.len());
        let mut shifted = None;
        for n in &g.nodes {
            let mut node = n.clone();
            node.inputs = n.inputs.iter().map(|&i| map[i]).collect();
            if let Some(k) = pick(n) {
                let s = *shifted.get_or_insert_with(|| {
                    out.nodes.push(Node {
                        name: "one".into(),
                        op: Op::Constant { value: 1.0 },
                        inputs: vec![],
                        ty: kiln_runtime::ir::TensorType::new(kiln_runtime::ir::DType::F32, vec![]),
                    });
                    out.nodes.push(Node {
                        name: "positions+1".into(),
                        op: Op::Binary(BinaryOp::Add),
                        inputs: vec![map[pos], out.nodes.len() - 1],
                        ty: g.nodes[pos].ty.clone(),
                    });
                    out.nodes.len() - 1
                });
                node.inputs[k] = s;
            }
            out.nodes.push(node);
            map.push(out.nodes.len() - 1);
        }
        out.copy_bindings(g, |i| map[i]);
        out
    }

    /// The fixture lowers; RoPE at anything but the step's positions, which the GPU kernels
    /// would ignore, is refused naming the node and the positions.
    #[test]
    fn rope_at_computed_positions_is_refused_by_name() {
        let g = smollm2_optimized();
        assert!(lower(&g).is_ok());
        let shifted = with_shifted_positions(&g, |n| matches!(n.op, Op::Rope { .. }).then_some(1));
        let err = lower(&shifted).unwrap_err();
        assert!(
            err.contains("(Rope(") && err.contains("RoPE at positions `positions+1`"),
            "{err}"
        );
    }

    /// A launch that would read position arithmetic (no kernel computes it) is refused naming
    /// the launch's node and the value, instead of reading nothing.
    #[test]
    fn a_launch_reading_position_arithmetic_is_refused_by_name() {
        let g = with_shifted_positions(&smollm2_optimized(), |n| {
            (n.op == Op::LinearAdd).then_some(2)
        });
        let err = lower(&g).unwrap_err();
        assert!(
            err.contains("(LinearAdd)")
                && err.contains("reads `positions+1`, computed from positions, constants"),
            "{err}"
        );
    }
}
