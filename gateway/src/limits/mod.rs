//! Admission control: requests per minute, tokens per minute, concurrent requests, a
//! monthly token quota and a monthly spend cap, shared by every replica through the store.
//!
//! Owns: the `limit_counters` and `reservations` tables and the arithmetic over them.
//! This file is the front door: which path a request takes (lease, store, or the failure
//! mode of its limits while the store cannot be reached).
//! Must never: decide what a request costs in the ledger (that is the usage record's job)
//! or let a refused request reach a worker.
//!
//! How it holds under concurrency: every unit a request may use is charged in the store
//! before the request runs. Either the request itself goes to the store (one transaction,
//! batched with others, that locks the counter rows of its scopes, checks every limit and
//! reserves an upper bound of the request's tokens and spend: prompt bound + max
//! completion tokens, priced), or it is admitted in memory from a quota lease (see
//! [`lease`]): a share of each limit that the store already charged to this replica in the
//! same way, as a reservation, bucket level and in-flight slots. Settlement swaps a
//! reservation for the real figures (for a leased request, in memory, reported at the
//! lease's next sync). Because every admitted request is covered by a charge in the store
//! until it settles, concurrent requests on any number of replicas cannot together pass a
//! limit. Leases take at most a quarter of what is left of a limit each time, so close to
//! a limit they shrink to nothing and every request goes to the store. The documented
//! overshoot bound is:
//!
//! - zero while the store answers and usage stays within its reservation (it always does
//!   for the prompt, whose bound is its byte length plus the template's overhead);
//! - plus, for each gateway crash, nothing: its reservations and leases stay counted
//!   until they expire, and are then released (their usage is in the ledger, not in the
//!   counters);
//! - plus what is admitted while the store is unreachable, for the kinds of limit set to
//!   fail open ([`OnStoreError`]; by default rates and concurrency, counted by
//!   `gateway_admission_fail_open_total`) so an outage does not stop the API. Kinds set to
//!   fail closed (by default the quota and the spend cap) refuse such a request with 503
//!   and `retry-after` (`gateway_admission_fail_closed_total`), so they hold through an
//!   outage. Either way, what leases already hold is still admitted from memory: the store
//!   counted it before the outage.
//!
//! Per-minute limits are leaky buckets, stored as levels in units x 60,000,000 so that
//! the arithmetic is exact in integers and independent of the limit itself.
//!
//! The pieces, each depending only on those listed before it: `bucket` (leaky-bucket
//! arithmetic), `headers` (`x-ratelimit-*`), `model` (limits, scopes, demand, refusals),
//! [`lease`] (one scope's quota lease), `counter` (checks and updates of a counter row),
//! `applier` (the batched store transaction), `keeper` (this replica's leases and their
//! sync task), `permit` (an admitted request's reservation).

mod applier;
mod bucket;
mod counter;
mod headers;
mod keeper;
pub mod lease;
mod model;
mod permit;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use billing::Db;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::GatewayMetrics;
use applier::Job;
use keeper::Leases;

pub use bucket::RateState;
pub use headers::RateHeaders;
pub use model::{
    Demand, LimitKind, Limits, NotAdmitted, OnStoreError, Refusal, Scope, StoreFailure,
    MAX_RETRY_AFTER_SECS,
};
pub use permit::{Admitted, Permit};

/// How long after a store error admission takes the failure modes without asking the
/// store again.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Admission against the shared counters.
///
/// Admissions and settlements are applied in batches by one task (see `applier.rs`).
/// In front of that, each replica holds leases (see [`lease`]): shares of a scope's limits
/// already charged in the store, from which it admits in memory. A request goes to the
/// store only when a lease cannot cover it (a new scope, a lease running short, or a limit
/// too close to its end to be shared out).
pub struct Admission {
    jobs: mpsc::UnboundedSender<Job>,
    metrics: Arc<GatewayMetrics>,
    store_failed_at: Mutex<Option<Instant>>,
    on_store_error: OnStoreError,
    leases: Arc<Leases>,
    close: Mutex<Option<mpsc::UnboundedSender<oneshot::Sender<()>>>>,
}

