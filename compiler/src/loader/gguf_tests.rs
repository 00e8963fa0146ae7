//! Tests of the GGUF reader: synthetic files written here (metadata and dtype round trips,
//! corrupt and truncated files, Q/K unpermutation, tokenizer rebuild) and, when present, the
//! demo model SmolLM2-135M-Instruct Q4_1 compared with transformers' reference outputs. The
//! families written as GGUFs and built are in `gguf_family_tests.rs`.

use super::*;
use crate::loader::gguf_quant::{permute_qk, unpermute_qk};
use half::{bf16, f16};
use serde_json::json;
use std::str::FromStr;
use std::time::Instant;

use crate::loader::gguf_write::{put_str, GgufWriter as Writer};

/// Writes `bytes` to a temporary file and opens it.
fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufFile::open(&path)
}

fn open_writer(w: &Writer) -> GgufFile {
    open_bytes(&w.bytes()).unwrap()
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn llama_meta(w: Writer) -> Writer {
    w.kv("general.architecture", GgufValue::String("llama".into()))
        .kv("llama.embedding_length", GgufValue::U32(8))
        .kv("llama.feed_forward_length", GgufValue::U32(16))
        .kv("llama.block_count", GgufValue::U32(1))
        .kv("llama.attention.head_count", GgufValue::U32(2))
        .kv("llama.attention.head_count_kv", GgufValue::U32(1))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        )
        .kv("llama.context_length", GgufValue::U32(128))
}

// ---------------------------------------------------------------------------------------------
// Metadata and dtypes.

#[test]
fn gguf_metadata_round_trip_all_types() {
    let values = vec![
        ("a.u8", GgufValue::U8(200)),
        ("a.i8", GgufValue::I8(-100)),
        ("a.u16", GgufValue::U16(60000)),
        ("a.i16", GgufValue::I16(-30000)),
        ("a.u32", GgufValue::U32(4_000_000_000)),
        ("a.i32", GgufValue::I32(-2_000_000_000)),
        ("a.f32", GgufValue::F32(1.25e-3)),
        ("a.bool", GgufValue::Bool(true)),
        ("a.string", GgufValue::String("héllo ✓".into())),
        ("a.u64", GgufValue::U64(u64::MAX)),
        ("a.i64", GgufValue::I64(i64::MIN)),
        ("a.f64", GgufValue::F64(-2.5e300)),
        (
            "a.strings",
            GgufValue::Array(vec![
                GgufValue::String("x".into()),
                GgufValue::String(String::new()),
            ]),
        ),
        (
            "a.nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(-2)]),
                GgufValue::Array(vec![GgufValue::I32(3)]),
            ]),
        ),
        ("a.empty", GgufValue::Array(vec![])),
    ];
    let mut w = Writer::new();
    for (k, v) in &values {
        w = w.kv(k, v.clone());
    }
    let f = open_writer(&w);
    assert_eq!(f.version(), 3);
    for (k, v) in &values {
        assert_eq!(f.metadata(k), Some(v), "{k}");
    }
    assert_eq!(f.metadata("a.missing"), None);
    let keys: Vec<&str> = f.metadata_keys().collect();
    assert_eq!(keys.len(), values.len());
    assert_eq!(keys[0], "a.u8");
    assert!(f.tensors().is_empty());
    assert!(matches!(
        f.architecture(),
        Err(GgufError::MissingKey { .. })
    ));
    assert_eq!(GgufValue::I8(-1).as_u64(), None);
    assert_eq!(GgufValue::U16(7).as_u64(), Some(7));
    assert_eq!(GgufValue::F32(0.5).as_f64(), Some(0.5));
}

#[test]
fn gguf_dtype_round_trips() {
    // F32, 2×3 in HF layout (GGUF dims [3, 2]).
    let f32_vals = [1.5f32, -2.0, 0.0, 3.25, -0.125, 1e-7];
    // F16 and BF16 values chosen to be exact in the type.
    let f16_vals = [0.5f32, -1.0, 65504.0, 6.103_515_6e-5];
    let bf16_vals = [1.0f32, -3.5, 256.0, 0.156_25, -1.0e30];
    let bf16_data: Vec<u8> = bf16_vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let bf16_expect: Vec<f32> = bf16_vals
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect();

    // Q8_0: two blocks (HF shape [2, 32]); d = 0.5 then 0.25, q = j - 16.
    let mut q8 = Vec::new();
    let mut q8_expect = Vec::new();
    for d in [0.5f32, 0.25] {
        q8.extend(f16_bytes(d));
        for j in 0..32i32 {
            q8.push((j - 16) as i8 as u8);
            q8_expect.push((j - 16) as f32 * d);
        }
    }
    // Q4_0: d = 0.5, byte j holds element j (low nibble, = j) and element j + 16 (high, = 15 - j).
    let mut q40 = f16_bytes(0.5).to_vec();
    let mut q40_expect = vec![0f32; 32];
    for j in 0..16u8 {
        q40.push(j | ((15 - j) << 4));
        q40_expect[j as usize] = (f32::from(j) - 8.0) * 0.5;
        q40_expect[j as usize + 16] = (f32::from(15 - j) - 8.0) * 0.5;
    }
    // Q4_1: d = 0.25, m = -1.0, same nibbles.
    let mut q41 = f16_bytes(0.25).to_vec();
    q41.extend(f16_bytes(-1.0));
    let mut q41_expect = vec![0f32; 32];
    for j in 0..16u8 {
        q41.push(j | ((15 - j) << 4));
        q41_expect[j as usize] = f32::from(j) * 0.25 - 1.0;
        q41_expect[j as usize + 16] = f32::from(15 - j) * 0.25 - 1.0;
    }
    let w = Writer::new()
        .f32_tensor("t.f32", &[3, 2], &f32_vals)
        .tensor(
            "t.f16",
            &[4],
            1,
            f16_vals.iter().flat_map(|&v| f16_bytes(v)).collect(),
        )
        .tensor("t.bf16", &[5], 30, bf16_data)
        .tensor("t.q8_0", &[32, 2], 8, q8)
        .tensor("t.q4_0", &[32], 2, q40)
        .tensor("t.q4_1", &[32], 3, q41);
    let f = open_writer(&w);
    let names: Vec<(String, Vec<usize>)> = f.tensors();
    assert_eq!(
        names,
        vec![
            ("t.bf16".to_string(), vec![5]),
            ("t.f16".to_string(), vec![4]),
            ("t.f32".to_string(), vec![2, 3]),
            ("t.q4_0".to_string(), vec![32]),
            ("t.q4_1".to_string(), vec![32]),
            ("t.q8_0".to_string(), vec![2, 32]),
        ]
    );
    assert_eq!(f.read_f32("t.f32").unwrap(), f32_vals);
    assert_eq!(f.read_f32("t.f16").unwrap(), f16_vals);
    assert_eq!(f.read_f32("t.bf16").unwrap(), bf16_expect);
    assert_eq!(f.read_f32("t.q8_0").unwrap(), q8_expect);
    assert_eq!(f.read_f32("t.q4_0").unwrap(), q40_expect);
    assert_eq!(f.read_f32("t.q4_1").unwrap(), q41_expect);
    assert_eq!(f.tensor_storage("t.q4_1"), Some(("t.q4_1", "Q4_1")));
    let err = f.read_f32("nope").unwrap_err().to_string();
    assert!(err.contains("'nope'"), "{err}");
}

