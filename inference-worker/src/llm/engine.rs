//! The generation loop, with continuous batching. One thread owns the model; every step it
//! admits waiting requests up to the active limit, then runs one batched forward pass over
//! the next token of every decoding sequence plus a chunk of the prompts of sequences that
//! just joined, samples one token for each sequence that is ready, and drops those that
//! finished or whose client went away (so a disconnect stops work within one step).
//!
//! Owns: admission into the active set, prompt chunking per step, sampling, stop sequences,
//! length limits and streaming text out safely (no partial UTF-8, no partial stop). Must
//! never: run on the async runtime or block on a client (events go through bounded
//! channels; a closed one ends its sequence).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use openai_types::{FinishReason, Usage};
use tokio::sync::mpsc;

use super::model::{KvCache, Llama, Slot};
use super::{GenerationEvent, GenerationJob, GenerationParams};
use crate::metrics::Metrics;

/// Prompt tokens fed per step across all joining sequences, so a long prompt delays the
/// sequences already decoding by a bounded amount.
const PREFILL_TOKENS_PER_STEP: usize = 256;

pub struct Engine {
    model_name: String,
    model: Llama,
    tokenizer: tokenizers::Tokenizer,
    eos: u32,
    max_active: usize,
    metrics: Arc<Metrics>,
}

struct Sequence {
    prompt: Vec<u32>,
    /// Prompt tokens already run through the model.
    fed: usize,
    generated: Vec<u32>,
    cache: KvCache,
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
        model: Llama,
        tokenizer: tokenizers::Tokenizer,
        eos: u32,
        max_active: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            model_name,
            model,
            tokenizer,
            eos,
            max_active,
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
            for seq in active.iter_mut().filter(|s| s.events.is_closed()) {
                self.metrics
                    .cancelled
                    .with_label_values(&[&self.model_name])
                    .inc();
                seq.done = true;
            }
            active.retain(|s| !s.done);
            if !active.is_empty() {
                if let Err(e) = self.step(&mut active) {
                    // A failed pass leaves the caches in an unknown state: end every sequence
                    // in it with the error rather than continue from there.
                    for seq in active.iter_mut() {
                        let _ = seq
                            .events
                            .blocking_send(GenerationEvent::Failed(e.to_string()));
                        seq.done = true;
                    }
                }
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
            prompt: job.prompt,
            fed: 0,
            generated: Vec::new(),
            cache: KvCache::new(self.model.layers()),
            sampler: LogitsProcessor::from_sampling(p.seed, sampling),
            params: job.params,
            events: job.events,
            sent: 0,
            done: false,
        }
    }

    /// One batched forward pass and one sampled token per sequence that is ready for one.
    fn step(&self, active: &mut [Sequence]) -> anyhow::Result<()> {
        let mut slots = Vec::new();
        let mut budget = PREFILL_TOKENS_PER_STEP;
        for (i, seq) in active.iter_mut().enumerate() {
            if seq.fed < seq.prompt.len() {
                let take = (seq.prompt.len() - seq.fed).min(budget);
                for position in seq.fed..seq.fed + take {
                    slots.push(Slot {
                        token: seq.prompt[position],
                        position,
                        cache: i,
                        logits: position + 1 == seq.prompt.len(),
                    });
                }
                seq.fed += take;
                budget -= take;
            } else if let Some(&last) = seq.generated.last() {
                slots.push(Slot {
                    token: last,
                    position: seq.prompt.len() + seq.generated.len() - 1,
                    cache: i,
                    logits: true,
                });
            }
        }
        let logits = {
            let mut caches: Vec<&mut KvCache> = active.iter_mut().map(|s| &mut s.cache).collect();
            self.model.forward(&slots, &mut caches)?
        };
        let ready = slots.iter().filter(|s| s.logits).map(|s| s.cache);
        for (i, logits) in ready.zip(logits) {
            let seq = &mut active[i];
            if seq.generated.is_empty() {
                self.metrics
                    .prompt_tokens
                    .with_label_values(&[&self.model_name])
                    .inc_by(seq.prompt.len() as u64);
            }
            let logits = Tensor::from_vec(logits, self.model.hyper.vocab, &Device::Cpu)?;
            let token = seq.sampler.sample(&logits)?;
            if let Err(e) = self.accept(seq, token) {
                let _ = seq
                    .events
                    .blocking_send(GenerationEvent::Failed(e.to_string()));
                seq.done = true;
            }
        }
        Ok(())
    }

    /// Takes a sampled token: ends the sequence on EOS, a stop sequence or a length limit,
    /// and otherwise sends whatever text became safe to show.
    fn accept(&self, seq: &mut Sequence, token: u32) -> anyhow::Result<()> {
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
        let next_position = seq.prompt.len() + seq.generated.len();
        if seq.generated.len() >= seq.params.max_tokens
            || next_position >= self.model.hyper.context_len
        {
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
