//! llama.cpp's own tokenizer cases: for each `models/ggml-vocab-*.gguf` of llama.cpp (fetched by
//! `scripts/fetch-llama-vocab.sh`, found through `KILN_LLAMA_VOCAB`), the tokenizer kiln rebuilds
//! from the GGUF metadata must encode every `.gguf.inp` case to the ids of `.gguf.out`, which
//! llama.cpp's `tests/test-tokenizer-0.cpp` checks (no special tokens added, none parsed).
//! Byte-level BPE and SentencePiece (llama-spm, phi-3, gemma-4) vocabularies alike; a
//! pre-tokenizer type or tokenizer model kiln does not support must be refused with an error
//! naming the key. Without `KILN_LLAMA_VOCAB` the test is skipped, unless
//! `KILN_REQUIRE_NVRTC=1` (CI) makes skipping an error.

use std::path::{Path, PathBuf};

use kiln::compiler::loader::gguf::GgufFile;
use kiln::runtime::tokenizer::Tokenizer;

/// The vocabulary folder, or `None` (after saying so) when the test is skipped.
fn vocab_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_LLAMA_VOCAB") {
        return Some(PathBuf::from(p));
    }
    assert!(
        std::env::var_os("KILN_REQUIRE_NVRTC").is_none_or(|v| v != "1"),
        "KILN_LLAMA_VOCAB is not set but KILN_REQUIRE_NVRTC=1: run scripts/fetch-llama-vocab.sh \
         and export KILN_LLAMA_VOCAB=<the folder it prints> (scripts/test.sh does)"
    );
    println!("skipping: KILN_LLAMA_VOCAB is not set (run scripts/fetch-llama-vocab.sh)");
    None
}

/// The cases of `ggml-vocab-<name>.gguf`: input text and expected ids, parsed as
/// test-tokenizer-0.cpp does (inputs separated by `\n__ggml_vocab_test__\n`, one line of
/// space-separated ids per input).
fn cases(dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let base = dir.join(format!("ggml-vocab-{name}.gguf"));
    let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(i) => {
                inputs.push(rest[..i].to_string());
                rest = &rest[i + sep.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                rest = "";
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(inputs.len(), outputs.len(), "{name}: inputs vs outputs");
    inputs.into_iter().zip(outputs).collect()
}

/// Encodes every case of `name` with kiln's tokenizer; returns (passed, total) after printing
/// each failure.
fn run_vocab(dir: &Path, name: &str) -> (usize, usize) {
    let f = GgufFile::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    let json = f.tokenizer_json().unwrap_or_else(|e| panic!("{name}: {e}"));
    let tok = Tokenizer::from_json(&json).unwrap_or_else(|e| panic!("{name}: {e}"));
    let cases = cases(dir, name);
    let mut passed = 0;
    for (text, want) in &cases {
        let got = tok.encode(text).unwrap();
        if &got == want {
            passed += 1;
        } else {
            println!("{name}: {text:?}\n  llama.cpp: {want:?}\n  kiln:      {got:?}");
        }
    }
    println!("{name}: {passed}/{} cases agree", cases.len());
    (passed, cases.len())
}

/// The vocabularies kiln supports: every case must agree.
const SUPPORTED: &[&str] = &[
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "llama-spm",
    "phi-3",
    "gemma-4",
];

#[test]
fn llama_vocab_cases_agree() {
    let Some(dir) = vocab_dir() else { return };
    let mut failed = Vec::new();
    for name in SUPPORTED {
        let (passed, total) = run_vocab(&dir, name);
        assert!(total > 0, "{name}: no cases");
        if passed != total {
            failed.push(format!("{name} ({passed}/{total})"));
        }
    }
    assert!(
        failed.is_empty(),
        "disagreements with llama.cpp: {failed:?}"
    );
}

#[test]
fn llama_vocab_unsupported_refused() {
    let Some(dir) = vocab_dir() else { return };
    let err = |name: &str| {
        let f = GgufFile::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        f.tokenizer_json().unwrap_err().to_string()
    };
    // A byte-level BPE vocabulary with a pre-tokenizer type kiln does not support.
    let e = err("deepseek-coder");
    assert!(
        e.contains("tokenizer.ggml.pre") && e.contains("deepseek-coder"),
        "deepseek-coder: {e}"
    );
    println!("deepseek-coder: refused: {e}");
}
