//! `Gather` of `[table, ids]`: rows of `table` (axis 0) picked by the integer `ids`, shape
//! `ids.shape ++ table.shape[1..]` (the embedding lookup); and `GatherShard { first }`, one rank's
//! share of a vocabulary-parallel embedding: row `id - first` for the ids the rank's table holds,
//! zeros for the others (the sum over the ranks is the whole `Gather`). On the GPU an embedding
//! of the step's token ids is the `Embedding` launch.

use super::Sizes;
use crate::cpu::tensor::Tensor;
use crate::ir::{DType, NodeId, TensorType};
use crate::lower::{Nodes, Val};
use crate::plan::{BufType, Launch, Rows};

/// A table of rank ≥ 1 and i32 ids.
pub(super) fn infer(table: &TensorType, ids: &TensorType) -> Result<TensorType, String> {
    if ids.dtype != DType::I32 || table.rank() < 1 {
        return Err(format!(
            "Gather needs a table and i32 ids, got {table} and {ids}"
        ));
    }
    let mut shape = ids.shape.clone();
    shape.extend(table.shape[1..].iter().cloned());
    Ok(TensorType::new(table.dtype, shape))
}

/// CPU: `cpu/movement.rs`, ids checked against the table's rows.
pub(super) fn eval(table: Tensor, ids: Tensor) -> Result<Tensor, String> {
    crate::cpu::movement::gather(table, ids)
}

/// CPU: `cpu/movement.rs`.
pub(super) fn eval_shard(table: Tensor, ids: Tensor, first: i64) -> Result<Tensor, String> {
    crate::cpu::movement::gather_shard(table, ids, first)
}

/// A gather reads the rows it picks and the ids, not the table.
pub(super) fn read_bytes(s: &Sizes, ids: &TensorType, out: &TensorType) -> f64 {
    s.bytes(out) + s.bytes(ids)
}

/// GPU: the embedding of the step's token ids (a bf16 table), `Launch::Embedding`.
pub(super) fn lower(n: &mut Nodes, id: NodeId) -> Result<Val, String> {
    let ins = n.graph().nodes[id].inputs.clone();
    let (Val::Weight(_), Val::Tokens) = (n.val(ins[0]), n.val(ins[1])) else {
        return Err(n.err(id, "only an embedding lookup of token ids is supported"));
    };
    let table = n.weight(id, ins[0])?;
    n.launch(id, Rows::Tokens, BufType::Bf16, |out| Launch::Embedding {
        table,
        scale: 1.0,
        out,
    })
}
