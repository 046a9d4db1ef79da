//! Invoices: one per tenant per calendar month (UTC), computed from usage records and the
//! price book.
//!
//! A draft is computed on demand from the tenant's records not yet on any invoice, started
//! before the period's end. Finalising marks exactly those records with the invoice's id,
//! computes the invoice from the marked records and stores it, in one transaction; the
//! stored invoice is never changed again (the schema refuses updates and deletes). Usage
//! of a finalised month that reaches the store later is not on any invoice yet, so it goes
//! on the next one finalised, as adjustment lines naming the month it belongs to.
//!
//! What is billed: records whose response was delivered (streams cut short are billed for
//! what was delivered). Records marked `undelivered` (the client was gone) or `unknown`
//! (in flight when a gateway died) are counted on the invoice as rejected, with that
//! reason, and cost nothing: records = billed + rejected (SPEC §6.5).
//!
//! Prompt tokens a worker read from its prefix cache are counted on their line apart
//! (`cached_input_tokens`, of `input_tokens`) and priced at the version's cached-input rate
//! when it has one. Responses served from the gateway's response cache go on lines of their
//! own, one per cache-hit rate, each hit priced at that rate instead of by its tokens.
//!
//! Money: each line's exact cost in millionths of a minor unit is rounded once, half to
//! even, to whole minor units; the total is the sum of the rounded lines, so lines always
//! add up to the total.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::period::{self, period_of, BadPeriod};
use crate::prices::{cache_hit_cost, Micros, PriceBook, Tokens};
use crate::usage::BATCH_RECORD;
use crate::{Db, DbError};

