//! Reconciliation (SPEC §6.5): for a month, the usage records, the usage API's totals, the
//! export and the invoices must agree to the unit, and every record must be either billed
//! or rejected with a reason.

use sqlx::Row;

use crate::export::{export_usage, Format, UsageSelection};
use crate::invoices::{InvoiceError, Invoices};
use crate::period::period_bounds;
use crate::{Db, DbError, Ledger};

/// One check and whether it held.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub tenant_id: String,
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub period: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    fn check(&mut self, tenant_id: &str, name: &str, expected: i64, actual: i64, what: &str) {
        self.checks.push(Check {
            tenant_id: tenant_id.to_owned(),
            name: name.to_owned(),
            ok: expected == actual,
            detail: format!("{what}: expected {expected}, found {actual}"),
        });
    }
}

/// Counts of records and tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    records: i64,
    tokens: i64,
}

/// Reconciles `period` for every tenant with usage in it or an invoice for it.
pub async fn reconcile(db: &Db, period: &str) -> Result<Report, InvoiceError> {
    let (start, end) = period_bounds(period)?;
    let mut report = Report {
        period: period.to_owned(),
        checks: Vec::new(),
    };
    let tenants: Vec<String> = sqlx::query(
        "SELECT DISTINCT tenant_id FROM usage_records WHERE started_at >= $1 AND started_at < $2 \
         UNION SELECT tenant_id FROM invoices WHERE period = $3 ORDER BY 1",
    )
    .bind(start)
    .bind(end)
    .bind(period)
    .fetch_all(db.pool())
    .await?
    .iter()
    .map(|r| r.try_get::<String, _>(0))
    .collect::<Result<_, _>>()?;
    let invoices = Invoices::new(db.clone());
    let ledger = Ledger::new(db.clone());
    for tenant in &tenants {
        // The records themselves.
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, \
             CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS t \
             FROM usage_records WHERE tenant_id = $1 AND started_at >= $2 AND started_at < $3",
        )
        .bind(tenant)
        .bind(start)
        .bind(end)
        .fetch_one(db.pool())
        .await?;
        let records = Tally {
            records: row.try_get("n")?,
            tokens: row.try_get("t")?,
        };

        // The usage API's view.
        let api = ledger.totals_by_model(tenant, start, end).await?;
        let api = Tally {
            records: api.iter().map(|m| m.requests).sum(),
            tokens: api
                .iter()
                .map(|m| m.prompt_tokens + m.completion_tokens)
                .sum(),
        };
        report.check(
            tenant,
            "usage_api_records",
            records.records,
            api.records,
            "records",
        );
        report.check(
            tenant,
            "usage_api_tokens",
            records.tokens,
            api.tokens,
            "tokens",
        );

        // The export's view (counted as it streams, nothing kept).
        let mut exported = ExportTally::default();
        export_usage(
            db,
            &UsageSelection {
                tenant_id: Some(tenant.clone()),
                from_ms: start,
                to_ms: end,
            },
            Format::Json,
            &mut exported,
            |_| {},
        )
        .await
        .map_err(|e| InvoiceError::Db(DbError::Sqlx(sqlx::Error::Protocol(e.to_string()))))?;
        let exported = exported.tally();
        report.check(
            tenant,
            "export_records",
            records.records,
            exported.records,
            "records",
        );
        report.check(
            tenant,
            "export_tokens",
            records.tokens,
            exported.tokens,
            "tokens",
        );

        // The invoices' view: this month's usage on every finalised invoice (its own, and
        // later ones as adjustments) plus what is not invoiced yet, billed or rejected.
        let mut invoiced = Tally::default();
        let ids: Vec<String> = sqlx::query("SELECT id FROM invoices WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_all(db.pool())
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        for id in &ids {
            let Some(inv) = invoices.get(id).await? else {
                continue;
            };
            for l in inv.lines.iter().filter(|l| l.usage_period == period) {
                invoiced.records += l.requests;
                invoiced.tokens += l.input_tokens + l.output_tokens;
            }
            for r in inv.rejected.iter().filter(|r| r.usage_period == period) {
                invoiced.records += r.records;
                invoiced.tokens += r.input_tokens + r.output_tokens;
            }
            if inv.period == period {
                let billed: i64 = inv.lines.iter().map(|l| l.requests).sum();
                let rejected: i64 = inv.rejected.iter().map(|r| r.records).sum();
                report.check(
                    tenant,
                    "invoice_records_billed_plus_rejected",
                    inv.records,
                    billed + rejected,
                    id,
                );
                report.check(
                    tenant,
                    "invoice_lines_sum_to_total",
                    inv.total_minor,
                    inv.lines.iter().map(|l| l.amount_minor).sum(),
                    id,
                );
                let marked: i64 =
                    sqlx::query("SELECT COUNT(*) AS n FROM usage_records WHERE invoice_id = $1")
                        .bind(id)
                        .fetch_one(db.pool())
                        .await?
                        .try_get("n")?;
                report.check(tenant, "invoice_records_in_store", inv.records, marked, id);
                let stored = invoices.document(id).await?.unwrap_or_default();
                let repriced = invoices.reprice(id).await?.unwrap_or_default();
                report.checks.push(Check {
                    tenant_id: tenant.clone(),
                    name: "invoice_reprices_identically".to_owned(),
                    ok: stored == repriced,
                    detail: id.clone(),
                });
            }
        }
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, \
             CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS t \
             FROM usage_records WHERE tenant_id = $1 AND invoice_id IS NULL \
             AND started_at >= $2 AND started_at < $3",
        )
        .bind(tenant)
        .bind(start)
        .bind(end)
        .fetch_one(db.pool())
        .await?;
        invoiced.records += row.try_get::<i64, _>("n")?;
        invoiced.tokens += row.try_get::<i64, _>("t")?;
        report.check(
            tenant,
            "invoiced_plus_open_records",
            records.records,
            invoiced.records,
            "records",
        );
        report.check(
            tenant,
            "invoiced_plus_open_tokens",
            records.tokens,
            invoiced.tokens,
            "tokens",
        );
    }
    Ok(report)
}

/// Counts the rows and tokens of a JSON usage export as it is written.
#[derive(Default)]
struct ExportTally {
    buffer: Vec<u8>,
    tally: Tally,
}

impl ExportTally {
    fn consume_lines(&mut self) {
        while let Some(pos) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=pos).collect();
            let line = line.trim_ascii();
            let line = line.strip_suffix(b",").unwrap_or(line);
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                if v.is_object() {
                    self.tally.records += 1;
                    self.tally.tokens += v["prompt_tokens"].as_i64().unwrap_or(0)
                        + v["completion_tokens"].as_i64().unwrap_or(0);
                }
            }
        }
    }

    fn tally(mut self) -> Tally {
        self.buffer.push(b'\n');
        self.consume_lines();
        self.tally
    }
}

impl tokio::io::AsyncWrite for ExportTally {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.buffer.extend_from_slice(buf);
        self.consume_lines();
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
