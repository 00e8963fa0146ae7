//! Fuzz target `safetensors_checkpoint`: feeds arbitrary bytes as the `model.safetensors` of a
//! checkpoint folder whose `config.json` is a small valid Llama config, through
//! `kiln_compiler::loader::Checkpoint::open`, `tensors()`, `read_f32` of every tensor and the
//! weight check against the Llama graph of that config. Asserts that all of it returns `Ok` or
//! `Err` and never panics, aborts, overflows the stack or allocates without bound. The harness
//! is `harness::safetensors_checkpoint` in `fuzz/harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::safetensors_checkpoint(data));
