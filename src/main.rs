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
use kiln::runtime::parallel::{self, RankInfo};
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
        /// Compute precision: f32 (the CPU default), or bf16/f16 through precision lowering.
        /// GPU engines compute in bf16, their graph too (the default with `--target cuda`).
        #[arg(long, value_parser = cli::inspect::parse_dtype)]
        dtype: Option<kiln::runtime::ir::DType>,
        /// `cpu` (an f32 engine for the CPU executor) or `cuda` (bf16 weights, CUDA kernels).
        #[arg(long, default_value = "cpu")]
        target: String,
        /// GPU architecture of a `cuda` engine's kernels (default sm_90).
        #[arg(long)]
        arch: Option<String>,
        /// Build even if the checkpoint holds tensors the model file does not use (they are
        /// listed); without it such a checkpoint is refused.
        #[arg(long)]
        allow_unused: bool,
        /// Store the linear layers' weights quantized: `int8` (per output channel, W8A16),
        /// `fp8` (E4M3 per output channel, activations E4M3 per token: W8A8-FP8),
        /// `int4` (groups of --group columns with zero points, W4A16), `int4-sym` (groups,
        /// symmetric), `int4-awq` (int4 with activation-aware scales calibrated on --calib) or
        /// `int4-gptq` (int4 codes chosen by GPTQ from --calib activations), or llama.cpp's
        /// `q8_0` (int8, a scale per 32 columns) and `q4_1` (int4, a scale and a minimum per 32
        /// columns). GPU engines read all but `int4-awq` (gemv_q.cu), which runs on the CPU so
        /// far (a GPU build of it is refused by name). A pre-quantized checkpoint (a GGUF's Q4_0, Q4_1 or Q8_0
        /// projections, AutoAWQ, GPTQ) keeps its format without --quant; `none` dequantizes it.
        #[arg(long)]
        quant: Option<String>,
        /// Columns per int4 scale: 32, 64 or 128 (default 128).
        #[arg(long)]
        group: Option<u16>,
        /// Checkpoint weights to keep in 16 bits besides the output projection (which always
        /// stays), as comma-separated dot-separated name parts: `layers.0,down_proj`.
        #[arg(long, value_delimiter = ',')]
        quant_skip: Vec<String>,
        /// Calibration text of `--quant int4-awq|int4-gptq` (default: Python standard-library docstrings
        /// shipped with kiln, data/calib/); the model runs on its first 8 windows of 512 tokens
        /// on the CPU.
        #[arg(long)]
        calib: Option<PathBuf>,
        /// With `--quant int4-gptq`: quantize the columns by decreasing Hessian diagonal
        /// (GPTQ's act-order), each group's scale fixed beforehand (static groups, so the
        /// stored format is unchanged).
        #[arg(long)]
        act_order: bool,
        /// Tensor parallelism: shard the model over N ranks (a power of two) and write one
        /// engine per rank beside OUTPUT (`model.rank0-of-N.kiln`, …); run them together with
        /// `kiln run OUTPUT --tp N`. CPU engines so far (the ranks run on threads).
        #[arg(long, default_value_t = 1)]
        tp: u32,
        /// The KV cache in 8 bits: `int8` or `fp8` (E4M3), one scale per head and token
        /// (default: the compute dtype). CPU engines so far.
        #[arg(long)]
        kv_cache: Option<String>,
        /// Pipeline parallelism: split the decoder layers into M consecutive stages (each
        /// sharded over --tp ranks); rank r is tensor-parallel rank r % N of stage r / N.
        #[arg(long, default_value_t = 1)]
        pp: u32,
    },
    /// Generate text with an engine, streaming tokens to stdout.
    Run(RunArgs),
    /// Serve an engine over an OpenAI-compatible HTTP API (continuous batching).
    Serve(cli::serve::ServeArgs),
    /// Perplexity of an engine on a text (llama.cpp's protocol).
    Eval(cli::eval::EvalArgs),
    /// Load-test an OpenAI-compatible server: TTFT, TPOT, ITL and throughput.
    Loadtest(cli::loadtest::LoadtestArgs),
    /// Print a graph at a stage of the compiler (parsed, optimized, lowered), explain the
    /// rewriter, or summarize it as JSON.
    Inspect(cli::inspect::InspectArgs),
    /// Measure latency and throughput over batch sizes and input:output lengths.
    Bench {
        /// Engine file.
        engine: PathBuf,
        /// Comma-separated batch sizes (default 1; not with --throughput).
        #[arg(long)]
        batch: Option<String>,
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
        /// Offline throughput through the continuous-batching scheduler: --requests requests
        /// per --io pair, all submitted at once.
        #[arg(long)]
        throughput: bool,
        /// Requests per --io pair (--throughput; default 1000).
        #[arg(long)]
        requests: Option<usize>,
        /// Standard deviation of the input token counts (--throughput; default 0: fixed).
        #[arg(long)]
        input_std: Option<f64>,
        /// Standard deviation of the output token counts (--throughput; default 0: fixed).
        #[arg(long)]
        output_std: Option<f64>,
        /// Most requests running at once (--throughput; default 256).
        #[arg(long)]
        max_num_seqs: Option<usize>,
        /// Most tokens per scheduler step (--throughput; default GPU 8192, CPU 512).
        #[arg(long)]
        max_num_tokens: Option<usize>,
        /// KV-cache capacity in tokens (--throughput).
        #[arg(long)]
        max_kv_tokens: Option<usize>,
        /// The rank engines of a `kiln build --tp N` (ENGINE is the -o name), on the CPU
        /// (--throughput).
        #[arg(long)]
        tp: Option<u32>,
        /// The pipeline stages of the build (--throughput).
        #[arg(long)]
        pp: Option<u32>,
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
        /// Print each token's vocabulary entry beside its id (`id<TAB>piece` per line; with
        /// --json, a list of {id, piece}).
        #[arg(long)]
        pieces: bool,
    },
    /// Run a GPU engine's launch plan and its graph on the CPU side by side on a prompt, and
    /// print every GPU buffer's relative error against the graph node it holds.
    Diff {
        /// GPU engine file.
        engine: PathBuf,
        /// Prompt text (needs the engine's tokenizer).
        #[arg(short, long, required_unless_present = "ids", conflicts_with = "ids")]
        prompt: Option<String>,
        /// The prompt as token ids, separated by commas or spaces.
        #[arg(long)]
        ids: Option<String>,
        /// Relative L2 error above which a buffer is marked (bf16 activations: 3e-2).
        #[arg(long, default_value_t = 3e-2)]
        tolerance: f64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the text of token ids (the inverse of `tokenize`).
    Detokenize {
        /// Engine file.
        engine: PathBuf,
        /// Token ids, separated by spaces or commas (a JSON list works too).
        #[arg(required = true, num_args = 1..)]
        ids: Vec<String>,
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
    /// Most tokens to generate (0 generates none).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature, finite and ≥ 0; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep only the k most likely tokens (k ≥ 1; default: all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Keep the smallest set of tokens with this much probability, in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Random seed for sampling (default: a random one, printed; see --json).
    #[arg(long)]
    seed: Option<u64>,
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
    /// Run the rank engines of a `kiln build --tp N [--pp M]` (ENGINE is the name given to
    /// -o) together, on the CPU: the stages in order, one thread per rank of a stage.
    #[arg(long)]
    tp: Option<u32>,
    /// The pipeline stages of the build (with --tp, or alone).
    #[arg(long)]
    pp: Option<u32>,
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
    /// The ranks of a parallel build, by stage, in rank order.
    CpuGroup(Vec<Vec<CpuExecutor>>),
    Cuda(Box<CudaExecutor>),
}

fn load_engine(
    path: &Path,
    device: Option<&str>,
    max_kv_tokens: Option<usize>,
) -> Result<(Engine, Executor)> {
    let pb = spinner("loading engine");
    let engine = Engine::open(path)?;
    if let Some(info) = RankInfo::of(&engine)? {
        bail!(
            "{} is rank {} of a {}-rank parallel build: run the ranks together with \
             `kiln run <the -o name of the build> --tp {} --pp {}`",
            path.display(),
            info.rank,
            info.ranks(),
            info.tp,
            info.pp
        );
    }
    let exec = match device.unwrap_or(engine.target()) {
        "cpu" => Executor::Cpu(Box::new(engine.cpu_executor()?)),
        "cuda" => {
            let opts = CudaOptions {
                max_seq_len: engine.generation.max_context,
                max_kv_tokens,
                ..CudaOptions::default()
            };
            Executor::Cuda(Box::new(CudaExecutor::new(&engine, opts).map_err(|e| {
                let hint = match e {
                    kiln::runtime::cuda::CudaError::NoDevice(_) => {
                        "; this is a GPU engine: run it on the CPU with --device cpu"
                    }
                    _ => "",
                };
                anyhow::anyhow!("{}: {e}{hint}", path.display())
            })?))
        }
        other => bail!("unknown device `{other}` (cpu or cuda)"),
    };
    pb.finish_and_clear();
    Ok((engine, exec))
}

fn tokenizer_of(engine: &Engine, path: &Path) -> Result<Tokenizer> {
    let json = engine
        .tokenizer_json
        .as_deref()
        .with_context(|| format!("{}: this engine has no tokenizer", path.display()))?;
    Tokenizer::from_json(json).with_context(|| {
        format!(
            "{}: the engine's tokenizer cannot be loaded",
            path.display()
        )
    })
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
    for note in &report.notes {
        eprintln!("{note}");
    }
    let (what, per) = match opts.tp * opts.pp {
        1 => (output.display().to_string(), ""),
        n => (
            format!("{n} rank engines of {}", output.display()),
            "rank 0: ",
        ),
    };
    eprintln!(
        "built {what} in {:.1}s: {per}{} nodes, {} weights, {:.1}M parameters",
        t0.elapsed().as_secs_f64(),
        report.nodes,
        report.weights,
        report.parameters as f64 / 1e6
    );
    if let Some(r) = &report.rewrite {
        eprintln!(
            "rewriter: {:.0} ms; estimated decode step {:.1} → {:.1} µs, {} → {} kernels \
             (`kiln inspect {} --explain` for details)",
            r.total_ms,
            r.cost_before.time_ns / 1e3,
            r.cost_after.time_ns / 1e3,
            r.cost_before.kernels,
            r.cost_after.kernels,
            checkpoint.display()
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

/// The sampling settings of `kiln run`, checked: temperature finite and ≥ 0, top-p in (0, 1],
/// top-k ≥ 1 when given; with temperature > 0 and no seed, a random seed.
fn sampling_of(a: &RunArgs) -> Result<SamplingParams> {
    if a.top_k == Some(0) {
        bail!("--top-k must be at least 1 (leave it out to keep every token)");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k.unwrap_or(0),
        top_p: a.top_p,
        seed: a.seed.unwrap_or_else(random_seed),
    };
    sampling.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
    if sampling.temperature == 0.0 && (a.top_k.is_some() || a.top_p != 1.0 || a.seed.is_some()) {
        bail!("--top-k, --top-p and --seed apply to sampling; set --temperature above 0");
    }
    Ok(sampling)
}

/// A seed from the clock and the process id (what llama.cpp and vLLM do when none is given).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn cmd_run(a: RunArgs) -> Result<()> {
    if a.system.is_some() && !a.chat {
        bail!("--system needs --chat (the system message goes into the chat template)");
    }
    let sampling = sampling_of(&a)?;
    let parallel = cli::serve::parallel_of(a.tp, a.pp, a.device.as_deref())?;
    let (engine, mut exec) = match parallel {
        None => load_engine(&a.engine, a.device.as_deref(), a.max_kv_tokens)?,
        Some((tp, pp)) => {
            if a.max_kv_tokens.is_some() {
                bail!("--max-kv-tokens sizes a GPU cache; --tp/--pp run the ranks on the CPU");
            }
            let pb = spinner("loading rank engines");
            let mut engines = parallel::open_group(&a.engine, tp, pp)?;
            let execs = parallel::cpu_executors(&engines, tp)?;
            pb.finish_and_clear();
            (engines.swap_remove(0), Executor::CpuGroup(execs))
        }
    };
    let tok = tokenizer_of(&engine, &a.engine)?;
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
        sampling,
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
        Executor::CpuGroup(ranks) => generate_with(
            &mut parallel::ParallelCpuDecoder::new(ranks),
            &tok,
            &req,
            on_text,
        )?,
        Executor::Cuda(e) => generate_with(&mut CudaDecoder::new(e), &tok, &req, on_text)?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!();
        let t = &result.timings;
        let seed = result.seed.map_or(String::new(), |s| format!("; seed {s}"));
        eprintln!(
            "[{} prompt tokens, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s; {:?}{seed}]",
            result.prompt_ids.len(),
            result.generated_ids.len(),
            t.prefill_tokens_per_s,
            t.decode_tokens_per_s,
            result.finish_reason
        );
    }
    Ok(())
}

fn cmd_tokenize(path: &Path, text: &str, json: bool, pieces: bool) -> Result<()> {
    let engine = Engine::open(path)?;
    let tok = tokenizer_of(&engine, path)?;
    let ids = tok.encode(text)?;
    let piece = |id: u32| tok.id_to_token(id).unwrap_or_default();
    match (json, pieces) {
        (true, false) => println!("{}", serde_json::to_string(&ids)?),
        (true, true) => {
            let v: Vec<_> = ids
                .iter()
                .map(|&id| serde_json::json!({"id": id, "piece": piece(id)}))
                .collect();
            println!("{}", serde_json::to_string(&v)?);
        }
        (false, true) => {
            for &id in &ids {
                println!("{id}\t{}", piece(id));
            }
        }
        (false, false) => {
            let parts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            println!("{}", parts.join(" "));
        }
    }
    Ok(())
}

fn cmd_detokenize(path: &Path, args: &[String]) -> Result<()> {
    let ids = cli::parse_ids(args.iter().map(String::as_str))?;
    let engine = Engine::open(path)?;
    let text = tokenizer_of(&engine, path)?.decode(&ids)?;
    println!("{text}");
    Ok(())
}

/// The device to run an engine on: the one asked for, else the engine's target.
fn device_of(engine: &Path, asked: Option<String>) -> Result<String> {
    match asked {
        Some(d) => Ok(d),
        None => Ok(Engine::open(engine)?.target().to_string()),
    }
}

/// The build options of `kiln build`'s flags, refusing combinations that would be ignored.
fn build_options(
    model: Option<PathBuf>,
    no_optimize: bool,
    dtype: Option<kiln::runtime::ir::DType>,
    target: &str,
    arch: Option<String>,
    allow_unused: bool,
    quant: QuantFlags,
) -> Result<BuildOptions> {
    use kiln::runtime::ir::DType;
    let cuda_arch = match (target, arch) {
        ("cpu", Some(_)) => bail!("--arch applies to GPU engines: add --target cuda"),
        ("cpu", None) => None,
        ("cuda", arch) => Some(arch.unwrap_or_else(|| "sm_90".into())),
        (other, _) => bail!("unknown target `{other}` (cpu or cuda)"),
    };
    if cuda_arch.is_some() && matches!(dtype, Some(DType::F32 | DType::F16)) {
        bail!(
            "GPU engines compute in bf16 (their kernels are bf16); leave --dtype out or pass \
             --dtype bf16"
        );
    }
    Ok(BuildOptions {
        model_file: model,
        no_optimize,
        // A GPU engine computes in bf16, and its graph says so (the CPU graph `kiln diff`
        // compares with is the one the kernels compute).
        dtype: dtype.unwrap_or(if cuda_arch.is_some() {
            DType::BF16
        } else {
            DType::F32
        }),
        cuda_arch,
        allow_unused,
        calibration: quant.calibration()?,
        dequantize: quant.quant.as_deref() == Some("none"),
        quant: quant.options()?,
        kv_cache: None,
        tp: 1,
        pp: 1,
    })
}

/// `kiln build`'s quantization flags.
struct QuantFlags {
    quant: Option<String>,
    group: Option<u16>,
    skip: Vec<String>,
    calib: Option<PathBuf>,
    act_order: bool,
}

impl QuantFlags {
    /// The calibration settings: `--calib`'s text, or the shipped one.
    fn calibration(&self) -> Result<kiln::compiler::quantize::Calibration> {
        if self.calib.is_some() && !matches!(self.quant.as_deref(), Some("int4-awq" | "int4-gptq"))
        {
            bail!("--calib applies to the calibrated formats: --quant int4-awq or int4-gptq");
        }
        let mut c = kiln::compiler::quantize::Calibration::default();
        if let Some(path) = &self.calib {
            c.text = std::fs::read_to_string(path)
                .with_context(|| format!("--calib {}", path.display()))?;
        }
        c.gptq = self.quant.as_deref() == Some("int4-gptq");
        if self.act_order && !c.gptq {
            bail!("--act-order orders GPTQ's columns: it needs --quant int4-gptq");
        }
        c.act_order = self.act_order;
        Ok(c)
    }

    /// The rewriter's quantization options, refusing what does not apply or is not built.
    fn options(self) -> Result<Option<kiln::compiler::rewrite::rules::quant::QuantOptions>> {
        use kiln::compiler::rewrite::rules::quant::{QuantOptions, DEFAULT_SKIP};
        use kiln::runtime::ir::{op::INT4_GROUPS, DType};
        let Some(quant) = self.quant.filter(|q| q != "none") else {
            if self.group.is_some() || !self.skip.is_empty() {
                bail!("--group and --quant-skip apply to a quantized build: add --quant");
            }
            return Ok(None);
        };
        let group = self.group.unwrap_or(128);
        if !INT4_GROUPS.contains(&group) {
            bail!("--group {group}: int4 groups of 32, 64 or 128 columns are supported");
        }
        let format = match quant.as_str() {
            "int8" if self.group.is_some() => {
                bail!("--group applies to int4: int8 has one scale per output channel")
            }
            "int8" => DType::Int8,
            "fp8" if self.group.is_some() => {
                bail!("--group applies to int4: fp8 has one scale per output channel")
            }
            "fp8" => DType::Fp8,
            "int4" => DType::Int4 {
                group,
                zero_point: true,
            },
            "int4-sym" => DType::Int4 {
                group,
                zero_point: false,
            },
            "int4-awq" => DType::Int4Awq { group },
            "q8_0" | "q4_1" if self.group.is_some() => {
                bail!("--group applies to int4: llama.cpp's {quant} has groups of 32 columns")
            }
            "q8_0" => DType::Int8Group { group: 32 },
            "q4_1" => DType::Int4Min { group: 32 },
            "int4-gptq" => DType::Int4 {
                group,
                zero_point: true,
            },
            "w8a8" => bail!(
                "--quant w8a8 (SmoothQuant INT8) is not supported yet: use int8, fp8, int4, \
                 int4-sym, int4-awq, int4-gptq, q8_0 or q4_1"
            ),
            other => {
                bail!(
                    "unknown --quant `{other}`: int8, fp8, int4, int4-sym, int4-awq, int4-gptq, \
                     q8_0 or q4_1"
                )
            }
        };
        if let Some(bad) = self.skip.iter().find(|p| p.is_empty()) {
            bail!("--quant-skip `{bad}`: an empty pattern");
        }
        let mut skip: Vec<String> = DEFAULT_SKIP.iter().map(|s| s.to_string()).collect();
        skip.extend(self.skip);
        Ok(Some(QuantOptions { format, skip }))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C (or SIGTERM) removes a build's half-written output, then exits. (`serve` handles
    // the signals itself: it drains its requests first.)
    if !matches!(cli.command, Command::Serve(_)) {
        let _ = ctrlc::set_handler(|| {
            kiln::compiler::output::remove_partials();
            eprintln!("\ninterrupted");
            std::process::exit(130);
        });
    }
    let result = match cli.command {
        Command::Build {
            checkpoint,
            output,
            model,
            no_optimize,
            dtype,
            target,
            arch,
            allow_unused,
            quant,
            group,
            quant_skip,
            calib,
            act_order,
            tp,
            pp,
            kv_cache,
        } => build_options(
            model,
            no_optimize,
            dtype,
            &target,
            arch,
            allow_unused,
            QuantFlags {
                quant,
                group,
                skip: quant_skip,
                calib,
                act_order,
            },
        )
        .and_then(|opts| {
            let kv_cache = match kv_cache.as_deref() {
                None => None,
                Some("int8") => Some(kiln::runtime::ir::DType::Int8),
                Some("fp8") => Some(kiln::runtime::ir::DType::Fp8),
                Some(other) => {
                    bail!("--kv-cache {other}: int8 or fp8 (leave it out for the compute dtype)")
                }
            };
            Ok(BuildOptions {
                tp,
                pp,
                kv_cache,
                ..opts
            })
        })
        .and_then(|opts| cmd_build(&checkpoint, &output, opts)),
        Command::Run(args) => cmd_run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Loadtest(args) => cli::loadtest::run(args),
        Command::Eval(args) => cli::eval::run(&args),
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Tokenize {
            engine,
            text,
            json,
            pieces,
        } => cmd_tokenize(&engine, &text, json, pieces),
        Command::Detokenize { engine, ids } => cmd_detokenize(&engine, &ids),
        Command::Diff {
            engine,
            prompt,
            ids,
            tolerance,
            json,
        } => cli::diff::run(&engine, prompt.as_deref(), ids.as_deref(), tolerance, json),
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
            throughput,
            requests,
            input_std,
            output_std,
            max_num_seqs,
            max_num_tokens,
            max_kv_tokens,
            tp,
            pp,
        } => {
            let offline_only = [
                (tp.is_some() || pp.is_some(), "--tp/--pp"),
                (requests.is_some(), "--requests"),
                (input_std.is_some(), "--input-std"),
                (output_std.is_some(), "--output-std"),
                (max_num_seqs.is_some(), "--max-num-seqs"),
                (max_num_tokens.is_some(), "--max-num-tokens"),
                (max_kv_tokens.is_some(), "--max-kv-tokens"),
            ];
            let session_only = [
                (batch.is_some(), "--batch"),
                (no_cuda_graphs, "--no-cuda-graphs"),
                (no_pdl, "--no-pdl"),
                (timeline, "--timeline"),
                (ttft_idle_ms > 0, "--ttft-idle-ms"),
            ];
            if throughput {
                if let Some((_, flag)) = session_only.iter().find(|(on, _)| *on) {
                    return finish(Err(anyhow::anyhow!(
                        "{flag} does not apply to --throughput (the scheduler picks the batches)"
                    )));
                }
                let parallel = cli::serve::parallel_of(tp, pp, device.as_deref());
                let device = match &parallel {
                    Ok(Some(_)) => Ok("cpu".to_string()),
                    _ => device_of(&engine, device),
                };
                let args =
                    parallel
                        .and_then(|p| device.map(|d| (p, d)))
                        .and_then(|(parallel, d)| {
                            Ok(cli::throughput::ThroughputArgs {
                                parallel,
                                requests: requests.unwrap_or(1000),
                                io: cli::bench::parse_io(&io)?,
                                std: (input_std.unwrap_or(0.0), output_std.unwrap_or(0.0)),
                                max_num_seqs: max_num_seqs.unwrap_or(256),
                                max_num_tokens,
                                max_kv_tokens,
                                device: d,
                                json,
                            })
                        });
                return finish(args.and_then(|a| cli::throughput::run(&engine, &a)));
            }
            if let Some((_, flag)) = offline_only.iter().find(|(on, _)| *on) {
                return finish(Err(anyhow::anyhow!("{flag} applies to --throughput only")));
            }
            let batch = batch.unwrap_or_else(|| "1".into());
            let launch = CudaOptions {
                cuda_graphs: !no_cuda_graphs,
                pdl: !no_pdl,
                ..CudaOptions::default()
            };
            device_of(&engine, device).and_then(|d| {
                if d != "cuda" && d != "cpu" {
                    bail!("unknown device `{d}` (cpu or cuda)");
                }
                if d != "cuda" {
                    let gpu_only = [
                        (no_cuda_graphs, "--no-cuda-graphs"),
                        (no_pdl, "--no-pdl"),
                        (timeline, "--timeline"),
                        (ttft_idle_ms > 0, "--ttft-idle-ms"),
                    ];
                    if let Some((_, flag)) = gpu_only.iter().find(|(on, _)| *on) {
                        bail!("{flag} applies to GPU runs only (this bench runs on `{d}`)");
                    }
                }
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
    finish(result)
}

/// The exit status of a command, printing its error.
fn finish(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
