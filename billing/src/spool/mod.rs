//! The durable usage spool: the metering path between the gateway and the store.
//!
//! A usage event is appended to a local append-only log and fsynced (group commit: one
//! fsync covers every event that arrived meanwhile) before the caller is told it is safe;
//! the [`shipper`] then writes events to the store in batches, idempotently, and advances a
//! persisted cursor. So the store can be down for minutes and the gateway can be killed at
//! any moment without losing an event or counting one twice.
//!
//! Under load the writer waits a little before each fsync ([`SpoolOptions::max_linger`])
//! so that one covers more events: an fsync costs CPU, and without the wait a busy gateway
//! would fsync every few requests. At low rates it does not wait, so an idle gateway adds
//! no latency.
//!
//! An operator may trade the last few milliseconds of power-loss safety for throughput
//! ([`SpoolOptions::fsync_interval`]): the event is then written to the operating system
//! before the caller goes on, which keeps it through any crash of this process (`kill -9`
//! included), and fsynced within the interval; only a crash of the machine itself can lose
//! the events of that last interval. The caller writes it itself, so no thread hand-off
//! sits on the request path.
//!
//! After a response's fate is known the gateway appends an outcome (delivered or not,
//! without waiting for fsync). Events whose outcome never arrived because the process died
//! are shipped with delivery `unknown`: at most the requests in flight at the crash.
//!
//! The pieces: `record` (what a record holds, its binary layout) and `segment` (framing,
//! segment files, reading them back, torn tails) on disk; `writer` (the group-commit
//! thread), `log` (the live segment and moving on), `prepare` (zero-filled segments made
//! ahead), `sync` (the interval sync thread) and `outcomes` (the delivery-outcome thread)
//! on the way in; `shipper` on the way out.

mod log;
mod outcomes;
mod prepare;
pub mod record;
pub mod segment;
pub mod shipper;
mod sync;
#[cfg(test)]
mod tests;
mod writer;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

pub use record::SpoolEntry;
pub use shipper::{Shipper, ShipperHandle, ShipperStats};

use crate::usage::UsageEvent;
use log::{lock, Log};
use writer::{Command, Writer};

/// Queue bound in front of the writer thread; appends wait (never fail) when it is full.
const QUEUE: usize = 65_536;

/// How a spool writes.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// Bytes after which a new segment file starts.
    pub segment_bytes: u64,
    /// The longest the writer waits before an fsync for more events to share it; zero
    /// fsyncs as soon as an event arrives. It only waits while durable appends arrive at
    /// a rate that brings at least one more within that time.
    pub max_linger: Duration,
    /// Zero: every usage event is fsynced before [`Spool::append_usage`] returns (group
    /// commit). Otherwise the event is written to the operating system before it returns
    /// and fsynced within this interval: safe through a crash of the process, not through
    /// one of the machine in that interval.
    pub fsync_interval: Duration,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 16 * 1024 * 1024,
            max_linger: DEFAULT_MAX_LINGER,
            fsync_interval: Duration::ZERO,
        }
    }
}

/// The default [`SpoolOptions::max_linger`].
pub const DEFAULT_MAX_LINGER: Duration = Duration::from_micros(200);

/// What the writer has done since the spool was opened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpoolStats {
    /// Usage events appended (each waited for the disk, or for the operating system under
    /// a [`SpoolOptions::fsync_interval`]).
    pub durable_appends: u64,
    /// Fsyncs of the live segment: group commits, or the interval's syncs.
    pub fsyncs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O: {0}")]
    Io(String),
    #[error("the spool is closed")]
    Closed,
}

/// A handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    /// Under a [`SpoolOptions::fsync_interval`], the log that callers append usage to
    /// themselves; `None` when every append goes through the writer thread.
    direct: Option<Arc<Mutex<Log>>>,
    /// Benchmarks only: accept every append and write nothing (see [`Spool::discarding`]).
    discard: bool,
}

