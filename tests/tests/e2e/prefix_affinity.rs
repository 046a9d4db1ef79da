//! Routing for prefix-cache hits: with two real workers, every later turn of a
//! conversation goes to the worker that read its earlier turns, so its history comes from
//! that worker's prefix cache (`cached_tokens`), turn after turn.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use e2e_tests::{gateway_config, RunningGateway, TempSqlite, WorkerProcess, CHAT_MODEL};
use serde_json::{json, Value};

/// Asks each conversation's turns in order; the cached share of every later turn's prompt.
pub(crate) async fn later_turns_cached(
    gateway: &RunningGateway,
    key: &str,
    conversations: usize,
    turns: usize,
) -> Vec<f64> {
    let http = reqwest::Client::new();
    let mut shares = Vec::new();
    for c in 0..conversations {
        let mut messages = vec![json!({"role": "system",
            "content": format!("You are assistant number {c}. Answer every question about the sea in one short sentence, politely and precisely.")})];
        for t in 0..turns {
            messages.push(json!({"role": "user", "content": format!("Question {t}: tell me a fact about waves.")}));
            let v: Value = http
                .post(format!("{}/v1/chat/completions", gateway.url))
                .bearer_auth(key)
                .json(&json!({"model": CHAT_MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap() as f64;
            if t > 0 {
                shares.push(cached / prompt);
            }
            messages.push(v["choices"][0]["message"].clone());
        }
    }
    shares
}

#[tokio::test(flavor = "multi_thread")]
async fn later_turns_go_where_their_history_is_cached() {
    let (a, b) = (WorkerProcess::start().await, WorkerProcess::start().await);
    let store = TempSqlite::new();
    let gateway =
        RunningGateway::start(gateway_config(&store.url, &[a.url.clone(), b.url.clone()])).await;
    let (key, _) = gateway
        .tenant_with_key("affinity", Default::default())
        .await;
    let shares = later_turns_cached(&gateway, &key, 6, 3).await;
    println!("cached share of later turns' prompts: {shares:?}");
    // Each later turn's history (all but its new question) was read before, on that worker.
    assert!(shares.iter().all(|s| *s > 0.6), "{shares:?}");
    gateway.stop().await;
}
