//! Each fused op against the chain of primitive ops it replaces (as `models/llama.ron` writes
//! them), on random non-zero data, over several shapes including odd ones.

use crate::cpu::elementwise::{binary, unary};
use crate::cpu::matmul::matmul;
use crate::cpu::movement::concat;
use crate::cpu::reduce::{reduce, softmax};
use crate::cpu::tensor::Tensor;
use crate::ir::{BinaryOp, DType, Op, ReduceOp, SymValues, UnaryOp};

/// The op's CPU reference (`super::eval`) at one step's sizes.
fn eval(op: &Op, ins: Vec<Tensor>) -> Result<Tensor, String> {
    let syms = SymValues {
        batch: 1,
        seq: 1,
        past: 0,
    };
    super::eval(op, ins, &syms)
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Magnitude in `[0.1, 1)`, random sign: never zero.
    fn value(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = (self.0 >> 40) as f32 / (1u64 << 24) as f32;
        if self.0 & 1 == 0 {
            0.1 + 0.9 * u
        } else {
            -0.1 - 0.9 * u
        }
    }
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(
            DType::F32,
            shape.to_vec(),
            (0..n).map(|_| self.value()).collect(),
        )
    }
}

fn scalar(v: f32) -> Tensor {
    Tensor::new(DType::F32, vec![], vec![v])
}

fn bin(op: BinaryOp, a: &Tensor, b: &Tensor) -> Tensor {
    binary(op, a.clone(), b.clone()).unwrap()
}

#[track_caller]
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shapes differ");
    assert_eq!(got.dtype, want.dtype, "{what}: dtypes differ");
    let (g, w) = (got.to_vec::<f32>(), want.to_vec::<f32>());
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in g.iter().zip(&w) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let e = (num / den.max(1e-30)).sqrt();
    assert!(e <= tol, "{what}: relative L2 error {e:e}");
}

/// `x · wᵀ` as the model file writes it: `MatMul(x, Transpose(w, [1, 0]))`.
fn primitive_linear(x: &Tensor, w: &Tensor) -> Tensor {
    matmul(x.clone(), w.permute(&[1, 0])).unwrap()
}

#[test]
fn rms_norm_matches_its_primitive_chain() {
    let mut rng = Rng::new(1);
    for shape in [
        vec![1, 1, 8],
        vec![2, 3, 576],
        vec![5, 7],
        vec![3, 1, 2, 13],
    ] {
        let x = rng.tensor(&shape);
        let w = rng.tensor(&[*shape.last().unwrap()]);
        let eps = 1e-5;
        let sq = bin(BinaryOp::Mul, &x, &x);
        let ms = reduce(ReduceOp::Mean, sq, shape.len() - 1, true).unwrap();
        let inv = unary(UnaryOp::Rsqrt, bin(BinaryOp::Add, &ms, &scalar(eps))).unwrap();
        let want = bin(BinaryOp::Mul, &bin(BinaryOp::Mul, &x, &inv), &w);
        let got = eval(&Op::RmsNorm { eps }, vec![x, w]).unwrap();
        assert_close(&got, &want, 1e-7, &format!("RmsNorm {shape:?}"));
    }
}

/// LayerNorm as GPT-2's model file writes it: the centred row's RMSNorm chain, plus the bias.
#[test]
fn layer_norm_matches_its_primitive_chain() {
    let mut rng = Rng::new(11);
    for shape in [
        vec![1, 1, 8],
        vec![2, 3, 768],
        vec![5, 7],
        vec![3, 1, 2, 13],
    ] {
        let (x, h) = (rng.tensor(&shape), *shape.last().unwrap());
        let (w, b) = (rng.tensor(&[h]), rng.tensor(&[h]));
        let axis = shape.len() - 1;
        let eps = 1e-5;
        let mu = reduce(ReduceOp::Mean, x.clone(), axis, true).unwrap();
        let xc = bin(BinaryOp::Sub, &x, &mu);
        let var = reduce(ReduceOp::Mean, bin(BinaryOp::Mul, &xc, &xc), axis, true).unwrap();
        let inv = unary(UnaryOp::Rsqrt, bin(BinaryOp::Add, &var, &scalar(eps))).unwrap();
        let want = bin(
            BinaryOp::Add,
            &bin(BinaryOp::Mul, &bin(BinaryOp::Mul, &xc, &inv), &w),
            &b,
        );
        let got = eval(&Op::LayerNorm { eps }, vec![x, w, b]).unwrap();
        assert_close(&got, &want, 1e-6, &format!("LayerNorm {shape:?}"));
    }
}

