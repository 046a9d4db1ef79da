//! Usage over time and leader boards, for the operator dashboard and the admin API.
//!
//! Owns: aggregating usage records into hour or day buckets (UTC) and into top-N lists by
//! tenant, key or model, each with what it cost. Spend follows the invoices' rules: only
//! delivered records are billed, each piece is priced with the version in force when its
//! calls started, exactly, in millionths of a minor unit. Rounding to minor units happens
//! once, on an invoice line; these figures stay exact so they add up to the invoices.
//! Tiered prices are graduated over a tenant's month under one version, as on an invoice
//! line: each bucket's tokens cost the rates of the tiers their positions fall in, in time
//! order (a bucket shared by several keys of one tenant takes them in key order).
//! Cached prompt tokens and response-cache hits are counted apart and priced as invoices
//! price them.
//! Must never: write anything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::invoices::{boundaries, segment_sql};
use crate::period::{period_bounds, period_of};
use crate::prices::{cache_hit_cost, PriceBook, Tokens};
use crate::usage::BATCH_RECORD;
use crate::{Db, DbError};

/// Width of a time bucket. Buckets start at UTC hour or midnight boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    pub fn millis(self) -> i64 {
        match self {
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
        }
    }
}

/// A dimension usage can be broken down by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Tenant,
    Key,
    Model,
    /// `batch` (lines of batches) or `interactive` (see [`BATCH_RECORD`]).
    Batch,
}

impl Dimension {
    fn column(self) -> &'static str {
        match self {
            Self::Tenant => "tenant_id",
            Self::Key => "key_id",
            Self::Model => "model",
            Self::Batch => concat!(
                "(CASE WHEN ",
                crate::usage::batch_line!(),
                " THEN 'batch' ELSE 'interactive' END)"
            ),
        }
    }
}

/// Which records to count: started in `[from_ms, to_ms)`, optionally one tenant, key, model.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub tenant_id: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// Usage in one bucket (and one group, when broken down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// Bucket start, Unix ms.
    pub start_ms: i64,
    /// The tenant, key or model id when broken down by one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Every record, billed or not.
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Of `prompt_tokens`, those read from a worker's prefix cache.
    pub cached_tokens: i64,
    /// Of `requests`, those served from the gateway's response cache.
    pub cache_hits: i64,
    /// Records not billed (undelivered or delivery unknown).
    pub unbilled_requests: i64,
    /// Exact cost of the billed records, millionths of a minor unit.
    pub spend_micros: i64,
}

/// One entry of a leader board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopEntry {
    pub id: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cache_hits: i64,
    pub spend_micros: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    #[error("`from` must be before `to`")]
    EmptyRange,
    #[error(
        "{0} buckets is too many (at most {MAX_BUCKETS}); use a wider bucket or a shorter range"
    )]
    TooManyBuckets(i64),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for SeriesError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

/// The most buckets one series may have (a year of hours fits).
pub const MAX_BUCKETS: i64 = 9_000;

/// Usage per bucket, oldest first, optionally broken down by a dimension. Buckets with no
/// usage are left out.
pub async fn usage_series(
    db: &Db,
    filter: &UsageFilter,
    bucket: Bucket,
    group_by: Option<Dimension>,
) -> Result<Vec<Point>, SeriesError> {
    if filter.to_ms <= filter.from_ms {
        return Err(SeriesError::EmptyRange);
    }
    let width = bucket.millis();
    let buckets = (filter.to_ms - filter.from_ms + width - 1) / width;
    if buckets > MAX_BUCKETS {
        return Err(SeriesError::TooManyBuckets(buckets));
    }
    let rows = aggregate(db, filter, Some(width), group_by).await?;
    let mut points: BTreeMap<(i64, Option<String>), Point> = BTreeMap::new();
    for r in rows {
        let p = points
            .entry((r.bucket, r.group.clone()))
            .or_insert_with(|| Point {
                start_ms: r.bucket,
                group: r.group.clone(),
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
                cache_hits: 0,
                unbilled_requests: 0,
                spend_micros: 0,
            });
        p.requests += r.requests;
        p.prompt_tokens += r.prompt_tokens;
        p.completion_tokens += r.completion_tokens;
        p.cached_tokens += r.cached_tokens;
        p.cache_hits += r.cache_hits;
        p.unbilled_requests += r.unbilled_requests;
        p.spend_micros = p.spend_micros.saturating_add(r.spend_micros);
    }
    Ok(points.into_values().collect())
}

