//! The attention steps: `rope_append`, decode attention (with its split-KV merge) and the
//! prefill kernels over the paged KV cache, against f64 references.

use super::*;

pub(super) fn check_rope(
    g: &Gpu,
    r: &mut Rng,
    rep: &mut Report,
    heads: usize,
    kv: usize,
    hd: usize,
    t: usize,
) -> Res<()> {
    let freqs = inv_freq(hd, 500000.0);
    let width = (heads + 2 * kv) * hd;
    let num_blocks = 8.max(t.div_ceil(BLOCK) + 1);
    let kvrow = kv * hd;
    let qkv = r.bf_vec(t * width, 2.0);
    let positions: Vec<i32> = (0..t)
        .map(|i| if i == 0 { 0 } else { r.below(8192) as i32 })
        .collect();
    let mut slots_all: Vec<i32> = (0..(num_blocks * BLOCK) as i32).collect();
    r.shuffle(&mut slots_all);
    let mut slots: Vec<i32> = slots_all[..t].to_vec();
    slots[2] = -1; // a padding token: no cache write
    let kc = r.bf_vec(num_blocks * BLOCK * kvrow, 1.0);
    let vc = r.bf_vec(num_blocks * BLOCK * kvrow, 1.0);

    let mut q_ref: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();
    let mut k_ref: Vec<f64> = kc.iter().map(|&v| v as f64).collect();
    let mut v_ref: Vec<f64> = vc.iter().map(|&v| v as f64).collect();
    let half = hd / 2;
    for ti in 0..t {
        for h in 0..heads + kv {
            let base = ti * width + h * hd;
            for i in 0..half {
                let angle = (positions[ti] as f32 * freqs[i]) as f64;
                let (s, c) = angle.sin_cos();
                let (a, b) = (qkv[base + i] as f64, qkv[base + half + i] as f64);
                q_ref[base + i] = a * c - b * s;
                q_ref[base + half + i] = b * c + a * s;
            }
            if h >= heads && slots[ti] >= 0 {
                let dst = slots[ti] as usize * kvrow + (h - heads) * hd;
                k_ref[dst..dst + hd].copy_from_slice(&q_ref[base..base + hd]);
            }
        }
        if slots[ti] >= 0 {
            for e in 0..kvrow {
                v_ref[slots[ti] as usize * kvrow + e] =
                    qkv[ti * width + (heads + kv) * hd + e] as f64;
            }
        }
    }
    let (dq, dp, ds, dk, dv, df) = (
        g.up_bf(&qkv)?,
        g.up(&positions)?,
        g.up(&slots)?,
        g.up_bf(&kc)?,
        g.up_bf(&vc)?,
        g.up(&freqs)?,
    );
    let inst = KernelInstance::rope_append(heads, kv, hd, BLOCK);
    g.launch(
        &inst,
        RuntimeSizes {
            tokens: t,
            ..Default::default()
        },
        &RopeAppendArgs {
            qkv: g.ptr(&dq),
            positions: g.ptr(&dp),
            slot_mapping: g.ptr(&ds),
            k_cache: g.ptr(&dk),
            v_cache: g.ptr(&dv),
            t: t as i32,
            inv_freq: g.ptr(&df),
        },
    )?;
    g.sync()?;
    let e = rel_l2(&g.down_bf(&dq)?, &q_ref)
        .max(rel_l2(&g.down_bf(&dk)?, &k_ref))
        .max(rel_l2(&g.down_bf(&dv)?, &v_ref));
    rep.check(format!("{} T={t}", inst.name_expr), e, TOL);
    Ok(())
}

/// A paged KV cache holding `lens[b]` tokens per sequence in shuffled physical blocks.
#[derive(Clone)]
pub(super) struct Paged {
    k: Vec<f32>,
    v: Vec<f32>,
    tables: Vec<i32>,
    max_blocks: usize,
}

