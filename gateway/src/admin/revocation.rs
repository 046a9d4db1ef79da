//! Revoked admin tokens: the `jti` deny-list in the store.
//!
//! Owns: writing a revocation and asking whether a token's `jti` is revoked. Every admin
//! request whose token verifies is looked up here, so a revocation holds on every replica
//! from the moment it is committed (no cache to go stale). Must never: treat a store error
//! as "not revoked" (the request is refused instead), or delete a revocation.

use billing::{now_ms, Db, DbError};
use serde::Serialize;
use sqlx::Row;

/// Longest `jti` accepted for revocation; issued ones are UUIDs.
pub const MAX_JTI_LEN: usize = 128;

/// A revocation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevokedToken {
    pub jti: String,
    /// Milliseconds since the epoch.
    pub revoked_at: i64,
    /// The subject of the token that revoked it, or `cli`.
    pub revoked_by: String,
}

/// Adds `jti` to the deny-list (once: revoking again keeps the first record) and gives
/// the stored revocation back.
pub async fn revoke(db: &Db, jti: &str, by: &str) -> Result<RevokedToken, DbError> {
    sqlx::query(
        "INSERT INTO admin_token_revocations (jti, revoked_at, revoked_by) VALUES ($1, $2, $3) \
         ON CONFLICT (jti) DO NOTHING",
    )
    .bind(jti)
    .bind(now_ms())
    .bind(by)
    .execute(db.pool())
    .await?;
    let row = sqlx::query(
        "SELECT jti, revoked_at, revoked_by FROM admin_token_revocations WHERE jti = $1",
    )
    .bind(jti)
    .fetch_one(db.pool())
    .await?;
    Ok(RevokedToken {
        jti: row.try_get("jti")?,
        revoked_at: row.try_get("revoked_at")?,
        revoked_by: row.try_get("revoked_by")?,
    })
}

/// Whether `jti` has been revoked.
pub async fn is_revoked(db: &Db, jti: &str) -> Result<bool, DbError> {
    let row = sqlx::query("SELECT 1 AS one FROM admin_token_revocations WHERE jti = $1")
        .bind(jti)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.is_some())
}
