//! Usage records: one per served request, keyed by the gateway's request id.
//!
//! Owns: the ledger's idempotent insert and its reads. Must never: change a stored
//! record's quantities, or touch an invoiced record.
//!
//! The database enforces one record per request id: SQLite by the records' primary key;
//! Postgres, whose `usage_records` is partitioned by month of `started_at` (a partitioned
//! table's unique keys must include the partition key), by `usage_request_ids`, which
//! every insert goes through in the same statement. A replay may only resolve an
//! `unknown` delivery: Postgres in the insert's statement; SQLite inserts with
//! `DO NOTHING` and, only for a chunk that met stored ids, resolves deliveries with an
//! `UPDATE` per event (a `DO UPDATE` would put the frozen-record trigger into every
//! insert). Monthly partitions are made three months ahead; anything outside them lands
//! in a default partition, so no insert waits for one.

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

/// Whether the response reached its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Delivered,
    /// The client was gone before the response was handed over.
    Undelivered,
    /// The gateway stopped (crashed) before it knew: the request was in flight.
    Unknown,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Undelivered => "undelivered",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "delivered" => Some(Self::Delivered),
            "undelivered" => Some(Self::Undelivered),
            "unknown" => Some(Self::Unknown),
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
    /// Of `prompt_tokens`, those the worker read from its prefix cache.
    #[serde(default)]
    pub cached_tokens: i64,
    /// Set when the response came whole from the gateway's response cache: what a hit cost
    /// under the tenant's plan then, minor units per million hits.
    #[serde(default)]
    pub cache_hit_minor_per_mreq: Option<i64>,
    /// Milliseconds since the epoch.
    pub started_at: i64,
    pub finished_at: i64,
    pub status: UsageStatus,
    /// `Unknown` when appended to the spool means "the outcome follows".
    pub delivery: Delivery,
}

const COLUMNS: &str = "request_id, tenant_id, key_id, model, endpoint, prompt_tokens, \
                       completion_tokens, started_at, finished_at, status, delivery, \
                       cached_tokens, cache_hit_minor_per_mreq";

/// The SQL condition true of a batch line's usage record: batch lines' request ids are
/// `{batch}_req_{line}`, made by the gateway (an interactive call's is `req_...`, a
/// classifier's training `clf_...`). A literal, so other queries are built from it.
macro_rules! batch_line {
    () => {
        "request_id LIKE 'batch\\_%' ESCAPE '\\'"
    };
}
pub(crate) use batch_line;

/// 1 for a batch line's usage record, 0 for any other.
pub const BATCH_RECORD: &str = concat!("(CASE WHEN ", batch_line!(), " THEN 1 ELSE 0 END)");

