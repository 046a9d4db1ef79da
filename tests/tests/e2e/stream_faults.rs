//! Streams that end badly are still billed exactly: a client that leaves mid-stream stops
//! the worker's generation and is billed for what was delivered; a worker killed
//! mid-stream ends the client's stream with an error event and is billed likewise.
//!
//! With the real model a client cannot know how many tokens the gateway wrote after it
//! stopped reading, so those tests check bounds; the stub's cut streams send a known
//! number of one-token deltas and then stall or break, so the client has read everything
//! delivered and the record must equal it exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::time::Duration;

use billing::{Delivery, UsageStatus};
use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL, STUB_PROMPT_TOKENS};
use e2e_tests::{
    gateway_config, metric, open_stream, read_deltas, RunningGateway, Stack, TempSqlite, CHAT_MODEL,
};
use futures::StreamExt;
use serde_json::json;

/// Waits until the stack's worker has stopped a generation its client left.
async fn until_the_worker_stops(s: &Stack) {
    let url = format!("{}/metrics", s.worker.url);
    e2e_tests::wait::wait_until(
        "the worker stops generating",
        Duration::from_secs(10),
        || async { metric(&s.http, &url, "worker_cancelled_generations_total").await >= 1.0 },
    )
    .await;
}

fn long_stream() -> serde_json::Value {
    json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
           "max_tokens": 2000, "temperature": 0, "stream": true})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_stops_the_worker_and_is_billed_for_what_it_got() {
    let s = Stack::start("leaver").await;
    let (request_id, mut stream) = open_stream(&s.gateway.url, &s.key, long_stream()).await;
    let seen = read_deltas(&mut stream, 5).await;
    drop(stream);

    until_the_worker_stops(&s).await;
    let record = s
        .gateway
        .usage_record(&request_id)
        .await
        .expect("a cut stream is recorded");
    assert_eq!(record.status, UsageStatus::ClientCancelled);
    assert_eq!(record.delivery, Delivery::Delivered);
    let deltas = seen.matches("\"content\"").count() as i64 - 1;
    assert!(record.prompt_tokens > 0);
    assert!(
        record.completion_tokens >= deltas && record.completion_tokens < 200,
        "{} tokens billed for {deltas} deltas received",
        record.completion_tokens
    );
    s.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_stream_ends_the_stream_with_an_error_and_is_billed() {
    let mut s = Stack::start("orphan").await;
    let (request_id, mut stream) = open_stream(&s.gateway.url, &s.key, long_stream()).await;
    let mut seen = read_deltas(&mut stream, 5).await;
    s.worker.kill();
    while let Some(chunk) = stream.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let last = seen.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("data: {\"error\""), "last event: {last}");
    assert!(!seen.contains("[DONE]"));

    let record = s.gateway.usage_record(&request_id).await.expect("recorded");
    assert_eq!(record.status, UsageStatus::UpstreamFailed);
    assert!(record.prompt_tokens > 0 && record.completion_tokens >= 5);
    s.gateway.stop().await;
}

/// Content deltas (after the role delta) in the SSE text a client read.
fn content_deltas(seen: &str) -> i64 {
    seen.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count() as i64
}

/// A stub stream of `deltas` one-token deltas ending by `end`: returns the record and the
/// SSE text the client read (all of it when `read_to_end`, else until the last delta).
async fn cut_stub_stream(
    deltas: u64,
    end: &str,
    read_to_end: bool,
) -> (billing::UsageEvent, String) {
    let stub = StubWorker::start().await;
    let store = TempSqlite::new();
    let gw =
        RunningGateway::start(gateway_config(&store.url, std::slice::from_ref(&stub.url))).await;
    let (key, _) = gw
        .tenant_with_key("cut", gateway::tenants::NewKey::default())
        .await;
    let body = json!({"model": STUB_CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 500, "stream": true, "user": format!("stub_deltas={deltas};stub_end={end}")});
    let (request_id, mut stream) = open_stream(&gw.url, &key, body).await;
    let mut seen = read_deltas(&mut stream, deltas as usize).await;
    if read_to_end {
        while let Some(chunk) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    }
    drop(stream);
    let record = gw.usage_record(&request_id).await.expect("recorded");
    gw.stop().await;
    (record, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_is_billed_exactly_the_tokens_it_received() {
    for deltas in [1, 7, 23] {
        let (record, seen) = cut_stub_stream(deltas, "stall", false).await;
        let received = content_deltas(&seen);
        assert_eq!(received, deltas as i64, "{seen}");
        assert_eq!(record.status, UsageStatus::ClientCancelled);
        assert_eq!(
            (record.prompt_tokens, record.completion_tokens),
            (STUB_PROMPT_TOKENS as i64, received),
            "billed for {received} one-token deltas received"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_upstream_is_billed_exactly_the_tokens_the_client_received() {
    for deltas in [1, 9] {
        let (record, seen) = cut_stub_stream(deltas, "break", true).await;
        let last = seen.trim_end().rsplit("\n\n").next().unwrap();
        assert!(last.starts_with("data: {\"error\""), "last event: {last}");
        let received = content_deltas(&seen);
        assert_eq!(received, deltas as i64, "{seen}");
        assert_eq!(record.status, UsageStatus::UpstreamFailed);
        assert_eq!(
            (record.prompt_tokens, record.completion_tokens),
            (STUB_PROMPT_TOKENS as i64, received),
            "billed for {received} one-token deltas received"
        );
    }
}

/// The Responses API's stream goes the chat path: a client that leaves is billed for what
/// it was delivered, and the worker stops.
#[tokio::test(flavor = "multi_thread")]
async fn a_responses_stream_cut_by_the_client_is_billed_for_what_was_delivered() {
    let s = Stack::start("responses-leaver").await;
    let response = s
        .post(
            "/v1/responses",
            json!({"model": CHAT_MODEL, "input": "Write a very long story.", "max_output_tokens": 2000,
                   "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = e2e_tests::request_id(&response);
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches("event: response.output_text.delta").count() < 5 {
        seen.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    drop(stream);
    let deltas = seen.matches("event: response.output_text.delta").count() as i64;
    assert!(seen.starts_with("event: response.created\n"), "{seen}");
    assert!(
        !seen.contains(": usage"),
        "usage comments reached the client: {seen}"
    );

    until_the_worker_stops(&s).await;
    let record = s
        .gateway
        .usage_record(&request_id)
        .await
        .expect("a cut stream is recorded");
    assert_eq!(record.endpoint, "/v1/responses");
    assert_eq!(record.status, UsageStatus::ClientCancelled);
    assert!(
        record.completion_tokens >= deltas && record.completion_tokens < 200,
        "{} tokens billed for {deltas} deltas received",
        record.completion_tokens
    );
    s.gateway.stop().await;
}
