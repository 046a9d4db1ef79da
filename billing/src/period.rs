//! Time as the store keeps it: Unix milliseconds, and the billing periods (UTC calendar
//! months, `YYYY-MM`) they fall in.
//!
//! Owns: the wall clock every stored timestamp is read from, and all month arithmetic (the
//! period holding an instant, a period's bounds, the start of the month after an instant).
//! Must never: use local time or a calendar other than UTC's, or read the wall clock
//! anywhere else in the crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{Date, Month, OffsetDateTime};

/// Milliseconds since the Unix epoch: every timestamp in the store is one of these.
pub fn now_ms() -> i64 {
    since_epoch().as_millis() as i64
}

/// Microseconds since the Unix epoch, for arithmetic finer than the store keeps.
pub fn now_us() -> i64 {
    since_epoch().as_micros() as i64
}

/// The wall clock; zero if it reads before 1970.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// A text that is not a `YYYY-MM` period.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a period: use YYYY-MM")]
pub struct BadPeriod(pub String);

/// The billing period (UTC calendar month, `YYYY-MM`) holding `at_ms`.
pub fn period_of(at_ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp(at_ms.div_euclid(1000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

/// `[start, end)` of a `YYYY-MM` period in Unix ms.
pub fn period_bounds(period: &str) -> Result<(i64, i64), BadPeriod> {
    let bad = || BadPeriod(period.to_owned());
    let (y, m) = period.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let year: i32 = y.parse().map_err(|_| bad())?;
    let month: u8 = m.parse().map_err(|_| bad())?;
    let month = Month::try_from(month).map_err(|_| bad())?;
    let start = Date::from_calendar_date(year, month, 1).map_err(|_| bad())?;
    let end = first_of_next_month(start).ok_or_else(bad)?;
    Ok((start_ms(start), start_ms(end)))
}

/// The start, in Unix ms, of the UTC month after the one holding `at_ms` (where the
/// current period's limits reset); `None` past the end of the calendar (year 9999).
pub fn next_period_start(at_ms: i64) -> Option<i64> {
    let t = OffsetDateTime::from_unix_timestamp(at_ms.div_euclid(1000)).ok()?;
    first_of_next_month(t.date()).map(start_ms)
}

fn first_of_next_month(date: Date) -> Option<Date> {
    let (year, month) = match date.month() {
        Month::December => (date.year() + 1, Month::January),
        m => (date.year(), m.next()),
    };
    Date::from_calendar_date(year, month, 1).ok()
}

/// Midnight UTC of `date`, in Unix ms.
fn start_ms(date: Date) -> i64 {
    date.midnight().assume_utc().unix_timestamp() * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_months() {
        assert_eq!(period_of(0), "1970-01");
        // 2026-11-30T23:59:59.999Z and one millisecond later.
        assert_eq!(period_of(1_796_083_199_999), "2026-11");
        assert_eq!(period_of(1_796_083_200_000), "2026-12");
    }

    #[test]
    fn periods_have_utc_month_bounds() {
        assert_eq!(
            period_bounds("2026-11").unwrap(),
            (1_793_491_200_000, 1_796_083_200_000)
        );
        assert_eq!(period_bounds("2026-12").unwrap().1, 1_798_761_600_000);
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00"] {
            assert!(period_bounds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_next_period_starts_on_the_first_of_the_following_utc_month() {
        // 2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z and 2027-01-01T00:00:00Z.
        let (nov, dec, jan) = (1_793_491_200_000, 1_796_083_200_000, 1_798_761_600_000);
        assert_eq!(
            next_period_start(nov),
            Some(dec),
            "the first instant of a month"
        );
        assert_eq!(next_period_start(nov + 15 * 86_400_000), Some(dec));
        assert_eq!(
            next_period_start(dec - 1),
            Some(dec),
            "its last millisecond"
        );
        assert_eq!(next_period_start(dec), Some(jan), "December rolls the year");
        assert_eq!(next_period_start(jan - 1), Some(jan));
        // Before the epoch: 1969-12-31T23:59:59.999Z.
        assert_eq!(next_period_start(-1), Some(0));
        // Leap February: 2028-02-10 ends on 2028-03-01.
        assert_eq!(
            next_period_start(1_833_753_600_000),
            Some(1_835_481_600_000)
        );
        // Past the calendar's end.
        assert_eq!(next_period_start(i64::MAX), None);
    }

    #[test]
    fn the_next_period_starts_where_the_current_period_ends() {
        let mut at = 1_700_000_000_000;
        for _ in 0..40 {
            let (start, end) = period_bounds(&period_of(at)).unwrap();
            assert!(start <= at && at < end);
            assert_eq!(next_period_start(at), Some(end), "{}", period_of(at));
            at = end + 12_345_678;
        }
    }

    #[test]
    fn the_clock_reads_the_same_instant_in_both_units() {
        let (ms, us) = (now_ms(), now_us());
        assert!(ms > 1_700_000_000_000);
        assert!(us / 1000 >= ms && us / 1000 - ms < 60_000, "{ms} {us}");
    }
}
