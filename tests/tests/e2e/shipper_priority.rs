//! Shipping usage to the store is bulk work that must never hold a core a request waits
//! for: the gateway runs its shipper, and the store connection it opens, below serving in
//! CPU priority, and leaves the request path (serving threads, the spool writer) at the
//! normal priority.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e_tests::{GatewayProcess, TempSqlite};

/// Thread name → niceness of every thread of a process (names repeat: all are kept).
fn thread_niceness(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3, niceness field 19.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        out.push((comm.trim().to_owned(), fields[16].parse().unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_usage_shipper_runs_below_serving_and_the_request_path_does_not() {
    let store = TempSqlite::new();
    let spool = store.dir().join("spool");
    // No worker needs to answer: this is about the gateway's own threads.
    let gateway = GatewayProcess::start(&store.url, &spool, &["http://127.0.0.1:9".into()]).await;

    // The shipper opens its store connection once it has started; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let threads = loop {
        let threads = thread_niceness(gateway.pid());
        let shipper_connected = threads
            .iter()
            .any(|(name, nice)| name.starts_with("sqlx-sqlite") && *nice == 10);
        if shipper_connected || Instant::now() > deadline {
            break threads;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut by_name: HashMap<&str, Vec<i64>> = HashMap::new();
    for (name, nice) in &threads {
        let kind = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        by_name.entry(kind).or_default().push(*nice);
    }
    assert_eq!(by_name.get("usage-shipper"), Some(&vec![10]), "{threads:?}");
    // SQLite runs each connection on a thread of its own: the shipper's inherits its
    // niceness; the serving pools' connections keep the normal priority.
    let sqlite = by_name.get("sqlx-sqlite-wor").cloned().unwrap_or_default();
    assert!(sqlite.contains(&10) && sqlite.contains(&0), "{threads:?}");
    let serving = by_name.get("gateway-serve").cloned().unwrap_or_default();
    assert!(
        !serving.is_empty() && serving.iter().all(|n| *n == 0),
        "{threads:?}"
    );
    assert_eq!(by_name.get("usage-spool"), Some(&vec![0]), "{threads:?}");
}
