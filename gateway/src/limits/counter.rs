//! A scope's counter row and the arithmetic over it: checking and reserving a request,
//! releasing a settled reservation, and synchronising a quota lease.
//!
//! Owns: what the `limit_counters` columns mean and every change to them, as pure
//! functions of the row, the limits and the time (the applier reads and writes the rows).
//! Must never: do I/O, or pass a request that would take any limit beyond its value.

use std::collections::BTreeMap;

use billing::Micros;

use super::bucket::{bucket_room, ceil_div, drained, rate_state, RateState, WINDOW_US};
use super::headers::RateHeaders;
use super::lease::{self, Grant, SyncRequest, Units};
use super::model::{Demand, LimitKind, Limits, Refusal, Scope, MAX_RETRY_AFTER_SECS};

/// A scope's counters as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Counter {
    pub(super) requests_level: i64,
    pub(super) tokens_level: i64,
    pub(super) levels_at_us: i64,
    pub(super) in_flight: i64,
    pub(super) period: String,
    pub(super) used_tokens: i64,
    pub(super) reserved_tokens: i64,
    pub(super) used_spend: i64,
    pub(super) reserved_spend: i64,
}

impl Counter {
    /// A new period forgets what was used, not what is still reserved.
    fn roll_period(&mut self, period: &str) {
        if self.period != period {
            self.period = period.to_owned();
            self.used_tokens = 0;
            self.used_spend = 0;
        }
    }

    /// Releases a settled reservation held in this scope: its slots and reserved amounts
    /// go, its usage counts if it belongs to the current period, and with `refund` the
    /// tokens-per-minute bucket gets back what was reserved and unused.
    pub(super) fn release(&mut self, s: &Settling, refund: bool) {
        self.in_flight = (self.in_flight - s.slots).max(0);
        self.reserved_tokens = (self.reserved_tokens - s.tokens).max(0);
        self.reserved_spend = (self.reserved_spend - s.spend).max(0);
        if self.period == s.period {
            self.used_tokens = self.used_tokens.saturating_add(s.used.tokens);
            self.used_spend = self.used_spend.saturating_add(s.used.spend.0);
        }
        if refund {
            let unused = (s.tokens - s.used.tokens).max(0);
            self.tokens_level = (self.tokens_level - unused.saturating_mul(WINDOW_US)).max(0);
        }
    }
}

/// A reservation being settled, as deleted from the store.
pub(super) struct Settling {
    pub(super) scopes: Vec<String>,
    pub(super) tokens: i64,
    pub(super) spend: i64,
    pub(super) period: String,
    /// Concurrency slots: 1 for a request, any number for a lease.
    pub(super) slots: i64,
    pub(super) used: Demand,
    pub(super) refund_scopes: Vec<String>,
}

/// A scope that passed: its new counter and its request and token header states.
type Checked = (Counter, Option<RateState>, Option<RateState>);
/// A scope that refused: the limit, microseconds to wait, the message.
type Denied = (LimitKind, i64, String);