#[test]
fn gguf_large_q4_1_matches_scalar_reference() {
    // Many blocks (more than one parallel task), pseudo-random bytes with sane scales.
    let n_blocks = 5000usize;
    let mut data = Vec::with_capacity(n_blocks * 20);
    let mut expect = Vec::with_capacity(n_blocks * 32);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..n_blocks {
        let d = f16::from_f32((next() % 1000) as f32 / 7919.0);
        let m = f16::from_f32(-((next() % 1000) as f32) / 3001.0);
        let qs: Vec<u8> = (0..16).map(|_| next() as u8).collect();
        data.extend(d.to_le_bytes());
        data.extend(m.to_le_bytes());
        data.extend(&qs);
        let (d, m) = (d.to_f32(), m.to_f32());
        let lo = qs.iter().map(|q| f32::from(q & 15) * d + m);
        let hi: Vec<f32> = qs.iter().map(|q| f32::from(q >> 4) * d + m).collect();
        expect.extend(lo);
        expect.extend(hi);
    }
    let f = open_writer(&Writer::new().tensor("big", &[32 * 100, 50], 3, data));
    assert_eq!(f.tensors(), vec![("big".to_string(), vec![50, 3200])]);
    let got = f.read_f32("big").unwrap();
    assert!(got
        .iter()
        .zip(&expect)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn gguf_unsupported_and_unknown_types() {
    let f = open_writer(&Writer::new().tensor("k", &[256], 10, vec![0; 84]));
    let err = f.read_f32("k").unwrap_err();
    assert!(matches!(
        err,
        GgufError::UnsupportedTensorType {
            type_name: "Q2_K",
            ..
        }
    ));
    assert!(
        err.to_string().contains("Q2_K") && err.to_string().contains("'k'"),
        "{err}"
    );

    let err = open_bytes(&Writer::new().tensor("u", &[4], 99, vec![0; 4]).bytes()).unwrap_err();
    assert!(
        matches!(err, GgufError::UnknownTensorType { type_id: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("'u'"), "{err}");

    // Row length not a multiple of the block size.
    let err = open_bytes(&Writer::new().tensor("q", &[16], 8, vec![0; 34]).bytes()).unwrap_err();
    assert!(matches!(err, GgufError::BadTensorShape { .. }), "{err}");
}

#[test]
fn gguf_alignment_and_v2() {
    let w = Writer::new()
        .kv("general.alignment", GgufValue::U32(64))
        .f32_tensor("a", &[3], &[1.0, 2.0, 3.0])
        .f32_tensor("b", &[2], &[4.0, 5.0]);
    let mut bytes = w.bytes();
    let f = open_bytes(&bytes).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.read_f32("b").unwrap(), [4.0, 5.0]);
    bytes[4] = 2; // version 2 has the same layout
    assert_eq!(open_bytes(&bytes).unwrap().version(), 2);

    let bad = Writer::new()
        .kv("general.alignment", GgufValue::U32(0))
        .bytes();
    assert!(matches!(open_bytes(&bad), Err(GgufError::BadKey { .. })));
    let bad = Writer::new()
        .kv("general.alignment", GgufValue::U32(48))
        .bytes();
    assert!(matches!(open_bytes(&bad), Err(GgufError::BadKey { .. })));
}

// ---------------------------------------------------------------------------------------------
// Corrupt input: always an error, never a panic.

fn sample_file() -> Writer {
    llama_meta(Writer::new())
        .kv(
            "tokenizer.ggml.tokens",
            GgufValue::Array(vec![
                GgufValue::String("a".into()),
                GgufValue::String("b".into()),
            ]),
        )
        .kv(
            "x.nested",
            GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::U16(1)])]),
        )
        .f32_tensor("token_embd.weight", &[8, 2], &[0.5; 16])
        .tensor("blk.0.attn_k.weight", &[32, 4], 8, {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.extend(f16_bytes(1.0));
                v.extend([3u8; 32]);
            }
            v
        })
}