/// Usage of one model over a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelTotals {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Of `prompt_tokens`, those read from a worker's prefix cache.
    pub cached_tokens: i64,
    /// Of `requests`, those served from the gateway's response cache.
    pub cache_hits: i64,
    /// Of `requests`, `prompt_tokens` and `completion_tokens`, those of batch lines.
    pub batch_requests: i64,
    pub batch_prompt_tokens: i64,
    pub batch_completion_tokens: i64,
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

    /// Whether the store is Postgres (many writers) rather than SQLite (one).
    pub fn is_postgres(&self) -> bool {
        self.db.is_postgres()
    }

    /// Records one event. Idempotent: a second event with the same request id changes
    /// nothing (beyond resolving an `unknown` delivery) and returns `false`.
    pub async fn record(&self, event: &UsageEvent) -> Result<bool, DbError> {
        Ok(self.record_batch(std::slice::from_ref(event)).await? == 1)
    }

    /// Records a batch in one transaction; returns how many rows were inserted or had an
    /// `unknown` delivery resolved. Quantities of an existing record never change.
    pub async fn record_batch(&self, events: &[UsageEvent]) -> Result<u64, DbError> {
        if events.is_empty() {
            return Ok(0);
        }
        if let Some(pg) = self.db.postgres() {
            return record_batch_postgres(pg, events).await;
        }
        // SQLite: one transaction (one commit) of multi-row inserts with anonymous `?`
        // parameters, bound by position. (Named or numbered ones are looked up by name, a
        // scan that makes a many-row statement cost the square of its parameters; rows as
        // one JSON parameter expanded by `json_each` re-parse each row once per column.)
        //
        // Statements come in a few fixed sizes, kept prepared on the connection, so an
        // insert of a thousand rows is not parsed again for every batch. The
        // shipper's handle on an SQLite file binds through the native driver (see
        // `Db::sqlite`); others, an in-memory store among them, through `Any`.
        match self.db.sqlite() {
            Some(lite) => sqlite_record_batch!(lite, events, sqlx::Sqlite),
            None => sqlite_record_batch!(self.db.pool(), events, sqlx::Any),
        }
    }

    /// A tenant's totals per model for records started in `[from_ms, to_ms)`.
    pub async fn totals_by_model(
        &self,
        tenant_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<ModelTotals>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT model, COUNT(*) AS requests, \
                    CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
                    CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion_tokens, \
                    CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached_tokens, \
                    CAST(COALESCE(SUM(CASE WHEN cache_hit_minor_per_mreq IS NULL \
                                      THEN 0 ELSE 1 END), 0) AS BIGINT) AS cache_hits, \
                    CAST(COALESCE(SUM({BATCH_RECORD}), 0) AS BIGINT) AS batch_requests, \
                    CAST(COALESCE(SUM({BATCH_RECORD} * prompt_tokens), 0) AS BIGINT) AS batch_prompt, \
                    CAST(COALESCE(SUM({BATCH_RECORD} * completion_tokens), 0) AS BIGINT) AS batch_completion \
             FROM usage_records \
             WHERE tenant_id = $1 AND started_at >= $2 AND started_at < $3 \
             GROUP BY model ORDER BY model"
        ))
        .bind(tenant_id)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ModelTotals {
                    model: r.try_get("model")?,
                    requests: r.try_get("requests")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    cached_tokens: r.try_get("cached_tokens")?,
                    cache_hits: r.try_get("cache_hits")?,
                    batch_requests: r.try_get("batch_requests")?,
                    batch_prompt_tokens: r.try_get("batch_prompt")?,
                    batch_completion_tokens: r.try_get("batch_completion")?,
                })
            })
            .collect()
    }

    /// The record for a request id, if any.
    pub async fn get(&self, request_id: &str) -> Result<Option<UsageEvent>, DbError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM usage_records WHERE request_id = $1"
        ))
        .bind(request_id)
        .fetch_optional(self.db.pool())
        .await?;
        row.map(|r| from_row(&r)).transpose()
    }

    /// Every record of a tenant, oldest first.
    pub async fn for_tenant(&self, tenant_id: &str) -> Result<Vec<UsageEvent>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM usage_records WHERE tenant_id = $1 ORDER BY started_at, request_id"
        ))
        .bind(tenant_id)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(from_row).collect()
    }
}