/// GELU (tanh approximation) as the model files write it, in sigmoid form.
#[test]
fn gelu_tanh_matches_its_primitive_chain() {
    let mut rng = Rng::new(12);
    let g = rng.tensor(&[3, 257]);
    let k = scalar(2.0 * (2.0 / std::f32::consts::PI).sqrt());
    let g3 = bin(BinaryOp::Mul, &bin(BinaryOp::Mul, &g, &g), &g);
    let inner = bin(
        BinaryOp::Add,
        &g,
        &bin(BinaryOp::Mul, &scalar(0.044715), &g3),
    );
    let z = unary(UnaryOp::Neg, bin(BinaryOp::Mul, &k, &inner)).unwrap();
    let den = bin(
        BinaryOp::Add,
        &unary(UnaryOp::Exp, z).unwrap(),
        &scalar(1.0),
    );
    let want = bin(BinaryOp::Mul, &g, &unary(UnaryOp::Recip, den).unwrap());
    let got = eval(&Op::GeluTanh, vec![g]).unwrap();
    assert_close(&got, &want, 1e-6, "GeluTanh");
}

#[test]
fn linear_and_linear_add_match_matmul_of_the_transposed_weight() {
    let mut rng = Rng::new(2);
    for (lead, k, n) in [
        (vec![1, 1], 8, 5),
        (vec![2, 9], 33, 17),
        (vec![1, 40], 64, 96),
    ] {
        let mut xs = lead.clone();
        xs.push(k);
        let x = rng.tensor(&xs);
        let w = rng.tensor(&[n, k]);
        let want = primitive_linear(&x, &w);
        let got = eval(&Op::Linear, vec![x.clone(), w.clone()]).unwrap();
        assert_close(&got, &want, 1e-6, &format!("Linear {xs:?}·[{n}, {k}]ᵀ"));
        let r = rng.tensor(&want.shape);
        let want = bin(BinaryOp::Add, &r, &want);
        let got = eval(&Op::LinearAdd, vec![x, w, r]).unwrap();
        assert_close(&got, &want, 1e-6, "LinearAdd");
    }
    // A transposed (strided) activation.
    let x = rng.tensor(&[6, 2, 3]).permute(&[1, 0, 2]);
    let w = rng.tensor(&[4, 3]);
    let want = primitive_linear(&x, &w);
    assert_close(
        &eval(&Op::Linear, vec![x, w]).unwrap(),
        &want,
        1e-6,
        "strided x",
    );
}

#[test]
fn linear_with_an_fp8_weight_reads_its_activations_in_e4m3_per_row() {
    let mut rng = Rng::new(7);
    let (rows, k, n) = (3, 40, 6);
    let x = rng.tensor(&[rows, k]);
    let w = rng.tensor(&[n, k]);
    let deq = crate::quant::round_trip(DType::Fp8, &w.to_vec::<f32>(), n, k).unwrap();
    let w8 = Tensor::new(DType::Fp8, vec![n, k], deq.clone());
    let mut xq = x.to_vec::<f32>();
    crate::quant::fp8_rows(&mut xq, k);
    let want = primitive_linear(
        &Tensor::new(DType::F32, vec![rows, k], xq),
        &Tensor::new(DType::F32, vec![n, k], deq.clone()),
    );
    let got = eval(&Op::Linear, vec![x.clone(), w8]).unwrap();
    assert_close(&got, &want, 1e-6, "W8A8 fp8");
    // …which differs from reading the activations as they are (W8A16).
    let w16 = primitive_linear(&x, &Tensor::new(DType::F32, vec![n, k], deq));
    let (a, b) = (got.to_vec::<f32>(), w16.to_vec::<f32>());
    assert!(a.iter().zip(&b).any(|(p, q)| p != q));
}

/// `op` over random inputs against its primitives: `g · 1/(e^-z(g) + 1) · u` with `g`, `u` the
/// two products.
fn check_gated(op: Op, seed: u64, cases: &[(Vec<usize>, usize, usize)], z: fn(&Tensor) -> Tensor) {
    let mut rng = Rng::new(seed);
    for (lead, k, f) in cases {
        let (k, f) = (*k, *f);
        let mut xs = lead.clone();
        xs.push(k);
        let x = rng.tensor(&xs);
        let wg = rng.tensor(&[f, k]);
        let wu = rng.tensor(&[f, k]);
        let g = primitive_linear(&x, &wg);
        let u = primitive_linear(&x, &wu);
        let e = unary(UnaryOp::Exp, unary(UnaryOp::Neg, z(&g)).unwrap()).unwrap();
        let sig = unary(UnaryOp::Recip, bin(BinaryOp::Add, &e, &scalar(1.0))).unwrap();
        let want = bin(BinaryOp::Mul, &bin(BinaryOp::Mul, &g, &sig), &u);
        let w = concat(vec![wg, wu], 0).unwrap();
        let got = eval(&op, vec![x, w]).unwrap();
        assert_close(&got, &want, 1e-6, &format!("{} {xs:?} f={f}", op.name()));
    }
}

