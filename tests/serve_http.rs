//! `kiln serve` over loopback with the demo model on the CPU: a thousand concurrent streaming
//! clients against a KV cache too small for them all, clients that leave mid-stream, invalid
//! requests, the API key, a SIGTERM drain, and the official `openai` Python client.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The demo engine, built once.
fn engine() -> &'static PathBuf {
    static E: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &E.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smollm2.kiln");
        kiln::compiler::build(
            &demo_gguf(),
            &path,
            &kiln::compiler::BuildOptions::default(),
            &|_, _| {},
        )
        .unwrap();
        (dir, path)
    })
    .1
}

/// One server at a time: they share the two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = kiln()
            .arg("serve")
            .arg(engine())
            .args(["--port", "0"])
            .args(extra)
            .env_remove("KILN_API_KEY")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                if let Some(at) = line.find("http://") {
                    let url = line[at..].split("/v1").next().unwrap().to_string();
                    let _ = tx.send(url);
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the server did not start");
        Server { child, url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn metric(&self, name: &str) -> f64 {
        let text = reqwest::blocking_get(&format!("{}/metrics", self.url), None);
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// The metric once it reads `want`, or its last reading after 10 s: the engine publishes
    /// its gauges after each step, so a client that has its last token may read them a step
    /// early (a gauge that never settles is still caught).
    fn metric_settled(&self, name: &str, want: f64) -> f64 {
        let t0 = std::time::Instant::now();
        loop {
            let v = self.metric(name);
            if v == want || t0.elapsed() > std::time::Duration::from_secs(10) {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap();
        kb / 1024.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tiny blocking helpers over reqwest's async client.
mod reqwest {
    pub use ::reqwest::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// GET; returns the body.
    pub fn blocking_get(url: &str, key: Option<&str>) -> String {
        rt().block_on(async {
            let mut rb = Client::new().get(url);
            if let Some(k) = key {
                rb = rb.bearer_auth(k);
            }
            rb.send().await.unwrap().text().await.unwrap()
        })
    }

    /// POST JSON; returns (status, body).
    pub fn blocking_post(url: &str, body: &str, key: Option<&str>) -> (u16, String) {
        rt().block_on(async {
            let mut rb = Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(k) = key {
                rb = rb.bearer_auth(k);
            }
            let r = rb.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    }
}

/// Streams one completion; returns (text, finish_reason, completion_tokens from usage, saw
/// `[DONE]`).
async fn stream_one(
    client: &::reqwest::Client,
    url: &str,
    body: Value,
) -> Result<(String, String, u64, bool), String> {
    let resp = client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut s = resp.bytes_stream();
    let (mut buf, mut text, mut finish, mut usage, mut done) =
        (String::new(), String::new(), String::new(), 0, false);
    while let Some(c) = s.next().await {
        buf.push_str(&String::from_utf8_lossy(&c.map_err(|e| e.to_string())?));
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            let Some(data) = ev.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            if let Some(u) = v["usage"].as_object() {
                usage = u["completion_tokens"].as_u64().unwrap();
            }
            if let Some(c) = v["choices"].get(0) {
                text.push_str(c["text"].as_str().unwrap_or(""));
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
        }
    }
    Ok((text, finish, usage, done))
}

#[test]
fn a_thousand_streaming_clients_on_a_small_cache_all_complete() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // 96 blocks of 16 tokens: room for about 48 of the requests at once.
    let server = Server::start(&["--max-kv-tokens", "1536", "--max-num-seqs", "128"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = server.url.clone();
    let t0 = Instant::now();
    let results = rt.block_on(async move {
        let client = ::reqwest::Client::new();
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let (client, url) = (client.clone(), url.clone());
                // Prompts of 12 to 15 tokens (ids), 5 tokens each: two blocks per request once
                // decoding, so running requests must grow and some get preempted.
                let prompt: Vec<u32> = (0..12 + i % 4).map(|j| 100 + ((i * 7 + j * 13) % 5000) as u32).collect();
                tokio::spawn(async move {
                    stream_one(
                        &client,
                        &url,
                        json!({"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": true,
                               "stream": true, "stream_options": {"include_usage": true}}),
                    )
                    .await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    eprintln!(
        "1000 streaming requests in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    for (i, r) in results.iter().enumerate() {
        let (text, finish, usage, done) = r.as_ref().unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(done, "request {i}: no [DONE]");
        assert_eq!(finish, "length", "request {i}");
        assert_eq!(*usage, 5, "request {i}: {text:?}");
        assert!(!text.is_empty(), "request {i}: no text");
    }
    assert_eq!(server.metric_settled("kiln_kv_blocks_used", 0.0), 0.0);
    assert_eq!(server.metric_settled("kiln_requests_running", 0.0), 0.0);
    assert!(
        server.metric("kiln_preemptions_total") > 0.0,
        "the cache was never short"
    );
    assert_eq!(
        server.metric_settled("kiln_generation_tokens_total", 5000.0),
        5000.0
    );
    // Memory stays bounded: the weights in f32 (~540 MB), the 1536-token cache and the
    // requests' state.
    let rss = server.rss_mib();
    assert!(rss < 2048.0, "the server holds {rss:.0} MiB");
}

#[test]
fn clients_that_leave_mid_stream_free_their_blocks() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[]);
    let url = server.url.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let client = ::reqwest::Client::new();
        let mut streams = Vec::new();
        for i in 0..8u32 {
            let resp = client
                .post(format!("{url}/v1/completions"))
                .json(
                    &json!({"prompt": [100 + i, 200, 300, 400], "max_tokens": 2000,
                              "ignore_eos": true, "stream": true}),
                )
                .send()
                .await
                .unwrap();
            let mut s = resp.bytes_stream();
            // Wait for the first token, then hang up.
            s.next().await.unwrap().unwrap();
            streams.push(s);
        }
        drop(streams);
    });
    let t0 = Instant::now();
    while server.metric("kiln_requests_running") > 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the abandoned requests still run"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.metric("kiln_kv_blocks_used"), 0.0);
    assert!(server.metric("kiln_generation_tokens_total") < 8.0 * 2000.0);
}

#[test]
fn invalid_requests_get_a_400_naming_the_field() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&["--api-key", "sesame"]);
    let key = Some("sesame");
    let chat = format!("{}/v1/chat/completions", server.url);
    let comp = format!("{}/v1/completions", server.url);
    let cases: [(&str, &str, &str); 10] = [
        (&chat, "{\"messages\": [", "not valid JSON"),
        (&chat, r#"{"messages": []}"#, "`messages` must not be empty"),
        (
            &chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}"#,
            "max_tokens",
        ),
        (
            &chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "n": 1000}"#,
            "`n` must be in 1..=16",
        ),
        (
            &chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}"#,
            "`temperature`: invalid type",
        ),
        (
            &chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}"#,
            "`top_p` must be in (0, 1]",
        ),
        (
            &chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}"#,
            "`stream`: invalid type",
        ),
        (
            &chat,
            r#"{"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}"#,
            "unknown field `frobnicate`",
        ),
        (&comp, r#"{"prompt": "hi", "max_tokens": 0}"#, "at least 1"),
        (
            &comp,
            r#"{"prompt": [1, 2, 99999999]}"#,
            "outside the vocabulary",
        ),
    ];
    for (url, body, expect) in cases {
        let (status, text) = reqwest::blocking_post(url, body, key);
        assert_eq!(status, 400, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(expect), "{body}: {msg}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // A prompt longer than the context: refused, not truncated.
    let long = json!({"prompt": vec![100u32; 9000]}).to_string();
    let (status, text) = reqwest::blocking_post(&comp, &long, key);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("it is not truncated"), "{text}");
    // The API key: required everywhere but /health.
    let (status, _) = reqwest::blocking_post(&comp, r#"{"prompt": "hi"}"#, None);
    assert_eq!(status, 401);
    let (status, _) = reqwest::blocking_post(&comp, r#"{"prompt": "hi"}"#, Some("wrong"));
    assert_eq!(status, 401);
    assert_eq!(
        reqwest::blocking_get(&format!("{}/health", server.url), None),
        "ok\n"
    );
    let models = reqwest::blocking_get(&format!("{}/v1/models", server.url), key);
    assert!(models.contains("\"smollm2\""), "{models}");
    let (status, text) = reqwest::blocking_post(
        &comp,
        r#"{"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}"#,
        key,
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[test]
fn sigterm_lets_running_requests_finish_then_exits() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut server = Server::start(&[]);
    let url = server.url.clone();
    let pid = server.pid();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (text, finish, usage, done) = rt.block_on(async move {
        let client = ::reqwest::Client::new();
        let req = tokio::spawn({
            let (client, url) = (client.clone(), url.clone());
            async move {
                stream_one(
                    &client,
                    &url,
                    json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
                           "ignore_eos": true, "stream": true,
                           "stream_options": {"include_usage": true}}),
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        req.await.unwrap().unwrap()
    });
    assert!(done);
    assert_eq!(finish, "length");
    assert_eq!(usage, 24, "{text:?}");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_openai_python_client_streams_a_chat_completion() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let py_path = match std::env::var_os("KILN_OPENAI_PY") {
        Some(p) => PathBuf::from(p),
        None => {
            let out = Command::new("bash")
                .arg(root().join("scripts/fetch-openai-client.sh"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        }
    };
    let server = Server::start(&["--api-key", "sesame"]);
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sesame")
stream = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        text += c.delta.content or ""
        finish = c.finish_reason or finish
print(repr(text))
assert "Paris" in text, text
assert finish in ("stop", "length"), finish
assert usage.completion_tokens >= 1 and usage.prompt_tokens > 10, usage
models = client.models.list()
assert models.data[0].id == "smollm2"
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&server.url)
        .env("PYTHONPATH", &py_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
