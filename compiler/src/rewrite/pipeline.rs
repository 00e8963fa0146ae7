//! Pipeline parallelism as a graph pass: the model graph → the graph of one of `stages`
//! consecutive pipeline stages (`kiln build --pp`), before sharding and fusion.
//!
//! The decoder layers (nodes named `layers.{i}.…`) are spread evenly over the stages, in order.
//! Every other node is placed by what it reads: a node computed from step inputs, weights and
//! constants alone (the embedding lookup, RoPE tables, masks) is computed by every stage that
//! needs it; a node that reads a layer's result (the final norm, the output projection) belongs
//! to the stage of the latest layer it reads. A value computed on one stage and read on a later
//! one crosses the cut: the earlier stage outputs it (under its node name), every stage in
//! between receives and forwards it, and the reading stage receives it as an `Activation` input.
//! For a decoder that is the residual stream, once per cut. Each stage keeps the KV caches of its
//! own layers; the last stage has the graph's outputs (`logits`).

use kiln_runtime::ir::{Graph, InputKind, NodeId, Op, StateBinding};
use std::collections::HashMap;

/// Why a graph cannot be split into stages.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The stage count or index does not fit the graph.
    #[error("{0}")]
    Options(String),
    /// A node cannot be placed.
    #[error("pipeline stage of node `{node}`: {message}")]
    Node {
        /// The node of the whole graph.
        node: String,
        /// What went wrong.
        message: String,
    },
}

/// What one stage computes and exchanges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StagePlan {
    /// Its decoder layers.
    pub layers: std::ops::Range<usize>,
    /// Values received from the previous stage (node names).
    pub receives: Vec<String>,
    /// Values sent to the next stage (node names; none on the last stage).
    pub sends: Vec<String>,
}

/// Where a node is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Home {
    /// From step inputs, weights and constants alone: wherever it is needed.
    Free,
    /// On this stage.
    Stage(u32),
}

