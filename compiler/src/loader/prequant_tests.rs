//! Pre-quantized checkpoints: the configs read or refused, each packing unpacked exactly, and
//! an AutoAWQ / GPTQ checkpoint of the tiny Llama 3.1 fixture built into an engine that keeps
//! the stored codes and computes what the dequantized checkpoint computes.
//!
//! The packers below write each layout as its module doc describes it (AutoAWQ's interleaved
//! nibble order, GPTQ's packing along the input and v1's zero − 1), independently of the
//! reader.

use super::*;
use kiln_runtime::quant;
use safetensors::tensor::TensorView;
use serde_json::json;

const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Stored parts of one linear: (suffix, dtype, shape, bytes).
type Parts = Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)>;
/// Writes a packed weight in one checkpoint layout.
type Packer = Box<dyn Fn(&quant::Packed) -> Parts>;

fn le_words(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn code(p: &quant::Packed, n: usize, k: usize) -> u32 {
    u32::from((p.q[n * p.cols / 2 + k / 2] >> (4 * (k % 2))) & 15)
}

fn f16_bytes(vals: impl Iterator<Item = f32>) -> Vec<u8> {
    vals.flat_map(|v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

/// `scales` `[groups, rows]` in f16.
fn scales(p: &quant::Packed, g: usize) -> Vec<u8> {
    let groups = p.cols / g;
    f16_bytes(
        (0..groups)
            .flat_map(|gi| (0..p.rows).map(move |n| (gi, n)))
            .map(|(gi, n)| p.scale[n * groups + gi]),
    )
}

/// AutoAWQ GEMM parts of `p`: (suffix, dtype, shape, bytes).
fn awq_parts(p: &quant::Packed, g: usize) -> Parts {
    let (rows, cols, groups) = (p.rows, p.cols, p.cols / g);
    let mut qw = vec![0u32; cols * rows / 8];
    for k in 0..cols {
        for j in 0..rows / 8 {
            for (i, &c) in AWQ_ORDER.iter().enumerate() {
                qw[k * rows / 8 + j] |= code(p, 8 * j + c, k) << (4 * i);
            }
        }
    }
    let mut qz = vec![0u32; groups * rows / 8];
    for gi in 0..groups {
        for j in 0..rows / 8 {
            for (i, &c) in AWQ_ORDER.iter().enumerate() {
                qz[gi * rows / 8 + j] |= u32::from(p.zero[(8 * j + c) * groups + gi]) << (4 * i);
            }
        }
    }
    vec![
        (".qweight", Dtype::I32, vec![cols, rows / 8], le_words(&qw)),
        (".qzeros", Dtype::I32, vec![groups, rows / 8], le_words(&qz)),
        (".scales", Dtype::F16, vec![groups, rows], scales(p, g)),
    ]
}

/// GPTQ parts of `p` (`v2`: zero points as they are, else minus one); `g_idx` as given.
fn gptq_parts(p: &quant::Packed, g: usize, v2: bool, g_idx: &[u32]) -> Parts {
    let (rows, cols, groups) = (p.rows, p.cols, p.cols / g);
    let mut qw = vec![0u32; cols / 8 * rows];
    for i in 0..cols / 8 {
        for n in 0..rows {
            for b in 0..8 {
                qw[i * rows + n] |= code(p, n, 8 * i + b) << (4 * b);
            }
        }
    }
    let mut qz = vec![0u32; groups * rows / 8];
    for gi in 0..groups {
        for j in 0..rows / 8 {
            for b in 0..8 {
                let z = u32::from(p.zero[(8 * j + b) * groups + gi]) - u32::from(!v2);
                qz[gi * rows / 8 + j] |= (z & 15) << (4 * b);
            }
        }
    }
    vec![
        (".qweight", Dtype::I32, vec![cols / 8, rows], le_words(&qw)),
        (".qzeros", Dtype::I32, vec![groups, rows / 8], le_words(&qz)),
        (".scales", Dtype::F16, vec![groups, rows], scales(p, g)),
        (".g_idx", Dtype::I32, vec![cols], le_words(g_idx)),
    ]
}

/// compressed-tensors `pack-quantized` parts of `p` (symmetric: no zero points).
fn ct_parts(p: &quant::Packed, g: usize, symmetric: bool) -> Parts {
    let (rows, cols, groups) = (p.rows, p.cols, p.cols / g);
    let mut qw = vec![0u32; rows * cols / 8];
    for n in 0..rows {
        for i in 0..cols / 8 {
            for b in 0..8 {
                qw[n * cols / 8 + i] |= code(p, n, 8 * i + b) << (4 * b);
            }
        }
    }
    let scales = f16_bytes(p.scale.iter().copied());
    let shape = le_words(&[rows as u32, cols as u32]);
    let mut parts = vec![
        (
            ".weight_packed",
            Dtype::I32,
            vec![rows, cols / 8],
            le_words(&qw),
        ),
        (".weight_scale", Dtype::F16, vec![rows, groups], scales),
        (".weight_shape", Dtype::I32, vec![2], shape),
    ];
    if !symmetric {
        let mut zp = vec![0u32; rows / 8 * groups];
        for j in 0..rows / 8 {
            for gi in 0..groups {
                for b in 0..8 {
                    zp[j * groups + gi] |= u32::from(p.zero[(8 * j + b) * groups + gi]) << (4 * b);
                }
            }
        }
        parts.push((
            ".weight_zero_point",
            Dtype::I32,
            vec![rows / 8, groups],
            le_words(&zp),
        ));
    }
    parts
}

fn ct_config(g: usize, symmetric: bool) -> Value {
    json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
           "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null,
               "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                           "strategy": "group", "group_size": g, "actorder": null}}},
           "ignore": ["lm_head"]})
}

/// A random `[rows, cols]` weight quantized to int4 with zero points in groups of `g`, with no
/// zero point of 0 (GPTQ v1 cannot store it).
fn random_packed(rows: usize, cols: usize, g: usize, seed: u64) -> quant::Packed {
    let mut s = seed;
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.45
        })
        .collect();
    let format = DType::Int4 {
        group: g as u16,
        zero_point: true,
    };
    let mut p = quant::quantize(format, &w, rows, cols).unwrap();
    for z in &mut p.zero {
        *z = (*z).max(1);
    }
    p
}

