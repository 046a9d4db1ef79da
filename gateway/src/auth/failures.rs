//! Failed authentications per client address: a bounded table of rates, and the addresses
//! told to back off.
//!
//! Owns: counting an address's failures against a rate (governor's keyed GCRA limiter),
//! and refusing an address over it until its wait is over. Must never: grow without bound
//! (addresses past the table's size share one entry), or hold a lock across an await.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Where failures from addresses past the table's size are counted, together.
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
/// The longest an address is told to wait: one failure's replenish period at the lowest
/// rate (one a minute).
const LONGEST_WAIT: Duration = Duration::from_secs(60);

pub(super) struct FailureLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    /// Addresses over their rate, and until when; a store lookup is not made for them.
    refused: moka::sync::Cache<IpAddr, Instant>,
    capacity: usize,
}

impl FailureLimiter {
    /// `per_minute` failures an address may have, in bursts of up to `burst`; `capacity`
    /// addresses tracked at most.
    pub(super) fn new(per_minute: u32, burst: u32, capacity: usize) -> Self {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let clock = DefaultClock::default();
        Self {
            limiter: RateLimiter::dashmap_with_clock(
                Quota::per_minute(per_minute).allow_burst(burst),
                clock.clone(),
            ),
            clock,
            refused: moka::sync::Cache::builder()
                .max_capacity(capacity as u64)
                .time_to_live(LONGEST_WAIT)
                .build(),
            capacity: capacity.max(1),
        }
    }

    /// How long `client` must still wait, if it is over its rate.
    pub(super) fn refused(&self, client: Option<IpAddr>) -> Option<Duration> {
        let mut until = self.refused.get(&self.key(client?));
        if until.is_none() && self.limiter.len() >= self.capacity {
            until = self.refused.get(&OVERFLOW);
        }
        until?.checked_duration_since(Instant::now())
    }

    /// Counts a failure of `client`; how long it must wait, if this one put it over.
    pub(super) fn failed(&self, client: Option<IpAddr>) -> Option<Duration> {
        let mut key = self.key(client?);
        if self.limiter.len() >= self.capacity {
            key = OVERFLOW;
        }
        let not_until = self.limiter.check_key(&key).err()?;
        let wait = not_until.wait_time_from(self.clock.now()).min(LONGEST_WAIT);
        self.refused.insert(key, Instant::now() + wait);
        Some(wait)
    }

    /// Forgets addresses whose rate has fully recovered.
    pub(super) fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// The address failures are counted by: IPv4 as is, IPv6 by its /64 (one host's
    /// share of a network is usually a whole /64).
    fn key(&self, client: IpAddr) -> IpAddr {
        match client {
            IpAddr::V4(_) => client,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let prefix = u128::from(v6) & !(u128::from(u64::MAX));
                    IpAddr::V6(Ipv6Addr::from(prefix))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_address_over_its_burst_is_refused_and_others_are_not() {
        let limiter = FailureLimiter::new(60, 3, 100);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.failed(Some(a)), None);
        }
        let wait = limiter.failed(Some(a)).unwrap();
        assert!(wait > Duration::ZERO && wait <= LONGEST_WAIT);
        assert!(limiter.refused(Some(a)).is_some());
        assert!(limiter.refused(Some(b)).is_none());
        assert_eq!(limiter.failed(Some(b)), None);
        assert_eq!(limiter.failed(None), None);
    }

    #[test]
    fn ipv6_hosts_in_one_slash_64_share_a_rate() {
        let limiter = FailureLimiter::new(60, 1, 100);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        assert_eq!(limiter.failed(Some(a)), None);
        assert!(limiter.failed(Some(b)).is_some());
    }

    #[test]
    fn addresses_past_the_table_share_one_rate() {
        let limiter = FailureLimiter::new(60, 1, 2);
        for i in 0..2 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, i));
            assert_eq!(limiter.failed(Some(addr)), None);
        }
        let late: IpAddr = "10.0.1.1".parse().unwrap();
        let later: IpAddr = "10.0.1.2".parse().unwrap();
        assert_eq!(limiter.failed(Some(late)), None);
        assert!(limiter.failed(Some(later)).is_some());
        assert!(limiter.limiter.len() <= 3);
    }
}
