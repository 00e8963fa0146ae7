//! The server's Prometheus metrics: latency histograms recorded per request (time to first
//! token, time per output token, inter-token latency, end-to-end), request outcomes, and the
//! scheduler's gauges and counters, written in Prometheus' text format by `GET /metrics`.

use kiln_runtime::serving::SchedulerStats;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket bounds (seconds) of the latency histograms.
const BOUNDS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// A cumulative histogram over [`BOUNDS`].
#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BOUNDS) {
            if v <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BOUNDS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    ttft: Histogram,
    tpot: Histogram,
    itl: Histogram,
    e2e: Histogram,
    /// Finished choices by reason: stop, length, abort, error.
    outcomes: [u64; 4],
    /// Requests refused with a 4xx.
    rejected: u64,
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// How a choice ended, for the outcome counter.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// Stop token or string.
    Stop,
    /// Token budget or context.
    Length,
    /// The client left.
    Abort,
    /// The executor failed.
    Error,
}

impl Metrics {
    /// Records a finished choice: time to first token, the gaps between tokens, and the total.
    pub fn record(&self, ttft: Option<f64>, gaps: &[f64], e2e: f64, outcome: Outcome) {
        let Ok(mut m) = self.inner.lock() else {
            return;
        };
        if let Some(t) = ttft {
            m.ttft.observe(t);
        }
        for &g in gaps {
            m.itl.observe(g);
        }
        if !gaps.is_empty() {
            m.tpot.observe(gaps.iter().sum::<f64>() / gaps.len() as f64);
        }
        m.e2e.observe(e2e);
        m.outcomes[outcome as usize] += 1;
    }

    /// Counts choices whose client left before they finished.
    pub fn aborted(&self, n: usize) {
        if let Ok(mut m) = self.inner.lock() {
            m.outcomes[Outcome::Abort as usize] += n as u64;
        }
    }

    /// Counts a refused request.
    pub fn rejected(&self) {
        if let Ok(mut m) = self.inner.lock() {
            m.rejected += 1;
        }
    }

    /// The text exposition, with the scheduler's numbers and the recent generation rate.
    pub fn render(&self, s: &SchedulerStats, tokens_per_s: f64) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "kiln_requests_running",
            "Requests holding KV blocks.",
            s.running as f64,
        );
        gauge(
            &mut out,
            "kiln_requests_waiting",
            "Requests waiting for admission.",
            s.waiting as f64,
        );
        gauge(
            &mut out,
            "kiln_kv_blocks_used",
            "KV-cache blocks in use.",
            s.kv_blocks_used as f64,
        );
        gauge(
            &mut out,
            "kiln_kv_blocks_total",
            "KV-cache blocks in all.",
            s.kv_blocks_total as f64,
        );
        gauge(
            &mut out,
            "kiln_generation_tokens_per_second",
            "Tokens generated per second over the last seconds.",
            tokens_per_s,
        );
        counter(
            &mut out,
            "kiln_steps_total",
            "Scheduler steps run.",
            s.steps,
        );
        counter(
            &mut out,
            "kiln_prompt_tokens_total",
            "Prompt tokens computed (recomputation included).",
            s.prompt_tokens,
        );
        counter(
            &mut out,
            "kiln_generation_tokens_total",
            "Tokens generated.",
            s.generated_tokens,
        );
        counter(
            &mut out,
            "kiln_prefix_cache_hit_tokens_total",
            "Prompt tokens served from the prefix cache.",
            s.prefix_hit_tokens,
        );
        counter(
            &mut out,
            "kiln_preemptions_total",
            "Sequences preempted (to be recomputed).",
            s.preemptions,
        );
        let Ok(m) = self.inner.lock() else {
            return out;
        };
        let _ = writeln!(
            out,
            "# HELP kiln_request_success_total Finished choices by reason.\n# TYPE kiln_request_success_total counter"
        );
        for (i, reason) in ["stop", "length", "abort", "error"].iter().enumerate() {
            let _ = writeln!(
                out,
                "kiln_request_success_total{{finish_reason=\"{reason}\"}} {}",
                m.outcomes[i]
            );
        }
        counter(
            &mut out,
            "kiln_requests_rejected_total",
            "Requests refused as invalid.",
            m.rejected,
        );
        m.ttft.write(
            &mut out,
            "kiln_time_to_first_token_seconds",
            "Time to first token.",
        );
        m.tpot.write(
            &mut out,
            "kiln_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
        );
        m.itl.write(
            &mut out,
            "kiln_inter_token_latency_seconds",
            "Time between consecutive tokens.",
        );
        m.e2e.write(
            &mut out,
            "kiln_e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
        );
        out
    }
}
