//! Rebuilds a HuggingFace `tokenizer.json` from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Two tokenizer models (`tokenizer.ggml.model`) are supported; another is an error naming it.
//!
//! - `"gpt2"` (byte-level BPE), with the pre-tokenizer types (`tokenizer.ggml.pre`) listed in
//!   `pre_tokenizer_for`: each becomes the regex split(s) llama.cpp applies for it, written as the
//!   model's own `tokenizer.json` writes them (a `Split` or `Digits` step before `ByteLevel`);
//!   another pre type is an error.
//! - `"llama"` (SentencePiece BPE: Llama 2, Mistral, Phi-3), as transformers' Llama converter
//!   writes it: spaces escaped as `▁` (and one prepended, unless
//!   `tokenizer.ggml.add_space_prefix` is false), a BPE model whose merges are every split of a
//!   vocabulary piece into two pieces, ranked by the piece's score (`tokenizer.ggml.scores`,
//!   highest first: llama.cpp merges the best-scoring adjacent pair first), byte fallback to the
//!   `<0xXX>` tokens, and the decoder undoing all of it.
//! - `"gemma4"` (Gemma 4's SentencePiece BPE): the same, without the prepended space
//!   (`add_space_prefix` false in its files) and with the merges the file lists.
//!
//! The output has the structure, key order and pretty-printing of the file transformers writes
//! for the same GGUF (tokenizers' serde layout): BPE model with the vocabulary in id order and
//! merges as pairs (byte-level: ByteLevel pre-tokenizer and decoder, no normalizer;
//! SentencePiece: the normalizer and decoder above), a TemplateProcessing post-processor, and
//! the control tokens (`token_type` 3) as special added tokens. User-defined tokens
//! (`token_type` 4) become non-special added tokens. If `tokenizer.ggml.add_bos_token` is true,
//! the post-processor prepends the BOS token (as transformers' GPT-2 converter does).

use std::collections::{BTreeMap, HashMap};

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Value};

use super::gguf::{GgufError, GgufFile, GgufValue};

/// GGUF token type of control tokens (`<|im_start|>` …).
const TOKEN_CONTROL: i64 = 3;
/// GGUF token type of user-defined tokens.
const TOKEN_USER_DEFINED: i64 = 4;

#[derive(serde::Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedToken<'a>>,
    normalizer: Option<Value>,
    pre_tokenizer: Option<PreTokenizer>,
    post_processor: TemplateProcessing,
    decoder: Decoder,
    model: Bpe<'a>,
}

/// The decoder: byte-level, or SentencePiece's steps (as JSON).
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Decoder {
    ByteLevel(ByteLevel),
    Steps(Value),
}

#[derive(serde::Serialize)]
struct AddedToken<'a> {
    id: u32,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

#[derive(serde::Serialize)]
struct ByteLevel {
    #[serde(rename = "type")]
    kind: &'static str,
    add_prefix_space: bool,
    trim_offsets: bool,
    use_regex: bool,
}

/// A pre-tokenizer in tokenizers' serde layout (the `type` key first).
#[derive(serde::Serialize)]
#[serde(untagged)]
enum PreTokenizer {
    ByteLevel(ByteLevel),
    Split {
        #[serde(rename = "type")]
        kind: &'static str,
        pattern: SplitPattern,
        behavior: &'static str,
        invert: bool,
    },
    Digits {
        #[serde(rename = "type")]
        kind: &'static str,
        individual_digits: bool,
    },
    Sequence {
        #[serde(rename = "type")]
        kind: &'static str,
        pretokenizers: Vec<PreTokenizer>,
    },
}

#[derive(serde::Serialize)]
struct SplitPattern {
    #[serde(rename = "Regex")]
    regex: &'static str,
}

/// The GPT-2 regex split, then byte-level (the ByteLevel pre-tokenizer with `use_regex`).
fn gpt2_byte_level() -> PreTokenizer {
    PreTokenizer::ByteLevel(ByteLevel {
        kind: "ByteLevel",
        add_prefix_space: false,
        trim_offsets: true,
        use_regex: true,
    })
}

/// A regex split (matches isolated), then byte-level without its own regex.
fn split_byte_level(regex: &'static str) -> PreTokenizer {
    PreTokenizer::Sequence {
        kind: "Sequence",
        pretokenizers: vec![
            PreTokenizer::Split {
                kind: "Split",
                pattern: SplitPattern { regex },
                behavior: "Isolated",
                invert: false,
            },
            PreTokenizer::ByteLevel(ByteLevel {
                kind: "ByteLevel",
                add_prefix_space: false,
                trim_offsets: true,
                use_regex: false,
            }),
        ],
    }
}

