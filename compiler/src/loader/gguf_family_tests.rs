//! GGUF files written from the tiny transformers checkpoints of `tests/fixtures/families/`
//! (llama.cpp's tensor names and `<arch>.*` metadata, the projections as Q4_0, Q4_1 or Q8_0
//! blocks where asked): each builds into an engine that reproduces transformers' logits, and
//! such projections keep their codes.

use super::*;

/// The `config.json`, `reference.json` and safetensors bytes of
/// `tests/fixtures/families/<family>`.
fn fixture(family: &str) -> (Value, Value, Vec<u8>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../tests/fixtures/families/{family}"));
    let json = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    (json("config.json"), json("reference.json"), bytes)
}

/// Little-endian f32 values (the fixtures store f32 tensors).
fn f32_values(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Writes the tiny transformers checkpoint of `tests/fixtures/families/<family>` as a GGUF of
/// architecture `arch` (llama.cpp's tensor names, `<arch>.*` metadata, no Q/K permutation),
/// builds it and checks the logits against transformers' (≤ 1e-4 relative L2).
fn gguf_family_matches_transformers(family: &str, arch: &str, theta: f32, window: Option<u32>) {
    let (dir, gguf, reference) = family_gguf(family, arch, theta, window, None);
    check_gguf_logits(family, &dir, &gguf, &reference);
}

/// The tiny transformers checkpoint of `tests/fixtures/families/<family>` written as a GGUF of
/// architecture `arch` (llama.cpp's tensor names, `<arch>.*` metadata, no Q/K permutation),
/// its projections as blocks of the GGML type `block` where given (`Q4_0`, `Q4_1`, `Q8_0`:
/// [`ggml_blocks`]); with the fixture's reference (ids and logits).
fn family_gguf(
    family: &str,
    arch: &str,
    theta: f32,
    window: Option<u32>,
    block: Option<&str>,
) -> (tempfile::TempDir, PathBuf, Value) {
    let (cfg, reference, bytes) = fixture(family);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let u = |k: &str| GgufValue::U32(cfg[k].as_u64().unwrap() as u32);
    let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
    let tokens: Vec<String> = (0..vocab).map(|i| format!("t{i}")).collect();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let key = |k: &str| format!("{arch}.{k}");
    let mut w = Writer::new()
        .kv("general.architecture", GgufValue::String(arch.into()))
        .kv(&key("embedding_length"), u("hidden_size"))
        .kv(&key("feed_forward_length"), u("intermediate_size"))
        .kv(&key("block_count"), u("num_hidden_layers"))
        .kv(&key("attention.head_count"), u("num_attention_heads"))
        .kv(&key("attention.head_count_kv"), u("num_key_value_heads"))
        .kv(
            &key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-5),
        )
        .kv(&key("rope.freq_base"), GgufValue::F32(theta))
        .kv(&key("context_length"), u("max_position_embeddings"))
        .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", GgufValue::String("qwen2".into()))
        .kv("tokenizer.ggml.tokens", strings(&token_refs))
        .kv("tokenizer.ggml.merges", strings(&[]));
    if let Some(window) = window {
        w = w.kv(&key("attention.sliding_window"), GgufValue::U32(window));
    }
    for cap in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if let Some(v) = cfg.get(cap).and_then(Value::as_f64) {
            w = w.kv(&key(cap), GgufValue::F32(v as f32));
        }
    }
    if cfg.get("head_dim").is_some_and(|d| !d.is_null()) {
        w = w.kv(&key("attention.key_length"), u("head_dim"));
    }
    let gguf_name = |hf: &str| -> String {
        let hf = hf.strip_prefix("model.").unwrap_or(hf);
        match hf {
            "embed_tokens.weight" => return "token_embd.weight".into(),
            "lm_head.weight" => return "output.weight".into(),
            _ => {}
        }
        if let Some(rest) = hf.strip_prefix("norm.") {
            return format!("output_norm.{rest}");
        }
        let rest = hf.strip_prefix("layers.").unwrap();
        let (layer, part) = rest.split_once('.').unwrap();
        let (stem, suffix) = part.rsplit_once('.').unwrap();
        let g = match stem {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.qkv_proj" => "attn_qkv",
            "self_attn.o_proj" => "attn_output",
            "post_attention_layernorm" if arch == "gemma2" => "post_attention_norm",
            "post_attention_layernorm" => "ffn_norm",
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            other => panic!("unexpected tensor {other}"),
        };
        format!("blk.{layer}.{g}.{suffix}")
    };
    for (name, view) in st.tensors() {
        let values = f32_values(view.data());
        let dims: Vec<u64> = view.shape().iter().rev().map(|&d| d as u64).collect();
        // llama.cpp's converter stores Gemma's norm weights plus one (its RMSNorm multiplies by
        // the weight, Gemma's by 1 + weight).
        let values: Vec<f32> = if arch.starts_with("gemma") && name.ends_with("norm.weight") {
            values.iter().map(|v| v + 1.0).collect()
        } else {
            values
        };
        if let Some(block) = block.filter(|_| name.ends_with("_proj.weight")) {
            let (id, bytes) = ggml_blocks(block, &values, view.shape()[1]);
            w = w.tensor(&gguf_name(&name), &dims, id, bytes);
        } else {
            w = w.f32_tensor(&gguf_name(&name), &dims, &values);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join(format!("{family}.gguf"));
    std::fs::write(&gguf, w.bytes()).unwrap();
    (dir, gguf, reference)
}

/// The GGML type id and blocks of a row-major matrix with `cols` columns (a multiple of 32) as
/// `block` (`Q4_0`, `Q4_1` or `Q8_0`), quantized by the kiln format with llama.cpp's rule
/// (`int4g32`, `int4g32m`, `int8g32`): per block the f16 scale (and the f16 minimum: Q4_1),
/// then Q8_0's 32 codes, or Q4's byte `j` = code of column `j` | code of column `j + 16` << 4.
fn ggml_blocks(block: &str, values: &[f32], cols: usize) -> (u32, Vec<u8>) {
    use kiln_runtime::ir::DType;
    let (id, format) = match block {
        "Q4_0" => (
            2,
            DType::Int4 {
                group: 32,
                zero_point: false,
            },
        ),
        "Q4_1" => (3, DType::Int4Min { group: 32 }),
        "Q8_0" => (8, DType::Int8Group { group: 32 }),
        other => panic!("no blocks of {other}"),
    };
    let rows = values.len() / cols;
    let p = kiln_runtime::quant::quantize(format, values, rows, cols).unwrap();
    let code = |r: usize, c: usize| (p.q[r * cols / 2 + c / 2] >> (4 * (c % 2))) & 15;
    let mut out = Vec::new();
    for r in 0..rows {
        for b in 0..cols / 32 {
            out.extend(f16::from_f32(p.scale[r * cols / 32 + b]).to_le_bytes());
            if block == "Q8_0" {
                out.extend(&p.q[r * cols + 32 * b..][..32]);
                continue;
            }
            if block == "Q4_1" {
                out.extend(f16::from_f32(p.min[r * cols / 32 + b]).to_le_bytes());
            }
            for j in 0..16 {
                out.push(code(r, 32 * b + j) | (code(r, 32 * b + 16 + j) << 4));
            }
        }
    }
    (id, out)
}

/// Builds `gguf` and checks its logits on the reference ids against transformers' (≤ 1e-4).
fn check_gguf_logits(family: &str, dir: &tempfile::TempDir, gguf: &Path, reference: &Value) {
    let opts = crate::build::BuildOptions::default();
    let (got, _) = gguf_logits(dir, gguf, reference, &opts, family);
    let want: Vec<f32> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let err = rel_l2_f32(&got, &want);
    assert!(err <= 1e-4, "{family} GGUF vs transformers: {err:.2e}");
}

fn rel_l2_f32(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den).sqrt()
}

