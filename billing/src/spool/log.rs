//! The log: the live segment the spool appends to, and the one prepared to follow it.
//!
//! Owns: where the next record goes (into the mapping or by `pwrite`), fsyncing what was
//! written, moving on to the next segment when one is full, the fsyncs that moving on
//! leaves due, and cutting the zeros off at close. Must never: append to a segment an
//! earlier process wrote, or make a record durable before what was written ahead of it
//! (a segment's successor's name included).

use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use super::prepare::{
    copy_into, install_segment, prepare_segment, preparing_path, sync_dir, Prepared, PREPARING,
};
use super::Shared;

/// Locks the log; a thread that panicked holding it left it usable.
pub(super) fn lock(log: &Mutex<Log>) -> MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// The live segment and the one prepared after it.
pub(super) struct Log {
    pub(super) shared: Arc<Shared>,
    segment_bytes: u64,
    pub(super) number: u64,
    pub(super) file: File,
    /// Whether segments are mapped, under an fsync interval (see [`Log::map`]). Then the
    /// sync thread also finishes the segments this log moves on from (see [`Log::due`]).
    mapped: bool,
    /// The live segment's zero-filled length, mapped: records are copied in, so an append
    /// costs no system call. Only under an fsync interval: when every group is fsynced,
    /// writing back a mapped page write-protects it and the next group's copy faults, which
    /// costs more than the `pwrite` it saves. `None` also where mapping failed; records
    /// that do not fit in what is left of the mapping are written with `pwrite`.
    /// Shared with the sync thread, which only prefaults it (see
    /// [`sync_periodically`](super::sync::sync_periodically)); only this `Log`, under its
    /// lock, copies into it.
    pub(super) map: Option<Arc<memmap2::MmapRaw>>,
    size: u64,
    /// Bytes written since the last fsync.
    pub(super) dirty: bool,
    /// The next segment, being filled with zeros (and mapped) in the background.
    next: Option<std::thread::JoinHandle<io::Result<Prepared>>>,
    /// Under an fsync interval: what moving on from a segment left to do. Appends run on
    /// serving threads there, so moving on costs them only a rename; the sync thread does
    /// the rest on its next round, before it syncs the live segment.
    pub(super) due: Due,
}

/// Fsyncs owed by moving on from segments: the finished segments', then the directory's
/// for their successors' names.
#[derive(Default)]
pub(super) struct Due {
    /// Finished segments, oldest first, each with its mapping (unmapped once synced).
    pub(super) retired: Vec<(File, Option<Arc<memmap2::MmapRaw>>)>,
    pub(super) dir: bool,
}

impl Due {
    pub(super) fn is_empty(&self) -> bool {
        self.retired.is_empty() && !self.dir
    }

    /// Does what is due, oldest first, so a segment's successor's name is durable before
    /// any of its records are; what fails stays due.
    pub(super) fn finish(&mut self, dir: &Path) -> io::Result<()> {
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
    pub(super) fn put_back(&mut self, mut earlier: Due) {
        earlier.retired.append(&mut self.retired);
        self.retired = earlier.retired;
        self.dir |= earlier.dir;
    }
}

impl Log {
    /// The log of a new process: its first segment prepared, named and made durable, and
    /// the next one being prepared.
    pub(super) fn create(
        shared: Arc<Shared>,
        segment_bytes: u64,
        mapped: bool,
    ) -> io::Result<Self> {
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
    pub(super) fn write(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
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
    pub(super) fn close(&mut self) {
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
