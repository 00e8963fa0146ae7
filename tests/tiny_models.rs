//! Tiny random Llama models against an independent oracle. Each test writes a HF checkpoint
//! folder (config.json + safetensors) with fresh random weights, builds an engine from it with
//! kiln, and compares kiln's logits with a naive Llama forward pass written below in plain loops
//! (f64, full sequence, no KV cache). Covered: MHA, GQA and MQA; tied and untied embeddings; odd
//! sizes (hidden 48, head_dim 16/12/10, ffn 40, vocab 97); an explicit `head_dim` that differs from
//! `hidden / heads`; the nested `rope_parameters.rope_theta` key; BF16 and sharded checkpoints;
//! prefill, incremental decoding with the KV cache, and a batch of two sequences.

mod common;
mod tiny;

use common::*;
use kiln::compiler::build::{graph_for, model_for};
use kiln::compiler::{build, BuildOptions};
use kiln::runtime::engine::Engine;
use std::ffi::OsStr;
use std::path::Path;
use tiny::{Storage, TinyConfig, Weights, XorShift};

// ---------------------------------------------------------------------------------------------
// The oracle: a Llama forward pass as the HF modeling code defines it, one token and one head at
// a time, in f64.
// ---------------------------------------------------------------------------------------------

/// What the naive model computes for every position: logits and the final-norm hidden state.
struct NaiveOut {
    logits: Vec<Vec<f64>>,
    hidden: Vec<Vec<f64>>,
}

fn tensor<'a>(w: &'a Weights, name: &str) -> &'a [f32] {
    &w.get(name).unwrap_or_else(|| panic!("no weight {name}")).1
}

/// `W x` for `W` `[out, in]` row-major.
fn linear(w: &[f32], x: &[f64]) -> Vec<f64> {
    let k = x.len();
    assert_eq!(w.len() % k, 0);
    w.chunks_exact(k)
        .map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * b).sum())
        .collect()
}

/// `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * *g as f64).collect()
}

