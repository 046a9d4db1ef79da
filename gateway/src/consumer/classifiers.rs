//! `/v1/classifiers`: a key holder creates, reads, lists and deletes its tenant's
//! classifiers; `/v1/classify` with a `classifier` is answered in `forward_call`.
//!
//! Owns: authenticating these calls, bounding their bodies, and the replies' shapes. Must
//! never: show or touch another tenant's classifier (a 404, as if it did not exist).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;

use super::{client_ip, ConsumerState};
use crate::auth::KeyCaller;
use crate::classifiers::{
    ClassifierStore, ClassifyWith, NewClassifier, MAX_BODY_BYTES, MAX_TRAINING_PER_TENANT,
};
use crate::error::GatewayError;

pub(super) async fn caller(
    state: &ConsumerState,
    req: Request,
) -> Result<(KeyCaller, Body), GatewayError> {
    let (parts, body) = req.into_parts();
    let caller = state
        .auth
        .authenticate(&parts.headers, client_ip(&parts.extensions))
        .await?;
    Ok((caller, body))
}

/// Runs a store call on the main runtime, as every store call made while serving does.
pub(super) async fn on_store<T: Send + 'static>(
    state: &ConsumerState,
    f: impl std::future::Future<Output = Result<T, billing::DbError>> + Send + 'static,
) -> Result<T, GatewayError> {
    state
        .store_runtime
        .spawn(f)
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?
        .map_err(|e| GatewayError::Internal(e.to_string()))
}

fn store(state: &ConsumerState) -> ClassifierStore {
    ClassifierStore::new(state.tenants.db().clone())
}

pub(super) async fn create(State(state): State<Arc<ConsumerState>>, req: Request) -> Response {
    match create_inner(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn create_inner(state: &ConsumerState, req: Request) -> Result<Response, GatewayError> {
    let (caller, body) = caller(state, req).await?;
    let bytes = tokio::time::timeout(
        state.body_timeout * 8,
        http_body_util::Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await
    .map_err(|_| GatewayError::RequestTimeout)?
    .map_err(|_| GatewayError::PayloadTooLarge(MAX_BODY_BYTES))?
    .to_bytes();
    let new: NewClassifier = serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::bad_request(format!("the body is not a classifier: {e}"), None)
    })?;
    if !caller.key.allows_model(&new.model) {
        return Err(GatewayError::ModelNotAllowed(new.model));
    }
    let labels = new.check(&state.pool)?;
    let tenant = caller.key.tenant_id.clone();
    let s = store(state);
    let training = on_store(state, {
        let (s, tenant) = (s.clone(), tenant.clone());
        async move { s.training_count(&tenant).await }
    })
    .await?;
    if training >= MAX_TRAINING_PER_TENANT {
        return Err(GatewayError::TooMany(format!(
            "{training} classifiers of this tenant are waiting for or in training; at most {MAX_TRAINING_PER_TENANT}"
        )));
    }
    let id = format!("clf_{}", uuid::Uuid::now_v7().simple());
    let key_id = caller.key.id.clone();
    let summary = on_store(state, async move {
        s.create(
            &id,
            &tenant,
            &key_id,
            &new.name,
            &new.model,
            &labels,
            &new.options,
            &new.examples,
        )
        .await
    })
    .await?;
    Ok((StatusCode::OK, Json(summary)).into_response())
}

/// Authenticates `req` and runs `f` with the classifier store and the caller's tenant, on
/// the main runtime.
async fn for_tenant<T, Fut>(
    state: &ConsumerState,
    req: Request,
    f: impl FnOnce(ClassifierStore, String) -> Fut,
) -> Result<T, GatewayError>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = Result<T, billing::DbError>> + Send + 'static,
{
    let (caller, _) = caller(state, req).await?;
    on_store(state, f(store(state), caller.key.tenant_id.clone())).await
}

pub(super) fn reply(answer: Result<Response, GatewayError>) -> Response {
    answer.unwrap_or_else(IntoResponse::into_response)
}

fn not_found() -> GatewayError {
    GatewayError::NotFound("no classifier with that id".into())
}

pub(super) async fn get_one(
    State(state): State<Arc<ConsumerState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let found = for_tenant(&state, req, |s, t| async move { s.get(&t, &id).await }).await;
    reply(found.and_then(|c| c.map(|c| Json(c).into_response()).ok_or_else(not_found)))
}

pub(super) async fn list(State(state): State<Arc<ConsumerState>>, req: Request) -> Response {
    let all = for_tenant(&state, req, |s, t| async move { s.list(Some(&t)).await }).await;
    reply(all.map(|all| Json(serde_json::json!({"object": "list", "data": all})).into_response()))
}

pub(super) async fn delete(
    State(state): State<Arc<ConsumerState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let which = id.clone();
    let deleted = for_tenant(
        &state,
        req,
        |s, t| async move { s.delete(&t, &which).await },
    )
    .await;
    reply(deleted.and_then(|deleted| {
        deleted
            .then(|| {
                Json(serde_json::json!({"id": id, "object": "classifier.deleted", "deleted": true}))
                    .into_response()
            })
            .ok_or_else(not_found)
    }))
}

/// The body bound of the classifier routes, above the forwarded calls' one.
pub(super) fn body_limit() -> axum::extract::DefaultBodyLimit {
    axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES)
}

/// The call that answers `/v1/classify` with a trained classifier: its embeddings, made
/// into the classification reply. A classifier of another tenant is a 404, one not ready a
/// 409.
pub(super) async fn classify_call(
    state: &ConsumerState,
    caller: &KeyCaller,
    body: &[u8],
) -> Result<crate::proxy::ProxiedCall, GatewayError> {
    let with: ClassifyWith = serde_json::from_slice(body).map_err(|e| {
        GatewayError::bad_request(format!("the body is not a classify request: {e}"), None)
    })?;
    with.input
        .validate()
        .map_err(|m| GatewayError::bad_request(m, Some("input")))?;
    let key = (caller.key.tenant_id.clone(), with.classifier.clone());
    let trained = match state.classifiers.get(&key) {
        Some(t) => t,
        None => {
            let s = store(state);
            let (tenant, id) = key.clone();
            let found = on_store(state, async move { s.trained(&tenant, &id).await }).await?;
            match found {
                None => {
                    return Err(GatewayError::NotFound(format!(
                        "no classifier `{}`",
                        with.classifier
                    )))
                }
                Some(Err(status)) => {
                    return Err(GatewayError::Conflict(format!(
                        "classifier `{}` is {}; it answers once it is ready",
                        with.classifier,
                        serde_json::to_value(status)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    )))
                }
                Some(Ok(t)) => {
                    let t = Arc::new(t);
                    state.classifiers.insert(key, t.clone());
                    t
                }
            }
        }
    };
    if with.model.as_ref().is_some_and(|m| *m != trained.model) {
        return Err(GatewayError::bad_request(
            format!(
                "classifier `{}` was trained on `{}`; leave `model` out or name that one",
                with.classifier, trained.model
            ),
            Some("model"),
        ));
    }
    crate::classifiers::classify_call(&with.classifier, &trained, &with.input)
}
