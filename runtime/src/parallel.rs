//! Parallel engines: `kiln build --tp N --pp M` writes one engine per rank
//! (`model.rank0-of-4.kiln`, …). Rank `r` is tensor-parallel rank `r % N` of pipeline stage
//! `r / N`: it holds that stage's layers, sharded (with `AllReduce`/`AllGather` ops), and its
//! part of their weights. This module names those files, opens a group and checks that its
//! engines belong together, and runs it: the stages one after the other, each handing its
//! outputs (the residual stream) to the next; within a stage, one thread per rank, the ranks
//! exchanging through an in-process [`LocalGroup`], the CPU executor on each.

use crate::collective::{Collective, LocalGroup};
use crate::cpu::paged::PagedKv;
use crate::cpu::{CpuExecutor, CpuSession, HostTensor};
use crate::cuda::{StepResult, Want};
use crate::engine::{keys, Engine, EngineError};
use crate::generate::{last_row, Decoder, GenerateError};
use crate::serving::{BatchExecutor, SeqStep};
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

/// Runs `f` for every rank of a stage, each on its own thread; returns rank 0's result, or the
/// failure of the lowest failing rank (a rank that fails aborts its group, so the others fail
/// too, naming it).
fn on_ranks<R: Send, T: Send>(
    ranks: &mut [R],
    f: impl Fn(&mut R) -> Result<T, GenerateError> + Sync,
) -> Result<T, GenerateError> {
    let results: Vec<Result<T, GenerateError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .map(|rank| {
                let f = &f;
                s.spawn(move || f(rank))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(GenerateError::NoLogits(format!("rank {r} panicked"))))
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
            let acts_in = &acts;
            acts = on_ranks(ranks, |(exec, session)| {
                Ok(exec.step_with(session, &ids, acts_in, &[])?.outputs)
            })?;
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

/// One batch of a step: its sequences' block tables, their common position, their tokens.
type MicroBatch<'a> = (Vec<&'a [u32]>, usize, Vec<i32>);

/// The scheduler's executor over a parallel build on the CPU: every rank keeps its own paged
/// KV cache (its layers, its heads) under the block tables the scheduler shares among them. A
/// step runs the sequences that sit at the same position and feed as many tokens as one batch
/// (a micro-batch), the batches pipelined through the stages, every rank of a stage on its own
/// thread.
pub struct ParallelBatchExecutor {
    stages: Vec<Vec<(CpuExecutor, PagedKv)>>,
    vocab: usize,
    max_batch: usize,
    max_step_tokens: usize,
}

impl ParallelBatchExecutor {
    /// `stages` (each a stage's executors in rank order) with caches of `kv_tokens` token slots
    /// in blocks of `block`; steps of at most `max_batch` sequences and `max_step_tokens` tokens.
    pub fn new(
        stages: Vec<Vec<CpuExecutor>>,
        block: usize,
        kv_tokens: usize,
        max_batch: usize,
        max_step_tokens: usize,
    ) -> Result<ParallelBatchExecutor, GenerateError> {
        let vocab = stages
            .last()
            .and_then(|s| s.first())
            .and_then(|e| e.graph().vocab())
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                GenerateError::NoLogits(
                    "the last stage's graph has no `logits` output [batch, seq, vocab]".into(),
                )
            })?;
        let blocks = kv_tokens.div_ceil(block);
        let stages = stages
            .into_iter()
            .map(|ranks| {
                ranks
                    .into_iter()
                    .map(|e| {
                        let kv = PagedKv::new(&e, block, blocks)?;
                        Ok((e, kv))
                    })
                    .collect::<Result<Vec<_>, crate::cpu::ExecError>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ParallelBatchExecutor {
            stages,
            vocab,
            max_batch,
            max_step_tokens,
        })
    }

    /// Bytes of KV cache per token, all ranks together.
    pub fn kv_bytes_per_token(stages: &[Vec<CpuExecutor>]) -> Result<usize, GenerateError> {
        let mut total = 0;
        for e in stages.iter().flatten() {
            total += PagedKv::bytes_per_token(e)?;
        }
        Ok(total)
    }

    /// The batches of a step through every stage, pipelined: in wave `w`, stage `s` runs batch
    /// `w - s`, all such pairs at once (each stage on its own ranks and collectives), so the
    /// stages overlap as micro-batches do in a pipeline-parallel server. Returns each batch's
    /// last-stage outputs (rank 0's).
    fn run_batches(
        &mut self,
        batches: &[MicroBatch<'_>],
    ) -> Result<Vec<BTreeMap<String, HostTensor>>, GenerateError> {
        let (n_batches, n_stages) = (batches.len(), self.stages.len());
        let mut carry: Vec<BTreeMap<String, HostTensor>> = vec![BTreeMap::new(); n_batches];
        for wave in 0..n_batches + n_stages - 1 {
            let tasks: Vec<(usize, &mut Vec<(CpuExecutor, PagedKv)>)> = self
                .stages
                .iter_mut()
                .enumerate()
                .filter_map(|(s, ranks)| {
                    let b = wave.checked_sub(s)?;
                    (b < n_batches).then_some((b, ranks))
                })
                .collect();
            let carried = &carry;
            let done: Vec<(usize, Result<_, GenerateError>)> = std::thread::scope(|sc| {
                let handles: Vec<_> = tasks
                    .into_iter()
                    .map(|(b, ranks)| {
                        let (tables, start, ids) = &batches[b];
                        let acts = &carried[b];
                        let h = sc.spawn(move || {
                            on_ranks(ranks, |(exec, kv)| {
                                let mut session = kv.gather(tables, *start)?;
                                let out = exec.step_with(&mut session, ids, acts, &[])?;
                                kv.scatter(&session, tables, *start)?;
                                Ok(out.outputs)
                            })
                        });
                        (b, h)
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(b, h)| {
                        let r = h.join().unwrap_or_else(|_| {
                            Err(GenerateError::NoLogits("a pipeline stage panicked".into()))
                        });
                        (b, r)
                    })
                    .collect()
            });
            for (b, r) in done {
                carry[b] = r?;
            }
        }
        Ok(carry)
    }
}

impl BatchExecutor for ParallelBatchExecutor {
    fn block_size(&self) -> usize {
        self.stages[0][0].1.block_size()
    }
    fn num_blocks(&self) -> usize {
        self.stages[0][0].1.num_blocks()
    }
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn max_batch(&self) -> usize {
        self.max_batch
    }
    fn max_step_tokens(&self) -> usize {
        self.max_step_tokens
    }

    fn step(&mut self, seqs: &[SeqStep<'_>], _want: Want<'_>) -> Result<StepResult, GenerateError> {
        // Sequences at the same position feeding as many tokens run as one batch; the batches
        // go through the stages as pipelined micro-batches.
        let groups = crate::serving::executor::position_groups(seqs);
        let vocab = self.vocab;
        let batches: Vec<MicroBatch> = groups
            .iter()
            .map(|(start, _, members)| {
                let tables = members.iter().map(|&i| seqs[i].blocks).collect();
                let ids = members
                    .iter()
                    .flat_map(|&i| seqs[i].tokens.iter().map(|&t| t as i32))
                    .collect();
                (tables, *start, ids)
            })
            .collect();
        let outs = self.run_batches(&batches)?;
        let mut logits = vec![0f32; seqs.len() * vocab];
        for ((_, n, members), out) in groups.iter().zip(&outs) {
            let l = out.get("logits").ok_or_else(|| {
                GenerateError::NoLogits("the last stage has no output named `logits`".into())
            })?;
            if l.data.len() != members.len() * n * vocab {
                return Err(GenerateError::NoLogits(format!(
                    "the `logits` output has shape {:?}, not [batch, seq, {vocab}]",
                    l.shape
                )));
            }
            for (b, &i) in members.iter().enumerate() {
                let at = (b * n + n - 1) * vocab;
                logits[i * vocab..(i + 1) * vocab].copy_from_slice(&l.data[at..at + vocab]);
            }
        }
        Ok(StepResult::Logits(logits))
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
