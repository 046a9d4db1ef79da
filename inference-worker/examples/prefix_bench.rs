//! What the prefix cache saves: time to the first token of each turn of a growing
//! conversation, and of questions sharing a long system prompt, with the cache and without
//! it, side by side in one run; and the cache's memory.
//!
//! `cargo run --release -p inference-worker --example prefix_bench -- models/SmolLM2-135M-Instruct.Q4_1.gguf [threads]`

use std::sync::Arc;
use std::time::Instant;

use inference_worker::llm::{ChatModel, EngineLimits, GenerationEvent, GenerationJob};
use inference_worker::metrics::Metrics;
use openai_types::{ChatCompletionRequest, ChatMessage};
use tokio::sync::mpsc;

const TOPICS: [&str; 10] = [
    "parcels",
    "customs forms",
    "insurance",
    "returns",
    "damaged goods",
    "tracking numbers",
    "pick-up slots",
    "depot hours",
    "prices per zone",
    "dangerous goods",
];

/// A system prompt of about `words` words.
fn system(words: usize) -> String {
    let base = "You answer questions for a shipping company about parcels, delivery times, \
                customs, insurance, returns, damage, tracking, depots and prices, briefly.";
    let mut s = String::new();
    while s.split_whitespace().count() < words {
        s.push_str(base);
        s.push(' ');
    }
    s
}

/// Time to the first token, the reply's text, and the prompt tokens read from the cache.
async fn first_token(
    model: &ChatModel,
    messages: &[ChatMessage],
) -> anyhow::Result<(f64, String, u64, u64)> {
    let req = ChatCompletionRequest {
        model: "bench".into(),
        messages: messages.to_vec(),
        temperature: Some(0.0),
        max_tokens: Some(32),
        ..Default::default()
    };
    let p = model.prepare(req).map_err(|e| anyhow::anyhow!("{e}"))?;
    let prompt = p.prompt.len() as u64;
    let (events, mut rx) = mpsc::channel(1024);
    let started = Instant::now();
    model
        .submit(GenerationJob {
            prompt: p.prompt,
            params: p.params,
            grammar: p.grammar,
            events,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut first = None;
    let mut text = String::new();
    let mut cached = 0;
    while let Some(event) = rx.recv().await {
        match event {
            GenerationEvent::Delta { text: t, usage, .. } => {
                first.get_or_insert_with(|| started.elapsed().as_secs_f64());
                text.push_str(&t);
                cached = usage.cached_tokens();
            }
            GenerationEvent::Finished { usage, .. } => {
                cached = usage.cached_tokens();
                break;
            }
            GenerationEvent::Failed(e) => anyhow::bail!("generation failed: {e}"),
        }
    }
    Ok((first.unwrap_or_default(), text, prompt, cached))
}

fn load(path: &str, cache_bytes: usize, metrics: Arc<Metrics>) -> anyhow::Result<Arc<ChatModel>> {
    ChatModel::load(
        "bench".into(),
        path.as_ref(),
        EngineLimits {
            max_active: 4,
            max_queued: 16,
            max_context: None,
            prefix_cache_bytes: cache_bytes,
        },
        metrics,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: prefix_bench MODEL.gguf [THREADS]"))?;
    if let Some(threads) = args.next() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.parse()?)
            .build_global()?;
    }
    let metrics = Arc::new(Metrics::new()?);
    let cached = load(&path, 256 << 20, metrics.clone())?;
    let fresh = load(&path, 0, Arc::new(Metrics::new()?))?;

    println!("A growing conversation (system prompt of ~250 words, 32-token replies), greedy:");
    println!("turn  prompt  cached  first token cached  first token fresh  ratio");
    let mut history = vec![ChatMessage::text("system", &system(250))];
    for (turn, topic) in TOPICS.iter().enumerate() {
        history.push(ChatMessage::text(
            "user",
            &format!("Tell me about {topic}."),
        ));
        let (with, reply, prompt, hit) = first_token(&cached, &history).await?;
        let (without, same, _, _) = first_token(&fresh, &history).await?;
        anyhow::ensure!(reply == same, "the cache changed turn {}'s reply", turn + 1);
        println!(
            "{:>4}  {prompt:>6}  {hit:>6}  {:>15.1} ms  {:>14.1} ms  {:.3}",
            turn + 1,
            with * 1e3,
            without * 1e3,
            with / without
        );
        history.push(ChatMessage::text("assistant", &reply));
    }

    println!("\nQuestions sharing a system prompt of ~800 words:");
    println!("question  prompt  cached  first token cached  first token fresh  ratio");
    let shared = system(800);
    for (i, topic) in TOPICS.iter().take(5).enumerate() {
        let messages = [
            ChatMessage::text("system", &shared),
            ChatMessage::text("user", &format!("What about {topic}?")),
        ];
        let (with, reply, prompt, hit) = first_token(&cached, &messages).await?;
        let (without, same, _, _) = first_token(&fresh, &messages).await?;
        anyhow::ensure!(reply == same, "the cache changed a reply");
        println!(
            "{:>8}  {prompt:>6}  {hit:>6}  {:>15.1} ms  {:>14.1} ms  {:.3}",
            i + 1,
            with * 1e3,
            without * 1e3,
            with / without
        );
    }
    let bytes = metrics
        .prefix_cache_bytes
        .with_label_values(&["bench"])
        .get();
    println!(
        "\nprefix cache: {:.1} MiB held",
        bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
