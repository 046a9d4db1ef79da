//! Quota leases: the part of a scope's limits this replica may hand out without asking
//! the store.
//!
//! Owns: the in-memory balances of each leased scope and the arithmetic of taking from
//! them, settling into them and sizing the next grant.
//! Must never: admit beyond what the store has already counted for this replica. Every
//! unit a lease hands out was charged to the scope's counters (a reservation for quota and
//! spend, bucket level for the per-minute limits, in-flight slots for concurrency) before
//! it became free here, so any number of replicas together stay within every limit.
//!
//! A lease is synchronised with the store by the keeper (`keeper.rs`) through the
//! applier's transaction (`applier.rs`; the arithmetic is in `counter.rs`): a sync reports
//! the usage settled since the last one, returns free units the replica no longer needs,
//! states what the replica still holds (free + in flight, as an absolute figure, so a sync
//! after a lost acknowledgement or an expired lease corrects the store), and takes a new
//! grant of at most a quarter of what is left in each limit. As a limit nears its end the
//! grants shrink to nothing and requests go to the store one by one, exactly as without
//! leases.

use std::time::{Duration, Instant};

use super::bucket::{drained, rate_state, RateState};
use super::model::{Demand, Limits};

/// How often a lease with settled usage reports it.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);
/// A busy lease holds about this long's worth of its recent use.
pub const HORIZON: Duration = Duration::from_secs(1);
/// A lease unused this long gives its free units back.
pub const IDLE_RETURN: Duration = Duration::from_secs(1);
/// A lease holding anything is renewed at least this often (its row expires after
/// [`LEASE_TTL`] if the replica dies).
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a lease row outlives its replica's last sync.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// A grant is at most this fraction (1/n) of what is left in a limit.
pub const GRANT_SHARE: i64 = 4;
/// Requests' worth of units asked for when a scope is first leased.
const FIRST_GRANT_REQUESTS: i64 = 16;

/// Amounts in each dimension a lease can hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Units {
    /// Requests-per-minute units.
    pub requests: i64,
    /// Tokens-per-minute units.
    pub rate_tokens: i64,
    /// Concurrency slots.
    pub slots: i64,
    /// Monthly quota tokens.
    pub tokens: i64,
    /// Monthly spend, in micros.
    pub spend: i64,
}

impl Units {
    fn of(demand: Demand) -> Self {
        Self {
            requests: 1,
            rate_tokens: demand.tokens,
            slots: 1,
            tokens: demand.tokens,
            spend: demand.spend.0,
        }
    }

    fn zip(self, other: Self, f: impl Fn(i64, i64) -> i64) -> Self {
        Self {
            requests: f(self.requests, other.requests),
            rate_tokens: f(self.rate_tokens, other.rate_tokens),
            slots: f(self.slots, other.slots),
            tokens: f(self.tokens, other.tokens),
            spend: f(self.spend, other.spend),
        }
    }

    /// Zero in every dimension the limits leave open.
    fn only_limited(self, limits: &Limits) -> Self {
        let keep = |on: bool, v: i64| if on { v } else { 0 };
        Self {
            requests: keep(limits.requests_per_minute.is_some(), self.requests),
            rate_tokens: keep(limits.tokens_per_minute.is_some(), self.rate_tokens),
            slots: keep(limits.max_concurrent.is_some(), self.slots),
            tokens: keep(limits.monthly_tokens.is_some(), self.tokens),
            spend: keep(limits.monthly_spend_minor.is_some(), self.spend),
        }
    }

    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// The store's per-minute bucket levels after a sync, for the rate-limit headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct BucketView {
    pub requests_level: i64,
    pub tokens_level: i64,
    pub at_us: i64,
}

/// What a replica sends the store to synchronise one lease.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub scope: String,
    pub limits: Limits,
    /// Usage settled since the last sync, to move from reserved to used.
    pub used_tokens: i64,
    pub used_spend: i64,
    /// The period that usage belongs to.
    pub period: String,
    /// Per-minute units handed back (charged to the buckets, never used).
    pub returned: Units,
    /// What the replica still holds after this sync, before the grant: free units plus
    /// the bounds of requests admitted from the lease and still running.
    pub keep: Units,
    /// Free units wanted on top of what is kept.
    pub want: Units,
}

/// The store's answer to a sync.
#[derive(Debug, Clone, Copy, Default)]
pub struct Grant {
    pub granted: Units,
    pub view: BucketView,
}

