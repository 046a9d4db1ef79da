//! Benchmark (not a test): a month of usage records exported as CSV, streamed; prints rows
//! per second and the process's peak resident memory before and after the export, to show
//! the export runs in constant memory.
//!
//!     cargo run --release -p billing --example export_bench -- sqlite:///tmp/export.db 10000000
//!
//! Seeds the records first if the store holds fewer (one tenant, November 2026); the
//! export goes to /dev/null.

use std::time::Instant;

use billing::export::{export_usage, Format, UsageSelection};
use billing::invoices::period_bounds;
use billing::{Db, Ledger, UsageEvent};
use sqlx::Row;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "sqlite:///tmp/export-bench.db".into());
    let rows: i64 = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let db = Db::connect(&url).await?;
    let (start, end) = period_bounds("2026-11")?;
    let have: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM usage_records WHERE tenant_id = 'tn_export'")
            .fetch_one(db.pool())
            .await?
            .try_get("n")?;
    if have < rows {
        eprintln!("seeding {} records", rows - have);
        let ledger = Ledger::new(db.clone());
        let step = (end - start) / rows;
        let seeded = Instant::now();
        let mut batch = Vec::with_capacity(5000);
        for i in have..rows {
            batch.push(
                UsageEvent::builder(format!("req_export_{i:010}"), "tn_export")
                    .key(format!("key_{}", i % 17))
                    .model("SmolLM2-135M-Instruct")
                    .tokens(20 + i % 300, i % 500)
                    .at(start + i * step, 200)
                    .build(),
            );
            if batch.len() == batch.capacity() {
                ledger.record_batch(&batch).await?;
                batch.clear();
                if (i + 1) % 500_000 == 0 {
                    eprintln!(
                        "  {} records, {:.0} s",
                        i + 1,
                        seeded.elapsed().as_secs_f64()
                    );
                }
            }
        }
        ledger.record_batch(&batch).await?;
    }
    let before = peak_rss_mib();
    let began = Instant::now();
    let out = tokio::fs::File::create("/dev/null").await?;
    let exported = export_usage(
        &db,
        &UsageSelection {
            tenant_id: Some("tn_export".into()),
            from_ms: start,
            to_ms: end,
        },
        Format::Csv,
        out,
        |n| eprint!("\rexported {n}"),
    )
    .await?;
    let secs = began.elapsed().as_secs_f64();
    eprintln!();
    println!(
        "exported {exported} records in {secs:.1} s ({:.0} rows/s); peak RSS {before:.0} MiB before, {:.0} MiB after",
        exported as f64 / secs,
        peak_rss_mib()
    );
    Ok(())
}