/// Checks one scope; on success returns the new counter and its header states.
fn check(
    counter: &Counter,
    limits: &Limits,
    demand: Demand,
    now_us: i64,
    period: &str,
) -> Result<Checked, Denied> {
    let mut next = counter.clone();
    next.roll_period(period);
    if let Some(max) = limits.max_concurrent {
        if next.in_flight >= max {
            return Err((
                LimitKind::Concurrency,
                1_000_000,
                format!("Too many concurrent requests: the limit is {max}."),
            ));
        }
    }
    let mut states = (None, None);
    let buckets = [
        (
            limits.requests_per_minute,
            &mut next.requests_level,
            1,
            LimitKind::Requests,
        ),
        (
            limits.tokens_per_minute,
            &mut next.tokens_level,
            demand.tokens,
            LimitKind::Tokens,
        ),
    ];
    for (i, (limit, level, units, kind)) in buckets.into_iter().enumerate() {
        let Some(limit) = limit else { continue };
        let current = drained(*level, counter.levels_at_us, now_us, limit);
        let wanted = current.saturating_add(units.saturating_mul(WINDOW_US));
        let capacity = limit.saturating_mul(WINDOW_US);
        if units > limit {
            return Err((
                kind,
                WINDOW_US,
                format!(
                    "This request may use up to {units} tokens, more than the limit of {limit} tokens per minute; lower max_tokens or the input."
                ),
            ));
        }
        if wanted > capacity {
            let wait_us = ceil_div(wanted - capacity, limit);
            let what = if kind == LimitKind::Requests {
                "requests"
            } else {
                "tokens"
            };
            return Err((
                kind,
                wait_us,
                format!("Rate limit reached: {limit} {what} per minute."),
            ));
        }
        *level = wanted;
        let state = rate_state(wanted, limit);
        if i == 0 {
            states.0 = Some(state);
        } else {
            states.1 = Some(state);
        }
    }
    // Levels of unlimited dimensions drain too, so a limit added later starts fresh.
    if limits.requests_per_minute.is_none() {
        next.requests_level = 0;
    }
    if limits.tokens_per_minute.is_none() {
        next.tokens_level = 0;
    }
    next.levels_at_us = now_us;
    if let Some(quota) = limits.monthly_tokens {
        let committed = next.used_tokens.saturating_add(next.reserved_tokens);
        if committed.saturating_add(demand.tokens) > quota {
            return Err((
                LimitKind::MonthlyTokens,
                until_next_period_us(now_us),
                format!(
                    "Monthly token quota reached: {committed} of {quota} tokens used or reserved; this request may use up to {}.",
                    demand.tokens
                ),
            ));
        }
    }
    if let Some(cap) = limits.monthly_spend_minor {
        let cap = Micros::from_minor(cap).0;
        let committed = next.used_spend.saturating_add(next.reserved_spend);
        if committed.saturating_add(demand.spend.0) > cap {
            return Err((
                LimitKind::MonthlySpend,
                until_next_period_us(now_us),
                "Monthly spend cap reached.".to_owned(),
            ));
        }
    }
    next.in_flight += 1;
    next.reserved_tokens = next.reserved_tokens.saturating_add(demand.tokens);
    next.reserved_spend = next.reserved_spend.saturating_add(demand.spend.0);
    Ok((next, states.0, states.1))
}

/// Microseconds until the monthly quota and spend cap reset (the next UTC month).
fn until_next_period_us(now_us: i64) -> i64 {
    billing::period::next_period_start(now_us.div_euclid(1000))
        .map_or(WINDOW_US, |start_ms| start_ms * 1000 - now_us)
}

