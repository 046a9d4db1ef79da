//! On-disk framing of the spool: numbered segment files of records, each
//! `[len: u32 LE][crc32: u32 LE][payload: len bytes]`; what a payload holds is `record`'s.
//!
//! Segments are created full of zeros (so an fsync after an append writes data blocks
//! only, not the file's size) and cut to their used length when the writer moves on; a
//! zero length marks the end of the records. A crash can leave a torn record at the end
//! of the last segment; readers stop at the first record whose length or checksum does
//! not hold, and the writer never appends to a segment that existed before it started,
//! so a torn tail is never followed by good data.
//!
//! Owns: framing, segment names, and reading records back up to a torn tail. Must never:
//! hand out an entry from a record whose length or checksum does not hold.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::record::{self, SpoolEntry};
use crate::usage::UsageEvent;

/// Header bytes before each payload.
pub const HEADER_LEN: usize = 8;
/// No single record is larger than this; a larger length means a torn or corrupt record.
const MAX_RECORD: usize = 1 << 20;

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

/// Appends a usage record.
pub fn encode_usage(event: &UsageEvent, out: &mut Vec<u8>) -> io::Result<()> {
    frame(out, |out| record::put_usage(event, out))
}

/// Appends one record saying whether each of `request_ids` reached its client.
pub fn encode_outcomes<'a>(
    request_ids: impl ExactSizeIterator<Item = &'a str>,
    delivered: bool,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    frame(out, |out| record::put_outcomes(request_ids, delivered, out))
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
        if record::decode(payload, &mut decoded).is_none() {
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
    use crate::spool::record::{OUTCOMES, USAGE};
    use crate::usage::{Delivery, UsageStatus};

    fn entry(id: &str) -> SpoolEntry {
        let mut event = UsageEvent::builder(id, "t").tokens(3, 0).at(1, 1).build();
        event.endpoint = "/v1/embeddings".into();
        SpoolEntry::Usage { event }
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
                cached_tokens: 7 * i as i64,
                cache_hit_minor_per_mreq: [None, Some(0), Some(i64::MAX)][i],
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

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn cases(default: u32) -> u32 {
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(default)
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof!["[a-z0-9_]{0,12}", ".{0,6}"]
        }

        fn spool_entry() -> impl Strategy<Value = SpoolEntry> {
            let status = prop_oneof![
                Just(UsageStatus::Success),
                Just(UsageStatus::ClientCancelled),
                Just(UsageStatus::UpstreamFailed),
            ];
            let delivery = prop_oneof![
                Just(Delivery::Unknown),
                Just(Delivery::Delivered),
                Just(Delivery::Undelivered),
            ];
            let usage = (
                (text(), text(), text(), text(), text()),
                (any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>()),
                (any::<i64>(), any::<Option<i64>>()),
                status,
                delivery,
            )
                .prop_map(
                    |((r, t, k, m, e), (p, c, s, f), (cached, hit), status, delivery)| {
                        SpoolEntry::Usage {
                            event: UsageEvent {
                                request_id: r,
                                tenant_id: t,
                                key_id: k,
                                model: m,
                                endpoint: e,
                                prompt_tokens: p,
                                completion_tokens: c,
                                cached_tokens: cached,
                                cache_hit_minor_per_mreq: hit,
                                started_at: s,
                                finished_at: f,
                                status,
                                delivery,
                            },
                        }
                    },
                );
            let outcome =
                (text(), any::<bool>()).prop_map(|(request_id, delivered)| SpoolEntry::Outcome {
                    request_id,
                    delivered,
                });
            prop_oneof![3 => usage, 1 => outcome]
        }

        /// One segment file per test thread, rewritten for each case.
        fn read_bytes(bytes: &[u8], limit: Option<u64>) -> (Vec<(SpoolEntry, u64)>, u64) {
            let dir = std::env::temp_dir().join(format!(
                "spool-fuzz-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            fs::create_dir_all(&dir).unwrap();
            let path = segment_path(&dir, 1);
            fs::write(&path, bytes).unwrap();
            let mut entries = Vec::new();
            let end = visit_from(&path, 0, limit, &mut Vec::new(), |e, at| {
                entries.push((e, at))
            })
            .unwrap();
            (entries, end)
        }

        /// The entries and the offsets after each record, as written.
        fn written(entries: &[SpoolEntry]) -> (Vec<u8>, Vec<u64>) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for e in entries {
                encode(e, &mut bytes).unwrap();
                ends.push(bytes.len() as u64);
            }
            (bytes, ends)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases(256)))]

            /// Any payload: no panic, and only a payload of a known kind decodes.
            #[test]
            fn arbitrary_payloads_never_panic(payload in prop::collection::vec(any::<u8>(), 0..96)) {
                let mut out = Vec::new();
                if record::decode(&payload, &mut out).is_some() {
                    prop_assert!(matches!(payload[0], b'{' | 1 | 2), "kind {}", payload[0]);
                }
            }

            /// Every record written reads back in order; a tail cut anywhere gives exactly
            /// the records wholly before the cut, and the read ends at the last of them.
            #[test]
            fn torn_tails_give_the_whole_records_before_them(
                entries in prop::collection::vec(spool_entry(), 1..6),
                cut in any::<prop::sample::Index>(),
            ) {
                let (bytes, ends) = written(&entries);
                let (all, end) = read_bytes(&bytes, None);
                prop_assert_eq!(end, bytes.len() as u64);
                let got: Vec<(SpoolEntry, u64)> = entries.iter().cloned().zip(ends.iter().copied()).collect();
                prop_assert_eq!(&all, &got);
                let cut = cut.index(bytes.len() + 1);
                let whole = ends.iter().filter(|e| **e <= cut as u64).count();
                // Torn by the file's end, and by a limit inside the file.
                let (torn, end) = read_bytes(&bytes[..cut], None);
                prop_assert_eq!(&torn[..], &got[..whole]);
                prop_assert_eq!(end, if whole == 0 { 0 } else { ends[whole - 1] });
                let (limited, _) = read_bytes(&bytes, Some(cut as u64));
                prop_assert_eq!(&limited[..], &got[..whole]);
            }

            /// Corrupted bytes, or garbage after the records: the read never panics and
            /// yields only a prefix of what was written, never an entry that was not.
            #[test]
            fn corrupt_bytes_and_garbage_tails_yield_only_written_records(
                entries in prop::collection::vec(spool_entry(), 1..6),
                flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
                tail in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let (original, ends) = written(&entries);
                let mut bytes = original.clone();
                for (at, x) in &flips {
                    let at = at.index(bytes.len());
                    bytes[at] ^= x;
                }
                // Two flips of one byte may cancel: the first byte that differs counts.
                let first_flip = bytes.iter().zip(&original).position(|(a, b)| a != b);
                bytes.extend_from_slice(&tail);
                let (read, _) = read_bytes(&bytes, None);
                let got: Vec<(SpoolEntry, u64)> = entries.iter().cloned().zip(ends.iter().copied()).collect();
                let intact = first_flip.map_or(entries.len(), |f| ends.iter().filter(|e| **e <= f as u64).count());
                // A changed byte fails its record's length or checksum (CRC-32 misses a
                // change in one in 2^32), and the read stops there.
                prop_assert_eq!(&read[..], &got[..intact]);
            }
        }
    }
}
