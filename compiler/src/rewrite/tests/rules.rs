//! One snapshot per rule, each on a minimal graph written in the model language: the graph before,
//! the rules that fired, and the graph after (verified first). Every rule of every set must
//! appear in some case's fired list (`every_rule_has_a_case`).

use super::{model, verified};
use crate::graph::print::text;
use crate::rewrite::phases::standard;
use crate::rewrite::rules::quant::QuantOptions;
use crate::rewrite::{optimize, RewriteOptions};
use kiln_runtime::ir::{DType, Op};
use std::collections::BTreeSet;

/// A minimal model: `x [batch, seq, h]` from an embedding, then `body` (which may use `h`).
/// Cases of precision lowering use `h = 4096`: lowering is chosen by cost, and only pays where
/// weights dominate the traffic.
fn minimal(body: &str, h: usize) -> String {
    format!(
        r#"Model(family: "t", params: [("h", Expr("{h}"))], body: [
            Let("tokens", Tokens),
            Let("pos", Positions),
            Let("embed", Weight("embed", ["16", "h"])),
            Let("x", Gather("embed", "tokens")),
            {body}
        ])"#
    )
}

const LINEAR: &str = r#"
    Let("w", Weight("w", ["h", "h"])),
    Let("wt", Transpose(x: "w", perm: [1, 0])),
    Let("y", MatMul("x", "wt")),"#;

const RMS: &str = r#"
    Let("g", Weight("g", ["h"])),
    Let("sq", Mul("x", "x")),
    Let("ms", Mean(x: "sq", axis: -1)),
    Let("eps", Const("1e-5")),
    Let("var", Add("ms", "eps")),"#;

/// `q_t`/`k_t` `[batch, 2, seq, 4]` from `x`, and the RoPE tables of `models/llama.ron`.
const HEADS: &str = r#"
    Let("q_h", Reshape(x: "x", shape: ["batch", "seq", "2", "h / 2"])),
    Let("q_t", Transpose(x: "q_h", perm: [0, 2, 1, 3])),
    Let("half_iota", Iota("h / 4")),
    Let("half_idx", Cast(x: "half_iota", dtype: F32)),
    Let("two", Const("2")),
    Let("even_idx", Mul("half_idx", "two")),
    Let("dim", Const("h / 2")),
    Let("expo", Div("even_idx", "dim")),
    Let("base", Const("10000")),
    Let("theta_pow", Pow("base", "expo")),
    Let("inv_freq", Recip("theta_pow")),
    Let("pos_f", Cast(x: "pos", dtype: F32)),
    Let("pos_col", Reshape(x: "pos_f", shape: ["seq", "1"])),
    Let("freqs", Mul("pos_col", "inv_freq")),
    Let("angles", Concat(xs: ["freqs", "freqs"], axis: -1)),
    Let("cos", Cos("angles")),
    Let("sin", Sin("angles")),
    Let("x1", Slice(x: "q_t", axis: -1, start: "0", end: "h / 4")),
    Let("x2", Slice(x: "q_t", axis: -1, start: "h / 4", end: "h / 2")),
    Let("nx2", Neg("x2")),
    Let("rot", Concat(xs: ["nx2", "x1"], axis: -1)),
    Let("xc", Mul("q_t", "cos")),
    Let("rs", Mul("rot", "sin")),
    Let("q", Add("xc", "rs")),"#;

