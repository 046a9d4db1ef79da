//! SPEC §6.1 under a store outage: Postgres (a throwaway cluster this test owns) is
//! stopped for 60 s during load, then started. The API keeps answering from cached keys,
//! usage waits in the spool, and afterwards every success has exactly one record.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use billing::{Delivery, Ledger};
use e2e_tests::{
    gateway_config, request_id, wait_until, RunningGateway, ThrowawayPostgres, WorkerProcess,
    EMBEDDING_MODEL,
};
use gateway::tenants::NewKey;
use serde_json::json;

const OUTAGE: Duration = Duration::from_secs(60);
const CLIENTS: usize = 4;
/// Calls served on either side of the outage before it starts and before the load stops.
const WARM_CALLS: usize = 4 * CLIENTS;
const CALLS_LIMIT: Duration = Duration::from_secs(30);

/// How many of `successes` completed after `since`.
fn served_since(successes: &Mutex<Vec<(String, Instant)>>, since: Instant) -> usize {
    let successes = successes.lock().unwrap();
    successes.iter().filter(|(_, at)| *at > since).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_for_a_minute_loses_nothing() {
    let pg = ThrowawayPostgres::start();
    let worker = WorkerProcess::start().await;
    let gateway =
        RunningGateway::start(gateway_config(&pg.url, std::slice::from_ref(&worker.url))).await;
    let (key, _) = gateway.tenant_with_key("outage", NewKey::default()).await;

    let successes = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (successes, stop, http, key, url) = (
            successes.clone(),
            stop.clone(),
            http.clone(),
            key.clone(),
            gateway.url.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let response = http
                    .post(format!("{url}/v1/embeddings"))
                    .bearer_auth(&key)
                    .json(&json!({"model": EMBEDDING_MODEL, "input": format!("client {c} request {n}")}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let id = request_id(&response);
                let body = response.text().await.unwrap();
                assert_eq!(status, 200, "request failed: {body}");
                successes.lock().unwrap().push((id, Instant::now()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    let load_from = Instant::now();
    wait_until("calls served before the outage", CALLS_LIMIT, || async {
        served_since(&successes, load_from) >= WARM_CALLS
    })
    .await;
    pg.stop_server();
    let down_at = Instant::now();
    println!("postgres stopped");
    tokio::time::sleep(OUTAGE).await;
    pg.start_server();
    let up_at = Instant::now();
    println!("postgres started");
    wait_until("calls served after the outage", CALLS_LIMIT, || async {
        served_since(&successes, up_at) >= WARM_CALLS
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let successes = successes.lock().unwrap().clone();
    let during = successes
        .iter()
        .filter(|(_, at)| *at > down_at && *at < up_at)
        .count();
    println!(
        "{} successes, {during} while the store was down",
        successes.len()
    );
    assert!(
        during > 50,
        "the API should keep answering while the store is down"
    );

    // Everything spooled reaches the store once it is back.
    let ledger = Ledger::new(gateway.db.clone());
    for (id, _) in &successes {
        let record = gateway.usage_record(id).await;
        let record = record.unwrap_or_else(|| panic!("no record for {id}"));
        assert_eq!(record.delivery, Delivery::Delivered);
    }
    let tenant = gateway
        .tenants
        .tenant_by_name("outage")
        .await
        .unwrap()
        .unwrap();
    let records = ledger.for_tenant(&tenant.id).await.unwrap();
    let ids: HashSet<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), records.len(), "duplicate records");
    assert_eq!(
        records.len(),
        successes.len(),
        "records beyond the successes"
    );
    gateway.stop().await;
}
