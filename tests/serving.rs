//! The continuous-batching scheduler on the CPU executor: requests that join at different steps,
//! are prefilled in chunks, share a prompt prefix, and get preempted and recomputed when the KV
//! cache runs out must produce exactly the tokens each prompt gives when run alone.

mod common;
mod tiny;

use kiln::runtime::cpu::CpuExecutor;
use kiln::runtime::engine::Engine;
use kiln::runtime::generate::{generate, GenerateRequest};
use kiln::runtime::sampling::SamplingParams;
use kiln::runtime::serving::{
    CpuBatchExecutor, Event, Finish, RejectReason, Request, Scheduler, SchedulerConfig,
};
use kiln::runtime::tokenizer::Tokenizer;
use std::sync::{Arc, Mutex, OnceLock};
use tiny::{TinyConfig, XorShift};

struct Model {
    _built: tiny::Built,
    engine: Engine,
    exec: CpuExecutor,
    tok: Arc<Tokenizer>,
}

/// The tiny GQA model (context 256), built once.
fn tiny_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let cfg = TinyConfig {
            max_positions: 256,
            ..TinyConfig::gqa()
        };
        let built = tiny::Built::new(&cfg);
        let engine = Engine::open(&built.engine()).unwrap();
        let exec = engine.cpu_executor().unwrap();
        let tok =
            Arc::new(Tokenizer::from_json(engine.tokenizer_json.as_deref().unwrap()).unwrap());
        Model {
            _built: built,
            engine,
            exec,
            tok,
        }
    })
}

fn scheduler(
    m: &Model,
    kv_tokens: usize,
    max_num_seqs: usize,
    max_num_tokens: usize,
) -> Scheduler<CpuBatchExecutor> {
    let exec = m.engine.cpu_executor().unwrap();
    let batch = CpuBatchExecutor::new(exec, 16, kv_tokens, 64, 4096).unwrap();
    Scheduler::new(
        batch,
        Some(m.tok.clone()),
        SchedulerConfig {
            max_num_seqs,
            max_num_tokens,
            max_context: m.engine.generation.max_context,
            prefix_caching: true,
        },
    )
}

type Log = Arc<Mutex<Vec<Event>>>;

fn request(id: u64, prompt: Vec<u32>, max_tokens: usize) -> (Request, Log) {
    let log: Log = Arc::default();
    let l2 = log.clone();
    let req = Request {
        id,
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        stop_strings: vec![],
        logprobs: None,
        detokenize: true,
        sink: Box::new(move |e| {
            l2.lock().unwrap().push(e);
            true
        }),
    };
    (req, log)
}

fn tokens_of(log: &Log) -> Vec<u32> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn text_of(log: &Log) -> String {
    log.lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            Event::Token { text, .. } | Event::Finished { text, .. } => text.as_str(),
            _ => "",
        })
        .collect()
}

fn finish_of(log: &Log) -> Option<Finish> {
    log.lock().unwrap().iter().find_map(|e| match e {
        Event::Finished { reason, .. } => Some(*reason),
        _ => None,
    })
}

fn alone(m: &Model, prompt: &[u32], n: usize) -> (Vec<u32>, String) {
    let req = GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        stop_strings: vec![],
        ignore_eos: true,
        max_context: m.engine.generation.max_context,
    };
    let g = generate(&m.exec, &m.tok, &req, |_| {}).unwrap();
    (g.generated_ids, g.text)
}

/// Runs until idle (bounded), returning the steps taken.
fn drain(s: &mut Scheduler<CpuBatchExecutor>) -> usize {
    let mut steps = 0;
    while !s.is_idle() {
        s.step().unwrap();
        steps += 1;
        assert!(steps < 10_000, "the scheduler does not finish");
    }
    steps
}

#[test]
fn mixed_batch_matches_each_prompt_run_alone() {
    let m = tiny_model();
    let mut rng = XorShift::new(7);
    let shared: Vec<u32> = (0..37).map(|_| 1 + rng.below(96) as u32).collect();
    let mut prompts = Vec::new();
    for i in 0..12 {
        let len = 3 + rng.below(40);
        let mut p: Vec<u32> = if i % 3 == 0 { shared.clone() } else { vec![] };
        p.extend((0..len).map(|_| 1 + rng.below(96) as u32));
        prompts.push((p, 4 + rng.below(20)));
    }
    // 12 blocks of 16: far fewer than the requests need together, so some are preempted and
    // recomputed; a budget of 24 tokens a step prefills the longer prompts in chunks.
    let mut s = scheduler(m, 12 * 16, 6, 24);
    let mut logs = Vec::new();
    for (i, (p, n)) in prompts.iter().enumerate() {
        let (req, log) = request(i as u64 + 1, p.clone(), *n);
        s.add(req).unwrap();
        logs.push(log);
        // Requests join while others run.
        for _ in 0..(i % 3) {
            s.step().unwrap();
        }
    }
    drain(&mut s);
    for (i, ((p, n), log)) in prompts.iter().zip(&logs).enumerate() {
        let (ids, text) = alone(m, p, *n);
        assert_eq!(
            tokens_of(log),
            ids,
            "request {i}: tokens differ from its run alone"
        );
        assert_eq!(text_of(log), text, "request {i}: text differs");
        assert_eq!(finish_of(log), Some(Finish::Length));
    }
    let st = s.stats();
    assert!(st.preemptions > 0, "no preemption happened: {st:?}");
    assert!(st.prefix_hit_tokens > 0, "no prefix was shared: {st:?}");
    assert_eq!(st.kv_blocks_used, 0, "blocks leaked: {st:?}");
    assert_eq!(st.finished, prompts.len() as u64);
}

