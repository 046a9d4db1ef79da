//! A stub upstream that answers at once, with usage it states exactly: for tests and
//! benchmarks of the gateway's own work (limits, quotas, overhead), never of the models.
//!
//! Chat: `prompt_tokens` is 10; `completion_tokens` is `max_tokens` (default 16), so a
//! call uses all of the completion it reserved. Embeddings: 2 tokens per input.
//! Knobs ride in the body's `user` field as `name=value` pairs split by `;` (the gateway
//! forwards `user` as it is and refuses fields it does not know), or, for embeddings, as
//! body fields. `stub_delay_ms=N` holds the reply back that long, to keep requests in
//! flight.
//!
//! A stream with `stub_deltas=N` is cut short instead: N one-token content deltas, each
//! followed by its usage comment as the worker writes them, then, by `stub_end`, the
//! stream stalls for good (`"stall"`, the default) or the connection breaks (`"break"`),
//! never reaching a finish reason or `[DONE]`. A client that has read N deltas has then
//! been sent everything there is, so what it read is exactly what was delivered.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub const STUB_CHAT_MODEL: &str = "stub-chat";
pub const STUB_EMBEDDING_MODEL: &str = "stub-embed";
pub const STUB_PROMPT_TOKENS: u64 = 10;

pub fn router() -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
}

async fn models() -> Json<Value> {
    let model = |id: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "stub"});
    Json(json!({
        "object": "list",
        "data": [model(STUB_CHAT_MODEL), model(STUB_EMBEDDING_MODEL)],
    }))
}

/// A knob's value: from `user` (`name=value;...`), else the body field of that name.
fn knob(body: &Value, name: &str) -> Option<Value> {
    let from_user = body
        .get("user")
        .and_then(Value::as_str)
        .and_then(|u| {
            u.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
        })
        .map(|v| v.parse::<u64>().map_or(Value::String(v), Value::from));
    from_user.or_else(|| body.get(name).cloned())
}

async fn hold(body: &Value) {
    if let Some(ms) = knob(body, "stub_delay_ms").and_then(|v| v.as_u64()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

async fn chat(Json(body): Json<Value>) -> Response {
    hold(&body).await;
    let completion = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(16);
    let usage = json!({
        "prompt_tokens": STUB_PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": STUB_PROMPT_TOKENS + completion,
    });
    let model = body.get("model").cloned().unwrap_or(Value::Null);
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    if let (true, Some(n)) = (stream, knob(&body, "stub_deltas").and_then(|v| v.as_u64())) {
        let breaks = knob(&body, "stub_end").and_then(|v| v.as_str().map(str::to_owned))
            == Some("break".to_owned());
        return cut_stream(&model, n, breaks);
    }
    if stream {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut out = String::new();
        out.push_str(&format!(
            "data: {}\n\n",
            chunk(json!({"role": "assistant", "content": "ok"}), Value::Null)
        ));
        out.push_str(&openai_types::usage_comment(&openai_types::Usage::new(
            STUB_PROMPT_TOKENS,
            completion,
        )));
        out.push_str(&format!(
            "data: {}\n\n",
            chunk(json!({}), Value::from("stop"))
        ));
        out.push_str(&format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
                   "model": model, "choices": [], "usage": usage})
        ));
        out.push_str("data: [DONE]\n\n");
        return (
            [(header::CONTENT_TYPE, "text/event-stream")],
            Body::from(out),
        )
            .into_response();
    }
    Json(json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": usage,
    }))
    .into_response()
}

/// A stream of `n` one-token deltas that then stalls, or breaks the connection.
fn cut_stream(model: &Value, n: u64, breaks: bool) -> Response {
    let chunk = |content: &str| {
        let c = json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
               "model": model, "choices": [{"index": 0, "delta": {"content": content},
               "finish_reason": null}]});
        Ok::<_, std::io::Error>(bytes::Bytes::from(format!("data: {c}\n\n")))
    };
    let mut events = vec![chunk("")];
    for i in 1..=n {
        events.push(chunk(&format!("t{i} ")));
        events.push(Ok(bytes::Bytes::from(openai_types::usage_comment(
            &openai_types::Usage::new(STUB_PROMPT_TOKENS, i),
        ))));
    }
    let end = futures::stream::once(async move {
        // Pending first, so the events above are flushed before the connection breaks
        // (an error in a body not yet flushed loses the response head too).
        tokio::time::sleep(Duration::from_millis(50)).await;
        if breaks {
            Err(std::io::Error::other("the stub breaks the connection"))
        } else {
            futures::future::pending().await
        }
    });
    let body = Body::from_stream(futures::StreamExt::chain(
        futures::stream::iter(events),
        end,
    ));
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

async fn embeddings(Json(body): Json<Value>) -> Response {
    hold(&body).await;
    let n = match body.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.6, 0.8]}))
        .collect();
    let tokens = 2 * n as u64;
    Json(json!({
        "object": "list",
        "data": data,
        "model": body.get("model").cloned().unwrap_or(Value::Null),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

/// A stub serving on a real port of this process until dropped.
pub struct StubWorker {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl StubWorker {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router()).await;
        });
        Self {
            url: format!("http://{addr}"),
            task,
        }
    }
}

impl Drop for StubWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}