/// Grouped-query attention of 2 query heads over 1 KV head, with a cache, as llama.ron writes it.
const ATTENTION: &str = r#"
    Let("q_h", Reshape(x: "x", shape: ["batch", "seq", "2", "h / 2"])),
    Let("q", Transpose(x: "q_h", perm: [0, 2, 1, 3])),
    Let("wk", Weight("wk", ["h / 2", "h"])),
    Let("wkt", Transpose(x: "wk", perm: [1, 0])),
    Let("k_flat", MatMul("x", "wkt")),
    Let("k_h", Reshape(x: "k_flat", shape: ["batch", "seq", "1", "h / 2"])),
    Let("k_new", Transpose(x: "k_h", perm: [0, 2, 1, 3])),
    Let("k_cache", State(["batch", "1", "past", "h / 2"])),
    Let("k", Concat(xs: ["k_cache", "k_new"], axis: 2)),
    Update("k_cache", "k"),
    Let("key_pos", Iota("past + seq")),
    Let("query_pos", Reshape(x: "pos", shape: ["seq", "1"])),
    Let("future", Greater("key_pos", "query_pos")),
    Let("neg_inf", Const("-inf")),
    Let("zero", Const("0")),
    Let("mask", Where("future", "neg_inf", "zero")),
    Let("scale", Const("1 / sqrt(h / 2)")),
    Let("qg", Reshape(x: "q", shape: ["batch", "1", "2", "seq", "h / 2"])),
    Let("kg", Reshape(x: "k", shape: ["batch", "1", "1", "past + seq", "h / 2"])),
    Let("kt", Transpose(x: "kg", perm: [0, 1, 2, 4, 3])),
    Let("s_raw", MatMul("qg", "kt")),
    Let("s_scaled", Mul("s_raw", "scale")),
    Let("scores", Add("s_scaled", "mask")),
    Let("probs", Softmax(x: "scores", axis: -1)),
    Let("ctx_g", MatMul("probs", "kg")),
    Let("ctx", Reshape(x: "ctx_g", shape: ["batch", "2", "seq", "h / 2"])),"#;

/// [`ATTENTION`] with Mistral's sliding window of 3 keys (as `models/llama.ron` writes it).
fn windowed_attention() -> String {
    ATTENTION.replace(
        r#"Let("mask", Where("future", "neg_inf", "zero")),"#,
        r#"Let("causal", Where("future", "neg_inf", "zero")),
    Let("key_f", Cast(x: "key_pos", dtype: F32)),
    Let("query_f", Cast(x: "query_pos", dtype: F32)),
    Let("lag", Sub("query_f", "key_f")),
    Let("last_seen", Const("2")),
    Let("too_old", Greater("lag", "last_seen")),
    Let("mask", Where("too_old", "neg_inf", "causal")),"#,
    )
}

/// `out = cap · (2σ(2x/cap) − 1)`, Gemma-2's `cap · tanh(x / cap)` as `models/gemma2.ron`
/// writes it.
fn softcap_lets(x: &str, cap: &str, out: &str) -> String {
    format!(
        r#"Let("cap", Const("{cap}")),
    Let("cz", Div("{x}", "cap")),
    Let("ctwo", Const("2")),
    Let("cz2", Mul("cz", "ctwo")),
    Let("cnz2", Neg("cz2")),
    Let("ce", Exp("cnz2")),
    Let("cone", Const("1")),
    Let("cden", Add("ce", "cone")),
    Let("csig", Recip("cden")),
    Let("csig2", Mul("csig", "ctwo")),
    Let("ct", Sub("csig2", "cone")),
    Let("{out}", Mul("ct", "cap")),"#
    )
}

/// `body` (an [`ATTENTION`]) with Gemma-2's soft-capped scores, cap 1.5.
fn softcapped(body: &str) -> String {
    body.replace(
        r#"Let("scores", Add("s_scaled", "mask")),"#,
        &format!(
            r#"{}
    Let("scores", Add("capped", "mask")),"#,
            softcap_lets("s_scaled", "1.5", "capped")
        ),
    )
}

/// `g`, `u`: the gate and up products of `x`, for the gated MLPs below.
const GATE_UP: &str = r#"
    Let("wg", Weight("wg", ["3 * h / 2", "h"])),
    Let("wu", Weight("wu", ["3 * h / 2", "h"])),
    Let("wgt", Transpose(x: "wg", perm: [1, 0])),
    Let("wut", Transpose(x: "wu", perm: [1, 0])),
    Let("g", MatMul("x", "wgt")),
    Let("u", MatMul("x", "wut")),"#;

/// The SiLU-gated MLP: `g · σ(g) · u`.
const SILU: &str = r#"
    Let("ng", Neg("g")),
    Let("e", Exp("ng")),
    Let("one", Const("1")),
    Let("den", Add("e", "one")),
    Let("sig", Recip("den")),
    Let("silu", Mul("g", "sig")),
    Let("act", Mul("silu", "u")),"#;

