//! Classifiers in the store: created with their examples, leased by the replica that
//! trains them, finished with a head and metrics (or an error), read and deleted per tenant.
//!
//! Owns: the `classifiers` table's SQL. Must never: return one tenant's classifier for
//! another's id (every read and delete is by tenant and id), or keep examples past the end
//! of training.

use billing::{now_ms, Db, DbError};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::train::{Head, Metrics, Options};

/// Where a classifier is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Training,
    Ready,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "ready" => Self::Ready,
            "failed" => Self::Failed,
            _ => Self::Training,
        }
    }
}

/// What training has done so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// `queued`, `embedding` or `training`.
    pub phase: String,
    pub done: usize,
    pub total: usize,
}

/// One labelled example.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub text: String,
    pub label: String,
}

/// A classifier as its tenant sees it (never its examples or weights).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub id: String,
    pub object: &'static str,
    pub name: String,
    pub model: String,
    pub status: Status,
    pub labels: Vec<String>,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub examples: i64,
    /// Tokens embedded to train it (billed).
    pub tokens: i64,
}

/// A classifier to train, as a replica's lease hands it over.
pub struct Job {
    pub id: String,
    pub tenant_id: String,
    pub key_id: String,
    pub model: String,
    pub labels: Vec<String>,
    pub options: Options,
    pub examples: Vec<Example>,
}

/// A ready classifier's model and head, what classifying needs.
#[derive(Debug, Clone)]
pub struct Trained {
    pub model: String,
    pub labels: Vec<String>,
    pub head: Head,
}

/// Reading a stored classifier failed: the store, or a column it cannot read back.
fn decode(what: &str, e: serde_json::Error) -> DbError {
    DbError::Sqlx(sqlx::Error::Decode(
        format!("{what} of a classifier: {e}").into(),
    ))
}

const SUMMARY: &str = "SELECT id, name, model, labels, status, progress, metrics, error, \
                       example_count, tokens, created_at, finished_at FROM classifiers";

fn summary(r: &sqlx::any::AnyRow) -> Result<Summary, DbError> {
    let json = |col: &str| -> Result<Option<String>, DbError> { Ok(r.try_get(col)?) };
    Ok(Summary {
        id: r.try_get("id")?,
        object: "classifier",
        name: r.try_get("name")?,
        model: r.try_get("model")?,
        status: Status::parse(&r.try_get::<String, _>("status")?),
        labels: serde_json::from_str(&r.try_get::<String, _>("labels")?)
            .map_err(|e| decode("labels", e))?,
        created_at: r.try_get("created_at")?,
        finished_at: r.try_get("finished_at")?,
        progress: json("progress")?
            .map(|p| serde_json::from_str(&p).map_err(|e| decode("progress", e)))
            .transpose()?,
        metrics: json("metrics")?
            .map(|m| serde_json::from_str(&m).map_err(|e| decode("metrics", e)))
            .transpose()?,
        error: r.try_get("error")?,
        examples: r.try_get("example_count")?,
        tokens: r.try_get("tokens")?,
    })
}

#[derive(Clone, Debug)]
pub struct ClassifierStore {
    db: Db,
}

