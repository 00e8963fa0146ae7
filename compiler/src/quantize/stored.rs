//! Quantized weights a checkpoint already stores (AutoAWQ, GPTQ, compressed-tensors, GGUF
//! Q4_0/Q4_1/Q8_0;
//! `loader::prequant`, `GgufFile::packed_matrix`): the build options that keep them as they are,
//! and the packed weight of a quantized recipe taken from the stored codes instead of
//! re-quantizing dequantized values.

use crate::build::{BuildError, BuildOptions};
use crate::loader::Checkpoint;
use crate::rewrite::derive::DerivedWeight;
use crate::rewrite::rules::quant::QuantOptions;
use kiln_runtime::ir::{DType, Graph, NodeId, Op};
use kiln_runtime::quant;

/// The build options for a pre-quantized checkpoint: without `--quant`, its linear weights keep
/// their format (the codes pass through the build unchanged, [`stored_packed`]) and every other
/// matrix stays in 16 bits; with `--quant`, its dequantized values are quantized again (noted);
/// `--quant none` (or `--no-optimize`) builds it dequantized.
pub fn prequantized_options(
    ckpt: &Checkpoint,
    opts: &BuildOptions,
    notes: &mut Vec<String>,
) -> Result<Option<BuildOptions>, BuildError> {
    if let Some(what) = ckpt.dequantized_quantization() {
        notes.push(format!(
            "pre-quantized checkpoint ({what}): its g_idx puts input columns in groups that are \
             not runs of columns, which kiln's int4 formats need, so its weights are read \
             dequantized (exactly) and built unquantized{}",
            if opts.quant.is_some() {
                ", then quantized by --quant"
            } else {
                "; --quant int4 (or int4-gptq with calibration) quantizes them again"
            }
        ));
    }
    let Some((format, what)) = ckpt.stored_quantization() else {
        return Ok(None);
    };
    if !ckpt.tensors().iter().any(|(n, _)| ckpt.stores_packed(n)) {
        return Err(BuildError::Other(format!(
            "config.json's `quantization_config` declares a pre-quantized checkpoint ({what}), \
             but no tensor is stored quantized (no `.qweight`)"
        )));
    }
    if (opts.tp > 1 || opts.pp > 1) && ckpt.is_gguf() {
        // A GGUF's blocks have always been readable dequantized: the ranks get 16/32-bit weights.
        notes.push(format!(
            "{what}: --tp/--pp builds the blocks dequantized (parallel builds keep no quantized \
             weights yet)"
        ));
        return Ok(None);
    }
    if opts.tp > 1 || opts.pp > 1 {
        return Err(BuildError::Other(format!(
            "a pre-quantized checkpoint ({what}) with --tp/--pp is not built yet (parallel \
             builds with quantized weights are not): build it on one rank"
        )));
    }
    if opts.quant.is_some() {
        notes.push(format!(
            "pre-quantized checkpoint ({what}) built with --quant: weights not stored in that \
             format are quantized again from their dequantized values"
        ));
        return Ok(None);
    }
    if opts.no_optimize || opts.dequantize {
        let flag = if opts.dequantize {
            "--quant none"
        } else {
            "--no-optimize"
        };
        notes.push(format!(
            "pre-quantized checkpoint ({what}): {flag} builds it dequantized"
        ));
        return Ok(None);
    }
    let mut skip: Vec<String> = crate::rewrite::rules::quant::DEFAULT_SKIP
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut kept = 0;
    for (name, shape) in ckpt.tensors() {
        let default_skip = crate::rewrite::rules::quant::DEFAULT_SKIP
            .iter()
            .any(|p| crate::rewrite::rules::quant::skip_matches(p, &name));
        if ckpt.stores_packed(&name) {
            kept += usize::from(!default_skip);
        } else if shape.len() == 2 {
            skip.push(name);
        }
    }
    notes.push(format!(
        "pre-quantized checkpoint ({what}): {kept} linear weights keep their {} codes",
        format.name()
    ));
    Ok(Some(BuildOptions {
        quant: Some(QuantOptions { format, skip }),
        ..opts.clone()
    }))
}

/// The packed weight of a quantized recipe read from a pre-quantized checkpoint as stored:
/// `source` reads such weights (through float casts, whose rounding the stored codes make
/// moot), takes row ranges of them (Phi-3's fused `qkv_proj` split) and stacks rows (a fused QKV
/// or gate/up). `None` for any other recipe, which is
/// quantized from its values.
pub fn stored_packed(
    ckpt: &Checkpoint,
    source: &DerivedWeight,
    format: DType,
) -> Option<Result<quant::Packed, crate::loader::LoadError>> {
    ckpt.stored_quantization()?;
    fn walk(
        ckpt: &Checkpoint,
        g: &Graph,
        id: NodeId,
        format: DType,
    ) -> Option<Result<quant::Packed, crate::loader::LoadError>> {
        let n = &g.nodes[id];
        match &n.op {
            Op::Cast { dtype } if dtype.is_float() => walk(ckpt, g, n.inputs[0], format),
            Op::Weight { name } => match ckpt.packed(name)? {
                Ok(p) if p.format == format => Some(Ok(p)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            },
            Op::Slice {
                axis: 0,
                start,
                end,
            } => {
                let (start, end) = (start.as_const()?, end.as_const()?);
                match walk(ckpt, g, n.inputs[0], format)? {
                    Ok(p) => p
                        .row_range(usize::try_from(start).ok()?, usize::try_from(end).ok()?)
                        .map(Ok),
                    Err(e) => Some(Err(e)),
                }
            }
            Op::Concat { axis: 0 } => {
                let mut parts = Vec::new();
                for &i in &n.inputs {
                    match walk(ckpt, g, i, format)? {
                        Ok(p) => parts.push(p),
                        Err(e) => return Some(Err(e)),
                    }
                }
                quant::Packed::stack_rows(parts).map(Ok)
            }
            _ => None,
        }
    }
    let &(_, out) = source.recipe.outputs.first()?;
    walk(ckpt, &source.recipe, out, format)
}