/// Gemma's GeGLU as `models/gemma.ron` writes it: `g · σ(2√(2/π)·(g + 0.044715·g³)) · u`.
const GELU: &str = r#"
    Let("g2", Mul("g", "g")),
    Let("g3", Mul("g2", "g")),
    Let("c", Const("0.044715")),
    Let("cg3", Mul("c", "g3")),
    Let("inner", Add("g", "cg3")),
    Let("k", Const("2 * sqrt(2 / 3.141592653589793)")),
    Let("z", Mul("k", "inner")),
    Let("nz", Neg("z")),
    Let("e", Exp("nz")),
    Let("one", Const("1")),
    Let("den", Add("e", "one")),
    Let("sig", Recip("den")),
    Let("gelu", Mul("g", "sig")),
    Let("act", Mul("gelu", "u")),"#;

/// GPT-2's LayerNorm of `x` as `models/gpt2.ron` writes it, into `y`.
const LAYER_NORM: &str = r#"
    Let("g", Weight("g", ["h"])),
    Let("b", Weight("b", ["h"])),
    Let("mu", Mean(x: "x", axis: -1)),
    Let("xc", Sub("x", "mu")),
    Let("sq", Mul("xc", "xc")),
    Let("var", Mean(x: "sq", axis: -1)),
    Let("eps", Const("1e-5")),
    Let("var_eps", Add("var", "eps")),
    Let("inv", Rsqrt("var_eps")),
    Let("xn", Mul("xc", "inv")),
    Let("scaled", Mul("xn", "g")),
    Let("y", Add("scaled", "b")),"#;

/// GPT-2's Conv1D projection `g = x · w + bw` (`w` stored `[in, out]`).
const CONV1D: &str = r#"
    Let("w", Weight("w", ["h", "h"])),
    Let("bw", Weight("bw", ["h"])),
    Let("xw", MatMul("x", "w")),
    Let("g", Add("xw", "bw")),"#;

