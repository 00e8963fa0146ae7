//! The fuzz harness functions, one per fuzz target, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`, nightly) and the corpus replay test (`tests/fuzz_corpus.rs`,
//! stable), both of which include this file with `#[path = …] mod harness;`.
//!
//! Each function feeds arbitrary bytes to one of kiln's parsers and walks what it can reach. The
//! property is the same everywhere: every call returns `Ok` or `Err` — it never panics, aborts,
//! overflows the stack, or allocates without bound (libFuzzer enforces the last two with
//! `-rss_limit_mb`/`-malloc_limit_mb`, the replay test with a capped allocator). Results are
//! deliberately ignored: an error is a fine answer to a malformed file.
//!
//! The loaders take paths, so the bytes are written to a scratch folder, one per process and
//! thread (`/dev/shm/kiln-fuzz-<pid>-<n>/` where `/dev/shm` exists, else the temp folder), and
//! overwritten on each call.
//!
//! Only `kiln_compiler`, `kiln_runtime`, `serde_json` and `safetensors` are used, which both the
//! fuzz crate and the root package (`kiln`, as a dev-dependency) have.
#![allow(dead_code)]

use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use kiln_compiler::build::{check_weights, graph_for};
use kiln_compiler::loader::gguf::{GgufFile, GgufValue};
use kiln_compiler::loader::gguf_write::GgufWriter;
use kiln_compiler::loader::Checkpoint;
use kiln_compiler::model::{Expr, ModelFile, ParamValue, Params, LLAMA_RON};
use kiln_runtime::engine::Engine;
use kiln_runtime::ir::Graph;
use kiln_runtime::tokenizer::Tokenizer;

/// A harness function: feeds one input to the code under test.
pub type Harness = fn(&[u8]);

/// Every fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` file and the
/// `fuzz/corpus/<name>/` folder) and its harness function.
pub const TARGETS: &[(&str, Harness)] = &[
    ("gguf", gguf),
    ("safetensors_checkpoint", safetensors_checkpoint),
    ("engine", engine),
    ("model_ron", model_ron),
    ("expr", expr),
    ("gguf_tokenizer", gguf_tokenizer),
];

/// The harness function of the target called `name`.
pub fn target(name: &str) -> Option<Harness> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

// ---------------------------------------------------------------------------------------------
// Scratch files.

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SCRATCH: OnceCell<PathBuf> = const { OnceCell::new() };
}

/// Where scratch folders go: `/dev/shm` where it exists, else the temp folder.
pub fn scratch_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// This thread's scratch folder, `kiln-fuzz-<pid>-<n>` in [`scratch_base`], created on first use.
pub fn scratch_dir() -> PathBuf {
    SCRATCH.with(|cell| {
        cell.get_or_init(|| {
            let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
            let name = format!("kiln-fuzz-{}-{slot}", std::process::id());
            let dir = scratch_base().join(name);
            std::fs::create_dir_all(&dir).expect("create the fuzz scratch folder");
            dir
        })
        .clone()
    })
}

/// Removes this thread's scratch folder (the replay test calls it; a fuzzer process leaves its
/// folder behind, and `bench/fuzz.sh` removes those of processes that have ended).
pub fn remove_scratch() {
    SCRATCH.with(|cell| {
        if let Some(dir) = cell.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    });
}

/// Writes `bytes` to `name` in the scratch folder (replacing it) and returns its path.
fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, bytes).expect("write a fuzz scratch file");
    path
}

// ---------------------------------------------------------------------------------------------
// Fixed inputs.

/// The small Llama-like `config.json` the `model_ron` and `safetensors_checkpoint` targets bind
/// their model to: 1 layer, hidden 8, 2 heads, 1 KV head, MLP 12, vocabulary 16. The seed
/// checkpoint in `fuzz/corpus/safetensors_checkpoint/` matches it.
pub fn tiny_config() -> &'static serde_json::Value {
    static CONFIG: OnceLock<serde_json::Value> = OnceLock::new();
    CONFIG.get_or_init(|| {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 8,
            "intermediate_size": 12,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 16,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "max_position_embeddings": 32,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    })
}

