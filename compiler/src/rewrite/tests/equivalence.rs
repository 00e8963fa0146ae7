//! Property tests: on random tiny Llama configs (MHA, GQA, MQA; several head dims; tied and untied
//! embeddings), the optimized graph gives the unoptimized graph's logits on the CPU executor —
//! relative L2 ≤ 1e-5 in f32 — for a prefill and two decode steps through the KV cache, on fresh
//! random weights and tokens; bf16 lowering stays within 1e-2 of f32.

use super::{executor, llama, rel_l2, run, tiny_config, Rng};
use crate::rewrite::{optimize, RewriteOptions};
use kiln_runtime::ir::{DType, Graph};

/// A random tiny config; `kind` 0 = MHA, 1 = GQA, 2 = MQA.
fn random_config(rng: &mut Rng, kind: usize) -> (serde_json::Value, String) {
    let heads = if kind == 1 {
        [4, 6][rng.below(2)]
    } else {
        [2, 4, 6][rng.below(3)]
    };
    let kv_heads = match kind {
        0 => heads,
        1 => d_for_gqa(heads),
        _ => 1,
    };
    let head_dim = [2, 4, 8, 16][rng.below(4)];
    // Sometimes a hidden size that is not heads × head_dim (an explicit `head_dim`).
    let hidden = if rng.below(3) == 0 {
        24
    } else {
        heads * head_dim
    };
    let ffn = [16, 40, 64][rng.below(3)];
    let vocab = [32, 61][rng.below(2)];
    let layers = 1 + rng.below(2);
    let tied = rng.below(2) == 0;
    let desc = format!(
        "hidden {hidden}, {layers} layers, {heads} heads / {kv_heads} kv, head_dim {head_dim}, \
         ffn {ffn}, vocab {vocab}, tied {tied}"
    );
    let cfg = tiny_config(hidden, layers, heads, kv_heads, head_dim, ffn, vocab, tied);
    (cfg, desc)
}

/// A KV-head count strictly between 1 and `heads` that divides it (GQA).
fn d_for_gqa(heads: usize) -> usize {
    (2..heads).find(|k| heads.is_multiple_of(*k)).unwrap_or(1)
}

fn logits_of(
    g: &Graph,
    dtype: DType,
    seed: u64,
    batch: usize,
    prompt: &[i32],
    next: &[Vec<i32>],
) -> Vec<Vec<f32>> {
    let opts = RewriteOptions {
        dtype,
        ..RewriteOptions::default()
    };
    let out = optimize(g, &opts).unwrap();
    run(
        &executor(&out.graph, &out.derived, seed),
        batch,
        prompt,
        next,
    )
}

#[test]
fn optimized_graphs_match_unoptimized_on_random_llamas() {
    let mut rng = Rng::new(2024);
    for case in 0..9 {
        let (cfg, desc) = random_config(&mut rng, case % 3);
        let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
        let g = llama(&cfg);
        let seed = rng.next();
        let batch = 1 + rng.below(2);
        let seq = 1 + rng.below(6);
        let prompt: Vec<i32> = (0..batch * seq).map(|_| rng.below(vocab) as i32).collect();
        let next: Vec<Vec<i32>> = (0..2)
            .map(|_| (0..batch).map(|_| rng.below(vocab) as i32).collect())
            .collect();
        let want = run(&executor(&g, &[], seed), batch, &prompt, &next);
        let got = logits_of(&g, DType::F32, seed, batch, &prompt, &next);
        let low = logits_of(&g, DType::BF16, seed, batch, &prompt, &next);
        let mut worst = (0f64, 0f64);
        for (step, ((a, l), b)) in got.iter().zip(&low).zip(&want).enumerate() {
            let (e, el) = (rel_l2(a, b), rel_l2(l, b));
            assert!(e <= 1e-5, "{desc}: step {step}: relative L2 {e:e}");
            assert!(el <= 1e-2, "{desc}: bf16 step {step}: relative L2 {el:e}");
            assert!(el > 0.0, "{desc}: bf16 lowering changed nothing");
            worst = (worst.0.max(e), worst.1.max(el));
        }
        eprintln!(
            "{desc}, batch {batch}, prompt {seq}: f32 {:.1e}, bf16 {:.1e}",
            worst.0, worst.1
        );
    }
}

#[test]
fn f16_lowering_stays_close_to_f32() {
    let g = llama(&tiny_config(32, 2, 4, 2, 8, 48, 40, false));
    let prompt: Vec<i32> = vec![3, 17, 5, 9, 33];
    let next = vec![vec![11]];
    let want = run(&executor(&g, &[], 7), 1, &prompt, &next);
    let got = logits_of(&g, DType::F16, 7, 1, &prompt, &next);
    for (a, b) in got.iter().zip(&want) {
        let e = rel_l2(a, b);
        assert!(e <= 1e-2 && e > 0.0, "f16: relative L2 {e:e}");
    }
}