/// The `limit` biggest tenants, keys or models by spend, then tokens.
pub async fn top(
    db: &Db,
    filter: &UsageFilter,
    by: Dimension,
    limit: usize,
) -> Result<Vec<TopEntry>, SeriesError> {
    if filter.to_ms <= filter.from_ms {
        return Err(SeriesError::EmptyRange);
    }
    let rows = aggregate(db, filter, None, Some(by)).await?;
    let mut entries: BTreeMap<String, TopEntry> = BTreeMap::new();
    for r in rows {
        let id = r.group.unwrap_or_default();
        let e = entries.entry(id.clone()).or_insert_with(|| TopEntry {
            id,
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            cache_hits: 0,
            spend_micros: 0,
        });
        e.requests += r.requests;
        e.prompt_tokens += r.prompt_tokens;
        e.completion_tokens += r.completion_tokens;
        e.cached_tokens += r.cached_tokens;
        e.cache_hits += r.cache_hits;
        e.spend_micros = e.spend_micros.saturating_add(r.spend_micros);
    }
    let mut entries: Vec<TopEntry> = entries.into_values().collect();
    entries.sort_by(|a, b| {
        (b.spend_micros, b.prompt_tokens + b.completion_tokens, &a.id).cmp(&(
            a.spend_micros,
            a.prompt_tokens + a.completion_tokens,
            &b.id,
        ))
    });
    entries.truncate(limit);
    Ok(entries)
}

/// One priced piece: a bucket × group, summed over models and price versions.
struct Piece {
    bucket: i64,
    group: Option<String>,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cached_tokens: i64,
    cache_hits: i64,
    unbilled_requests: i64,
    spend_micros: i64,
}

impl Piece {
    fn counted(q: &Quantities, spend: i64) -> Self {
        Self {
            bucket: 0,
            group: None,
            requests: q.tokens.requests,
            prompt_tokens: q.tokens.input,
            completion_tokens: q.tokens.output,
            cached_tokens: q.tokens.cached_input,
            cache_hits: if q.hit_rate.is_some() {
                q.tokens.requests
            } else {
                0
            },
            unbilled_requests: 0,
            spend_micros: spend,
        }
    }
}

/// The summed quantities of one aggregate row, and its cache-hit rate if it holds hits.
struct Quantities {
    tokens: Tokens,
    hit_rate: Option<i64>,
    /// Batch lines, charged at their version's batch discount as on invoices.
    batch: bool,
}

impl Quantities {
    /// The charge of these tokens after `before` of the same line's volume.
    fn charge(&self, p: &crate::Price, before: (i64, i64)) -> crate::prices::Micros {
        let charge = p.charge(before, &self.tokens);
        match self.batch {
            true => p.batch_charge(charge),
            false => charge,
        }
    }

    fn read(r: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            tokens: Tokens {
                requests: r.try_get("requests")?,
                input: r.try_get("prompt_tokens")?,
                cached_input: r.try_get("cached_tokens")?,
                output: r.try_get("completion_tokens")?,
            },
            hit_rate: r.try_get("hit_rate")?,
            batch: r.try_get::<i64, _>("batch")? != 0,
        })
    }
}

/// The columns every aggregate row sums, and its cache-hit rate (grouped by).
const SUMS: &str = "COUNT(*) AS requests, \
     CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
     CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion_tokens, \
     CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached_tokens, \
     cache_hit_minor_per_mreq AS hit_rate";