/// [`tiny_config`] fitted to a model file: a key the file's `requires` list refuses (GELU
/// families refuse `hidden_act` = "silu") takes the first value the file accepts instead.
pub fn config_for(model: &ModelFile) -> serde_json::Value {
    let mut config = tiny_config().clone();
    let Some(map) = config.as_object_mut() else {
        return config;
    };
    for (keys, accepted) in &model.requires {
        for key in keys.split('|') {
            let Some(v) = map.get(key) else {
                continue;
            };
            let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            if !accepted.contains(&text) {
                match accepted.first() {
                    Some(a) => map.insert(key.to_string(), a.as_str().into()),
                    None => map.remove(key),
                };
            }
        }
    }
    config
}

/// The graph of `models/llama.ron` for [`tiny_config`], to check fuzzed checkpoints against.
pub fn tiny_llama_graph() -> Option<&'static Graph> {
    static GRAPH: OnceLock<Option<Graph>> = OnceLock::new();
    GRAPH
        .get_or_init(|| {
            let model = ModelFile::parse(LLAMA_RON, "models/llama.ron").ok()?;
            graph_for(&model, tiny_config()).ok()
        })
        .as_ref()
}

// ---------------------------------------------------------------------------------------------
// The targets.

/// `gguf`: the bytes as a `.gguf` file. Opens it with [`GgufFile::open`]; if it opens, reads
/// every metadata value, the architecture, the synthesized HF config, the tensor list, every
/// tensor (dequantized, Q/K unpermuted), the rebuilt `tokenizer.json` and the chat template;
/// then opens the same file as a [`Checkpoint`].
pub fn gguf(data: &[u8]) {
    let path = scratch_file("model.gguf", data);
    if let Ok(f) = GgufFile::open(&path) {
        let _ = (f.version(), f.alignment(), f.data_offset(), f.path());
        for key in f.metadata_keys() {
            if let Some(v) = f.metadata(key) {
                let _ = (v.describe(), v.as_f64(), v.as_str(), v.as_bool());
            }
        }
        let _ = f.architecture();
        let _ = f.hf_config();
        for (name, _shape) in f.tensors() {
            let _ = f.tensor_storage(&name);
            let _ = f.read_f32(&name);
        }
        let _ = f.read_f32("no.such.tensor");
        let _ = f.tokenizer_json();
        let _ = f.chat_template();
        let _ = format!("{f:?}");
    }
    if let Ok(ckpt) = Checkpoint::open(&path) {
        let _ = ckpt.tensors();
    }
}

/// `safetensors_checkpoint`: the bytes as `model.safetensors` in a checkpoint folder whose
/// `config.json` is [`tiny_config`]. Opens it with [`Checkpoint::open`], lists its tensors,
/// reads each as f32, and checks them against the Llama graph of that config.
pub fn safetensors_checkpoint(data: &[u8]) {
    let dir = scratch_dir().join("checkpoint");
    if !dir.join("config.json").exists() {
        std::fs::create_dir_all(&dir).expect("create the scratch checkpoint folder");
        let config = serde_json::to_string_pretty(tiny_config()).expect("config serializes");
        std::fs::write(dir.join("config.json"), config).expect("write config.json");
    }
    std::fs::write(dir.join("model.safetensors"), data).expect("write model.safetensors");
    let Ok(ckpt) = Checkpoint::open(&dir) else {
        return;
    };
    let tensors = ckpt.tensors();
    for (name, _shape) in &tensors {
        let _ = ckpt.read_f32(name);
    }
    if let Some(graph) = tiny_llama_graph() {
        let _ = check_weights(graph, &tensors);
    }
}

/// `engine`: the bytes as a `.kiln` engine file. Opens it with [`Engine::open`] and, if it
/// opens, builds its CPU executor. A mutated engine almost never keeps its checksum
/// (`kiln.checksum`, xxh3 over the tensors), which would stop every input at the checksum
/// check; so when the header is readable and its checksum is wrong, the file is opened a second
/// time with the checksum corrected, to reach the graph, config and weight checks behind it.
pub fn engine(data: &[u8]) {
    open_engine(data);
    if let Some(fixed) = with_correct_checksum(data) {
        open_engine(&fixed);
    }
}

