//! `kiln loadtest`: a serving load generator in the manner of `vllm bench serve`. It sends
//! streaming `/v1/completions` requests of random token-id prompts (fixed or normally
//! distributed lengths, `ignore_eos` so each generates its exact output length) to any
//! OpenAI-compatible server, either with a fixed number in flight (`--concurrency`) or arriving
//! as a Poisson process (`--rate` requests/s), and reports time to first token, time per output
//! token and inter-token latency (mean, p50, p99), throughput and failures.

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Flags of `kiln loadtest`.
#[derive(clap::Args, Clone, Debug)]
pub struct LoadtestArgs {
    /// Server base URL (the `/v1` routes are under it).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Requests to send.
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Requests in flight at once (with --rate: at most this many; default unlimited).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Poisson arrivals at this many requests per second (default: all at once, bounded by
    /// --concurrency).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Standard deviation of the prompt lengths (0: fixed).
    #[arg(long, default_value_t = 0.0)]
    pub input_std: f64,
    /// Standard deviation of the output lengths (0: fixed).
    #[arg(long, default_value_t = 0.0)]
    pub output_std: f64,
    /// Prompt token ids are drawn below this (keep it under the model's vocabulary).
    #[arg(long, default_value_t = 10000)]
    pub max_token_id: u32,
    /// Model name (default: the first of /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// API key (sent as `Authorization: Bearer`).
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seed of the prompts, lengths and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One request's measurements.
#[derive(Debug, Default, Clone)]
struct Sample {
    ok: bool,
    error: Option<String>,
    ttft: f64,
    e2e: f64,
    itl: Vec<f64>,
    output_tokens: usize,
    input_tokens: usize,
}

/// Mean, median and 99th percentile (ms).
#[derive(serde::Serialize, Debug, Default)]
pub struct Stat {
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    if v.is_empty() {
        return Stat::default();
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] * 1e3;
    Stat {
        mean_ms: v.iter().sum::<f64>() / v.len() as f64 * 1e3,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
    }
}

/// The report.
#[derive(serde::Serialize, Debug)]
pub struct Report {
    /// Requests sent.
    pub requests: usize,
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Wall time (s).
    pub duration_s: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Generated tokens per second.
    pub output_tokens_per_s: f64,
    /// Prompt and generated tokens per second.
    pub total_tokens_per_s: f64,
    /// Prompt tokens in all.
    pub input_tokens: usize,
    /// Generated tokens in all.
    pub output_tokens: usize,
    /// Time to first token.
    pub ttft: Stat,
    /// Time per output token after the first, per request.
    pub tpot: Stat,
    /// Time between streamed tokens.
    pub itl: Stat,
    /// Request latency.
    pub e2e: Stat,
    /// Concurrency limit (None: unlimited).
    pub concurrency: Option<usize>,
    /// Arrival rate (None: all at once).
    pub rate: Option<f64>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self, mean: usize, std: f64) -> usize {
        if std <= 0.0 {
            return mean.max(1);
        }
        let z = (-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos();
        (mean as f64 + std * z).round().max(1.0) as usize
    }
}

/// Runs the load test and prints the report.
pub fn run(a: LoadtestArgs) -> Result<()> {
    if a.requests == 0 || a.concurrency == Some(0) {
        bail!("--requests and --concurrency must be at least 1");
    }
    if a.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of requests per second");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = rt.block_on(load(a.clone()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if report.completed == 0 {
        bail!(
            "every request failed: {}",
            report.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "requests {} (completed {}, failed {}) in {:.2} s; concurrency {}, rate {}",
        r.requests,
        r.completed,
        r.failed,
        r.duration_s,
        r.concurrency.map_or("unlimited".into(), |c| c.to_string()),
        r.rate.map_or("all at once".into(), |x| format!("{x}/s"))
    );
    println!(
        "throughput: {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s ({} in, {} out)",
        r.requests_per_s,
        r.output_tokens_per_s,
        r.total_tokens_per_s,
        r.input_tokens,
        r.output_tokens
    );
    println!("{:<6} {:>10} {:>10} {:>10}", "ms", "mean", "p50", "p99");
    for (name, s) in [
        ("TTFT", &r.ttft),
        ("TPOT", &r.tpot),
        ("ITL", &r.itl),
        ("E2E", &r.e2e),
    ] {
        println!(
            "{name:<6} {:>10.2} {:>10.2} {:>10.2}",
            s.mean_ms, s.p50_ms, s.p99_ms
        );
    }
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
}

async fn load(a: LoadtestArgs) -> Result<Report> {
    let base = a.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .context("cannot make an HTTP client")?;
    let auth = |rb: reqwest::RequestBuilder| match &a.api_key {
        Some(k) => rb.bearer_auth(k),
        None => rb,
    };
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let v: Value = auth(client.get(format!("{base}/v1/models")))
                .send()
                .await
                .with_context(|| format!("cannot reach {base}/v1/models"))?
                .error_for_status()
                .with_context(|| format!("{base}/v1/models"))?
                .json()
                .await?;
            v["data"][0]["id"]
                .as_str()
                .context("/v1/models lists no model")?
                .to_string()
        }
    };
    let mut rng = Rng(a.seed ^ 0x6c6f_6164);
    let bodies: Vec<(Value, usize)> = (0..a.requests)
        .map(|_| {
            let n_in = rng.normal(a.input_len, a.input_std);
            let n_out = rng.normal(a.output_len, a.output_std);
            let prompt: Vec<u32> = (0..n_in)
                .map(|_| (rng.next() % u64::from(a.max_token_id.max(1))) as u32)
                .collect();
            let body = json!({
                "model": model, "prompt": prompt, "max_tokens": n_out, "temperature": 0,
                "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
            });
            (body, n_in)
        })
        .collect();
    let gaps: Vec<f64> = (0..a.requests)
        .map(|_| a.rate.map_or(0.0, |r| -rng.unit().ln() / r))
        .collect();
    let limit = Arc::new(tokio::sync::Semaphore::new(
        a.concurrency.unwrap_or(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let url = format!("{base}/v1/completions");
    let key = a.api_key.clone();
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(a.requests);
    for ((body, n_in), gap) in bodies.into_iter().zip(gaps) {
        if gap > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        let permit = limit.clone().acquire_owned().await?;
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = one(&client, &url, key.as_deref(), &body).await;
            s.input_tokens = n_in;
            drop(permit);
            s
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for t in tasks {
        samples.push(t.await.unwrap_or_else(|e| Sample {
            error: Some(format!("task failed: {e}")),
            ..Sample::default()
        }));
    }
    let duration = t0.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let output_tokens: usize = ok.iter().map(|s| s.output_tokens).sum();
    let input_tokens: usize = ok.iter().map(|s| s.input_tokens).sum();
    Ok(Report {
        requests: a.requests,
        completed: ok.len(),
        failed: samples.len() - ok.len(),
        first_error: samples.iter().find_map(|s| s.error.clone()),
        duration_s: duration,
        requests_per_s: ok.len() as f64 / duration,
        output_tokens_per_s: output_tokens as f64 / duration,
        total_tokens_per_s: (input_tokens + output_tokens) as f64 / duration,
        input_tokens,
        output_tokens,
        ttft: stat(ok.iter().map(|s| s.ttft).collect()),
        tpot: stat(
            ok.iter()
                .filter(|s| s.output_tokens > 1)
                .map(|s| (s.e2e - s.ttft) / (s.output_tokens - 1) as f64)
                .collect(),
        ),
        itl: stat(ok.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        e2e: stat(ok.iter().map(|s| s.e2e).collect()),
        concurrency: a.concurrency,
        rate: a.rate,
    })
}

/// Sends one streaming request and times its chunks.
async fn one(client: &reqwest::Client, url: &str, key: Option<&str>, body: &Value) -> Sample {
    let t0 = Instant::now();
    let mut s = Sample::default();
    let mut rb = client.post(url).json(body);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            s.error = Some(format!("request failed: {e}"));
            return s;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        s.error = Some(format!("HTTP {status}: {text}"));
        return s;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut last: Option<Instant> = None;
    let mut done = false;
    let mut finished = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                s.error = Some(format!("stream broke: {e}"));
                return s;
            }
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    s.error = Some(format!("bad chunk: {data}"));
                    return s;
                };
                if v.get("error").is_some() {
                    s.error = Some(format!("server error: {}", v["error"]));
                    return s;
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    s.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                }
                let Some(c) = v["choices"].get(0) else {
                    continue;
                };
                if c["finish_reason"].is_string() {
                    finished = true;
                }
                if c["text"].as_str().is_some_and(|t| !t.is_empty()) {
                    let now = Instant::now();
                    match last {
                        None => s.ttft = now.duration_since(t0).as_secs_f64(),
                        Some(l) => s.itl.push(now.duration_since(l).as_secs_f64()),
                    }
                    last = Some(now);
                }
            }
        }
    }
    s.e2e = t0.elapsed().as_secs_f64();
    if !(done && finished) {
        s.error = Some("the stream ended without a finish_reason and [DONE]".into());
        return s;
    }
    s.ok = true;
    s
}