/// One scope's lease on this replica.
#[derive(Debug)]
pub struct QuotaLease {
    pub limits: Limits,
    /// Units charged in the store and not yet handed to a request.
    free: Units,
    /// Bounds of admitted requests still running.
    in_flight: Units,
    used_tokens: i64,
    used_spend: i64,
    /// Units taken by requests since the last sync, for sizing the next grant.
    consumed: Units,
    /// A request found the lease short since the last sync: ask for this much.
    short_of: Option<Units>,
    /// The limits changed under the lease: give everything back.
    stale: bool,
    syncing: bool,
    last_sync: Instant,
    last_taken: Instant,
    view: BucketView,
    /// The free units the last sync aimed at.
    last_target: Units,
}

impl QuotaLease {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            free: Units::default(),
            in_flight: Units::default(),
            used_tokens: 0,
            used_spend: 0,
            consumed: Units::default(),
            short_of: None,
            stale: false,
            syncing: false,
            last_sync: now,
            last_taken: now,
            view: BucketView::default(),
            last_target: Units::default(),
        }
    }

    /// Whether a request of `demand` under `limits` can be admitted from the lease alone.
    pub fn covers(&self, limits: &Limits, demand: Demand) -> bool {
        if self.stale || *limits != self.limits {
            return false;
        }
        let need = Units::of(demand).only_limited(limits);
        let f = self.free;
        f.requests >= need.requests
            && f.rate_tokens >= need.rate_tokens
            && f.slots >= need.slots
            && f.tokens >= need.tokens
            && f.spend >= need.spend
    }

    /// Hands `demand` to a request (after [`Self::covers`]); returns its header states.
    pub fn take(
        &mut self,
        demand: Demand,
        now: Instant,
        now_us: i64,
    ) -> (Option<RateState>, Option<RateState>) {
        let need = Units::of(demand).only_limited(&self.limits);
        self.free = self.free.zip(need, |a, b| a - b);
        self.in_flight = self.in_flight.zip(need, |a, b| a + b);
        self.consumed = self.consumed.zip(need, |a, b| a + b);
        self.last_taken = now;
        self.headers(now_us)
    }

    /// The request's own header states as this replica sees the buckets: what the store
    /// had left after the last sync, plus what is still free here.
    pub fn headers(&self, now_us: i64) -> (Option<RateState>, Option<RateState>) {
        let state = |limit: Option<i64>, level: i64, free: i64| {
            limit.map(|l| {
                let level = drained(level, self.view.at_us, now_us, l);
                let mut s = rate_state(level, l);
                s.remaining = (s.remaining + free).min(l);
                s
            })
        };
        (
            state(
                self.limits.requests_per_minute,
                self.view.requests_level,
                self.free.requests,
            ),
            state(
                self.limits.tokens_per_minute,
                self.view.tokens_level,
                self.free.rate_tokens,
            ),
        )
    }

    /// A request admitted from this lease ended having used `used` of its `bound`.
    pub fn settle(&mut self, bound: Demand, used: Demand) {
        let bound_units = Units::of(bound).only_limited(&self.limits);
        self.in_flight = self.in_flight.zip(bound_units, |a, b| (a - b).max(0));
        self.used_tokens = self.used_tokens.saturating_add(used.tokens);
        self.used_spend = self.used_spend.saturating_add(used.spend.0);
        // The slot and what the request did not use are free again; per-minute tokens it
        // did not use go back to the bucket share (as the store path refunds them).
        let unused_tokens = bound.tokens - used.tokens;
        let back = Units {
            requests: 0,
            rate_tokens: unused_tokens.max(0),
            slots: 1,
            tokens: unused_tokens,
            spend: bound.spend.0 - used.spend.0,
        }
        .only_limited(&self.limits);
        self.free = self.free.zip(back, |a, b| a + b);
    }

    /// A request found this lease short; the next sync asks for enough for it (and more).
    pub fn note_shortfall(&mut self, limits: &Limits, demand: Demand, now: Instant) {
        if *limits != self.limits {
            self.stale = true;
        }
        // Demand, even unmet, keeps the lease in use.
        self.last_taken = now;
        let want = Units::of(demand).zip(Units::default(), |a, _| a * FIRST_GRANT_REQUESTS);
        self.short_of = Some(match self.short_of {
            Some(w) => w.zip(want, i64::max),
            None => want,
        });
    }

    /// Whether nothing is held here or waiting to be reported.
    pub fn is_empty(&self) -> bool {
        self.free.is_zero()
            && self.in_flight.is_zero()
            && self.used_tokens == 0
            && self.used_spend == 0
            && !self.syncing
    }

    pub fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_taken.max(self.last_sync))
    }

    /// The free units the lease should hold after its next sync.
    fn target(&self, now: Instant, closing: bool) -> Units {
        if closing || self.stale || now.saturating_duration_since(self.last_taken) >= IDLE_RETURN {
            return Units::default();
        }
        // Enough for [`HORIZON`] at the rate seen since the last sync (so a sync that
        // waits on a busy store does not leave the lease dry); after
        // a shortfall, at least twice the last target, so a busy scope's lease grows
        // geometrically instead of missing again and again.
        let elapsed = now
            .saturating_duration_since(self.last_sync)
            .max(SYNC_EVERY / 10)
            .as_micros()
            .max(1) as i64;
        let per_horizon = |v: i64| -> i64 {
            ((v as i128 * HORIZON.as_micros() as i128) / elapsed as i128) as i64
        };
        let mut target = self.consumed.zip(Units::default(), |a, _| per_horizon(a));
        if let Some(short) = self.short_of {
            let doubled = self
                .last_target
                .zip(short, |t, s| t.saturating_mul(2).max(s));
            target = target.zip(doubled, i64::max);
        }
        target.only_limited(&self.limits)
    }

    /// Starts a sync if one is due; the returned request must be answered with
    /// [`Self::finish_sync`] or [`Self::fail_sync`].
    pub fn begin_sync(
        &mut self,
        scope: &str,
        period: &str,
        now: Instant,
        closing: bool,
    ) -> Option<SyncRequest> {
        if self.syncing {
            return None;
        }
        let target = self.target(now, closing);
        let since = now.saturating_duration_since(self.last_sync);
        let has_usage = self.used_tokens != 0 || self.used_spend != 0;
        let limited = |u: Units| u.only_limited(&self.limits);
        let short = {
            let f = self.free;
            let t = limited(target);
            f.requests * 2 < t.requests
                || f.rate_tokens * 2 < t.rate_tokens
                || f.slots * 2 < t.slots
                || f.tokens * 2 < t.tokens
                || f.spend * 2 < t.spend
        };
        let surplus = !self
            .free
            .zip(target, |f, t| (f - t.saturating_mul(2)).max(0))
            .is_zero();
        let holds = !self.free.is_zero() || !self.in_flight.is_zero();
        let due = closing
            || self.short_of.is_some()
            || (short && since >= SYNC_EVERY / 10)
            || (since >= SYNC_EVERY && (has_usage || surplus))
            || (holds && since >= HEARTBEAT);
        if !due {
            return None;
        }
        // Free units beyond the target go back; the rest stay usable during the sync.
        let returned = self.free.zip(target, |f, t| (f - t).max(0));
        self.free = self.free.zip(returned, |f, r| f - r);
        let want = target.zip(self.free, |t, f| (t - f).max(0));
        let request = SyncRequest {
            scope: scope.to_owned(),
            limits: self.limits,
            used_tokens: std::mem::take(&mut self.used_tokens),
            used_spend: std::mem::take(&mut self.used_spend),
            period: period.to_owned(),
            returned,
            keep: self.free.zip(self.in_flight, |f, i| f.max(0) + i),
            want,
        };
        self.consumed = Units::default();
        self.short_of = None;
        self.last_target = target;
        self.syncing = true;
        self.last_sync = now;
        Some(request)
    }

    pub fn finish_sync(&mut self, grant: Grant) {
        self.syncing = false;
        self.free = self.free.zip(grant.granted, |a, b| a + b);
        self.view = grant.view;
        if self.stale && self.free.is_zero() && self.in_flight.is_zero() {
            self.stale = false;
        }
    }

    /// The store did not answer: the usage is reported again next time (counted twice at
    /// worst, never lost); the returned units stay returned (the store keeps counting them
    /// until the next sync states what is kept).
    pub fn fail_sync(&mut self, request: &SyncRequest) {
        self.syncing = false;
        self.used_tokens = self.used_tokens.saturating_add(request.used_tokens);
        self.used_spend = self.used_spend.saturating_add(request.used_spend);
    }

    /// Takes new limits once everything under the old ones is settled and returned;
    /// until then the lease is stale and gives everything back.
    pub fn adopt(&mut self, limits: Limits) {
        if limits == self.limits {
            return;
        }
        if self.free.is_zero() && self.in_flight.is_zero() && !self.syncing {
            self.limits = limits;
            self.stale = false;
        } else {
            self.stale = true;
        }
    }
}

