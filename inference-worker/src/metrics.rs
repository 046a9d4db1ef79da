//! The worker's Prometheus series.
//!
//! Owns: the series' names, help texts, labels and buckets, and their text rendering.
//! Must never: label a series by tenant, key or request (the worker does not know them).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    pub cancelled: IntCounterVec,
    pub active_sequences: IntGaugeVec,
    pub embed_batch_seconds: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "worker_http_requests_total",
                "HTTP requests answered, by route and status",
            ),
            &["route", "status"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "worker_http_request_duration_seconds",
                "Time to the response head, by route",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 16)?),
            &["route"],
        )?;
        let prompt_tokens = IntCounterVec::new(
            Opts::new("worker_prompt_tokens_total", "Prompt tokens processed"),
            &["model"],
        )?;
        let generated_tokens = IntCounterVec::new(
            Opts::new(
                "worker_generated_tokens_total",
                "Completion tokens generated",
            ),
            &["model"],
        )?;
        let cancelled = IntCounterVec::new(
            Opts::new(
                "worker_cancelled_generations_total",
                "Generations stopped because the client went away",
            ),
            &["model"],
        )?;
        let active_sequences = IntGaugeVec::new(
            Opts::new("worker_active_sequences", "Sequences being decoded"),
            &["model"],
        )?;
        let embed_batch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "worker_embedding_batch_duration_seconds",
                "Time to embed one batch",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
            &["model"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(cancelled.clone()))?;
        registry.register(Box::new(active_sequences.clone()))?;
        registry.register(Box::new(embed_batch_seconds.clone()))?;
        Ok(Self {
            registry,
            requests,
            request_seconds,
            prompt_tokens,
            generated_tokens,
            cancelled,
            active_sequences,
            embed_batch_seconds,
        })
    }

    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
    }
}
