//! `POST /v1/chat/completions`: a request handed to the engine, its events turned into one
//! reply or an SSE stream, with `n` choices, tool calls and log probabilities in OpenAI's
//! shapes.
//!
//! Owns: the reply and chunk shapes of chat, and reading tool calls out of the generated
//! text. Must never: run the model or block the async runtime (events come from the
//! engine thread through a bounded channel).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use openai_types::{
    usage_comment, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChoiceLogprobs, ChunkChoice, Delta, ErrorBody, FinishReason,
    FunctionCall, FunctionCallDelta, TokenLogprob, ToolCall, ToolCallDelta, ToolMode, TopLogprob,
    Usage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::WorkerError;
use crate::llm::toolcall::{CallReader, Piece};
use crate::llm::{ChatModel, GenerationEvent, GenerationJob, TokenInfo};
use crate::unix_now;

/// Events buffered between the engine and a slow client.
const EVENT_BUFFER: usize = 256;

/// Runs a parsed chat request and answers it, streamed or whole.
pub async fn complete(
    model: Arc<ChatModel>,
    req: ChatCompletionRequest,
) -> Result<Response, WorkerError> {
    let prepared = model.prepare_off_runtime(req).await?;
    let (events, receiver) = mpsc::channel(EVENT_BUFFER);
    let choices = prepared.params.choices;
    let req = prepared.request;
    model.submit(GenerationJob {
        prompt: prepared.prompt,
        params: prepared.params,
        grammar: prepared.grammar,
        events,
    })?;
    let reply = Reply {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model_name: req.model.clone(),
        tools: req.tool_mode() != ToolMode::None,
        logprobs: req.logprobs == Some(true),
        model,
    };
    if req.is_stream() {
        Ok(reply.stream(receiver, choices, req.include_usage()))
    } else {
        reply.collect(receiver, choices).await
    }
}

struct Reply {
    id: String,
    created: u64,
    model_name: String,
    /// Whether the output is read for tool calls.
    tools: bool,
    logprobs: bool,
    model: Arc<ChatModel>,
}

/// One choice as it accumulates.
#[derive(Default)]
struct Choice {
    text: String,
    reader: CallReader,
    calls: Vec<ToolCall>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
}

fn call_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &id[..24])
}

/// The reason a choice reports: a reply that is calls ends with `tool_calls`.
fn finish_reason(reason: FinishReason, calls: bool) -> FinishReason {
    match reason {
        FinishReason::Stop if calls => FinishReason::ToolCalls,
        other => other,
    }
}

