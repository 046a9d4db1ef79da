//! Exports for finance: per-call usage records and invoice lines traced to their request
//! ids, as CSV or JSON, streamed from the store in constant memory.
//!
//! Output is a pure function of the records selected: rows in `(started_at, request_id)`
//! order, fixed columns, no timestamps of the export itself. Re-exporting a closed period
//! (its invoices finalised, so its records frozen) therefore gives the same bytes.

use futures::TryStreamExt;
use sqlx::Row;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::period::{period_bounds, period_of};
use crate::prices::PriceBook;
use crate::{Db, DbError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "csv" => Ok(Self::Csv),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown format `{other}`: use csv or json")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
}

impl From<sqlx::Error> for ExportError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

/// Which usage records to export.
#[derive(Debug, Clone)]
pub struct UsageSelection {
    /// `None`: every tenant.
    pub tenant_id: Option<String>,
    /// `[from_ms, to_ms)` on `started_at`.
    pub from_ms: i64,
    pub to_ms: i64,
}

const USAGE_COLUMNS: [&str; 15] = [
    "request_id",
    "tenant_id",
    "key_id",
    "model",
    "endpoint",
    "prompt_tokens",
    "completion_tokens",
    "started_at",
    "finished_at",
    "status",
    "delivery",
    "invoice_id",
    "cached_tokens",
    "cache_hit_minor_per_mreq",
    "batch_id",
];

/// The batch a usage record is a line of, from its request id `{batch}_req_{line}`.
pub fn batch_of(request_id: &str) -> Option<&str> {
    request_id
        .starts_with("batch_")
        .then(|| request_id.rsplit_once("_req_").map(|(batch, _)| batch))
        .flatten()
}

/// A CSV field, quoted when it must be (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes rows of `(column, value)` pairs in one format; numbers stay numbers in JSON.
struct Writer<W> {
    out: tokio::io::BufWriter<W>,
    format: Format,
    rows: u64,
}

enum Value<'a> {
    Text(&'a str),
    Int(i64),
    Null,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    async fn start(out: W, format: Format, columns: &[&str]) -> std::io::Result<Self> {
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, out);
        match format {
            Format::Csv => {
                out.write_all(columns.join(",").as_bytes()).await?;
                out.write_all(b"\n").await?;
            }
            Format::Json => out.write_all(b"[").await?,
        }
        Ok(Self {
            out,
            format,
            rows: 0,
        })
    }

    async fn row(&mut self, columns: &[&str], values: &[Value<'_>]) -> std::io::Result<()> {
        let mut line = String::with_capacity(256);
        match self.format {
            Format::Csv => {
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        line.push(',');
                    }
                    match v {
                        Value::Text(s) => line.push_str(&csv_field(s)),
                        Value::Int(n) => line.push_str(&n.to_string()),
                        Value::Null => {}
                    }
                }
                line.push('\n');
            }
            Format::Json => {
                line.push_str(if self.rows == 0 { "\n{" } else { ",\n{" });
                for (i, (c, v)) in columns.iter().zip(values).enumerate() {
                    if i > 0 {
                        line.push(',');
                    }
                    line.push_str(&serde_json::to_string(c).unwrap_or_default());
                    line.push(':');
                    match v {
                        Value::Text(s) => {
                            line.push_str(&serde_json::to_string(s).unwrap_or_default())
                        }
                        Value::Int(n) => line.push_str(&n.to_string()),
                        Value::Null => line.push_str("null"),
                    }
                }
                line.push('}');
            }
        }
        self.rows += 1;
        self.out.write_all(line.as_bytes()).await
    }

    async fn finish(mut self) -> std::io::Result<u64> {
        if self.format == Format::Json {
            self.out.write_all(b"\n]\n").await?;
        }
        self.out.flush().await?;
        Ok(self.rows)
    }
}

/// Streams the selected usage records to `out`; calls `progress` with the rows written
/// every 100,000 rows. Returns how many rows were written.
pub async fn export_usage<W: AsyncWrite + Unpin>(
    db: &Db,
    selection: &UsageSelection,
    format: Format,
    out: W,
    mut progress: impl FnMut(u64),
) -> Result<u64, ExportError> {
    // `batch_id`, the last, is read from the request id.
    let columns = USAGE_COLUMNS[..USAGE_COLUMNS.len() - 1].join(", ");
    let tenant_filter = if selection.tenant_id.is_some() {
        "tenant_id = $3 AND "
    } else {
        ""
    };
    let sql = format!(
        "SELECT {columns} FROM usage_records WHERE {tenant_filter}started_at >= $1 \
         AND started_at < $2 ORDER BY started_at, request_id"
    );
    let mut query = sqlx::query(&sql)
        .bind(selection.from_ms)
        .bind(selection.to_ms);
    if let Some(t) = &selection.tenant_id {
        query = query.bind(t);
    }
    let mut rows = query.fetch(db.pool());
    let mut writer = Writer::start(out, format, &USAGE_COLUMNS).await?;
    while let Some(r) = rows.try_next().await? {
        let text = |c: &str| r.try_get::<String, _>(c);
        let int = |c: &str| r.try_get::<i64, _>(c);
        let (request_id, tenant_id, key_id, model, endpoint) = (
            text("request_id")?,
            text("tenant_id")?,
            text("key_id")?,
            text("model")?,
            text("endpoint")?,
        );
        let (status, delivery) = (text("status")?, text("delivery")?);
        let invoice: Option<String> = r.try_get("invoice_id")?;
        let hit_rate: Option<i64> = r.try_get("cache_hit_minor_per_mreq")?;
        writer
            .row(
                &USAGE_COLUMNS,
                &[
                    Value::Text(&request_id),
                    Value::Text(&tenant_id),
                    Value::Text(&key_id),
                    Value::Text(&model),
                    Value::Text(&endpoint),
                    Value::Int(int("prompt_tokens")?),
                    Value::Int(int("completion_tokens")?),
                    Value::Int(int("started_at")?),
                    Value::Int(int("finished_at")?),
                    Value::Text(&status),
                    Value::Text(&delivery),
                    invoice.as_deref().map_or(Value::Null, Value::Text),
                    Value::Int(int("cached_tokens")?),
                    hit_rate.map_or(Value::Null, Value::Int),
                    batch_of(&request_id).map_or(Value::Null, Value::Text),
                ],
            )
            .await?;
        if writer.rows % 100_000 == 0 {
            progress(writer.rows);
        }
    }
    Ok(writer.finish().await?)
}