fn open_engine(data: &[u8]) {
    let path = scratch_file("model.kiln", data);
    if let Ok(e) = Engine::open(&path) {
        let _ = (e.target(), e.tensor_names().count());
        let _ = e.cpu_executor();
    }
}

/// `data` with the engine header's `kiln.checksum` replaced by the checksum of its tensors, or
/// `None` if the header cannot be read, has no checksum, or the checksum is already right.
fn with_correct_checksum(data: &[u8]) -> Option<Vec<u8>> {
    let key = kiln_runtime::engine::keys::CHECKSUM;
    let n = usize::try_from(u64::from_le_bytes(data.get(..8)?.try_into().ok()?)).ok()?;
    let header = data.get(8..8usize.checked_add(n)?)?;
    let mut json: serde_json::Value = serde_json::from_slice(header).ok()?;
    let (_, parsed) = safetensors::SafeTensors::read_metadata(data).ok()?;
    let stored = parsed.metadata().clone()?;
    let st = safetensors::SafeTensors::deserialize(data).ok()?;
    let tensors = st.tensors();
    let sum = kiln_runtime::engine::checksum(
        &stored,
        tensors.iter().map(|(n, v)| (n.as_str(), v.data())),
    );
    if stored.get(key) == Some(&sum) {
        return None;
    }
    let meta = json.get_mut("__metadata__")?.as_object_mut()?;
    meta.insert(key.into(), sum.into());
    let header = serde_json::to_vec(&json).ok()?;
    let mut out = Vec::with_capacity(data.len() + header.len());
    out.extend((header.len() as u64).to_le_bytes());
    out.extend(header);
    out.extend(&data[8 + n..]);
    Some(out)
}

/// `model_ron`: the bytes as model-language text (invalid UTF-8 is skipped). Parses it with
/// [`ModelFile::parse`] and, if it parses, binds it to [`tiny_config`] (fitted to the file's
/// `requires`, [`config_for`]) and expands it into a graph with [`graph_for`], then serializes
/// that graph to RON and reads it back as an engine would.
pub fn model_ron(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(model) = ModelFile::parse(text, "fuzz.ron") else {
        return;
    };
    if let Ok(graph) = graph_for(&model, &config_for(&model)) {
        let _ = Graph::from_ron(&graph.to_ron());
    }
}

/// `expr`: the bytes as an expression of the model language (invalid UTF-8 is skipped). Parses
/// it with [`Expr::parse`] and, if it parses, evaluates it as a size ([`Expr::eval_dim`]) and as
/// a number ([`Expr::eval_f64`]) with a few integer and real parameters bound.
pub fn expr(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(e) = Expr::parse(text) else {
        return;
    };
    let params = expr_params();
    let _ = e.eval_dim(params);
    let _ = e.eval_f64(params);
    let _ = e.text();
}

/// The parameters the `expr` target evaluates with: those the shipped model files use, plus an
/// extreme and a negative one.
pub fn expr_params() -> &'static Params {
    static PARAMS: OnceLock<Params> = OnceLock::new();
    PARAMS.get_or_init(|| {
        let ints = [
            ("hidden", 64),
            ("heads", 4),
            ("kv_heads", 2),
            ("head_dim", 16),
            ("layers", 2),
            ("ffn", 96),
            ("vocab", 100),
            ("tied", 0),
            ("group", 2),
            ("i", 1),
            ("window", 16),
            ("q_size", 64),
            ("kv_size", 32),
            ("rope_orig", 8192),
            ("big", i64::MAX),
            ("neg", -3),
        ];
        let reals = [
            ("eps", 1e-5),
            ("theta", 10000.0),
            ("half", 0.5),
            ("qscale", 0.25),
            ("rope_factor", 8.0),
            ("rope_low", 1.0),
            ("rope_high", 4.0),
        ];
        let mut p = Params::new();
        for (k, v) in ints {
            p.insert(k.into(), ParamValue::Int(v));
        }
        for (k, v) in reals {
            p.insert(k.into(), ParamValue::Float(v));
        }
        p
    })
}

