//! The consumer API: what a key holder's request meets once its connection is accepted.
//!
//! Owns: dispatching a request to forwarding (the three forwarded calls) or to the router
//! (everything else), reading a forwarded call's body within its bounds, and the state
//! those handlers share. Must never: reach the admin API or the metrics, or answer a
//! forwarded call without authenticating its key first.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use billing::now_ms;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;

use crate::auth::Authenticator;
use crate::error::GatewayError;
use crate::listener::ClientAddr;
use crate::metrics::GatewayMetrics;
use crate::pool::WorkerPool;
use crate::proxy::{CallContext, ProxiedCall, Proxy};
use crate::tenants::TenantStore;

mod batches;
mod classifiers;
mod observe;
mod reads;

pub use observe::RequestId;

use observe::{observe, observed, ModelLabel};

/// What the consumer API's handlers share.
pub struct ConsumerState {
    pub auth: Arc<Authenticator>,
    pub proxy: Proxy,
    pub pool: Arc<WorkerPool>,
    pub tenants: TenantStore,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    /// Unix seconds at start: the `created` of every listed model.
    pub started_at: u64,
    pub metrics: Arc<GatewayMetrics>,
    /// The main runtime: store calls made while serving run there.
    pub store_runtime: tokio::runtime::Handle,
    /// Ready classifiers by (tenant, id), briefly: a deleted one stops answering within
    /// this cache's lifetime.
    pub classifiers: moka::sync::Cache<(String, String), Arc<crate::classifiers::store::Trained>>,
}

/// Every path of the consumer API (the OpenAPI document must list exactly these).
pub const PUBLIC_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/classify",
    "/v1/classifiers",
    "/v1/classifiers/{id}",
    "/v1/files",
    "/v1/files/{id}",
    "/v1/files/{id}/content",
    "/v1/batches",
    "/v1/batches/{id}",
    "/v1/batches/{id}/cancel",
    "/v1/models",
    "/v1/models/{id}",
    "/v1/usage",
    "/health",
];

pub fn router(state: Arc<ConsumerState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify))
        .route(
            "/v1/classifiers",
            post(classifiers::create)
                .get(classifiers::list)
                .layer(classifiers::body_limit()),
        )
        .route(
            "/v1/classifiers/{id}",
            get(classifiers::get_one).delete(classifiers::delete),
        )
        .route(
            "/v1/files",
            post(batches::upload)
                .get(batches::list_files)
                .layer(batches::body_limit()),
        )
        .route(
            "/v1/files/{id}",
            get(batches::get_file).delete(batches::delete_file),
        )
        .route("/v1/files/{id}/content", get(batches::file_content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::get_one))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/models", get(reads::list_models))
        .route("/v1/models/{id}", get(reads::retrieve_model))
        .route("/v1/usage", get(reads::own_usage))
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(|| async { GatewayError::PathNotFound })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The consumer API as the listener serves it. The three forwarded calls, nearly every
/// request, are dispatched here by method and path and go straight to [`forward_call`],
/// skipping the router's route lookup, boxed body and boxed futures; everything else goes
/// through the axum [`router`], which words 404s and 405s. Both ways give a request the
/// same id, headers and metrics.
#[derive(Clone)]
pub struct ConsumerService {
    state: Arc<ConsumerState>,
    router: TowerToHyperService<Router>,
}

impl ConsumerService {
    pub fn new(state: Arc<ConsumerState>) -> Self {
        Self {
            router: TowerToHyperService::new(router(state.clone())),
            state,
        }
    }
}

/// The forwarded endpoint a request is for, if it is a POST to one.
fn forwarded_endpoint(method: &Method, path: &str) -> Option<&'static str> {
    if method != Method::POST {
        return None;
    }
    crate::pool::FORWARDED.iter().find(|e| **e == path).copied()
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConsumerService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        match forwarded_endpoint(req.method(), req.uri().path()) {
            Some(endpoint) => {
                let state = self.state.clone();
                Box::pin(async move {
                    let started = Instant::now();
                    let id = RequestId::new();
                    let header = id.header();
                    let (parts, body) = req.into_parts();
                    let client = client_ip(&parts.extensions);
                    let response =
                        match forward_call(&state, id.0, &parts.headers, client, body, endpoint)
                            .await
                        {
                            Ok(response) | Err(response) => response,
                        };
                    Ok(observed(&state, endpoint, started, header, response))
                })
            }
            None => Box::pin(self.router.call(req)),
        }
    }
}

async fn chat_completions(state: State<Arc<ConsumerState>>, req: Request) -> Response {
    proxied(state, req, "/v1/chat/completions").await
}

async fn completions(state: State<Arc<ConsumerState>>, req: Request) -> Response {
    proxied(state, req, "/v1/completions").await
}

async fn responses(state: State<Arc<ConsumerState>>, req: Request) -> Response {
    proxied(state, req, "/v1/responses").await
}

async fn embeddings(state: State<Arc<ConsumerState>>, req: Request) -> Response {
    proxied(state, req, "/v1/embeddings").await
}

async fn classify(state: State<Arc<ConsumerState>>, req: Request) -> Response {
    proxied(state, req, "/v1/classify").await
}

/// A consumer call to forward that came through the router. Takes the request whole: the
/// headers are read where they are, not copied.
async fn proxied(
    State(state): State<Arc<ConsumerState>>,
    req: Request,
    endpoint: &'static str,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let request_id = parts
        .extensions
        .remove::<RequestId>()
        .map(|id| id.0)
        .unwrap_or_default();
    let client = client_ip(&parts.extensions);
    match forward_call(&state, request_id, &parts.headers, client, body, endpoint).await {
        Ok(response) | Err(response) => response,
    }
}

/// The address of the client a request came from, as the listener put it there.
pub(crate) fn client_ip(extensions: &axum::http::Extensions) -> Option<IpAddr> {
    extensions.get::<ClientAddr>().map(|a| a.0.ip())
}

/// Authenticates, reads the body within its size and time bounds, parses and forwards.
async fn forward_call<B>(
    state: &ConsumerState,
    request_id: String,
    headers: &HeaderMap,
    client: Option<IpAddr>,
    body: B,
    endpoint: &'static str,
) -> Result<Response, Response>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started_at = now_ms();
    let caller = state
        .auth
        .authenticate(headers, client)
        .await
        .map_err(IntoResponse::into_response)?;
    let bytes = tokio::time::timeout(
        state.body_timeout,
        http_body_util::Limited::new(body, state.max_body_bytes).collect(),
    )
    .await
    .map_err(|_| GatewayError::RequestTimeout.into_response())?
    .map_err(|_| GatewayError::PayloadTooLarge(state.max_body_bytes).into_response())?
    .to_bytes();
    let call = if endpoint == "/v1/classify" && crate::classifiers::names_classifier(&bytes) {
        classifiers::classify_call(state, &caller, &bytes).await
    } else {
        ProxiedCall::parse(endpoint, bytes)
    }
    .map_err(IntoResponse::into_response)?;
    let model = ModelLabel::of(&state.pool, &call.model);
    let ctx = CallContext {
        request_id,
        caller,
        started_at,
        cache: crate::response_cache::Directive::parse(
            headers
                .get(axum::http::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok()),
        ),
    };
    let mut response = match state.proxy.handle(ctx, call).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    response.extensions_mut().insert(model);
    Ok(response)
}
