//! The executor as a whole: KV states across steps, taps, weight folding and errors.

use super::*;
use crate::ir::{BinaryOp, StateBinding, Sym};
use std::cell::Cell;

const VOCAB: usize = 10;
const D: usize = 16;
const KVH: usize = 2;
const G: usize = 2;
const HD: usize = 4;

/// A one-layer grouped-query attention model with tied embeddings and KV caches, written with
/// the primitive ops as a model file would. Returns the builder and the weights (emb, wq, wk, wv).
fn attention_model() -> (Builder, [Vec<f32>; 4]) {
    let mut b = Builder::new(42);
    let (bt, sq) = (Dim::sym(Sym::Batch), Dim::sym(Sym::Seq));
    let (past, kv) = (
        Dim::sym(Sym::Past),
        Dim::sym(Sym::Past).add(&Dim::sym(Sym::Seq)),
    );
    let c = |n: usize| Dim::c(n as i64);
    let tok = b.tokens();
    let (emb, embv) = b.weight("emb", &[VOCAB, D]);
    let (wq, wqv) = b.weight("wq", &[D, D]);
    let (wk, wkv) = b.weight("wk", &[KVH * HD, D]);
    let (wv, wvv) = b.weight("wv", &[KVH * HD, D]);
    let x = b.add("x", Op::Gather, vec![emb, tok]);
    // The softmax scale folded into the query weight: a weight-only subgraph.
    let half = b.add("half", Op::Constant { value: 0.5 }, vec![]);
    let wqs = b.add("wq_scaled", Op::Binary(BinaryOp::Mul), vec![wq, half]);
    let proj = |b: &mut Builder, name: &str, w: NodeId| {
        let wt = b.add(
            &format!("{name}.wt"),
            Op::Transpose { perm: vec![1, 0] },
            vec![w],
        );
        b.add(name, Op::MatMul, vec![x, wt])
    };
    let q = proj(&mut b, "q", wqs);
    let k = proj(&mut b, "k", wk);
    let v = proj(&mut b, "v", wv);
    let q = b.add(
        "q5",
        Op::Reshape {
            shape: vec![bt.clone(), sq.clone(), c(KVH), c(G), c(HD)],
        },
        vec![q],
    );
    let q = b.add(
        "qt",
        Op::Transpose {
            perm: vec![0, 2, 3, 1, 4],
        },
        vec![q],
    );
    let cache = |b: &mut Builder, name: &str, new: NodeId| {
        let new = b.add(
            &format!("{name}4"),
            Op::Reshape {
                shape: vec![bt.clone(), sq.clone(), c(KVH), c(HD)],
            },
            vec![new],
        );
        let new = b.add(
            &format!("{name}t"),
            Op::Transpose {
                perm: vec![0, 2, 1, 3],
            },
            vec![new],
        );
        let ty = TensorType::new(DType::F32, vec![bt.clone(), c(KVH), past.clone(), c(HD)]);
        let state = b.g.add_leaf(
            format!("{name}_cache"),
            Op::Input {
                kind: InputKind::State,
            },
            ty,
        );
        let cat = b.add(
            &format!("{name}cat"),
            Op::Concat { axis: 2 },
            vec![state, new],
        );
        b.g.states.push(StateBinding {
            input: state,
            update: cat,
        });
        b.add(
            &format!("{name}5"),
            Op::Reshape {
                shape: vec![bt.clone(), c(KVH), c(1), kv.clone(), c(HD)],
            },
            vec![cat],
        )
    };
    let k = cache(&mut b, "k", k);
    let v = cache(&mut b, "v", v);
    let kt = b.add(
        "kT",
        Op::Transpose {
            perm: vec![0, 1, 2, 4, 3],
        },
        vec![k],
    );
    let scores = b.add("scores", Op::MatMul, vec![q, kt]);
    let pos = b.g.add_leaf(
        "pos",
        Op::Input {
            kind: InputKind::Positions,
        },
        TensorType::new(DType::I32, vec![sq.clone()]),
    );
    let qpos = b.add(
        "qpos",
        Op::Reshape {
            shape: vec![sq.clone(), c(1)],
        },
        vec![pos],
    );
    let kpos = b.add("kpos", Op::Iota { len: kv.clone() }, vec![]);
    let mask = b.add("mask", Op::Binary(BinaryOp::Greater), vec![kpos, qpos]);
    let ninf = b.add(
        "ninf",
        Op::Constant {
            value: f32::NEG_INFINITY,
        },
        vec![],
    );
    let masked = b.add("masked", Op::Where, vec![mask, ninf, scores]);
    let p = b.add("probs", Op::Softmax { axis: 4 }, vec![masked]);
    let o = b.add("o", Op::MatMul, vec![p, v]);
    let o = b.add(
        "ot",
        Op::Transpose {
            perm: vec![0, 3, 1, 2, 4],
        },
        vec![o],
    );
    let o = b.add(
        "o3",
        Op::Reshape {
            shape: vec![bt, sq, c(D)],
        },
        vec![o],
    );
    let et = b.add("emb.t", Op::Transpose { perm: vec![1, 0] }, vec![emb]);
    let logits = b.add("logits", Op::MatMul, vec![o, et]);
    b.output("logits", logits);
    // A late node that fails for token 9, after the caches were appended to.
    let (late, _) = b.weight("late_table", &[9, 1]);
    let late = b.add("late", Op::Gather, vec![late, tok]);
    b.output("late", late);
    (b, [embv, wqv, wkv, wvv])
}

