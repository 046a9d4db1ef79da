//! The interval sync thread, under an fsync interval: appends only reach the page cache,
//! and this thread makes them durable once per interval, outside the log's lock.
//!
//! Owns: the periodic fsyncs (finished segments, the directory, then the live segment)
//! and prefaulting the pages the next interval will fill. Must never: hold the log's lock
//! while it waits for the disk, or copy bytes into a mapping.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::log::{lock, Log};
use super::prepare::{prefault, PREFAULT_MAX, PREFAULT_MIN};

/// Under a [`SpoolOptions::fsync_interval`](super::SpoolOptions::fsync_interval): fsyncs
/// the live segment whenever something was written since the last time, once per
/// interval, until the spool is gone, after the fsyncs that moving on from a segment left
/// due ([`Log::due`]). They run outside the lock, so appends never wait for the disk.
///
/// With the segment mapped, writing back its pages write-protects them, and the first
/// copy into each page after that (or into a page never touched) faults, and in the kernel
/// that fault is a journalled inode update. So after each fsync this
/// thread faults in, writable, the pages the next interval is expected to fill (twice
/// what the last one wrote), and serving threads copy into pages that are ready.
pub(super) fn sync_periodically(log: &Weak<Mutex<Log>>, interval: Duration) {
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
