//! `kiln serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or server-sent events
//! ending in `data: [DONE]` with `stream: true`), `GET /v1/models`, `GET /health`, `GET
//! /metrics` (Prometheus). With an API key every route but `/health` needs `Authorization:
//! Bearer <key>`. A request becomes one scheduler request per choice; their events come back
//! through a channel to the handler, which answers at the end or streams each token. A streaming
//! client that goes away has its requests aborted at once (their KV blocks freed); so does a
//! non-streaming one whose connection the server sees close.

pub mod metrics;
pub mod openai;

use axum::body::Bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_runtime::chat::ChatTemplate;
use kiln_runtime::sampling::SamplingParams;
use kiln_runtime::serving::engine_loop::SubmitError;
use kiln_runtime::serving::{Event, Finish, Request, RequestId, ServeHandle, TokenLogprob};
use kiln_runtime::tokenizer::Tokenizer;
use metrics::{Metrics, Outcome};
use openai::{ApiError, Settings};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// What the handlers share.
pub struct App {
    /// The scheduler.
    pub handle: ServeHandle,
    /// The engine's tokenizer.
    pub tok: Arc<Tokenizer>,
    /// The engine's chat template, if it has one.
    pub template: Option<ChatTemplate>,
    /// The engine's stop token ids.
    pub stop_ids: Vec<u32>,
    /// The model name clients use (`model`).
    pub name: String,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Latency histograms and counters.
    pub metrics: Metrics,
    /// Recent (time, generated tokens) samples for the rate gauge.
    rate: Mutex<VecDeque<(Instant, u64)>>,
    created: u64,
}