/// `gguf_tokenizer`: the tokenizer-metadata path of GGUF files. The bytes are decoded (by
/// [`tokenizer_gguf`], every input decodes) into a syntactically valid GGUF file without
/// tensors whose `tokenizer.ggml.*` keys — model name, token list, merges, token types, BOS/EOS/
/// UNK/PAD ids, `add_bos_token`, chat template — come from the input, each sometimes absent or
/// of the wrong type. Opens it, rebuilds `tokenizer.json` from it, and if that succeeds loads
/// the result with kiln's tokenizer and encodes and decodes a text taken from the input.
pub fn gguf_tokenizer(data: &[u8]) {
    let (file, text) = tokenizer_gguf(data);
    let path = scratch_file("tokenizer.gguf", &file);
    let Ok(f) = GgufFile::open(&path) else {
        return;
    };
    let _ = f.chat_template();
    let Ok(json) = f.tokenizer_json() else {
        return;
    };
    let Ok(tok) = Tokenizer::from_json(&json) else {
        return;
    };
    let _ = tok.vocab_size();
    if let Ok(ids) = tok.encode(&text) {
        let _ = tok.decode(&ids);
    }
    let _ = tok.decode(&[0, 1, 2, u32::MAX]);
}

// ---------------------------------------------------------------------------------------------
// The byte decoder of `gguf_tokenizer`.

/// Reads choices from the fuzz input; past its end every read is 0.
struct Choices<'a> {
    data: &'a [u8],
}

impl<'a> Choices<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A short string from the input (invalid UTF-8 replaced).
    fn string(&mut self, max: usize) -> String {
        let n = self.byte() as usize % (max + 1);
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }
}

/// Token texts that real GPT-2 style vocabularies have, so that merges and duplicates happen.
const TOKEN_WORDS: &[&str] = &[
    "<s>",
    "</s>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "a",
    "b",
    "ab",
    "Ġ",
    "Ġa",
    "Ġab",
    "Ċ",
    "ĊĊ",
    "the",
    "Ġthe",
    "",
    " ",
    "a b",
    "<0x0A>",
    "▁",
    "é",
    "\u{0}",
    "ab",
];

/// A GGUF value of the wrong kind for any tokenizer key.
fn wrong_value(c: &mut Choices) -> GgufValue {
    match c.byte() % 4 {
        0 => GgufValue::U32(c.u32()),
        1 => GgufValue::String(c.string(8)),
        2 => GgufValue::F32(f32::from_bits(c.u32())),
        _ => GgufValue::Array(vec![GgufValue::U8(c.byte()); c.byte() as usize % 4]),
    }
}

/// A token id: mostly in range, sometimes just past it, sometimes anything.
fn token_id(c: &mut Choices, n_tokens: usize) -> GgufValue {
    let raw = c.u32();
    let id = match c.byte() % 8 {
        0 => raw,
        1 => n_tokens as u32,
        _ => raw % (n_tokens as u32).max(1),
    };
    match c.byte() % 8 {
        0 => GgufValue::I32(-(id as i32 & 0xFF)),
        1 => GgufValue::U64((u64::from(id) << 32) | u64::from(id)),
        2 => GgufValue::I64(i64::from(id)),
        3 => GgufValue::U8(id as u8),
        _ => GgufValue::U32(id),
    }
}