pub(crate) struct Shared {
    pub dir: PathBuf,
    /// `dir/lock`, held exclusively while this spool is open (see [`lock_dir`]).
    _lock: Option<fs::File>,
    /// Segments numbered below this were written by an earlier process.
    pub first_live_segment: u64,
    /// Wakes the shipper when something was written.
    pub written: Notify,
    /// Delivery outcomes waiting out [`DELIVERY_SETTLE`]; `flush` waits for them (see
    /// `outcomes`).
    pub settling: std::sync::atomic::AtomicUsize,
    pub settled: Notify,
    /// Responses taken as delivered once their deadline passes, oldest first.
    pub delivered: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, String)>>,
    pub delivered_added: std::sync::Condvar,
    /// The segment the writer appends to, and how many bytes it has written there (past
    /// them lie zeros).
    pub live: std::sync::atomic::AtomicU64,
    pub live_len: std::sync::atomic::AtomicU64,
    /// [`SpoolStats`], kept by the writer.
    durable_appends: AtomicU64,
    fsyncs: AtomicU64,
}

/// How long after the last byte is handed to the connection a response is taken as
/// delivered. The server writes those bytes to the socket after the body ends; a gateway
/// killed within this window leaves the record `unknown` (in flight), never `delivered`.
pub const DELIVERY_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