impl Reply {
    fn logprobs_of(&self, infos: &[TokenInfo]) -> Vec<TokenLogprob> {
        infos
            .iter()
            .map(|info| {
                let (token, bytes) = self.model.token_text(info.token);
                TokenLogprob {
                    token,
                    logprob: info.logprob,
                    bytes: Some(bytes),
                    top_logprobs: info
                        .top
                        .iter()
                        .map(|(t, lp)| {
                            let (token, bytes) = self.model.token_text(*t);
                            TopLogprob {
                                token,
                                logprob: *lp,
                                bytes: Some(bytes),
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    async fn collect(
        self,
        mut events: mpsc::Receiver<GenerationEvent>,
        n: usize,
    ) -> Result<Response, WorkerError> {
        let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
        let mut usage = Usage::default();
        let mut finished = 0;
        while finished < n {
            let Some(event) = events.recv().await else {
                return Err(WorkerError::Internal(
                    "generation ended without a result".into(),
                ));
            };
            match event {
                GenerationEvent::Delta {
                    index,
                    text,
                    logprobs,
                    ..
                } => {
                    let c = choice(&mut choices, index)?;
                    c.text.push_str(&text);
                    c.logprobs.extend(self.logprobs_of(&logprobs));
                }
                GenerationEvent::Finished {
                    index,
                    reason,
                    logprobs,
                    usage: u,
                } => {
                    usage = max_usage(usage, u);
                    let lp = self.logprobs_of(&logprobs);
                    let c = choice(&mut choices, index)?;
                    c.logprobs.extend(lp);
                    c.finish = Some(reason);
                    finished += 1;
                }
                GenerationEvent::Failed(e) => return Err(WorkerError::Internal(e)),
            }
        }
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let mut content = Some(std::mem::take(&mut c.text));
                if self.tools {
                    let text = content.take().unwrap_or_default();
                    let mut call: Option<(String, String)> = None;
                    for piece in c.reader.push(&text) {
                        match piece {
                            Piece::Text(t) => content.get_or_insert_with(String::new).push_str(&t),
                            Piece::CallStart { name, .. } => {
                                if let Some((name, args)) = call.take() {
                                    c.calls.push(function_call(name, args));
                                }
                                call = Some((name, String::new()));
                            }
                            Piece::Arguments { text, .. } => {
                                if let Some((_, args)) = call.as_mut() {
                                    args.push_str(&text);
                                }
                            }
                        }
                    }
                    if let Some((name, args)) = call {
                        c.calls.push(function_call(name, args));
                    }
                }
                let reason = c.finish.unwrap_or(FinishReason::Stop);
                ChatChoice {
                    index: i as u32,
                    finish_reason: finish_reason(reason, !c.calls.is_empty()),
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content,
                        refusal: None,
                        tool_calls: (!c.calls.is_empty()).then_some(c.calls),
                    },
                    logprobs: self.logprobs.then_some(ChoiceLogprobs {
                        content: Some(c.logprobs),
                        refusal: None,
                    }),
                }
            })
            .collect();
        Ok(Json(ChatCompletion {
            id: self.id,
            object: "chat.completion".into(),
            created: self.created,
            model: self.model_name,
            choices,
            usage,
        })
        .into_response())
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> Bytes {
        let c = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model_name.clone(),
            choices,
            usage,
        };
        crate::sse::data(&serde_json::to_string(&c).unwrap_or_default())
    }

    /// SSE: a role delta per choice first, content (or tool call) deltas each followed by
    /// the usage comment (the gateway bills a stream that ends early by the last one), a
    /// finish reason per choice, the usage chunk if asked, then `[DONE]`; a failure
    /// becomes an error event.
    fn stream(
        self,
        events: mpsc::Receiver<GenerationEvent>,
        n: usize,
        include_usage: bool,
    ) -> Response {
        let first: Vec<Bytes> = (0..n)
            .map(|i| {
                self.chunk(
                    vec![ChunkChoice {
                        index: i as u32,
                        delta: Delta {
                            role: Some("assistant".into()),
                            content: Some(String::new()),
                            tool_calls: None,
                        },
                        finish_reason: None,
                        logprobs: None,
                    }],
                    None,
                )
            })
            .collect();
        let mut readers: Vec<CallReader> = (0..n).map(|_| CallReader::default()).collect();
        let mut finished = 0;
        let body = ReceiverStream::new(events).flat_map(move |event| {
            let out: Vec<Bytes> = match event {
                GenerationEvent::Delta {
                    index,
                    text,
                    logprobs,
                    usage,
                } => {
                    let logprobs = self.logprobs.then(|| ChoiceLogprobs {
                        content: Some(self.logprobs_of(&logprobs)),
                        refusal: None,
                    });
                    let deltas = match readers.get_mut(index as usize) {
                        Some(reader) if self.tools => tool_deltas(reader.push(&text)),
                        _ => vec![Delta {
                            content: Some(text),
                            ..Delta::default()
                        }],
                    };
                    let mut v: Vec<Bytes> = deltas
                        .into_iter()
                        .enumerate()
                        .map(|(k, delta)| {
                            let choice = ChunkChoice {
                                index,
                                delta,
                                finish_reason: None,
                                logprobs: if k == 0 { logprobs.clone() } else { None },
                            };
                            self.chunk(vec![choice], None)
                        })
                        .collect();
                    v.push(Bytes::from(usage_comment(&usage)));
                    v
                }
                GenerationEvent::Finished {
                    index,
                    reason,
                    logprobs,
                    usage,
                } => {
                    finished += 1;
                    let calls = readers
                        .get(index as usize)
                        .is_some_and(CallReader::is_calls);
                    let choice = ChunkChoice {
                        index,
                        delta: Delta::default(),
                        finish_reason: Some(finish_reason(reason, self.tools && calls)),
                        logprobs: (self.logprobs && !logprobs.is_empty()).then(|| ChoiceLogprobs {
                            content: Some(self.logprobs_of(&logprobs)),
                            refusal: None,
                        }),
                    };
                    let mut v = vec![self.chunk(vec![choice], None)];
                    if finished == n {
                        v.push(Bytes::from(usage_comment(&usage)));
                        if include_usage {
                            v.push(self.chunk(Vec::new(), Some(usage)));
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

fn choice(choices: &mut [Choice], index: u32) -> Result<&mut Choice, WorkerError> {
    choices
        .get_mut(index as usize)
        .ok_or_else(|| WorkerError::Internal(format!("no choice {index}")))
}

fn function_call(name: String, arguments: String) -> ToolCall {
    ToolCall {
        id: call_id(),
        kind: "function".into(),
        function: FunctionCall { name, arguments },
    }
}

/// Stream deltas for read pieces: text as content; a call's start with its id, type and
/// name (and empty arguments), then its argument text, as OpenAI streams them.
fn tool_deltas(pieces: Vec<Piece>) -> Vec<Delta> {
    pieces
        .into_iter()
        .map(|p| match p {
            Piece::Text(t) => Delta {
                content: Some(t),
                ..Delta::default()
            },
            Piece::CallStart { index, name } => Delta {
                tool_calls: Some(vec![ToolCallDelta {
                    index,
                    id: Some(call_id()),
                    kind: Some("function".into()),
                    function: FunctionCallDelta {
                        name: Some(name),
                        arguments: Some(String::new()),
                    },
                }]),
                ..Delta::default()
            },
            Piece::Arguments { index, text } => Delta {
                tool_calls: Some(vec![ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionCallDelta {
                        name: None,
                        arguments: Some(text),
                    },
                }]),
                ..Delta::default()
            },
        })
        .collect()
}

/// The later of two usage reports of one request (counts only grow).
fn max_usage(a: Usage, b: Usage) -> Usage {
    if b.total_tokens >= a.total_tokens {
        b
    } else {
        a
    }
}
