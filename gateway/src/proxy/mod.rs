//! Forwarding consumer calls to workers and metering what they used.
//!
//! Every successful call produces exactly one usage event, durable in the spool before the
//! client sees the end of the response: for a JSON reply, before the reply is sent; for a
//! stream, before `[DONE]`. Once the response is handed over (or the client is gone) an
//! outcome follows. A stream that ends early is billed for the tokens the worker had
//! delivered, as counted by the worker's `: usage P C` comments, and marked as such.
//!
//! Owns: the path of one call, in order: `call` (the body and its token bound),
//! `reserve` (the cost reserved and settled), `forward` (workers and retries),
//! `meter` (streams), `usage` (finishing the call with its usage event), `outcome`
//! (whether the client got the response). Must never: answer a success whose usage is
//! not spooled, or forward a call its key may not make.

use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use billing::Spool;

use crate::error::GatewayError;
use crate::limits::Admission;
use crate::metrics::GatewayMetrics;
use crate::pool::WorkerPool;
use crate::pricing::PriceCache;
use crate::upstream::Upstream;

mod affinity;
mod bound;
mod cache;
mod call;
mod forward;
mod meter;
mod outcome;
mod reserve;
mod usage;

pub use call::{CallContext, ProxiedCall, Rewrite};

use cache::Looked;
use reserve::Reservation;

/// How long a call waits on workers, and on how many it may be tried.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    /// Until a streamed response's head arrives.
    pub first_byte_timeout: Duration,
    /// For a whole non-streamed response, head and body (a worker sends the head with the
    /// body, once generation is done).
    pub total_timeout: Duration,
    /// Workers tried for one request (only while nothing reached the client).
    pub max_attempts: usize,
}

pub struct Proxy {
    pub pool: Arc<WorkerPool>,
    /// Connections to workers, one set per serving thread (index 0: any other thread), so
    /// a request's connection to a worker lives on the thread that serves the request.
    pub upstreams: Vec<Arc<Upstream>>,
    pub spool: Spool,
    pub timeouts: UpstreamTimeouts,
    pub metrics: Arc<GatewayMetrics>,
    pub admission: Arc<Admission>,
    pub prices: Arc<PriceCache>,
    /// Completion tokens reserved for a chat call that sets no `max_tokens`, to a model
    /// whose workers state no context length.
    pub default_completion_reserve: i64,
    /// Calls in flight a worker may carry beyond the least loaded and still get the calls
    /// whose prompts begin as its cached ones; `None` routes by load alone.
    pub affinity_slack: Option<usize>,
    /// Whole responses of deterministic calls, for tenants whose plan opts in.
    pub response_cache: Option<Arc<crate::response_cache::ResponseCache>>,
}

impl Proxy {
    /// Checks the model against the key and the pool, reserves, forwards, meters, answers.
    pub async fn handle(
        &self,
        ctx: CallContext,
        call: ProxiedCall,
    ) -> Result<Response, GatewayError> {
        if !ctx.caller.key.allows_model(&call.model) {
            return Err(GatewayError::ModelNotAllowed(call.model));
        }
        if !self.pool.knows(&call.model) {
            return Err(GatewayError::ModelNotFound(call.model));
        }
        let (reservation, rate_headers) = Reservation::admit(
            &self.admission,
            &self.prices,
            self.default_completion_reserve,
            self.pool.context_length(&call.model),
            &ctx,
            &call,
        )
        .await?;
        let (answer, x_cache) = match self.cache_use(&ctx, &call) {
            None => (self.forward(ctx, call, reservation, None).await, None),
            Some(cache_use) => match self.try_cache(ctx, call, reservation, cache_use).await {
                Looked::Hit(hit) => (Ok(hit), Some("hit")),
                Looked::Miss(miss) => {
                    let answer = self
                        .forward(miss.ctx, miss.call, miss.reservation, Some(miss.capture))
                        .await;
                    (answer, Some("miss"))
                }
            },
        };
        let mut response = answer.unwrap_or_else(IntoResponse::into_response);
        rate_headers.apply(response.headers_mut());
        if let Some(v) = x_cache {
            response
                .headers_mut()
                .insert("x-cache", axum::http::HeaderValue::from_static(v));
        }
        Ok(response)
    }
}
