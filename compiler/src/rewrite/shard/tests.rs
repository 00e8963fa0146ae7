//! The CPU proof of the sharding pass: every rank's graph run on its own thread, the ranks
//! exchanging through an in-process group, gives the unsharded graph's logits, before and
//! after the rewriter, for MHA, GQA and MQA, tied and untied embeddings, on 2 and 4 ranks.

use super::{shard, ShardPlan};
use crate::build::graph_for;
use crate::graph::print::text;
use crate::model::{builtin_for, ModelFile};
use crate::rewrite::tests::{executor, llama, random_weight, rel_l2, run, tiny_config, verified};
use crate::rewrite::{optimize, RewriteOptions};
use kiln_runtime::collective::{Collective, LocalGroup};
use kiln_runtime::cpu::CpuExecutor;
use kiln_runtime::ir::{Graph, Op};
use std::sync::Arc;

/// Every rank's logits, the ranks running `graphs` together on threads.
fn run_group(
    graphs: Vec<(Graph, Vec<crate::rewrite::derive::DerivedWeight>)>,
    seed: u64,
    batch: usize,
    prompt: &[i32],
    next: &[Vec<i32>],
) -> Vec<Vec<Vec<f32>>> {
    let groups = LocalGroup::new(graphs.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = graphs
            .into_iter()
            .zip(groups)
            .map(|((g, derived), group)| {
                s.spawn(move || {
                    let group: Arc<dyn Collective> = Arc::new(group);
                    let exec = executor(&g, &derived, seed).with_collective(group).unwrap();
                    run(&exec, batch, prompt, next)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn ranks_of(g: &Graph, n: u32) -> Vec<(Graph, ShardPlan)> {
    (0..n).map(|r| shard(g, n, r).unwrap()).collect()
}

#[test]
fn sharded_llamas_match_the_unsharded_graph_on_every_rank() {
    // (query heads, KV heads, tied): MHA, GQA, MQA.
    let cases = [(4, 4, true), (8, 2, false), (4, 1, true), (8, 1, false)];
    let (batch, prompt, next) = (
        2,
        [3, 17, 42, 8, 60, 1, 5, 9, 33, 2],
        [vec![7, 50], vec![61, 0]],
    );
    for (case, &(heads, kv, tied)) in cases.iter().enumerate() {
        let g = llama(&tiny_config(32, 2, heads, kv, 8, 48, 64, tied));
        let seed = 11 + case as u64;
        let want = run(&executor(&g, &[], seed), batch, &prompt, &next);
        for n in [2u32, 4] {
            let desc = format!("heads {heads}, kv {kv}, tied {tied}, {n} ranks");
            let ranks = ranks_of(&g, n);
            let plain = ranks.iter().map(|(g, _)| (g.clone(), vec![])).collect();
            let optimized = ranks
                .iter()
                .map(|(g, _)| {
                    let out = optimize(g, &RewriteOptions::default()).unwrap();
                    verified(&out.graph, g);
                    (out.graph, out.derived)
                })
                .collect();
            for (what, graphs) in [("sharded", plain), ("sharded and optimized", optimized)] {
                let mut worst = 0f64;
                for (rank, got) in run_group(graphs, seed, batch, &prompt, &next)
                    .iter()
                    .enumerate()
                {
                    for (step, (a, b)) in got.iter().zip(&want).enumerate() {
                        let e = rel_l2(a, b);
                        assert!(
                            e <= 1e-5,
                            "{desc}, {what}: rank {rank} step {step}: relative L2 {e:e}"
                        );
                        worst = worst.max(e);
                    }
                }
                eprintln!("{desc}, {what}: worst relative L2 {worst:.1e}");
            }
        }
    }
}

#[test]
fn llama_plan_is_megatron_with_replicated_kv_heads_below_the_rank_count() {
    let names = |v: &[String]| {
        v.iter()
            .map(|n| n.rsplit('.').next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // GQA, 2 KV heads over 4 ranks: each KV head on two ranks.
    let g = llama(&tiny_config(32, 1, 8, 2, 8, 48, 64, false));
    let (rank, plan) = shard(&g, 4, 3).unwrap();
    assert_eq!(
        names(&plan.column),
        ["q_flat", "k_flat", "v_flat", "gate", "up", "lm_head"]
    );
    assert_eq!(names(&plan.row), ["attn_out", "mlp_out"]);
    assert_eq!(plan.vocab.len(), 1);
    assert!(plan.replicated.is_empty(), "{plan:?}");
    // One all-reduce per row-parallel product and one for the embedding; the logits gathered.
    assert_eq!((plan.all_reduces, plan.all_gathers), (3, 1));
    let cache = rank.find("layers.0.k_cache").unwrap();
    assert_eq!(rank.nodes[cache].ty.to_string(), "f32[batch, 1, past, 8]");
    // MQA: the single KV head replicated, its projections not split.
    let g = llama(&tiny_config(32, 1, 4, 1, 8, 48, 64, true));
    let (_, plan) = shard(&g, 2, 0).unwrap();
    assert_eq!(names(&plan.column), ["q_flat", "gate", "up", "lm_head"]);
    // Every rank gets the same plan.
    for r in 0..4 {
        let g = llama(&tiny_config(32, 1, 8, 2, 8, 48, 64, false));
        assert_eq!(shard(&g, 4, r).unwrap().1, shard(&g, 4, 0).unwrap().1);
    }
}

#[test]
fn every_family_sharded_matches_unsharded() {
    let mut summary = String::new();
    for family in [
        "llama31", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2",
    ] {
        let path = format!(
            "{}/../tests/fixtures/families/{family}/config.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let (name, ron) = builtin_for(config["model_type"].as_str().unwrap()).unwrap();
        let g = graph_for(&ModelFile::parse(ron, name).unwrap(), &config).unwrap();
        let (prompt, next) = ([5, 77, 12, 101, 9, 64], [vec![3], vec![120]]);
        let want = run(&executor(&g, &[], 3), 1, &prompt, &next);
        for n in [2u32, 4] {
            let ranks = ranks_of(&g, n);
            let plan = &ranks[0].1;
            if n == 2 {
                let short = |v: &[String]| {
                    let mut s: Vec<String> = v
                        .iter()
                        .filter(|x| !x.starts_with("layers.") || x.starts_with("layers.0."))
                        .cloned()
                        .collect();
                    s.dedup();
                    s.join(" ")
                };
                summary += &format!(
                    "{family}: column [{}] row [{}] vocab [{}] replicated [{}]; all-reduces {}, all-gathers {}\n",
                    short(&plan.column),
                    short(&plan.row),
                    short(&plan.vocab),
                    short(&plan.replicated),
                    plan.all_reduces,
                    plan.all_gathers
                );
            }
            let graphs = ranks.into_iter().map(|(g, _)| (g, vec![])).collect();
            let mut worst = 0f64;
            for (rank, got) in run_group(graphs, 3, 1, &prompt, &next).iter().enumerate() {
                for (step, (a, b)) in got.iter().zip(&want).enumerate() {
                    let e = rel_l2(a, b);
                    assert!(
                        e <= 1e-5,
                        "{family}, {n} ranks: rank {rank} step {step}: {e:e}"
                    );
                    worst = worst.max(e);
                }
            }
            eprintln!("{family}, {n} ranks: worst relative L2 {worst:.1e}");
        }
    }
    insta::assert_snapshot!("family_plans_tp2", summary);
}

#[test]
fn heads_that_do_not_divide_among_the_ranks_split_in_fewer_parts() {
    // 6 heads do not divide among 4 ranks: q splits in 2 (whole heads, replicated twice); the
    // MLP of 48 columns splits in 4.
    let g = llama(&tiny_config(48, 1, 6, 6, 8, 48, 64, false));
    let (_, plan) = shard(&g, 4, 1).unwrap();
    assert!(
        plan.column.iter().any(|n| n.ends_with("q_flat")),
        "{plan:?}"
    );
    let prompt = [1, 2, 3];
    let want = run(&executor(&g, &[], 5), 1, &prompt, &[vec![4]]);
    let graphs = (0..4)
        .map(|r| (shard(&g, 4, r).unwrap().0, vec![]))
        .collect();
    for got in run_group(graphs, 5, 1, &prompt, &[vec![4]]) {
        for (a, b) in got.iter().zip(&want) {
            assert!(rel_l2(a, b) <= 1e-5);
        }
    }
}

#[test]
fn bad_groups_are_refused() {
    let g = llama(&tiny_config(32, 1, 4, 4, 8, 48, 64, false));
    assert!(shard(&g, 3, 0)
        .unwrap_err()
        .to_string()
        .contains("power of two"));
    assert!(shard(&g, 2, 2).unwrap_err().to_string().contains("rank 2"));
    let (once, _) = shard(&g, 2, 0).unwrap();
    assert!(shard(&once, 2, 0)
        .unwrap_err()
        .to_string()
        .contains("already sharded"));
    // A rank graph run alone says what it needs.
    let exec = CpuExecutor::new(once, |name, shape| Ok(random_weight(1, name, shape))).unwrap();
    let mut s = exec.session(1);
    let e = exec.step(&mut s, &[1], &[]).unwrap_err().to_string();
    assert!(e.contains("one rank of 2"), "{e}");
}

#[test]
fn rank_zero_of_two_optimized_layer() {
    let g = llama(&tiny_config(64, 2, 8, 2, 8, 160, 96, false));
    let (rank, plan) = shard(&g, 2, 0).unwrap();
    let out = optimize(&rank, &RewriteOptions::default()).unwrap();
    verified(&out.graph, &rank);
    // The residual adds follow the all-reduces: no product fuses a residual add.
    for n in &out.graph.nodes {
        if n.op == Op::LinearAdd {
            panic!("a residual add fused before its all-reduce: {}", n.name);
        }
    }
    let snapshot = format!(
        "column: {:?}\nrow: {:?}\nvocab: {:?}\nall-reduces {}, all-gathers {}\n\n{}",
        plan.column,
        plan.row,
        plan.vocab,
        plan.all_reduces,
        plan.all_gathers,
        text(&out.graph, Some("layers.1."))
    );
    insta::assert_snapshot!("llama_gqa_layer_tp2_rank0", snapshot);
}
