//! GPU check and benchmark of the kernel templates (`kernels_templates/`).
//!
//! Compiles every kernel instance of the SmolLM2-135M, Llama-2-7B and Llama-3-8B configurations
//! with NVRTC to CUBIN, runs each family on fresh random inputs against a CPU f64 reference
//! computed from the same bf16 inputs (relative L2 error; outputs are poisoned with NaN before
//! every launch, so an unwritten element fails), then times the decode GEMVs (weight GB/s, with
//! rotating weight copies so L2 does not serve them), decode and prefill attention, and sampling.
//!
//! Needs an NVIDIA GPU (arch `sm_90` unless `KILN_ARCH` says otherwise) and the CUDA headers
//! (found as `codegen::nvrtc` describes). Run it through `bench/kernels/run.sh`. Prints Markdown
//! tables; exits with status 1 if any check fails.

use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use half::bf16;
use kiln_compiler::codegen::kernels::{
    compile, decode_splits, llama_kernels, CompiledKernel, GemvEpilogue, Kernel, KernelFamily,
    KernelInstance, LaunchDims, LlamaDims, OutType, RuntimeSizes, TemplateFile,
};
use kiln_compiler::codegen::nvrtc;
use kiln_runtime::kernel_args::*;
use rayon::prelude::*;

/// A check's result: errors are the GPU's or NVRTC's, as text.
pub type Res<T> = Result<T, Box<dyn Error>>;

/// Tolerance on the relative L2 error of bf16-output kernels.
const TOL: f64 = 1e-2;

// The steps beside the ones here: attention kernels, benchmarks, weight formats.
mod attention;
mod bench;
mod quant;
use attention::*;
use bench::*;

const BLOCK: usize = 16;
const SMS: usize = 132;

// ---------------------------------------------------------------------------------------------
// Random numbers and bf16 helpers

/// splitmix64: the checks' random inputs.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock: every run draws fresh inputs.
    pub fn from_clock() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / 16_777_216.0
    }
    fn sym(&mut self, a: f32) -> f32 {
        (self.uniform() * 2.0 - 1.0) * a
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
    fn bf_vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| bfr(self.sym(a))).collect()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

fn bfr(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

fn to_bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn from_bf(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// ‖out − ref‖ / ‖ref‖; infinite when an output is not finite (unwritten NaN poison).
fn rel_l2(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() {
            return f64::INFINITY;
        }
        num += (o as f64 - r).powi(2);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// GPU plumbing

/// A CUDA context and stream with every checked kernel loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
}

const FILL_SRC: &str = r#"
#include <cuda_bf16.h>
extern "C" __global__ void fill_bf16(__nv_bfloat16* p, long long n, unsigned long long seed, float scale) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    unsigned long long x = (unsigned long long)i * 0x9E3779B97F4A7C15ull + seed;
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 29; x *= 0x94D049BB133111EBull; x ^= x >> 32;
    float u = (float)(x >> 40) * (1.0f / 16777216.0f) * 2.f - 1.f;
    p[i] = __float2bfloat16(u * scale);
  }
}
"#;

/// `compile`, with the CUBINs kept in `$KILN_KERNEL_CACHE` (when set) so the per-step
/// processes of `bench/kernels/run.sh` compile only once.
fn compile_cached(instances: &[KernelInstance], arch: &str) -> Res<Vec<CompiledKernel>> {
    let dir = std::env::var("KILN_KERNEL_CACHE")
        .ok()
        .map(std::path::PathBuf::from);
    if let Some(dir) = &dir {
        if let Ok(index) = std::fs::read_to_string(dir.join(format!("index-{arch}.tsv"))) {
            let mut images: HashMap<String, Arc<[u8]>> = HashMap::new();
            let mut by_expr = HashMap::new();
            for line in index.lines() {
                let f: Vec<&str> = line.split('\t').collect();
                if f.len() != 3 {
                    continue;
                }
                if !images.contains_key(f[2]) {
                    images.insert(
                        f[2].to_string(),
                        Arc::from(std::fs::read(dir.join(format!("{}-{arch}.cubin", f[2])))?),
                    );
                }
                let file = TemplateFile::ALL
                    .into_iter()
                    .find(|t| t.file_name() == f[2])
                    .ok_or("bad cache index")?;
                by_expr.insert(
                    f[0].to_string(),
                    CompiledKernel {
                        name_expr: f[0].into(),
                        lowered_name: f[1].into(),
                        file,
                        cubin: images[f[2]].clone(),
                    },
                );
            }
            if instances.iter().all(|k| by_expr.contains_key(&k.name_expr)) {
                return Ok(instances
                    .iter()
                    .map(|k| by_expr[&k.name_expr].clone())
                    .collect());
            }
        }
    }
    let t = std::time::Instant::now();
    let compiled = compile(instances, arch)?;
    println!(
        "NVRTC: {} kernel instances compiled for {arch} in {:.2?}",
        compiled.len(),
        t.elapsed()
    );
    if let Some(dir) = &dir {
        std::fs::create_dir_all(dir)?;
        let mut index = String::new();
        for c in &compiled {
            std::fs::write(
                dir.join(format!("{}-{arch}.cubin", c.file.file_name())),
                &c.cubin[..],
            )?;
            index.push_str(&format!(
                "{}\t{}\t{}\n",
                c.name_expr,
                c.lowered_name,
                c.file.file_name()
            ));
        }
        std::fs::write(dir.join(format!("index-{arch}.tsv")), index)?;
    }
    Ok(compiled)
}