#[test]
fn gguf_truncated_at_every_offset_is_an_error() {
    let bytes = sample_file().bytes();
    let full = open_bytes(&bytes).unwrap();
    assert_eq!(
        full.read_f32("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .len(),
        128
    );
    for len in 0..bytes.len() {
        match open_bytes(&bytes[..len]) {
            Ok(_) => panic!("prefix of {len} of {} bytes opened", bytes.len()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("test.gguf"), "{msg}");
            }
        }
    }
    // Spot-check the kind of error at a few offsets.
    assert!(matches!(
        open_bytes(&bytes[..2]),
        Err(GgufError::BadMagic { .. })
    ));
    assert!(matches!(
        open_bytes(&bytes[..10]),
        Err(GgufError::Truncated { .. })
    ));
    assert!(matches!(
        open_bytes(&bytes[..bytes.len() - 1]),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
}

#[test]
fn gguf_bad_headers_are_errors() {
    let good = sample_file().bytes();
    let patch = |at: usize, with: &[u8]| {
        let mut b = good.clone();
        b[at..at + with.len()].copy_from_slice(with);
        open_bytes(&b)
    };
    let err = patch(0, b"GGUG").unwrap_err();
    assert!(matches!(err, GgufError::BadMagic { .. }));
    assert!(
        err.to_string().contains("expected the bytes \"GGUF\""),
        "{err}"
    );
    assert!(matches!(
        patch(4, &1u32.to_le_bytes()),
        Err(GgufError::UnsupportedVersion { found: 1, .. })
    ));
    // A big-endian v3 file reads as version 0x03000000.
    assert!(matches!(
        patch(4, &3u32.to_be_bytes()),
        Err(GgufError::UnsupportedVersion { .. })
    ));
    // Absurd counts.
    assert!(matches!(
        patch(8, &u64::MAX.to_le_bytes()),
        Err(GgufError::Corrupt { .. })
    ));
    assert!(matches!(
        patch(16, &u64::MAX.to_le_bytes()),
        Err(GgufError::Corrupt { .. })
    ));
    assert!(matches!(
        patch(16, &(1u64 << 40).to_le_bytes()),
        Err(GgufError::Corrupt { .. })
    ));
    // First key's length runs past the end.
    assert!(matches!(
        patch(24, &(u64::MAX - 3).to_le_bytes()),
        Err(GgufError::Truncated { .. })
    ));
    // Unknown value type of the first key ("general.architecture", 20 bytes).
    let err = patch(24 + 8 + 20, &77u32.to_le_bytes()).unwrap_err();
    assert!(matches!(err, GgufError::Corrupt { .. }));
    assert!(err.to_string().contains("general.architecture"), "{err}");
    // Invalid UTF-8 in a key.
    assert!(matches!(
        patch(24 + 8, &[0xFF]),
        Err(GgufError::Corrupt { .. })
    ));
}

#[test]
fn gguf_bad_tensor_infos_are_errors() {
    // One tensor info "t" with these fields, then `data_len` bytes of data.
    let mk = |dims: &[u64], ty: u32, offset: u64, data_len: usize| {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        put_str(&mut b, "t");
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32 + data_len, 0);
        open_bytes(&b)
    };
    assert!(mk(&[2], 0, 0, 8).is_ok());
    assert!(matches!(
        mk(&[2], 0, 32, 8),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    assert!(matches!(
        mk(&[2], 0, u64::MAX - 31, 8),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    assert!(matches!(
        mk(&[3], 0, 0, 8),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    assert!(matches!(mk(&[2], 0, 4, 64), Err(GgufError::Corrupt { .. }))); // unaligned
    assert!(matches!(
        mk(&[u64::MAX / 2, 4], 0, 0, 8),
        Err(GgufError::BadTensorShape { .. })
    ));
    assert!(matches!(
        mk(&[1, 1, 1, 1, 1], 0, 0, 8),
        Err(GgufError::Corrupt { .. })
    ));
    assert!(matches!(mk(&[], 0, 0, 8), Err(GgufError::Corrupt { .. })));
    let err = mk(&[1 << 62], 0, 0, 8).unwrap_err();
    assert!(err.to_string().contains("'t'"), "{err}");

    // Duplicate tensor and key names.
    let w = Writer::new()
        .f32_tensor("a", &[1], &[1.0])
        .f32_tensor("a", &[1], &[2.0]);
    assert!(matches!(
        open_bytes(&w.bytes()),
        Err(GgufError::Corrupt { .. })
    ));
    let w = Writer::new()
        .kv("k", GgufValue::U8(1))
        .kv("k", GgufValue::U8(2));
    assert!(matches!(
        open_bytes(&w.bytes()),
        Err(GgufError::Corrupt { .. })
    ));
}

#[test]
fn gguf_deeply_nested_array_is_an_error() {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    put_str(&mut b, "deep");
    b.extend(9u32.to_le_bytes());
    for _ in 0..100 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    assert!(matches!(open_bytes(&b), Err(GgufError::Corrupt { .. })));
}

#[test]
fn gguf_random_corruption_never_panics() {
    let good = sample_file().bytes();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.gguf");
    for _ in 0..3000 {
        let mut b = good.clone();
        for _ in 0..1 + (x % 4) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % b.len();
            b[at] = (x >> 32) as u8;
        }
        std::fs::write(&path, &b).unwrap();
        if let Ok(f) = GgufFile::open(&path) {
            for (name, _) in f.tensors() {
                let _ = f.read_f32(&name);
            }
            let _ = f.hf_config();
            let _ = f.tokenizer_json();
            let _ = f.architecture();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q/K permutation and llama naming.

#[test]
fn gguf_qk_unpermute_small_matrix() {
    // One head of 4 rows: HF rotate_half pairs rows (0, 2) and (1, 3); llama.cpp interleaves
    // them, so the GGUF row order is [0, 2, 1, 3].
    let gguf = [0.0f32, 2.0, 1.0, 3.0];
    assert_eq!(unpermute_qk(&gguf, 4, 1, 1).unwrap(), [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(permute_qk(&[0.0, 1.0, 2.0, 3.0], 4, 1, 1).unwrap(), gguf);
    // Two heads of 4 rows, 2 columns (element = 10 * row + col).
    let hf: Vec<f32> = (0..8)
        .flat_map(|r| (0..2).map(move |c| (10 * r + c) as f32))
        .collect();
    let rows_of = |w: &[f32]| w.chunks(2).map(|r| r[0] as usize / 10).collect::<Vec<_>>();
    assert_eq!(
        rows_of(&permute_qk(&hf, 8, 2, 2).unwrap()),
        [0, 2, 1, 3, 4, 6, 5, 7]
    );
    // 1 head of 8 rows: halves [0..4] and [4..8] interleaved.
    assert_eq!(
        rows_of(&permute_qk(&hf, 8, 2, 1).unwrap()),
        [0, 4, 1, 5, 2, 6, 3, 7]
    );
}

#[test]
fn gguf_qk_permute_unpermute_identity() {
    for (rows, cols, heads) in [(8, 3, 2), (12, 5, 3), (64, 7, 4), (64, 1, 1)] {
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_qk(&w, rows, cols, heads).unwrap();
        assert_ne!(p, w);
        assert_eq!(unpermute_qk(&p, rows, cols, heads).unwrap(), w);
        assert_eq!(
            permute_qk(
                &unpermute_qk(&w, rows, cols, heads).unwrap(),
                rows,
                cols,
                heads
            )
            .unwrap(),
            w
        );
    }
    assert!(unpermute_qk(&[0.0; 6], 6, 1, 2).is_err()); // odd rows per head
    assert!(unpermute_qk(&[0.0; 6], 3, 1, 0).is_err());
    assert!(unpermute_qk(&[0.0; 5], 6, 1, 1).is_err());
}

#[test]
fn gguf_llama_names_and_qk_unpermuted_on_read() {
    // HF weights: q [8, 3] (2 heads of 4), k [4, 3] (1 KV head), v [4, 3].
    let q: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let k: Vec<f32> = (0..12).map(|i| 100.0 + i as f32).collect();
    let qb: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
    let w = llama_meta(Writer::new())
        .f32_tensor(
            "blk.0.attn_q.weight",
            &[3, 8],
            &permute_qk(&q, 8, 3, 2).unwrap(),
        )
        .f32_tensor(
            "blk.0.attn_k.weight",
            &[3, 4],
            &permute_qk(&k, 4, 3, 1).unwrap(),
        )
        .f32_tensor("blk.0.attn_v.weight", &[3, 4], &k)
        .f32_tensor(
            "blk.0.attn_q.bias",
            &[8],
            &permute_qk(&qb, 8, 1, 2).unwrap(),
        )
        .f32_tensor("blk.0.attn_norm.weight", &[8], &[1.0; 8])
        .f32_tensor("blk.0.attn_output.weight", &[8, 8], &[0.0; 64])
        .f32_tensor("blk.0.ffn_norm.weight", &[8], &[1.0; 8])
        .f32_tensor("blk.0.ffn_gate.weight", &[8, 16], &[0.0; 128])
        .f32_tensor("blk.0.ffn_up.weight", &[8, 16], &[0.0; 128])
        .f32_tensor("blk.0.ffn_down.weight", &[16, 8], &[0.0; 128])
        .f32_tensor("token_embd.weight", &[8, 4], &[0.0; 32])
        .f32_tensor("output_norm.weight", &[8], &[1.0; 8])
        .f32_tensor("output.weight", &[8, 4], &[0.0; 32])
        .f32_tensor("rope_freqs.weight", &[2], &[1.0; 2])
        .f32_tensor("blk.x.attn_q.weight", &[1], &[1.0]);
    let f = open_writer(&w);
    let names: Vec<String> = f.tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "blk.x.attn_q.weight",
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.norm.weight",
            "rope_freqs.weight",
        ]
    );
    let shapes: HashMap<String, Vec<usize>> = f.tensors().into_iter().collect();
    assert_eq!(shapes["model.layers.0.mlp.down_proj.weight"], [8, 16]);
    assert_eq!(shapes["model.layers.0.self_attn.k_proj.weight"], [4, 3]);
    assert_eq!(
        f.read_f32("model.layers.0.self_attn.q_proj.weight")
            .unwrap(),
        q
    );
    assert_eq!(
        f.read_f32("model.layers.0.self_attn.k_proj.weight")
            .unwrap(),
        k
    );
    assert_eq!(
        f.read_f32("model.layers.0.self_attn.v_proj.weight")
            .unwrap(),
        k
    );
    assert_eq!(
        f.read_f32("model.layers.0.self_attn.q_proj.bias").unwrap(),
        qb
    );

    let cfg = f.hf_config().unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], 8);
    assert_eq!(cfg["intermediate_size"], 16);
    assert_eq!(cfg["num_hidden_layers"], 1);
    assert_eq!(cfg["num_attention_heads"], 2);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["head_dim"], 4);
    assert_eq!(cfg["rope_theta"], 10000.0);
    assert_eq!(cfg["rms_norm_eps"], f64::from(1e-5f32));
    assert_eq!(cfg["max_position_embeddings"], 128);
    assert_eq!(cfg["vocab_size"], 4); // from token_embd.weight
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["attention_bias"], true);
    assert!(cfg.get("bos_token_id").is_none());
}

#[test]
fn gguf_hf_config_defaults_and_errors() {
    let w = Writer::new()
        .kv("general.architecture", GgufValue::String("llama".into()))
        .kv("llama.embedding_length", GgufValue::U32(64))
        .kv("llama.feed_forward_length", GgufValue::U64(128))
        .kv("llama.block_count", GgufValue::U32(2))
        .kv("llama.attention.head_count", GgufValue::U32(4))
        .kv("llama.attention.key_length", GgufValue::U32(32))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-6),
        )
        .kv("llama.rope.freq_base", GgufValue::F32(500000.0))
        .kv("llama.context_length", GgufValue::U32(4096))
        .kv("llama.vocab_size", GgufValue::U32(1000))
        .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(7))
        .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(8));
    let cfg = open_writer(&w).hf_config().unwrap();
    assert_eq!(cfg["num_key_value_heads"], 4);
    assert_eq!(cfg["head_dim"], 32);
    assert_eq!(cfg["rope_theta"], 500000.0);
    assert_eq!(cfg["vocab_size"], 1000);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["bos_token_id"], 7);
    assert_eq!(cfg["eos_token_id"], 8);
    assert!(cfg.get("pad_token_id").is_none());

    let missing = Writer::new().kv("general.architecture", GgufValue::String("llama".into()));
    let err = open_writer(&missing).hf_config().unwrap_err();
    assert!(matches!(err, GgufError::MissingKey { .. }));
    assert!(err.to_string().contains("llama.embedding_length"), "{err}");

    let wrong = llama_meta(Writer::new()).kv("llama.rope.freq_base", GgufValue::String("x".into()));
    let err = open_writer(&wrong).hf_config().unwrap_err();
    assert!(
        err.to_string().contains("llama.rope.freq_base") && err.to_string().contains("a number"),
        "{err}"
    );

    let other = Writer::new().kv("general.architecture", GgufValue::String("gemma3".into()));
    let f = open_writer(&other);
    assert_eq!(f.architecture().unwrap(), "gemma3");
    let err = f.hf_config().unwrap_err();
    assert!(matches!(err, GgufError::Unsupported { .. }));
    assert!(err.to_string().contains("gemma3"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Tokenizer.

fn strings(v: &[&str]) -> GgufValue {
    GgufValue::Array(v.iter().map(|s| GgufValue::String((*s).into())).collect())
}

#[test]
fn gguf_tokenizer_json_synthetic() {
    let tokens = ["<s>", "a", "b", "ab", "Ġ", "Ġab", "<user>", "ab"];
    let types = [3, 1, 1, 1, 1, 1, 4, 1];
    let w = Writer::new()
        .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", strings(&tokens))
        .kv(
            "tokenizer.ggml.token_type",
            GgufValue::Array(types.iter().map(|&t| GgufValue::I32(t)).collect()),
        )
        .kv("tokenizer.ggml.merges", strings(&["a b", "Ġ ab"]))
        .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(0))
        .kv(
            "tokenizer.chat_template",
            GgufValue::String("{{ x }}".into()),
        );
    let f = open_writer(&w);
    assert_eq!(f.chat_template(), Some("{{ x }}"));
    let text = f.tokenizer_json().unwrap();
    let j: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["model"]["type"], "BPE");
    assert_eq!(j["model"]["merges"], json!([["a", "b"], ["Ġ", "ab"]]));
    // "ab" appears twice: the last id wins, the earlier one is dropped.
    assert_eq!(j["model"]["vocab"]["ab"], 7);
    assert_eq!(j["model"]["vocab"].as_object().unwrap().len(), 7);
    assert_eq!(j["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(j["pre_tokenizer"]["add_prefix_space"], false);
    assert_eq!(j["decoder"]["type"], "ByteLevel");
    assert!(j["normalizer"].is_null());
    assert_eq!(
        j["post_processor"]["single"],
        json!([{ "Sequence": { "id": "A", "type_id": 0 } }])
    );
    let added = j["added_tokens"].as_array().unwrap();
    assert_eq!(added.len(), 2);
    assert_eq!(added[0]["content"], "<s>");
    assert_eq!(added[0]["special"], true);
    assert_eq!(added[1]["content"], "<user>");
    assert_eq!(added[1]["special"], false);

    let tok = tokenizers::Tokenizer::from_str(&text).unwrap();
    let enc = tok.encode("ab ab<s>b<user>", false).unwrap();
    assert_eq!(enc.get_ids(), [7, 5, 0, 2, 6]);

    // add_bos_token puts the BOS token in front.
    let f = open_writer(&w.kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(true)));
    let tok = tokenizers::Tokenizer::from_str(&f.tokenizer_json().unwrap()).unwrap();
    assert_eq!(tok.encode("ab", true).unwrap().get_ids(), [0, 7]);
}

/// A SentencePiece (`llama`) vocabulary: the highest-scoring adjacent pair merges first, spaces
/// become `▁` with one prepended, unknown characters fall back to their bytes, and decoding
/// gives the text back.
#[test]
fn gguf_sentencepiece_tokenizer() {
    let pieces = [
        "<unk>", "<s>", "</s>", "<0xC3>", "<0xA9>", "▁", "a", "b", "ab", "▁a", "▁ab", "ba",
    ];
    let scores = [
        0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -5.0, -4.0, -6.0, -0.5,
    ];
    let types = [2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 1, 1];
    let w = Writer::new()
        .kv("tokenizer.ggml.model", GgufValue::String("llama".into()))
        .kv("tokenizer.ggml.tokens", strings(&pieces))
        .kv(
            "tokenizer.ggml.scores",
            GgufValue::Array(scores.iter().map(|&s| GgufValue::F32(s)).collect()),
        )
        .kv(
            "tokenizer.ggml.token_type",
            GgufValue::Array(types.iter().map(|&t| GgufValue::I32(t)).collect()),
        )
        .kv("tokenizer.ggml.unknown_token_id", GgufValue::U32(0));
    let tok = tokenizers::Tokenizer::from_str(&open_writer(&w).tokenizer_json().unwrap()).unwrap();
    // "▁aba": of the pairs (▁,a) -4, (a,b) -5, (b,a) -0.5, "ba" merges first, then (▁,a);
    // "▁a"+"ba" is no piece.
    assert_eq!(tok.encode("aba", false).unwrap().get_ids(), [9, 11]);
    // "▁ab": (▁,a) -4 before (a,b) -5, then (▁a, b) → "▁ab".
    assert_eq!(tok.encode("ab", false).unwrap().get_ids(), [10]);
    // é is not a piece: its two UTF-8 bytes.
    assert_eq!(tok.encode("é", false).unwrap().get_ids(), [5, 3, 4]);
    assert_eq!(tok.decode(&[10, 5, 3, 4], false).unwrap(), "ab é");
}

#[test]
fn gguf_tokenizer_errors() {
    let t5 = Writer::new()
        .kv("tokenizer.ggml.model", GgufValue::String("t5".into()))
        .kv("tokenizer.ggml.tokens", strings(&["a"]));
    let err = open_writer(&t5).tokenizer_json().unwrap_err();
    assert!(matches!(err, GgufError::Unsupported { .. }));
    assert!(err.to_string().contains("gpt2"), "{err}");
    // SentencePiece needs one score per token.
    let spm = Writer::new()
        .kv("tokenizer.ggml.model", GgufValue::String("llama".into()))
        .kv("tokenizer.ggml.tokens", strings(&["a"]));
    let err = open_writer(&spm).tokenizer_json().unwrap_err();
    assert!(matches!(err, GgufError::MissingKey { .. }), "{err}");
    let spm = spm.kv(
        "tokenizer.ggml.scores",
        GgufValue::Array(vec![GgufValue::F32(0.0), GgufValue::F32(1.0)]),
    );
    let err = open_writer(&spm).tokenizer_json().unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.scores"), "{err}");
    let bad_merge = Writer::new()
        .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", strings(&["a"]))
        .kv("tokenizer.ggml.merges", strings(&["ab"]));
    let err = open_writer(&bad_merge).tokenizer_json().unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");
    let no_tokens = Writer::new().kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    assert!(matches!(
        open_writer(&no_tokens).tokenizer_json(),
        Err(GgufError::MissingKey { .. })
    ));
    assert_eq!(open_writer(&no_tokens).chat_template(), None);
}

#[test]
fn gguf_tokenizer_pre_types() {
    let base = || {
        Writer::new()
            .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
            .kv("tokenizer.ggml.tokens", strings(&["a", "1", "2", "12"]))
            .kv("tokenizer.ggml.merges", strings(&["1 2"]))
    };
    let with_pre = |pre: &str| base().kv("tokenizer.ggml.pre", GgufValue::String(pre.into()));
    // Absent, "default" and "gpt2" give the same file.
    let plain = open_writer(&base()).tokenizer_json().unwrap();
    for pre in ["default", "gpt2"] {
        assert_eq!(
            open_writer(&with_pre(pre)).tokenizer_json().unwrap(),
            plain,
            "{pre}"
        );
    }
    // Llama 3: a regex split (up to 3 digits), byte-level without regex, merges ignored.
    let text = open_writer(&with_pre("llama-bpe"))
        .tokenizer_json()
        .unwrap();
    let j: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["pre_tokenizer"]["type"], "Sequence");
    let steps = j["pre_tokenizer"]["pretokenizers"].as_array().unwrap();
    assert_eq!(steps[0]["type"], "Split");
    assert_eq!(steps[0]["behavior"], "Isolated");
    assert_eq!(steps[1]["type"], "ByteLevel");
    assert_eq!(steps[1]["use_regex"], false);
    assert_eq!(j["model"]["ignore_merges"], true);
    let tok = tokenizers::Tokenizer::from_str(&text).unwrap();
    assert_eq!(tok.encode("12", false).unwrap().get_ids(), [3]);
    // StarCoder-style: every digit alone.
    let text = open_writer(&with_pre("starcoder"))
        .tokenizer_json()
        .unwrap();
    let tok = tokenizers::Tokenizer::from_str(&text).unwrap();
    assert_eq!(tok.encode("12", false).unwrap().get_ids(), [1, 2]);
    // Every regex compiles.
    for pre in ["qwen2", "qwen35", "dbrx", "smollm", "mpt", "command-r"] {
        let text = open_writer(&with_pre(pre)).tokenizer_json().unwrap();
        tokenizers::Tokenizer::from_str(&text).unwrap_or_else(|e| panic!("{pre}: {e}"));
    }
    // Anything else is refused, naming the key and the value.
    let err = open_writer(&with_pre("deepseek-coder"))
        .tokenizer_json()
        .unwrap_err();
    assert!(matches!(err, GgufError::Unsupported { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.ggml.pre") && msg.contains("deepseek-coder"),
        "{msg}"
    );
    let err = open_writer(&base().kv("tokenizer.ggml.pre", GgufValue::U32(1)))
        .tokenizer_json()
        .unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.pre"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The demo model (skipped when it has not been fetched).

const DEMO_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn demo_gguf() -> Option<GgufFile> {
    let path = match std::env::var_os("KILN_DEMO_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("KILN_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache"));
            cache.join("models").join(DEMO_FILE)
        }
    };
    if !path.exists() {
        println!(
            "skipping: demo model {} not found (run scripts/fetch-demo-model.sh or set KILN_DEMO_GGUF)",
            path.display()
        );
        return None;
    }
    Some(GgufFile::open(&path).unwrap())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/smollm2-135m")
        .join(name)
}

#[test]
fn gguf_demo_hf_config_matches_reference() {
    let Some(f) = demo_gguf() else { return };
    assert_eq!(f.architecture().unwrap(), "llama");
    let cfg = f.hf_config().unwrap();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap()).unwrap();
    for k in [
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "rope_parameters",
    ] {
        assert_eq!(cfg[k], reference[k], "{k}");
    }
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert!(f.chat_template().unwrap().contains("<|im_start|>"));
}

#[test]
fn gguf_demo_tensor_list() {
    let Some(f) = demo_gguf() else { return };
    let tensors: HashMap<String, Vec<usize>> = f.tensors().into_iter().collect();
    assert_eq!(tensors.len(), 1 + 1 + 30 * 9);
    assert!(!tensors.contains_key("lm_head.weight"));
    assert_eq!(tensors["model.embed_tokens.weight"], [49152, 576]);
    assert_eq!(tensors["model.norm.weight"], [576]);
    for l in 0..30 {
        let p = format!("model.layers.{l}.");
        assert_eq!(tensors[&format!("{p}self_attn.q_proj.weight")], [576, 576]);
        assert_eq!(tensors[&format!("{p}self_attn.k_proj.weight")], [192, 576]);
        assert_eq!(tensors[&format!("{p}self_attn.v_proj.weight")], [192, 576]);
        assert_eq!(tensors[&format!("{p}self_attn.o_proj.weight")], [576, 576]);
        assert_eq!(tensors[&format!("{p}mlp.gate_proj.weight")], [1536, 576]);
        assert_eq!(tensors[&format!("{p}mlp.up_proj.weight")], [1536, 576]);
        assert_eq!(tensors[&format!("{p}mlp.down_proj.weight")], [576, 1536]);
        assert_eq!(tensors[&format!("{p}input_layernorm.weight")], [576]);
        assert_eq!(
            tensors[&format!("{p}post_attention_layernorm.weight")],
            [576]
        );
    }
    assert_eq!(
        f.tensor_storage("model.embed_tokens.weight").unwrap().1,
        "Q8_0"
    );
    assert_eq!(
        f.tensor_storage("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .1,
        "Q4_1"
    );
}

#[test]
fn gguf_demo_read_all_tensors() {
    let Some(f) = demo_gguf() else { return };
    let t0 = Instant::now();
    let mut total = 0usize;
    for (name, shape) in f.tensors() {
        let v = f.read_f32(&name).unwrap();
        assert_eq!(v.len(), shape.iter().product::<usize>(), "{name}");
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        total += v.len();
    }
    let dt = t0.elapsed();
    println!(
        "read and dequantized {total} values of {} tensors in {dt:?}",
        f.tensors().len()
    );
    assert_eq!(total, 134_515_008);
    // Generous bound for unoptimized test builds; a release build takes a fraction of a second.
    assert!(dt.as_secs_f64() < 20.0, "{dt:?}");
}

#[test]
fn gguf_demo_tokenizer_cases() {
    let Some(f) = demo_gguf() else { return };
    let text = f.tokenizer_json().unwrap();
    let tok = tokenizers::Tokenizer::from_str(&text).unwrap();
    let public: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("public.json")).unwrap()).unwrap();
    let cases = public["tokenizer_cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let input = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(input, false).unwrap().get_ids(),
            ids,
            "{input:?}"
        );
    }
    for g in public["generations"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(g["input_ids"].clone()).unwrap();
        let prompt = g["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt, false).unwrap().get_ids(),
            ids,
            "{prompt:?}"
        );
    }
    // The whole file is byte-identical to the tokenizer.json transformers 5.23 wrote for this
    // GGUF, but for the pre-tokenizer: transformers ignores `tokenizer.ggml.pre` ("smollm"
    // here), kiln splits digits first as llama.cpp (and SmolLM2's own tokenizer.json) do.
    let reference = std::fs::read_to_string(fixture("tokenizer.json")).unwrap();
    let byte_level = r#"{
    "type": "ByteLevel",
    "add_prefix_space": false,
    "trim_offsets": true,
    "use_regex": true
  }"#;
    let smollm = r#"{
    "type": "Sequence",
    "pretokenizers": [
      {
        "type": "Digits",
        "individual_digits": true
      },
      {
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": true,
        "use_regex": true
      }
    ]
  }"#;
    assert_eq!(
        f.metadata("tokenizer.ggml.pre").and_then(|v| v.as_str()),
        Some("smollm")
    );
    let reference = reference.replacen(
        &format!("\"pre_tokenizer\": {byte_level}"),
        &format!("\"pre_tokenizer\": {smollm}"),
        1,
    );
    if text != reference {
        let at = text
            .bytes()
            .zip(reference.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let ctx = |s: &str| {
            s.get(at.saturating_sub(80)..(at + 80).min(s.len()))
                .map(str::to_owned)
        };
        panic!(
            "tokenizer.json differs from the reference at byte {at} (lengths {} vs {}):\n ours: {:?}\n ref:  {:?}",
            text.len(),
            reference.len(),
            ctx(&text),
            ctx(&reference)
        );
    }
}

