//! `kiln diff`: runs a GPU engine's launch plan and its graph on the CPU executor side by side
//! on a prompt (one prefill, then one decode step with the next greedy token, then a mixed step:
//! that sequence's next token beside a second sequence's prefill of the same prompt, as the
//! serving scheduler batches them), and prints, for
//! every buffer a launch writes, its relative L2 error against the graph node it holds (the
//! buffer's name), marking the first that exceeds the tolerance. What proves a model on the
//! GPU, buffer by buffer, and finds the first kernel that goes wrong.
//!
//! The CPU runs the engine's own graph in f32 with the engine's (bf16) weights, so the only
//! differences are the GPU's bf16 activations and its kernels' order of operations.

use anyhow::{bail, Context, Result};
use kiln::runtime::cpu::HostTensor;
use kiln::runtime::cuda::{CudaExecutor, CudaOptions, StepSeq, TracedBuffer};
use kiln::runtime::engine::Engine;
use kiln::runtime::sampling::argmax;
use kiln::runtime::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::Path;

/// One compared buffer.
#[derive(serde::Serialize)]
struct Row {
    step: &'static str,
    launch: usize,
    buffer: String,
    rows: usize,
    cols: usize,
    /// Relative L2 error against the CPU node, or `None` where the layouts do not correspond.
    rel_l2: Option<f64>,
    over: bool,
}

/// The CPU node's value laid out as the GPU buffer `[rows, cols]`, where the two correspond:
/// the same elements in order; a `[1, h, s, d]` head-major node against a `[s, h·d]` buffer
/// (attention output); or, for a buffer of one row per sequence, the node's last row.
fn as_buffer(node: &HostTensor, rows: usize, cols: usize) -> Option<Vec<f32>> {
    let n = rows * cols;
    let s = &node.shape;
    if s.len() == 4 && s[0] == 1 && s[2] == rows && s[1] * s[3] == cols && s[1] > 1 && rows > 1 {
        let (h, d) = (s[1], s[3]);
        let mut out = vec![0.0; n];
        for hi in 0..h {
            for r in 0..rows {
                let src = &node.data[(hi * rows + r) * d..(hi * rows + r + 1) * d];
                out[r * cols + hi * d..r * cols + (hi + 1) * d].copy_from_slice(src);
            }
        }
        return Some(out);
    }
    if node.data.len() == n {
        return Some(node.data.clone());
    }
    if rows == 1 && node.data.len() > cols && node.data.len().is_multiple_of(cols) {
        return Some(node.data[node.data.len() - cols..].to_vec());
    }
    None
}

