//! The products with a weight, `w` in checkpoint layout `[n, k]` (`[out, in]`):
//!
//! - `Linear` of `[x[…, k], w]` → `x · wᵀ`;
//! - `LinearAdd` of `[x, w, r[…, n]]` → `x · wᵀ + r` (a residual-add epilogue);
//! - `LinearBias` of `[x, w, b[n]]` → `x · wᵀ + b` (a bias epilogue: Qwen2's q/k/v);
//! - `GatedMlp` of `[x, w[2f, k]]` → `silu(x · w[0..f]ᵀ) ⊙ (x · w[f..2f]ᵀ)` (gate and up stacked);
//! - `GatedGelu`: the same with GELU's tanh approximation (GeGLU: Gemma's MLP).
//!
//! The weight may be stored in a weight format (`quant.rs`), which the product dequantizes as it
//! reads it; an fp8 weight is read in W8A8 (the activations rounded to E4M3 per row first). On
//! the GPU each is one `Linear` launch with its epilogue (the GEMV for few rows, a cuBLAS(Lt) GEMM
//! plus an epilogue kernel beyond), its weight bf16 or a format the kernels read.

use super::Sizes;
use crate::cpu::elementwise::binary;
use crate::cpu::matmul::matmul;
use crate::cpu::rows::{check_float, PAR_GRAIN};
use crate::cpu::tensor::Tensor;
use crate::ir::{same_float, BinaryOp, DType, NodeId, Op, TensorType};
use crate::lower::{Nodes, Val};
use crate::plan::{BufType, Epilogue, Launch};
use rayon::prelude::*;

/// `w [n, k]` with `k` the last axis of `x`; the output's last axis `n` (`n/2` when gated); a
/// residual of the product's type, a bias vector of `n`.
pub(super) fn infer(op: &Op, ins: &[&TensorType]) -> Result<TensorType, String> {
    let (x, w) = (ins[0], ins[1]);
    let dtype = if w.dtype.is_weight_format() && x.dtype.is_float() {
        x.dtype
    } else {
        same_float(op, x, w)?
    };
    if w.rank() != 2 || x.rank() < 1 || x.shape.last() != Some(&w.shape[1]) {
        return Err(format!(
            "{} of {x} by weight {w}: needs w [n, k] with k the last axis of x",
            op.name()
        ));
    }
    let mut shape = x.shape.clone();
    let n = w.shape[0].clone();
    *shape.last_mut().expect("rank ≥ 1") = match op {
        Op::GatedMlp | Op::GatedGelu => n
            .div(2)
            .ok_or_else(|| format!("{} weight {w} has an odd number of rows", op.name()))?,
        _ => n,
    };
    if let Op::LinearBias = op {
        let b = ins[2];
        if b.rank() != 1 || b.shape[0] != w.shape[0] || b.dtype != dtype {
            return Err(format!(
                "LinearBias bias {b} is not a {} vector of the weight's {} rows",
                dtype.name(),
                w.shape[0]
            ));
        }
    }
    if let Op::LinearAdd = op {
        if ins[2].shape != shape || ins[2].dtype != dtype {
            return Err(format!(
                "LinearAdd residual {} does not match the product {}",
                ins[2],
                TensorType::new(dtype, shape)
            ));
        }
    }
    Ok(TensorType::new(dtype, shape))
}

/// CPU reference of each of the five.
pub(super) fn eval(op: &Op, ins: Vec<Tensor>) -> Result<Tensor, String> {
    let mut ins = ins.into_iter();
    let (x, w) = (ins.next().expect("arity"), ins.next().expect("arity"));
    match op {
        Op::LinearAdd | Op::LinearBias => {
            binary(BinaryOp::Add, linear(x, w)?, ins.next().expect("arity"))
        }
        Op::GatedMlp => gated(x, w, silu),
        Op::GatedGelu => gated(x, w, super::gelu::gelu_tanh),
        _ => linear(x, w),
    }
}

