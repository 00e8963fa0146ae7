//! One rank's graph of a parallel build: the pipeline pass (stage `rank / tp`), then the
//! sharding pass (tensor-parallel rank `rank % tp`). `kiln build` and `kiln inspect` both go
//! through here, so they show the same graphs and the same summaries.

use super::{pipeline, shard};
use kiln_runtime::ir::Graph;

/// The graph of rank `rank` of a `tp × pp` build, and one line per pass saying what it did.
pub fn rank_graph(
    graph: &Graph,
    tp: u32,
    pp: u32,
    rank: u32,
) -> Result<(Graph, Vec<String>), String> {
    if tp == 0 || pp == 0 || rank >= tp.saturating_mul(pp) {
        return Err(format!("rank {rank} is not a rank of --tp {tp} --pp {pp}"));
    }
    let (stage, tp_rank) = (rank / tp, rank % tp);
    let mut g = graph.clone();
    let mut notes = Vec::new();
    if pp > 1 {
        let (staged, plan) = pipeline::stage(&g, pp, stage).map_err(|e| e.to_string())?;
        notes.push(format!(
            "pipeline stage {stage}: layers {}..{}, receives [{}], sends [{}]",
            plan.layers.start,
            plan.layers.end,
            plan.receives.join(", "),
            plan.sends.join(", ")
        ));
        g = staged;
    }
    if tp > 1 {
        let (sharded, plan) = shard::shard(&g, tp, tp_rank).map_err(|e| e.to_string())?;
        notes.push(plan.summary());
        g = sharded;
    }
    Ok((g, notes))
}
