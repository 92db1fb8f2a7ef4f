//! Prometheus metrics in the text exposition format, under vLLM's names with a `kiln:` prefix
//! and vLLM's histogram buckets, so dashboards port by a rename.
//!
//! The engine thread records into [`Metrics`] (a mutex around plain counters; it is touched a
//! few times per step) and `GET /metrics` renders it. Every series carries a `model_name`
//! label, as vLLM's do.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// vLLM's time-to-first-token buckets (seconds).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token and time-per-output-token buckets (seconds).
pub const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (seconds), for end-to-end and queue time.
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// vLLM's tokens-per-step buckets.
pub const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// The `finished_reason` label values, as vLLM writes them.
pub const FINISHED_REASONS: [&str; 3] = ["stop", "length", "abort"];

/// A Prometheus histogram with fixed bucket edges.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last entry is the +Inf bucket.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with the given upper bounds.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The KV-cache settings shown by `kiln:cache_config_info`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheConfigInfo {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the cache.
    pub num_blocks: usize,
    /// Whether prefix caching is on.
    pub enable_prefix_caching: bool,
    /// The fraction of the GPU memory left with the model loaded that the KV cache takes.
    pub gpu_memory_utilization: f64,
    /// Where the cache lives ("cpu" or "cuda").
    pub device: String,
}

/// Gauges the engine sets after every step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineGauges {
    /// Requests with a running sequence.
    pub num_requests_running: usize,
    /// Requests waiting to run (queued or preempted).
    pub num_requests_waiting: usize,
    /// Fraction of KV blocks in use.
    pub kv_cache_usage: f64,
    /// Prefix-cache queries so far, in tokens (a counter kept by the block manager).
    pub prefix_cache_queries: u64,
    /// Prefix-cache hits so far, in tokens.
    pub prefix_cache_hits: u64,
    /// Preemptions so far (a counter kept by the scheduler).
    pub num_preemptions: u64,
}

/// Timings of one finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FinishedRequestTimes {
    /// Arrival to first scheduled step.
    pub queue_seconds: f64,
    /// Arrival to the last token.
    pub e2e_seconds: f64,
    /// Arrival to the first token, when one was produced.
    pub ttft_seconds: Option<f64>,
    /// Tokens of the longest sample.
    pub num_output_tokens: usize,
}

#[derive(Debug)]
struct MetricsState {
    cache_config: CacheConfigInfo,
    gauges: EngineGauges,
    prompt_tokens: u64,
    generation_tokens: u64,
    request_success: BTreeMap<&'static str, u64>,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    time_per_output_token: Histogram,
    e2e_latency: Histogram,
    queue_time: Histogram,
    iteration_tokens: Histogram,
}

/// The server's metrics (see the module docs).
#[derive(Debug)]
pub struct Metrics {
    model_name: String,
    state: Mutex<MetricsState>,
}

