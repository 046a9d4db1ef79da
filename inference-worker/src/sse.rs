//! Server-sent events: the framing every streamed reply uses.
//!
//! Owns: `data:` framing and the stream response's headers. Must never: decide what an
//! event says.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::Stream;

/// One `data:` event.
pub fn data(payload: &str) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

/// A `text/event-stream` response of `events`.
pub fn response(
    events: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