impl Admission {
    pub fn new(
        db: Db,
        metrics: Arc<GatewayMetrics>,
        reservation_ttl: Duration,
        on_store_error: OnStoreError,
    ) -> Arc<Self> {
        let jobs = applier::start(db, reservation_ttl);
        let leases = Arc::new(Leases::new());
        let (close, closing) = mpsc::unbounded_channel();
        tokio::spawn(keeper::keep_leases(leases.clone(), jobs.clone(), closing));
        Arc::new(Self {
            jobs,
            metrics,
            store_failed_at: Mutex::new(None),
            on_store_error,
            leases,
            close: Mutex::new(Some(close)),
        })
    }

    /// Admits from this replica's leases if they cover every scope.
    fn admit_leased(&self, scopes: &[Scope], demand: Demand) -> Option<Admitted> {
        let headers = self.leases.admit(scopes, demand)?;
        Some(Admitted {
            headers,
            permit: Some(Permit::leased(
                self.leases.clone(),
                scopes.iter().map(|s| s.id.clone()).collect(),
                demand,
            )),
        })
    }

    /// What a request that needs the unreachable store gets: admitted unchecked, or refused
    /// if any of its limits fails closed.
    fn store_unreachable(&self, scopes: &[Scope]) -> Result<Admitted, NotAdmitted> {
        if self.on_store_error.refuses(scopes) {
            self.metrics.admission_fail_closed.inc();
            return Err(NotAdmitted::StoreUnavailable);
        }
        self.metrics.admission_fail_open.inc();
        Ok(Admitted {
            headers: RateHeaders::default(),
            permit: None,
        })
    }

    /// Checks and reserves `demand` in every scope, or refuses with the first limit hit.
    pub async fn admit(
        self: &Arc<Self>,
        request_id: &str,
        tenant_id: &str,
        mut scopes: Vec<Scope>,
        demand: Demand,
    ) -> Result<Admitted, NotAdmitted> {
        scopes.retain(|s| !s.limits.is_unlimited());
        if scopes.is_empty() {
            return Ok(Admitted {
                headers: RateHeaders::default(),
                permit: None,
            });
        }
        if let Some(admitted) = self.admit_leased(&scopes, demand) {
            self.metrics.admissions.with_label_values(&["lease"]).inc();
            return Ok(admitted);
        }
        let recently_failed = self
            .store_failed_at
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < STORE_RETRY_AFTER);
        if recently_failed {
            return self.store_unreachable(&scopes);
        }
        let started = Instant::now();
        let (reply, answer) = oneshot::channel();
        let sent = self.jobs.send(Job::Admit {
            request_id: request_id.to_owned(),
            scopes: scopes.clone(),
            demand,
            reply,
        });
        self.leases.wake_keeper();
        let outcome = match sent {
            Ok(()) => answer.await.unwrap_or(Err(sqlx::Error::PoolClosed)),
            Err(_) => Err(sqlx::Error::PoolClosed),
        };
        self.metrics
            .admission_seconds
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(headers)) => {
                self.metrics.admissions.with_label_values(&["store"]).inc();
                Ok(Admitted {
                    headers,
                    permit: Some(Permit::store(
                        self.jobs.clone(),
                        request_id.to_owned(),
                        scopes,
                    )),
                })
            }
            Ok(Err(refusal)) => {
                self.metrics
                    .limit_rejections
                    .with_label_values(&[tenant_id, refusal.kind.label()])
                    .inc();
                Err(NotAdmitted::Limited(refusal))
            }
            Err(e) => {
                tracing::warn!(error = %e, "limit store unreachable; limits take their failure modes");
                if let Ok(mut t) = self.store_failed_at.lock() {
                    *t = Some(Instant::now());
                }
                self.store_unreachable(&scopes)
            }
        }
    }

    /// Waits until every admission and settlement queued so far is in the store and
    /// every lease is given back: at shutdown, so this replica's reservations and leases
    /// are not left to expire.
    pub async fn flush(&self) {
        let close = self.close.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(close) = close {
            let (done, returned) = oneshot::channel();
            if close.send(done).is_ok() {
                let _ = returned.await;
            }
        }
        let (done, finished) = oneshot::channel();
        if self.jobs.send(Job::Flush(done)).is_ok() {
            let _ = finished.await;
        }
    }

    /// Releases expired reservations every `every`: those of crashed replicas, or of
    /// requests that outlived the timeout.
    pub fn spawn_sweeper(self: &Arc<Self>, db: Db, every: Duration) -> tokio::task::JoinHandle<()> {
        applier::spawn_sweeper(self.jobs.clone(), db, every)
    }
}
