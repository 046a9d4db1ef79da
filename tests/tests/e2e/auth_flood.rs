//! SPEC §4 under attack: floods of made-up keys, and revoked keys during a store outage.
//!
//! A key's checksum is public (CRC-32), so anyone can make well-formed keys at will. A
//! flood of them from one address must not slow other callers' legitimate calls, and that
//! address must be told to back off (429). A key revoked before the store goes down must
//! stay refused while the gateway serves other keys from its cache.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::stub::{StubWorker, STUB_EMBEDDING_MODEL};
use e2e_tests::{gateway_config, wait_until, RunningGateway, TempSqlite, ThrowawayPostgres};
use gateway::keys::PlaintextKey;
use gateway::tenants::NewKey;
use serde_json::json;

/// Made-up keys the flood sends, in all.
const FLOOD_KEYS: usize = 3000;
/// Connections the flood sends them on at once.
const FLOOD_TASKS: usize = 32;
/// Legitimate calls timed with and without the flood.
const LEGIT_CALLS: usize = 150;
const LIMIT: Duration = Duration::from_secs(60);

/// The legitimate caller's address and the flooding one: both loopback, told apart.
const LEGIT_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const FLOOD_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn client_from(addr: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(addr)
        .build()
        .unwrap()
}

async fn embed(http: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    http.post(format!("{url}/v1/embeddings"))
        .bearer_auth(key)
        .json(&json!({"model": STUB_EMBEDDING_MODEL, "input": "hello"}))
        .send()
        .await
        .unwrap()
}

/// Waits until `key` is served (the gateway's first health check of the stub may be due).
async fn until_served(http: &reqwest::Client, url: &str, key: &str) {
    wait_until(
        "a legitimate call served",
        Duration::from_secs(10),
        || async { embed(http, url, key).await.status() == 200 },
    )
    .await;
}

/// `LEGIT_CALLS` sequential calls with `key`; every one must succeed. Their latencies,
/// sorted.
async fn timed_calls(http: &reqwest::Client, url: &str, key: &str) -> Vec<Duration> {
    let mut took = Vec::with_capacity(LEGIT_CALLS);
    for _ in 0..LEGIT_CALLS {
        let started = Instant::now();
        let status = embed(http, url, key).await.status();
        took.push(started.elapsed());
        assert_eq!(status, 200, "a legitimate call failed");
    }
    took.sort();
    took
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_made_up_keys_is_throttled_and_does_not_slow_legitimate_calls() {
    let stub = StubWorker::start().await;
    let store = TempSqlite::new();
    let gateway =
        RunningGateway::start(gateway_config(&store.url, std::slice::from_ref(&stub.url))).await;
    let (key, _) = gateway.tenant_with_key("legit", NewKey::default()).await;
    let legit = client_from(LEGIT_ADDR);
    until_served(&legit, &gateway.url, &key).await;

    let quiet = timed_calls(&legit, &gateway.url, &key).await;

    let sent = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let retry_after = Arc::new(Mutex::new(None::<String>));
    let flood_started = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..FLOOD_TASKS {
        let (sent, statuses, retry_after) = (sent.clone(), statuses.clone(), retry_after.clone());
        let (http, url) = (client_from(FLOOD_ADDR), gateway.url.clone());
        flood.push(tokio::spawn(async move {
            while sent.fetch_add(1, Ordering::Relaxed) < FLOOD_KEYS
                && flood_started.elapsed() < LIMIT
            {
                let made_up = PlaintextKey::generate();
                let response = embed(&http, &url, made_up.expose()).await;
                let status = response.status().as_u16();
                if status == 429 {
                    let header = response.headers().get("retry-after");
                    *retry_after.lock().unwrap() = header.map(|v| v.to_str().unwrap().to_owned());
                }
                *statuses.lock().unwrap().entry(status).or_default() += 1;
            }
        }));
    }
    let flooded = timed_calls(&legit, &gateway.url, &key).await;
    let legit_done_at = flood_started.elapsed();
    for task in flood {
        task.await.unwrap();
    }
    let flood_took = flood_started.elapsed();
    let statuses = statuses.lock().unwrap().clone();
    println!(
        "legitimate calls without the flood: p50 {:?}, p99 {:?}; during it: p50 {:?}, p99 {:?} \
         (done {legit_done_at:?} into the flood)",
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        percentile(&flooded, 0.5),
        percentile(&flooded, 0.99),
    );
    println!(
        "flood: {FLOOD_KEYS} made-up keys on {FLOOD_TASKS} connections in {flood_took:?}, \
         statuses {statuses:?}, retry-after {:?}",
        retry_after.lock().unwrap()
    );

    let throttled = statuses.get(&429).copied().unwrap_or(0);
    assert_eq!(statuses.get(&200), None, "a made-up key was accepted");
    assert!(
        throttled >= FLOOD_KEYS / 2,
        "the flooding address should be told to back off (429), got {statuses:?}"
    );
    let wait: u64 = retry_after
        .lock()
        .unwrap()
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "retry-after {wait}");
    // Generous: on a loaded 2-core machine the flood competes for the CPU.
    let bound = percentile(&quiet, 0.99) * 20 + Duration::from_secs(1);
    assert!(
        percentile(&flooded, 0.99) <= bound,
        "legitimate calls slowed beyond {bound:?} by the flood"
    );
    // Another address with a mistyped key is told it is wrong, not to back off.
    let last = if key.ends_with('x') { 'y' } else { 'x' };
    let typo = format!("{}{last}", &key[..key.len() - 1]);
    assert_eq!(embed(&legit, &gateway.url, &typo).await.status(), 401);
    gateway.stop().await;
}

