//! `kiln bench`: latency and throughput of an engine over batch sizes and input/output lengths,
//! in the manner of TensorRT-LLM's gptSessionBenchmark. Prompts are random token ids; decoding
//! is greedy and ignores end-of-sequence, so every run generates exactly `output` tokens.

use anyhow::{bail, Context, Result};
use kiln::runtime::cuda::{CudaExecutor, CudaOptions, StepSeq};
use kiln::runtime::engine::Engine;
use std::path::Path;
use std::time::Instant;

/// What to measure beside the table.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measure {
    /// Per-kernel times of one prefill and one decode step per configuration.
    pub timeline: bool,
    /// Idle time before each measured prefill of the TTFT (0: back to back).
    pub ttft_idle_ms: u64,
}

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
    /// Time to first token: the prefill step, from submitting the prompts to holding the first
    /// tokens on the host (ms; median of 3 after a warm-up prefill of the same shape, each
    /// after [`Measure::ttft_idle_ms`] of idle GPU).
    pub ttft_ms: f64,
    /// Median decode step (ms).
    pub decode_step_ms: f64,
    /// Device memory held by the executor (MiB).
    pub gpu_memory_mib: f64,
    /// Bytes of the engine's weights (what a decode step streams at least once).
    pub weight_bytes: usize,
    /// Weight bytes per median decode step: the achieved weight-streaming bandwidth (GB/s).
    pub weight_gb_per_s: f64,
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

/// `input:output` pairs, comma-separated (`128:128,2048:128`).
pub fn parse_io(s: &str) -> Result<Vec<(usize, usize)>> {
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

/// The model's vocabulary size (for random prompt tokens).
fn vocab(engine: &Engine) -> usize {
    engine
        .config
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(32000) as usize
}

/// New sequences and their random prompts, as one prefill step.
fn prefill_step(exec: &mut CudaExecutor, batch: usize, input: usize, vocab: usize) -> Vec<StepSeq> {
    (0..batch)
        .map(|i| StepSeq {
            seq: exec.add_sequence(),
            tokens: tokens(input, vocab, i as u64 + 1),
        })
        .collect()
}

/// One decode step: each sequence's last token.
fn decode_step(ids: &[usize], next: &[u32]) -> Vec<StepSeq> {
    ids.iter()
        .zip(next)
        .map(|(&seq, &t)| StepSeq {
            seq,
            tokens: vec![t],
        })
        .collect()
}

/// Median prefill time of `reps` prefills, after one warm-up prefill of the same shape (the
/// first GEMM of a shape makes cuBLAS choose and load its kernels).
fn ttft_ms(
    exec: &mut CudaExecutor,
    batch: usize,
    input: usize,
    vocab: usize,
    idle_ms: u64,
) -> Result<f64> {
    let reps = 3;
    let mut times = Vec::new();
    for _ in 0..=reps {
        let step = prefill_step(exec, batch, input, vocab);
        std::thread::sleep(std::time::Duration::from_millis(idle_ms));
        let t0 = Instant::now();
        exec.step_greedy(&step)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        for s in step {
            exec.remove_sequence(s.seq);
        }
    }
    Ok(median(times[1..].to_vec()))
}

fn bench_gpu(
    exec: &mut CudaExecutor,
    engine: &Engine,
    batch: usize,
    input: usize,
    output: usize,
    warmup: bool,
    ttft_idle_ms: u64,
) -> Result<Row> {
    let vocab = vocab(engine);
    let ttft = ttft_ms(exec, batch, input, vocab, ttft_idle_ms)?;
    let runs = if warmup { 2 } else { 1 };
    let mut row = None;
    for _ in 0..runs {
        let t0 = Instant::now();
        let prefill = prefill_step(exec, batch, input, vocab);
        let ids: Vec<_> = prefill.iter().map(|s| s.seq).collect();
        let mut next = exec.step_greedy(&prefill)?;
        let mut steps = Vec::with_capacity(output);
        for _ in 1..output {
            let s0 = Instant::now();
            next = exec.step_greedy(&decode_step(&ids, &next))?;
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
            weight_bytes: 0,
            weight_gb_per_s: 0.0,
        });
    }
    row.context("no run")
}

