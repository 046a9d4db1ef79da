//! The monthly quota and spend cap against calls whose body does not bound their use: no
//! `max_tokens`, `max_tokens` beyond the context, prompts near and past the context, and
//! streams the client cuts short — on the real worker and model, two clients at once.
//!
//! The worker runs with a small context (`--max-context`) so that a call without
//! `max_tokens` runs to it in seconds, and the gateway's default completion reserve is set
//! below that context, as the shipped default (4,096) is below the model's own (8,192).
//! A call's reservation must be the worker's true bound whatever that setting says: the
//! tokens used never pass the quota (the documented overshoot is zero while the store
//! answers), and what the quota counters charged equals what the ledger records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use e2e_tests::{
    gateway_config, wait_until, RunningGateway, TempSqlite, WorkerProcess, CHAT_MODEL,
};
use futures::StreamExt;
use gateway::limits::Limits;
use gateway::GatewayConfig;
use serde_json::{json, Value};
use sqlx::Row;

/// The worker's context: the most tokens one call can use.
const CONTEXT: u64 = 256;
/// Below the context, as a misjudged setting would be: the bound must not rest on it.
const DEFAULT_RESERVE: i64 = 16;
const QUOTA_TOKENS: i64 = 1_500;
/// Calls sent at once in the burst, and its tenant's quota: room for all of them at the
/// body's bound with the default reserve (about 130 tokens each), for two at the context.
const BURST: usize = 4;
const BURST_QUOTA: i64 = 700;
/// 1 minor unit per 1,000 tokens in and out: 1,000 micros a token.
const MINOR_PER_MTOK: i64 = 1_000;
const CAP_MINOR: i64 = 1;
/// Calls each client makes, refused or not: a refusal of one kind does not stop another
/// kind whose bound is smaller from being tried.
const CALLS_PER_CLIENT: usize = 12;
const CLIENTS: usize = 2;
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// The calls the clients cycle through, cheapest first so that every kind runs.
fn kinds() -> Vec<(&'static str, Value)> {
    let story = "Write a very long story about a dragon and a knight.";
    let near = "The quick brown fox jumps over the lazy dog. ".repeat(15);
    let past = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let user = |text: &str| json!([{"role": "user", "content": text}]);
    vec![
        (
            "stream cut short",
            json!({"model": CHAT_MODEL, "temperature": 0, "stream": true, "messages": user(story)}),
        ),
        (
            "prompt past the context",
            json!({"model": CHAT_MODEL, "temperature": 0, "messages": user(&past)}),
        ),
        (
            "prompt near the context",
            json!({"model": CHAT_MODEL, "temperature": 0, "messages": user(&near)}),
        ),
        (
            "no max_tokens",
            json!({"model": CHAT_MODEL, "temperature": 0, "messages": user(story)}),
        ),
        (
            "max_tokens past the context",
            json!({"model": CHAT_MODEL, "temperature": 0, "max_tokens": 4 * CONTEXT, "messages": user(story)}),
        ),
    ]
}

/// What one client saw: successes (cut streams included), the limit's refusals.
#[derive(Default, Debug)]
struct Seen {
    ok: u64,
    refused: u64,
    too_long: u64,
}

/// Sends `CALLS_PER_CLIENT` calls, cycling through the kinds.
async fn client(url: String, key: String, offset: usize) -> Seen {
    let http = reqwest::Client::new();
    let kinds = kinds();
    let mut seen = Seen::default();
    for i in 0..CALLS_PER_CLIENT {
        let (kind, body) = &kinds[(i + offset) % kinds.len()];
        let r = http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(body)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 if body["stream"] == true => {
                // Three chunks, then the client leaves.
                let mut stream = r.bytes_stream();
                for _ in 0..3 {
                    stream.next().await.unwrap().unwrap();
                }
                seen.ok += 1;
            }
            200 => {
                let body: Value = r.json().await.unwrap();
                let total = body["usage"]["total_tokens"].as_u64().unwrap();
                println!("{kind}: {total} tokens");
                assert!(total <= CONTEXT, "{kind}: {total} tokens");
                seen.ok += 1;
            }
            400 => {
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "context_length_exceeded", "{kind}");
                seen.too_long += 1;
            }
            429 => {
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "insufficient_quota", "{kind}");
                seen.refused += 1;
            }
            s => panic!("{kind}: unexpected status {s}"),
        }
    }
    seen
}

/// `BURST` calls without `max_tokens` at once; returns how many were served.
async fn burst(url: &str, key: &str) -> u64 {
    let (_, body) = kinds().swap_remove(3);
    assert!(body.get("max_tokens").is_none() && body.get("stream").is_none());
    let calls: Vec<_> = (0..BURST)
        .map(|_| {
            let (url, key, body) = (url.to_owned(), key.to_owned(), body.clone());
            tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            })
        })
        .collect();
    let mut served = 0;
    for call in calls {
        match call.await.unwrap() {
            200 => served += 1,
            429 => {}
            s => panic!("burst: unexpected status {s}"),
        }
    }
    served
}