/// The Llama 3 pre-tokenizer regex (as in Llama 3's `tokenizer.json`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 pre-tokenizer regex (as in Qwen2's `tokenizer.json`): single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen3.5 pre-tokenizer regex: Qwen2's, with combining marks (`\p{M}`) kept in words.
const QWEN35_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values this module supports, for error messages.
const SUPPORTED_PRE: &str = "absent, \"default\", \"gpt2\", \"gpt-2\", \"mpt\", \"olmo\", \
    \"llama-bpe\", \"llama3\", \"llama-v3\", \"dbrx\", \"smaug-bpe\", \"qwen2\", \
    \"deepseek-r1-qwen\", \"stablelm2\", \"qwen35\", \"smollm\", \"starcoder\", \"refact\", \
    \"command-r\"";

/// The pre-tokenizer for the `tokenizer.ggml.pre` value `pre` (llama.cpp's pre-tokenizer
/// types: the same regex splits), and whether the BPE model ignores merges (Llama 3: a word
/// that is a whole token is that token). `None` for an unsupported value.
fn pre_tokenizer_for(pre: Option<&str>) -> Option<(PreTokenizer, bool)> {
    Some(match pre {
        // No pre type: transformers' GGUF converter's GPT-2 byte-level (kept as it was).
        None | Some("default" | "gpt2" | "gpt-2" | "mpt" | "olmo") => (gpt2_byte_level(), false),
        Some("llama-bpe" | "llama3" | "llama-v3") => (split_byte_level(LLAMA3_REGEX), true),
        Some("dbrx" | "smaug-bpe") => (split_byte_level(LLAMA3_REGEX), false),
        Some("qwen2" | "deepseek-r1-qwen" | "stablelm2") => (split_byte_level(QWEN2_REGEX), false),
        Some("qwen35") => (split_byte_level(QWEN35_REGEX), false),
        // Every digit on its own (llama.cpp's `\p{N}` split), then the GPT-2 regex.
        Some("smollm" | "starcoder" | "refact" | "command-r") => (
            PreTokenizer::Sequence {
                kind: "Sequence",
                pretokenizers: vec![
                    PreTokenizer::Digits {
                        kind: "Digits",
                        individual_digits: true,
                    },
                    gpt2_byte_level(),
                ],
            },
            false,
        ),
        Some(_) => return None,
    })
}

#[derive(serde::Serialize)]
struct TemplateProcessing {
    #[serde(rename = "type")]
    kind: &'static str,
    single: Vec<Value>,
    pair: Vec<Value>,
    special_tokens: BTreeMap<String, Value>,
}

#[derive(serde::Serialize)]
struct Bpe<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: &'static str,
    end_of_word_suffix: &'static str,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: Vocab<'a>,
    merges: Vec<[&'a str; 2]>,
}

/// The vocabulary, serialized as a JSON object in id order. When a token string occurs more
/// than once, the last id wins (as in transformers' `{tok: i for i, tok in enumerate(tokens)}`)
/// and the earlier ids are left out.
struct Vocab<'a> {
    tokens: &'a [&'a str],
    ids: HashMap<&'a str, u32>,
}

impl Serialize for Vocab<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.ids.len()))?;
        for (id, tok) in self.tokens.iter().enumerate() {
            if self.ids.get(tok).is_some_and(|&i| i as usize == id) {
                map.serialize_entry(tok, &id)?;
            }
        }
        map.end()
    }
}

/// A string array under `key`, borrowed.
fn string_array<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, GgufError> {
    let v = f.require(key, "an array of strings")?;
    let items = v
        .as_array()
        .ok_or_else(|| f.bad_key(key, "an array of strings", v))?;
    items
        .iter()
        .map(|item| {
            item.as_str()
                .ok_or_else(|| f.bad_key(key, "an array of strings", v))
        })
        .collect()
}

/// The merges of `tokenizer.ggml.merges` (`"left right"` each).
fn file_merges(f: &GgufFile) -> Result<Vec<[&str; 2]>, GgufError> {
    let key = "tokenizer.ggml.merges";
    string_array(f, key)?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => Ok([a, b]),
            _ => Err(f.bad_key(
                key,
                "merges of the form \"left right\" (one space)",
                &GgufValue::String(m.into()),
            )),
        })
        .collect()
}

