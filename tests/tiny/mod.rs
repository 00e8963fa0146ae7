//! Tiny random Llama checkpoints written by the tests themselves: a HF folder with `config.json`
//! and the weights as safetensors (F32 or BF16, one file or two shards with an index), and
//! optionally a hand-written WordLevel `tokenizer.json` whose words are `w1`, `w2`, …
#![allow(dead_code)]

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// Weights by HF name: (shape, row-major values).
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A seeded xorshift64 generator: the same seed gives the same model on every machine.
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value; mixed so that small seeds differ well).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// A random value of magnitude in `[0.1, 1] · scale`, either sign: never zero.
    pub fn weight(&mut self, scale: f32) -> f32 {
        let u = self.uniform();
        scale * (0.1 + 0.9 * u.abs()) * if u < 0.0 { -1.0 } else { 1.0 }
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The shape of a tiny Llama model.
#[derive(Clone, Debug)]
pub struct TinyConfig {
    /// Hidden size.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// `head_dim` written to config.json; `None` leaves it out (then it is `hidden / heads`).
    pub head_dim: Option<usize>,
    /// MLP intermediate size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// `tie_word_embeddings`.
    pub tied: bool,
    /// RoPE base.
    pub theta: f64,
    /// Write the RoPE base as the nested `rope_parameters.rope_theta` instead of `rope_theta`.
    pub nested_theta: bool,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl TinyConfig {
    /// Multi-head attention (heads = kv heads), untied embeddings.
    pub fn mha() -> TinyConfig {
        TinyConfig {
            hidden: 48,
            layers: 2,
            heads: 3,
            kv_heads: 3,
            head_dim: None,
            ffn: 40,
            vocab: 97,
            tied: false,
            theta: 10000.0,
            nested_theta: false,
            eps: 1e-5,
            max_positions: 64,
            seed: 1,
        }
    }

    /// Grouped-query attention (4 heads, 2 KV heads), tied embeddings, 3 layers, nested theta.
    pub fn gqa() -> TinyConfig {
        TinyConfig {
            layers: 3,
            heads: 4,
            kv_heads: 2,
            tied: true,
            theta: 500.0,
            nested_theta: true,
            eps: 1e-6,
            seed: 2,
            ..TinyConfig::mha()
        }
    }

    /// Multi-query attention (6 heads, 1 KV head) with an explicit `head_dim` of 10, so the
    /// attention width (60) differs from the hidden size (48); untied embeddings.
    pub fn mqa() -> TinyConfig {
        TinyConfig {
            heads: 6,
            kv_heads: 1,
            head_dim: Some(10),
            theta: 100000.0,
            seed: 3,
            ..TinyConfig::mha()
        }
    }

    /// The head dimension the model uses.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }

    /// The HF `config.json`.
    pub fn config_json(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": self.eps,
            "tie_word_embeddings": self.tied,
            "max_position_embeddings": self.max_positions,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if self.nested_theta {
            c["rope_parameters"] =
                serde_json::json!({"rope_type": "default", "rope_theta": self.theta});
        } else {
            c["rope_theta"] = serde_json::json!(self.theta);
        }
        if let Some(d) = self.head_dim {
            c["head_dim"] = serde_json::json!(d);
        }
        c
    }

    /// Fresh random weights in HF naming and layout (`[out, in]` matrices): projections of
    /// magnitude up to 0.25, embeddings up to 0.5, norm weights in `1 ± 0.3`; none is zero.
    pub fn random_weights(&self) -> Weights {
        let mut rng = XorShift::new(self.seed);
        let mut w = Weights::new();
        let (h, d) = (self.hidden, self.head_dim());
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| offset + rng.weight(scale)).collect();
            w.insert(name, (shape, data));
        };
        put(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, h],
            0.5,
            0.0,
        );
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            put(format!("{p}.input_layernorm.weight"), vec![h], 0.3, 1.0);
            put(
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * d, h],
                0.25,
                0.0,
            );
            put(
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * d, h],
                0.25,
                0.0,
            );
            put(
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * d, h],
                0.25,
                0.0,
            );
            put(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.heads * d],
                0.25,
                0.0,
            );
            put(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                0.3,
                1.0,
            );
            put(
                format!("{p}.mlp.gate_proj.weight"),
                vec![self.ffn, h],
                0.25,
                0.0,
            );
            put(
                format!("{p}.mlp.up_proj.weight"),
                vec![self.ffn, h],
                0.25,
                0.0,
            );
            put(
                format!("{p}.mlp.down_proj.weight"),
                vec![h, self.ffn],
                0.25,
                0.0,
            );
        }
        put("model.norm.weight".into(), vec![h], 0.3, 1.0);
        if !self.tied {
            put("lm_head.weight".into(), vec![self.vocab, h], 0.25, 0.0);
        }
        w
    }
}

