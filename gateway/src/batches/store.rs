//! Files, batches and batch lines in the store.
//!
//! Owns: the `files`, `batches` and `batch_lines` tables' SQL: leasing lines to a replica,
//! recording each line's result once, and ending a batch with its output and error files.
//! Must never: return one tenant's file or batch for another's id, record a line's result
//! for a replica whose lease lapsed, or end a batch while a live lease may still add to it.

use billing::{now_ms, Db, DbError};
use serde_json::Value;
use sqlx::Row;

use super::{
    BatchError, BatchObject, ErrorList, FileObject, Line, RequestCounts, COMPLETION_WINDOW,
    COMPLETION_WINDOW_MS, FILE_RETENTION_MS,
};

/// Lines written per insert when a batch is created.
const INSERT_CHUNK: usize = 200;

/// A line leased to this replica, with what running it needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub batch_id: String,
    pub line: i64,
    pub custom_id: String,
    pub body: String,
}

/// Who a batch runs as, and where to.
#[derive(Debug, Clone)]
pub struct Owner {
    pub tenant_id: String,
    pub key_id: String,
    pub endpoint: &'static str,
}

/// How a line ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineEnd {
    /// A 2xx answer: goes to the output file.
    Done,
    /// Any other answer: goes to the error file.
    Failed,
}

#[derive(Clone, Debug)]
pub struct BatchStore {
    db: Db,
}

const FILE_COLUMNS: &str = "id, bytes, created_at, expires_at, filename, purpose";
const BATCH_COLUMNS: &str = "id, endpoint, errors, input_file_id, status, output_file_id, \
     error_file_id, created_at, in_progress_at, expires_at, finalizing_at, completed_at, \
     failed_at, expired_at, cancelling_at, cancelled_at, total, completed, failed, metadata";

fn secs(ms: i64) -> i64 {
    ms / 1000
}

fn decode(what: &str, e: serde_json::Error) -> DbError {
    DbError::Sqlx(sqlx::Error::Decode(
        format!("{what} of a batch: {e}").into(),
    ))
}

fn file_object(r: &sqlx::any::AnyRow) -> Result<FileObject, DbError> {
    Ok(FileObject {
        id: r.try_get("id")?,
        object: "file",
        bytes: r.try_get("bytes")?,
        created_at: secs(r.try_get("created_at")?),
        expires_at: secs(r.try_get("expires_at")?),
        filename: r.try_get("filename")?,
        purpose: r.try_get("purpose")?,
        status: "processed",
    })
}

fn batch_object(r: &sqlx::any::AnyRow) -> Result<BatchObject, DbError> {
    let at =
        |c: &str| -> Result<Option<i64>, DbError> { Ok(r.try_get::<Option<i64>, _>(c)?.map(secs)) };
    let errors: Option<String> = r.try_get("errors")?;
    let metadata: Option<String> = r.try_get("metadata")?;
    Ok(BatchObject {
        id: r.try_get("id")?,
        object: "batch",
        endpoint: r.try_get("endpoint")?,
        errors: errors
            .map(|e| serde_json::from_str::<Vec<BatchError>>(&e).map_err(|e| decode("errors", e)))
            .transpose()?
            .map(|data| ErrorList {
                object: "list",
                data,
            }),
        input_file_id: r.try_get("input_file_id")?,
        completion_window: COMPLETION_WINDOW,
        status: r.try_get("status")?,
        output_file_id: r.try_get("output_file_id")?,
        error_file_id: r.try_get("error_file_id")?,
        created_at: secs(r.try_get("created_at")?),
        in_progress_at: at("in_progress_at")?,
        expires_at: secs(r.try_get("expires_at")?),
        finalizing_at: at("finalizing_at")?,
        completed_at: at("completed_at")?,
        failed_at: at("failed_at")?,
        expired_at: at("expired_at")?,
        cancelling_at: at("cancelling_at")?,
        cancelled_at: at("cancelled_at")?,
        request_counts: RequestCounts {
            total: r.try_get("total")?,
            completed: r.try_get("completed")?,
            failed: r.try_get("failed")?,
        },
        metadata: metadata
            .map(|m| serde_json::from_str(&m).map_err(|e| decode("metadata", e)))
            .transpose()?,
    })
}

