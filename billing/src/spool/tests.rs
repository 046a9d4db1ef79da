//! The spool end to end: appends under both durability modes, shared fsyncs, rotation.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

/// `tasks` concurrent appenders, `each` usage events apiece, all acknowledged.
async fn append_concurrently(spool: &Spool, tasks: usize, each: usize) {
    let mut running = Vec::new();
    for t in 0..tasks {
        let spool = spool.clone();
        running.push(tokio::spawn(async move {
            for i in 0..each {
                spool
                    .append_usage(&shipper::tests::event(t * 1000 + i))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in running {
        t.await.unwrap();
    }
}

fn usage_in(dir: &Path) -> usize {
    let mut read = 0;
    for n in segment::list_segments(dir).unwrap() {
        read += segment::read_from(&segment::segment_path(dir, n), 0, None)
            .unwrap()
            .into_iter()
            .filter(|(e, _)| matches!(e, SpoolEntry::Usage { .. }))
            .count();
    }
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_fsync_interval_appends_are_written_at_once_and_synced_later() {
    let dir = std::env::temp_dir().join(format!("spool-interval-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let options = |interval| SpoolOptions {
        segment_bytes: 16 * 1024,
        fsync_interval: interval,
        ..SpoolOptions::default()
    };
    // An interval no test run reaches: appends return with no fsync at all, and every
    // one is already in the segments (across rotations: 300 events overflow 16 KiB).
    let spool = Spool::open_with(&dir, options(Duration::from_secs(3600))).unwrap();
    append_concurrently(&spool, 10, 30).await;
    assert_eq!(spool.stats().durable_appends, 300);
    assert_eq!(spool.stats().fsyncs, 0, "nothing waited for the disk");
    let segments = segment::list_segments(&dir).unwrap().len();
    assert!(segments > 1, "rotated");
    assert_eq!(usage_in(&dir), 300);
    let due = |spool: &Spool| {
        let log = lock(spool.direct.as_ref().unwrap());
        (log.due.retired.len(), log.due.dir)
    };
    // Moving on left the finished segments' fsyncs to the sync thread.
    assert_eq!(due(&spool), (segments - 1, true));
    // A flush makes them durable now.
    spool.flush().await.unwrap();
    assert_eq!(spool.stats().fsyncs, 1);
    assert_eq!(
        due(&spool),
        (0, false),
        "a flush syncs the finished segments too"
    );
    drop(spool);
    let _ = fs::remove_dir_all(&dir);

    // A short interval: the syncer fsyncs soon after a write, and not while idle.
    let spool = Spool::open_with(&dir, options(Duration::from_millis(10))).unwrap();
    spool.append_usage(&shipper::tests::event(1)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while spool.stats().fsyncs == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let synced = spool.stats().fsyncs;
    assert_eq!(synced, 1, "one fsync for the one write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        spool.stats().fsyncs,
        synced,
        "no fsync while nothing is written"
    );
    assert_eq!(usage_in(&dir), 1);
    // Moving on: the sync thread fsyncs the finished segments within an interval.
    append_concurrently(&spool, 10, 30).await;
    assert!(segment::list_segments(&dir).unwrap().len() > 1, "rotated");
    let deadline = Instant::now() + Duration::from_secs(5);
    while due(&spool) != (0, false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(due(&spool), (0, false));
    assert_eq!(usage_in(&dir), 301);
    drop(spool);
    let _ = fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_fsyncs_and_every_one_is_counted() {
    let dir = std::env::temp_dir().join(format!("spool-share-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let spool = Spool::open_with(
        &dir,
        SpoolOptions {
            segment_bytes: 1 << 20,
            max_linger: Duration::from_millis(2),
            ..SpoolOptions::default()
        },
    )
    .unwrap();
    append_concurrently(&spool, 32, 50).await;
    let stats = spool.stats();
    assert_eq!(stats.durable_appends, 32 * 50);
    assert!(stats.fsyncs >= 1, "{stats:?}");
    assert!(
        stats.fsyncs * 4 <= stats.durable_appends,
        "32 appenders should share fsyncs: {stats:?}"
    );
    // Everything acknowledged is in the segments.
    assert_eq!(usage_in(&dir), 32 * 50);
    drop(spool);
    let _ = fs::remove_dir_all(&dir);
}

/// One folder has one user: a second spool on it is refused while the first is open (after
/// waiting out [`LOCK_WAIT`]), and opens once the first and its threads are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_in_use_is_refused_and_free_once_its_spool_is_gone() {
    let dir = std::env::temp_dir().join(format!("spool-lock-{}", uuid::Uuid::new_v4().simple()));
    let first = Spool::open(&dir, 1 << 20).unwrap();
    first.append_usage(&shipper::tests::event(1)).await.unwrap();
    let started = Instant::now();
    let refused = Spool::open(&dir, 1 << 20)
        .err()
        .expect("a second spool on one folder");
    assert!(started.elapsed() >= LOCK_WAIT);
    assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
    assert!(refused.to_string().contains("in use"), "{refused}");
    drop(first);
    let second = Spool::open(&dir, 1 << 20).expect("the folder is free again");
    assert_eq!(usage_in(&dir), 1);
    drop(second);
    let _ = fs::remove_dir_all(&dir);
}
