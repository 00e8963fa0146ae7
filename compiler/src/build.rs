//! `kiln build`: checkpoint + model file → graph → checked weights → engine file.

use crate::engine_writer::{write_engine, EngineContents, EngineTensor};
use crate::graph::expand;
use crate::loader::{Checkpoint, LoadError};
use crate::model::{builtin_for, params::bind, ModelError, ModelFile};
use crate::quantize::{awq, calibrate, gptq, source_name, Calibration};
use crate::rewrite::derive::{evaluate, DerivedWeight};
use crate::rewrite::report::RewriteReport;
use crate::rewrite::rules::quant::QuantOptions;
use crate::rewrite::{optimize, RewriteOptions};
use kiln_runtime::cpu::ExecError;
use kiln_runtime::engine::GenerationConfig;
use kiln_runtime::ir::{DType, Graph, NodeId};
use kiln_runtime::parallel::{rank_path, RankInfo};
use kiln_runtime::quant;
use kiln_runtime::tokenizer::Tokenizer;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The model file is wrong or does not fit the config.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A weight the graph needs is missing or mis-shaped.
    #[error("weight `{name}`: {message}")]
    Weight {
        /// Checkpoint name.
        name: String,
        /// Expected vs found.
        message: String,
    },
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

/// Options of `kiln build`.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// A model file to use instead of the built-in one for the config's `model_type`.
    pub model_file: Option<PathBuf>,
    /// Build the graph as written, without the rewriter (`kiln build --no-optimize`).
    pub no_optimize: bool,
    /// Compute precision (`--dtype`): `F32`, or `BF16`/`F16` through precision lowering.
    pub dtype: DType,
    /// Build a GPU engine for this architecture (`--target cuda --arch sm_90`); `None` builds
    /// a CPU engine.
    pub cuda_arch: Option<String>,
    /// Build even though the checkpoint holds tensors the model file does not use
    /// (`--allow-unused`; the build report lists them). Off, they are an error.
    pub allow_unused: bool,
    /// Store linear weights in a weight format (`--quant`, `--quant-skip`).
    pub quant: Option<QuantOptions>,
    /// Dequantize a pre-quantized checkpoint's weights (GGUF blocks, AutoAWQ/GPTQ) to the
    /// compute dtype instead of keeping their format (`--quant none`).
    pub dequantize: bool,
    /// The text and length of calibration (`--calib`; AWQ).
    pub calibration: Calibration,
    /// Tensor-parallel ranks per pipeline stage (`--tp`; 1: none).
    pub tp: u32,
    /// The KV cache in 8 bits (`--kv-cache int8|fp8`; `None`: the compute dtype).
    pub kv_cache: Option<DType>,
    /// Pipeline stages (`--pp`; 1: none). With `tp · pp` above 1 the build writes one engine
    /// per rank (`kiln_runtime::parallel::rank_path`), each with its rank's graph and weights.
    pub pp: u32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            model_file: None,
            no_optimize: false,
            dtype: DType::F32,
            cuda_arch: None,
            allow_unused: false,
            quant: None,
            dequantize: false,
            calibration: Calibration::default(),
            kv_cache: None,
            tp: 1,
            pp: 1,
        }
    }
}

/// The graph a build compiles: the expanded model, rewritten unless `no_optimize`. Returns the
/// graph, its derived weights, and the rewrite report (`None` without the rewriter).
pub fn compile_graph(
    graph: &Graph,
    opts: &BuildOptions,
) -> Result<(Graph, Vec<DerivedWeight>, Option<RewriteReport>), BuildError> {
    if opts.no_optimize {
        if opts.quant.is_some() {
            return Err(BuildError::Other(
                "--quant needs the rewriter (quantization is a rewrite); drop --no-optimize".into(),
            ));
        }
        if opts.dtype != DType::F32 {
            return Err(BuildError::Other(format!(
                "--dtype {} needs the rewriter (precision lowering is a rewrite); drop --no-optimize",
                opts.dtype.name()
            )));
        }
        return Ok((graph.clone(), vec![], None));
    }
    let rewrite = RewriteOptions {
        dtype: opts.dtype,
        // A rule bug panics in tests and debug builds; a release build reports it as an error.
        permissive: !cfg!(debug_assertions),
        quant: opts.quant.clone(),
    };
    let out = optimize(graph, &rewrite).map_err(|e| BuildError::Other(e.to_string()))?;
    Ok((out.graph, out.derived, Some(out.report)))
}

