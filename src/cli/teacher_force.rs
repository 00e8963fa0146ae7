//! `kiln teacher-force`: feeds given prompts and continuations through an engine and records,
//! for each sequence, the logits after its prompt and the greedy (argmax) token predicted at
//! every continuation position. Benchmarks and GPU checks compare these with transformers.
//!
//! Input JSON: `{"sequences": [{"prompt": [ids…], "continuation": [ids…]}, …]}`. On the GPU all
//! sequences run as one batch (prefill together, then one decode step per position, so unequal
//! prompt lengths exercise ragged batching); on the CPU each runs alone.

use anyhow::{bail, Context, Result};
use kiln::runtime::cuda::{CudaExecutor, CudaOptions, StepSeq};
use kiln::runtime::engine::Engine;
use kiln::runtime::sampling::argmax;
use std::collections::HashMap;
use std::path::Path;

#[derive(serde::Deserialize)]
struct Input {
    sequences: Vec<Sequence>,
}

#[derive(serde::Deserialize)]
struct Sequence {
    prompt: Vec<u32>,
    continuation: Vec<u32>,
}

/// Per sequence: last-prompt-token logits and the argmax after each fed token.
pub struct Scores {
    /// `[vocab]` logits after the prompt, per sequence.
    pub last_logits: Vec<Vec<f32>>,
    /// Argmax predictions: after the prompt, then after each continuation token but the last.
    pub predictions: Vec<Vec<u32>>,
}

fn run_gpu(engine: &Engine, seqs: &[Sequence]) -> Result<Scores> {
    let max_len = seqs
        .iter()
        .map(|s| s.prompt.len() + s.continuation.len())
        .max()
        .unwrap_or(1);
    let opts = CudaOptions {
        max_batch: seqs.len().max(1),
        max_step_tokens: seqs.iter().map(|s| s.prompt.len()).sum::<usize>().max(1),
        max_kv_tokens: Some(seqs.len() * (max_len + 32)),
        max_seq_len: max_len + 16,
        ..CudaOptions::default()
    };
    let mut exec = CudaExecutor::new(engine, opts)?;
    let ids: Vec<_> = seqs.iter().map(|_| exec.add_sequence()).collect();
    let batch: Vec<StepSeq> = seqs
        .iter()
        .zip(&ids)
        .map(|(s, &seq)| StepSeq {
            seq,
            tokens: s.prompt.clone(),
        })
        .collect();
    let logits = exec.step_logits(&batch)?;
    let vocab = logits.len() / seqs.len();
    let mut last_logits = Vec::new();
    let mut predictions: Vec<Vec<u32>> = Vec::new();
    for row in logits.chunks(vocab) {
        last_logits.push(row.to_vec());
        predictions.push(vec![argmax(row)]);
    }
    let steps = seqs
        .iter()
        .map(|s| s.continuation.len())
        .max()
        .unwrap_or(0)
        .saturating_sub(1);
    for k in 0..steps {
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| k + 1 < seqs[i].continuation.len())
            .collect();
        let batch: Vec<StepSeq> = live
            .iter()
            .map(|&i| StepSeq {
                seq: ids[i],
                tokens: vec![seqs[i].continuation[k]],
            })
            .collect();
        let next = exec.step_greedy(&batch)?;
        for (&i, t) in live.iter().zip(next) {
            predictions[i].push(t);
        }
    }
    Ok(Scores {
        last_logits,
        predictions,
    })
}

fn run_cpu(engine: &Engine, seqs: &[Sequence]) -> Result<Scores> {
    let exec = engine.cpu_executor()?;
    let mut scores = Scores {
        last_logits: vec![],
        predictions: vec![],
    };
    for s in seqs {
        let mut session = exec.session(1);
        let prompt: Vec<i32> = s.prompt.iter().map(|&t| t as i32).collect();
        let out = exec.step(&mut session, &prompt, &[])?;
        let l = &out.outputs["logits"];
        let vocab = *l.shape.last().context("logits shape")?;
        let row = l.data[l.data.len() - vocab..].to_vec();
        let mut preds = vec![argmax(&row)];
        for &t in s
            .continuation
            .iter()
            .take(s.continuation.len().saturating_sub(1))
        {
            let out = exec.step(&mut session, &[t as i32], &[])?;
            preds.push(argmax(&out.outputs["logits"].data));
        }
        scores.last_logits.push(row);
        scores.predictions.push(preds);
    }
    Ok(scores)
}

/// Runs the command: reads `input`, writes `output` (JSON with predictions; logits as lists).
pub fn run(engine_path: &Path, input_path: &Path, output: &Path, device: &str) -> Result<()> {
    let inputs = [engine_path, input_path];
    kiln::compiler::output::check_output(output, &inputs).map_err(anyhow::Error::msg)?;
    let text = std::fs::read_to_string(input_path)
        .with_context(|| format!("reading {}", input_path.display()))?;
    let input: Input =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", input_path.display()))?;
    if input.sequences.iter().any(|s| s.prompt.is_empty()) {
        bail!("every sequence needs a non-empty prompt");
    }
    let engine = Engine::open(engine_path)?;
    let context = engine.generation.max_context;
    let vocab = engine.graph.vocab().unwrap_or(i64::MAX);
    for (i, s) in input.sequences.iter().enumerate() {
        let len = s.prompt.len() + s.continuation.len();
        if len > context {
            bail!("sequence {i} has {len} tokens but the context window is {context} tokens");
        }
        if let Some(t) = s
            .prompt
            .iter()
            .chain(&s.continuation)
            .find(|&&t| i64::from(t) >= vocab)
        {
            bail!("sequence {i}: token id {t} is outside the vocabulary of {vocab} tokens");
        }
    }
    let scores = match device {
        "cuda" => run_gpu(&engine, &input.sequences)?,
        "cpu" => run_cpu(&engine, &input.sequences)?,
        other => bail!("unknown device `{other}` (cpu or cuda)"),
    };
    let mut out = HashMap::new();
    out.insert("predictions", serde_json::to_value(&scores.predictions)?);
    out.insert("last_logits", serde_json::to_value(&scores.last_logits)?);
    kiln::compiler::output::write_bytes(output, &inputs, &serde_json::to_vec(&out)?)
        .map_err(anyhow::Error::msg)
}
