//! The consumer API's reads: the models a key may call, and its tenant's own usage.
//!
//! Owns: `GET /v1/models`, `GET /v1/models/{id}` and `GET /v1/usage`. Must never: show a tenant anything of
//! another tenant, or a key a model it may not call.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use billing::{now_ms, Ledger};
use openai_types::{Model, ModelList};

use super::ConsumerState;
use crate::error::GatewayError;
use crate::listener::ClientAddr;

/// `GET /v1/usage?start=&end=` (Unix seconds; default: the last 31 days): the
/// calling key's tenant's usage per model, and nobody else's. Records reach the store
/// through the spool, so the last fraction of a second may not be counted yet.
pub(super) async fn own_usage(
    State(state): State<Arc<ConsumerState>>,
    headers: HeaderMap,
    client: Option<Extension<ClientAddr>>,
    range: Result<Query<UsageRange>, QueryRejection>,
) -> Result<Response, GatewayError> {
    let client = client.map(|Extension(a)| a.0.ip());
    let caller = state.auth.authenticate(&headers, client).await?;
    let Query(range) =
        range.map_err(|e| GatewayError::bad_request(e.body_text(), Some("start")))?;
    let now = now_ms() / 1000;
    let start = range.start.unwrap_or(now - 31 * 86_400);
    let end = range.end.unwrap_or(now + 1);
    if start < 0 || end <= start {
        return Err(GatewayError::bad_request(
            "`start` must be before `end`",
            Some("start"),
        ));
    }
    // On the main runtime, like every store call (see `Authenticator`).
    let (db, tenant) = (state.tenants.db().clone(), caller.key.tenant_id.clone());
    let totals = state
        .store_runtime
        .spawn(async move {
            Ledger::new(db)
                .totals_by_model(&tenant, start * 1000, end * 1000)
                .await
        })
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))??;
    let data: Vec<serde_json::Value> = totals
        .into_iter()
        .map(|t| {
            serde_json::json!({
                "model": t.model,
                "requests": t.requests,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "total_tokens": t.prompt_tokens + t.completion_tokens,
                "cached_tokens": t.cached_tokens,
                "cache_hits": t.cache_hits,
                "batch": {"requests": t.batch_requests, "prompt_tokens": t.batch_prompt_tokens,
                          "completion_tokens": t.batch_completion_tokens},
            })
        })
        .collect();
    Ok(
        Json(serde_json::json!({"object": "usage", "start": start, "end": end, "data": data}))
            .into_response(),
    )
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct UsageRange {
    start: Option<i64>,
    end: Option<i64>,
}

/// `GET /v1/models`: the pool's models this key may call.
pub(super) async fn list_models(
    State(state): State<Arc<ConsumerState>>,
    headers: HeaderMap,
    client: Option<Extension<ClientAddr>>,
) -> Result<Response, GatewayError> {
    let client = client.map(|Extension(a)| a.0.ip());
    let caller = state.auth.authenticate(&headers, client).await?;
    let models = state
        .pool
        .models()
        .into_iter()
        .filter(|m| caller.key.allows_model(m))
        .map(|m| model_object(&state, m))
        .collect();
    Ok(Json(ModelList::new(models)).into_response())
}

/// `GET /v1/models/{id}`: one model this key may call, else 404 (a model it may not call
/// is as unknown to it as one nobody serves).
pub(super) async fn retrieve_model(
    State(state): State<Arc<ConsumerState>>,
    headers: HeaderMap,
    client: Option<Extension<ClientAddr>>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let client = client.map(|Extension(a)| a.0.ip());
    let caller = state.auth.authenticate(&headers, client).await?;
    if !caller.key.allows_model(&id) || !state.pool.models().contains(&id) {
        return Err(GatewayError::ModelNotFound(id));
    }
    Ok(Json(model_object(&state, id)).into_response())
}

/// A model as the consumer API shows it: OpenAI's fields, with its context length and kind
/// where its workers state them.
fn model_object(state: &ConsumerState, id: String) -> Model {
    let facts = state.pool.facts(&id).unwrap_or_default();
    let mut model = Model::new(id, state.started_at);
    model.context_length = facts.context_length;
    model.kind = facts.kind;
    model
}