fn reader(parts: Parts, base: &str) -> impl Fn(&str) -> Result<Raw, String> {
    let map: std::collections::HashMap<String, Raw> = parts
        .into_iter()
        .map(|(s, d, sh, b)| (format!("{base}{s}"), (d, sh, b)))
        .collect();
    move |n: &str| map.get(n).cloned().ok_or_else(|| format!("no `{n}`"))
}

/// A compressed-tensors FP8 `quantization_config` (RedHatAI's "FP8-dynamic"): E4M3 weights
/// with `strategy` per channel or tensor, activations dynamic per token.
fn fp8_config(strategy: &str, activations: Value) -> Value {
    json!({"quant_method": "compressed-tensors", "format": "float-quantized",
           "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": activations,
               "weights": {"num_bits": 8, "type": "float", "symmetric": true,
                           "strategy": strategy, "dynamic": false}}},
           "ignore": ["lm_head"]})
}

fn fp8_dynamic() -> Value {
    json!({"num_bits": 8, "type": "float", "symmetric": true, "strategy": "token", "dynamic": true})
}

#[test]
fn fp8_configs_are_read_or_refused_by_name() {
    let read = |q: Value| PreQuant::from_config(&json!({ "quantization_config": q }));
    for strategy in ["channel", "tensor"] {
        let p = read(fp8_config(strategy, fp8_dynamic())).unwrap().unwrap();
        assert_eq!(p.method, Method::CompressedFp8);
        assert_eq!(p.format(), DType::Fp8);
    }
    let mut stat = fp8_dynamic();
    stat["dynamic"] = json!(false);
    stat["strategy"] = json!("tensor");
    for (q, why) in [
        (fp8_config("channel", stat), "static activation scales"),
        (fp8_config("channel", Value::Null), "16-bit activations"),
        (fp8_config("block", fp8_dynamic()), "strategy `block`"),
    ] {
        let err = read(q).unwrap_err();
        assert!(err.contains(why), "{err}");
    }
}