/// The model's logits by definition, for one sequence: `[len(tokens), VOCAB]`.
fn reference_logits(w: &[Vec<f32>; 4], tokens: &[i32]) -> Vec<f32> {
    let [emb, wq, wk, wv] = w;
    let lin = |x: &[f64], w: &[f32], out: usize| -> Vec<f64> {
        (0..out)
            .map(|o| (0..D).map(|i| x[i] * w[o * D + i] as f64).sum())
            .collect()
    };
    let xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            emb[t as usize * D..(t as usize + 1) * D]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    let qs: Vec<Vec<f64>> = xs
        .iter()
        .map(|x| lin(x, wq, D).iter().map(|v| v * 0.5).collect())
        .collect();
    let ks: Vec<Vec<f64>> = xs.iter().map(|x| lin(x, wk, KVH * HD)).collect();
    let vs: Vec<Vec<f64>> = xs.iter().map(|x| lin(x, wv, KVH * HD)).collect();
    let mut out = vec![];
    for t in 0..tokens.len() {
        let mut o = [0f64; D];
        for h in 0..KVH * G {
            let j = h / G;
            let s: Vec<f64> = (0..=t)
                .map(|u| (0..HD).map(|d| qs[t][h * HD + d] * ks[u][j * HD + d]).sum())
                .collect();
            let m = s.iter().copied().fold(f64::MIN, f64::max);
            let den: f64 = s.iter().map(|v| (v - m).exp()).sum();
            for (u, sv) in s.iter().enumerate() {
                for d in 0..HD {
                    o[h * HD + d] += (sv - m).exp() / den * vs[u][j * HD + d];
                }
            }
        }
        out.extend(
            (0..VOCAB).map(|vi| (0..D).map(|i| o[i] * emb[vi * D + i] as f64).sum::<f64>() as f32),
        );
    }
    out
}