#[test]
fn shared_prefix_blocks_are_reused_not_recomputed() {
    let m = tiny_model();
    let prefix: Vec<u32> = (1..=40).collect();
    let mut s = scheduler(m, 64 * 16, 8, 512);
    let mut a_prompt = prefix.clone();
    a_prompt.extend([50, 51, 52]);
    let (a, alog) = request(1, a_prompt.clone(), 3);
    s.add(a).unwrap();
    drain(&mut s);
    let mut b_prompt = prefix.clone();
    b_prompt.extend([60, 61]);
    let (b, blog) = request(2, b_prompt.clone(), 3);
    s.add(b).unwrap();
    drain(&mut s);
    // 40 shared tokens: two full blocks of 16 come from the cache.
    assert_eq!(s.stats().prefix_hit_tokens, 32);
    let cached = blog.lock().unwrap().iter().find_map(|e| match e {
        Event::Finished { cached_tokens, .. } => Some(*cached_tokens),
        _ => None,
    });
    assert_eq!(cached, Some(32));
    assert_eq!(tokens_of(&alog), alone(m, &a_prompt, 3).0);
    assert_eq!(tokens_of(&blog), alone(m, &b_prompt, 3).0);
}

#[test]
fn abort_and_a_gone_client_free_their_blocks_at_once() {
    let m = tiny_model();
    let mut s = scheduler(m, 32 * 16, 8, 512);
    let (a, _) = request(1, (1..30).collect(), 50);
    s.add(a).unwrap();
    // A client that stops listening after two tokens.
    let seen = Arc::new(Mutex::new(0usize));
    let seen2 = seen.clone();
    let b = Request {
        sink: Box::new(move |_| {
            let mut n = seen2.lock().unwrap();
            *n += 1;
            *n < 2
        }),
        ..request(2, (5..40).collect(), 50).0
    };
    s.add(b).unwrap();
    for _ in 0..3 {
        s.step().unwrap();
    }
    assert_eq!(*seen.lock().unwrap(), 2, "events after the client left");
    assert_eq!(s.stats().running, 1);
    assert!(s.stats().kv_blocks_used > 0);
    assert!(s.abort(1));
    assert!(!s.abort(1));
    assert_eq!(s.stats().kv_blocks_used, 0);
    assert!(s.is_idle());
}

#[test]
fn requests_that_cannot_run_are_refused_by_name() {
    let m = tiny_model();
    let s = scheduler(m, 4 * 16, 8, 512);
    let refuse = |prompt: Vec<u32>| s.check(&request(1, prompt, 4).0).unwrap_err();
    assert_eq!(refuse(vec![]), RejectReason::EmptyPrompt);
    // The cache holds 64 tokens, less than the context of 256: the cache is the limit.
    let e = refuse((0..64).map(|i| 1 + i % 90).collect());
    assert_eq!(
        e,
        RejectReason::PromptTooLong {
            prompt: 64,
            context: 64
        }
    );
    assert!(e.to_string().contains("at most 63 prompt tokens"), "{e}");
    let mut bad = request(1, vec![1, 2], 4).0;
    bad.sampling.top_p = 0.0;
    assert!(matches!(s.check(&bad), Err(RejectReason::Sampling(_))));
}

#[test]
fn a_request_that_fills_the_cache_ends_with_context() {
    let m = tiny_model();
    let mut s = scheduler(m, 2 * 16, 8, 512);
    let (a, log) = request(1, (1..20).collect(), 100);
    s.add(a).unwrap();
    drain(&mut s);
    assert_eq!(finish_of(&log), Some(Finish::Context));
    assert_eq!(tokens_of(&log).len(), 32 - 19);
}

#[test]
fn stop_strings_logprobs_and_sampling_per_request() {
    let m = tiny_model();
    let prompt: Vec<u32> = (10..30).collect();
    let (ids, text) = alone(m, &prompt, 12);
    // Stop at the text of the fourth generated word: the text before it is reported.
    let words: Vec<&str> = text.split_whitespace().collect();
    let stop = words[3].to_string();
    let mut s = scheduler(m, 32 * 16, 8, 512);
    let (mut a, alog) = request(1, prompt.clone(), 12);
    a.stop_strings = vec![stop.clone()];
    a.logprobs = Some(3);
    s.add(a).unwrap();
    // The same prompt sampled at temperature 1 with a seed, twice: the same tokens.
    let sampled = |id| {
        let (mut r, log) = request(id, prompt.clone(), 8);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        };
        (r, log)
    };
    let (b, blog) = sampled(2);
    let (c, clog) = sampled(3);
    s.add(b).unwrap();
    s.add(c).unwrap();
    drain(&mut s);
    assert_eq!(finish_of(&alog), Some(Finish::Stop));
    let got = text_of(&alog);
    let cut = text.find(&stop).unwrap();
    assert_eq!(got, text[..cut], "text before the stop string");
    assert_eq!(tokens_of(&alog), ids[..tokens_of(&alog).len()]);
    for e in alog.lock().unwrap().iter() {
        if let Event::Token { id, logprob, .. } = e {
            let lp = logprob.as_ref().expect("logprobs asked for");
            assert!(lp.logprob <= 0.0);
            assert_eq!(lp.top.len(), 3);
            assert_eq!(lp.top[0].0, *id, "greedy picks the most likely token");
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
    assert_eq!(tokens_of(&blog), tokens_of(&clog));
    assert_ne!(
        tokens_of(&blog),
        ids[..8],
        "sampling at temperature 1 gave the greedy tokens"
    );
}
