//! Bad input, through the `kiln` binary where a user would meet it: each case must fail with a
//! clear message (asserted on its content), a non-zero exit status, and no panic.

mod common;
mod tiny;

use common::*;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tiny::{Storage, TinyConfig};

/// The tiny GQA model's config with a 16-token context window.
fn small_context() -> TinyConfig {
    TinyConfig {
        max_positions: 16,
        ..TinyConfig::gqa()
    }
}

/// A tiny checkpoint folder with a WordLevel tokenizer, and its engine, built once per test
/// binary. Tests copy the engine before damaging it.
fn shared() -> &'static tiny::Built {
    static SHARED: OnceLock<tiny::Built> = OnceLock::new();
    SHARED.get_or_init(|| tiny::Built::new(&small_context()))
}

/// A copy of the shared engine in `dir`, to damage.
fn engine_copy(dir: &Path) -> PathBuf {
    let path = dir.join("copy.kiln");
    std::fs::copy(shared().engine(), &path).unwrap();
    path
}

/// A checkpoint folder with the tiny model's config and a `model.safetensors` holding `bytes`.
fn ckpt_with_weights_file(dir: &Path, bytes: &[u8]) -> PathBuf {
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let cfg = TinyConfig::mha();
    std::fs::write(ckpt.join("config.json"), cfg.config_json().to_string()).unwrap();
    std::fs::write(ckpt.join("model.safetensors"), bytes).unwrap();
    ckpt
}

// ---------------------------------------------------------------------------------------------
// Model files
// ---------------------------------------------------------------------------------------------

/// A model file whose line 6 lacks the comma after `params: [...]`: the parser stops at `body`,
/// line 7, column 5.
const MISSING_COMMA: &str = r#"// A model file with a syntax error.
Model(
    family: "toy",
    params: [
        ("hidden", Config("hidden_size")),
    ]
    body: [],
)
"#;

/// A model file using an op the language does not have, on line 7.
const UNKNOWN_OP: &str = r#"Model(
    family: "toy",
    params: [("hidden", Config("hidden_size")), ("vocab", Config("vocab_size"))],
    body: [
        Let("tokens", Tokens),
        Let("embed", Weight("model.embed_tokens.weight", ["vocab", "hidden"])),
        Let("x", Frobnicate("embed", "tokens")),
        Output("logits", "x"),
    ],
)
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn malformed_model_file_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.ron", MISSING_COMMA);
    let out = dir.path().join("out.kiln");
    let msg = fails(&[
        "build".as_ref(),
        p(&shared().ckpt()),
        "-o".as_ref(),
        p(&out),
        "--model".as_ref(),
        p(&bad),
    ]);
    let at = format!("{}:7:5:", bad.display());
    assert!(msg.contains(&at), "expected `{at}` in: {msg}");
    assert!(!out.exists(), "a failed build left an engine behind");

    let cfg = write(
        dir.path(),
        "cfg.json",
        &TinyConfig::mha().config_json().to_string(),
    );
    let msg = fails(&["inspect".as_ref(), p(&bad), "--config".as_ref(), p(&cfg)]);
    assert!(msg.contains(&at), "expected `{at}` in: {msg}");
}

#[test]
fn missing_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let msg = fails(&[
        "build".as_ref(),
        p(&shared().ckpt()),
        "-o".as_ref(),
        p(&dir.path().join("out.kiln")),
        "--model".as_ref(),
        p(&dir.path().join("absent.ron")),
    ]);
    assert!(
        msg.contains("cannot read model file") && msg.contains("absent.ron"),
        "{msg}"
    );
}