/// What a grant may be in each dimension: at most 1/[`GRANT_SHARE`] of what is left.
pub fn grant_within(want: Units, left: Units) -> Units {
    want.zip(left, |w, l| w.min(l.max(0) / GRANT_SHARE).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use billing::Micros;

    fn quota(tokens: i64) -> Limits {
        Limits {
            monthly_tokens: Some(tokens),
            max_concurrent: Some(1_000),
            ..Limits::default()
        }
    }

    fn demand(tokens: i64) -> Demand {
        Demand {
            tokens,
            spend: Micros(0),
        }
    }

    #[test]
    fn a_lease_hands_out_only_what_was_granted() {
        let now = Instant::now();
        let limits = quota(1_000_000);
        let mut lease = QuotaLease::new(limits, now);
        assert!(!lease.covers(&limits, demand(10)));
        lease.note_shortfall(&limits, demand(10), now);
        let sync = lease.begin_sync("t:a", "2026-11", now, false).unwrap();
        assert_eq!(sync.want.tokens, 160);
        assert_eq!(sync.want.slots, 16);
        assert_eq!(sync.want.requests, 0, "no per-minute limit, nothing asked");
        lease.finish_sync(Grant {
            granted: Units {
                tokens: 100,
                slots: 16,
                ..Units::default()
            },
            view: BucketView::default(),
        });
        for _ in 0..10 {
            assert!(lease.covers(&limits, demand(10)));
            lease.take(demand(10), now, 0);
        }
        assert!(!lease.covers(&limits, demand(1)));
        // Settling gives back what was not used, and reports what was.
        lease.settle(demand(10), demand(4));
        assert!(lease.covers(&limits, demand(6)));
        assert!(!lease.covers(&limits, demand(7)));
        let sync = lease
            .begin_sync("t:a", "2026-11", now + SYNC_EVERY, false)
            .unwrap();
        assert_eq!(sync.used_tokens, 4);
        // Kept: 6 free + 9 requests' bounds of 10 still running; slots 7 free + 9 running.
        assert_eq!(sync.keep.tokens, 6 + 90);
        assert_eq!(sync.keep.slots, 16);
    }

    #[test]
    fn other_limits_or_a_failed_sync_never_admit_more() {
        let now = Instant::now();
        let limits = quota(1_000);
        let mut lease = QuotaLease::new(limits, now);
        lease.note_shortfall(&limits, demand(10), now);
        let sync = lease.begin_sync("t:a", "p", now, false).unwrap();
        lease.fail_sync(&sync);
        assert!(!lease.covers(&limits, demand(1)));
        lease.finish_sync(Grant {
            granted: Units {
                tokens: 50,
                slots: 5,
                ..Units::default()
            },
            view: BucketView::default(),
        });
        assert!(lease.covers(&limits, demand(50)));
        assert!(!lease.covers(&quota(2_000), demand(1)), "the plan changed");
    }

    #[test]
    fn an_idle_or_closing_lease_gives_everything_back() {
        let now = Instant::now();
        let limits = quota(1_000_000);
        let mut lease = QuotaLease::new(limits, now);
        lease.note_shortfall(&limits, demand(10), now);
        lease.begin_sync("t:a", "p", now, false).unwrap();
        lease.finish_sync(Grant {
            granted: Units {
                tokens: 160,
                slots: 16,
                ..Units::default()
            },
            view: BucketView::default(),
        });
        let later = now + IDLE_RETURN + Duration::from_millis(1);
        let sync = lease.begin_sync("t:a", "p", later, false).unwrap();
        assert_eq!(sync.keep, Units::default());
        assert_eq!(sync.want, Units::default());
        lease.finish_sync(Grant::default());
        assert!(lease.is_empty());
        // Demand after the idle spell asks for a lease again.
        let back = later + Duration::from_secs(5);
        assert!(!lease.covers(&limits, demand(10)));
        lease.note_shortfall(&limits, demand(10), back);
        let sync = lease.begin_sync("t:a", "p", back, false).unwrap();
        assert_eq!(sync.want.tokens, 160);
    }

    #[test]
    fn grants_take_at_most_a_quarter_of_what_is_left() {
        let want = Units {
            requests: 100,
            rate_tokens: 10,
            slots: 3,
            tokens: 1_000,
            spend: 5,
        };
        let left = Units {
            requests: 40,
            rate_tokens: 1_000,
            slots: 3,
            tokens: 4_000,
            spend: -8,
        };
        assert_eq!(
            grant_within(want, left),
            Units {
                requests: 10,
                rate_tokens: 10,
                slots: 0,
                tokens: 1_000,
                spend: 0,
            }
        );
    }
}
