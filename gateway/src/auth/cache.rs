//! The key cache: keys found in the store, ids it does not have, and revocations learnt
//! from it, each bounded in size and age, read without locks.
//!
//! Owns: what a lookup may answer without the store, and what it may answer while the
//! store cannot be reached. Must never: answer a key as unrevoked once a revocation of it
//! has been learnt, or serve a key from the cache during an outage longer after the last
//! successful revocation sync than [`STALE_IF_ERROR`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tenants::KeyRecord;

/// How old a cached key may be, and how long ago the last revocation sync may have
/// succeeded, for the key to be used while the store cannot be reached.
pub const STALE_IF_ERROR: Duration = Duration::from_secs(15 * 60);

/// Never, for the instants kept as milliseconds since the cache was made.
const NEVER: u64 = u64::MAX;

#[derive(Clone)]
pub(super) struct Found {
    pub record: Arc<KeyRecord>,
    pub fetched: Instant,
}

pub(super) struct KeyCache {
    found: moka::sync::Cache<String, Found>,
    /// Ids the store did not have, for a short while.
    missing: moka::sync::Cache<String, ()>,
    /// Revocations learnt by the sync (id → revoked at), kept as long as a found key is.
    revoked: moka::sync::Cache<String, i64>,
    made: Instant,
    /// When the last revocation sync succeeded (ms since `made`).
    synced_at: AtomicU64,
    /// When the store last failed (ms since `made`).
    failed_at: AtomicU64,
    /// The wall-clock ms the next sync asks for revocations from.
    sync_from_ms: AtomicI64,
}

impl KeyCache {
    pub(super) fn new(capacity: u64, missing_ttl: Duration, now_ms: i64) -> Self {
        Self {
            found: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(STALE_IF_ERROR)
                .build(),
            missing: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(missing_ttl.max(Duration::from_millis(1)))
                .build(),
            revoked: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(STALE_IF_ERROR)
                .build(),
            made: Instant::now(),
            synced_at: AtomicU64::new(NEVER),
            failed_at: AtomicU64::new(NEVER),
            sync_from_ms: AtomicI64::new(now_ms),
        }
    }

    pub(super) fn found(&self, id: &str) -> Option<Found> {
        self.found.get(id)
    }

    pub(super) fn is_missing(&self, id: &str) -> bool {
        self.missing.contains_key(id)
    }

    /// Keeps what the store answered for `id`, with any revocation learnt meanwhile.
    pub(super) fn store_answered(
        &self,
        id: &str,
        record: Option<KeyRecord>,
    ) -> Option<Arc<KeyRecord>> {
        self.failed_at.store(NEVER, Ordering::Relaxed);
        let Some(mut record) = record else {
            self.found.invalidate(id);
            self.missing.insert(id.to_owned(), ());
            return None;
        };
        if record.revoked_at.is_none() {
            record.revoked_at = self.revoked.get(id);
        }
        let record = Arc::new(record);
        self.missing.invalidate(id);
        self.found.insert(
            id.to_owned(),
            Found {
                record: record.clone(),
                fetched: Instant::now(),
            },
        );
        Some(record)
    }

    pub(super) fn store_failed(&self) {
        self.failed_at
            .store(self.ms_since_made(), Ordering::Relaxed);
    }

    /// Whether the store failed within `within`: cached keys are then used without asking
    /// it again, so an outage does not make every request wait on a dead store.
    pub(super) fn store_failed_within(&self, within: Duration) -> bool {
        self.elapsed_since(self.failed_at.load(Ordering::Relaxed))
            .is_some_and(|e| e < within)
    }

    /// Whether `found` may be used while the store cannot be reached: it is recent enough
    /// and the revocations it could have missed were synced recently enough.
    pub(super) fn usable_in_outage(&self, found: &Found) -> bool {
        found.fetched.elapsed() < STALE_IF_ERROR
            && self
                .elapsed_since(self.synced_at.load(Ordering::Relaxed))
                .is_some_and(|e| e < STALE_IF_ERROR)
    }

    /// Where the next revocation sync starts, in wall-clock ms.
    pub(super) fn sync_from_ms(&self) -> i64 {
        self.sync_from_ms.load(Ordering::Relaxed)
    }

    /// Applies the revocations a sync started at `started_ms` found, and records it.
    pub(super) fn synced(&self, started_ms: i64, revocations: Vec<(String, i64)>) {
        for (id, at) in revocations {
            if let Some(found) = self.found.get(&id) {
                if found.record.revoked_at.is_none() {
                    let mut record = (*found.record).clone();
                    record.revoked_at = Some(at);
                    self.found.insert(
                        id.clone(),
                        Found {
                            record: Arc::new(record),
                            fetched: found.fetched,
                        },
                    );
                }
            }
            self.revoked.insert(id, at);
        }
        self.sync_from_ms.store(started_ms, Ordering::Relaxed);
        self.synced_at
            .store(self.ms_since_made(), Ordering::Relaxed);
    }

    fn ms_since_made(&self) -> u64 {
        (self.made.elapsed().as_millis() as u64).min(NEVER - 1)
    }

    fn elapsed_since(&self, at: u64) -> Option<Duration> {
        (at != NEVER).then(|| Duration::from_millis(self.ms_since_made().saturating_sub(at)))
    }
}
