//! This replica's quota leases and the task that keeps them in step with the store.
//!
//! Owns: the table of leases by scope, admitting a request from it in memory, and the
//! keeper task: it reports settled usage, returns what is no longer needed, tops up
//! leases running short, and gives everything back at shutdown.
//! Must never: admit a request that a lease does not fully cover in every scope, or talk
//! to the store other than through the applier.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use billing::period_of;
use tokio::sync::{mpsc, oneshot, Notify};

use super::applier::Job;
use super::headers::RateHeaders;
use super::lease::{QuotaLease, SyncRequest};
use super::model::{Demand, Scope};
use billing::period::now_us;

/// How often the keeper looks for leases to synchronise.
const KEEPER_TICK: Duration = Duration::from_millis(25);
/// A lease holding nothing is forgotten after this long unused.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// This replica's leases, by scope id.
pub(super) struct Leases {
    map: Mutex<HashMap<String, QuotaLease>>,
    /// Wakes the keeper when a request found a lease short.
    wake: Notify,
    closed: AtomicBool,
}

impl Leases {
    pub(super) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<String, QuotaLease>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Has the keeper look at the leases now rather than at its next tick.
    pub(super) fn wake_keeper(&self) {
        self.wake.notify_one();
    }

    /// Takes `demand` from the leases if they cover every scope, and returns the
    /// request's header states; otherwise notes the shortfall (the keeper asks the store
    /// for more) and returns `None`.
    pub(super) fn admit(&self, scopes: &[Scope], demand: Demand) -> Option<RateHeaders> {
        if self.closed.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        let mut map = self.lock();
        let covered = scopes
            .iter()
            .all(|s| map.get(&s.id).is_some_and(|l| l.covers(&s.limits, demand)));
        if !covered {
            for s in scopes {
                let lease = map
                    .entry(s.id.clone())
                    .or_insert_with(|| QuotaLease::new(s.limits, now));
                lease.adopt(s.limits);
                lease.note_shortfall(&s.limits, demand, now);
            }
            // The keeper is woken once this request's own admission is queued (see
            // `Admission::admit`), so the store answers it before any grant it triggers.
            return None;
        }
        let now_us = now_us();
        let mut headers = RateHeaders::default();
        for s in scopes {
            if let Some(lease) = map.get_mut(&s.id) {
                let (requests, tokens) = lease.take(demand, now, now_us);
                headers.tighten(requests, tokens);
            }
        }
        Some(headers)
    }
}

/// Synchronises this replica's leases with the store: reports settled usage, returns
/// what is no longer needed, tops up leases running short. On a close request it gives
/// every lease back (requests in flight keep their bounds) and stops leasing.
pub(super) async fn keep_leases(
    leases: Arc<Leases>,
    jobs: mpsc::UnboundedSender<Job>,
    mut close: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    loop {
        let mut closing = None;
        tokio::select! {
            _ = tokio::time::sleep(KEEPER_TICK) => {}
            _ = leases.wake.notified() => {}
            done = close.recv() => {
                leases.closed.store(true, Ordering::Relaxed);
                closing = Some(done);
            }
        }
        let is_closing = closing.is_some() || leases.closed.load(Ordering::Relaxed);
        let now = Instant::now();
        let period = period_of(billing::now_ms());
        let requests: Vec<SyncRequest> = {
            let mut map = leases.lock();
            map.retain(|_, l| !(l.is_empty() && l.idle_for(now) >= FORGET_AFTER));
            map.iter_mut()
                .filter_map(|(scope, l)| l.begin_sync(scope, &period, now, is_closing))
                .collect()
        };
        if !requests.is_empty() {
            let (reply, answer) = oneshot::channel();
            let sent = jobs.send(Job::Sync {
                requests: requests.clone(),
                reply,
            });
            let grants = match sent {
                Ok(()) => answer.await.unwrap_or(Err(sqlx::Error::PoolClosed)),
                Err(_) => Err(sqlx::Error::PoolClosed),
            };
            let mut map = leases.lock();
            match grants {
                Ok(grants) => {
                    for (request, grant) in requests.iter().zip(grants) {
                        if let Some(l) = map.get_mut(&request.scope) {
                            l.finish_sync(grant);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "synchronising quota leases failed; will retry");
                    for request in &requests {
                        if let Some(l) = map.get_mut(&request.scope) {
                            l.fail_sync(request);
                        }
                    }
                }
            }
        }
        if let Some(Some(done)) = closing {
            let _ = done.send(());
        } else if closing.is_some() {
            return;
        }
    }
}
