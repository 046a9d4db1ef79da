//! Plans and keys' limits at the front door: requests and tokens per minute, concurrency,
//! the monthly token quota and the spend cap, with the headers and errors of SPEC §3, and
//! the quota holding with two gateway replicas and 64 concurrent clients on one tenant.
//!
//! The upstream is the stub (it answers at once with stated usage): these tests are about
//! admission, not the models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL, STUB_PROMPT_TOKENS};
use e2e_tests::{
    gateway_config, metric, wait_for, wait_until, RunningGateway, TempPostgres, TempSqlite,
};
use gateway::limits::Limits;
use gateway::GatewayConfig;
use serde_json::{json, Value};

/// A tenant on a plan with `plan` limits and one key narrowed by `key`.
async fn tenant_on_plan(gw: &RunningGateway, name: &str, plan: Limits, key: Limits) -> String {
    gw.tenant_on_plan(name, plan, key).await.1
}

/// The most a test waits for the gateway to settle or reload what it was just told.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

fn chat(max_tokens: u64) -> Value {
    json!({"model": STUB_CHAT_MODEL, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hi"}]})
}

async fn post(
    http: &reqwest::Client,
    gw: &RunningGateway,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    http.post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
}

async fn error_code(r: reqwest::Response) -> String {
    let body: Value = r.json().await.unwrap();
    body["error"]["code"].as_str().unwrap().to_owned()
}

async fn rates_and_concurrency(url: &str) {
    let stub = StubWorker::start().await;
    let gw = RunningGateway::start(gateway_config(url, std::slice::from_ref(&stub.url))).await;
    let http = reqwest::Client::new();

    // Requests per minute, from the plan.
    let key = tenant_on_plan(
        &gw,
        "rpm",
        Limits {
            requests_per_minute: Some(3),
            ..Default::default()
        },
        Limits::default(),
    )
    .await;
    for remaining in ["2", "1", "0"] {
        let r = post(&http, &gw, &key, &chat(4)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), remaining);
        assert!(header(&r, "x-ratelimit-reset-requests").ends_with('s'));
    }
    let r = post(&http, &gw, &key, &chat(4)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=120).contains(&retry), "retry-after {retry}");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(error_code(r).await, "rate_limit_exceeded");

    // A key narrows its plan: the plan allows 100 a minute, this key 1.
    let key = tenant_on_plan(
        &gw,
        "narrowed",
        Limits {
            requests_per_minute: Some(100),
            ..Default::default()
        },
        Limits {
            requests_per_minute: Some(1),
            ..Default::default()
        },
    )
    .await;
    let r = post(&http, &gw, &key, &chat(4)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "1");
    assert_eq!(post(&http, &gw, &key, &chat(4)).await.status(), 429);

    // Tokens per minute count the most a request can use; one that could never fit is
    // refused at once.
    let key = tenant_on_plan(
        &gw,
        "tpm",
        Limits {
            tokens_per_minute: Some(1000),
            ..Default::default()
        },
        Limits::default(),
    )
    .await;
    let r = post(&http, &gw, &key, &chat(16)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "1000");
    let remaining: i64 = header(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!((800..1000).contains(&remaining), "remaining {remaining}");
    let r = post(&http, &gw, &key, &chat(5000)).await;
    assert_eq!(r.status(), 429);
    let message = r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("max_tokens"), "{message}");

    // Concurrency: two held requests fill the plan; a third is refused until one ends.
    let key = tenant_on_plan(
        &gw,
        "concurrency",
        Limits {
            max_concurrent: Some(2),
            ..Default::default()
        },
        Limits::default(),
    )
    .await;
    let mut slow = chat(4);
    slow["user"] = json!("stub_delay_ms=1500");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (http, url, key, slow) = (http.clone(), gw.url.clone(), key.clone(), slow.clone());
            tokio::spawn(async move {
                http.post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(&slow)
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    wait_until("both held requests at the worker", SETTLE_LIMIT, || async {
        metric(
            &http,
            &gw.metrics_url,
            "gateway_worker_outstanding_requests",
        )
        .await
            >= 2.0
    })
    .await;
    let r = post(&http, &gw, &key, &chat(4)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "rate_limit_exceeded");
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    // Settlement runs just after the response: a slot is free again soon after.
    let status = wait_for("a concurrency slot freed", SETTLE_LIMIT, || async {
        let r = post(&http, &gw, &key, &chat(4)).await;
        match r.status().as_u16() {
            429 => {
                assert_eq!(error_code(r).await, "rate_limit_exceeded");
                None
            }
            status => Some(status),
        }
    })
    .await;
    assert_eq!(status, 200);

    let scrape = e2e_tests::scrape(&http, &gw.metrics_url).await;
    assert!(
        scrape.contains("gateway_limit_rejections_total{limit=\"concurrent_requests\""),
        "{scrape}"
    );
    gw.stop().await;
    // A graceful stop settles everything: no reservation or concurrency slot is left held.
    let db = billing::Db::connect(url).await.unwrap();
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(in_flight), 0) AS BIGINT) AS n, \
         (SELECT COUNT(*) FROM reservations) AS r FROM limit_counters",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    use sqlx::Row;
    assert_eq!(row.try_get::<i64, _>("n").unwrap(), 0);
    assert_eq!(row.try_get::<i64, _>("r").unwrap(), 0);
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rates_and_concurrency() {
    let store = TempSqlite::new();
    rates_and_concurrency(&store.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rates_and_concurrency() {
    let pg = TempPostgres::new().await;
    rates_and_concurrency(&pg.url).await;
}

/// 64 clients on one tenant, spread over two replicas sharing the store, each sending
/// requests until the quota answers; returns the tokens in the ledger and the successes.
async fn drain_quota(gateways: &[&RunningGateway], key: &str, tenant_id: &str) -> (i64, u64) {
    const CLIENTS: usize = 64;
    const PER_CLIENT: usize = 8;
    let ok = Arc::new(AtomicU64::new(0));
    let quota_refusals = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let url = gateways[c % gateways.len()].url.clone();
        let (key, ok, quota_refusals) = (key.to_owned(), ok.clone(), quota_refusals.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for _ in 0..PER_CLIENT {
                let r = http
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&chat(40))
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    200 => {
                        let body: Value = r.json().await.unwrap();
                        assert_eq!(body["usage"]["completion_tokens"], 40);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    429 => {
                        assert_eq!(header(&r, "x-should-retry"), "false");
                        assert_eq!(error_code(r).await, "insufficient_quota");
                        quota_refusals.fetch_add(1, Ordering::Relaxed);
                    }
                    s => panic!("unexpected status {s}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ok = ok.load(Ordering::Relaxed);
    assert!(quota_refusals.load(Ordering::Relaxed) > 0);
    // Every success reaches the ledger; sum what it holds for the tenant.
    let ledger = billing::Ledger::new(gateways[0].db.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let records = ledger.for_tenant(tenant_id).await.unwrap();
        if records.len() as u64 == ok || std::time::Instant::now() > deadline {
            assert_eq!(records.len() as u64, ok, "one record per success");
            let tokens: i64 = records
                .iter()
                .map(|r| r.prompt_tokens + r.completion_tokens)
                .sum();
            return (tokens, ok);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn quota_holds_across_replicas(url: &str) {
    let stub = StubWorker::start().await;
    // Prices reloaded often, so that the spend cap below need not wait long for its price.
    let replica = || GatewayConfig {
        price_refresh_ms: 100,
        ..gateway_config(url, std::slice::from_ref(&stub.url))
    };
    let a = RunningGateway::start(replica()).await;
    let b = RunningGateway::start(replica()).await;
    let per_call = (STUB_PROMPT_TOKENS + 40) as i64;

    // Monthly tokens.
    const QUOTA: i64 = 5_000;
    let key = tenant_on_plan(
        &a,
        "quota",
        Limits {
            monthly_tokens: Some(QUOTA),
            ..Default::default()
        },
        Limits::default(),
    )
    .await;
    let tenant = a.tenants.tenant_by_name("quota").await.unwrap().unwrap();
    let (tokens, ok) = drain_quota(&[&a, &b], &key, &tenant.id).await;
    println!("monthly tokens: quota {QUOTA}, used {tokens} in {ok} calls");
    assert!(tokens <= QUOTA, "used {tokens} of a {QUOTA} quota");
    // Reservations are upper bounds, so a little is left unused, never most of it.
    assert!(tokens >= QUOTA / 2, "only {tokens} of {QUOTA} used");
    assert_eq!(tokens, ok as i64 * per_call);

    // Spend cap: 1 minor unit per 1,000 tokens in and out; a cap of 5 minor units.
    let price = billing::Price {
        model: STUB_CHAT_MODEL.into(),
        effective_from: 0,
        currency: "USD".into(),
        input_minor_per_mtok: 1_000,
        output_minor_per_mtok: 1_000,
        request_minor_per_mreq: 0,
        cached_input_minor_per_mtok: None,
        batch_discount_pct: None,
        tiers: Vec::new(),
    };
    billing::prices::add_price(&a.db, &price).await.unwrap();
    wait_until(
        "both replicas charging the new price",
        SETTLE_LIMIT,
        || async {
            [&a, &b].iter().all(|gw| {
                gw.prices
                    .current()
                    .at(STUB_CHAT_MODEL, billing::now_ms())
                    .is_some()
            })
        },
    )
    .await;
    const CAP_MINOR: i64 = 5;
    let key = tenant_on_plan(
        &b,
        "spend",
        Limits {
            monthly_spend_minor: Some(CAP_MINOR),
            ..Default::default()
        },
        Limits::default(),
    )
    .await;
    let tenant = a.tenants.tenant_by_name("spend").await.unwrap().unwrap();
    let (tokens, ok) = drain_quota(&[&a, &b], &key, &tenant.id).await;
    let spend = price.cost(
        ok as i64,
        ok as i64 * STUB_PROMPT_TOKENS as i64,
        ok as i64 * 40,
    );
    println!(
        "spend cap: {CAP_MINOR} minor units, spent {} micros in {ok} calls",
        spend.0
    );
    assert!(
        spend <= billing::Micros::from_minor(CAP_MINOR),
        "spent {spend:?}"
    );
    assert!(spend.0 >= billing::Micros::from_minor(CAP_MINOR).0 / 2);
    assert_eq!(tokens, ok as i64 * per_call);

    // Most admissions came from the replicas' quota leases, not one store trip each.
    let http = reqwest::Client::new();
    let mut by_path = [0u64; 2];
    for gw in [&a, &b] {
        let scrape = e2e_tests::scrape(&http, &gw.metrics_url).await;
        for (i, path) in ["lease", "store"].iter().enumerate() {
            by_path[i] += scrape
                .lines()
                .find(|l| l.starts_with(&format!("gateway_admissions_total{{path=\"{path}\"}}")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
        }
    }
    println!(
        "admissions: {} from leases, {} by the store",
        by_path[0], by_path[1]
    );
    assert!(by_path[0] > 0, "no admission used a lease");

    a.stop().await;
    b.stop().await;
    // Both replicas gave their leases back when they stopped.
    let db = billing::Db::connect(url).await.unwrap();
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(in_flight), 0) AS BIGINT) AS n, \
         CAST(COALESCE(SUM(reserved_tokens + reserved_spend), 0) AS BIGINT) AS held, \
         (SELECT COUNT(*) FROM reservations) AS r FROM limit_counters",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    use sqlx::Row;
    assert_eq!(row.try_get::<i64, _>("n").unwrap(), 0);
    assert_eq!(row.try_get::<i64, _>("held").unwrap(), 0);
    assert_eq!(row.try_get::<i64, _>("r").unwrap(), 0);
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_quota_holds_with_two_replicas_and_64_clients() {
    let pg = TempPostgres::new().await;
    quota_holds_across_replicas(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_quota_holds_with_two_replicas_and_64_clients() {
    let store = TempSqlite::new();
    quota_holds_across_replicas(&store.url).await;
}
