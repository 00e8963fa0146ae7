//! Parallel engines: `kiln build --tp N --pp M` writes one engine per rank
//! (`model.rank0-of-4.kiln`, …). Rank `r` is tensor-parallel rank `r % N` of pipeline stage
//! `r / N`: it holds that stage's layers, sharded (with `AllReduce`/`AllGather` ops), and its
//! part of their weights. This module names those files, opens a group and checks that its
//! engines belong together, and runs it: the stages one after the other, each handing its
//! outputs (the residual stream) to the next; within a stage, one thread per rank, the ranks
//! exchanging through an in-process [`LocalGroup`], the CPU executor on each.

use crate::collective::{Collective, LocalGroup};
use crate::cpu::{CpuExecutor, CpuSession, HostTensor};
use crate::engine::{keys, Engine, EngineError};
use crate::generate::{last_row, Decoder, GenerateError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where rank `rank` of `ranks` of the engine `out` is written: `model.kiln` →
/// `model.rank0-of-2.kiln`.
pub fn rank_path(out: &Path, rank: u32, ranks: u32) -> PathBuf {
    let stem = out
        .file_stem()
        .map_or_else(|| "engine".into(), |s| s.to_string_lossy().into_owned());
    let ext = out
        .extension()
        .map_or_else(|| "kiln".into(), |s| s.to_string_lossy().into_owned());
    out.with_file_name(format!("{stem}.rank{rank}-of-{ranks}.{ext}"))
}

/// The place of an engine in a parallel build: its rank, the tensor- and pipeline-parallel
/// sizes, and the build's id (a hash of the whole model and the build options, the same in
/// every rank's engine of one build).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankInfo {
    /// This engine's rank, `0..tp·pp`.
    pub rank: u32,
    /// Tensor-parallel ranks per stage.
    pub tp: u32,
    /// Pipeline stages.
    pub pp: u32,
    /// The build's group id.
    pub group: String,
}

impl RankInfo {
    /// Ranks in the build.
    pub fn ranks(&self) -> u32 {
        self.tp * self.pp
    }
    /// The pipeline stage of this rank.
    pub fn stage(&self) -> u32 {
        self.rank / self.tp
    }
    /// True if this rank's stage is the last (it has the graph's outputs).
    pub fn is_last_stage(&self) -> bool {
        self.stage() + 1 == self.pp
    }

    /// The metadata value: `rank=3 tp=2 pp=2 group=…`.
    pub fn to_metadata(&self) -> String {
        format!(
            "rank={} tp={} pp={} group={}",
            self.rank, self.tp, self.pp, self.group
        )
    }

    /// Parses [`RankInfo::to_metadata`]'s text.
    pub fn parse(text: &str) -> Result<RankInfo, String> {
        let bad = || format!("parallel metadata `{text}` is not `rank=R tp=N pp=M group=G`");
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for kv in text.split(' ') {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            fields.insert(k, v);
        }
        let num = |k: &str| -> Result<u32, String> {
            fields.get(k).and_then(|v| v.parse().ok()).ok_or_else(bad)
        };
        let info = RankInfo {
            rank: num("rank")?,
            tp: num("tp")?,
            pp: num("pp")?,
            group: fields.get("group").ok_or_else(bad)?.to_string(),
        };
        if info.tp == 0 || info.pp == 0 || info.rank >= info.tp.saturating_mul(info.pp) {
            return Err(bad());
        }
        Ok(info)
    }

    /// The rank of an engine, `None` for a whole (unsharded, single-stage) one.
    pub fn of(engine: &Engine) -> Result<Option<RankInfo>, EngineError> {
        engine
            .metadata(keys::PARALLEL)
            .map(|v| {
                RankInfo::parse(v).map_err(|message| EngineError::Corrupt {
                    file: engine.path().display().to_string(),
                    message,
                })
            })
            .transpose()
    }
}

/// Opens the `tp · pp` engines of the parallel build `base` (`model.kiln` names
/// `model.rank0-of-N.kiln` …) and checks that they are ranks `0..N` of one build of that shape.
pub fn open_group(base: &Path, tp: u32, pp: u32) -> Result<Vec<Engine>, EngineError> {
    let ranks = tp * pp;
    let mut engines = Vec::with_capacity(ranks as usize);
    let mut group: Option<String> = None;
    for r in 0..ranks {
        let path = rank_path(base, r, ranks);
        let engine = Engine::open(&path)?;
        let wrong = |message: String| EngineError::Incompatible {
            file: path.display().to_string(),
            message,
        };
        let info = RankInfo::of(&engine)?
            .ok_or_else(|| wrong("not a rank engine (built without --tp or --pp)".into()))?;
        if (info.rank, info.tp, info.pp) != (r, tp, pp) {
            return Err(wrong(format!(
                "it is rank {} of a build with --tp {} --pp {}, expected rank {r} of --tp {tp} \
                 --pp {pp}",
                info.rank, info.tp, info.pp
            )));
        }
        match &group {
            Some(g) if *g != info.group => {
                return Err(wrong(format!(
                    "it belongs to another build than rank 0 (group {}, rank 0's {g})",
                    info.group
                )))
            }
            _ => group = Some(info.group),
        }
        engines.push(engine);
    }
    Ok(engines)
}