/// Postgres: the whole batch in one statement, each column bound as one array.
async fn record_batch_postgres(pg: &sqlx::PgPool, events: &[UsageEvent]) -> Result<u64, DbError> {
    // Postgres refuses to upsert one key twice in a statement: keep each request id once,
    // its latest event (a later one may carry a resolved delivery).
    let mut latest: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, e) in events.iter().enumerate() {
        latest.insert(&e.request_id, i);
    }
    let mut keep: Vec<usize> = latest.into_values().collect();
    keep.sort_unstable();
    let unique: Vec<&UsageEvent> = keep.into_iter().map(|i| &events[i]).collect();
    let events = unique.as_slice();
    let text = |f: fn(&UsageEvent) -> &str| {
        events
            .iter()
            .map(|e| f(e).to_owned())
            .collect::<Vec<String>>()
    };
    let int = |f: fn(&UsageEvent) -> i64| events.iter().map(|e| f(e)).collect::<Vec<i64>>();
    let hit_rates: Vec<Option<i64>> = events.iter().map(|e| e.cache_hit_minor_per_mreq).collect();
    // Request ids are unique forever through `usage_request_ids` (the records' table is
    // partitioned by time, so it cannot hold that constraint itself). New ids get their
    // record; a replayed id may only resolve an `unknown` delivery of a record not yet
    // invoiced, found through its partition key.
    let sql = "WITH input AS ( \
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::text[], $11::text[], \
                                $12::int8[], $13::int8[]) \
           AS t(request_id, tenant_id, key_id, model, endpoint, prompt_tokens, completion_tokens, \
                started_at, finished_at, status, delivery, cached_tokens, cache_hit_minor_per_mreq)), \
         new_ids AS ( \
           INSERT INTO usage_request_ids (request_id, started_at) \
           SELECT request_id, started_at FROM input ON CONFLICT (request_id) DO NOTHING \
           RETURNING request_id), \
         inserted AS ( \
           INSERT INTO usage_records (request_id, tenant_id, key_id, model, endpoint, prompt_tokens, \
                                      completion_tokens, started_at, finished_at, status, delivery, \
                                      cached_tokens, cache_hit_minor_per_mreq) \
           SELECT i.* FROM input i JOIN new_ids n USING (request_id) RETURNING 1), \
         resolved AS ( \
           UPDATE usage_records u SET delivery = i.delivery \
           FROM input i JOIN usage_request_ids r USING (request_id) \
           WHERE u.request_id = i.request_id AND u.started_at = r.started_at \
             AND u.delivery = 'unknown' AND i.delivery <> 'unknown' AND u.invoice_id IS NULL \
             AND NOT EXISTS (SELECT 1 FROM new_ids n WHERE n.request_id = i.request_id) \
           RETURNING 1) \
         SELECT (SELECT COUNT(*) FROM inserted) + (SELECT COUNT(*) FROM resolved) AS affected";
    let affected: i64 = sqlx::query_scalar(sql)
        .bind(text(|e| &e.request_id))
        .bind(text(|e| &e.tenant_id))
        .bind(text(|e| &e.key_id))
        .bind(text(|e| &e.model))
        .bind(text(|e| &e.endpoint))
        .bind(int(|e| e.prompt_tokens))
        .bind(int(|e| e.completion_tokens))
        .bind(int(|e| e.started_at))
        .bind(int(|e| e.finished_at))
        .bind(text(|e| e.status.as_str()))
        .bind(text(|e| e.delivery.as_str()))
        .bind(int(|e| e.cached_tokens))
        .bind(hit_rates)
        .fetch_one(pg)
        .await?;
    Ok(affected as u64)
}

/// An SQLite insert of `rows` rows, bound by position.
fn sqlite_insert_sql(rows: usize) -> String {
    let mut sql = format!("INSERT INTO usage_records ({COLUMNS}) VALUES ");
    for i in 0..rows {
        sql.push_str(if i == 0 { "(" } else { ",(" });
        sql.push_str("?,?,?,?,?,?,?,?,?,?,?,?,?)");
    }
    sql.push(' ');
    sql.push_str(SQLITE_SKIP_STORED);
    sql
}

/// Splits a batch into SQLite inserts: as many of the largest prepared size as fit, then
/// the next size down; each chunk comes with its index into [`SQLITE_INSERT_SIZES`], or
/// `None` for the few left over.
fn sqlite_chunks(events: &[UsageEvent]) -> impl Iterator<Item = (Option<usize>, &[UsageEvent])> {
    let mut rest = events;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = SQLITE_INSERT_SIZES
            .iter()
            .position(|&rows| rows <= rest.len());
        let rows = size.map_or(rest.len(), |size| SQLITE_INSERT_SIZES[size]);
        let (chunk, tail) = rest.split_at(rows);
        rest = tail;
        Some((size, chunk))
    })
}

/// The SQL of an SQLite insert of a chunk from [`sqlite_chunks`]: for a prepared size,
/// built once per process (the connection keeps the statement prepared); for the few left
/// over, built for this once.
fn sqlite_insert_sql_for(size: Option<usize>, rows: usize) -> std::borrow::Cow<'static, str> {
    static SQL: [std::sync::OnceLock<String>; SQLITE_INSERT_SIZES.len()] =
        [const { std::sync::OnceLock::new() }; SQLITE_INSERT_SIZES.len()];
    match size {
        Some(size) => SQL[size]
            .get_or_init(|| sqlite_insert_sql(SQLITE_INSERT_SIZES[size]))
            .as_str()
            .into(),
        None => sqlite_insert_sql(rows).into(),
    }
}

