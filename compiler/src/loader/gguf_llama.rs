//! llama specifics of GGUF files: tensor names (GGUF → HF), which tensors carry llama.cpp's Q/K
//! row permutation, and the HF `config.json` synthesized from `llama.*` metadata. Qwen2 GGUFs
//! (`general.architecture = "qwen2"`) share the tensor names and the metadata layout under
//! `qwen2.*`, carry q/k/v biases, and have no Q/K permutation (llama.cpp's converter applies it
//! to Llama only); they map to `model_type: "qwen2"` (`models/qwen2.ron`). Phi-3 GGUFs
//! (`phi3`) use the same names with fused `attn_qkv` and `ffn_up` (gate rows, then up rows)
//! tensors, which are Phi-3's own `qkv_proj` and `gate_up_proj`, no Q/K permutation either, and
//! a sliding window (`phi3.attention.sliding_window`); they map to `models/phi3.ron`. Gemma
//! GGUFs (`gemma`) use the same names, a head size of their own (`gemma.attention.key_length`),
//! a tied output, GELU (tanh), and norm weights stored plus one (llama.cpp's converter adds the
//! one that Gemma's RMSNorm adds; [`GgufFile::read_f32`] takes it off again); they map to
//! `models/gemma.ron`. Gemma-2 GGUFs (`gemma2`) are Gemma's with four norms per layer
//! (`attn_norm`, `post_attention_norm`, `ffn_norm` before the MLP, `post_ffw_norm`), soft-caps
//! (`gemma2.attn_logit_softcapping`, `gemma2.final_logit_softcapping`) and a sliding window on
//! even layers; they map to `models/gemma2.ron`.

use serde_json::{json, Value};

use super::gguf::GgufFile;
use super::gguf_value::{GgufError, GgufValue};

/// Maps a GGUF tensor name of architecture `arch` (llama, qwen2, phi3) to its HF name; unknown
/// names are kept as they are.
pub(super) fn llama_hf_name(gguf: &str, arch: &str) -> String {
    let (stem, suffix) = match gguf.rsplit_once('.') {
        Some((stem, s @ ("weight" | "bias"))) => (stem, s),
        _ => return gguf.to_owned(),
    };
    let fixed = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(hf) = fixed {
        return format!("{hf}.{suffix}");
    }
    let Some(rest) = stem.strip_prefix("blk.") else {
        return gguf.to_owned();
    };
    let Some((layer, part)) = rest.split_once('.') else {
        return gguf.to_owned();
    };
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return gguf.to_owned();
    }
    let hf_part = match (part, arch) {
        ("post_attention_norm", "gemma2") => "post_attention_layernorm",
        ("ffn_norm", "gemma2") => "pre_feedforward_layernorm",
        ("post_ffw_norm", "gemma2") => "post_feedforward_layernorm",
        _ => match part {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_qkv" => "self_attn.qkv_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_norm" => "post_attention_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" if arch == "phi3" => "mlp.gate_up_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return gguf.to_owned(),
        },
    };
    format!("model.layers.{layer}.{hf_part}.{suffix}")
}

/// Whether a llama GGUF tensor had its rows permuted by llama.cpp's converter, and with which
/// head-count key: Some(true) for Q (`head_count`), Some(false) for K (`head_count_kv`).
pub(super) fn llama_qk(gguf: &str) -> Option<bool> {
    let rest = gguf.strip_prefix("blk.")?;
    let (_, part) = rest.split_once('.')?;
    match part {
        "attn_q.weight" | "attn_q.bias" => Some(true),
        "attn_k.weight" | "attn_k.bias" => Some(false),
        _ => None,
    }
}

