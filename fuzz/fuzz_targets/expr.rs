//! Fuzz target `expr`: feeds arbitrary bytes as a size/constant expression of the model
//! language to `kiln_compiler::model::Expr::parse` and, when it parses, evaluates it with
//! `eval_dim` and `eval_f64` with a few integer and real parameters bound. Asserts that all of it
//! returns `Ok` or `Err` and never panics, aborts, overflows the stack or allocates without bound.
//! The harness is `harness::expr` in `fuzz/harness.rs`; bench/fuzz.sh runs it with
//! `-max_len=4096`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::expr(data));