/// The CPU node of a buffer of one sequence's step, in the buffer's layout.
fn alone(taps: &BTreeMap<String, HostTensor>) -> impl Fn(&TracedBuffer) -> Option<Vec<f32>> + '_ {
    move |t| {
        taps.get(&t.name)
            .and_then(|node| as_buffer(node, t.rows, t.cols))
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// Compares every traced buffer with `want(buffer)`, the CPU's value in its layout.
fn compare(
    step: &'static str,
    traced: &[TracedBuffer],
    want: impl Fn(&TracedBuffer) -> Option<Vec<f32>>,
    tolerance: f64,
) -> Vec<Row> {
    traced
        .iter()
        .map(|t| {
            let rel = want(t).map(|want| rel_l2(&t.values, &want));
            Row {
                step,
                launch: t.launch,
                buffer: t.name.clone(),
                rows: t.rows,
                cols: t.cols,
                rel_l2: rel,
                over: rel.is_some_and(|e| e.is_nan() || e > tolerance),
            }
        })
        .collect()
}

/// Runs the command.
pub fn run(
    path: &Path,
    prompt: Option<&str>,
    ids: Option<&str>,
    tolerance: f64,
    json: bool,
) -> Result<()> {
    if !(tolerance.is_finite() && tolerance > 0.0) {
        bail!("--tolerance must be a positive number");
    }
    let engine = Engine::open(path)?;
    if engine.target() != "cuda" {
        bail!(
            "{}: a CPU engine has no GPU plan to compare; build it with --target cuda",
            path.display()
        );
    }
    let ids: Vec<u32> = match (prompt, ids) {
        (Some(text), _) => {
            let tok_json = engine.tokenizer_json.as_deref().with_context(|| {
                format!(
                    "{}: this engine has no tokenizer; pass --ids",
                    path.display()
                )
            })?;
            Tokenizer::from_json(tok_json)?.encode(text)?
        }
        (None, Some(list)) => super::parse_ids([list])?,
        (None, None) => bail!("give the prompt with --prompt or --ids"),
    };
    let vocab = engine.graph.vocab().unwrap_or(i64::MAX);
    if let Some(t) = ids.iter().find(|&&t| i64::from(t) >= vocab) {
        bail!("token id {t} is outside the vocabulary of {vocab} tokens");
    }
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    if ids.len() + 1 > engine.generation.max_context {
        bail!(
            "the prompt has {} tokens but the context window is {} tokens",
            ids.len(),
            engine.generation.max_context
        );
    }
    let opts = CudaOptions {
        max_batch: 2,
        max_step_tokens: ids.len() + 1,
        max_kv_tokens: Some(2 * (ids.len() + 64)),
        max_seq_len: ids.len() + 16,
        cuda_graphs: false,
        ..CudaOptions::default()
    };
    let mut gpu = CudaExecutor::new(&engine, opts).map_err(|e| {
        anyhow::anyhow!("{}: {e} (kiln diff needs the engine's GPU)", path.display())
    })?;
    let cpu = engine.cpu_executor()?;
    let seq = gpu.add_sequence();
    let prefill = gpu.step_traced(&[StepSeq {
        seq,
        tokens: ids.clone(),
    }])?;
    let next = prefill
        .last()
        .map(|l| argmax(&l.values[l.values.len() - l.cols..]))
        .context("the plan wrote no buffer")?;
    let decode = gpu.step_traced(&[StepSeq {
        seq,
        tokens: vec![next],
    }])?;
    let after = decode
        .last()
        .map(|l| argmax(&l.values[l.values.len() - l.cols..]))
        .context("the plan wrote no buffer")?;
    let second = gpu.add_sequence();
    let mixed = gpu.step_traced(&[
        StepSeq {
            seq,
            tokens: vec![after],
        },
        StepSeq {
            seq: second,
            tokens: ids.clone(),
        },
    ])?;

    let graph = cpu.graph();
    let tap_names = |traced: &[TracedBuffer]| -> Vec<String> {
        let mut names: Vec<String> = traced
            .iter()
            .map(|t| t.name.clone())
            .filter(|n| graph.find(n).is_some())
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let mut session = cpu.session(1);
    let cpu_ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let names = tap_names(&prefill);
    let taps: Vec<&str> = names.iter().map(String::as_str).collect();
    let out_prefill = cpu.step(&mut session, &cpu_ids, &taps)?;
    let names = tap_names(&decode);
    let taps: Vec<&str> = names.iter().map(String::as_str).collect();
    let out_decode = cpu.step(&mut session, &[next as i32], &taps)?;
    let names = tap_names(&mixed);
    let taps: Vec<&str> = names.iter().map(String::as_str).collect();
    let out_next = cpu.step(&mut session, &[after as i32], &taps)?;
    let out_second = cpu.step(&mut cpu.session(1), &cpu_ids, &taps)?;

    let mut rows = compare("prefill", &prefill, alone(&out_prefill.taps), tolerance);
    rows.extend(compare(
        "decode",
        &decode,
        alone(&out_decode.taps),
        tolerance,
    ));
    // The mixed step's buffers hold the first sequence's row, then the second's rows (its
    // prompt's, or its last for a buffer of one row per sequence).
    let n = ids.len();
    let together = |t: &TracedBuffer| {
        let first = as_buffer(out_next.taps.get(&t.name)?, 1, t.cols)?;
        let rest = if t.rows == 1 + n { n } else { 1 };
        let second = as_buffer(out_second.taps.get(&t.name)?, rest, t.cols)?;
        (t.rows == 1 + rest).then(|| [first, second].concat())
    };
    rows.extend(compare("mixed", &mixed, together, tolerance));
    let first_over = rows.iter().position(|r| r.over);
    if json {
        let v = serde_json::json!({
            "engine": path.display().to_string(),
            "prompt_tokens": ids.len(),
            "next_token": next,
            "tolerance": tolerance,
            "first_over": first_over.map(|i| &rows[i]),
            "buffers": rows,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<8} {:>6}  {:<48} {:>12}  {:>10}",
            "step", "launch", "buffer (graph node)", "shape", "rel L2"
        );
        for (i, r) in rows.iter().enumerate() {
            let err = r.rel_l2.map_or("-".to_string(), |e| format!("{e:.2e}"));
            let mark = if Some(i) == first_over {
                "  <-- first over the tolerance"
            } else if r.over {
                "  over"
            } else {
                ""
            };
            println!(
                "{:<8} {:>6}  {:<48} {:>12}  {:>10}{mark}",
                r.step,
                r.launch,
                r.buffer,
                format!("{}x{}", r.rows, r.cols),
                err
            );
        }
        let compared = rows.iter().filter(|r| r.rel_l2.is_some()).count();
        println!(
            "{compared} of {} buffers compared ({} prompt tokens, then token {next}); tolerance {tolerance:.1e}: {}",
            rows.len(),
            ids.len(),
            match first_over {
                None => "all within".to_string(),
                Some(i) => format!("first over at {} launch {} `{}`", rows[i].step, rows[i].launch, rows[i].buffer),
            }
        );
    }
    if first_over.is_some() {
        bail!("a GPU buffer differs from the CPU graph beyond the tolerance");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_major_nodes_are_laid_out_as_token_rows() {
        // [1, h=2, s=3, d=2] → [3, 4]: row r holds head 0's then head 1's vector of token r.
        let node = HostTensor {
            shape: vec![1, 2, 3, 2],
            data: (0..12).map(|v| v as f32).collect(),
        };
        let got = as_buffer(&node, 3, 4).unwrap();
        assert_eq!(
            got,
            [0., 1., 6., 7., 2., 3., 8., 9., 4., 5., 10., 11.].to_vec()
        );
        // Last row of [1, s=3, v=2] for a one-sequence buffer.
        let logits = HostTensor {
            shape: vec![1, 3, 2],
            data: vec![1., 2., 3., 4., 5., 6.],
        };
        assert_eq!(as_buffer(&logits, 1, 2).unwrap(), vec![5., 6.]);
        assert!(as_buffer(&logits, 2, 4).is_none());
        assert_eq!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    }
}
