//! On-disk framing of the spool: numbered segment files of records, each
//! `[len: u32 LE][crc32: u32 LE][payload: len bytes of JSON]`.
//!
//! Segments are created full of zeros (so an fsync after an append writes data blocks
//! only, not the file's size) and cut to their used length when the writer moves on; a
//! zero length marks the end of the records. A crash can leave a torn record at the end
//! of the last segment; readers stop at the first record whose length or checksum does
//! not hold, and the writer never appends to a segment that existed before it started,
//! so a torn tail is never followed by good data.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::usage::UsageEvent;

/// Header bytes before each payload.
pub const HEADER_LEN: usize = 8;
/// No single record is larger than this; a larger length means a torn or corrupt record.
const MAX_RECORD: usize = 1 << 20;

/// What the spool holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpoolEntry {
    /// A call's usage, written durably before the client sees the end of the response.
    Usage { event: UsageEvent },
    /// Whether that response then reached the client (written after, without waiting).
    Outcome { request_id: String, delivered: bool },
}

pub fn encode(entry: &SpoolEntry, out: &mut Vec<u8>) -> io::Result<()> {
    let payload = serde_json::to_vec(entry).map_err(io::Error::other)?;
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// A segment's number from its file name (`000000000042.spool`).
pub fn segment_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".spool")?.parse().ok()
}

pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:012}.spool"))
}

/// Segment numbers present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment_number(&e.path()))
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Reads whole records from `offset` on, up to `limit` bytes into the file if given (the
/// live segment's written length: past it lie zeros); returns them with the offset after
/// each one. Stops quietly at the end, at a zero length, or at a torn/corrupt record.
pub fn read_from(
    path: &Path,
    offset: u64,
    limit: Option<u64>,
) -> io::Result<Vec<(SpoolEntry, u64)>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let len = limit.map_or(len, |l| l.min(len));
    if offset >= len {
        return Ok(Vec::new());
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::with_capacity((len - offset) as usize);
    file.take(len - offset).read_to_end(&mut bytes)?;
    let mut entries = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= HEADER_LEN {
        let size =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        if size == 0 || size > MAX_RECORD || bytes.len() - at - HEADER_LEN < size {
            break;
        }
        let payload = &bytes[at + HEADER_LEN..at + HEADER_LEN + size];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(entry) = serde_json::from_slice::<SpoolEntry>(payload) else {
            break;
        };
        at += HEADER_LEN + size;
        entries.push((entry, offset + at as u64));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{Delivery, UsageStatus};

    fn entry(id: &str) -> SpoolEntry {
        SpoolEntry::Usage {
            event: UsageEvent {
                request_id: id.into(),
                tenant_id: "t".into(),
                key_id: "k".into(),
                model: "m".into(),
                endpoint: "/v1/embeddings".into(),
                prompt_tokens: 3,
                completion_tokens: 0,
                started_at: 1,
                finished_at: 2,
                status: UsageStatus::Success,
                delivery: Delivery::Delivered,
            },
        }
    }

    #[test]
    fn torn_and_corrupt_tails_are_ignored() {
        let dir = std::env::temp_dir().join(format!("spool-seg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = segment_path(&dir, 7);
        let mut bytes = Vec::new();
        encode(&entry("a"), &mut bytes).unwrap();
        encode(&entry("b"), &mut bytes).unwrap();
        let whole = bytes.len();
        encode(&entry("c"), &mut bytes).unwrap();
        // Torn: the last record is cut short.
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let read = read_from(&path, 0, None).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].1, whole as u64);
        // Corrupt: a flipped payload byte fails the checksum.
        let mut corrupt = bytes.clone();
        corrupt[whole + HEADER_LEN + 2] ^= 0xff;
        fs::write(&path, &corrupt).unwrap();
        assert_eq!(read_from(&path, 0, None).unwrap().len(), 2);
        // Reading from an offset resumes there.
        fs::write(&path, &bytes).unwrap();
        let rest = read_from(&path, read[0].1, None).unwrap();
        assert_eq!(
            rest.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(),
            vec![entry("b"), entry("c")]
        );
        // A zero-filled tail ends the records; a limit stops before it.
        let mut padded = bytes.clone();
        padded.resize(bytes.len() + 4096, 0);
        fs::write(&path, &padded).unwrap();
        assert_eq!(read_from(&path, 0, None).unwrap().len(), 3);
        assert_eq!(read_from(&path, 0, Some(whole as u64)).unwrap().len(), 2);
        assert_eq!(segment_number(&path), Some(7));
        assert_eq!(list_segments(&dir).unwrap(), vec![7]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
