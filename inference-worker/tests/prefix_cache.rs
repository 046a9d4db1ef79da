//! The prefix cache on the real model: a prompt that begins as an earlier one reads only
//! the rest, says so in `prompt_tokens_details.cached_tokens`, and answers exactly as a
//! worker without the cache does — tokens and log probabilities, streamed or not, with `n`
//! choices and under a JSON schema — and the cache stays within its byte bound.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use common::{worker, Worker, CHAT};
use serde_json::{json, Value};

const SYSTEM: &str = "You are a careful assistant for a shipping company. You answer questions \
about parcels, delivery times, customs forms, insurance, returns, damaged goods, addresses, \
tracking numbers, pick-up slots, opening hours of depots, prices per kilogram and per zone, \
surcharges for remote areas, dangerous goods rules, batteries, liquids, perishable food, \
documents, pallets and oversized items. Keep answers short, polite and precise. If you do not \
know, say so and suggest contacting the support desk, which is open from eight to six on \
weekdays and from nine to one on Saturdays. Never invent tracking numbers or prices.";

fn conversation(turns: &[(&str, &str)], question: &str) -> Value {
    let mut messages = vec![json!({"role": "system", "content": SYSTEM})];
    for (q, a) in turns {
        messages.push(json!({"role": "user", "content": q}));
        messages.push(json!({"role": "assistant", "content": a}));
    }
    messages.push(json!({"role": "user", "content": question}));
    json!(messages)
}

async fn ask(w: &Worker, messages: &Value, extra: Value) -> Value {
    let mut body = json!({"model": CHAT, "messages": messages, "temperature": 0, "max_tokens": 24,
                          "logprobs": true, "top_logprobs": 3});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (status, _, v) = w.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

/// What must be equal with and without the cache: every choice's text, tokens and log
/// probabilities, and the token counts.
fn answer(v: &Value) -> Value {
    json!({
        "choices": v["choices"].as_array().unwrap().iter()
            .map(|c| json!([c["message"], c["logprobs"], c["finish_reason"]]))
            .collect::<Vec<_>>(),
        "prompt": v["usage"]["prompt_tokens"],
        "completion": v["usage"]["completion_tokens"],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_reads_only_its_new_turn_and_answers_exactly_as_without_the_cache() {
    let with = worker(&[]).await;
    let without = worker(&["--prefix-cache-bytes", "0"]).await;

    let first = conversation(&[], "How long does a parcel to Spain take?");
    let a1 = ask(&with, &first, json!({})).await;
    assert_eq!(cached(&a1), 0);
    let reply = a1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();

    // The next turn: everything before the new question was read already.
    let second = conversation(
        &[("How long does a parcel to Spain take?", &reply)],
        "And to Norway?",
    );
    let a2 = ask(&with, &second, json!({})).await;
    let b2 = ask(&without, &second, json!({})).await;
    let prompt = a2["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached(&a2) > 150 && cached(&a2) < prompt,
        "{} of {prompt}",
        cached(&a2)
    );
    assert_eq!(cached(&b2), 0);
    assert_eq!(answer(&a2), answer(&b2), "the cache changed the answer");

    // The very same prompt again: all but its last token.
    let again = ask(&with, &second, json!({})).await;
    assert_eq!(cached(&again), prompt - 1);
    assert_eq!(answer(&again), answer(&b2));

    // Several choices from a cached start, and a JSON schema under it.
    let extra = json!({"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 12});
    let n_with = ask(&with, &second, extra.clone()).await;
    let n_without = ask(&without, &second, extra).await;
    assert!(cached(&n_with) > 150);
    assert_eq!(answer(&n_with), answer(&n_without));
    let schema = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "eta",
        "schema": {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 30}},
                   "required": ["days"], "additionalProperties": false}}}});
    let s_with = ask(&with, &second, schema.clone()).await;
    let s_without = ask(&without, &second, schema).await;
    assert!(cached(&s_with) > 150);
    assert_eq!(answer(&s_with), answer(&s_without));

    // Streamed: the usage chunk says what was cached.
    let r = with
        .http
        .post(format!("{}/v1/chat/completions", with.url))
        .json(&json!({"model": CHAT, "messages": second, "temperature": 0, "max_tokens": 8, "stream": true,
                      "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .unwrap();
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], prompt - 1);

    assert!(with.metric("worker_prefix_cache_hits_total").await >= 5.0);
    assert!(with.metric("worker_prefix_cached_tokens_total").await > 600.0);
    assert!(with.metric("worker_prefix_cache_bytes").await > 0.0);
    assert_eq!(without.metric("worker_prefix_cache_bytes").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_stays_within_its_bound_evicting_the_least_recently_used() {
    // About 23 KB of keys and values per token: room for one short conversation.
    let bound: u64 = 2 << 20;
    let w = worker(&["--prefix-cache-bytes", &bound.to_string()]).await;
    let short = |q: &str| json!([{"role": "user", "content": q}]);
    let a = short("Name three rivers in Europe and say which sea each one flows into, please.");
    let b = short("Name three mountains in Asia and say which country each one stands in, please.");
    ask(&w, &a, json!({})).await;
    ask(&w, &b, json!({})).await;
    // A finished sequence is kept just after its reply is sent.
    let started = std::time::Instant::now();
    while w.metric("worker_prefix_cache_evictions_total").await < 1.0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "nothing was evicted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(w.metric("worker_prefix_cache_bytes").await <= bound as f64);
    // The first was evicted: asked again, only the start it shares with the second (the
    // template's) is found; once more, all of it but the last token.
    let again = ask(&w, &a, json!({})).await;
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached(&again) + 10 < prompt - 1,
        "{} of {prompt}",
        cached(&again)
    );
    assert_eq!(cached(&ask(&w, &a, json!({})).await), prompt - 1);
}