impl BatchStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn create_file(
        &self,
        id: &str,
        tenant_id: &str,
        purpose: &str,
        filename: &str,
        content: &str,
        line_count: usize,
    ) -> Result<FileObject, DbError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO files (id, tenant_id, purpose, filename, bytes, line_count, content, \
             created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(tenant_id)
        .bind(purpose)
        .bind(filename)
        .bind(content.len() as i64)
        .bind(line_count as i64)
        .bind(content)
        .bind(now)
        .bind(now + FILE_RETENTION_MS)
        .execute(self.db.pool())
        .await?;
        self.file(tenant_id, id)
            .await?
            .ok_or(DbError::Sqlx(sqlx::Error::RowNotFound))
    }

    pub async fn file(&self, tenant_id: &str, id: &str) -> Result<Option<FileObject>, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        row.as_ref().map(file_object).transpose()
    }

    pub async fn file_content(&self, tenant_id: &str, id: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT content FROM files WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(row.map(|r| r.try_get("content")).transpose()?)
    }

    /// A tenant's files, newest first, from after the file `after` on.
    pub async fn list_files(
        &self,
        tenant_id: &str,
        purpose: Option<&str>,
        limit: i64,
    ) -> Result<Vec<FileObject>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE tenant_id = $1 \
             AND ($2 = '' OR purpose = $2) ORDER BY created_at DESC, id DESC LIMIT $3"
        ))
        .bind(tenant_id)
        .bind(purpose.unwrap_or(""))
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(file_object).collect()
    }

    pub async fn delete_file(&self, tenant_id: &str, id: &str) -> Result<bool, DbError> {
        let r = sqlx::query("DELETE FROM files WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(self.db.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Files past their retention go; returns how many.
    pub async fn delete_expired_files(&self) -> Result<u64, DbError> {
        let r = sqlx::query("DELETE FROM files WHERE expires_at < $1")
            .bind(now_ms())
            .execute(self.db.pool())
            .await?;
        Ok(r.rows_affected())
    }

    /// Creates a batch and its lines in one transaction: it is in progress at once, or
    /// not there at all.
    pub async fn create_batch(
        &self,
        id: &str,
        owner: &Owner,
        input_file_id: &str,
        metadata: Option<&serde_json::Map<String, Value>>,
        lines: &[Line],
    ) -> Result<BatchObject, DbError> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO batches (id, tenant_id, key_id, endpoint, input_file_id, status, \
             metadata, total, created_at, in_progress_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, 'in_progress', $6, $7, $8, $8, $9)",
        )
        .bind(id)
        .bind(&owner.tenant_id)
        .bind(&owner.key_id)
        .bind(owner.endpoint)
        .bind(input_file_id)
        .bind(metadata.map(|m| Value::Object(m.clone()).to_string()))
        .bind(lines.len() as i64)
        .bind(now)
        .bind(now + COMPLETION_WINDOW_MS)
        .execute(&mut *tx)
        .await?;
        for (chunk_at, chunk) in lines.chunks(INSERT_CHUNK).enumerate() {
            let mut sql = String::from(
                "INSERT INTO batch_lines (batch_id, line, custom_id, body, status) VALUES ",
            );
            for k in 0..chunk.len() {
                // $1 is the batch; each line binds its custom id and body.
                let p = 2 + k * 2;
                if k > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "($1, {}, ${p}, ${}, 'pending')",
                    chunk_at * INSERT_CHUNK + k + 1,
                    p + 1
                ));
            }
            let mut q = sqlx::query(&sql).bind(id);
            for line in chunk {
                q = q.bind(&line.custom_id).bind(&line.body);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.batch(&owner.tenant_id, id)
            .await?
            .ok_or(DbError::Sqlx(sqlx::Error::RowNotFound))
    }

    pub async fn batch(&self, tenant_id: &str, id: &str) -> Result<Option<BatchObject>, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        row.as_ref().map(batch_object).transpose()
    }

    /// Batches newest first: a tenant's, or with `None` every tenant's (with each one's
    /// tenant id).
    pub async fn list_batches(
        &self,
        tenant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(String, BatchObject)>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT tenant_id, {BATCH_COLUMNS} FROM batches WHERE ($1 = '' OR tenant_id = $1) \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(tenant_id.unwrap_or(""))
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("tenant_id")?, batch_object(r)?)))
            .collect()
    }

    /// Asks a batch to stop: lines not yet leased never run. `None` when the tenant has no
    /// such batch; the batch as it is when it had already ended.
    pub async fn cancel(&self, tenant_id: &str, id: &str) -> Result<Option<BatchObject>, DbError> {
        sqlx::query(
            "UPDATE batches SET status = 'cancelling', ending = 'cancelled', cancelling_at = $1 \
             WHERE tenant_id = $2 AND id = $3 AND status IN ('validating', 'in_progress')",
        )
        .bind(now_ms())
        .bind(tenant_id)
        .bind(id)
        .execute(self.db.pool())
        .await?;
        self.batch(tenant_id, id).await
    }

    /// Who a batch runs as.
    pub async fn owner(&self, batch_id: &str) -> Result<Option<Owner>, DbError> {
        let row = sqlx::query("SELECT tenant_id, key_id, endpoint FROM batches WHERE id = $1")
            .bind(batch_id)
            .fetch_optional(self.db.pool())
            .await?;
        let Some(r) = row else { return Ok(None) };
        let endpoint: String = r.try_get("endpoint")?;
        let Some(endpoint) = super::ENDPOINTS.iter().find(|e| **e == endpoint) else {
            return Ok(None);
        };
        Ok(Some(Owner {
            tenant_id: r.try_get("tenant_id")?,
            key_id: r.try_get("key_id")?,
            endpoint,
        }))
    }

    /// Leases up to `n` lines nobody holds, of batches still running, oldest batch first.
    /// A line whose lease lapsed (its replica died) is leased again.
    pub async fn claim(&self, owner: &str, lease_ms: i64, n: i64) -> Result<Vec<Claimed>, DbError> {
        let now = now_ms();
        // Postgres skips rows another replica is claiming rather than waiting on them; the
        // lease condition, checked again by the update, keeps a line from two replicas
        // on either store.
        let lock = if self.db.is_postgres() {
            " FOR UPDATE OF l SKIP LOCKED"
        } else {
            ""
        };
        let rows = sqlx::query(&format!(
            "UPDATE batch_lines SET lease_owner = $1, lease_until = $2 \
             WHERE status = 'pending' AND (lease_until IS NULL OR lease_until < $3) \
               AND (batch_id, line) IN ( \
                 SELECT l.batch_id, l.line FROM batch_lines l JOIN batches b ON b.id = l.batch_id \
                 WHERE b.status = 'in_progress' AND b.ending IS NULL AND b.expires_at > $3 \
                   AND l.status = 'pending' AND (l.lease_until IS NULL OR l.lease_until < $3) \
                 ORDER BY b.created_at, l.batch_id, l.line LIMIT $4{lock}) \
             RETURNING batch_id, line, custom_id, body"
        ))
        .bind(owner)
        .bind(now + lease_ms)
        .bind(now)
        .bind(n)
        .fetch_all(self.db.pool())
        .await?;
        let mut claimed = rows
            .iter()
            .map(|r| {
                Ok(Claimed {
                    batch_id: r.try_get("batch_id")?,
                    line: r.try_get("line")?,
                    custom_id: r.try_get("custom_id")?,
                    body: r.try_get("body")?,
                })
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        claimed.sort_by(|a, b| (&a.batch_id, a.line).cmp(&(&b.batch_id, b.line)));
        Ok(claimed)
    }

    /// Keeps a line leased while it runs longer than its lease.
    pub async fn renew(
        &self,
        owner: &str,
        batch_id: &str,
        line: i64,
        lease_ms: i64,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE batch_lines SET lease_until = $1 WHERE batch_id = $2 AND line = $3 \
             AND lease_owner = $4 AND status = 'pending'",
        )
        .bind(now_ms() + lease_ms)
        .bind(batch_id)
        .bind(line)
        .bind(owner)
        .execute(self.db.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives a leased line back unrun, to be run later (by any replica).
    pub async fn release(&self, owner: &str, batch_id: &str, line: i64) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE batch_lines SET lease_owner = NULL, lease_until = NULL \
             WHERE batch_id = $1 AND line = $2 AND lease_owner = $3 AND status = 'pending'",
        )
        .bind(batch_id)
        .bind(line)
        .bind(owner)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Records a line's result, once: only while `owner` still holds its lease. Returns
    /// whether it was recorded.
    pub async fn complete(
        &self,
        owner: &str,
        batch_id: &str,
        line: i64,
        end: LineEnd,
        result: &str,
    ) -> Result<bool, DbError> {
        let mut tx = self.db.begin_write().await?;
        let r = sqlx::query(
            "UPDATE batch_lines SET status = $1, result = $2, lease_owner = NULL, lease_until = NULL \
             WHERE batch_id = $3 AND line = $4 AND lease_owner = $5 AND status = 'pending'",
        )
        .bind(match end {
            LineEnd::Done => "done",
            LineEnd::Failed => "failed",
        })
        .bind(result)
        .bind(batch_id)
        .bind(line)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        let counter = match end {
            LineEnd::Done => "completed",
            LineEnd::Failed => "failed",
        };
        sqlx::query(&format!(
            "UPDATE batches SET {counter} = {counter} + 1 WHERE id = $1"
        ))
        .bind(batch_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Stops a running batch for good (its tenant is out of quota): its lines not yet run
    /// end in the error file with `error`, and the batch as `failed`.
    pub async fn stop(&self, batch_id: &str, error: &BatchError) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE batches SET ending = 'failed', errors = $1 \
             WHERE id = $2 AND status = 'in_progress' AND ending IS NULL",
        )
        .bind(serde_json::to_string(&[error]).unwrap_or_default())
        .bind(batch_id)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Batches that can end now, with what they end as: every line done, or stopped,
    /// cancelled or past their window with no live lease left, or ending already.
    pub async fn endable(&self) -> Result<Vec<(String, String)>, DbError> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT b.id, b.status, b.ending, b.expires_at, \
               (SELECT COUNT(*) FROM batch_lines l WHERE l.batch_id = b.id AND l.status = 'pending') AS pending, \
               (SELECT COUNT(*) FROM batch_lines l WHERE l.batch_id = b.id AND l.status = 'pending' \
                  AND l.lease_until >= $1) AS leased \
             FROM batches b WHERE b.status IN ('in_progress', 'cancelling', 'finalizing')",
        )
        .bind(now)
        .fetch_all(self.db.pool())
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let status: String = r.try_get("status")?;
            let ending: Option<String> = r.try_get("ending")?;
            let (pending, leased): (i64, i64) = (r.try_get("pending")?, r.try_get("leased")?);
            let expired = r.try_get::<i64, _>("expires_at")? <= now;
            let end = match (status.as_str(), ending) {
                ("finalizing", Some(e)) => Some(e),
                (_, Some(e)) if leased == 0 => Some(e),
                ("in_progress", None) if pending == 0 => Some("completed".to_owned()),
                ("in_progress", None) if expired && leased == 0 => Some("expired".to_owned()),
                _ => None,
            };
            if let Some(end) = end {
                out.push((r.try_get("id")?, end));
            }
        }
        Ok(out)
    }

    /// Ends a batch as `end`: its output and error files written from its lines (lines
    /// never run go to the error file with the reason), its lines deleted. Safe to run
    /// again or from two replicas at once: the files' ids are the batch's, written once.
    pub async fn finish(&self, batch_id: &str, end: &str) -> Result<(), DbError> {
        let now = now_ms();
        sqlx::query(
            "UPDATE batches SET status = 'finalizing', ending = $1, finalizing_at = $2 \
             WHERE id = $3 AND status IN ('in_progress', 'cancelling')",
        )
        .bind(end)
        .bind(now)
        .bind(batch_id)
        .execute(self.db.pool())
        .await?;
        let Some(batch) = sqlx::query("SELECT tenant_id, status FROM batches WHERE id = $1")
            .bind(batch_id)
            .fetch_optional(self.db.pool())
            .await?
        else {
            return Ok(());
        };
        if batch.try_get::<String, _>("status")? != "finalizing" {
            return Ok(());
        }
        let tenant_id: String = batch.try_get("tenant_id")?;
        let rows = sqlx::query(
            "SELECT line, custom_id, status, result FROM batch_lines WHERE batch_id = $1 ORDER BY line",
        )
        .bind(batch_id)
        .fetch_all(self.db.pool())
        .await?;
        let (code, message) = match end {
            "cancelled" => (
                "batch_cancelled",
                "the batch was cancelled before this request ran",
            ),
            "expired" => (
                "batch_expired",
                "the batch's completion window ended before this request ran",
            ),
            _ => (
                "insufficient_quota",
                "the tenant's quota ran out before this request ran",
            ),
        };
        let (mut output, mut errors, mut unrun) = (String::new(), String::new(), 0i64);
        for r in &rows {
            let status: String = r.try_get("status")?;
            let result: Option<String> = r.try_get("result")?;
            match (status.as_str(), result) {
                ("done", Some(result)) => {
                    output.push_str(&result);
                    output.push('\n');
                }
                ("failed", Some(result)) => {
                    errors.push_str(&result);
                    errors.push('\n');
                }
                _ => {
                    let line: i64 = r.try_get("line")?;
                    let custom_id: String = r.try_get("custom_id")?;
                    let entry = serde_json::json!({
                        "id": format!("{batch_id}_req_{line}"),
                        "custom_id": custom_id,
                        "response": null,
                        "error": {"code": code, "message": message},
                    });
                    errors.push_str(&entry.to_string());
                    errors.push('\n');
                    unrun += 1;
                }
            }
        }
        let mut tx = self.db.begin_write().await?;
        let mut ids = [None, None];
        for (k, (content, suffix)) in [(&output, "output"), (&errors, "errors")]
            .into_iter()
            .enumerate()
        {
            if content.is_empty() {
                continue;
            }
            let id = format!("file-{}-{suffix}", batch_id.trim_start_matches("batch_"));
            sqlx::query(
                "INSERT INTO files (id, tenant_id, purpose, filename, bytes, line_count, content, \
                 created_at, expires_at) VALUES ($1, $2, 'batch_output', $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&id)
            .bind(&tenant_id)
            .bind(format!("{batch_id}_{suffix}.jsonl"))
            .bind(content.len() as i64)
            .bind(content.lines().count() as i64)
            .bind(content.as_str())
            .bind(now)
            .bind(now + FILE_RETENTION_MS)
            .execute(&mut *tx)
            .await?;
            ids[k] = Some(id);
        }
        let stamp = match end {
            "cancelled" => "cancelled_at",
            "expired" => "expired_at",
            "failed" => "failed_at",
            _ => "completed_at",
        };
        let end = match end {
            "cancelled" | "expired" | "failed" => end,
            _ => "completed",
        };
        let ended = sqlx::query(&format!(
            "UPDATE batches SET status = $1, {stamp} = $2, output_file_id = $3, error_file_id = $4, \
             failed = failed + $5 WHERE id = $6 AND status = 'finalizing'"
        ))
        .bind(end)
        .bind(now)
        .bind(&ids[0])
        .bind(&ids[1])
        .bind(unrun)
        .bind(batch_id)
        .execute(&mut *tx)
        .await?;
        if ended.rows_affected() == 1 {
            sqlx::query("DELETE FROM batch_lines WHERE batch_id = $1")
                .bind(batch_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
