//! The benchmark steps: decode GEMVs (and their tuning variants), decode and prefill attention,
//! sampling.

use super::*;

/// GEMV tuning variants timed by the `bench-gemv` step (the first of each kind is the default).
pub(super) const GEMV_VARIANTS: [GemvVariant; 9] = [
    GemvVariant::DEFAULT_GEMV,
    GemvVariant {
        tc: false,
        warps: 8,
        depth: 16,
    },
    GemvVariant {
        tc: false,
        warps: 4,
        depth: 8,
    },
    GemvVariant {
        tc: false,
        warps: 4,
        depth: 16,
    },
    GemvVariant {
        tc: false,
        warps: 8,
        depth: 4,
    },
    GemvVariant::DEFAULT_TC,
    GemvVariant {
        tc: true,
        warps: 8,
        depth: 4,
    },
    GemvVariant {
        tc: true,
        warps: 4,
        depth: 8,
    },
    GemvVariant {
        tc: true,
        warps: 16,
        depth: 4,
    },
];

/// A GEMV tuning variant: warps per CTA and loads (gemv) or chunks (gemv_tc) in flight.
#[derive(Clone, Copy)]
pub(super) struct GemvVariant {
    pub(super) tc: bool,
    pub(super) warps: usize,
    pub(super) depth: usize,
}

