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
    pub prefix_cache_bytes: IntGaugeVec,
    pub prefix_cache_hits: IntCounterVec,
    pub prefix_cache_misses: IntCounterVec,
    pub prefix_cache_evictions: IntCounterVec,
    pub prefix_cached_tokens: IntCounterVec,
    pub embedded_texts: IntCounterVec,
    pub label_cache_hits: IntCounterVec,
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
        let prefix_cache_bytes = IntGaugeVec::new(
            Opts::new(
                "worker_prefix_cache_bytes",
                "Bytes of keys and values kept for prompts that begin the same way",
            ),
            &["model"],
        )?;
        let counter =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["model"]);
        let prefix_cache_hits = counter(
            "worker_prefix_cache_hits_total",
            "Prompts that began as a kept sequence did",
        )?;
        let prefix_cache_misses = counter(
            "worker_prefix_cache_misses_total",
            "Prompts that found no kept start of theirs",
        )?;
        let prefix_cache_evictions = counter(
            "worker_prefix_cache_evictions_total",
            "Kept sequences dropped to stay within the bound",
        )?;
        let prefix_cached_tokens = counter(
            "worker_prefix_cached_tokens_total",
            "Prompt tokens read from the prefix cache instead of the model",
        )?;
        let embedded_texts = counter(
            "worker_embedded_texts_total",
            "Texts run through the embedding model",
        )?;
        let label_cache_hits = counter(
            "worker_label_cache_hits_total",
            "Classify labels answered from the label cache instead of the model",
        )?;
        registry.register(Box::new(embedded_texts.clone()))?;
        registry.register(Box::new(label_cache_hits.clone()))?;
        registry.register(Box::new(prefix_cache_bytes.clone()))?;
        registry.register(Box::new(prefix_cache_hits.clone()))?;
        registry.register(Box::new(prefix_cache_misses.clone()))?;
        registry.register(Box::new(prefix_cache_evictions.clone()))?;
        registry.register(Box::new(prefix_cached_tokens.clone()))?;
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
            prefix_cache_bytes,
            prefix_cache_hits,
            prefix_cache_misses,
            prefix_cache_evictions,
            prefix_cached_tokens,
            embedded_texts,
            label_cache_hits,
        })
    }

    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
    }
}
