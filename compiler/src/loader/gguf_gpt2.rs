//! GPT-2 specifics of GGUF files (`general.architecture = "gpt2"`): llama.cpp's tensor names
//! (GGUF → HF `transformer.*`), the four matrices its converter transposes from GPT-2's Conv1D
//! `[in, out]` into `[out, in]` (which kiln reads back as Conv1D, `models/gpt2.ron`), and the
//! HF `config.json` synthesized from `gpt2.*` metadata. llama.cpp's converter also writes the
//! tied output as an `output.weight` copy of the embedding; [`super::gguf::GgufFile`] drops it
//! when it is that copy.

use serde_json::{json, Value};

use super::gguf::GgufFile;
use super::gguf_value::{GgufError, GgufValue};

/// Maps a GPT-2 GGUF tensor name to its HF name; unknown names are kept as they are.
pub(super) fn hf_name(gguf: &str) -> String {
    let (stem, suffix) = match gguf.rsplit_once('.') {
        Some((stem, s @ ("weight" | "bias"))) => (stem, s),
        _ => return gguf.to_owned(),
    };
    let fixed = match stem {
        "token_embd" => Some("transformer.wte"),
        "position_embd" => Some("transformer.wpe"),
        "output_norm" => Some("transformer.ln_f"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(hf) = fixed {
        return format!("{hf}.{suffix}");
    }
    let Some((layer, part)) = stem.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
        return gguf.to_owned();
    };
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return gguf.to_owned();
    }
    let hf_part = match part {
        "attn_norm" => "ln_1",
        "attn_qkv" => "attn.c_attn",
        "attn_output" => "attn.c_proj",
        "ffn_norm" => "ln_2",
        "ffn_up" => "mlp.c_fc",
        "ffn_down" => "mlp.c_proj",
        _ => return gguf.to_owned(),
    };
    format!("transformer.h.{layer}.{hf_part}.{suffix}")
}

/// Whether a GPT-2 GGUF tensor is one of the Conv1D matrices llama.cpp's converter transposed.
pub(super) fn is_transposed(gguf: &str) -> bool {
    gguf.strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .is_some_and(|(_, part)| {
            matches!(
                part,
                "attn_qkv.weight" | "attn_output.weight" | "ffn_up.weight" | "ffn_down.weight"
            )
        })
}

/// See [`GgufFile::hf_config`].
pub(super) fn hf_config(f: &GgufFile) -> Result<Value, GgufError> {
    let key = |k: &str| format!("gpt2.{k}");
    let hidden = f.req_u64(&key("embedding_length"))?;
    let eps_key = key("attention.layer_norm_epsilon");
    let eps = match f.metadata(&eps_key) {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| f.bad_key(&eps_key, "a number", v))?,
        None => 1e-5,
    };
    let vocab = match f
        .metadata("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
    {
        Some(tokens) => tokens.len() as u64,
        None => match f.gguf_dims("transformer.wte.weight") {
            Some(&[_, rows]) => rows as u64,
            _ => {
                return Err(GgufError::MissingKey {
                    path: f.path().to_path_buf(),
                    key: "tokenizer.ggml.tokens".into(),
                    expected: "the vocabulary (or a 2-D token_embd.weight)",
                })
            }
        },
    };
    let mut obj = serde_json::Map::new();
    let fields = [
        ("architectures", json!(["GPT2LMHeadModel"])),
        ("model_type", json!("gpt2")),
        ("activation_function", json!("gelu_new")),
        ("n_embd", json!(hidden)),
        ("n_layer", json!(f.req_u64(&key("block_count"))?)),
        ("n_head", json!(f.req_u64(&key("attention.head_count"))?)),
        ("n_inner", json!(f.req_u64(&key("feed_forward_length"))?)),
        ("n_positions", json!(f.req_u64(&key("context_length"))?)),
        ("layer_norm_epsilon", json!(eps)),
        ("vocab_size", json!(vocab)),
        ("tie_word_embeddings", json!(true)),
    ];
    for (k, v) in fields {
        obj.insert(k.into(), v);
    }
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ] {
        if let Some(id) = f.opt_u64(gguf_key)? {
            obj.insert(hf_key.into(), json!(id));
        }
    }
    Ok(Value::Object(obj))
}