/// The logits of the reference ids of an engine built from `gguf` with `opts` (written beside
/// it as `<family>-<no_optimize>.kiln`).
fn gguf_logits(
    dir: &tempfile::TempDir,
    gguf: &Path,
    reference: &Value,
    opts: &crate::build::BuildOptions,
    family: &str,
) -> (Vec<f32>, Vec<String>) {
    let engine = dir
        .path()
        .join(format!("{family}-{}.kiln", opts.no_optimize));
    let report = crate::build::build(gguf, &engine, opts, &|_, _| {}).unwrap();
    let e = kiln_runtime::engine::Engine::open(&engine).unwrap();
    assert_eq!(e.config["model_type"], family);
    let exec = e.cpu_executor().unwrap();
    let ids: Vec<i32> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap() as i32)
        .collect();
    let mut session = exec.session(1);
    let logits = exec.step(&mut session, &ids, &[]).unwrap().outputs["logits"]
        .data
        .clone();
    (logits, report.notes)
}

/// A GGUF whose projections are Q4_0, Q4_1 or Q8_0 keeps them as `int4g32`, `int4g32m` or
/// `int8g32` codes (no --quant): the engine stores the blocks' codes and scales as they are, and
/// computes what the dequantized GGUF computes (`--no-optimize` builds it dequantized).
#[test]
fn gguf_block_projections_keep_their_codes() {
    // Qwen2: separate q/k/v and gate/up (stacked by the fusions); Phi-3: fused qkv and gate/up
    // tensors that its model file slices (row ranges of the stored codes).
    for (family, window, block, format) in [
        ("qwen2", None, "Q4_0", "int4g32"),
        ("phi3", Some(5), "Q4_0", "int4g32"),
        ("qwen2", None, "Q4_1", "int4g32m"),
        ("phi3", Some(5), "Q8_0", "int8g32"),
    ] {
        let theta = if family == "qwen2" {
            1_000_000.0
        } else {
            10_000.0
        };
        let (dir, gguf, reference) = family_gguf(family, family, theta, window, Some(block));
        if family == "qwen2" {
            // Parallel builds keep no quantized weights yet: the blocks are dequantized (noted).
            let tp = crate::build::BuildOptions {
                tp: 2,
                ..Default::default()
            };
            let report =
                crate::build::build(&gguf, &dir.path().join("tp.kiln"), &tp, &|_, _| {}).unwrap();
            assert!(
                report
                    .notes
                    .iter()
                    .any(|n| n.contains("builds the blocks dequantized")),
                "{:?}",
                report.notes
            );
        }
        let opts = crate::build::BuildOptions::default();
        let (kept, notes) = gguf_logits(&dir, &gguf, &reference, &opts, family);
        assert!(
            notes.iter().any(|n| n.contains(&format!("GGUF {block}")))
                && !notes.iter().any(|n| n.contains("quantized again")),
            "{family}: {notes:?}"
        );
        let plain = crate::build::BuildOptions {
            no_optimize: true,
            ..Default::default()
        };
        let (dequantized, _) = gguf_logits(&dir, &gguf, &reference, &plain, family);
        let err = rel_l2_f32(&kept, &dequantized);
        assert!(
            err <= 1e-5,
            "{family}: {block} kept vs dequantized: {err:.2e}"
        );
        let e =
            kiln_runtime::engine::Engine::open(&dir.path().join(format!("{family}-false.kiln")))
                .unwrap();
        let codes: Vec<&str> = e
            .tensor_names()
            .filter(|n| n.starts_with(&format!("{format}(")) && n.ends_with(')'))
            .collect();
        // 2 layers × (fused qkv, o, fused gate/up, down).
        assert_eq!(codes.len(), 8, "{family} {block}: {codes:?}");
        let f = GgufFile::open(&gguf).unwrap();
        let down = f
            .packed_matrix("model.layers.1.mlp.down_proj.weight")
            .unwrap()
            .unwrap();
        let (_, stored) = e
            .tensor(&format!("{format}(model.layers.1.mlp.down_proj.weight)"))
            .unwrap();
        assert_eq!(stored, &down.q[..], "{family} {block}");
        assert_eq!(
            down.dequantize(),
            f.read_f32("model.layers.1.mlp.down_proj.weight").unwrap()
        );
    }
}

