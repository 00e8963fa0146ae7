//! `kiln bench --throughput`: offline throughput through the continuous-batching scheduler, in
//! the manner of `trtllm-bench throughput`: N requests of given input/output lengths (fixed, or
//! normally distributed token counts) submitted at once, greedy and ignoring end-of-sequence so
//! each generates its exact output length; output tokens/s and requests/s.

use anyhow::{bail, Result};
use kiln::runtime::sampling::SamplingParams;
use kiln::runtime::serving::{Event, Request};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

/// What to run.
#[derive(Clone, Debug)]
pub struct ThroughputArgs {
    /// Requests per configuration.
    pub requests: usize,
    /// (input, output) token counts.
    pub io: Vec<(usize, usize)>,
    /// Standard deviation of the input and output token counts (0: fixed).
    pub std: (f64, f64),
    /// Scheduler limits.
    pub max_num_seqs: usize,
    /// Token budget per step (None: the device's default).
    pub max_num_tokens: Option<usize>,
    /// KV-cache capacity in tokens (None: the device's default).
    pub max_kv_tokens: Option<usize>,
    /// `cpu` or `cuda`.
    pub device: String,
    /// The `(tp, pp)` of a parallel build's rank engines (`--tp`/`--pp`), run on the CPU.
    pub parallel: Option<(u32, u32)>,
    /// JSON output.
    pub json: bool,
}

/// One configuration's result.
#[derive(serde::Serialize, Debug)]
pub struct ThroughputRow {
    /// Requests.
    pub requests: usize,
    /// Mean prompt tokens.
    pub input: usize,
    /// Mean generated tokens.
    pub output: usize,
    /// Prompt tokens in all.
    pub input_tokens: usize,
    /// Generated tokens in all.
    pub output_tokens: usize,
    /// Wall time from submitting the first request to the last token (s).
    pub seconds: f64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Generated tokens per second.
    pub output_tokens_per_s: f64,
    /// Prompt and generated tokens per second.
    pub total_tokens_per_s: f64,
    /// Scheduler steps.
    pub steps: u64,
    /// Preemptions (recomputed sequences).
    pub preemptions: u64,
    /// Share of the wall time spent inside executor steps (the rest is the host's).
    pub exec_share: f64,
    /// Mean tokens per step (prompt chunks and decodes).
    pub tokens_per_step: f64,
    /// Steps that only decoded (no prompt chunk).
    pub decode_steps: u64,
    /// Share of the wall time inside those steps (`exec_share` minus this: steps with prompt
    /// chunks).
    pub decode_share: f64,
}

/// A seeded splitmix64, for reproducible prompts and lengths.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A token count around `mean` with standard deviation `std` (Box–Muller), at least 1.
    fn count(&mut self, mean: usize, std: f64) -> usize {
        if std <= 0.0 {
            return mean.max(1);
        }
        let (u, v) = (self.unit().max(1e-12), self.unit());
        let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
        (mean as f64 + std * z).round().max(1.0) as usize
    }
}