/// `x · wᵀ` for a weight `w [n, k]`: the executor's matmul reads `wᵀ` as a transposed view (the
/// streaming `x · Wᵀ` kernel for few rows, `gemm` otherwise).
fn linear(x: Tensor, w: Tensor) -> Result<Tensor, String> {
    // A quantized weight holds its dequantized values (`quant.rs`): the product reads them as
    // they are, in f32, as the GPU kernels do after dequantizing in registers.
    // An fp8 weight is read in W8A8: the activations are rounded to E4M3 per row first.
    let x = if w.dtype == DType::Fp8 {
        let (dtype, shape) = (x.dtype, x.shape.clone());
        let cols = *shape.last().unwrap_or(&1);
        let mut v = x.into_vec::<f32>();
        crate::quant::fp8_rows(&mut v, cols);
        Tensor::new(dtype, shape, v)
    } else {
        x
    };
    let w = if w.dtype.is_weight_format() {
        w.with_dtype(x.dtype)
    } else {
        w
    };
    check_float("Linear", &[&x, &w])?;
    if w.rank() != 2 || x.rank() == 0 || x.shape.last() != Some(&w.shape[1]) {
        return Err(format!(
            "Linear of {:?} by weight {:?}: needs w [n, k] with k the last axis of x",
            x.shape, w.shape
        ));
    }
    if x.rank() >= 2 {
        return matmul(x, w.permute(&[1, 0]));
    }
    // A single row: treat it as a [1, k] matrix.
    let k = x.shape[0];
    let y = matmul(x.reshape(vec![1, k]), w.permute(&[1, 0]))?;
    let n = y.shape[1];
    Ok(y.reshape(vec![n]))
}

/// `silu(g) = g · 1/(e^-g + 1)`, as the model file writes it.
pub(crate) fn silu(g: f32) -> f32 {
    g * (1.0 / ((-g).exp() + 1.0))
}

/// `act(x · w[0..f]ᵀ) ⊙ (x · w[f..2f]ᵀ)`.
fn gated(x: Tensor, w: Tensor, act: fn(f32) -> f32) -> Result<Tensor, String> {
    let y = linear(x, w)?;
    let two_f = *y.shape.last().expect("linear keeps the rank");
    if two_f % 2 != 0 {
        return Err(format!(
            "a gated MLP weight has an odd number of rows ({two_f})"
        ));
    }
    let f = two_f / 2;
    let dtype = y.dtype;
    let mut shape = y.shape.clone();
    *shape.last_mut().expect("rank ≥ 1") = f;
    let gu = y.into_vec::<f32>();
    let mut out = vec![0f32; gu.len() / 2];
    let rows = |(o, r): (&mut [f32], &[f32])| {
        let (g, u) = r.split_at(f);
        for ((d, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *d = act(g) * u;
        }
    };
    if f > 0 && out.len() >= 2 * PAR_GRAIN {
        out.par_chunks_mut(f)
            .zip(gu.par_chunks(two_f))
            .with_min_len(PAR_GRAIN.div_ceil(f))
            .for_each(rows);
    } else if f > 0 {
        out.chunks_mut(f).zip(gu.chunks(two_f)).for_each(rows);
    }
    Ok(Tensor::new(dtype, shape, out))
}

/// `2·rows·n·k` for the product, 4 per output for the epilogue.
pub(super) fn flops(s: &Sizes, ins: &[&TensorType], out: &TensorType) -> f64 {
    let rows = s.numel(ins[0]) / s.dim(&ins[1].shape[1]).max(1.0);
    2.0 * rows * s.numel(ins[1]) + 4.0 * s.numel(out)
}

/// GPU: one `Linear` launch over a whole input buffer, with the op's epilogue.
pub(super) fn lower(n: &mut Nodes, id: NodeId) -> Result<Val, String> {
    let node = &n.graph().nodes[id];
    let (op, ins) = (node.op.clone(), node.inputs.clone());
    let x = n.whole(id, ins[0])?;
    let (w, format) = n.linear_weight(id, ins[1], n.buffer(x).cols)?;
    let epilogue = match op {
        Op::LinearAdd => Epilogue::Residual(n.whole(id, ins[2])?),
        Op::LinearBias => Epilogue::Bias(n.weight(id, ins[2])?),
        Op::GatedMlp => Epilogue::Gated,
        Op::GatedGelu => Epilogue::GatedGelu,
        _ => Epilogue::None,
    };
    let rows = n.buffer(x).rows;
    n.launch(id, rows, BufType::Bf16, |out| Launch::Linear {
        x,
        norm: None,
        w,
        format,
        epilogue,
        out,
    })
}
