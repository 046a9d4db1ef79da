//! The durable usage spool: the metering path between the gateway and the store.
//!
//! A usage event is appended to a local append-only log and fsynced (group commit: one
//! fsync covers every event that arrived meanwhile) before the caller is told it is safe;
//! the [`shipper`] then writes events to the store in batches, idempotently, and advances a
//! persisted cursor. So the store can be down for minutes and the gateway can be killed at
//! any moment without losing an event or counting one twice.
//!
//! Under load the writer waits a little before each fsync ([`SpoolOptions::max_linger`])
//! so that one covers more events: on a virtual disk an fsync costs tens of microseconds
//! of CPU, and without the wait a busy gateway fsyncs every few requests. At low rates it
//! does not wait, so an idle gateway adds no latency.
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

pub mod segment;
pub mod shipper;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

pub use segment::SpoolEntry;
pub use shipper::{Shipper, ShipperHandle, ShipperStats};

use crate::usage::UsageEvent;

/// Queue bound in front of the writer thread; appends wait (never fail) when it is full.
const QUEUE: usize = 65_536;
/// Most records one group commit takes.
const MAX_GROUP: usize = 8_192;
/// Most delivery outcomes written as one record (each id is at most ~64 bytes, so a record
/// stays far below the framing's size limit).
const OUTCOMES_PER_RECORD: usize = 4_096;

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

enum Command {
    Append {
        bytes: Vec<u8>,
        durable: Option<oneshot::Sender<Result<(), String>>>,
    },
    Flush(oneshot::Sender<Result<(), String>>),
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
    /// Segments numbered below this were written by an earlier process.
    pub first_live_segment: u64,
    /// Wakes the shipper when something was written.
    pub written: Notify,
    /// Delivery outcomes waiting out [`DELIVERY_SETTLE`]; `flush` waits for them.
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
        let first_live_segment = segment::list_segments(dir)?.last().map_or(0, |n| n + 1);
        let shared = Arc::new(Shared::new(dir, first_live_segment));
        let (commands, queue) = mpsc::channel(QUEUE);
        let periodic = !options.fsync_interval.is_zero();
        let log = Arc::new(Mutex::new(Log::create(
            shared.clone(),
            options.segment_bytes.max(1024),
            periodic,
        )?));
        let writer = Writer {
            shared: shared.clone(),
            log: log.clone(),
            pacer: Pacer::new(options.max_linger),
            sync_each: !periodic,
        };
        std::thread::Builder::new()
            .name("usage-spool".into())
            .spawn(move || writer.run(queue))?;
        if periodic {
            let (log, interval) = (Arc::downgrade(&log), options.fsync_interval);
            std::thread::Builder::new()
                .name("usage-spool-sync".into())
                .spawn(move || sync_periodically(&log, interval))?;
        }
        let outcomes = (shared.clone(), commands.downgrade());
        std::thread::Builder::new()
            .name("usage-outcomes".into())
            .spawn(move || settle_deliveries(outcomes.0, outcomes.1))?;
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
            shared: Arc::new(Shared::new(dir, 0)),
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
        use std::sync::atomic::Ordering;
        if self.discard {
            return;
        }
        self.shared.settling.fetch_add(1, Ordering::SeqCst);
        let due = std::time::Instant::now() + DELIVERY_SETTLE;
        let mut queue = self
            .shared
            .delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let was_empty = queue.is_empty();
        queue.push_back((due, request_id.to_owned()));
        drop(queue);
        if was_empty {
            self.shared.delivered_added.notify_one();
        }
    }

    /// Fsyncs everything appended so far (outcomes included, after waiting for those still
    /// settling).
    pub async fn flush(&self) -> Result<(), SpoolError> {
        use std::sync::atomic::Ordering;
        if self.discard {
            return Ok(());
        }
        loop {
            let settled = self.shared.settled.notified();
            if self.shared.settling.load(Ordering::SeqCst) == 0 {
                break;
            }
            let _ = tokio::time::timeout(DELIVERY_SETTLE * 2, settled).await;
        }
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

    /// What the writer has done so far.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            durable_appends: self.shared.durable_appends.load(Ordering::Relaxed),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    fn new(dir: &Path, first_live_segment: u64) -> Self {
        Self {
            dir: dir.to_owned(),
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

/// Writes "delivered" outcomes once their settle time has passed, every due one in one
/// append. Runs until the spool's writer is gone.
fn settle_deliveries(shared: Arc<Shared>, commands: mpsc::WeakSender<Command>) {
    use std::sync::atomic::Ordering;
    let mut queue = shared.delivered.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = std::time::Instant::now();
        let Some(&(first_due, _)) = queue.front() else {
            if commands.strong_count() == 0 {
                return;
            }
            queue = match shared
                .delivered_added
                .wait_timeout(queue, std::time::Duration::from_secs(1))
            {
                Ok((q, _)) => q,
                Err(e) => e.into_inner().0,
            };
            continue;
        };
        if first_due > now {
            let wait = first_due - now;
            queue = match shared.delivered_added.wait_timeout(queue, wait) {
                Ok((q, _)) => q,
                Err(e) => e.into_inner().0,
            };
            continue;
        }
        let mut due = Vec::new();
        while queue.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, id)) = queue.pop_front() {
                due.push(id);
            }
        }
        drop(queue);
        let mut bytes = Vec::with_capacity(16 + due.len() * 40);
        for ids in due.chunks(OUTCOMES_PER_RECORD) {
            if let Err(e) =
                segment::encode_outcomes(ids.iter().map(String::as_str), true, &mut bytes)
            {
                tracing::error!(error = %e, "encoding delivery outcomes failed");
            }
        }
        // The writer may be busy: wait for room rather than drop outcomes.
        let sent = commands.upgrade().is_some_and(|c| {
            c.blocking_send(Command::Append {
                bytes,
                durable: None,
            })
            .is_ok()
        });
        if shared.settling.fetch_sub(due.len(), Ordering::SeqCst) == due.len() {
            shared.settled.notify_waiters();
        }
        if !sent {
            return;
        }
        // Let a few more gather: one append per ~10 ms at most.
        std::thread::sleep(std::time::Duration::from_millis(10));
        queue = shared.delivered.lock().unwrap_or_else(|e| e.into_inner());
    }
}