/// A float array under `key` with `len` entries.
fn float_array(f: &GgufFile, key: &str, len: usize) -> Result<Vec<f64>, GgufError> {
    let v = f.require(key, "an array of floats")?;
    let items = v
        .as_array()
        .filter(|a| a.len() == len)
        .ok_or_else(|| f.bad_key(key, format!("an array of {len} floats (one per token)"), v))?;
    items
        .iter()
        .map(|x| {
            x.as_f64()
                .filter(|s| s.is_finite())
                .ok_or_else(|| f.bad_key(key, "finite floats", v))
        })
        .collect()
}

/// SentencePiece BPE as merges: every split of a vocabulary piece into two vocabulary pieces,
/// best piece score first (llama.cpp merges the adjacent pair whose union scores highest),
/// ties in id order of the piece and then of its parts.
fn sentencepiece_merges<'a>(
    tokens: &[&'a str],
    scores: &[f64],
    ids: &HashMap<&'a str, u32>,
) -> Vec<[&'a str; 2]> {
    let mut found: Vec<(f64, usize, u32, u32, [&'a str; 2])> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // Only the id a string maps to (the last of duplicates) is a merge target.
        if ids.get(piece) != Some(&(id as u32)) {
            continue;
        }
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                found.push((scores[id], id, li, ri, [l, r]));
            }
        }
    }
    found.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    found.into_iter().map(|m| m.4).collect()
}