impl Paged {
    fn new(r: &mut Rng, lens: &[usize], kvrow: usize) -> Self {
        let max_blocks = lens
            .iter()
            .map(|l| l.div_ceil(BLOCK))
            .max()
            .unwrap_or(1)
            .max(1);
        let num_blocks = lens.len() * max_blocks + 3;
        let mut phys: Vec<i32> = (0..num_blocks as i32).collect();
        r.shuffle(&mut phys);
        let mut tables = vec![0i32; lens.len() * max_blocks];
        let mut next = 0;
        for (b, &l) in lens.iter().enumerate() {
            for i in 0..l.div_ceil(BLOCK) {
                tables[b * max_blocks + i] = phys[next];
                next += 1;
            }
        }
        let k = r.bf_vec(num_blocks * BLOCK * kvrow, 1.0);
        let v = r.bf_vec(num_blocks * BLOCK * kvrow, 1.0);
        Self {
            k,
            v,
            tables,
            max_blocks,
        }
    }
    fn slot(&self, b: usize, pos: usize) -> usize {
        self.tables[b * self.max_blocks + pos / BLOCK] as usize * BLOCK + pos % BLOCK
    }
}

/// softmax(scale q·k_j) v_j over j < n_keys of sequence b, kv head kvh.
#[allow(clippy::too_many_arguments)]
pub(super) fn attn_ref(
    q: &[f32],
    p: &Paged,
    b: usize,
    (first, n_keys): (usize, usize),
    kvh: usize,
    hd: usize,
    kvrow: usize,
    scale: f64,
) -> Vec<f64> {
    let mut s: Vec<f64> = (first..n_keys)
        .map(|j| {
            let base = p.slot(b, j) * kvrow + kvh * hd;
            (0..hd)
                .map(|d| q[d] as f64 * p.k[base + d] as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in s.iter_mut() {
        *v = (*v - mx).exp();
        sum += *v;
    }
    let mut o = vec![0f64; hd];
    for (j, &w) in (first..n_keys).zip(&s) {
        let base = p.slot(b, j) * kvrow + kvh * hd;
        for (od, &v) in o.iter_mut().zip(&p.v[base..base + hd]) {
            *od += w / sum * v as f64;
        }
    }
    o
}

/// The keys `first..n` a query at position `n - 1` sees: all, or the last `window` (> 0).
pub(super) fn key_range(n: usize, window: usize) -> (usize, usize) {
    (
        if window > 0 {
            n.saturating_sub(window)
        } else {
            0
        },
        n,
    )
}

/// Device pointers of one decode-attention launch (`attention_decode`'s arguments).
pub(super) struct DecodePtrs {
    pub(super) qkv: u64,
    pub(super) k_cache: u64,
    pub(super) v_cache: u64,
    pub(super) tables: u64,
    pub(super) max_blocks: usize,
    pub(super) lens: u64,
    pub(super) slots: u64,
    pub(super) inv_freq: u64,
    pub(super) out: u64,
    pub(super) partial_o: u64,
    pub(super) partial_ml: u64,
}

/// `attention_decode` over `rt.batch` sequences, then its merge where `rt.max_splits` > 1: the
/// launch pair the runtime makes for a decode step.
pub(super) fn launch_decode(
    g: &Gpu,
    (inst, merge): (&KernelInstance, &KernelInstance),
    rt: RuntimeSizes,
    p: &DecodePtrs,
    scale: f32,
    window: usize,
) -> Res<()> {
    let (b, splits, w) = (rt.batch as i32, rt.max_splits as i32, window as i32);
    g.launch(
        inst,
        rt,
        &AttentionDecodeArgs {
            qkv: p.qkv,
            k_cache: p.k_cache,
            v_cache: p.v_cache,
            block_tables: p.tables,
            max_blocks: p.max_blocks as i32,
            seq_lens: p.lens,
            slot_mapping: p.slots,
            inv_freq: p.inv_freq,
            out: p.out,
            b,
            scale,
            partial_o: p.partial_o,
            partial_ml: p.partial_ml,
            max_splits: splits,
            window: w,
        },
    )?;
    if splits > 1 {
        g.launch(
            merge,
            rt,
            &DecodeMergeArgs {
                partial_o: p.partial_o,
                partial_ml: p.partial_ml,
                seq_lens: p.lens,
                out: p.out,
                b,
                max_splits: splits,
                window: w,
            },
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn check_decode(
    g: &Gpu,
    r: &mut Rng,
    rep: &mut Report,
    heads: usize,
    kv: usize,
    hd: usize,
    lens: &[usize],
    window: usize,
) -> Res<()> {
    let b_n = lens.len();
    let width = (heads + 2 * kv) * hd;
    let kvrow = kv * hd;
    let scale = 1.0 / (hd as f64).sqrt();
    let freqs = inv_freq(hd, 10000.0);
    let p = Paged::new(r, lens, kvrow);
    // Row b of qkv is sequence b's new token at position L - 1, not yet rotated: the kernel
    // rotates q and k and appends k and v to the cache (over the random values there).
    let qkv = r.bf_vec(b_n * width, 1.0);
    let mut want = p.clone();
    let slots: Vec<i32> = lens
        .iter()
        .enumerate()
        .map(|(b, &l)| if l == 0 { -1 } else { p.slot(b, l - 1) as i32 })
        .collect();
    let mut reference = vec![0f64; b_n * heads * hd];
    for (b, &l) in lens.iter().enumerate() {
        if l == 0 {
            continue;
        }
        let row = &qkv[b * width..(b + 1) * width];
        let dst = slots[b] as usize * kvrow;
        for h in 0..kv {
            let k = rope_ref(&row[(heads + h) * hd..(heads + h + 1) * hd], l - 1, &freqs);
            want.k[dst + h * hd..dst + (h + 1) * hd].copy_from_slice(&k);
        }
        want.v[dst..dst + kvrow].copy_from_slice(&row[(heads + kv) * hd..(heads + 2 * kv) * hd]);
        for h in 0..heads {
            let q = rope_ref(&row[h * hd..(h + 1) * hd], l - 1, &freqs);
            let keys = key_range(l, window);
            let o = attn_ref(&q, &want, b, keys, h / (heads / kv), hd, kvrow, scale);
            reference[(b * heads + h) * hd..(b * heads + h + 1) * hd].copy_from_slice(&o);
        }
    }
    let df = g.up(&freqs)?;
    let (dq, dk, dv, dt, dl, ds) = (
        g.up_bf(&qkv)?,
        g.up_bf(&p.k)?,
        g.up_bf(&p.v)?,
        g.up(&p.tables)?,
        g.up(&lens.iter().map(|&l| l as i32).collect::<Vec<_>>())?,
        g.up(&slots)?,
    );
    let inst = KernelInstance::attention_decode(heads, kv, hd, BLOCK);
    let merge = KernelInstance::attention_decode_merge(heads, hd);
    for splits in [1usize, 7, 40] {
        let dout = g.poison_bf(b_n * heads * hd)?;
        let po = g.poison_f32(b_n * heads * splits * hd)?;
        let pml = g.poison_f32(b_n * heads * splits * 2)?;
        let rt = RuntimeSizes {
            batch: b_n,
            tokens: b_n,
            max_splits: splits,
            ..Default::default()
        };
        let ptrs = DecodePtrs {
            qkv: g.ptr(&dq),
            k_cache: g.ptr(&dk),
            v_cache: g.ptr(&dv),
            tables: g.ptr(&dt),
            max_blocks: p.max_blocks,
            lens: g.ptr(&dl),
            slots: g.ptr(&ds),
            inv_freq: g.ptr(&df),
            out: g.ptr(&dout),
            partial_o: g.ptr(&po),
            partial_ml: g.ptr(&pml),
        };
        launch_decode(g, (&inst, &merge), rt, &ptrs, scale as f32, window)?;
        g.sync()?;
        rep.check(
            format!(
                "{} lens={lens:?} splits={splits} window={window}",
                inst.name_expr
            ),
            rel_l2(&g.down_bf(&dout)?, &reference),
            TOL,
        );
    }
    // The appended k (rotated) and v, and the rest of the cache untouched.
    let kref: Vec<f64> = want.k.iter().map(|&v| v as f64).collect();
    let vref: Vec<f64> = want.v.iter().map(|&v| v as f64).collect();
    let e = rel_l2(&g.down_bf(&dk)?, &kref).max(rel_l2(&g.down_bf(&dv)?, &vref));
    rep.check(
        format!("{} cache append lens={lens:?}", inst.name_expr),
        e,
        TOL,
    );
    Ok(())
}

/// A Llama-3.1-style scaled RoPE table: `1 / theta^(2i/d)`, the lower-frequency half divided
/// by 8 (the kernels read any table; a scaled one checks that none recomputes it from theta).
pub(super) fn inv_freq(hd: usize, theta: f32) -> Vec<f32> {
    (0..hd / 2)
        .map(|i| {
            let f = 1.0f32 / theta.powf((2 * i) as f32 / hd as f32);
            if 4 * i >= hd {
                f / 8.0
            } else {
                f
            }
        })
        .collect()
}

/// RoPE of one head vector at `pos` as rope.cu computes it (f32 angles, bf16 result).
pub(super) fn rope_ref(x: &[f32], pos: usize, freqs: &[f32]) -> Vec<f32> {
    let half = x.len() / 2;
    let mut out = x.to_vec();
    for i in 0..half {
        let (s, c) = ((pos as f32 * freqs[i]) as f64).sin_cos();
        let (a, b) = (x[i] as f64, x[half + i] as f64);
        out[i] = bfr((a * c - b * s) as f32);
        out[half + i] = bfr((b * c + a * s) as f32);
    }
    out
}

#[allow(clippy::too_many_arguments)]
pub(super) fn check_prefill(
    g: &Gpu,
    r: &mut Rng,
    rep: &mut Report,
    heads: usize,
    kv: usize,
    hd: usize,
    seqs: &[(usize, usize)],
    window: usize,
) -> Res<()> {
    // seqs: (q_len, past)
    let lens: Vec<usize> = seqs.iter().map(|&(q, past)| q + past).collect();
    let t: usize = seqs.iter().map(|s| s.0).sum();
    let mut qstart = vec![0i32];
    for s in seqs {
        qstart.push(qstart.last().unwrap() + s.0 as i32);
    }
    let width = (heads + 2 * kv) * hd;
    let kvrow = kv * hd;
    let scale = 1.0 / (hd as f64).sqrt();
    let p = Paged::new(r, &lens, kvrow);
    let qkv = r.bf_vec(t * width, 1.0);
    let mut reference = vec![0f64; t * heads * hd];
    let rows: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(b, &(q, past))| (0..q).map(move |i| (b, i, past)))
        .collect();
    let per_row: Vec<Vec<f64>> = rows
        .par_iter()
        .enumerate()
        .map(|(tok, &(b, i, past))| {
            let mut o = Vec::with_capacity(heads * hd);
            for h in 0..heads {
                let q = &qkv[tok * width + h * hd..tok * width + (h + 1) * hd];
                o.extend(attn_ref(
                    q,
                    &p,
                    b,
                    key_range(past + i + 1, window),
                    h / (heads / kv),
                    hd,
                    kvrow,
                    scale,
                ));
            }
            o
        })
        .collect();
    for (tok, o) in per_row.iter().enumerate() {
        reference[tok * heads * hd..(tok + 1) * heads * hd].copy_from_slice(o);
    }
    let (dq, dk, dv, dt, dl, ds) = (
        g.up_bf(&qkv)?,
        g.up_bf(&p.k)?,
        g.up_bf(&p.v)?,
        g.up(&p.tables)?,
        g.up(&lens.iter().map(|&l| l as i32).collect::<Vec<_>>())?,
        g.up(&qstart)?,
    );
    let b_n = seqs.len();
    for inst in [
        KernelInstance::attention_prefill_for(heads, kv, hd, BLOCK, "sm_90"),
        KernelInstance::attention_prefill_for(heads, kv, hd, BLOCK, "sm_80"),
        KernelInstance::attention_prefill_simple(heads, kv, hd, BLOCK),
    ] {
        if !g.funcs.contains_key(&inst.name_expr) {
            continue; // the wgmma kernels exist only on sm_90
        }
        let dout = g.poison_bf(t * heads * hd)?;
        g.launch(
            &inst,
            RuntimeSizes {
                tokens: t,
                batch: b_n,
                longest_query: seqs.iter().map(|s| s.0).max().unwrap_or(0),
                ..Default::default()
            },
            &AttentionPrefillArgs {
                qkv: g.ptr(&dq),
                k_cache: g.ptr(&dk),
                v_cache: g.ptr(&dv),
                block_tables: g.ptr(&dt),
                max_blocks: p.max_blocks as i32,
                seq_lens: g.ptr(&dl),
                query_start: g.ptr(&ds),
                out: g.ptr(&dout),
                b: b_n as i32,
                scale: scale as f32,
                window: window as i32,
            },
        )?;
        g.sync()?;
        rep.check(
            format!("{} seqs(q,past)={seqs:?} window={window}", inst.name_expr),
            rel_l2(&g.down_bf(&dout)?, &reference),
            TOL,
        );
    }
    Ok(())
}
