//! How long the gateway waits on a worker: a streamed call's head within the first-byte
//! timeout, a whole non-streamed reply (whose head a worker sends only once generation is
//! done) within the total timeout; past either the client gets a 504.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use billing::UsageStatus;
use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL};
use e2e_tests::{gateway_config, request_id, RunningGateway, TempSqlite};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_long_whole_reply_is_awaited_to_the_total_timeout_a_silent_stream_to_the_first_byte() {
    let stub = StubWorker::start().await;
    let store = TempSqlite::new();
    let mut config = gateway_config(&store.url, std::slice::from_ref(&stub.url));
    config.upstream_first_byte_timeout_secs = 1;
    config.upstream_timeout_secs = 4;
    let gw = RunningGateway::start(config).await;
    let (key, _) = gw
        .tenant_with_key("slow", gateway::tenants::NewKey::default())
        .await;
    let http = reqwest::Client::new();
    let call = |delay_ms: u64, stream: bool| {
        let body = json!({"model": STUB_CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 5, "stream": stream, "user": format!("stub_delay_ms={delay_ms}")});
        http.post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };

    // Longer than the first-byte timeout, within the total: answered and billed.
    let slow = call(2_000, false).await.unwrap();
    assert_eq!(slow.status(), 200);
    let id = request_id(&slow);
    let reply: serde_json::Value = slow.json().await.unwrap();
    assert_eq!(reply["usage"]["completion_tokens"], 5, "{reply}");
    let record = gw.usage_record(&id).await.expect("recorded");
    assert_eq!(record.status, UsageStatus::Success);
    assert_eq!(record.completion_tokens, 5);

    // Past the total timeout.
    let late = call(6_000, false).await.unwrap();
    assert_eq!(late.status(), 504);
    let error: serde_json::Value = late.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_timeout", "{error}");

    // A stream whose head does not come within the first-byte timeout.
    let silent = call(2_000, true).await.unwrap();
    assert_eq!(silent.status(), 504);
    gw.stop().await;
}
