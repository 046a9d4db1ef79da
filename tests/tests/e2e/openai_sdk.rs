//! The official `openai` Python SDK, unchanged, against a real gateway and worker.
//!
//! Covers the SDK's exception types for 400, 401, 403, 404, 413 and 429.
//!
//! Needs a Python with `openai` installed: `OPENAI_SDK_PYTHON`, else `target/sdk-venv`
//! (which `make test` creates). Missing, the test fails and says how to get it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::PathBuf;
use std::process::Command;

use e2e_tests::{workspace_root, Stack, EMBEDDING_MODEL};
use gateway::limits::Limits;
use gateway::tenants::NewKey;

fn sdk_python() -> PathBuf {
    let python = std::env::var_os("OPENAI_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/sdk-venv/bin/python"));
    assert!(
        python.exists(),
        "no Python with the openai SDK at {}: run `make test` (it creates target/sdk-venv) or set OPENAI_SDK_PYTHON",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_python_sdk_works_unchanged() {
    let python = sdk_python();
    let Stack {
        worker: _worker,
        store: _store,
        gateway,
        key,
        ..
    } = Stack::start("sdk").await;
    let narrow = NewKey {
        name: "narrow".into(),
        allowed_models: Some(vec![EMBEDDING_MODEL.into()]),
        ..Default::default()
    };
    let (narrow_key, _) = gateway.tenant_with_key("sdk-narrow", narrow).await;
    let limited = |limits| NewKey {
        name: "limited".into(),
        limits,
        ..Default::default()
    };
    let (limited_key, _) = gateway
        .tenant_with_key(
            "sdk-limited",
            limited(Limits {
                requests_per_minute: Some(1),
                ..Default::default()
            }),
        )
        .await;
    let (no_quota_key, _) = gateway
        .tenant_with_key(
            "sdk-no-quota",
            limited(Limits {
                monthly_tokens: Some(0),
                ..Default::default()
            }),
        )
        .await;

    let script = workspace_root().join("tests/sdk/openai_sdk_check.py");
    let base_url = format!("{}/v1", gateway.url);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("GATEWAY_BASE_URL", base_url)
            .env("GATEWAY_KEY", key)
            .env("GATEWAY_NARROW_KEY", narrow_key)
            .env("GATEWAY_LIMITED_KEY", limited_key)
            .env("GATEWAY_NO_QUOTA_KEY", no_quota_key)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("checks passed"));
    gateway.stop().await;
}
