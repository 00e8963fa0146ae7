//! Fuzz target `model_ron`: feeds arbitrary bytes as model-language text (RON) to
//! `kiln_compiler::model::ModelFile::parse` and, when it parses, binds it to a small Llama config
//! and expands it into a graph with `kiln_compiler::build::graph_for`, then round-trips that
//! graph through its RON form. Asserts that all of it returns `Ok` or `Err` and never panics,
//! aborts, overflows the stack or allocates without bound. The harness is `harness::model_ron`
//! in `fuzz/harness.rs`; bench/fuzz.sh runs it with `-max_len=16384`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::model_ron(data));
