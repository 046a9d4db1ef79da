//! Authentication of consumer requests by API key, with a short-lived cache.
//!
//! The cache's time-to-live is the bound on how long a revoked key keeps working on a
//! replica that had it cached, while the store is reachable. While it is not, keys seen in
//! the last [`STALE_IF_ERROR`] keep working from the cache, so a store outage does not
//! stop the API (usage goes to the spool meanwhile).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use billing::now_ms;

use crate::error::GatewayError;
use crate::keys::PresentedKey;
use crate::tenants::{KeyRecord, TenantStore};

/// A consumer API call's caller, once its key checks out: the key's record.
#[derive(Debug, Clone)]
pub struct KeyCaller {
    /// Shared with the key cache: a request reads it, never copies it.
    pub key: Arc<KeyRecord>,
}

pub struct Authenticator {
    store: TenantStore,
    /// Where store lookups run (the main runtime), so the store's connections are never
    /// tied to a serving thread's event loop.
    runtime: tokio::runtime::Handle,
    ttl: Duration,
    cache: RwLock<HashMap<String, (Arc<KeyRecord>, Instant)>>,
    /// When the store last failed; for a short while after, cached keys are used without
    /// asking it again, so an outage does not make every request wait on a dead store.
    store_failed_at: RwLock<Option<Instant>>,
}

/// How long after a store error cached keys are served without retrying the store.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

const INVALID_KEY: &str = "Incorrect API key provided.";

/// How old a cached key may be and still be used while the store cannot be reached.
pub const STALE_IF_ERROR: Duration = Duration::from_secs(15 * 60);

impl Authenticator {
    /// Must be called within the runtime that store work should run on.
    pub fn new(store: TenantStore, ttl: Duration) -> Self {
        Self {
            store,
            runtime: tokio::runtime::Handle::current(),
            ttl,
            cache: RwLock::new(HashMap::new()),
            store_failed_at: RwLock::new(None),
        }
    }

    /// Checks the `Authorization: Bearer` header.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<KeyCaller, GatewayError> {
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
            .lookup(key.public_id())
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

    async fn lookup(&self, public_id: &str) -> Result<Option<Arc<KeyRecord>>, GatewayError> {
        let cached = self
            .cache
            .read()
            .ok()
            .and_then(|cache| cache.get(public_id).cloned());
        if let Some((record, at)) = &cached {
            let age = at.elapsed();
            let store_down = || {
                self.store_failed_at
                    .read()
                    .ok()
                    .and_then(|t| *t)
                    .is_some_and(|t| t.elapsed() < STORE_RETRY_AFTER)
            };
            if age < self.ttl || (age < STALE_IF_ERROR && store_down()) {
                return Ok(Some(record.clone()));
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
        if let Ok(mut failed) = self.store_failed_at.write() {
            *failed = looked_up.is_err().then(Instant::now);
        }
        let record = match looked_up {
            Ok(record) => record.map(Arc::new),
            Err(e) => match cached {
                Some((record, at)) if at.elapsed() < STALE_IF_ERROR => {
                    tracing::warn!(error = %e, "key store unreachable; using the cached key");
                    return Ok(Some(record));
                }
                _ => return Err(e.into()),
            },
        };
        if let Ok(mut cache) = self.cache.write() {
            cache.retain(|_, (_, at)| at.elapsed() < STALE_IF_ERROR);
            match &record {
                Some(r) => cache.insert(public_id.to_owned(), (r.clone(), Instant::now())),
                None => cache.remove(public_id),
            };
        }
        Ok(record)
    }
}
