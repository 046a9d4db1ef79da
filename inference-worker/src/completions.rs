//! `POST /v1/completions`: prompts continued as they are (no chat template), each prompt
//! with its `n` choices, whole or streamed, through the same engine as chat.
//!
//! Owns: the legacy reply shapes (text choices, parallel-list log probabilities) and
//! joining several prompts' choices into one reply. Must never: run the model or block the
//! async runtime.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use openai_types::{
    usage_comment, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, ErrorBody,
    PromptPart, Usage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::WorkerError;
use crate::llm::{ChatModel, GenerationEvent, GenerationJob, TokenInfo};
use crate::unix_now;

const EVENT_BUFFER: usize = 256;

/// Runs a parsed completion request and answers it, streamed or whole.
pub async fn complete(
    model: Arc<ChatModel>,
    req: CompletionRequest,
) -> Result<Response, WorkerError> {
    req.validate()
        .map_err(|(m, p)| WorkerError::invalid(m, p))?;
    let parts = req.prompt.parts();
    let sampling = req.sampling();
    let prepared = {
        let parts = parts.clone();
        model
            .off_runtime(move |m| m.prepare_raw(&parts, &sampling))
            .await?
    };
    let n = req.choices() as usize;
    // One job per prompt, each with its own channel; choice `k` of prompt `p` is `p·n + k`.
    let mut streams = Vec::new();
    let mut echoes = Vec::new();
    for (p, (prep, part)) in prepared.into_iter().zip(&parts).enumerate() {
        let echo = match (req.echo == Some(true), part) {
            (false, _) => String::new(),
            (true, PromptPart::Text(t)) => t.clone(),
            (true, PromptPart::Tokens(ids)) => model.decode(ids)?,
        };
        echoes.push(echo);
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        model.submit(GenerationJob {
            prompt: prep.prompt,
            params: prep.params,
            grammar: prep.grammar,
            events,
        })?;
        streams.push(ReceiverStream::new(rx).map(move |e| (p, e)));
    }
    let events = futures::stream::select_all(streams);
    let reply = Reply {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model_name: req.model.clone(),
        logprobs: req.logprobs.is_some(),
        n,
        prompts: parts.len(),
        echoes,
        model,
    };
    if req.is_stream() {
        Ok(reply.stream(events, req.include_usage()))
    } else {
        reply.collect(events).await
    }
}

struct Reply {
    id: String,
    created: u64,
    model_name: String,
    logprobs: bool,
    /// Choices per prompt.
    n: usize,
    prompts: usize,
    /// Per prompt, the text a choice starts with (`echo`).
    echoes: Vec<String>,
    model: Arc<ChatModel>,
}

/// Usage over all prompts: the last report of each, summed.
#[derive(Default)]
struct Totals(Vec<Usage>);

impl Totals {
    fn update(&mut self, prompt: usize, usage: Usage) {
        if self.0.len() <= prompt {
            self.0.resize(prompt + 1, Usage::default());
        }
        if usage.total_tokens >= self.0[prompt].total_tokens {
            self.0[prompt] = usage;
        }
    }

    fn sum(&self) -> Usage {
        let (p, c, cached) = self.0.iter().fold((0u64, 0u64, 0u64), |(p, c, k), u| {
            (
                p.saturating_add(u.prompt_tokens),
                c.saturating_add(u.completion_tokens),
                k.saturating_add(u.cached_tokens()),
            )
        });
        Usage::new(p, c).with_cached(cached)
    }
}

impl Reply {
    fn index(&self, prompt: usize, choice: u32) -> u32 {
        (prompt * self.n) as u32 + choice
    }

