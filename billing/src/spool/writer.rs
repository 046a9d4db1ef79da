//! The group-commit writer: one thread takes queued appends and flushes and writes each
//! group to the [`Log`] in one go, with one fsync for every durable append in it.
//!
//! Owns: the writer's commands, grouping, pacing ([`Pacer`]: under load it waits a little
//! before an fsync so that one covers more events) and acknowledging appends. Must never:
//! acknowledge a durable append before its group is written (and, without an fsync
//! interval, fsynced), or hold a flush back to pace it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::log::{lock, Log};
use super::Shared;

/// Most records one group commit takes.
const MAX_GROUP: usize = 8_192;

/// What the writer thread is asked to do.
pub(super) enum Command {
    /// Append whole framed records; acknowledge on `durable` once they are written (and
    /// fsynced, unless under an fsync interval).
    Append {
        bytes: Vec<u8>,
        durable: Option<oneshot::Sender<Result<(), String>>>,
    },
    /// Fsync everything written so far, then acknowledge.
    Flush(oneshot::Sender<Result<(), String>>),
}

/// The thread that takes queued appends and flushes, in groups.
pub(super) struct Writer {
    shared: Arc<Shared>,
    log: Arc<Mutex<Log>>,
    pacer: Pacer,
    /// Whether a group with usage events is fsynced before they are acknowledged (no
    /// [`SpoolOptions::fsync_interval`](super::SpoolOptions::fsync_interval)).
    sync_each: bool,
}

impl Writer {
    /// A writer appending to `log`, waiting up to `max_linger` before an fsync under load;
    /// with `sync_each`, every group holding a durable append is fsynced before it is
    /// acknowledged.
    pub(super) fn new(
        shared: Arc<Shared>,
        log: Arc<Mutex<Log>>,
        max_linger: Duration,
        sync_each: bool,
    ) -> Self {
        Self {
            shared,
            log,
            pacer: Pacer::new(max_linger),
            sync_each,
        }
    }

    /// Runs until every sender of `queue` is gone, then closes the log.
    pub(super) fn run(mut self, mut queue: mpsc::Receiver<Command>) {
        let mut buffer = Vec::with_capacity(1 << 16);
        let drain = |queue: &mut mpsc::Receiver<Command>, group: &mut Vec<Command>| {
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
        };
        while let Some(first) = queue.blocking_recv() {
            let mut group = vec![first];
            drain(&mut queue, &mut group);
            // A flush (shutdown, tests) never waits; usage events may, under load.
            let flush = group.iter().any(|c| matches!(c, Command::Flush(_)));
            let mut durable = durable_appends(&group);
            if durable > 0 && !flush && self.sync_each {
                let linger = self.pacer.linger(durable);
                if !linger.is_zero() {
                    std::thread::sleep(linger);
                    drain(&mut queue, &mut group);
                    durable = durable_appends(&group);
                }
            }
            self.pacer.observe(durable, Instant::now());
            self.shared
                .durable_appends
                .fetch_add(durable as u64, Ordering::Relaxed);
            buffer.clear();
            for command in &group {
                if let Command::Append { bytes, .. } = command {
                    buffer.extend_from_slice(bytes);
                }
            }
            let must_sync = (durable > 0 && self.sync_each) || flush;
            let result = lock(&self.log)
                .write(&buffer, must_sync)
                .map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(error = %e, "usage spool write failed");
            }
            for command in group {
                match command {
                    Command::Append {
                        durable: Some(ack), ..
                    }
                    | Command::Flush(ack) => {
                        let _ = ack.send(result.clone());
                    }
                    Command::Append { durable: None, .. } => {}
                }
            }
            self.shared.written.notify_one();
        }
        // Every handle is gone: cut the zeros off and make what is left durable.
        lock(&self.log).close();
    }
}

