//! The CUDA executor: device memory, sequences and steps.

use super::kv_cache::{BlockAllocator, SeqCache, BLOCK};
use super::launch::{Kernels, Ptrs};
use super::CudaError;
use crate::engine::{keys, Engine};
use crate::plan::{BufType, Plan, Rows};
use crate::serving::SeqStep;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::sync::Arc;

/// Sizing of the executor's device memory.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most tokens (all sequences together) in one step.
    pub max_step_tokens: usize,
    /// KV-cache capacity in tokens; `None` uses `kv_memory_fraction` of the memory left free.
    pub max_kv_tokens: Option<usize>,
    /// Fraction of free GPU memory (after weights and arena) given to the KV cache.
    pub kv_memory_fraction: f64,
    /// Most tokens one sequence may hold (sizes the block tables).
    pub max_seq_len: usize,
    /// Capture each decode batch size's step once as a CUDA graph and replay it.
    pub cuda_graphs: bool,
    /// Programmatic dependent launch on sm_90+: a kernel starts (and issues its weight loads)
    /// while the previous one drains.
    pub pdl: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            max_batch: 8,
            max_step_tokens: 4096,
            max_kv_tokens: None,
            kv_memory_fraction: 0.9,
            max_seq_len: 8192,
            cuda_graphs: true,
            pdl: true,
        }
    }
}

/// A sequence handle.
pub type SeqId = usize;

/// One sequence's part of a step: the new tokens to feed.
#[derive(Clone, Debug)]
pub struct StepSeq {
    /// Which sequence.
    pub seq: SeqId,
    /// Its new tokens (the prompt at prefill, one token at decode).
    pub tokens: Vec<u32>,
}

/// A buffer's value after the launch that wrote it (`CudaExecutor::step_traced`).
#[derive(Clone, Debug)]
pub struct TracedBuffer {
    /// Index of the launch in the plan.
    pub launch: usize,
    /// The buffer's name: the graph node it holds.
    pub name: String,
    /// Rows (the step's tokens or sequences).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows × cols` values, row-major, widened to f32.
    pub values: Vec<f32>,
}

/// Device-side per-step metadata (int32 arrays), written before each step.
struct Meta {
    buf: CudaSlice<i32>,
    at: MetaLayout,
}

/// Where each per-step array lives in the metadata buffer.
#[derive(Clone, Copy, Debug)]
struct MetaLayout {
    /// Offsets (in i32 elements) of each array.
    tokens: usize,
    positions: usize,
    slots: usize,
    seq_lens: usize,
    query_start: usize,
    block_tables: usize,
    last_index: usize,
    out_tokens: usize,
    /// Device sampling settings per sequence: temperature and top-p (f32 bits), top-k, and
    /// (seed, step) as u64 pairs (8-byte aligned).
    temperature: usize,
    top_k: usize,
    top_p: usize,
    seeds: usize,
    max_blocks: usize,
    /// i32 elements in all.
    len: usize,
}

impl MetaLayout {
    /// The arrays of steps of at most `tokens` tokens and `batch` sequences of at most
    /// `max_seq_len` tokens: tokens, positions and cache slots per token; per sequence its
    /// length, query start (one more), block table row, last-token row and sampled token.
    fn new(tokens: usize, batch: usize, max_seq_len: usize) -> MetaLayout {
        let max_blocks = max_seq_len.div_ceil(BLOCK);
        let (t, b) = (tokens, batch);
        let sizes = [t, t, t, b, b + 1, b * max_blocks, b, b, b, b, b, 4 * b];
        let mut offs = [0usize; 12];
        let mut n = 0;
        for (o, s) in offs.iter_mut().zip(sizes) {
            // Even offsets: the u64 seed pairs need 8-byte alignment.
            n += n % 2;
            *o = n;
            n += s;
        }
        MetaLayout {
            tokens: offs[0],
            positions: offs[1],
            slots: offs[2],
            seq_lens: offs[3],
            query_start: offs[4],
            block_tables: offs[5],
            last_index: offs[6],
            out_tokens: offs[7],
            temperature: offs[8],
            top_k: offs[9],
            top_p: offs[10],
            seeds: offs[11],
            max_blocks,
            len: n,
        }
    }
}

