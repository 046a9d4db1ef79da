//! Request ids and request metrics of the consumer API.
//!
//! Owns: giving every consumer request its id (`x-request-id`, also the usage record's
//! key) and counting and timing it by route, model and status. Must never: take a label
//! value from anything but the route matched, the response and the models the pool
//! knows: a client-chosen string as a label would let any key add series without bound.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use super::ConsumerState;
use crate::pool::WorkerPool;

/// The gateway's id for one request: the `x-request-id` header and the usage record's key.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    /// A new, time-ordered id: `req_` and a UUIDv7 in hex.
    pub(super) fn new() -> Self {
        Self(format!("req_{}", uuid::Uuid::now_v7().simple()))
    }

    pub(super) fn header(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.0).ok()
    }
}

/// The model a response was for, left on the response for the metrics: a model some
/// worker has reported, else `other`.
#[derive(Debug, Clone)]
pub(super) struct ModelLabel(pub String);

impl ModelLabel {
    /// The label for a call naming `model`.
    pub(super) fn of(pool: &WorkerPool, model: &str) -> Self {
        if pool.knows(model) {
            Self(model.to_owned())
        } else {
            Self(OTHER_MODEL.to_owned())
        }
    }
}

/// The model label of calls naming a model no worker serves.
const OTHER_MODEL: &str = "other";

/// Gives a request the router serves its id, then counts and times it. One layer for
/// both: each layer costs a boxed future per request.
pub(super) async fn observe(
    State(state): State<Arc<ConsumerState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = RequestId::new();
    let header = id.header();
    req.extensions_mut().insert(id);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(req).await;
    observed(&state, &route, started, header, response)
}

/// Puts the request id on a response and counts and times it by route, model and status.
pub(super) fn observed(
    state: &ConsumerState,
    route: &str,
    started: Instant,
    id_header: Option<HeaderValue>,
    mut response: Response,
) -> Response {
    if let Some(value) = id_header {
        response.headers_mut().insert("x-request-id", value);
    }
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map_or("", |m| m.0.as_str());
    let status = response.status();
    let labels = [route, model, status.as_str()];
    state.metrics.requests.with_label_values(&labels).inc();
    state
        .metrics
        .request_seconds
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}