/// How many of a group's commands wait for the disk.
fn durable_appends(group: &[Command]) -> usize {
    group
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::Append {
                    durable: Some(_),
                    ..
                }
            )
        })
        .count()
}

/// Decides how long a group commit waits for more events before its fsync.
///
/// It keeps a smoothed rate of durable appends and waits only while at least one more is
/// expected within [`SpoolOptions::max_linger`](super::SpoolOptions::max_linger); then it
/// waits until the group is expected to hold about [`GROUP_TARGET`], at most that long (a
/// group already that large does not wait). The rate is smoothed over [`RATE_WINDOW`] of
/// time, not a number of groups: after a pause the next event is not held on the strength
/// of the burst before it.
struct Pacer {
    max_linger: Duration,
    /// Durable appends per second over recent groups.
    rate: f64,
    last: Option<Instant>,
}

/// Events a lingering group commit aims to cover with one fsync.
const GROUP_TARGET: f64 = 16.0;
/// Time constant of the smoothed rate: the groups of the last few milliseconds count,
/// and a pause longer than that forgets the rate before it.
const RATE_WINDOW: Duration = Duration::from_millis(5);

impl Pacer {
    fn new(max_linger: Duration) -> Self {
        Self {
            max_linger,
            rate: 0.0,
            last: None,
        }
    }

    /// How long a group already holding `have` durable appends waits for more.
    fn linger(&self, have: usize) -> Duration {
        let longest = self.max_linger.as_secs_f64();
        let missing = GROUP_TARGET - have as f64;
        if longest <= 0.0 || missing <= 0.0 || self.rate * longest < 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((missing / self.rate).min(longest))
    }

    /// A group of `durable` appends is being committed at `at`.
    fn observe(&mut self, durable: usize, at: Instant) {
        if let Some(last) = self.last {
            let elapsed = at.duration_since(last).as_secs_f64().max(1e-6);
            let rate = durable as f64 / elapsed;
            let weight = 1.0 - (-elapsed / RATE_WINDOW.as_secs_f64()).exp();
            self.rate = weight * rate + (1.0 - weight) * self.rate;
        }
        self.last = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_waits_only_when_more_events_are_due_within_the_limit() {
        let limit = Duration::from_micros(200);
        let mut pacer = Pacer::new(limit);
        let start = Instant::now();
        assert_eq!(pacer.linger(1), Duration::ZERO, "nothing measured yet");
        // One event every 10 ms: none more expected within 200 µs.
        for i in 1..=50 {
            pacer.observe(1, start + Duration::from_millis(10 * i));
        }
        assert_eq!(pacer.linger(1), Duration::ZERO);
        // Twenty events every 100 µs (200 000/s): GROUP_TARGET of them take well under the
        // limit (the smoothed rate has reached most of that after 5 ms).
        let busy = start + Duration::from_secs(1);
        for i in 1..=50 {
            pacer.observe(20, busy + Duration::from_micros(100 * i));
        }
        let linger = pacer.linger(1);
        assert!(linger > Duration::ZERO && linger < limit, "{linger:?}");
        // A group that already holds enough does not wait.
        assert_eq!(pacer.linger(GROUP_TARGET as usize), Duration::ZERO);
        // Ten thousand a second: one every 100 µs, so the whole limit.
        let steady = busy + Duration::from_secs(1);
        for i in 1..=50 {
            pacer.observe(5, steady + Duration::from_micros(500 * i));
        }
        assert_eq!(pacer.linger(1), limit);
        // After a pause the next event is not held.
        pacer.observe(1, steady + Duration::from_secs(5));
        assert_eq!(pacer.linger(1), Duration::ZERO);
    }

    #[test]
    fn a_zero_limit_never_waits() {
        let mut pacer = Pacer::new(Duration::ZERO);
        let start = Instant::now();
        for i in 1..=50 {
            pacer.observe(100, start + Duration::from_micros(10 * i));
        }
        assert_eq!(pacer.linger(1), Duration::ZERO);
    }
}
