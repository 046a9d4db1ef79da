//! Moves spooled usage events into the store.
//!
//! Reads segments in order from a persisted cursor, pairs each event with its outcome,
//! writes batches with the ledger's idempotent insert, then persists the new cursor and
//! deletes segments wholly behind it. A crash anywhere here only means some events are
//! written again, which the request-id key makes harmless. While the store is down the
//! shipper retries with backoff and the spool grows on disk.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::record::SpoolEntry;
use super::segment;
use super::{Shared, Spool};
use crate::db::Db;
use crate::usage::{Delivery, Ledger, UsageEvent};

/// Most events written to the store in one transaction.
const BATCH: usize = 5_000;
const CURSOR_FILE: &str = "cursor";
/// How long the shipper lets events gather after being woken.
const COALESCE: Duration = Duration::from_millis(50);
/// How often, at most, the shipper persists its cursor while it stays in one segment.
const CURSOR_EVERY: Duration = Duration::from_secs(1);
/// The most read buffer the shipper keeps between rounds (a round at full load reads a
/// few hundred kilobytes).
const SCRATCH_KEPT: usize = 4 << 20;

/// A position in the spool: segment number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    segment: u64,
    offset: u64,
}

struct Waiting {
    start: Position,
    event: UsageEvent,
    seen: Instant,
    recovered: bool,
}

/// Counters readable while the shipper runs.
#[derive(Debug, Default)]
pub struct ShipperStats {
    pub shipped: AtomicU64,
    pub failures: AtomicU64,
    /// Events read but not yet in the store.
    pub backlog: AtomicU64,
}

pub struct Shipper {
    shared: Arc<Shared>,
    ledger: Ledger,
    /// How long a live event waits for its outcome before shipping as `unknown`.
    outcome_wait: Duration,
    stats: Arc<ShipperStats>,
}

/// Stops the shipper and waits for it.
pub struct ShipperHandle {
    stop: watch::Sender<bool>,
    /// Closed (sent or dropped) once the shipper has returned.
    done: oneshot::Receiver<()>,
    pub stats: Arc<ShipperStats>,
}

impl ShipperHandle {
    /// Ships everything read so far (events still without an outcome as `unknown`), then
    /// stops. If the store is down it stops without shipping; the spool keeps the events.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }
}

/// Niceness of the dedicated shipper's thread: serving threads (niceness 0) get about ten
/// times its share of a contended CPU, and preempt it at once when they wake.
const SHIPPER_NICENESS: i32 = 10;

impl Shipper {
    pub fn new(spool: &Spool, ledger: Ledger, outcome_wait: Duration) -> Self {
        Self {
            shared: spool.shared(),
            ledger,
            outcome_wait,
            stats: Arc::new(ShipperStats::default()),
        }
    }

