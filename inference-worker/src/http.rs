//! The worker's HTTP surface: OpenAI-compatible routes, `/health` and `/metrics`.
//!
//! Owns: routing, body limits and parsing, the embedding and classify requests' checks, the
//! response and SSE shapes, and per-route request metrics. Must never: run a model on the async runtime (it hands
//! jobs to the models' own threads) or know who is asking.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use openai_types::{
    ChatCompletionRequest, ClassifyRequest, ClassifyResponse, ClassifyResult, CompletionRequest,
    Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, EmbeddingVector, ErrorBody,
    Model, ModelList, ResponsesRequest,
};
use serde::de::DeserializeOwned;

use crate::chat;
use crate::embed::{self, EmbeddingModel};
use crate::error::WorkerError;
use crate::llm::ChatModel;
use crate::{AppState, ModelSet};

/// Most labels one classify request may carry.
const MAX_LABELS: usize = 64;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .with_state(state)
}

async fn record_request(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(req).await;
    state
        .metrics
        .request_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    response
}

async fn not_found() -> Response {
    let body = ErrorBody::new(
        "unknown path",
        "invalid_request_error",
        None,
        Some("not_found"),
    );
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// Reads a bounded body and parses it, mapping every failure to an OpenAI-shaped error.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, WorkerError> {
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| WorkerError::PayloadTooLarge(limit))?;
    serde_json::from_slice(&bytes).map_err(|e| WorkerError::Invalid {
        message: format!("invalid JSON body: {e}"),
        param: None,
    })
}

fn models(state: &AppState) -> Result<&ModelSet, WorkerError> {
    state.models.get().ok_or(WorkerError::NotReady)
}

fn chat_model(state: &AppState, name: &str) -> Result<Arc<ChatModel>, WorkerError> {
    models(state)?
        .chat
        .get(name)
        .cloned()
        .ok_or_else(|| WorkerError::ModelNotFound(name.to_owned()))
}

fn embedding_model(state: &AppState, name: &str) -> Result<Arc<EmbeddingModel>, WorkerError> {
    models(state)?
        .embedding
        .get(name)
        .cloned()
        .ok_or_else(|| WorkerError::ModelNotFound(name.to_owned()))
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.models.get() {
        Some(_) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        None => WorkerError::NotReady.into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, WorkerError> {
    let set = models(&state)?;
    // Chat models state their context window: the gateway's bound of a call's tokens.
    let mut list: Vec<Model> = set
        .chat
        .values()
        .map(|m| {
            Model::new(m.name.clone(), state.started_at)
                .with_context_length(m.context_len() as u64)
                .with_kind("chat")
        })
        .chain(
            set.embedding
                .keys()
                .map(|n| Model::new(n.clone(), state.started_at).with_kind("embedding")),
        )
        .collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(ModelList::new(list)))
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, WorkerError> {
    let req: ChatCompletionRequest = read_json(body, state.max_body_bytes).await?;
    let model = chat_model(&state, &req.model)?;
    chat::complete(model, req).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, WorkerError> {
    let req: CompletionRequest = read_json(body, state.max_body_bytes).await?;
    let model = chat_model(&state, &req.model)?;
    crate::completions::complete(model, req).await
}

async fn responses(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, WorkerError> {
    let req: ResponsesRequest = read_json(body, state.max_body_bytes).await?;
    let model = chat_model(&state, &req.model)?;
    crate::responses::respond(model, req).await
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<EmbeddingResponse>, WorkerError> {
    let req: EmbeddingRequest = read_json(body, state.max_body_bytes).await?;
    req.input
        .validate()
        .map_err(|m| WorkerError::invalid(m, "input"))?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(WorkerError::invalid(
                format!("`encoding_format` must be `float` or `base64`, not `{other}`"),
                "encoding_format",
            ))
        }
    };
    let model = embedding_model(&state, &req.model)?;
    let dimensions = match req.dimensions {
        None => model.dimensions,
        Some(d) if d >= 1 && (d as usize) <= model.dimensions => d as usize,
        Some(d) => {
            return Err(WorkerError::invalid(
                format!(
                    "`dimensions` must be between 1 and {}, not {d}",
                    model.dimensions
                ),
                "dimensions",
            ))
        }
    };
    let texts = req.input.texts().into_iter().map(str::to_owned).collect();
    let out = model.embed(texts).await?;
    let tokens: u64 = out.tokens.iter().map(|t| *t as u64).sum();
    let data = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            if dimensions < v.len() {
                embed::truncate_dimensions(&mut v, dimensions);
            }
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(v)
            };
            Embedding {
                object: "embedding".into(),
                index: i as u32,
                embedding,
            }
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        object: "list".into(),
        data,
        model: req.model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

async fn classify(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<ClassifyResponse>, WorkerError> {
    let req: ClassifyRequest = read_json(body, state.max_body_bytes).await?;
    req.input
        .validate()
        .map_err(|m| WorkerError::invalid(m, "input"))?;
    if req.labels.len() < 2 || req.labels.len() > MAX_LABELS {
        return Err(WorkerError::invalid(
            format!("`labels` must hold between 2 and {MAX_LABELS} labels"),
            "labels",
        ));
    }
    if req.labels.iter().any(|l| l.trim().is_empty()) {
        return Err(WorkerError::invalid("labels must not be empty", "labels"));
    }
    let mut unique = req.labels.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != req.labels.len() {
        return Err(WorkerError::invalid("labels must be distinct", "labels"));
    }
    let model = embedding_model(&state, &req.model)?;
    let inputs: Vec<String> = req.input.texts().into_iter().map(str::to_owned).collect();
    let (inputs, labels) = model.embed_with_labels(inputs, &req.labels).await?;
    // Every text is billed, the labels as well as the input (cached labels too).
    let tokens: u64 = inputs
        .tokens
        .iter()
        .chain(&labels.tokens)
        .map(|t| *t as u64)
        .sum();
    let mut results = embed::classify(&inputs.vectors, &req.labels, &labels.vectors);
    let result = match (&req.input, results.len()) {
        (openai_types::TextInput::One(_), 1) => ClassifyResult::One(results.remove(0)),
        _ => ClassifyResult::Many { data: results },
    };
    Ok(Json(ClassifyResponse {
        object: "classification".into(),
        model: req.model,
        result,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}
