//! Tests of the rewriter: a snapshot per rule (`rules.rs`), the optimized Llama decoder layer
//! (`layer.rs`) and of the other families (`families.rs`), numerical equivalence on random tiny Llamas (`equivalence.rs`), extraction and
//! bad input (`extraction.rs`), the e-graph language against the IR's op list (`language.rs`). The
//! verifier runs before every snapshot.

mod equivalence;
mod extraction;
mod families;
mod language;
mod layer;
mod rules;

use super::derive::{evaluate, DerivedWeight};
use super::verify::verify;
use crate::graph::expand;
use crate::model::{params::bind, ModelFile, LLAMA_RON};
use kiln_runtime::cpu::{CpuExecutor, ExecError};
use kiln_runtime::ir::Graph;
use std::collections::HashMap;

/// The Llama graph for a config.
pub(super) fn llama(config: &serde_json::Value) -> Graph {
    let model = ModelFile::parse(LLAMA_RON, "llama.ron").unwrap();
    expand(&model, &bind(&model.params, config).unwrap()).unwrap()
}

/// A graph from model-language text (a minimal model for one rule).
pub(super) fn model(text: &str) -> Graph {
    let m = ModelFile::parse(text, "test.ron").unwrap();
    expand(&m, &bind(&m.params, &serde_json::json!({})).unwrap()).unwrap()
}

/// Verifies `graph` against `reference`, panicking with the error: run before every snapshot.
#[track_caller]
pub(super) fn verified(graph: &Graph, reference: &Graph) {
    if let Err(e) = verify(graph, reference) {
        panic!("graph fails verification: {e}");
    }
}

/// A seeded xorshift generator.
pub(super) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Magnitude in `[0.1, 1) · scale`, random sign: never zero.
    pub fn value(&mut self, scale: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        let m = scale * (0.1 + 0.9 * u);
        if self.next() & 1 == 0 {
            m
        } else {
            -m
        }
    }
}

/// Fresh random weights for a checkpoint name and shape (seeded by the name): matrices scaled by
/// `1/√in`, vectors (norm weights) around 1.
pub(super) fn random_weight(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let h = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng::new(h);
    let n: usize = shape.iter().product();
    if shape.len() == 1 {
        return (0..n).map(|_| 1.0 + 0.5 * rng.value(1.0)).collect();
    }
    let scale = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
    (0..n).map(|_| rng.value(scale)).collect()
}

/// A CPU executor for `graph` with random weights; derived weights are evaluated from them.
pub(super) fn executor(graph: &Graph, derived: &[DerivedWeight], seed: u64) -> CpuExecutor {
    let recipes: HashMap<&str, &DerivedWeight> =
        derived.iter().map(|d| (d.name.as_str(), d)).collect();
    let base = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ExecError> {
        Ok(random_weight(seed, name, shape))
    };
    CpuExecutor::new(graph.clone(), |name, shape| match recipes.get(name) {
        Some(d) => evaluate(d, base),
        None => base(name, shape),
    })
    .unwrap()
}

/// Logits of a prefill of `prompt` (per sequence) then one decode step per token of `next`.
pub(super) fn run(
    exec: &CpuExecutor,
    batch: usize,
    prompt: &[i32],
    next: &[Vec<i32>],
) -> Vec<Vec<f32>> {
    let mut session = exec.session(batch);
    let mut all = vec![];
    for tokens in std::iter::once(prompt).chain(next.iter().map(|t| t.as_slice())) {
        let out = exec.step(&mut session, tokens, &[]).unwrap();
        all.push(out.outputs["logits"].data.clone());
    }
    all
}

/// `‖a − b‖ / ‖b‖`.
pub(super) fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// A tiny Llama `config.json`.
#[allow(clippy::too_many_arguments)]
pub(super) fn tiny_config(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    tied: bool,
) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
    })
}

/// The SmolLM2-135M config of the reference fixtures.
pub(super) fn smollm2_config() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smollm2-135m/config.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}