#[test]
fn gated_mlp_matches_silu_gate_times_up() {
    let cases = [
        (vec![1, 1], 8, 12),
        (vec![2, 5], 24, 7),
        (vec![1, 33], 64, 160),
    ];
    check_gated(Op::GatedMlp, 3, &cases, |g| g.clone());
}

/// `GatedGelu` computes what `models/gemma.ron`'s `geglu` computes from primitives:
/// `g · σ(2√(2/π) · (g + 0.044715 · g³)) · u`.
#[test]
fn gated_gelu_matches_gemmas_geglu() {
    let cases = [(vec![1, 1], 8, 12), (vec![2, 5], 24, 7)];
    check_gated(Op::GatedGelu, 4, &cases, |g| {
        let g3 = bin(BinaryOp::Mul, &bin(BinaryOp::Mul, g, g), g);
        let inner = bin(
            BinaryOp::Add,
            g,
            &bin(BinaryOp::Mul, &scalar(0.044715), &g3),
        );
        let k2 = 2.0 * (2.0 / std::f32::consts::PI).sqrt();
        bin(BinaryOp::Mul, &scalar(k2), &inner)
    });
}

/// `inv_freq[i] = 1 / theta^(2i/d)` as `models/llama.ron` computes it.
fn inv_freq(d: usize, theta: f32) -> Tensor {
    let half = d / 2;
    let iota = Tensor::new(DType::I32, vec![half], (0..half as i32).collect());
    let idx = crate::cpu::elementwise::cast(iota, DType::F32);
    let even = bin(BinaryOp::Mul, &idx, &scalar(2.0));
    let expo = bin(BinaryOp::Div, &even, &scalar(d as f32));
    unary(UnaryOp::Recip, bin(BinaryOp::Pow, &scalar(theta), &expo)).unwrap()
}

/// The RoPE of `models/llama.ron`: tables from `pos`, then `x·cos + rotate_half(x)·sin`.
fn primitive_rope(x: &Tensor, pos: &[i32], inv: &Tensor) -> Tensor {
    let d = *x.shape.last().unwrap();
    let half = d / 2;
    let s = pos.len();
    let p = Tensor::new(DType::I32, vec![s], pos.to_vec());
    let pf = crate::cpu::elementwise::cast(p, DType::F32).reshape(vec![s, 1]);
    let freqs = bin(BinaryOp::Mul, &pf, inv);
    let angles = concat(vec![freqs.clone(), freqs], 1).unwrap();
    let cos = unary(UnaryOp::Cos, angles.clone()).unwrap();
    let sin = unary(UnaryOp::Sin, angles).unwrap();
    let r = x.rank() - 1;
    let x1 = x.slice_axis(r, 0, half);
    let x2 = x.slice_axis(r, half, d);
    let rot = concat(vec![unary(UnaryOp::Neg, x2).unwrap(), x1], r).unwrap();
    bin(
        BinaryOp::Add,
        &bin(BinaryOp::Mul, x, &cos),
        &bin(BinaryOp::Mul, &rot, &sin),
    )
}

#[test]
fn rope_matches_the_model_file_tables() {
    let mut rng = Rng::new(4);
    for (b, h, s, d, past) in [(1, 1, 1, 2, 0), (2, 3, 5, 8, 7), (1, 9, 4, 64, 1000)] {
        let x = rng.tensor(&[b, h, s, d]);
        let pos: Vec<i32> = (past..past + s as i32).collect();
        // Plain frequencies, and a scaled table (every other frequency divided by 8).
        let plain = inv_freq(d, 10000.0);
        let scaled = Tensor::new(
            DType::F32,
            vec![d / 2],
            plain
                .values::<f32>()
                .iter()
                .enumerate()
                .map(|(i, f)| if i % 2 == 1 { f / 8.0 } else { *f })
                .collect(),
        );
        for inv in [plain, scaled] {
            let want = primitive_rope(&x, &pos, &inv);
            let p = Tensor::new(DType::I32, vec![s], pos.clone());
            let op = Op::Rope { seq_axis: 2 };
            let got = eval(&op, vec![x.clone(), p, inv]).unwrap();
            assert_close(
                &got,
                &want,
                1e-7,
                &format!("Rope [{b}, {h}, {s}, {d}] past {past}"),
            );
        }
    }
}