/// The model file for a checkpoint: the given one, or kiln's built-in file for its `model_type`.
pub fn model_for(
    config: &serde_json::Value,
    explicit: Option<&Path>,
) -> Result<ModelFile, BuildError> {
    if let Some(p) = explicit {
        return Ok(ModelFile::load(p)?);
    }
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let (name, text) = builtin_for(model_type).ok_or_else(|| {
        BuildError::Other(format!(
            "no built-in model file for model_type `{model_type}`; pass --model <file.ron>"
        ))
    })?;
    Ok(ModelFile::parse(text, name)?)
}

/// The repository path of the built-in model file for a config (`models/llama.ron`).
fn model_file_name(config: &serde_json::Value) -> String {
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    builtin_for(model_type).map_or_else(|| "the model file".into(), |(n, _)| n.to_string())
}

/// Expands the model file for a config into a graph that can generate text (a float
/// `logits` output), after refusing config keys that change the math the file does not read.
pub fn graph_for(model: &ModelFile, config: &serde_json::Value) -> Result<Graph, BuildError> {
    // A model file that states which RoPE types it computes (`requires` on a `rope_type` key)
    // answers for them; any other file gets the unscaled-only check.
    if !model.requires.iter().any(|(k, _)| k.contains("rope_type")) {
        check_rope(config)?;
    }
    check_config_keys(model, config)?;
    let params = bind(&model.params, config)?;
    let graph = expand(model, &params)?;
    graph
        .check_logits()
        .map_err(|e| BuildError::Other(format!("{}: {e}", model.family)))?;
    Ok(graph)
}

/// Config keys that change what a model computes, each with the values that leave the math as
/// a family without the feature computes it. A config that sets one to anything else must be
/// read by the model file (a parameter binding it), or it is refused: running such a
/// checkpoint without the feature would be silently wrong.
const MATH_KEYS: &[(&str, &str)] = &[
    (
        "sliding_window",
        "null, or at least max_position_embeddings",
    ),
    ("attention_bias", "false"),
    ("mlp_bias", "false"),
    ("attn_logit_softcapping", "null"),
    ("final_logit_softcapping", "null"),
    ("partial_rotary_factor", "1"),
    ("query_pre_attn_scalar", "null"),
];

fn key_is_neutral(key: &str, v: &serde_json::Value, config: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (key, v) {
        (_, Value::Null) | (_, Value::Bool(false)) => true,
        ("sliding_window", Value::Number(n)) => {
            let disabled = config.get("use_sliding_window") == Some(&Value::Bool(false));
            let context = config
                .get("max_position_embeddings")
                .and_then(Value::as_u64);
            disabled || matches!((n.as_u64(), context), (Some(w), Some(c)) if w >= c)
        }
        ("partial_rotary_factor", Value::Number(n)) => n.as_f64() == Some(1.0),
        _ => false,
    }
}

/// Refuses a config that sets a key of the model file's `requires` to another value, or one of
/// `MATH_KEYS` that the model file does not read (see there), naming the key.
pub fn check_config_keys(model: &ModelFile, config: &serde_json::Value) -> Result<(), BuildError> {
    use crate::model::ast::Param;
    let read: Vec<&str> = model
        .params
        .iter()
        .filter_map(|(_, p)| match p {
            Param::Config(k) | Param::ConfigOr(k, _) => Some(k.as_str()),
            Param::Expr(_) => None,
        })
        .flat_map(|keys| keys.split('|'))
        .filter_map(|k| k.split('.').next())
        .collect();
    // A pre-quantized checkpoint kiln reads (AutoAWQ GEMM, GPTQ) is loaded as it is
    // (`loader::prequant`); transformers' `gguf` marker means the tensors are floats; any other
    // quantization is refused by name.
    crate::loader::prequant::PreQuant::from_config(config).map_err(BuildError::Other)?;
    for (keys, accepted) in &model.requires {
        let Some((key, v)) = crate::model::params::config_value(config, keys) else {
            continue;
        };
        let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        if !accepted.contains(&text) {
            return Err(BuildError::Other(format!(
                "the config sets `{key}` = {v}; the model file `{}` computes {} only",
                model.family,
                accepted.join(" or ")
            )));
        }
    }
    for &(key, neutral) in MATH_KEYS {
        let Some(v) = config.get(key) else { continue };
        if read.contains(&key) || key_is_neutral(key, v, config) {
            continue;
        }
        return Err(BuildError::Other(format!(
            "the config sets `{key}` = {v}, which the model file `{}` does not implement \
             (it handles {neutral}); kiln refuses rather than run the model without it",
            model.family
        )));
    }
    Ok(())
}

