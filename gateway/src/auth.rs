//! Authentication of consumer requests by API key, with a short-lived cache.
//!
//! The cache's time-to-live is the bound on how long a revoked key keeps working on a
//! replica that had it cached.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use billing::now_ms;

use crate::error::GatewayError;
use crate::keys::{self, PlaintextKey};
use crate::tenants::{KeyRecord, TenantStore};

/// Who is calling, once the key checks out.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: KeyRecord,
}

pub struct Authenticator {
    store: TenantStore,
    ttl: Duration,
    cache: RwLock<HashMap<String, (KeyRecord, Instant)>>,
}

const INVALID_KEY: &str = "Incorrect API key provided.";

impl Authenticator {
    pub fn new(store: TenantStore, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// Checks the `Authorization: Bearer` header.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, GatewayError> {
        let raw = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(GatewayError::Unauthorized(
                "Missing API key: send `Authorization: Bearer <key>`.",
            ))?;
        let key = PlaintextKey::parse(raw).ok_or(GatewayError::Unauthorized(INVALID_KEY))?;
        let record = self
            .lookup(key.public_id())
            .await?
            .ok_or(GatewayError::Unauthorized(INVALID_KEY))?;
        if !keys::hash_matches(&key, &record.secret_hash) {
            return Err(GatewayError::Unauthorized(INVALID_KEY));
        }
        if record.revoked_at.is_some() {
            return Err(GatewayError::Unauthorized("This API key has been revoked."));
        }
        if !record.is_active(now_ms()) {
            return Err(GatewayError::Unauthorized("This API key has expired."));
        }
        Ok(Caller { key: record })
    }

    async fn lookup(&self, public_id: &str) -> Result<Option<KeyRecord>, GatewayError> {
        if let Ok(cache) = self.cache.read() {
            if let Some((record, at)) = cache.get(public_id) {
                if at.elapsed() < self.ttl {
                    return Ok(Some(record.clone()));
                }
            }
        }
        let record = self.store.key(public_id).await?;
        if let (Some(r), Ok(mut cache)) = (&record, self.cache.write()) {
            cache.retain(|_, (_, at)| at.elapsed() < self.ttl);
            cache.insert(public_id.to_owned(), (r.clone(), Instant::now()));
        }
        Ok(record)
    }
}
