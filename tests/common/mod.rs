//! Shared helpers of the end-to-end tests: the demo model, fixtures, error metrics.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Path of the repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The SmolLM2-135M-Instruct GGUF: `KILN_DEMO_GGUF`, else fetched (cached) by the fetch script.
pub fn demo_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_DEMO_GGUF") {
        return PathBuf::from(p);
    }
    let out = Command::new("bash")
        .arg(root().join("scripts/fetch-demo-model.sh"))
        .output()
        .expect("run fetch-demo-model.sh");
    assert!(
        out.status.success(),
        "fetching the demo model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A file of the SmolLM2 reference fixtures.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/smollm2-135m").join(name)
}

/// The reference `public.json`.
pub fn public_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("public.json")).unwrap()).unwrap()
}

/// Reads an f32 tensor of a safetensors file.
pub fn read_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den).sqrt()
}

/// Ids of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The `kiln` binary built for this test run.
pub fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// Runs `kiln` with `args`; asserts it fails without a panic and returns its stderr.
pub fn fails<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = kiln().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(
        !out.status.success(),
        "kiln {shown:?} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !stderr.contains("panicked"),
        "kiln {shown:?} panicked: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "kiln {shown:?}: {stderr}");
    eprintln!("kiln {shown:?}\n  -> {}", stderr.trim());
    stderr
}

/// Runs `kiln` with `args`; asserts it succeeds and returns its stdout.
pub fn succeeds<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = kiln().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A path as a command-line argument.
pub fn p(path: &Path) -> &OsStr {
    path.as_os_str()
}