/// The CPU executors of a build's engines (rank order), grouped by stage: each stage's ranks
/// share one in-process group.
pub fn cpu_executors(engines: &[Engine], tp: u32) -> Result<Vec<Vec<CpuExecutor>>, GenerateError> {
    engines
        .chunks(tp as usize)
        .map(|stage| {
            stage
                .iter()
                .zip(LocalGroup::new(stage.len()))
                .map(|(e, g)| {
                    let exec = e.cpu_executor()?;
                    let g: Arc<dyn Collective> = Arc::new(g);
                    Ok(exec.with_collective(g)?)
                })
                .collect()
        })
        .collect()
}

/// One sequence on a parallel build's CPU executors (stage-major): each feed runs the stages in
/// order, every rank of a stage on its own thread; a stage's outputs (rank 0's; all ranks hold
/// the same) are the next stage's activations, and the last stage's logits are returned.
pub struct ParallelCpuDecoder<'e> {
    stages: Vec<Vec<(&'e CpuExecutor, CpuSession)>>,
}

impl<'e> ParallelCpuDecoder<'e> {
    /// A fresh sequence on `stages` (each a stage's executors in rank order).
    pub fn new(stages: &'e [Vec<CpuExecutor>]) -> Self {
        ParallelCpuDecoder {
            stages: stages
                .iter()
                .map(|ranks| ranks.iter().map(|e| (e, e.session(1))).collect())
                .collect(),
        }
    }
}

/// Runs one step of every rank of a stage, each on its own thread; returns rank 0's outputs, or
/// the failure of the lowest failing rank (a rank that fails aborts its group, so the others
/// fail too, naming it).
fn stage_step(
    ranks: &mut [(&CpuExecutor, CpuSession)],
    ids: &[i32],
    acts: &BTreeMap<String, HostTensor>,
) -> Result<BTreeMap<String, HostTensor>, GenerateError> {
    let results: Vec<Result<BTreeMap<String, HostTensor>, GenerateError>> =
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter_mut()
                .map(|(exec, session)| {
                    s.spawn(move || Ok(exec.step_with(session, ids, acts, &[])?.outputs))
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(GenerateError::NoLogits(format!("rank {r} panicked")))
                    })
                })
                .collect()
        });
    let mut rank0 = None;
    for (r, res) in results.into_iter().enumerate() {
        let out = res?;
        if r == 0 {
            rank0 = Some(out);
        }
    }
    Ok(rank0.expect("a stage has rank 0"))
}

impl Decoder for ParallelCpuDecoder<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let mut acts = BTreeMap::new();
        for ranks in &mut self.stages {
            acts = stage_step(ranks, &ids, &acts)?;
        }
        let logits = acts.get("logits").ok_or_else(|| {
            GenerateError::NoLogits("the last stage's graph has no output named `logits`".into())
        })?;
        Ok(last_row(logits).to_vec())
    }
    fn past(&self) -> usize {
        self.stages[0][0].1.past()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_files_and_metadata() {
        assert_eq!(
            rank_path(Path::new("out/model.kiln"), 1, 4),
            PathBuf::from("out/model.rank1-of-4.kiln")
        );
        assert_eq!(
            rank_path(Path::new("m"), 0, 2),
            PathBuf::from("m.rank0-of-2.kiln")
        );
        let info = RankInfo {
            rank: 3,
            tp: 2,
            pp: 2,
            group: "abc".into(),
        };
        assert_eq!(info.to_metadata(), "rank=3 tp=2 pp=2 group=abc");
        assert_eq!(RankInfo::parse(&info.to_metadata()).unwrap(), info);
        assert_eq!(
            (info.stage(), info.is_last_stage(), info.ranks()),
            (1, true, 4)
        );
        for bad in [
            "rank=4 tp=2 pp=2 group=x",
            "rank=0 tp=0 pp=1 group=x",
            "1/2/x",
            "",
        ] {
            assert!(RankInfo::parse(bad).is_err(), "{bad}");
        }
    }
}
