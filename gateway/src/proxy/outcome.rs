//! Responses that report whether the client got them.
//!
//! Owns: the outcome of a metered call (delivered once its body was handed over in full,
//! undelivered if it is dropped before) and the JSON responses the gateway passes on.
//! Must never: report an outcome twice, or report one for a call whose usage was not
//! spooled first.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use billing::Spool;
use http_body::{Frame, SizeHint};

/// A worker's JSON reply passed on as it is, with its status.
pub(super) fn json_response(status: StatusCode, bytes: Bytes) -> Response {
    let mut response = json(Body::from(bytes));
    *response.status_mut() = status;
    response
}

/// A JSON reply that reports its outcome when the server has taken all of it.
pub(super) fn tracked_json(bytes: Bytes, outcome: OutcomeOnEnd) -> Response {
    json(Body::new(TrackedBody {
        len: bytes.len() as u64,
        bytes: Some(bytes),
        outcome,
    }))
}

/// An SSE stream replayed whole (a response-cache hit) that reports its outcome as
/// [`tracked_json`] does.
pub(super) fn tracked_stream(bytes: Bytes, outcome: OutcomeOnEnd) -> Response {
    let mut response = Response::new(Body::new(TrackedBody {
        len: bytes.len() as u64,
        bytes: Some(bytes),
        outcome,
    }));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn json(body: Body) -> Response {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Records a response's outcome: delivered once its body has been read to the end,
/// undelivered if it is dropped before.
pub(super) struct OutcomeOnEnd {
    spool: Spool,
    request_id: String,
    pending: bool,
}

impl OutcomeOnEnd {
    /// The outcome of a call whose usage is spooled; one not `pending` reports nothing.
    pub(super) fn new(spool: Spool, request_id: String, pending: bool) -> Self {
        Self {
            spool,
            request_id,
            pending,
        }
    }

    pub(super) fn settle(&mut self, delivered: bool) {
        if std::mem::take(&mut self.pending) {
            if delivered {
                self.spool.record_delivered(&self.request_id);
            } else {
                self.spool.record_outcome(&self.request_id, false);
            }
        }
    }
}

impl Drop for OutcomeOnEnd {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// A JSON reply of known length that reports its outcome when the server takes it, or
/// "undelivered" if it is dropped before (the client left while the reply was waiting).
struct TrackedBody {
    bytes: Option<Bytes>,
    len: u64,
    outcome: OutcomeOnEnd,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = this.bytes.take().map(|b| Ok(Frame::data(b)));
        // The whole reply is handed to the connection now (with a known length, the
        // server does not ask again); the delivery settle time covers the socket write.
        this.outcome.settle(true);
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}