impl Spool {
    /// Opens (creating) the spool in `dir` and starts its writer thread. Segments left by
    /// an earlier process are kept for the shipper; this process writes new ones.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<Self> {
        Self::open_with(
            dir,
            SpoolOptions {
                segment_bytes,
                ..SpoolOptions::default()
            },
        )
    }

    /// [`Spool::open`] with every option.
    pub fn open_with(dir: &Path, options: SpoolOptions) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let first_live_segment = segment::list_segments(dir)?.last().map_or(0, |n| n + 1);
        let shared = Arc::new(Shared::new(dir, first_live_segment, Some(lock)));
        let (commands, queue) = mpsc::channel(QUEUE);
        let periodic = !options.fsync_interval.is_zero();
        let log = Arc::new(Mutex::new(Log::create(
            shared.clone(),
            options.segment_bytes.max(1024),
            periodic,
        )?));
        let writer = Writer::new(shared.clone(), log.clone(), options.max_linger, !periodic);
        std::thread::Builder::new()
            .name("usage-spool".into())
            .spawn(move || writer.run(queue))?;
        if periodic {
            let (log, interval) = (Arc::downgrade(&log), options.fsync_interval);
            std::thread::Builder::new()
                .name("usage-spool-sync".into())
                .spawn(move || sync::sync_periodically(&log, interval))?;
        }
        let (settle, commands_left) = (shared.clone(), commands.downgrade());
        std::thread::Builder::new()
            .name("usage-outcomes".into())
            .spawn(move || outcomes::settle_deliveries(settle, commands_left))?;
        Ok(Self {
            commands,
            shared,
            direct: periodic.then_some(log),
            discard: false,
        })
    }

    /// A spool that accepts every event and keeps none, so a benchmark can measure what
    /// metering costs. Never for serving: usage written to it is lost by design.
    pub fn discarding(dir: &Path) -> Self {
        let (commands, _queue) = mpsc::channel(1);
        Self {
            commands,
            shared: Arc::new(Shared::new(dir, 0, None)),
            direct: None,
            discard: true,
        }
    }

    /// Appends a usage event and returns once it is on disk (fsynced), or under a
    /// [`SpoolOptions::fsync_interval`] once the operating system has it.
    pub async fn append_usage(&self, event: &UsageEvent) -> Result<(), SpoolError> {
        if self.discard {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(160);
        segment::encode_usage(event, &mut bytes).map_err(|e| SpoolError::Io(e.to_string()))?;
        if let Some(log) = &self.direct {
            // A copy into the mapped segment (the page cache), on the caller's thread.
            lock(log)
                .write(&bytes, false)
                .map_err(|e| SpoolError::Io(e.to_string()))?;
            self.shared.durable_appends.fetch_add(1, Ordering::Relaxed);
            self.shared.written.notify_one();
            return Ok(());
        }
        let (durable, done) = oneshot::channel();
        self.commands
            .send(Command::Append {
                bytes,
                durable: Some(durable),
            })
            .await
            .map_err(|_| SpoolError::Closed)?;
        done.await
            .map_err(|_| SpoolError::Closed)?
            .map_err(SpoolError::Io)
    }

    /// Queues a usage event without waiting for the disk, for callers that cannot wait
    /// (destructors). The next group commit or [`Spool::flush`] makes it durable. Returns
    /// whether it was queued.
    pub fn append_usage_detached(&self, event: &UsageEvent) -> bool {
        if self.discard {
            return true;
        }
        let mut bytes = Vec::with_capacity(160);
        if segment::encode_usage(event, &mut bytes).is_err() {
            return false;
        }
        self.enqueue(Command::Append {
            bytes,
            durable: None,
        })
    }

    /// Sends without waiting; if the queue is full, a task finishes the send.
    fn enqueue(&self, command: Command) -> bool {
        match self.commands.try_send(command) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(command)) => {
                let commands = self.commands.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => {
                        handle.spawn(async move {
                            let _ = commands.send(command).await;
                        });
                        true
                    }
                    Err(_) => false,
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Records whether a response reached its client. Does not wait for the disk: a lost
    /// outcome only makes the record's delivery `unknown`.
    pub fn record_outcome(&self, request_id: &str, delivered: bool) {
        if self.discard {
            return;
        }
        let mut bytes = Vec::with_capacity(64);
        if segment::encode_outcomes(std::iter::once(request_id), delivered, &mut bytes).is_err() {
            return;
        }
        self.enqueue(Command::Append {
            bytes,
            durable: None,
        });
    }

    /// Records that a response was delivered, once [`DELIVERY_SETTLE`] has passed: one
    /// thread writes these in batches, so a response costs a queue push, not a timer.
    pub fn record_delivered(&self, request_id: &str) {
        if !self.discard {
            outcomes::settle_later(&self.shared, request_id);
        }
    }

    /// Fsyncs everything appended so far (outcomes included, after waiting for those still
    /// settling).
    pub async fn flush(&self) -> Result<(), SpoolError> {
        if self.discard {
            return Ok(());
        }
        outcomes::settled(&self.shared).await;
        let (done, wait) = oneshot::channel();
        self.commands
            .send(Command::Flush(done))
            .await
            .map_err(|_| SpoolError::Closed)?;
        wait.await
            .map_err(|_| SpoolError::Closed)?
            .map_err(SpoolError::Io)
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Segments an earlier process left here that are not yet wholly in the store: none
    /// once a shipper has shipped them (it deletes each segment it has shipped).
    pub fn recovered_segments_left(&self) -> io::Result<usize> {
        let first_live = self.shared.first_live_segment;
        Ok(segment::list_segments(&self.shared.dir)?
            .into_iter()
            .filter(|n| *n < first_live)
            .count())
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            durable_appends: self.shared.durable_appends.load(Ordering::Relaxed),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
        }
    }
}

/// How long opening a spool waits for another holder of its folder to let go (a gateway
/// restarted in the same process, whose threads are winding down).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Takes `dir/lock` exclusively (`flock`), so two processes never write and ship one
/// folder: a shipper deletes the segments behind its cursor, which would be another
/// writer's live segment. Released when the spool and its threads are gone.
fn lock_dir(dir: &Path) -> io::Result<fs::File> {
    use rustix::fs::{flock, FlockOperation};
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "the spool folder {} is in use by another process (a running gateway \
                         or ship-spool); one folder has one user",
                        dir.display()
                    ),
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Shared {
    fn new(dir: &Path, first_live_segment: u64, lock: Option<fs::File>) -> Self {
        Self {
            dir: dir.to_owned(),
            _lock: lock,
            first_live_segment,
            written: Notify::new(),
            settling: std::sync::atomic::AtomicUsize::new(0),
            settled: Notify::new(),
            delivered: std::sync::Mutex::new(std::collections::VecDeque::new()),
            delivered_added: std::sync::Condvar::new(),
            live: std::sync::atomic::AtomicU64::new(u64::MAX),
            live_len: std::sync::atomic::AtomicU64::new(0),
            durable_appends: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
        }
    }
}