/// FP8 weights unpack to kiln's `fp8` exactly: the codes as stored, a per-channel scale per row,
/// a per-tensor scale repeated; mis-shaped scales and non-E4M3 weights are refused by name.
#[test]
fn fp8_weights_unpack_as_stored() {
    let (rows, cols) = (6, 40);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    let p = quant::quantize(DType::Fp8, &w, rows, cols).unwrap();
    let pq = PreQuant {
        method: Method::CompressedFp8,
        group: 0,
    };
    let f32s = |v: &[f32]| v.iter().flat_map(|s| s.to_le_bytes()).collect::<Vec<u8>>();
    let weight = (".weight", Dtype::F8_E4M3, vec![rows, cols], p.q.clone());
    let channel = (".weight_scale", Dtype::F32, vec![rows, 1], f32s(&p.scale));
    let got = pq
        .packed("m.w", reader(vec![weight.clone(), channel], "m.w"))
        .unwrap();
    assert_eq!(got, p);
    let tensor = (".weight_scale", Dtype::F32, vec![], f32s(&[0.5]));
    let got = pq
        .packed("m.w", reader(vec![weight.clone(), tensor], "m.w"))
        .unwrap();
    assert_eq!(got.scale, vec![0.5; rows]);
    assert_eq!(got.q, p.q);
    let bad = (
        ".weight_scale",
        Dtype::F32,
        vec![rows + 1, 1],
        f32s(&vec![1.0; rows + 1]),
    );
    let err = pq
        .packed("m.w", reader(vec![weight, bad], "m.w"))
        .unwrap_err();
    assert!(
        err.contains("m.w.weight_scale") && err.contains("per channel"),
        "{err}"
    );
    let f16w = (
        ".weight",
        Dtype::F16,
        vec![rows, cols],
        vec![0; rows * cols * 2],
    );
    let scale = (".weight_scale", Dtype::F32, vec![], f32s(&[1.0]));
    let err = pq
        .packed("m.w", reader(vec![f16w, scale], "m.w"))
        .unwrap_err();
    assert!(err.contains("F8_E4M3"), "{err}");
}

#[test]
fn configs_are_read_or_refused_by_name() {
    let read = |q: Value| PreQuant::from_config(&json!({ "quantization_config": q }));
    assert_eq!(PreQuant::from_config(&json!({})).unwrap(), None);
    assert_eq!(read(json!({"quant_method": "gguf"})).unwrap(), None);
    let awq = read(
        json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "GEMM", "zero_point": true}),
    );
    assert_eq!(
        awq.unwrap(),
        Some(PreQuant {
            method: Method::AwqGemm,
            group: 128
        })
    );
    let gptq =
        read(json!({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": false}));
    assert_eq!(gptq.unwrap().unwrap().method, Method::Gptq { v2: false });
    let v2 = read(
        json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}),
    );
    assert_eq!(v2.unwrap().unwrap().method, Method::Gptq { v2: true });
    // Act-order is read (each weight's g_idx says whether its codes can be kept).
    let act_order =
        read(json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true}));
    assert_eq!(
        act_order.unwrap().unwrap().method,
        Method::Gptq { v2: false }
    );
    for (q, why) in [
        (
            json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}),
            "version `gemv`",
        ),
        (
            json!({"quant_method": "gptq", "bits": 8, "group_size": 128}),
            "bits 8",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": -1}),
            "group_size -1",
        ),
        (
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true}),
            "quant_method `bitsandbytes`",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}),
            "marlin",
        ),
    ] {
        let err = read(q).unwrap_err();
        assert!(err.contains(why), "{err}");
    }
}