/// How long before the outage the key is revoked: past the revocation bound (SPEC §4: 1 s),
/// so the replica could have learned of it.
const REVOKED_BEFORE_OUTAGE: Duration = Duration::from_secs(3);
/// Calls tried with each key while the store is down.
const OUTAGE_CALLS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_before_a_store_outage_stays_refused_through_it() {
    let pg = ThrowawayPostgres::start();
    let stub = StubWorker::start().await;
    let gateway =
        RunningGateway::start(gateway_config(&pg.url, std::slice::from_ref(&stub.url))).await;
    let (revoked, revoked_id) = gateway.tenant_with_key("revoked", NewKey::default()).await;
    let (kept, _) = gateway.tenant_with_key("kept", NewKey::default()).await;
    let http = reqwest::Client::new();
    // Both keys are served, and so in the replica's cache.
    until_served(&http, &gateway.url, &revoked).await;
    until_served(&http, &gateway.url, &kept).await;

    assert!(gateway.tenants.revoke_key(&revoked_id).await.unwrap());
    // The revoked key is not used again before the outage: nothing makes the replica look
    // it up, as an attacker holding a leaked key would wait for an outage.
    tokio::time::sleep(REVOKED_BEFORE_OUTAGE).await;
    pg.stop_server();
    println!("postgres stopped");

    let mut statuses = Vec::new();
    for _ in 0..OUTAGE_CALLS {
        let revoked_status = embed(&http, &gateway.url, &revoked).await.status().as_u16();
        let kept_status = embed(&http, &gateway.url, &kept).await.status().as_u16();
        statuses.push((revoked_status, kept_status));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("during the outage (revoked, kept): {statuses:?}");
    assert!(
        statuses.iter().all(|(revoked, _)| *revoked == 401),
        "the revoked key was served from the outage cache: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|(_, kept)| *kept == 200),
        "the key still valid should be served from the cache during the outage: {statuses:?}"
    );

    pg.start_server();
    println!("postgres started");
    let status = embed(&http, &gateway.url, &revoked).await.status();
    assert_eq!(status, 401);
    gateway.stop().await;
}