/// A llama GGUF's Q/K rows are stored permuted (llama.cpp's RoPE layout); the packed weight of
/// each block type comes back in HF row order, as `read_f32` does, and is exactly what kiln's
/// format with llama.cpp's rule makes of the HF weight.
#[test]
fn gguf_block_llama_q_rows_are_unpermuted() {
    use kiln_runtime::ir::DType;
    let (rows, cols) = (8, 64);
    let hf: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 201) as f32 - 100.0) / 50.0)
        .collect();
    let stored = permute_qk(&hf, rows, cols, 2).unwrap();
    for (block, format) in [
        (
            "Q4_0",
            DType::Int4 {
                group: 32,
                zero_point: false,
            },
        ),
        ("Q4_1", DType::Int4Min { group: 32 }),
        ("Q8_0", DType::Int8Group { group: 32 }),
    ] {
        let (id, bytes) = ggml_blocks(block, &stored, cols);
        let w = llama_meta(Writer::new()).tensor(
            "blk.0.attn_q.weight",
            &[cols as u64, rows as u64],
            id,
            bytes,
        );
        let f = open_writer(&w);
        let name = "model.layers.0.self_attn.q_proj.weight";
        let p = f.packed_matrix(name).unwrap().unwrap();
        assert_eq!(
            p,
            kiln_runtime::quant::quantize(format, &hf, rows, cols).unwrap(),
            "{block}"
        );
        // ggml's dequantization of the blocks, bit for bit.
        assert_eq!(p.dequantize(), f.read_f32(name).unwrap(), "{block}");
        assert!(f.packed_matrix("model.norm.weight").is_none());
    }
}

