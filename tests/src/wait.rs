//! Waiting on a condition instead of sleeping: poll it until it holds, within a deadline.
//!
//! Owns: the poll interval and the failure on a missed deadline. Must never: be used to
//! pace what a test plays (load for a while, an outage of a set length): that is a sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Polls `probe` until it gives a value and returns it; panics, naming `what`, when none
/// came within `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `condition` until it holds; panics, naming `what`, when it did not within `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, limit, || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    })
    .await
}
