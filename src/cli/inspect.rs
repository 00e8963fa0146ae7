//! `kiln inspect`: a model's graph at each stage of the compiler — `parsed` (the model file
//! expanded), `optimized` (after the rewriter, weight-only subgraphs still visible), `lowered` (the
//! graph an engine stores: weight-only subgraphs folded into derived weights) — as text, Graphviz
//! DOT or SVG, with `--explain` (what the rewriter did) or `--json` (a machine-readable summary).
//! Applies to a model file with `--config`, a checkpoint, or an engine (which holds only its
//! lowered graph).

use anyhow::{bail, Context, Result};
use kiln::compiler::build::{check_weights, graph_for, model_for};
use kiln::compiler::graph::print;
use kiln::compiler::rewrite::report::{layer_stats, summary};
use kiln::compiler::rewrite::{optimize, RewriteOptions};
use kiln::runtime::engine::Engine;
use kiln::runtime::ir::{DType, Graph};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A stage of the compiler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// The model file expanded into a typed graph.
    Parsed,
    /// After the rewriter (fusions, precision), weight-only subgraphs still in place.
    Optimized,
    /// The engine's graph: weight-only subgraphs folded into derived weights.
    Lowered,
}

/// Arguments of `kiln inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// An engine file, a checkpoint (HF folder or .gguf), or a model file (.ron) with --config.
    pub target: PathBuf,
    /// config.json for a model file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Which stage to show (default: `parsed`; an engine has only `lowered`).
    #[arg(long, value_enum)]
    pub stage: Option<Stage>,
    /// Only the nodes of decoder layer N (names starting with `layers.N.`).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Print Graphviz DOT instead of text.
    #[arg(long, conflicts_with_all = ["svg", "explain", "json"])]
    pub dot: bool,
    /// Write an SVG drawing (needs Graphviz `dot`).
    #[arg(long, conflicts_with_all = ["explain", "json"])]
    pub svg: Option<PathBuf>,
    /// Explain the rewriter: rules fired, where, how often; costs before and after.
    #[arg(long, conflicts_with = "json")]
    pub explain: bool,
    /// Print a JSON summary (ops per layer before, kernels per layer after, rules fired, costs).
    #[arg(long)]
    pub json: bool,
    /// Print the launch plan (every launch with its kernel family, parameters and buffers)
    /// instead of the graph: a GPU engine's, or the one a bf16 GPU build of a checkpoint or
    /// model file would record (lowered here, without compiling kernels).
    #[arg(long, conflicts_with_all = ["dot", "svg", "explain", "json", "stage"])]
    pub plan: bool,
    /// Compute precision for the optimized and lowered stages: f32, bf16 or f16.
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<DType>,
    /// Show one rank's graph of the model sharded over N tensor-parallel ranks (every stage:
    /// `parsed` is the sharded graph before the rewriter).
    #[arg(long)]
    pub tp: Option<u32>,
    /// Show one rank's graph of the model split into M pipeline stages (with --tp: rank r is
    /// tensor-parallel rank r % N of stage r / N).
    #[arg(long)]
    pub pp: Option<u32>,
    /// Which rank --tp/--pp shows (default 0).
    #[arg(long)]
    pub rank: Option<u32>,
}

/// Parses a `--dtype` value.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(format!(
            "`{s}` is not a compute dtype: use f32, bf16 or f16"
        )),
    }
}