/// Whether a line bills the invoice's own month or late usage of an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    Usage,
    Adjustment,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLine {
    pub kind: LineKind,
    /// The month the usage happened in.
    pub usage_period: String,
    pub model: String,
    /// The price version applied (its `effective_from`); `None`: the model had no price.
    pub price_effective_from: Option<i64>,
    pub input_minor_per_mtok: i64,
    pub output_minor_per_mtok: i64,
    pub request_minor_per_mreq: i64,
    /// The version's rate of cached prompt tokens; absent: they cost the input rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_minor_per_mtok: Option<i64>,
    /// Set on a line of responses served from the response cache: each costs this many
    /// minor units per million, whatever its tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit_minor_per_mreq: Option<i64>,
    /// A line of batch requests, priced apart: the version's discount off its charge.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batch: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_discount_pct: Option<i64>,
    /// The version's volume tiers, graduated over this line's tokens; absent: flat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<crate::prices::Tier>,
    pub requests: i64,
    pub input_tokens: i64,
    /// Of `input_tokens`, those read from a worker's prefix cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    /// Exact cost, millionths of a minor unit.
    pub amount_micros: i64,
    /// `amount_micros` rounded half to even: the billed amount.
    pub amount_minor: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Records counted but not billed, by reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The month the usage happened in.
    pub usage_period: String,
    pub reason: String,
    pub records: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceStatus {
    Draft,
    Final,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// `None` for a draft.
    pub id: Option<String>,
    pub tenant_id: String,
    pub period: String,
    pub status: InvoiceStatus,
    pub currency: String,
    pub lines: Vec<InvoiceLine>,
    pub rejected: Vec<Rejected>,
    /// Every record counted here: billed lines' requests plus rejected records.
    pub records: i64,
    pub total_minor: i64,
}

impl Invoice {
    /// The invoice as stored: canonical JSON (fields in declaration order, lines sorted).
    pub fn document(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    #[error("`{0}` is not a period: use YYYY-MM")]
    BadPeriod(String),
    #[error("the invoice of {tenant} for {period} is already finalised")]
    AlreadyFinal { tenant: String, period: String },
    #[error("{0} has not ended yet; only past months can be finalised")]
    NotEnded(String),
    #[error("prices of this usage are in more than one currency ({0})")]
    MixedCurrency(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for InvoiceError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

impl From<BadPeriod> for InvoiceError {
    fn from(e: BadPeriod) -> Self {
        Self::BadPeriod(e.0)
    }
}

/// [`period::period_bounds`], failing with an [`InvoiceError`] for callers that report those.
pub fn period_bounds(period: &str) -> Result<(i64, i64), InvoiceError> {
    Ok(period::period_bounds(period)?)
}

/// Which records an invoice is computed from.
enum Selection<'a> {
    /// Not yet invoiced, started before `end_ms`.
    Open { tenant_id: &'a str, end_ms: i64 },
    /// Marked with this invoice id.
    Invoiced(&'a str),
}

/// One aggregate row: records of one model in one segment of time with one delivery.
struct Aggregate {
    model: String,
    segment: usize,
    delivery: String,
    requests: i64,
    input: i64,
    cached: i64,
    output: i64,
    /// Set for responses served from the response cache (see [`InvoiceLine`]).
    hit_rate: Option<i64>,
    /// Lines of batches (see [`BATCH_RECORD`]).
    batch: bool,
}

/// Time boundaries that split usage so that each piece has one price version and one month:
/// every price version's start and every month start in `[from, to)`.
pub(crate) fn boundaries(book: &PriceBook, from_ms: i64, to_ms: i64) -> Vec<i64> {
    let mut b: Vec<i64> = book
        .all()
        .map(|p| p.effective_from)
        .filter(|t| *t > from_ms && *t < to_ms)
        .collect();
    let mut t = from_ms;
    while let Some(end) = period::next_period_start(t) {
        if end >= to_ms {
            break;
        }
        b.push(end);
        t = end;
    }
    b.sort_unstable();
    b.dedup();
    b
}

/// SQL for a record's segment: how many of `cuts` cuts, bound as parameters from
/// `$first_param` on, are at or before its `started_at`.
pub(crate) fn segment_sql(first_param: usize, cuts: usize) -> String {
    let mut segment = String::from("0");
    for i in 0..cuts {
        segment.push_str(&format!(
            " + CASE WHEN started_at >= ${} THEN 1 ELSE 0 END",
            first_param + i
        ));
    }
    segment
}

async fn aggregate(
    conn: &mut sqlx::AnyConnection,
    selection: &Selection<'_>,
    cuts: &[i64],
) -> Result<Vec<Aggregate>, sqlx::Error> {
    // segment = how many cuts are at or before started_at.
    let (filter, first_cut) = match selection {
        Selection::Open { .. } => (
            "tenant_id = $1 AND invoice_id IS NULL AND started_at < $2",
            3,
        ),
        Selection::Invoiced(_) => ("invoice_id = $1", 2),
    };
    let segment = segment_sql(first_cut, cuts.len());
    let sql = format!(
        "SELECT model, CAST({segment} AS BIGINT) AS segment, delivery, COUNT(*) AS requests, \
         CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS input, \
         CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS output, \
         CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached, \
         cache_hit_minor_per_mreq AS hit_rate, CAST({BATCH_RECORD} AS BIGINT) AS batch \
         FROM usage_records WHERE {filter} GROUP BY 1, 2, 3, cache_hit_minor_per_mreq, {BATCH_RECORD}"
    );
    let mut query = sqlx::query(&sql);
    query = match selection {
        Selection::Open { tenant_id, end_ms } => query.bind(*tenant_id).bind(*end_ms),
        Selection::Invoiced(id) => query.bind(*id),
    };
    for cut in cuts {
        query = query.bind(*cut);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| {
            Ok(Aggregate {
                model: r.try_get("model")?,
                segment: r.try_get::<i64, _>("segment")? as usize,
                delivery: r.try_get("delivery")?,
                requests: r.try_get("requests")?,
                input: r.try_get("input")?,
                cached: r.try_get("cached")?,
                output: r.try_get("output")?,
                hit_rate: r.try_get("hit_rate")?,
                batch: r.try_get::<i64, _>("batch")? == 1,
            })
        })
        .collect()
}

/// Prices aggregates into an invoice for `period`.
/// How usage was split in time: the invoice period's start, the earliest usage, the cuts.
struct Segments<'a> {
    period_start: i64,
    earliest: i64,
    cuts: &'a [i64],
}

fn build(
    tenant_id: &str,
    period: &str,
    segments: &Segments<'_>,
    aggregates: Vec<Aggregate>,
    book: &PriceBook,
    default_currency: &str,
) -> Result<Invoice, InvoiceError> {
    type LineKey = (LineKind, String, String, Option<i64>, Option<i64>, bool);
    let mut lines: BTreeMap<LineKey, InvoiceLine> = BTreeMap::new();
    let mut rejected: BTreeMap<(String, String), Rejected> = BTreeMap::new();
    let mut currencies: std::collections::BTreeSet<String> = Default::default();
    let Segments {
        period_start,
        earliest,
        cuts,
    } = *segments;
    let mut records = 0;
    for a in aggregates {
        records += a.requests;
        // Any instant inside the segment identifies its month and price version.
        let at = if a.segment == 0 {
            earliest
        } else {
            cuts[a.segment - 1]
        };
        if a.delivery != "delivered" {
            let reason = if a.delivery == "undelivered" {
                "undelivered".to_owned()
            } else {
                "delivery_unknown".to_owned()
            };
            let usage_period = period_of(at);
            let r = rejected
                .entry((usage_period.clone(), reason.clone()))
                .or_insert(Rejected {
                    usage_period,
                    reason,
                    records: 0,
                    input_tokens: 0,
                    output_tokens: 0,
                });
            r.records += a.requests;
            r.input_tokens += a.input;
            r.output_tokens += a.output;
            continue;
        }
        let usage_period = period_of(at);
        let kind = if at >= period_start {
            LineKind::Usage
        } else {
            LineKind::Adjustment
        };
        let price = book.at(&a.model, at);
        if let Some(p) = price {
            currencies.insert(p.currency.clone());
        }
        let key = (
            kind,
            usage_period.clone(),
            a.model.clone(),
            price.map(|p| p.effective_from),
            a.hit_rate,
            a.batch,
        );
        let line = lines.entry(key).or_insert_with(|| InvoiceLine {
            kind,
            usage_period,
            model: a.model.clone(),
            price_effective_from: price.map(|p| p.effective_from),
            input_minor_per_mtok: price.map_or(0, |p| p.input_minor_per_mtok),
            output_minor_per_mtok: price.map_or(0, |p| p.output_minor_per_mtok),
            request_minor_per_mreq: price.map_or(0, |p| p.request_minor_per_mreq),
            cached_input_minor_per_mtok: price.and_then(|p| p.cached_input_minor_per_mtok),
            cache_hit_minor_per_mreq: a.hit_rate,
            batch: a.batch,
            batch_discount_pct: price.and_then(|p| p.batch_discount_pct).filter(|_| a.batch),
            tiers: price.map_or_else(Vec::new, |p| p.tiers.clone()),
            requests: 0,
            input_tokens: 0,
            cached_input_tokens: 0,
            output_tokens: 0,
            amount_micros: 0,
            amount_minor: 0,
        });
        line.requests += a.requests;
        line.input_tokens += a.input;
        line.cached_input_tokens += a.cached;
        line.output_tokens += a.output;
    }
    if currencies.len() > 1 {
        return Err(InvoiceError::MixedCurrency(
            currencies.into_iter().collect::<Vec<_>>().join(", "),
        ));
    }
    let mut lines: Vec<InvoiceLine> = lines.into_values().collect();
    for l in &mut lines {
        // Priced once per line, on its whole volume: tiers are graduated over the line.
        if let Some(rate) = l.cache_hit_minor_per_mreq {
            l.amount_micros = cache_hit_cost(l.requests, rate).0;
        } else if let Some(p) = l.price_effective_from.and_then(|t| book.at(&l.model, t)) {
            let usage = Tokens {
                requests: l.requests,
                input: l.input_tokens,
                cached_input: l.cached_input_tokens,
                output: l.output_tokens,
            };
            let charge = p.charge((0, 0), &usage);
            l.amount_micros = match l.batch {
                true => p.batch_charge(charge).0,
                false => charge.0,
            };
        }
        l.amount_minor = Micros(l.amount_micros).to_minor_half_even();
    }
    let total_minor = lines.iter().map(|l| l.amount_minor).sum();
    Ok(Invoice {
        id: None,
        tenant_id: tenant_id.to_owned(),
        period: period.to_owned(),
        status: InvoiceStatus::Draft,
        currency: currencies
            .into_iter()
            .next()
            .unwrap_or_else(|| default_currency.to_owned()),
        lines,
        rejected: rejected.into_values().collect(),
        records,
        total_minor,
    })
}

/// Invoices in the store.
#[derive(Clone, Debug)]
pub struct Invoices {
    db: Db,
    /// The currency of invoices with no priced usage.
    pub default_currency: String,
}

impl Invoices {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            default_currency: "USD".to_owned(),
        }
    }

    async fn earliest(
        conn: &mut sqlx::AnyConnection,
        selection: &Selection<'_>,
    ) -> Result<Option<i64>, sqlx::Error> {
        let query = match selection {
            Selection::Open { tenant_id, end_ms } => sqlx::query(
                "SELECT MIN(started_at) AS t FROM usage_records \
                 WHERE tenant_id = $1 AND invoice_id IS NULL AND started_at < $2",
            )
            .bind(*tenant_id)
            .bind(*end_ms),
            Selection::Invoiced(id) => {
                sqlx::query("SELECT MIN(started_at) AS t FROM usage_records WHERE invoice_id = $1")
                    .bind(*id)
            }
        };
        let row = query.fetch_one(&mut *conn).await?;
        row.try_get::<Option<i64>, _>("t")
    }

    async fn compute(
        &self,
        conn: &mut sqlx::AnyConnection,
        tenant_id: &str,
        period: &str,
        selection: Selection<'_>,
        book: &PriceBook,
    ) -> Result<Invoice, InvoiceError> {
        let (start, end) = period_bounds(period)?;
        let earliest = Self::earliest(conn, &selection).await?.unwrap_or(start);
        let cuts = boundaries(book, earliest, end);
        let aggregates = aggregate(conn, &selection, &cuts).await?;
        build(
            tenant_id,
            period,
            &Segments {
                period_start: start,
                earliest,
                cuts: &cuts,
            },
            aggregates,
            book,
            &self.default_currency,
        )
    }

    /// The draft of `tenant_id`'s invoice for `period`: its records not yet invoiced,
    /// started before the period's end, priced with the current book.
    pub async fn preview(&self, tenant_id: &str, period: &str) -> Result<Invoice, InvoiceError> {
        let (_, end_ms) = period_bounds(period)?;
        let book = PriceBook::load(&self.db).await?;
        let mut conn = self.db.pool().acquire().await.map_err(DbError::from)?;
        self.compute(
            &mut conn,
            tenant_id,
            period,
            Selection::Open { tenant_id, end_ms },
            &book,
        )
        .await
    }

    /// Finalises `period` (which must have ended) for `tenant_id`: marks the records,
    /// stores the invoice, and returns it. Never changes a finalised invoice.
    pub async fn finalise(&self, tenant_id: &str, period: &str) -> Result<Invoice, InvoiceError> {
        let (_, end_ms) = period_bounds(period)?;
        if end_ms > crate::now_ms() {
            return Err(InvoiceError::NotEnded(period.to_owned()));
        }
        let book = PriceBook::load(&self.db).await?;
        // One invoice per tenant and period, so the id is derived from both.
        let id = format!("inv_{}_{tenant_id}", period.replace('-', ""));
        let mut tx = self.db.begin_write().await.map_err(DbError::from)?;
        let exists = sqlx::query("SELECT id FROM invoices WHERE tenant_id = $1 AND period = $2")
            .bind(tenant_id)
            .bind(period)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(InvoiceError::AlreadyFinal {
                tenant: tenant_id.to_owned(),
                period: period.to_owned(),
            });
        }
        sqlx::query(
            "UPDATE usage_records SET invoice_id = $1 \
             WHERE tenant_id = $2 AND invoice_id IS NULL AND started_at < $3",
        )
        .bind(&id)
        .bind(tenant_id)
        .bind(end_ms)
        .execute(&mut *tx)
        .await?;
        let mut invoice = self
            .compute(&mut tx, tenant_id, period, Selection::Invoiced(&id), &book)
            .await?;
        invoice.id = Some(id.clone());
        invoice.status = InvoiceStatus::Final;
        sqlx::query(
            "INSERT INTO invoices (id, tenant_id, period, currency, total_minor, records, \
             document, finalised_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(tenant_id)
        .bind(period)
        .bind(&invoice.currency)
        .bind(invoice.total_minor)
        .bind(invoice.records)
        .bind(invoice.document())
        .bind(crate::now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(invoice)
    }

    /// A finalised invoice as stored (its canonical document).
    pub async fn get(&self, id: &str) -> Result<Option<Invoice>, InvoiceError> {
        let row = sqlx::query("SELECT document FROM invoices WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let doc: String = row.try_get("document")?;
        serde_json::from_str(&doc)
            .map(Some)
            .map_err(|e| InvoiceError::Db(DbError::Sqlx(sqlx::Error::Decode(e.into()))))
    }

    /// The stored document of a finalised invoice, byte for byte.
    pub async fn document(&self, id: &str) -> Result<Option<String>, InvoiceError> {
        let row = sqlx::query("SELECT document FROM invoices WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("document")?),
            None => None,
        })
    }

    /// Finalised invoices of a tenant, oldest first: `(id, period, total_minor)`.
    pub async fn list(&self, tenant_id: &str) -> Result<Vec<(String, String, i64)>, InvoiceError> {
        let rows = sqlx::query(
            "SELECT id, period, total_minor FROM invoices WHERE tenant_id = $1 ORDER BY period",
        )
        .bind(tenant_id)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("id")?,
                    r.try_get("period")?,
                    r.try_get("total_minor")?,
                ))
            })
            .collect()
    }

    /// Prices a finalised invoice's records again with the current book; the document
    /// equals the stored one byte for byte when the ledger kept its promises.
    pub async fn reprice(&self, id: &str) -> Result<Option<String>, InvoiceError> {
        let Some(stored) = self.get(id).await? else {
            return Ok(None);
        };
        let book = PriceBook::load(&self.db).await?;
        let mut conn = self.db.pool().acquire().await.map_err(DbError::from)?;
        let mut invoice = self
            .compute(
                &mut conn,
                &stored.tenant_id,
                &stored.period,
                Selection::Invoiced(id),
                &book,
            )
            .await?;
        invoice.id = Some(id.to_owned());
        invoice.status = InvoiceStatus::Final;
        Ok(Some(invoice.document()))
    }
}
