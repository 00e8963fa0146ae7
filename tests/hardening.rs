//! Hostile and mistaken input (issue 17), through the `kiln` binary: absurd sizes fail before
//! anything is allocated, no output path can replace an input, an edited engine or checkpoint
//! that would compute something else is refused, and every flag that would be ignored is an
//! error. Each case asserts a clear message, a non-zero exit and no panic (`common::fails`).

mod common;
mod tiny;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tiny::{Storage, TinyConfig};

/// The tiny GQA model with a 64-token context window.
fn config() -> TinyConfig {
    TinyConfig {
        max_positions: 64,
        ..TinyConfig::gqa()
    }
}

/// The tiny checkpoint and its engine, built once per test binary.
fn shared() -> &'static tiny::Built {
    static SHARED: OnceLock<tiny::Built> = OnceLock::new();
    SHARED.get_or_init(|| tiny::Built::new(&config()))
}

/// A copy of the shared checkpoint in `dir` whose config is edited by `edit`.
fn ckpt_with_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(shared().ckpt().join(f), ckpt.join(f)).unwrap();
    }
    let mut json = config().config_json();
    edit(&mut json);
    std::fs::write(ckpt.join("config.json"), json.to_string()).unwrap();
    ckpt
}

fn build_fails(ckpt: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&std::ffi::OsStr> = vec!["build".as_ref(), p(ckpt), "-o".as_ref(), p(out)];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    fails(&args)
}

/// Files in `dir` whose names end in `.partial`.
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

/// A model file over the tiny config whose body is `body` (statements), for `inspect`.
fn inspect_model_fails(dir: &Path, name: &str, body: &str) -> String {
    let model = dir.join(name);
    std::fs::write(
        &model,
        format!(
            r#"Model(family: "toy", params: [("hidden", Config("hidden_size")),
                ("layers", Config("num_hidden_layers"))], body: [{body}])"#
        ),
    )
    .unwrap();
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config().config_json().to_string()).unwrap();
    fails(&["inspect".as_ref(), p(&model), "--config".as_ref(), p(&cfg)])
}

// ---------------------------------------------------------------------------------------------
// Limits before allocation
// ---------------------------------------------------------------------------------------------

#[test]
fn absurd_layer_counts_and_sizes_fail_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.kiln");
    for layers in [
        serde_json::json!(1_000_000_000u64),
        serde_json::json!(1u64 << 62),
        serde_json::json!(-1),
        serde_json::json!(0),
    ] {
        let ckpt = ckpt_with_config(dir.path(), |c| c["num_hidden_layers"] = layers.clone());
        let msg = build_fails(&ckpt, &out, &[]);
        assert!(
            msg.contains("repeat count") && msg.contains("1..=4096"),
            "{msg}"
        );
    }
    let ckpt = ckpt_with_config(dir.path(), |c| c["num_attention_heads"] = 0.into());
    let msg = build_fails(&ckpt, &out, &[]);
    assert!(
        msg.contains("division by zero") && msg.contains("heads = 0"),
        "{msg}"
    );
    let ckpt = ckpt_with_config(dir.path(), |c| c["num_key_value_heads"] = 0.into());
    let msg = build_fails(&ckpt, &out, &[]);
    assert!(msg.contains("division by zero"), "{msg}");
    let ckpt = ckpt_with_config(dir.path(), |c| c["intermediate_size"] = (-32).into());
    let msg = build_fails(&ckpt, &out, &[]);
    assert!(msg.contains("-32 is negative"), "{msg}");
    assert!(!msg.contains("18446744"), "{msg}");
    assert!(!out.exists());
}

