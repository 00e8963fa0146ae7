//! Fuzz target `gguf_tokenizer`: decodes arbitrary bytes into a syntactically valid GGUF file
//! whose `tokenizer.ggml.*` metadata (model, tokens, merges, token types, special token ids,
//! `add_bos_token`, chat template) comes from the input, so that every input reaches the
//! tokenizer reconstruction (`GgufFile::tokenizer_json`, compiler/src/loader/gguf_tokenizer.rs);
//! a rebuilt `tokenizer.json` is then loaded with `kiln_runtime::tokenizer::Tokenizer` and used
//! to encode and decode text from the input. Asserts that all of it returns `Ok` or `Err` and
//! never panics, aborts, overflows the stack or allocates without bound. The harness is
//! `harness::gguf_tokenizer` in `fuzz/harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::gguf_tokenizer(data));
