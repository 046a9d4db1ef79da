//! The usage reports: series per hour or day, and leader boards.
//!
//! Owns: turning the filter flags into a billing usage filter and printing what billing
//! returns. Must never: sum usage itself; billing's series queries do.

use super::args::{Top, Usage, UsageArgs};
use super::directory::tenant_id_if;
use super::output;

pub async fn usage(a: Usage, json: bool) -> anyhow::Result<()> {
    let db = a.store.connect().await?;
    let filter = usage_filter(&db, a.filter).await?;
    let group_by = a.group_by.map(Into::into);
    let points = billing::series::usage_series(&db, &filter, a.bucket.into(), group_by).await?;
    if !json {
        println!("{}", output::USAGE_HEADER);
    }
    output::rows(json, &points, |p| Ok(output::usage_point(p)))
}

pub async fn top(a: Top, json: bool) -> anyhow::Result<()> {
    let db = a.store.connect().await?;
    let filter = usage_filter(&db, a.filter).await?;
    let top = billing::series::top(&db, &filter, a.by.into(), a.limit).await?;
    output::rows(json, &top, |e| Ok(output::top_entry(e)))
}

/// The filter for the flags: `--to` defaults to now, `--from` to 30 days before it.
async fn usage_filter(
    db: &billing::Db,
    a: UsageArgs,
) -> anyhow::Result<billing::series::UsageFilter> {
    let tenant_id = tenant_id_if(db, a.tenant.as_deref()).await?;
    let to = a.to.unwrap_or(billing::now_ms() / 1000 + 1);
    let from = a.from.unwrap_or(to - 30 * 86_400);
    if to <= from || from < 0 {
        anyhow::bail!("--from must be before --to (Unix seconds)");
    }
    Ok(billing::series::UsageFilter {
        tenant_id,
        key_id: a.key,
        model: a.model,
        from_ms: from * 1000,
        to_ms: to * 1000,
    })
}