impl Metrics {
    /// Empty metrics for `model_name` with the cache settings it serves with.
    pub fn new(model_name: &str, cache_config: CacheConfigInfo) -> Metrics {
        Metrics {
            model_name: model_name.to_string(),
            state: Mutex::new(MetricsState {
                cache_config,
                gauges: EngineGauges::default(),
                prompt_tokens: 0,
                generation_tokens: 0,
                request_success: FINISHED_REASONS.iter().map(|&r| (r, 0)).collect(),
                time_to_first_token: Histogram::new(TTFT_BUCKETS),
                inter_token_latency: Histogram::new(TOKEN_LATENCY_BUCKETS),
                time_per_output_token: Histogram::new(TOKEN_LATENCY_BUCKETS),
                e2e_latency: Histogram::new(REQUEST_LATENCY_BUCKETS),
                queue_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
                iteration_tokens: Histogram::new(ITERATION_TOKEN_BUCKETS),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MetricsState> {
        // A panic while holding the lock leaves plain numbers behind: still worth showing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the engine's gauges and the counters it keeps itself.
    pub fn set_gauges(&self, gauges: EngineGauges) {
        self.state().gauges = gauges;
    }

    /// Records one engine step of `num_tokens` tokens.
    pub fn record_step(&self, num_tokens: usize) {
        self.state().iteration_tokens.observe(num_tokens as f64);
    }

    /// Counts the prompt tokens of a request that started running.
    pub fn record_prompt_tokens(&self, num_tokens: usize) {
        self.state().prompt_tokens += num_tokens as u64;
    }

    /// Counts one generated token; `since_previous` is the gap to the sequence's previous
    /// token (none for its first).
    pub fn record_generated_token(&self, since_previous: Option<f64>) {
        let mut state = self.state();
        state.generation_tokens += 1;
        if let Some(gap) = since_previous {
            state.inter_token_latency.observe(gap);
        }
    }

    /// Records a request's first token, `seconds` after it arrived.
    pub fn record_first_token(&self, seconds: f64) {
        self.state().time_to_first_token.observe(seconds);
    }

    /// Records a request that finished (`reason` is one of [`FINISHED_REASONS`]).
    pub fn record_finished(&self, reason: &'static str, times: FinishedRequestTimes) {
        let mut state = self.state();
        *state.request_success.entry(reason).or_insert(0) += 1;
        state.e2e_latency.observe(times.e2e_seconds);
        state.queue_time.observe(times.queue_seconds);
        if let (Some(ttft), true) = (times.ttft_seconds, times.num_output_tokens > 1) {
            let per_token =
                (times.e2e_seconds - ttft).max(0.0) / (times.num_output_tokens - 1) as f64;
            state.time_per_output_token.observe(per_token);
        }
    }

    /// The current gauges (for tests and `/health`).
    pub fn gauges(&self) -> EngineGauges {
        self.state().gauges
    }

    /// Everything in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let state = self.state();
        let model = escape_label(&self.model_name);
        let labels = format!("model_name=\"{model}\"");
        let mut out = String::new();
        let gauges = state.gauges;
        let mut scalar = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP kiln:{name} {help}");
            let _ = writeln!(out, "# TYPE kiln:{name} {kind}");
            let _ = writeln!(out, "kiln:{name}{{{labels}}} {}", format_value(value));
        };
        scalar(
            "num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            gauges.num_requests_running as f64,
        );
        scalar(
            "num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            gauges.num_requests_waiting as f64,
        );
        scalar(
            "kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            gauges.kv_cache_usage,
        );
        scalar(
            "prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            state.prompt_tokens as f64,
        );
        scalar(
            "generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            state.generation_tokens as f64,
        );
        scalar(
            "num_preemptions_total",
            "counter",
            "Cumulative number of preemptions from the engine.",
            gauges.num_preemptions as f64,
        );
        scalar(
            "prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            gauges.prefix_cache_queries as f64,
        );
        scalar(
            "prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            gauges.prefix_cache_hits as f64,
        );
        let cache = &state.cache_config;
        let _ = writeln!(
            out,
            "# HELP kiln:cache_config_info Information of the engine's CacheConfig."
        );
        let _ = writeln!(out, "# TYPE kiln:cache_config_info gauge");
        let _ = writeln!(
            out,
            "kiln:cache_config_info{{{labels},block_size=\"{}\",num_gpu_blocks=\"{}\",\
             enable_prefix_caching=\"{}\",gpu_memory_utilization=\"{}\",cache_device=\"{}\"}} 1",
            cache.block_size,
            cache.num_blocks,
            if cache.enable_prefix_caching {
                "True"
            } else {
                "False"
            },
            cache.gpu_memory_utilization,
            escape_label(&cache.device),
        );
        let _ = writeln!(
            out,
            "# HELP kiln:request_success_total Count of successfully processed requests."
        );
        let _ = writeln!(out, "# TYPE kiln:request_success_total counter");
        for (reason, count) in &state.request_success {
            let _ = writeln!(
                out,
                "kiln:request_success_total{{{labels},finished_reason=\"{reason}\"}} {count}"
            );
        }
        let histograms = [
            (
                "time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &state.time_to_first_token,
            ),
            (
                "inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &state.inter_token_latency,
            ),
            (
                "request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                &state.time_per_output_token,
            ),
            (
                "e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &state.e2e_latency,
            ),
            (
                "request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                &state.queue_time,
            ),
            (
                "iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                &state.iteration_tokens,
            ),
        ];
        for (name, help, histogram) in histograms {
            let _ = writeln!(out, "# HELP kiln:{name} {help}");
            let _ = writeln!(out, "# TYPE kiln:{name} histogram");
            let mut cumulative = 0;
            for (bound, count) in histogram.bounds.iter().zip(&histogram.counts) {
                cumulative += count;
                let _ = writeln!(
                    out,
                    "kiln:{name}_bucket{{{labels},le=\"{}\"}} {cumulative}",
                    format_value(*bound)
                );
            }
            let _ = writeln!(
                out,
                "kiln:{name}_bucket{{{labels},le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(
                out,
                "kiln:{name}_sum{{{labels}}} {}",
                format_value(histogram.sum)
            );
            let _ = writeln!(out, "kiln:{name}_count{{{labels}}} {}", histogram.count);
        }
        out
    }
}

/// A float as Prometheus prints it (`1.0`, `0.25`, `1e-05` style is fine too).
fn format_value(value: f64) -> String {
    if value.is_finite() && value == value.trunc() && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_text() {
        let metrics = Metrics::new("m", CacheConfigInfo::default());
        metrics.record_first_token(0.003);
        metrics.record_first_token(0.003);
        metrics.record_first_token(5000.0);
        let text = metrics.render();
        assert!(text.contains(
            "kiln:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.001\"} 0\n"
        ));
        assert!(text.contains(
            "kiln:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.005\"} 2\n"
        ));
        assert!(text.contains(
            "kiln:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"2560.0\"} 2\n"
        ));
        assert!(text
            .contains("kiln:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("kiln:time_to_first_token_seconds_count{model_name=\"m\"} 3\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
