//! The worker's HTTP API, end to end against the real binary and the real models:
//! sampling controls, stops, limits, validation, backpressure and cancellation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

mod common;

use common::{worker, CHAT, EMBED};

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sampling_controls_stops_and_limits() {
    let w = worker(&[]).await;
    // The same seed reproduces a sampled completion; another seed does not (almost surely).
    let a = w
        .chat(json!({"temperature": 1.0, "top_p": 0.95, "seed": 7, "max_tokens": 16}))
        .await;
    let b = w
        .chat(json!({"temperature": 1.0, "top_p": 0.95, "seed": 7, "max_tokens": 16}))
        .await;
    let c = w
        .chat(json!({"temperature": 1.0, "top_p": 0.95, "seed": 8, "max_tokens": 16}))
        .await;
    assert_eq!(content(&a), content(&b));
    assert_ne!(content(&a), content(&c));

    // max_completion_tokens wins over max_tokens and is exact.
    let v = w
        .chat(json!({"temperature": 0, "max_completion_tokens": 5, "max_tokens": 50}))
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );

    // A stop sequence ends generation and is left out of the text.
    let full = w.chat(json!({"temperature": 0, "max_tokens": 40})).await;
    let text = content(&full);
    let cut_at = text.find(' ').unwrap() + 1;
    let stop = &text[cut_at..cut_at + 3];
    let v = w
        .chat(json!({"temperature": 0, "max_tokens": 40, "stop": [stop, "zzzz"]}))
        .await;
    assert_eq!(content(&v), &text[..text.find(stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_openai_shaped_errors() {
    let w = worker(&[]).await;
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": CHAT, "messages": user, "n": 9}),
            400,
            "n",
        ),
        (
            "/v1/chat/completions",
            json!({"model": CHAT, "messages": user, "frobnicate": true}),
            400,
            "frobnicate",
        ),
        (
            "/v1/chat/completions",
            json!({"model": CHAT, "messages": user, "logit_bias": {"999999": 5}}),
            400,
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            json!({"model": CHAT, "messages": user, "response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such-format"}}}}),
            400,
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"model": CHAT, "messages": user, "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "stop",
        ),
        (
            "/v1/chat/completions",
            json!({"model": CHAT, "messages": []}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"model": CHAT, "messages": user, "temperature": 3}),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": user}),
            404,
            "model",
        ),
        (
            "/v1/completions",
            json!({"model": CHAT, "prompt": [1, 999999]}),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"model": CHAT, "prompt": "x", "suffix": "y"}),
            400,
            "suffix",
        ),
        (
            "/v1/responses",
            json!({"model": CHAT, "input": "x", "store": true}),
            400,
            "store",
        ),
        (
            "/v1/responses",
            json!({"model": CHAT, "input": [{"type": "input_image"}]}),
            400,
            "input[0]",
        ),
        (
            "/v1/embeddings",
            json!({"model": EMBED, "input": ["ok", ""]}),
            400,
            "input",
        ),
        (
            "/v1/embeddings",
            json!({"model": EMBED, "input": "x", "dimensions": 999}),
            400,
            "dimensions",
        ),
        (
            "/v1/embeddings",
            json!({"model": EMBED, "input": "x", "encoding_format": "hex"}),
            400,
            "encoding_format",
        ),
        (
            "/v1/embeddings",
            json!({"model": EMBED, "input": vec!["x"; 2049]}),
            400,
            "input",
        ),
        (
            "/v1/classify",
            json!({"model": EMBED, "input": "x", "labels": ["only one"]}),
            400,
            "labels",
        ),
    ];
    for (path, body, status, param) in cases {
        let (got, _, v) = w.post(path, body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].is_string());
    }
    let r = w
        .http
        .post(format!("{}/v1/chat/completions", w.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_agree_between_batch_and_single_and_truncate_to_unit_length() {
    let w = worker(&[]).await;
    let texts = [
        "A short one.",
        "A considerably longer sentence about embeddings and batching.",
    ];
    let (_, _, batch) = w
        .post("/v1/embeddings", json!({"model": EMBED, "input": texts}))
        .await;
    for (i, t) in texts.iter().enumerate() {
        let (_, _, single) = w
            .post("/v1/embeddings", json!({"model": EMBED, "input": t}))
            .await;
        let a: Vec<f64> = serde_json::from_value(batch["data"][i]["embedding"].clone()).unwrap();
        let b: Vec<f64> = serde_json::from_value(single["data"][0]["embedding"].clone()).unwrap();
        let cos: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(cos > 0.99999, "cosine {cos}");
    }
    let (_, _, short) = w
        .post(
            "/v1/embeddings",
            json!({"model": EMBED, "input": "x", "dimensions": 32}),
        )
        .await;
    let v: Vec<f64> = serde_json::from_value(short["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(v.len(), 32);
    assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_is_503_and_a_disconnect_stops_generation() {
    let w = worker(&["--max-active-sequences", "1", "--max-queued", "1"]).await;
    let long = json!({"model": CHAT, "messages": [{"role": "user", "content": "Write a long story."}],
                      "max_tokens": 2000, "temperature": 0, "stream": true});
    // One decoding, one waiting: the third is refused at once.
    let first = w
        .http
        .post(format!("{}/v1/chat/completions", w.url))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut first = first.bytes_stream();
    // The role chunk comes from the handler; wait for a token, so the engine holds it.
    let mut seen = String::new();
    while seen.matches("\"content\"").count() < 2 {
        seen.push_str(&String::from_utf8_lossy(
            &first.next().await.unwrap().unwrap(),
        ));
    }
    let second = w
        .http
        .post(format!("{}/v1/chat/completions", w.url))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    let (status, headers, v) = w.post("/v1/chat/completions", long.clone()).await;
    assert_eq!(status, 503, "{v}");
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            <= 120
    );
    assert_eq!(v["error"]["code"], "overloaded");

    // Dropping both clients stops both generations within a step or two.
    let generated_before = w.metric("worker_generated_tokens_total").await;
    drop(first);
    drop(second);
    let started = Instant::now();
    while w.metric("worker_cancelled_generations_total").await < 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "generations were not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let generated_after = w.metric("worker_generated_tokens_total").await;
    assert!(
        generated_after - generated_before < 100.0,
        "{generated_before} -> {generated_after}"
    );
    assert_eq!(w.metric("worker_active_sequences").await, 0.0);
}

/// Zero-shot classification on a small labelled set (`tests/fixtures/classify_labelled.json`,
/// four topics): prints the accuracy and the confusions, and requires better than chance
/// by a wide margin, so a broken embedding or scoring cannot pass.
#[tokio::test]
async fn classify_accuracy_on_a_labelled_set() {
    let w = worker(&[]).await;
    let set: Value = serde_json::from_str(include_str!("fixtures/classify_labelled.json")).unwrap();
    let labels = set["labels"].clone();
    let examples = set["examples"].as_array().unwrap();
    let inputs: Vec<&str> = examples.iter().map(|e| e[0].as_str().unwrap()).collect();
    let (status, _, v) = w
        .post(
            "/v1/classify",
            json!({"model": EMBED, "input": inputs, "labels": labels}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let predictions = v["data"].as_array().unwrap();
    assert_eq!(predictions.len(), examples.len());
    let mut right = 0;
    let mut confusions = Vec::new();
    for (e, p) in examples.iter().zip(predictions) {
        let (text, want) = (e[0].as_str().unwrap(), e[1].as_str().unwrap());
        let got = p["prediction"].as_str().unwrap();
        if got == want {
            right += 1;
        } else {
            confusions.push(format!("  {want} -> {got}: {text}"));
        }
    }
    let accuracy = right as f64 / examples.len() as f64;
    println!(
        "classify accuracy: {right}/{} = {:.1} % (chance {:.1} %)\n{}",
        examples.len(),
        accuracy * 100.0,
        100.0 / labels.as_array().unwrap().len() as f64,
        confusions.join("\n")
    );
    assert!(accuracy >= 0.6, "accuracy {accuracy}");
}

/// A classify call is billed for every text it classifies by: the input and each label. Its
/// usage equals what `/v1/embeddings` reports for the same texts, so 64 long labels cannot
/// ride free on a one-word input, and that holds when the labels come from the label cache
/// (the second call: only its inputs go through the model).
#[tokio::test(flavor = "multi_thread")]
async fn classify_usage_counts_the_labels_too() {
    let w = worker(&[]).await;
    let labels: Vec<String> = (0..64)
        .map(|i| format!("label number {i}: a fairly long description of one more topic"))
        .collect();
    for (call, input) in [json!("hi"), json!(["hi", "the weather is fine today"])]
        .into_iter()
        .enumerate()
    {
        let embedded_before = w.metric("worker_embedded_texts_total").await;
        let (status, _, classified) = w
            .post(
                "/v1/classify",
                json!({"model": EMBED, "input": input, "labels": labels}),
            )
            .await;
        assert_eq!(status, 200, "{classified}");
        let inputs = input.as_array().map_or(1, Vec::len) as f64;
        let embedded = w.metric("worker_embedded_texts_total").await - embedded_before;
        let hits = w.metric("worker_label_cache_hits_total").await;
        if call == 0 {
            assert_eq!(embedded, inputs + 64.0);
            assert_eq!(hits, 0.0);
        } else {
            assert_eq!(embedded, inputs, "the labels came from the cache");
            assert_eq!(hits, 64.0);
        }
        let mut texts: Vec<Value> = match &input {
            Value::Array(items) => items.clone(),
            one => vec![one.clone()],
        };
        let (_, _, inputs_only) = w
            .post("/v1/embeddings", json!({"model": EMBED, "input": texts}))
            .await;
        texts.extend(labels.iter().map(|l| json!(l)));
        let (status, _, embedded) = w
            .post("/v1/embeddings", json!({"model": EMBED, "input": texts}))
            .await;
        assert_eq!(status, 200, "{embedded}");
        let billed = &classified["usage"];
        println!(
            "classify of {input} with 64 labels: billed {billed}, input alone {}, input and labels {}",
            inputs_only["usage"]["prompt_tokens"], embedded["usage"]["prompt_tokens"]
        );
        assert_eq!(billed["prompt_tokens"], embedded["usage"]["prompt_tokens"]);
        assert_eq!(billed["total_tokens"], embedded["usage"]["total_tokens"]);
    }
}

/// Prompts far beyond the context window are refused by their size before any rendering
/// or tokenisation, and the work a prompt does take never runs on the async runtime: while
/// several clients send 6 MiB prompts, and then prompts just under the size bound (which
/// are tokenised, then refused by their token count), a normal chat call keeps being
/// answered.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_prompt_is_refused_fast_and_starves_no_one() {
    const ATTACKERS: usize = 4;
    const ROUNDS: usize = 3;
    let w = worker(&[]).await;
    // Varied words: a long run of one character would tokenise unusually fast.
    let words = [
        "sea", "wind", "stone", "river", "light", "ember", "north", "cloud",
    ];
    let text = |bytes: usize| {
        (0..bytes / 6)
            .map(|i| words[(i * 7 + i / 3) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Past any size bound; then under the bound (8,191 tokens of at most 81 bytes) but
    // far over the context window in tokens.
    for (bytes, refused_by) in [(6 << 20, "bytes"), (600 << 10, "tokens")] {
        let prompt = text(bytes);
        let body = json!({"model": CHAT, "max_tokens": 1,
                          "messages": [{"role": "user", "content": prompt}]})
        .to_string();
        let normal = async {
            let mut latencies = Vec::new();
            for _ in 0..ATTACKERS * ROUNDS {
                let started = Instant::now();
                w.chat(json!({"max_tokens": 1})).await;
                latencies.push(started.elapsed());
            }
            latencies
        };
        let attacks = futures::future::join_all((0..ATTACKERS).map(|_| async {
            let mut refusals = Vec::new();
            for _ in 0..ROUNDS {
                let started = Instant::now();
                let r = w
                    .http
                    .post(format!("{}/v1/chat/completions", w.url))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                refusals.push((started.elapsed(), status, v));
            }
            refusals
        }));
        let (mut latencies, refusals) = tokio::join!(normal, attacks);
        let refusals: Vec<_> = refusals.into_iter().flatten().collect();
        latencies.sort();
        let mut refused_in: Vec<Duration> = refusals.iter().map(|r| r.0).collect();
        refused_in.sort();
        let slowest = refused_in[refused_in.len() - 1];
        println!(
            "{} prompts of {} KiB refused in {:?} .. {slowest:?}; a normal call meanwhile: \
             median {:?}, max {:?}",
            refusals.len(),
            prompt.len() / 1024,
            refused_in[0],
            latencies[latencies.len() / 2],
            latencies[latencies.len() - 1]
        );
        for (_, status, v) in &refusals {
            assert_eq!(*status, 400, "{v}");
            assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(refused_by),
                "refused by its {refused_by}: {message}"
            );
        }
        if refused_by == "bytes" {
            // Generous: bounding by size takes microseconds; tokenising 6 MiB, seconds.
            assert!(
                slowest < Duration::from_secs(3),
                "an oversized prompt took {slowest:?} to refuse"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_read_text_and_token_ids_alike_without_a_template() {
    let w = worker(&[]).await;
    let (status, _, text) = w
        .post(
            "/v1/completions",
            json!({"model": CHAT, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 0}),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text["object"], "text_completion");
    // No template: the prompt is the text's own tokens.
    let prompt_tokens = text["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens < 10, "{text}");
    let tokens = text["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .len() as u64;
    assert_eq!(tokens, text["usage"]["completion_tokens"].as_u64().unwrap());
    // The same prompt as token ids (from a model of the same file) gives the same text.
    let limits = inference_worker::llm::EngineLimits {
        max_active: 1,
        max_queued: 1,
        max_context: None,
        prefix_cache_bytes: 0,
    };
    let model = inference_worker::llm::ChatModel::load(
        "m".into(),
        &common::models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        limits,
        std::sync::Arc::new(inference_worker::metrics::Metrics::new().unwrap()),
    )
    .unwrap();
    let ids = model.encode("The capital of France is").unwrap();
    let (status, _, by_ids) = w
        .post(
            "/v1/completions",
            json!({"model": CHAT, "prompt": ids, "max_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{by_ids}");
    assert_eq!(by_ids["choices"][0]["text"], text["choices"][0]["text"]);
    assert_eq!(
        by_ids["usage"]["prompt_tokens"],
        text["usage"]["prompt_tokens"]
    );
    assert_eq!(
        by_ids["usage"]["completion_tokens"],
        text["usage"]["completion_tokens"]
    );
}
