//! Store upkeep for deployments: `migrate` (schema changes run once, before a rollout)
//! and `ship-spool` (the usage a removed replica left on its volume, moved to the store).

use std::time::{Duration, Instant};

use billing::{Db, Ledger, Shipper, Spool};

use super::args::{ShipSpool, StoreArgs};
use super::output;

pub async fn migrate(a: StoreArgs, json: bool) -> anyhow::Result<()> {
    let applied = Db::migrate(&a.database_url).await?;
    if json {
        return output::json(&serde_json::json!({ "applied": applied }));
    }
    if applied.is_empty() {
        eprintln!("the store's schema is current");
    }
    for m in &applied {
        println!("applied {m}");
    }
    Ok(())
}

/// Ships every event in the folder, retrying while the store is unreachable, until none
/// is left (or the timeout ends: then the folder keeps them and this fails).
pub async fn ship_spool(a: ShipSpool, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.spool_dir.is_dir(),
        "{} is not a folder (a gateway's --spool-dir)",
        a.spool_dir.display()
    );
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    let db = loop {
        match Db::connect(&a.store.database_url).await {
            Ok(db) => break db,
            Err(e) if Instant::now() < deadline => {
                eprintln!("the store is unreachable ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let spool = Spool::open(&a.spool_dir, 1024 * 1024)?;
    let before = spool.recovered_segments_left()?;
    let mut shipped = 0u64;
    loop {
        // One round: a shipper told to stop at once reads everything there is, ships it
        // (events whose outcome never came as not billed), then returns.
        let handle = Shipper::new(&spool, Ledger::new(db.clone()), Duration::ZERO).spawn();
        let stats = handle.stats.clone();
        handle.stop().await;
        shipped += stats.shipped.load(std::sync::atomic::Ordering::Relaxed);
        let left = spool.recovered_segments_left()?;
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} of {before} spool segments could not be shipped (is the store reachable?); \
             they stay in {} for another run",
            a.spool_dir.display()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if json {
        return output::json(&serde_json::json!({ "segments": before, "events": shipped }));
    }
    eprintln!(
        "shipped {shipped} usage events from {before} segments in {}; nothing is left to ship",
        a.spool_dir.display()
    );
    Ok(())
}