impl Gpu {
    /// Compiles `instances` for `arch` (NVRTC, cached by `$KILN_KERNEL_CACHE`) and loads them
    /// on GPU 0.
    pub fn new(instances: &[KernelInstance], arch: &str) -> Res<Self> {
        let ctx = CudaContext::new(0)?;
        // SAFETY: raw pointers are used throughout; nothing relies on cudarc's event tracking.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let compiled = compile_cached(instances, arch)?;
        let mut modules: HashMap<*const u8, Arc<cudarc::driver::CudaModule>> = HashMap::new();
        let mut funcs = HashMap::new();
        for c in &compiled {
            let key = c.cubin.as_ptr();
            if let std::collections::hash_map::Entry::Vacant(e) = modules.entry(key) {
                e.insert(ctx.load_module(Ptx::from_binary(c.cubin.to_vec()))?);
            }
            let f = modules[&key].load_function(&c.lowered_name)?;
            if let Some(k) = instances.iter().find(|k| k.name_expr == c.name_expr) {
                kiln_runtime::cuda::allow_dynamic_smem(&f, k)?;
            }
            funcs.insert(c.name_expr.clone(), f);
        }
        let opts = nvrtc::CompileOptions::for_arch(arch)?;
        let fill = nvrtc::compile_cubin("fill.cu", FILL_SRC, &[], &[], &opts)?;
        let m = ctx.load_module(Ptx::from_binary(fill.image))?;
        funcs.insert("fill_bf16".to_string(), m.load_function("fill_bf16")?);
        Ok(Self { ctx, stream, funcs })
    }

    /// Makes the context current on the calling thread (the raw launches need it; the tests
    /// run steps on threads other than the one that created it).
    pub fn bind(&self) -> Res<()> {
        Ok(self.ctx.bind_to_thread()?)
    }

    fn up<T: DeviceRepr>(&self, v: &[T]) -> Res<CudaSlice<T>> {
        Ok(self.stream.clone_htod(v)?)
    }
    fn up_bf(&self, v: &[f32]) -> Res<CudaSlice<bf16>> {
        self.up(&to_bf(v))
    }
    fn down<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Res<Vec<T>> {
        Ok(self.stream.clone_dtoh(s)?)
    }
    fn down_bf(&self, s: &CudaSlice<bf16>) -> Res<Vec<f32>> {
        Ok(from_bf(&self.down(s)?))
    }
    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _g) = s.device_ptr(&self.stream);
        p
    }
    fn poison_bf(&self, n: usize) -> Res<CudaSlice<bf16>> {
        self.up(&vec![bf16::NAN; n])
    }
    fn poison_f32(&self, n: usize) -> Res<CudaSlice<f32>> {
        self.up(&vec![f32::NAN; n])
    }
    fn sync(&self) -> Res<()> {
        Ok(self.stream.synchronize()?)
    }

    fn function(&self, name: &str) -> Res<&CudaFunction> {
        Ok(self
            .funcs
            .get(name)
            .ok_or_else(|| format!("kernel {name} not compiled"))?)
    }

    /// Launches the compiled kernel `name` (an instance's name, or a benchmark variant's) with
    /// `dims` and the arguments of its signature.
    fn launch_named<A: KernelArgs>(&self, name: &str, dims: LaunchDims, args: &A) -> Res<()> {
        let f = self.function(name)?;
        let mut params = args.addresses();
        // SAFETY: `args` is the struct of the template's signature (checked against the
        // template source by `kernel_args`'s test), its pointers address live device buffers;
        // `params` points into `args`, alive for the call.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                dims.grid,
                dims.block,
                dims.shared_bytes,
                self.stream.cu_stream(),
                &mut params.ptrs[..params.len],
            )
        }
        .map_err(|e| format!("launch {name}: {e:?}"))?;
        Ok(())
    }

    /// Launches instance `k` with its shape for `rt` and `args`, the struct of its signature.
    fn launch<A: KernelArgs>(&self, k: &KernelInstance, rt: RuntimeSizes, args: &A) -> Res<()> {
        A::check(k)?;
        self.launch_named(&k.name_expr, k.launch_dims(&rt), args)
    }

    /// Random bf16 in [-scale, scale) on the device (for the large benchmark buffers).
    fn random_bf(&self, n: usize, seed: u64, scale: f32) -> Res<CudaSlice<bf16>> {
        let s = self.stream.alloc_zeros::<bf16>(n)?;
        let dims = LaunchDims {
            grid: (4096, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.function("fill_bf16")?);
        let (out, n) = (self.ptr(&s), n as i64);
        b.arg(&out).arg(&n).arg(&seed).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: dims.grid,
            block_dim: dims.block,
            shared_mem_bytes: 0,
        };
        // SAFETY: `fill_bf16(bf16* out, long long n, unsigned long long seed, float scale)`.
        unsafe { b.launch(cfg) }.map_err(|e| format!("launch fill_bf16: {e:?}"))?;
        Ok(s)
    }

    /// Time in µs of one `run(i)` when `iters` of them run back to back (as in a decode step):
    /// the median over 5 batches, after `warm` untimed calls.
    fn time_us(
        &self,
        warm: usize,
        iters: usize,
        mut run: impl FnMut(usize) -> Res<()>,
    ) -> Res<f64> {
        for i in 0..warm {
            run(i)?;
        }
        self.sync()?;
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::new();
        let mut i = warm;
        for _ in 0..5 {
            let a = self.ctx.new_event(flags)?;
            let b = self.ctx.new_event(flags)?;
            a.record(&self.stream)?;
            for _ in 0..iters {
                run(i)?;
                i += 1;
            }
            b.record(&self.stream)?;
            times.push(a.elapsed_ms(&b)? as f64 * 1000.0 / iters as f64);
        }
        Ok(median(times))
    }

    /// Compiles `file` again with extra `-D` options and registers its kernels as
    /// `<name_expr>@<tag>` (tuning variants of a template).
    fn add_variant(
        &mut self,
        file: TemplateFile,
        exprs: &[String],
        defines: &[&str],
        tag: &str,
        arch: &str,
    ) -> Res<()> {
        let mut opts = nvrtc::CompileOptions::for_arch(arch)?;
        opts.extra = defines.iter().map(|d| format!("-D{d}")).collect();
        let c = nvrtc::compile_cubin(
            file.file_name(),
            file.source(),
            &[("common.cuh", kiln_compiler::codegen::kernels::COMMON_HEADER)],
            exprs,
            &opts,
        )?;
        let m = self.ctx.load_module(Ptx::from_binary(c.image))?;
        for (e, lowered) in &c.lowered_names {
            self.funcs
                .insert(format!("{e}@{tag}"), m.load_function(lowered)?);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Results

/// The checks' results (name, error, tolerance, passed) and the benchmarks' timings, also
/// printed as they come.
#[derive(Default)]
pub struct Report {
    checks: Vec<(String, f64, f64, bool)>,
    timings: Vec<(String, String)>,
}

impl Report {
    /// The names of the failed checks with their errors and tolerances.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.3)
            .map(|(name, err, tol, _)| format!("{name}: {err:.3e} > {tol:.0e}"))
            .collect()
    }

    fn check(&mut self, name: impl Into<String>, err: f64, tol: f64) {
        let name = name.into();
        let ok = err <= tol;
        println!(
            "{} {name}: rel err {err:.3e} (tol {tol:.0e})",
            if ok { "PASS" } else { "FAIL" }
        );
        self.checks.push((name, err, tol, ok));
    }
    fn time(&mut self, name: impl Into<String>, value: String) {
        let name = name.into();
        println!("TIME {name}: {value}");
        self.timings.push((name, value));
    }
}

// ---------------------------------------------------------------------------------------------
// Checks

/// `embedding<h>` with `scale` (1: an exact copy; else one bf16 rounding of the product).
fn check_embedding(g: &Gpu, r: &mut Rng, rep: &mut Report, h: usize, scale: f32) -> Res<()> {
    let vocab = 1000;
    let t = 9;
    let table = r.bf_vec(vocab * h, 1.0);
    let mut ids: Vec<i32> = (0..t).map(|_| r.below(vocab) as i32).collect();
    ids[3] = -1;
    let (dt, di, dout) = (g.up_bf(&table)?, g.up(&ids)?, g.poison_bf(t * h)?);
    let k = KernelInstance::embedding(h);
    g.launch(
        &k,
        RuntimeSizes {
            tokens: t,
            ..Default::default()
        },
        &EmbeddingArgs {
            table: g.ptr(&dt),
            ids: g.ptr(&di),
            out: g.ptr(&dout),
            t: t as i32,
            scale,
        },
    )?;
    g.sync()?;
    let out = g.down_bf(&dout)?;
    let mut reference = vec![0f64; t * h];
    for (i, &id) in ids.iter().enumerate() {
        if id >= 0 {
            for j in 0..h {
                reference[i * h + j] = table[id as usize * h + j] as f64 * scale as f64;
            }
        }
    }
    rep.check(
        format!("embedding<{h}> T={t} scale={scale}"),
        rel_l2(&out, &reference),
        if scale == 1.0 { 0.0 } else { 4e-3 },
    );
    Ok(())
}

fn rms_ref(x: &[f32], w: &[f32], h: usize, eps: f32) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    for (row, o) in x.chunks(h).zip(out.chunks_mut(h)) {
        let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..h {
            o[j] = w[j] as f64 * bfr((row[j] as f64 * r) as f32) as f64;
        }
    }
    out
}

