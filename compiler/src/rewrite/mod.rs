//! The rewriter: finds the fusions TensorRT-LLM hand-codes in a model written as plain math, and
//! lowers precision, with `egg` e-graphs.
//!
//! `optimize` runs the phases of [`phases::standard`] — each one graph → e-graph → bounded
//! saturation → DAG extraction (cost model in [`cost`], extractor in [`extract`]) → graph,
//! verified ([`verify`]) — then folds the weight-only subgraphs into derived weights
//! ([`derive`]) and reports what happened ([`report`]). See `docs/rewriter.md`.
//!
//! - [`lang`]: the e-graph language (every op, leaves, attributes, helper nodes);
//! - [`analysis`]: shape, dtype and constness per e-class; merging disagreeing classes panics;
//! - [`ops`]: op ↔ e-node; [`convert`]: graph ↔ e-graph, names;
//! - [`rules`]: one rule set per file.

pub mod analysis;
pub mod convert;
pub mod cost;
pub mod derive;
pub mod extract;
pub mod kv_cache;
pub mod lang;
pub mod ops;
pub mod parallel;
pub mod phases;
pub mod pipeline;
pub mod report;
pub mod rules;
pub mod shard;
pub mod verify;

#[cfg(test)]
mod tests;

use derive::{fold_weights, DerivedWeight};
use kiln_runtime::ir::{DType, Graph};
use phases::Phase;
use report::RewriteReport;
use std::time::Instant;

/// Why rewriting failed; messages name the phase and the node.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// The input graph does not verify.
    #[error("the model graph does not verify: {0}")]
    Input(#[from] verify::VerifyError),
    /// A phase failed (unsound rewrite, extraction error, or a graph that fails verification).
    #[error("rewrite phase `{phase}`: {message}")]
    Phase {
        /// Phase name.
        phase: String,
        /// What went wrong, naming the node.
        message: String,
    },
    /// Options the rewriter cannot honour.
    #[error("{0}")]
    Options(String),
}

/// Options of the rewriter.
#[derive(Clone, Debug)]
pub struct RewriteOptions {
    /// Compute precision: `F32`, or `BF16`/`F16` (precision lowering).
    pub dtype: DType,
    /// Report type conflicts as errors instead of panicking (see `analysis.rs`).
    pub permissive: bool,
    /// Store linear weights in a weight format (`kiln build --quant`; `rules/quant.rs`).
    pub quant: Option<rules::quant::QuantOptions>,
}

impl Default for RewriteOptions {
    fn default() -> Self {
        RewriteOptions {
            dtype: DType::F32,
            permissive: false,
            quant: None,
        }
    }
}

/// The result of rewriting.
#[derive(Clone, Debug)]
pub struct Optimized {
    /// The rewritten graph as extracted, weight-only subgraphs still in place (the "optimized"
    /// stage of `kiln inspect`).
    pub optimized: Graph,
    /// The final graph: weight-only subgraphs folded into derived weights (the engine's graph).
    pub graph: Graph,
    /// The derived weights the final graph reads.
    pub derived: Vec<DerivedWeight>,
    /// What happened.
    pub report: RewriteReport,
}

/// Rewrites `graph` with the standard phases.
pub fn optimize(graph: &Graph, opts: &RewriteOptions) -> Result<Optimized, RewriteError> {
    if !matches!(opts.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(RewriteError::Options(format!(
            "cannot compute in {}: use f32, bf16 or f16",
            opts.dtype.name()
        )));
    }
    if let Some(q) = &opts.quant {
        if !q.format.is_weight_format() {
            return Err(RewriteError::Options(format!(
                "{} is not a weight format: use int8, int4g32/64/128 or int4g32/64/128z",
                q.format.name()
            )));
        }
    }
    optimize_with(
        graph,
        phases::standard(opts.dtype, opts.quant.as_ref()),
        opts,
    )
}

/// Rewrites `graph` with the given phases (tests use small rule sets).
pub fn optimize_with(
    graph: &Graph,
    phases: Vec<Phase>,
    opts: &RewriteOptions,
) -> Result<Optimized, RewriteError> {
    let t0 = Instant::now();
    verify::verify(graph, graph)?;
    let mut g = graph.clone();
    let mut reports = Vec::new();
    for phase in &phases {
        if phase.name == "precision" {
            g = phases::retype_states(&g, opts.dtype)?;
        }
        let (out, report) = phases::run(&g, phase, graph, opts.permissive)?;
        g = out;
        reports.push(report);
    }
    let (folded, derived) = fold_weights(&g);
    verify::verify(&folded, graph).map_err(|e| RewriteError::Phase {
        phase: "fold-weights".into(),
        message: e.to_string(),
    })?;
    let report = RewriteReport {
        phases: reports,
        cost_before: cost::graph_cost(graph).total.into(),
        cost_after: cost::graph_cost(&folded).total.into(),
        derived_weights: derived.iter().map(|d| d.name.clone()).collect(),
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    Ok(Optimized {
        optimized: g,
        graph: folded,
        derived,
        report,
    })
}