/// The tokens the ledger holds for a tenant once it has `records` records.
async fn ledger_tokens(gw: &RunningGateway, tenant_id: &str, records: u64) -> i64 {
    let ledger = billing::Ledger::new(gw.db.clone());
    wait_until("every success in the ledger", SETTLE_LIMIT, || async {
        ledger.for_tenant(tenant_id).await.unwrap().len() as u64 >= records
    })
    .await;
    ledger
        .for_tenant(tenant_id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum()
}

/// A tenant on a plan with `limits`; its id and a key.
async fn tenant(gw: &RunningGateway, name: &str, limits: Limits) -> (String, String) {
    gw.tenant_on_plan(name, limits, Limits::default()).await
}

/// Drives the clients to the tenant's limit; returns the ledger's (tokens, spend in
/// micros) for the tenant once every success is recorded.
async fn drain(
    gw: &RunningGateway,
    tenant_id: &str,
    key: &str,
    price: &billing::Price,
) -> (i64, i64) {
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(gw.url.clone(), key.to_owned(), c * 2)))
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    println!("clients: {seen:?}");
    assert!(
        seen.iter().any(|s| s.refused > 0),
        "the limit was never reached"
    );
    let ok: u64 = seen.iter().map(|s| s.ok).sum();
    let ledger = billing::Ledger::new(gw.db.clone());
    wait_until("every success in the ledger", SETTLE_LIMIT, || async {
        ledger.for_tenant(tenant_id).await.unwrap().len() as u64 >= ok
    })
    .await;
    let records = ledger.for_tenant(tenant_id).await.unwrap();
    assert_eq!(records.len() as u64, ok, "one record per success");
    let tokens = records
        .iter()
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum();
    let spend = records
        .iter()
        .map(|r| price.cost(1, r.prompt_tokens, r.completion_tokens).0)
        .sum();
    (tokens, spend)
}

/// What the tenant's counter charged: (used tokens, used spend, still reserved).
async fn charged(db: &billing::Db, tenant_id: &str) -> (i64, i64, i64) {
    let row = sqlx::query(&format!(
        "SELECT used_tokens, used_spend, reserved_tokens + reserved_spend AS held \
         FROM limit_counters WHERE scope = 't:{tenant_id}'"
    ))
    .fetch_one(db.pool())
    .await
    .unwrap();
    (
        row.try_get("used_tokens").unwrap(),
        row.try_get("used_spend").unwrap(),
        row.try_get("held").unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_body_does_not_bound_never_pass_the_quota_or_the_spend_cap() {
    let store = TempSqlite::new();
    let worker = WorkerProcess::start_with(&["--max-context", &CONTEXT.to_string()]).await;
    let models: Value = reqwest::get(format!("{}/v1/models", worker.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == CHAT_MODEL)
        .unwrap();
    assert_eq!(chat["context_length"], CONTEXT, "{models}");
    let gw = RunningGateway::start(GatewayConfig {
        default_completion_reserve: DEFAULT_RESERVE,
        price_refresh_ms: 100,
        ..gateway_config(&store.url, std::slice::from_ref(&worker.url))
    })
    .await;
    let price = billing::Price {
        model: CHAT_MODEL.into(),
        effective_from: 0,
        currency: "USD".into(),
        input_minor_per_mtok: MINOR_PER_MTOK,
        output_minor_per_mtok: MINOR_PER_MTOK,
        request_minor_per_mreq: 0,
        cached_input_minor_per_mtok: None,
        batch_discount_pct: None,
        tiers: Vec::new(),
    };

    // Calls without `max_tokens` at once: each may run to the context.
    let (burst_tenant, key) = tenant(
        &gw,
        "burst",
        Limits {
            monthly_tokens: Some(BURST_QUOTA),
            ..Default::default()
        },
    )
    .await;
    let served = burst(&gw.url, &key).await;
    let burst_tokens = ledger_tokens(&gw, &burst_tenant, served).await;
    println!("burst: quota {BURST_QUOTA}, {served} of {BURST} served, used {burst_tokens}");
    assert!(
        burst_tokens <= BURST_QUOTA,
        "a burst used {burst_tokens} of a {BURST_QUOTA}-token quota"
    );

    // Every kind, two clients, to the end of the quota.
    let (quota_tenant, key) = tenant(
        &gw,
        "quota",
        Limits {
            monthly_tokens: Some(QUOTA_TOKENS),
            ..Default::default()
        },
    )
    .await;
    let (tokens, _) = drain(&gw, &quota_tenant, &key, &price).await;
    println!("monthly tokens: quota {QUOTA_TOKENS}, used {tokens}");
    assert!(
        tokens <= QUOTA_TOKENS,
        "used {tokens} of a {QUOTA_TOKENS}-token quota"
    );

    billing::prices::add_price(&gw.db, &price).await.unwrap();
    wait_until(
        "the gateway charging the new price",
        SETTLE_LIMIT,
        || async {
            gw.prices
                .current()
                .at(CHAT_MODEL, billing::now_ms())
                .is_some()
        },
    )
    .await;
    let (spend_tenant, key) = tenant(
        &gw,
        "spend",
        Limits {
            monthly_spend_minor: Some(CAP_MINOR),
            ..Default::default()
        },
    )
    .await;
    let (_, spend) = drain(&gw, &spend_tenant, &key, &price).await;
    let cap = billing::Micros::from_minor(CAP_MINOR).0;
    println!("spend cap: {cap} micros, spent {spend}");
    assert!(spend <= cap, "spent {spend} micros of a {cap}-micro cap");

    // Stopped, the gateway has settled every call: the counters hold what was used, and
    // it is what the ledger bills.
    gw.stop().await;
    let db = billing::Db::connect(&store.url).await.unwrap();
    let (used, _, held) = charged(&db, &burst_tenant).await;
    assert_eq!(
        (used, held),
        (burst_tokens, 0),
        "burst counter against the ledger"
    );
    let (used, _, held) = charged(&db, &quota_tenant).await;
    assert_eq!(
        (used, held),
        (tokens, 0),
        "quota counter against the ledger"
    );
    let (_, used_spend, held) = charged(&db, &spend_tenant).await;
    assert_eq!(
        (used_spend, held),
        (spend, 0),
        "spend counter against the ledger"
    );
    db.close().await;
}
