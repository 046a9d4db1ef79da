//! Usage records: one per served request, keyed by the gateway's request id.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::db::{Db, DbError};

/// How the call ended, as far as billing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageStatus {
    /// The full response reached the client.
    Success,
    /// The client went away mid-stream; billed for what was delivered.
    ClientCancelled,
    /// The upstream failed mid-stream; billed for what was delivered.
    UpstreamFailed,
}

impl UsageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ClientCancelled => "client_cancelled",
            Self::UpstreamFailed => "upstream_failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "success" => Some(Self::Success),
            "client_cancelled" => Some(Self::ClientCancelled),
            "upstream_failed" => Some(Self::UpstreamFailed),
            _ => None,
        }
    }
}

/// What one call used. Quantities are integers; nothing here is money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub request_id: String,
    pub tenant_id: String,
    pub key_id: String,
    pub model: String,
    pub endpoint: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Milliseconds since the epoch.
    pub started_at: i64,
    pub finished_at: i64,
    pub status: UsageStatus,
}

/// Writes and reads usage records.
#[derive(Clone, Debug)]
pub struct Ledger {
    db: Db,
}

impl Ledger {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Records one event. Idempotent: a second event with the same request id changes
    /// nothing and returns `false`.
    pub async fn record(&self, event: &UsageEvent) -> Result<bool, DbError> {
        let result = sqlx::query(
            "INSERT INTO usage_records (request_id, tenant_id, key_id, model, endpoint, \
             prompt_tokens, completion_tokens, started_at, finished_at, status) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(&event.request_id)
        .bind(&event.tenant_id)
        .bind(&event.key_id)
        .bind(&event.model)
        .bind(&event.endpoint)
        .bind(event.prompt_tokens)
        .bind(event.completion_tokens)
        .bind(event.started_at)
        .bind(event.finished_at)
        .bind(event.status.as_str())
        .execute(self.db.pool())
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// The record for a request id, if any.
    pub async fn get(&self, request_id: &str) -> Result<Option<UsageEvent>, DbError> {
        let row = sqlx::query(
            "SELECT request_id, tenant_id, key_id, model, endpoint, prompt_tokens, \
             completion_tokens, started_at, finished_at, status \
             FROM usage_records WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(self.db.pool())
        .await?;
        row.map(|r| from_row(&r)).transpose()
    }

    /// Every record of a tenant, oldest first.
    pub async fn for_tenant(&self, tenant_id: &str) -> Result<Vec<UsageEvent>, DbError> {
        let rows = sqlx::query(
            "SELECT request_id, tenant_id, key_id, model, endpoint, prompt_tokens, \
             completion_tokens, started_at, finished_at, status \
             FROM usage_records WHERE tenant_id = $1 ORDER BY started_at, request_id",
        )
        .bind(tenant_id)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(from_row).collect()
    }
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<UsageEvent, DbError> {
    let status: String = row.try_get("status")?;
    Ok(UsageEvent {
        request_id: row.try_get("request_id")?,
        tenant_id: row.try_get("tenant_id")?,
        key_id: row.try_get("key_id")?,
        model: row.try_get("model")?,
        endpoint: row.try_get("endpoint")?,
        prompt_tokens: row.try_get("prompt_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        status: UsageStatus::parse(&status).ok_or_else(|| {
            DbError::Sqlx(sqlx::Error::Decode(
                format!("unknown usage status `{status}`").into(),
            ))
        })?,
    })
}