/// Records `events` on SQLite through `$pool` of driver `$db` (the native one, or `Any`)
/// in one transaction, as inserts from [`sqlite_chunks`], bound by position; evaluates to
/// the rows inserted or resolved. A macro because the two drivers' queries share no trait
/// to bind through.
///
/// The inserts skip request ids already stored (`DO NOTHING`). Only a chunk that skipped
/// some is followed by [`SQLITE_RESOLVE`] for each of its events with a known delivery,
/// which resolves a stored `unknown` one. (Not an upsert: with `DO UPDATE` SQLite builds
/// the frozen-record trigger of `usage_records` into every insert's program, paid on every
/// call for the rare replay.)
macro_rules! sqlite_record_batch {
    ($pool:expr, $events:expr, $db:ty) => {{
        let mut tx = $pool.begin().await?;
        let mut affected = 0;
        for (size, chunk) in sqlite_chunks($events) {
            let sql = sqlite_insert_sql_for(size, chunk.len());
            let mut query = sqlx::query::<$db>(&sql).persistent(size.is_some());
            for e in chunk {
                query = query
                    .bind(e.request_id.as_str())
                    .bind(e.tenant_id.as_str())
                    .bind(e.key_id.as_str())
                    .bind(e.model.as_str())
                    .bind(e.endpoint.as_str())
                    .bind(e.prompt_tokens)
                    .bind(e.completion_tokens)
                    .bind(e.started_at)
                    .bind(e.finished_at)
                    .bind(e.status.as_str())
                    .bind(e.delivery.as_str())
                    .bind(e.cached_tokens)
                    .bind(e.cache_hit_minor_per_mreq);
            }
            let inserted = query.execute(&mut *tx).await?.rows_affected();
            affected += inserted;
            if inserted < chunk.len() as u64 {
                for e in chunk.iter().filter(|e| e.delivery != Delivery::Unknown) {
                    affected += sqlx::query::<$db>(SQLITE_RESOLVE)
                        .bind(e.delivery.as_str())
                        .bind(e.request_id.as_str())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
            }
        }
        tx.commit().await?;
        Ok(affected)
    }};
}
use sqlite_record_batch;

/// Rows per prepared SQLite insert, largest first: a batch is split into as many of the
/// largest as fit, then the next size down; fewer than the smallest go as one statement
/// parsed once. The largest binds 13,000 parameters, below SQLite's 32,766.
const SQLITE_INSERT_SIZES: [usize; 3] = [1_000, 100, 10];

/// SQLite's inserts skip request ids already stored, so a replay never changes a record;
/// [`SQLITE_RESOLVE`] is the one change a replayed id may make.
const SQLITE_SKIP_STORED: &str = "ON CONFLICT (request_id) DO NOTHING";

/// Resolves a stored record's `unknown` delivery (`$1`, for request id `$2`), unless the
/// record is on a finalised invoice.
const SQLITE_RESOLVE: &str = "UPDATE usage_records SET delivery = $1 \
                              WHERE request_id = $2 AND delivery = 'unknown' AND invoice_id IS NULL";

fn from_row(row: &sqlx::any::AnyRow) -> Result<UsageEvent, DbError> {
    let status: String = row.try_get("status")?;
    let delivery: String = row.try_get("delivery")?;
    Ok(UsageEvent {
        request_id: row.try_get("request_id")?,
        tenant_id: row.try_get("tenant_id")?,
        key_id: row.try_get("key_id")?,
        model: row.try_get("model")?,
        endpoint: row.try_get("endpoint")?,
        prompt_tokens: row.try_get("prompt_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
        cached_tokens: row.try_get("cached_tokens")?,
        cache_hit_minor_per_mreq: row.try_get("cache_hit_minor_per_mreq")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        status: UsageStatus::parse(&status).ok_or_else(|| {
            DbError::Sqlx(sqlx::Error::Decode(
                format!("unknown usage status `{status}`").into(),
            ))
        })?,
        delivery: Delivery::parse(&delivery).ok_or_else(|| {
            DbError::Sqlx(sqlx::Error::Decode(
                format!("unknown delivery `{delivery}`").into(),
            ))
        })?,
    })
}
