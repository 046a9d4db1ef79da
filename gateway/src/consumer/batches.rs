//! `/v1/files` and `/v1/batches`: a key holder uploads batch input files, starts batches
//! from them, follows and cancels them, and downloads their output and error files.
//!
//! Owns: authenticating these calls, reading a multipart upload within its bound, and the
//! replies' shapes. Must never: show or touch another tenant's file or batch (a 404, as if
//! it did not exist).

use std::sync::Arc;

use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde::Deserialize;

use super::classifiers::{caller, on_store, reply};
use super::ConsumerState;
use crate::batches::store::Owner;
use crate::batches::{new_id, parse_file, BatchStore, CreateBatch, MAX_FILE_BYTES};
use crate::error::GatewayError;

fn store(state: &ConsumerState) -> BatchStore {
    BatchStore::new(state.tenants.db().clone())
}

/// The body bound of the upload route: a file and its form fields.
pub(super) fn body_limit() -> axum::extract::DefaultBodyLimit {
    axum::extract::DefaultBodyLimit::max(MAX_FILE_BYTES + (64 << 10))
}

/// Authenticates `req` and runs `f` with the batch store and the caller's tenant, on the
/// main runtime; `None` from `f` is a 404 of `missing`.
async fn for_tenant<T, Fut>(
    state: &ConsumerState,
    req: Request,
    missing: fn() -> GatewayError,
    f: impl FnOnce(BatchStore, String) -> Fut,
) -> Response
where
    T: serde::Serialize + Send + 'static,
    Fut: std::future::Future<Output = Result<Option<T>, billing::DbError>> + Send + 'static,
{
    let answer = async {
        let (caller, _) = caller(state, req).await?;
        let found = on_store(state, f(store(state), caller.key.tenant_id.clone())).await?;
        found.map(|v| Json(v).into_response()).ok_or_else(missing)
    };
    reply(answer.await)
}

fn list_of<T: serde::Serialize>(data: Vec<T>) -> Option<serde_json::Value> {
    Some(serde_json::json!({"object": "list", "data": data, "has_more": false}))
}

fn file_not_found() -> GatewayError {
    GatewayError::NotFound("no file with that id".into())
}

fn batch_not_found() -> GatewayError {
    GatewayError::NotFound("no batch with that id".into())
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    limit: Option<i64>,
    purpose: Option<String>,
}

impl ListQuery {
    fn limit(&self) -> i64 {
        self.limit.unwrap_or(20).clamp(1, 100)
    }
}

/// `POST /v1/files`: `purpose` must be `batch`; the file is checked line by line.
pub(super) async fn upload(State(state): State<Arc<ConsumerState>>, req: Request) -> Response {
    reply(upload_inner(&state, req).await)
}

async fn upload_inner(state: &ConsumerState, req: Request) -> Result<Response, GatewayError> {
    let (parts, body) = req.into_parts();
    let caller = state
        .auth
        .authenticate(&parts.headers, super::client_ip(&parts.extensions))
        .await?;
    let mut form = Multipart::from_request(Request::from_parts(parts, body), &())
        .await
        .map_err(|e| {
            GatewayError::bad_request(format!("the body is not a multipart form: {e}"), None)
        })?;
    let (mut purpose, mut file) = (None, None);
    let field_error = |e: axum::extract::multipart::MultipartError| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => GatewayError::PayloadTooLarge(MAX_FILE_BYTES),
        _ => GatewayError::bad_request(format!("the multipart form cannot be read: {e}"), None),
    };
    let read = tokio::time::timeout(state.body_timeout * 8, async {
        while let Some(field) = form.next_field().await.map_err(field_error)? {
            match field.name() {
                Some("purpose") => purpose = Some(field.text().await.map_err(field_error)?),
                Some("file") => {
                    let name = field.file_name().unwrap_or("batch.jsonl").to_owned();
                    file = Some((name, field.bytes().await.map_err(field_error)?));
                }
                _ => {}
            }
        }
        Ok::<_, GatewayError>(())
    });
    read.await.map_err(|_| GatewayError::RequestTimeout)??;
    match purpose.as_deref() {
        Some("batch") => {}
        Some(_) => {
            return Err(GatewayError::bad_request(
                "`purpose` must be \"batch\" (the only files this API takes)",
                Some("purpose"),
            ))
        }
        None => {
            return Err(GatewayError::bad_request(
                "`purpose` is required",
                Some("purpose"),
            ))
        }
    }
    let (filename, bytes) =
        file.ok_or_else(|| GatewayError::bad_request("`file` is required", Some("file")))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(GatewayError::PayloadTooLarge(MAX_FILE_BYTES));
    }
    let lines = parse_file(&bytes)?;
    let filename: String = filename.chars().take(255).collect();
    let content = String::from_utf8_lossy(&bytes).into_owned();
    let (s, tenant, id) = (store(state), caller.key.tenant_id.clone(), new_id("file-"));
    let created = on_store(state, async move {
        s.create_file(&id, &tenant, "batch", &filename, &content, lines.len())
            .await
    })
    .await?;
    Ok(Json(created).into_response())
}

