//! Classifiers trained on a tenant's own examples (SPEC §12), through the gateway with a
//! real worker: bad input refused by name, training in the background, a 409 until ready,
//! classify in the zero-shot reply's shape, other tenants get a 404, training and
//! classify billed, and a restarted gateway still serves the classifier.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::time::Duration;

use e2e_tests::{
    gateway_config, wait_for, RunningGateway, TempSqlite, WorkerProcess, CHAT_MODEL,
    EMBEDDING_MODEL,
};
use serde_json::{json, Value};

/// Short texts of three topics, `n` each.
fn examples(n: usize) -> Vec<Value> {
    let topics = [
        (
            "weather",
            [
                "It will rain all afternoon",
                "A cold front brings snow tonight",
                "Sunny skies and a light breeze",
                "Thunderstorms are expected by evening",
                "The fog lifts before noon",
                "Strong winds along the coast",
            ],
        ),
        (
            "sports",
            [
                "The striker scored twice in the final",
                "Our team lost the match in overtime",
                "She won the marathon in record time",
                "The coach praised the defence",
                "A late goal decided the derby",
                "He served three aces in a row",
            ],
        ),
        (
            "cooking",
            [
                "Simmer the sauce for twenty minutes",
                "Knead the dough until it is smooth",
                "Roast the vegetables with olive oil",
                "Whisk the eggs with a pinch of salt",
                "Bake the bread until golden",
                "Chop the onions finely",
            ],
        ),
    ];
    let mut out = Vec::new();
    for (label, texts) in topics {
        for i in 0..n {
            out.push(json!({"text": format!("{} ({i})", texts[i % texts.len()]), "label": label}));
        }
    }
    out
}

