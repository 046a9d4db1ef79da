//! Admission while the store is down (Postgres, a throwaway cluster this test owns, is
//! stopped): each kind of limit takes its configured failure mode. By default a request
//! under a monthly quota is refused with 503 and `retry-after` (the quota holds through the
//! outage) while one under a rate limit only is admitted unchecked; a replica configured
//! the other way round does the opposite. After the store is back both are admitted again.
//!
//! Keys are seen once (`GET /v1/models`) before the outage so that authentication answers
//! from its cache, and no limited call is made before it so that no quota lease can admit
//! from memory: every call below needs the store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL};
use e2e_tests::{gateway_config, metric, wait_for, RunningGateway, ThrowawayPostgres};
use gateway::limits::{Limits, StoreFailure};
use gateway::GatewayConfig;
use serde_json::{json, Value};

/// The most the test waits for the store to be reachable again after it restarts.
const LIMIT: Duration = Duration::from_secs(60);

async fn key_on_plan(gw: &RunningGateway, name: &str, limits: Limits) -> String {
    gw.tenant_on_plan(name, limits, Limits::default()).await.1
}

/// One chat call's status, `retry-after` and error code.
async fn call(
    http: &reqwest::Client,
    gw: &RunningGateway,
    key: &str,
) -> (u16, Option<String>, String) {
    let r = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(&json!({"model": STUB_CHAT_MODEL, "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, retry, code)
}

/// Waits until a call is answered with something other than 503 (the store reconnecting);
/// returns that answer.
async fn answer_once_store_back(
    http: &reqwest::Client,
    gw: &RunningGateway,
    key: &str,
) -> (u16, Option<String>, String) {
    wait_for("admission after the outage", LIMIT, || async {
        let answer = call(http, gw, key).await;
        (answer.0 != 503).then_some(answer)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_while_postgres_is_down_follows_each_limits_failure_mode() {
    let pg = ThrowawayPostgres::start();
    let stub = StubWorker::start().await;
    let workers = std::slice::from_ref(&stub.url);
    // The defaults: quota and spend cap fail closed, rates and concurrency open.
    let defaults = RunningGateway::start(gateway_config(&pg.url, workers)).await;
    let reversed = RunningGateway::start(GatewayConfig {
        quota_on_store_error: StoreFailure::FailOpen,
        spend_cap_on_store_error: StoreFailure::FailOpen,
        rates_on_store_error: StoreFailure::FailClosed,
        concurrency_on_store_error: StoreFailure::FailClosed,
        ..gateway_config(&pg.url, workers)
    })
    .await;
    let quota = Limits {
        monthly_tokens: Some(1_000_000),
        ..Default::default()
    };
    let rate = Limits {
        requests_per_minute: Some(1_000),
        ..Default::default()
    };
    let quota_key = key_on_plan(&defaults, "quota", quota).await;
    let rate_key = key_on_plan(&defaults, "rate", rate).await;
    let http = reqwest::Client::new();
    for gw in [&defaults, &reversed] {
        for key in [&quota_key, &rate_key] {
            let r = http
                .get(format!("{}/v1/models", gw.url))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }

    pg.stop_server();
    // Defaults: the quota holds (refused until the store answers), the rate gives way.
    // Postgres has stopped (`pg_ctl -w`): the first call that needs it meets the outage.
    let (status, retry, code) = call(&http, &defaults, &quota_key).await;
    println!("quota, fail_closed, store down: {status} retry-after {retry:?} {code}");
    assert_eq!(status, 503, "a quota call in an outage: {code}");
    assert_eq!(code, "limits_unavailable");
    let retry: u64 = retry.expect("retry-after on 503").parse().unwrap();
    assert!((1..=120).contains(&retry), "retry-after {retry}");
    let (status, _, code) = call(&http, &defaults, &rate_key).await;
    println!("rate, fail_open, store down: {status}");
    assert_eq!(status, 200, "a rate-limited call in an outage: {code}");
    // Each refusal is the same while the store is down, not only the first.
    for _ in 0..3 {
        assert_eq!(call(&http, &defaults, &quota_key).await.0, 503);
    }

    // Reversed: the quota gives way, the rate holds.
    let (status, _, code) = call(&http, &reversed, &rate_key).await;
    println!("rate, fail_closed, store down: {status} {code}");
    assert_eq!(status, 503, "a rate-limited call in an outage: {code}");
    assert_eq!(code, "limits_unavailable");
    let (status, _, code) = call(&http, &reversed, &quota_key).await;
    println!("quota, fail_open, store down: {status}");
    assert_eq!(status, 200, "a quota call in an outage, fail_open: {code}");

    for (gw, mode) in [(&defaults, "defaults"), (&reversed, "reversed")] {
        let closed = metric(
            &http,
            &gw.metrics_url,
            "gateway_admission_fail_closed_total",
        )
        .await;
        let open = metric(&http, &gw.metrics_url, "gateway_admission_fail_open_total").await;
        println!("{mode}: {closed} refused closed, {open} admitted open");
        assert!(closed >= 1.0 && open >= 1.0, "{mode}: {closed} {open}");
    }

    // The store back: every call is checked and admitted again.
    pg.start_server();
    for gw in [&defaults, &reversed] {
        for key in [&quota_key, &rate_key] {
            let (status, _, code) = answer_once_store_back(&http, gw, key).await;
            assert_eq!(status, 200, "after the outage: {code}");
        }
    }
    defaults.stop().await;
    reversed.stop().await;
}