/// HF `rotate_half` RoPE of one head vector at position `pos`: pairs `(i, i + d/2)` rotate by
/// `pos · inv_freq[i]`, `inv_freq[i] = 1 / theta^(2i/d)`.
fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let inv_freq = 1.0 / theta.powf((2 * i) as f64 / d as f64);
        let (s, c) = (pos as f64 * inv_freq).sin_cos();
        let (x1, x2) = (x[i], x[i + half]);
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// The full forward pass of one sequence.
fn naive_forward(cfg: &TinyConfig, w: &Weights, tokens: &[usize]) -> NaiveOut {
    let (h, d) = (cfg.hidden, cfg.head_dim());
    let group = cfg.heads / cfg.kv_heads;
    let embed = tensor(w, "model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            embed[t * h..(t + 1) * h]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for l in 0..cfg.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        // Attention: project every position, rotate, then attend causally.
        let mut q = vec![];
        let mut k = vec![];
        let mut v = vec![];
        for (pos, xt) in x.iter().enumerate() {
            let hn = rms_norm(xt, tensor(w, &p("input_layernorm.weight")), cfg.eps);
            let mut qt = linear(tensor(w, &p("self_attn.q_proj.weight")), &hn);
            let mut kt = linear(tensor(w, &p("self_attn.k_proj.weight")), &hn);
            for head in qt.chunks_exact_mut(d) {
                rope(head, pos, cfg.theta);
            }
            for head in kt.chunks_exact_mut(d) {
                rope(head, pos, cfg.theta);
            }
            q.push(qt);
            k.push(kt);
            v.push(linear(tensor(w, &p("self_attn.v_proj.weight")), &hn));
        }
        for t in 0..x.len() {
            let mut ctx = vec![0.0; cfg.heads * d];
            for head in 0..cfg.heads {
                let kvh = head / group;
                let qh = &q[t][head * d..(head + 1) * d];
                let scores: Vec<f64> = (0..=t)
                    .map(|s| {
                        let ks = &k[s][kvh * d..(kvh + 1) * d];
                        qh.iter().zip(ks).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (s, e) in exps.iter().enumerate() {
                    let vs = &v[s][kvh * d..(kvh + 1) * d];
                    for (c, vv) in ctx[head * d..(head + 1) * d].iter_mut().zip(vs) {
                        *c += e / total * vv;
                    }
                }
            }
            let o = linear(tensor(w, &p("self_attn.o_proj.weight")), &ctx);
            for (a, b) in x[t].iter_mut().zip(&o) {
                *a += b;
            }
        }
        // Gated MLP, position by position.
        for xt in x.iter_mut() {
            let m = rms_norm(
                xt,
                tensor(w, &p("post_attention_layernorm.weight")),
                cfg.eps,
            );
            let g = linear(tensor(w, &p("mlp.gate_proj.weight")), &m);
            let u = linear(tensor(w, &p("mlp.up_proj.weight")), &m);
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
            let down = linear(tensor(w, &p("mlp.down_proj.weight")), &act);
            for (a, b) in xt.iter_mut().zip(&down) {
                *a += b;
            }
        }
    }
    let hidden: Vec<Vec<f64>> = x
        .iter()
        .map(|xt| rms_norm(xt, tensor(w, "model.norm.weight"), cfg.eps))
        .collect();
    let head = if cfg.tied {
        tensor(w, "model.embed_tokens.weight")
    } else {
        tensor(w, "lm_head.weight")
    };
    let logits = hidden.iter().map(|f| linear(head, f)).collect();
    NaiveOut { logits, hidden }
}

fn flat(rows: &[Vec<f64>]) -> Vec<f32> {
    rows.iter().flatten().map(|&v| v as f32).collect()
}

// ---------------------------------------------------------------------------------------------
// kiln side
// ---------------------------------------------------------------------------------------------

const TOL: f64 = 1e-5;

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let err = rel_l2(got, want);
    eprintln!("{what}: relative L2 error {err:.3e}");
    assert!(err <= TOL, "{what}: relative L2 error {err:.3e} > {TOL:e}");
}

/// Writes the checkpoint and builds its engine with `opts`; returns the engine and the weights
/// the checkpoint holds.
fn build_tiny(
    dir: &Path,
    cfg: &TinyConfig,
    storage: Storage,
    opts: &BuildOptions,
) -> (Engine, Weights) {
    let ckpt = dir.join("ckpt");
    let weights = tiny::write_checkpoint(&ckpt, cfg, &cfg.random_weights(), storage);
    let out = dir.join("tiny.kiln");
    build(&ckpt, &out, opts, &|_, _| {}).unwrap();
    (Engine::open(&out).unwrap(), weights)
}

/// Build options without the rewriter: the engine holds the graph as the model file writes it.
fn as_written() -> BuildOptions {
    BuildOptions {
        no_optimize: true,
        ..Default::default()
    }
}

fn random_tokens(cfg: &TinyConfig, n: usize) -> Vec<usize> {
    let mut rng = XorShift::new(cfg.seed + 1000);
    (0..n).map(|_| rng.below(cfg.vocab)).collect()
}

fn as_i32(tokens: &[usize]) -> Vec<i32> {
    tokens.iter().map(|&t| t as i32).collect()
}

/// The whole check of one configuration, on two engines: one built as written (whose graph
/// must be exactly the graph expanded directly from the model file) and one built by default
/// (through the rewriter). For each, a 7-token prefill matches the oracle (logits and final
/// hidden state at every position), and prefilling 4 tokens then decoding 3 one at a time with
/// the KV cache matches the oracle run on each full prefix.
fn check(cfg: &TinyConfig, storage: Storage) {
    let dir = tempfile::tempdir().unwrap();
    let (engine, weights) = build_tiny(&dir.path().join("plain"), cfg, storage, &as_written());
    let config = cfg.config_json();
    let direct = graph_for(&model_for(&config, None).unwrap(), &config).unwrap();
    assert!(
        engine.graph == direct,
        "the engine's graph differs from the graph built directly"
    );
    check_engine("as written", cfg, &engine, &weights);

    let (engine, weights) = build_tiny(
        &dir.path().join("optimized"),
        cfg,
        storage,
        &BuildOptions::default(),
    );
    check_engine("optimized", cfg, &engine, &weights);
}

fn check_engine(label: &str, cfg: &TinyConfig, engine: &Engine, weights: &Weights) {
    let assert_close = |what: &str, got: &[f32], want: &[f32]| {
        assert_close(&format!("{label}: {what}"), got, want)
    };
    let exec = engine.cpu_executor().unwrap();
    let tokens = random_tokens(cfg, 7);
    let want = naive_forward(cfg, weights, &tokens);

    let mut session = exec.session(1);
    let out = exec.step(&mut session, &as_i32(&tokens), &[]).unwrap();
    let logits = &out.outputs["logits"];
    assert_eq!(logits.shape, [1, 7, cfg.vocab]);
    assert_close(
        "prefill logits (7 tokens)",
        &logits.data,
        &flat(&want.logits),
    );
    assert_close(
        "prefill final hidden state",
        &out.outputs["hidden"].data,
        &flat(&want.hidden),
    );
    assert_eq!(session.past(), 7);

    let mut session = exec.session(1);
    let out = exec.step(&mut session, &as_i32(&tokens[..4]), &[]).unwrap();
    let prefix = naive_forward(cfg, weights, &tokens[..4]);
    assert_close(
        "prefill logits (4 tokens)",
        &out.outputs["logits"].data,
        &flat(&prefix.logits),
    );
    for n in 5..=7 {
        let out = exec
            .step(&mut session, &as_i32(&tokens[n - 1..n]), &[])
            .unwrap();
        let logits = &out.outputs["logits"];
        assert_eq!(logits.shape, [1, 1, cfg.vocab]);
        assert_eq!(session.past(), n);
        let want = naive_forward(cfg, weights, &tokens[..n]);
        assert_close(
            &format!("decode step to {n} tokens, last-position logits"),
            &logits.data,
            &flat(&want.logits[n - 1..]),
        );
    }
}

#[test]
fn mha_untied() {
    check(&TinyConfig::mha(), Storage::F32);
}

#[test]
fn gqa_tied_nested_rope_theta() {
    check(&TinyConfig::gqa(), Storage::F32);
}

#[test]
fn mqa_untied_explicit_head_dim() {
    check(&TinyConfig::mqa(), Storage::F32);
}

#[test]
fn bf16_checkpoint() {
    check(
        &TinyConfig {
            seed: 11,
            ..TinyConfig::gqa()
        },
        Storage::Bf16,
    );
}

#[test]
fn sharded_checkpoint() {
    check(
        &TinyConfig {
            seed: 12,
            ..TinyConfig::mha()
        },
        Storage::Sharded,
    );
}

/// Two sequences of different tokens in one batch: each row matches the oracle on its own, in
/// prefill and in a decode step.
#[test]
fn batch_of_two_sequences() {
    let cfg = TinyConfig {
        seed: 13,
        ..TinyConfig::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    let (engine, weights) = build_tiny(dir.path(), &cfg, Storage::F32, &BuildOptions::default());
    let exec = engine.cpu_executor().unwrap();
    let all = random_tokens(&cfg, 12);
    let (a, b) = (&all[..6], &all[6..]);
    let mut session = exec.session(2);
    let prompt: Vec<usize> = a[..5].iter().chain(&b[..5]).copied().collect();
    let out = exec.step(&mut session, &as_i32(&prompt), &[]).unwrap();
    let logits = &out.outputs["logits"];
    assert_eq!(logits.shape, [2, 5, cfg.vocab]);
    let rows = 5 * cfg.vocab;
    for (k, seq) in [a, b].iter().enumerate() {
        let want = naive_forward(&cfg, &weights, &seq[..5]);
        assert_close(
            &format!("batch row {k}, prefill"),
            &logits.data[k * rows..(k + 1) * rows],
            &flat(&want.logits),
        );
    }
    let out = exec
        .step(&mut session, &as_i32(&[a[5], b[5]]), &[])
        .unwrap();
    let logits = &out.outputs["logits"];
    assert_eq!(logits.shape, [2, 1, cfg.vocab]);
    for (k, seq) in [a, b].iter().enumerate() {
        let want = naive_forward(&cfg, &weights, seq);
        assert_close(
            &format!("batch row {k}, decode"),
            &logits.data[k * cfg.vocab..(k + 1) * cfg.vocab],
            &flat(&want.logits[5..]),
        );
    }
}

/// Quantized engines (`--quant`): every linear weight but the output projection (and the
/// embedding a tied head reads) is stored in the weight format, and the engine computes exactly
/// what the oracle computes with those weights replaced by their dequantized values
/// (`quant::round_trip`). So the rules, the packing into the engine and the dequantization on
/// load agree, for each format, with partial int4 groups (hidden 48, ffn 40 in groups of 32).
#[test]
fn quantized_engines_compute_with_their_dequantized_weights() {
    use kiln::compiler::rewrite::rules::quant::{skip_matches, QuantOptions, DEFAULT_SKIP};
    use kiln::runtime::ir::DType;
    use kiln::runtime::quant::round_trip;
    let formats = [
        DType::Int8,
        DType::Int4 {
            group: 32,
            zero_point: true,
        },
        DType::Int4 {
            group: 32,
            zero_point: false,
        },
    ];
    for ((label, cfg), format) in [("mha", TinyConfig::mha()), ("gqa tied", TinyConfig::gqa())]
        .into_iter()
        .flat_map(|c| formats.map(|f| (c.clone(), f)))
    {
        let skip: Vec<String> = DEFAULT_SKIP.iter().map(|s| s.to_string()).collect();
        let opts = BuildOptions {
            quant: Some(QuantOptions {
                format,
                skip: skip.clone(),
            }),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (engine, weights) = build_tiny(dir.path(), &cfg, Storage::F32, &opts);
        let stored: Vec<DType> = engine
            .graph
            .weights()
            .map(|(id, _)| engine.graph.nodes[id].ty.dtype)
            .filter(|d| d.is_weight_format())
            .collect();
        // Per layer: the fused q/k/v, o, the fused gate/up, and down.
        assert_eq!(stored.len(), 4 * cfg.layers, "{}", format.name());
        assert!(stored.iter().all(|&d| d == format));
        let mut dequantized = weights.clone();
        let mut changed = 0;
        for (name, (shape, data)) in dequantized.iter_mut() {
            if shape.len() == 2 && !skip.iter().any(|p| skip_matches(p, name)) {
                *data = round_trip(format, data, shape[0], shape[1]).unwrap();
                changed += 1;
            }
        }
        assert_eq!(changed, 7 * cfg.layers);
        check_engine(
            &format!("{label} {}", format.name()),
            &cfg,
            &engine,
            &dequantized,
        );
    }
}

/// The CLI on a tiny checkpoint without a tokenizer: `kiln build` and `kiln inspect` work;
/// `kiln run` and `kiln tokenize` fail with a clear message, not a panic.
#[test]
fn cli_build_inspect_and_missing_tokenizer() {
    let cfg = TinyConfig::mqa();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &cfg.random_weights(), Storage::F32);
    let engine = dir.path().join("tiny.kiln");

    let out = kiln()
        .arg("build")
        .arg(&ckpt)
        .arg("-o")
        .arg(&engine)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln build failed: {stderr}");
    assert!(stderr.contains("built"), "{stderr}");
    assert!(engine.is_file());
    assert!(!dir.path().join("tiny.kiln.partial").exists());

    // `kiln inspect` prints the graph of the engine and of the checkpoint folder.
    for target in [&engine, &ckpt] {
        let out = kiln().arg("inspect").arg(target).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kiln inspect {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("output logits"), "{text}");
        assert!(text.contains("f32[batch, seq, 97]"), "{text}");
        assert!(text.contains("model.layers.1.self_attn."), "{text}");
    }

    for args in [
        vec![
            "run".as_ref(),
            engine.as_os_str(),
            "--prompt".as_ref(),
            "hi".as_ref(),
        ],
        vec!["tokenize".as_ref(), engine.as_os_str(), "hi".as_ref()],
    ] {
        let out = kiln().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains("this engine has no tokenizer"), "{stderr}");
    }
}

/// The worked example of `docs/model-language.md` (a toy family with a ReLU MLP per layer) is
/// taken from the page, built with `kiln build --model` on a checkpoint written here, and run:
/// its logits match a direct computation, so the documented example stays true.
#[test]
fn documented_toy_family_builds_and_runs() {
    let page = std::fs::read_to_string(root().join("docs/model-language.md")).unwrap();
    let section = &page[page
        .find("## Worked example")
        .expect("worked example section")..];
    let start = section.find("```ron\n").expect("a ron block") + "```ron\n".len();
    let text = &section[start..start + section[start..].find("```").unwrap()];

    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("toy.ron");
    std::fs::write(&model, text).unwrap();
    let (hidden, ffn, vocab, layers) = (8, 16, 11, 2);
    let config = serde_json::json!({"model_type": "toy", "hidden_size": hidden,
        "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": ffn});
    let mut rng = XorShift::new(77);
    let mut weights = Weights::new();
    let mut put = |name: String, shape: Vec<usize>| {
        let data = (0..shape.iter().product())
            .map(|_| rng.weight(0.5))
            .collect();
        weights.insert(name, (shape, data));
    };
    put("embed.weight".into(), vec![vocab, hidden]);
    put("head.weight".into(), vec![vocab, hidden]);
    for i in 0..layers {
        put(format!("blocks.{i}.fc_in.weight"), vec![ffn, hidden]);
        put(format!("blocks.{i}.fc_out.weight"), vec![hidden, ffn]);
    }
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        ckpt.join("model.safetensors"),
        tiny::safetensors_bytes(
            weights.iter().map(|(n, t)| (n.as_str(), t)),
            safetensors::Dtype::F32,
        ),
    )
    .unwrap();
    let out = dir.path().join("toy.kiln");
    let status = kiln()
        .arg("build")
        .arg(&ckpt)
        .arg("-o")
        .arg(&out)
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "kiln build --model toy.ron: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let engine = Engine::open(&out).unwrap();
    let exec = engine.cpu_executor().unwrap();
    let tokens = [3usize, 0, 10, 7];
    let mut session = exec.session(1);
    let got = exec.step(&mut session, &as_i32(&tokens), &[]).unwrap();

    let mut want = vec![];
    for &t in &tokens {
        let e = tensor(&weights, "embed.weight");
        let mut x: Vec<f64> = e[t * hidden..(t + 1) * hidden]
            .iter()
            .map(|&v| v as f64)
            .collect();
        for i in 0..layers {
            let a = linear(tensor(&weights, &format!("blocks.{i}.fc_in.weight")), &x);
            let r: Vec<f64> = a.iter().map(|v| v.max(0.0)).collect();
            let b = linear(tensor(&weights, &format!("blocks.{i}.fc_out.weight")), &r);
            x.iter_mut().zip(&b).for_each(|(x, b)| *x += b);
        }
        want.push(linear(tensor(&weights, "head.weight"), &x));
    }
    let logits = &got.outputs["logits"];
    assert_eq!(logits.shape, [1, 4, vocab]);
    assert_close("toy family logits", &logits.data, &flat(&want));
}