#[test]
fn awq_and_gptq_packings_unpack_to_the_same_codes() {
    let (rows, cols, g) = (24, 96, 32);
    let p = random_packed(rows, cols, g, 7);
    let awq = PreQuant {
        method: Method::AwqGemm,
        group: g,
    };
    assert_eq!(awq.packed("l", reader(awq_parts(&p, g), "l")).unwrap(), p);
    let trivial: Vec<u32> = (0..cols as u32).map(|k| k / g as u32).collect();
    for v2 in [false, true] {
        let gptq = PreQuant {
            method: Method::Gptq { v2 },
            group: g,
        };
        let parts = gptq_parts(&p, g, v2, &trivial);
        assert_eq!(gptq.packed("l", reader(parts, "l")).unwrap(), p, "v2 {v2}");
        assert_eq!(
            gptq.virtual_tensors(&[
                ("l.qweight".into(), vec![cols / 8, rows]),
                ("l.qzeros".into(), vec![cols / g, rows / 8]),
                ("l.scales".into(), vec![cols / g, rows]),
                ("l.g_idx".into(), vec![cols]),
                ("n.weight".into(), vec![cols]),
            ])
            .unwrap(),
            vec![
                ("l.weight".to_string(), vec![rows, cols]),
                ("n.weight".to_string(), vec![cols])
            ]
        );
    }
    for symmetric in [true, false] {
        let ct = PreQuant {
            method: Method::CompressedTensors { symmetric },
            group: g,
        };
        let mut want = p.clone();
        if symmetric {
            // The symmetric format has the fixed zero 8 and stores no zero points.
            want = random_packed(rows, cols, g, 7);
            want.format = ct.format();
            want.zero.clear();
        }
        let got = ct
            .packed("l", reader(ct_parts(&want, g, symmetric), "l"))
            .unwrap();
        assert_eq!(got, want, "symmetric {symmetric}");
    }
    // Act-order: a g_idx that is not k / G.
    let mut shuffled = trivial.clone();
    shuffled.swap(0, cols - 1);
    let gptq = PreQuant {
        method: Method::Gptq { v2: true },
        group: g,
    };
    let err = gptq
        .packed("l", reader(gptq_parts(&p, g, true, &shuffled), "l"))
        .unwrap_err();
    assert!(err.contains("act-order"), "{err}");
    // A part of the wrong shape is named with both shapes.
    let mut parts = awq_parts(&p, g);
    parts[2].2 = vec![cols / g, rows + 8];
    let err = awq.packed("l", reader(parts, "l")).unwrap_err();
    assert!(
        err.contains("l.scales") && err.contains(&format!("{:?}", [cols / g, rows])),
        "{err}"
    );
}