fn source_graph(target: &Path, config: Option<&Path>) -> Result<Option<Graph>> {
    let is_model_file = target.extension().is_some_and(|e| e == "ron");
    if config.is_some() && !is_model_file {
        bail!("--config applies to a model file (.ron); a checkpoint or engine has its own");
    }
    if is_model_file {
        let config_path = config.context("a model file needs --config <config.json>")?;
        let text = std::fs::read_to_string(config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", config_path.display()))?;
        let model = model_for(&cfg, Some(target))?;
        return Ok(Some(graph_for(&model, &cfg)?));
    }
    if target.is_dir() || target.extension().is_some_and(|e| e == "gguf") {
        let ckpt = kiln::compiler::loader::Checkpoint::open(target)?;
        let model = model_for(&ckpt.config, None)?;
        let mut g = graph_for(&model, &ckpt.config)?;
        let available = ckpt.tensors();
        kiln::compiler::build::resolve_base_prefix(&mut g, &available);
        check_weights(&g, &available)?;
        return Ok(Some(g));
    }
    Ok(None)
}

fn svg(dot: &str, out: &Path, input: &Path) -> Result<()> {
    kiln::compiler::output::write_output(out, &[input], |tmp| {
        render_svg(dot, tmp).map_err(|e| format!("{e:#}"))
    })
    .map_err(anyhow::Error::msg)
}

fn render_svg(dot: &str, out: &Path) -> Result<()> {
    let mut child = Command::new("dot")
        .args(["-Tsvg", "-o"])
        .arg(out)
        .stdin(Stdio::piped())
        .spawn()
        .context("Graphviz `dot` is not installed: use --dot and render the output elsewhere")?;
    child
        .stdin
        .take()
        .context("writing to dot")?
        .write_all(dot.as_bytes())?;
    if !child.wait()?.success() {
        bail!("dot failed to render {}", out.display());
    }
    Ok(())
}

/// Runs `kiln inspect`.
/// Checks that the graph has decoder layer `layer` (nodes named `layers.N.…`).
fn check_layer(g: &Graph, layer: Option<usize>) -> Result<()> {
    let Some(n) = layer else { return Ok(()) };
    let prefix = format!("layers.{n}.");
    if g.nodes.iter().any(|node| node.name.starts_with(&prefix)) {
        return Ok(());
    }
    let layers = (0..)
        .take_while(|i| {
            let p = format!("layers.{i}.");
            g.nodes.iter().any(|node| node.name.starts_with(&p))
        })
        .count();
    bail!("--layer {n}: the graph has {layers} decoder layers (0..{layers})")
}

/// An engine's weights grouped by stored format (`bf16`, `f32`, `int8`, `int4g128z`, …): how
/// many, and their bytes (codes, scales and zero points included) — the bytes a decode step
/// reads.
fn weight_formats(engine: &Engine) -> serde_json::Value {
    let mut by: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (id, name) in engine.graph.weights() {
        let dtype = engine.graph.nodes[id].ty.dtype;
        let (label, parts): (String, Vec<String>) = if dtype.is_weight_format() {
            let shape = &engine.graph.nodes[id].ty.shape;
            let (r, c) = (shape[0].constant as usize, shape[1].constant as usize);
            let parts = kiln::runtime::quant::parts(dtype, r, c).unwrap_or_default();
            let names = parts
                .iter()
                .map(|p| format!("{name}{}", p.suffix))
                .collect();
            (dtype.name().to_string(), names)
        } else {
            let stored = engine.tensor(name).map(|(e, _)| format!("{:?}", e.dtype));
            let label = stored.unwrap_or_else(|_| "missing".into()).to_lowercase();
            (label, vec![name.to_string()])
        };
        let bytes: usize = parts
            .iter()
            .filter_map(|n| engine.tensor(n).ok().map(|(_, b)| b.len()))
            .sum();
        let e = by.entry(label).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    by.into_iter()
        .map(|(k, (n, b))| (k, serde_json::json!({"weights": n, "bytes": b})))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub fn run(a: &InspectArgs) -> Result<()> {
    let prefix = a.layer.map(|i| format!("layers.{i}."));
    let prefix = prefix.as_deref().unwrap_or("layers.0.");
    let filter = a.layer.map(|_| prefix);
    if let Some(svg) = &a.svg {
        kiln::compiler::output::check_output(svg, &[&a.target]).map_err(anyhow::Error::msg)?;
    }
    let mut parsed = source_graph(&a.target, a.config.as_deref())?;
    if a.rank.is_some() && a.tp.is_none() && a.pp.is_none() {
        bail!("--rank picks a rank of --tp/--pp: add one of them");
    }
    if a.tp.is_some() || a.pp.is_some() {
        let Some(g) = parsed.take() else {
            bail!(
                "--tp/--pp split a checkpoint or model file; an engine is already built \
                 (inspect a rank engine itself)"
            );
        };
        if a.plan {
            bail!("--tp/--pp build CPU engines for now: a parallel GPU launch plan does not exist yet");
        }
        let (tp, pp) = (a.tp.unwrap_or(1), a.pp.unwrap_or(1));
        let (g, notes) =
            kiln::compiler::rewrite::parallel::rank_graph(&g, tp, pp, a.rank.unwrap_or(0))
                .map_err(anyhow::Error::msg)?;
        for note in notes {
            eprintln!("{note}");
        }
        parsed = Some(g);
    }
    if let (true, Some(parsed)) = (a.plan, &parsed) {
        // The launch plan `kiln build --target cuda [--dtype bf16]` would record: the rewritten
        // graph, lowered (no kernels compiled).
        if a.layer.is_some() || a.dtype == Some(DType::F16) {
            bail!("--plan prints the whole launch plan of a GPU build (no --layer; --dtype bf16 or f32)");
        }
        let opts = RewriteOptions {
            dtype: a.dtype.unwrap_or(DType::F32),
            ..RewriteOptions::default()
        };
        let out = optimize(parsed, &opts)?;
        let plan = kiln::runtime::lower::lower(&out.graph).map_err(anyhow::Error::msg)?;
        // The kernels `kiln build --target cuda` compiles by default (sm_90).
        return emit(&kiln::runtime::cuda::describe_plan(&plan, "sm_90"));
    }
    let Some(parsed) = parsed else {
        // An engine: only its lowered graph exists.
        if a.stage.is_some_and(|s| s != Stage::Lowered) || a.explain || a.dtype.is_some() {
            bail!(
                "an engine holds only its lowered graph, at the precision it was built with; \
                 inspect the checkpoint or model file for earlier stages, --explain and --dtype"
            );
        }
        let engine = Engine::open(&a.target)?;
        if a.plan {
            let text = engine
                .metadata(kiln::runtime::engine::keys::PLAN)
                .with_context(|| {
                    format!("{}: a CPU engine has no launch plan", a.target.display())
                })?;
            let plan = kiln::runtime::plan::Plan::from_ron(text).map_err(anyhow::Error::msg)?;
            let arch = engine
                .metadata(kiln::runtime::engine::keys::ARCH)
                .unwrap_or("sm_90");
            return emit(&kiln::runtime::cuda::describe_plan(&plan, arch));
        }
        let formats = weight_formats(&engine);
        let g = engine.graph;
        check_layer(&g, a.layer)?;
        if a.json {
            let stats = layer_stats(&g, prefix);
            let v = serde_json::json!({
                "stage": "lowered",
                "weights_by_format": formats,
                "ops_per_layer_before": null,
                "kernels_per_layer_after": stats.kernels,
                "layer_after": stats,
                "rules_fired": {},
                "cost_before": null,
                "cost_after": kiln::compiler::rewrite::cost::graph_cost(&g).total.time_ns(),
            });
            return emit(&format!("{}\n", serde_json::to_string_pretty(&v)?));
        }
        return show(&g, filter, a);
    };
    check_layer(&parsed, a.layer)?;
    let stage = a.stage.unwrap_or(Stage::Parsed);
    let needs_rewrite = stage != Stage::Parsed || a.explain || a.json;
    if !needs_rewrite && a.dtype.is_some() {
        bail!("--dtype applies to the optimized and lowered stages (--stage optimized)");
    }
    if !needs_rewrite {
        return show(&parsed, filter, a);
    }
    let opts = RewriteOptions {
        dtype: a.dtype.unwrap_or(DType::F32),
        ..RewriteOptions::default()
    };
    let out = optimize(&parsed, &opts)?;
    if a.json {
        let v = summary(&parsed, &out, prefix);
        return emit(&format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    if a.explain {
        let (before, after) = (
            layer_stats(&parsed, prefix),
            layer_stats(&out.graph, prefix),
        );
        let kernels: Vec<String> = after
            .kernel_ops
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        return emit(&format!(
            "{}\ndecoder layer `{prefix}`: {} ops ({} kernels) before, {} kernels after \
             ({} views, {} cache appends); kernels: {}\n",
            out.report.explain(),
            before.ops,
            before.kernels,
            after.kernels,
            after.views,
            after.cache_appends,
            kernels.join(", ")
        ));
    }
    let g = match stage {
        Stage::Parsed => &parsed,
        Stage::Optimized => &out.optimized,
        Stage::Lowered => &out.graph,
    };
    show(g, filter, a)
}

fn show(g: &Graph, filter: Option<&str>, a: &InspectArgs) -> Result<()> {
    if let Some(path) = &a.svg {
        svg(&print::dot(g, filter), path, &a.target)?;
        eprintln!("wrote {}", path.display());
        Ok(())
    } else if a.dot {
        emit(&print::dot(g, filter))
    } else {
        emit(&print::text(g, filter))
    }
}

/// Writes to stdout; a closed pipe (`kiln inspect … | head`) is not an error.
fn emit(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