#[test]
fn unknown_op_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "frob.ron", UNKNOWN_OP);
    let cfg = write(
        dir.path(),
        "cfg.json",
        &TinyConfig::mha().config_json().to_string(),
    );
    let msg = fails(&["inspect".as_ref(), p(&bad), "--config".as_ref(), p(&cfg)]);
    assert!(msg.contains("Frobnicate"), "{msg}");
    assert!(msg.contains(&format!("{}:7:", bad.display())), "{msg}");
    let msg = fails(&[
        "build".as_ref(),
        p(&shared().ckpt()),
        "-o".as_ref(),
        p(&dir.path().join("out.kiln")),
        "--model".as_ref(),
        p(&bad),
    ]);
    assert!(msg.contains("Frobnicate"), "{msg}");
}

/// Errors found while expanding a well-formed model file name the node and the shapes.
#[test]
fn model_expansion_errors_name_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "cfg.json",
        &TinyConfig::mha().config_json().to_string(),
    );
    let undefined = write(
        dir.path(),
        "undefined.ron",
        r#"Model(family: "toy", params: [], body: [
            Let("y", Exp("nope")),
            Output("y", "y"),
        ])"#,
    );
    let msg = fails(&[
        "inspect".as_ref(),
        p(&undefined),
        "--config".as_ref(),
        p(&cfg),
    ]);
    assert!(msg.contains("`nope` is not defined"), "{msg}");
    let mismatch = write(
        dir.path(),
        "mismatch.ron",
        r#"Model(family: "toy", params: [("hidden", Config("hidden_size"))], body: [
            Let("a", Weight("a", ["hidden", "3"])),
            Let("b", Weight("b", ["hidden", "3"])),
            Let("y", MatMul("a", "b")),
            Output("y", "y"),
        ])"#,
    );
    let msg = fails(&[
        "inspect".as_ref(),
        p(&mismatch),
        "--config".as_ref(),
        p(&cfg),
    ]);
    assert!(
        msg.contains("node `y` (MatMul)") && msg.contains("f32[48, 3]"),
        "{msg}"
    );
    let no_key = write(
        dir.path(),
        "nokey.ron",
        r#"Model(family: "toy", params: [("n", Config("no_such_key"))], body: [])"#,
    );
    let msg = fails(&["inspect".as_ref(), p(&no_key), "--config".as_ref(), p(&cfg)]);
    assert!(
        msg.contains("parameter `n`") && msg.contains("no_such_key"),
        "{msg}"
    );
}

#[test]
fn config_without_a_required_key_or_known_model_type() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::mha();
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &cfg.random_weights(), Storage::F32);
    let out = dir.path().join("out.kiln");
    let build = ["build".as_ref(), p(&ckpt), "-o".as_ref(), p(&out)];

    let mut json = cfg.config_json();
    json.as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(ckpt.join("config.json"), json.to_string()).unwrap();
    let msg = fails(&build);
    assert!(msg.contains("num_attention_heads"), "{msg}");

    let mut json = cfg.config_json();
    json["model_type"] = "gpt_neox".into();
    std::fs::write(ckpt.join("config.json"), json.to_string()).unwrap();
    let msg = fails(&build);
    assert!(msg.contains("gpt_neox") && msg.contains("--model"), "{msg}");

    std::fs::write(ckpt.join("config.json"), "{ not json").unwrap();
    let msg = fails(&build);
    assert!(msg.contains("config.json"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_weight_names_tensor_and_expected_shape() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::mha();
    let mut weights = cfg.random_weights();
    weights.remove("model.layers.1.mlp.up_proj.weight");
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &weights, Storage::F32);
    let msg = fails(&[
        "build".as_ref(),
        p(&ckpt),
        "-o".as_ref(),
        p(&dir.path().join("out.kiln")),
    ]);
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight")
            && msg.contains("missing")
            && msg.contains("[40, 48]"),
        "{msg}"
    );
}

