//! From a key to the model and back: a real worker process with the real models, a real
//! gateway on a real port, a real store; every successful call leaves one usage record.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use base64::Engine as _;
use e2e_tests::{request_id, Stack, CHAT_MODEL, EMBEDDING_MODEL};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn chat_completion_is_answered_by_the_model_and_recorded_once() {
    let s = Stack::start("acme").await;
    let response = s
        .post(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}],
                   "max_tokens": 12, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    // Greedy decoding of this prompt answers "... is 4." on SmolLM2-135M-Instruct.
    assert!(content.contains('4'), "unexpected answer: {content:?}");
    let prompt_tokens = body["usage"]["prompt_tokens"].as_i64().unwrap();
    let completion_tokens = body["usage"]["completion_tokens"].as_i64().unwrap();
    assert!(prompt_tokens > 10 && (1..=12).contains(&completion_tokens));

    let ledger = billing::Ledger::new(s.gateway.db.clone());
    let record = s
        .gateway
        .usage_record(&request_id)
        .await
        .expect("usage record written");
    assert_eq!(record.delivery, billing::Delivery::Delivered);
    assert_eq!(record.model, CHAT_MODEL);
    assert_eq!(record.endpoint, "/v1/chat/completions");
    assert_eq!(record.prompt_tokens, prompt_tokens);
    assert_eq!(record.completion_tokens, completion_tokens);
    assert_eq!(record.status, billing::UsageStatus::Success);
    assert!(record.finished_at >= record.started_at);
    let tenant = s
        .gateway
        .tenants
        .tenant_by_name("acme")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.tenant_id, tenant.id);
    assert_eq!(ledger.for_tenant(&tenant.id).await.unwrap().len(), 1);

    let metrics = e2e_tests::scrape(&s.http, &s.gateway.metrics_url).await;
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .map(str::to_owned)
    };
    assert_eq!(
        line(&format!(
            "gateway_http_requests_total{{model=\"{CHAT_MODEL}\",route=\"/v1/chat/completions\",status=\"200\"}}"
        )),
        Some(format!(
            "gateway_http_requests_total{{model=\"{CHAT_MODEL}\",route=\"/v1/chat/completions\",status=\"200\"}} 1"
        ))
    );
    let completion_line = format!(
        "gateway_tokens_total{{kind=\"completion\",model=\"{CHAT_MODEL}\",tenant=\"{}\"}} {completion_tokens}",
        tenant.id
    );
    assert!(metrics.contains(&completion_line), "{metrics}");
    assert!(metrics.contains("gateway_worker_up{worker="));
    // Conventional names and units, as Prometheus' own linter sees them.
    e2e_tests::promtool_check(&metrics);
    let worker_metrics = e2e_tests::scrape(&s.http, &format!("{}/metrics", s.worker.url)).await;
    assert!(worker_metrics.contains("worker_generated_tokens_total"));
    e2e_tests::promtool_check(&worker_metrics);
    s.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_completion_ends_with_done_and_is_recorded() {
    let s = Stack::start("acme").await;
    let response = s
        .post(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Count to five."}],
                   "max_tokens": 10, "stream": true, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let request_id = request_id(&response);
    let mut text = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(
        events.iter().all(|e| e.starts_with("data: ")),
        "only data events reach the client: {events:?}"
    );
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finishes = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .count();
    assert_eq!(finishes, 1);
    // The client did not ask for usage, so the usage chunk the gateway requested is hidden.
    assert!(chunks
        .iter()
        .all(|c| c.get("usage").is_none_or(Value::is_null)));

    let record = s
        .gateway
        .usage_record(&request_id)
        .await
        .expect("stream usage recorded");
    assert_eq!(record.delivery, billing::Delivery::Delivered);
    assert_eq!(record.status, billing::UsageStatus::Success);
    assert!(record.prompt_tokens > 0 && (1..=10).contains(&record.completion_tokens));
    s.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn models_embeddings_and_bad_keys() {
    let s = Stack::start("acme").await;
    let models: Value = s
        .http
        .get(format!("{}/v1/models", s.gateway.url))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![CHAT_MODEL, EMBEDDING_MODEL]);

    let response = s
        .post(
            "/v1/embeddings",
            json!({"model": EMBEDDING_MODEL, "input": ["hello world", "bonjour"], "encoding_format": "base64"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = request_id(&response);
    let body: Value = response.json().await.unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let v: Vec<f32> = bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(v.len(), 384);
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    let record = s.gateway.usage_record(&request_id).await.unwrap();
    assert_eq!(
        record.prompt_tokens,
        body["usage"]["prompt_tokens"].as_i64().unwrap()
    );

    for auth in [
        None,
        Some("sk-gw-not-a-key"),
        Some(&s.key[..s.key.len() - 1]),
    ] {
        let mut req = s
            .http
            .post(format!("{}/v1/chat/completions", s.gateway.url))
            .json(&json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}));
        if let Some(a) = auth {
            req = req.bearer_auth(a);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert!(response.headers().contains_key("x-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(body["error"]["message"].is_string());
        assert!(body["error"].get("param").is_some() && body["error"].get("type").is_some());
    }
    s.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_reads_its_own_tenants_usage_and_nobody_elses() {
    let s = Stack::start("first").await;
    let (other_key, _) = s
        .gateway
        .tenant_with_key("second", gateway::tenants::NewKey::default())
        .await;
    let embed = |key: String, text: &'static str| {
        let http = s.http.clone();
        let url = format!("{}/v1/embeddings", s.gateway.url);
        async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": EMBEDDING_MODEL, "input": text}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            request_id(&r)
        }
    };
    let mut ids = vec![
        embed(s.key.clone(), "one").await,
        embed(s.key.clone(), "two").await,
    ];
    ids.push(embed(other_key.clone(), "three").await);
    for id in &ids {
        s.gateway.usage_record(id).await.expect("recorded");
    }
    let usage = |key: String, query: &'static str| {
        let http = s.http.clone();
        let url = format!("{}/v1/usage{query}", s.gateway.url);
        async move {
            let r = http.get(url).bearer_auth(key).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, mine) = usage(s.key.clone(), "").await;
    assert_eq!(status, 200);
    assert_eq!(mine["data"].as_array().unwrap().len(), 1);
    assert_eq!(mine["data"][0]["model"], EMBEDDING_MODEL);
    assert_eq!(mine["data"][0]["requests"], 2);
    let (_, theirs) = usage(other_key.clone(), "").await;
    assert_eq!(theirs["data"][0]["requests"], 1);
    // A window in the past holds nothing; a malformed one is a 400.
    let (_, past) = usage(s.key.clone(), "?start=0&end=1000").await;
    assert_eq!(past["data"], json!([]));
    let (status, bad) = usage(s.key.clone(), "?start=yesterday").await;
    assert_eq!(status, 400);
    assert_eq!(bad["error"]["type"], "invalid_request_error");
    let (status, _) = usage("sk-gw-nope".into(), "").await;
    assert_eq!(status, 401);
    s.gateway.stop().await;
}

/// Tool definitions, constrained calls and every choice of `n` are billed exactly as the
/// worker counted them, streamed or not; a field outside the contract is refused by name at
/// the gateway and bills nothing.
#[tokio::test(flavor = "multi_thread")]
async fn tools_structured_output_and_n_choices_are_billed_as_the_worker_counted() {
    let s = Stack::start("tools").await;
    let weather = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": false}}});
    let question = json!([{"role": "user", "content": "What is the weather in Rome?"}]);
    let bodies = [
        json!({"model": CHAT_MODEL, "messages": question, "tools": [weather], "tool_choice": "required"}),
        json!({"model": CHAT_MODEL, "messages": question, "max_tokens": 60,
               "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema":
                   {"type": "object", "properties": {"sky": {"enum": ["clear", "rain"]}}, "required": ["sky"]}}}}),
        json!({"model": CHAT_MODEL, "messages": question, "n": 3, "max_tokens": 8}),
    ];
    let plain = s
        .post(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": question, "max_tokens": 8}),
        )
        .send()
        .await
        .unwrap();
    let plain: Value = plain.json().await.unwrap();
    for body in bodies {
        let response = s
            .post("/v1/chat/completions", body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        let v: Value = response.json().await.unwrap();
        let record = s.gateway.usage_record(&id).await.expect("recorded");
        assert_eq!(
            record.prompt_tokens,
            v["usage"]["prompt_tokens"].as_i64().unwrap(),
            "{body}"
        );
        assert_eq!(
            record.completion_tokens,
            v["usage"]["completion_tokens"].as_i64().unwrap(),
            "{body}"
        );
        if body.get("tools").is_some() {
            // The rendered definitions are prompt tokens like any other.
            assert!(record.prompt_tokens > plain["usage"]["prompt_tokens"].as_i64().unwrap() + 20);
            assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        }
        if body.get("n").is_some() {
            assert_eq!(v["choices"].as_array().unwrap().len(), 3);
            assert!(
                record.completion_tokens > 8,
                "three choices of up to 8 tokens: {v}"
            );
        }
    }

    // Streamed tool call: the record holds what the stream's usage chunk said.
    let response = s
        .post(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": question, "tools": [weather], "tool_choice": "required",
                   "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let usage = text
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .expect("usage chunk");
    assert!(text.contains("\"tool_calls\""), "{text}");
    let record = s.gateway.usage_record(&id).await.expect("recorded");
    assert_eq!(
        record.prompt_tokens,
        usage["prompt_tokens"].as_i64().unwrap()
    );
    assert_eq!(
        record.completion_tokens,
        usage["completion_tokens"].as_i64().unwrap()
    );

    // Unknown fields: refused with their name, before admission; nothing recorded.
    let before = records_of(&s, "tools").await;
    for stream in [false, true] {
        let response = s
            .post(
                "/v1/chat/completions",
                json!({"model": CHAT_MODEL, "messages": question, "stream": stream, "frobnicate": 1}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let v: Value = response.json().await.unwrap();
        assert_eq!(v["error"]["param"], "frobnicate", "{v}");
        assert_eq!(
            v["error"]["message"],
            "Unrecognized request argument supplied: frobnicate"
        );
    }
    let after = records_of(&s, "tools").await;
    assert_eq!(before, after);
}

/// How many usage records a tenant has.
async fn records_of(s: &Stack, tenant: &str) -> usize {
    let tenant = s
        .gateway
        .tenants
        .tenant_by_name(tenant)
        .await
        .unwrap()
        .unwrap();
    billing::Ledger::new(s.gateway.db.clone())
        .for_tenant(&tenant.id)
        .await
        .unwrap()
        .len()
}