/// GPT-2's MLP activation: GELU (tanh approximation, sigmoid form) of a Conv1D projection `g`,
/// not gated, into `gelu`.
fn gelu_of_conv1d() -> String {
    format!(
        "{CONV1D} {}",
        GELU.replace(r#"Let("act", Mul("gelu", "u")),"#, "")
    )
}

const QKV: &str = r#"
    Let("wq", Weight("wq", ["h", "h"])),
    Let("wk", Weight("wk", ["h / 2", "h"])),
    Let("wv", Weight("wv", ["h / 2", "h"])),
    Let("wqt", Transpose(x: "wq", perm: [1, 0])),
    Let("wkt", Transpose(x: "wk", perm: [1, 0])),
    Let("wvt", Transpose(x: "wv", perm: [1, 0])),
    Let("q", MatMul("x", "wqt")),
    Let("k", MatMul("x", "wkt")),
    Let("v", MatMul("x", "wvt")),
    Output("q", "q"),
    Output("k", "k"),
    Output("v", "v"),"#;

/// Qwen2's q/k/v: three projections of `x`, each plus its bias.
const QKV_BIAS: &str = r#"
    Let("wq", Weight("wq", ["h", "h"])),
    Let("wk", Weight("wk", ["h / 2", "h"])),
    Let("wv", Weight("wv", ["h / 2", "h"])),
    Let("bq", Weight("bq", ["h"])),
    Let("bk", Weight("bk", ["h / 2"])),
    Let("bv", Weight("bv", ["h / 2"])),
    Let("wqt", Transpose(x: "wq", perm: [1, 0])),
    Let("wkt", Transpose(x: "wk", perm: [1, 0])),
    Let("wvt", Transpose(x: "wv", perm: [1, 0])),
    Let("pq", MatMul("x", "wqt")),
    Let("pk", MatMul("x", "wkt")),
    Let("pv", MatMul("x", "wvt")),
    Let("q", Add("pq", "bq")),
    Let("k", Add("bk", "pk")),
    Let("v", Add("pv", "bv")),
    Output("q", "q"),
    Output("k", "k"),
    Output("v", "v"),"#;

/// A projection of `v` (`[batch, seq, cols]`) by a weight `[h, cols]`, as the output.
fn project(v: &str, cols: &str) -> String {
    format!(
        r#"Let("wo", Weight("wo", ["h", "{cols}"])),
        Let("wot", Transpose(x: "wo", perm: [1, 0])),
        Let("out", MatMul("{v}", "wot")),
        Output("out", "out"),"#
    )
}

/// `[batch, 2, seq, h/2]` heads `v` merged back to `[batch, seq, h]` and projected.
fn merge_heads(v: &str) -> String {
    format!(
        r#"Let("m_t", Transpose(x: "{v}", perm: [0, 2, 1, 3])),
        Let("merged", Reshape(x: "m_t", shape: ["batch", "seq", "h"])),
        {}"#,
        project("merged", "h")
    )
}

/// (snapshot name, rule that must fire, model body, hidden size, compute dtype)
#[rustfmt::skip]
fn cases() -> Vec<(&'static str, &'static str, String, usize, DType)> {
    let (f32, bf16) = (DType::F32, DType::BF16);
    let norm = r#"Let("inv", Rsqrt("var")), Let("xn", Mul("x", "inv")), Let("y", Mul("xn", "g")),"#;
    let second = r#"Let("w2", Weight("w2", ["h", "h"])), Let("w2t", Transpose(x: "w2", perm: [1, 0])), Let("y2", MatMul("x", "w2t")),"#;
    vec![
        ("linear_from_matmul", "linear-from-matmul", format!(r#"{LINEAR} Output("y", "y"),"#), 8, f32),
        ("linear_add_residual_right", "linear-add-residual-right", format!(r#"{LINEAR} Let("z", Add("x", "y")), Output("z", "z"),"#), 8, f32),
        ("linear_add_residual_left", "linear-add-residual-left", format!(r#"{LINEAR} Let("z", Add("y", "x")), Output("z", "z"),"#), 8, f32),
        ("fuse_rmsnorm", "fuse-rmsnorm", format!(r#"{RMS} {norm} Output("y", "y"),"#), 8, f32),
        ("fuse_rmsnorm_weight_first", "fuse-rmsnorm-weight-first", format!(r#"{RMS} Let("inv", Rsqrt("var")), Let("xn", Mul("x", "inv")), Let("y", Mul("g", "xn")), Output("y", "y"),"#), 8, f32),
        ("fuse_rmsnorm_div_sqrt", "fuse-rmsnorm-div-sqrt", format!(r#"{RMS} Let("sd", Sqrt("var")), Let("xn", Div("x", "sd")), Let("y", Mul("xn", "g")), Output("y", "y"),"#), 8, f32),
        ("rope_angles", "rope-angles", format!(r#"{HEADS} Output("q", "q"),"#), 8, f32),
        ("fuse_rope", "fuse-rope", format!(r#"{HEADS} Output("q", "q"),"#), 8, f32),
        ("causal_mask", "causal-mask", format!(r#"{ATTENTION} Output("ctx", "ctx"),"#), 8, f32),
        ("fuse_attention", "fuse-attention", format!(r#"{ATTENTION} Output("ctx", "ctx"),"#), 8, f32),
        ("window_mask", "window-mask", format!(r#"{} Output("ctx", "ctx"),"#, windowed_attention()), 8, f32),
        ("fuse_attention_window", "fuse-attention-window", format!(r#"{} Output("ctx", "ctx"),"#, windowed_attention()), 8, f32),
        ("softcap", "softcap", format!(r#"{} Output("ctx", "ctx"),"#, softcapped(ATTENTION)), 8, f32),
        ("fuse_layernorm", "fuse-layernorm", format!(r#"{LAYER_NORM} Output("y", "y"),"#), 8, f32),
        ("linear_from_matmul_in_out", "linear-from-matmul-in-out", format!(r#"{CONV1D} Output("g", "g"),"#), 8, f32),
        ("gelu_tanh", "gelu-tanh-from-sigmoid", format!(r#"{} Output("gelu", "gelu"),"#, gelu_of_conv1d()), 8, f32),
        ("softcap_logits", "softcap", format!(r#"{LINEAR} {} Output("capped", "capped"),"#, softcap_lets("y", "30", "capped")), 8, f32),
        ("fuse_attention_softcap", "fuse-attention-softcap", format!(r#"{} Output("ctx", "ctx"),"#, softcapped(ATTENTION)), 8, f32),
        ("fuse_attention_window_softcap", "fuse-attention-window-softcap", format!(r#"{} Output("ctx", "ctx"),"#, softcapped(&windowed_attention())), 8, f32),
        ("silu_from_sigmoid", "silu-from-sigmoid", format!(r#"{GATE_UP}{SILU} Output("act", "act"),"#), 8, f32),
        ("fuse_gated_mlp", "fuse-gated-mlp", format!(r#"{GATE_UP}{SILU} Output("act", "act"),"#), 8, f32),
        ("gelu_tanh_from_sigmoid", "gelu-tanh-from-sigmoid", format!(r#"{GATE_UP}{GELU} Output("act", "act"),"#), 8, f32),
        ("fuse_gated_gelu", "fuse-gated-gelu", format!(r#"{GATE_UP}{GELU} Output("act", "act"),"#), 8, f32),
        ("fuse_qkv", "fuse-qkv", QKV.to_string(), 8, f32),
        ("linear_bias_left", "linear-bias-left", QKV_BIAS.to_string(), 8, f32),
        ("linear_bias_right", "linear-bias-right", QKV_BIAS.to_string(), 8, f32),
        ("fuse_qkv_bias", "fuse-qkv-bias", QKV_BIAS.to_string(), 8, f32),
        ("lower_linear_bias", "lower-linear-bias", QKV_BIAS.to_string(), 4096, bf16),
        ("transpose_involution", "transpose-involution", r#"Let("a", Transpose(x: "x", perm: [0, 2, 1])), Let("b", Transpose(x: "a", perm: [0, 2, 1])), Let("y", Neg("b")), Output("y", "y"),"#.into(), 8, f32),
        ("reshape_identity", "reshape-identity", r#"Let("a", Reshape(x: "x", shape: ["batch", "seq", "h"])), Let("y", Neg("a")), Output("y", "y"),"#.into(), 8, f32),
        ("reshape_reshape", "reshape-reshape", r#"Let("a", Reshape(x: "x", shape: ["batch", "seq", "2", "h / 2"])), Let("b", Reshape(x: "a", shape: ["batch", "seq", "4", "2"])), Let("y", Neg("b")), Output("y", "y"),"#.into(), 8, f32),
        ("slice_full", "slice-full", r#"Let("a", Slice(x: "x", axis: -1, start: "0", end: "h")), Let("y", Neg("a")), Output("y", "y"),"#.into(), 8, f32),
        ("cast_identity", "cast-identity", r#"Let("a", Cast(x: "x", dtype: F32)), Let("y", Neg("a")), Output("y", "y"),"#.into(), 8, f32),
        ("lower_linear", "lower-linear", format!(r#"{LINEAR} Output("y", "y"),"#), 4096, bf16),
        ("lower_linear_add", "lower-linear-add", format!(r#"{LINEAR} Let("z", Add("x", "y")), Output("z", "z"),"#), 4096, bf16),
        ("lower_gated_mlp", "lower-gated-mlp", format!(r#"{GATE_UP}{SILU} Output("act", "act"),"#), 4096, bf16),
        ("lower_gated_gelu", "lower-gated-gelu", format!(r#"{GATE_UP}{GELU} Output("act", "act"),"#), 4096, bf16),
        ("lower_rmsnorm", "lower-rmsnorm", format!("{RMS} {norm} {}", project("y", "h")), 4096, bf16),
        ("lower_rope", "lower-rope", format!("{HEADS} {}", merge_heads("q")), 4096, bf16),
        ("lower_attention", "lower-attention", format!("{ATTENTION} {}", merge_heads("ctx")), 4096, bf16),
        ("lower_gather", "lower-gather", project("x", "h"), 4096, bf16),
        ("lower_layer_norm", "lower-layer-norm", format!("{LAYER_NORM} {}", project("y", "h")), 4096, bf16),
        ("lower_gelu", "lower-gelu", format!(r#"{} {}"#, gelu_of_conv1d(), project("gelu", "h")), 4096, bf16),
        ("lower_add", "lower-add", format!(r#"Let("pe", Weight("pe", ["16", "h"])), Let("p", Gather("pe", "tokens")), Let("s", Add("x", "p")), {}"#, project("s", "h")), 4096, bf16),
        ("cast_roundtrip", "cast-roundtrip", format!(r#"{LINEAR} {}"#, project("y", "h")), 4096, bf16),
        ("cast_before_reshape", "cast-before-reshape", format!(r#"{LINEAR} Let("r", Reshape(x: "y", shape: ["batch", "seq", "2", "h / 2"])), {}"#, project("r", "h / 2")), 4096, bf16),
        ("cast_before_transpose", "cast-before-transpose", format!(r#"{LINEAR} Let("t", Transpose(x: "y", perm: [1, 0, 2])), {}"#, project("t", "h")), 4096, bf16),
        ("cast_before_slice", "cast-before-slice", format!(r#"{LINEAR} Let("s", Slice(x: "y", axis: -1, start: "0", end: "h / 2")), {}"#, project("s", "h / 2")), 4096, bf16),
        ("cast_before_concat", "cast-before-concat", format!(r#"{LINEAR} {second} Let("c", Concat(xs: ["y", "y2"], axis: -1)), {}"#, project("c", "2 * h")), 4096, bf16),
    ]
}

/// The quantization options of the cases below: int4 in groups of 32 with zero points (the
/// snapshots' weights are 8 columns wide: one partial group per row).
fn int4() -> QuantOptions {
    QuantOptions {
        format: DType::Int4 {
            group: 32,
            zero_point: true,
        },
        skip: vec!["lm_head".into()],
    }
}

/// (snapshot name, rule that must fire, model body, hidden size, compute dtype), built with
/// `--quant` ([`int4`]).
#[rustfmt::skip]
fn quant_cases() -> Vec<(&'static str, &'static str, String, usize, DType)> {
    let (f32, bf16) = (DType::F32, DType::BF16);
    vec![
        ("quantize_linear", "quantize-linear", format!(r#"{LINEAR} Output("y", "y"),"#), 8, f32),
        ("quantize_linear_add", "quantize-linear-add", format!(r#"{LINEAR} Let("z", Add("x", "y")), Output("z", "z"),"#), 8, f32),
        ("quantize_linear_bias", "quantize-linear-bias", QKV_BIAS.to_string(), 8, f32),
        ("quantize_gated_mlp", "quantize-gated-mlp", format!(r#"{GATE_UP}{SILU} Output("act", "act"),"#), 8, f32),
        ("quantize_gated_gelu", "quantize-gated-gelu", format!(r#"{GATE_UP}{GELU} Output("act", "act"),"#), 8, f32),
        ("quantize_linear_bf16", "quantize-linear", format!(r#"{LINEAR} {}"#, project("y", "h")), 4096, bf16),
    ]
}

#[test]
fn each_rule_on_a_minimal_graph() {
    let plain = cases().into_iter().map(|c| (c, None));
    let quant = quant_cases().into_iter().map(|c| (c, Some(int4())));
    for ((name, rule, body, h, dtype), quant) in plain.chain(quant) {
        let g = model(&minimal(&body, h));
        let opts = RewriteOptions {
            dtype,
            quant,
            ..RewriteOptions::default()
        };
        let out = optimize(&g, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        verified(&out.optimized, &g);
        verified(&out.graph, &g);
        let fired = out.report.rules_fired();
        assert!(
            fired.contains_key(rule),
            "{name}: `{rule}` did not fire: {fired:?}"
        );
        if dtype != DType::F32 {
            let lowered = out.graph.nodes.iter().any(|n| {
                n.ty.dtype == dtype && !matches!(n.op, Op::Weight { .. } | Op::Cast { .. })
            });
            assert!(lowered, "{name}: nothing computes in {}", dtype.name());
        }
        let fired: Vec<String> = fired.iter().map(|(r, n)| format!("{r} ×{n}")).collect();
        let snapshot = format!(
            "rule: {rule} ({})\nfired: {}\n\n--- before\n{}\n--- after\n{}",
            dtype.name(),
            fired.join(", "),
            text(&g, None),
            text(&out.graph, None)
        );
        insta::assert_snapshot!(name, snapshot);
    }
}

#[test]
fn every_rule_has_a_case() {
    let mut names = BTreeSet::new();
    for phase in standard(DType::BF16, Some(&int4())) {
        for r in &phase.rules {
            names.insert(r.name.to_string());
        }
    }
    let covered: BTreeSet<String> = cases()
        .into_iter()
        .chain(quant_cases())
        .map(|c| c.1.to_string())
        .collect();
    let missing: Vec<&String> = names.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "rules without a snapshot case: {missing:?}"
    );
}