/// Reads `[rows, cols]` f32 tensor `name` from a safetensors file.
fn st_tensor(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `x [n, k] · w[m, k]ᵀ → [n, m]`.
fn matmul_t(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|row| {
            w.chunks(k).map(move |wr| {
                row.iter()
                    .zip(wr)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>() as f32
            })
        })
        .collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(w.len())
        .flat_map(|row| {
            let ms = row
                .iter()
                .map(|v| f64::from(*v) * f64::from(*v))
                .sum::<f64>()
                / row.len() as f64;
            let inv = 1.0 / (ms + f64::from(eps)).sqrt();
            row.iter()
                .zip(w)
                .map(move |(v, g)| (f64::from(*v) * inv) as f32 * g)
        })
        .collect()
}

/// HF-style RoPE (rotate_half) on `[n, heads * 64]`, positions 0..n.
fn rope(x: &mut [f32], heads: usize, hd: usize, theta: f64) {
    let n = x.len() / (heads * hd);
    for p in 0..n {
        for h in 0..heads {
            let v = &mut x[(p * heads + h) * hd..(p * heads + h + 1) * hd];
            for i in 0..hd / 2 {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / hd as f64);
                let (s, c) = (p as f64 * freq).sin_cos();
                let (a, b) = (f64::from(v[i]), f64::from(v[i + hd / 2]));
                v[i] = (a * c - b * s) as f32;
                v[i + hd / 2] = (b * c + a * s) as f32;
            }
        }
    }
}

