//! Usage events made up for tests, examples and benchmarks.
//!
//! Owns: [`UsageEventBuilder`], one way to write a usage event with only the fields a test
//! cares about. Must never: build the events of real calls (the gateway fills every field
//! from what a call used), nor hold defaults a store or invoice relies on.

use crate::usage::{Delivery, UsageEvent, UsageStatus};

/// A usage event of a successful, delivered chat call by key `k` on model `m`, using no
/// tokens at the epoch, until a method says otherwise.
#[derive(Debug, Clone)]
pub struct UsageEventBuilder(UsageEvent);

impl UsageEvent {
    /// A made-up event with this request id and tenant (see [`UsageEventBuilder`]).
    pub fn builder(
        request_id: impl Into<String>,
        tenant_id: impl Into<String>,
    ) -> UsageEventBuilder {
        UsageEventBuilder(UsageEvent {
            request_id: request_id.into(),
            tenant_id: tenant_id.into(),
            key_id: "k".into(),
            model: "m".into(),
            endpoint: "/v1/chat/completions".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            cache_hit_minor_per_mreq: None,
            started_at: 0,
            finished_at: 0,
            status: UsageStatus::Success,
            delivery: Delivery::Delivered,
        })
    }
}

impl UsageEventBuilder {
    pub fn key(mut self, key_id: impl Into<String>) -> Self {
        self.0.key_id = key_id.into();
        self
    }

    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.0.model = model.into();
        self
    }

    pub fn tokens(mut self, prompt: i64, completion: i64) -> Self {
        self.0.prompt_tokens = prompt;
        self.0.completion_tokens = completion;
        self
    }

    /// Of the prompt tokens, `cached` were read from a worker's prefix cache.
    pub fn cached(mut self, cached: i64) -> Self {
        self.0.cached_tokens = cached;
        self
    }

    /// Served from the response cache at `rate` minor units per million hits.
    pub fn cache_hit(mut self, rate: i64) -> Self {
        self.0.cache_hit_minor_per_mreq = Some(rate);
        self
    }

    /// Started at `started_at` and finished `duration_ms` later (milliseconds).
    pub fn at(mut self, started_at: i64, duration_ms: i64) -> Self {
        self.0.started_at = started_at;
        self.0.finished_at = started_at + duration_ms;
        self
    }

    pub fn status(mut self, status: UsageStatus) -> Self {
        self.0.status = status;
        self
    }

    pub fn delivery(mut self, delivery: Delivery) -> Self {
        self.0.delivery = delivery;
        self
    }

    pub fn build(self) -> UsageEvent {
        self.0
    }
}