fn lock(log: &Mutex<Log>) -> MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread that takes queued appends and flushes, in groups.
struct Writer {
    shared: Arc<Shared>,
    log: Arc<Mutex<Log>>,
    pacer: Pacer,
    /// Whether a group with usage events is fsynced before they are acknowledged (no
    /// [`SpoolOptions::fsync_interval`]).
    sync_each: bool,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Command>) {
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

/// Under a [`SpoolOptions::fsync_interval`]: fsyncs the live segment whenever something
/// was written since the last time, once per interval, until the spool is gone, after the
/// fsyncs that moving on from a segment left due ([`Log::due`]). They run outside the
/// lock, so appends never wait for the disk.
///
/// With the segment mapped, writing back its pages write-protects them, and the first
/// copy into each page after that (or into a page never touched) faults; in the kernel
/// that fault is a journalled inode update, tens of microseconds. So after each fsync this
/// thread faults in, writable, the pages the next interval is expected to fill (twice
/// what the last one wrote), and serving threads copy into pages that are ready.
fn sync_periodically(log: &std::sync::Weak<Mutex<Log>>, interval: Duration) {
    // Where the previous prefault started, in which segment, and what the last interval
    // wrote (the pace to expect when the live segment has just changed).
    let mut last: Option<(u64, u64)> = None;
    let mut pace = 0;
    loop {
        std::thread::sleep(interval);
        let Some(log) = log.upgrade() else { return };
        let (file, shared, map, number, mut due, dirty) = {
            let mut log = lock(&log);
            if !log.dirty && log.due.is_empty() {
                continue;
            }
            let dirty = std::mem::take(&mut log.dirty);
            (
                log.file.try_clone(),
                log.shared.clone(),
                log.map.clone(),
                log.number,
                std::mem::take(&mut log.due),
                dirty,
            )
        };
        // Segments moved on from first, then the directory, then the live one: records
        // become durable in the order they were written.
        let synced = due.finish(&shared.dir).and_then(|()| {
            if dirty {
                file.and_then(|f| f.sync_data())
            } else {
                Ok(())
            }
        });
        if let Err(e) = synced {
            tracing::error!(error = %e, "usage spool fsync failed");
            let mut log = lock(&log);
            log.due.put_back(due);
            log.dirty |= dirty;
            continue;
        }
        if dirty {
            shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        let Some(map) = map else { continue };
        if shared.live.load(Ordering::Acquire) != number {
            last = None;
            continue;
        }
        let at = shared.live_len.load(Ordering::Acquire);
        let written = match last {
            Some((segment, from)) if segment == number => at.saturating_sub(from),
            _ => pace.max(at),
        };
        last = Some((number, at));
        pace = written;
        let ahead = (2 * written).clamp(PREFAULT_MIN, PREFAULT_MAX) as usize;
        let start = (at as usize).min(map.len());
        let len = ahead.min(map.len() - start);
        prefault(&map, start, len);
    }
}

/// Faults in `len` bytes of `map` from `start`, writable. Fails harmlessly where the
/// kernel lacks it (before 5.14); copies then fault.
fn prefault(map: &memmap2::MmapRaw, start: usize, len: usize) {
    if len > 0 {
        let _ = map.advise_range(memmap2::Advice::PopulateWrite, start, len);
    }
}

/// The page size of the systems we serve on: the unit of the page cache, of faults and of
/// writeback.
const PAGE: usize = 4096;

/// Bytes of a mapped segment made writable ahead of the writer after each fsync: at
/// least a few pages, at most a megabyte.
const PREFAULT_MIN: u64 = 16 << 10;
const PREFAULT_MAX: u64 = 1 << 20;

/// The live segment and the one prepared after it.
struct Log {
    shared: Arc<Shared>,
    segment_bytes: u64,
    number: u64,
    file: File,
    /// Whether segments are mapped, under an fsync interval (see [`Log::map`]). Then the
    /// sync thread also finishes the segments this log moves on from (see [`Log::due`]).
    mapped: bool,
    /// The live segment's zero-filled length, mapped: records are copied in, so an append
    /// costs no system call. Only under an fsync interval: when every group is fsynced,
    /// writing back a mapped page write-protects it and the next group's copy faults, which
    /// costs more than the `pwrite` it saves. `None` also where mapping failed; records
    /// that do not fit in what is left of the mapping are written with `pwrite`.
    /// Shared with the sync thread, which only prefaults it (see [`sync_periodically`]);
    /// only this `Log`, under its lock, copies into it.
    map: Option<Arc<memmap2::MmapRaw>>,
    size: u64,
    /// Bytes written since the last fsync.
    dirty: bool,
    /// The next segment, being filled with zeros (and mapped) in the background.
    next: Option<std::thread::JoinHandle<io::Result<Prepared>>>,
    /// Under an fsync interval: what moving on from a segment left to do. Appends run on
    /// serving threads there, so moving on costs them only a rename; the sync thread does
    /// the rest on its next round, before it syncs the live segment.
    due: Due,
}

/// Fsyncs owed by moving on from segments: the finished segments', then the directory's
/// for their successors' names.
#[derive(Default)]
struct Due {
    /// Finished segments, oldest first, each with its mapping (unmapped once synced).
    retired: Vec<(File, Option<Arc<memmap2::MmapRaw>>)>,
    dir: bool,
}

impl Due {
    fn is_empty(&self) -> bool {
        self.retired.is_empty() && !self.dir
    }

    /// Does what is due, oldest first, so a segment's successor's name is durable before
    /// any of its records are; what fails stays due.
    fn finish(&mut self, dir: &Path) -> io::Result<()> {
        while let Some((file, _)) = self.retired.first() {
            file.sync_all()?;
            self.retired.remove(0);
        }
        if self.dir {
            sync_dir(dir)?;
            self.dir = false;
        }
        Ok(())
    }

    /// Takes back what a failed [`Due::finish`] left, ahead of what came due since.
    fn put_back(&mut self, mut earlier: Due) {
        earlier.retired.append(&mut self.retired);
        self.retired = earlier.retired;
        self.dir |= earlier.dir;
    }
}

impl Log {
    fn create(shared: Arc<Shared>, segment_bytes: u64, mapped: bool) -> io::Result<Self> {
        // Half-made segments of an earlier process: never used, so nothing to keep.
        for entry in fs::read_dir(&shared.dir)?.flatten() {
            if entry.path().extension().is_some_and(|e| e == PREPARING) {
                let _ = fs::remove_file(entry.path());
            }
        }
        let number = shared.first_live_segment;
        let first = prepare_segment(&shared.dir, number, segment_bytes, mapped)?;
        install_segment(&shared.dir, number)?;
        sync_dir(&shared.dir)?;
        shared.live.store(number, Ordering::Release);
        let mut log = Self {
            shared,
            segment_bytes,
            number,
            file: first.file,
            mapped,
            map: first.map,
            size: 0,
            dirty: false,
            next: None,
            due: Due::default(),
        };
        log.prepare_next();
        Ok(log)
    }

    /// Starts zero-filling the segment after the current one.
    fn prepare_next(&mut self) {
        let (dir, number, bytes) = (self.shared.dir.clone(), self.number + 1, self.segment_bytes);
        let mapped = self.mapped;
        self.next = std::thread::Builder::new()
            .name("usage-spool-prep".into())
            .spawn(move || prepare_segment(&dir, number, bytes, mapped))
            .ok();
    }

    /// Appends `bytes` (whole records) and, if `sync`, fsyncs everything written so far
    /// (segments moved on from included).
    fn write(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        if !bytes.is_empty() {
            let at = self.size as usize;
            let copied = self.map.as_ref().is_some_and(|m| copy_into(m, at, bytes));
            if !copied {
                self.file.write_all_at(bytes, self.size)?;
            }
            self.size += bytes.len() as u64;
            self.shared.live_len.store(self.size, Ordering::Release);
            self.dirty = true;
        }
        if sync {
            self.due.finish(&self.shared.dir)?;
            if self.dirty {
                self.file.sync_data()?;
                self.dirty = false;
                self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.size >= self.segment_bytes {
            self.move_on()?;
        }
        Ok(())
    }

    /// Makes the prepared segment the live one. The finished segment already has its exact
    /// length (its last record was written past the zeros, or ended on them), so it only
    /// needs an `fsync`, and the directory one for the rename: at once when every group is
    /// fsynced, else by the sync thread (see [`Log::due`]).
    fn move_on(&mut self) -> io::Result<()> {
        let shared = self.shared.clone();
        let next = match self.next.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Ok(next))) => next,
            Some(Ok(Err(e))) => return Err(e),
            _ => prepare_segment(
                &shared.dir,
                self.number + 1,
                self.segment_bytes,
                self.mapped,
            )?,
        };
        // Named first: if that fails nothing has changed, and the next append tries again
        // with a segment prepared afresh.
        install_segment(&shared.dir, self.number + 1)?;
        // Nothing copies into the old mapping from here on.
        let finished = (
            std::mem::replace(&mut self.file, next.file),
            std::mem::replace(&mut self.map, next.map),
        );
        self.due.retired.push(finished);
        self.due.dir = true;
        self.number += 1;
        self.size = 0;
        self.dirty = false;
        shared.live_len.store(0, Ordering::Release);
        shared.live.store(self.number, Ordering::Release);
        self.prepare_next();
        if !self.mapped {
            // What fails stays due; the next group's fsync tries it again first.
            if let Err(e) = self.due.finish(&shared.dir) {
                tracing::error!(error = %e, "usage spool fsync failed");
            }
        }
        Ok(())
    }

    /// Cuts the zeros off the live segment and makes it durable; drops the prepared one.
    fn close(&mut self) {
        self.map = None;
        if let Err(e) = self.due.finish(&self.shared.dir) {
            tracing::error!(error = %e, "usage spool fsync failed");
        }
        let _ = self.file.set_len(self.size);
        let _ = self.file.sync_all();
        if let Some(next) = self.next.take() {
            if next.join().is_ok() {
                let _ = fs::remove_file(preparing_path(&self.shared.dir, self.number + 1));
            }
        }
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
/// expected within [`SpoolOptions::max_linger`]; then it waits until the group is expected
/// to hold about [`GROUP_TARGET`], at most that long (a group already that large does not
/// wait). The rate is smoothed over [`RATE_WINDOW`] of time, not a number of groups: after
/// a pause the next event is not held on the strength of the burst before it.
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

/// Extension of a segment being zero-filled, before it gets its `.spool` name.
const PREPARING: &str = "prep";

fn preparing_path(dir: &Path, number: u64) -> PathBuf {
    segment::segment_path(dir, number).with_extension(format!("spool.{PREPARING}"))
}

/// A segment ready to take over: zeros on disk under its preparing name, and when `mapped`
/// its mapping, with the first pages already writable (see [`prepare_segment`]).
struct Prepared {
    file: File,
    map: Option<Arc<memmap2::MmapRaw>>,
}

/// Creates segment `number` under its preparing name, `bytes` of zeros, on disk; with
/// `mapped`, maps it and faults in, writable, the pages the first interval after it takes
/// over will fill (so the serving thread that moves on to it does not take those faults).
fn prepare_segment(dir: &Path, number: u64, bytes: u64, mapped: bool) -> io::Result<Prepared> {
    let path = preparing_path(dir, number);
    let _ = fs::remove_file(&path);
    let mut file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)?;
    // One page per write. The page cache keeps a file in folios as large as the writes
    // that made them (ext4 since Linux 6.16), and writeback writes a dirty folio whole:
    // zeros written a megabyte at a time made every fsync of a record or two write a
    // megabyte. Pages written one by one stay pages, so an fsync writes the pages that
    // changed.
    let zeros = [0u8; PAGE];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(PAGE as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    let map = mapped.then(|| map_segment(&file)).flatten();
    if let Some(map) = &map {
        prefault(map, 0, map.len().min(PREFAULT_MAX as usize));
    }
    Ok(Prepared { file, map })
}

/// Maps a prepared segment for writing, or `None` (appends then use `pwrite`).
///
/// The mapping is shared: what is copied into it is in the operating system's page cache
/// at once, as with `write`, so it survives a crash of this process, and `fdatasync` on the
/// file writes it to disk.
///
/// Faults never read ahead (`MADV_RANDOM`): if the segment's pages left the page cache
/// before they were written, read-ahead would bring them back as large folios, and each
/// fsync would write a whole folio for the few records that changed in it (see
/// [`prepare_segment`]).
fn map_segment(file: &File) -> Option<Arc<memmap2::MmapRaw>> {
    match memmap2::MmapRaw::map_raw(file) {
        Ok(map) => {
            let _ = map.advise(memmap2::Advice::Random);
            Some(Arc::new(map))
        }
        Err(e) => {
            tracing::warn!(error = %e, "mapping a spool segment failed; appends use pwrite");
            None
        }
    }
}

/// Copies `bytes` into `map` at `at`, if they fit; returns whether they were copied.
#[allow(unsafe_code)]
fn copy_into(map: &memmap2::MmapRaw, at: usize, bytes: &[u8]) -> bool {
    if at
        .checked_add(bytes.len())
        .is_none_or(|end| end > map.len())
    {
        return false;
    }
    // SAFETY: the range is inside the mapping (checked above), which stays mapped while
    // `map` is borrowed. Only the `Log` copies into a segment's mapping, under its lock,
    // so no two copies overlap in time; the sync thread's prefault (`madvise`) reads and
    // writes no bytes. The segment was created by this process (`create_new`) and nothing
    // else writes it; the `Log` lets go of the mapping before it changes the file's
    // length, and a prefault still holding it then only gets an error for pages past the
    // end, never a signal. Readers (the shipper) read the file, not the mapping, and only
    // up to `live_len`, which moves past these bytes after the copy.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), map.as_mut_ptr().add(at), bytes.len());
    }
    true
}

/// Gives a prepared segment its name: from then on readers see it. The name is durable
/// after the next [`sync_dir`].
fn install_segment(dir: &Path, number: u64) -> io::Result<()> {
    fs::rename(
        preparing_path(dir, number),
        segment::segment_path(dir, number),
    )
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes this thread has caused to be written to storage (Linux's task I/O accounting:
    /// counted when a page cache folio turns dirty, the whole folio).
    fn thread_write_bytes() -> Option<u64> {
        let io = fs::read_to_string("/proc/thread-self/io").ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn a_small_write_to_a_prepared_segment_dirties_pages_not_a_large_folio() {
        use std::os::unix::fs::FileExt as _;
        let dir = std::env::temp_dir().join(format!("spool-folios-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for mapped in [false, true] {
            let prepared = prepare_segment(&dir, 7, 16 << 20, mapped).unwrap();
            let before = thread_write_bytes().expect("task I/O accounting (/proc/thread-self/io)");
            // A record or two at a time, synced after each, as the spool writes them.
            for i in 0..64u64 {
                let record = [0xA5u8; 300];
                match &prepared.map {
                    Some(map) => assert!(copy_into(map, (i * 300) as usize, &record)),
                    None => prepared.file.write_all_at(&record, i * 300).unwrap(),
                }
                prepared.file.sync_data().unwrap();
            }
            let dirtied = thread_write_bytes().unwrap() - before;
            // 64 writes of 300 bytes touch 5 pages; each sync cleans the page being
            // written, so it turns dirty again at most once per write. Folios of a
            // megabyte would make this 64 MiB.
            assert!(
                dirtied <= 64 * PAGE as u64 + 5 * PAGE as u64,
                "mapped {mapped}: 64 small synced writes dirtied {dirtied} bytes"
            );
            assert_eq!(mapped, prepared.map.is_some());
            drop(prepared);
            fs::remove_file(preparing_path(&dir, 7)).unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }

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

    /// `tasks` concurrent appenders, `each` usage events apiece, all acknowledged.
    async fn append_concurrently(spool: &Spool, tasks: usize, each: usize) {
        let mut running = Vec::new();
        for t in 0..tasks {
            let spool = spool.clone();
            running.push(tokio::spawn(async move {
                for i in 0..each {
                    spool
                        .append_usage(&shipper::tests::event(t * 1000 + i))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in running {
            t.await.unwrap();
        }
    }

    fn usage_in(dir: &Path) -> usize {
        let mut read = 0;
        for n in segment::list_segments(dir).unwrap() {
            read += segment::read_from(&segment::segment_path(dir, n), 0, None)
                .unwrap()
                .into_iter()
                .filter(|(e, _)| matches!(e, SpoolEntry::Usage { .. }))
                .count();
        }
        read
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_an_fsync_interval_appends_are_written_at_once_and_synced_later() {
        let dir = std::env::temp_dir().join(format!("spool-interval-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let options = |interval| SpoolOptions {
            segment_bytes: 16 * 1024,
            fsync_interval: interval,
            ..SpoolOptions::default()
        };
        // An interval no test run reaches: appends return with no fsync at all, and every
        // one is already in the segments (across rotations: 300 events overflow 16 KiB).
        let spool = Spool::open_with(&dir, options(Duration::from_secs(3600))).unwrap();
        append_concurrently(&spool, 10, 30).await;
        assert_eq!(spool.stats().durable_appends, 300);
        assert_eq!(spool.stats().fsyncs, 0, "nothing waited for the disk");
        let segments = segment::list_segments(&dir).unwrap().len();
        assert!(segments > 1, "rotated");
        assert_eq!(usage_in(&dir), 300);
        let due = |spool: &Spool| {
            let log = lock(spool.direct.as_ref().unwrap());
            (log.due.retired.len(), log.due.dir)
        };
        // Moving on left the finished segments' fsyncs to the sync thread.
        assert_eq!(due(&spool), (segments - 1, true));
        // A flush makes them durable now.
        spool.flush().await.unwrap();
        assert_eq!(spool.stats().fsyncs, 1);
        assert_eq!(
            due(&spool),
            (0, false),
            "a flush syncs the finished segments too"
        );
        drop(spool);
        let _ = fs::remove_dir_all(&dir);

        // A short interval: the syncer fsyncs soon after a write, and not while idle.
        let spool = Spool::open_with(&dir, options(Duration::from_millis(10))).unwrap();
        spool.append_usage(&shipper::tests::event(1)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while spool.stats().fsyncs == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let synced = spool.stats().fsyncs;
        assert_eq!(synced, 1, "one fsync for the one write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            spool.stats().fsyncs,
            synced,
            "no fsync while nothing is written"
        );
        assert_eq!(usage_in(&dir), 1);
        // Moving on: the sync thread fsyncs the finished segments within an interval.
        append_concurrently(&spool, 10, 30).await;
        assert!(segment::list_segments(&dir).unwrap().len() > 1, "rotated");
        let deadline = Instant::now() + Duration::from_secs(5);
        while due(&spool) != (0, false) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(due(&spool), (0, false));
        assert_eq!(usage_in(&dir), 301);
        drop(spool);
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_fsyncs_and_every_one_is_counted() {
        let dir = std::env::temp_dir().join(format!("spool-share-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let spool = Spool::open_with(
            &dir,
            SpoolOptions {
                segment_bytes: 1 << 20,
                max_linger: Duration::from_millis(2),
                ..SpoolOptions::default()
            },
        )
        .unwrap();
        append_concurrently(&spool, 32, 50).await;
        let stats = spool.stats();
        assert_eq!(stats.durable_appends, 32 * 50);
        assert!(stats.fsyncs >= 1, "{stats:?}");
        assert!(
            stats.fsyncs * 4 <= stats.durable_appends,
            "32 appenders should share fsyncs: {stats:?}"
        );
        // Everything acknowledged is in the segments.
        assert_eq!(usage_in(&dir), 32 * 50);
        drop(spool);
        let _ = fs::remove_dir_all(&dir);
    }
}
