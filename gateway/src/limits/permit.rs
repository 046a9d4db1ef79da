//! What an admitted request holds until it ends: its reservation, in the store or in
//! this replica's leases.
//!
//! Owns: settling a reservation exactly once, with the real usage or, when dropped
//! unsettled, with nothing used. Must never: make the client wait for the settlement.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::applier::Job;
use super::headers::RateHeaders;
use super::keeper::Leases;
use super::model::{Demand, Scope};

/// An admitted request: the headers to send and the reservation to settle.
pub struct Admitted {
    pub headers: RateHeaders,
    pub permit: Option<Permit>,
}

/// An admitted request's reservation. Settle it with the real usage; dropped unsettled,
/// it settles as "nothing used" (the request failed before any usage was recorded).
pub struct Permit {
    kind: PermitKind,
    settled: bool,
}

enum PermitKind {
    /// Reserved in the store, row by row.
    Store {
        jobs: mpsc::UnboundedSender<Job>,
        request_id: String,
        scopes: Vec<Scope>,
    },
    /// Taken from this replica's leases.
    Leased {
        leases: Arc<Leases>,
        scopes: Vec<String>,
        bound: Demand,
    },
}

impl Permit {
    /// A reservation the applier made in the store for `request_id`.
    pub(super) fn store(
        jobs: mpsc::UnboundedSender<Job>,
        request_id: String,
        scopes: Vec<Scope>,
    ) -> Self {
        Self {
            kind: PermitKind::Store {
                jobs,
                request_id,
                scopes,
            },
            settled: false,
        }
    }

    /// `bound` taken from this replica's leases of `scopes`.
    pub(super) fn leased(leases: Arc<Leases>, scopes: Vec<String>, bound: Demand) -> Self {
        Self {
            kind: PermitKind::Leased {
                leases,
                scopes,
                bound,
            },
            settled: false,
        }
    }

    /// Settles: in memory for a leased request, queued to the store otherwise; the
    /// client does not wait for it.
    pub fn settle(mut self, used: Demand) {
        self.settle_inner(used);
    }

    fn settle_inner(&mut self, used: Demand) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        match &mut self.kind {
            PermitKind::Store {
                jobs,
                request_id,
                scopes,
            } => {
                let refund_scopes = scopes
                    .iter()
                    .filter(|s| s.limits.tokens_per_minute.is_some())
                    .map(|s| s.id.clone())
                    .collect();
                let _ = jobs.send(Job::Settle {
                    request_id: std::mem::take(request_id),
                    used,
                    refund_scopes,
                });
            }
            PermitKind::Leased {
                leases,
                scopes,
                bound,
            } => {
                let mut map = leases.lock();
                for id in scopes.iter() {
                    if let Some(lease) = map.get_mut(id) {
                        lease.settle(*bound, used);
                    }
                }
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.settle_inner(Demand::default());
    }
}
