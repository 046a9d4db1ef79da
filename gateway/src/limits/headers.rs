//! The `x-ratelimit-*` response headers, in OpenAI's names and duration style.
//!
//! Owns: combining scopes' per-minute states into the tightest per dimension, and writing
//! them as headers. Must never: compute a bucket's state itself (see `bucket.rs`) or
//! decide admission.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::bucket::{ceil_div, RateState};

/// The `x-ratelimit-*` headers of a response: the tightest scope per dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<RateState>,
    pub tokens: Option<RateState>,
}

impl RateHeaders {
    pub(super) fn tighten(&mut self, requests: Option<RateState>, tokens: Option<RateState>) {
        let pick = |a: Option<RateState>, b: Option<RateState>| match (a, b) {
            (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
            (a, b) => a.or(b),
        };
        self.requests = pick(self.requests, requests);
        self.tokens = pick(self.tokens, tokens);
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ],
        ];
        let states = [self.requests, self.tokens];
        headers.reserve(3 * states.iter().flatten().count());
        for ([limit, remaining, reset], state) in NAMES.into_iter().zip(states) {
            let Some(s) = state else { continue };
            headers.insert(limit, HeaderValue::from(s.limit));
            headers.insert(remaining, HeaderValue::from(s.remaining.max(0)));
            if let Ok(value) = HeaderValue::try_from(format_duration(s.reset_us)) {
                headers.insert(reset, value);
            }
        }
    }
}

/// `6m0s`, `1.5s`, `120ms`: the duration style of OpenAI's reset headers.
fn format_duration(us: i64) -> String {
    use std::fmt::Write as _;
    let us = us.max(0);
    let mut out = String::with_capacity(16);
    if us < 1_000_000 {
        let _ = write!(out, "{}ms", ceil_div(us, 1000));
        return out;
    }
    let ms = ceil_div(us, 1000);
    let (minutes, rest_ms) = (ms / 60_000, ms % 60_000);
    let (secs, mut frac) = (rest_ms / 1000, rest_ms % 1000);
    if minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    if frac != 0 {
        // Milliseconds as a decimal fraction without trailing zeros: 250 -> ".25".
        let mut digits = 3;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        let _ = write!(out, ".{frac:0digits$}");
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_read_like_openai_headers() {
        assert_eq!(format_duration(120_000), "120ms");
        assert_eq!(format_duration(1_500_000), "1.5s");
        assert_eq!(format_duration(360_000_000), "6m0s");
        assert_eq!(format_duration(61_250_000), "1m1.25s");
        assert_eq!(format_duration(0), "0ms");
        assert_eq!(format_duration(-5), "0ms");
        assert_eq!(format_duration(999_999), "1000ms");
        assert_eq!(format_duration(1_005_000), "1.005s");
        assert_eq!(format_duration(1_050_000), "1.05s");
        assert_eq!(format_duration(1_000_001), "1.001s");
        assert_eq!(format_duration(60_000_000), "1m0s");
        assert_eq!(format_duration(125_100_000), "2m5.1s");
    }
}
