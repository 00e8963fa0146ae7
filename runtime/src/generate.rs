//! Text generation on the CPU executor: prefill the prompt, then decode one token a step,
//! sampling each from the last position's logits, until a stop token, a stop string, the
//! token budget or the context window ends it.

use crate::cpu::{CpuExecutor, ExecError};
use crate::sampling::{Sampler, SamplingParams, StopCriteria};
use crate::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
use std::time::Instant;

/// A generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Sampling settings (temperature 0 is greedy).
    pub sampling: SamplingParams,
    /// Token ids that end generation (ignored when `ignore_eos`).
    pub stop_ids: Vec<u32>,
    /// Strings that end generation; the text is cut before them.
    pub stop_strings: Vec<String>,
    /// Keep generating past stop tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Context window: prompt plus generated tokens may not exceed it.
    pub max_context: usize,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens` reached.
    Length,
    /// The context window is full.
    Context,
}

/// Timings of one generation.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Prefill wall time (ms) = time to first token.
    pub prefill_ms: f64,
    /// Decode wall time (ms), all steps after the first token.
    pub decode_ms: f64,
    /// Prompt tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second during decode.
    pub decode_tokens_per_s: f64,
}

/// The result of a generation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Generated token ids (including a final stop token, if any).
    pub generated_ids: Vec<u32>,
    /// Generated text (cut before a stop string; a stop token's text is not included).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The sampler's seed, when it sampled (temperature > 0); `None` for greedy decoding.
    pub seed: Option<u64>,
    /// Timings.
    pub timings: Timings,
}

/// A generation that could not run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt does not fit the context window.
    #[error("the prompt has {prompt} tokens but the context window is {context} tokens")]
    PromptTooLong {
        /// Prompt length.
        prompt: usize,
        /// Context window.
        context: usize,
    },
    /// An empty prompt.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Sampling settings out of range.
    #[error("{0}")]
    BadSampling(String),
    /// Executor failure.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// Tokenizer failure.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// GPU failure.
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
    /// The model has no `logits` output to sample the next token from.
    #[error("the model cannot generate text: {0}")]
    NoLogits(String),
}

/// Something that turns fed tokens into next-token logits: one sequence on some executor.
pub trait Decoder {
    /// Feeds tokens (the prompt, then one at a time) and returns the last token's logits.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError>;
    /// Tokens fed so far.
    fn past(&self) -> usize;
}

/// One sequence on the CPU executor.
pub struct CpuDecoder<'e> {
    exec: &'e CpuExecutor,
    session: crate::cpu::CpuSession,
}

impl<'e> CpuDecoder<'e> {
    /// A fresh sequence.
    pub fn new(exec: &'e CpuExecutor) -> Self {
        CpuDecoder {
            exec,
            session: exec.session(1),
        }
    }
}

impl Decoder for CpuDecoder<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let out = self.exec.step(&mut self.session, &ids, &[])?;
        let logits = out.outputs.get("logits").ok_or_else(|| {
            GenerateError::NoLogits(
                "its graph has no output named `logits` (declare one with `Output(\"logits\", …)`)"
                    .into(),
            )
        })?;
        if logits.shape.is_empty() {
            return Err(GenerateError::NoLogits(
                "its `logits` output is a scalar, not [batch, seq, vocab]".into(),
            ));
        }
        Ok(last_row(logits).to_vec())
    }
    fn past(&self) -> usize {
        self.session.past()
    }
}

/// One sequence on the CUDA executor.
pub struct CudaDecoder<'e> {
    exec: &'e mut crate::cuda::CudaExecutor,
    seq: crate::cuda::SeqId,
}

impl<'e> CudaDecoder<'e> {
    /// A fresh sequence.
    pub fn new(exec: &'e mut crate::cuda::CudaExecutor) -> Self {
        let seq = exec.add_sequence();
        CudaDecoder { exec, seq }
    }
}

impl Drop for CudaDecoder<'_> {
    fn drop(&mut self) {
        self.exec.remove_sequence(self.seq);
    }
}

impl Decoder for CudaDecoder<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        let step = [crate::cuda::StepSeq {
            seq: self.seq,
            tokens: tokens.to_vec(),
        }];
        Ok(self.exec.step_logits(&step)?)
    }
    fn past(&self) -> usize {
        self.exec.seq_len(self.seq)
    }
}

pub(crate) fn last_row(logits: &crate::cpu::HostTensor) -> &[f32] {
    let vocab = *logits.shape.last().expect("logits have a vocab axis");
    &logits.data[logits.data.len() - vocab..]
}

/// Generates from `req` on the CPU executor, calling `on_text` with each newly final piece of text.
pub fn generate(
    exec: &CpuExecutor,
    tok: &Tokenizer,
    req: &GenerateRequest,
    on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    generate_with(&mut CpuDecoder::new(exec), tok, req, on_text)
}

/// Generates from `req` with any decoder, calling `on_text` with each newly final piece of text.
pub fn generate_with(
    dec: &mut dyn Decoder,
    tok: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    let prompt = &req.prompt_ids;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() > req.max_context {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            context: req.max_context,
        });
    }
    req.sampling
        .validate()
        .map_err(GenerateError::BadSampling)?;
    let seed = (req.sampling.temperature > 0.0).then_some(req.sampling.seed);
    if req.max_new_tokens == 0 {
        return Ok(Generation {
            prompt_ids: prompt.clone(),
            generated_ids: vec![],
            text: String::new(),
            finish_reason: FinishReason::Length,
            seed,
            timings: Timings::default(),
        });
    }
    let stop = StopCriteria::new(
        if req.ignore_eos {
            vec![]
        } else {
            req.stop_ids.clone()
        },
        req.stop_strings.clone(),
    );
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut decoder = StreamDecoder::new(tok);
    let mut emitted = 0usize;
    let mut generated = Vec::new();
    let mut timings = Timings::default();

    let t0 = Instant::now();
    let mut next = sampler.sample(&dec.feed(prompt)?);
    timings.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let finish = loop {
        generated.push(next);
        if stop.check_token(next) {
            break FinishReason::Stop;
        }
        decoder.push(next)?;
        let text = decoder.text();
        if let Some(cut) = stop.find_stop_string(text) {
            on_text(&text[emitted.min(cut)..cut]);
            emitted = cut;
            break FinishReason::StopString;
        }
        let safe = stop.safe_prefix_len(text);
        if safe > emitted {
            on_text(&text[emitted..safe]);
            emitted = safe;
        }
        if generated.len() >= req.max_new_tokens {
            break FinishReason::Length;
        }
        if dec.past() >= req.max_context {
            break FinishReason::Context;
        }
        next = sampler.sample(&dec.feed(&[next])?);
    };
    timings.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
    let text = if finish == FinishReason::StopString {
        decoder.text()[..emitted].to_string()
    } else {
        decoder.finish()?;
        let text = decoder.text();
        if text.len() > emitted {
            on_text(&text[emitted..]);
        }
        text.to_string()
    };
    timings.prefill_tokens_per_s = prompt.len() as f64 / (timings.prefill_ms / 1e3);
    let decode_steps = generated.len().saturating_sub(1);
    timings.decode_tokens_per_s = if decode_steps > 0 {
        decode_steps as f64 / (timings.decode_ms / 1e3)
    } else {
        0.0
    };
    Ok(Generation {
        prompt_ids: prompt.clone(),
        generated_ids: generated,
        text,
        finish_reason: finish,
        seed,
        timings,
    })
}