pub(super) async fn list_files(
    State(state): State<Arc<ConsumerState>>,
    Query(q): Query<ListQuery>,
    req: Request,
) -> Response {
    for_tenant(&state, req, file_not_found, |s, t| async move {
        Ok(list_of(
            s.list_files(&t, q.purpose.as_deref(), q.limit()).await?,
        ))
    })
    .await
}

pub(super) async fn get_file(
    State(state): State<Arc<ConsumerState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    for_tenant(&state, req, file_not_found, |s, t| async move {
        s.file(&t, &id).await
    })
    .await
}

pub(super) async fn file_content(
    State(state): State<Arc<ConsumerState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let answer = async {
        let (caller, _) = caller(&state, req).await?;
        let (s, tenant) = (store(&state), caller.key.tenant_id.clone());
        let content = on_store(&state, async move { s.file_content(&tenant, &id).await }).await?;
        content
            .map(|c| ([(header::CONTENT_TYPE, "application/jsonl")], c).into_response())
            .ok_or_else(file_not_found)
    };
    reply(answer.await)
}

pub(super) async fn delete_file(
    State(state): State<Arc<ConsumerState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    for_tenant(&state, req, file_not_found, |s, t| async move {
        let deleted = s.delete_file(&t, &id).await?;
        Ok(deleted.then(|| serde_json::json!({"id": id, "object": "file", "deleted": true})))
    })
    .await
}

/// `POST /v1/batches`: the input file's lines must all call the batch's endpoint, with
/// models the key may use.
pub(super) async fn create(State(state): State<Arc<ConsumerState>>, req: Request) -> Response {
    reply(create_inner(&state, req).await)
}

async fn create_inner(state: &ConsumerState, req: Request) -> Result<Response, GatewayError> {
    let (caller, body) = caller(state, req).await?;
    let bytes = tokio::time::timeout(
        state.body_timeout,
        http_body_util::Limited::new(body, state.max_body_bytes).collect(),
    )
    .await
    .map_err(|_| GatewayError::RequestTimeout)?
    .map_err(|_| GatewayError::PayloadTooLarge(state.max_body_bytes))?
    .to_bytes();
    let new: CreateBatch = serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::bad_request(format!("the body is not a batch: {e}"), None))?;
    let endpoint = new.check()?;
    let (s, tenant, file_id) = (
        store(state),
        caller.key.tenant_id.clone(),
        new.input_file_id.clone(),
    );
    let content = on_store(state, {
        let s = s.clone();
        async move { s.file_content(&tenant, &file_id).await }
    })
    .await?
    .ok_or_else(|| {
        GatewayError::NotFound(format!("no input file with the id {:?}", new.input_file_id))
    })?;
    let lines = parse_file(content.as_bytes())?;
    for (i, line) in lines.iter().enumerate() {
        if line.url != endpoint {
            return Err(GatewayError::bad_request(
                format!(
                    "line {}: its `url` {} is not the batch's endpoint {endpoint}",
                    i + 1,
                    line.url
                ),
                Some("endpoint"),
            ));
        }
        let model = serde_json::from_str::<serde_json::Value>(&line.body)
            .ok()
            .and_then(|b| b.get("model").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_default();
        if !caller.key.allows_model(&model) {
            return Err(GatewayError::ModelNotAllowed(model));
        }
    }
    let owner = Owner {
        tenant_id: caller.key.tenant_id.clone(),
        key_id: caller.key.id.clone(),
        endpoint,
    };
    let id = new_id("batch_");
    let created = on_store(state, async move {
        s.create_batch(
            &id,
            &owner,
            &new.input_file_id,
            new.metadata.as_ref(),
            &lines,
        )
        .await
    })
    .await?;
    Ok(Json(created).into_response())
}

pub(super) async fn list(
    State(state): State<Arc<ConsumerState>>,
    Query(q): Query<ListQuery>,
    req: Request,
) -> Response {
    for_tenant(&state, req, batch_not_found, |s, t| async move {
        let batches = s.list_batches(Some(&t), q.limit()).await?;
        Ok(list_of(batches.into_iter().map(|(_, b)| b).collect()))
    })
    .await
}

pub(super) async fn get_one(
    State(state): State<Arc<ConsumerState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    for_tenant(&state, req, batch_not_found, |s, t| async move {
        s.batch(&t, &id).await
    })
    .await
}

/// `POST /v1/batches/{id}/cancel`: lines not started never run; the batch ends
/// `cancelled` once those in flight finish, with what ran in its output file.
pub(super) async fn cancel(
    State(state): State<Arc<ConsumerState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    for_tenant(&state, req, batch_not_found, |s, t| async move {
        s.cancel(&t, &id).await
    })
    .await
}
