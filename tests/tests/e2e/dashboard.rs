//! The operator dashboard end to end in headless Chromium (Debian's `chromium`, driven by
//! Playwright from `tests/dashboard/e2e.mjs`): sign in with a token, see charts whose
//! totals match the seeded records (batch lines split out), revoke a key, download an
//! export. With `UPDATE_SCREENSHOTS=1` the screenshots in `docs/screenshots/` are refreshed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use billing::invoices::period_bounds;
use billing::{Ledger, UsageEvent};
use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL};
use e2e_tests::{gateway_config, request_id, workspace_root, RunningGateway, TempSqlite};
use gateway::admin::{Role, Secret};
use gateway::tenants::NewKey;

fn record(id: String, tenant: &str, key: &str, at: i64, p: i64, c: i64) -> UsageEvent {
    UsageEvent::builder(id, tenant)
        .key(key)
        .model(STUB_CHAT_MODEL)
        .tokens(p, c)
        .at(at, 9)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    let root = workspace_root();
    let driver = root.join("tests/dashboard/node_modules/playwright-core");
    assert!(
        driver.exists(),
        "{} missing: run `make test` (it runs `npm ci` in tests/dashboard)",
        driver.display()
    );
    let store = TempSqlite::new();
    let stub = StubWorker::start().await;
    let mut config = gateway_config(&store.url, std::slice::from_ref(&stub.url));
    config.admin_jwt_secret =
        Some(Secret::new("dashboard-test-secret-0123456789abcdefghij").unwrap());
    let gw = RunningGateway::start(config).await;
    let admin_url = gw.admin_url.clone().unwrap();

    // Three tenants; usage last month (invoiced) and today.
    let now = billing::now_ms();
    let (this_month, _) = period_bounds(&billing::period_of(now)).unwrap();
    let period = billing::period_of(this_month - 1);
    let (last_month, _) = period_bounds(&period).unwrap();
    let mut events = Vec::new();
    let mut ids = Vec::new();
    let (mut requests, mut tokens, mut batch_requests) = (0i64, 0i64, 0i64);
    for (t, name) in ["acme", "globex", "initech"].iter().enumerate() {
        let tenant = gw.tenants.create_tenant(name).await.unwrap();
        let (_, key) = gw
            .tenants
            .create_key(
                &tenant.id,
                &NewKey {
                    name: "prod".into(),
                    ..NewKey::default()
                },
            )
            .await
            .unwrap();
        for i in 0..(10 + 7 * t as i64) {
            let at = if i % 3 == 0 {
                now - (i + 1) * 3_600_000 / 4
            } else {
                last_month + i * 86_400_000 + 60_000
            };
            let (p, c) = (100 * (t as i64 + 1) + i, 40 + i);
            events.push(record(
                format!("req_{t}_{i}"),
                &tenant.id,
                &key.id,
                at,
                p,
                c,
            ));
            requests += 1;
            tokens += p + c;
        }
        // Lines of a batch (request ids as the batch runner makes them), split out on the
        // usage panels.
        for i in 0..(t as i64 + 1) {
            let (p, c) = (30 + i, 5);
            events.push(record(
                format!("batch_seeded{t}_req_{i}"),
                &tenant.id,
                &key.id,
                now - (i + 1) * 600_000,
                p,
                c,
            ));
            requests += 1;
            batch_requests += 1;
            tokens += p + c;
        }
        ids.push((tenant.id, key.id));
    }
    Ledger::new(gw.db.clone())
        .record_batch(&events)
        .await
        .unwrap();
    billing::prices::add_price(
        &gw.db,
        &billing::Price {
            model: STUB_CHAT_MODEL.into(),
            effective_from: 0,
            currency: "USD".into(),
            input_minor_per_mtok: 300,
            output_minor_per_mtok: 1_200,
            request_minor_per_mreq: 0,
            cached_input_minor_per_mtok: None,
            batch_discount_pct: None,
            tiers: Vec::new(),
        },
    )
    .await
    .unwrap();
    let (tenant, key) = ids[0].clone();
    // A batch of the tenant, for its batches table (its one line names no served model,
    // so it ends failed without touching the usage the panels total).
    let batches = gateway::batches::BatchStore::new(gw.db.clone());
    let line = r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"no-such-model","input":"x"}}"#;
    batches
        .create_file("file-dash", &tenant, "batch", "b.jsonl", line, 1)
        .await
        .unwrap();
    let owner = gateway::batches::store::Owner {
        tenant_id: tenant.clone(),
        key_id: key.clone(),
        endpoint: "/v1/embeddings",
    };
    let lines = gateway::batches::parse_file(line.as_bytes()).unwrap();
    let batch = batches
        .create_batch("batch_dash", &owner, "file-dash", None, &lines)
        .await
        .unwrap();
    billing::Invoices::new(gw.db.clone())
        .finalise(&tenant, &period)
        .await
        .unwrap();

    // Live traffic for the latency and error panels: served calls (their records count
    // in the expected totals once they reach the store) and one unknown model.
    let (live_key, _) = gw.tenant_with_key("live", NewKey::default()).await;
    let http = reqwest::Client::new();
    for i in 0..6 {
        let model = if i == 5 {
            "no-such-model"
        } else {
            STUB_CHAT_MODEL
        };
        let r = http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&live_key)
            .json(&serde_json::json!({"model": model, "max_tokens": 3 + i,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let id = request_id(&r);
        if i < 5 {
            assert_eq!(r.status(), 200);
            let rec = gw.usage_record(&id).await.expect("usage recorded");
            requests += 1;
            tokens += rec.prompt_tokens + rec.completion_tokens;
        } else {
            assert_eq!(r.status(), 404);
        }
    }

    let token = gw
        .admin_tokens
        .as_ref()
        .unwrap()
        .issue("dashboard-test", Role::Admin, 600)
        .unwrap();
    let downloads = std::env::temp_dir().join(format!("gw-dl-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&downloads).unwrap();
    let screenshots = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        root.join("docs/screenshots")
    } else {
        downloads.join("screenshots")
    };
    std::fs::create_dir_all(&screenshots).unwrap();
    let out = tokio::process::Command::new("node")
        .arg(root.join("tests/dashboard/e2e.mjs"))
        .env("ADMIN_URL", &admin_url)
        .env("TOKEN", &token)
        .env("EXPECTED_REQUESTS", requests.to_string())
        .env("EXPECTED_TOKENS", tokens.to_string())
        .env("EXPECTED_BATCH_REQUESTS", batch_requests.to_string())
        .env("TENANT_ID", &tenant)
        .env("KEY_ID", &key)
        .env("BATCH_ID", &batch.id)
        .env("PERIOD", &period)
        .env("DOWNLOAD_DIR", &downloads)
        .env("SCREENSHOT_DIR", &screenshots)
        .output()
        .await
        .expect("node not found: install Node.js");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser test failed");
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(seen["chart_requests_total"], requests);
    assert_eq!(seen["chart_batch_requests"], batch_requests);

    // The revocation reached the store, and the download is the ledger's export.
    let revoked = gw.tenants.key(&key).await.unwrap().unwrap();
    assert!(revoked.revoked_at.is_some());
    let file = std::fs::read(seen["download"].as_str().unwrap()).unwrap();
    let (from_ms, to_ms) = period_bounds(&period).unwrap();
    let mut expected = Vec::new();
    billing::export::export_usage(
        &gw.db,
        &billing::export::UsageSelection {
            tenant_id: Some(tenant.clone()),
            from_ms,
            to_ms,
        },
        billing::export::Format::Csv,
        &mut expected,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(file, expected);
    assert!(String::from_utf8_lossy(&file).lines().count() > 1);
    for shot in [
        "dashboard-overview.png",
        "dashboard-keys.png",
        "dashboard-invoices.png",
    ] {
        assert!(screenshots.join(shot).exists(), "{shot}");
    }
    let _ = std::fs::remove_dir_all(&downloads);
    gw.stop().await;
}
