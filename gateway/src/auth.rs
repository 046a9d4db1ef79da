//! Authentication of consumer requests by API key, with a short-lived cache.
//!
//! The cache's time-to-live is the bound on how long a revoked key keeps working on a
//! replica that had it cached, while the store is reachable. While it is not, keys seen in
//! the last [`STALE_IF_ERROR`] keep working from the cache, so a store outage does not
//! stop the API (usage goes to the spool meanwhile); a revocation sync keeps revocations
//! in that cache, so a key revoked before the outage (more than one sync interval before)
//! stays refused through it, and the outage cache is used only while the last successful
//! sync is recent.
//!
//! Keys are easy to make well-formed (the checksum is public), so failed authentications
//! are counted per client address: past a rate, the address is told to back off (429)
//! and its lookups of ids the cache does not know are not sent to the store. Ids the
//! store does not have are cached briefly. Must never: hold a lock across a store call,
//! or let a failure count against any address but the caller's.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use billing::now_ms;
use tokio::task::JoinHandle;

use crate::error::GatewayError;
use crate::keys::PresentedKey;
use crate::tenants::{KeyRecord, TenantStore};

mod cache;
mod failures;

pub use cache::STALE_IF_ERROR;

use cache::KeyCache;
use failures::FailureLimiter;

/// A consumer API call's caller, once its key checks out: the key's record.
#[derive(Debug, Clone)]
pub struct KeyCaller {
    /// Shared with the key cache: a request reads it, never copies it.
    pub key: Arc<KeyRecord>,
}

/// How the authenticator caches and limits (from the gateway's configuration).
#[derive(Debug, Clone, Copy)]
pub struct AuthSettings {
    /// How long a found key is used without asking the store again.
    pub ttl: Duration,
    /// How long an id the store does not have is answered from the cache.
    pub missing_ttl: Duration,
    /// Keys, and unknown ids, cached at most (each).
    pub cache_capacity: u64,
    /// Failed authentications an address may have per minute...
    pub failures_per_minute: u32,
    /// ...in bursts of up to this many.
    pub failure_burst: u32,
    /// Addresses whose failures are tracked at most.
    pub failure_addresses: usize,
}

pub struct Authenticator {
    store: TenantStore,
    /// Where store lookups run (the main runtime), so the store's connections are never
    /// tied to a serving thread's event loop.
    runtime: tokio::runtime::Handle,
    ttl: Duration,
    cache: Arc<KeyCache>,
    failures: Arc<FailureLimiter>,
}

/// How long after a store error cached keys are served without retrying the store.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How far back each revocation sync looks before the last one began: revocations are
/// stamped by the clock of whichever process made them.
const SYNC_OVERLAP_MS: i64 = 60_000;

/// How often the table of failing addresses is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

const INVALID_KEY: &str = "Incorrect API key provided.";

impl Authenticator {
    /// Must be called within the runtime that store work should run on.
    pub fn new(store: TenantStore, settings: AuthSettings) -> Self {
        Self {
            store,
            runtime: tokio::runtime::Handle::current(),
            ttl: settings.ttl,
            cache: Arc::new(KeyCache::new(
                settings.cache_capacity,
                settings.missing_ttl,
                now_ms(),
            )),
            failures: Arc::new(FailureLimiter::new(
                settings.failures_per_minute,
                settings.failure_burst,
                settings.failure_addresses,
            )),
        }
    }

    /// Checks the `Authorization: Bearer` header of a request from `client` (the
    /// connection's peer address; `None`: not limited by address).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
    ) -> Result<KeyCaller, GatewayError> {
        match self.check(headers, client).await {
            Err(GatewayError::Unauthorized(message)) => Err(match self.failures.failed(client) {
                Some(wait) => GatewayError::AuthThrottled(retry_after_secs(wait)),
                None => GatewayError::Unauthorized(message),
            }),
            checked => checked,
        }
    }

    async fn check(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
    ) -> Result<KeyCaller, GatewayError> {
        let raw = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(GatewayError::Unauthorized(
                "Missing API key: send `Authorization: Bearer <key>`.",
            ))?;
        let key = PresentedKey::parse(raw).ok_or(GatewayError::Unauthorized(INVALID_KEY))?;
        let record = self
            .lookup(key.public_id(), client)
            .await?
            .ok_or(GatewayError::Unauthorized(INVALID_KEY))?;
        if !key.matches(&record.secret_hash) {
            return Err(GatewayError::Unauthorized(INVALID_KEY));
        }
        if record.revoked_at.is_some() {
            return Err(GatewayError::Unauthorized("This API key has been revoked."));
        }
        if !record.is_active(now_ms()) {
            return Err(GatewayError::Unauthorized("This API key has expired."));
        }
        Ok(KeyCaller { key: record })
    }

    async fn lookup(
        &self,
        public_id: &str,
        client: Option<IpAddr>,
    ) -> Result<Option<Arc<KeyRecord>>, GatewayError> {
        let cached = self.cache.found(public_id);
        match &cached {
            Some(found) if found.fetched.elapsed() < self.ttl => {
                return Ok(Some(found.record.clone()))
            }
            Some(found)
                if self.cache.store_failed_within(STORE_RETRY_AFTER)
                    && self.cache.usable_in_outage(found) =>
            {
                return Ok(Some(found.record.clone()))
            }
            Some(_) => {}
            None if self.cache.is_missing(public_id) => return Ok(None),
            // An id nobody was seen to hold: the store is not asked for an address
            // that is over its rate of failures.
            None => {
                if let Some(wait) = self.failures.refused(client) {
                    return Err(GatewayError::AuthThrottled(retry_after_secs(wait)));
                }
            }
        }
        let looked_up = {
            let (store, id) = (self.store.clone(), public_id.to_owned());
            match self
                .runtime
                .spawn(async move { store.key(&id).await })
                .await
            {
                Ok(result) => result,
                Err(e) => Err(billing::DbError::Io(std::io::Error::other(e))),
            }
        };
        match looked_up {
            Ok(record) => Ok(self.cache.store_answered(public_id, record)),
            Err(e) => {
                self.cache.store_failed();
                match cached {
                    Some(found) if self.cache.usable_in_outage(&found) => {
                        tracing::warn!(error = %e, "key store unreachable; using the cached key");
                        Ok(Some(found.record))
                    }
                    _ => Err(e.into()),
                }
            }
        }
    }

    /// Every `every`, learns the revocations made since the last sync (into the cache),
    /// and prunes the table of failing addresses now and then.
    pub fn spawn_maintenance(&self, every: Duration) -> JoinHandle<()> {
        let (store, cache, failures) = (
            self.store.clone(),
            self.cache.clone(),
            self.failures.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pruned = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let started = now_ms();
                match store
                    .revoked_since(cache.sync_from_ms() - SYNC_OVERLAP_MS)
                    .await
                {
                    Ok(revocations) => cache.synced(started, revocations),
                    Err(e) => tracing::warn!(error = %e, "syncing key revocations failed"),
                }
                if pruned.elapsed() >= PRUNE_EVERY {
                    failures.prune();
                    pruned = tokio::time::Instant::now();
                }
            }
        })
    }
}

fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}
