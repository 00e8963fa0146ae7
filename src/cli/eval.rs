//! `kiln eval`: perplexity of an engine on a text, by llama.cpp's protocol (its `perplexity`
//! tool): the whole text is tokenized once and cut into non-overlapping windows of `--ctx`
//! tokens; each window starts from a fresh cache (its first token replaced by BOS where the
//! tokenizer adds one), and only the second half of each window is scored, so every scored token
//! sees at least `ctx/2` tokens of context. Perplexity is `exp` of the mean negative
//! log-likelihood of the scored tokens; the ± is its standard error.
//!
//! On the CPU each window runs as one step that returns every position's logits. On the GPU
//! (whose steps return the last position's logits) the windows run as a batch of sequences:
//! the first half as one prefill, then the scored half one token per step.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::runtime::cuda::{CudaExecutor, CudaOptions, StepSeq};
use kiln::runtime::engine::Engine;
use kiln::runtime::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::time::Instant;

/// The corpus shipped with kiln (`data/eval/`, built into the binary so it works anywhere).
const CORPUS: &str = include_str!("../../data/eval/pydoc-topics.txt");

/// Flags of `kiln eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Engine file.
    pub engine: PathBuf,
    /// Text to score (default: the Python documentation topics shipped with kiln,
    /// data/eval/pydoc-topics.txt).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score only the first N windows (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// `cpu` or `cuda` (default: the engine's target).
    #[arg(long)]
    pub device: Option<String>,
    /// Windows per GPU batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The result.
#[derive(serde::Serialize, Debug)]
pub struct EvalReport {
    /// exp(mean NLL).
    pub perplexity: f64,
    /// Standard error of the perplexity (from the NLL's standard error).
    pub perplexity_stderr: f64,
    /// Mean negative log-likelihood (nats).
    pub nll: f64,
    /// Windows scored.
    pub chunks: usize,
    /// Tokens per window.
    pub ctx: usize,
    /// Tokens scored.
    pub scored_tokens: usize,
    /// Tokens in the whole text.
    pub text_tokens: usize,
    /// Device.
    pub device: String,
    /// Wall time (s).
    pub seconds: f64,
}

/// −log softmax(row)[target].
fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    f64::from(max) + sum.ln() - f64::from(row[target as usize])
}