async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Option<Value>,
) -> (u16, Value, String) {
    let mut r = http.request(method, url).bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, r.json().await.unwrap_or(Value::Null), id)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_trains_classifies_and_keeps_its_classifier() {
    let worker = WorkerProcess::start().await;
    let store = TempSqlite::new();
    let config = gateway_config(&store.url, std::slice::from_ref(&worker.url));
    let gateway = RunningGateway::start(config.clone()).await;
    let (key, _) = gateway.tenant_with_key("owner", Default::default()).await;
    let (other, _) = gateway.tenant_with_key("other", Default::default()).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", gateway.url);
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;

    // Bad input is a 400 naming the problem.
    let one_label = json!({"model": EMBEDDING_MODEL, "name": "x",
        "examples": [{"text": "a", "label": "only"}, {"text": "b", "label": "only"}]});
    let lonely = json!({"model": EMBEDDING_MODEL, "name": "x",
        "examples": [{"text": "a", "label": "p"}, {"text": "b", "label": "p"}, {"text": "c", "label": "q"}]});
    let empty = json!({"model": EMBEDDING_MODEL, "name": "x",
        "examples": [{"text": "a", "label": "p"}, {"text": " ", "label": "p"}, {"text": "c", "label": "q"}, {"text": "d", "label": "q"}]});
    let long = json!({"model": EMBEDDING_MODEL, "name": "x",
        "examples": [{"text": "a".repeat(9_000), "label": "p"}, {"text": "b", "label": "p"}, {"text": "c", "label": "q"}, {"text": "d", "label": "q"}]});
    let chat_model = json!({"model": CHAT_MODEL, "name": "x", "examples": examples(2)});
    let bad_option = json!({"model": EMBEDDING_MODEL, "name": "x", "examples": examples(2), "options": {"l2": -1}});
    for (body, needle) in [
        (one_label, "at least 2 labels"),
        (lonely, "label `q` has 1 example"),
        (empty, "examples[1].text is empty"),
        (long, "examples[0].text is 9000 bytes"),
        (chat_model, "is a chat model"),
        (bad_option, "options.l2"),
    ] {
        let (status, body, _) = send(
            &http,
            post.clone(),
            url("/v1/classifiers"),
            &key,
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    let too_many: Vec<Value> = (0..50_001)
        .map(|i| json!({"text": "t", "label": if i % 2 == 0 { "p" } else { "q" }}))
        .collect();
    let too_many = json!({"model": EMBEDDING_MODEL, "name": "x", "examples": too_many});
    let (status, body, _) = send(
        &http,
        post.clone(),
        url("/v1/classifiers"),
        &key,
        Some(too_many),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("50001 examples is more than the 50000"),
        "{body}"
    );
    let unknown = json!({"model": "no-such-model", "name": "x", "examples": examples(2)});
    let (status, _, _) = send(
        &http,
        post.clone(),
        url("/v1/classifiers"),
        &key,
        Some(unknown),
    )
    .await;
    assert_eq!(status, 404);

    // Created at once, trained in the background.
    let new = json!({"model": EMBEDDING_MODEL, "name": "topics", "examples": examples(8),
        "options": {"seed": 3}});
    let (status, created, _) =
        send(&http, post.clone(), url("/v1/classifiers"), &key, Some(new)).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["object"], "classifier");
    assert_eq!(created["status"], "training");
    assert_eq!(created["labels"], json!(["weather", "sports", "cooking"]));
    let id = created["id"].as_str().unwrap().to_owned();
    let classify = |input: Value| json!({"classifier": id, "input": input});
    let (status, body, _) = send(
        &http,
        post.clone(),
        url("/v1/classify"),
        &key,
        Some(classify(json!("rain again"))),
    )
    .await;
    assert_eq!(status, 409, "not ready yet: {body}");
    let ready = wait_for("the classifier trained", Duration::from_secs(60), || {
        let (http, url, key) = (&http, url(&format!("/v1/classifiers/{id}")), &key);
        async move {
            let (_, c, _) = send(http, reqwest::Method::GET, url, key, None).await;
            (c["status"] != "training").then_some(c)
        }
    })
    .await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let metrics = &ready["metrics"];
    assert!(metrics["accuracy"].as_f64().unwrap() >= 0.8, "{metrics}");
    assert!(metrics["macro_f1"].as_f64().unwrap() >= 0.8, "{metrics}");
    assert_eq!(metrics["per_label"].as_array().unwrap().len(), 3);
    assert!(!metrics["loss_curve"].as_array().unwrap().is_empty());
    assert_eq!(ready["examples"], 24);
    let trained_tokens = ready["tokens"].as_i64().unwrap();
    assert!(trained_tokens > 24, "{ready}");

    // Classify: one text, then a list, in the zero-shot reply's shape.
    let (status, one, one_id) = send(
        &http,
        post.clone(),
        url("/v1/classify"),
        &key,
        Some(classify(json!(
            "Heavy rain and wind are forecast for tomorrow"
        ))),
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["prediction"], "weather", "{one}");
    assert_eq!(one["classifier"], id.as_str());
    let sum: f64 = one["scores"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-4);
    let (status, many, _) = send(
        &http,
        post.clone(),
        url("/v1/classify"),
        &key,
        Some(classify(json!([
            "The goalkeeper saved a penalty",
            "Fry the garlic gently in butter"
        ]))),
    )
    .await;
    assert_eq!(status, 200, "{many}");
    let predictions: Vec<&str> = many["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["prediction"].as_str().unwrap())
        .collect();
    assert_eq!(predictions, ["sports", "cooking"]);

    // Another tenant's key: as if it did not exist.
    for (method, path, body) in [
        (get.clone(), format!("/v1/classifiers/{id}"), None),
        (
            post.clone(),
            "/v1/classify".to_owned(),
            Some(classify(json!("rain"))),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/classifiers/{id}"),
            None,
        ),
    ] {
        let (status, body, _) = send(&http, method, url(&path), &other, body).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (_, listed, _) = send(&http, get.clone(), url("/v1/classifiers"), &other, None).await;
    assert_eq!(listed["data"], json!([]));
    let (_, listed, _) = send(&http, get.clone(), url("/v1/classifiers"), &key, None).await;
    assert_eq!(listed["data"][0]["id"], id.as_str());

    // Billed: the training's embedding tokens, and the classify call's.
    let record = gateway.usage_record(&one_id).await.unwrap();
    assert_eq!(record.endpoint, "/v1/classify");
    assert!(record.prompt_tokens > 0);
    let ledger = billing::Ledger::new(gateway.db.clone());
    let training_tokens = wait_for(
        "training usage in the store",
        Duration::from_secs(10),
        || {
            let ledger = ledger.clone();
            let tenant = record.tenant_id.clone();
            async move {
                let sum: i64 = ledger
                    .for_tenant(&tenant)
                    .await
                    .unwrap()
                    .iter()
                    .filter(|e| e.endpoint == "/v1/classifiers")
                    .map(|e| e.prompt_tokens)
                    .sum();
                (sum == trained_tokens).then_some(sum)
            }
        },
    )
    .await;
    assert_eq!(training_tokens, trained_tokens);

    // A restarted gateway (another process would read the same store) still serves it.
    gateway.stop().await;
    let gateway = RunningGateway::start(config).await;
    let (status, again, _) = send(
        &http,
        post.clone(),
        format!("{}/v1/classify", gateway.url),
        &key,
        Some(json!({"classifier": id, "input": "Snow is falling on the hills"})),
    )
    .await;
    assert_eq!(
        (status, again["prediction"].as_str()),
        (200, Some("weather")),
        "{again}"
    );
    let (status, _, _) = send(
        &http,
        reqwest::Method::DELETE,
        format!("{}/v1/classifiers/{id}", gateway.url),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = send(
        &http,
        get,
        format!("{}/v1/classifiers/{id}", gateway.url),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 404);

    // The CLI: a CSV file in, a progress bar on stderr, the ready classifier out.
    let csv = store.dir().join("examples.csv");
    let mut rows = String::from("text,label\n");
    for e in examples(4) {
        rows.push_str(&format!(
            "\"{}\",{}\n",
            e["text"].as_str().unwrap(),
            e["label"].as_str().unwrap()
        ));
    }
    std::fs::write(&csv, rows).unwrap();
    let cli = tokio::process::Command::new(e2e_tests::binary("gateway"))
        .args([
            "--json",
            "create-classifier",
            "--url",
            &gateway.url,
            "--key",
            &key,
        ])
        .args(["--model", EMBEDDING_MODEL, "--name", "from-csv", "--file"])
        .arg(&csv)
        .output()
        .await
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let made: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(
        (made["status"].as_str(), made["examples"].as_i64()),
        (Some("ready"), Some(12)),
        "{made}"
    );
    gateway.stop().await;
}
