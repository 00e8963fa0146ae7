//! `kiln bench`: latency and throughput of an engine over batch sizes and input/output lengths,
//! in the manner of TensorRT-LLM's gptSessionBenchmark. Prompts are random token ids; decoding
//! is greedy and ignores end-of-sequence, so every run generates exactly `output` tokens.

use anyhow::{bail, Context, Result};
use kiln::runtime::cuda::{CudaExecutor, CudaOptions, StepSeq};
use kiln::runtime::engine::Engine;
use std::path::Path;
use std::time::Instant;

/// One measured configuration.
#[derive(serde::Serialize, Debug)]
pub struct Row {
    /// Sequences.
    pub batch: usize,
    /// Prompt tokens per sequence.
    pub input: usize,
    /// Generated tokens per sequence.
    pub output: usize,
    /// Whole run, prefill + decode (ms).
    pub latency_ms: f64,
    /// Generated tokens (all sequences) per second.
    pub output_tokens_per_s: f64,
    /// Time to first token (the prefill step, ms).
    pub ttft_ms: f64,
    /// Median decode step (ms).
    pub decode_step_ms: f64,
    /// Device memory held by the executor (MiB).
    pub gpu_memory_mib: f64,
}

fn parse_list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .with_context(|| format!("`{x}` is not a number"))
        })
        .collect()
}

fn parse_io(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|p| {
            let (i, o) = p
                .split_once(':')
                .with_context(|| format!("`{p}` is not input:output"))?;
            Ok((i.trim().parse()?, o.trim().parse()?))
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// One executor sized for every configuration of the run (weights are uploaded once); its
/// launch options (CUDA graphs, programmatic dependent launch) come from `launch`.
fn gpu_executor(
    engine: &Engine,
    batches: &[usize],
    io: &[(usize, usize)],
    launch: CudaOptions,
) -> Result<CudaExecutor> {
    let max_b = batches.iter().copied().max().unwrap_or(1);
    let max_in = io.iter().map(|p| p.0).max().unwrap_or(1);
    let max_len = io.iter().map(|p| p.0 + p.1).max().unwrap_or(1) + 16;
    let opts = CudaOptions {
        max_batch: max_b,
        max_step_tokens: max_b * max_in,
        max_kv_tokens: Some(max_b * max_len),
        max_seq_len: max_len,
        ..launch
    };
    Ok(CudaExecutor::new(engine, opts)?)
}

fn bench_gpu(
    exec: &mut CudaExecutor,
    engine: &Engine,
    batch: usize,
    input: usize,
    output: usize,
    warmup: bool,
) -> Result<Row> {
    let vocab = engine
        .config
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(32000) as usize;
    let runs = if warmup { 2 } else { 1 };
    let mut row = None;
    for _ in 0..runs {
        let ids: Vec<_> = (0..batch).map(|_| exec.add_sequence()).collect();
        let t0 = Instant::now();
        let prefill: Vec<StepSeq> = ids
            .iter()
            .enumerate()
            .map(|(i, &seq)| StepSeq {
                seq,
                tokens: tokens(input, vocab, i as u64 + 1),
            })
            .collect();
        let mut next = exec.step_greedy(&prefill)?;
        let ttft = t0.elapsed().as_secs_f64() * 1e3;
        let mut steps = Vec::with_capacity(output);
        for _ in 1..output {
            let s0 = Instant::now();
            let step: Vec<StepSeq> = ids
                .iter()
                .zip(&next)
                .map(|(&seq, &t)| StepSeq {
                    seq,
                    tokens: vec![t],
                })
                .collect();
            next = exec.step_greedy(&step)?;
            steps.push(s0.elapsed().as_secs_f64() * 1e3);
        }
        let latency = t0.elapsed().as_secs_f64() * 1e3;
        for id in ids {
            exec.remove_sequence(id);
        }
        row = Some(Row {
            batch,
            input,
            output,
            latency_ms: latency,
            output_tokens_per_s: (batch * output) as f64 / (latency / 1e3),
            ttft_ms: ttft,
            decode_step_ms: median(steps),
            gpu_memory_mib: exec.device_bytes as f64 / (1 << 20) as f64,
        });
    }
    row.context("no run")
}

fn bench_cpu(engine: &Engine, batch: usize, input: usize, output: usize) -> Result<Row> {
    let exec = engine.cpu_executor()?;
    let vocab = engine
        .config
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(32000) as usize;
    let mut session = exec.session(batch);
    let prompt: Vec<i32> = (0..batch)
        .flat_map(|i| tokens(input, vocab, i as u64 + 1))
        .map(|t| t as i32)
        .collect();
    let t0 = Instant::now();
    exec.step(&mut session, &prompt, &[])?;
    let ttft = t0.elapsed().as_secs_f64() * 1e3;
    let mut steps = vec![];
    let next = vec![1i32; batch];
    for _ in 1..output {
        let s0 = Instant::now();
        exec.step(&mut session, &next, &[])?;
        steps.push(s0.elapsed().as_secs_f64() * 1e3);
    }
    let latency = t0.elapsed().as_secs_f64() * 1e3;
    Ok(Row {
        batch,
        input,
        output,
        latency_ms: latency,
        output_tokens_per_s: (batch * output) as f64 / (latency / 1e3),
        ttft_ms: ttft,
        decode_step_ms: median(steps),
        gpu_memory_mib: 0.0,
    })
}

/// Runs the benchmark and prints a table (and JSON with `json`).
pub fn run(
    engine_path: &Path,
    batches: &str,
    io: &str,
    device: &str,
    json: bool,
    launch: CudaOptions,
) -> Result<()> {
    let engine = Engine::open(engine_path)?;
    let (batches, io) = (parse_list(batches)?, parse_io(io)?);
    let mut rows = Vec::new();
    let mut first = true;
    let mut gpu = match device {
        "cuda" => Some(gpu_executor(&engine, &batches, &io, launch)?),
        _ => None,
    };
    for &(input, output) in &io {
        for &batch in &batches {
            if batch == 0 || input == 0 || output == 0 {
                bail!("batch, input and output must be positive");
            }
            let row = match device {
                "cuda" => bench_gpu(
                    gpu.as_mut().context("no GPU executor")?,
                    &engine,
                    batch,
                    input,
                    output,
                    first,
                )?,
                "cpu" => bench_cpu(&engine, batch, input, output)?,
                other => bail!("unknown device `{other}` (cpu or cuda)"),
            };
            first = false;
            rows.push(row);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("| batch | input | output | latency ms | output tok/s | TTFT ms | decode step ms | GPU MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.3} | {:.0} |",
            r.batch,
            r.input,
            r.output,
            r.latency_ms,
            r.output_tokens_per_s,
            r.ttft_ms,
            r.decode_step_ms,
            r.gpu_memory_mib
        );
    }
    Ok(())
}
