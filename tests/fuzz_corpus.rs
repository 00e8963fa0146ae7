//! Replays the fuzz corpus in plain `cargo test` (stable; CI has no nightly): every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through the harness function of
//! `<target>` — the very functions the cargo-fuzz targets call (`fuzz/harness.rs`) — and must
//! return without panicking.
//!
//! Each file runs in a child process (this test binary, re-run on the `replay_one` test) on a
//! thread with an 8 MiB stack and under a 2 GiB allocation cap, like libFuzzer's main thread and
//! `-malloc_limit_mb=2048`, so an abort, a stack overflow or a runaway allocation is reported
//! with the file that caused it instead of taking the whole run down.
//!
//! `KILN_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_corpus write_seed_corpus` (which
//! `fuzz/make_corpus.sh` runs) regenerates the seed corpus from the project's own writers.

#[path = "../fuzz/harness.rs"]
mod harness;
mod tiny;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln::compiler::build::{check_weights, graph_for};
use kiln::compiler::loader::gguf::{GgufFile, GgufValue};
use kiln::compiler::loader::Checkpoint;
use kiln::compiler::model::{Expr, ModelFile};
use kiln::runtime::engine::Engine;
use kiln::runtime::tokenizer::Tokenizer;
use tiny::{bf16_bits, write_checkpoint, write_tokenizer, Storage, TinyConfig, XorShift};

/// Set in a child: `<target>\t<file>` to replay.
const CHILD_ENV: &str = "KILN_FUZZ_REPLAY";
/// The stack of libFuzzer's main thread (the default `ulimit -s`).
const STACK: usize = 8 << 20;
/// Live heap bytes allowed, as `-malloc_limit_mb=2048`.
const ALLOC_LIMIT: usize = 2 << 30;
/// How long one file may take (a debug build; the fuzzers use `-timeout=10` on release code).
const TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// A capped allocator: past `ALLOC_LIMIT` live bytes an allocation fails, which aborts the
// (child) process with "memory allocation of N bytes failed" instead of exhausting the machine.

struct CappedAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn reserve(n: usize) -> bool {
    if LIVE.fetch_add(n, Ordering::Relaxed).saturating_add(n) > ALLOC_LIMIT {
        LIVE.fetch_sub(n, Ordering::Relaxed);
        return false;
    }
    true
}

fn release(n: usize) {
    LIVE.fetch_sub(n, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            release(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            release(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        release(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !reserve(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                release(new_size - old);
            }
        } else if new_size < old {
            release(old - new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

// ---------------------------------------------------------------------------------------------
// The replay.

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Sorted entries of a folder (none if it does not exist).
fn entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut paths: Vec<PathBuf> = read.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
}

/// Every (target, file) of `fuzz/corpus/*/` and `fuzz/regressions/*/`.
fn corpus_files() -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        for dir in entries(&fuzz_dir().join(kind)) {
            if !dir.is_dir() {
                continue;
            }
            let target = dir.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                harness::target(&target).is_some(),
                "{}: not the name of a fuzz target (fuzz/harness.rs TARGETS)",
                dir.display()
            );
            for file in entries(&dir) {
                if file.is_file() {
                    files.push((target.clone(), file));
                }
            }
        }
    }
    files
}

/// Runs one file in a child process; `Err` describes how it failed.
fn replay_in_child(target: &str, file: &Path) -> Result<(), String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "replay_one", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{target}\t{}", file.display()))
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // A child that aborted left its scratch folders behind.
    let prefix = format!("kiln-fuzz-{}-", child.id());
    for dir in entries(&harness::scratch_base()) {
        if dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    // The panic or abort message is on stderr (stdout has only libtest's summary).
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let output = String::from_utf8_lossy(if err.is_empty() { &out } else { &err });
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    let tail = &lines[lines.len().saturating_sub(15)..];
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!("{s}:\n    {}", tail.join("\n    "))),
        None => Err(format!("timed out after {TIMEOUT:?}")),
    }
}