/// Runs a GPU engine.
pub struct CudaExecutor {
    stream: Arc<CudaStream>,
    plan: Plan,
    kernels: Kernels,
    _weights: CudaSlice<u8>,
    weight_ptrs: HashMap<String, u64>,
    _arena: CudaSlice<u8>,
    slot_base: Vec<u64>,
    _kv: CudaSlice<u8>,
    kv_layer_bytes: usize,
    kv_base: u64,
    meta: Meta,
    host_meta: Vec<i32>,
    allocator: BlockAllocator,
    seqs: HashMap<SeqId, SeqCache>,
    next_seq: SeqId,
    opts: CudaOptions,
    /// Captured decode steps by batch size and token choice (argmax or device sampling).
    graphs: HashMap<(usize, bool), cudarc::driver::CudaGraph>,
    /// Peak device memory in use by this executor (weights + arena + KV + metadata), bytes.
    pub device_bytes: usize,
}

/// Refuses an engine whose kernels were compiled for another architecture than the GPU's
/// compute capability `(major, minor)`.
fn check_arch(engine_arch: Option<&str>, cc: (i32, i32)) -> Result<(), CudaError> {
    let device = super::sm_name(cc);
    match engine_arch {
        Some(a) if a == device => Ok(()),
        other => Err(CudaError::ArchMismatch {
            engine: other.unwrap_or("an unknown architecture").to_string(),
            device,
        }),
    }
}

fn align(n: usize) -> usize {
    n.div_ceil(256) * 256
}

fn mib(b: usize) -> usize {
    b.div_ceil(1 << 20)
}