impl App {
    /// The shared state of a server.
    pub fn new(
        handle: ServeHandle,
        tok: Arc<Tokenizer>,
        template: Option<ChatTemplate>,
        stop_ids: Vec<u32>,
        name: String,
        api_key: Option<String>,
    ) -> App {
        App {
            handle,
            tok,
            template,
            stop_ids,
            name,
            api_key,
            metrics: Metrics::default(),
            rate: Mutex::new(VecDeque::new()),
            created: unix_now(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes, with the API-key check.
pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .with_state(app)
}

/// Samples the generated-token counter once a second for the rate gauge (until the server ends).
pub async fn sample_rate(app: Arc<App>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let n = app.handle.stats().generated_tokens;
        if let Ok(mut r) = app.rate.lock() {
            r.push_back((Instant::now(), n));
            while r.len() > 11 {
                r.pop_front();
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

async fn auth(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::status(
                401,
                "authentication_error",
                "a valid API key is required: `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found() -> Response {
    ApiError::status(404, "not_found_error", "no such route").into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.handle.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": app.name, "object": "model", "created": app.created, "owned_by": "kiln",
        "max_model_len": app.handle.max_seq_len(),
    }]}))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let rate = app
        .rate
        .lock()
        .ok()
        .and_then(|r| {
            let (a, b) = (r.front()?, r.back()?);
            let dt = b.0.duration_since(a.0).as_secs_f64();
            (dt > 0.0).then(|| (b.1 - a.1) as f64 / dt)
        })
        .unwrap_or(0.0);
    let body = app.metrics.render(&app.handle.stats(), rate);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The API's answer to a refused request, counted.
fn refuse(app: &App, e: ApiError) -> Response {
    if e.status < 500 {
        app.metrics.rejected();
    }
    e.into_response()
}

async fn completions(State(app): State<Arc<App>>, _h: HeaderMap, body: Bytes) -> Response {
    match completions_inner(&app, &body) {
        Ok((prompts, s)) => respond(app, prompts, s, Kind::Completion).await,
        Err(e) => refuse(&app, e),
    }
}

fn completions_inner(app: &App, body: &[u8]) -> Result<(Vec<Vec<u32>>, Settings), ApiError> {
    let (r, c): (openai::CompletionRequest, _) =
        openai::parse(body, &openai::CompletionRequest::FIELDS)?;
    let s = openai::completion_settings(&r, &c, &app.name)?;
    let encode = |t: &str| {
        app.tok
            .encode(t)
            .map_err(|e| ApiError::bad("prompt", format!("the prompt cannot be tokenized: {e}")))
    };
    let prompts = match r.prompt {
        openai::Prompt::Text(t) => vec![encode(&t)?],
        openai::Prompt::Ids(ids) => vec![ids],
        openai::Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        openai::Prompt::IdLists(l) => l,
    };
    if prompts.is_empty() {
        return Err(ApiError::bad(
            "prompt",
            "`prompt` must not be an empty list",
        ));
    }
    let vocab = app.tok.vocab_size() as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id >= vocab) {
        return Err(ApiError::bad(
            "prompt",
            format!("token id {bad} is outside the vocabulary (0..{vocab})"),
        ));
    }
    Ok((prompts, s))
}

async fn chat(State(app): State<Arc<App>>, _h: HeaderMap, body: Bytes) -> Response {
    match chat_inner(&app, &body) {
        Ok((prompt, s)) => respond(app, vec![prompt], s, Kind::Chat).await,
        Err(e) => refuse(&app, e),
    }
}

fn chat_inner(app: &App, body: &[u8]) -> Result<(Vec<u32>, Settings), ApiError> {
    let (r, c): (openai::ChatRequest, _) = openai::parse(body, &openai::ChatRequest::FIELDS)?;
    let s = openai::chat_settings(&r, &c, &app.name)?;
    let template = app.template.as_ref().ok_or_else(|| {
        ApiError::bad(
            "messages",
            "this engine has no chat template; use /v1/completions",
        )
    })?;
    let messages = openai::chat_messages(&r.messages)?;
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad("messages", format!("the chat template refused: {e}")))?;
    let ids = app
        .tok
        .encode(&text)
        .map_err(|e| ApiError::bad("messages", format!("cannot be tokenized: {e}")))?;
    Ok((ids, s))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// Aborts the requests of a response that is dropped before they finish.
struct AbortGuard {
    handle: ServeHandle,
    live: Vec<Option<RequestId>>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        for id in self.live.iter().flatten() {
            self.handle.abort(*id);
        }
    }
}

/// One choice as it is built.
struct ChoiceState {
    prompt_tokens: usize,
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    completion_tokens: usize,
    started: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    gaps: Vec<f64>,
}

/// The submitted requests of one API call.
struct Running {
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
    guard: AbortGuard,
    choices: Vec<ChoiceState>,
    id: String,
    kind: Kind,
    settings: Settings,
}

fn submit(app: &App, prompts: Vec<Vec<u32>>, s: Settings, kind: Kind) -> Result<Running, ApiError> {
    let limit = app.handle.max_seq_len();
    for (i, p) in prompts.iter().enumerate() {
        let param = if kind == Kind::Chat {
            "messages"
        } else {
            "prompt"
        };
        if p.is_empty() {
            return Err(ApiError::bad(param, "the prompt is empty"));
        }
        if p.len() >= limit {
            return Err(ApiError::bad(
                param,
                format!(
                    "the prompt{} has {} tokens; this model's context is {limit} tokens, so a \
                     prompt may have at most {} (it is not truncated)",
                    if prompts.len() > 1 {
                        format!(" {i}")
                    } else {
                        String::new()
                    },
                    p.len(),
                    limit - 1
                ),
            ));
        }
        if let Some(m) = s.max_tokens {
            if p.len() + m > limit {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!(
                        "this model's context is {limit} tokens, but {} were asked for ({} in the \
                         prompt, {m} to generate); lower `max_tokens`",
                        p.len() + m,
                        p.len()
                    ),
                ));
            }
        }
    }
    let started = Instant::now();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut guard = AbortGuard {
        handle: app.handle.clone(),
        live: Vec::new(),
    };
    let mut choices = Vec::new();
    let base_seed = s.seed;
    for p in &prompts {
        for _ in 0..s.n {
            let index = choices.len();
            let id = app.handle.next_id();
            let seed = match base_seed {
                Some(seed) => seed.wrapping_add(index as u64),
                None => random_seed(id),
            };
            let tx = tx.clone();
            let req = Request {
                id,
                prompt: p.clone(),
                max_tokens: s.max_tokens.unwrap_or(limit - p.len()),
                sampling: SamplingParams {
                    temperature: s.temperature,
                    top_k: s.top_k,
                    top_p: s.top_p,
                    seed,
                },
                stop_ids: if s.ignore_eos {
                    vec![]
                } else {
                    app.stop_ids.clone()
                },
                stop_strings: s.stop.clone(),
                logprobs: s.logprobs,
                detokenize: true,
                sink: Box::new(move |e| tx.send((index, e)).is_ok()),
            };
            app.handle.submit(req).map_err(|e| match e {
                SubmitError::Rejected(r) => ApiError::bad("", r.to_string()),
                SubmitError::Draining => {
                    ApiError::status(503, "unavailable_error", "the server is shutting down")
                }
                SubmitError::Stopped => {
                    ApiError::status(500, "internal_error", "the scheduler has stopped")
                }
            })?;
            guard.live.push(Some(id));
            choices.push(ChoiceState {
                prompt_tokens: p.len(),
                text: String::new(),
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finish: None,
                completion_tokens: 0,
                started,
                first: None,
                last: None,
                gaps: Vec::new(),
            });
        }
    }
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    Ok(Running {
        rx,
        guard,
        choices,
        id: format!("{prefix}-{:x}{:08x}", unix_now(), app.handle.next_id()),
        kind,
        settings: s,
    })
}

