//! What a spool record holds, and its binary layout.
//!
//! A payload's first byte says what it holds: `CACHED_USAGE` or `USAGE` (one usage event)
//! or `OUTCOMES` (the delivery outcome of one or more responses). Payloads starting with `{` are JSON
//! records written by earlier versions; they are still read, so a spool left by an older
//! gateway ships after an upgrade.
//!
//! Layout (integers little-endian, text as a `u16` byte length then UTF-8):
//! - usage: `USAGE`, request id, tenant id, key id, model, endpoint, prompt tokens `i64`,
//!   completion tokens `i64`, started at `i64`, finished at `i64`, status `u8`, delivery `u8`
//!   (written by earlier versions; read with nothing cached);
//! - cached usage: `CACHED_USAGE`, then as usage, then cached tokens `i64`, and the cache-hit
//!   rate as a `u8` (0: none, 1: one follows) and an `i64`;
//! - outcomes: `OUTCOMES`, delivered `u8` (0 or 1), count `u32`, then that many request ids.
//!
//! Owns: the payload codec, both ways. Must never: frame, checksum or read files (that is
//! `segment`), or change the meaning of a layout already on disk.

use std::io;

use serde::{Deserialize, Serialize};

use crate::usage::{Delivery, UsageEvent, UsageStatus};

/// First byte of a usage payload.
pub(super) const USAGE: u8 = 1;
/// First byte of an outcomes payload.
pub(super) const OUTCOMES: u8 = 2;
/// First byte of a usage payload with its cache fields (what this version writes).
pub(super) const CACHED_USAGE: u8 = 3;
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

/// Appends the payload of a usage record.
pub(super) fn put_usage(event: &UsageEvent, out: &mut Vec<u8>) -> io::Result<()> {
    out.push(CACHED_USAGE);
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
    out.extend_from_slice(&event.cached_tokens.to_le_bytes());
    out.push(u8::from(event.cache_hit_minor_per_mreq.is_some()));
    out.extend_from_slice(&event.cache_hit_minor_per_mreq.unwrap_or(0).to_le_bytes());
    Ok(())
}

/// Appends the payload of one record saying whether each of `request_ids` reached its
/// client.
pub(super) fn put_outcomes<'a>(
    request_ids: impl ExactSizeIterator<Item = &'a str>,
    delivered: bool,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.push(OUTCOMES);
    out.push(u8::from(delivered));
    let count = u32::try_from(request_ids.len())
        .map_err(|_| io::Error::other("too many outcomes in one record"))?;
    out.extend_from_slice(&count.to_le_bytes());
    for id in request_ids {
        put_text(out, id)?;
    }
    Ok(())
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
pub(super) fn decode(payload: &[u8], out: &mut Vec<SpoolEntry>) -> Option<()> {
    let mut at = Cursor(payload.get(1..)?);
    match *payload.first()? {
        JSON => {
            out.push(serde_json::from_slice(payload).ok()?);
            return Some(());
        }
        kind @ (USAGE | CACHED_USAGE) => {
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
            let (cached_tokens, cache_hit_minor_per_mreq) = if kind == CACHED_USAGE {
                let cached = at.int()?;
                let has_rate = at.byte()?;
                let rate = at.int()?;
                match has_rate {
                    0 => (cached, None),
                    1 => (cached, Some(rate)),
                    _ => return None,
                }
            } else {
                (0, None)
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
                    cached_tokens,
                    cache_hit_minor_per_mreq,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_payload_of_the_earlier_layout_reads_with_nothing_cached() {
        let event = UsageEvent::builder("req_1", "t")
            .tokens(12, 34)
            .at(5, 6)
            .build();
        let mut new = Vec::new();
        put_usage(
            &UsageEvent {
                cached_tokens: 9,
                ..event.clone()
            },
            &mut new,
        )
        .unwrap();
        // The earlier layout is the current one without its last 17 bytes.
        let mut old = new[..new.len() - 17].to_vec();
        old[0] = USAGE;
        let mut read = Vec::new();
        decode(&old, &mut read).unwrap();
        decode(&new, &mut read).unwrap();
        assert_eq!(
            read,
            vec![
                SpoolEntry::Usage {
                    event: event.clone()
                },
                SpoolEntry::Usage {
                    event: UsageEvent {
                        cached_tokens: 9,
                        ..event
                    }
                },
            ]
        );
        // A rate flag other than 0 or 1 is not a record.
        let flag = new.len() - 9;
        new[flag] = 2;
        assert!(decode(&new, &mut Vec::new()).is_none());
    }
}