/// Per-kernel times of one prefill step and one decode step (events after every launch, no
/// CUDA graphs), summed by kernel, largest first.
fn timeline(exec: &mut CudaExecutor, engine: &Engine, batch: usize, input: usize) -> Result<()> {
    let vocab = vocab(engine);
    let prefill = prefill_step(exec, batch, input, vocab);
    let ids: Vec<_> = prefill.iter().map(|s| s.seq).collect();
    exec.timeline_start()?;
    let next = exec.step_greedy(&prefill)?;
    let pre = exec.timeline_take()?;
    exec.timeline_start()?;
    exec.step_greedy(&decode_step(&ids, &next))?;
    let dec = exec.timeline_take()?;
    for id in ids {
        exec.remove_sequence(id);
    }
    for (what, marks) in [("prefill", pre), ("decode step", dec)] {
        let total: f64 = marks.iter().map(|m| m.1).sum();
        let mut by: Vec<(String, usize, f64)> = Vec::new();
        for (name, us) in &marks {
            match by.iter_mut().find(|e| &e.0 == name) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += us;
                }
                None => by.push((name.clone(), 1, *us)),
            }
        }
        by.sort_by(|a, b| b.2.total_cmp(&a.2));
        println!(
            "\n{what}, batch {batch}, {input} prompt tokens: {} launches, {:.1} µs",
            marks.len(),
            total
        );
        println!("| kernel | launches | µs | mean µs | share |");
        println!("|---|---:|---:|---:|---:|");
        for (name, n, us) in by {
            println!(
                "| `{name}` | {n} | {us:.1} | {:.2} | {:.1}% |",
                us / n as f64,
                100.0 * us / total
            );
        }
    }
    Ok(())
}

fn bench_cpu(engine: &Engine, batch: usize, input: usize, output: usize) -> Result<Row> {
    let exec = engine.cpu_executor()?;
    let vocab = vocab(engine);
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
        weight_bytes: 0,
        weight_gb_per_s: 0.0,
    })
}

/// Bytes of an engine's weight tensors (its compiled kernels excluded).
fn weight_bytes(engine: &Engine) -> usize {
    engine
        .tensor_names()
        .filter(|n| !n.starts_with("kernels."))
        .filter_map(|n| engine.tensor(n).ok().map(|(_, b)| b.len()))
        .sum()
}

/// Runs the benchmark and prints a table (and JSON with `json`).
pub fn run(
    engine_path: &Path,
    batches: &str,
    io: &str,
    device: &str,
    json: bool,
    launch: CudaOptions,
    measure: Measure,
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
                    measure.ttft_idle_ms,
                )?,
                "cpu" => bench_cpu(&engine, batch, input, output)?,
                other => bail!("unknown device `{other}` (cpu or cuda)"),
            };
            first = false;
            let wb = weight_bytes(&engine);
            rows.push(Row {
                weight_bytes: wb,
                weight_gb_per_s: wb as f64 / (row.decode_step_ms * 1e6),
                ..row
            });
        }
    }
    if measure.timeline {
        let exec = gpu.as_mut().context("--timeline needs the cuda device")?;
        for &(input, _) in &io {
            for &batch in &batches {
                timeline(exec, &engine, batch, input)?;
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "| batch | input | output | latency ms | output tok/s | TTFT ms | decode step ms | weight GB/s | GPU MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.3} | {:.0} | {:.0} |",
            r.batch,
            r.input,
            r.output,
            r.latency_ms,
            r.output_tokens_per_s,
            r.ttft_ms,
            r.decode_step_ms,
            r.weight_gb_per_s,
            r.gpu_memory_mib
        );
    }
    Ok(())
}
