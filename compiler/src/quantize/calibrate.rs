//! Calibration: runs a model's graph on the CPU executor over windows of a text and records, at
//! the input of every linear op, the mean absolute activation per column and a sample of rows
//! (what AWQ's search needs). The graph is the build's own graph without quantization, so the
//! statistics are keyed by the names of the weights the quantized graph then stores.

use super::awq::InputStats;
use super::gptq::add_gram;
use kiln_runtime::cpu::{CpuExecutor, ExecError};
use kiln_runtime::ir::{Graph, Op};
use std::collections::BTreeMap;

/// Tokens per calibration window.
pub const WINDOW: usize = 512;

/// Sample rows kept per linear input, spread evenly over the windows.
pub const SAMPLE_ROWS: usize = 64;

/// The linear ops of `g`: (weight name, node name of the input `x`).
pub fn linear_inputs(g: &Graph) -> Vec<(String, String)> {
    g.nodes
        .iter()
        .filter(|n| n.op.is_linear())
        .filter_map(|n| match &g.nodes[n.inputs[1]].op {
            Op::Weight { name } => Some((name.clone(), g.nodes[n.inputs[0]].name.clone())),
            _ => None,
        })
        .collect()
}

/// Runs `exec` (over `graph`) on up to `windows` windows of `tokens` and returns the input
/// statistics of every linear op, by weight name, with the Gram matrices `Σ xᵀx` when `gram`.
/// `progress(done, total)` after each window.
pub fn calibrate(
    graph: &Graph,
    exec: &CpuExecutor,
    tokens: &[u32],
    windows: usize,
    gram: bool,
    progress: &dyn Fn(usize, usize),
) -> Result<BTreeMap<String, InputStats>, ExecError> {
    let inputs = linear_inputs(graph);
    let taps: Vec<&str> = inputs.iter().map(|(_, x)| x.as_str()).collect();
    let chunks: Vec<&[u32]> = tokens.chunks_exact(WINDOW).take(windows).collect();
    if chunks.is_empty() {
        return Err(ExecError::Input(format!(
            "the calibration text has {} tokens, fewer than one window of {WINDOW}",
            tokens.len()
        )));
    }
    let per_window = SAMPLE_ROWS.div_ceil(chunks.len());
    let mut stats: BTreeMap<String, InputStats> = BTreeMap::new();
    let mut rows_seen = 0usize;
    for (i, w) in chunks.iter().enumerate() {
        let ids: Vec<i32> = w.iter().map(|&t| t as i32).collect();
        let mut session = exec.session(1);
        let out = exec.step(&mut session, &ids, &taps)?;
        for (weight, x) in &inputs {
            let t = out
                .taps
                .get(x)
                .ok_or_else(|| ExecError::Unsupported(format!("no value for `{x}`")))?;
            let k = *t.shape.last().unwrap_or(&0);
            if k == 0 {
                continue;
            }
            let rows = t.data.len() / k;
            let s = stats.entry(weight.clone()).or_insert_with(|| InputStats {
                mean_abs: vec![0.0; k],
                sample: Vec::new(),
                gram: if gram { vec![0.0; k * k] } else { Vec::new() },
            });
            if gram {
                add_gram(&mut s.gram, &t.data, rows, k);
            }
            for row in t.data.chunks_exact(k) {
                for (a, v) in s.mean_abs.iter_mut().zip(row) {
                    *a += v.abs();
                }
            }
            for j in 0..per_window.min(rows) {
                let r = j * rows / per_window.min(rows);
                s.sample.extend_from_slice(&t.data[r * k..(r + 1) * k]);
            }
        }
        rows_seen += w.len();
        progress(i + 1, chunks.len());
    }
    for s in stats.values_mut() {
        for a in &mut s.mean_abs {
            *a /= rows_seen as f32;
        }
    }
    Ok(stats)
}
