//! `Concat` of all inputs along `axis` (same dtype and rank, equal on the other axes). A
//! `Concat(state, new)` onto a KV-cache state is the cache append: the CPU executor appends in
//! place into spare room of the state's buffer, the cost model counts only the new rows, and on
//! the GPU it is an `Append` step that the `rope_append` peephole merges into `RopeAppend`.

use crate::cpu::tensor::Tensor;
use crate::ir::{check_axis, Dim, NodeId, TensorType};
use crate::lower::{Nodes, Step, Val};

/// One dtype and rank; all axes but `axis` equal; `axis`'s lengths add.
pub(super) fn infer(axis: usize, ins: &[&TensorType]) -> Result<TensorType, String> {
    let first = ins[0];
    check_axis(axis, first.rank())?;
    let mut total = Dim::c(0);
    for x in ins {
        let compatible = x.dtype == first.dtype
            && x.rank() == first.rank()
            && (0..x.rank()).all(|i| i == axis || x.shape[i] == first.shape[i]);
        if !compatible {
            return Err(format!(
                "Concat along axis {axis} of {first} and {x}: shapes differ"
            ));
        }
        total = total.add(&x.shape[axis]);
    }
    let mut shape = first.shape.clone();
    shape[axis] = total;
    Ok(TensorType::new(first.dtype, shape))
}

/// CPU: `cpu/movement.rs` (the executor itself appends to a state in place).
pub(super) fn eval(axis: usize, ins: Vec<Tensor>) -> Result<Tensor, String> {
    crate::cpu::movement::concat(ins, axis)
}

/// GPU: only the append of new (possibly roped) columns of a buffer to a KV-cache state.
pub(super) fn lower(n: &mut Nodes, id: NodeId) -> Result<Val, String> {
    let ins = n.graph().nodes[id].inputs.clone();
    let (buf, off, len, rope) = match (ins.len(), n.val(ins[0]), ins.get(1).map(|&i| n.val(i))) {
        (2, Val::State, Some(Val::Cols { buf, off, len })) => (*buf, *off, *len, None),
        (
            2,
            Val::State,
            Some(Val::Roped {
                rope,
                buf,
                off,
                len,
                freq,
            }),
        ) => (*buf, *off, *len, Some((*rope, freq.clone()))),
        _ => {
            return Err(n.err(
                id,
                "only KV-cache appends (Concat(State, new)) are supported",
            ))
        }
    };
    n.push(Step::Append {
        node: id,
        buf,
        off,
        len,
    });
    Ok(Val::Appended {
        append: id,
        buf,
        off,
        rope,
    })
}
