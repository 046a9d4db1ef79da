//! What a call used: read from the worker's JSON, recorded once.
//!
//! Owns: reading `usage` (and an `error`) from a worker's reply or stream chunk, and
//! finishing a call with its usage: the one usage event, its tokens in the metrics, the
//! reservation settled, the event spooled. A JSON reply, a stream that completes or fails,
//! and a stream its client left all finish through [`UsageRecorder::finish`]. Must never:
//! finish a call twice, or bill an early end for more than was delivered.

use std::sync::Arc;

use billing::{now_ms, Delivery, Spool, UsageEvent, UsageStatus};
use serde::{Deserialize, Deserializer};

use super::call::CallContext;
use super::outcome::OutcomeOnEnd;
use super::reserve::Reservation;
use crate::error::GatewayError;
use crate::metrics::GatewayMetrics;

/// The fields of a worker's JSON (a reply or a stream chunk) billing reads; the rest is
/// skipped, not built into a tree.
#[derive(Deserialize)]
pub(super) struct WorkerJson {
    usage: Option<Counts>,
    /// Whether the JSON carries a non-null `error` (a Responses object always has the key,
    /// null when it succeeded).
    #[serde(default, deserialize_with = "present")]
    pub(super) error: bool,
}

/// Chat, completions and embeddings count `prompt_tokens`/`completion_tokens`; the
/// Responses API counts `input_tokens`/`output_tokens`.
#[derive(Deserialize)]
struct Counts {
    #[serde(alias = "input_tokens")]
    prompt_tokens: u64,
    #[serde(alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(alias = "input_tokens_details")]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: u64,
}

/// The tokens a call used, as its worker counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Used {
    pub(super) prompt: u64,
    pub(super) completion: u64,
    /// Of `prompt`, those read from the worker's prefix cache.
    pub(super) cached: u64,
}

impl Used {
    pub(super) fn of(usage: &openai_types::Usage) -> Self {
        Self {
            prompt: usage.prompt_tokens,
            completion: usage.completion_tokens,
            cached: usage.cached_tokens(),
        }
    }
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Option::<serde::de::IgnoredAny>::deserialize(d).map(|v| v.is_some())
}

impl WorkerJson {
    pub(super) fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The tokens counted, where the JSON carries usage.
    pub(super) fn usage(&self) -> Option<Used> {
        self.usage.as_ref().map(|u| Used {
            prompt: u.prompt_tokens,
            completion: u.completion_tokens.unwrap_or(0),
            cached: u
                .prompt_tokens_details
                .as_ref()
                .map_or(0, |d| d.cached_tokens),
        })
    }
}

/// A call that has a worker's answer coming: who made it, what it reserved, and where its
/// usage goes once known.
pub(super) struct UsageRecorder {
    pub(super) ctx: CallContext,
    pub(super) endpoint: &'static str,
    pub(super) model: String,
    pub(super) reservation: Reservation,
    pub(super) spool: Spool,
    pub(super) metrics: Arc<GatewayMetrics>,
    /// Set when the response cache answers: the plan's rate per million hits.
    pub(super) cache_hit: Option<i64>,
}

impl UsageRecorder {
    /// Finishes the call with the tokens it used: builds its usage event, counts the tokens,
    /// settles the reservation. The event still has to be spooled, waiting or not.
    pub(super) fn finish(self, used: Used, status: UsageStatus) -> Spooling {
        let Used {
            prompt,
            completion,
            cached,
        } = used;
        let delivery = match status {
            UsageStatus::Success => Delivery::Unknown,
            // An early end is billed for what was delivered, so it is delivered.
            UsageStatus::ClientCancelled | UsageStatus::UpstreamFailed => Delivery::Delivered,
        };
        let Self {
            ctx,
            endpoint,
            model,
            mut reservation,
            spool,
            metrics,
            cache_hit,
        } = self;
        let event = UsageEvent {
            request_id: ctx.request_id,
            tenant_id: ctx.caller.key.tenant_id.clone(),
            key_id: ctx.caller.key.id.clone(),
            model,
            endpoint: endpoint.to_owned(),
            // A count past i64 (only a broken worker says so) is held at the most the
            // ledger stores, never wrapped to a negative, crediting one.
            prompt_tokens: i64::try_from(prompt).unwrap_or(i64::MAX),
            completion_tokens: i64::try_from(completion).unwrap_or(i64::MAX),
            // Never more than the prompt: a cached token is a prompt token.
            cached_tokens: i64::try_from(cached.min(prompt)).unwrap_or(i64::MAX),
            cache_hit_minor_per_mreq: cache_hit,
            started_at: ctx.started_at,
            finished_at: now_ms(),
            status,
            delivery,
        };
        if let Some(rate) = cache_hit {
            // No model ran: no tokens counted, and the hit costs its own rate.
            reservation.settle_hit(rate);
            return Spooling { spool, event };
        }
        for (kind, n) in [
            ("prompt", event.prompt_tokens),
            ("completion", event.completion_tokens),
        ] {
            metrics
                .tokens
                .with_label_values(&[&event.tenant_id, &event.model, kind])
                .inc_by(n.max(0) as u64);
        }
        reservation.settle(&billing::Tokens {
            requests: 1,
            input: event.prompt_tokens,
            cached_input: event.cached_tokens,
            output: event.completion_tokens,
        });
        Spooling { spool, event }
    }
}

/// A finished call's usage event on its way to the spool.
#[must_use]
pub(super) struct Spooling {
    spool: Spool,
    event: UsageEvent,
}

impl Spooling {
    /// Appends the event and waits until it is durable. The outcome to report once the
    /// response is handed over: only a success's, an early end's event says it already.
    pub(super) async fn durable(self) -> Result<OutcomeOnEnd, GatewayError> {
        let Self { spool, event } = self;
        match spool.append_usage(&event).await {
            Ok(()) => Ok(OutcomeOnEnd::new(
                spool,
                event.request_id,
                event.status == UsageStatus::Success,
            )),
            Err(e) => {
                tracing::error!(error = %e, request_id = %event.request_id, status = ?event.status, "spooling usage failed");
                Err(GatewayError::Metering)
            }
        }
    }

    /// Queues the event without waiting, for a destructor; queued now, synchronously, so a
    /// shutdown's final flush covers it.
    pub(super) fn queued(self) {
        if !self.spool.append_usage_detached(&self.event) {
            tracing::error!(request_id = %self.event.request_id, status = ?self.event.status, "spooling usage failed");
        }
    }
}
