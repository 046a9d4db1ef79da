//! Metric labels a client cannot choose: 10,000 calls naming random models (and random
//! paths) leave the gateway's `/metrics` series count flat. A label taken from the request
//! would add series, and memory, per distinct name (SPEC §9).
//!
//! The upstream is the stub: the test is about the gateway's metrics, not the models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL, STUB_EMBEDDING_MODEL};
use e2e_tests::{gateway_config, scrape, wait_until, RunningGateway, TempSqlite};
use futures::StreamExt;
use gateway::tenants::NewKey;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Value};

/// Calls made with made-up names, and how many run at once.
const CALLS: usize = 10_000;
const CONCURRENCY: usize = 32;

/// The forwarded endpoints, each with a body naming `model`.
fn call(endpoint: usize, model: &str) -> (&'static str, Value) {
    match endpoint % 3 {
        0 => (
            "/v1/chat/completions",
            json!({"model": model, "max_tokens": 4,
                   "messages": [{"role": "user", "content": "hi"}]}),
        ),
        1 => ("/v1/embeddings", json!({"model": model, "input": "hi"})),
        _ => (
            "/v1/classify",
            json!({"model": model, "input": "hi", "labels": ["a", "b"]}),
        ),
    }
}

/// The number of series (sample lines) in a scrape.
fn series(scrape: &str) -> usize {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

fn random_name() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_model_names_leave_the_series_count_flat() {
    let stub = StubWorker::start().await;
    let store = TempSqlite::new();
    let gw =
        RunningGateway::start(gateway_config(&store.url, std::slice::from_ref(&stub.url))).await;
    let (key, _) = gw.tenant_with_key("labels", NewKey::default()).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: &Value| {
        http.post(format!("{}{path}", gw.url))
            .bearer_auth(&key)
            .json(body)
            .send()
    };

    wait_until(
        "the pool knows the stub's models",
        Duration::from_secs(10),
        || async {
            post("/v1/chat/completions", &call(0, STUB_CHAT_MODEL).1)
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    // A first call of each kind: a served model, an unknown one, an unknown path. These
    // may each create their series once.
    assert_eq!(
        post("/v1/embeddings", &call(1, STUB_EMBEDDING_MODEL).1)
            .await
            .unwrap()
            .status(),
        200
    );
    for endpoint in 0..3 {
        let (path, body) = call(endpoint, &random_name());
        let status = post(path, &body).await.unwrap().status();
        assert_eq!(status, 404, "{path} with an unknown model");
    }
    let unknown_path = format!("/v1/{}", random_name());
    assert_eq!(post(&unknown_path, &json!({})).await.unwrap().status(), 404);

    let before = series(&scrape(&http, &gw.metrics_url).await);
    let started = Instant::now();
    let statuses: Vec<u16> = futures::stream::iter(0..CALLS)
        .map(|i| {
            let name = random_name();
            let (path, body) = call(i, &name);
            // One call in ten goes to a made-up path instead.
            let path = if i % 10 == 9 {
                format!("/v1/{name}")
            } else {
                path.to_owned()
            };
            let request = post(&path, &body);
            async move { request.await.map_or(0, |r| r.status().as_u16()) }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let text = scrape(&http, &gw.metrics_url).await;
    let after = series(&text);
    eprintln!(
        "{CALLS} calls with random model names in {elapsed:?}: /metrics series {before} -> {after}"
    );
    assert!(
        statuses.iter().all(|s| *s == 404),
        "every call with a made-up name is a 404: {:?}",
        statuses.iter().find(|s| **s != 404)
    );
    assert!(
        after <= before + 4,
        "the series count grew from {before} to {after} with client-chosen names"
    );
    assert!(
        text.contains("model=\"other\""),
        "unknown models are counted as `other`"
    );
    assert!(
        text.contains(&format!("model=\"{STUB_CHAT_MODEL}\"")),
        "served models keep their own label"
    );
    gw.stop().await;
}