impl CudaExecutor {
    /// Loads an engine onto GPU 0: checks the architecture, loads the kernels, uploads the
    /// weights, allocates the arena and the paged KV cache.
    pub fn new(engine: &Engine, opts: CudaOptions) -> Result<CudaExecutor, CudaError> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDevice(
                "the CUDA driver library (libcuda) was not found".into(),
            ));
        }
        if engine.target() != "cuda" {
            return Err(CudaError::Engine(format!(
                "built for `{}`; build a GPU engine with `kiln build --target cuda`",
                engine.target()
            )));
        }
        let plan = Plan::from_ron(
            engine
                .metadata(keys::PLAN)
                .ok_or_else(|| CudaError::Engine("no launch plan".into()))?,
        )
        .map_err(CudaError::Engine)?;
        let ctx = CudaContext::new(0).map_err(|e| CudaError::NoDevice(e.to_string()))?;
        // SAFETY: called before any allocation, as cudarc requires; kiln orders work on one stream.
        unsafe { ctx.disable_event_tracking() };
        let cc = ctx.compute_capability()?;
        check_arch(engine.metadata(keys::ARCH), cc)?;
        let stream = ctx.new_stream()?;
        let pdl = opts.pdl && cc.0 >= 9;
        super::plan_needs::check_weights(&plan, engine)?;
        let mut kernels = Kernels::load(&ctx, &stream, engine, &plan, pdl)?;

        // Weights: one allocation, each tensor 256-byte aligned.
        let mut layout = Vec::new();
        let mut total = 0usize;
        for name in engine.tensor_names().filter(|n| !n.starts_with("kernels.")) {
            let (_, bytes) = engine
                .tensor(name)
                .map_err(|e| CudaError::Engine(e.to_string()))?;
            layout.push((name.to_string(), total, bytes.len()));
            total = align(total + bytes.len());
        }
        let (free, _) = ctx.mem_get_info()?;
        if total > free {
            return Err(CudaError::OutOfMemory {
                what: "the weights".into(),
                need_mib: mib(total),
                free_mib: mib(free),
            });
        }
        let mut weights = stream.alloc_zeros::<u8>(total.max(1))?;
        let mut host = vec![0u8; total.max(1)];
        for (name, off, len) in &layout {
            let (_, bytes) = engine
                .tensor(name)
                .map_err(|e| CudaError::Engine(e.to_string()))?;
            host[*off..off + len].copy_from_slice(bytes);
        }
        stream.memcpy_htod(&host, &mut weights)?;
        drop(host);
        let wbase = weights.device_ptr(&stream).0;
        let weight_ptrs = layout
            .iter()
            .map(|(n, off, _)| (n.clone(), wbase + *off as u64))
            .collect();

        // Activation arena: one region per liveness slot, sized for the largest step.
        let slot_row_bytes = plan.slot_row_bytes();
        let slot_rows = |s: usize| {
            let rows = plan
                .buffers
                .iter()
                .find(|b| b.slot == s)
                .map(|b| b.rows)
                .unwrap_or(Rows::Tokens);
            match rows {
                Rows::Tokens => opts.max_step_tokens,
                Rows::Sequences => opts.max_batch,
            }
        };
        let scratch = Kernels::scratch_bytes(&plan, &opts);
        let mut arena_total = align(scratch);
        let mut slot_off = Vec::new();
        for (s, row) in slot_row_bytes.iter().enumerate() {
            slot_off.push(arena_total);
            arena_total = align(arena_total + row * slot_rows(s));
        }
        let (free, _) = ctx.mem_get_info()?;
        if arena_total > free {
            return Err(CudaError::OutOfMemory {
                what: "the activation arena".into(),
                need_mib: mib(arena_total),
                free_mib: mib(free),
            });
        }
        let arena = stream.alloc_zeros::<u8>(arena_total)?;
        let abase = arena.device_ptr(&stream).0;
        kernels.set_scratch(abase, &plan, &opts);
        let slot_base = slot_off.iter().map(|o| abase + *o as u64).collect();

        // Paged KV cache: per layer, K then V, each [blocks, BLOCK, kv_heads, head_dim] bf16.
        let a = plan.attention;
        let block_bytes = BLOCK * a.kv_heads * a.head_dim * 2;
        let (free, _) = ctx.mem_get_info()?;
        let blocks = match opts.max_kv_tokens {
            Some(t) => t.div_ceil(BLOCK),
            None => {
                ((free as f64 * opts.kv_memory_fraction) as usize)
                    / (2 * plan.layers * block_bytes).max(1)
            }
        };
        let kv_layer_bytes = blocks * block_bytes;
        let kv_total = 2 * plan.layers * kv_layer_bytes;
        if blocks == 0 || kv_total > free {
            return Err(CudaError::OutOfMemory {
                what: format!("a KV cache of {} tokens", blocks * BLOCK),
                need_mib: mib(kv_total.max(2 * plan.layers * block_bytes)),
                free_mib: mib(free),
            });
        }
        let kv = stream.alloc_zeros::<u8>(kv_total)?;
        let kv_base = kv.device_ptr(&stream).0;

        let at = MetaLayout::new(opts.max_step_tokens, opts.max_batch, opts.max_seq_len);
        let n = at.len;
        let meta = Meta {
            buf: stream.alloc_zeros::<i32>(n)?,
            at,
        };
        let device_bytes = total + arena_total + kv_total + n * 4;
        Ok(CudaExecutor {
            stream,
            plan,
            kernels,
            _weights: weights,
            weight_ptrs,
            _arena: arena,
            slot_base,
            _kv: kv,
            kv_layer_bytes,
            kv_base,
            host_meta: vec![0; n],
            meta,
            allocator: BlockAllocator::new(blocks),
            seqs: HashMap::new(),
            next_seq: 0,
            opts,
            graphs: HashMap::new(),
            device_bytes,
        })
    }

    /// KV-cache capacity in tokens.
    pub fn kv_capacity(&self) -> usize {
        self.allocator.total_blocks() * BLOCK
    }

    /// Starts a new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        self.next_seq += 1;
        self.seqs.insert(self.next_seq, SeqCache::default());
        self.next_seq
    }

    /// Ends a sequence and frees its cache blocks.
    pub fn remove_sequence(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.allocator.release(&mut s);
        }
    }

    /// Tokens cached for a sequence.
    pub fn seq_len(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.len)
    }

    /// KV-cache blocks in all (of [`BLOCK`] tokens each).
    pub fn kv_blocks(&self) -> usize {
        self.allocator.total_blocks()
    }

    /// The sizing this executor was made with.
    pub fn options(&self) -> &CudaOptions {
        &self.opts
    }

    /// Logits per token.
    pub fn vocab(&self) -> usize {
        self.plan.vocab
    }

    /// Reserves cache blocks for the step's own sequences (all or none), then writes the step's
    /// metadata. Returns the step's sizes.
    fn prepare(&mut self, batch: &[StepSeq]) -> Result<StepShape, CudaError> {
        // Grow every sequence first; on any failure give back what this step took.
        let mut grown: Vec<(SeqId, usize)> = Vec::with_capacity(batch.len());
        let mut failed = None;
        for s in batch {
            let Some(cache) = self.seqs.get_mut(&s.seq) else {
                failed = Some(CudaError::Request(format!("unknown sequence {}", s.seq)));
                break;
            };
            let new_len = cache.len + s.tokens.len();
            if new_len > self.opts.max_seq_len {
                failed = Some(CudaError::Request(format!(
                    "sequence would hold {new_len} tokens, more than --max-seq-len {}",
                    self.opts.max_seq_len
                )));
                break;
            }
            let before = cache.blocks.len();
            if let Err(e) = self.allocator.reserve(cache, new_len) {
                failed = Some(CudaError::Request(e));
                break;
            }
            grown.push((s.seq, before));
        }
        let written = match failed {
            Some(e) => Err(e),
            None => {
                let steps: Vec<SeqStep<'_>> = batch
                    .iter()
                    .map(|s| {
                        let cache = &self.seqs[&s.seq];
                        SeqStep {
                            tokens: &s.tokens,
                            start: cache.len,
                            blocks: &cache.blocks,
                        }
                    })
                    .collect();
                write_meta(
                    &mut self.host_meta,
                    &self.meta.at,
                    &self.opts,
                    self.allocator.total_blocks(),
                    &steps,
                )
            }
        };
        match written {
            Ok(tb) => {
                for s in batch {
                    let cache = self.seqs.get_mut(&s.seq).expect("checked");
                    cache.len += s.tokens.len();
                }
                self.upload_meta()?;
                Ok(tb)
            }
            Err(e) => {
                for (id, before) in grown {
                    let cache = self.seqs.get_mut(&id).expect("grown");
                    self.allocator.shrink(cache, before);
                }
                Err(e)
            }
        }
    }

    fn upload_meta(&mut self) -> Result<(), CudaError> {
        let upto = self.meta.at.out_tokens;
        let mut dst = self.meta.buf.slice_mut(0..upto);
        self.stream.memcpy_htod(&self.host_meta[..upto], &mut dst)?;
        Ok(())
    }

    /// Runs one step over sequences whose cache blocks the caller manages (the serving
    /// scheduler; do not mix with [`add_sequence`](Self::add_sequence) sequences, which take
    /// blocks from the executor's own allocator). Returns each sequence's argmax token (decode
    /// steps replay a CUDA graph), its token drawn on the device with its own settings, or its
    /// `[vocab]` logits row, as `want` asks.
    pub fn step_paged(
        &mut self,
        seqs: &[SeqStep<'_>],
        want: Want<'_>,
    ) -> Result<StepResult, CudaError> {
        let shape = write_meta(
            &mut self.host_meta,
            &self.meta.at,
            &self.opts,
            self.allocator.total_blocks(),
            seqs,
        )?;
        match want {
            Want::Greedy => {
                self.upload_meta()?;
                Ok(StepResult::Tokens(self.run_greedy(shape)?))
            }
            Want::Logits => {
                self.upload_meta()?;
                Ok(StepResult::Logits(self.run_logits(shape)?))
            }
            Want::Sample(params) => {
                if params.len() != shape.seqs {
                    return Err(CudaError::Request(format!(
                        "{} sampling settings for a step of {} sequences",
                        params.len(),
                        shape.seqs
                    )));
                }
                write_sampling(&mut self.host_meta, &self.meta.at, params);
                // The step's metadata and the sampling settings after it, in one copy.
                let to = self.meta.at.len;
                let mut dst = self.meta.buf.slice_mut(0..to);
                self.stream.memcpy_htod(&self.host_meta[..to], &mut dst)?;
                Ok(StepResult::Tokens(self.run_sample(shape)?))
            }
        }
    }

    fn ptrs(&self, shape: StepShape) -> Ptrs<'_> {
        let base = self.meta.buf.device_ptr(&self.stream).0;
        let at = |off: usize| base + (off * 4) as u64;
        Ptrs {
            plan: &self.plan,
            weights: &self.weight_ptrs,
            slot_base: &self.slot_base,
            kv_base: self.kv_base,
            kv_layer_bytes: self.kv_layer_bytes as u64,
            tokens: at(self.meta.at.tokens),
            positions: at(self.meta.at.positions),
            slots: at(self.meta.at.slots),
            seq_lens: at(self.meta.at.seq_lens),
            query_start: at(self.meta.at.query_start),
            block_tables: at(self.meta.at.block_tables),
            max_blocks: self.meta.at.max_blocks as i32,
            last_index: at(self.meta.at.last_index),
            out_tokens: at(self.meta.at.out_tokens),
            max_seq_len: self.opts.max_seq_len,
            t: shape.tokens,
            b: shape.seqs,
            longest_query: shape.longest_query,
            decodes: shape.decodes,
        }
    }

    /// Runs one step launch by launch and returns, for every launch that writes a buffer, that
    /// buffer's value right after it (as f32, `[rows, cols]`), in launch order: what `kiln
    /// diff` compares with the CPU executor. Slow by design (a synchronization per launch).
    pub fn step_traced(&mut self, batch: &[StepSeq]) -> Result<Vec<TracedBuffer>, CudaError> {
        let shape = self.prepare(batch)?;
        let (t, b) = (shape.tokens, shape.seqs);
        let p = self.ptrs(shape);
        let (plan, stream) = (&self.plan, &self.stream);
        let mut traced = Vec::new();
        self.kernels.run_plan_with(stream, &p, |i| {
            let (_, Some(w)) = Plan::reads_writes(&plan.launches[i]) else {
                return Ok(());
            };
            let buf = &plan.buffers[w];
            let rows = match buf.rows {
                Rows::Tokens => t,
                Rows::Sequences => b,
            };
            let mut host = vec![0u8; rows * buf.cols * buf.dtype.size()];
            // SAFETY: the buffer's slot holds at least `rows` rows of `cols` elements of its
            // type (the arena is sized for the largest step); the copy completes before `host`
            // is read (synchronize).
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut host, p.buf(w), stream.cu_stream())?;
            }
            stream.synchronize()?;
            let dtype = match buf.dtype {
                BufType::F32 => safetensors::Dtype::F32,
                BufType::Bf16 => safetensors::Dtype::BF16,
            };
            let values = crate::engine::widen_to_f32(dtype, &host).unwrap_or_default();
            traced.push(TracedBuffer {
                launch: i,
                name: buf.name.clone(),
                rows,
                cols: buf.cols,
                values,
            });
            Ok(())
        })?;
        self.stream.synchronize()?;
        Ok(traced)
    }

    /// Runs one step and returns the `[B, vocab]` logits of each sequence's last token.
    pub fn step_logits(&mut self, batch: &[StepSeq]) -> Result<Vec<f32>, CudaError> {
        let shape = self.prepare(batch)?;
        self.run_logits(shape)
    }

    fn run_logits(&mut self, shape: StepShape) -> Result<Vec<f32>, CudaError> {
        let b = shape.seqs;
        let p = self.ptrs(shape);
        self.kernels.run_plan(&self.stream, &p)?;
        let logits = p.buf(self.plan.logits);
        let mut host = vec![0f32; b * self.plan.vocab];
        // SAFETY: the logits buffer holds at least b·vocab f32 (arena slot sized for max_batch rows).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut host, logits, self.stream.cu_stream())?;
        }
        self.stream.synchronize()?;
        Ok(host)
    }

    /// Runs one step and returns the greedy next token of each sequence (argmax on the device).
    pub fn step_greedy(&mut self, batch: &[StepSeq]) -> Result<Vec<u32>, CudaError> {
        let shape = self.prepare(batch)?;
        self.run_greedy(shape)
    }

    fn run_greedy(&mut self, shape: StepShape) -> Result<Vec<u32>, CudaError> {
        self.run_choosing(shape, false)
    }

    fn run_sample(&mut self, shape: StepShape) -> Result<Vec<u32>, CudaError> {
        self.run_choosing(shape, true)
    }

    /// Runs the plan, then chooses each sequence's next token on the device (argmax, or a draw
    /// with the settings written after the step's metadata) and reads the tokens back.
    fn run_choosing(&mut self, shape: StepShape, sample: bool) -> Result<Vec<u32>, CudaError> {
        let (t, b) = (shape.tokens, shape.seqs);
        let p = self.ptrs(shape);
        let out_tokens = p.out_tokens;
        let base = self.meta.buf.device_ptr(&self.stream).0;
        let at = |off: usize| base + (off * 4) as u64;
        let m = self.meta.at;
        let settings = [at(m.temperature), at(m.top_k), at(m.top_p), at(m.seeds)];
        let launch = |kernels: &Kernels, stream: &Arc<CudaStream>| {
            kernels.run_plan(stream, &p)?;
            if sample {
                kernels.sample(stream, &p, settings)
            } else {
                kernels.argmax(stream, &p)
            }
        };
        // Decode steps (one token per sequence, GEMV-sized) replay a captured graph: every
        // per-step value lives in the metadata buffer written before the step, so the launches
        // and their arguments are the same for every step of a batch size.
        if self.opts.cuda_graphs
            && t == b
            && b <= super::plan_needs::GEMV_MAX_ROWS
            && !self.kernels.timeline_on()
        {
            let key = (b, sample);
            if !self.graphs.contains_key(&key) {
                use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
                self.stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                let launched = launch(&self.kernels, &self.stream);
                let graph = self.stream.end_capture(CUgraphInstantiate_flags(0))?;
                launched?;
                let graph = graph
                    .ok_or_else(|| CudaError::Driver("stream capture produced no graph".into()))?;
                graph.upload()?;
                self.graphs.insert(key, graph);
            }
            self.graphs[&key].launch()?;
        } else {
            launch(&self.kernels, &self.stream)?;
        }
        self.read_tokens(out_tokens, b)
    }

    /// Starts a per-launch timeline: until [`CudaExecutor::timeline_take`], every kernel launch
    /// (and cuBLAS call) is followed by an event, and steps run without CUDA graphs.
    pub fn timeline_start(&mut self) -> Result<(), CudaError> {
        self.kernels.timeline_start(&self.stream)
    }

    /// Ends the timeline: (kernel name expression or cuBLAS shape, µs) per launch, in order.
    pub fn timeline_take(&mut self) -> Result<Vec<(String, f64)>, CudaError> {
        self.kernels.timeline_take()
    }

    /// Copies the step's `b` sampled tokens back (the step's one host synchronization).
    fn read_tokens(&self, out_tokens: u64, b: usize) -> Result<Vec<u32>, CudaError> {
        let mut out = vec![0i32; b];
        // SAFETY: out_tokens holds max_batch ≥ b i32.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut out,
                out_tokens,
                self.stream.cu_stream(),
            )?;
        }
        self.stream.synchronize()?;
        Ok(out.into_iter().map(|v| v as u32).collect())
    }
}