#[test]
fn misshaped_weight_names_tensor_expected_and_found_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::mha();
    let mut weights = cfg.random_weights();
    weights.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        (vec![47, 48], vec![0.1; 47 * 48]),
    );
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &weights, Storage::F32);
    let msg = fails(&[
        "build".as_ref(),
        p(&ckpt),
        "-o".as_ref(),
        p(&dir.path().join("out.kiln")),
    ]);
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.weight")
            && msg.contains("[48, 48]")
            && msg.contains("[47, 48]"),
        "{msg}"
    );
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let cfg = TinyConfig::mha();
    let good = tiny::safetensors_bytes(
        cfg.random_weights().iter().map(|(n, t)| (n.as_str(), t)),
        safetensors::Dtype::F32,
    );
    let mut garbage = vec![0u8; 4096];
    let mut rng = tiny::XorShift::new(99);
    for b in garbage.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    let cases: [(&str, &[u8]); 4] = [
        ("cut in the data", &good[..good.len() - 100]),
        ("cut in the header", &good[..200]),
        ("garbage", &garbage),
        ("empty", &[]),
    ];
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = ckpt_with_weights_file(dir.path(), bytes);
        let msg = fails(&[
            "build".as_ref(),
            p(&ckpt),
            "-o".as_ref(),
            p(&dir.path().join("out.kiln")),
        ]);
        assert!(
            msg.contains("model.safetensors") && msg.contains("corrupt or truncated"),
            "{what}: {msg}"
        );
    }
}

#[test]
fn missing_checkpoint_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.kiln");
    let ck = dir.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    // A folder with neither config.json nor weights.
    let msg = fails(&["build".as_ref(), p(&ck), "-o".as_ref(), p(&out)]);
    assert!(msg.contains("config.json"), "{msg}");
    // config.json but no weights.
    std::fs::write(
        ck.join("config.json"),
        TinyConfig::mha().config_json().to_string(),
    )
    .unwrap();
    let msg = fails(&["build".as_ref(), p(&ck), "-o".as_ref(), p(&out)]);
    assert!(msg.contains("no model.safetensors"), "{msg}");
    // A path that does not exist.
    let msg = fails(&[
        "build".as_ref(),
        p(&dir.path().join("nothing-here")),
        "-o".as_ref(),
        p(&out),
    ]);
    assert!(msg.contains("nothing-here"), "{msg}");
}

/// A small, valid GGUF v3 file: a few metadata keys and one F32 tensor.
fn small_gguf() -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes()); // tensors
    out.extend(3u64.to_le_bytes()); // metadata pairs
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // string
    string(&mut out, "llama");
    string(&mut out, "general.name");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "a tiny test file");
    string(&mut out, "llama.block_count");
    out.extend(4u32.to_le_bytes()); // u32
    out.extend(1u32.to_le_bytes());
    // Tensor info: name, dims (innermost first), type F32 (0), offset 0.
    string(&mut out, "token_embd.weight");
    out.extend(2u32.to_le_bytes());
    out.extend(8u64.to_le_bytes());
    out.extend(16u64.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for i in 0..8 * 16 {
        out.extend((i as f32 * 0.01).to_le_bytes());
    }
    out
}