/// How the weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// One `model.safetensors`, F32.
    F32,
    /// One `model.safetensors`, BF16 (values rounded to nearest even).
    Bf16,
    /// Two F32 shards and `model.safetensors.index.json`.
    Sharded,
}

/// The bfloat16 bits of `x` (round to nearest even; the tests' values are finite).
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to bfloat16 precision.
pub fn bf16_round(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// Serializes tensors (F32 or BF16) to safetensors bytes.
pub fn safetensors_bytes<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a (Vec<usize>, Vec<f32>))>,
    dtype: Dtype,
) -> Vec<u8> {
    let raw: Vec<(&str, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, (shape, data))| {
            let bytes = match dtype {
                Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::BF16 => data
                    .iter()
                    .flat_map(|v| bf16_bits(*v).to_le_bytes())
                    .collect(),
                other => panic!("unsupported test dtype {other:?}"),
            };
            (name, shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(&str, TensorView)> = raw
        .iter()
        .map(|(name, shape, bytes)| (*name, TensorView::new(dtype, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

/// Writes `config.json` and the weights into `dir`. Returns the weights as the checkpoint holds
/// them (BF16-rounded for [`Storage::Bf16`]), which is what the model computes with.
pub fn write_checkpoint(
    dir: &Path,
    cfg: &TinyConfig,
    weights: &Weights,
    storage: Storage,
) -> Weights {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg.config_json()).unwrap(),
    )
    .unwrap();
    match storage {
        Storage::F32 => {
            std::fs::write(
                dir.join("model.safetensors"),
                safetensors_bytes(weights.iter().map(|(n, t)| (n.as_str(), t)), Dtype::F32),
            )
            .unwrap();
            weights.clone()
        }
        Storage::Bf16 => {
            std::fs::write(
                dir.join("model.safetensors"),
                safetensors_bytes(weights.iter().map(|(n, t)| (n.as_str(), t)), Dtype::BF16),
            )
            .unwrap();
            weights
                .iter()
                .map(|(n, (s, d))| {
                    (
                        n.clone(),
                        (s.clone(), d.iter().map(|&v| bf16_round(v)).collect()),
                    )
                })
                .collect()
        }
        Storage::Sharded => {
            let names: Vec<&String> = weights.keys().collect();
            let (first, second) = names.split_at(names.len() / 2);
            let mut weight_map = serde_json::Map::new();
            let mut total = 0usize;
            for (k, part) in [first, second].into_iter().enumerate() {
                let file = format!("model-{:05}-of-00002.safetensors", k + 1);
                let tensors = part.iter().map(|n| (n.as_str(), &weights[*n]));
                std::fs::write(dir.join(&file), safetensors_bytes(tensors, Dtype::F32)).unwrap();
                for n in part {
                    weight_map.insert((*n).clone(), file.clone().into());
                    total += weights[*n].1.len() * 4;
                }
            }
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            std::fs::write(
                dir.join("model.safetensors.index.json"),
                serde_json::to_string_pretty(&index).unwrap(),
            )
            .unwrap();
            weights.clone()
        }
    }
}

/// Writes a WordLevel `tokenizer.json` covering every id of the vocabulary: id 0 is `<unk>`,
/// id `i` is the word `w{i}`; words are split on whitespace and decoded joined by spaces.
pub fn write_tokenizer(dir: &Path, vocab: usize) {
    let mut words = serde_json::Map::new();
    words.insert("<unk>".into(), 0.into());
    for i in 1..vocab {
        words.insert(format!("w{i}"), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<unk>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tok).unwrap(),
    )
    .unwrap();
}

/// A prompt of `n` words `w…` (ids in `1..vocab`), as text.
pub fn words(ids: &[usize]) -> String {
    ids.iter()
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tiny checkpoint folder (`ckpt/`, F32 weights and a WordLevel tokenizer) and its CPU engine
/// (`tiny.kiln`), in a temporary folder that lives as long as the value.
pub struct Built {
    dir: tempfile::TempDir,
}

impl Built {
    /// Writes the checkpoint of `cfg` with fresh random weights and builds its engine.
    pub fn new(cfg: &TinyConfig) -> Built {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        write_checkpoint(&ckpt, cfg, &cfg.random_weights(), Storage::F32);
        write_tokenizer(&ckpt, cfg.vocab);
        kiln::compiler::build(
            &ckpt,
            &dir.path().join("tiny.kiln"),
            &kiln::compiler::BuildOptions::default(),
            &|_, _| {},
        )
        .unwrap();
        Built { dir }
    }

    /// The checkpoint folder.
    pub fn ckpt(&self) -> std::path::PathBuf {
        self.dir.path().join("ckpt")
    }

    /// The engine file.
    pub fn engine(&self) -> std::path::PathBuf {
        self.dir.path().join("tiny.kiln")
    }
}