/// Groups records by bucket, group, model, price segment and delivery in SQL, then prices
/// each group with the one price version in force throughout it.
async fn aggregate(
    db: &Db,
    filter: &UsageFilter,
    bucket_ms: Option<i64>,
    group_by: Option<Dimension>,
) -> Result<Vec<Piece>, SeriesError> {
    let book = &PriceBook::load(db).await?;
    if book.all().any(|p| !p.tiers.is_empty()) {
        return aggregate_tiered(db, filter, bucket_ms, group_by, book).await;
    }
    let cuts = boundaries(book, filter.from_ms, filter.to_ms);

    // Parameters: $1 from, $2 to, then the optional filters, then the cuts.
    let mut conditions = vec!["started_at >= $1".to_owned(), "started_at < $2".to_owned()];
    let mut next = 3;
    let mut texts: Vec<&str> = Vec::new();
    for (column, value) in [
        ("tenant_id", &filter.tenant_id),
        ("key_id", &filter.key_id),
        ("model", &filter.model),
    ] {
        if let Some(v) = value {
            conditions.push(format!("{column} = ${next}"));
            texts.push(v);
            next += 1;
        }
    }
    let segment = segment_sql(next, cuts.len());
    // Bucket widths are our constants, never input.
    let bucket = bucket_ms.map_or_else(|| "0".to_owned(), |w| format!("(started_at / {w}) * {w}"));
    let group = group_by.map_or("''", Dimension::column);
    let sql = format!(
        "SELECT CAST({bucket} AS BIGINT) AS bucket, {group} AS grp, model, \
         CAST({segment} AS BIGINT) AS segment, \
         CAST(CASE WHEN delivery = 'delivered' THEN 1 ELSE 0 END AS BIGINT) AS billed, {SUMS}, \
         CAST({BATCH_RECORD} AS BIGINT) AS batch \
         FROM usage_records WHERE {} GROUP BY 1, 2, 3, 4, 5, cache_hit_minor_per_mreq, {BATCH_RECORD}",
        conditions.join(" AND ")
    );
    let mut query = sqlx::query(&sql).bind(filter.from_ms).bind(filter.to_ms);
    for t in texts {
        query = query.bind(t);
    }
    for c in &cuts {
        query = query.bind(*c);
    }
    let rows = query.fetch_all(db.pool()).await?;
    let mut pieces = Vec::with_capacity(rows.len());
    for r in rows {
        let bucket: i64 = r.try_get("bucket")?;
        let model: String = r.try_get("model")?;
        let segment = r.try_get::<i64, _>("segment")? as usize;
        let billed = r.try_get::<i64, _>("billed")? != 0;
        let q = Quantities::read(&r)?;
        // Any instant inside both the bucket and the segment has the group's price.
        let segment_start = if segment == 0 {
            filter.from_ms
        } else {
            cuts[segment - 1]
        };
        let at = segment_start.max(bucket).max(filter.from_ms);
        let spend_micros = match (billed, q.hit_rate) {
            (false, _) => 0,
            (true, Some(rate)) => cache_hit_cost(q.tokens.requests, rate).0,
            (true, None) => book.at(&model, at).map_or(0, |p| q.charge(p, (0, 0)).0),
        };
        pieces.push(Piece {
            bucket: if bucket_ms.is_some() { bucket } else { 0 },
            group: group_by.map(|_| r.try_get("grp")).transpose()?,
            unbilled_requests: if billed { 0 } else { q.tokens.requests },
            ..Piece::counted(&q, spend_micros)
        });
    }
    Ok(pieces)
}