#[test]
fn hostile_model_files_are_errors_not_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let msg = inspect_model_fails(
        d,
        "repeat.ron",
        r#"Repeat(count: "1000000000000", index: "i", scope: "l", body: [])"#,
    );
    assert!(msg.contains("outside 1..=4096"), "{msg}");
    // Nested repeats within the per-repeat limit still hit the expansion budget.
    let msg = inspect_model_fails(
        d,
        "nested.ron",
        r#"Repeat(count: "4096", index: "i", scope: "a", body: [
            Repeat(count: "4096", index: "j", scope: "b", body: [
                Let("x", Const("1")),
            ]),
        ])"#,
    );
    assert!(msg.contains("expands to more than"), "{msg}");
    let msg = inspect_model_fails(d, "iota.ron", r#"Let("x", Iota("2000000000"))"#);
    assert!(msg.contains("Iota length 2000000000"), "{msg}");
    let deep = format!("{}1{}", "(".repeat(20_000), ")".repeat(20_000));
    let msg = inspect_model_fails(d, "deep.ron", &format!(r#"Let("x", Const("{deep}"))"#));
    assert!(msg.contains("nested more than 64 deep"), "{msg}");
    let sum = vec!["1"; 50_000].join(" + ");
    let msg = inspect_model_fails(d, "sum.ron", &format!(r#"Let("x", Const("{sum}"))"#));
    assert!(msg.contains("more than 1024 operators"), "{msg}");
    let msg = inspect_model_fails(
        d,
        "slice.ron",
        r#"Let("w", Weight("model.norm.weight", ["hidden"])),
           Let("narrow", Slice(x: "w", axis: 0, start: "8", end: "4"))"#,
    );
    assert!(
        msg.contains("narrow") && msg.contains("Slice 8..4") && msg.contains("not a range"),
        "{msg}"
    );
}

#[test]
fn a_config_without_a_context_length_gets_a_stated_bound() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = ckpt_with_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("max_position_embeddings");
    });
    let out = dir.path().join("ctx.kiln");
    let built = kiln()
        .args(["build".as_ref(), p(&ckpt), "-o".as_ref(), p(&out)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stderr}");
    assert!(stderr.contains("limited to 4096 tokens"), "{stderr}");
    let long: Vec<usize> = (0..5000).map(|i| 1 + i % 50).collect();
    let msg = fails(&[
        "run".as_ref(),
        p(&out),
        "--prompt".as_ref(),
        tiny::words(&long).as_ref(),
    ]);
    assert!(msg.contains("context window is 4096"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Outputs never replace inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn build_never_replaces_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = ckpt_with_config(d, |_| {});
    let gguf = d.join("x.gguf");
    std::fs::write(&gguf, b"GGUF not really").unwrap();
    let model = d.join("m.ron");
    std::fs::write(&model, kiln::compiler::model::LLAMA_RON).unwrap();
    let snapshot = |paths: &[&Path]| -> Vec<Vec<u8>> {
        paths.iter().map(|q| std::fs::read(q).unwrap()).collect()
    };
    let inputs = [
        gguf.clone(),
        model.clone(),
        ckpt.join("model.safetensors"),
        ckpt.join("config.json"),
    ];
    let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let before = snapshot(&refs);

    let msg = build_fails(&gguf, &gguf, &[]);
    assert!(msg.contains("is the input"), "{msg}");
    #[cfg(unix)]
    {
        let link = d.join("link.kiln");
        std::os::unix::fs::symlink(&gguf, &link).unwrap();
        let msg = build_fails(&gguf, &link, &[]);
        assert!(msg.contains("is the input"), "{msg}");
        let hard = d.join("hard.kiln");
        std::fs::hard_link(&gguf, &hard).unwrap();
        let msg = build_fails(&gguf, &hard, &[]);
        assert!(msg.contains("is the input"), "{msg}");
        let msg = build_fails(&ckpt, Path::new("/dev/null"), &[]);
        assert!(msg.contains("not a regular file"), "{msg}");
    }
    for inside in ["model.safetensors", "config.json", "new.kiln"] {
        let msg = build_fails(&ckpt, &ckpt.join(inside), &[]);
        assert!(msg.contains("inside the input folder"), "{msg}");
    }
    let model_arg = model.to_str().unwrap();
    let msg = build_fails(&ckpt, &model, &["--model", model_arg]);
    assert!(msg.contains("is the input"), "{msg}");
    let msg = build_fails(&ckpt, d, &[]);
    assert!(msg.contains("not a regular file"), "{msg}");

    assert_eq!(snapshot(&refs), before, "an input changed");
    assert!(partials(d).is_empty() && partials(&ckpt).is_empty());
}

#[test]
fn concurrent_builds_of_one_output_leave_one_complete_engine() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("same.kiln");
    let spawn = || {
        kiln()
            .args([
                "build".as_ref(),
                p(&shared().ckpt()),
                "-o".as_ref(),
                p(&out),
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    kiln::runtime::engine::Engine::open(&out).unwrap();
    assert!(
        partials(dir.path()).is_empty(),
        "{:?}",
        partials(dir.path())
    );
}

#[test]
fn teacher_force_output_never_replaces_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = dir.path().join("e.kiln");
    std::fs::copy(shared().engine(), &engine).unwrap();
    let input = dir.path().join("in.json");
    std::fs::write(
        &input,
        r#"{"sequences": [{"prompt": [1, 2], "continuation": [3]}]}"#,
    )
    .unwrap();
    let before = std::fs::read(&engine).unwrap();
    for out in [&engine, &input] {
        let msg = fails(&[
            "teacher-force".as_ref(),
            p(&engine),
            "--input".as_ref(),
            p(&input),
            "--output".as_ref(),
            p(out),
        ]);
        assert!(msg.contains("is the input"), "{msg}");
    }
    assert_eq!(std::fs::read(&engine).unwrap(), before);
}

// ---------------------------------------------------------------------------------------------
// Integrity: engines, indexes, unused tensors, unimplemented config keys
// ---------------------------------------------------------------------------------------------

/// The shared engine's tensors and metadata, for rewriting.
fn engine_parts() -> (Vec<u8>, std::collections::HashMap<String, String>) {
    let bytes = std::fs::read(shared().engine()).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    (bytes, meta)
}

/// Writes an engine with the shared engine's tensors and `meta`; with `reseal`, the checksum is
/// recomputed (an engine edited by someone who knows the format).
fn write_engine(path: &Path, mut meta: std::collections::HashMap<String, String>, reseal: bool) {
    let (bytes, _) = engine_parts();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    if reseal {
        let tensors = st.tensors();
        let sum = kiln::runtime::engine::checksum(
            &meta,
            tensors.iter().map(|(n, v)| (n.as_str(), v.data())),
        );
        meta.insert("kiln.checksum".into(), sum);
    }
    let out = safetensors::tensor::serialize(st.tensors(), Some(meta)).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn edited_engine_metadata_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited.kiln");
    let (_, meta) = engine_parts();
    let graph = &meta["kiln.graph"];
    let eps_at = graph.find("eps:").expect("an RmsNorm in the graph");
    let end = eps_at + graph[eps_at..].find(')').unwrap();
    let edits = [
        (
            "kiln.graph",
            format!("{}eps:0.5{}", &graph[..eps_at], &graph[end..]),
        ),
        ("kiln.config", "{}".to_string()),
        ("kiln.tokenizer", "{}".to_string()),
    ];
    for (key, value) in &edits {
        let mut m = meta.clone();
        m.insert(key.to_string(), value.clone());
        write_engine(&path, m, false);
        let msg = fails(&["tokenize".as_ref(), p(&path), "w1".as_ref()]);
        assert!(msg.contains("checksum mismatch"), "{key}: {msg}");
    }
    // Every byte matters: flip bytes spread over the header and the data.
    let good = std::fs::read(shared().engine()).unwrap();
    for k in 0..24 {
        let mut bytes = good.clone();
        let i = k * (bytes.len() - 1) / 23;
        bytes[i] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let msg = fails(&["tokenize".as_ref(), p(&path), "w1".as_ref()]);
        assert!(msg.contains("edited.kiln"), "byte {i}: {msg}");
    }
    // Resealed edits are caught by validation: a NaN epsilon, a stop id outside the vocabulary.
    let mut m = meta.clone();
    m.insert(
        "kiln.graph".into(),
        format!("{}eps:NaN{}", &graph[..eps_at], &graph[end..]),
    );
    write_engine(&path, m, true);
    let msg = fails(&["tokenize".as_ref(), p(&path), "w1".as_ref()]);
    assert!(msg.contains("epsilon NaN"), "{msg}");
    let mut m = meta.clone();
    let mut gen: serde_json::Value = serde_json::from_str(&meta["kiln.generation"]).unwrap();
    gen["stop_token_ids"] = serde_json::json!([1u64 << 31]);
    m.insert("kiln.generation".into(), gen.to_string());
    write_engine(&path, m, true);
    let msg = fails(&["tokenize".as_ref(), p(&path), "w1".as_ref()]);
    assert!(msg.contains("outside the vocabulary"), "{msg}");
    // A resealed, corrupt tokenizer is named with its engine.
    let mut m = meta.clone();
    m.insert("kiln.tokenizer".into(), "{not json".into());
    write_engine(&path, m, true);
    let msg = fails(&["tokenize".as_ref(), p(&path), "w1".as_ref()]);
    assert!(
        msg.contains("edited.kiln") && msg.contains("tokenizer"),
        "{msg}"
    );
}

#[test]
fn paths_that_are_not_files() {
    let dir = tempfile::tempdir().unwrap();
    let msg = fails(&["tokenize".as_ref(), p(dir.path()), "w1".as_ref()]);
    assert!(msg.contains("a folder, not an engine file"), "{msg}");
    #[cfg(unix)]
    {
        let msg = fails(&["tokenize", "/dev/null", "w1"]);
        assert!(msg.contains("not a regular file"), "{msg}");
        let out = dir.path().join("o.kiln");
        let msg = build_fails(Path::new("/dev/zero"), &out, &[]);
        assert!(msg.contains("not a regular file"), "{msg}");
    }
}

#[test]
fn shard_index_cannot_leave_the_checkpoint_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &cfg.random_weights(), Storage::Sharded);
    let index_path = ckpt.join("model.safetensors.index.json");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::copy(
        ckpt.join("model-00001-of-00002.safetensors"),
        outside.join("x.safetensors"),
    )
    .unwrap();
    let out = dir.path().join("o.kiln");
    let absolute = outside.join("x.safetensors").display().to_string();
    for target in ["../outside/x.safetensors", absolute.as_str()] {
        let mut edited = index.clone();
        for v in edited["weight_map"].as_object_mut().unwrap().values_mut() {
            if v == "model-00001-of-00002.safetensors" {
                *v = target.into();
            }
        }
        std::fs::write(&index_path, edited.to_string()).unwrap();
        let msg = build_fails(&ckpt, &out, &[]);
        assert!(
            msg.contains("inside the checkpoint folder"),
            "{target}: {msg}"
        );
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(outside.join("x.safetensors"), ckpt.join("link.safetensors"))
            .unwrap();
        let mut edited = index.clone();
        for v in edited["weight_map"].as_object_mut().unwrap().values_mut() {
            if v == "model-00001-of-00002.safetensors" {
                *v = "link.safetensors".into();
            }
        }
        std::fs::write(&index_path, edited.to_string()).unwrap();
        let msg = build_fails(&ckpt, &out, &[]);
        assert!(msg.contains("outside the folder"), "{msg}");
    }
}

#[test]
fn unused_tensors_and_unimplemented_config_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let mut weights = cfg.random_weights();
    let bias = "model.layers.0.self_attn.q_proj.bias";
    let q = cfg.heads * cfg.head_dim();
    weights.insert(bias.into(), (vec![q], vec![0.5; q]));
    let ckpt = dir.path().join("biased");
    tiny::write_checkpoint(&ckpt, &cfg, &weights, Storage::F32);
    let out = dir.path().join("o.kiln");
    let msg = build_fails(&ckpt, &out, &[]);
    assert!(
        msg.contains(bias) && msg.contains("--allow-unused"),
        "{msg}"
    );
    let built = kiln()
        .args([
            "build".as_ref(),
            p(&ckpt),
            "-o".as_ref(),
            p(&out),
            "--allow-unused".as_ref(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: --allow-unused") && stderr.contains(bias),
        "{stderr}"
    );

    // llama.ron reads `sliding_window` (Mistral) and computes the `llama3` and `linear` RoPE
    // scalings; these keys it does not read, and `yarn` it does not compute.
    for (key, value) in [
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        ),
        ("attn_logit_softcapping", serde_json::json!(50.0)),
        ("attention_bias", serde_json::json!(true)),
        ("final_logit_softcapping", serde_json::json!(30.0)),
        (
            "quantization_config",
            serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128}),
        ),
    ] {
        let ckpt = ckpt_with_config(dir.path(), |c| c[key] = value.clone());
        let msg = build_fails(&ckpt, &dir.path().join("k.kiln"), &[]);
        assert!(msg.contains(&format!("`{key}")), "{msg}");
    }
    let ckpt = ckpt_with_config(dir.path(), |c| c["eos_token_id"] = (1u64 << 40).into());
    let msg = build_fails(&ckpt, &dir.path().join("k.kiln"), &[]);
    assert!(
        msg.contains("eos_token_id") && msg.contains("1099511627776"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// The CLI refuses what it would ignore
// ---------------------------------------------------------------------------------------------

#[test]
fn flags_that_do_not_apply_or_are_out_of_range_are_errors() {
    let engine = shared().engine();
    let e = engine.to_str().unwrap();
    let ckpt = shared().ckpt();
    let c = ckpt.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.kiln");
    let o = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut a = vec!["run", e, "--prompt", "w1 w2"];
        a.extend(extra);
        fails(&a)
    };
    for (args, want) in [
        (vec!["--temperature", "-1"], "temperature -1"),
        (vec!["--temperature", "NaN"], "temperature NaN"),
        (vec!["--temperature", "0.5", "--top-p", "0"], "top-p 0"),
        (vec!["--temperature", "0.5", "--top-p", "1.5"], "top-p 1.5"),
        (
            vec!["--temperature", "0.5", "--top-k", "0"],
            "--top-k must be at least 1",
        ),
        (vec!["--top-k", "5"], "set --temperature above 0"),
        (vec!["--system", "be brief"], "--system needs --chat"),
    ] {
        let msg = run(&args);
        assert!(msg.contains(want), "{args:?}: {msg}");
    }
    for (args, want) in [
        (
            vec!["build", c, "-o", o, "--arch", "sm_80"],
            "--arch applies to GPU engines",
        ),
        (
            vec!["build", c, "-o", o, "--target", "cuda", "--dtype", "f32"],
            "compute in bf16",
        ),
        (vec!["inspect", e, "--layer", "99"], "--layer 99"),
        (vec!["inspect", c, "--layer", "99"], "decoder layers"),
        (
            vec!["bench", e, "--ttft-idle-ms", "500"],
            "--ttft-idle-ms applies to GPU runs",
        ),
        (
            vec!["bench", e, "--timeline"],
            "--timeline applies to GPU runs",
        ),
        (vec!["bench", e, "--device", "tpu"], "unknown device `tpu`"),
        (
            vec!["diff", e, "--ids", "1,2"],
            "a CPU engine has no GPU plan",
        ),
        (
            vec!["inspect", e, "--plan"],
            "a CPU engine has no launch plan",
        ),
        // A checkpoint's plan is lowered here: this one's head size has no GPU kernel.
        (
            vec!["inspect", c, "--plan"],
            "head size 12 is not supported by the GPU attention kernels",
        ),
        (
            vec!["inspect", c, "--plan", "--layer", "0"],
            "--plan prints the whole launch plan",
        ),
    ] {
        let msg = fails(&args);
        assert!(msg.contains(want), "{args:?}: {msg}");
    }
    // Conflicting output formats are refused by the argument parser.
    let out = kiln()
        .args(["inspect", e, "--dot", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    assert!(!Path::new(o).exists());
}

#[test]
fn zero_new_tokens_and_seeds() {
    let engine = shared().engine();
    let e = engine.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut a = vec!["run", e, "--prompt", "w1 w2", "--json", "--ignore-eos"];
        a.extend(extra);
        let v: serde_json::Value = serde_json::from_str(&succeeds(&a)).unwrap();
        v
    };
    let v = run(&["--max-new-tokens", "0"]);
    assert_eq!(ids(&v["generated_ids"]).len(), 0, "{v}");
    assert_eq!(v["text"], "");
    assert!(v["seed"].is_null(), "greedy runs draw no seed: {v}");
    // Sampling without --seed draws one and reports it; passing it back reproduces the run.
    let sampled = |extra: &[&str]| {
        let mut a = vec!["--temperature", "1.5", "--max-new-tokens", "12"];
        a.extend(extra);
        run(&a)
    };
    let (a, b) = (sampled(&[]), sampled(&[]));
    let seed_a = a["seed"].as_u64().expect("a seed in --json");
    assert_ne!(
        seed_a,
        b["seed"].as_u64().unwrap(),
        "two runs drew the same seed"
    );
    let again = sampled(&["--seed", &seed_a.to_string()]);
    assert_eq!(again["generated_ids"], a["generated_ids"]);
}

#[test]
fn tokenize_pieces_and_detokenize() {
    let engine = shared().engine();
    let e = engine.to_str().unwrap();
    let pieces = succeeds(&["tokenize", e, "w3 w17", "--pieces"]);
    assert_eq!(pieces.trim(), "3\tw3\n17\tw17");
    let json = succeeds(&["tokenize", e, "w3", "--pieces", "--json"]);
    assert_eq!(json.trim(), r#"[{"id":3,"piece":"w3"}]"#);
    let text = succeeds(&["detokenize", e, "3", "17,5"]);
    assert_eq!(text.trim(), "w3 w17 w5");
    let text = succeeds(&["detokenize", e, "[3, 4]"]);
    assert_eq!(text.trim(), "w3 w4");
    let msg = fails(&["detokenize", e, "3", "x"]);
    assert!(msg.contains("`x` is not a token id"), "{msg}");
    let msg = fails(&["detokenize", e, "99999"]);
    assert!(msg.contains("99999"), "{msg}");
}

/// A head size the GPU attention kernels cannot run is refused by the lowering, naming the node
/// and the sizes they support, before NVRTC sees a kernel (no raw static-assert dump).
#[test]
fn gpu_build_refuses_an_unsupported_head_size_before_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpu.kiln");
    let head_dim = config().head_dim();
    assert!(![32, 64, 128, 256].contains(&head_dim));
    let msg = build_fails(&shared().ckpt(), &out, &["--target", "cuda"]);
    assert!(
        msg.contains(&format!("head size {head_dim} is not supported"))
            && msg.contains("32, 64, 128 or 256")
            && !msg.contains("static_assert"),
        "{msg}"
    );
}

/// A model file's `requires` refuses a config whose activation its math does not compute.
#[test]
fn a_config_value_the_model_file_does_not_compute_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = ckpt_with_config(dir.path(), |c| c["hidden_act"] = "gelu".into());
    let msg = build_fails(&ckpt, &dir.path().join("o.kiln"), &[]);
    assert!(
        msg.contains("`hidden_act` = \"gelu\"") && msg.contains("silu only"),
        "{msg}"
    );
}

/// A GPU engine (built here with NVRTC, no GPU needed): `inspect --plan` shows its launch plan,
/// `run` without a GPU says to pass `--device cpu`, and with it the engine runs on the CPU.
/// Skipped where NVRTC is missing, unless `KILN_REQUIRE_NVRTC=1` (as `scripts/test.sh` sets).
#[test]
fn a_gpu_engine_without_a_gpu() {
    use kiln::compiler::codegen::nvrtc;
    let ready = nvrtc::ensure_nvrtc().and_then(|_| nvrtc::find_cuda_include().map(|_| ()));
    if let Err(e) = ready {
        assert_ne!(
            std::env::var("KILN_REQUIRE_NVRTC").as_deref(),
            Ok("1"),
            "KILN_REQUIRE_NVRTC=1 but NVRTC is not usable: {e}"
        );
        eprintln!("skipping: {e}");
        return;
    }
    if kiln::runtime::cuda::device_arch().is_ok() {
        eprintln!("skipping: this machine has a GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Head size 32 and widths the GPU kernels take.
    let cfg = TinyConfig {
        hidden: 64,
        heads: 2,
        kv_heads: 1,
        ffn: 64,
        max_positions: 64,
        ..TinyConfig::gqa()
    };
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &cfg.random_weights(), Storage::F32);
    tiny::write_tokenizer(&ckpt, cfg.vocab);
    let engine = dir.path().join("gpu.kiln");
    let built = kiln()
        .args(["build".as_ref(), p(&ckpt), "-o".as_ref(), p(&engine)])
        .args(["--target", "cuda"])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let e = engine.to_str().unwrap();
    let plan = succeeds(&["inspect", e, "--plan"]);
    assert!(
        plan.contains("attention: 2 heads, 1 KV heads, head_dim 32")
            // The graph computes in bf16, as the kernels do (its weights rounded once, derived).
            && plan.contains("Embedding table=bf16(model.embed_tokens.weight)")
            && plan.contains("Attention layer=1")
            // Each launch's kernels by the kind of step, template arguments named.
            && plan.contains("1 row: Gemv { k: 64, mmax: 1, epi: Plain, norm: true, out: Bf16 }")
            && plan.contains("leading one-row sequences (decodes): AttentionDecode(AttentionShape { heads: 2, kv_heads: 1, head_dim: 32, block: 16 })"),
        "{plan}"
    );
    let msg = fails(&["run", e, "--prompt", "w1 w2"]);
    assert!(msg.contains("--device cpu"), "{msg}");
    let out = succeeds(&[
        "run",
        e,
        "--prompt",
        "w1 w2",
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&v["generated_ids"]).len(), 3, "{v}");
}
