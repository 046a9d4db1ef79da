//! Sending an admitted call to a worker, with retries, and passing its answer on.
//!
//! Owns: picking workers for a call, trying another while nothing has reached the client
//! (a refused or broken connection, a 503, a reply body cut short), the upstream timeouts,
//! and choosing what the client gets: the worker's error as it is, a metered stream, or a
//! JSON reply sent only once its usage is spooled. Must never: retry once a byte reached
//! the client, or retry a timeout (the worker may still be working on it).

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::Response;
use billing::UsageStatus;
use http_body_util::{BodyExt, Full};

use super::cache::Capture;
use super::call::{CallContext, ProxiedCall};
use super::meter::metered_response;
use super::outcome::{json_response, tracked_json};
use super::reserve::Reservation;
use super::usage::{UsageRecorder, WorkerJson};
use super::Proxy;
use crate::error::GatewayError;
use crate::pool::WorkerSlot;
use crate::upstream::{Upstream, UpstreamBody};

impl Proxy {
    /// This serving thread's connections to workers.
    fn upstream(&self) -> Option<&std::sync::Arc<Upstream>> {
        let i = crate::listener::serving_index();
        self.upstreams.get(i).or_else(|| self.upstreams.first())
    }

    pub(super) fn recorder(
        &self,
        ctx: CallContext,
        call: ProxiedCall,
        reservation: Reservation,
    ) -> UsageRecorder {
        UsageRecorder {
            ctx,
            endpoint: call.billed_endpoint(),
            model: call.model,
            reservation,
            spool: self.spool.clone(),
            metrics: self.metrics.clone(),
            cache_hit: None,
        }
    }

    /// Forwards; `capture` keeps a successful answer in the response cache.
    pub(super) async fn forward(
        &self,
        ctx: CallContext,
        mut call: ProxiedCall,
        reservation: Reservation,
        capture: Option<Capture>,
    ) -> Result<Response, GatewayError> {
        let stream = call.is_stream();
        let client_wants_usage = call.client_wants_usage();
        let rewrite = call.rewrite();
        if stream {
            call.force_stream_usage();
        }
        let mut tried: Vec<String> = Vec::new();
        let bytes = loop {
            // A worker sends a non-streamed reply's head with its body, once generation is
            // done: that head may take as long as the whole reply may.
            let started = tokio::time::Instant::now();
            let head_timeout = if stream {
                self.timeouts.first_byte_timeout
            } else {
                self.timeouts.total_timeout
            };
            let (slot, upstream) = self.send(&call, &mut tried, head_timeout).await?;
            let status = upstream.status();
            if !status.is_success() {
                // Worker-side errors are already in the OpenAI shape; pass them on as they are.
                let bytes = read_all(upstream)
                    .await
                    .map_err(|e| GatewayError::Upstream(e.to_string()))?;
                return Ok(json_response(status, bytes));
            }
            if stream {
                let recorder = self.recorder(ctx, call, reservation);
                return Ok(metered_response(
                    recorder,
                    slot,
                    upstream,
                    client_wants_usage,
                    capture,
                ));
            }
            let deadline = started + self.timeouts.total_timeout;
            match tokio::time::timeout_at(deadline, read_all(upstream)).await {
                Err(_) => return Err(GatewayError::UpstreamTimeout),
                Ok(Ok(bytes)) => break bytes,
                // The worker died while answering; nothing reached the client, so another
                // worker may answer instead.
                Ok(Err(e)) if tried.len() < self.timeouts.max_attempts => {
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[&slot.node.base_url, "body"])
                        .inc();
                    slot.node.eject();
                    tracing::warn!(worker = %slot.node.base_url, error = %e, "worker failed mid-reply; trying another");
                }
                Ok(Err(e)) => return Err(GatewayError::Upstream(e.to_string())),
            }
        };
        let counted = WorkerJson::parse(&bytes)
            .as_ref()
            .and_then(WorkerJson::usage)
            .ok_or_else(|| GatewayError::Upstream("the worker's reply carried no usage".into()))?;
        let bytes = match rewrite {
            Some(rewrite) => rewrite(&bytes)?,
            None => bytes,
        };
        let outcome = self
            .recorder(ctx, call, reservation)
            .finish(counted, UsageStatus::Success)
            .durable()
            .await?;
        if let Some(mut capture) = capture {
            capture.keep(&bytes);
            capture.store(false, counted);
        }
        Ok(tracked_json(bytes, outcome))
    }

    /// Sends to a worker, trying another (up to `max_attempts` workers in all, counting
    /// `tried`) while nothing has reached the client: on a refused or broken connection,
    /// or a 503, each waiting up to `head_timeout` for the response head. A timeout is not
    /// retried: the worker may still be working on it.
    async fn send(
        &self,
        call: &ProxiedCall,
        tried: &mut Vec<String>,
        head_timeout: std::time::Duration,
    ) -> Result<(WorkerSlot, hyper::Response<UpstreamBody>), GatewayError> {
        let body = call.upstream_body()?;
        while tried.len() < self.timeouts.max_attempts.max(1) {
            let affinity = call.affinity.filter(|_| self.affinity_slack.is_some());
            let slack = self.affinity_slack.unwrap_or(0);
            let Some(slot) = self.pool.pick(&call.model, tried, affinity, slack) else {
                break;
            };
            if !tried.is_empty() {
                self.metrics.upstream_retries.inc();
            }
            let worker = slot.node.base_url.clone();
            let failed = |kind: &str| {
                self.metrics
                    .upstream_errors
                    .with_label_values(&[&worker, kind])
                    .inc()
            };
            let target = slot
                .node
                .target(call.endpoint)
                .map_err(|e| GatewayError::Upstream(format!("worker address {worker}: {e}")))?;
            let request = hyper::Request::post(target.path)
                .header(header::HOST, target.host)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| GatewayError::Upstream(format!("worker address {worker}: {e}")))?;
            let upstream = self
                .upstream()
                .ok_or_else(|| GatewayError::Upstream("no upstream connections".into()))?;
            tried.push(worker.clone());
            let sent =
                tokio::time::timeout(head_timeout, upstream.send(&target.authority, request)).await;
            match sent {
                Err(_) => {
                    failed("timeout");
                    return Err(GatewayError::UpstreamTimeout);
                }
                Ok(Err(e)) if e.is_connect() => {
                    failed("connect");
                    slot.node.eject();
                    tracing::warn!(%worker, error = %e, "worker unreachable; trying another");
                }
                // The connection broke before a response head: the worker died or
                // restarted with the request; nothing reached the client yet.
                Ok(Err(e)) => {
                    failed("reset");
                    slot.node.eject();
                    tracing::warn!(%worker, error = %e, "worker failed before answering; trying another");
                }
                // Overloaded: the worker did not take the request, so another may.
                Ok(Ok(r)) if r.status() == StatusCode::SERVICE_UNAVAILABLE => failed("overloaded"),
                Ok(Ok(r)) => return Ok((slot, r)),
            }
        }
        Err(GatewayError::NoWorker(call.model.clone()))
    }
}

/// A worker's whole response body.
async fn read_all(response: hyper::Response<UpstreamBody>) -> Result<Bytes, hyper::Error> {
    Ok(response.into_body().collect().await?.to_bytes())
}
