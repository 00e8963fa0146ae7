//! Fuzz target `gguf`: feeds arbitrary bytes as a GGUF file to
//! `kiln_compiler::loader::gguf::GgufFile::open` and, when it opens, to every accessor — metadata
//! values, architecture, `hf_config`, the tensor list, `read_f32` of every tensor (dequantization
//! and the Q/K unpermutation), `tokenizer_json` and `chat_template` — then opens the same file as
//! a `kiln_compiler::loader::Checkpoint`. Asserts that all of it returns `Ok` or `Err` and never
//! panics, aborts, overflows the stack or allocates without bound (the last two enforced by
//! libFuzzer's limits). The harness is `harness::gguf` in `fuzz/harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::gguf(data));
