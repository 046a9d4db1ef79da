//! Prefix-cache hit rate with two workers and 16 conversations at once (with a reader's
//! pause between turns), with the gateway's prefix affinity and without it (load alone),
//! side by side in one run.
//!
//! `cargo build --workspace --bins && MODELS_DIR=$PWD/models cargo run -p e2e-tests --example affinity_bench`

use e2e_tests::{gateway_config, RunningGateway, TempSqlite, WorkerProcess, CHAT_MODEL};
use serde_json::{json, Value};

const CONVERSATIONS: usize = 16;
const TURNS: usize = 4;

/// One conversation's later turns: (prompt tokens, cached tokens, the previous turn's prompt
/// tokens) each.
async fn conversation(url: String, key: String, c: usize) -> anyhow::Result<Vec<(u64, u64, u64)>> {
    let http = reqwest::Client::new();
    let mut messages = vec![json!({"role": "system",
        "content": format!("You are assistant number {c}. Answer every question about the sea in one short sentence, politely and precisely.")})];
    let mut later = Vec::new();
    let mut previous = 0;
    for t in 0..TURNS {
        messages.push(json!({"role": "user", "content": format!("Question {t}: tell me a fact about waves.")}));
        let v: Value = http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": CHAT_MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}))
            .send()
            .await?
            .json()
            .await?;
        let usage = &v["usage"];
        let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        if t > 0 {
            later.push((prompt, cached, previous));
        }
        previous = prompt;
        // A reader's pause before the next turn, so turns do not simply follow the worker
        // that just finished the last one.
        tokio::time::sleep(std::time::Duration::from_millis(
            300 + 97 * ((c * 7 + t * 13) % 10) as u64,
        ))
        .await;
        messages.push(v["choices"][0]["message"].clone());
    }
    Ok(later)
}

async fn run(affinity: bool) -> anyhow::Result<()> {
    let (a, b) = (WorkerProcess::start().await, WorkerProcess::start().await);
    let store = TempSqlite::new();
    let mut config = gateway_config(&store.url, &[a.url.clone(), b.url.clone()]);
    config.no_prefix_affinity = !affinity;
    let gateway = RunningGateway::start(config).await;
    let (key, _) = gateway.tenant_with_key("bench", Default::default()).await;
    // Both workers healthy in the gateway's pool before the load starts.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let started = std::time::Instant::now();
    let runs = (0..CONVERSATIONS).map(|c| conversation(gateway.url.clone(), key.clone(), c));
    let mut turns = Vec::new();
    for r in futures::future::join_all(runs).await {
        turns.extend(r?);
    }
    // A hit: at least the whole previous turn's prompt came from the cache (another
    // conversation's shared opening does not count).
    let hits = turns.iter().filter(|(_, c, prev)| c >= prev).count();
    let (prompt, cached) = turns
        .iter()
        .fold((0, 0), |(p, c), (tp, tc, _)| (p + tp, c + tc));
    println!(
        "{}: {hits} of {} later turns found their whole history cached ({:.0} %), {:.0} % of their prompt tokens read from cache, {:.1} s",
        if affinity { "with affinity   " } else { "without affinity" },
        turns.len(),
        100.0 * hits as f64 / turns.len() as f64,
        100.0 * cached as f64 / prompt.max(1) as f64,
        started.elapsed().as_secs_f64()
    );
    gateway.stop().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{CONVERSATIONS} conversations at once, {TURNS} turns each, 2 workers");
    run(true).await?;
    run(false).await
}