/// See the module documentation.
pub(crate) fn tokenizer_json(f: &GgufFile) -> Result<String, GgufError> {
    let model_key = "tokenizer.ggml.model";
    let model = f.require(model_key, "the tokenizer model name, a string")?;
    let model = model
        .as_str()
        .ok_or_else(|| f.bad_key(model_key, "a string", model))?;
    let sentencepiece = match model {
        "gpt2" => false,
        "llama" | "gemma4" => true,
        _ => {
            return Err(GgufError::Unsupported {
                path: f.path().to_path_buf(),
                what: "tokenizer model (tokenizer.ggml.model)",
                expected: "\"gpt2\" (byte-level BPE), \"llama\" or \"gemma4\" (SentencePiece)",
                found: model.into(),
            })
        }
    };

    let tokens = string_array(f, "tokenizer.ggml.tokens")?;
    if u32::try_from(tokens.len()).is_err() {
        let v = f.require("tokenizer.ggml.tokens", "")?;
        return Err(f.bad_key("tokenizer.ggml.tokens", "at most 2^32 tokens", v));
    }
    let mut ids = HashMap::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        ids.insert(*tok, id as u32);
    }
    let pre_key = "tokenizer.ggml.pre";
    let pre = match f.metadata(pre_key) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| f.bad_key(pre_key, "a string", v))?,
        ),
    };
    let (normalizer, pre_tokenizer, decoder, ignore_merges, merges);
    if sentencepiece {
        // llama.cpp reads no pre-tokenizer for SentencePiece vocabularies.
        if pre.is_some_and(|p| p != "default") {
            return Err(GgufError::Unsupported {
                path: f.path().to_path_buf(),
                what: "pre-tokenizer type (tokenizer.ggml.pre) of a SentencePiece vocabulary",
                expected: "absent or \"default\"",
                found: pre.unwrap_or_default().into(),
            });
        }
        let space_prefix = match f.metadata("tokenizer.ggml.add_space_prefix") {
            None => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| f.bad_key("tokenizer.ggml.add_space_prefix", "a boolean", v))?,
        };
        let scores = float_array(f, "tokenizer.ggml.scores", tokens.len())?;
        let escape = json!({ "type": "Replace", "pattern": { "String": " " }, "content": "▁" });
        normalizer = Some(if space_prefix {
            json!({ "type": "Sequence", "normalizers": [
                { "type": "Prepend", "prepend": "▁" }, escape ] })
        } else {
            escape
        });
        pre_tokenizer = None;
        let mut steps = vec![
            json!({ "type": "Replace", "pattern": { "String": "▁" }, "content": " " }),
            json!({ "type": "ByteFallback" }),
            json!({ "type": "Fuse" }),
        ];
        if space_prefix {
            steps.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
        }
        decoder = Decoder::Steps(json!({ "type": "Sequence", "decoders": steps }));
        ignore_merges = false;
        // Gemma 4 ships its merges; Llama-style vocabularies rank pieces by score.
        merges = if model == "gemma4" {
            file_merges(f)?
        } else {
            sentencepiece_merges(&tokens, &scores, &ids)
        };
    } else {
        let (pre, ignore) = pre_tokenizer_for(pre).ok_or_else(|| GgufError::Unsupported {
            path: f.path().to_path_buf(),
            what: "pre-tokenizer type (tokenizer.ggml.pre)",
            expected: SUPPORTED_PRE,
            found: pre.unwrap_or_default().into(),
        })?;
        normalizer = None;
        pre_tokenizer = Some(pre);
        decoder = Decoder::ByteLevel(ByteLevel {
            kind: "ByteLevel",
            add_prefix_space: true,
            trim_offsets: true,
            use_regex: true,
        });
        ignore_merges = ignore;
        merges = file_merges(f)?;
    }

    let token_id = |key: &str| -> Result<Option<u32>, GgufError> {
        match f.opt_u64(key)? {
            None => Ok(None),
            Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
            Some(_) => Err(f.bad_key(
                key,
                format!("a token id below the vocabulary size {}", tokens.len()),
                f.require(key, "")?,
            )),
        }
    };
    let bos = token_id("tokenizer.ggml.bos_token_id")?;

    // Token types: 3 (control) → special added token, 4 (user-defined) → plain added token.
    // Without types, the BOS/EOS/UNK/PAD tokens are the special ones.
    let type_key = "tokenizer.ggml.token_type";
    let mut added: BTreeMap<u32, bool> = BTreeMap::new();
    match f.metadata(type_key) {
        Some(v) => {
            let types = v
                .as_array()
                .ok_or_else(|| f.bad_key(type_key, "an array of integers", v))?;
            if types.len() != tokens.len() {
                return Err(f.bad_key(
                    type_key,
                    format!("one type per token ({} tokens)", tokens.len()),
                    &GgufValue::String(format!("{} types", types.len())),
                ));
            }
            for (id, ty) in types.iter().enumerate() {
                match ty.as_i64() {
                    Some(TOKEN_CONTROL) => {
                        added.insert(id as u32, true);
                    }
                    Some(TOKEN_USER_DEFINED) => {
                        added.insert(id as u32, false);
                    }
                    Some(_) => {}
                    None => return Err(f.bad_key(type_key, "an array of integers", v)),
                }
            }
        }
        None => {
            for key in [
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id",
            ] {
                if let Some(id) = token_id(key)? {
                    added.insert(id, true);
                }
            }
        }
    }
    let added_tokens = added
        .into_iter()
        .map(|(id, special)| AddedToken {
            id,
            content: tokens[id as usize],
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special,
        })
        .collect();

    let seq = |id: &str, type_id: u32| json!({ "Sequence": { "id": id, "type_id": type_id } });
    let mut single = vec![seq("A", 0)];
    let mut pair = vec![seq("A", 0), seq("B", 1)];
    let mut special_tokens = BTreeMap::new();
    let add_bos = f.metadata("tokenizer.ggml.add_bos_token");
    if let (Some(GgufValue::Bool(true)), Some(bos)) = (add_bos, bos) {
        let content = tokens[bos as usize];
        let sp = |type_id: u32| json!({ "SpecialToken": { "id": content, "type_id": type_id } });
        single.insert(0, sp(0));
        pair = vec![sp(0), seq("A", 0), sp(1), seq("B", 1)];
        special_tokens.insert(
            content.to_owned(),
            json!({ "id": content, "ids": [bos], "tokens": [content] }),
        );
    }

    let unk = if sentencepiece {
        token_id("tokenizer.ggml.unknown_token_id")?.map(|id| tokens[id as usize])
    } else {
        None
    };
    let doc = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens,
        normalizer,
        pre_tokenizer,
        post_processor: TemplateProcessing {
            kind: "TemplateProcessing",
            single,
            pair,
            special_tokens,
        },
        decoder,
        model: Bpe {
            kind: "BPE",
            dropout: None,
            unk_token: unk,
            continuing_subword_prefix: "",
            end_of_word_suffix: "",
            fuse_unk: sentencepiece,
            byte_fallback: sentencepiece,
            ignore_merges,
            vocab: Vocab {
                tokens: &tokens,
                ids,
            },
            merges,
        },
    };
    // Serializing these plain structs and strings cannot fail.
    Ok(serde_json::to_string_pretty(&doc).unwrap_or_default())
}
