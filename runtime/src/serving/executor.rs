//! What the scheduler needs from an executor: one step over any set of sequences, each feeding
//! some new tokens at its own position, its KV cache addressed by a block table that the
//! scheduler owns. The CPU executor (through [`PagedKv`]) and the CUDA executor implement it.

use crate::cpu::paged::PagedKv;
use crate::cpu::CpuExecutor;
use crate::generate::GenerateError;
use rayon::prelude::*;

pub use crate::cuda::{SampleParams, StepResult, Want};

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    /// The tokens to feed (a prompt chunk, or the last sampled token).
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in its cache: the first fed token's position.
    pub start: usize,
    /// The sequence's cache blocks, in order; they hold at least `start + tokens.len()` slots.
    pub blocks: &'a [u32],
}

/// The sequences of a step that can run as one batch of the graph: those at the same position
/// feeding as many tokens. Each group: `(start, tokens per sequence, indices into seqs)`.
pub(crate) fn position_groups(seqs: &[SeqStep<'_>]) -> Vec<(usize, usize, Vec<usize>)> {
    let mut groups: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        match groups
            .iter_mut()
            .find(|g| g.0 == s.start && g.1 == s.tokens.len())
        {
            Some(g) => g.2.push(i),
            None => groups.push((s.start, s.tokens.len(), vec![i])),
        }
    }
    groups
}

/// An executor the scheduler can drive.
pub trait BatchExecutor {
    /// Token slots per KV block.
    fn block_size(&self) -> usize;
    /// KV blocks in all.
    fn num_blocks(&self) -> usize;
    /// Logits per token (the vocabulary).
    fn vocab(&self) -> usize;
    /// Most sequences in one step.
    fn max_batch(&self) -> usize;
    /// Most tokens (all sequences together) in one step.
    fn max_step_tokens(&self) -> usize;
    /// Runs one step and returns, for each sequence's last fed token, what `want` asks for
    /// where the executor chooses tokens on its device (argmax, or a draw with each sequence's
    /// settings), else its logits (`[seqs, vocab]` row-major). Writes the fed tokens' keys and
    /// values into their slots.
    fn step(&mut self, seqs: &[SeqStep<'_>], want: Want<'_>) -> Result<StepResult, GenerateError>;
}

/// The CPU executor with a paged KV cache. The sequences of a step that sit at the same position
/// and feed as many tokens run as one batched step of the graph (their caches gathered from and
/// written back to the blocks); such groups run in parallel.
pub struct CpuBatchExecutor {
    exec: CpuExecutor,
    kv: PagedKv,
    vocab: usize,
    max_batch: usize,
    max_step_tokens: usize,
}

impl CpuBatchExecutor {
    /// `exec` with a cache of `kv_tokens` token slots in blocks of `block` tokens; steps of at
    /// most `max_batch` sequences and `max_step_tokens` tokens.
    pub fn new(
        exec: CpuExecutor,
        block: usize,
        kv_tokens: usize,
        max_batch: usize,
        max_step_tokens: usize,
    ) -> Result<CpuBatchExecutor, GenerateError> {
        let vocab = exec
            .graph()
            .vocab()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                GenerateError::NoLogits(
                    "its graph has no `logits` output [batch, seq, vocab]".into(),
                )
            })?;
        let kv = PagedKv::new(&exec, block, kv_tokens.div_ceil(block))?;
        Ok(CpuBatchExecutor {
            exec,
            kv,
            vocab,
            max_batch,
            max_step_tokens,
        })
    }

    /// Bytes of KV cache per token of `exec`'s graph.
    pub fn kv_bytes_per_token(exec: &CpuExecutor) -> Result<usize, GenerateError> {
        Ok(PagedKv::bytes_per_token(exec)?)
    }
}

impl BatchExecutor for CpuBatchExecutor {
    fn block_size(&self) -> usize {
        self.kv.block_size()
    }
    fn num_blocks(&self) -> usize {
        self.kv.num_blocks()
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
        // Sequences at the same position feeding as many tokens run as one batch of the graph.
        let groups = position_groups(seqs);
        let (exec, kv, vocab) = (&self.exec, &self.kv, self.vocab);
        let ran: Vec<_> = groups
            .par_iter()
            .map(|(start, n, members)| -> Result<_, GenerateError> {
                let tables: Vec<&[u32]> = members.iter().map(|&i| seqs[i].blocks).collect();
                let mut session = kv.gather(&tables, *start)?;
                let ids: Vec<i32> = members
                    .iter()
                    .flat_map(|&i| seqs[i].tokens.iter().map(|&t| t as i32))
                    .collect();
                let out = exec.step(&mut session, &ids, &[])?;
                let logits = out.outputs.get("logits").ok_or_else(|| {
                    GenerateError::NoLogits("its graph has no output named `logits`".into())
                })?;
                if logits.data.len() != members.len() * n * vocab {
                    return Err(GenerateError::NoLogits(format!(
                        "its `logits` output has shape {:?}, not [batch, seq, {vocab}]",
                        logits.shape
                    )));
                }
                // The last position of each sequence.
                let rows: Vec<Vec<f32>> = (0..members.len())
                    .map(|b| {
                        let at = (b * n + n - 1) * vocab;
                        logits.data[at..at + vocab].to_vec()
                    })
                    .collect();
                Ok((session, rows))
            })
            .collect();
        let mut logits = vec![0f32; seqs.len() * vocab];
        let mut sessions = Vec::with_capacity(groups.len());
        for (r, (_, _, members)) in ran.into_iter().zip(&groups) {
            let (session, rows) = r?;
            for (&i, row) in members.iter().zip(rows) {
                logits[i * vocab..(i + 1) * vocab].copy_from_slice(&row);
            }
            sessions.push(session);
        }
        for ((start, _, members), session) in groups.iter().zip(&sessions) {
            let tables: Vec<&[u32]> = members.iter().map(|&i| seqs[i].blocks).collect();
            self.kv.scatter(session, &tables, *start)?;
        }
        Ok(StepResult::Logits(logits))
    }
}

impl BatchExecutor for crate::cuda::CudaExecutor {
    fn block_size(&self) -> usize {
        crate::cuda::kv_cache::BLOCK
    }
    fn num_blocks(&self) -> usize {
        self.kv_blocks()
    }
    fn vocab(&self) -> usize {
        crate::cuda::CudaExecutor::vocab(self)
    }
    fn max_batch(&self) -> usize {
        self.options().max_batch
    }
    fn max_step_tokens(&self) -> usize {
        self.options().max_step_tokens
    }
    fn step(&mut self, seqs: &[SeqStep<'_>], want: Want<'_>) -> Result<StepResult, GenerateError> {
        Ok(self.step_paged(seqs, want)?)
    }
}