#[test]
fn truncated_and_bad_magic_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_gguf();
    let out = dir.path().join("out.kiln");
    let build = |path: &Path| fails(&["build".as_ref(), p(path), "-o".as_ref(), p(&out)]);

    // The intact file parses; it fails later, for want of model metadata, not as truncated.
    let path = dir.path().join("good.gguf");
    std::fs::write(&path, &good).unwrap();
    let msg = build(&path);
    assert!(
        !msg.contains("truncated") && !msg.contains("magic"),
        "{msg}"
    );

    // Each cut is reported where the parser meets it, with the file name.
    let cuts = [
        (
            "in the tensor data",
            good.len() - 7,
            "runs past the end of the file",
        ),
        ("in a metadata key", 70, "truncated"),
        ("after the counts", 40, "bytes left"),
        ("in the header", 10, "truncated"),
    ];
    for (what, len, says) in cuts {
        let path = dir.path().join("cut.gguf");
        std::fs::write(&path, &good[..len]).unwrap();
        let msg = build(&path);
        assert!(
            msg.contains("cut.gguf") && msg.contains(says),
            "cut {what}: {msg}"
        );
    }

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    let path = dir.path().join("magic.gguf");
    std::fs::write(&path, &bad).unwrap();
    let msg = build(&path);
    assert!(
        msg.contains("magic.gguf") && msg.contains("bad magic") && msg.contains("GGML"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Engine files
// ---------------------------------------------------------------------------------------------

fn run_args(engine: &Path) -> Vec<&OsStr> {
    vec![
        "run".as_ref(),
        p(engine),
        "--prompt".as_ref(),
        "w1 w2".as_ref(),
        "--max-new-tokens".as_ref(),
        "2".as_ref(),
    ]
}

#[test]
fn truncated_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = engine_copy(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    for len in [bytes.len() - 1, bytes.len() / 2, 100, 3, 0] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let msg = fails(&run_args(&path));
        assert!(
            msg.contains("copy.kiln") && msg.contains("not a valid kiln engine"),
            "cut to {len} bytes: {msg}"
        );
    }
}

#[test]
fn engine_with_a_flipped_byte_fails_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = engine_copy(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_start = 8 + header;
    let i = data_start + (bytes.len() - data_start) / 3;
    bytes[i] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let msg = fails(&run_args(&path));
    assert!(
        msg.contains("copy.kiln") && msg.contains("checksum mismatch"),
        "{msg}"
    );
    let msg = fails(&["tokenize".as_ref(), p(&path), "w1".as_ref()]);
    assert!(msg.contains("checksum mismatch"), "{msg}");
}

#[test]
fn engine_of_another_format_version_says_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(shared().engine()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    assert_eq!(meta["kiln.format_version"], "4");
    meta.insert("kiln.format_version".into(), "999".into());
    let rewritten = safetensors::tensor::serialize(st.tensors(), Some(meta)).unwrap();
    let path = dir.path().join("v999.kiln");
    std::fs::write(&path, rewritten).unwrap();
    let msg = fails(&run_args(&path));
    assert!(
        msg.contains("v999.kiln") && msg.contains("999") && msg.contains("rebuild"),
        "{msg}"
    );
}

#[test]
fn missing_engine_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.kiln");
    let msg = fails(&run_args(&path));
    assert!(msg.contains("absent.kiln"), "{msg}");
    let msg = fails(&["tokenize".as_ref(), p(&path), "w1".as_ref()]);
    assert!(msg.contains("absent.kiln"), "{msg}");
    let msg = fails(&["inspect".as_ref(), p(&path)]);
    assert!(msg.contains("absent.kiln"), "{msg}");
}