/// A Gemma GGUF (llama's tensor names under `gemma.*` metadata, norm weights stored plus one,
/// head size from `gemma.attention.key_length`, tied output) builds with `models/gemma.ron` and
/// reproduces transformers' logits.
#[test]
fn gguf_gemma_builds_and_matches_transformers() {
    gguf_family_matches_transformers("gemma", "gemma", 10_000.0, None);
}

/// A Qwen2 GGUF (llama's tensor names with q/k/v biases under `qwen2.*` metadata, no Q/K
/// permutation) builds with `models/qwen2.ron` and reproduces transformers' logits.
#[test]
fn gguf_qwen2_builds_and_matches_transformers() {
    gguf_family_matches_transformers("qwen2", "qwen2", 1_000_000.0, None);
}

/// A Phi-3 GGUF (fused `attn_qkv` and gate/up `ffn_up`, the sliding window under `phi3.*`)
/// builds with `models/phi3.ron` and reproduces transformers' logits (the fixture's window of 5
/// is shorter than its input).
#[test]
fn gguf_phi3_builds_and_matches_transformers() {
    gguf_family_matches_transformers("phi3", "phi3", 10_000.0, Some(5));
}

/// A Gemma-2 GGUF (Gemma's names plus `post_attention_norm`/`post_ffw_norm`, soft-caps under
/// `gemma2.*`, the window on even layers) builds with `models/gemma2.ron`. GGUF does not store
/// `query_pre_attn_scalar`: the config takes llama.cpp's rule (the head size, 32 here), so the
/// engine computes what the checkpoint computes with that scalar (the fixture's own is 24).
#[test]
fn gguf_gemma2_builds_like_its_checkpoint_with_llama_cpps_query_scale() {
    let (dir, gguf, reference) = family_gguf("gemma2", "gemma2", 10_000.0, Some(4), None);
    let cfg = GgufFile::open(&gguf).unwrap().hf_config().unwrap();
    assert_eq!(cfg["model_type"], "gemma2");
    assert_eq!(cfg["query_pre_attn_scalar"], 32);
    assert_eq!(cfg["attn_logit_softcapping"], 1.5);
    assert_eq!(cfg["final_logit_softcapping"], 2.0);
    let opts = crate::build::BuildOptions::default();
    let (from_gguf, _) = gguf_logits(&dir, &gguf, &reference, &opts, "gemma2");
    // The same checkpoint as safetensors, its scalar set to llama.cpp's.
    let ckpt = dir.path().join("gemma2-st");
    std::fs::create_dir(&ckpt).unwrap();
    let (mut st_cfg, _, bytes) = fixture("gemma2");
    st_cfg["query_pre_attn_scalar"] = 32.into();
    std::fs::write(ckpt.join("config.json"), st_cfg.to_string()).unwrap();
    std::fs::write(ckpt.join("model.safetensors"), bytes).unwrap();
    let (from_st, _) = gguf_logits(&dir, &ckpt, &reference, &opts, "gemma2");
    // The norm weights travel as 1 + w in f32 (llama.cpp's convention), which rounds them.
    let err = rel_l2_f32(&from_gguf, &from_st);
    assert!(err <= 1e-4, "gemma2 GGUF vs checkpoint: {err:.2e}");
}

