//! Benchmark (not a test): how fast usage events become durable in the spool, and how fast
//! the shipper moves them into the store.
//!
//!     cargo run --release -p billing --example spool_bench -- \
//!         postgres://postgres@127.0.0.1:5432/postgres [events] [concurrent appenders]
//!
//! Creates and drops its own database when given a Postgres URL; SQLite URLs are used as is.
//! `GATEWAY_SPOOL_MAX_LINGER_US` sets the spool's linger before each fsync, as for the
//! gateway (default `billing::spool::DEFAULT_MAX_LINGER`); `GATEWAY_SPOOL_FSYNC_INTERVAL_MS`
//! its fsync interval (default 0: an fsync before each append returns);
//! `SPOOL_BENCH_SHIPPER=inline` ships through the serving connections instead of the
//! gateway's dedicated shipper thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use billing::{Db, Ledger, Shipper, Spool, SpoolOptions, UsageEvent};
use sqlx::Connection;

fn event(i: usize) -> UsageEvent {
    UsageEvent::builder(format!("req_bench_{i:010}"), format!("tn_{}", i % 97))
        .key(format!("key_{}", i % 311))
        .model("SmolLM2-135M-Instruct")
        .tokens(30 + (i % 50) as i64, (i % 200) as i64)
        .at(1_800_000_000_000 + i as i64, 100)
        .build()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let events: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let appenders: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);

    let (db_url, cleanup) = if url.starts_with("postgres") {
        let name = format!("spool_bench_{}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(&url).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
        (format!("{base}/{name}"), Some((url.clone(), name)))
    } else {
        (url.clone(), None)
    };
    let dir = std::env::temp_dir().join(format!("spool-bench-{}", std::process::id()));
    let db = Db::connect(&db_url).await?;
    let linger_us: u64 = match std::env::var("GATEWAY_SPOOL_MAX_LINGER_US") {
        Ok(v) => v.parse()?,
        Err(_) => billing::spool::DEFAULT_MAX_LINGER.as_micros() as u64,
    };
    let fsync_interval_ms: u64 = match std::env::var("GATEWAY_SPOOL_FSYNC_INTERVAL_MS") {
        Ok(v) => v.parse()?,
        Err(_) => 0,
    };
    let spool = Spool::open_with(
        &dir,
        SpoolOptions {
            segment_bytes: 64 * 1024 * 1024,
            max_linger: Duration::from_micros(linger_us),
            fsync_interval: Duration::from_millis(fsync_interval_ms),
        },
    )?;

    // 1. Durable appends: `appenders` tasks, each waiting for its fsync like a request does.
    let started = Instant::now();
    let per_task = events / appenders;
    let mut tasks = Vec::new();
    for t in 0..appenders {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                spool.append_usage(&event(t * per_task + i)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let total = per_task * appenders;
    let append_secs = started.elapsed().as_secs_f64();
    let fsyncs = spool.stats().fsyncs;
    println!(
        "spool: {total} durable appends from {appenders} concurrent callers in {append_secs:.2} s = {:.0} events/s \
         ({fsyncs} fsyncs, {:.1} events each; linger up to {linger_us} us, fsync interval {fsync_interval_ms} ms)",
        total as f64 / append_secs,
        total as f64 / fsyncs.max(1) as f64
    );

    // 2. Shipping: everything spooled above, into the store.
    let started = Instant::now();
    // As the gateway ships to a store it can reach again: from a thread of its own with
    // connections of its own. `SPOOL_BENCH_SHIPPER=inline` ships through the serving pool
    // on this runtime instead (the gateway's way with an in-memory store).
    let outcome_wait = Duration::from_secs(30);
    let shipper = match std::env::var("SPOOL_BENCH_SHIPPER").as_deref() {
        Ok("inline") => Shipper::new(&spool, Ledger::new(db.clone()), outcome_wait).spawn(),
        _ => Shipper::spawn_dedicated(&spool, &db_url, outcome_wait)?,
    };
    let stats = Arc::clone(&shipper.stats);
    while stats.shipped.load(Ordering::Relaxed) < total as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ship_secs = started.elapsed().as_secs_f64();
    shipper.stop().await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
        .fetch_one(db.pool())
        .await?;
    println!(
        "shipper: {total} events into {} in {ship_secs:.2} s = {:.0} events/s ({rows} rows)",
        if db_url.starts_with("postgres") {
            "Postgres"
        } else {
            "SQLite"
        },
        total as f64 / ship_secs
    );
    db.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Some((admin_url, name)) = cleanup {
        let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
    }
    Ok(())
}
