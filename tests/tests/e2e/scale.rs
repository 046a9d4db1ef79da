//! Scaling on one machine as a cluster would (SPEC §8): three gateway processes share a
//! Postgres store and reach their workers through one `dns+http://` name, which a hosts
//! file maps to 127.0.0.x addresses (bind-mounted over /etc/hosts in each gateway's private
//! mount namespace). Under steady load the workers go 2 → 4 → 1: new workers get traffic
//! within moments of being listed, removed ones are `kill -9`ed right after the name stops
//! listing them, no call fails beyond those in flight on a killed worker, and every
//! answered call has exactly one usage record.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_tests::{metric, wait_for, GatewayProcess, TempPostgres, WorkerProcess, EMBEDDING_MODEL};
use serde_json::json;

const NAME: &str = "workers.scale.test";
const CLIENTS: usize = 4;

/// Rewrites the hosts file in place (a bind mount follows the file, not its name).
fn list(hosts: &Path, addresses: &[&str]) {
    let text: String = std::iter::once("127.0.0.1 localhost\n".to_owned())
        .chain(addresses.iter().map(|a| format!("{a} {NAME}\n")))
        .collect();
    std::fs::write(hosts, text).unwrap();
}

/// A port free on 127.0.0.1 (the workers take it on their own addresses).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn served(http: &reqwest::Client, worker: &WorkerProcess) -> f64 {
    metric(
        http,
        &format!("{}/metrics", worker.url),
        "worker_http_requests_total{route=\"/v1/embeddings\"",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_scale_2_4_1_behind_one_name_without_failing_calls() {
    let store = TempPostgres::new().await;
    let dir = std::env::temp_dir().join(format!("gw-scale-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    let port = free_port();
    let addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    let mut workers = Vec::new();
    for a in addresses {
        workers.push(WorkerProcess::start_embedding_at(&format!("{a}:{port}"), &[]).await);
    }
    list(&hosts, &addresses[..2]);

    let wrapper = [
        "unshare",
        "-m",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
        hosts.to_str().unwrap(),
    ];
    let source = format!("dns+http://{NAME}:{port}");
    let mut gateways = Vec::new();
    for g in 0..3 {
        let spool = dir.join(format!("spool-{g}"));
        gateways.push(
            GatewayProcess::start_wrapped(
                &wrapper,
                &store.url,
                &spool,
                std::slice::from_ref(&source),
                &[],
            )
            .await,
        );
    }
    let out = std::process::Command::new(e2e_tests::binary("gateway"))
        .args([
            "create-key",
            "--tenant",
            "scale",
            "--database-url",
            &store.url,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let http = reqwest::Client::new();
    // Every gateway sees the two listed workers before the load starts.
    for gw in &gateways {
        wait_for("the gateway to route", Duration::from_secs(30), || async {
            let r = http
                .post(format!("{}/v1/embeddings", gw.url))
                .bearer_auth(&key)
                .json(&json!({"model": EMBEDDING_MODEL, "input": "warm"}))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
    }

    // Steady load: each client calls the gateways in turn, one call at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let urls: Vec<String> = gateways.iter().map(|g| g.url.clone()).collect();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (stop, answered, failed, urls, key, http) = (
            stop.clone(),
            answered.clone(),
            failed.clone(),
            urls.clone(),
            key.clone(),
            http.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let url = &urls[(c + n) % urls.len()];
                let r = http
                    .post(format!("{url}/v1/embeddings"))
                    .bearer_auth(&key)
                    .json(
                        &json!({"model": EMBEDDING_MODEL, "input": format!("client {c} call {n}")}),
                    )
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let id = e2e_tests::request_id(&r);
                        r.bytes().await.unwrap();
                        answered.lock().unwrap().push(id);
                    }
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        failed.lock().unwrap().push(format!("{status}: {body}"));
                    }
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }

    // 2 workers: only the listed ones serve.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut before = Vec::new();
    for w in &workers {
        before.push(served(&http, w).await);
    }
    assert!(before[0] > 0.0 && before[1] > 0.0, "{before:?}");
    assert_eq!((before[2], before[3]), (0.0, 0.0), "{before:?}");

    // 4 workers: the new ones get traffic once the name lists them.
    list(&hosts, &addresses);
    wait_for(
        "the new workers to get traffic",
        Duration::from_secs(10),
        || async {
            let (a, b) = (
                served(&http, &workers[2]).await,
                served(&http, &workers[3]).await,
            );
            (a > 0.0 && b > 0.0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed_before_scale_down = failed.lock().unwrap().len();
    assert_eq!(failed_before_scale_down, 0, "{:?}", failed.lock().unwrap());

    // 1 worker: the name stops listing three, which are killed at once.
    list(&hosts, &addresses[..1]);
    for w in &mut workers[1..] {
        w.kill();
    }
    let killed_at = answered.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_kill = failed.lock().unwrap().len();
    // Then a stretch where nothing may fail at all.
    let one = served(&http, &workers[0]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failures = failed.lock().unwrap().clone();
    assert!(
        failures.len() <= CLIENTS,
        "at most the calls in flight on the killed workers may fail: {failures:?}"
    );
    assert_eq!(
        failures.len(),
        after_kill,
        "a call failed after the scale-down settled"
    );
    assert!(
        served(&http, &workers[0]).await > one,
        "the last worker serves"
    );
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() > killed_at,
        "calls were answered after the scale-down"
    );

    // Usage complete: every answered call once.
    let pool = sqlx::PgPool::connect(&store.url).await.unwrap();
    let counts: HashMap<String, i64> = wait_for(
        "every answered call's usage record",
        Duration::from_secs(60),
        || async {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT request_id, COUNT(*) FROM usage_records WHERE request_id = ANY($1) \
                 GROUP BY request_id",
            )
            .bind(&answered)
            .fetch_all(&pool)
            .await
            .unwrap();
            (rows.len() == answered.len()).then(|| rows.into_iter().collect())
        },
    )
    .await;
    assert!(counts.values().all(|n| *n == 1));
    eprintln!(
        "{} calls answered through 3 gateways, {} failed (in flight on killed workers)",
        answered.len(),
        failures.len()
    );
    pool.close().await;
    drop(gateways);
    let _ = std::fs::remove_dir_all(&dir);
}
