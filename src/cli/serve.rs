//! `kiln serve`: loads an engine behind the continuous-batching scheduler and serves the OpenAI
//! API on it until SIGTERM or Ctrl-C, which stop new connections and let running requests
//! finish first.

use anyhow::{bail, Context, Result};
use kiln::runtime::chat::ChatTemplate;
use kiln::runtime::cuda::{CudaExecutor, CudaOptions};
use kiln::runtime::engine::Engine;
use kiln::runtime::parallel::{self, ParallelBatchExecutor};
use kiln::runtime::serving::{CpuBatchExecutor, Scheduler, SchedulerConfig, ServeHandle};
use kiln::runtime::tokenizer::Tokenizer;
use kiln::serve::{router, sample_rate, App};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Flags of `kiln serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Engine file.
    pub engine: PathBuf,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// `cpu` or `cuda` (default: the engine's target).
    #[arg(long)]
    pub device: Option<String>,
    /// Require `Authorization: Bearer <key>` on every route but /health.
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model name clients use (default: the engine file's name without extension).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most requests running at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens in one step (decodes plus prompt chunks).
    #[arg(long)]
    pub max_num_tokens: Option<usize>,
    /// KV-cache capacity in tokens (default: GPU: 90% of the memory left after the weights;
    /// CPU: 2 GiB worth).
    #[arg(long)]
    pub max_kv_tokens: Option<usize>,
    /// Do not share KV blocks between requests with the same prompt prefix.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Serve the rank engines of a `kiln build --tp N [--pp M]` (ENGINE is the name given to
    /// -o) together, on the CPU.
    #[arg(long)]
    pub tp: Option<u32>,
    /// The pipeline stages of the build (with --tp, or alone).
    #[arg(long)]
    pub pp: Option<u32>,
}

/// The `(tp, pp)` of `--tp`/`--pp` (`None` without either), checked.
pub fn parallel_of(
    tp: Option<u32>,
    pp: Option<u32>,
    device: Option<&str>,
) -> Result<Option<(u32, u32)>> {
    if tp.is_none() && pp.is_none() {
        return Ok(None);
    }
    let (tp, pp) = (tp.unwrap_or(1), pp.unwrap_or(1));
    if tp == 0 || pp == 0 {
        bail!("--tp and --pp count ranks and stages: at least 1");
    }
    if device.is_some_and(|d| d != "cpu") {
        bail!("--tp/--pp run the ranks on the CPU (the NCCL GPU runtime is not built yet): drop --device cuda");
    }
    Ok(Some((tp, pp)))
}

/// The engine whose metadata (tokenizer, template, context) a run uses: the engine, or rank 0
/// of a parallel build.
pub fn open_first(engine: &Path, parallel: Option<(u32, u32)>) -> Result<Engine> {
    Ok(match parallel {
        Some((tp, pp)) => Engine::open(&kiln::runtime::parallel::rank_path(engine, 0, tp * pp))?,
        None => Engine::open(engine)?,
    })
}

/// The scheduler of an engine on a device, made on the scheduler's own thread.
#[allow(clippy::too_many_arguments)]
pub fn spawn_scheduler(
    engine: &Path,
    device: &str,
    parallel: Option<(u32, u32)>,
    max_num_seqs: usize,
    max_num_tokens: usize,
    max_kv_tokens: Option<usize>,
    prefix_caching: bool,
    tok: Option<Arc<Tokenizer>>,
) -> Result<(ServeHandle, std::thread::JoinHandle<()>)> {
    let path = engine.to_path_buf();
    let has_tok = tok.is_some();
    let cfg = move |context| SchedulerConfig {
        max_num_seqs,
        max_num_tokens,
        max_context: context,
        prefix_caching,
    };
    // A CPU cache: 2 GiB worth of tokens unless told, and never more than the sequences can use.
    let cpu_kv = move |per_token: usize, context: usize| {
        max_kv_tokens.unwrap_or_else(|| {
            ((2usize << 30) / per_token.max(1)).min(max_num_seqs.saturating_mul(context))
        })
    };
    let spawned = match (device, parallel) {
        (_, Some((tp, pp))) => ServeHandle::spawn(move || {
            let engines = parallel::open_group(&path, tp, pp).map_err(|e| e.to_string())?;
            let context = engines[0].generation.max_context;
            let stages = parallel::cpu_executors(&engines, tp).map_err(|e| e.to_string())?;
            let per_token =
                ParallelBatchExecutor::kv_bytes_per_token(&stages).map_err(|e| e.to_string())?;
            let kv = cpu_kv(per_token, context);
            let batch = ParallelBatchExecutor::new(stages, 16, kv, max_num_seqs, max_num_tokens)
                .map_err(|e| e.to_string())?;
            Ok((Scheduler::new(batch, tok, cfg(context)), has_tok))
        }),
        ("cpu", None) => ServeHandle::spawn(move || {
            let engine = Engine::open(&path).map_err(|e| e.to_string())?;
            let exec = engine.cpu_executor().map_err(|e| e.to_string())?;
            let per_token =
                CpuBatchExecutor::kv_bytes_per_token(&exec).map_err(|e| e.to_string())?;
            let context = engine.generation.max_context;
            let kv = cpu_kv(per_token, context);
            let batch = CpuBatchExecutor::new(exec, 16, kv, max_num_seqs, max_num_tokens)
                .map_err(|e| e.to_string())?;
            Ok((Scheduler::new(batch, tok, cfg(context)), has_tok))
        }),
        ("cuda", None) => ServeHandle::spawn(move || {
            let engine = Engine::open(&path).map_err(|e| e.to_string())?;
            let context = engine.generation.max_context;
            let opts = CudaOptions {
                max_batch: max_num_seqs,
                max_step_tokens: max_num_tokens,
                max_seq_len: context,
                max_kv_tokens,
                ..CudaOptions::default()
            };
            let exec = CudaExecutor::new(&engine, opts).map_err(|e| e.to_string())?;
            Ok((Scheduler::new(exec, tok, cfg(context)), has_tok))
        }),
        (other, None) => bail!("unknown device `{other}` (cpu or cuda)"),
    };
    spawned.map_err(|e| anyhow::anyhow!("{}: {e}", engine.display()))
}

/// The default step budget: prompt chunks of this many tokens keep decode steps short.
pub fn default_max_num_tokens(device: &str) -> usize {
    if device == "cuda" {
        8192
    } else {
        512
    }
}

/// Runs the server until SIGTERM or Ctrl-C.
pub fn run(a: ServeArgs) -> Result<()> {
    let parallel = parallel_of(a.tp, a.pp, a.device.as_deref())?;
    let engine = open_first(&a.engine, parallel)?;
    let device = a
        .device
        .clone()
        .unwrap_or_else(|| engine.target().to_string());
    if a.max_num_seqs == 0 {
        bail!("--max-num-seqs must be at least 1");
    }
    let max_num_tokens = a
        .max_num_tokens
        .unwrap_or_else(|| default_max_num_tokens(&device));
    if max_num_tokens == 0 {
        bail!("--max-num-tokens must be at least 1");
    }
    let json = engine.tokenizer_json.as_deref().with_context(|| {
        format!(
            "{}: this engine has no tokenizer, which the server needs",
            a.engine.display()
        )
    })?;
    let tok = Arc::new(Tokenizer::from_json(json).with_context(|| {
        format!(
            "{}: the engine's tokenizer cannot be loaded",
            a.engine.display()
        )
    })?);
    let gen = &engine.generation;
    let template = match &gen.chat_template {
        Some(t) => Some(ChatTemplate::new(
            t,
            gen.bos_token.as_deref().unwrap_or(""),
            gen.eos_token.as_deref().unwrap_or(""),
        )?),
        None => None,
    };
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        a.engine
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned())
    });
    let (handle, join) = spawn_scheduler(
        &a.engine,
        &device,
        parallel,
        a.max_num_seqs,
        max_num_tokens,
        a.max_kv_tokens,
        !a.no_prefix_caching,
        Some(tok.clone()),
    )?;
    let app = Arc::new(App::new(
        handle.clone(),
        tok,
        template,
        gen.stop_token_ids.clone(),
        name.clone(),
        a.api_key.clone(),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "kiln serve: `{name}` on {device}, http://{addr}/v1 (max context {} tokens{})",
            handle.max_seq_len(),
            if a.api_key.is_some() {
                ", API key required"
            } else {
                ""
            }
        );
        tokio::spawn(sample_rate(app.clone()));
        let h = handle.clone();
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("kiln serve: shutting down; finishing the running requests");
                h.drain();
            })
            .await
            .context("the server failed")
    })?;
    drop(handle);
    let _ = join.join();
    eprintln!("kiln serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