impl ClassifierStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Stores a new classifier, to be trained.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        id: &str,
        tenant_id: &str,
        key_id: &str,
        name: &str,
        model: &str,
        labels: &[String],
        options: &Options,
        examples: &[Example],
    ) -> Result<Summary, DbError> {
        let now = now_ms();
        let progress = Progress {
            phase: "queued".into(),
            done: 0,
            total: examples.len(),
        };
        sqlx::query(
            "INSERT INTO classifiers (id, tenant_id, key_id, name, model, labels, options, status, \
             progress, examples, example_count, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'training', $8, $9, $10, $11)",
        )
        .bind(id)
        .bind(tenant_id)
        .bind(key_id)
        .bind(name)
        .bind(model)
        .bind(json(&labels))
        .bind(json(options))
        .bind(json(&progress))
        .bind(json(&examples))
        .bind(examples.len() as i64)
        .bind(now)
        .execute(self.db.pool())
        .await?;
        self.get(tenant_id, id)
            .await?
            .ok_or_else(|| DbError::Sqlx(sqlx::Error::RowNotFound))
    }

    pub async fn get(&self, tenant_id: &str, id: &str) -> Result<Option<Summary>, DbError> {
        let row = sqlx::query(&format!("{SUMMARY} WHERE tenant_id = $1 AND id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        row.as_ref().map(summary).transpose()
    }

    /// A tenant's classifiers, newest first; every tenant's with `None`.
    pub async fn list(&self, tenant_id: Option<&str>) -> Result<Vec<Summary>, DbError> {
        let rows = match tenant_id {
            Some(t) => {
                sqlx::query(&format!(
                    "{SUMMARY} WHERE tenant_id = $1 ORDER BY created_at DESC, id"
                ))
                .bind(t)
                .fetch_all(self.db.pool())
                .await?
            }
            None => {
                sqlx::query(&format!("{SUMMARY} ORDER BY created_at DESC, id"))
                    .fetch_all(self.db.pool())
                    .await?
            }
        };
        rows.iter().map(summary).collect()
    }

    /// Deletes a tenant's classifier; whether there was one.
    pub async fn delete(&self, tenant_id: &str, id: &str) -> Result<bool, DbError> {
        let r = sqlx::query("DELETE FROM classifiers WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(id)
            .execute(self.db.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Classifiers in training that `tenant_id` has, leased or not.
    pub async fn training_count(&self, tenant_id: &str) -> Result<i64, DbError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM classifiers WHERE tenant_id = $1 AND status = 'training'",
        )
        .bind(tenant_id)
        .fetch_one(self.db.pool())
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Takes the oldest classifier waiting for training whose tenant has none in training
    /// under a live lease, for `lease_ms`; `None` when there is none.
    pub async fn lease_next(&self, owner: &str, lease_ms: i64) -> Result<Option<Job>, DbError> {
        let now = now_ms();
        let candidate = sqlx::query(
            "SELECT id FROM classifiers c WHERE status = 'training' \
               AND (lease_until IS NULL OR lease_until < $1) \
               AND NOT EXISTS (SELECT 1 FROM classifiers o WHERE o.tenant_id = c.tenant_id \
                               AND o.status = 'training' AND o.lease_until >= $1) \
             ORDER BY created_at, id LIMIT 1",
        )
        .bind(now)
        .fetch_optional(self.db.pool())
        .await?;
        let Some(candidate) = candidate else {
            return Ok(None);
        };
        let id: String = candidate.try_get("id")?;
        // Taken only if nobody took it in between.
        let taken = sqlx::query(
            "UPDATE classifiers SET lease_owner = $1, lease_until = $2 WHERE id = $3 \
             AND status = 'training' AND (lease_until IS NULL OR lease_until < $4)",
        )
        .bind(owner)
        .bind(now + lease_ms)
        .bind(&id)
        .bind(now)
        .execute(self.db.pool())
        .await?;
        if taken.rows_affected() != 1 {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT id, tenant_id, key_id, model, labels, options, examples FROM classifiers \
             WHERE id = $1",
        )
        .bind(&id)
        .fetch_optional(self.db.pool())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let text = |c: &str| -> Result<String, DbError> { Ok(r.try_get(c)?) };
        Ok(Some(Job {
            id: text("id")?,
            tenant_id: text("tenant_id")?,
            key_id: text("key_id")?,
            model: text("model")?,
            labels: serde_json::from_str(&text("labels")?).map_err(|e| decode("labels", e))?,
            options: serde_json::from_str(&text("options")?).map_err(|e| decode("options", e))?,
            examples: serde_json::from_str(
                &r.try_get::<Option<String>, _>("examples")?
                    .unwrap_or_default(),
            )
            .map_err(|e| decode("examples", e))?,
        }))
    }

    /// Extends the lease and records progress; `false` once the lease is lost or the
    /// classifier deleted (training then stops).
    pub async fn renew(
        &self,
        id: &str,
        owner: &str,
        lease_ms: i64,
        progress: &Progress,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE classifiers SET lease_until = $1, progress = $2 \
             WHERE id = $3 AND lease_owner = $4 AND status = 'training'",
        )
        .bind(now_ms() + lease_ms)
        .bind(serde_json::to_string(progress).unwrap_or_default())
        .bind(id)
        .bind(owner)
        .execute(self.db.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Ends training with a head, or an error; the examples are dropped either way.
    pub async fn finish(
        &self,
        id: &str,
        owner: &str,
        outcome: Result<(&Head, &Metrics), &str>,
        tokens: i64,
    ) -> Result<bool, DbError> {
        let (status, head, metrics, error) = match outcome {
            Ok((head, metrics)) => (
                Status::Ready,
                serde_json::to_string(head).ok(),
                serde_json::to_string(metrics).ok(),
                None,
            ),
            Err(e) => (Status::Failed, None, None, Some(e.to_owned())),
        };
        let r = sqlx::query(
            "UPDATE classifiers SET status = $1, head = $2, metrics = $3, error = $4, \
             tokens = $5, examples = NULL, progress = NULL, lease_owner = NULL, \
             lease_until = NULL, finished_at = $6 \
             WHERE id = $7 AND lease_owner = $8 AND status = 'training'",
        )
        .bind(status.as_str())
        .bind(head)
        .bind(metrics)
        .bind(error)
        .bind(tokens)
        .bind(now_ms())
        .bind(id)
        .bind(owner)
        .execute(self.db.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A tenant's classifier, if it is ready: what classifying needs. `Err(status)` when
    /// it exists but is not ready.
    pub async fn trained(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Option<Result<Trained, Status>>, DbError> {
        let row = sqlx::query(
            "SELECT model, labels, status, head FROM classifiers WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let status = Status::parse(&r.try_get::<String, _>("status")?);
        let head: Option<String> = r.try_get("head")?;
        let (Status::Ready, Some(head)) = (status, head) else {
            return Ok(Some(Err(status)));
        };
        Ok(Some(Ok(Trained {
            model: r.try_get("model")?,
            labels: serde_json::from_str(&r.try_get::<String, _>("labels")?)
                .map_err(|e| decode("labels", e))?,
            head: serde_json::from_str(&head).map_err(|e| decode("head", e))?,
        })))
    }
}

/// JSON text of a value for a text column.
fn json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
