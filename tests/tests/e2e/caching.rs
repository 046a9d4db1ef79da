//! Caching, billed (SPEC §10): prompt tokens a worker read from its prefix cache are
//! recorded and priced at their own rate; the response cache answers a tenant's repeated
//! deterministic calls (JSON and streams) with `x-cache`, never across tenants, billed as
//! hits at the plan's rate, shared by replicas through Redis and never failing a call
//! when Redis is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use billing::{Invoices, Price};
use e2e_tests::{
    gateway_config, metric, request_id, RedisProcess, RunningGateway, Stack, TempPostgres,
    WorkerProcess, CHAT_MODEL, EMBEDDING_MODEL,
};
use gateway::tenants::ResponseCachePolicy;
use serde_json::{json, Value};

const SYSTEM: &str = "You are a careful assistant for a shipping company. Answer in one short \
    sentence. Never invent tracking numbers, never promise delivery dates, and always suggest \
    contacting support for damaged parcels. Keep a friendly, plain tone.";

fn price(cached: Option<i64>) -> Price {
    Price {
        model: CHAT_MODEL.into(),
        effective_from: 0,
        currency: "USD".into(),
        input_minor_per_mtok: 1_000,
        output_minor_per_mtok: 4_000,
        request_minor_per_mreq: 0,
        cached_input_minor_per_mtok: cached,
        batch_discount_pct: None,
        tiers: Vec::new(),
    }
}