/// The tiny Llama 3.1 fixture with every projection quantized (int4, groups of 32) and stored
/// as AutoAWQ, GPTQ v1 and GPTQ v2 would store it: each builds (no --quant) into an engine that
/// keeps the codes and whose logits match an f32 engine of the dequantized weights.
#[test]
fn prequantized_checkpoints_build_with_their_codes() {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/families/llama31");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let g = 32;
    let mut packed = Vec::new();
    let mut plain: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let vals = kiln_runtime::engine::widen_to_f32(view.dtype(), view.data()).unwrap();
        if name.ends_with("_proj.weight") {
            let format = DType::Int4 {
                group: g as u16,
                zero_point: true,
            };
            let mut p = quant::quantize(format, &vals, shape[0], shape[1]).unwrap();
            for z in &mut p.zero {
                *z = (*z).max(1);
            }
            plain.push((
                name.clone(),
                shape,
                p.dequantize()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ));
            packed.push((name.trim_end_matches(".weight").to_string(), p));
        } else {
            plain.push((
                name.clone(),
                shape,
                vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let write = |folder: &str, qc: Option<Value>, parts: &dyn Fn(&quant::Packed) -> Parts| {
        let ckpt = dir.path().join(folder);
        std::fs::create_dir(&ckpt).unwrap();
        let mut cfg = config.clone();
        let quantized = qc.is_some();
        if let Some(q) = qc {
            cfg["quantization_config"] = q;
        }
        std::fs::write(ckpt.join("config.json"), cfg.to_string()).unwrap();
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, shape, data) in &plain {
            let base = name.trim_end_matches(".weight");
            match packed.iter().find(|(b, _)| quantized && b == base) {
                Some((_, p)) => tensors.extend(
                    parts(p)
                        .into_iter()
                        .map(|(s, d, sh, b)| (format!("{base}{s}"), d, sh, b)),
                ),
                None => tensors.push((name.clone(), Dtype::F32, shape.clone(), data.clone())),
            }
        }
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(
            ckpt.join("model.safetensors"),
            safetensors::tensor::serialize(views, None).unwrap(),
        )
        .unwrap();
        ckpt
    };
    let logits = |ckpt: &std::path::Path| {
        let path = ckpt.with_extension("kiln");
        let report = crate::build::build(
            ckpt,
            &path,
            &crate::build::BuildOptions::default(),
            &|_, _| {},
        )
        .unwrap();
        let engine = kiln_runtime::engine::Engine::open(&path).unwrap();
        let exec = engine.cpu_executor().unwrap();
        let mut session = exec.session(1);
        let ids: Vec<i32> = (0..12).map(|i| i * 37 % 128).collect();
        let out = exec.step(&mut session, &ids, &[]).unwrap();
        let int4: Vec<String> = engine
            .tensor_names()
            .filter(|n| n.starts_with("int4g32z(") && n.ends_with(')'))
            .map(str::to_string)
            .collect();
        // The down projection is not fused: its stored codes are the checkpoint's, byte for byte.
        let down = engine
            .tensor("int4g32z(model.layers.1.mlp.down_proj.weight)")
            .map(|(_, b)| b.to_vec())
            .ok();
        (out.outputs["logits"].data.clone(), int4, report.notes, down)
    };
    let (want, none, _, _) = logits(&write("dequantized", None, &|_| vec![]));
    assert!(none.is_empty());
    let by_k = move |cols: usize| (0..cols as u32).map(|k| k / g as u32).collect::<Vec<_>>();
    let cases: Vec<(&str, Value, Packer)> = vec![
        (
            "awq",
            json!({"quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm", "zero_point": true}),
            Box::new(move |p: &quant::Packed| awq_parts(p, g)),
        ),
        (
            "gptq",
            json!({"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": false}),
            Box::new(move |p: &quant::Packed| gptq_parts(p, g, false, &by_k(p.cols))),
        ),
        (
            "gptq_v2",
            json!({"quant_method": "gptq", "bits": 4, "group_size": g, "checkpoint_format": "gptq_v2"}),
            Box::new(move |p: &quant::Packed| gptq_parts(p, g, true, &by_k(p.cols))),
        ),
        // Act-order with static groups: `g_idx` is `k / G`, so the codes are kept.
        (
            "gptq_act_order_static",
            json!({"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": true, "static_groups": true}),
            Box::new(move |p: &quant::Packed| gptq_parts(p, g, false, &by_k(p.cols))),
        ),
    ];
    let mut cases = cases;
    cases.push((
        "compressed_tensors",
        ct_config(g, false),
        Box::new(move |p: &quant::Packed| ct_parts(p, g, false)),
    ));
    // FP8-dynamic: the same weights' values as E4M3 per channel (W8A8: the engine also rounds
    // activations, so its logits are compared with a --quant fp8 build of the dequantized
    // checkpoint, which finds the same codes and scales).
    let fp8_ckpt = write(
        "fp8",
        Some(fp8_config("channel", fp8_dynamic())),
        &|p: &quant::Packed| {
            let f = quant::quantize(DType::Fp8, &p.dequantize(), p.rows, p.cols).unwrap();
            let scale = f.scale.iter().flat_map(|s| s.to_le_bytes()).collect();
            vec![
                (".weight", Dtype::F8_E4M3, vec![p.rows, p.cols], f.q),
                (".weight_scale", Dtype::F32, vec![p.rows, 1], scale),
            ]
        },
    );
    {
        let kept = fp8_ckpt.with_extension("kiln");
        let report =
            crate::build::build(&fp8_ckpt, &kept, &Default::default(), &|_, _| {}).unwrap();
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("14 linear weights keep their fp8 codes")),
            "{:?}",
            report.notes
        );
        let requant = dir.path().join("requant.kiln");
        let opts = crate::build::BuildOptions {
            quant: Some(crate::rewrite::rules::quant::QuantOptions {
                format: DType::Fp8,
                skip: crate::rewrite::rules::quant::DEFAULT_SKIP
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            }),
            ..Default::default()
        };
        let deq = dir.path().join("dequantized");
        crate::build::build(&deq, &requant, &opts, &|_, _| {}).unwrap();
        let run = |path: &std::path::Path| {
            let e = kiln_runtime::engine::Engine::open(path).unwrap();
            let exec = e.cpu_executor().unwrap();
            let mut session = exec.session(1);
            let ids: Vec<i32> = (0..12).map(|i| i * 37 % 128).collect();
            let fp8 = e
                .tensor_names()
                .filter(|n| n.starts_with("fp8(") && n.ends_with(')'))
                .count();
            (
                exec.step(&mut session, &ids, &[]).unwrap().outputs["logits"]
                    .data
                    .clone(),
                fp8,
            )
        };
        let ((a, na), (b, nb)) = (run(&kept), run(&requant));
        assert_eq!((na, nb), (8, 8), "fp8 weights stored");
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-4, "fp8 kept vs re-quantized: {err:e}");
    }
    let mut first = true;
    for (folder, qc, parts) in cases {
        let ckpt = write(folder, Some(qc), &*parts);
        if std::mem::take(&mut first) {
            // Parallel builds of quantized weights are not built: refused by name.
            let opts = crate::build::BuildOptions {
                tp: 2,
                ..Default::default()
            };
            let Err(err) =
                crate::build::build(&ckpt, &dir.path().join("tp.kiln"), &opts, &|_, _| {})
            else {
                panic!("a --tp build of a pre-quantized checkpoint was not refused");
            };
            let err = err.to_string();
            assert!(
                err.contains("pre-quantized") && err.contains("--tp"),
                "{err}"
            );
        }
        let (got, int4, notes, down) = logits(&ckpt);
        let stored = &packed
            .iter()
            .find(|(b, _)| b == "model.layers.1.mlp.down_proj")
            .unwrap()
            .1;
        assert_eq!(
            down.as_ref(),
            Some(&stored.q),
            "{folder}: codes re-quantized"
        );
        let err: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt()
            / want
                .iter()
                .map(|b| f64::from(*b).powi(2))
                .sum::<f64>()
                .sqrt();
        assert!(err <= 1e-5, "{folder}: {err:.2e}");
        // 2 layers × (fused qkv, o, fused gate/up, down) stored as int4 codes.
        assert_eq!(int4.len(), 8, "{folder}: {int4:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("14 linear weights keep their int4g32z codes")),
            "{folder}: {notes:?}"
        );
    }
    // Act-order proper: the same values stored with the groups relabelled (group j's zero
    // points and scales at position (j + 1) mod G, `g_idx[k] = (k / G + 1) mod G`), as GPTQ's
    // act-order numbers groups in quantization order: read dequantized, exactly.
    let act_order = write(
        "gptq_act_order",
        Some(json!({"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": true})),
        &move |p: &quant::Packed| {
            let groups = p.cols / g;
            let shift = |j: usize| (j + 1) % groups;
            let mut moved = p.clone();
            for n in 0..p.rows {
                for j in 0..groups {
                    moved.zero[n * groups + shift(j)] = p.zero[n * groups + j];
                    moved.scale[n * groups + shift(j)] = p.scale[n * groups + j];
                }
            }
            let g_idx: Vec<u32> = (0..p.cols).map(|k| shift(k / g) as u32).collect();
            gptq_parts(&moved, g, false, &g_idx)
        },
    );
    let (got, int4, notes, _) = logits(&act_order);
    assert!(int4.is_empty(), "act-order weights kept as codes: {int4:?}");
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err <= 1e-5, "act-order: {err:e}");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("act-order (desc_act)") && n.contains("read dequantized")),
        "{notes:?}"
    );
}
