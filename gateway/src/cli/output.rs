//! How the operator commands print: one pretty JSON document on stdout with `--json`,
//! otherwise tab-separated lines, one per row.
//!
//! Owns: the JSON printer and the line format of every listing. Must never: query the
//! store or decide what to list; the commands pass their rows in.

use billing::reconcile::Report;
use billing::series::{Point, TopEntry};
use gateway::tenants::{KeySummary, Plan, TenantSummary};

/// Prints one JSON document on stdout.
pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `rows` as one JSON array with `--json`, else one line each.
pub fn rows<T: serde::Serialize>(
    as_json: bool,
    rows: &[T],
    line: impl Fn(&T) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    if as_json {
        return json(rows);
    }
    for row in rows {
        println!("{}", line(row)?);
    }
    Ok(())
}

pub fn tenant(t: &TenantSummary) -> String {
    format!(
        "{}\t{}\t{}",
        t.id,
        t.name,
        t.plan_name.as_deref().unwrap_or("-")
    )
}

pub fn plan(p: &Plan) -> anyhow::Result<String> {
    Ok(format!(
        "{}\t{}\t{}",
        p.id,
        p.name,
        serde_json::to_string(&p.limits)?
    ))
}

pub fn price(p: &billing::Price) -> String {
    let cached = p.cached_input_minor_per_mtok.map_or(String::new(), |r| {
        format!("\t{r} {}/Mtok cached in", p.currency)
    });
    let batch = p
        .batch_discount_pct
        .map_or(String::new(), |d| format!("\tbatch -{d}%"));
    format!(
        "{}\t{}\t{} {}/Mtok in\t{} {}/Mtok out\t{} {}/Mreq{cached}{batch}",
        p.model,
        p.effective_from,
        p.input_minor_per_mtok,
        p.currency,
        p.output_minor_per_mtok,
        p.currency,
        p.request_minor_per_mreq,
        p.currency
    )
}

/// A key with its state at `now_ms`: active, revoked or expired.
pub fn key(k: &KeySummary, now_ms: i64) -> String {
    let state = if k.revoked_at.is_some() {
        "revoked"
    } else if k.expires_at.is_some_and(|e| e <= now_ms) {
        "expired"
    } else {
        "active"
    };
    format!("{}\t{}\t{}", k.id, k.name, state)
}

/// id, tenant, endpoint, status, lines ended of all (failed), created (Unix seconds).
pub fn batch(tenant_id: &str, b: &gateway::batches::BatchObject) -> String {
    let c = &b.request_counts;
    format!(
        "{}\t{tenant_id}\t{}\t{}\t{}/{} ({} failed)\t{}",
        b.id,
        b.endpoint,
        b.status,
        c.completed + c.failed,
        c.total,
        c.failed,
        b.created_at
    )
}

pub const USAGE_HEADER: &str = "start\tgroup\trequests\tprompt_tokens\tcompletion_tokens\t\
     cached_tokens\tcache_hits\tspend_micros";

pub fn usage_point(p: &Point) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        bucket_start(p.start_ms),
        p.group.as_deref().unwrap_or("-"),
        p.requests,
        p.prompt_tokens,
        p.completion_tokens,
        p.cached_tokens,
        p.cache_hits,
        p.spend_micros
    )
}

pub fn top_entry(e: &TopEntry) -> String {
    format!(
        "{}\t{} requests\t{} tokens\t{} cached\t{} cache hits\t{} micros",
        e.id,
        e.requests,
        e.prompt_tokens + e.completion_tokens,
        e.cached_tokens,
        e.cache_hits,
        e.spend_micros
    )
}

/// Every check on its own line, then a summary line.
pub fn reconcile(report: &Report) {
    for c in &report.checks {
        let mark = if c.ok { "ok  " } else { "FAIL" };
        println!("{mark} {} {} ({})", c.tenant_id, c.name, c.detail);
    }
    println!(
        "{}: {} checks, {} failed",
        report.period,
        report.checks.len(),
        report.checks.iter().filter(|c| !c.ok).count()
    );
}

/// A bucket start as `YYYY-MM-DDTHH:00Z`.
fn bucket_start(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:00Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour()
    )
}