    /// Legacy log probabilities of `infos`, offsets counted from `offset` bytes into the
    /// choice's text.
    fn logprobs_of(&self, infos: &[TokenInfo], offset: &mut usize) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for info in infos {
            let (token, _) = self.model.token_text(info.token);
            out.text_offset.push(*offset);
            *offset += token.len();
            out.tokens.push(token);
            out.token_logprobs.push(info.logprob);
            out.top_logprobs.push(
                info.top
                    .iter()
                    .map(|(t, lp)| (self.model.token_text(*t).0, *lp))
                    .collect(),
            );
        }
        out
    }

    async fn collect(
        self,
        mut events: impl futures::Stream<Item = (usize, GenerationEvent)> + Unpin,
    ) -> Result<Response, WorkerError> {
        let total = self.prompts * self.n;
        let mut choices: Vec<CompletionChoice> = (0..total)
            .map(|i| CompletionChoice {
                index: i as u32,
                text: self.echoes[i / self.n].clone(),
                logprobs: self.logprobs.then(CompletionLogprobs::default),
                finish_reason: None,
            })
            .collect();
        let mut offsets: Vec<usize> = choices.iter().map(|c| c.text.len()).collect();
        let mut totals = Totals::default();
        let mut finished = 0;
        while finished < total {
            let Some((prompt, event)) = events.next().await else {
                return Err(WorkerError::Internal(
                    "generation ended without a result".into(),
                ));
            };
            let (index, text, infos, reason, usage) = match event {
                GenerationEvent::Delta {
                    index,
                    text,
                    logprobs,
                    usage,
                } => (index, text, logprobs, None, usage),
                GenerationEvent::Finished {
                    index,
                    reason,
                    logprobs,
                    usage,
                } => (index, String::new(), logprobs, Some(reason), usage),
                GenerationEvent::Failed(e) => return Err(WorkerError::Internal(e)),
            };
            totals.update(prompt, usage);
            let i = self.index(prompt, index) as usize;
            let lp = self.logprobs_of(&infos, &mut offsets[i]);
            let c = choices
                .get_mut(i)
                .ok_or_else(|| WorkerError::Internal(format!("no choice {i}")))?;
            c.text.push_str(&text);
            if let Some(all) = c.logprobs.as_mut() {
                all.tokens.extend(lp.tokens);
                all.token_logprobs.extend(lp.token_logprobs);
                all.top_logprobs.extend(lp.top_logprobs);
                all.text_offset.extend(lp.text_offset);
            }
            if reason.is_some() {
                c.finish_reason = reason;
                finished += 1;
            }
        }
        Ok(Json(Completion {
            id: self.id,
            object: "text_completion".into(),
            created: self.created,
            model: self.model_name,
            choices,
            usage: Some(totals.sum()),
        })
        .into_response())
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Bytes {
        let c = Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model_name.clone(),
            choices,
            usage,
        };
        crate::sse::data(&serde_json::to_string(&c).unwrap_or_default())
    }

    /// SSE: the echoed prompt first (where asked), text chunks each followed by the usage
    /// comment over all prompts, a finish reason per choice, the usage chunk if asked, then
    /// `[DONE]`.
    fn stream(
        self,
        events: impl futures::Stream<Item = (usize, GenerationEvent)> + Send + Unpin + 'static,
        include_usage: bool,
    ) -> Response {
        let total = self.prompts * self.n;
        let first: Vec<Bytes> = (0..total)
            .filter(|i| !self.echoes[i / self.n].is_empty())
            .map(|i| {
                self.chunk(
                    vec![CompletionChoice {
                        index: i as u32,
                        text: self.echoes[i / self.n].clone(),
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect();
        let mut offsets: Vec<usize> = (0..total).map(|i| self.echoes[i / self.n].len()).collect();
        let mut totals = Totals::default();
        let mut finished = 0;
        let body = events.flat_map(move |(prompt, event)| {
            let out: Vec<Bytes> = match event {
                GenerationEvent::Delta {
                    index,
                    text,
                    logprobs,
                    usage,
                } => {
                    totals.update(prompt, usage);
                    let i = self.index(prompt, index);
                    let lp = match offsets.get_mut(i as usize) {
                        Some(offset) if self.logprobs => Some(self.logprobs_of(&logprobs, offset)),
                        _ => None,
                    };
                    let choice = CompletionChoice {
                        index: i,
                        text,
                        logprobs: lp,
                        finish_reason: None,
                    };
                    vec![
                        self.chunk(vec![choice], None),
                        Bytes::from(usage_comment(&totals.sum())),
                    ]
                }
                GenerationEvent::Finished {
                    index,
                    reason,
                    usage,
                    ..
                } => {
                    totals.update(prompt, usage);
                    finished += 1;
                    let choice = CompletionChoice {
                        index: self.index(prompt, index),
                        text: String::new(),
                        logprobs: None,
                        finish_reason: Some(reason),
                    };
                    let mut v = vec![self.chunk(vec![choice], None)];
                    if finished == total {
                        let sum = totals.sum();
                        v.push(Bytes::from(usage_comment(&sum)));
                        if include_usage {
                            v.push(self.chunk(Vec::new(), Some(sum)));
                        }
                        v.push(crate::sse::data("[DONE]"));
                    }
                    v
                }
                GenerationEvent::Failed(e) => {
                    let err = ErrorBody::new(e, "server_error", None, None);
                    vec![crate::sse::data(
                        &serde_json::to_string(&err).unwrap_or_default(),
                    )]
                }
            };
            futures::stream::iter(out.into_iter().map(Ok::<_, Infallible>))
        });
        let body = futures::stream::iter(first.into_iter().map(Ok::<_, Infallible>)).chain(body);
        crate::sse::response(body)
    }
}
