//! On-disk framing of the spool: numbered segment files of records, each
//! `[len: u32 LE][crc32: u32 LE][payload: len bytes]`.
//!
//! A payload's first byte says what it holds: [`USAGE`] (one usage event) or [`OUTCOMES`]
//! (the delivery outcome of one or more responses), in the binary layout below. Payloads
//! starting with `{` are JSON records written by earlier versions; they are still read, so
//! a spool left by an older gateway ships after an upgrade.
//!
//! Segments are created full of zeros (so an fsync after an append writes data blocks
//! only, not the file's size) and cut to their used length when the writer moves on; a
//! zero length marks the end of the records. A crash can leave a torn record at the end
//! of the last segment; readers stop at the first record whose length or checksum does
//! not hold, and the writer never appends to a segment that existed before it started,
//! so a torn tail is never followed by good data.
//!
//! Binary layout (integers little-endian, text as a `u16` byte length then UTF-8):
//! - usage: `USAGE`, request id, tenant id, key id, model, endpoint, prompt tokens `i64`,
//!   completion tokens `i64`, started at `i64`, finished at `i64`, status `u8`, delivery `u8`;
//! - outcomes: `OUTCOMES`, delivered `u8` (0 or 1), count `u32`, then that many request ids.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::usage::{Delivery, UsageEvent, UsageStatus};

/// Header bytes before each payload.
pub const HEADER_LEN: usize = 8;
/// No single record is larger than this; a larger length means a torn or corrupt record.
const MAX_RECORD: usize = 1 << 20;
/// First byte of a usage payload.
const USAGE: u8 = 1;
/// First byte of an outcomes payload.
const OUTCOMES: u8 = 2;
/// First byte of a JSON payload (earlier versions).
const JSON: u8 = b'{';

/// What the spool holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpoolEntry {
    /// A call's usage, written durably before the client sees the end of the response.
    Usage { event: UsageEvent },
    /// Whether that response then reached the client (written after, without waiting).
    Outcome { request_id: String, delivered: bool },
}

/// Appends one framed record whose payload `fill` writes.
fn frame(out: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = fill(out) {
        out.truncate(start);
        return Err(e);
    }
    let payload = &out[start + HEADER_LEN..];
    if payload.len() > MAX_RECORD {
        out.truncate(start);
        return Err(io::Error::other("spool record too large"));
    }
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + HEADER_LEN].copy_from_slice(&crc);
    Ok(())
}

