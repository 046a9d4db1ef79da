//! The chat engine's own speed, without HTTP: prompt tokens/s, one-stream decode tokens/s and
//! aggregate decode tokens/s with several streams decoded together.
//!
//! `cargo run --release -p inference-worker --example engine_bench -- models/SmolLM2-135M-Instruct.Q4_1.gguf [threads]`
//!
//! `WORKER_CPU_KERNELS=avx2` in the environment keeps the kernels off AVX-512 VNNI.
//!
//! With `THREADS STREAMS [TOKENS]` after the model it prints only the aggregate decode figure
//! for that many streams of that many tokens (512 by default), for profiling and A/B runs.

use std::sync::Arc;
use std::time::Instant;

use inference_worker::llm::{
    ChatModel, EngineLimits, GenerationEvent, GenerationJob, GenerationParams, SamplingParams,
};
use inference_worker::metrics::Metrics;
use tokio::sync::mpsc;

const PROMPT: &str = "The history of the city begins with a small settlement on the river, where \
traders stopped to exchange grain, salt and cloth. Over the centuries the settlement grew into a \
market town, then into a walled city with a cathedral, a university and a harbour. Its citizens \
argued about taxes, bridges and the price of bread; they built canals, printed newspapers and \
elected councils. Floods, fires and plagues came and went, and each time the city rebuilt itself.";

/// Runs `streams` generations at once; returns (seconds to the first token of the first
/// stream, seconds from then to the end, tokens generated in all).
async fn run(
    model: &ChatModel,
    prompt: &[u32],
    streams: usize,
    max_tokens: usize,
) -> (f64, f64, usize) {
    let start = Instant::now();
    let mut receivers = Vec::new();
    for s in 0..streams {
        let (events, rx) = mpsc::channel(1024);
        let mut prompt = prompt.to_vec();
        prompt.push(28 + s as u32);
        model
            .submit(GenerationJob {
                prompt,
                params: GenerationParams {
                    max_tokens,
                    stop: Vec::new(),
                    sampling: SamplingParams {
                        temperature: 0.0,
                        seed: s as u64,
                        ..Default::default()
                    },
                    choices: 1,
                },
                grammar: None,
                events,
            })
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("submit: {e}"));
        receivers.push(rx);
    }
    let mut first = None;
    let mut total = 0;
    for mut rx in receivers {
        while let Some(event) = rx.recv().await {
            match event {
                GenerationEvent::Delta { .. } => {
                    first.get_or_insert_with(Instant::now);
                }
                GenerationEvent::Finished { usage, .. } => {
                    total += usage.completion_tokens as usize;
                    break;
                }
                GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
            }
        }
    }
    let first = first.unwrap_or_else(Instant::now);
    (
        (first - start).as_secs_f64(),
        first.elapsed().as_secs_f64(),
        total,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // As the worker's flag: `WORKER_CPU_KERNELS=avx2` keeps the kernels off AVX-512 VNNI.
    let kernels = std::env::var("WORKER_CPU_KERNELS").unwrap_or_default();
    inference_worker::llm::allow_vnni(!matches!(kernels.as_str(), "avx2" | "portable"));
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: engine_bench MODEL.gguf [THREADS [STREAMS [TOKENS] | prefill]]")
    })?;
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
    let prompt = model.encode(PROMPT).map_err(|e| anyhow::anyhow!("{e}"))?;
    run(&model, &prompt[..8], 1, 4).await;
    // `engine_bench MODEL THREADS STREAMS [TOKENS]`: only that decode figure, for profiling.
    let stream_arg = args.next();
    if let Some(streams) = stream_arg.as_deref().filter(|s| *s != "prefill") {
        let streams: usize = streams.parse()?;
        let max_tokens: usize = args.next().map_or(Ok(512), |t| t.parse())?;
        let start = Instant::now();
        let (_, _, tokens) = run(&model, &prompt[..16], streams, max_tokens).await;
        let rate = tokens as f64 / start.elapsed().as_secs_f64();
        println!("decode, {streams} streams: {tokens} tokens, {rate:.1} tok/s aggregate");
        return Ok(());
    }

    // Prefill of a prompt about as long as the HTTP benchmarks' (~330 tokens), best of 3
    // (of 20 with `prefill` for STREAMS, which prints only this).
    let long = prompt.repeat(4);
    let only_prefill = stream_arg.as_deref() == Some("prefill");
    let mut ttft = f64::INFINITY;
    for _ in 0..if only_prefill { 20 } else { 3 } {
        ttft = ttft.min(run(&model, &long, 1, 1).await.0);
    }
    println!(
        "prompt: {} tokens in {:.1} ms = {:.0} tok/s",
        long.len() + 1,
        ttft * 1e3,
        (long.len() + 1) as f64 / ttft
    );
    if only_prefill {
        return Ok(());
    }
    let short = &prompt[..16];
    let (_, decode, tokens) = run(&model, short, 1, 128).await;
    let one = (tokens - 1) as f64 / decode;
    println!("decode, 1 stream: {tokens} tokens, {one:.1} tok/s");
    for streams in [2, 4, 8, 16] {
        let start = Instant::now();
        let (_, _, tokens) = run(&model, short, streams, 64).await;
        let rate = tokens as f64 / start.elapsed().as_secs_f64();
        println!(
            "decode, {streams} streams: {tokens} tokens, {rate:.1} tok/s aggregate ({:.2}× one stream)",
            rate / one
        );
    }
    Ok(())
}
