//! Weight quantization (`kiln build --quant`): the weight of each linear op may be stored in a
//! weight format (`int8`, `int4g128`, …; `runtime/src/quant.rs`) and dequantized as the op
//! reads it.
//!
//! - `quantize-linear`, `quantize-linear-add`, `quantize-linear-bias`, `quantize-gated-mlp`:
//!   `(linear ?x ?w) → (linear ?x (cast ?w dtype:F))` when `?w` is a build-time constant float
//!   `[n, k]` matrix and no checkpoint weight it is computed from matches a skip pattern. Like
//!   the precision rules this is a policy, not an equality ("these weights may lose precision"),
//!   and the analysis checks it like any rule: the op's type is unchanged, since the output
//!   keeps the activation's dtype. Extraction then takes the quantized form because its weight
//!   moves fewer bytes. The cast is a weight-only node: the weight folding step turns it into a
//!   derived weight (`int8(model.layers.0.mlp.down_proj.weight)`) that the build packs.
//!
//! Skip patterns match dot-separated components of a checkpoint name: `lm_head` matches
//! `lm_head.weight`, `output` matches GGUF's `output.weight` but not `blk.0.attn_output.weight`,
//! `layers.0` matches every weight of layer 0. By default the output projection stays in 16
//! bits ([`DEFAULT_SKIP`]: HF, GGUF and GPT-2 spellings, and the embedding a tied head reads),
//! as TensorRT-LLM and llama.cpp keep it.

use super::guards::{data, ty};
use super::{var, Rule};
use crate::rewrite::analysis::KilnGraph;
use crate::rewrite::lang::Node;
use crate::rule;
use egg::{Id, Subst};
use kiln_runtime::ir::DType;
use std::collections::HashSet;

/// What `kiln build --quant` asks for: a weight format and the weights to keep as they are.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantOptions {
    /// The weight format (`DType::Int8` or `DType::Int4 { .. }`).
    pub format: DType,
    /// Skip patterns (see the module doc).
    pub skip: Vec<String>,
}

/// The weights kept in 16 bits unless `--quant-skip` says otherwise: the output projection
/// (`lm_head`, GGUF `output`) and the token embedding a tied output projection reads.
pub const DEFAULT_SKIP: [&str; 5] = ["lm_head", "output", "embed_tokens", "token_embd", "wte"];

/// True if the skip pattern `pat` matches the checkpoint name `name` (a run of whole
/// dot-separated components).
pub fn skip_matches(pat: &str, name: &str) -> bool {
    let p: Vec<&str> = pat.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    !pat.is_empty() && n.windows(p.len()).any(|w| w == p.as_slice())
}

/// The checkpoint weights an e-class is computed from (through its weight-only nodes).
fn weight_names(eg: &KilnGraph, id: Id, seen: &mut HashSet<Id>, out: &mut Vec<String>) {
    let id = eg.find(id);
    if !seen.insert(id) || seen.len() > 64 {
        return;
    }
    for n in &eg[id].nodes {
        match n {
            Node::Weight(w) => out.push(w.0.to_string()),
            Node::Attr(_) | Node::Const(_) | Node::Input(_) => {}
            other => {
                for &c in egg::Language::children(other) {
                    weight_names(eg, c, seen, out);
                }
            }
        }
    }
}

/// `w` is a constant float `[n, k]` matrix, none of whose checkpoint weights is skipped.
fn quantizable(w: &str, skip: Vec<String>) -> impl Fn(&KilnGraph, &Subst) -> bool + Send + Sync {
    let w = var(w);
    move |eg, s| {
        let ok = data(eg, s, w).tensor().is_some_and(|t| t.konst)
            && ty(eg, s, w).is_some_and(|t| t.dtype.is_float() && t.rank() == 2);
        if !ok {
            return false;
        }
        let mut names = Vec::new();
        weight_names(eg, s[w], &mut HashSet::new(), &mut names);
        !names.is_empty()
            && !names
                .iter()
                .any(|n| skip.iter().any(|p| skip_matches(p, n)))
    }
}

/// The rules storing linear weights as `q.format`.
#[rustfmt::skip]
pub fn rules(q: &QuantOptions) -> Vec<Rule> {
    let f = q.format.name();
    let ok = || quantizable("?w", q.skip.clone());
    vec![
        rule!("quantize-linear";      "(linear ?x ?w)"         => (format!("(linear ?x (cast ?w dtype:{f}))"))         if ok()),
        rule!("quantize-linear-add";  "(linear_add ?x ?w ?r)"  => (format!("(linear_add ?x (cast ?w dtype:{f}) ?r)"))  if ok()),
        rule!("quantize-linear-bias"; "(linear_bias ?x ?w ?b)" => (format!("(linear_bias ?x (cast ?w dtype:{f}) ?b)")) if ok()),
        rule!("quantize-gated-mlp";   "(gated_mlp ?x ?w)"      => (format!("(gated_mlp ?x (cast ?w dtype:{f}))"))      if ok()),
        rule!("quantize-gated-gelu";  "(gated_gelu ?x ?w)"     => (format!("(gated_gelu ?x (cast ?w dtype:{f}))"))     if ok()),
    ]
}

#[cfg(test)]
mod tests {
    use super::skip_matches;

    #[test]
    fn skip_patterns_match_whole_components() {
        assert!(skip_matches("lm_head", "lm_head.weight"));
        assert!(skip_matches("output", "output.weight"));
        assert!(!skip_matches("output", "blk.0.attn_output.weight"));
        assert!(skip_matches("embed_tokens", "model.embed_tokens.weight"));
        assert!(skip_matches(
            "layers.0",
            "model.layers.0.mlp.up_proj.weight"
        ));
        assert!(!skip_matches(
            "layers.0",
            "model.layers.10.mlp.up_proj.weight"
        ));
        assert!(!skip_matches("", "x.weight"));
    }
}
