//! Tenants and their keys in the store. Plaintext keys never reach this module's tables.

use billing::{now_ms, Db, DbError};
use sqlx::Row;

use crate::keys::PlaintextKey;
use crate::limits::Limits;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
}

/// A tenant as the directory lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantSummary {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub plan_id: Option<String>,
    pub plan_name: Option<String>,
}

/// A key as the directory shows it: never the secret, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeySummary {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub allowed_models: Option<Vec<String>>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub limits: Limits,
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
    /// The tenant's plan (unlimited without one).
    pub plan_limits: Limits,
    /// The key's own narrowing of the plan.
    pub key_limits: Limits,
    /// The plan's response cache; `None`: off.
    pub response_cache: Option<ResponseCachePolicy>,
}

/// How a plan's tenants use the response cache (SPEC §10): entries live `ttl_s` seconds,
/// and each response served from it costs `hit_minor_per_mreq` minor units per million.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseCachePolicy {
    pub ttl_s: i64,
    #[serde(default)]
    pub hit_minor_per_mreq: i64,
}

impl ResponseCachePolicy {
    /// The longest lifetime a plan may give entries: a week.
    pub const MAX_TTL_S: i64 = 7 * 86_400;

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=Self::MAX_TTL_S).contains(&self.ttl_s) {
            return Err(format!(
                "response_cache.ttl_s must be 1 to {} seconds",
                Self::MAX_TTL_S
            ));
        }
        if self.hit_minor_per_mreq < 0 {
            return Err("response_cache.hit_minor_per_mreq must not be negative".into());
        }
        Ok(())
    }

    fn from_row(r: &sqlx::any::AnyRow, prefix: &str) -> Result<Option<Self>, sqlx::Error> {
        let ttl: Option<i64> = r.try_get(format!("{prefix}response_cache_ttl_s").as_str())?;
        let rate: Option<i64> = r.try_get(format!("{prefix}cache_hit_minor_per_mreq").as_str())?;
        Ok(ttl.map(|ttl_s| Self {
            ttl_s,
            hit_minor_per_mreq: rate.unwrap_or(0),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for TenantError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

fn split_models(s: Option<String>) -> Option<Vec<String>> {
    s.map(|s| {
        s.split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

const TENANT_SUMMARY: &str = "SELECT t.id, t.name, t.created_at, t.plan_id, \
     p.name AS plan_name FROM tenants t LEFT JOIN plans p ON p.id = t.plan_id";

fn tenant_summary(r: &sqlx::any::AnyRow) -> Result<TenantSummary, sqlx::Error> {
    Ok(TenantSummary {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
        plan_id: r.try_get("plan_id")?,
        plan_name: r.try_get("plan_name")?,
    })
}

fn key_summary(r: &sqlx::any::AnyRow) -> Result<KeySummary, sqlx::Error> {
    Ok(KeySummary {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        allowed_models: split_models(r.try_get("allowed_models")?),
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        revoked_at: r.try_get("revoked_at")?,
        limits: limits_from_row(r, "")?,
    })
}

/// A named set of limits that tenants are put on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub limits: Limits,
    /// `None`: the plan's tenants get no response cache.
    pub response_cache: Option<ResponseCachePolicy>,
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
    pub limits: Limits,
}

const LIMIT_COLUMNS: &str =
    "requests_per_minute, tokens_per_minute, max_concurrent, monthly_tokens, monthly_spend_minor";
/// A plan's columns besides its id and name.
const PLAN_COLUMNS: &str = "requests_per_minute, tokens_per_minute, max_concurrent, \
     monthly_tokens, monthly_spend_minor, response_cache_ttl_s, cache_hit_minor_per_mreq";

fn plan_from_row(r: &sqlx::any::AnyRow) -> Result<Plan, sqlx::Error> {
    Ok(Plan {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        limits: limits_from_row(r, "")?,
        response_cache: ResponseCachePolicy::from_row(r, "")?,
    })
}

fn limits_from_row(r: &sqlx::any::AnyRow, prefix: &str) -> Result<Limits, sqlx::Error> {
    let get = |name: &str| r.try_get::<Option<i64>, _>(format!("{prefix}{name}").as_str());
    Ok(Limits {
        requests_per_minute: get("requests_per_minute")?,
        tokens_per_minute: get("tokens_per_minute")?,
        max_concurrent: get("max_concurrent")?,
        monthly_tokens: get("monthly_tokens")?,
        monthly_spend_minor: get("monthly_spend_minor")?,
    })
}

/// Rejects limits the schema would: rates and concurrency must be positive, quotas not negative.
pub fn validate_limits(l: &Limits) -> Result<(), String> {
    for (name, v, min) in [
        ("requests_per_minute", l.requests_per_minute, 1),
        ("tokens_per_minute", l.tokens_per_minute, 1),
        ("max_concurrent", l.max_concurrent, 1),
        ("monthly_tokens", l.monthly_tokens, 0),
        ("monthly_spend_minor", l.monthly_spend_minor, 0),
    ] {
        if v.is_some_and(|v| v < min) {
            return Err(format!("{name} must be at least {min}"));
        }
    }
    Ok(())
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

    /// The tenant with this name, created if there is none.
    pub async fn ensure_tenant(&self, name: &str) -> Result<Tenant, DbError> {
        match self.tenant_by_name(name).await? {
            Some(t) => Ok(t),
            None => self.create_tenant(name).await,
        }
    }

    /// Creates a key; the plaintext is returned here and never again.
    pub async fn create_key(
        &self,
        tenant_id: &str,
        new: &NewKey,
    ) -> Result<(PlaintextKey, KeyRecord), TenantError> {
        let key = PlaintextKey::generate();
        let record = KeyRecord {
            id: key.public_id().to_owned(),
            tenant_id: tenant_id.to_owned(),
            name: new.name.clone(),
            secret_hash: key.hash(),
            allowed_models: new.allowed_models.clone(),
            expires_at: new.expires_at,
            revoked_at: None,
            plan_limits: Limits::default(),
            key_limits: new.limits,
            response_cache: None,
        };
        validate_limits(&new.limits).map_err(TenantError::Invalid)?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, secret_hash, allowed_models, created_at, expires_at, \
             requests_per_minute, tokens_per_minute, max_concurrent, monthly_tokens, monthly_spend_minor) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&record.id)
        .bind(&record.tenant_id)
        .bind(&record.name)
        .bind(&record.secret_hash)
        .bind(record.allowed_models.as_ref().map(|m| m.join(",")))
        .bind(now_ms())
        .bind(record.expires_at)
        .bind(new.limits.requests_per_minute)
        .bind(new.limits.tokens_per_minute)
        .bind(new.limits.max_concurrent)
        .bind(new.limits.monthly_tokens)
        .bind(new.limits.monthly_spend_minor)
        .execute(self.db.pool())
        .await?;
        Ok((key, record))
    }

    pub async fn key(&self, public_id: &str) -> Result<Option<KeyRecord>, DbError> {
        let row = sqlx::query(
            "SELECT k.id, k.tenant_id, k.name, k.secret_hash, k.allowed_models, k.expires_at, \
             k.revoked_at, k.requests_per_minute, k.tokens_per_minute, k.max_concurrent, \
             k.monthly_tokens, k.monthly_spend_minor, \
             p.requests_per_minute AS p_requests_per_minute, \
             p.tokens_per_minute AS p_tokens_per_minute, p.max_concurrent AS p_max_concurrent, \
             p.monthly_tokens AS p_monthly_tokens, p.monthly_spend_minor AS p_monthly_spend_minor, \
             p.response_cache_ttl_s AS p_response_cache_ttl_s, \
             p.cache_hit_minor_per_mreq AS p_cache_hit_minor_per_mreq \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             LEFT JOIN plans p ON p.id = t.plan_id WHERE k.id = $1",
        )
        .bind(public_id)
        .fetch_optional(self.db.pool())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let allowed: Option<String> = r.try_get("allowed_models")?;
        let allowed = split_models(allowed);
        Ok(Some(KeyRecord {
            id: r.try_get("id")?,
            tenant_id: r.try_get("tenant_id")?,
            name: r.try_get("name")?,
            secret_hash: r.try_get("secret_hash")?,
            allowed_models: allowed,
            expires_at: r.try_get("expires_at")?,
            revoked_at: r.try_get("revoked_at")?,
            plan_limits: limits_from_row(&r, "p_")?,
            key_limits: limits_from_row(&r, "")?,
            response_cache: ResponseCachePolicy::from_row(&r, "p_")?,
        }))
    }

    /// Creates a plan. Names are unique.
    pub async fn create_plan(
        &self,
        name: &str,
        limits: Limits,
        response_cache: Option<ResponseCachePolicy>,
    ) -> Result<Plan, TenantError> {
        validate_limits(&limits).map_err(TenantError::Invalid)?;
        if let Some(c) = &response_cache {
            c.validate().map_err(TenantError::Invalid)?;
        }
        let plan = Plan {
            id: format!("pl_{}", uuid::Uuid::now_v7().simple()),
            name: name.to_owned(),
            limits,
            response_cache,
        };
        sqlx::query(&format!(
            "INSERT INTO plans (id, name, created_at, {PLAN_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(&plan.id)
        .bind(&plan.name)
        .bind(now_ms())
        .bind(limits.requests_per_minute)
        .bind(limits.tokens_per_minute)
        .bind(limits.max_concurrent)
        .bind(limits.monthly_tokens)
        .bind(limits.monthly_spend_minor)
        .bind(response_cache.map(|c| c.ttl_s))
        .bind(response_cache.map_or(0, |c| c.hit_minor_per_mreq))
        .execute(self.db.pool())
        .await?;
        Ok(plan)
    }

    pub async fn plan_by_name(&self, name: &str) -> Result<Option<Plan>, DbError> {
        let row = sqlx::query(&format!(
            "SELECT id, name, {PLAN_COLUMNS} FROM plans WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(self.db.pool())
        .await?;
        row.as_ref()
            .map(plan_from_row)
            .transpose()
            .map_err(DbError::from)
    }

    /// Puts a tenant on a plan (`None`: no plan, no limits). Replicas see it within the
    /// key cache's time-to-live.
    pub async fn set_plan(&self, tenant_id: &str, plan_id: Option<&str>) -> Result<bool, DbError> {
        let result = sqlx::query("UPDATE tenants SET plan_id = $1 WHERE id = $2")
            .bind(plan_id)
            .bind(tenant_id)
            .execute(self.db.pool())
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Keys revoked at or after `since_ms` (wall clock), with when: how replicas learn of
    /// revocations without looking each key up.
    pub async fn revoked_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, DbError> {
        let rows = sqlx::query("SELECT id, revoked_at FROM api_keys WHERE revoked_at >= $1")
            .bind(since_ms)
            .fetch_all(self.db.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("revoked_at")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
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

    /// Every tenant with its plan, by name.
    pub async fn list_tenants(&self) -> Result<Vec<TenantSummary>, DbError> {
        let rows = sqlx::query(&format!("{TENANT_SUMMARY} ORDER BY t.name"))
            .fetch_all(self.db.pool())
            .await?;
        rows.iter()
            .map(tenant_summary)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// One tenant by id.
    pub async fn tenant(&self, id: &str) -> Result<Option<TenantSummary>, DbError> {
        let row = sqlx::query(&format!("{TENANT_SUMMARY} WHERE t.id = $1"))
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        row.as_ref()
            .map(tenant_summary)
            .transpose()
            .map_err(DbError::from)
    }

    /// Creates a tenant, refusing a name already taken.
    pub async fn create_tenant_unique(&self, name: &str) -> Result<Tenant, TenantError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(TenantError::Invalid(
                "a tenant name is 1 to 200 characters".into(),
            ));
        }
        if self.tenant_by_name(name).await?.is_some() {
            return Err(TenantError::Conflict(format!(
                "a tenant named {name} exists"
            )));
        }
        Ok(self.create_tenant(name).await?)
    }

    /// Every plan, by name.
    pub async fn list_plans(&self) -> Result<Vec<Plan>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT id, name, {PLAN_COLUMNS} FROM plans ORDER BY name"
        ))
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(plan_from_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// A tenant's keys, newest first; never secrets.
    pub async fn list_keys(&self, tenant_id: &str) -> Result<Vec<KeySummary>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT id, tenant_id, name, allowed_models, created_at, expires_at, revoked_at, \
             {LIMIT_COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC, id"
        ))
        .bind(tenant_id)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(key_summary)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// One key of one tenant: `None` if it does not exist or belongs to another tenant.
    pub async fn tenant_key(
        &self,
        tenant_id: &str,
        key_id: &str,
    ) -> Result<Option<KeySummary>, DbError> {
        let row = sqlx::query(&format!(
            "SELECT id, tenant_id, name, allowed_models, created_at, expires_at, revoked_at, \
             {LIMIT_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(key_id)
        .fetch_optional(self.db.pool())
        .await?;
        row.as_ref()
            .map(key_summary)
            .transpose()
            .map_err(DbError::from)
    }

    /// Replaces a key with a new one of the same name, models, expiry and limits. The old
    /// key stops working now, or after `grace_ms` (its expiry is brought forward), so
    /// clients can switch without downtime. Returns the new key, shown once.
    pub async fn rotate_key(
        &self,
        tenant_id: &str,
        key_id: &str,
        grace_ms: i64,
    ) -> Result<(PlaintextKey, KeyRecord), TenantError> {
        let Some(old) = self.tenant_key(tenant_id, key_id).await? else {
            return Err(TenantError::NotFound(format!(
                "no key {key_id} in this tenant"
            )));
        };
        let now = now_ms();
        if !(old.revoked_at.is_none() && old.expires_at.is_none_or(|e| e > now)) {
            return Err(TenantError::Conflict(format!(
                "key {key_id} is revoked or expired; create a new key instead"
            )));
        }
        if grace_ms < 0 {
            return Err(TenantError::Invalid("grace must not be negative".into()));
        }
        let new = NewKey {
            name: old.name.clone(),
            allowed_models: old.allowed_models.clone(),
            expires_at: old.expires_at,
            limits: old.limits,
        };
        let created = self.create_key(tenant_id, &new).await?;
        if grace_ms == 0 {
            self.revoke_key(key_id).await?;
        } else {
            let until = now + grace_ms;
            sqlx::query(
                "UPDATE api_keys SET expires_at = $1 WHERE id = $2 AND tenant_id = $3 \
                 AND (expires_at IS NULL OR expires_at > $1)",
            )
            .bind(until)
            .bind(key_id)
            .bind(tenant_id)
            .execute(self.db.pool())
            .await?;
        }
        Ok(created)
    }

    /// Revokes a key of one tenant; `Ok(false)` if no such active key in that tenant.
    pub async fn revoke_tenant_key(&self, tenant_id: &str, key_id: &str) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND tenant_id = $3 \
             AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(key_id)
        .bind(tenant_id)
        .execute(self.db.pool())
        .await?;
        Ok(result.rows_affected() == 1)
    }
}
