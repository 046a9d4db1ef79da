//! Structured output, tools, log probabilities and `n` on the real model: every reply a
//! constraint asks for parses and validates (checked with the `jsonschema` crate), tool
//! calls come back in OpenAI's shape whole and streamed, and a corpus of varied schemas is
//! either refused up front or always obeyed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::BTreeMap;

use std::sync::Arc;

use common::{models_dir, worker, Worker, CHAT};
use futures::StreamExt;
use inference_worker::llm::{ChatModel, EngineLimits};
use inference_worker::metrics::Metrics;
use serde_json::{json, Value};

fn validate(schema: &Value, instance: &Value) -> Result<(), String> {
    let validator = jsonschema::validator_for(schema).map_err(|e| format!("schema: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn message(v: &Value) -> &Value {
    &v["choices"][0]["message"]
}

/// A chat body about `prompt` with `extra` fields.
fn body(prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": CHAT, "messages": [{"role": "user", "content": prompt}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

async fn ok(w: &Worker, body: Value) -> Value {
    let (status, _, v) = w.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{body}: {v}");
    v
}

/// The data events of a streamed call, `[DONE]` excluded.
async fn stream(w: &Worker, body: Value) -> Vec<Value> {
    let r = w
        .http
        .post(format!("{}/v1/chat/completions", w.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let mut bytes = r.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]}
        }, "required": ["city", "unit"], "additionalProperties": false}
    }})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {
            "timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}
        }, "required": ["timezone"], "additionalProperties": false}
    }})
}

fn schema_of(tool: &Value) -> &Value {
    &tool["function"]["parameters"]
}

