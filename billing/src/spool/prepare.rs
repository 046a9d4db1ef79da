//! Segment files before they take over: created under a preparing name, zero-filled one
//! page per write, fsynced and, under an fsync interval, mapped with their first pages
//! faulted in; then installed under their segment name. And the one way bytes are copied
//! into a mapping.
//!
//! Owns: the preparing name, zero-filling, mapping, prefaulting and installing a segment.
//! Must never: give a segment its name before it is whole on disk, or copy outside a
//! mapping.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::segment;

/// Extension of a segment being zero-filled, before it gets its `.spool` name.
pub(super) const PREPARING: &str = "prep";

/// Where segment `number` is prepared.
pub(super) fn preparing_path(dir: &Path, number: u64) -> PathBuf {
    segment::segment_path(dir, number).with_extension(format!("spool.{PREPARING}"))
}

/// A segment ready to take over: zeros on disk under its preparing name, and when `mapped`
/// its mapping, with the first pages already writable (see [`prepare_segment`]).
pub(super) struct Prepared {
    pub(super) file: File,
    pub(super) map: Option<Arc<memmap2::MmapRaw>>,
}

/// Creates segment `number` under its preparing name, `bytes` of zeros, on disk; with
/// `mapped`, maps it and faults in, writable, the pages the first interval after it takes
/// over will fill (so the serving thread that moves on to it does not take those faults).
pub(super) fn prepare_segment(
    dir: &Path,
    number: u64,
    bytes: u64,
    mapped: bool,
) -> io::Result<Prepared> {
    let path = preparing_path(dir, number);
    let _ = fs::remove_file(&path);
    let mut file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)?;
    // One page per write: the page cache keeps a file in folios as large as the writes
    // (or the read-ahead) that made them (ext4, Linux 6.16 on), and writeback writes a
    // dirty folio whole, so zeros written in large blocks would make each fsync of a
    // record or two write a whole large folio. Pages written one by one stay pages, and
    // an fsync writes only the pages that changed.
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
/// Faults never read ahead (`MADV_RANDOM`): read-ahead would bring pages that left the
/// page cache back as large folios (see [`prepare_segment`]).
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
pub(super) fn copy_into(map: &memmap2::MmapRaw, at: usize, bytes: &[u8]) -> bool {
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
pub(super) fn install_segment(dir: &Path, number: u64) -> io::Result<()> {
    fs::rename(
        preparing_path(dir, number),
        segment::segment_path(dir, number),
    )
}

/// Makes the directory's entries (segment names) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Faults in `len` bytes of `map` from `start`, writable. Fails harmlessly where the
/// kernel lacks it (before 5.14); copies then fault.
pub(super) fn prefault(map: &memmap2::MmapRaw, start: usize, len: usize) {
    if len > 0 {
        let _ = map.advise_range(memmap2::Advice::PopulateWrite, start, len);
    }
}

/// The page size of the systems we serve on: the unit of the page cache, of faults and of
/// writeback.
const PAGE: usize = 4096;

/// Bytes of a mapped segment made writable ahead of the writer after each fsync: at
/// least a few pages, at most a megabyte.
pub(super) const PREFAULT_MIN: u64 = 16 << 10;
pub(super) const PREFAULT_MAX: u64 = 1 << 20;

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
}
