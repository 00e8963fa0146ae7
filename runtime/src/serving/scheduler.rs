//! Continuous batching: requests join and leave the running batch at every step.
//!
//! Each [`Scheduler::step`] plans one executor step under a token budget (`max_num_tokens`):
//! first every running sequence (one token for a decode, the next chunk for a prompt still being
//! prefilled), then waiting requests in arrival order while the budget, `max_num_seqs` and the
//! KV cache allow — a request is admitted only when blocks for its whole prompt are free, and its
//! longest cached prefix of full blocks is shared instead of recomputed. When a running sequence
//! needs a block and none is free, the most recently admitted sequence is preempted: its blocks
//! are freed and it goes back to the front of the queue, to be recomputed from its prompt and the
//! tokens it had generated (its full blocks usually still sit in the prefix cache). The plan is
//! complete before the executor runs, so a failing step changes nothing but the requests in it.
//!
//! After the step, sequences whose every token is in the cache sample their next token with
//! their own parameters, check their stop conditions, and report to their request's sink.

use super::blocks::{block_hash, BlockPool};
use super::executor::{BatchExecutor, SampleParams, SeqStep, StepResult, Want};
use crate::generate::GenerateError;
use crate::sampling::{Sampler, SamplingParams, StopCriteria};
use crate::tokenizer::{TextStream, Tokenizer};
use std::collections::VecDeque;
use std::sync::Arc;

/// A request's handle.
pub type RequestId = u64;

