//! Model families other than Llama 2/3, each a RON file in `models/`, against HuggingFace
//! transformers on the CPU: for every tiny random checkpoint in `tests/fixtures/families/`
//! (made by `make.py` there: transformers' `save_pretrained` and its f32 logits), kiln's
//! optimized and unoptimized engines must reproduce transformers' logits at every position to
//! ≤ 1e-4 relative L2, in one prefill and token by token through the KV cache, and agree with
//! each other to ≤ 1e-5.

mod common;

use common::*;
use kiln::compiler::{build, BuildOptions};
use kiln::runtime::cpu::CpuExecutor;
use kiln::runtime::engine::Engine;
use std::path::PathBuf;

/// transformers' input ids and logits (one row per position).
struct Reference {
    ids: Vec<i32>,
    logits: Vec<Vec<f32>>,
}

fn reference(family: &str) -> (PathBuf, Reference) {
    let dir = root().join("tests/fixtures/families").join(family);
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    (dir, Reference { ids, logits })
}

/// Builds the family's checkpoint into a CPU engine (optimized unless `no_optimize`).
fn executor(ckpt: &std::path::Path, no_optimize: bool) -> CpuExecutor {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.kiln");
    let opts = BuildOptions {
        no_optimize,
        ..BuildOptions::default()
    };
    build(ckpt, &path, &opts, &|_, _| {}).unwrap();
    Engine::open(&path).unwrap().cpu_executor().unwrap()
}

/// Logits of every position from one prefill of all ids.
fn prefill_rows(exec: &CpuExecutor, ids: &[i32]) -> Vec<Vec<f32>> {
    let mut session = exec.session(1);
    let out = exec.step(&mut session, ids, &[]).unwrap();
    let l = &out.outputs["logits"];
    let vocab = *l.shape.last().unwrap();
    l.data.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
}

/// Logits of positions `split - 1 ..` from a prefill of `ids[..split]` and then one decode step
/// per token (the KV cache path).
fn incremental_rows(exec: &CpuExecutor, ids: &[i32], split: usize) -> Vec<Vec<f32>> {
    let mut session = exec.session(1);
    let last = |out: &kiln::runtime::cpu::StepOutput| {
        let l = &out.outputs["logits"];
        let vocab = *l.shape.last().unwrap();
        l.data[l.data.len() - vocab..].to_vec()
    };
    let mut rows = vec![last(&exec.step(&mut session, &ids[..split], &[]).unwrap())];
    for &t in &ids[split..] {
        rows.push(last(&exec.step(&mut session, &[t], &[]).unwrap()));
    }
    rows
}

fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.concat()
}

fn check_family(family: &str) {
    let (ckpt, r) = reference(family);
    let optimized = executor(&ckpt, false);
    let plain = executor(&ckpt, true);
    let want = flat(&r.logits);
    let got = prefill_rows(&optimized, &r.ids);
    let err = rel_l2(&flat(&got), &want);
    assert!(err <= 1e-4, "{family}: prefill vs transformers {err:.2e}");
    let split = 5;
    let inc = incremental_rows(&optimized, &r.ids, split);
    let err_inc = rel_l2(&flat(&inc), &flat(&r.logits[split - 1..]));
    assert!(
        err_inc <= 1e-4,
        "{family}: token by token vs transformers {err_inc:.2e}"
    );
    let unopt = prefill_rows(&plain, &r.ids);
    let err_opt = rel_l2(&flat(&got), &flat(&unopt));
    assert!(
        err_opt <= 1e-5,
        "{family}: optimized vs unoptimized {err_opt:.2e}"
    );
    eprintln!(
        "{family}: prefill {err:.2e}, token by token {err_inc:.2e}, optimized vs not {err_opt:.2e}"
    );
}

#[test]
fn llama31_rope_scaling_matches_transformers() {
    check_family("llama31");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_family("mistral");
}

#[test]
fn qwen2_qkv_bias_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn gemma_matches_transformers() {
    check_family("gemma");
}

#[test]
fn gemma2_softcaps_and_alternating_windows_match_transformers() {
    check_family("gemma2");
}

#[test]
fn phi3_fused_projections_match_transformers() {
    check_family("phi3");
}

#[test]
fn gpt2_matches_transformers() {
    check_family("gpt2");
}

/// The GPU backend lowers Llama-shaped layers (any RoPE frequency table, q/k/v biases, sliding
/// windows: Llama 3.1, Qwen2, Mistral) and Gemma's, so far: a family it cannot run is refused at build time naming the node and
/// the family file, never lowered into a wrong engine.
#[test]
fn families_the_gpu_cannot_run_are_refused_by_name() {
    for (family, file) in [("gemma2", "models/gemma2.ron"), ("gpt2", "models/gpt2.ron")] {
        let ckpt = root().join("tests/fixtures/families").join(family);
        let dir = tempfile::tempdir().unwrap();
        let opts = BuildOptions {
            cuda_arch: Some("sm_90".into()),
            ..BuildOptions::default()
        };
        let err = build(&ckpt, &dir.path().join("g.kiln"), &opts, &|_, _| {})
            .err()
            .unwrap_or_else(|| panic!("{family}: a GPU engine was built"))
            .to_string();
        assert!(
            err.contains(file) && err.contains("GPU lowering: node `"),
            "{family}: {err}"
        );
    }
}

/// A GPT-2 checkpoint saved from the base model (tensor names without `transformer.`, as the
/// hub's `openai-community/gpt2` files are) with the causal-mask buffers older checkpoints carry
/// (`h.N.attn.bias`, `h.N.attn.masked_bias`) builds and computes the same logits.
#[test]
fn gpt2_base_model_names_and_mask_buffers_load() {
    use safetensors::tensor::TensorView;
    let (src, r) = reference("gpt2");
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("gpt2-base");
    std::fs::create_dir(&ckpt).unwrap();
    std::fs::copy(src.join("config.json"), ckpt.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mask: Vec<u8> = (0..64 * 64).flat_map(|_| 1f32.to_le_bytes()).collect();
    let masked_bias = (-1e4f32).to_le_bytes();
    let mut tensors: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.trim_start_matches("transformer.").to_string(), v))
        .collect();
    for layer in 0..2 {
        let f32 = safetensors::Dtype::F32;
        tensors.push((
            format!("h.{layer}.attn.bias"),
            TensorView::new(f32, vec![1, 1, 64, 64], &mask).unwrap(),
        ));
        tensors.push((
            format!("h.{layer}.attn.masked_bias"),
            TensorView::new(f32, vec![], &masked_bias).unwrap(),
        ));
    }
    let out = safetensors::tensor::serialize(tensors, None).unwrap();
    std::fs::write(ckpt.join("model.safetensors"), out).unwrap();
    let got = prefill_rows(&executor(&ckpt, false), &r.ids);
    let err = rel_l2(&flat(&got), &flat(&r.logits));
    assert!(err <= 1e-4, "gpt2 (base names): {err:.2e}");
}