fn random_seed(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// What an event did to its choice.
enum Step {
    /// A token with its text piece.
    Token(String, Option<(u32, TokenLogprob)>),
    /// The choice ended (with the last text piece).
    Done(String),
    /// The request failed.
    Failed(String),
}

impl Running {
    fn apply(&mut self, app: &App, index: usize, e: Event) -> Step {
        let c = &mut self.choices[index];
        let now = Instant::now();
        match e {
            Event::Token { id, text, logprob } => {
                if let Some(last) = c.last {
                    c.gaps.push(now.duration_since(last).as_secs_f64());
                }
                c.first.get_or_insert(now);
                c.last = Some(now);
                c.tokens.push(id);
                c.text.push_str(&text);
                let lp = logprob.map(|l| {
                    c.logprobs.push(l.clone());
                    (id, l)
                });
                Step::Token(text, lp)
            }
            Event::Finished {
                reason,
                text,
                completion_tokens,
                ..
            } => {
                c.text.push_str(&text);
                c.finish = Some(match reason {
                    Finish::Stop => "stop",
                    Finish::Length | Finish::Context => "length",
                });
                c.completion_tokens = completion_tokens;
                self.guard.live[index] = None;
                let outcome = if reason == Finish::Stop {
                    Outcome::Stop
                } else {
                    Outcome::Length
                };
                app.metrics.record(
                    c.first.map(|f| f.duration_since(c.started).as_secs_f64()),
                    &c.gaps,
                    now.duration_since(c.started).as_secs_f64(),
                    outcome,
                );
                Step::Done(text)
            }
            Event::Failed(msg) => {
                self.guard.live[index] = None;
                app.metrics.record(None, &[], 0.0, Outcome::Error);
                Step::Failed(msg)
            }
        }
    }

    fn usage(&self) -> Value {
        // Prompt tokens count once per prompt, not per choice.
        let n = self.settings.n;
        let prompt: usize = self
            .choices
            .iter()
            .step_by(n)
            .map(|c| c.prompt_tokens)
            .sum();
        let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }

    fn all_done(&self) -> bool {
        self.guard.live.iter().all(|l| l.is_none())
    }
}

/// Token text for log-probabilities.
fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id]).unwrap_or_default()
}