#[tokio::test(flavor = "multi_thread")]
async fn json_object_and_json_schema_replies_parse_and_validate() {
    let w = worker(&[]).await;
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2)] {
        let v = ok(
            &w,
            body(
                "Describe a cat.",
                json!({"response_format": {"type": "json_object"}, "temperature": temperature,
                       "seed": seed, "max_tokens": 200}),
            ),
        )
        .await;
        let content = message(&v)["content"].as_str().unwrap();
        let parsed: Value =
            serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
        assert!(parsed.is_object(), "{content}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "sounds": {"type": "array", "items": {"enum": ["meow", "purr", "hiss"]}, "minItems": 1, "maxItems": 3}
    }, "required": ["name", "legs", "sounds"], "additionalProperties": false});
    let v = ok(
        &w,
        body(
            "Describe a cat.",
            json!({"response_format": {"type": "json_schema", "json_schema":
                {"name": "animal", "strict": true, "schema": schema}}, "temperature": 0.8, "seed": 3}),
        ),
    )
    .await;
    let content = message(&v)["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap();
    validate(&schema, &parsed).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn named_and_required_tool_choices_return_valid_calls() {
    let w = worker(&[]).await;
    let tools = json!([weather_tool(), time_tool()]);
    let v = ok(
        &w,
        body(
            "What is the weather in Paris?",
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ),
    )
    .await;
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let m = message(&v);
    assert!(m["content"].is_null(), "{m}");
    let calls = m["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{m}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    validate(schema_of(&weather_tool()), &args).unwrap();

    for seed in 0..3 {
        let v = ok(
            &w,
            body(
                "What time is it in Tokyo, and the weather there?",
                json!({"tools": tools, "tool_choice": "required", "temperature": 1.0, "seed": seed,
                       "max_tokens": 300}),
            ),
        )
        .await;
        let calls = message(&v)["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        for call in calls {
            let name = call["function"]["name"].as_str().unwrap();
            let tool = if name == "get_weather" {
                weather_tool()
            } else {
                time_tool()
            };
            assert_eq!(tool["function"]["name"], name);
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            validate(schema_of(&tool), &args).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_tool_call_assembles_from_deltas_as_openai_sends_them() {
    let w = worker(&[]).await;
    let events = stream(
        &w,
        body(
            "What is the weather in Oslo?",
            json!({"tools": [weather_tool()], "tool_choice": "required", "stream": true,
                   "parallel_tool_calls": false}),
        ),
    )
    .await;
    let mut calls: BTreeMap<u64, (Option<String>, String, String)> = BTreeMap::new();
    let mut finish = None;
    for e in &events {
        let choice = &e["choices"][0];
        if let Some(r) = choice["finish_reason"].as_str() {
            finish = Some(r.to_owned());
        }
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = d["index"].as_u64().unwrap();
            let entry = calls
                .entry(index)
                .or_insert((None, String::new(), String::new()));
            if let Some(id) = d["id"].as_str() {
                // The first fragment of a call carries its id, type and name.
                assert!(entry.0.is_none() && entry.2.is_empty(), "{d}");
                assert_eq!(d["type"], "function");
                entry.0 = Some(id.to_owned());
                entry.1 = d["function"]["name"].as_str().unwrap().to_owned();
            } else {
                assert!(entry.0.is_some(), "arguments before the call's start: {d}");
            }
            if let Some(a) = d["function"]["arguments"].as_str() {
                entry.2.push_str(a);
            }
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (id, name, args) = &calls[&0];
    assert!(id.as_ref().unwrap().starts_with("call_"));
    assert_eq!(name, "get_weather");
    let args: Value = serde_json::from_str(args).unwrap();
    validate(schema_of(&weather_tool()), &args).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tool_result_turn_is_answered_and_tool_choice_none_gives_text() {
    let w = worker(&[]).await;
    let tools = json!([weather_tool()]);
    let history = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}
    ]);
    let v = ok(
        &w,
        json!({"model": CHAT, "messages": history, "tools": tools, "tool_choice": "none", "max_tokens": 40}),
    )
    .await;
    let m = message(&v);
    assert!(m["tool_calls"].is_null(), "{m}");
    assert!(!m["content"].as_str().unwrap().is_empty());
    assert_ne!(v["choices"][0]["finish_reason"], "tool_calls");
    // `auto` may answer either way; whichever it is, it is well formed.
    let v = ok(
        &w,
        json!({"model": CHAT, "messages": history, "tools": tools, "max_tokens": 60}),
    )
    .await;
    let m = message(&v);
    match m["tool_calls"].as_array() {
        Some(calls) => {
            assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
            for c in calls {
                let args: Value =
                    serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
                validate(schema_of(&weather_tool()), &args).unwrap();
            }
        }
        None => assert!(m["content"].is_string(), "{m}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logprobs_come_from_the_sampled_distribution_and_n_choices_share_a_prompt() {
    let w = worker(&[]).await;
    let v = ok(
        &w,
        body(
            "Name a colour.",
            json!({"logprobs": true, "top_logprobs": 3, "temperature": 0, "max_tokens": 6}),
        ),
    )
    .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut text = Vec::new();
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{entry}");
        // Greedy: the token taken is the likeliest, and its log probability is the top one.
        assert_eq!(top[0]["token"], entry["token"], "{entry}");
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{lps:?}"
        );
        assert!(lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-4);
        text.extend(
            entry["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(
        String::from_utf8(text).unwrap(),
        message(&v)["content"].as_str().unwrap()
    );

    // n = 3: three choices, usage counts the prompt once and every choice's tokens.
    let v = ok(
        &w,
        body(
            "Name a colour.",
            json!({"n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 8, "logprobs": true}),
        ),
    )
    .await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let tokens: u64 = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["logprobs"]["content"].as_array().unwrap().len() as u64
        })
        .sum();
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap(), tokens);
    let single = ok(&w, body("Name a colour.", json!({"max_tokens": 1}))).await;
    assert_eq!(
        v["usage"]["prompt_tokens"],
        single["usage"]["prompt_tokens"]
    );
    let texts: Vec<&str> = choices
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");

    // A streamed n = 2 ends each choice and reports the summed usage once.
    let events = stream(
        &w,
        body(
            "Name a colour.",
            json!({"n": 2, "stream": true, "max_tokens": 5, "temperature": 1.0,
                                       "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    let finished: Vec<u64> = events
        .iter()
        .filter(|e| e["choices"][0]["finish_reason"].is_string())
        .map(|e| e["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(finished.len(), 2);
    assert!(finished.contains(&0) && finished.contains(&1));
    let usage = &events.last().unwrap()["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    // Sampled at temperature 1, a choice may end before its 5 tokens; both at length: 10.
    let lengths = events
        .iter()
        .filter(|e| e["choices"][0]["finish_reason"] == "length")
        .count();
    let expected = match lengths {
        2 => 10..11,
        1 => 5..10,
        _ => 0..10,
    };
    assert!(
        expected.contains(&completion),
        "{lengths} at length: {usage}"
    );
}

fn first_token_bytes(v: &Value) -> Vec<u8> {
    v["choices"][0]["logprobs"]["content"][0]["bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn logit_bias_bans_and_forces_tokens() {
    let w = worker(&[]).await;
    let greedy = |bias: Value| json!({"temperature": 0, "max_tokens": 1, "logprobs": true, "top_logprobs": 20, "logit_bias": bias});
    let natural = ok(&w, body("Say hello.", greedy(json!({})))).await;
    let taken = first_token_bytes(&natural);
    // The id of that token, from the model's own tokenizer.
    let limits = EngineLimits {
        max_active: 1,
        max_queued: 1,
        max_context: None,
        prefix_cache_bytes: 0,
    };
    let model = ChatModel::load(
        "m".into(),
        &models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        limits,
        Arc::new(Metrics::new().unwrap()),
    )
    .unwrap();
    let ids = model.encode(std::str::from_utf8(&taken).unwrap()).unwrap();
    assert_eq!(ids.len(), 1, "{taken:?} is one token");
    let id = ids[0].to_string();

    // Banned, the likeliest token is neither taken nor listed among the alternatives.
    let banned = ok(&w, body("Say hello.", greedy(json!({&id: -100})))).await;
    assert_ne!(first_token_bytes(&banned), taken);
    let listed: Vec<&Value> = banned["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["bytes"])
        .collect();
    assert_eq!(listed.len(), 20);
    assert!(!listed.contains(&&json!(taken)), "a banned token is listed");
    // Raised by 100, it is taken where it would not be.
    let elsewhere = ok(&w, body("Name a colour.", greedy(json!({})))).await;
    assert_ne!(first_token_bytes(&elsewhere), taken);
    let forced = ok(&w, body("Name a colour.", greedy(json!({&id: 100})))).await;
    assert_eq!(first_token_bytes(&forced), taken);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corpus_of_schemas_is_refused_up_front_or_always_obeyed() {
    let corpus: Vec<Value> = serde_json::from_str(include_str!("fixtures/schemas.json")).unwrap();
    assert!(corpus.len() >= 100);
    let w = worker(&["--max-active-sequences", "16"]).await;
    let results = futures::stream::iter(corpus.iter().enumerate())
        .map(|(i, case)| {
            let w = &w;
            async move {
                let request = json!({
                    "model": CHAT,
                    "messages": [
                        {"role": "system", "content": "Answer with JSON only."},
                        {"role": "user", "content": case["prompt"]}
                    ],
                    "response_format": {"type": "json_schema", "json_schema":
                        {"name": case["name"], "strict": true, "schema": case["schema"]}},
                    "temperature": 0.7,
                    "seed": i,
                    "max_tokens": 400
                });
                let (status, _, v) = w.post("/v1/chat/completions", request).await;
                (case, status, v)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut refused = Vec::new();
    let mut failures = Vec::new();
    for (case, status, v) in &results {
        let name = case["name"].as_str().unwrap();
        match status {
            200 => {
                let content = message(v)["content"].as_str().unwrap_or_default();
                let outcome = serde_json::from_str::<Value>(content)
                    .map_err(|e| format!("not JSON ({e})"))
                    .and_then(|parsed| validate(&case["schema"], &parsed));
                if v["choices"][0]["finish_reason"] != "stop" {
                    failures.push(format!("{name}: cut at max_tokens: {content}"));
                } else if let Err(e) = outcome {
                    failures.push(format!("{name}: {e}: {content}"));
                }
            }
            400 => {
                assert_eq!(v["error"]["param"], "response_format", "{v}");
                refused.push(format!(
                    "{name}: {}",
                    v["error"]["message"].as_str().unwrap()
                ));
            }
            other => failures.push(format!("{name}: status {other}: {v}")),
        }
    }
    let compiled = results.len() - refused.len();
    println!(
        "{compiled} of {} schemas compiled ({:.1} %); {} refused:",
        results.len(),
        100.0 * compiled as f64 / results.len() as f64,
        refused.len()
    );
    for r in &refused {
        println!("  refused {r}");
    }
    assert!(
        failures.is_empty(),
        "outputs that broke their schema:\n{}",
        failures.join("\n")
    );
    assert!(
        compiled * 10 >= results.len() * 8,
        "fewer than 80 % of the schemas compiled"
    );
}
