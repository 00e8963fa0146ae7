//! Fuzz target `engine`: feeds arbitrary bytes as a `.kiln` engine file to
//! `kiln_runtime::engine::Engine::open` and, when it opens, builds its CPU executor
//! (`cpu_executor()`). Inputs whose header is readable are also opened with their checksum
//! corrected, so mutations reach the graph, config and weight checks behind the checksum.
//! Asserts that all of it returns `Ok` or `Err` and never panics, aborts, overflows the stack or
//! allocates without bound. The harness is `harness::engine` in `fuzz/harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::engine(data));
