//! The optimized Llama decoder layer: its snapshot for a GQA config, the kernel count, the names
//! that taps rely on, and determinism.

use super::{llama, smollm2_config, tiny_config, verified};
use crate::graph::print::text;
use crate::rewrite::report::layer_stats;
use crate::rewrite::{optimize, RewriteOptions};
use kiln_runtime::ir::{DType, Op};

/// A GQA config (8 query heads over 2 KV heads), two layers.
fn gqa() -> serde_json::Value {
    tiny_config(64, 2, 8, 2, 8, 160, 96, false)
}

#[test]
fn optimized_gqa_decoder_layer() {
    let g = llama(&gqa());
    let out = optimize(&g, &RewriteOptions::default()).unwrap();
    verified(&out.optimized, &g);
    verified(&out.graph, &g);
    let stats = layer_stats(&out.graph, "layers.1.");
    let snapshot = format!(
        "kernels per layer: {} ({:?})\nviews: {}, cache appends: {}\n\n{}",
        stats.kernels,
        stats.kernel_ops,
        stats.views,
        stats.cache_appends,
        text(&out.graph, Some("layers.1."))
    );
    insta::assert_snapshot!("llama_gqa_layer", snapshot);
}

#[test]
fn optimized_gqa_decoder_layer_bf16() {
    let g = llama(&gqa());
    let opts = RewriteOptions {
        dtype: DType::BF16,
        ..RewriteOptions::default()
    };
    let out = optimize(&g, &opts).unwrap();
    verified(&out.graph, &g);
    let stats = layer_stats(&out.graph, "layers.1.");
    assert_eq!(stats.kernels, 9, "{stats:?}");
    insta::assert_snapshot!("llama_gqa_layer_bf16", text(&out.graph, Some("layers.1.")));
}

#[test]
fn smollm2_layers_fuse_to_nine_kernels_and_keep_tap_names() {
    let g = llama(&smollm2_config());
    let out = optimize(&g, &RewriteOptions::default()).unwrap();
    verified(&out.graph, &g);
    for layer in 0..30 {
        let stats = layer_stats(&out.graph, &format!("layers.{layer}."));
        assert_eq!(stats.kernels, 9, "layer {layer}: {stats:?}");
        assert_eq!(stats.cache_appends, 2, "layer {layer}: {stats:?}");
    }
    // The names the reference tests tap, and the state bindings onto cache appends.
    for name in [
        "x",
        "layers.0.x",
        "layers.14.x",
        "final",
        "layers.3.h",
        "layers.3.x_attn",
    ] {
        assert!(out.graph.find(name).is_some(), "`{name}` is gone");
    }
    for s in &out.graph.states {
        let u = &out.graph.nodes[s.update];
        assert!(matches!(u.op, Op::Concat { axis: 2 }) && u.inputs[0] == s.input);
    }
    // Every QKV and gate/up concatenation became a derived weight, and the RoPE frequencies.
    assert_eq!(out.derived.len(), 61);
}

#[test]
fn rewriting_is_deterministic() {
    let g = llama(&tiny_config(48, 3, 6, 3, 8, 80, 64, true));
    for dtype in [DType::F32, DType::BF16] {
        let opts = RewriteOptions {
            dtype,
            ..RewriteOptions::default()
        };
        let a = optimize(&g, &opts).unwrap();
        let b = optimize(&g, &opts).unwrap();
        assert_eq!(a.graph.to_ron(), b.graph.to_ron());
        assert_eq!(a.derived, b.derived);
    }
}

/// `--kv-cache int8`: each layer's two cache appends read their new entries through `KvQuant`
/// (pinned here with the rest of the optimized layer).
#[test]
fn optimized_gqa_decoder_layer_int8_kv_cache() {
    let g = llama(&gqa());
    let q = crate::rewrite::kv_cache::quantize_kv_cache(&g, DType::Int8).unwrap();
    let out = optimize(&q, &RewriteOptions::default()).unwrap();
    verified(&out.graph, &q);
    let kv = out
        .graph
        .nodes
        .iter()
        .filter(|n| n.name.starts_with("layers.1.") && matches!(n.op, Op::KvQuant { .. }))
        .count();
    assert_eq!(kv, 2);
    insta::assert_snapshot!(
        "llama_gqa_layer_int8_kv_cache",
        text(&out.graph, Some("layers.1."))
    );
}
