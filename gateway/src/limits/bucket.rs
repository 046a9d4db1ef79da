//! Leaky-bucket arithmetic of the per-minute limits (levels in microseconds of the wall clock
//! that `billing::period::now_us` reads).
//!
//! Owns: the level unit (units x [`WINDOW_US`], exact in integers whatever the limit),
//! draining a level over time, and reading a level as the state a client is shown.
//! Must never: touch the store or decide whether a request passes (the counter's check
//! does that with these figures).

/// Microseconds in the per-minute limits' window.
pub const WINDOW_US: i64 = 60_000_000;

/// One per-minute limit's state for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    pub limit: i64,
    pub remaining: i64,
    /// Until the bucket is empty again (full allowance).
    pub reset_us: i64,
}

/// `a / b` rounded up, for `a >= 0`, `b > 0`.
pub(super) fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Leaky-bucket level after draining from `at_us` to `now_us` at `limit` per window.
pub(super) fn drained(level: i64, at_us: i64, now_us: i64, limit: i64) -> i64 {
    let elapsed = (now_us - at_us).max(0) as i128;
    (level as i128 - elapsed * limit as i128).max(0) as i64
}

pub(super) fn rate_state(level: i64, limit: i64) -> RateState {
    let capacity = limit.saturating_mul(WINDOW_US);
    RateState {
        limit,
        remaining: (capacity - level).max(0) / WINDOW_US,
        reset_us: level / limit.max(1),
    }
}

/// Per-minute bucket room left, in units.
pub(super) fn bucket_room(level: i64, limit: Option<i64>) -> i64 {
    limit.map_or(0, |l| {
        (l.saturating_mul(WINDOW_US) - level).max(0) / WINDOW_US
    })
}