/// Checkpoint tensors that are derived buffers, not parameters, and that kiln recomputes from
/// the config: old HF Llama checkpoints saved RoPE's `inv_freq`, GPT-2 checkpoints the causal
/// mask (`h.N.attn.bias`, `[1, 1, n_positions, n_positions]`) and `attn.masked_bias` (a scalar).
fn is_derived_buffer(name: &str, shape: &[usize]) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || (name.ends_with(".attn.bias") && shape.len() == 4)
        || (name.ends_with(".attn.masked_bias") && shape.is_empty())
}

/// Reads a weight the model file names with the model's base prefix (`transformer.h.0.…`,
/// `model.layers.0.…`) from a checkpoint that stores it without (`h.0.…`), as transformers
/// does for a base model's checkpoint: each such weight node is renamed to the checkpoint's
/// name when only the unprefixed one exists.
pub fn resolve_base_prefix(graph: &mut Graph, available: &[(String, Vec<usize>)]) {
    use kiln_runtime::ir::Op;
    let names: std::collections::HashSet<&str> =
        available.iter().map(|(n, _)| n.as_str()).collect();
    for node in &mut graph.nodes {
        if let Op::Weight { name } = &mut node.op {
            if names.contains(name.as_str()) {
                continue;
            }
            if let Some((_, rest)) = name.split_once('.') {
                if names.contains(rest) {
                    *name = rest.to_string();
                }
            }
        }
    }
}

/// The checkpoint tensors the graph does not read (derived buffers aside), sorted.
pub fn unused_weights(graph: &Graph, available: &[(String, Vec<usize>)]) -> Vec<String> {
    let used: std::collections::HashSet<&str> = graph.weights().map(|(_, n)| n).collect();
    let mut unused: Vec<String> = available
        .iter()
        .filter(|(n, s)| !used.contains(n.as_str()) && !is_derived_buffer(n, s))
        .map(|(n, _)| n.clone())
        .collect();
    unused.sort();
    unused
}

/// Refuses a config that asks for scaled RoPE (Llama 3.1's `llama3`, linear, dynamic NTK, YaRN…
/// in `rope_scaling` or transformers 5's `rope_parameters`): kiln computes the unscaled
/// frequencies 1 / theta^(2i/d), and running such a checkpoint with them would be silently wrong.
/// A linear factor of 1 is no scaling and passes.
pub fn check_rope(config: &serde_json::Value) -> Result<(), BuildError> {
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(rope) = config.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let kind = rope
            .get("rope_type")
            .or_else(|| rope.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let factor = rope.get("factor").and_then(|v| v.as_f64()).unwrap_or(1.0);
        let unscaled = kind == "default" || (kind == "linear" && factor == 1.0);
        if !unscaled {
            return Err(BuildError::Other(format!(
                "the config's `{key}` asks for `{kind}` RoPE scaling (factor {factor}); kiln \
                 computes unscaled RoPE only"
            )));
        }
    }
    Ok(())
}

