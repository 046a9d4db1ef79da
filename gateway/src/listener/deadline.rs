//! Deadlines for one connection's phases that hyper does not bound itself: reaching the
//! first request (the auto builder's wait for bytes to tell HTTP/1.1 from HTTP/2, an
//! HTTP/2 preface with no request after it) and sitting idle between requests. A request
//! counts as in flight from its head until its response body is done or dropped, so a
//! long stream is never cut as idle.
//!
//! Must never: close a connection that has a request in flight (their own deadlines, for
//! the body and upstream, bound those), or hold a lock across an await.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// What one connection is doing, shared by its service and its watchdog.
pub(super) struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` that the last request finished; `u64::MAX`: none yet.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(u64::MAX),
        })
    }

    /// When the connection is to be closed if nothing happens first; `None` while a
    /// request is in flight.
    pub(super) fn deadline(&self, first_request: Duration, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.idle_since_ms.load(Ordering::Acquire) {
            u64::MAX => Some(self.started + first_request),
            ms => Some(self.started + Duration::from_millis(ms) + idle),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// One request in flight; dropping it marks the connection idle from now (when it was
/// the last).
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.started.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A service that marks its requests in flight on the connection's [`Activity`].
#[derive(Clone)]
pub(super) struct Tracked<S> {
    pub(super) inner: S,
    pub(super) activity: Arc<Activity>,
}

impl<S, R, B> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R, Response = hyper::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = hyper::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: R) -> Self::Future {
        let guard = self.activity.begin();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until it is done or dropped.
    pub(super) struct TrackedBody<B> {
        #[pin]
        inner: B,
        _guard: InFlight,
    }
}

impl<B: http_body::Body> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn idle_deadline_starts_when_the_last_request_ends() {
        let (first, idle) = (Duration::from_secs(1), Duration::from_secs(5));
        let activity = Activity::new();
        let start = activity.started;
        assert_eq!(activity.deadline(first, idle), Some(start + first));
        let a = activity.begin();
        let b = activity.begin();
        assert_eq!(activity.deadline(first, idle), None);
        drop(a);
        assert_eq!(activity.deadline(first, idle), None);
        std::thread::sleep(Duration::from_millis(20));
        drop(b);
        let at = activity.deadline(first, idle).unwrap();
        assert!(at >= start + Duration::from_millis(20) + idle);
        assert!(at <= Instant::now() + idle);
    }
}
