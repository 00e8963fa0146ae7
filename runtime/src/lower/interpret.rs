//! The launch plan run on the CPU: each launch computed as its kernels compute it (f32
//! arithmetic, a bf16 rounding where a kernel stores bf16), over an arena laid out by the plan's
//! slots, with a paged-free KV cache per layer. It is the oracle of the lowering: a plan that
//! computes something else than its graph — a wrong merge, a buffer read after a slot reused it,
//! a launch attribute lost — gives other logits than the CPU executor on the same weights, on any
//! machine (the GPU's own check is `kiln diff`).
//!
//! One sequence per step (`B = 1`); a decode step is a step of one token. In a decode step the GPU
//! skips `RopeAppend` and the attention kernel rotates and appends the token itself, which is the
//! same computation: here `RopeAppend` always runs.

use crate::ir::DType;
use crate::ops::gelu::gelu_tanh;
use crate::ops::linear::silu;
use crate::plan::{BufType, Epilogue, Launch, Plan, Rows};

/// A weight's values by name, dequantized to f32, with its shape.
pub type WeightReader<'a> = dyn Fn(&str) -> Result<(Vec<f32>, Vec<usize>), String> + 'a;

/// One layer's KV cache: keys and values, one `[kv_heads · head_dim]` row per position.
#[derive(Clone, Default)]
struct LayerCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// The state of a plan run on the CPU: arena slots, KV caches and the position.
pub struct PlanInterpreter<'p> {
    plan: &'p Plan,
    weights: std::collections::HashMap<String, (Vec<f32>, Vec<usize>)>,
    slots: Vec<Vec<f32>>,
    caches: Vec<LayerCache>,
    past: usize,
}

/// `x` rounded to bf16, as a kernel stores it.
fn bf(x: f32) -> f32 {
    crate::cpu::elementwise::round_to(DType::BF16, x)
}

/// `bf16(w · bf16(x · r))` of one row, `r = 1/√(mean(x²) + eps)` (rmsnorm.cu's rounding).
fn rms_row(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms as f32 + eps).sqrt();
    x.iter().zip(w).map(|(&v, &g)| bf(g * bf(v * r))).collect()
}

impl<'p> PlanInterpreter<'p> {
    /// The interpreter of `plan`, reading every weight its launches name through `weight`.
    pub fn new(plan: &'p Plan, weight: &WeightReader) -> Result<Self, String> {
        let mut names: Vec<&str> = Vec::new();
        for l in &plan.launches {
            match l {
                Launch::Embedding { table, .. } => names.push(table),
                Launch::RmsNorm { w, .. } => names.push(w),
                Launch::Linear {
                    w, norm, epilogue, ..
                } => {
                    names.push(w);
                    names.extend(norm.as_ref().map(|n| n.w.as_str()));
                    if let Epilogue::Bias(b) = epilogue {
                        names.push(b);
                    }
                }
                Launch::RopeAppend { inv_freq, .. } | Launch::Attention { inv_freq, .. } => {
                    names.push(inv_freq)
                }
                Launch::GatherLast { .. } => {}
            }
        }
        let mut weights = std::collections::HashMap::new();
        for n in names {
            if !weights.contains_key(n) {
                weights.insert(n.to_string(), weight(n)?);
            }
        }
        let slots = vec![Vec::new(); plan.slot_row_bytes().len()];
        let caches = vec![LayerCache::default(); plan.layers];
        Ok(PlanInterpreter {
            plan,
            weights,
            slots,
            caches,
            past: 0,
        })
    }

    fn w(&self, name: &str) -> &[f32] {
        &self.weights[name].0
    }

    fn rows(&self, b: usize, t: usize) -> usize {
        match self.plan.buffers[b].rows {
            Rows::Tokens => t,
            Rows::Sequences => 1,
        }
    }

    /// Buffer `b`'s values (`rows × cols`, row-major) in its slot.
    fn read(&self, b: usize, t: usize) -> Vec<f32> {
        let n = self.rows(b, t) * self.plan.buffers[b].cols;
        self.slots[self.plan.buffers[b].slot][..n].to_vec()
    }

    /// Stores `v` as buffer `b` (rounded to bf16 for a bf16 buffer) over its slot.
    fn write(&mut self, b: usize, mut v: Vec<f32>) {
        if self.plan.buffers[b].dtype == BufType::Bf16 {
            v.iter_mut().for_each(|x| *x = bf(*x));
        }
        let slot = &mut self.slots[self.plan.buffers[b].slot];
        if slot.len() < v.len() {
            slot.resize(v.len(), f32::NAN);
        }
        slot[..v.len()].copy_from_slice(&v);
    }