/// A GPT-2 GGUF as llama.cpp's converter writes it (`token_embd`, `position_embd`, `blk.N.*`
/// with its four Conv1D matrices transposed to `[out, in]`, the tied output written as a copy of
/// the embedding) builds with `models/gpt2.ron` and reproduces transformers' logits: the
/// matrices are read back as Conv1D and the output copy is dropped.
#[test]
fn gguf_gpt2_builds_and_matches_transformers() {
    let (cfg, reference, bytes) = fixture("gpt2");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let u = |k: &str| GgufValue::U32(cfg[k].as_u64().unwrap() as u32);
    let hidden = cfg["n_embd"].as_u64().unwrap() as u32;
    let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
    let tokens: Vec<String> = (0..vocab).map(|i| format!("t{i}")).collect();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut w = Writer::new()
        .kv("general.architecture", GgufValue::String("gpt2".into()))
        .kv("gpt2.embedding_length", u("n_embd"))
        .kv("gpt2.feed_forward_length", GgufValue::U32(4 * hidden))
        .kv("gpt2.block_count", u("n_layer"))
        .kv("gpt2.attention.head_count", u("n_head"))
        .kv("gpt2.context_length", u("n_positions"))
        .kv("gpt2.attention.layer_norm_epsilon", GgufValue::F32(1e-5))
        .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", GgufValue::String("gpt-2".into()))
        .kv("tokenizer.ggml.tokens", strings(&token_refs))
        .kv("tokenizer.ggml.merges", strings(&[]));
    let gguf_name = |hf: &str| -> String {
        let hf = hf.strip_prefix("transformer.").unwrap();
        let (stem, suffix) = hf.rsplit_once('.').unwrap();
        let g = match stem {
            "wte" => return format!("token_embd.{suffix}"),
            "wpe" => return format!("position_embd.{suffix}"),
            "ln_f" => return format!("output_norm.{suffix}"),
            _ => stem,
        };
        let (layer, part) = g.strip_prefix("h.").unwrap().split_once('.').unwrap();
        let p = match part {
            "ln_1" => "attn_norm",
            "attn.c_attn" => "attn_qkv",
            "attn.c_proj" => "attn_output",
            "ln_2" => "ffn_norm",
            "mlp.c_fc" => "ffn_up",
            "mlp.c_proj" => "ffn_down",
            other => panic!("unexpected tensor {other}"),
        };
        format!("blk.{layer}.{p}.{suffix}")
    };
    for (name, view) in st.tensors() {
        let values = f32_values(view.data());
        let shape = view.shape().to_vec();
        let conv1d = shape.len() == 2 && !name.contains(".wte.") && !name.contains(".wpe.");
        let (values, dims): (Vec<f32>, Vec<u64>) = if conv1d {
            // Conv1D [in, out] → [out, in] (ggml dims [in, out]), as llama.cpp's converter does.
            let (rows, cols) = (shape[0], shape[1]);
            let mut t = vec![0f32; values.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = values[r * cols + c];
                }
            }
            (t, vec![rows as u64, cols as u64])
        } else {
            (values, shape.iter().rev().map(|&d| d as u64).collect())
        };
        if name == "transformer.wte.weight" {
            w = w.f32_tensor("output.weight", &dims, &values);
        }
        w = w.f32_tensor(&gguf_name(&name), &dims, &values);
    }
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("gpt2.gguf");
    std::fs::write(&gguf, w.bytes()).unwrap();
    let f = GgufFile::open(&gguf).unwrap();
    assert!(f.tensors().iter().all(|(n, _)| n != "lm_head.weight"));
    assert!(f
        .tensors()
        .contains(&("transformer.h.0.attn.c_attn.weight".into(), vec![64, 192])));
    check_gguf_logits("gpt2", &dir, &gguf, &reference);
}

/// A malformed GPT-2 GGUF whose Conv1D matrix is stored with one axis reads as it is stored
/// (no transposition to attempt), without a panic.
#[test]
fn gguf_gpt2_one_axis_matrix_is_read_as_stored() {
    let w = Writer::new()
        .kv("general.architecture", GgufValue::String("gpt2".into()))
        .f32_tensor(
            "blk.0.attn_qkv.weight",
            &[6],
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        );
    let f = open_writer(&w);
    let name = "transformer.h.0.attn.c_attn.weight";
    assert_eq!(f.tensors(), vec![(name.to_string(), vec![6])]);
    assert_eq!(
        f.read_f32(name).unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
}
