//! A paged KV cache for the CPU executor: the graph's appended states (one K and one V per layer)
//! live in fixed-size blocks of token slots, addressed through each sequence's block table, so
//! the scheduler can run sequences of different lengths in one step, share the blocks of a
//! common prompt prefix between sequences, and free a sequence's memory block by block.
//!
//! A state of shape `[1, outer…, past, inner…]` (append axis `past`) is stored per block as
//! `[outer, block, inner]` f32. A step gathers the first `start` positions of sequences that
//! share `start` into one [`CpuSession`] (the batch axis is the state's first), runs the
//! executor, and scatters the new positions back.

use super::tensor::{is_int_storage, Tensor};
use super::{CpuExecutor, CpuSession, ExecError};
use crate::ir::dim::eval_shape;
use crate::ir::SymValues;

/// Where one state's per-token entries live.
#[derive(Clone, Debug)]
struct StateLayout {
    /// Shape of the state for one sequence and `past = 0` (the append axis is 0 there).
    shape0: Vec<usize>,
    /// The append (token) axis.
    axis: usize,
    /// Product of the extents before the append axis.
    outer: usize,
    /// Product of the extents after it.
    inner: usize,
}

/// The KV blocks of every state of a graph.
pub struct PagedKv {
    layouts: Vec<StateLayout>,
    /// Per state: `blocks × outer × block × inner` values.
    pools: Vec<Vec<f32>>,
    block: usize,
    blocks: usize,
}

impl std::fmt::Debug for PagedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKv")
            .field("states", &self.layouts.len())
            .field("block", &self.block)
            .field("blocks", &self.blocks)
            .finish()
    }
}

impl PagedKv {
    /// Bytes one token takes in all states (the KV-cache cost of a token).
    pub fn bytes_per_token(exec: &CpuExecutor) -> Result<usize, ExecError> {
        Ok(layouts(exec)?.iter().map(|l| l.outer * l.inner * 4).sum())
    }

    /// `blocks` blocks of `block` token slots for every appended state of `exec`'s graph. Refuses
    /// a graph whose states are not all appended along one token axis.
    pub fn new(exec: &CpuExecutor, block: usize, blocks: usize) -> Result<PagedKv, ExecError> {
        let layouts = layouts(exec)?;
        let pools = layouts
            .iter()
            .map(|l| vec![0f32; blocks * l.outer * block * l.inner])
            .collect();
        Ok(PagedKv {
            layouts,
            pools,
            block,
            blocks,
        })
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks
    }

    fn check_table(&self, table: &[u32], len: usize) -> Result<(), ExecError> {
        if table.len() * self.block < len || table.iter().any(|&b| b as usize >= self.blocks) {
            return Err(ExecError::Input(format!(
                "a block table of {} blocks (of {} in the cache) cannot hold {len} tokens",
                table.len(),
                self.blocks
            )));
        }
        Ok(())
    }

    /// A session of `tables.len()` sequences, each holding the first `len` cached positions of
    /// the sequence whose blocks are its table (sequences of one session share their length).
    pub fn gather(&self, tables: &[&[u32]], len: usize) -> Result<CpuSession, ExecError> {
        for t in tables {
            self.check_table(t, len)?;
        }
        let batch = tables.len();
        let states = self
            .layouts
            .iter()
            .zip(&self.pools)
            .map(|(l, pool)| {
                let per_seq = l.outer * len * l.inner;
                let mut data = vec![0f32; batch * per_seq];
                for (b, table) in tables.iter().enumerate() {
                    for o in 0..l.outer {
                        for p in 0..len {
                            let src = self.offset(l, table[p / self.block], o, p % self.block);
                            let dst = b * per_seq + (o * len + p) * l.inner;
                            data[dst..dst + l.inner].copy_from_slice(&pool[src..src + l.inner]);
                        }
                    }
                }
                let mut shape = l.shape0.clone();
                shape[0] = batch;
                shape[l.axis] = len;
                Some(Tensor::new(crate::ir::DType::F32, shape, data))
            })
            .collect();
        Ok(CpuSession {
            batch,
            past: len,
            states,
        })
    }

    /// Copies positions `from..session.past()` of each sequence of a session into the blocks of
    /// its table.
    pub fn scatter(
        &mut self,
        session: &CpuSession,
        tables: &[&[u32]],
        from: usize,
    ) -> Result<(), ExecError> {
        let len = session.past;
        if tables.len() != session.batch {
            return Err(ExecError::Input(format!(
                "{} block tables for a session of {} sequences",
                tables.len(),
                session.batch
            )));
        }
        for t in tables {
            self.check_table(t, len)?;
        }
        for (j, l) in self.layouts.iter().enumerate() {
            let t = session.states[j]
                .as_ref()
                .ok_or_else(|| ExecError::Input("the session has not run a step".into()))?;
            let values = t.values::<f32>();
            let block = self.block;
            let per_seq = l.outer * len * l.inner;
            let pool = &mut self.pools[j];
            for (b, table) in tables.iter().enumerate() {
                for o in 0..l.outer {
                    for p in from..len {
                        let k = table[p / block] as usize;
                        let dst = ((k * l.outer + o) * block + p % block) * l.inner;
                        let src = b * per_seq + (o * len + p) * l.inner;
                        pool[dst..dst + l.inner].copy_from_slice(&values[src..src + l.inner]);
                    }
                }
            }
        }
        Ok(())
    }

    fn offset(&self, l: &StateLayout, block: u32, o: usize, slot: usize) -> usize {
        ((block as usize * l.outer + o) * self.block + slot) * l.inner
    }
}

/// The layout of each state of `exec`'s graph, for one sequence.
fn layouts(exec: &CpuExecutor) -> Result<Vec<StateLayout>, ExecError> {
    let g = &exec.graph;
    let mut out = Vec::with_capacity(g.states.len());
    for (j, s) in g.states.iter().enumerate() {
        let node = &g.nodes[s.input];
        let axis = exec
            .appends
            .iter()
            .flatten()
            .find(|(b, _)| *b == j)
            .map(|&(_, axis)| axis)
            .ok_or_else(|| {
                ExecError::Unsupported(format!(
                    "state `{}` is not a cache that each step appends to, so it cannot be paged",
                    node.name
                ))
            })?;
        if is_int_storage(node.ty.dtype) {
            return Err(ExecError::Unsupported(format!(
                "state `{}` holds integers; a paged cache holds floating-point values",
                node.name
            )));
        }
        let at = |past| {
            eval_shape(
                &node.ty.shape,
                &SymValues {
                    batch: 1,
                    seq: 1,
                    past,
                },
            )
        };
        let (shape0, shape1) = (at(0), at(1));
        let tokens_only = shape0.len() == shape1.len()
            && shape0.first() == Some(&1)
            && axis > 0
            && shape0.iter().zip(&shape1).enumerate().all(|(i, (a, b))| {
                if i == axis {
                    *a == 0 && *b == 1
                } else {
                    a == b
                }
            });
        if !tokens_only {
            return Err(ExecError::Unsupported(format!(
                "state `{}` has type {}: a paged cache needs [batch, …, past, …] with only the \
                 append axis growing, by one per token",
                node.name, node.ty
            )));
        }
        out.push(StateLayout {
            outer: shape0[..axis].iter().product(),
            inner: shape0[axis + 1..].iter().product(),
            axis,
            shape0,
        });
    }
    Ok(out)
}