    /// Runs one step over `tokens` (positions `past..past + len`) and returns the logits of the
    /// last token.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let t = tokens.len();
        for l in &self.plan.launches {
            self.launch(l, tokens, t)?;
        }
        self.past += t;
        Ok(self.read(self.plan.logits, t))
    }

    fn launch(&mut self, l: &Launch, tokens: &[u32], t: usize) -> Result<(), String> {
        let a = self.plan.attention;
        let (hd, kvd) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
        match l {
            Launch::Embedding { table, scale, out } => {
                let cols = self.plan.buffers[*out].cols;
                let tab = self.w(table);
                let mut v = Vec::with_capacity(t * cols);
                for &tok in tokens {
                    let row = tok as usize * cols;
                    let src = tab.get(row..row + cols).ok_or("token id past the table")?;
                    v.extend(src.iter().map(|&x| x * scale));
                }
                self.write(*out, v);
            }
            Launch::GatherLast { x, out } => {
                let cols = self.plan.buffers[*x].cols;
                let v = self.read(*x, t)[(t - 1) * cols..t * cols].to_vec();
                self.write(*out, v);
            }
            Launch::RmsNorm { x, w, eps, out } => {
                let cols = self.plan.buffers[*x].cols;
                let (xv, wv) = (self.read(*x, t), self.w(w).to_vec());
                let v = xv
                    .chunks(cols)
                    .flat_map(|r| rms_row(r, &wv, *eps))
                    .collect();
                self.write(*out, v);
            }
            Launch::Linear {
                x,
                norm,
                w,
                format,
                epilogue,
                out,
            } => {
                let k = self.plan.buffers[*x].cols;
                let rows = self.rows(*x, t);
                let mut xin = self.read(*x, t);
                if let Some(n) = norm {
                    let g = self.w(&n.w).to_vec();
                    xin = xin.chunks(k).flat_map(|r| rms_row(r, &g, n.eps)).collect();
                }
                if *format == DType::Fp8 {
                    crate::quant::fp8_rows(&mut xin, k);
                }
                let wv = self.w(w);
                let n_rows = wv.len() / k;
                let mut y = vec![0f32; rows * n_rows];
                for r in 0..rows {
                    let xr = &xin[r * k..(r + 1) * k];
                    for (n, wr) in wv.chunks(k).enumerate() {
                        y[r * n_rows + n] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    }
                }
                let v = match epilogue {
                    Epilogue::None => y,
                    Epilogue::Residual(r) => {
                        let rv = self.read(*r, t);
                        y.iter().zip(&rv).map(|(a, b)| a + b).collect()
                    }
                    Epilogue::Bias(b) => {
                        let bv = self.w(b);
                        y.iter()
                            .enumerate()
                            .map(|(i, v)| v + bv[i % n_rows])
                            .collect()
                    }
                    Epilogue::Gated | Epilogue::GatedGelu => {
                        let act = if *epilogue == Epilogue::Gated {
                            silu
                        } else {
                            gelu_tanh
                        };
                        let f = n_rows / 2;
                        y.chunks(n_rows)
                            .flat_map(|r| (0..f).map(move |j| act(r[j]) * r[f + j]))
                            .collect()
                    }
                };
                self.write(*out, v);
            }
            Launch::RopeAppend {
                qkv,
                layer,
                inv_freq,
            } => {
                let cols = self.plan.buffers[*qkv].cols;
                let freq = self.w(inv_freq).to_vec();
                let d = a.head_dim;
                let mut v = self.read(*qkv, t);
                for (i, row) in v.chunks_mut(cols).enumerate() {
                    let pos = (self.past + i) as f32;
                    for head in row[..hd + kvd].chunks_mut(d) {
                        let half = d / 2;
                        for j in 0..half {
                            let (s, c) = (pos * freq[j]).sin_cos();
                            let (x1, x2) = (head[j], head[half + j]);
                            head[j] = bf(x1 * c - x2 * s);
                            head[half + j] = bf(x2 * c + x1 * s);
                        }
                    }
                    let cache = &mut self.caches[*layer];
                    cache.keys.push(row[hd..hd + kvd].to_vec());
                    cache.values.push(row[hd + kvd..hd + 2 * kvd].to_vec());
                }
                self.write(*qkv, v);
            }
            Launch::Attention {
                qkv,
                layer,
                scale,
                window,
                out,
                ..
            } => {
                let cols = self.plan.buffers[*qkv].cols;
                let d = a.head_dim;
                let group = a.heads / a.kv_heads;
                let q = self.read(*qkv, t);
                let LayerCache { keys, values } = &self.caches[*layer];
                let mut o = vec![0f32; t * hd];
                for i in 0..t {
                    let p = self.past + i;
                    let first = match *window as usize {
                        0 => 0,
                        w => (p + 1).saturating_sub(w),
                    };
                    for h in 0..a.heads {
                        let qh = &q[i * cols + h * d..i * cols + (h + 1) * d];
                        let kh = (h / group) * d;
                        let s: Vec<f32> = (first..=p)
                            .map(|j| {
                                let kr = &keys[j][kh..kh + d];
                                qh.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
                            })
                            .collect();
                        let mx = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let e: Vec<f32> = s.iter().map(|v| (v - mx).exp()).collect();
                        let sum: f32 = e.iter().sum();
                        for (j, w) in (first..=p).zip(&e) {
                            let vr = &values[j][kh..kh + d];
                            for (od, vv) in
                                o[i * hd + h * d..i * hd + (h + 1) * d].iter_mut().zip(vr)
                            {
                                *od += w / sum * vv;
                            }
                        }
                    }
                }
                self.write(*out, o);
            }
        }
        Ok(())
    }
}