const TRACE_COLUMNS: [&str; 8] = [
    "invoice_id",
    "kind",
    "usage_period",
    "model",
    "price_effective_from",
    "billed",
    "request_id",
    "total_tokens",
];

/// Streams, for a finalised invoice, every record it counted with the line it is on:
/// each invoice line traced to its request ids (rejected records say why in `billed`;
/// responses served from the response cache are `billed:cache_hit`).
pub async fn export_invoice_trace<W: AsyncWrite + Unpin>(
    db: &Db,
    invoice_id: &str,
    format: Format,
    out: W,
) -> Result<Option<u64>, ExportError> {
    let Some(row) = sqlx::query("SELECT period FROM invoices WHERE id = $1")
        .bind(invoice_id)
        .fetch_optional(db.pool())
        .await?
    else {
        return Ok(None);
    };
    let period: String = row.try_get("period")?;
    let (period_start, _) =
        period_bounds(&period).map_err(|e| DbError::Sqlx(sqlx::Error::Protocol(e.to_string())))?;
    let book = PriceBook::load(db).await?;
    let mut rows = sqlx::query(
        "SELECT request_id, model, started_at, delivery, prompt_tokens, completion_tokens, \
         cache_hit_minor_per_mreq FROM usage_records WHERE invoice_id = $1 ORDER BY started_at, request_id",
    )
    .bind(invoice_id)
    .fetch(db.pool());
    let mut writer = Writer::start(out, format, &TRACE_COLUMNS).await?;
    while let Some(r) = rows.try_next().await? {
        let request_id: String = r.try_get("request_id")?;
        let model: String = r.try_get("model")?;
        let started_at: i64 = r.try_get("started_at")?;
        let delivery: String = r.try_get("delivery")?;
        let tokens =
            r.try_get::<i64, _>("prompt_tokens")? + r.try_get::<i64, _>("completion_tokens")?;
        let kind = if started_at >= period_start {
            "usage"
        } else {
            "adjustment"
        };
        let hit = r
            .try_get::<Option<i64>, _>("cache_hit_minor_per_mreq")?
            .is_some();
        let billed = match delivery.as_str() {
            "delivered" if hit => "billed:cache_hit",
            "delivered" => "billed",
            "undelivered" => "rejected:undelivered",
            _ => "rejected:delivery_unknown",
        };
        let usage_period = period_of(started_at);
        let price_from = book.at(&model, started_at).map(|p| p.effective_from);
        writer
            .row(
                &TRACE_COLUMNS,
                &[
                    Value::Text(invoice_id),
                    Value::Text(kind),
                    Value::Text(&usage_period),
                    Value::Text(&model),
                    price_from.map_or(Value::Null, Value::Int),
                    Value::Text(billed),
                    Value::Text(&request_id),
                    Value::Int(tokens),
                ],
            )
            .await?;
    }
    Ok(Some(writer.finish().await?))
}

const LINE_COLUMNS: [&str; 18] = [
    "invoice_id",
    "kind",
    "usage_period",
    "model",
    "price_effective_from",
    "input_minor_per_mtok",
    "output_minor_per_mtok",
    "request_minor_per_mreq",
    "requests",
    "input_tokens",
    "output_tokens",
    "amount_micros",
    "amount_minor",
    "cached_input_minor_per_mtok",
    "cached_input_tokens",
    "cache_hit_minor_per_mreq",
    "batch",
    "batch_discount_pct",
];

/// An invoice's lines as CSV, one row per line, for spreadsheets; the JSON form is the
/// invoice's stored document.
pub fn invoice_lines_csv(invoice: &crate::Invoice) -> String {
    let mut out = LINE_COLUMNS.join(",");
    out.push('\n');
    for l in &invoice.lines {
        let kind = match l.kind {
            crate::LineKind::Usage => "usage",
            crate::LineKind::Adjustment => "adjustment",
        };
        let fields = [
            csv_field(invoice.id.as_deref().unwrap_or("")),
            kind.to_owned(),
            csv_field(&l.usage_period),
            csv_field(&l.model),
            l.price_effective_from
                .map_or(String::new(), |t| t.to_string()),
            l.input_minor_per_mtok.to_string(),
            l.output_minor_per_mtok.to_string(),
            l.request_minor_per_mreq.to_string(),
            l.requests.to_string(),
            l.input_tokens.to_string(),
            l.output_tokens.to_string(),
            l.amount_micros.to_string(),
            l.amount_minor.to_string(),
            l.cached_input_minor_per_mtok
                .map_or(String::new(), |r| r.to_string()),
            l.cached_input_tokens.to_string(),
            l.cache_hit_minor_per_mreq
                .map_or(String::new(), |r| r.to_string()),
            l.batch.to_string(),
            l.batch_discount_pct
                .map_or(String::new(), |r| r.to_string()),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