fn check_rmsnorm(g: &Gpu, r: &mut Rng, rep: &mut Report, h: usize) -> Res<()> {
    let t = 5;
    let eps = 1e-5f32;
    let x = r.bf_vec(t * h, 2.0);
    let res = r.bf_vec(t * h, 2.0);
    let w: Vec<f32> = (0..h).map(|_| bfr(1.0 + r.sym(0.5))).collect();
    let rt = RuntimeSizes {
        tokens: t,
        ..Default::default()
    };
    let (dx, dw, dout) = (g.up_bf(&x)?, g.up_bf(&w)?, g.poison_bf(t * h)?);
    g.launch(
        &KernelInstance::rmsnorm(h),
        rt,
        &RmsNormArgs {
            x: g.ptr(&dx),
            w: g.ptr(&dw),
            out: g.ptr(&dout),
            t: t as i32,
            eps,
        },
    )?;
    g.sync()?;
    rep.check(
        format!("rmsnorm<{h}> T={t}"),
        rel_l2(&g.down_bf(&dout)?, &rms_ref(&x, &w, h, eps)),
        TOL,
    );

    let dres = g.up_bf(&res)?;
    let dout = g.poison_bf(t * h)?;
    g.launch(
        &KernelInstance::add_rmsnorm(h),
        rt,
        &AddRmsNormArgs {
            residual: g.ptr(&dres),
            x: g.ptr(&dx),
            w: g.ptr(&dw),
            out: g.ptr(&dout),
            t: t as i32,
            eps,
        },
    )?;
    g.sync()?;
    let hsum: Vec<f32> = res.iter().zip(&x).map(|(a, b)| bfr(a + b)).collect();
    let href: Vec<f64> = hsum.iter().map(|&v| v as f64).collect();
    let e1 = rel_l2(&g.down_bf(&dres)?, &href);
    let e2 = rel_l2(&g.down_bf(&dout)?, &rms_ref(&hsum, &w, h, eps));
    rep.check(format!("add_rmsnorm<{h}> T={t}"), e1.max(e2), TOL);
    Ok(())
}

/// What a GEMV's product reads: `x`, or with a folded norm `rmsnorm(x)·gamma` rounded to bf16
/// as the kernel rounds it.
fn gemv_input(x: &[f32], gamma: &[f32], k: usize, eps: f32, norm: bool) -> Vec<f32> {
    if norm {
        rms_ref(x, gamma, k, eps)
            .iter()
            .map(|&v| bfr(v as f32))
            .collect()
    } else {
        x.to_vec()
    }
}