/// See [`GgufFile::hf_config`].
pub(super) fn hf_config(f: &GgufFile) -> Result<Value, GgufError> {
    let arch = f.architecture()?;
    if arch == "gpt2" {
        return super::gguf_gpt2::hf_config(f);
    }
    let (model_type, class) = match arch {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        "phi3" => ("phi3", "Phi3ForCausalLM"),
        "gemma" => ("gemma", "GemmaForCausalLM"),
        "gemma2" => ("gemma2", "Gemma2ForCausalLM"),
        _ => {
            return Err(GgufError::Unsupported {
                path: f.path().to_path_buf(),
                what: "architecture for hf_config",
                expected: "\"llama\", \"qwen2\", \"phi3\", \"gemma\", \"gemma2\" or \"gpt2\"",
                found: arch.into(),
            })
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = f.req_u64(&key("embedding_length"))?;
    let intermediate = f.req_u64(&key("feed_forward_length"))?;
    let layers = f.req_u64(&key("block_count"))?;
    let heads_key = key("attention.head_count");
    let heads = f.req_u64(&heads_key)?;
    if heads == 0 {
        let v = f.require(&heads_key, "")?;
        return Err(f.bad_key(&heads_key, "a positive integer", v));
    }
    let kv_heads = f.opt_u64(&key("attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = match f.opt_u64(&key("attention.key_length"))? {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            let hidden_key = key("embedding_length");
            let v = f.require(&hidden_key, "")?;
            return Err(f.bad_key(
                &hidden_key,
                format!("a multiple of {heads_key} ({heads}) when {arch}.attention.key_length is absent"),
                v,
            ));
        }
    };
    let eps_key = key("attention.layer_norm_rms_epsilon");
    let eps = f.require(&eps_key, "the RMSNorm epsilon, a float")?;
    let eps = eps
        .as_f64()
        .ok_or_else(|| f.bad_key(&eps_key, "a number", eps))?;
    let rope_theta = f.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let context = f.req_u64(&key("context_length"))?;
    let vocab = match f.opt_u64(&key("vocab_size"))? {
        Some(v) => v,
        None => match f.metadata("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
            Some(tokens) => tokens.len() as u64,
            None => match f.gguf_dims("model.embed_tokens.weight") {
                Some(&[_, rows]) => rows as u64,
                _ => {
                    return Err(GgufError::MissingKey {
                        path: f.path().to_path_buf(),
                        key: key("vocab_size"),
                        expected: "the vocabulary size (or a tokenizer.ggml.tokens list or a 2-D token_embd.weight)",
                    })
                }
            },
        },
    };
    let has = |pred: &dyn Fn(&str) -> bool| f.any_gguf_tensor(pred);
    let mut obj = serde_json::Map::new();
    let fields = [
        ("architectures", json!([class])),
        ("model_type", json!(model_type)),
        // Gemma's MLP is GELU (tanh)-gated; the others' SiLU-gated.
        (
            "hidden_act",
            json!(if arch.starts_with("gemma") {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            }),
        ),
        ("hidden_size", json!(hidden)),
        ("intermediate_size", json!(intermediate)),
        ("num_hidden_layers", json!(layers)),
        ("num_attention_heads", json!(heads)),
        ("num_key_value_heads", json!(kv_heads)),
        ("head_dim", json!(head_dim)),
        ("rms_norm_eps", json!(eps)),
        ("rope_theta", json!(rope_theta)),
        (
            "rope_parameters",
            json!({ "rope_theta": rope_theta, "rope_type": "default" }),
        ),
        ("max_position_embeddings", json!(context)),
        ("vocab_size", json!(vocab)),
        (
            "tie_word_embeddings",
            json!(!has(&|n| n == "output.weight")),
        ),
        // Qwen2 always has q/k/v biases (its model file reads them); a llama file with them
        // is flagged so that llama.ron refuses it.
        (
            "attention_bias",
            json!(
                arch == "llama" && has(&|n| n.starts_with("blk.") && n.ends_with(".attn_q.bias"))
            ),
        ),
        (
            "mlp_bias",
            json!(has(
                &|n| n.starts_with("blk.") && n.ends_with(".ffn_up.bias")
            )),
        ),
    ];
    for (k, v) in fields {
        obj.insert(k.into(), v);
    }
    if let Some(window) = f.opt_u64(&key("attention.sliding_window"))? {
        obj.insert("sliding_window".into(), json!(window));
    }
    if arch == "gemma2" {
        for cap in ["attn_logit_softcapping", "final_logit_softcapping"] {
            if let Some(v) = f.opt_f64(&key(cap))? {
                obj.insert(cap.into(), json!(v));
            }
        }
        // Not in GGUF: llama.cpp scales queries by 1/sqrt(head size), or for the 27B (46
        // layers) by 1/sqrt(hidden / heads), which transformers' configs state as
        // `query_pre_attn_scalar`.
        let scalar = if layers == 46 {
            hidden / heads
        } else {
            head_dim
        };
        obj.insert("query_pre_attn_scalar".into(), json!(scalar));
    }
    let scaling_key = key("rope.scaling.type");
    if let Some(v) = f.metadata(&scaling_key) {
        let kind = v
            .as_str()
            .ok_or_else(|| f.bad_key(&scaling_key, "a string", v))?;
        if kind != "none" {
            let factor = f.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
            obj.insert(
                "rope_scaling".into(),
                json!({ "rope_type": kind, "type": kind, "factor": factor }),
            );
        }
    }
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ("tokenizer.ggml.unknown_token_id", "unk_token_id"),
    ] {
        if let Some(id) = f.opt_u64(gguf_key)? {
            obj.insert(hf_key.into(), json!(id));
        }
    }
    Ok(Value::Object(obj))
}
