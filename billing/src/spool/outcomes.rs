//! Delivery outcomes: a response is taken as delivered once [`DELIVERY_SETTLE`] has passed
//! after its last byte was handed over, and one thread writes those outcomes in batches, so
//! a response costs a queue push, not a timer.
//!
//! Owns: the queue of outcomes waiting to settle and the thread that writes them. Must
//! never: write an outcome before its settle time, or drop one while the writer runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::segment;
use super::writer::Command;
use super::{Shared, DELIVERY_SETTLE};

/// Most delivery outcomes written as one record (each id is at most ~64 bytes, so a record
/// stays far below the framing's size limit).
const OUTCOMES_PER_RECORD: usize = 4_096;

/// Queues `request_id` to be written as delivered once [`DELIVERY_SETTLE`] has passed.
pub(super) fn settle_later(shared: &Shared, request_id: &str) {
    shared.settling.fetch_add(1, Ordering::SeqCst);
    let due = Instant::now() + DELIVERY_SETTLE;
    let mut queue = shared.delivered.lock().unwrap_or_else(|e| e.into_inner());
    let was_empty = queue.is_empty();
    queue.push_back((due, request_id.to_owned()));
    drop(queue);
    if was_empty {
        shared.delivered_added.notify_one();
    }
}

/// Returns once no outcome is waiting to settle (each one queued has been handed to the
/// writer).
pub(super) async fn settled(shared: &Shared) {
    loop {
        let settled = shared.settled.notified();
        if shared.settling.load(Ordering::SeqCst) == 0 {
            return;
        }
        let _ = tokio::time::timeout(DELIVERY_SETTLE * 2, settled).await;
    }
}

/// Writes "delivered" outcomes once their settle time has passed, every due one in one
/// append. Runs until the spool's writer is gone.
pub(super) fn settle_deliveries(shared: Arc<Shared>, commands: mpsc::WeakSender<Command>) {
    let mut queue = shared.delivered.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        let Some(&(first_due, _)) = queue.front() else {
            if commands.strong_count() == 0 {
                return;
            }
            queue = match shared
                .delivered_added
                .wait_timeout(queue, Duration::from_secs(1))
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
        std::thread::sleep(Duration::from_millis(10));
        queue = shared.delivered.lock().unwrap_or_else(|e| e.into_inner());
    }
}
