//! SPEC §6.1 under `kill -9`: a gateway process is killed at random moments during load,
//! ten times, and restarted on the same spool and store. Afterwards every response that
//! reached a client as a success has exactly one usage record, and the only extra records
//! are requests that were in flight at a crash, marked `unknown`. It holds with the default
//! spool (an fsync before each response) and with an fsync interval (usage written to the
//! operating system before each response, which a killed process cannot take back), there
//! with segments small enough that kills land around the moves from one to the next,
//! and on SQLite and on Postgres. The load mixes embeddings, chat calls and streams, and
//! every record of a success must hold the tokens its client was told, not only exist.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use billing::{Db, Delivery, UsageStatus};
use e2e_tests::{
    request_id, wait_until, GatewayProcess, TempPostgres, TempSqlite, WorkerProcess, CHAT_MODEL,
    EMBEDDING_MODEL,
};
use gateway::tenants::{NewKey, TenantStore};
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::Row;

const KILLS: usize = 10;
const CLIENTS: usize = 8;

#[derive(Default)]
struct Observed {
    /// Each success's request id and the (prompt, completion) tokens its client was told.
    successes: Mutex<HashMap<String, (i64, i64)>>,
    /// When each success completed at the client.
    completed_at: Mutex<Vec<Instant>>,
    /// Requests that were sent and then broke (the gateway died under them).
    broken: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_during_load_loses_and_duplicates_nothing() {
    let store = TempSqlite::new();
    kill_nine_during_load(&store.url, store.dir(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_during_load_on_postgres_loses_and_duplicates_nothing() {
    let store = TempPostgres::new().await;
    let spool = TempSqlite::new();
    kill_nine_during_load(&store.url, spool.dir(), &[]).await;
}

/// With segments of 4 KiB the spool moves on to a new one every few dozen calls, so kills
/// also land while a finished segment's fsyncs are still left to the sync thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_with_an_fsync_interval_and_small_segments_loses_and_duplicates_nothing() {
    let store = TempSqlite::new();
    kill_nine_during_load(
        &store.url,
        store.dir(),
        &[
            "--spool-fsync-interval-ms",
            "10",
            "--spool-segment-bytes",
            "4096",
        ],
    )
    .await;
}

/// What client `c` sends as its `n`th call: embeddings, a chat call, or a stream that asks
/// for its usage.
fn call(c: usize, n: u64) -> (&'static str, serde_json::Value) {
    let text = format!("client {c} request {n}");
    match c % 4 {
        0 | 1 => (
            "/v1/embeddings",
            json!({"model": EMBEDDING_MODEL, "input": text}),
        ),
        2 => (
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}],
                   "max_tokens": 3, "temperature": 0}),
        ),
        _ => (
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}],
                   "max_tokens": 3, "temperature": 0, "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
    }
}

/// The usage a whole response body told its client: a JSON reply's `usage`, or a stream's
/// usage chunk if the stream ended with `[DONE]`; `None` for a stream cut short.
fn told_usage(body: &[u8]) -> Option<(i64, i64)> {
    let usage = |u: &serde_json::Value| {
        Some((
            u["prompt_tokens"].as_i64()?,
            u["completion_tokens"].as_i64().unwrap_or(0),
        ))
    };
    let text = std::str::from_utf8(body).ok()?;
    if !text.starts_with("data: ") {
        return usage(&serde_json::from_str::<serde_json::Value>(text).ok()?["usage"]);
    }
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    if events.last() != Some(&"data: [DONE]") {
        return None;
    }
    events.iter().rev().find_map(|e| {
        let chunk: serde_json::Value = serde_json::from_str(e.strip_prefix("data: ")?).ok()?;
        usage(&chunk["usage"])
    })
}