/// Where a request's events go. Returns `false` when nobody listens any more (the client left):
/// the request is then aborted and its blocks freed.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// One generation request.
pub struct Request {
    /// Its handle (unique among live requests).
    pub id: RequestId,
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Token ids that end the generation.
    pub stop_ids: Vec<u32>,
    /// Strings that end it (the text is cut before them); needs a tokenizer.
    pub stop_strings: Vec<String>,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Report text (needs a tokenizer); without it only token ids are reported.
    pub detokenize: bool,
    /// Where the events go.
    pub sink: Sink,
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the chosen token (softmax of the raw logits).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` generated.
    Length,
    /// The context window (or the whole KV cache) is full.
    Context,
}

/// What a request reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token; `text` is the text it makes final (possibly empty; never includes a
    /// stop token's text or anything from a stop string on).
    Token {
        /// Token id.
        id: u32,
        /// Newly final text.
        text: String,
        /// Its log-probability, when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// The request is complete.
    Finished {
        /// Why.
        reason: Finish,
        /// Text held back until the end (an incomplete character or a partial stop string).
        text: String,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens (including a stop token).
        completion_tokens: usize,
        /// Prompt tokens whose KV came from the prefix cache.
        cached_tokens: usize,
    },
    /// The request failed (the executor failed a step it was in).
    Failed(String),
}

/// Limits of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences running (holding KV blocks) at once.
    pub max_num_seqs: usize,
    /// Most tokens in one step (decodes plus prompt chunks).
    pub max_num_tokens: usize,
    /// The model's context window.
    pub max_context: usize,
    /// Share full KV blocks between requests with the same prefix.
    pub prefix_caching: bool,
}

/// A request that cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RejectReason {
    /// Empty prompt.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt leaves no room in the context window for a generated token.
    #[error("the prompt has {prompt} tokens; the context window is {context} tokens, so at most {} prompt tokens leave room to generate", context - 1)]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Context window (or KV cache capacity, if smaller).
        context: usize,
    },
    /// Sampling settings out of range.
    #[error("{0}")]
    Sampling(String),
    /// Stop strings need text.
    #[error("stop strings need a tokenizer, and this engine has none")]
    NoTokenizer,
    /// A live request has this id.
    #[error("request id {0} is in use")]
    DuplicateId(RequestId),
}

/// Counters and gauges of the scheduler.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SchedulerStats {
    /// Requests running (holding KV blocks).
    pub running: usize,
    /// Requests waiting for admission.
    pub waiting: usize,
    /// KV blocks in use.
    pub kv_blocks_used: usize,
    /// KV blocks in all.
    pub kv_blocks_total: usize,
    /// Steps run.
    pub steps: u64,
    /// Prompt tokens fed (recomputation included).
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_hit_tokens: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Requests finished (any reason, aborts included).
    pub finished: u64,
    /// Seconds spent inside the executor's steps (the rest of a run's time is the host's:
    /// planning, sampling on the host, detokenizing, reporting).
    pub exec_seconds: f64,
    /// Steps that only decoded (one generated token per sequence, no prompt chunk).
    pub decode_steps: u64,
    /// Seconds inside those steps (the rest of `exec_seconds` ran steps with prompt chunks).
    pub decode_seconds: f64,
}

/// A request in the scheduler.
struct Seq {
    req: Request,
    /// Prompt plus generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose KV is in `blocks`.
    computed: usize,
    blocks: Vec<u32>,
    /// Chained hashes of the full blocks of `tokens` (computed as blocks fill).
    hashes: Vec<u64>,
    /// Leading blocks registered in the prefix cache since the last admission.
    registered: usize,
    cached_tokens: usize,
    sampler: Sampler,
    stop: StopCriteria,
    text: TextStream,
    /// Bytes of `text` already reported.
    emitted: usize,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The continuous-batching scheduler over an executor.
pub struct Scheduler<E: BatchExecutor> {
    exec: E,
    tok: Option<Arc<Tokenizer>>,
    cfg: SchedulerConfig,
    pool: BlockPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    stats: SchedulerStats,
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Sequences in the step.
    pub seqs: usize,
    /// Tokens fed.
    pub tokens: usize,
    /// Sequences preempted while planning it.
    pub preempted: usize,
}

impl<E: BatchExecutor> Scheduler<E> {
    /// A scheduler over `exec`; `tok` turns tokens into text (requests without text, e.g. for
    /// benchmarks, need none).
    pub fn new(exec: E, tok: Option<Arc<Tokenizer>>, cfg: SchedulerConfig) -> Self {
        let pool = BlockPool::new(exec.num_blocks(), exec.block_size());
        let stats = SchedulerStats {
            kv_blocks_total: pool.total(),
            ..Default::default()
        };
        Scheduler {
            exec,
            tok,
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats,
        }
    }

    /// The longest sequence (prompt plus generated tokens) a request may reach: the context
    /// window, or the whole KV cache if that is smaller.
    pub fn max_seq_len(&self) -> usize {
        self.cfg
            .max_context
            .min(self.pool.total() * self.pool.block_size())
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The executor.
    pub fn executor(&self) -> &E {
        &self.exec
    }

    /// Counters and gauges now.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_used: self.pool.used(),
            ..self.stats.clone()
        }
    }

    /// No request waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Checks a request without queueing it.
    pub fn check(&self, req: &Request) -> Result<(), RejectReason> {
        check_request(req, self.max_seq_len(), self.tok.is_some())?;
        if self.find(req.id).is_some() {
            return Err(RejectReason::DuplicateId(req.id));
        }
        Ok(())
    }

    /// Queues a request; it runs from the next step on. A request with `max_tokens` 0 finishes
    /// at once. A refused request also gets [`Event::Failed`] with the reason.
    pub fn add(&mut self, mut req: Request) -> Result<(), RejectReason> {
        if let Err(e) = self.check(&req) {
            (req.sink)(Event::Failed(e.to_string()));
            return Err(e);
        }
        let stop = StopCriteria::new(req.stop_ids.clone(), req.stop_strings.clone());
        let mut seq = Seq {
            tokens: req.prompt.clone(),
            prompt_len: req.prompt.len(),
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            registered: 0,
            cached_tokens: 0,
            sampler: Sampler::new(req.sampling.clone()),
            stop,
            text: TextStream::default(),
            emitted: 0,
            req,
        };
        if seq.req.max_tokens == 0 {
            self.finish(&mut seq, Finish::Length);
            return Ok(());
        }
        self.waiting.push_back(seq);
        Ok(())
    }

    fn find(&self, id: RequestId) -> Option<()> {
        let hit = |s: &Seq| s.req.id == id;
        (self.waiting.iter().any(hit) || self.running.iter().any(hit)).then_some(())
    }

    /// Drops a request at once, freeing its blocks; `false` if no such request is live.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            let mut s = self.waiting.remove(i).expect("found");
            self.free_blocks(&mut s);
            self.stats.finished += 1;
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            let mut s = self.running.remove(i);
            self.free_blocks(&mut s);
            self.stats.finished += 1;
            return true;
        }
        false
    }

    fn free_blocks(&mut self, s: &mut Seq) {
        for b in s.blocks.drain(..) {
            self.pool.release(b);
        }
        s.computed = 0;
        s.registered = 0;
    }

    /// Frees a running sequence's blocks and puts it first in the queue, to be recomputed.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.free_blocks(&mut s);
        self.stats.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Grows `running[i]`'s blocks to hold `len` tokens, preempting the most recently admitted
    /// other sequences as needed. `false` if `running[i]` itself had to be preempted.
    fn grow(&mut self, i: usize, len: usize, preempted: &mut usize) -> bool {
        let need = self
            .pool
            .blocks_for(len)
            .saturating_sub(self.running[i].blocks.len());
        while self.pool.free() < need {
            let victim = self.running.len() - 1;
            self.preempt(victim);
            *preempted += 1;
            if victim == i {
                return false;
            }
        }
        for _ in 0..need {
            let b = self.pool.alloc().expect("free blocks counted");
            self.running[i].blocks.push(b);
        }
        true
    }

    /// Admits the first waiting request if its prompt's blocks are free and the limits allow:
    /// shares its cached prefix and returns its index in `running`.
    fn admit(&mut self) -> Option<usize> {
        let s = self.waiting.front_mut()?;
        let bs = self.pool.block_size();
        // Hashes of the full blocks of everything but the last token (which must be computed to
        // give logits).
        let full = (s.tokens.len() - 1) / bs;
        while s.hashes.len() < full {
            let k = s.hashes.len();
            let parent = k.checked_sub(1).map(|p| s.hashes[p]);
            s.hashes
                .push(block_hash(parent, &s.tokens[k * bs..(k + 1) * bs]));
        }
        let hits = if self.cfg.prefix_caching {
            self.pool.lookup(&s.hashes[..full])
        } else {
            Vec::new()
        };
        // Blocks for the whole (re)computed prompt plus the first generated token.
        let need = self.pool.blocks_for(s.tokens.len() + 1) - hits.len();
        if self.pool.free() - self.pool.unused_among(&hits) < need {
            return None;
        }
        let mut s = self.waiting.pop_front().expect("front exists");
        for &b in &hits {
            self.pool.share(b);
        }
        s.computed = hits.len() * bs;
        s.registered = hits.len();
        s.blocks = hits;
        if s.generated() == 0 {
            s.cached_tokens = s.computed;
        }
        self.stats.prefix_hit_tokens += s.computed as u64;
        self.running.push(s);
        Some(self.running.len() - 1)
    }

    /// Runs one step: plans it, runs the executor, samples and reports. Does nothing when idle.
    /// An executor failure fails the requests of the step (each gets [`Event::Failed`]) and is
    /// returned.
    pub fn step(&mut self) -> Result<StepReport, GenerateError> {
        let mut report = StepReport::default();
        let mut budget = self.cfg.max_num_tokens.min(self.exec.max_step_tokens());
        let max_batch = self.exec.max_batch();
        // (index in running, tokens fed)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 && plan.len() < max_batch {
            let s = &self.running[i];
            let chunk = (s.tokens.len() - s.computed).min(budget);
            let len = s.computed + chunk;
            if !self.grow(i, len, &mut report.preempted) {
                break;
            }
            plan.push((i, chunk));
            budget -= chunk;
            i += 1;
        }
        if report.preempted == 0 {
            while budget > 0 && plan.len() < max_batch && self.running.len() < self.cfg.max_num_seqs
            {
                let Some(i) = self.admit() else { break };
                let s = &self.running[i];
                let chunk = (s.tokens.len() - s.computed).min(budget);
                let len = s.computed + chunk;
                let grown = self.grow(i, len, &mut report.preempted);
                debug_assert!(grown, "admission checked the blocks");
                plan.push((i, chunk));
                budget -= chunk;
            }
        }
        if plan.is_empty() {
            return Ok(report);
        }
        let steps: Vec<SeqStep<'_>> = plan
            .iter()
            .map(|&(i, chunk)| {
                let s = &self.running[i];
                SeqStep {
                    tokens: &s.tokens[s.computed..s.computed + chunk],
                    start: s.computed,
                    blocks: &s.blocks,
                }
            })
            .collect();
        report.seqs = plan.len();
        report.tokens = plan.iter().map(|p| p.1).sum();
        // Choose tokens on the device unless a sequence wants log-probabilities (which need
        // the logits): argmax when every sequence is greedy, else a draw with each one's
        // settings (a sequence still prefilling draws nothing that is used).
        let sampling: Vec<SampleParams> = plan
            .iter()
            .map(|&(i, _)| {
                let s = &self.running[i];
                let p = &s.req.sampling;
                SampleParams {
                    temperature: if p.is_greedy() { 0.0 } else { p.temperature },
                    top_k: i32::try_from(p.top_k).unwrap_or(i32::MAX),
                    top_p: p.top_p,
                    seed: p.seed,
                    step: s.generated() as u64,
                }
            })
            .collect();
        let want = if plan
            .iter()
            .any(|&(i, _)| self.running[i].req.logprobs.is_some())
        {
            Want::Logits
        } else if sampling.iter().all(|p| p.temperature == 0.0) {
            Want::Greedy
        } else {
            Want::Sample(&sampling)
        };
        let decode_only = report.tokens == report.seqs
            && plan
                .iter()
                .all(|&(i, _)| self.running[i].computed >= self.running[i].prompt_len);
        let t0 = std::time::Instant::now();
        let ran = self.exec.step(&steps, want);
        let took = t0.elapsed().as_secs_f64();
        self.stats.exec_seconds += took;
        if decode_only && ran.is_ok() {
            self.stats.decode_steps += 1;
            self.stats.decode_seconds += took;
        }
        let out = match ran {
            Ok(l) => l,
            Err(e) => {
                let msg = e.to_string();
                let mut failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
                failed.sort_unstable();
                for &i in failed.iter().rev() {
                    let mut s = self.running.remove(i);
                    self.free_blocks(&mut s);
                    (s.req.sink)(Event::Failed(msg.clone()));
                    self.stats.finished += 1;
                }
                return Err(e);
            }
        };
        self.stats.steps += 1;
        let vocab = self.exec.vocab();
        let max_len = self.max_seq_len();
        let mut done: Vec<(usize, Option<Finish>)> = Vec::new();
        for (r, &(i, chunk)) in plan.iter().enumerate() {
            let s = &mut self.running[i];
            let generating = s.computed + chunk == s.tokens.len();
            let decode = generating && chunk == 1 && s.computed >= s.prompt_len;
            if !decode {
                self.stats.prompt_tokens += chunk as u64;
            }
            s.computed += chunk;
            register_full_blocks(&mut self.pool, s);
            if !generating {
                continue;
            }
            let choice = match &out {
                StepResult::Logits(l) => Choice::Logits(&l[r * vocab..(r + 1) * vocab]),
                StepResult::Tokens(t) => Choice::Token(t[r]),
            };
            let outcome = emit_token(s, choice, self.tok.as_deref(), max_len);
            self.stats.generated_tokens += 1;
            match outcome {
                Outcome::Continue => {}
                Outcome::Finish(f) => done.push((i, Some(f))),
                Outcome::Gone => done.push((i, None)),
            }
        }
        done.sort_unstable_by_key(|d| d.0);
        for &(i, finish) in done.iter().rev() {
            let mut s = self.running.remove(i);
            if let Some(f) = finish {
                self.finish(&mut s, f);
            } else {
                self.stats.finished += 1;
            }
            self.free_blocks(&mut s);
        }
        Ok(report)
    }

    /// Reports the end of a request (flushing held-back text).
    fn finish(&mut self, s: &mut Seq, reason: Finish) {
        let mut text = String::new();
        if let (true, Some(tok)) = (s.req.detokenize, &self.tok) {
            // Flush what was held back, unless a stop string ended the text.
            if s.stop.find_stop_string(s.text.text()).is_none() {
                let _ = s.text.finish(tok);
            }
            let all = s.text.text();
            let end = s.stop.find_stop_string(all).unwrap_or(all.len());
            if end > s.emitted {
                text = all[s.emitted..end].to_string();
                s.emitted = end;
            }
        }
        self.stats.finished += 1;
        let event = Event::Finished {
            reason,
            text,
            prompt_tokens: s.prompt_len,
            completion_tokens: s.generated(),
            cached_tokens: s.cached_tokens,
        };
        (s.req.sink)(event);
    }
}

/// Registers the sequence's newly filled blocks in the prefix cache.
fn register_full_blocks(pool: &mut BlockPool, s: &mut Seq) {
    let bs = pool.block_size();
    let full = s.computed / bs;
    while s.registered < full {
        let k = s.registered;
        if s.hashes.len() == k {
            let parent = k.checked_sub(1).map(|p| s.hashes[p]);
            s.hashes
                .push(block_hash(parent, &s.tokens[k * bs..(k + 1) * bs]));
        }
        pool.register(s.blocks[k], s.hashes[k]);
        s.registered += 1;
    }
}

enum Outcome {
    Continue,
    Finish(Finish),
    /// The sink is gone: abort.
    Gone,
}

/// A step's result for one sequence.
enum Choice<'a> {
    /// Its logits row, to sample from.
    Logits(&'a [f32]),
    /// Its token, chosen on the device (greedy).
    Token(u32),
}

/// Samples the next token of `s` (or takes the device's), appends it, reports it and checks the
/// stop conditions.
fn emit_token(s: &mut Seq, choice: Choice<'_>, tok: Option<&Tokenizer>, max_len: usize) -> Outcome {
    let (id, logprob) = match choice {
        Choice::Logits(row) => {
            let id = s.sampler.sample(row);
            (id, s.req.logprobs.map(|k| logprobs(row, id, k)))
        }
        Choice::Token(id) => (id, None),
    };
    s.tokens.push(id);
    if s.stop.check_token(id) {
        return if (s.req.sink)(Event::Token {
            id,
            text: String::new(),
            logprob,
        }) {
            Outcome::Finish(Finish::Stop)
        } else {
            Outcome::Gone
        };
    }
    let mut text = String::new();
    let mut stopped = false;
    if let (true, Some(tok)) = (s.req.detokenize, tok) {
        // A token the tokenizer cannot decode is shown as nothing (ids are still reported).
        let _ = s.text.push(tok, id);
        let all = s.text.text();
        let end = match s.stop.find_stop_string(all) {
            Some(cut) => {
                stopped = true;
                cut
            }
            None => s.stop.safe_prefix_len(all),
        };
        if end > s.emitted {
            text = all[s.emitted..end].to_string();
            s.emitted = end;
        }
    }
    if !(s.req.sink)(Event::Token { id, text, logprob }) {
        return Outcome::Gone;
    }
    if stopped {
        Outcome::Finish(Finish::Stop)
    } else if s.generated() >= s.req.max_tokens {
        Outcome::Finish(Finish::Length)
    } else if s.tokens.len() >= max_len {
        Outcome::Finish(Finish::Context)
    } else {
        Outcome::Continue
    }
}

/// Log-softmax of `row` at `id`, and the `k` most likely tokens.
pub fn logprobs(row: &[f32], id: u32, k: usize) -> TokenLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |v: f32| (f64::from(v) - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let k = k.min(idx.len());
        let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
        idx.sort_unstable_by(by);
        top = idx.into_iter().map(|i| (i, lp(row[i as usize]))).collect();
    }
    TokenLogprob {
        logprob: lp(row[id as usize]),
        top,
    }
}

/// The checks of [`Scheduler::check`] that need only the limits.
pub fn check_request(
    req: &Request,
    max_seq_len: usize,
    has_tokenizer: bool,
) -> Result<(), RejectReason> {
    if req.prompt.is_empty() {
        return Err(RejectReason::EmptyPrompt);
    }
    if req.prompt.len() >= max_seq_len {
        return Err(RejectReason::PromptTooLong {
            prompt: req.prompt.len(),
            context: max_seq_len,
        });
    }
    req.sampling.validate().map_err(RejectReason::Sampling)?;
    if (!req.stop_strings.is_empty() || req.detokenize) && !has_tokenizer {
        return Err(RejectReason::NoTokenizer);
    }
    Ok(())
}
