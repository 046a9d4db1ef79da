//! The official `openai` Python SDK, unchanged, against a real gateway and worker.
//!
//! Covers the SDK's exception types for 400, 401, 403, 404, 413 and 429.
//!
//! Needs a Python with `openai` installed: `OPENAI_SDK_PYTHON`, else `target/sdk-venv`
//! (which `make test` creates). Missing, the test fails and says how to get it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::PathBuf;
use std::process::Command;

use e2e_tests::{workspace_root, Stack, CHAT_MODEL, EMBEDDING_MODEL};
use gateway::limits::Limits;
use gateway::tenants::NewKey;

/// A fresh path in the temporary directory.
fn tempfile_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", uuid::Uuid::new_v4().simple()))
}

pub(crate) fn sdk_python() -> PathBuf {
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
    let sample_key = key.clone();
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
    let reported_file = tempfile_path("sdk-usage.json");
    let reported_path = reported_file.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("GATEWAY_BASE_URL", base_url)
            .env("GATEWAY_KEY", key)
            .env("GATEWAY_NARROW_KEY", narrow_key)
            .env("GATEWAY_LIMITED_KEY", limited_key)
            .env("GATEWAY_NO_QUOTA_KEY", no_quota_key)
            .env("GATEWAY_USAGE_OUT", &reported_path)
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

    // Completions and Responses calls, streamed or not, are recorded with the usage the SDK
    // reported.
    let reported: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&reported_file).unwrap()).unwrap();
    assert!(reported.len() >= 7, "{reported:?}");
    for r in &reported {
        let id = r["request_id"].as_str().unwrap();
        let record = gateway.usage_record(id).await.expect("recorded");
        assert_eq!(record.prompt_tokens, r["prompt"].as_i64().unwrap(), "{r}");
        assert_eq!(
            record.completion_tokens,
            r["completion"].as_i64().unwrap(),
            "{r}"
        );
        assert!(
            ["/v1/completions", "/v1/responses"].contains(&record.endpoint.as_str()),
            "{}",
            record.endpoint
        );
    }
    let _ = std::fs::remove_file(&reported_file);

    // Real replies of the real model on every consumer route the document describes,
    // validated against it (the stub behind the admin API test answers no tools,
    // completions or responses). Sampled tool calls may repeat: their budget is bounded.
    let tool = serde_json::json!({"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}});
    let user = serde_json::json!([{"role": "user", "content": "Hi"}]);
    let calls: Vec<(&str, &str, String, Option<serde_json::Value>)> = vec![
        (
            "post",
            "/v1/chat/completions",
            "/v1/chat/completions".into(),
            Some(
                serde_json::json!({"model": CHAT_MODEL, "messages": user, "tools": [tool], "tool_choice": "required", "max_tokens": 64}),
            ),
        ),
        (
            "post",
            "/v1/chat/completions",
            "/v1/chat/completions".into(),
            Some(
                serde_json::json!({"model": CHAT_MODEL, "messages": user, "n": 2, "logprobs": true, "top_logprobs": 2, "max_tokens": 3}),
            ),
        ),
        (
            "post",
            "/v1/chat/completions",
            "/v1/chat/completions".into(),
            Some(serde_json::json!({"model": CHAT_MODEL, "messages": user, "frobnicate": 1})),
        ),
        (
            "post",
            "/v1/completions",
            "/v1/completions".into(),
            Some(
                serde_json::json!({"model": CHAT_MODEL, "prompt": ["a", "b"], "max_tokens": 3, "logprobs": 2}),
            ),
        ),
        (
            "post",
            "/v1/completions",
            "/v1/completions".into(),
            Some(serde_json::json!({"model": CHAT_MODEL, "prompt": "a", "suffix": "b"})),
        ),
        (
            "post",
            "/v1/responses",
            "/v1/responses".into(),
            Some(serde_json::json!({"model": CHAT_MODEL, "input": "Hi", "max_output_tokens": 4})),
        ),
        (
            "post",
            "/v1/responses",
            "/v1/responses".into(),
            Some(
                serde_json::json!({"model": CHAT_MODEL, "input": "Hi", "tools": [{"type": "function", "name": "f",
             "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}],
             "tool_choice": "required", "max_output_tokens": 64}),
            ),
        ),
        (
            "post",
            "/v1/responses",
            "/v1/responses".into(),
            Some(serde_json::json!({"model": CHAT_MODEL, "input": "Hi", "store": true})),
        ),
        ("get", "/v1/models", "/v1/models".into(), None),
        (
            "get",
            "/v1/models/{id}",
            format!("/v1/models/{CHAT_MODEL}"),
            None,
        ),
        (
            "get",
            "/v1/models/{id}",
            format!("/v1/models/{EMBEDDING_MODEL}"),
            None,
        ),
        ("get", "/v1/models/{id}", "/v1/models/nope".into(), None),
    ];
    let samples = crate::admin_api::sample_calls(
        &gateway.url,
        calls
            .into_iter()
            .map(|(m, t, p, b)| (m, t, p, b, Some(sample_key.as_str())))
            .collect(),
    )
    .await;
    let statuses: Vec<u64> = samples
        .iter()
        .map(|s| s["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [200, 200, 400, 200, 400, 200, 200, 400, 200, 200, 200, 404]
    );
    let doc = std::fs::read_to_string(workspace_root().join("gateway/openapi.json")).unwrap();
    crate::admin_api::check_with_python(&doc, &samples);
    gateway.stop().await;
}