#[test]
fn fuzz_corpus_replays_without_panics() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let files = corpus_files();
    for (target, _) in harness::TARGETS {
        assert!(
            files.iter().any(|(t, _)| t == target),
            "fuzz/corpus/{target}/ has no seed files (fuzz/make_corpus.sh writes them)"
        );
    }
    let mut failures = Vec::new();
    for (target, file) in &files {
        if let Err(why) = replay_in_child(target, file) {
            failures.push(format!("{} (target `{target}`): {why}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fuzz corpus files fail:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

/// The child side of [`fuzz_corpus_replays_without_panics`]: replays the file named by
/// `KILN_FUZZ_REPLAY` (and does nothing when that is unset, as in a plain `cargo test`).
#[test]
fn replay_one() {
    let Some(spec) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let spec = spec.into_string().unwrap();
    let (target, file) = spec.split_once('\t').unwrap();
    let harness_fn = harness::target(target).unwrap();
    let data = std::fs::read(file).unwrap();
    let result = std::thread::Builder::new()
        .name(format!("replay {target}"))
        .stack_size(STACK)
        .spawn(move || {
            let r = std::panic::catch_unwind(|| harness_fn(&data));
            harness::remove_scratch();
            r.map_err(|payload| {
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(a panic without a message)".into())
            })
        })
        .unwrap()
        .join()
        .unwrap();
    if let Err(msg) = result {
        panic!("{file}: the `{target}` harness panicked: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// The seed corpus.

/// The tiny Llama of the seeds: exactly [`harness::tiny_config`].
fn seed_config() -> TinyConfig {
    TinyConfig {
        hidden: 8,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: None,
        ffn: 12,
        vocab: 16,
        tied: false,
        theta: 10000.0,
        nested_theta: false,
        eps: 1e-5,
        max_positions: 32,
        seed: 17,
    }
}

fn write_seed(target: &str, name: &str, bytes: &[u8]) {
    assert!(
        bytes.len() <= 64 << 10,
        "seed {target}/{name} is {} bytes (at most 64 KiB)",
        bytes.len()
    );
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn random_bytes(rng: &mut XorShift, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn f32_bytes(rng: &mut XorShift, n: usize) -> Vec<u8> {
    (0..n).flat_map(|_| rng.weight(0.5).to_le_bytes()).collect()
}

/// The IEEE half-precision bits of `x` (truncated), for the seeds' values: normal numbers of
/// magnitude between 2^-14 and 65504.
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xFF) as i32 - 127 + 15;
    assert!((1..31).contains(&exp), "{x} is not a normal f16");
    sign | ((exp as u16) << 10) | ((b >> 13) & 0x3FF) as u16
}

/// A GGUF file of the tiny Llama (llama.cpp names and layout, F32/F16/BF16 model tensors), with
/// a GPT-2 tokenizer and chat template, plus extra tensors of each quantized type.
fn seed_gguf() -> Vec<u8> {
    let mut rng = XorShift::new(5);
    let s = |v: &str| GgufValue::String(v.into());
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "a",
        "b",
        "ab",
        "Ġ",
        "Ġa",
        "Ġab",
        "Ċ",
        "user",
        "Ġuser",
        "ro",
        "le",
        "role",
        "<tool>",
    ];
    let types = [3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4];
    let kvs: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("kiln fuzz seed")),
        ("general.alignment", GgufValue::U32(32)),
        ("llama.embedding_length", GgufValue::U32(8)),
        ("llama.feed_forward_length", GgufValue::U32(12)),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.attention.head_count", GgufValue::U32(2)),
        ("llama.attention.head_count_kv", GgufValue::U32(1)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
        ("llama.context_length", GgufValue::U32(32)),
        ("llama.rope.freq_base", GgufValue::F32(10000.0)),
        ("llama.vocab_size", GgufValue::U32(16)),
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(types.iter().map(|&t| GgufValue::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(
                ["a b", "Ġ a", "Ġa b", "ro le", "Ġ user"]
                    .iter()
                    .map(|m| s(m))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.padding_token_id", GgufValue::U32(0)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
        (
            "tokenizer.chat_template",
            s("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"),
        ),
        (
            "kiln.fuzz.nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I8(-1), GgufValue::I8(2)]),
                GgufValue::Array(vec![GgufValue::I8(3)]),
            ]),
        ),
        ("kiln.fuzz.u64", GgufValue::U64(u64::MAX)),
        ("kiln.fuzz.f64", GgufValue::F64(-2.5e300)),
        ("kiln.fuzz.i16", GgufValue::I16(-7)),
        ("kiln.fuzz.u16", GgufValue::U16(7)),
        ("kiln.fuzz.i64", GgufValue::I64(-1)),
    ];
    let f16 = |rng: &mut XorShift, n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| f16_bits(rng.weight(0.5)).to_le_bytes())
            .collect()
    };
    let bf16 = |rng: &mut XorShift, n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| bf16_bits(rng.weight(0.5)).to_le_bytes())
            .collect()
    };
    // Quantized blocks of 32 with a sane f16 scale (and minimum) in front of random codes.
    let quant = |rng: &mut XorShift, blocks: usize, header: usize, codes: usize| -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..blocks {
            for _ in 0..header / 2 {
                b.extend(f16_bits(rng.weight(0.1)).to_le_bytes());
            }
            b.extend(random_bytes(rng, codes));
        }
        b
    };
    let data: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = vec![
        (
            "token_embd.weight",
            vec![8, 16],
            0,
            f32_bytes(&mut rng, 128),
        ),
        ("blk.0.attn_norm.weight", vec![8], 0, f32_bytes(&mut rng, 8)),
        ("blk.0.attn_q.weight", vec![8, 8], 1, f16(&mut rng, 64)),
        ("blk.0.attn_k.weight", vec![8, 4], 30, bf16(&mut rng, 32)),
        (
            "blk.0.attn_v.weight",
            vec![8, 4],
            0,
            f32_bytes(&mut rng, 32),
        ),
        ("blk.0.attn_output.weight", vec![8, 8], 1, f16(&mut rng, 64)),
        ("blk.0.ffn_norm.weight", vec![8], 0, f32_bytes(&mut rng, 8)),
        (
            "blk.0.ffn_gate.weight",
            vec![8, 12],
            0,
            f32_bytes(&mut rng, 96),
        ),
        ("blk.0.ffn_up.weight", vec![8, 12], 1, f16(&mut rng, 96)),
        (
            "blk.0.ffn_down.weight",
            vec![12, 8],
            0,
            f32_bytes(&mut rng, 96),
        ),
        ("output_norm.weight", vec![8], 0, f32_bytes(&mut rng, 8)),
        ("output.weight", vec![8, 16], 0, f32_bytes(&mut rng, 128)),
        // One tensor of each of several quantized layouts the reader converts.
        ("kiln.q8_0", vec![32, 2], 8, quant(&mut rng, 2, 2, 32)),
        ("kiln.q4_0", vec![32, 2], 2, quant(&mut rng, 2, 2, 16)),
        ("kiln.q4_1", vec![64, 1], 3, quant(&mut rng, 2, 4, 16)),
        ("kiln.q5_0", vec![32, 1], 6, quant(&mut rng, 1, 2, 20)),
        ("kiln.q4_k", vec![256], 12, random_bytes(&mut rng, 144)),
    ];
    let tensors: Vec<(&str, &[u64], u32, &[u8])> = data
        .iter()
        .map(|(n, d, t, b)| (*n, d.as_slice(), *t, b.as_slice()))
        .collect();
    harness::gguf_bytes(&kvs, &tensors)
}

/// The smallest useful GGUF: three metadata keys and one F32 tensor (as in tests/bad_input.rs).
fn seed_gguf_minimal() -> Vec<u8> {
    let data: Vec<u8> = (0..8 * 16)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect();
    harness::gguf_bytes(
        &[
            ("general.architecture", GgufValue::String("llama".into())),
            ("general.name", GgufValue::String("a tiny test file".into())),
            ("llama.block_count", GgufValue::U32(1)),
        ],
        &[("token_embd.weight", &[8, 16], 0, &data)],
    )
}

/// The model families kiln ships, `models/*.ron`: (file name, text), sorted.
fn shipped_models() -> Vec<(String, String)> {
    entries(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The expressions of the shipped model files: their quoted strings that parse as expressions
/// and are more than a bare name, each once.
fn model_expressions() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, text) in shipped_models() {
        for (i, piece) in text.split('"').enumerate() {
            let is_expr_like = piece.contains(['+', '-', '*', '/', '%', '(', ' '])
                || piece.starts_with(|c: char| c.is_ascii_digit());
            if i % 2 == 1
                && is_expr_like
                && Expr::parse(piece).is_ok()
                && !out.iter().any(|e| e == piece)
            {
                out.push(piece.to_string());
            }
        }
    }
    out
}

/// The worked example of docs/model-language.md (a toy family), the first `ron` block after its
/// heading.
fn documented_toy_family() -> String {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/model-language.md"),
    )
    .unwrap();
    let section = doc.split("## Worked example").nth(1).unwrap();
    let block = section.split("```ron\n").nth(1).unwrap();
    block.split("```").next().unwrap().to_string()
}

