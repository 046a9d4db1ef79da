//! A worker killed under load of non-streamed calls: nothing had reached any client, so
//! every call is retried on the other worker and succeeds, and each is billed once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e_tests::{
    gateway_config, metric, request_id, wait_until, RunningGateway, TempSqlite, WorkerProcess,
    CHAT_MODEL, EMBEDDING_MODEL,
};
use gateway::tenants::NewKey;
use serde_json::{json, Value};

/// Calls answered before the kill, and after it before the load stops.
const WARM_UP_CALLS: u64 = 12;
const AFTER_KILL_CALLS: u64 = 24;
/// The most either phase of the load may take.
const LOAD_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_worker_under_load_fails_no_retryable_request() {
    let mut doomed = WorkerProcess::start().await;
    let survivor = WorkerProcess::start().await;
    let store = TempSqlite::new();
    let gateway = RunningGateway::start(gateway_config(
        &store.url,
        &[doomed.url.clone(), survivor.url.clone()],
    ))
    .await;
    let (key, _) = gateway.tenant_with_key("failover", NewKey::default()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..6 {
        let (url, key, stop, answered) = (
            gateway.url.clone(),
            key.clone(),
            stop.clone(),
            answered.clone(),
        );
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut outcomes: Vec<(u16, String, String)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (path, body) = if (c + i) % 3 != 0 {
                    (
                        "/v1/embeddings",
                        json!({"model": EMBEDDING_MODEL, "input": format!("sentence {c} {i}")}),
                    )
                } else {
                    (
                        "/v1/chat/completions",
                        json!({"model": CHAT_MODEL, "max_tokens": 6,
                               "messages": [{"role": "user", "content": format!("Count to {i}.")}]}),
                    )
                };
                let r = http
                    .post(format!("{url}{path}"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let id = request_id(&r);
                let text = r.text().await.unwrap();
                outcomes.push((status, id, text));
                answered.fetch_add(1, Ordering::Relaxed);
            }
            outcomes
        }));
    }
    // Kill the worker while it has calls in hand, once the load has run a while.
    let http = reqwest::Client::new();
    let doomed_series = |name: &str| format!("{name}{{worker=\"{}\"}}", doomed.url);
    let doomed_outstanding = doomed_series("gateway_worker_outstanding_requests");
    let doomed_up = doomed_series("gateway_worker_up");
    wait_until(
        "calls in flight on the doomed worker",
        LOAD_LIMIT,
        || async {
            answered.load(Ordering::Relaxed) >= WARM_UP_CALLS
                && metric(&http, &gateway.metrics_url, &doomed_outstanding).await >= 1.0
        },
    )
    .await;
    doomed.kill();
    // Keep the load on until the gateway has seen the worker gone and served more calls.
    wait_until("the killed worker marked down", LOAD_LIMIT, || async {
        metric(&http, &gateway.metrics_url, &doomed_up).await == 0.0
    })
    .await;
    let answered_at_down = answered.load(Ordering::Relaxed);
    wait_until("calls served after the kill", LOAD_LIMIT, || async {
        answered.load(Ordering::Relaxed) >= answered_at_down + AFTER_KILL_CALLS
    })
    .await;
    stop.store(true, Ordering::Relaxed);

    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.extend(c.await.unwrap());
    }
    let failures: Vec<_> = outcomes.iter().filter(|(s, _, _)| *s != 200).collect();
    let retries = metric(
        &reqwest::Client::new(),
        &gateway.metrics_url,
        "gateway_upstream_retries_total",
    )
    .await;
    println!(
        "{} calls, {} failed; retries {retries}",
        outcomes.len(),
        failures.len(),
    );
    assert!(failures.is_empty(), "failed calls: {failures:?}");
    // The kill hit traffic: some calls had to go to the other worker.
    assert!(retries >= 1.0, "no call was retried");

    // Every success is billed once, for the usage its client saw.
    for (_, id, text) in &outcomes {
        let body: Value = serde_json::from_str(text).unwrap();
        let record = gateway.usage_record(id).await.expect("usage recorded");
        assert_eq!(
            (record.prompt_tokens, record.completion_tokens),
            (
                body["usage"]["prompt_tokens"].as_i64().unwrap(),
                // An embedding's reply states no completion tokens; a chat's must.
                match body.get("choices") {
                    Some(_) => body["usage"]["completion_tokens"].as_i64().unwrap(),
                    None => 0,
                }
            ),
            "{id}: the record's tokens differ from the reply's"
        );
    }
    let records = billing::Ledger::new(gateway.db.clone())
        .for_tenant(
            &gateway
                .tenants
                .tenant_by_name("failover")
                .await
                .unwrap()
                .unwrap()
                .id,
        )
        .await
        .unwrap();
    assert_eq!(records.len(), outcomes.len());
    gateway.stop().await;
}
