//! Streams that end badly are still billed exactly: a client that leaves mid-stream stops
//! the worker's generation and is billed for what was delivered; a worker killed
//! mid-stream ends the client's stream with an error event and is billed likewise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::time::{Duration, Instant};

use billing::{Delivery, UsageStatus};
use e2e_tests::{metric, open_stream, read_deltas, Stack, CHAT_MODEL};
use futures::StreamExt;
use serde_json::json;

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

    let started = Instant::now();
    while metric(
        &s.http,
        &format!("{}/metrics", s.worker.url),
        "worker_cancelled_generations_total",
    )
    .await
        < 1.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the worker kept generating"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