/// Attention as `models/llama.ron` writes it: grouped reshapes, scores, causal mask (with a
/// sliding window of `window` keys when nonzero), softmax; with `softcap > 0` the scaled scores
/// are soft-capped first as `models/gemma2.ron` writes it, `cap · (2σ(2x/cap) − 1)`.
fn primitive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: usize,
    softcap: f32,
) -> Tensor {
    let (b, h, s, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (kh, t) = (k.shape[1], k.shape[2]);
    let qg = q.clone().reshape(vec![b, kh, h / kh, s, d]);
    let kg = k.clone().reshape(vec![b, kh, 1, t, d]);
    let vg = v.clone().reshape(vec![b, kh, 1, t, d]);
    let raw = matmul(qg, kg.permute(&[0, 1, 2, 4, 3])).unwrap();
    let mut scaled = bin(BinaryOp::Mul, &raw, &scalar(scale));
    if softcap > 0.0 {
        let z2 = bin(
            BinaryOp::Mul,
            &bin(BinaryOp::Div, &scaled, &scalar(softcap)),
            &scalar(2.0),
        );
        let e = unary(UnaryOp::Exp, unary(UnaryOp::Neg, z2).unwrap()).unwrap();
        let sig = unary(UnaryOp::Recip, bin(BinaryOp::Add, &e, &scalar(1.0))).unwrap();
        let t = bin(
            BinaryOp::Sub,
            &bin(BinaryOp::Mul, &sig, &scalar(2.0)),
            &scalar(1.0),
        );
        scaled = bin(BinaryOp::Mul, &t, &scalar(softcap));
    }
    let past = t - s;
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let too_old = window > 0 && j <= past + i && past + i - j >= window;
                if j > past + i || too_old {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let scores = bin(
        BinaryOp::Add,
        &scaled,
        &Tensor::new(DType::F32, vec![s, t], mask),
    );
    let probs = softmax(scores, 4).unwrap();
    matmul(probs, vg).unwrap().reshape(vec![b, h, s, d])
}

#[test]
fn attention_matches_the_primitive_chain_for_mha_gqa_mqa() {
    let mut rng = Rng::new(5);
    // (batch, heads, kv heads, new tokens, cached tokens, head dim)
    for (b, h, kh, s, past, d) in [
        (1, 4, 4, 3, 0, 8),
        (2, 6, 2, 5, 4, 16),
        (1, 9, 3, 1, 11, 64),
        (2, 4, 1, 7, 0, 6),
    ] {
        let t = past + s;
        let q = rng.tensor(&[b, h, s, d]);
        let k = rng.tensor(&[b, kh, t, d]);
        let v = rng.tensor(&[b, kh, t, d]);
        let scale = 1.0 / (d as f32).sqrt();
        // No window, and windows of 1, 3 and 6 keys (longer than some of the rows' contexts);
        // without and with a soft-cap (0.5: the capped scores differ from the plain ones).
        for window in [0u32, 1, 3, 6] {
            for softcap in [0.0f32, 0.5] {
                let want = primitive_attention(&q, &k, &v, scale, window as usize, softcap);
                let op = Op::FusedAttention {
                    scale,
                    window,
                    softcap,
                };
                let got = eval(&op, vec![q.clone(), k.clone(), v.clone()]).unwrap();
                assert_close(
                    &got,
                    &want,
                    1e-6,
                    &format!(
                        "attention h={h} kh={kh} s={s} past={past} window={window} softcap={softcap}"
                    ),
                );
            }
        }
    }
}

#[test]
fn fused_ops_refuse_bad_shapes_with_a_message() {
    let mut rng = Rng::new(6);
    let x = rng.tensor(&[2, 3]);
    let err = eval(
        &Op::RmsNorm { eps: 1e-5 },
        vec![x.clone(), rng.tensor(&[4])],
    )
    .unwrap_err();
    assert!(err.contains("[4]"), "{err}");
    let err = eval(&Op::Linear, vec![x.clone(), rng.tensor(&[4, 5])]).unwrap_err();
    assert!(err.contains("[4, 5]"), "{err}");
    let err = eval(&Op::GatedMlp, vec![x, rng.tensor(&[5, 3])]).unwrap_err();
    assert!(err.contains("odd"), "{err}");
    let q = rng.tensor(&[1, 3, 2, 4]);
    let k = rng.tensor(&[1, 2, 2, 4]);
    let op = Op::FusedAttention {
        scale: 1.0,
        window: 0,
        softcap: 0.0,
    };
    let err = eval(&op, vec![q, k.clone(), k]).unwrap_err();
    assert!(err.contains("kh dividing h"), "{err}");
}