#[test]
fn attention_matches_reference_and_caches_compose() {
    let (b, w) = attention_model();
    let exec = b.build();
    let seqs: [[i32; 5]; 2] = [[1, 7, 3, 3, 6], [0, 2, 8, 5, 4]];
    // One step over all five tokens.
    let mut one = exec.session(2);
    let all: Vec<i32> = seqs.concat();
    let full = exec.step(&mut one, &all, &["kcat"]).unwrap();
    assert_eq!(one.past(), 5);
    let logits = &full.outputs["logits"];
    assert_eq!(logits.shape, vec![2, 5, VOCAB]);
    for (bi, s) in seqs.iter().enumerate() {
        let want = reference_logits(&w, s);
        assert_close(
            &logits.data[bi * 5 * VOCAB..(bi + 1) * 5 * VOCAB],
            &want,
            "one-step logits",
        );
    }
    // Three tokens, then two: the second step reads the cache of the first.
    let mut two = exec.session(2);
    let first: Vec<i32> = seqs.iter().flat_map(|s| s[..3].to_vec()).collect();
    let second: Vec<i32> = seqs.iter().flat_map(|s| s[3..].to_vec()).collect();
    let a = exec.step(&mut two, &first, &[]).unwrap();
    let b = exec.step(&mut two, &second, &["kcat"]).unwrap();
    assert_eq!((two.past(), two.batch()), (5, 2));
    for bi in 0..2 {
        let row = |t: usize| &logits.data[(bi * 5 + t) * VOCAB..(bi * 5 + t + 1) * VOCAB];
        let got_a = &a.outputs["logits"].data[bi * 3 * VOCAB..(bi + 1) * 3 * VOCAB];
        assert_close(got_a, &[row(0), row(1), row(2)].concat(), "first step");
        let got_b = &b.outputs["logits"].data[bi * 2 * VOCAB..(bi + 1) * 2 * VOCAB];
        assert_close(got_b, &[row(3), row(4)].concat(), "second step");
    }
    assert_eq!(b.taps["kcat"].shape, vec![2, KVH, 5, HD]);
    assert_close(
        &b.taps["kcat"].data,
        &full.taps["kcat"].data,
        "cache after two steps",
    );
    // Decode steps of one token each match a longer prefill too.
    let mut dec = exec.session(2);
    let mut last = None;
    for (&a, &b) in seqs[0].iter().zip(&seqs[1]) {
        last = Some(exec.step(&mut dec, &[a, b], &[]).unwrap());
    }
    let last = last.unwrap();
    for bi in 0..2 {
        let want = &logits.data[(bi * 5 + 4) * VOCAB..(bi * 5 + 5) * VOCAB];
        assert_close(
            &last.outputs["logits"].data[bi * VOCAB..(bi + 1) * VOCAB],
            want,
            "decode",
        );
    }
}