/// Applies one lease synchronisation to its scope's counter: the usage it reports moves
/// from reserved to used, the store's count of what the lease holds becomes what the
/// replica says it keeps (whatever the store had: an expired lease is counted again),
/// returned per-minute units leave the buckets, and a grant of at most a share of what is
/// left in each limit is charged. Returns the grant and the lease's new row
/// `(tokens, spend, slots)`.
pub(super) fn sync_lease(
    c: &mut Counter,
    sync: &SyncRequest,
    (held_tokens, held_spend, held_slots): (i64, i64, i64),
    now: i64,
    period: &str,
) -> (Grant, (i64, i64, i64)) {
    let l = &sync.limits;
    c.roll_period(period);
    if c.period == sync.period {
        c.used_tokens = c.used_tokens.saturating_add(sync.used_tokens);
        c.used_spend = c.used_spend.saturating_add(sync.used_spend);
    }
    c.reserved_tokens = (c.reserved_tokens - held_tokens + sync.keep.tokens).max(0);
    c.reserved_spend = (c.reserved_spend - held_spend + sync.keep.spend).max(0);
    c.in_flight = (c.in_flight - held_slots + sync.keep.slots).max(0);
    let drain = |level: i64, limit: Option<i64>| {
        limit.map_or(0, |limit| drained(level, c.levels_at_us, now, limit))
    };
    c.requests_level = (drain(c.requests_level, l.requests_per_minute)
        - sync.returned.requests.saturating_mul(WINDOW_US))
    .max(0);
    c.tokens_level = (drain(c.tokens_level, l.tokens_per_minute)
        - sync.returned.rate_tokens.saturating_mul(WINDOW_US))
    .max(0);
    c.levels_at_us = now;
    let left = Units {
        requests: bucket_room(c.requests_level, l.requests_per_minute),
        rate_tokens: bucket_room(c.tokens_level, l.tokens_per_minute),
        slots: l.max_concurrent.map_or(0, |m| m - c.in_flight),
        tokens: l
            .monthly_tokens
            .map_or(0, |q| q - c.used_tokens - c.reserved_tokens),
        spend: l.monthly_spend_minor.map_or(0, |cap| {
            Micros::from_minor(cap).0 - c.used_spend - c.reserved_spend
        }),
    };
    let g = lease::grant_within(sync.want, left);
    c.requests_level = c
        .requests_level
        .saturating_add(g.requests.saturating_mul(WINDOW_US));
    c.tokens_level = c
        .tokens_level
        .saturating_add(g.rate_tokens.saturating_mul(WINDOW_US));
    c.reserved_tokens = c.reserved_tokens.saturating_add(g.tokens);
    c.reserved_spend = c.reserved_spend.saturating_add(g.spend);
    c.in_flight = c.in_flight.saturating_add(g.slots);
    let grant = Grant {
        granted: g,
        view: lease::BucketView {
            requests_level: c.requests_level,
            tokens_level: c.tokens_level,
            at_us: now,
        },
    };
    (
        grant,
        (
            sync.keep.tokens + g.tokens,
            sync.keep.spend + g.spend,
            sync.keep.slots + g.slots,
        ),
    )
}

