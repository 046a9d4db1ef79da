//! The generation loop. One thread owns the model; every step it admits waiting requests
//! up to the active limit, advances each active sequence by one token, and drops those that
//! finished or whose client went away (so a disconnect stops work within one step).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use openai_types::{FinishReason, Usage};
use tokio::sync::mpsc;

use super::{GenerationEvent, GenerationJob, GenerationParams};
use crate::metrics::Metrics;

pub struct Engine {
    model_name: String,
    weights: ModelWeights,
    tokenizer: tokenizers::Tokenizer,
    eos: u32,
    max_active: usize,
    context_len: usize,
    metrics: Arc<Metrics>,
}

struct Sequence {
    /// A clone of the weights (they are shared) with this sequence's own KV cache.
    weights: ModelWeights,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    position: usize,
    sampler: LogitsProcessor,
    params: GenerationParams,
    events: mpsc::Sender<GenerationEvent>,
    /// Bytes of decoded text already sent.
    sent: usize,
    done: bool,
}

impl Engine {
    pub fn new(
        model_name: String,
        weights: ModelWeights,
        tokenizer: tokenizers::Tokenizer,
        eos: u32,
        max_active: usize,
        context_len: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            model_name,
            weights,
            tokenizer,
            eos,
            max_active,
            context_len,
            metrics,
        }
    }

    pub fn run(self, mut queue: mpsc::Receiver<GenerationJob>) {
        let mut active: Vec<Sequence> = Vec::new();
        loop {
            if active.is_empty() {
                match queue.blocking_recv() {
                    Some(job) => active.push(self.start(job)),
                    None => return,
                }
            }
            while active.len() < self.max_active {
                match queue.try_recv() {
                    Ok(job) => active.push(self.start(job)),
                    Err(_) => break,
                }
            }
            for seq in active.iter_mut() {
                self.step(seq);
            }
            active.retain(|s| !s.done);
            self.metrics
                .active_sequences
                .with_label_values(&[&self.model_name])
                .set(active.len() as i64);
        }
    }

    fn start(&self, job: GenerationJob) -> Sequence {
        let p = &job.params;
        let sampling = if p.temperature < 1e-6 {
            Sampling::ArgMax
        } else {
            match p.top_p {
                Some(top_p) => Sampling::TopP {
                    p: top_p,
                    temperature: p.temperature,
                },
                None => Sampling::All {
                    temperature: p.temperature,
                },
            }
        };
        Sequence {
            weights: self.weights.clone(),
            prompt: job.prompt,
            generated: Vec::new(),
            position: 0,
            sampler: LogitsProcessor::from_sampling(p.seed, sampling),
            params: job.params,
            events: job.events,
            sent: 0,
            done: false,
        }
    }

    fn step(&self, seq: &mut Sequence) {
        if seq.events.is_closed() {
            self.metrics
                .cancelled
                .with_label_values(&[&self.model_name])
                .inc();
            seq.done = true;
            return;
        }
        match self.advance(seq) {
            Ok(()) => {}
            Err(e) => {
                let _ = seq
                    .events
                    .blocking_send(GenerationEvent::Failed(e.to_string()));
                seq.done = true;
            }
        }
    }

    /// Runs one forward pass and samples one token.
    fn advance(&self, seq: &mut Sequence) -> anyhow::Result<()> {
        let input: &[u32] = match seq.generated.last() {
            None => &seq.prompt,
            Some(last) => std::slice::from_ref(last),
        };
        let tokens = Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?;
        let logits = seq.weights.forward(&tokens, seq.position)?.squeeze(0)?;
        if seq.position == 0 {
            self.metrics
                .prompt_tokens
                .with_label_values(&[&self.model_name])
                .inc_by(seq.prompt.len() as u64);
        }
        seq.position += input.len();
        let token = seq.sampler.sample(&logits)?;
        if token == self.eos {
            return self.finish(seq, FinishReason::Stop, None);
        }
        seq.generated.push(token);
        self.metrics
            .generated_tokens
            .with_label_values(&[&self.model_name])
            .inc();

        let text = self
            .tokenizer
            .decode(&seq.generated, true)
            .map_err(anyhow::Error::msg)?;
        if let Some(cut) = find_stop(&text, seq.sent, &seq.params.stop) {
            return self.finish(seq, FinishReason::Stop, Some(&text[..cut]));
        }
        if seq.generated.len() >= seq.params.max_tokens || seq.position + 1 >= self.context_len {
            return self.finish(seq, FinishReason::Length, Some(&text));
        }
        let safe = safe_prefix_len(&text, &seq.params.stop);
        if safe > seq.sent {
            let delta = text[seq.sent..safe].to_owned();
            seq.sent = safe;
            // A closed channel is noticed at the start of the next step.
            let usage = Usage::new(seq.prompt.len() as u64, seq.generated.len() as u64);
            let _ = seq
                .events
                .blocking_send(GenerationEvent::Delta { text: delta, usage });
        }
        Ok(())
    }

    fn finish(
        &self,
        seq: &mut Sequence,
        reason: FinishReason,
        text: Option<&str>,
    ) -> anyhow::Result<()> {
        let usage = Usage::new(seq.prompt.len() as u64, seq.generated.len() as u64);
        let text = match text {
            Some(t) => t.to_owned(),
            None => self
                .tokenizer
                .decode(&seq.generated, true)
                .map_err(anyhow::Error::msg)?,
        };
        if text.len() > seq.sent {
            let _ = seq.events.blocking_send(GenerationEvent::Delta {
                text: text[seq.sent..].to_owned(),
                usage,
            });
        }
        let _ = seq
            .events
            .blocking_send(GenerationEvent::Finished { reason, usage });
        seq.done = true;
        Ok(())
    }
}

/// Where the earliest stop sequence starts, searching text not yet sent (and the tail of
/// what was, since a stop can straddle the boundary; held-back text makes that impossible
/// for sent text, so searching from `sent` is enough).
fn find_stop(text: &str, sent: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter_map(|s| text[sent..].find(s.as_str()).map(|i| sent + i))
        .min()
}

/// How much of `text` can be sent now: everything except a trailing partial UTF-8
/// character (decoded as U+FFFD) and a suffix that could still grow into a stop sequence.
fn safe_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let body = &text[..end];
    let mut hold = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            let prefix = &stop[..i];
            if body.ends_with(prefix) {
                hold = hold.max(prefix.len());
            }
        }
    }
    end - hold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_stop_and_partial_utf8() {
        let stops = vec!["END".to_string()];
        assert_eq!(safe_prefix_len("hello EN", &stops), "hello ".len());
        assert_eq!(safe_prefix_len("hello E", &stops), "hello ".len());
        assert_eq!(safe_prefix_len("hello", &stops), 5);
        assert_eq!(safe_prefix_len("ab\u{FFFD}", &[]), 2);
    }

    #[test]
    fn finds_earliest_stop_after_sent() {
        let stops = vec!["b".to_string(), "cd".to_string()];
        assert_eq!(find_stop("xxcdb", 0, &stops), Some(2));
        assert_eq!(find_stop("abc", 1, &stops), Some(1));
        assert_eq!(find_stop("aaa", 0, &stops), None);
    }
}