/// The f64 reference of a GEMV with epilogue `epi`: `m` rows of `k` inputs `xin` onto `n`
/// outputs by `w` (`2n` rows, gate then up, for the gated epilogues); `res` is the residual
/// `[m, n]`, or the bias in its first `n` values.
fn gemv_reference(
    xin: &[f32],
    w: &[f32],
    res: &[f32],
    (m, n, k): (usize, usize, usize),
    epi: GemvEpilogue,
) -> Vec<f64> {
    (0..m * n)
        .into_par_iter()
        .map(|i| {
            let (mi, ni) = (i / n, i % n);
            let dot = |row: usize| -> f64 {
                (0..k)
                    .map(|j| xin[mi * k + j] as f64 * w[row * k + j] as f64)
                    .sum()
            };
            match epi {
                GemvEpilogue::Plain => dot(ni),
                GemvEpilogue::Residual => dot(ni) + res[i] as f64,
                GemvEpilogue::Bias => dot(ni) + res[ni] as f64,
                GemvEpilogue::Gated => {
                    let (gt, up) = (dot(ni), dot(n + ni));
                    gt / (1.0 + (-gt).exp()) * up
                }
                GemvEpilogue::GatedGelu => {
                    let (gt, up) = (dot(ni), dot(n + ni));
                    let z = (8.0 / std::f64::consts::PI).sqrt() * (gt + 0.044715 * gt.powi(3));
                    gt / (1.0 + (-z).exp()) * up
                }
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn check_gemv(
    g: &Gpu,
    r: &mut Rng,
    rep: &mut Report,
    tc: bool,
    k: usize,
    n: usize,
    m: usize,
    mmax: usize,
    epi: GemvEpilogue,
    norm: bool,
    out_t: OutType,
) -> Res<()> {
    let rows = epi.weight_rows(n);
    let norm = norm && !tc && mmax == 1;
    let x = r.bf_vec(m * k, 1.0);
    let w = r.bf_vec(rows * k, 0.05);
    let res = r.bf_vec(m * n, 1.0);
    let eps = 1e-5f32;
    let gamma: Vec<f32> = (0..k).map(|_| bfr(1.0 + r.sym(0.5))).collect();
    let xin = gemv_input(&x, &gamma, k, eps, norm);
    let reference = gemv_reference(&xin, &w, &res, (m, n, k), epi);
    let (dx, dw, dr, dg) = (g.up_bf(&x)?, g.up_bf(&w)?, g.up_bf(&res)?, g.up_bf(&gamma)?);
    let inst = if tc {
        KernelInstance::gemv_tc(k, mmax, epi, out_t)
    } else {
        KernelInstance::gemv(k, mmax, epi, norm, out_t)
    };
    let rt = RuntimeSizes {
        n,
        ..Default::default()
    };
    let (d_bf, d_f32) = (g.poison_bf(m * n)?, g.poison_f32(m * n)?);
    let dst = match out_t {
        OutType::Bf16 => g.ptr(&d_bf),
        OutType::F32 => g.ptr(&d_f32),
    };
    let ptrs = [g.ptr(&dx), g.ptr(&dw), g.ptr(&dr), dst, g.ptr(&dg)];
    let dims = inst.launch_dims(&rt);
    launch_gemv(g, &inst, &inst.name_expr, dims, ptrs, m, n, eps)?;
    g.sync()?;
    let out = match out_t {
        OutType::Bf16 => g.down_bf(&d_bf)?,
        OutType::F32 => g.down(&d_f32)?,
    };
    rep.check(
        format!("{} M={m} N={n}", inst.name_expr),
        rel_l2(&out, &reference),
        TOL,
    );
    Ok(())
}

/// Launches the compiled kernel `name` of a GEMV instance (or of a benchmark variant of it)
/// with its pointers `[x, w, residual, out, norm_w]`: `gemv` takes the norm weight and epsilon,
/// `gemv_tc` stops after `out`.
#[allow(clippy::too_many_arguments)]
fn launch_gemv(
    g: &Gpu,
    inst: &KernelInstance,
    name: &str,
    dims: LaunchDims,
    ptrs: [u64; 5],
    m: usize,
    n: usize,
    eps: f32,
) -> Res<()> {
    let [x, w, residual, out, norm_w] = ptrs;
    let (m, n) = (m as i32, n as i32);
    if inst.family() == KernelFamily::Gemv {
        let args = GemvArgs {
            x,
            m,
            w,
            n,
            residual,
            out,
            norm_w,
            eps,
        };
        g.launch_named(name, dims, &args)
    } else {
        let args = GemvTcArgs {
            x,
            m,
            w,
            n,
            residual,
            out,
        };
        g.launch_named(name, dims, &args)
    }
}

fn check_elementwise(g: &Gpu, r: &mut Rng, rep: &mut Report) -> Res<()> {
    for (f, gelu) in [(1536usize, false), (14336, false), (1000, true)] {
        let t = 3;
        let gu = r.bf_vec(t * 2 * f, 4.0);
        let (dgu, dout) = (g.up_bf(&gu)?, g.poison_bf(t * f)?);
        let inst = if gelu {
            KernelInstance::gelu_mul(f)
        } else {
            KernelInstance::silu_mul(f)
        };
        g.launch(
            &inst,
            RuntimeSizes {
                tokens: t,
                ..Default::default()
            },
            &GatedRowsArgs {
                gu: g.ptr(&dgu),
                out: g.ptr(&dout),
                t: t as i32,
            },
        )?;
        g.sync()?;
        let mut reference = vec![0f64; t * f];
        for ti in 0..t {
            for j in 0..f {
                let gt = gu[ti * 2 * f + j] as f64;
                let up = gu[ti * 2 * f + f + j] as f64;
                let z = if gelu {
                    (8.0 / std::f64::consts::PI).sqrt() * (gt + 0.044715 * gt.powi(3))
                } else {
                    gt
                };
                reference[ti * f + j] = gt / (1.0 + (-z).exp()) * up;
            }
        }
        rep.check(
            format!("{}<{f}> T={t}", inst.family().function()),
            rel_l2(&g.down_bf(&dout)?, &reference),
            TOL,
        );
    }
    for n in [512usize, 4608] {
        let t = 37;
        let bias = r.bf_vec(n, 1.0);
        let (db, dout) = (g.up_bf(&bias)?, g.poison_bf(t * n)?);
        let inst = KernelInstance::bias_rows(n);
        g.launch(
            &inst,
            RuntimeSizes {
                tokens: t,
                ..Default::default()
            },
            &BiasRowsArgs {
                bias: g.ptr(&db),
                out: g.ptr(&dout),
                t: t as i32,
            },
        )?;
        g.sync()?;
        let reference: Vec<f64> = (0..t * n).map(|i| bias[i % n] as f64).collect();
        rep.check(
            format!("bias_rows<{n}> T={t}"),
            rel_l2(&g.down_bf(&dout)?, &reference),
            TOL,
        );
    }
    Ok(())
}

fn check_argmax(g: &Gpu, r: &mut Rng, rep: &mut Report) -> Res<()> {
    for v in [7usize, 128_256] {
        let b_n = 3;
        let mut logits: Vec<f32> = (0..b_n * v).map(|_| r.normal() * 3.0).collect();
        // Row 1: a tie between two positions (the lower must win); row 2: all equal.
        let (i1, i2) = (v / 3, 2 * v / 3);
        logits[v + i1] = 100.0;
        logits[v + i2] = 100.0;
        for x in &mut logits[2 * v..3 * v] {
            *x = -1.0;
        }
        let expect: Vec<i32> = (0..b_n)
            .map(|b| {
                let row = &logits[b * v..(b + 1) * v];
                let mut best = 0;
                for (i, &x) in row.iter().enumerate() {
                    if x > row[best] {
                        best = i;
                    }
                }
                best as i32
            })
            .collect();
        let (dl, dout) = (g.up(&logits)?, g.up(&vec![-7i32; b_n])?);
        g.launch(
            &KernelInstance::argmax(),
            RuntimeSizes {
                batch: b_n,
                ..Default::default()
            },
            &ArgmaxArgs {
                logits: g.ptr(&dl),
                v: v as i32,
                out: g.ptr(&dout),
            },
        )?;
        g.sync()?;
        let got = g.down(&dout)?;
        let wrong = got.iter().zip(&expect).filter(|(a, b)| a != b).count();
        if wrong > 0 {
            println!("argmax V={v}: got {got:?}, expected {expect:?}");
        }
        rep.check(format!("argmax V={v} (mismatches)"), wrong as f64, 0.0);
    }
    Ok(())
}

fn softmax64(l: &[f32], t: f64) -> Vec<f64> {
    let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = l.iter().map(|&x| ((x as f64 - mx) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// Runs `sample` on `rows` copies of `logits` with seeds 0..rows; returns the tokens.
#[allow(clippy::too_many_arguments)]
fn run_sample(
    g: &Gpu,
    logits: &[f32],
    rows: usize,
    temp: f32,
    top_k: i32,
    top_p: f32,
    step: u64,
) -> Res<Vec<i32>> {
    let v = logits.len();
    let all: Vec<f32> = (0..rows).flat_map(|_| logits.iter().cloned()).collect();
    let seeds: Vec<u64> = (0..rows)
        .flat_map(|i| [i as u64 * 7919 + 13, step])
        .collect();
    let (dl, dt, dk, dp, ds, dout) = (
        g.up(&all)?,
        g.up(&vec![temp; rows])?,
        g.up(&vec![top_k; rows])?,
        g.up(&vec![top_p; rows])?,
        g.up(&seeds)?,
        g.up(&vec![-7i32; rows])?,
    );
    g.launch(
        &KernelInstance::sample(),
        RuntimeSizes {
            batch: rows,
            ..Default::default()
        },
        &SampleArgs {
            logits: g.ptr(&dl),
            v: v as i32,
            temperature: g.ptr(&dt),
            top_k: g.ptr(&dk),
            top_p: g.ptr(&dp),
            seed_and_step: g.ptr(&ds),
            out: g.ptr(&dout),
        },
    )?;
    g.sync()?;
    g.down(&dout)
}

/// Total variation distance between the empirical distribution of `tokens` and `p`, and the
/// count of tokens outside the support of `p`.
fn tv(tokens: &[i32], p: &[f64]) -> (f64, usize) {
    let mut c = vec![0f64; p.len()];
    let mut outside = 0;
    for &t in tokens {
        if t < 0 || t as usize >= p.len() || p[t as usize] == 0.0 {
            outside += 1;
        } else {
            c[t as usize] += 1.0;
        }
    }
    let n = tokens.len() as f64;
    (
        0.5 * c.iter().zip(p).map(|(a, b)| (a / n - b).abs()).sum::<f64>(),
        outside,
    )
}

fn check_sample(g: &Gpu, r: &mut Rng, rep: &mut Report) -> Res<()> {
    let v = 1000;
    let rows = 8192;
    // Ten plausible tokens, the rest far below.
    let mut logits: Vec<f32> = (0..v).map(|_| -20.0 + r.sym(1.0)).collect();
    let mut idx: Vec<usize> = (0..v).collect();
    r.shuffle(&mut idx);
    let top: Vec<usize> = idx[..10].to_vec();
    for (i, &j) in top.iter().enumerate() {
        logits[j] = 2.0 - 0.25 * i as f32;
    }
    let amax = top[0] as i32;
    // Greedy by temperature 0 and by top_k 1.
    let greedy = run_sample(g, &logits, 64, 0.0, 0, 1.0, 1)?;
    let k1 = run_sample(g, &logits, 64, 1.0, 1, 1.0, 1)?;
    let bad = greedy.iter().chain(&k1).filter(|&&t| t != amax).count();
    rep.check("sample greedy (T=0, top_k=1) mismatches", bad as f64, 0.0);
    // Plain temperature sampling.
    let p = softmax64(&logits, 0.7);
    let toks = run_sample(g, &logits, rows, 0.7, 0, 1.0, 3)?;
    let (d, out) = tv(&toks, &p);
    rep.check("sample T=0.7 total variation", d + out as f64, 0.03);
    // Top-k = 3.
    let mut pk = vec![0f64; v];
    let z: f64 = top[..3].iter().map(|&j| p[j]).sum();
    for &j in &top[..3] {
        pk[j] = p[j] / z;
    }
    let toks = run_sample(g, &logits, rows, 0.7, 3, 1.0, 4)?;
    let (d, out) = tv(&toks, &pk);
    rep.check(
        "sample T=0.7 top_k=3 total variation (+ outside)",
        d + out as f64,
        0.03,
    );
    // Top-p = 0.6: the smallest prefix of the sorted tokens whose mass reaches 0.6.
    let mut pp = vec![0f64; v];
    let mut cum = 0.0;
    let mut kept = Vec::new();
    for &j in &top {
        kept.push(j);
        cum += p[j];
        if cum >= 0.6 {
            break;
        }
    }
    let z: f64 = kept.iter().map(|&j| p[j]).sum();
    for &j in &kept {
        pp[j] = p[j] / z;
    }
    let toks = run_sample(g, &logits, rows, 0.7, 0, 0.6, 5)?;
    let (d, out) = tv(&toks, &pp);
    rep.check(
        format!(
            "sample T=0.7 top_p=0.6 ({} kept) total variation (+ outside)",
            kept.len()
        ),
        d + out as f64,
        0.03,
    );
    // Same seed and step: same draw.
    let a = run_sample(g, &logits, 256, 1.0, 0, 1.0, 9)?;
    let b = run_sample(g, &logits, 256, 1.0, 0, 1.0, 9)?;
    let diff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    rep.check("sample replay determinism (mismatches)", diff as f64, 0.0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// The steps of the check, in order; each can run alone (`kernel_check STEP…`), so a kernel that
/// breaks the CUDA context does not hide the results of the others. `bench-gemv` ends with
/// `bench-gemv-7b`, which can also run alone.
const STEPS: [&str; 14] = [
    "info",
    "embedding",
    "rmsnorm",
    "gemv",
    "elementwise",
    "quant",
    "rope",
    "decode",
    "prefill",
    "argmax",
    "sample",
    "bench-gemv",
    "bench-attention",
    "bench-sample",
];

/// Runs one step of [`STEPS`], adding its checks and timings to `rep`.
pub fn run_step(g: &Gpu, rep: &mut Report, r: &mut Rng, step: &str) -> Res<()> {
    use GemvEpilogue::*;
    match step {
        "info" => {
            for name in [
                "gemv<4096, 1, 0, 1, __nv_bfloat16>",
                "gemv<4096, 8, 0, 0, __nv_bfloat16>",
                "gemv_tc<4096, 8, 0, __nv_bfloat16>",
                "attention_decode<32, 8, 128, 16>",
                "attention_prefill<32, 8, 128, 16>",
                "attention_prefill_sm90<32, 8, 128, 16>",
                "sample",
            ] {
                if let Some(f) = g.funcs.get(name) {
                    println!(
                        "{name}: {} registers, {} bytes local memory",
                        f.num_regs()?,
                        f.local_size_bytes()?
                    );
                }
            }
            Ok(())
        }
        "embedding" => {
            check_embedding(g, r, rep, 576, 1.0)?;
            check_embedding(g, r, rep, 4096, 1.0)?;
            check_embedding(g, r, rep, 3072, 55.425625)
        }
        "rmsnorm" => {
            check_rmsnorm(g, r, rep, 576)?;
            check_rmsnorm(g, r, rep, 4096)
        }
        "gemv" => {
            for tc in [false, true] {
                let m1 = if tc { 8 } else { 1 };
                check_gemv(
                    g,
                    r,
                    rep,
                    tc,
                    4096,
                    4096,
                    1,
                    m1,
                    Plain,
                    false,
                    OutType::Bf16,
                )?;
                check_gemv(g, r, rep, tc, 4096, 6144, 1, m1, Plain, true, OutType::Bf16)?;
                // Qwen2.5-7B's biased QKV (28 + 2·4 heads of 128).
                check_gemv(g, r, rep, tc, 3584, 4608, 1, m1, Bias, true, OutType::Bf16)?;
                check_gemv(g, r, rep, tc, 3584, 4600, 5, 8, Bias, false, OutType::Bf16)?;
                check_gemv(
                    g,
                    r,
                    rep,
                    tc,
                    4096,
                    1000,
                    3,
                    8,
                    Residual,
                    false,
                    OutType::Bf16,
                )?;
                check_gemv(g, r, rep, tc, 576, 1537, 1, m1, Gated, true, OutType::Bf16)?;
                check_gemv(g, r, rep, tc, 4096, 1031, 8, 8, Gated, true, OutType::Bf16)?;
                // Gemma's GeGLU (hidden 3072).
                check_gemv(
                    g,
                    r,
                    rep,
                    tc,
                    3072,
                    1000,
                    1,
                    m1,
                    GatedGelu,
                    true,
                    OutType::Bf16,
                )?;
                check_gemv(
                    g,
                    r,
                    rep,
                    tc,
                    3072,
                    1031,
                    8,
                    8,
                    GatedGelu,
                    true,
                    OutType::Bf16,
                )?;
                check_gemv(
                    g,
                    r,
                    rep,
                    tc,
                    14336,
                    4096,
                    8,
                    8,
                    Residual,
                    false,
                    OutType::Bf16,
                )?;
                check_gemv(g, r, rep, tc, 11008, 333, 5, 8, Plain, false, OutType::Bf16)?;
                check_gemv(
                    g,
                    r,
                    rep,
                    tc,
                    1536,
                    576,
                    1,
                    m1,
                    Residual,
                    false,
                    OutType::Bf16,
                )?;
                check_gemv(
                    g,
                    r,
                    rep,
                    tc,
                    4096,
                    32_000,
                    1,
                    m1,
                    Plain,
                    true,
                    OutType::F32,
                )?;
                check_gemv(g, r, rep, tc, 4096, 5001, 8, 8, Plain, true, OutType::F32)?;
                check_gemv(g, r, rep, tc, 576, 49152, 2, 8, Plain, true, OutType::F32)?;
                check_gemv(g, r, rep, tc, 576, 1000, 6, 8, Plain, true, OutType::Bf16)?;
            }
            Ok(())
        }
        "elementwise" => check_elementwise(g, r, rep),
        "quant" => quant::check_quant(g, r, rep),
        "rope" => {
            // Few tokens: a warp per head; many: each warp rotates several heads.
            for t in [6, 300] {
                check_rope(g, r, rep, 32, 8, 128, t)?;
                check_rope(g, r, rep, 9, 3, 64, t)?;
            }
            Ok(())
        }
        "decode" => {
            check_decode(g, r, rep, 32, 8, 128, &[1, 37, 700, 2100, 0], 0)?;
            check_decode(g, r, rep, 32, 32, 128, &[5, 300], 0)?;
            check_decode(g, r, rep, 9, 3, 64, &[64, 65, 1000], 0)?;
            // Sliding windows (Mistral): shorter and longer than the sequences.
            check_decode(g, r, rep, 32, 8, 128, &[1, 37, 700, 2100, 0], 100)?;
            check_decode(g, r, rep, 9, 3, 64, &[64, 65, 1000], 64)
        }
        "prefill" => {
            check_prefill(g, r, rep, 32, 8, 128, &[(1, 0), (77, 19), (300, 130)], 0)?;
            check_prefill(g, r, rep, 32, 32, 128, &[(64, 0), (129, 5)], 0)?;
            check_prefill(g, r, rep, 9, 3, 64, &[(200, 0), (3, 61)], 0)?;
            // Sliding windows: within one key tile, across tiles, longer than every sequence.
            check_prefill(g, r, rep, 32, 8, 128, &[(1, 0), (77, 19), (300, 130)], 50)?;
            check_prefill(g, r, rep, 9, 3, 64, &[(200, 0), (3, 61)], 7)?;
            check_prefill(g, r, rep, 32, 8, 128, &[(129, 5)], 4096)
        }
        "argmax" => check_argmax(g, r, rep),
        "sample" => check_sample(g, r, rep),
        "bench-gemv" => {
            // As the plan launches them: the norm folded into qkv, gate_up and lm_head at M = 1.
            let shapes: [(&str, usize, usize, GemvEpilogue, bool, OutType); 5] = [
                ("L3-8B norm+qkv", 4096, 6144, Plain, true, OutType::Bf16),
                ("L3-8B o+res", 4096, 4096, Residual, false, OutType::Bf16),
                (
                    "L3-8B norm+gate_up",
                    4096,
                    14336,
                    Gated,
                    true,
                    OutType::Bf16,
                ),
                (
                    "L3-8B down+res",
                    14336,
                    4096,
                    Residual,
                    false,
                    OutType::Bf16,
                ),
                (
                    "L3-8B norm+lm_head",
                    4096,
                    128_256,
                    Plain,
                    true,
                    OutType::F32,
                ),
            ];
            for (label, k, n, epi, norm, ty) in shapes {
                for v in GEMV_VARIANTS {
                    let ms: &[usize] = if v.tc { &[1, 8] } else { &[1] };
                    for &m in ms {
                        let mmax = if v.tc { 8 } else { 1 };
                        bench_gemv(g, rep, v, label, k, n, m, mmax, epi, norm && !v.tc, ty)?;
                    }
                }
            }
            run_step(g, rep, r, "bench-gemv-7b")
        }
        "bench-gemv-7b" => {
            // Llama-2-7B's decode GEMVs, with and without the folded RMSNorm where it applies.
            for (label, k, n, epi, norm) in [
                ("L2-7B qkv", 4096, 12288, Plain, false),
                ("L2-7B norm+qkv", 4096, 12288, Plain, true),
                ("L2-7B o+res", 4096, 4096, Residual, false),
                ("L2-7B norm+gate_up", 4096, 11008, Gated, true),
                ("L2-7B down+res", 11008, 4096, Residual, false),
            ] {
                bench_gemv(
                    g,
                    rep,
                    GemvVariant::DEFAULT_GEMV,
                    label,
                    k,
                    n,
                    1,
                    1,
                    epi,
                    norm,
                    OutType::Bf16,
                )?;
                if !norm {
                    let v = GemvVariant::DEFAULT_TC;
                    bench_gemv(g, rep, v, label, k, n, 8, 8, epi, false, OutType::Bf16)?;
                }
            }
            Ok(())
        }
        "bench-attention" => {
            run_step(g, rep, r, "bench-decode")?;
            run_step(g, rep, r, "bench-prefill")
        }
        "bench-decode" => {
            for (b_n, l) in [
                (1usize, 128usize),
                (1, 512),
                (1, 2048),
                (1, 8192),
                (4, 2048),
                (8, 2048),
                (8, 4096),
            ] {
                bench_decode(g, rep, 32, 8, 128, b_n, l, decode_splits(b_n, 8, l, SMS))?;
            }
            // Splits sized for an 8k context (as a captured graph would be) at a 512-token one.
            bench_decode(g, rep, 32, 8, 128, 1, 512, decode_splits(1, 8, 8192, SMS))?;
            bench_decode(
                g,
                rep,
                32,
                32,
                128,
                1,
                2048,
                decode_splits(1, 32, 2048, SMS),
            )?;
            bench_decode(g, rep, 9, 3, 64, 1, 2048, decode_splits(1, 3, 2048, SMS))?;
            bench_decode(g, rep, 32, 8, 128, 1, 2048, 1)
        }
        "bench-prefill" => {
            for t in [512usize, 2048, 4096] {
                for k in [
                    KernelInstance::attention_prefill_sm90(32, 8, 128, BLOCK),
                    KernelInstance::attention_prefill(32, 8, 128, BLOCK),
                ] {
                    if g.funcs.contains_key(&k.name_expr) {
                        bench_prefill(g, rep, &k, 32, 8, 128, t)?;
                    }
                }
            }
            bench_prefill(
                g,
                rep,
                &KernelInstance::attention_prefill_sm90(9, 3, 64, BLOCK),
                9,
                3,
                64,
                2048,
            )?;
            bench_prefill(
                g,
                rep,
                &KernelInstance::attention_prefill(9, 3, 64, BLOCK),
                9,
                3,
                64,
                2048,
            )?;
            bench_prefill(
                g,
                rep,
                &KernelInstance::attention_prefill_simple(32, 8, 128, BLOCK),
                32,
                8,
                128,
                2048,
            )
        }
        "bench-sample" => {
            bench_sample(g, rep, 128_256, 1)?;
            bench_sample(g, rep, 128_256, 8)
        }
        other => Err(format!("unknown step {other}; steps: {}", STEPS.join(", ")).into()),
    }
}

/// Every kernel instance the checks and benchmarks launch on `arch`: the Llama configurations'
/// instances and the other families' (the bias epilogue, Gemma's GeGLU and scaled embedding).
pub fn kernel_instances(arch: &str) -> Vec<KernelInstance> {
    let mut instances: Vec<KernelInstance> = Vec::new();
    for cfg in [
        LlamaDims::smollm2_135m(),
        LlamaDims::llama2_7b(),
        LlamaDims::llama3_8b(),
    ] {
        for k in llama_kernels(&cfg) {
            if !instances.contains(&k) {
                instances.push(k);
            }
        }
    }
    // Beyond the Llama shapes: the bias epilogue (Qwen2.5-7B's QKV) and its prefill fill, and
    // Gemma's GeGLU epilogue and scaled embedding.
    for k in [
        KernelInstance::gemv(3072, 1, GemvEpilogue::GatedGelu, true, OutType::Bf16),
        KernelInstance::gemv(3072, 8, GemvEpilogue::GatedGelu, false, OutType::Bf16),
        KernelInstance::gemv_tc(3072, 8, GemvEpilogue::GatedGelu, OutType::Bf16),
        KernelInstance::gelu_mul(1000),
        KernelInstance::embedding(3072),
        KernelInstance::gemv(3584, 1, GemvEpilogue::Bias, true, OutType::Bf16),
        KernelInstance::gemv(3584, 8, GemvEpilogue::Bias, false, OutType::Bf16),
        KernelInstance::gemv_tc(3584, 8, GemvEpilogue::Bias, OutType::Bf16),
        KernelInstance::bias_rows(512),
        KernelInstance::bias_rows(4608),
    ] {
        if !instances.contains(&k) {
            instances.push(k);
        }
    }
    // The wgmma kernels build only for sm_90 (as sm_90a).
    if arch != "sm_90" {
        instances.retain(|k| k.family() != KernelFamily::AttentionPrefillSm90);
    }
    instances
}

fn main() {
    // SAFETY: only probes whether libcuda can be dlopened (cudarc panics later if it cannot).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!(
            "no CUDA driver (libcuda.so) on this machine: the kernel check needs an NVIDIA GPU"
        );
        std::process::exit(2);
    }
    let arch = std::env::var("KILN_ARCH").unwrap_or_else(|_| "sm_90".to_string());
    let steps: Vec<String> = std::env::args().skip(1).collect();
    let steps: Vec<String> = if steps.is_empty() {
        STEPS.iter().map(|s| s.to_string()).collect()
    } else {
        steps
    };
    let instances = kernel_instances(&arch);
    let mut g = match Gpu::new(&instances, &arch) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("GPU setup failed: {e}");
            std::process::exit(2);
        }
    };
    if steps.iter().any(|s| s == "bench-gemv") {
        let gemv: Vec<String> = instances
            .iter()
            .filter(|k| matches!(k.kernel, Kernel::Gemv { mmax: 1, .. }))
            .map(|k| k.name_expr.clone())
            .collect();
        let tc: Vec<String> = instances
            .iter()
            .filter(|k| k.family() == KernelFamily::GemvTc)
            .map(|k| k.name_expr.clone())
            .collect();
        for v in GEMV_VARIANTS.iter().filter(|v| !v.is_default()) {
            let defines = v.defines();
            let defines: Vec<&str> = defines.iter().map(|s| s.as_str()).collect();
            let (file, exprs) = if v.tc {
                (TemplateFile::GemvTc, &tc)
            } else {
                (TemplateFile::Gemv, &gemv)
            };
            if let Err(e) = g.add_variant(file, exprs, &defines, &v.tag(), &arch) {
                eprintln!("variant {}: {e}", v.tag());
                std::process::exit(2);
            }
        }
    }
    let mut rep = Report::default();
    let mut r = Rng::from_clock();
    let mut error = None;
    for step in &steps {
        println!("-- {step}");
        if let Err(e) = run_step(&g, &mut rep, &mut r, step) {
            rep.check(format!("{step}: error {e}"), f64::INFINITY, 0.0);
            error = Some(e); // the context may be unusable now
            break;
        }
    }
    let failed = rep.checks.iter().filter(|c| !c.3).count();
    println!(
        "{} checks, {failed} failed{}",
        rep.checks.len(),
        if error.is_some() {
            ", stopped on an error"
        } else {
            ""
        }
    );
    std::process::exit(if failed > 0 || error.is_some() { 1 } else { 0 });
}
