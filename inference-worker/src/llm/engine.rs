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

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use llguidance::Matcher;
use openai_types::{FinishReason, Usage};
use tokio::sync::mpsc;

use super::grammar;
use super::model::{KvCache, Llama, Slot};
use super::prefix::PrefixCache;
use super::sampler::Sampler;
use super::{GenerationEvent, GenerationJob, GenerationParams, TokenInfo};
use crate::metrics::Metrics;

/// Prompt tokens fed per step across all joining sequences, so a long prompt delays the
/// sequences already decoding by a bounded amount.
const PREFILL_TOKENS_PER_STEP: usize = 256;

/// Tokens before a constrained reply's budget runs out from which closing tokens (and the
/// end, where the grammar allows it) are favoured, so the reply ends valid.
const CLOSING_TOKENS: usize = 48;
/// How much they are favoured, in logits: enough to win wherever the grammar allows them.
const CLOSING_BIAS: f32 = 20.0;

pub struct Engine {
    model_name: String,
    model: Llama,
    tokenizer: tokenizers::Tokenizer,
    eos: u32,
    max_active: usize,
    metrics: Arc<Metrics>,
    /// Token ids that close a string, or brackets and braces.
    closers: grammar::Closers,
    /// Finished sequences' keys and values, for prompts that begin the same way.
    prefix: RefCell<PrefixCache>,
}

/// One choice of one request.
struct Sequence {
    index: u32,
    prompt: Arc<Vec<u32>>,
    /// Prompt tokens already run through the model (or read from the prefix cache).
    fed: usize,
    /// Prompt tokens read from the prefix cache.
    cached: usize,
    generated: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    grammar: Option<Matcher>,
    params: Arc<GenerationParams>,
    events: mpsc::Sender<GenerationEvent>,
    /// Choices still to split off this one once its prompt is read (`n` − 1, then 0).
    forks: usize,
    /// Completion tokens of all the request's choices together: what its usage reports.
    completion: Arc<AtomicU64>,
    /// Log probabilities of tokens whose text is not sent yet.
    logprobs: Vec<TokenInfo>,
    /// Bytes of decoded text already sent.
    sent: usize,
    done: bool,
}

impl Sequence {
    fn usage(&self) -> Usage {
        Usage::new(
            self.prompt.len() as u64,
            self.completion.load(Ordering::Relaxed),
        )
        .with_cached(self.cached as u64)
    }

    /// The `index`-th choice: the same prompt, read once, with its own random stream and
    /// grammar state.
    fn fork(&self, index: usize) -> Self {
        Self {
            index: index as u32,
            prompt: self.prompt.clone(),
            fed: self.fed,
            cached: self.cached,
            generated: Vec::new(),
            cache: self.cache.clone(),
            sampler: self.sampler.fork(index as u64),
            grammar: self.grammar.as_ref().map(Matcher::deep_clone),
            params: self.params.clone(),
            events: self.events.clone(),
            forks: 0,
            completion: self.completion.clone(),
            logprobs: Vec::new(),
            sent: 0,
            done: false,
        }
    }