fn put_text(out: &mut Vec<u8>, text: &str) -> io::Result<()> {
    let len = u16::try_from(text.len())
        .map_err(|_| io::Error::other("text too long for a spool record"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

fn status_code(status: UsageStatus) -> u8 {
    match status {
        UsageStatus::Success => 0,
        UsageStatus::ClientCancelled => 1,
        UsageStatus::UpstreamFailed => 2,
    }
}

fn delivery_code(delivery: Delivery) -> u8 {
    match delivery {
        Delivery::Unknown => 0,
        Delivery::Delivered => 1,
        Delivery::Undelivered => 2,
    }
}

/// Appends a usage record.
pub fn encode_usage(event: &UsageEvent, out: &mut Vec<u8>) -> io::Result<()> {
    frame(out, |out| {
        out.push(USAGE);
        for text in [
            &event.request_id,
            &event.tenant_id,
            &event.key_id,
            &event.model,
            &event.endpoint,
        ] {
            put_text(out, text)?;
        }
        for n in [
            event.prompt_tokens,
            event.completion_tokens,
            event.started_at,
            event.finished_at,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.push(status_code(event.status));
        out.push(delivery_code(event.delivery));
        Ok(())
    })
}

/// Appends one record saying whether each of `request_ids` reached its client.
pub fn encode_outcomes<'a>(
    request_ids: impl ExactSizeIterator<Item = &'a str>,
    delivered: bool,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    frame(out, |out| {
        out.push(OUTCOMES);
        out.push(u8::from(delivered));
        let count = u32::try_from(request_ids.len())
            .map_err(|_| io::Error::other("too many outcomes in one record"))?;
        out.extend_from_slice(&count.to_le_bytes());
        for id in request_ids {
            put_text(out, id)?;
        }
        Ok(())
    })
}

/// Appends a record holding `entry`.
pub fn encode(entry: &SpoolEntry, out: &mut Vec<u8>) -> io::Result<()> {
    match entry {
        SpoolEntry::Usage { event } => encode_usage(event, out),
        SpoolEntry::Outcome {
            request_id,
            delivered,
        } => encode_outcomes(std::iter::once(request_id.as_str()), *delivered, out),
    }
}

/// Reads a binary payload front to back; every read fails on a short payload.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn int(&mut self) -> Option<i64> {
        self.take(8)?.try_into().ok().map(i64::from_le_bytes)
    }

    fn count(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    fn text(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(len)?).ok().map(str::to_owned)
    }
}

/// Decodes one payload into `out`; `None` if it is not a whole, known record.
fn decode(payload: &[u8], out: &mut Vec<SpoolEntry>) -> Option<()> {
    let mut at = Cursor(payload.get(1..)?);
    match *payload.first()? {
        JSON => {
            out.push(serde_json::from_slice(payload).ok()?);
            return Some(());
        }
        USAGE => {
            let (request_id, tenant_id, key_id, model, endpoint) =
                (at.text()?, at.text()?, at.text()?, at.text()?, at.text()?);
            let (prompt_tokens, completion_tokens, started_at, finished_at) =
                (at.int()?, at.int()?, at.int()?, at.int()?);
            let status = match at.byte()? {
                0 => UsageStatus::Success,
                1 => UsageStatus::ClientCancelled,
                2 => UsageStatus::UpstreamFailed,
                _ => return None,
            };
            let delivery = match at.byte()? {
                0 => Delivery::Unknown,
                1 => Delivery::Delivered,
                2 => Delivery::Undelivered,
                _ => return None,
            };
            out.push(SpoolEntry::Usage {
                event: UsageEvent {
                    request_id,
                    tenant_id,
                    key_id,
                    model,
                    endpoint,
                    prompt_tokens,
                    completion_tokens,
                    started_at,
                    finished_at,
                    status,
                    delivery,
                },
            });
        }
        OUTCOMES => {
            let delivered = match at.byte()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let count = at.count()? as usize;
            // Each id takes at least its two length bytes: a larger count is corrupt.
            if count > at.0.len() / 2 {
                return None;
            }
            for _ in 0..count {
                out.push(SpoolEntry::Outcome {
                    request_id: at.text()?,
                    delivered,
                });
            }
        }
        _ => return None,
    }
    at.0.is_empty().then_some(())
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

/// [`visit_from`] collected: every entry with the offset after its record.
#[cfg(test)]
pub fn read_from(
    path: &Path,
    offset: u64,
    limit: Option<u64>,
) -> io::Result<Vec<(SpoolEntry, u64)>> {
    let mut entries = Vec::new();
    visit_from(path, offset, limit, &mut Vec::new(), |entry, end| {
        entries.push((entry, end))
    })?;
    Ok(entries)
}

/// Reads whole records from `offset` on, up to `limit` bytes into the file if given (the
/// live segment's written length: past it lie zeros), and hands each entry to `visit` with
/// the offset after the record it came from (an outcomes record gives several entries with
/// one offset). Stops quietly at the end, at a zero length, or at a torn/corrupt record;
/// returns the offset after the last complete record. Reads through `scratch`, whose
/// capacity a caller that reads often keeps: a fresh buffer of a few hundred kilobytes per
/// read is fresh pages, which the kernel zeroes on first touch.
pub fn visit_from(
    path: &Path,
    offset: u64,
    limit: Option<u64>,
    scratch: &mut Vec<u8>,
    mut visit: impl FnMut(SpoolEntry, u64),
) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let len = limit.map_or(len, |l| l.min(len));
    if offset >= len {
        return Ok(offset);
    }
    file.seek(SeekFrom::Start(offset))?;
    scratch.clear();
    scratch.reserve((len - offset) as usize);
    file.take(len - offset).read_to_end(scratch)?;
    let bytes = scratch.as_slice();
    let mut decoded = Vec::new();
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
        decoded.clear();
        if decode(payload, &mut decoded).is_none() {
            break;
        }
        at += HEADER_LEN + size;
        let end = offset + at as u64;
        for entry in decoded.drain(..) {
            visit(entry, end);
        }
    }
    Ok(offset + at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Frames `payload` as it is, whatever it holds.
    fn frame_raw(payload: &[u8], out: &mut Vec<u8>) {
        frame(out, |o| {
            o.extend_from_slice(payload);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn records_round_trip_and_json_records_of_earlier_versions_still_read() {
        let dir = std::env::temp_dir().join(format!("spool-seg-bin-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = segment_path(&dir, 1);
        let mut bytes = Vec::new();
        // A record as an earlier version framed it: JSON payload.
        let old = entry("old");
        let payload = serde_json::to_vec(&old).unwrap();
        frame_raw(&payload, &mut bytes);
        let after_old = bytes.len() as u64;
        let mut events = Vec::new();
        for (i, (status, delivery)) in [
            (UsageStatus::Success, Delivery::Unknown),
            (UsageStatus::ClientCancelled, Delivery::Delivered),
            (UsageStatus::UpstreamFailed, Delivery::Undelivered),
        ]
        .into_iter()
        .enumerate()
        {
            let event = UsageEvent {
                request_id: format!("req_{i}"),
                tenant_id: "tenant-é".into(),
                key_id: String::new(),
                model: "m".repeat(300),
                endpoint: "/v1/chat/completions".into(),
                prompt_tokens: i64::MAX,
                completion_tokens: -1,
                started_at: 1_790_000_000_000 + i as i64,
                finished_at: i64::MIN,
                status,
                delivery,
            };
            encode_usage(&event, &mut bytes).unwrap();
            events.push(SpoolEntry::Usage { event });
        }
        encode_outcomes(["req_0", "req_1"].into_iter(), true, &mut bytes).unwrap();
        let after_outcomes = bytes.len() as u64;
        encode(
            &SpoolEntry::Outcome {
                request_id: "req_2".into(),
                delivered: false,
            },
            &mut bytes,
        )
        .unwrap();
        fs::write(&path, &bytes).unwrap();
        let read = read_from(&path, 0, None).unwrap();
        let entries: Vec<SpoolEntry> = read.iter().map(|(e, _)| e.clone()).collect();
        let outcome = |id: &str, delivered| SpoolEntry::Outcome {
            request_id: id.into(),
            delivered,
        };
        let mut expected = vec![old];
        expected.extend(events);
        expected.extend([
            outcome("req_0", true),
            outcome("req_1", true),
            outcome("req_2", false),
        ]);
        assert_eq!(entries, expected);
        assert_eq!(read[0].1, after_old);
        // Both outcomes of one record end where that record ends.
        assert_eq!((read[4].1, read[5].1), (after_outcomes, after_outcomes));
        assert_eq!(read[6].1, bytes.len() as u64);
        // Text longer than the layout holds is refused, and nothing is left half-written.
        let mut long = UsageEvent {
            request_id: "x".repeat(70_000),
            ..match &expected[1] {
                SpoolEntry::Usage { event } => event.clone(),
                SpoolEntry::Outcome { .. } => unreachable!(),
            }
        };
        let mut out = vec![7u8];
        assert!(encode_usage(&long, &mut out).is_err());
        assert_eq!(out, vec![7u8]);
        long.request_id = "ok".into();
        encode_usage(&long, &mut out).unwrap();
        assert!(out.len() > 1 + HEADER_LEN);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_with_a_valid_checksum_but_an_unknown_kind_or_short_body_ends_the_read() {
        let dir = std::env::temp_dir().join(format!("spool-seg-bad-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = segment_path(&dir, 2);
        let mut bytes = Vec::new();
        encode(&entry("a"), &mut bytes).unwrap();
        let good = bytes.clone();
        for payload in [
            &[9u8, 1, 2][..],
            &[USAGE, 4, 0, b'a'][..],
            &[OUTCOMES, 1, 255, 255, 255, 255][..],
        ] {
            let mut bytes = good.clone();
            frame_raw(payload, &mut bytes);
            encode(&entry("b"), &mut bytes).unwrap();
            fs::write(&path, &bytes).unwrap();
            let read = read_from(&path, 0, None).unwrap();
            assert_eq!(read.len(), 1, "payload {payload:?}");
            assert_eq!(read[0].1, good.len() as u64);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