/// Checks one request against its scopes' counters; on success updates them.
pub(super) fn admit_one(
    counters: &mut BTreeMap<String, Counter>,
    scopes: &[Scope],
    demand: Demand,
    now: i64,
    period: &str,
) -> Result<RateHeaders, Refusal> {
    let mut headers = RateHeaders::default();
    let mut updated = Vec::with_capacity(scopes.len());
    for scope in scopes {
        let counter = counters.get(&scope.id).cloned().unwrap_or_default();
        match check(&counter, &scope.limits, demand, now, period) {
            Ok((next, requests, tokens)) => {
                headers.tighten(requests, tokens);
                updated.push((scope.id.clone(), next));
            }
            Err((kind, wait_us, message)) => {
                // Headers of a refusal show the state without this request.
                let mut headers = RateHeaders::default();
                for scope in scopes {
                    let counter = counters.get(&scope.id).cloned().unwrap_or_default();
                    let state = |limit: Option<i64>, level: i64| {
                        limit.map(|l| rate_state(drained(level, counter.levels_at_us, now, l), l))
                    };
                    headers.tighten(
                        state(scope.limits.requests_per_minute, counter.requests_level),
                        state(scope.limits.tokens_per_minute, counter.tokens_level),
                    );
                }
                let retry_after_secs = (wait_us.max(1) as u64)
                    .div_ceil(1_000_000)
                    .clamp(1, MAX_RETRY_AFTER_SECS);
                return Err(Refusal {
                    kind,
                    retry_after_secs,
                    headers,
                    message,
                });
            }
        }
    }
    for (id, next) in updated {
        counters.insert(id, next);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_000_000_000_000;

    fn limits() -> Limits {
        Limits::default()
    }

    fn demand(tokens: i64) -> Demand {
        Demand {
            tokens,
            spend: Micros(0),
        }
    }

    #[test]
    fn requests_per_minute_allow_a_full_burst_then_refuse() {
        let l = Limits {
            requests_per_minute: Some(7),
            ..limits()
        };
        let mut c = Counter::default();
        for i in 0..7 {
            let (next, requests, _) = check(&c, &l, demand(1), NOW, "2026-11").unwrap();
            assert_eq!(requests.unwrap().remaining, 6 - i);
            c = next;
            c.in_flight = 0;
        }
        let (kind, wait_us, _) = check(&c, &l, demand(1), NOW, "2026-11").unwrap_err();
        assert_eq!(kind, LimitKind::Requests);
        // One request drains in 60/7 s.
        assert_eq!(wait_us, ceil_div(60_000_000, 7));
        assert!(check(&c, &l, demand(1), NOW + wait_us, "2026-11").is_ok());
        assert!(check(&c, &l, demand(1), NOW + wait_us - 1, "2026-11").is_err());
    }

    #[test]
    fn tokens_per_minute_count_the_demand_and_refuse_oversized_requests() {
        let l = Limits {
            tokens_per_minute: Some(1000),
            ..limits()
        };
        let c = Counter::default();
        let (c, _, tokens) = check(&c, &l, demand(600), NOW, "p").unwrap();
        assert_eq!(tokens.unwrap().remaining, 400);
        assert_eq!(tokens.unwrap().reset_us, 36_000_000);
        assert_eq!(
            check(&c, &l, demand(500), NOW, "p").unwrap_err().0,
            LimitKind::Tokens
        );
        assert!(check(&c, &l, demand(400), NOW, "p").is_ok());
        assert_eq!(
            check(&Counter::default(), &l, demand(1001), NOW, "p")
                .unwrap_err()
                .0,
            LimitKind::Tokens
        );
    }

    #[test]
    fn concurrency_counts_in_flight_requests() {
        let l = Limits {
            max_concurrent: Some(2),
            ..limits()
        };
        let c = Counter::default();
        let (c, _, _) = check(&c, &l, demand(1), NOW, "p").unwrap();
        let (c, _, _) = check(&c, &l, demand(1), NOW, "p").unwrap();
        assert_eq!(c.in_flight, 2);
        assert_eq!(
            check(&c, &l, demand(1), NOW, "p").unwrap_err().0,
            LimitKind::Concurrency
        );
    }

    #[test]
    fn the_monthly_quota_counts_reservations_and_resets_with_the_period() {
        let l = Limits {
            monthly_tokens: Some(100),
            ..limits()
        };
        let c = Counter {
            period: "2026-11".into(),
            used_tokens: 50,
            reserved_tokens: 30,
            ..Counter::default()
        };
        assert!(check(&c, &l, demand(20), NOW, "2026-11").is_ok());
        assert_eq!(
            check(&c, &l, demand(21), NOW, "2026-11").unwrap_err().0,
            LimitKind::MonthlyTokens
        );
        // A new month forgets what was used, not what is still reserved.
        let (next, _, _) = check(&c, &l, demand(70), NOW, "2026-12").unwrap();
        assert_eq!((next.used_tokens, next.reserved_tokens), (0, 100));
    }

    #[test]
    fn the_spend_cap_is_in_exact_micros() {
        let l = Limits {
            monthly_spend_minor: Some(1),
            ..limits()
        };
        let c = Counter {
            period: "p".into(),
            used_spend: 999_999,
            ..Counter::default()
        };
        let one = Demand {
            tokens: 1,
            spend: Micros(1),
        };
        let (c, _, _) = check(&c, &l, one, NOW, "p").unwrap();
        assert_eq!(
            check(&c, &l, one, NOW, "p").unwrap_err().0,
            LimitKind::MonthlySpend
        );
    }

    #[test]
    fn next_period_starts_on_the_first_of_the_month() {
        // 2026-11-30T23:59:59Z → one second to December.
        assert_eq!(until_next_period_us(1_796_083_199_000_000), 1_000_000);
    }
}
