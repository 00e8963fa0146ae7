//! The `kiln` command line: build, run, inspect, tokenize.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::compiler::{build, BuildOptions};
use kiln::runtime::chat::{ChatMessage, ChatTemplate};
use kiln::runtime::cpu::CpuExecutor;
use kiln::runtime::cuda::{CudaExecutor, CudaOptions};
use kiln::runtime::engine::Engine;
use kiln::runtime::generate::{generate_with, CpuDecoder, CudaDecoder, GenerateRequest};
use kiln::runtime::sampling::SamplingParams;
use kiln::runtime::tokenizer::Tokenizer;
mod cli;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "kiln: compile LLMs declared in RON into engines, and run them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a checkpoint (HF folder or .gguf file) into an engine file.
    Build {
        /// HF checkpoint folder (config.json + safetensors) or a .gguf file.
        checkpoint: PathBuf,
        /// Output engine file.
        #[arg(short, long)]
        output: PathBuf,
        /// Model description to use instead of the built-in one for the config's model_type.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Build the graph as written, without the rewriter (to compare the two engines).
        #[arg(long)]
        no_optimize: bool,
        /// Compute precision: f32, or bf16/f16 through precision lowering.
        #[arg(long, default_value = "f32", value_parser = cli::inspect::parse_dtype)]
        dtype: kiln::runtime::ir::DType,
        /// `cpu` (an f32 engine for the CPU executor) or `cuda` (bf16 weights, CUDA kernels).
        #[arg(long, default_value = "cpu")]
        target: String,
        /// GPU architecture of a `cuda` engine's kernels.
        #[arg(long, default_value = "sm_90")]
        arch: String,
    },
    /// Generate text with an engine, streaming tokens to stdout.
    Run(RunArgs),
    /// Print a graph at a stage of the compiler (parsed, optimized, lowered), explain the
    /// rewriter, or summarize it as JSON.
    Inspect(cli::inspect::InspectArgs),
    /// Measure latency and throughput over batch sizes and input:output lengths.
    Bench {
        /// Engine file.
        engine: PathBuf,
        /// Comma-separated batch sizes.
        #[arg(long, default_value = "1")]
        batch: String,
        /// Comma-separated input:output token counts.
        #[arg(long, default_value = "128:128")]
        io: String,
        /// `cuda` or `cpu` (default: the engine's target).
        #[arg(long)]
        device: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Launch every decode step kernel by kernel instead of replaying a CUDA graph.
        #[arg(long)]
        no_cuda_graphs: bool,
        /// Launch kernels without programmatic dependent launch (each waits for the previous
        /// one to finish before it starts).
        #[arg(long)]
        no_pdl: bool,
        /// Also print per-kernel times of one prefill and one decode step per configuration
        /// (an event after every launch; GPU only).
        #[arg(long)]
        timeline: bool,
        /// Idle milliseconds before each measured prefill of the TTFT: 0 runs them back to back
        /// (a busy server; the GPU stays at its power limit), e.g. 500 lets each prompt arrive
        /// at an idle GPU (GPU only).
        #[arg(long, default_value_t = 0)]
        ttft_idle_ms: u64,
    },
    /// Feed given token sequences and record logits and greedy predictions (for checks).
    TeacherForce {
        /// Engine file.
        engine: PathBuf,
        /// JSON: {"sequences": [{"prompt": [...], "continuation": [...]}]}.
        #[arg(long)]
        input: PathBuf,
        /// Output JSON (predictions, last_logits).
        #[arg(long)]
        output: PathBuf,
        /// `cuda` or `cpu` (default: the engine's target).
        #[arg(long)]
        device: Option<String>,
    },
    /// Print the token ids of a text.
    Tokenize {
        /// Engine file.
        engine: PathBuf,
        /// Text to tokenize.
        text: String,
        /// Print a JSON list.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Engine file.
    engine: PathBuf,
    /// Prompt text (special-token text such as <|im_start|> becomes special tokens).
    #[arg(short, long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens with this much probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object (ids, text, timings) instead of streaming.
    #[arg(long)]
    json: bool,
    /// `cpu` or `cuda` (default: the engine's target).
    #[arg(long)]
    device: Option<String>,
    /// GPU KV-cache capacity in tokens (default: 90% of the GPU memory left after the weights).
    #[arg(long)]
    max_kv_tokens: Option<usize>,
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// An executor for `kiln run`: the CPU oracle or the GPU.
enum Executor {
    Cpu(Box<CpuExecutor>),
    Cuda(Box<CudaExecutor>),
}

fn load_engine(
    path: &Path,
    device: Option<&str>,
    max_kv_tokens: Option<usize>,
) -> Result<(Engine, Executor)> {
    let pb = spinner("loading engine");
    let engine = Engine::open(path)?;
    let exec = match device.unwrap_or(engine.target()) {
        "cpu" => Executor::Cpu(Box::new(engine.cpu_executor()?)),
        "cuda" => {
            let opts = CudaOptions {
                max_seq_len: engine.generation.max_context.unwrap_or(8192),
                max_kv_tokens,
                ..CudaOptions::default()
            };
            Executor::Cuda(Box::new(CudaExecutor::new(&engine, opts)?))
        }
        other => bail!("unknown device `{other}` (cpu or cuda)"),
    };
    pb.finish_and_clear();
    Ok((engine, exec))
}

fn tokenizer_of(engine: &Engine) -> Result<Tokenizer> {
    let json = engine
        .tokenizer_json
        .as_deref()
        .context("this engine has no tokenizer")?;
    Ok(Tokenizer::from_json(json)?)
}

fn cmd_build(checkpoint: &Path, output: &Path, opts: BuildOptions) -> Result<()> {
    let t0 = Instant::now();
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} weights")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message("reading weights");
    let report = build(checkpoint, output, &opts, &|done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    eprintln!(
        "built {} in {:.1}s: {} nodes, {} weights, {:.1}M parameters",
        output.display(),
        t0.elapsed().as_secs_f64(),
        report.nodes,
        report.weights,
        report.parameters as f64 / 1e6
    );
    if let Some(r) = &report.rewrite {
        eprintln!(
            "rewriter: {:.0} ms; estimated decode step {:.1} → {:.1} µs, {} → {} kernels \
             (kiln inspect --explain for details)",
            r.total_ms,
            r.cost_before.time_ns / 1e3,
            r.cost_after.time_ns / 1e3,
            r.cost_before.kernels,
            r.cost_after.kernels
        );
        for p in r.phases.iter().filter(|p| !p.saturated) {
            eprintln!(
                "warning: rewrite phase `{}` stopped at its {} before saturating; \
                 the engine is valid but may miss fusions",
                p.name, p.stop
            );
        }
    }
    if let Some(note) = &report.gemm_note {
        eprintln!("{note}");
    }
    Ok(())
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let (engine, mut exec) = load_engine(&a.engine, a.device.as_deref(), a.max_kv_tokens)?;
    let tok = tokenizer_of(&engine)?;
    let gen = &engine.generation;
    let prompt = if a.chat {
        let template = gen
            .chat_template
            .as_deref()
            .context("this engine has no chat template; run without --chat")?;
        let t = ChatTemplate::new(
            template,
            gen.bos_token.as_deref().unwrap_or(""),
            gen.eos_token.as_deref().unwrap_or(""),
        )?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        t.render(&messages, true)?
    } else {
        a.prompt.clone()
    };
    let req = GenerateRequest {
        prompt_ids: tok.encode(&prompt)?,
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop_ids: gen.stop_token_ids.clone(),
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        max_context: gen.max_context,
    };
    let mut stdout = std::io::stdout();
    let on_text = |piece: &str| {
        if !a.json {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    };
    let result = match &mut exec {
        Executor::Cpu(e) => generate_with(&mut CpuDecoder::new(e), &tok, &req, on_text)?,
        Executor::Cuda(e) => generate_with(&mut CudaDecoder::new(e), &tok, &req, on_text)?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!();
        let t = &result.timings;
        eprintln!(
            "[{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s; {:?}]",
            result.prompt_ids.len(),
            result.generated_ids.len(),
            t.prefill_tokens_per_s,
            t.decode_tokens_per_s,
            result.finish_reason
        );
    }
    Ok(())
}

fn cmd_tokenize(engine: &Path, text: &str, json: bool) -> Result<()> {
    let engine = Engine::open(engine)?;
    let ids = tokenizer_of(&engine)?.encode(text)?;
    if json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        let parts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        println!("{}", parts.join(" "));
    }
    Ok(())
}

/// The device to run an engine on: the one asked for, else the engine's target.
fn device_of(engine: &Path, asked: Option<String>) -> Result<String> {
    match asked {
        Some(d) => Ok(d),
        None => Ok(Engine::open(engine)?.target().to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build {
            checkpoint,
            output,
            model,
            no_optimize,
            dtype,
            target,
            arch,
        } => match target.as_str() {
            "cpu" | "cuda" => cmd_build(
                &checkpoint,
                &output,
                BuildOptions {
                    model_file: model,
                    no_optimize,
                    dtype,
                    cuda_arch: (target == "cuda").then_some(arch),
                },
            ),
            other => Err(anyhow::anyhow!("unknown target `{other}` (cpu or cuda)")),
        },
        Command::Run(args) => cmd_run(args),
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Tokenize { engine, text, json } => cmd_tokenize(&engine, &text, json),
        Command::Bench {
            engine,
            batch,
            io,
            device,
            json,
            no_cuda_graphs,
            no_pdl,
            timeline,
            ttft_idle_ms,
        } => {
            let launch = CudaOptions {
                cuda_graphs: !no_cuda_graphs,
                pdl: !no_pdl,
                ..CudaOptions::default()
            };
            device_of(&engine, device).and_then(|d| {
                cli::bench::run(
                    &engine,
                    &batch,
                    &io,
                    &d,
                    json,
                    launch,
                    cli::bench::Measure {
                        timeline,
                        ttft_idle_ms,
                    },
                )
            })
        }
        Command::TeacherForce {
            engine,
            input,
            output,
            device,
        } => device_of(&engine, device)
            .and_then(|d| cli::teacher_force::run(&engine, &input, &output, &d)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