#[test]
fn taps_return_intermediates_and_name_errors() {
    let (b, _) = attention_model();
    let exec = b.build();
    let mut s = exec.session(1);
    let out = exec
        .step(&mut s, &[1, 2, 3], &["probs", "mask", "pos", "emb.t"])
        .unwrap();
    let probs = &out.taps["probs"];
    assert_eq!(probs.shape, vec![1, KVH, G, 3, 3]);
    for row in probs.data.chunks(3).take(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    assert_eq!(&probs.data[1..3], &[0.0, 0.0], "causal mask");
    assert_eq!(
        out.taps["mask"].data,
        vec![0., 1., 1., 0., 0., 1., 0., 0., 0.]
    );
    assert_eq!(out.taps["pos"].data, vec![0., 1., 2.]);
    assert_eq!(out.taps["emb.t"].shape, vec![D, VOCAB]);
    let e = exec.step(&mut s, &[1], &["nope"]).unwrap_err();
    assert!(
        matches!(e, ExecError::UnknownTap(_)) && e.to_string().contains("`nope`"),
        "{e}"
    );
    // `wq` is only read by the folded `wq_scaled`, so its value is not kept.
    let e = exec.step(&mut s, &[1], &["wq"]).unwrap_err();
    assert!(matches!(e, ExecError::FoldedTap(_)), "{e}");
    assert_eq!(s.past(), 3, "failed steps leave the session unchanged");
    let next = exec.step(&mut s, &[4], &["pos", "q.wt"]).unwrap();
    assert_eq!(next.taps["pos"].data, vec![3.0]);
    assert_eq!(next.taps["q.wt"].shape, vec![D, D]);
}

#[test]
fn weights_load_once_and_errors_are_clear() {
    // Each weight is requested once, with its declared shape.
    let (b, _) = attention_model();
    let weights = b.weights.clone();
    let calls = Cell::new(0);
    let exec = CpuExecutor::new(b.g.clone(), |name, shape| {
        calls.set(calls.get() + 1);
        assert_eq!(weights[name].len(), numel(shape));
        Ok(weights[name].clone())
    })
    .unwrap();
    assert_eq!(calls.get(), 5);
    assert_eq!(exec.graph().nodes.len(), b.g.nodes.len());

    // A weight of the wrong length.
    let e = CpuExecutor::new(b.g.clone(), |name, shape| {
        Ok(vec![1.0; numel(shape) - (name == "wk") as usize])
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, ExecError::WeightShape { .. })
            && msg.contains("`wk`")
            && msg.contains("[8, 16]")
            && msg.contains("127"),
        "{msg}"
    );
    // A loader error passes through.
    let e = CpuExecutor::new(b.g.clone(), |name, _| {
        Err(ExecError::Weight {
            name: name.into(),
            message: "not in checkpoint".into(),
        })
    })
    .unwrap_err();
    assert_eq!(e.to_string(), "weight `emb`: not in checkpoint");

    // Step inputs that do not fit.
    let mut s = exec.session(2);
    assert!(matches!(
        exec.step(&mut s, &[1, 2, 3], &[]),
        Err(ExecError::Input(_))
    ));
    assert!(matches!(
        exec.step(&mut s, &[], &[]),
        Err(ExecError::Input(_))
    ));
    let e = exec.step(&mut s, &[1, VOCAB as i32], &[]).unwrap_err();
    assert!(
        e.to_string().contains("node `x` (Gather)") && e.to_string().contains("out of range"),
        "{e}"
    );
    assert_eq!(s.past(), 0);
    exec.step(&mut s, &[1, 2], &[]).unwrap();
    assert_eq!(s.past(), 1);
}

#[test]
fn fixed_size_state_starts_at_zero() {
    // A running sum over steps: state [batch, 3] (no `past` axis) updated by state + x.
    let mut b = Builder::new(7);
    let tok = b.tokens();
    let (emb, embv) = b.weight("emb", &[4, 3]);
    let x = b.add("x", Op::Gather, vec![emb, tok]); // [batch, seq, 3]
    let sx = b.add(
        "sx",
        Op::Reduce {
            op: crate::ir::ReduceOp::Sum,
            axis: 1,
            keep_dim: false,
        },
        vec![x],
    );
    let ty = TensorType::new(DType::F32, vec![Dim::sym(Sym::Batch), Dim::c(3)]);
    let st = b.g.add_leaf(
        "acc",
        Op::Input {
            kind: InputKind::State,
        },
        ty,
    );
    let upd = b.add("acc.next", Op::Binary(BinaryOp::Add), vec![st, sx]);
    b.g.states.push(StateBinding {
        input: st,
        update: upd,
    });
    b.output("acc", upd);
    let exec = b.build();
    let mut s = exec.session(1);
    exec.step(&mut s, &[1, 2], &[]).unwrap();
    let out = exec.step(&mut s, &[3], &[]).unwrap();
    let want: Vec<f32> = (0..3)
        .map(|j| embv[3 + j] + embv[6 + j] + embv[9 + j])
        .collect();
    assert_close(&out.outputs["acc"].data, &want, "running sum");
}

#[test]
fn failed_step_after_cache_append_keeps_the_session() {
    let (b, w) = attention_model();
    let exec = b.build();
    let seq = [3, 1, 4, 1, 5, 2, 6];
    let mut s = exec.session(1);
    exec.step(&mut s, &seq[..4], &[]).unwrap();
    exec.step(&mut s, &seq[4..5], &[]).unwrap();
    // Fails at `late`, after both caches were appended to in place.
    let e = exec.step(&mut s, &[9], &[]).unwrap_err();
    assert!(e.to_string().contains("node `late`"), "{e}");
    assert_eq!(s.past(), 5);
    let e = exec.step(&mut s, &[9, 9, 9], &[]).unwrap_err();
    assert!(e.to_string().contains("node `late`"), "{e}");
    let out = exec.step(&mut s, &seq[5..], &["kcat"]).unwrap();
    assert_eq!(out.taps["kcat"].shape, vec![1, KVH, 7, HD]);
    let want = reference_logits(&w, &seq);
    assert_close(
        &out.outputs["logits"].data,
        &want[5 * VOCAB..],
        "after failed steps",
    );
}

#[test]
fn sessions_run_concurrently_on_one_executor() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<CpuExecutor>();
    send_sync::<super::super::CpuSession>();
    let (b, w) = attention_model();
    let exec = b.build();
    let seqs = [[1, 7, 3, 3, 6], [0, 2, 8, 5, 4]];
    std::thread::scope(|scope| {
        for s in &seqs {
            let (exec, w) = (&exec, &w);
            scope.spawn(move || {
                let mut session = exec.session(1);
                exec.step(&mut session, &s[..2], &[]).unwrap();
                let out = exec.step(&mut session, &s[2..], &[]).unwrap();
                let want = reference_logits(w, s);
                assert_close(&out.outputs["logits"].data, &want[2 * VOCAB..], "threaded");
            });
        }
    });
}
