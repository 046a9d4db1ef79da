//! Workers discovered by DNS: `dns+http://name:port` routes to whatever `name` resolves to.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL};
use e2e_tests::{gateway_config, RunningGateway, TempSqlite};
use gateway::tenants::NewKey;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_named_by_dns_are_discovered_and_used() {
    let stub = StubWorker::start().await;
    let port = stub.url.rsplit(':').next().unwrap().to_owned();
    let store = TempSqlite::new();
    let gw = RunningGateway::start(gateway_config(
        &store.url,
        &[format!("dns+http://localhost:{port}")],
    ))
    .await;
    let (key, _) = gw.tenant_with_key("dns", NewKey::default()).await;
    let http = reqwest::Client::new();
    let models: serde_json::Value = http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == STUB_CHAT_MODEL),
        "{models}"
    );
    let r = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(&json!({"model": STUB_CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let scrape = e2e_tests::scrape(&http, &gw.metrics_url).await;
    assert!(
        scrape.contains(&format!(
            "gateway_worker_up{{worker=\"http://127.0.0.1:{port}\"}} 1"
        )),
        "{scrape}"
    );
    gw.stop().await;
}