impl GemvVariant {
    pub(super) const DEFAULT_GEMV: GemvVariant = GemvVariant {
        tc: false,
        warps: 8,
        depth: 8,
    };
    pub(super) const DEFAULT_TC: GemvVariant = GemvVariant {
        tc: true,
        warps: 8,
        depth: 8,
    };
    pub(super) fn is_default(&self) -> bool {
        let d = if self.tc {
            Self::DEFAULT_TC
        } else {
            Self::DEFAULT_GEMV
        };
        self.warps == d.warps && self.depth == d.depth
    }
    pub(super) fn tag(&self) -> String {
        format!("w{}d{}", self.warps, self.depth)
    }
    pub(super) fn defines(&self) -> Vec<String> {
        if self.tc {
            vec![
                format!("GEMV_TC_WARPS={}", self.warps),
                format!("GEMV_TC_UNROLL={}", self.depth),
            ]
        } else {
            vec![
                format!("GEMV_WARPS={}", self.warps),
                format!("GEMV_LOADS={}", self.depth),
            ]
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn bench_gemv(
    g: &Gpu,
    rep: &mut Report,
    v: GemvVariant,
    label: &str,
    k: usize,
    n: usize,
    m: usize,
    mmax: usize,
    epi: GemvEpilogue,
    norm: bool,
    out_t: OutType,
) -> Res<()> {
    let rows = epi.weight_rows(n);
    let bytes = rows * k * 2;
    let gamma = g.random_bf(k, 9, 1.0)?;
    let copies = (600_000_000usize).div_ceil(bytes).clamp(1, 24);
    let ws: Vec<CudaSlice<bf16>> = (0..copies)
        .map(|i| g.random_bf(rows * k, 1000 + i as u64, 0.05))
        .collect::<Res<_>>()?;
    let x = g.random_bf(m * k, 7, 1.0)?;
    let res = g.random_bf(m * n, 8, 1.0)?;
    let out = g.stream.alloc_zeros::<f32>(m * n)?; // big enough for either output type
    let inst = if v.tc {
        KernelInstance::gemv_tc(k, mmax, epi, out_t)
    } else {
        KernelInstance::gemv(k, mmax, epi, norm, out_t)
    };
    let dims = inst.launch_dims(&RuntimeSizes {
        n,
        ..Default::default()
    });
    let (name, dims) = if v.is_default() {
        (inst.name_expr.clone(), dims)
    } else {
        // A variant changes the warps per CTA: gemv_tc's rows per CTA stay, gemv's scale.
        let grid = if v.tc {
            dims.grid
        } else {
            let per_cta = v.warps / inst.gemv_k_split() * inst.gemv_cols_per_warp();
            (n.div_ceil(per_cta) as u32, 1, 1)
        };
        let dims = LaunchDims {
            grid,
            block: (v.warps as u32 * 32, 1, 1),
            shared_bytes: 0,
        };
        (format!("{}@{}", inst.name_expr, v.tag()), dims)
    };
    let us = g.time_us(5, 20, |i| {
        let ptrs = [
            g.ptr(&x),
            g.ptr(&ws[i % copies]),
            g.ptr(&res),
            g.ptr(&out),
            g.ptr(&gamma),
        ];
        launch_gemv(g, &inst, &name, dims, ptrs, m, n, 1e-5)
    })?;
    let gbs = bytes as f64 / us / 1e3;
    rep.time(
        format!(
            "gemv {label} {rows}x{k} M={m} {} {}",
            inst.name_expr,
            v.tag()
        ),
        format!("{us:.1} µs, {gbs:.0} GB/s"),
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn bench_decode(
    g: &Gpu,
    rep: &mut Report,
    heads: usize,
    kv: usize,
    hd: usize,
    b_n: usize,
    l: usize,
    splits: usize,
) -> Res<()> {
    let width = (heads + 2 * kv) * hd;
    let kvrow = kv * hd;
    let max_blocks = l.div_ceil(BLOCK);
    let num_blocks = b_n * max_blocks;
    let tables: Vec<i32> = (0..num_blocks as i32).collect();
    let (dt, dl) = (g.up(&tables)?, g.up(&vec![l as i32; b_n])?);
    // Each sequence's new token goes to its last slot (sequence b's blocks are b·max_blocks..).
    let slots: Vec<i32> = (0..b_n)
        .map(|b| (b * max_blocks * BLOCK + l - 1) as i32)
        .collect();
    let ds = g.up(&slots)?;
    let df = g.up(&inv_freq(hd, 10000.0))?;
    let kc = g.random_bf(num_blocks * BLOCK * kvrow, 11, 1.0)?;
    let vc = g.random_bf(num_blocks * BLOCK * kvrow, 12, 1.0)?;
    let q = g.random_bf(b_n * width, 13, 1.0)?;
    let out = g.stream.alloc_zeros::<bf16>(b_n * heads * hd)?;
    let po = g.stream.alloc_zeros::<f32>(b_n * heads * splits * hd)?;
    let pml = g.stream.alloc_zeros::<f32>(b_n * heads * splits * 2)?;
    let inst = KernelInstance::attention_decode(heads, kv, hd, BLOCK);
    let merge = KernelInstance::attention_decode_merge(heads, hd);
    let rt = RuntimeSizes {
        batch: b_n,
        tokens: b_n,
        max_splits: splits,
        ..Default::default()
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let ptrs = DecodePtrs {
        qkv: g.ptr(&q),
        k_cache: g.ptr(&kc),
        v_cache: g.ptr(&vc),
        tables: g.ptr(&dt),
        max_blocks,
        lens: g.ptr(&dl),
        slots: g.ptr(&ds),
        inv_freq: g.ptr(&df),
        out: g.ptr(&out),
        partial_o: g.ptr(&po),
        partial_ml: g.ptr(&pml),
    };
    let us = g.time_us(3, 30, |_| {
        launch_decode(g, (&inst, &merge), rt, &ptrs, scale, 0)
    })?;
    let bytes = (b_n * l * kvrow * 2 * 2) as f64;
    rep.time(
        format!("attention_decode+merge {heads}/{kv}x{hd} B={b_n} L={l} splits={splits}"),
        format!("{us:.1} µs, {:.0} GB/s of KV", bytes / us / 1e3),
    );
    Ok(())
}

pub(super) fn bench_prefill(
    g: &Gpu,
    rep: &mut Report,
    inst: &KernelInstance,
    heads: usize,
    kv: usize,
    hd: usize,
    t: usize,
) -> Res<()> {
    let width = (heads + 2 * kv) * hd;
    let kvrow = kv * hd;
    let max_blocks = t.div_ceil(BLOCK);
    let tables: Vec<i32> = (0..max_blocks as i32).collect();
    let (dt, dl, ds) = (g.up(&tables)?, g.up(&[t as i32])?, g.up(&[0i32, t as i32])?);
    let kc = g.random_bf(max_blocks * BLOCK * kvrow, 21, 1.0)?;
    let vc = g.random_bf(max_blocks * BLOCK * kvrow, 22, 1.0)?;
    let q = g.random_bf(t * width, 23, 1.0)?;
    let out = g.stream.alloc_zeros::<bf16>(t * heads * hd)?;
    let scale = 1.0 / (hd as f32).sqrt();
    let us = g.time_us(2, 10, |_| {
        g.launch(
            inst,
            RuntimeSizes {
                tokens: t,
                batch: 1,
                ..Default::default()
            },
            &AttentionPrefillArgs {
                qkv: g.ptr(&q),
                k_cache: g.ptr(&kc),
                v_cache: g.ptr(&vc),
                block_tables: g.ptr(&dt),
                max_blocks: max_blocks as i32,
                seq_lens: g.ptr(&dl),
                query_start: g.ptr(&ds),
                out: g.ptr(&out),
                b: 1,
                scale,
                window: 0,
            },
        )
    })?;
    let flops = 4.0 * hd as f64 * heads as f64 * (t as f64) * (t as f64 + 1.0) / 2.0;
    rep.time(
        format!("{} T={t} causal", inst.name_expr),
        format!("{us:.0} µs, {:.0} TFLOP/s", flops / us / 1e6),
    );
    Ok(())
}

pub(super) fn bench_sample(g: &Gpu, rep: &mut Report, v: usize, b_n: usize) -> Res<()> {
    let host: Vec<f32> = {
        let mut r = Rng(99);
        (0..b_n * v).map(|_| r.normal() * 3.0).collect()
    };
    let logits = g.up(&host)?;
    let (dt, dk, dp) = (
        g.up(&vec![0.8f32; b_n])?,
        g.up(&vec![50i32; b_n])?,
        g.up(&vec![0.9f32; b_n])?,
    );
    let seeds: Vec<u64> = (0..b_n).flat_map(|i| [i as u64, 1]).collect();
    let ds = g.up(&seeds)?;
    let out = g.stream.alloc_zeros::<i32>(b_n)?;
    let rt = RuntimeSizes {
        batch: b_n,
        ..Default::default()
    };
    let us = g.time_us(3, 20, |_| {
        g.launch(
            &KernelInstance::sample(),
            rt,
            &SampleArgs {
                logits: g.ptr(&logits),
                v: v as i32,
                temperature: g.ptr(&dt),
                top_k: g.ptr(&dk),
                top_p: g.ptr(&dp),
                seed_and_step: g.ptr(&ds),
                out: g.ptr(&out),
            },
        )
    })?;
    rep.time(
        format!("sample V={v} B={b_n} (T=0.8, top_k=50, top_p=0.9)"),
        format!("{us:.1} µs"),
    );
    let us = g.time_us(3, 20, |_| {
        g.launch(
            &KernelInstance::argmax(),
            rt,
            &ArgmaxArgs {
                logits: g.ptr(&logits),
                v: v as i32,
                out: g.ptr(&out),
            },
        )
    })?;
    rep.time(format!("argmax V={v} B={b_n}"), format!("{us:.1} µs"));
    Ok(())
}