/// `kiln build --quant`: the flags that do not apply, the formats not built yet, and a GPU build
/// of a quantized graph are refused by name, before anything is written; a quantized CPU engine
/// is smaller and `kiln inspect` shows its weights' formats.
#[test]
fn cli_quantized_builds_and_refusals() {
    let cfg = TinyConfig::mha();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &cfg.random_weights(), Storage::F32);
    let out = dir.path().join("q.kiln");
    let build = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut args = vec![
            "build".into(),
            ckpt.clone().into(),
            "-o".into(),
            out.clone().into(),
        ];
        args.extend(extra.iter().map(|a| a.into()));
        args
    };
    for (extra, says) in [
        (
            &["--quant", "w8a8"][..],
            "--quant w8a8 (SmoothQuant INT8) is not supported yet",
        ),
        (
            &["--quant", "fp8", "--group", "64"],
            "--group applies to int4",
        ),
        (&["--quant", "int4-awq"], "the checkpoint has no tokenizer"),
        (&["--quant", "int4-gptq"], "the checkpoint has no tokenizer"),
        (
            &["--quant", "int8", "--calib", "x.txt"],
            "--calib applies to the calibrated formats",
        ),
        (&["--quant", "int5"], "unknown --quant `int5`"),
        (
            &["--quant", "int4", "--act-order"],
            "needs --quant int4-gptq",
        ),
        (
            &["--quant", "int4", "--group", "100"],
            "groups of 32, 64 or 128",
        ),
        (&["--group", "64"], "add --quant"),
        (&["--quant-skip", "lm_head"], "add --quant"),
        (
            &["--quant", "int8", "--group", "64"],
            "--group applies to int4",
        ),
        (
            &["--quant", "int8", "--no-optimize"],
            "--quant needs the rewriter",
        ),
    ] {
        let err = fails(&build(extra));
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left an output");
    }
    let plain = dir.path().join("plain.kiln");
    succeeds(&[OsStr::new("build"), p(&ckpt), "-o".as_ref(), p(&plain)]);
    succeeds(&build(&["--quant", "int4", "--group", "32"]));
    let size = |f: &Path| std::fs::metadata(f).unwrap().len();
    assert!(
        size(&out) < size(&plain),
        "{} vs {}",
        size(&out),
        size(&plain)
    );
    let text = succeeds(&[OsStr::new("inspect"), p(&out)]);
    assert!(
        text.contains(
            "int4g32z[48, 48] = Weight(int4g32z(model.layers.0.self_attn.o_proj.weight))"
        ),
        "{text}"
    );
    assert!(
        text.contains("f32[97, 48] = Weight(lm_head.weight)"),
        "{text}"
    );
    let json = succeeds(&[OsStr::new("inspect"), p(&out), "--json".as_ref()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let int4 = &v["weights_by_format"]["int4g32z"];
    assert_eq!(int4["weights"], 4 * cfg.layers, "{json}");
    assert!(int4["bytes"].as_u64().unwrap() > 0, "{json}");
}

/// `kiln build --tp 2` (and `--pp 3`, and both) writes one engine per rank; `kiln run --tp 2`
/// runs them together and generates the same greedy tokens as the unsharded engine. A rank
/// alone, ranks of two builds, and the combinations not built yet are refused by name.
#[test]
fn cli_parallel_build_and_run() {
    // Vocabulary 96 so the embedding and the output projection split over the ranks.
    let cfg = TinyConfig {
        vocab: 96,
        ..TinyConfig::gqa()
    };
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &cfg.random_weights(), Storage::F32);
    tiny::write_tokenizer(&ckpt, cfg.vocab);
    let whole = dir.path().join("whole.kiln");
    let tp = dir.path().join("tp.kiln");
    succeeds(&[OsStr::new("build"), p(&ckpt), "-o".as_ref(), p(&whole)]);
    let out = kiln()
        .args([
            OsStr::new("build"),
            p(&ckpt),
            "-o".as_ref(),
            p(&tp),
            "--tp".as_ref(),
            "2".as_ref(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("1 vocabulary-parallel lookup(s); 7 all-reduce(s) and 1 all-gather(s)"),
        "{stderr}"
    );
    let ranks = [
        dir.path().join("tp.rank0-of-2.kiln"),
        dir.path().join("tp.rank1-of-2.kiln"),
    ];
    assert!(ranks.iter().all(|r| r.is_file()) && !tp.exists());

    let run = |engine: &Path, extra: &[&str]| -> Vec<u64> {
        let mut args = vec![
            OsStr::new("run"),
            p(engine),
            "--prompt".as_ref(),
            "w1 w7 w42 w3".as_ref(),
            "--max-new-tokens".as_ref(),
            "6".as_ref(),
            "--ignore-eos".as_ref(),
            "--json".as_ref(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let v: serde_json::Value = serde_json::from_str(&succeeds(&args)).unwrap();
        v["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap())
            .collect()
    };
    let want = run(&whole, &[]);
    assert_eq!(want.len(), 6);
    assert_eq!(run(&tp, &["--tp", "2"]), want);

    let err = fails(&[
        OsStr::new("run"),
        p(&ranks[0]),
        "--prompt".as_ref(),
        "w1".as_ref(),
    ]);
    assert!(
        err.contains("rank 0 of a 2-rank parallel build") && err.contains("--tp 2"),
        "{err}"
    );
    let err = fails(&[
        OsStr::new("run"),
        p(&tp),
        "--tp".as_ref(),
        "4".as_ref(),
        "--prompt".as_ref(),
        "w1".as_ref(),
    ]);
    assert!(err.contains("tp.rank0-of-4.kiln"), "{err}");
    // The scheduler drives the ranks too (`kiln bench --throughput`, `kiln serve`).
    let json = succeeds(&[
        OsStr::new("bench"),
        p(&tp),
        "--throughput".as_ref(),
        "--tp".as_ref(),
        "2".as_ref(),
        "--requests".as_ref(),
        "6".as_ref(),
        "--io".as_ref(),
        "8:4".as_ref(),
        "--json".as_ref(),
    ]);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows[0]["requests"], 6, "{json}");
    assert_eq!(rows[0]["output_tokens"], 24, "{json}");
    // Pipeline stages, alone and with tensor parallelism (3 layers: a stage per layer).
    for (flags, files) in [(&["--pp", "3"][..], 3), (&["--tp", "2", "--pp", "3"], 6)] {
        let out = dir.path().join(format!("pp{files}.kiln"));
        let mut args = vec![OsStr::new("build"), p(&ckpt), "-o".as_ref(), p(&out)];
        args.extend(flags.iter().map(OsStr::new));
        succeeds(&args);
        let last = dir
            .path()
            .join(format!("pp{files}.rank{}-of-{files}.kiln", files - 1));
        assert!(last.is_file(), "{flags:?}");
        assert_eq!(run(&out, flags), want, "{flags:?}");
    }
    // A rank of another build (bf16) in place of rank 1.
    let other = dir.path().join("other.kiln");
    succeeds(&[
        OsStr::new("build"),
        p(&ckpt),
        "-o".as_ref(),
        p(&other),
        "--tp".as_ref(),
        "2".as_ref(),
        "--dtype".as_ref(),
        "bf16".as_ref(),
    ]);
    std::fs::copy(dir.path().join("other.rank1-of-2.kiln"), &ranks[1]).unwrap();
    let err = fails(&[
        OsStr::new("run"),
        p(&tp),
        "--tp".as_ref(),
        "2".as_ref(),
        "--prompt".as_ref(),
        "w1".as_ref(),
    ]);
    assert!(err.contains("another build"), "{err}");
    // A rank that cannot initialize (a truncated engine) is named.
    let bytes = std::fs::read(&ranks[0]).unwrap();
    std::fs::write(&ranks[1], &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&[
        OsStr::new("run"),
        p(&tp),
        "--tp".as_ref(),
        "2".as_ref(),
        "--prompt".as_ref(),
        "w1".as_ref(),
    ]);
    assert!(err.contains("tp.rank1-of-2.kiln"), "{err}");

    for (extra, says) in [
        (&["--tp", "3"][..], "power of two"),
        (&["--tp", "2", "--target", "cuda"], "CPU engines for now"),
        (
            &["--tp", "2", "--quant", "int8"],
            "--tp/--pp with --quant is not built yet",
        ),
        (&["--pp", "4"], "3 decoder layers"),
    ] {
        let mut args = vec![OsStr::new("build"), p(&ckpt), "-o".as_ref(), p(&other)];
        args.extend(extra.iter().map(OsStr::new));
        let err = fails(&args);
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    // `kiln inspect --tp` shows one rank's graph.
    let text = succeeds(&[
        OsStr::new("inspect"),
        p(&ckpt),
        "--tp".as_ref(),
        "2".as_ref(),
        "--rank".as_ref(),
        "1".as_ref(),
        "--stage".as_ref(),
        "optimized".as_ref(),
        "--layer".as_ref(),
        "0".as_ref(),
    ]);
    assert!(text.contains("AllReduce(ranks=2)"), "{text}");
    assert!(text.contains("wq.tp1of2"), "{text}");
}

/// `--quant fp8` (W8A8) and `--kv-cache int8|fp8` build CPU engines whose logits stay close to
/// the f32 engine's (and differ from them); the GPU builds and unknown formats are refused.
#[test]
fn cli_fp8_weights_and_8_bit_kv_caches() {
    let cfg = TinyConfig::gqa();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    tiny::write_checkpoint(&ckpt, &cfg, &cfg.random_weights(), Storage::F32);
    let logits = |flags: &[&str]| -> Vec<f32> {
        let out = dir
            .path()
            .join(format!("e{}.kiln", flags.join("").replace('-', "")));
        let mut args = vec![OsStr::new("build"), p(&ckpt), "-o".as_ref(), p(&out)];
        args.extend(flags.iter().map(OsStr::new));
        succeeds(&args);
        let engine = Engine::open(&out).unwrap();
        let exec = engine.cpu_executor().unwrap();
        let mut s = exec.session(1);
        let mut all = vec![];
        for t in [&[3i32, 50, 7, 21][..], &[9], &[60]] {
            all.extend(
                exec.step(&mut s, t, &[]).unwrap().outputs["logits"]
                    .data
                    .clone(),
            );
        }
        all
    };
    let want = logits(&[]);
    for (flags, tol) in [
        (&["--quant", "fp8"][..], 0.25),
        (&["--kv-cache", "int8"], 0.02),
        (&["--kv-cache", "fp8"], 0.06),
        (&["--kv-cache", "fp8", "--dtype", "bf16"], 0.08),
    ] {
        let got = logits(flags);
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in got.iter().zip(&want) {
            num += f64::from(a - b).powi(2);
            den += f64::from(*b).powi(2);
        }
        let e = (num / den).sqrt();
        assert!(e > 0.0 && e < tol, "{flags:?}: relative L2 {e}");
    }
    let engine = dir.path().join("equantfp8.kiln");
    let text = succeeds(&[OsStr::new("inspect"), p(&engine)]);
    assert!(text.contains("fp8[48, 48] = Weight(fp8("), "{text}");
    let engine = dir.path().join("ekvcacheint8.kiln");
    let text = succeeds(&[OsStr::new("inspect"), p(&engine)]);
    assert!(text.contains("KvQuant(int8)"), "{text}");
    let other = dir.path().join("x.kiln");
    for (extra, says) in [
        (&["--kv-cache", "int4"][..], "--kv-cache int4: int8 or fp8"),
        (
            &["--kv-cache", "fp8", "--target", "cuda"],
            "the GPU attention kernels read a 16-bit cache",
        ),
    ] {
        let mut args = vec![OsStr::new("build"), p(&ckpt), "-o".as_ref(), p(&other)];
        args.extend(extra.iter().map(OsStr::new));
        let err = fails(&args);
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}
