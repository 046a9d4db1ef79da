//! Tenants and their keys in the store. Plaintext keys never reach this module's tables.

use billing::{now_ms, Db, DbError};
use sqlx::Row;

use crate::keys::PlaintextKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
}

/// A key as stored: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub secret_hash: String,
    /// `None`: every model.
    pub allowed_models: Option<Vec<String>>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl KeyRecord {
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }

    /// Usable at `now_ms`: neither revoked nor expired.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now_ms)
    }
}

/// Options for a new key.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub allowed_models: Option<Vec<String>>,
    pub expires_at: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct TenantStore {
    db: Db,
}

impl TenantStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub async fn create_tenant(&self, name: &str) -> Result<Tenant, DbError> {
        let tenant = Tenant {
            id: format!("tn_{}", uuid::Uuid::now_v7().simple()),
            name: name.to_owned(),
        };
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(now_ms())
            .execute(self.db.pool())
            .await?;
        Ok(tenant)
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, DbError> {
        let row = sqlx::query("SELECT id, name FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(match row {
            Some(r) => Some(Tenant {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
            }),
            None => None,
        })
    }

    /// Creates a key; the plaintext is returned here and never again.
    pub async fn create_key(
        &self,
        tenant_id: &str,
        new: &NewKey,
    ) -> Result<(PlaintextKey, KeyRecord), DbError> {
        let key = PlaintextKey::generate();
        let record = KeyRecord {
            id: key.public_id().to_owned(),
            tenant_id: tenant_id.to_owned(),
            name: new.name.clone(),
            secret_hash: key.hash(),
            allowed_models: new.allowed_models.clone(),
            expires_at: new.expires_at,
            revoked_at: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, secret_hash, allowed_models, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&record.id)
        .bind(&record.tenant_id)
        .bind(&record.name)
        .bind(&record.secret_hash)
        .bind(record.allowed_models.as_ref().map(|m| m.join(",")))
        .bind(now_ms())
        .bind(record.expires_at)
        .execute(self.db.pool())
        .await?;
        Ok((key, record))
    }

    pub async fn key(&self, public_id: &str) -> Result<Option<KeyRecord>, DbError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, secret_hash, allowed_models, expires_at, revoked_at \
             FROM api_keys WHERE id = $1",
        )
        .bind(public_id)
        .fetch_optional(self.db.pool())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let allowed: Option<String> = r.try_get("allowed_models")?;
        Ok(Some(KeyRecord {
            id: r.try_get("id")?,
            tenant_id: r.try_get("tenant_id")?,
            name: r.try_get("name")?,
            secret_hash: r.try_get("secret_hash")?,
            allowed_models: allowed.map(|s| {
                s.split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            expires_at: r.try_get("expires_at")?,
            revoked_at: r.try_get("revoked_at")?,
        }))
    }

    /// Revokes a key; returns whether it was active.
    pub async fn revoke_key(&self, public_id: &str) -> Result<bool, DbError> {
        let result =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(public_id)
                .execute(self.db.pool())
                .await?;
        Ok(result.rows_affected() == 1)
    }
}