/// Runs every configuration and prints the table (or JSON).
pub fn run(engine_path: &Path, a: &ThroughputArgs) -> Result<()> {
    if a.requests == 0 {
        bail!("--requests must be at least 1");
    }
    let engine = super::serve::open_first(engine_path, a.parallel)?;
    let vocab = engine
        .graph
        .vocab()
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(1000);
    let max_num_tokens = a
        .max_num_tokens
        .unwrap_or_else(|| super::serve::default_max_num_tokens(&a.device));
    let (handle, join) = super::serve::spawn_scheduler(
        engine_path,
        &a.device,
        a.parallel,
        a.max_num_seqs,
        max_num_tokens,
        a.max_kv_tokens,
        true,
        None,
    )?;
    let limit = handle.max_seq_len();
    let mut rows = Vec::new();
    let mut rng = Rng(0x6b69_6c6e);
    // Warm-up (GPU: kernel loading, cuBLAS heuristics, CUDA graphs of the small batches).
    let warm: Vec<(Vec<u32>, usize)> = (0..a.max_num_seqs.min(8))
        .map(|_| {
            (
                (0..16).map(|_| rng.next() as u32 % vocab as u32).collect(),
                8,
            )
        })
        .collect();
    submit_all(&handle, &warm)?;
    for &(input, output) in &a.io {
        if input + output > limit {
            bail!(
                "{input}:{output} needs {} tokens per sequence; this engine holds at most {limit}",
                input + output
            );
        }
        let reqs: Vec<(Vec<u32>, usize)> = (0..a.requests)
            .map(|_| {
                let n_in = rng.count(input, a.std.0).min(limit - 1);
                let n_out = rng.count(output, a.std.1).min(limit - n_in);
                let prompt = (0..n_in)
                    .map(|_| rng.next() as u32 % vocab as u32)
                    .collect();
                (prompt, n_out)
            })
            .collect();
        let before = handle.stats();
        let t0 = Instant::now();
        let generated = submit_all(&handle, &reqs)?;
        let seconds = t0.elapsed().as_secs_f64();
        let after = handle.stats();
        let input_tokens: usize = reqs.iter().map(|r| r.0.len()).sum();
        rows.push(ThroughputRow {
            requests: a.requests,
            input,
            output,
            input_tokens,
            output_tokens: generated,
            seconds,
            requests_per_s: a.requests as f64 / seconds,
            output_tokens_per_s: generated as f64 / seconds,
            total_tokens_per_s: (input_tokens + generated) as f64 / seconds,
            steps: after.steps - before.steps,
            preemptions: after.preemptions - before.preemptions,
            exec_share: (after.exec_seconds - before.exec_seconds) / seconds,
            tokens_per_step: (after.prompt_tokens - before.prompt_tokens + after.generated_tokens
                - before.generated_tokens) as f64
                / (after.steps - before.steps).max(1) as f64,
            decode_steps: after.decode_steps - before.decode_steps,
            decode_share: (after.decode_seconds - before.decode_seconds) / seconds,
        });
    }
    drop(handle);
    let _ = join.join();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:>8} {:>6} {:>6} {:>9} {:>10} {:>12} {:>12} {:>7} {:>8} {:>7} {:>7}",
            "requests",
            "input",
            "output",
            "seconds",
            "req/s",
            "out tok/s",
            "total tok/s",
            "steps",
            "preempt",
            "decode",
            "in exec"
        );
        for r in &rows {
            println!(
                "{:>8} {:>6} {:>6} {:>9.2} {:>10.2} {:>12.1} {:>12.1} {:>7} {:>8} {:>6.1}% {:>6.1}%",
                r.requests,
                r.input,
                r.output,
                r.seconds,
                r.requests_per_s,
                r.output_tokens_per_s,
                r.total_tokens_per_s,
                r.steps,
                r.preemptions,
                100.0 * r.decode_share,
                100.0 * r.exec_share
            );
        }
    }
    Ok(())
}

/// Submits every (prompt, output length) at once and waits for all; returns the tokens
/// generated.
fn submit_all(
    handle: &kiln::runtime::serving::ServeHandle,
    reqs: &[(Vec<u32>, usize)],
) -> Result<usize> {
    let (tx, rx) = mpsc::channel::<Result<usize, String>>();
    for (prompt, n) in reqs {
        let tx = tx.clone();
        let mut count = 0usize;
        handle.submit(Request {
            id: handle.next_id(),
            prompt: prompt.clone(),
            max_tokens: *n,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            stop_strings: vec![],
            logprobs: None,
            detokenize: false,
            sink: Box::new(move |e| {
                match e {
                    Event::Token { .. } => count += 1,
                    Event::Finished { .. } => {
                        let _ = tx.send(Ok(count));
                    }
                    Event::Failed(m) => {
                        let _ = tx.send(Err(m));
                    }
                }
                true
            }),
        })?;
    }
    drop(tx);
    let mut total = 0;
    for _ in 0..reqs.len() {
        match rx.recv() {
            Ok(Ok(n)) => total += n,
            Ok(Err(m)) => bail!("a request failed: {m}"),
            Err(_) => bail!("the scheduler stopped before every request finished"),
        }
    }
    Ok(total)
}