    /// Runs the shipper as a task of the current runtime.
    pub fn spawn(self) -> ShipperHandle {
        let (stop, stopped) = watch::channel(false);
        let (finished, done) = oneshot::channel();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            self.run(stopped).await;
            let _ = finished.send(());
        });
        ShipperHandle { stop, done, stats }
    }

    /// Runs a shipper on a thread of its own, below serving in CPU priority, with store
    /// connections of its own opened there (so SQLite's connection thread is below serving
    /// too). Shipping is bulk work that can wait milliseconds; a request cannot, and on a
    /// busy machine a batch insert holding a core would delay requests queued behind it.
    /// When the store cannot be reached at start, the thread keeps trying; events wait in
    /// the spool meanwhile.
    pub fn spawn_dedicated(
        spool: &Spool,
        store_url: &str,
        outcome_wait: Duration,
    ) -> std::io::Result<ShipperHandle> {
        let (stop, mut stopped) = watch::channel(false);
        let (finished, done) = oneshot::channel();
        let stats = Arc::new(ShipperStats::default());
        let (shared, url, shipper_stats) = (spool.shared(), store_url.to_owned(), stats.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("usage-shipper".into())
            .spawn(move || {
                // Linux keeps niceness per thread; threads started from here inherit it.
                if let Err(e) = rustix::process::setpriority_process(None, SHIPPER_NICENESS) {
                    tracing::warn!(error = %e, "could not lower the usage shipper's priority");
                }
                runtime.block_on(async move {
                    let mut backoff = Duration::from_millis(100);
                    let db = loop {
                        match Db::connect_usage_writer(&url).await {
                            Ok(db) => break db,
                            Err(e) => {
                                shipper_stats.failures.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, retry_in = ?backoff, "usage shipper cannot reach the store");
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stopped.changed() => {}
                        }
                        if *stopped.borrow() {
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    };
                    let shipper = Shipper {
                        shared,
                        ledger: Ledger::new(db.clone()),
                        outcome_wait,
                        stats: shipper_stats,
                    };
                    shipper.run(stopped).await;
                    db.close().await;
                });
                let _ = finished.send(());
            })?;
        Ok(ShipperHandle { stop, done, stats })
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let dir = self.shared.dir.clone();
        let mut persisted = read_cursor(&dir);
        let mut persisted_at = Instant::now();
        let mut read_at = persisted.unwrap_or(Position {
            segment: 0,
            offset: 0,
        });
        let mut waiting: Vec<Waiting> = Vec::new();
        let mut outcomes: HashMap<String, bool> = HashMap::new();
        // Events shipped as `unknown` because their outcome was late; a late outcome
        // upgrades them.
        let mut shipped_unknown: HashMap<String, UsageEvent> = HashMap::new();
        let mut backoff = Duration::from_millis(100);
        // Kept across rounds, so their capacity is reused rather than allocated afresh.
        let mut scratch: Vec<u8> = Vec::new();
        let mut ready: Vec<UsageEvent> = Vec::new();
        let mut still: Vec<Waiting> = Vec::new();
        loop {
            let stopping = *stopped.borrow();
            // 1. Read whatever is new. One clock reading stamps the round's events (and
            //    ages the waiting ones below), not one per event.
            let now = Instant::now();
            let first_live = self.shared.first_live_segment;
            let read = read_new(
                &dir,
                &mut read_at,
                &self.shared,
                &mut scratch,
                |entry, start| match entry {
                    SpoolEntry::Usage { event } => waiting.push(Waiting {
                        start,
                        recovered: start.segment < first_live,
                        event,
                        seen: now,
                    }),
                    SpoolEntry::Outcome {
                        request_id,
                        delivered,
                    } => {
                        outcomes.insert(request_id, delivered);
                    }
                },
            );
            if let Err(e) = read {
                tracing::error!(error = %e, "reading the usage spool failed");
            }
            // A backlog read at once (after an outage) can be a whole segment: not kept.
            if scratch.capacity() > SCRATCH_KEPT {
                scratch = Vec::new();
            }
            // 2. Decide which events are ready. Recovered events are complete once all
            //    recovered segments are read: their process is gone.
            let recovered_read = read_at.segment >= self.shared.first_live_segment;
            ready.clear();
            still.clear();
            for mut w in waiting.drain(..) {
                if w.event.delivery == Delivery::Unknown {
                    if let Some(delivered) = outcomes.remove(&w.event.request_id) {
                        w.event.delivery = if delivered {
                            Delivery::Delivered
                        } else {
                            Delivery::Undelivered
                        };
                    } else if (w.recovered && recovered_read)
                        || now.saturating_duration_since(w.seen) >= self.outcome_wait
                        || stopping
                    {
                        if !w.recovered {
                            shipped_unknown.insert(w.event.request_id.clone(), w.event.clone());
                        }
                    } else {
                        still.push(w);
                        continue;
                    }
                }
                ready.push(w.event);
            }
            std::mem::swap(&mut waiting, &mut still);
            for (request_id, delivered) in outcomes.drain() {
                if let Some(mut event) = shipped_unknown.remove(&request_id) {
                    event.delivery = if delivered {
                        Delivery::Delivered
                    } else {
                        Delivery::Undelivered
                    };
                    ready.push(event);
                }
            }
            if shipped_unknown.len() > 100_000 {
                shipped_unknown.clear();
            }
            // 3. Ship.
            let mut failed = false;
            // SQLite has one writer: shorter transactions let admission's in between.
            let batch_rows = if self.ledger.is_postgres() {
                BATCH
            } else {
                BATCH / 5
            };
            for batch in ready.chunks(batch_rows) {
                match self.ledger.record_batch(batch).await {
                    Ok(_) => {
                        self.stats
                            .shipped
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, retry_in = ?backoff, "shipping usage failed; will retry");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                // Nothing is lost: rewind to re-read everything not yet shipped.
                persisted = read_cursor(&dir);
                read_at = persisted.unwrap_or(Position {
                    segment: 0,
                    offset: 0,
                });
                waiting.clear();
                outcomes.clear();
                self.stats.backlog.store(0, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                if *stopped.borrow() && stopping {
                    return;
                }
                continue;
            }
            backoff = Duration::from_millis(100);
            // 4. Persist the cursor: everything before the oldest waiting event is shipped.
            //    It costs two fsyncs, so it is written at most every `CURSOR_EVERY`, unless
            //    it enters a new segment (the ones behind can then go) or the shipper
            //    stops. A cursor left behind by a crash only means events shipped again,
            //    which the store ignores.
            let cursor = waiting.iter().map(|w| w.start).min().unwrap_or(read_at);
            let due = persisted.is_none_or(|p| p.segment != cursor.segment)
                || persisted_at.elapsed() >= CURSOR_EVERY
                || (stopping && waiting.is_empty());
            if due && persisted != Some(cursor) {
                match write_cursor(&dir, cursor) {
                    Ok(()) => {
                        persisted = Some(cursor);
                        persisted_at = Instant::now();
                        delete_behind(&dir, cursor.segment);
                    }
                    Err(e) => tracing::error!(error = %e, "persisting the spool cursor failed"),
                }
            }
            self.stats
                .backlog
                .store(waiting.len() as u64, Ordering::Relaxed);
            if stopping && waiting.is_empty() {
                return;
            }
            // New events wake the shipper, which then lets more gather: one store
            // transaction (one fsync on SQLite) and one pass over the waiting events per
            // round instead of per group commit of the spool.
            tokio::select! {
                _ = async {
                    self.shared.written.notified().await;
                    tokio::time::sleep(COALESCE).await;
                } => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stopped.changed() => {}
            }
        }
    }
}

/// Reads every complete record after `at`, across segments, and moves `at` past them,
/// handing each entry to `visit` with the position where its record starts.
fn read_new(
    dir: &Path,
    at: &mut Position,
    shared: &Shared,
    scratch: &mut Vec<u8>,
    mut visit: impl FnMut(SpoolEntry, Position),
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    let segments = segment::list_segments(dir)?;
    for (i, &number) in segments.iter().enumerate() {
        if number < at.segment {
            continue;
        }
        if number > at.segment {
            *at = Position {
                segment: number,
                offset: 0,
            };
        }
        let path = segment::segment_path(dir, number);
        // The live segment (always the last listed) is read up to what the writer wrote:
        // zeros follow. A limit that is stale or belongs to the previous segment is only
        // larger, and reading stops at the zeros anyway. A segment that a newer one
        // follows has its exact length and is read whole.
        let written = shared.live_len.load(Ordering::Acquire);
        let last = i + 1 == segments.len();
        let limit = (last && shared.live.load(Ordering::Acquire) == number).then_some(written);
        let mut start = at.offset;
        at.offset = segment::visit_from(&path, at.offset, limit, scratch, |entry, end| {
            visit(
                entry,
                Position {
                    segment: number,
                    offset: start,
                },
            );
            start = end;
        })?;
        // Move on only from a segment that a newer one follows (the writer is done with it).
        if last {
            break;
        }
    }
    Ok(())
}

fn cursor_path(dir: &Path) -> PathBuf {
    dir.join(CURSOR_FILE)
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let text = fs::read_to_string(cursor_path(dir)).ok()?;
    let (segment, offset) = text.trim().split_once(' ')?;
    Some(Position {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

fn write_cursor(dir: &Path, cursor: Position) -> std::io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut file = fs::File::create(&tmp)?;
    writeln!(file, "{} {}", cursor.segment, cursor.offset)?;
    file.sync_all()?;
    fs::rename(&tmp, cursor_path(dir))?;
    fs::File::open(dir)?.sync_all()
}

/// Removes segments numbered below `segment`: everything in them is in the store.
fn delete_behind(dir: &Path, segment: u64) {
    if let Ok(numbers) = segment::list_segments(dir) {
        for n in numbers.into_iter().filter(|n| *n < segment) {
            let _ = fs::remove_file(segment::segment_path(dir, n));
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A usage event numbered `i` (its id and prompt tokens), for the spool's tests.
    pub(in crate::spool) fn event(i: usize) -> UsageEvent {
        UsageEvent::builder(format!("req_{i:06}"), "t")
            .tokens(i as i64, 1)
            .at(1, 1)
            .delivery(Delivery::Unknown)
            .build()
    }

    /// Appends across dozens of preallocated segments while a reader follows the live one:
    /// every event is read once, in order, and finished segments carry no zero tail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_following_rotating_segments_sees_every_event_once() {
        const EVENTS: usize = 400;
        let dir = std::env::temp_dir().join(format!("spool-rotate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let spool = Spool::open(&dir, 1024).unwrap();
        let shared = spool.shared();
        let reader = {
            let (dir, shared) = (dir.clone(), shared.clone());
            tokio::spawn(async move {
                let mut at = Position {
                    segment: 0,
                    offset: 0,
                };
                let mut seen = Vec::new();
                let mut scratch = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(30);
                while seen.len() < EVENTS && Instant::now() < deadline {
                    read_new(&dir, &mut at, &shared, &mut scratch, |entry, _| {
                        if let SpoolEntry::Usage { event } = entry {
                            seen.push(event.prompt_tokens as usize);
                        }
                    })
                    .unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen
            })
        };
        for i in 0..EVENTS {
            spool.append_usage(&event(i)).await.unwrap();
        }
        let seen = reader.await.unwrap();
        assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>());
        let segments = segment::list_segments(&dir).unwrap();
        assert!(segments.len() > 20, "only {} segments", segments.len());
        for n in &segments[..segments.len() - 1] {
            let bytes = fs::read(segment::segment_path(&dir, *n)).unwrap();
            assert!(bytes.len() >= 1024, "segment {n} cut short");
            let path = segment::segment_path(&dir, *n);
            let records = segment::read_from(&path, 0, None).unwrap();
            assert_eq!(
                records.last().map(|(_, end)| *end),
                Some(bytes.len() as u64),
                "segment {n} has bytes past its last record"
            );
        }
        drop(spool);
        let _ = fs::remove_dir_all(&dir);
    }
}
