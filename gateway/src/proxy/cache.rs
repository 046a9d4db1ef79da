//! A call's way through the response cache: looked up after admission, a hit answered
//! from the cache with a usage record of its own, a miss's answer kept for the next call.
//!
//! Owns: deciding per call whether the cache applies (the plan opts in, the call is
//! deterministic, the client did not opt out), answering a hit (JSON or a replayed stream)
//! and capturing what a miss sent its client. Must never: answer a hit whose usage is not
//! spooled, keep a response that failed or was cut short, or look up another tenant's
//! entries (the key holds the tenant).

use std::sync::Arc;

use axum::response::Response;
use billing::UsageStatus;

use super::call::{CallContext, ProxiedCall};
use super::outcome::{tracked_json, tracked_stream};
use super::reserve::Reservation;
use super::usage::Used;
use super::Proxy;
use crate::error::GatewayError;
use crate::response_cache::{cacheable, CacheKey, Directive, Entry, ResponseCache};
use crate::tenants::ResponseCachePolicy;

/// The cache's part in one call.
pub(super) struct CacheUse {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    policy: ResponseCachePolicy,
    directive: Directive,
}

/// What the client got from the model, kept as it goes out, stored once the call
/// succeeded.
pub(super) struct Capture {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    expires_at: i64,
    body: Vec<u8>,
    /// Past the largest entry kept: the rest is not collected.
    overflow: bool,
}

impl Capture {
    /// Appends bytes the client is sent.
    pub(super) fn keep(&mut self, bytes: &[u8]) {
        if self.overflow || self.body.len() + bytes.len() > self.cache.max_entry_bytes() {
            self.overflow = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(bytes);
    }

    /// Stores what was kept, for a call that succeeded with `used`.
    pub(super) fn store(self, stream: bool, used: Used) {
        if self.overflow {
            return;
        }
        self.cache.put(
            self.key,
            Entry {
                stream,
                prompt_tokens: used.prompt,
                completion_tokens: used.completion,
                body: self.body.into(),
                expires_at: self.expires_at,
            },
        );
    }
}

impl Proxy {
    /// Whether the response cache applies to this call, and under what key.
    pub(super) fn cache_use(&self, ctx: &CallContext, call: &ProxiedCall) -> Option<CacheUse> {
        let cache = self.response_cache.clone()?;
        if call.rewrite().is_some() {
            return None;
        }
        let policy = ctx.caller.key.response_cache?;
        if ctx.cache == Directive::Bypass {
            return None;
        }
        // Read again as a whole only for tenants whose plan caches.
        let body: serde_json::Value = serde_json::from_slice(call.raw()).ok()?;
        if !cacheable(call.endpoint, &body) {
            return None;
        }
        Some(CacheUse {
            cache,
            key: CacheKey::new(&ctx.caller.key.tenant_id, &call.model, call.endpoint, &body),
            policy,
            directive: ctx.cache,
        })
    }

    /// Answers from the cache if it holds the call; else hands the call back with what to
    /// keep of the model's answer.
    pub(super) async fn try_cache(
        &self,
        ctx: CallContext,
        call: ProxiedCall,
        reservation: Reservation,
        cache_use: CacheUse,
    ) -> Looked {
        let cache = cache_use.cache;
        let hit = match cache_use.directive {
            Directive::Use => cache.get(&cache_use.key).await,
            Directive::Refresh | Directive::Bypass => None,
        };
        let Some(entry) = hit else {
            return Looked::Miss(Box::new(Miss {
                ctx,
                call,
                reservation,
                capture: Capture {
                    expires_at: billing::now_ms()
                        .saturating_add(cache_use.policy.ttl_s.saturating_mul(1000)),
                    cache,
                    key: cache_use.key,
                    body: Vec::new(),
                    overflow: false,
                },
            }));
        };
        let mut recorder = self.recorder(ctx, call, reservation);
        recorder.cache_hit = Some(cache_use.policy.hit_minor_per_mreq);
        let used = Used {
            prompt: entry.prompt_tokens,
            completion: entry.completion_tokens,
            cached: 0,
        };
        let answer = async {
            let outcome = recorder
                .finish(used, UsageStatus::Success)
                .durable()
                .await?;
            Ok::<_, GatewayError>(if entry.stream {
                tracked_stream(entry.body.clone(), outcome)
            } else {
                tracked_json(entry.body.clone(), outcome)
            })
        };
        Looked::Hit(answer.await.unwrap_or_else(|e| {
            use axum::response::IntoResponse;
            e.into_response()
        }))
    }
}

/// What a lookup came to.
pub(super) enum Looked {
    Hit(Response),
    Miss(Box<Miss>),
}

/// A call the cache did not answer, going on to a worker.
pub(super) struct Miss {
    pub(super) ctx: CallContext,
    pub(super) call: ProxiedCall,
    pub(super) reservation: Reservation,
    pub(super) capture: Capture,
}