/// The decoder layer a node belongs to, from its name (`layers.3.q` → 3).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The graph of stage `stage` of `stages`, and its plan.
pub fn stage(graph: &Graph, stages: u32, stage: u32) -> Result<(Graph, StagePlan), PipelineError> {
    let layers = graph
        .nodes
        .iter()
        .filter_map(|n| layer_of(&n.name))
        .max()
        .map_or(0, |l| l + 1);
    if stages == 0 || stage >= stages {
        return Err(PipelineError::Options(format!(
            "stage {stage} of a pipeline of {stages} stages"
        )));
    }
    if layers < stages as usize {
        return Err(PipelineError::Options(format!(
            "the model has {layers} decoder layers: it cannot be split into {stages} pipeline stages"
        )));
    }
    let s_count = stages as usize;
    let stage_of_layer = |i: usize| (i * s_count / layers) as u32;
    let last = stages - 1;

    // Home of every node.
    let mut home = Vec::with_capacity(graph.nodes.len());
    for n in &graph.nodes {
        let h = match layer_of(&n.name) {
            Some(i) => Home::Stage(stage_of_layer(i)),
            None => n
                .inputs
                .iter()
                .filter_map(|&i| match home[i] {
                    Home::Stage(s) => Some(s),
                    Home::Free => None,
                })
                .max()
                .map_or(Home::Free, Home::Stage),
        };
        if let Home::Stage(s) = h {
            let later = n
                .inputs
                .iter()
                .find(|&&i| matches!(home[i], Home::Stage(t) if t > s));
            if let Some(&bad) = later {
                return Err(PipelineError::Node {
                    node: n.name.clone(),
                    message: format!(
                        "stage {s} reads `{}` of a later stage",
                        graph.nodes[bad].name
                    ),
                });
            }
        }
        home.push(h);
    }
    // The latest stage that reads each node (outputs count as read by the last stage).
    let mut last_reader: Vec<Option<u32>> = vec![None; graph.nodes.len()];
    for (id, n) in graph.nodes.iter().enumerate() {
        if let Home::Stage(s) = home[id] {
            for &i in &n.inputs {
                last_reader[i] = Some(last_reader[i].map_or(s, |r| r.max(s)));
            }
        }
    }
    for &(_, o) in &graph.outputs {
        last_reader[o] = Some(last);
    }
    // Values crossing the cut after stage `s`: computed on a stage ≤ s, read after it.
    let crossing = |s: u32| -> Vec<NodeId> {
        (0..graph.nodes.len())
            .filter(|&v| matches!(home[v], Home::Stage(t) if t <= s))
            .filter(|&v| last_reader[v].is_some_and(|r| r > s))
            .collect()
    };
    let receives = if stage == 0 {
        vec![]
    } else {
        crossing(stage - 1)
    };
    let sends = if stage == last {
        vec![]
    } else {
        crossing(stage)
    };
    for &v in receives.iter().chain(&sends) {
        if !graph.nodes[v].ty.dtype.is_float() {
            return Err(PipelineError::Node {
                node: graph.nodes[v].name.clone(),
                message: format!(
                    "a {} value crosses between pipeline stages; only float values can",
                    graph.nodes[v].ty
                ),
            });
        }
    }

    // The nodes this stage computes: its own, and the free ones they (or its outputs) read.
    let mut wanted = vec![false; graph.nodes.len()];
    let mut stack: Vec<NodeId> = (0..graph.nodes.len())
        .filter(|&i| home[i] == Home::Stage(stage))
        .collect();
    if stage == last {
        stack.extend(graph.outputs.iter().map(|&(_, o)| o));
    }
    let received: std::collections::HashSet<NodeId> = receives.iter().copied().collect();
    while let Some(v) = stack.pop() {
        if wanted[v] || received.contains(&v) {
            continue;
        }
        wanted[v] = true;
        for &i in &graph.nodes[v].inputs {
            if home[i] == Home::Free || home[i] == Home::Stage(stage) {
                stack.push(i);
            } else if !received.contains(&i) {
                return Err(PipelineError::Node {
                    node: graph.nodes[v].name.clone(),
                    message: format!("reads `{}`, which no stage sends", graph.nodes[i].name),
                });
            }
        }
    }

    let mut out = Graph::default();
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for &v in &receives {
        let n = &graph.nodes[v];
        let id = out.add_leaf(
            n.name.clone(),
            Op::Input {
                kind: InputKind::Activation,
            },
            n.ty.clone(),
        );
        map.insert(v, id);
    }
    for (v, n) in graph.nodes.iter().enumerate() {
        if !wanted[v] {
            continue;
        }
        let id = if n.inputs.is_empty() {
            out.add_leaf(n.name.clone(), n.op.clone(), n.ty.clone())
        } else {
            let ins = n.inputs.iter().map(|i| map[i]).collect();
            out.add(n.name.clone(), n.op.clone(), ins)
                .map_err(|e| PipelineError::Node {
                    node: n.name.clone(),
                    message: e.to_string(),
                })?
        };
        map.insert(v, id);
    }
    if stage == last {
        out.outputs = graph
            .outputs
            .iter()
            .map(|(name, o)| (name.clone(), map[o]))
            .collect();
    } else {
        out.outputs = sends
            .iter()
            .map(|v| (graph.nodes[*v].name.clone(), map[v]))
            .collect();
    }
    for s in &graph.states {
        if home[s.input] == Home::Stage(stage) {
            out.states.push(StateBinding {
                input: map[&s.input],
                update: map[&s.update],
            });
        }
    }
    let names = |vs: &[NodeId]| vs.iter().map(|&v| graph.nodes[v].name.clone()).collect();
    let first = (0..layers)
        .find(|&i| stage_of_layer(i) == stage)
        .unwrap_or(0);
    let end = (first..layers)
        .find(|&i| stage_of_layer(i) != stage)
        .unwrap_or(layers);
    Ok((
        out,
        StagePlan {
            layers: first..end,
            receives: names(&receives),
            sends: names(&sends),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::tests::{executor, llama, rel_l2, tiny_config};
    use kiln_runtime::cpu::HostTensor;
    use std::collections::BTreeMap;

    /// Logits of a prefill then decode steps, the stages run one after the other, each
    /// handing its outputs to the next.
    fn run_stages(graphs: &[Graph], seed: u64, prompt: &[i32], next: &[Vec<i32>]) -> Vec<Vec<f32>> {
        let execs: Vec<_> = graphs.iter().map(|g| executor(g, &[], seed)).collect();
        let mut sessions: Vec<_> = execs.iter().map(|e| e.session(1)).collect();
        let mut all = vec![];
        for tokens in std::iter::once(prompt).chain(next.iter().map(|v| v.as_slice())) {
            let mut acts: BTreeMap<String, HostTensor> = BTreeMap::new();
            for (e, s) in execs.iter().zip(&mut sessions) {
                acts = e.step_with(s, tokens, &acts, &[]).unwrap().outputs;
            }
            all.push(acts["logits"].data.clone());
        }
        all
    }

    #[test]
    fn stages_in_sequence_match_the_whole_graph() {
        let (prompt, next) = ([4, 9, 33, 1, 60], [vec![7], vec![2]]);
        for tied in [false, true] {
            let g = llama(&tiny_config(32, 5, 4, 2, 8, 48, 64, tied));
            let want = {
                let e = executor(&g, &[], 9);
                let mut s = e.session(1);
                let mut all = vec![e.step(&mut s, &prompt, &[]).unwrap().outputs["logits"]
                    .data
                    .clone()];
                for t in &next {
                    all.push(
                        e.step(&mut s, t, &[]).unwrap().outputs["logits"]
                            .data
                            .clone(),
                    );
                }
                all
            };
            for stages in [2u32, 3, 5] {
                let parts: Vec<(Graph, StagePlan)> =
                    (0..stages).map(|s| stage(&g, stages, s).unwrap()).collect();
                let got = run_stages(
                    &parts.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
                    9,
                    &prompt,
                    &next,
                );
                for (a, b) in got.iter().zip(&want) {
                    assert!(rel_l2(a, b) <= 1e-6, "{stages} stages, tied {tied}");
                }
                // Every cut carries the residual stream only; the layers split evenly.
                for (s, (_, plan)) in parts.iter().enumerate() {
                    if s + 1 < stages as usize {
                        assert_eq!(plan.sends.len(), 1, "{plan:?}");
                    }
                    assert!(plan.layers.len() >= 5 / stages as usize, "{plan:?}");
                }
            }
        }
        let g = llama(&tiny_config(32, 2, 4, 2, 8, 48, 64, false));
        let (_, p0) = stage(&g, 2, 0).unwrap();
        assert_eq!(
            (p0.layers, p0.sends),
            (0..1, vec!["layers.0.x".to_string()])
        );
        assert!(stage(&g, 3, 0)
            .unwrap_err()
            .to_string()
            .contains("2 decoder layers"));
    }

    /// The CPU executors of every rank of a `tp × pp` split of `g` (stage-major), each stage's
    /// ranks sharing one in-process group.
    fn rank_executors(
        g: &Graph,
        pp: u32,
        tp: u32,
        seed: u64,
    ) -> Vec<Vec<kiln_runtime::cpu::CpuExecutor>> {
        use kiln_runtime::collective::{Collective, LocalGroup};
        use std::sync::Arc;
        (0..pp)
            .map(|s| {
                let (sg, _) = stage(g, pp, s).unwrap();
                LocalGroup::new(tp as usize)
                    .into_iter()
                    .enumerate()
                    .map(|(r, group)| {
                        let (rg, _) = crate::rewrite::shard::shard(&sg, tp, r as u32).unwrap();
                        let group: Arc<dyn Collective> = Arc::new(group);
                        executor(&rg, &[], seed).with_collective(group).unwrap()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn stages_of_sharded_ranks_match_the_whole_graph() {
        use kiln_runtime::generate::{CpuDecoder, Decoder};
        use kiln_runtime::parallel::ParallelCpuDecoder;
        // GQA, untied, 4 layers: 2 or 4 stages of 2 tensor-parallel ranks, 2 stages of 4.
        let g = llama(&tiny_config(32, 4, 8, 2, 8, 48, 64, false));
        let whole = executor(&g, &[], 21);
        let mut want = CpuDecoder::new(&whole);
        let feeds: [&[u32]; 3] = [&[5, 63, 2, 17], &[9], &[40]];
        let want: Vec<Vec<f32>> = feeds.iter().map(|t| want.feed(t).unwrap()).collect();
        for (pp, tp) in [(2u32, 2u32), (4, 2), (2, 4)] {
            let stages = rank_executors(&g, pp, tp, 21);
            let mut got = ParallelCpuDecoder::new(&stages);
            for (t, w) in feeds.iter().zip(&want) {
                let e = rel_l2(&got.feed(t).unwrap(), w);
                assert!(e <= 1e-5, "pp {pp} tp {tp}: {e:e}");
                eprintln!("{pp} stages of {tp} ranks: relative L2 {e:.1e}");
            }
        }
    }

    #[test]
    fn the_scheduler_executor_of_a_parallel_build_matches_the_whole_one() {
        use kiln_runtime::cuda::{StepResult, Want};
        use kiln_runtime::parallel::ParallelBatchExecutor;
        use kiln_runtime::serving::{BatchExecutor, CpuBatchExecutor, SeqStep};
        // (layers, stages, ranks per stage): the micro-batches overlap in 2 and 4 stages.
        for (layers, pp, tp) in [(2, 2u32, 2u32), (4, 4, 1)] {
            let g = llama(&tiny_config(32, layers, 8, 2, 8, 48, 64, true));
            let mut whole = CpuBatchExecutor::new(executor(&g, &[], 5), 4, 64, 8, 64).unwrap();
            let stages = rank_executors(&g, pp, tp, 5);
            let mut parallel = ParallelBatchExecutor::new(stages, 4, 64, 8, 64).unwrap();
            assert_eq!((parallel.vocab(), parallel.num_blocks()), (64, 16));
            let (a, b, c): (&[u32], &[u32], &[u32]) = (&[0, 1], &[2, 3], &[4, 5]);
            // Prefills of three sequences of different lengths (three micro-batches), then
            // decodes at three positions.
            let steps: [Vec<SeqStep>; 2] = [
                vec![
                    SeqStep {
                        tokens: &[1, 2, 3, 4, 5],
                        start: 0,
                        blocks: a,
                    },
                    SeqStep {
                        tokens: &[9, 8],
                        start: 0,
                        blocks: b,
                    },
                    SeqStep {
                        tokens: &[30, 31, 32],
                        start: 0,
                        blocks: c,
                    },
                ],
                vec![
                    SeqStep {
                        tokens: &[6],
                        start: 5,
                        blocks: a,
                    },
                    SeqStep {
                        tokens: &[7],
                        start: 2,
                        blocks: b,
                    },
                    SeqStep {
                        tokens: &[33],
                        start: 3,
                        blocks: c,
                    },
                ],
            ];
            for seqs in &steps {
                let (StepResult::Logits(w), StepResult::Logits(p)) = (
                    whole.step(seqs, Want::Logits).unwrap(),
                    parallel.step(seqs, Want::Logits).unwrap(),
                ) else {
                    panic!("the CPU executors return logits");
                };
                assert!(
                    rel_l2(&p, &w) <= 1e-5,
                    "pp {pp} tp {tp}: {:e}",
                    rel_l2(&p, &w)
                );
            }
        }
    }
}