async fn kill_nine_during_load(database_url: &str, dir: &std::path::Path, gateway_args: &[&str]) {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos seed {seed} (set CHAOS_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let worker = WorkerProcess::start().await;
    let spool_dir = dir.join("spool");
    let db = Db::connect(database_url).await.unwrap();
    let tenants = TenantStore::new(db.clone());
    let tenant = tenants.create_tenant("chaos").await.unwrap();
    let (key, _) = tenants
        .create_key(&tenant.id, &NewKey::default())
        .await
        .unwrap();
    let key = key.expose().to_owned();
    let workers = vec![worker.url.clone()];

    let mut gateway =
        GatewayProcess::start_with(database_url, &spool_dir, &workers, gateway_args).await;
    let current_url = Arc::new(RwLock::new(gateway.url.clone()));
    let observed = Arc::new(Observed::default());
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (url, observed, stop, http, key) = (
            current_url.clone(),
            observed.clone(),
            stop.clone(),
            http.clone(),
            key.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let base = url.read().unwrap().clone();
                let (path, body) = call(c, n);
                let sent = http
                    .post(format!("{base}{path}"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status() == 200 => {
                        let id = request_id(&response);
                        // A success is a whole body received.
                        // A stream is whole when it ends with `[DONE]`.
                        match response.bytes().await.ok().as_deref().map(told_usage) {
                            Some(Some(usage)) => {
                                observed.successes.lock().unwrap().insert(id, usage);
                                observed.completed_at.lock().unwrap().push(Instant::now());
                            }
                            _ => {
                                observed.broken.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(response) => panic!("unexpected status {}", response.status()),
                    // Refused: the gateway is down and nothing was sent.
                    Err(e) if e.is_connect() => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(_) => {
                        observed.broken.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let mut kills = Vec::new();
    for round in 0..KILLS {
        let wait = Duration::from_millis(rng.random_range(300..1500));
        tokio::time::sleep(wait).await;
        gateway.kill();
        kills.push(Instant::now());
        println!("round {round}: killed after {wait:?}");
        gateway =
            GatewayProcess::start_with(database_url, &spool_dir, &workers, gateway_args).await;
        *current_url.write().unwrap() = gateway.url.clone();
    }
    // The last gateway serves some of the load before it stops gracefully.
    let restarted = Instant::now();
    wait_until(
        "calls served by the last gateway",
        Duration::from_secs(30),
        || async {
            let completed = observed.completed_at.lock().unwrap();
            completed
                .iter()
                .rev()
                .take_while(|at| **at > restarted)
                .count()
                >= CLIENTS
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    // A graceful stop ships everything left in the spool.
    assert!(gateway.terminate().success());

    let successes = observed.successes.lock().unwrap().clone();
    let broken = observed.broken.load(Ordering::Relaxed);
    let rows = sqlx::query(
        "SELECT request_id, status, delivery, prompt_tokens, completion_tokens FROM usage_records",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut recorded = HashSet::new();
    let mut unknown = 0u64;
    let mut checked = [0usize; 2];
    for row in &rows {
        let id: String = row.get("request_id");
        let status: String = row.get("status");
        let delivery: String = row.get("delivery");
        assert_eq!(UsageStatus::parse(&status), Some(UsageStatus::Success));
        // The record holds what its client was told (the id alone is unique by the key).
        let tokens: (i64, i64) = (row.get("prompt_tokens"), row.get("completion_tokens"));
        if let Some(told) = successes.get(&id) {
            assert_eq!(
                tokens, *told,
                "{id}: recorded tokens differ from the reply's"
            );
            checked[usize::from(told.1 > 0)] += 1;
        }
        match Delivery::parse(&delivery).unwrap() {
            Delivery::Unknown => unknown += 1,
            Delivery::Undelivered => {
                assert!(!successes.contains_key(&id), "a success marked undelivered")
            }
            Delivery::Delivered => {}
        }
        recorded.insert(id);
    }
    println!(
        "tokens checked against the client's: {} embeddings, {} chats and streams",
        checked[0], checked[1]
    );
    assert!(checked[1] > 0, "no chat call or stream succeeded");
    println!(
        "{} successes, {} broken in flight, {} records ({} unknown)",
        successes.len(),
        broken,
        rows.len(),
        unknown
    );
    assert!(
        successes.len() > 100,
        "the load generator made too little progress"
    );
    let missing: Vec<&String> = successes
        .keys()
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} successful responses have no record: {missing:?}",
        missing.len()
    );
    let extra = rows.len() as u64 - successes.len() as u64;
    assert!(
        extra <= broken,
        "{extra} records beyond the successes, but only {broken} requests broke in flight"
    );
    // `unknown` marks requests in flight at a crash: at most one per client, plus the
    // responses completed within the delivery settle window before it (their delivery was
    // not yet confirmed; 100 ms more allows for scheduling).
    let window = billing::spool::DELIVERY_SETTLE + Duration::from_millis(100);
    let settling = observed
        .completed_at
        .lock()
        .unwrap()
        .iter()
        .filter(|done| kills.iter().any(|k| *k >= **done && *k - **done <= window))
        .count();
    let bound = (KILLS * CLIENTS + settling) as u64;
    assert!(
        unknown <= bound,
        "{unknown} records marked unknown; bound {bound}"
    );
    for row in &rows {
        let id: String = row.get("request_id");
        let delivery: String = row.get("delivery");
        if !successes.contains_key(&id) {
            assert_ne!(
                delivery, "delivered",
                "{id} never reached its client but is marked delivered"
            );
        }
    }
}