    fn fail(&mut self, e: impl std::fmt::Display) {
        let _ = self
            .events
            .blocking_send(GenerationEvent::Failed(e.to_string()));
        self.done = true;
    }
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
        let kv_dim = model.kv_dim();
        Self {
            model_name,
            model,
            tokenizer,
            eos,
            max_active,
            metrics,
            closers: grammar::Closers::default(),
            prefix: RefCell::new(PrefixCache::new(0, kv_dim)),
        }
    }

    /// Keeps up to `bytes` of finished sequences' keys and values for later prompts.
    pub fn with_prefix_cache(self, bytes: usize) -> Self {
        let kv_dim = self.model.kv_dim();
        Self {
            prefix: RefCell::new(PrefixCache::new(bytes, kv_dim)),
            ..self
        }
    }

    /// Gives a sequence's keys and values to the prefix cache, for the tokens they hold.
    fn keep(&self, seq: &mut Sequence) {
        let cache = std::mem::take(&mut seq.cache);
        let positions = cache.positions(self.model.kv_dim());
        let tokens: Vec<u32> = seq
            .prompt
            .iter()
            .chain(&seq.generated)
            .take(positions)
            .copied()
            .collect();
        if tokens.len() == positions {
            self.prefix.borrow_mut().insert(tokens, cache);
            self.report_prefix();
        }
    }

    fn report_prefix(&self) {
        let stats = self.prefix.borrow().stats();
        let m = &self.metrics;
        let label = [self.model_name.as_str()];
        m.prefix_cache_bytes
            .with_label_values(&label)
            .set(stats.bytes as i64);
        for (counter, value) in [
            (&m.prefix_cache_hits, stats.hits),
            (&m.prefix_cache_misses, stats.misses),
            (&m.prefix_cache_evictions, stats.evictions),
        ] {
            let c = counter.with_label_values(&label);
            c.inc_by(value.saturating_sub(c.get()));
        }
    }

    /// The tokens favoured as a constrained reply's budget runs out.
    pub fn with_closers(mut self, closers: grammar::Closers) -> Self {
        self.closers = closers;
        self
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
                // What it read stays useful: a conversation may go on from it.
                self.keep(seq);
            }
            active.retain(|s| !s.done);
            if !active.is_empty() {
                if let Err(e) = self.step(&mut active) {
                    // A failed pass leaves the caches in an unknown state: end every sequence
                    // in it with the error rather than continue from there.
                    for seq in active.iter_mut() {
                        seq.fail(&e);
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
        let sampler = Sampler::new(
            job.params.sampling.clone(),
            &job.prompt,
            self.model.hyper.vocab,
        );
        let hit = self.prefix.borrow_mut().lookup(&job.prompt);
        self.report_prefix();
        let (cache, cached) = match hit {
            Some(hit) => {
                self.metrics
                    .prefix_cached_tokens
                    .with_label_values(&[&self.model_name])
                    .inc_by(hit.positions as u64);
                (hit.cache, hit.positions)
            }
            None => (KvCache::new(self.model.layers()), 0),
        };
        Sequence {
            index: 0,
            forks: job.params.choices.saturating_sub(1),
            prompt: Arc::new(job.prompt),
            fed: cached,
            cached,
            generated: Vec::new(),
            cache,
            sampler,
            grammar: job.grammar,
            params: Arc::new(job.params),
            events: job.events,
            completion: Arc::new(AtomicU64::new(0)),
            logprobs: Vec::new(),
            sent: 0,
            done: false,
        }
    }

    /// One batched forward pass and one sampled token per sequence that is ready for one.
    fn step(&self, active: &mut Vec<Sequence>) -> anyhow::Result<()> {
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
        let mut born = Vec::new();
        for (i, mut logits) in ready.zip(logits) {
            let seq = &mut active[i];
            if seq.generated.is_empty() && seq.index == 0 {
                self.metrics
                    .prompt_tokens
                    .with_label_values(&[&self.model_name])
                    .inc_by(seq.prompt.len() as u64);
            }
            // The other choices start from this prompt's cache and these logits.
            for k in 1..=std::mem::take(&mut seq.forks) {
                let mut child = seq.fork(k);
                self.sample(&mut child, &mut logits.clone());
                born.push(child);
            }
            self.sample(seq, &mut logits);
        }
        active.extend(born);
        Ok(())
    }

    /// Draws the sequence's next token from `logits` under its grammar, and takes it.
    fn sample(&self, seq: &mut Sequence, logits: &mut [f32]) {
        let mask = match seq.grammar.as_mut().map(Matcher::compute_mask) {
            None => None,
            Some(Ok(mask)) => Some(mask),
            Some(Err(e)) => return seq.fail(format!("constrained decoding: {e}")),
        };
        let room = seq
            .params
            .max_tokens
            .min(self.model.hyper.context_len - seq.prompt.len())
            .saturating_sub(seq.generated.len());
        if mask.is_some() && room <= CLOSING_TOKENS {
            // Decoded only in the last tokens of a constrained reply.
            let text = self
                .tokenizer
                .decode(&seq.generated, true)
                .unwrap_or_default();
            let closers = if grammar::ends_in_string(&text) {
                &self.closers.quote
            } else {
                &self.closers.bracket
            };
            for &t in closers.iter().chain([&self.eos]) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l += CLOSING_BIAS;
                }
            }
        }
        let drawn = seq.sampler.sample(logits, mask.as_ref(), self.eos);
        // The end of the sequence is not a token of the reply.
        if let (Some(logprob), false) = (drawn.logprob, drawn.token == self.eos) {
            seq.logprobs.push(TokenInfo {
                token: drawn.token,
                logprob,
                top: drawn.top,
            });
        }
        if let Some(grammar) = seq.grammar.as_mut() {
            if drawn.token != self.eos {
                if let Err(e) = grammar.consume_token(drawn.token) {
                    return seq.fail(format!("constrained decoding: {e}"));
                }
            }
        }
        if let Err(e) = self.accept(seq, drawn.token) {
            seq.fail(e);
        }
    }

    /// Takes a sampled token: ends the sequence on EOS, a completed grammar, a stop
    /// sequence or a length limit, and otherwise sends whatever text became safe to show.
    fn accept(&self, seq: &mut Sequence, token: u32) -> anyhow::Result<()> {
        if token == self.eos {
            return self.finish(seq, FinishReason::Stop, None);
        }
        seq.generated.push(token);
        seq.completion.fetch_add(1, Ordering::Relaxed);
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
        if seq.grammar.as_ref().is_some_and(Matcher::is_stopped) {
            return self.finish(seq, FinishReason::Stop, Some(&text));
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
            let _ = seq.events.blocking_send(GenerationEvent::Delta {
                index: seq.index,
                text: delta,
                logprobs: std::mem::take(&mut seq.logprobs),
                usage: seq.usage(),
            });
        }
        Ok(())
    }

    fn finish(
        &self,
        seq: &mut Sequence,
        reason: FinishReason,
        text: Option<&str>,
    ) -> anyhow::Result<()> {
        let text = match text {
            Some(t) => t.to_owned(),
            None => self
                .tokenizer
                .decode(&seq.generated, true)
                .map_err(anyhow::Error::msg)?,
        };
        if text.len() > seq.sent {
            let _ = seq.events.blocking_send(GenerationEvent::Delta {
                index: seq.index,
                text: text[seq.sent..].to_owned(),
                logprobs: std::mem::take(&mut seq.logprobs),
                usage: seq.usage(),
            });
        }
        let _ = seq.events.blocking_send(GenerationEvent::Finished {
            index: seq.index,
            reason,
            logprobs: std::mem::take(&mut seq.logprobs),
            usage: seq.usage(),
        });
        seq.done = true;
        self.keep(seq);
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