#[test]
fn gguf_demo_embeddings_and_layer0_match_transformers() {
    // hidden_state_0 checks Q8_0 dequantization (bit-exact); hidden_state_1 (after decoder layer
    // 0, computed here naively in f64-accumulated f32) checks Q4_1, the HF layouts, and the Q/K
    // unpermutation: with the GGUF row order, RoPE would pair the wrong dimensions.
    let Some(f) = demo_gguf() else { return };
    let bytes = std::fs::read(fixture("public_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = [504usize, 3575, 282, 4649, 314];
    let (d, heads, kv_heads, hd, ffn) = (576, 9, 3, 64, 1536);
    let n = ids.len();

    let embed = f.read_f32("model.embed_tokens.weight").unwrap();
    let x: Vec<f32> = ids
        .iter()
        .flat_map(|&i| embed[i * d..(i + 1) * d].to_vec())
        .collect();
    assert_eq!(x, st_tensor(&st, "p0.hidden_state_0"));

    let w = |name: &str| f.read_f32(&format!("model.layers.0.{name}")).unwrap();
    let h = rms_norm(&x, &w("input_layernorm.weight"), 1e-5);
    let mut q = matmul_t(&h, &w("self_attn.q_proj.weight"), d);
    let mut k = matmul_t(&h, &w("self_attn.k_proj.weight"), d);
    let v = matmul_t(&h, &w("self_attn.v_proj.weight"), d);
    rope(&mut q, heads, hd, 100000.0);
    rope(&mut k, kv_heads, hd, 100000.0);
    let mut attn = vec![0f32; n * heads * hd];
    for hh in 0..heads {
        let kvh = hh / (heads / kv_heads);
        for i in 0..n {
            let qi = &q[(i * heads + hh) * hd..][..hd];
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let kj = &k[(j * kv_heads + kvh) * hd..][..hd];
                    qi.iter()
                        .zip(kj)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            for t in 0..hd {
                let o: f64 = (0..=i)
                    .map(|j| e[j] / sum * f64::from(v[(j * kv_heads + kvh) * hd + t]))
                    .sum();
                attn[(i * heads + hh) * hd + t] = o as f32;
            }
        }
    }
    let o = matmul_t(&attn, &w("self_attn.o_proj.weight"), d);
    let x: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
    let h = rms_norm(&x, &w("post_attention_layernorm.weight"), 1e-5);
    let g = matmul_t(&h, &w("mlp.gate_proj.weight"), d);
    let u = matmul_t(&h, &w("mlp.up_proj.weight"), d);
    let act: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    let down = matmul_t(&act, &w("mlp.down_proj.weight"), ffn);
    let out: Vec<f32> = x.iter().zip(&down).map(|(a, b)| a + b).collect();

    let expect = st_tensor(&st, "p0.hidden_state_1");
    let max_ref = expect.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_err = out
        .iter()
        .zip(&expect)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("layer 0: max |ref| {max_ref}, max |err| {max_err}");
    assert!(
        max_err <= 1e-4 * max_ref.max(1.0),
        "max error {max_err} (max |ref| {max_ref})"
    );
}

#[test]
fn gguf_error_messages_are_specific() {
    let good = sample_file().bytes();
    let msg = |b: &[u8]| open_bytes(b).unwrap_err().to_string();
    let m = msg(&good[..2]);
    assert!(m.contains("test.gguf") && m.contains("found \"GG\""), "{m}");
    let m = msg(&good[..good.len() - 1]);
    assert!(
        m.contains("'blk.0.attn_k.weight'") && m.contains("(807 bytes)"),
        "{m}"
    );
    let f = open_writer(&Writer::new().tensor("k", &[256], 12, vec![0; 144]));
    let m = f.hf_config().unwrap_err().to_string();
    assert!(m.contains("'general.architecture'"), "{m}");
    let wrong = llama_meta(Writer::new()).kv("llama.rope.freq_base", GgufValue::String("x".into()));
    let m = open_writer(&wrong).hf_config().unwrap_err().to_string();
    assert!(
        m.ends_with("'llama.rope.freq_base': expected a number, found string \"x\""),
        "{m}"
    );
    let m = msg(&Writer::new().tensor("q", &[16], 8, vec![0; 34]).bytes());
    assert!(
        m.contains("tensor 'q'") && m.contains("Q8_0 block size 32") && m.contains("[16]"),
        "{m}"
    );
}

/// A GGUF whose `block_count` is absurd (1e9, 2^62) fails when the model expands, naming the
/// repeat and its limit, before anything is allocated per layer.
#[test]
fn gguf_absurd_block_count_is_an_error_not_an_abort() {
    use crate::build::graph_for;
    use crate::model::{ModelFile, LLAMA_RON};
    let model = ModelFile::parse(LLAMA_RON, "llama.ron").unwrap();
    for count in [GgufValue::U32(1_000_000_000), GgufValue::U64(1 << 62)] {
        let w = Writer::new()
            .kv("general.architecture", GgufValue::String("llama".into()))
            .kv("llama.embedding_length", GgufValue::U32(8))
            .kv("llama.feed_forward_length", GgufValue::U32(16))
            .kv("llama.block_count", count)
            .kv("llama.attention.head_count", GgufValue::U32(2))
            .kv(
                "llama.attention.layer_norm_rms_epsilon",
                GgufValue::F32(1e-5),
            )
            .kv("llama.context_length", GgufValue::U32(128))
            .kv("llama.vocab_size", GgufValue::U32(32));
        let cfg = open_writer(&w).hf_config().unwrap();
        let err = graph_for(&model, &cfg).unwrap_err().to_string();
        assert!(
            err.contains("repeat count") && err.contains("1..=4096"),
            "{err}"
        );
    }
}

#[path = "gguf_family_tests.rs"]
mod families;
