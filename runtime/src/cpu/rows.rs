//! Helpers of the fused ops' CPU references (`crate::ops`): the float-operand check and the
//! row-parallel loop.

use super::tensor::Tensor;
use rayon::prelude::*;

/// Rows per parallel task are chosen so that one task covers about this many elements.
pub(crate) const PAR_GRAIN: usize = 1 << 15;

/// An error unless every tensor has one float dtype.
pub(crate) fn check_float(what: &str, ts: &[&Tensor]) -> Result<(), String> {
    let d = ts[0].dtype;
    if ts.iter().any(|t| t.dtype != d || !t.dtype.is_float()) {
        let names: Vec<&str> = ts.iter().map(|t| t.dtype.name()).collect();
        return Err(format!(
            "{what} needs float inputs of one dtype, got {names:?}"
        ));
    }
    Ok(())
}

/// Applies `f(row_index, row)` to each row of `len` elements, in parallel when there is enough
/// work.
pub(crate) fn for_rows(v: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if len == 0 {
        return;
    }
    if v.len() >= 2 * PAR_GRAIN {
        v.par_chunks_mut(len)
            .with_min_len(PAR_GRAIN.div_ceil(len))
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        v.chunks_mut(len).enumerate().for_each(|(i, r)| f(i, r));
    }
}