/// Decodes the fuzz input into a GGUF file with `tokenizer.ggml.*` metadata (see
/// [`gguf_tokenizer`]) and a text to tokenize. Total: every input gives a parseable file.
pub fn tokenizer_gguf(data: &[u8]) -> (Vec<u8>, String) {
    let mut c = Choices { data };
    let mut kvs: Vec<(String, GgufValue)> = Vec::new();

    let model = match c.byte() % 16 {
        0 => GgufValue::String("llama".into()),
        1 => GgufValue::String(c.string(8)),
        2 => wrong_value(&mut c),
        _ => GgufValue::String("gpt2".into()),
    };
    if !c.byte().is_multiple_of(32) {
        kvs.push(("tokenizer.ggml.model".into(), model));
    }

    // Tokens: mostly words of real vocabularies, else text from the input.
    let n_tokens = match c.byte() % 8 {
        0 => c.u16() as usize % 2048,
        _ => c.byte() as usize % 48,
    };
    let mut tokens = Vec::with_capacity(n_tokens);
    for _ in 0..n_tokens {
        let k = c.byte();
        tokens.push(if k < 160 {
            TOKEN_WORDS[k as usize % TOKEN_WORDS.len()].to_string()
        } else {
            c.string(12)
        });
    }
    match c.byte() % 16 {
        0 => {}
        1 => kvs.push(("tokenizer.ggml.tokens".into(), wrong_value(&mut c))),
        _ => kvs.push((
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(tokens.iter().cloned().map(GgufValue::String).collect()),
        )),
    }

    // Merges: mostly "left right" of two tokens, else text from the input.
    let n_merges = c.byte() as usize % 32;
    let mut merges = Vec::with_capacity(n_merges);
    for _ in 0..n_merges {
        let k = c.byte();
        merges.push(match (k % 8, tokens.len()) {
            (0, _) | (_, 0) => c.string(12),
            (1, n) => format!(
                "{}  {}",
                tokens[c.byte() as usize % n],
                tokens[c.byte() as usize % n]
            ),
            (_, n) => format!(
                "{} {}",
                tokens[c.byte() as usize % n],
                tokens[c.byte() as usize % n]
            ),
        });
    }
    match c.byte() % 16 {
        0 => {}
        1 => kvs.push(("tokenizer.ggml.merges".into(), wrong_value(&mut c))),
        _ => kvs.push((
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(merges.into_iter().map(GgufValue::String).collect()),
        )),
    }

    // Token types: one per token (sometimes one more or one fewer), as integers of some width;
    // mostly normal (1), control (3) and user-defined (4).
    let presence = c.byte() % 8;
    if presence != 0 {
        let n = match presence {
            1 => n_tokens + 1,
            2 => n_tokens.saturating_sub(1),
            _ => n_tokens,
        };
        let width = c.byte() % 8;
        let types = (0..n)
            .map(|_| {
                let k = c.byte();
                let t: i64 = match k % 8 {
                    0..=3 => 1,
                    4 | 5 => 3,
                    6 => 4,
                    _ => i64::from(k as i8),
                };
                match width {
                    0 => GgufValue::U8(t as u8),
                    1 => GgufValue::I64(t),
                    2 => GgufValue::U32(t as u32),
                    3 => GgufValue::F32(t as f32),
                    4 => GgufValue::String(t.to_string()),
                    _ => GgufValue::I32(t as i32),
                }
            })
            .collect();
        kvs.push(("tokenizer.ggml.token_type".into(), GgufValue::Array(types)));
    }

    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
    ] {
        match c.byte() % 8 {
            0 | 1 => {}
            2 => kvs.push((key.into(), wrong_value(&mut c))),
            _ => kvs.push((key.into(), token_id(&mut c, n_tokens))),
        }
    }
    match c.byte() % 4 {
        0 => {}
        1 => kvs.push(("tokenizer.ggml.add_bos_token".into(), wrong_value(&mut c))),
        _ => {
            let b = c.byte().is_multiple_of(2);
            kvs.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(b)));
        }
    }
    if c.byte().is_multiple_of(2) {
        kvs.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(c.string(64)),
        ));
    }

    // The text to tokenize: some tokens, then the rest of the input, at most 256 bytes of it
    // (encoding is most of the time per input; longer text finds little more).
    let mut text = String::new();
    for _ in 0..c.byte() % 8 {
        if let Some(t) = tokens.get(c.byte() as usize % tokens.len().max(1)) {
            text.push_str(t);
        }
    }
    text.push_str(&String::from_utf8_lossy(c.bytes(256)));

    let kvs: Vec<(&str, GgufValue)> = kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    (gguf_bytes(&kvs, &[]), text)
}

/// A GGUF v3 file with these metadata pairs and tensors (name, GGUF dims innermost first, GGML
/// type id, data bytes), laid out with alignment 32 (`kiln_compiler`'s GGUF writer).
pub fn gguf_bytes(kvs: &[(&str, GgufValue)], tensors: &[(&str, &[u64], u32, &[u8])]) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in kvs {
        w = w.kv(k, v.clone());
    }
    for (name, dims, ty, data) in tensors {
        w = w.tensor(name, dims, *ty, data.to_vec());
    }
    w.bytes()
}
