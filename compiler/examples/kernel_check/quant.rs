//! The `quant` step: the kernels of `gemv_q.cu` for every weight format `llama_kernels` lists.

use super::*;
use kiln_compiler::codegen::kernels::{QuantFormat, LISTED_WEIGHT_FORMATS};

/// `gemv_q` for every weight format the GPU reads, at SmolLM2's shapes (K 576 and 1536; plain,
/// gated and residual epilogues; M = 1 with the folded norm, M = 5), and the prefill helpers
/// `dequant` and `act_fp8`, against f64 products of `quant.rs`'s dequantized values (fp8: of the
/// activations rounded per row as `quant::fp8_rows` rounds them).
pub(super) fn check_quant(g: &Gpu, r: &mut Rng, rep: &mut Report) -> Res<()> {
    use GemvEpilogue::{Gated, Plain, Residual};
    for format in LISTED_WEIGHT_FORMATS {
        for (k, n, epi) in [(576, 960, Plain), (576, 1536, Gated), (1536, 576, Residual)] {
            for (m, norm) in [(1, epi != Residual), (5, false)] {
                check_gemv_q(g, r, rep, format, (k, n, m), epi, norm)?;
            }
        }
    }
    for k in [576usize, 1536] {
        let t = 7;
        let x = r.bf_vec(t * k, 2.0);
        let mut want = x.clone();
        kiln_runtime::quant::fp8_rows(&mut want, k);
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let rt = RuntimeSizes {
            tokens: t,
            ..Default::default()
        };
        let dx = g.up_bf(&x)?;
        // Rounded back to bf16.
        let dout = g.poison_bf(t * k)?;
        let args = ActFp8Args {
            x: g.ptr(&dx),
            out: g.ptr(&dout),
            scales: 0,
            t: t as i32,
        };
        g.launch(&KernelInstance::act_fp8(k, false), rt, &args)?;
        g.sync()?;
        rep.check(
            format!("act_fp8<{k}, 0> T={t}"),
            rel_l2(&g.down_bf(&dout)?, &want),
            4e-3,
        );
        // As E4M3 codes and row scales (an FP8 GEMM's operands): code · scale is the same value.
        let (codes, scales) = (g.up(&vec![0x7fu8; t * k])?, g.poison_f32(t)?);
        let args = ActFp8Args {
            x: g.ptr(&dx),
            out: g.ptr(&codes),
            scales: g.ptr(&scales),
            t: t as i32,
        };
        g.launch(&KernelInstance::act_fp8(k, true), rt, &args)?;
        g.sync()?;
        let (c, sc) = (g.down(&codes)?, g.down(&scales)?);
        let got: Vec<f32> = c
            .iter()
            .enumerate()
            .map(|(i, &b)| kiln_runtime::quant::from_e4m3(b) * sc[i / k])
            .collect();
        rep.check(format!("act_fp8<{k}, 1> T={t}"), rel_l2(&got, &want), 4e-3);
    }
    Ok(())
}

/// One `gemv_q` instance (and, at M = 5, the `dequant` of its weight) against f64.
fn check_gemv_q(
    g: &Gpu,
    r: &mut Rng,
    rep: &mut Report,
    f: QuantFormat,
    (k, n, m): (usize, usize, usize),
    epi: GemvEpilogue,
    norm: bool,
) -> Res<()> {
    let format = f.dtype();
    let rows = if epi == GemvEpilogue::Gated { 2 * n } else { n };
    let w: Vec<f32> = (0..rows * k).map(|_| r.sym(0.05)).collect();
    let p = kiln_runtime::quant::quantize(format, &w, rows, k).map_err(|e| e.to_string())?;
    let wd = p.dequantize();
    let parts = p.to_bytes();
    let dparts: Vec<CudaSlice<u8>> = parts.iter().map(|b| g.up(b)).collect::<Res<_>>()?;
    let part = |i: usize| dparts.get(i).map_or(0, |d| g.ptr(d));
    // The third pointer is the zero points or the minimums (`QuantFormat::third_part`).
    let third = if f.third_part().is_some() { part(2) } else { 0 };
    let eps = 1e-5f32;
    let x = r.bf_vec(m * k, 1.0);
    let res = r.bf_vec(m * n, 1.0);
    let gamma: Vec<f32> = (0..k).map(|_| bfr(1.0 + r.sym(0.5))).collect();
    let mut xin = gemv_input(&x, &gamma, k, eps, norm);
    if f == QuantFormat::Fp8 {
        kiln_runtime::quant::fp8_rows(&mut xin, k);
    }
    let reference = gemv_reference(&xin, &wd, &res, (m, n, k), epi);
    let (dx, dr, dg, dout) = (
        g.up_bf(&x)?,
        g.up_bf(&res)?,
        g.up_bf(&gamma)?,
        g.poison_bf(m * n)?,
    );
    let inst = KernelInstance::gemv_q(k, epi, f, norm, OutType::Bf16);
    let rt = RuntimeSizes {
        n,
        ..Default::default()
    };
    g.launch(
        &inst,
        rt,
        &GemvQArgs {
            x: g.ptr(&dx),
            m: m as i32,
            q: part(0),
            scale: part(1),
            zero: third,
            n: n as i32,
            residual: g.ptr(&dr),
            out: g.ptr(&dout),
            norm_w: if norm { g.ptr(&dg) } else { 0 },
            eps,
        },
    )?;
    g.sync()?;
    rep.check(
        format!("{} M={m} N={n}", inst.name_expr),
        rel_l2(&g.down_bf(&dout)?, &reference),
        TOL,
    );
    if m > 1 {
        let inst = KernelInstance::dequant(k, f);
        let dw = g.poison_bf(rows * k)?;
        let rt = RuntimeSizes {
            n: rows,
            ..Default::default()
        };
        g.launch(
            &inst,
            rt,
            &DequantArgs {
                q: part(0),
                scale: part(1),
                zero: third,
                r: rows as i32,
                out: g.ptr(&dw),
            },
        )?;
        g.sync()?;
        let want: Vec<f64> = wd.iter().map(|&v| v as f64).collect();
        rep.check(
            format!("{} R={rows}", inst.name_expr),
            rel_l2(&g.down_bf(&dw)?, &want),
            TOL,
        );
    }
    Ok(())
}