/// What [`CudaExecutor::step_paged`] is asked for.
#[derive(Clone, Copy, Debug)]
pub enum Want<'a> {
    /// Each sequence's argmax token.
    Greedy,
    /// Each sequence's token drawn on the device with its settings (one per sequence).
    Sample(&'a [SampleParams]),
    /// Each sequence's logits row.
    Logits,
}

/// One sequence's device sampling settings (`sampling.cu`'s `sample`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// Temperature; ≤ 0 is greedy.
    pub temperature: f32,
    /// Top-k; 0 keeps every token.
    pub top_k: i32,
    /// Top-p; 1 keeps every token.
    pub top_p: f32,
    /// The sequence's seed.
    pub seed: u64,
    /// Its draw counter (the draw depends on seed and step only).
    pub step: u64,
}

/// Writes the sampling settings of a step into `h` (f32 values as their bits, u64 as two i32).
fn write_sampling(h: &mut [i32], m: &MetaLayout, params: &[SampleParams]) {
    for (i, s) in params.iter().enumerate() {
        h[m.temperature + i] = s.temperature.to_bits() as i32;
        h[m.top_k + i] = s.top_k;
        h[m.top_p + i] = s.top_p.to_bits() as i32;
        for (j, v) in [s.seed, s.step].into_iter().enumerate() {
            let at = m.seeds + 4 * i + 2 * j;
            h[at] = v as u32 as i32;
            h[at + 1] = (v >> 32) as u32 as i32;
        }
    }
}