/// Whether a `gguf_tokenizer` input decodes to a file whose rebuilt `tokenizer.json` loads.
fn tokenizer_seed_loads(input: &[u8]) -> bool {
    let (file, _) = harness::tokenizer_gguf(input);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    std::fs::write(&path, file).unwrap();
    GgufFile::open(&path)
        .ok()
        .and_then(|f| f.tokenizer_json().ok())
        .is_some_and(|json| Tokenizer::from_json(&json).is_ok())
}

/// The seeds are inputs the code accepts, so that the fuzzers start deep in it: each GGUF seed
/// opens (the tiny Llama's config, tokenizer and supported tensors read), each checkpoint has
/// the tiny Llama's weights, each engine opens and gets a CPU executor, each model file expands,
/// each expression evaluates, and each `gguf_tokenizer` seed yields a tokenizer. An engine seed
/// that stops opening when the engine format changes is rebuilt by `fuzz/make_corpus.sh`.
#[test]
fn seeds_are_accepted() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let corpus = fuzz_dir().join("corpus");
    let regenerate = "(rerun fuzz/make_corpus.sh)";
    for file in entries(&corpus.join("gguf")) {
        let f = GgufFile::open(&file).unwrap_or_else(|e| panic!("{e} {regenerate}"));
        if file.ends_with("tiny-llama.gguf") {
            f.hf_config().unwrap();
            Tokenizer::from_json(&f.tokenizer_json().unwrap()).unwrap();
            assert!(f.chat_template().is_some());
            // Every layout of the seed is one the reader converts (Q5_0 and Q4_K included).
            for (name, _) in f.tensors() {
                assert!(f.read_f32(&name).is_ok(), "{name}");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::to_string(harness::tiny_config()).unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let graph = harness::tiny_llama_graph().expect("models/llama.ron expands for the tiny config");
    for file in entries(&corpus.join("safetensors_checkpoint")) {
        std::fs::copy(&file, dir.path().join("model.safetensors")).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        check_weights(graph, &ckpt.tensors()).unwrap();
    }
    for file in entries(&corpus.join("engine")) {
        let engine = Engine::open(&file).unwrap_or_else(|e| panic!("{e} {regenerate}"));
        engine.cpu_executor().unwrap();
    }
    for file in entries(&corpus.join("model_ron")) {
        let text = std::fs::read_to_string(&file).unwrap();
        let model = ModelFile::parse(&text, &file.display().to_string()).unwrap();
        graph_for(&model, &harness::config_for(&model))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    let params = harness::expr_params();
    for file in entries(&corpus.join("expr")) {
        let text = std::fs::read_to_string(&file).unwrap();
        let e = Expr::parse(&text).unwrap();
        assert!(
            e.eval_dim(params).is_ok() || e.eval_f64(params).is_ok(),
            "{}: `{text}` does not evaluate",
            file.display()
        );
    }
    for file in entries(&corpus.join("gguf_tokenizer")) {
        assert!(
            tokenizer_seed_loads(&std::fs::read(&file).unwrap()),
            "{}: no tokenizer {regenerate}",
            file.display()
        );
    }
}

/// Regenerates `fuzz/corpus/*/` (only when `KILN_WRITE_FUZZ_SEEDS` is set; see
/// `fuzz/make_corpus.sh`). Files are overwritten by name; others are left alone.
#[test]
fn write_seed_corpus() {
    if std::env::var_os("KILN_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    // model_ron: the shipped families (models/*.ron) and the documented toy family.
    for (name, text) in shipped_models() {
        write_seed("model_ron", &name, text.as_bytes());
    }
    write_seed("model_ron", "toy.ron", documented_toy_family().as_bytes());

    // expr: the expressions of the shipped families, plus the functions and number forms they
    // lack. Earlier `models-*` seeds go first, so none is left from an expression since removed.
    for file in entries(&fuzz_dir().join("corpus/expr")) {
        if file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("models-"))
        {
            std::fs::remove_file(file).unwrap();
        }
    }
    let mut exprs = model_expressions();
    exprs.push("pow(theta, 2) * exp(-1.5e-3) / ln(hidden) - -inf % 3".into());
    for (i, e) in exprs.iter().enumerate() {
        write_seed("expr", &format!("models-{i:02}.txt"), e.as_bytes());
    }

    // gguf: the tiny Llama as llama.cpp writes it, and a minimal file.
    write_seed("gguf", "tiny-llama.gguf", &seed_gguf());
    write_seed("gguf", "minimal.gguf", &seed_gguf_minimal());

    // gguf_tokenizer: its inputs are choices for a byte decoder that always yields a valid
    // file, so random bytes of a few lengths are good seeds: the first ones whose file gives a
    // tokenizer that loads.
    let mut rng = XorShift::new(11);
    for n in [48, 160, 600, 2000] {
        let seed = loop {
            let bytes = random_bytes(&mut rng, n);
            if tokenizer_seed_loads(&bytes) {
                break bytes;
            }
        };
        write_seed("gguf_tokenizer", &format!("random-{n}.bin"), &seed);
    }

    // safetensors_checkpoint: the tiny Llama's weights, F32 and BF16.
    let cfg = seed_config();
    assert_eq!(&cfg.config_json(), harness::tiny_config());
    let weights = cfg.random_weights();
    let dir = tempfile::tempdir().unwrap();
    for (storage, name) in [(Storage::F32, "tiny-f32"), (Storage::Bf16, "tiny-bf16")] {
        let ckpt = dir.path().join(name);
        write_checkpoint(&ckpt, &cfg, &weights, storage);
        let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
        write_seed(
            "safetensors_checkpoint",
            &format!("{name}.safetensors"),
            &bytes,
        );
    }

    // engine: the tiny F32 checkpoint (with a word-level tokenizer) built by the kiln binary,
    // rewritten and as written.
    let ckpt = dir.path().join("tiny-f32");
    write_tokenizer(&ckpt, cfg.vocab);
    for (extra, name) in [
        (None, "tiny-llama.kiln"),
        (Some("--no-optimize"), "tiny-llama-plain.kiln"),
    ] {
        let out = dir.path().join(name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("build").arg(&ckpt).arg("-o").arg(&out);
        cmd.args(extra);
        let result = cmd.output().unwrap();
        assert!(
            result.status.success(),
            "kiln build: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        write_seed("engine", name, &std::fs::read(&out).unwrap());
    }

    let total: u64 = corpus_files()
        .iter()
        .filter(|(_, f)| f.starts_with(fuzz_dir().join("corpus")))
        .map(|(_, f)| f.metadata().unwrap().len())
        .sum();
    assert!(
        total <= 2 << 20,
        "the seed corpus is {total} bytes (at most 2 MiB)"
    );
}
