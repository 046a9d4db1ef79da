//! The Batch API end to end: the official SDK's batches through a real gateway and worker,
//! each line billed once under its batch and line, and tenants kept apart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::process::Command;

use e2e_tests::{workspace_root, Stack};
use gateway::tenants::NewKey;

#[tokio::test(flavor = "multi_thread")]
async fn the_official_sdk_runs_batches_billed_once_per_line() {
    let python = crate::openai_sdk::sdk_python();
    let stack = Stack::start("batches").await;
    let script = workspace_root().join("tests/sdk/openai_batch_check.py");
    let (base_url, key) = (format!("{}/v1", stack.gateway.url), stack.key.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("GATEWAY_BASE_URL", base_url)
            .env("GATEWAY_KEY", key)
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
        "batch SDK checks failed:\n{stdout}\n{stderr}"
    );
    let ran: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    // One usage record per line, under the batch and the line, for the endpoint it called.
    let batches = ran["batches"].as_array().unwrap();
    for (batch, (lines, endpoint)) in batches
        .iter()
        .zip([(3, "/v1/chat/completions"), (4, "/v1/embeddings")])
    {
        let batch = batch.as_str().unwrap();
        for line in 1..=lines {
            let id = format!("{batch}_req_{line}");
            let record = stack
                .gateway
                .usage_record(&id)
                .await
                .unwrap_or_else(|| panic!("no usage for {id}"));
            assert_eq!(record.endpoint, endpoint);
            assert!(record.prompt_tokens > 0, "{record:?}");
        }
        assert!(stack
            .gateway
            .usage_record(&format!("{batch}_req_{}", lines + 1))
            .await
            .is_none());
    }

    // Another tenant sees neither the batches nor the files: 404s, as if they did not exist.
    let (other, _) = stack
        .gateway
        .tenant_with_key("batches-other", NewKey::default())
        .await;
    let file = ran["files"][0].as_str().unwrap();
    for path in [
        format!("/v1/batches/{}", batches[0].as_str().unwrap()),
        format!("/v1/files/{file}"),
        format!("/v1/files/{file}/content"),
    ] {
        let r = stack
            .http
            .get(format!("{}{path}", stack.gateway.url))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = stack
        .http
        .post(format!(
            "{}/v1/batches/{}/cancel",
            stack.gateway.url,
            batches[0].as_str().unwrap()
        ))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let listed: serde_json::Value = stack
        .http
        .get(format!("{}/v1/batches", stack.gateway.url))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 0, "{listed}");

    // The replies are what the OpenAPI document says.
    let batch = batches[0].as_str().unwrap();
    let calls: Vec<(&str, &str, String, Option<serde_json::Value>)> = vec![
        ("get", "/v1/files", "/v1/files".into(), None),
        ("get", "/v1/files/{id}", format!("/v1/files/{file}"), None),
        ("get", "/v1/files/{id}", "/v1/files/file-nope".into(), None),
        (
            "get",
            "/v1/files/{id}/content",
            format!("/v1/files/{file}/content"),
            None,
        ),
        ("get", "/v1/batches", "/v1/batches".into(), None),
        (
            "get",
            "/v1/batches/{id}",
            format!("/v1/batches/{batch}"),
            None,
        ),
        (
            "post",
            "/v1/batches/{id}/cancel",
            format!("/v1/batches/{batch}/cancel"),
            None,
        ),
        (
            "post",
            "/v1/batches",
            "/v1/batches".into(),
            Some(
                serde_json::json!({"input_file_id": file, "endpoint": "/v1/embeddings", "completion_window": "1h"}),
            ),
        ),
    ];
    let samples = crate::admin_api::sample_calls(
        &stack.gateway.url,
        calls
            .into_iter()
            .map(|(m, t, p, b)| (m, t, p, b, Some(stack.key.as_str())))
            .collect(),
    )
    .await;
    let statuses: Vec<u64> = samples
        .iter()
        .map(|s| s["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 404, 200, 200, 200, 200, 400]);
    // Cancelling a batch that ended leaves it as it was.
    assert_eq!(samples[6]["body"]["status"], "completed");
    let doc = std::fs::read_to_string(workspace_root().join("gateway/openapi.json")).unwrap();
    crate::admin_api::check_with_python(&doc, &samples);
}
