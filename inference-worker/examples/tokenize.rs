//! Prints a chat model's rendered prompt and token ids for one user message, for checking
//! the tokenizer and template against a reference.
//!
//! cargo run -p inference-worker --example tokenize -- models/SmolLM2-135M-Instruct.Q4_1.gguf "Hello"

use std::sync::Arc;

use inference_worker::llm::{ChatModel, EngineLimits};
use inference_worker::metrics::Metrics;
use openai_types::{ChatCompletionRequest, ChatMessage};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: tokenize MODEL.gguf TEXT [--raw]"))?;
    let text = args.next().unwrap_or_else(|| "Hello".into());
    let raw = args.next().as_deref() == Some("--raw");
    let limits = EngineLimits {
        max_active: 1,
        max_queued: 1,
        max_context: None,
        prefix_cache_bytes: 0,
    };
    let model = ChatModel::load("m".into(), path.as_ref(), limits, Arc::new(Metrics::new()?))?;
    let prompt = if raw {
        text
    } else {
        let req = ChatCompletionRequest {
            model: "m".into(),
            messages: vec![ChatMessage::text("user", &text)],
            ..Default::default()
        };
        model.render_prompt(&req)?
    };
    println!("{prompt:?}");
    println!("{:?}", model.encode(&prompt)?);
    Ok(())
}