/// Checks that the checkpoint has every weight of the graph with the declared shape.
pub fn check_weights(graph: &Graph, available: &[(String, Vec<usize>)]) -> Result<(), BuildError> {
    let shapes: HashMap<&str, &Vec<usize>> =
        available.iter().map(|(n, s)| (n.as_str(), s)).collect();
    for (id, name) in graph.weights() {
        let want: Vec<usize> = graph.nodes[id]
            .ty
            .shape
            .iter()
            .map(|d| d.as_const().unwrap_or(-1) as usize)
            .collect();
        match shapes.get(name) {
            None => {
                return Err(BuildError::Weight {
                    name: name.into(),
                    message: format!("missing from the checkpoint (expected shape {want:?})"),
                })
            }
            Some(found) if **found != want => {
                return Err(BuildError::Weight {
                    name: name.into(),
                    message: format!("expected shape {want:?}, checkpoint has {found:?}"),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// The token ids that end generation: the config's `eos_token_id` (a number or a list) and the
/// tokenizer's id of the EOS text. An id that is not a token of the vocabulary is an error.
fn stop_ids(
    config: &serde_json::Value,
    tokenizer: Option<&Tokenizer>,
    eos_text: Option<&str>,
    vocab: Option<i64>,
) -> Result<Vec<u32>, BuildError> {
    use serde_json::Value;
    let values: Vec<&Value> = match config.get("eos_token_id") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v) => vec![v],
    };
    let mut ids = Vec::new();
    for v in values {
        let id = v
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .filter(|&i| vocab.is_none_or(|n| i64::from(i) < n))
            .ok_or_else(|| {
                BuildError::Other(format!(
                    "config key `eos_token_id`: {v} is not a token id{}",
                    vocab.map_or(String::new(), |n| format!(
                        " (the vocabulary has {n} tokens)"
                    ))
                ))
            })?;
        ids.push(id);
    }
    if let (Some(t), Some(e)) = (tokenizer, eos_text) {
        ids.extend(t.token_id(e));
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// The context window: the config's `max_position_embeddings` (GGUF `context_length`), or
/// `DEFAULT_CONTEXT` with a note saying so.
fn context_window(config: &serde_json::Value) -> Result<(usize, Option<String>), BuildError> {
    use kiln_runtime::engine::{DEFAULT_CONTEXT, MAX_CONTEXT};
    match crate::model::params::config_value(config, "max_position_embeddings|n_positions|n_ctx")
        .map(|(_, v)| v)
    {
        None => Ok((
            DEFAULT_CONTEXT,
            Some(format!(
                "note: the config gives no `max_position_embeddings`; prompts and generation \
                 are limited to {DEFAULT_CONTEXT} tokens"
            )),
        )),
        Some(v) => v
            .as_u64()
            .and_then(|c| usize::try_from(c).ok())
            .filter(|c| (1..=MAX_CONTEXT).contains(c))
            .map(|c| (c, None))
            .ok_or_else(|| {
                BuildError::Other(format!(
                    "config key `max_position_embeddings`: {v} is not a context length in \
                     1..={MAX_CONTEXT}"
                ))
            }),
    }
}

/// What a build produced.
pub struct BuildReport {
    /// Nodes in the graph.
    pub nodes: usize,
    /// Weight tensors written.
    pub weights: usize,
    /// Parameters (elements) written.
    pub parameters: usize,
    /// What the rewriter did (`None` with `--no-optimize`).
    pub rewrite: Option<RewriteReport>,
    /// GPU engines: how the prefill GEMMs' algorithms were chosen.
    pub gemm_note: Option<String>,
    /// Notes for the user: a defaulted context window, unused tensors kept by `--allow-unused`.
    pub notes: Vec<String>,
}

/// The squared output error of a quantized weight on the calibration sample rows, and that of
/// round-to-nearest in the same format.
fn output_errors(
    w: &[f32],
    p: &quant::Packed,
    stats: &awq::InputStats,
    format: DType,
) -> (f64, f64) {
    let (n, k, m) = (p.rows, p.cols, stats.rows());
    let want = awq::product(&stats.sample, m, w, n, k);
    let err = |wq: &[f32]| -> f64 {
        awq::product(&stats.sample, m, wq, n, k)
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum()
    };
    let rtn = quant::quantize(format, w, n, k).map(|q| err(&q.dequantize()));
    (err(&p.dequantize()), rtn.unwrap_or(f64::NAN))
}

/// Runs the unquantized graph `g0` on the calibration text (AWQ, GPTQ); returns the statistics of every
/// linear input by weight name, and the number of calibration tokens.
fn calibration(
    ckpt: &Checkpoint,
    tokenizer: Option<&Tokenizer>,
    g0: &Graph,
    derived0: &[DerivedWeight],
    opts: &BuildOptions,
) -> Result<(std::collections::BTreeMap<String, awq::InputStats>, usize), BuildError> {
    let tokenizer = tokenizer.ok_or_else(|| {
        BuildError::Other(
            "--quant int4-awq and int4-gptq calibrate: the model runs on text, and the \
             checkpoint has no tokenizer"
                .into(),
        )
    })?;
    let tokens = tokenizer
        .encode(&opts.calibration.text)
        .map_err(|e| BuildError::Other(format!("calibration text: {e}")))?;
    let recipes: HashMap<&str, &DerivedWeight> =
        derived0.iter().map(|d| (d.name.as_str(), d)).collect();
    let load = |name: &str| -> Result<Vec<f32>, ExecError> {
        let read = |source: &str, _: &[usize]| {
            ckpt.read_f32(source).map_err(|e| ExecError::Weight {
                name: source.into(),
                message: e.to_string(),
            })
        };
        match recipes.get(name) {
            Some(d) => evaluate(d, read),
            None => read(name, &[]),
        }
    };
    let exec = kiln_runtime::cpu::CpuExecutor::new(g0.clone(), |name, _| load(name))
        .map_err(|e| BuildError::Other(format!("calibration: {e}")))?;
    let c = &opts.calibration;
    let stats = calibrate::calibrate(g0, &exec, &tokens, c.windows, c.gptq, &|_, _| {})
        .map_err(|e| BuildError::Other(format!("calibration: {e}")))?;
    Ok((stats, tokens.len()))
}

/// Builds an engine from a checkpoint (with `opts.tp` or `opts.pp` above 1, one engine per
/// rank, beside `out`). `progress(done, total)` is called as weights are read.
pub fn build(
    checkpoint: &Path,
    out: &Path,
    opts: &BuildOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<BuildReport, BuildError> {
    let (tp, pp) = (opts.tp, opts.pp);
    if tp == 0 || pp == 0 {
        return Err(BuildError::Other(
            "--tp and --pp count ranks and stages: at least 1".into(),
        ));
    }
    if tp == 1 && pp == 1 {
        return build_rank(checkpoint, out, opts, None, progress);
    }
    if opts.cuda_arch.is_some() {
        return Err(BuildError::Other(
            "--tp and --pp build CPU engines for now (the ranks run on threads with an \
             in-process all-reduce); the NCCL runtime for GPU ranks is not built yet"
                .into(),
        ));
    }
    if opts.quant.is_some() {
        return Err(BuildError::Other(
            "--tp/--pp with --quant is not built yet: build a 16/32-bit parallel engine, or a \
             quantized single-rank one"
                .into(),
        ));
    }
    let ranks = tp
        .checked_mul(pp)
        .filter(|&r| r <= 256)
        .ok_or_else(|| BuildError::Other(format!("--tp {tp} --pp {pp}: at most 256 ranks")))?;
    let mut inputs = vec![checkpoint];
    inputs.extend(opts.model_file.as_deref());
    let paths: Vec<PathBuf> = (0..ranks).map(|r| rank_path(out, r, ranks)).collect();
    for p in &paths {
        crate::output::check_output(p, &inputs).map_err(BuildError::Other)?;
    }
    let mut reports = Vec::with_capacity(paths.len());
    for (r, p) in paths.iter().enumerate() {
        reports.push(build_rank(checkpoint, p, opts, Some(r as u32), progress)?);
    }
    let most = reports.iter().map(|r| r.parameters).max().unwrap_or(0);
    let mut report = reports.swap_remove(0);
    // The other ranks' notes, each once (every rank repeats the checkpoint's).
    for note in reports.iter().flat_map(|r| &r.notes) {
        if !report.notes.contains(note) {
            report.notes.push(note.clone());
        }
    }
    let files: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let flags = match (tp, pp) {
        (_, 1) => format!("--tp {tp}"),
        (1, _) => format!("--pp {pp}"),
        _ => format!("--tp {tp} --pp {pp}"),
    };
    report.notes.push(format!(
        "{ranks} rank engines ({}), at most {:.1}M parameters each; run them with \
         `kiln run {} {flags}`",
        files.join(", "),
        most as f64 / 1e6,
        out.display()
    ));
    Ok(report)
}

/// The id shared by the rank engines of one tensor-parallel build: a hash of the unsharded
/// graph, the config, the group size and the options that change the ranks' graphs.
fn tp_group_id(graph: &Graph, config: &serde_json::Value, opts: &BuildOptions) -> String {
    let options = format!(
        "{} {} {} {} {:?}",
        opts.tp,
        opts.pp,
        opts.dtype.name(),
        opts.no_optimize,
        opts.kv_cache.map(|d| d.name())
    );
    let meta: HashMap<String, String> = [
        ("graph".to_string(), graph.to_ron()),
        ("config".to_string(), config.to_string()),
        ("options".to_string(), options),
    ]
    .into();
    kiln_runtime::engine::checksum(&meta, std::iter::empty())
}

/// Builds one engine: the whole model, or rank `rank` of `opts.tp`.
fn build_rank(
    checkpoint: &Path,
    out: &Path,
    opts: &BuildOptions,
    rank: Option<u32>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<BuildReport, BuildError> {
    let mut inputs = vec![checkpoint];
    inputs.extend(opts.model_file.as_deref());
    crate::output::check_output(out, &inputs).map_err(BuildError::Other)?;
    let ckpt = Checkpoint::open(checkpoint)?;
    let mut notes = Vec::new();
    let prequant_opts = crate::quantize::stored::prequantized_options(&ckpt, opts, &mut notes)?;
    let opts = prequant_opts.as_ref().unwrap_or(opts);
    let model = model_for(&ckpt.config, opts.model_file.as_deref())?;
    let model_name = match &opts.model_file {
        Some(p) => p.display().to_string(),
        None => model_file_name(&ckpt.config),
    };
    let mut graph = graph_for(&model, &ckpt.config)?;
    let available = ckpt.tensors();
    resolve_base_prefix(&mut graph, &available);
    check_weights(&graph, &available)?;
    let unused = unused_weights(&graph, &available);
    if !unused.is_empty() {
        let shown = unused
            .iter()
            .take(8)
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>();
        let list = format!(
            "{}{}",
            shown.join(", "),
            if unused.len() > 8 {
                format!(" and {} more", unused.len() - 8)
            } else {
                String::new()
            }
        );
        if !opts.allow_unused {
            return Err(BuildError::Other(format!(
                "the checkpoint has {} tensor(s) that the model file `{}` does not use: {list}; \
                 the model would run without them (pass --allow-unused to build anyway)",
                unused.len(),
                model.family
            )));
        }
        notes.push(format!("warning: --allow-unused: not using {list}"));
    }
    let vocab = graph.vocab();
    let (max_context, context_note) = context_window(&ckpt.config)?;
    notes.extend(context_note);
    let mut extra = Vec::new();
    let expanded = match rank {
        Some(r) => {
            let info = RankInfo {
                rank: r,
                tp: opts.tp,
                pp: opts.pp,
                group: tp_group_id(&graph, &ckpt.config, opts),
            };
            let (g, pass_notes) = crate::rewrite::parallel::rank_graph(&graph, opts.tp, opts.pp, r)
                .map_err(|e| BuildError::Other(format!("{model_name}: {e}")))?;
            // Each stage's first rank says what the passes did (the ranks of a stage agree).
            if r % opts.tp == 0 {
                notes.extend(pass_notes);
            }
            extra.push((
                kiln_runtime::engine::keys::PARALLEL.to_string(),
                info.to_metadata(),
            ));
            g
        }
        None => graph,
    };
    let expanded = match opts.kv_cache {
        Some(format) => {
            if opts.cuda_arch.is_some() {
                return Err(BuildError::Other(format!(
                    "--kv-cache {}: the GPU attention kernels read a 16-bit cache; an 8-bit \
                     cache runs on the CPU so far (drop --target cuda or --kv-cache)",
                    format.name()
                )));
            }
            crate::rewrite::kv_cache::quantize_kv_cache(&expanded, format)
                .map_err(BuildError::Other)?
        }
        None => expanded,
    };
    let (graph, derived, rewrite) = compile_graph(&expanded, opts)?;
    // A GPU engine: the launch plan and its kernels, compiled before reading any weight so a
    // lowering or NVRTC error fails fast; weights are stored in bf16, but for the tables that the
    // plan reads in f32 (RoPE frequencies).
    let gpu = match &opts.cuda_arch {
        Some(arch) => Some(
            crate::codegen::gpu::gpu_artifacts(&graph, arch).map_err(|e| {
                BuildError::Other(format!("{} (family `{}`): {e}", model_name, model.family))
            })?,
        ),
        None => None,
    };
    let f32_weights = gpu.as_ref().map(|g| g.plan.f32_weights());
    let weight_dtype = |name: &str| match &f32_weights {
        Some(f32s) if !f32s.contains(name) => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    };
    let recipes: HashMap<&str, &DerivedWeight> =
        derived.iter().map(|d| (d.name.as_str(), d)).collect();
    let tokenizer = match &ckpt.tokenizer_json {
        Some(t) => Some(
            Tokenizer::from_json(t).map_err(|e| BuildError::Other(format!("tokenizer: {e}")))?,
        ),
        None => None,
    };
    let generation = GenerationConfig {
        chat_template: ckpt.chat_template.clone(),
        bos_token: ckpt.bos_token.clone(),
        eos_token: ckpt.eos_token.clone(),
        stop_token_ids: stop_ids(
            &ckpt.config,
            tokenizer.as_ref(),
            ckpt.eos_token.as_deref(),
            vocab,
        )?,
        max_context,
    };
    // AWQ: the activations at each linear input, from the graph without quantization.
    let gptq = opts.calibration.gptq;
    if gptq
        && !matches!(
            opts.quant.as_ref().map(|q| q.format),
            Some(DType::Int4 {
                zero_point: true,
                ..
            })
        )
    {
        return Err(BuildError::Other(
            "GPTQ chooses the codes of int4 with zero points: it needs --quant int4-gptq".into(),
        ));
    }
    let calibrated = gptq
        || matches!(
            opts.quant.as_ref().map(|q| q.format),
            Some(DType::Int4Awq { .. })
        );
    let calib_stats = if calibrated {
        let plain = BuildOptions {
            quant: None,
            cuda_arch: None,
            ..opts.clone()
        };
        let (g0, derived0, _) = compile_graph(&expanded, &plain)?;
        let stats = calibration(&ckpt, tokenizer.as_ref(), &g0, &derived0, opts)?;
        notes.push(format!(
            "{}: calibrated on {} window(s) of {} tokens on the CPU executor",
            if gptq { "GPTQ" } else { "AWQ" },
            opts.calibration.windows.min(stats.1 / calibrate::WINDOW),
            calibrate::WINDOW
        ));
        Some(stats.0)
    } else {
        None
    };
    let calib_report = std::sync::Mutex::new(Vec::<(f32, f64, f64)>::new());
    // Weights of a pre-quantized checkpoint quantized again from their values (not a row
    // range or stack of stored weights): said in a note, since that rounds twice.
    let requantized = std::sync::atomic::AtomicUsize::new(0);
    let wanted: Vec<(NodeId, &str)> = graph.weights().collect();
    let total = wanted.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let shape_of = |id: NodeId| -> Vec<usize> {
        graph.nodes[id]
            .ty
            .shape
            .iter()
            .map(|d| d.constant as usize)
            .collect()
    };
    let weights = wanted
        .par_iter()
        .map(|&(id, name)| {
            let shape = shape_of(id);
            let eval = |d: &DerivedWeight| {
                evaluate(d, |source, _| {
                    ckpt.read_f32(source).map_err(|e| ExecError::Weight {
                        name: source.into(),
                        message: e.to_string(),
                    })
                })
                .map_err(|e| BuildError::Weight {
                    name: name.into(),
                    message: format!("evaluating the derived weight: {e}"),
                })
            };
            let quantized = recipes.get(name).and_then(|d| d.quantized_source());
            let tensors = match (quantized, recipes.get(name)) {
                (Some((format, source)), _) => {
                    let data = eval(&source)?;
                    let (rows, cols) = (shape[0], shape[1]);
                    let bad = |message| BuildError::Weight {
                        name: name.into(),
                        message,
                    };
                    let stats = calib_stats
                        .as_ref()
                        .and_then(|s| s.get(source_name(name, format)?));
                    let stored = crate::quantize::stored::stored_packed(&ckpt, &source, format);
                    if stored.is_none() && ckpt.stored_quantization().is_some() {
                        requantized.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let packed = match (format, stats) {
                        _ if stored.is_some() => {
                            stored.expect("checked").map_err(|e| BuildError::Weight {
                                name: name.into(),
                                message: e.to_string(),
                            })?
                        }
                        (DType::Int4Awq { group }, Some(stats)) => {
                            let r = awq::search(&data, rows, cols, group, stats).map_err(bad)?;
                            calib_report.lock().expect("no panic while held").push((
                                r.alpha,
                                r.error,
                                r.rtn_error,
                            ));
                            quant::quantize_awq(&r.weight, rows, cols, group, &r.s).map_err(bad)?
                        }
                        (DType::Int4 { group, .. }, Some(stats)) if gptq => {
                            let p = gptq::gptq(
                                &data,
                                rows,
                                cols,
                                group,
                                &stats.gram,
                                opts.calibration.act_order,
                            )
                            .map_err(bad)?;
                            let (err, rtn) = output_errors(&data, &p, stats, format);
                            calib_report
                                .lock()
                                .expect("no panic while held")
                                .push((0.0, err, rtn));
                            p
                        }
                        _ => quant::quantize(format, &data, rows, cols).map_err(bad)?,
                    };
                    let parts = quant::parts(format, rows, cols).expect("a weight format");
                    parts
                        .into_iter()
                        .zip(packed.to_bytes())
                        .map(|(p, bytes)| EngineTensor {
                            name: format!("{name}{}", p.suffix),
                            dtype: p.dtype,
                            shape: p.shape,
                            bytes,
                        })
                        .collect()
                }
                (None, None) => {
                    let data = ckpt.read_f32(name)?;
                    vec![EngineTensor::weight(name, shape, &data, weight_dtype(name))]
                }
                (None, Some(d)) => {
                    let data = eval(d)?;
                    vec![EngineTensor::weight(name, shape, &data, weight_dtype(name))]
                }
            };
            progress(
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                total,
            );
            Ok(tensors)
        })
        .collect::<Result<Vec<Vec<EngineTensor>>, BuildError>>()?;
    let weights: Vec<EngineTensor> = weights.into_iter().flatten().collect();
    let requantized = requantized.into_inner();
    if requantized > 0 {
        notes.push(format!(
            "{requantized} quantized weight(s) are not a stored weight's rows: quantized again \
             from the checkpoint's dequantized values"
        ));
    }
    if calib_stats.is_some() {
        let r = calib_report.into_inner().expect("no panic while held");
        let (err, rtn): (f64, f64) = r.iter().fold((0.0, 0.0), |(a, b), x| (a + x.1, b + x.2));
        let mean_alpha = r.iter().map(|x| f64::from(x.0)).sum::<f64>() / r.len().max(1) as f64;
        let what = if gptq {
            format!("GPTQ: {} weights", r.len())
        } else {
            format!("AWQ: {} weights searched, mean α {mean_alpha:.2}", r.len())
        };
        notes.push(format!(
            "{what}; squared output error on the calibration rows {:.1}% of \
             round-to-nearest's",
            100.0 * err / rtn.max(f64::MIN_POSITIVE)
        ));
    }
    let parameters = wanted
        .iter()
        .map(|&(id, _)| shape_of(id).iter().product::<usize>())
        .sum();
    let (target, mut tensors, extra_metadata, gemm_note) = match gpu {
        Some(g) => ("cuda", g.tensors, g.metadata, Some(g.gemm_note)),
        None => ("cpu", vec![], vec![], None),
    };
    tensors.extend(weights);
    let mut extra_metadata = extra_metadata;
    extra_metadata.extend(extra);
    let contents = EngineContents {
        family: &model.family,
        config: &ckpt.config,
        graph: &graph,
        tokenizer_json: ckpt.tokenizer_json.as_deref(),
        generation: &generation,
        tensors,
        target,
        extra_metadata,
    };
    write_engine(out, &inputs, &contents).map_err(BuildError::Other)?;
    Ok(BuildReport {
        nodes: graph.nodes.len(),
        weights: total,
        parameters,
        rewrite,
        gemm_note,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scaled_rope_is_refused_and_unscaled_passes() {
        for ok in [
            json!({"rope_theta": 10000.0}),
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
            json!({"rope_scaling": null}),
            json!({"rope_scaling": {"type": "linear", "factor": 1.0}}),
        ] {
            assert!(check_rope(&ok).is_ok(), "{ok}");
        }
        let llama31 = json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
            "rope_theta": 5e5, "low_freq_factor": 1.0, "high_freq_factor": 4.0}});
        let err = check_rope(&llama31).unwrap_err().to_string();
        assert!(err.contains("`llama3` RoPE scaling"), "{err}");
        let gguf_linear =
            json!({"rope_scaling": {"rope_type": "linear", "type": "linear", "factor": 4.0}});
        assert!(check_rope(&gguf_linear).is_err());
    }
}