fn chat_logprobs(tok: &Tokenizer, items: &[(u32, TokenLogprob)]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = items
        .iter()
        .map(|(id, l)| {
            let mut e = entry(*id, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(i, v)| entry(i, v)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

fn completion_logprobs(tok: &Tokenizer, items: &[(u32, TokenLogprob)], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for (id, l) in items {
        let t = token_text(tok, *id);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        lps.push(l.logprob);
        let top: serde_json::Map<String, Value> = l
            .top
            .iter()
            .map(|&(i, v)| (token_text(tok, i), json!(v)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

async fn respond(app: Arc<App>, prompts: Vec<Vec<u32>>, s: Settings, kind: Kind) -> Response {
    let stream = s.stream;
    let run = match submit(&app, prompts, s, kind) {
        Ok(r) => r,
        Err(e) => return refuse(&app, e),
    };
    if stream {
        stream_response(app, run)
    } else {
        whole_response(app, run).await
    }
}

async fn whole_response(app: Arc<App>, mut run: Running) -> Response {
    while !run.all_done() {
        let Some((index, e)) = run.rx.recv().await else {
            break;
        };
        if let Step::Failed(msg) = run.apply(&app, index, e) {
            return ApiError::status(500, "internal_error", format!("generation failed: {msg}"))
                .into_response();
        }
    }
    let tok = app.tok.clone();
    let choices: Vec<Value> = run
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let items: Vec<(u32, TokenLogprob)> = c
                .tokens
                .iter()
                .copied()
                .zip(c.logprobs.iter().cloned())
                .collect();
            let has_lp = run.settings.logprobs.is_some();
            match run.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": if has_lp { chat_logprobs(&tok, &items) } else { Value::Null },
                    "finish_reason": c.finish,
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": if has_lp { completion_logprobs(&tok, &items, 0) } else { Value::Null },
                    "finish_reason": c.finish,
                }),
            }
        })
        .collect();
    let object = match run.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    Json(json!({
        "id": run.id, "object": object, "created": unix_now(), "model": app.name,
        "choices": choices, "usage": run.usage(),
    }))
    .into_response()
}

fn stream_response(app: Arc<App>, mut run: Running) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let created = unix_now();
        let object = match run.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let with_usage = run.settings.include_usage;
        let chunk = |run: &Running, choice: Value| {
            let mut v = json!({"id": run.id, "object": object, "created": created,
                               "model": app.name, "choices": [choice]});
            if with_usage {
                v["usage"] = Value::Null;
            }
            SseEvent::default().data(v.to_string())
        };
        if run.kind == Kind::Chat {
            for i in 0..run.choices.len() {
                let c = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                               "logprobs": null, "finish_reason": null});
                if tx.send(Ok(chunk(&run, c))).await.is_err() {
                    return;
                }
            }
        }
        let mut offsets = vec![0usize; run.choices.len()];
        while !run.all_done() {
            let next = tokio::select! {
                e = run.rx.recv() => e,
                _ = tx.closed() => {
                    // The client left: the guard aborts the requests.
                    app.metrics.aborted(run.guard.live.iter().flatten().count());
                    return;
                }
            };
            let Some((index, e)) = next else { break };
            let step = run.apply(&app, index, e);
            let (text, lp, finish) = match step {
                Step::Token(text, lp) => (text, lp, None),
                Step::Done(text) => (text, None, run.choices[index].finish),
                Step::Failed(msg) => {
                    let err = ApiError::status(
                        500,
                        "internal_error",
                        format!("generation failed: {msg}"),
                    );
                    let _ = tx
                        .send(Ok(SseEvent::default().data(err.body().to_string())))
                        .await;
                    return;
                }
            };
            if text.is_empty() && lp.is_none() && finish.is_none() {
                continue;
            }
            let items: Vec<(u32, TokenLogprob)> = lp.into_iter().collect();
            let c = match run.kind {
                Kind::Chat => {
                    let delta = if finish.is_some() && text.is_empty() {
                        json!({})
                    } else {
                        json!({"content": text})
                    };
                    json!({"index": index, "delta": delta,
                           "logprobs": if items.is_empty() { Value::Null } else { chat_logprobs(&app.tok, &items) },
                           "finish_reason": finish})
                }
                Kind::Completion => {
                    let lp = if items.is_empty() {
                        Value::Null
                    } else {
                        completion_logprobs(&app.tok, &items, offsets[index])
                    };
                    offsets[index] += text.len();
                    json!({"index": index, "text": text, "logprobs": lp, "finish_reason": finish})
                }
            };
            if tx.send(Ok(chunk(&run, c))).await.is_err() {
                return;
            }
        }
        if with_usage {
            let v = json!({"id": run.id, "object": object, "created": created, "model": app.name,
                           "choices": [], "usage": run.usage()});
            let _ = tx.send(Ok(SseEvent::default().data(v.to_string()))).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
