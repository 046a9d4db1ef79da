//! The response cache against the model, side by side in one run: single-text embeddings
//! and temperature-0 chat, each text asked once (a miss: the worker answers) and then again
//! (a hit), latency over HTTP through the gateway; and the memory the entries take.
//!
//! `cargo build --release --workspace --bins && MODELS_DIR=$PWD/models \
//!  cargo run --release -p e2e-tests --example response_cache_bench [TEXTS]`

use std::time::Instant;

use e2e_tests::{metric, Stack, CHAT_MODEL, EMBEDDING_MODEL};
use gateway::tenants::ResponseCachePolicy;
use serde_json::{json, Value};

/// Milliseconds of each call, in order, and whether the cache answered each.
async fn timed(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    bodies: &[Value],
) -> anyhow::Result<(Vec<f64>, usize)> {
    let mut ms = Vec::with_capacity(bodies.len());
    let mut hits = 0;
    for body in bodies {
        let started = Instant::now();
        let r = http.post(url).bearer_auth(key).json(body).send().await?;
        hits += usize::from(r.headers().get("x-cache").is_some_and(|v| v == "hit"));
        anyhow::ensure!(r.status().is_success(), "{}", r.text().await?);
        r.bytes().await?;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok((ms, hits))
}

fn percentile(ms: &[f64], p: f64) -> f64 {
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let texts: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let stack = Stack::start("uncached").await;
    let gateway = &stack.gateway;
    let policy = ResponseCachePolicy {
        ttl_s: 3600,
        hit_minor_per_mreq: 0,
    };
    let none = Default::default();
    let (_, key) = gateway
        .tenant_on_caching_plan("bench", none, none, Some(policy))
        .await;
    let http = &stack.http;
    println!(
        "{:<34} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "calls", "n", "miss p50", "miss p99", "hit p50", "hit p99", "p50 x"
    );
    let embed: Vec<Value> = (0..texts)
        .map(|i| json!({"model": EMBEDDING_MODEL, "input": format!("Search query number {i}: where can I buy a waterproof jacket near the harbour?")}))
        .collect();
    let chat: Vec<Value> = (0..texts.min(40))
        .map(|i| json!({"model": CHAT_MODEL, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": format!("Give tip number {i} for sailing in fog.")}]}))
        .collect();
    for (name, path, bodies) in [
        ("embeddings, one text", "/v1/embeddings", &embed),
        (
            "chat, temperature 0, 16 tokens",
            "/v1/chat/completions",
            &chat,
        ),
    ] {
        let url = format!("{}{path}", gateway.url);
        // A few calls first, so connections and worker threads are warm.
        timed(http, &url, &key, &bodies[..2.min(bodies.len())]).await?;
        let (misses, _) = timed(http, &url, &key, &bodies[2..]).await?;
        let (hits, answered) = timed(http, &url, &key, &bodies[2..]).await?;
        anyhow::ensure!(
            answered == hits.len(),
            "only {answered} of {} were hits",
            hits.len()
        );
        let (m50, h50) = (percentile(&misses, 0.5), percentile(&hits, 0.5));
        println!(
            "{name:<34} {:>6} {:>8.2}ms {:>8.2}ms {:>8.3}ms {:>8.3}ms {:>7.1}x",
            hits.len(),
            m50,
            percentile(&misses, 0.99),
            h50,
            percentile(&hits, 0.99),
            m50 / h50
        );
    }
    let bytes = metric(http, &gateway.metrics_url, "gateway_response_cache_bytes").await;
    let entries = metric(http, &gateway.metrics_url, "gateway_response_cache_entries").await;
    println!(
        "response cache memory: {:.1} KiB in {entries} entries ({:.1} KiB each)",
        bytes / 1024.0,
        bytes / 1024.0 / entries.max(1.0)
    );
    stack.gateway.stop().await;
    Ok(())
}