fn chat(question: &str, stream: bool) -> Value {
    json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

/// The usage a streamed reply's last usage chunk states.
fn stream_usage(text: &str) -> Value {
    text.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| !v["usage"].is_null())
        .map(|v| v["usage"].clone())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_prompt_tokens_are_recorded_and_priced_at_their_rate() {
    let stack = Stack::start("prefix").await;
    let gateway = &stack.gateway;
    billing::prices::add_price(&gateway.db, &price(Some(100)))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for (i, question) in [
        "Where is my parcel?",
        "Can I change the address?",
        "Is it insured?",
    ]
    .into_iter()
    .enumerate()
    {
        let stream = i == 2;
        let r = stack
            .post("/v1/chat/completions", chat(question, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        let usage = if stream {
            stream_usage(&r.text().await.unwrap())
        } else {
            r.json::<Value>().await.unwrap()["usage"].clone()
        };
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_i64()
            .unwrap();
        let record = gateway.usage_record(&id).await.unwrap();
        assert_eq!(
            record.prompt_tokens,
            usage["prompt_tokens"].as_i64().unwrap()
        );
        assert_eq!(record.cached_tokens, cached, "call {i}: {usage}");
        assert_eq!(record.cache_hit_minor_per_mreq, None);
        seen.push(record);
    }
    // The system prompt is read once; later calls find it in the worker's prefix cache.
    assert_eq!(seen[0].cached_tokens, 0);
    assert!(
        seen[1].cached_tokens > 30 && seen[2].cached_tokens > 30,
        "{seen:?}"
    );

    let period = billing::period_of(seen[0].started_at);
    let invoice = Invoices::new(gateway.db.clone())
        .preview(&seen[0].tenant_id, &period)
        .await
        .unwrap();
    let line = &invoice.lines[0];
    let sum = |f: fn(&billing::UsageEvent) -> i64| seen.iter().map(f).sum::<i64>();
    let (input, cached, output) = (
        sum(|e| e.prompt_tokens),
        sum(|e| e.cached_tokens),
        sum(|e| e.completion_tokens),
    );
    assert_eq!(
        (
            line.input_tokens,
            line.cached_input_tokens,
            line.output_tokens
        ),
        (input, cached, output)
    );
    assert_eq!(
        line.amount_micros,
        (input - cached) * 1_000 + cached * 100 + output * 4_000
    );
    // The consumer's usage API shows them too.
    let usage: Value = stack
        .http
        .get(format!("{}/v1/usage", gateway.url))
        .bearer_auth(&stack.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["data"][0]["cached_tokens"], json!(cached));
    stack.gateway.stop().await;
}

/// POSTs `body` to `path` with `key` (and `cache-control`, if given): status, `x-cache`,
/// request id and body text.
async fn call(
    gateway: &RunningGateway,
    key: &str,
    path: &str,
    body: &Value,
    cache_control: Option<&str>,
) -> (u16, Option<String>, String, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", gateway.url))
        .bearer_auth(key)
        .json(body);
    if let Some(c) = cache_control {
        request = request.header("cache-control", c);
    }
    let r = request.send().await.unwrap();
    let x_cache = r
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned());
    let id = request_id(&r);
    (r.status().as_u16(), x_cache, id, r.text().await.unwrap())
}

const POLICY: ResponseCachePolicy = ResponseCachePolicy {
    ttl_s: 600,
    hit_minor_per_mreq: 7_000,
};

#[tokio::test(flavor = "multi_thread")]
async fn the_response_cache_answers_a_tenants_repeats_and_bills_them_as_hits() {
    let stack = Stack::start("plain").await;
    let gateway = &stack.gateway;
    billing::prices::add_price(&gateway.db, &price(None))
        .await
        .unwrap();
    let none = Default::default();
    let (tenant, a) = gateway
        .tenant_on_caching_plan("cache-a", none, none, Some(POLICY))
        .await;
    let (_, b) = gateway
        .tenant_on_caching_plan("cache-b", none, none, Some(POLICY))
        .await;
    let plain = stack.key.clone();
    let embed = json!({"model": EMBEDDING_MODEL, "input": ["the tide is high", "a calm sea"]});
    let embed_reordered: Value = serde_json::from_str(&format!(
        r#"{{ "input": {}, "model": "{EMBEDDING_MODEL}" }}"#,
        embed["input"]
    ))
    .unwrap();

    let first = call(gateway, &a, "/v1/embeddings", &embed, None).await;
    assert_eq!((first.0, first.1.as_deref()), (200, Some("miss")));
    let again = call(gateway, &a, "/v1/embeddings", &embed_reordered, None).await;
    assert_eq!((again.0, again.1.as_deref()), (200, Some("hit")));
    assert_eq!(again.3, first.3, "a hit is the answer the model gave");
    let hit = gateway.usage_record(&again.2).await.unwrap();
    let miss = gateway.usage_record(&first.2).await.unwrap();
    assert_eq!(hit.cache_hit_minor_per_mreq, Some(7_000));
    assert_eq!(miss.cache_hit_minor_per_mreq, None);
    assert_eq!(hit.prompt_tokens, miss.prompt_tokens);
    // Never across tenants; nothing for a plan without the cache.
    let other = call(gateway, &b, "/v1/embeddings", &embed, None).await;
    assert_eq!(other.1.as_deref(), Some("miss"));
    let uncached = call(gateway, &plain, "/v1/embeddings", &embed, None).await;
    assert_eq!((uncached.0, uncached.1), (200, None));
    // The client opts out: `no-store` skips the cache, `no-cache` asks the model again.
    let no_store = call(gateway, &a, "/v1/embeddings", &embed, Some("no-store")).await;
    assert_eq!((no_store.0, no_store.1), (200, None));
    let no_cache = call(gateway, &a, "/v1/embeddings", &embed, Some("no-cache")).await;
    assert_eq!(no_cache.1.as_deref(), Some("miss"));

    // Chat at temperature 0, whole and streamed: the stream replays as a stream.
    let question = chat("Where is my parcel?", false);
    let first = call(gateway, &a, "/v1/chat/completions", &question, None).await;
    let again = call(gateway, &a, "/v1/chat/completions", &question, None).await;
    assert_eq!(
        (first.1.as_deref(), again.1.as_deref()),
        (Some("miss"), Some("hit"))
    );
    assert_eq!(again.3, first.3);
    let streamed = chat("Where is my parcel?", true);
    let first = call(gateway, &a, "/v1/chat/completions", &streamed, None).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&a)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "hit");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let replay_id = request_id(&r);
    let replay = r.text().await.unwrap();
    assert_eq!(first.1.as_deref(), Some("miss"));
    assert_eq!(replay, first.3);
    assert!(replay.ends_with("data: [DONE]\n\n"), "{replay}");
    assert!(stream_usage(&replay)["completion_tokens"].as_i64().unwrap() > 0);
    // Sampled calls are not cached.
    let mut sampled = chat("Where is my parcel?", false);
    sampled["temperature"] = json!(0.9);
    let sampled = call(gateway, &a, "/v1/chat/completions", &sampled, None).await;
    assert_eq!((sampled.0, sampled.1), (200, None));

    // Three hits (embeddings, chat, stream) on lines of their own at the plan's rate, one
    // per model, once their records reached the store.
    for id in [&again.2, &replay_id] {
        let record = gateway.usage_record(id).await.unwrap();
        assert_eq!(record.cache_hit_minor_per_mreq, Some(7_000));
    }
    let period = billing::period_of(billing::now_ms());
    let invoice = Invoices::new(gateway.db.clone())
        .preview(&tenant, &period)
        .await
        .unwrap();
    let hits: Vec<_> = invoice
        .lines
        .iter()
        .filter(|l| l.cache_hit_minor_per_mreq.is_some())
        .collect();
    assert_eq!(hits.len(), 2, "{invoice:?}");
    let requests: i64 = hits.iter().map(|l| l.requests).sum();
    let amount: i64 = hits.iter().map(|l| l.amount_micros).sum();
    assert_eq!((requests, amount), (3, 3 * 7_000));
    let http = reqwest::Client::new();
    let lookups = |result: &'static str| {
        let (http, url) = (http.clone(), gateway.metrics_url.clone());
        async move {
            let text = e2e_tests::scrape(&http, &url).await;
            text.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "gateway_response_cache_lookups_total{{result=\"{result}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    assert_eq!(lookups("hit").await, 3.0);
    assert_eq!(lookups("miss").await, 4.0);
    assert!(metric(&http, &gateway.metrics_url, "gateway_response_cache_bytes").await > 0.0);
    stack.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_responses_through_redis_and_survive_its_loss() {
    let worker = WorkerProcess::start().await;
    let mut redis = RedisProcess::start().await;
    let pg = TempPostgres::new().await;
    let replica = || {
        let mut config = gateway_config(&pg.url, std::slice::from_ref(&worker.url));
        config.response_cache_redis = Some(redis.url.clone());
        RunningGateway::start(config)
    };
    let (one, two) = (replica().await, replica().await);
    let none = Default::default();
    let (_, key) = one
        .tenant_on_caching_plan("shared", none, none, Some(POLICY))
        .await;
    let embed = json!({"model": EMBEDDING_MODEL, "input": "one cache for every replica"});
    let first = call(&one, &key, "/v1/embeddings", &embed, None).await;
    assert_eq!(first.1.as_deref(), Some("miss"));
    // The write to Redis is in the background: the other replica finds it soon after.
    let found = e2e_tests::wait_for(
        "the entry in Redis",
        std::time::Duration::from_secs(5),
        || {
            let (two, key, embed) = (&two, &key, &embed);
            async move {
                let r = call(two, key, "/v1/embeddings", embed, None).await;
                (r.1.as_deref() == Some("hit")).then_some(r)
            }
        },
    )
    .await;
    assert_eq!(found.3, first.3);

    // Redis gone: calls go on, answered by the model.
    redis.kill();
    let other = json!({"model": EMBEDDING_MODEL, "input": "asked while Redis is down"});
    let r = call(&two, &key, "/v1/embeddings", &other, None).await;
    assert_eq!((r.0, r.1.as_deref()), (200, Some("miss")));
    // And this replica's memory still answers what it holds.
    let r = call(&two, &key, "/v1/embeddings", &other, None).await;
    assert_eq!((r.0, r.1.as_deref()), (200, Some("hit")));
    one.stop().await;
    two.stop().await;
}