/// Runs the evaluation and prints the result.
pub fn run(a: &EvalArgs) -> Result<()> {
    if a.ctx < 4 {
        bail!("--ctx must be at least 4 (half of it is scored)");
    }
    if a.batch == 0 || a.chunks == Some(0) {
        bail!("--batch and --chunks must be at least 1");
    }
    let engine = Engine::open(&a.engine)?;
    let device = a
        .device
        .clone()
        .unwrap_or_else(|| engine.target().to_string());
    if a.ctx > engine.generation.max_context {
        bail!(
            "--ctx {} is longer than the engine's context window ({} tokens)",
            a.ctx,
            engine.generation.max_context
        );
    }
    let json = engine
        .tokenizer_json
        .as_deref()
        .with_context(|| format!("{}: this engine has no tokenizer", a.engine.display()))?;
    let tok = Tokenizer::from_json(json)?;
    let (text, name) = match &a.text {
        Some(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the text {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (CORPUS.to_string(), "data/eval/pydoc-topics.txt".to_string()),
    };
    let (windows, text_tokens) = windows(&tok, &engine, &text, a.ctx)?;
    let windows = match a.chunks {
        Some(n) => windows.into_iter().take(n).collect(),
        None => windows,
    };
    if windows.is_empty() {
        bail!(
            "{name}: {text_tokens} tokens do not fill one window of --ctx {}",
            a.ctx
        );
    }
    let pb = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(windows.len() as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} windows ({eta} left)")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(format!("perplexity on {device}"));
    let t0 = Instant::now();
    let nlls = match device.as_str() {
        "cpu" => eval_cpu(&engine, &windows, &pb)?,
        "cuda" => eval_gpu(&engine, &windows, a.batch, &pb)?,
        other => bail!("unknown device `{other}` (cpu or cuda)"),
    };
    pb.finish_and_clear();
    let n = nlls.len() as f64;
    let mean = nlls.iter().sum::<f64>() / n;
    let var = nlls.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let se = (var / n).sqrt();
    let ppl = mean.exp();
    let report = EvalReport {
        perplexity: ppl,
        perplexity_stderr: ppl * se,
        nll: mean,
        chunks: windows.len(),
        ctx: a.ctx,
        scored_tokens: nlls.len(),
        text_tokens,
        device,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "perplexity {:.4} ± {:.4} ({} windows of {} tokens, {} scored tokens of {name}; {} in {:.1} s)",
            report.perplexity,
            report.perplexity_stderr,
            report.chunks,
            report.ctx,
            report.scored_tokens,
            report.device,
            report.seconds
        );
    }
    Ok(())
}

/// The text's tokens cut into windows of `ctx` (the first token of each replaced by BOS where
/// the tokenizer adds one), and the text's token count.
fn windows(
    tok: &Tokenizer,
    engine: &Engine,
    text: &str,
    ctx: usize,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut ids = tok.encode(text)?;
    let bos = engine
        .generation
        .bos_token
        .as_deref()
        .and_then(|b| tok.token_id(b));
    // A tokenizer that prepends BOS to every encoding: keep it for each window instead.
    let add_bos = bos.is_some() && ids.first().copied() == bos;
    if add_bos {
        ids.remove(0);
    }
    let n = ids.len();
    let windows = ids
        .chunks_exact(ctx)
        .map(|w| {
            let mut w = w.to_vec();
            if let (true, Some(b)) = (add_bos, bos) {
                w[0] = b;
            }
            w
        })
        .collect();
    Ok((windows, n))
}

fn eval_cpu(engine: &Engine, windows: &[Vec<u32>], pb: &ProgressBar) -> Result<Vec<f64>> {
    let exec = engine.cpu_executor()?;
    let mut nlls = Vec::new();
    for w in windows {
        let mut session = exec.session(1);
        let ids: Vec<i32> = w.iter().map(|&t| t as i32).collect();
        let out = exec.step(&mut session, &ids, &[])?;
        let l = out
            .outputs
            .get("logits")
            .context("the engine's graph has no `logits` output")?;
        let vocab = *l.shape.last().context("logits shape")?;
        if l.data.len() != w.len() * vocab {
            bail!(
                "the `logits` output has shape {:?}, not [1, {}, vocab]: it must give every position",
                l.shape,
                w.len()
            );
        }
        let first = w.len() / 2;
        for j in first..w.len() - 1 {
            nlls.push(nll(&l.data[j * vocab..(j + 1) * vocab], w[j + 1]));
        }
        pb.inc(1);
    }
    Ok(nlls)
}

fn eval_gpu(
    engine: &Engine,
    windows: &[Vec<u32>],
    batch: usize,
    pb: &ProgressBar,
) -> Result<Vec<f64>> {
    let ctx = windows[0].len();
    let first = ctx / 2;
    let b = batch.min(windows.len());
    let opts = CudaOptions {
        max_batch: b,
        max_step_tokens: b * (first + 1),
        max_kv_tokens: Some(b * (ctx + 16)),
        max_seq_len: ctx,
        ..CudaOptions::default()
    };
    let mut exec = CudaExecutor::new(engine, opts)?;
    let mut nlls = Vec::new();
    for group in windows.chunks(b) {
        let ids: Vec<_> = group.iter().map(|_| exec.add_sequence()).collect();
        // Prefill up to the first scored position, then one token per step.
        let prefill: Vec<StepSeq> = group
            .iter()
            .zip(&ids)
            .map(|(w, &seq)| StepSeq {
                seq,
                tokens: w[..=first].to_vec(),
            })
            .collect();
        let mut logits = exec.step_logits(&prefill)?;
        let vocab = logits.len() / group.len();
        let mut per_window: Vec<Vec<f64>> = vec![Vec::new(); group.len()];
        for j in first..ctx - 1 {
            for (i, w) in group.iter().enumerate() {
                per_window[i].push(nll(&logits[i * vocab..(i + 1) * vocab], w[j + 1]));
            }
            if j + 1 < ctx - 1 {
                let step: Vec<StepSeq> = group
                    .iter()
                    .zip(&ids)
                    .map(|(w, &seq)| StepSeq {
                        seq,
                        tokens: vec![w[j + 1]],
                    })
                    .collect();
                logits = exec.step_logits(&step)?;
            }
        }
        for id in ids {
            exec.remove_sequence(id);
        }
        nlls.extend(per_window.into_iter().flatten());
        pb.inc(group.len() as u64);
    }
    Ok(nlls)
}