/// Something that is not an engine at all (a checkpoint's config.json) given to `kiln run`.
#[test]
fn not_an_engine() {
    let msg = fails(&run_args(&shared().ckpt().join("config.json")));
    assert!(msg.contains("not a valid kiln engine"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------------------------

/// `kiln run` and `kiln tokenize` on an engine built from a HF folder with a hand-written
/// tokenizer work end to end; a prompt of exactly the context window generates one token and
/// stops for the context.
#[test]
fn run_and_tokenize_on_a_tiny_hf_checkpoint() {
    let engine = shared().engine();
    let text = succeeds(&["tokenize".as_ref(), p(&engine), "w1 w2 w96".as_ref()]);
    assert_eq!(text.trim(), "1 2 96");
    let text = succeeds(&[
        "tokenize".as_ref(),
        p(&engine),
        "w5 w6".as_ref(),
        "--json".as_ref(),
    ]);
    assert_eq!(text.trim(), "[5,6]");

    let text = succeeds(&[
        "run".as_ref(),
        p(&engine),
        "--prompt".as_ref(),
        "w1 w2 w3".as_ref(),
        "--max-new-tokens".as_ref(),
        "4".as_ref(),
        "--ignore-eos".as_ref(),
        "--json".as_ref(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(ids(&v["prompt_ids"]), [1, 2, 3]);
    assert_eq!(ids(&v["generated_ids"]).len(), 4);
    assert_eq!(v["finish_reason"], "length");

    let full: Vec<usize> = (1..=16).collect();
    let text = succeeds(&[
        "run".as_ref(),
        p(&engine),
        "--prompt".as_ref(),
        tiny::words(&full).as_ref(),
        "--max-new-tokens".as_ref(),
        "8".as_ref(),
        "--json".as_ref(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(ids(&v["generated_ids"]).len(), 1);
    assert_eq!(v["finish_reason"], "context");
}

#[test]
fn prompt_longer_than_the_context_window() {
    let engine = shared().engine();
    let long: Vec<usize> = (1..=20).collect();
    let msg = fails(&[
        "run".as_ref(),
        p(&engine),
        "--prompt".as_ref(),
        tiny::words(&long).as_ref(),
    ]);
    assert!(
        msg.contains("20 tokens") && msg.contains("context window is 16"),
        "{msg}"
    );

    // The same through the library.
    use kiln::runtime::generate::{generate, GenerateError, GenerateRequest};
    let e = kiln::runtime::engine::Engine::open(&engine).unwrap();
    assert_eq!(e.generation.max_context, 16);
    let exec = e.cpu_executor().unwrap();
    let tok = kiln::runtime::tokenizer::Tokenizer::from_json(e.tokenizer_json.as_deref().unwrap())
        .unwrap();
    let req = GenerateRequest {
        prompt_ids: long.iter().map(|&i| i as u32).collect(),
        max_new_tokens: 4,
        sampling: kiln::runtime::sampling::SamplingParams::greedy(),
        stop_ids: vec![],
        stop_strings: vec![],
        ignore_eos: true,
        max_context: e.generation.max_context,
    };
    match generate(&exec, &tok, &req, |_| {}) {
        Err(GenerateError::PromptTooLong { prompt, context }) => {
            assert_eq!((prompt, context), (20, 16))
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
}

/// A model file without a float output named `logits` cannot generate text: the build refuses
/// it, as it refuses one whose `logits` are the i32 token ids.
#[test]
fn model_without_logits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = write(
        dir.path(),
        "scores.ron",
        r#"Model(family: "toy", params: [("hidden", Config("hidden_size")), ("vocab", Config("vocab_size"))], body: [
            Let("tokens", Tokens),
            Let("embed", Weight("model.embed_tokens.weight", ["vocab", "hidden"])),
            Let("x", Gather("embed", "tokens")),
            Output("scores", "x"),
        ])"#,
    );
    let engine = dir.path().join("scores.kiln");
    let msg = fails(&[
        "build".as_ref(),
        p(&shared().ckpt()),
        "-o".as_ref(),
        p(&engine),
        "--model".as_ref(),
        p(&model),
    ]);
    assert!(msg.contains("no output named `logits`"), "{msg}");
    let ids = write(
        dir.path(),
        "ids.ron",
        r#"Model(family: "toy", params: [], body: [
            Let("tokens", Tokens),
            Output("logits", "tokens"),
        ])"#,
    );
    let msg = fails(&[
        "build".as_ref(),
        p(&shared().ckpt()),
        "-o".as_ref(),
        p(&engine),
        "--model".as_ref(),
        p(&ids),
    ]);
    assert!(
        msg.contains("output `logits`") && msg.contains("i32"),
        "{msg}"
    );
    assert!(!engine.exists());
}

#[test]
fn empty_prompt() {
    let msg = fails(&[
        "run".as_ref(),
        p(&shared().engine()),
        "--prompt".as_ref(),
        "".as_ref(),
    ]);
    assert!(msg.contains("prompt is empty"), "{msg}");
}