/// What [`CudaExecutor::step_paged`] returns.
#[derive(Clone, Debug)]
pub enum StepResult {
    /// `[sequences, vocab]` logits, row-major.
    Logits(Vec<f32>),
    /// Each sequence's argmax token.
    Tokens(Vec<u32>),
}

/// The sizes of one step, as its metadata was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StepShape {
    /// Tokens (query rows) in the step.
    tokens: usize,
    /// Sequences in the step.
    seqs: usize,
    /// Query rows of its longest sequence (1 in a decode step).
    longest_query: usize,
    /// Leading sequences with one query row each (all of a decode step's): their attention runs
    /// the decode kernel, which rotates and appends their token itself.
    decodes: usize,
}

/// Checks a step against the executor's sizes and writes its metadata (tokens, positions, cache
/// slots, sequence lengths, query starts, block tables, last-token rows) into `h`. Returns the
/// step's sizes. Nothing is uploaded.
fn write_meta(
    h: &mut [i32],
    m: &MetaLayout,
    opts: &CudaOptions,
    total_blocks: usize,
    seqs: &[SeqStep<'_>],
) -> Result<StepShape, CudaError> {
    let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let b = seqs.len();
    if b == 0
        || b > opts.max_batch
        || t > opts.max_step_tokens
        || seqs.iter().any(|s| s.tokens.is_empty())
    {
        return Err(CudaError::Request(format!(
            "a step takes 1..={} sequences of ≥ 1 token and ≤ {} tokens in all; got {b} sequences, {t} tokens",
            opts.max_batch, opts.max_step_tokens
        )));
    }
    for s in seqs {
        let len = s.start + s.tokens.len();
        if len > opts.max_seq_len
            || s.blocks.len() > m.max_blocks
            || s.blocks.len() * BLOCK < len
            || s.blocks.iter().any(|&k| k as usize >= total_blocks)
        {
            return Err(CudaError::Request(format!(
                "a sequence of {len} tokens with {} cache blocks does not fit: at most {} tokens \
                 (--max-seq-len), {} blocks per sequence, block ids below {total_blocks}",
                s.blocks.len(),
                opts.max_seq_len,
                m.max_blocks
            )));
        }
    }
    let mut row = 0usize;
    h[m.query_start] = 0;
    for (i, s) in seqs.iter().enumerate() {
        for (j, &tok) in s.tokens.iter().enumerate() {
            let pos = s.start + j;
            h[m.tokens + row] = tok as i32;
            h[m.positions + row] = pos as i32;
            h[m.slots + row] = (s.blocks[pos / BLOCK] as usize * BLOCK + pos % BLOCK) as i32;
            row += 1;
        }
        h[m.seq_lens + i] = (s.start + s.tokens.len()) as i32;
        h[m.query_start + i + 1] = row as i32;
        h[m.last_index + i] = row as i32 - 1;
        for (k, blk) in s.blocks.iter().enumerate() {
            h[m.block_tables + i * m.max_blocks + k] = *blk as i32;
        }
    }
    Ok(StepShape {
        tokens: t,
        seqs: b,
        longest_query: seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0),
        decodes: seqs.iter().take_while(|s| s.tokens.len() == 1).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_metadata_of_caller_owned_block_tables() {
        let opts = CudaOptions {
            max_batch: 4,
            max_step_tokens: 64,
            max_seq_len: 64,
            ..CudaOptions::default()
        };
        let m = MetaLayout::new(opts.max_step_tokens, opts.max_batch, opts.max_seq_len);
        let mut h = vec![-1; m.len];
        // A prompt chunk of 3 tokens at positions 15..18 (crossing into its second block), and
        // a decode at position 4.
        let (a, b) = ([5u32, 6, 7], [9u32]);
        let seqs = [
            SeqStep {
                tokens: &a,
                start: 15,
                blocks: &[7, 2],
            },
            SeqStep {
                tokens: &b,
                start: 4,
                blocks: &[3],
            },
        ];
        assert_eq!(
            write_meta(&mut h, &m, &opts, 8, &seqs).unwrap(),
            StepShape {
                tokens: 4,
                seqs: 2,
                longest_query: 3,
                decodes: 0
            }
        );
        assert_eq!(&h[m.tokens..m.tokens + 4], &[5, 6, 7, 9]);
        assert_eq!(&h[m.positions..m.positions + 4], &[15, 16, 17, 4]);
        let bs = BLOCK as i32;
        assert_eq!(
            &h[m.slots..m.slots + 4],
            &[7 * bs + 15, 2 * bs, 2 * bs + 1, 3 * bs + 4]
        );
        assert_eq!(&h[m.seq_lens..m.seq_lens + 2], &[18, 5]);
        assert_eq!(&h[m.query_start..m.query_start + 3], &[0, 3, 4]);
        assert_eq!(&h[m.last_index..m.last_index + 2], &[2, 3]);
        assert_eq!(&h[m.block_tables..m.block_tables + 2], &[7, 2]);
        let row1 = m.block_tables + m.max_blocks;
        assert_eq!(h[row1], 3);
        // Sampling settings: f32 bits, and u64 pairs at 8-byte-aligned offsets.
        assert_eq!(m.seeds % 2, 0);
        let sp = SampleParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            seed: (3 << 32) | 5,
            step: 11,
        };
        write_sampling(&mut h, &m, &[sp, sp]);
        assert_eq!(f32::from_bits(h[m.temperature + 1] as u32), 0.7);
        assert_eq!(h[m.top_k], 40);
        assert_eq!(&h[m.seeds + 4..m.seeds + 8], &[5, 3, 11, 0]);
        // Decodes ahead of the chunk are the leading one-row sequences; one after it is not.
        let mixed = [seqs[1], seqs[1], seqs[0], seqs[1]];
        let shape = write_meta(&mut h, &m, &opts, 8, &mixed).unwrap();
        assert_eq!(
            (shape.tokens, shape.decodes, shape.longest_query),
            (6, 2, 3)
        );
        // Too few blocks, a block id past the cache, too many sequences: refused.
        let short = [SeqStep {
            tokens: &a,
            start: 15,
            blocks: &[7],
        }];
        assert!(write_meta(&mut h, &m, &opts, 8, &short).is_err());
        let outside = [SeqStep {
            tokens: &b,
            start: 0,
            blocks: &[8],
        }];
        assert!(write_meta(&mut h, &m, &opts, 8, &outside).is_err());
        let five = [SeqStep {
            tokens: &b,
            start: 0,
            blocks: &[1],
        }; 5];
        assert!(write_meta(&mut h, &m, &opts, 8, &five).is_err());
    }

    #[test]
    fn an_engine_for_another_gpu_is_refused_with_what_to_rebuild() {
        assert!(check_arch(Some("sm_90"), (9, 0)).is_ok());
        let msg = check_arch(Some("sm_90"), (8, 0)).unwrap_err().to_string();
        assert!(
            msg.contains("engine built for sm_90, but this GPU is sm_80"),
            "{msg}"
        );
        assert!(
            msg.contains("kiln build --target cuda --arch sm_80"),
            "{msg}"
        );
        assert!(check_arch(None, (9, 0)).is_err());
    }
}