/// The tiered form of [`aggregate`]: reads the tenant's whole volume from the start of the
/// month of `from` (tiers depend on it, whatever the filters), prices each piece after the
/// volume before it in its (tenant, model, month, version), then applies the filters.
async fn aggregate_tiered(
    db: &Db,
    filter: &UsageFilter,
    bucket_ms: Option<i64>,
    group_by: Option<Dimension>,
    book: &PriceBook,
) -> Result<Vec<Piece>, SeriesError> {
    // period_of always names a valid month; the fallback is never taken.
    let month_start = period_bounds(&period_of(filter.from_ms)).map_or(filter.from_ms, |b| b.0);
    let scan_from = month_start.min(filter.from_ms);
    // Segments never cross a price version's start or a month's start.
    let cuts = boundaries(book, scan_from, filter.to_ms);
    // Hour buckets order the volume when the caller wants no buckets.
    let width = bucket_ms.unwrap_or(3_600_000);
    let tenant_filter = if filter.tenant_id.is_some() {
        "AND tenant_id = $4 "
    } else {
        ""
    };
    let first_cut = if filter.tenant_id.is_some() { 5 } else { 4 };
    let segment = segment_sql(first_cut, cuts.len());
    let group = group_by.map_or("''", Dimension::column);
    let sql = format!(
        "SELECT CAST((started_at / {width}) * {width} AS BIGINT) AS bucket, \
         CAST(CASE WHEN started_at < $3 THEN 1 ELSE 0 END AS BIGINT) AS before, \
         tenant_id, key_id, {group} AS grp, model, CAST({segment} AS BIGINT) AS segment, \
         CAST(CASE WHEN delivery = 'delivered' THEN 1 ELSE 0 END AS BIGINT) AS billed, {SUMS}, \
         CAST({BATCH_RECORD} AS BIGINT) AS batch \
         FROM usage_records WHERE started_at >= $1 AND started_at < $2 {tenant_filter}\
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, cache_hit_minor_per_mreq, {BATCH_RECORD} \
         ORDER BY 1, 2 DESC, 3, 4, 6, 7, cache_hit_minor_per_mreq, {BATCH_RECORD}"
    );
    let mut query = sqlx::query(&sql)
        .bind(scan_from)
        .bind(filter.to_ms)
        .bind(filter.from_ms);
    if let Some(t) = &filter.tenant_id {
        query = query.bind(t);
    }
    for c in &cuts {
        query = query.bind(*c);
    }
    let rows = query.fetch_all(db.pool()).await?;
    // Billed tokens so far per (tenant, model, segment): where the next piece starts.
    let mut volume: std::collections::HashMap<(String, String, i64, bool), (i64, i64)> =
        Default::default();
    let mut pieces = Vec::new();
    for r in rows {
        let bucket: i64 = r.try_get("bucket")?;
        let before = r.try_get::<i64, _>("before")? != 0;
        let tenant: String = r.try_get("tenant_id")?;
        let key: String = r.try_get("key_id")?;
        let model: String = r.try_get("model")?;
        let segment: i64 = r.try_get("segment")?;
        let billed = r.try_get::<i64, _>("billed")? != 0;
        let q = Quantities::read(&r)?;
        let segment_start = if segment == 0 {
            scan_from
        } else {
            cuts[segment as usize - 1]
        };
        let mut spend_micros = 0;
        if let (true, Some(rate)) = (billed, q.hit_rate) {
            // Hits are priced per hit and climb no tiers.
            spend_micros = cache_hit_cost(q.tokens.requests, rate).0;
        } else if billed {
            let at = segment_start.max(bucket);
            // Batch lines climb their own tiers, as they are invoiced on lines of their own.
            let done = volume
                .entry((tenant.clone(), model.clone(), segment, q.batch))
                .or_default();
            if let Some(p) = book.at(&model, at) {
                spend_micros = q.charge(p, *done).0;
                let (input, output) = p.volume(&q.tokens);
                done.0 += input;
                done.1 += output;
            }
        }
        let wanted = !before
            && filter.key_id.as_ref().is_none_or(|k| *k == key)
            && filter.model.as_ref().is_none_or(|m| *m == model);
        if !wanted {
            continue;
        }
        pieces.push(Piece {
            bucket: if bucket_ms.is_some() { bucket } else { 0 },
            group: group_by.map(|_| r.try_get("grp")).transpose()?,
            unbilled_requests: if billed { 0 } else { q.tokens.requests },
            ..Piece::counted(&q, spend_micros)
        });
    }
    Ok(pieces)
}
