//! What constrained decoding costs: aggregate decode tokens/s with a `json_schema`
//! constraint against the same streams unconstrained, at 1 and 8 streams, and the time to
//! prepare a request whose schema is new against one whose schema is cached.
//!
//! `cargo run --release -p inference-worker --example constrained_bench -- models/SmolLM2-135M-Instruct.Q4_1.gguf [threads]`

use std::sync::Arc;
use std::time::Instant;

use inference_worker::llm::{ChatModel, EngineLimits, GenerationEvent, GenerationJob};
use inference_worker::metrics::Metrics;
use openai_types::{ChatCompletionRequest, ChatMessage};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const TOKENS: u32 = 128;

/// A schema whose replies run past `TOKENS`, so every stream decodes the same count.
fn long_schema(variant: usize) -> Value {
    json!({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "lines": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 40 + variant},
        "rating": {"type": "integer", "minimum": 0, "maximum": 5}
    }, "required": ["title", "lines", "rating"], "additionalProperties": false})
}

fn request(constrained: bool, variant: usize, stream: usize) -> ChatCompletionRequest {
    let mut req: ChatCompletionRequest = serde_json::from_value(json!({
        "model": "bench",
        "messages": [{"role": "user", "content": "Write a long poem about the sea, line by line."}],
        "temperature": 1.0,
        "seed": stream,
        "max_tokens": TOKENS,
    }))
    .unwrap_or_default();
    req.messages
        .push(ChatMessage::text("user", &format!("Poem number {stream}.")));
    if constrained {
        req.response_format = serde_json::from_value(json!({"type": "json_schema",
            "json_schema": {"name": "poem", "schema": long_schema(variant)}}))
        .ok();
    }
    req
}

/// Decodes `streams` requests at once; aggregate completion tokens/s.
async fn decode(model: &ChatModel, constrained: bool, streams: usize) -> anyhow::Result<f64> {
    let mut receivers = Vec::new();
    let started = Instant::now();
    for s in 0..streams {
        let p = model
            .prepare(request(constrained, 0, s))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (events, rx) = mpsc::channel(1024);
        model
            .submit(GenerationJob {
                prompt: p.prompt,
                params: p.params,
                grammar: p.grammar,
                events,
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        receivers.push(rx);
    }
    let mut tokens = 0;
    for mut rx in receivers {
        while let Some(event) = rx.recv().await {
            match event {
                GenerationEvent::Finished { usage, .. } => {
                    tokens += usage.completion_tokens;
                    break;
                }
                GenerationEvent::Failed(e) => anyhow::bail!("generation failed: {e}"),
                GenerationEvent::Delta { .. } => {}
            }
        }
    }
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: constrained_bench MODEL.gguf [THREADS]"))?;
    if let Some(threads) = args.next() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.parse()?)
            .build_global()?;
    }
    let model = ChatModel::load(
        "bench".into(),
        path.as_ref(),
        EngineLimits {
            max_active: 16,
            max_queued: 64,
            max_context: None,
            prefix_cache_bytes: 0,
        },
        Arc::new(Metrics::new()?),
    )?;

    // Preparing: a schema never seen (compiled), the same again (cached), none.
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut plain = Vec::new();
    for variant in 1..=20 {
        let t = Instant::now();
        model
            .prepare(request(true, variant, 0))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        model
            .prepare(request(true, variant, 0))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        warm.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        model
            .prepare(request(false, variant, 0))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        plain.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "prepare (render, tokenise, constraint), median of 20: new schema {:.2} ms, cached {:.2} ms, no schema {:.2} ms",
        median(&mut cold),
        median(&mut warm),
        median(&mut plain)
    );

    decode(&model, false, 1).await?;
    for streams in [1, 8] {
        // Alternated, three rounds each, best of each: the machine's noise hits both.
        let (mut free, mut held) = (0f64, 0f64);
        for _ in 0..3 {
            free = free.max(decode(&model, false, streams).await?);
            held = held.max(decode(&model, true, streams).await?);
        }
        println!(
            "decode, {streams} stream(s), {TOKENS} tokens each: unconstrained {free:.1} tok/s, json_schema {held:.1} tok/s, ratio {:.3}",
            held / free
        );
    }
    Ok(())
}
