//! The consumer-facing HTTP server: routes, request ids, and start/stop.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use billing::{now_ms, Db, Ledger, Shipper, ShipperHandle, Spool};
use openai_types::{Model, ModelList};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::pool::WorkerPool;
use crate::proxy::{CallContext, ProxiedCall, Proxy, UpstreamLimits};
use crate::tenants::TenantStore;

/// The gateway's id for one request: the `x-request-id` header and the usage record's key.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub struct AppState {
    pub auth: Authenticator,
    pub proxy: Proxy,
    pub tenants: TenantStore,
    pub max_body_bytes: usize,
    pub started_at: u64,
}

pub struct Gateway {
    listener: TcpListener,
    state: Arc<AppState>,
    db: Db,
    spool: Spool,
    shipper: ShipperHandle,
    health_interval: Duration,
    shutdown_grace: Duration,
}

impl Gateway {
    /// Connects the store (running migrations), binds the listener, and checks the workers once.
    pub async fn build(config: &GatewayConfig) -> anyhow::Result<Self> {
        let db = Db::connect(&config.database_url).await?;
        Self::build_with_db(config, db).await
    }

    pub async fn build_with_db(config: &GatewayConfig, db: Db) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        let pool = WorkerPool::new(&config.workers, client.clone());
        pool.check_all().await;
        let tenants = TenantStore::new(db.clone());
        let spool = Spool::open(&config.spool_dir, config.spool_segment_bytes)?;
        let shipper =
            Shipper::new(&spool, Ledger::new(db.clone()), Duration::from_secs(30)).spawn();
        let state = Arc::new(AppState {
            auth: Authenticator::new(tenants.clone(), Duration::from_millis(config.key_cache_ms)),
            proxy: Proxy {
                pool,
                client,
                spool: spool.clone(),
                limits: UpstreamLimits {
                    first_byte_timeout: Duration::from_secs(
                        config.upstream_first_byte_timeout_secs,
                    ),
                    total_timeout: Duration::from_secs(config.upstream_timeout_secs),
                    max_attempts: 3,
                },
            },
            tenants,
            max_body_bytes: config.max_body_bytes,
            started_at: crate::unix_now(),
        });
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Self {
            listener,
            state,
            db,
            spool,
            shipper,
            health_interval: Duration::from_millis(config.health_interval_ms),
            shutdown_grace: Duration::from_secs(config.shutdown_grace_secs),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests
    /// finish (up to the grace period) and closes the store.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let health = self
            .state
            .proxy
            .pool
            .spawn_health_checks(self.health_interval);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let signal = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let server = axum::serve(self.listener, router(self.state.clone()))
            .with_graceful_shutdown(signal)
            .into_future();
        let grace = self.shutdown_grace;
        let drained = async move {
            let _ = stop_rx.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = server => served?,
            _ = drained => tracing::warn!("grace period over; abandoning in-flight requests"),
        }
        health.abort();
        // Streams whose clients left spool their usage from spawned tasks; let them run.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = self.spool.flush().await {
            tracing::error!(error = %e, "flushing the usage spool failed");
        }
        self.shipper.stop().await;
        self.db.close().await;
        Ok(())
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify))
        .route("/v1/models", get(list_models))
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(|| async { GatewayError::PathNotFound })
        .layer(middleware::from_fn(assign_request_id))
        .with_state(state)
}

async fn assign_request_id(mut req: Request, next: Next) -> Response {
    let id = format!("req_{}", uuid::Uuid::now_v7().simple());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(req).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn chat_completions(
    state: State<Arc<AppState>>,
    id: Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    proxied(state, id, headers, body, "/v1/chat/completions").await
}

async fn embeddings(
    state: State<Arc<AppState>>,
    id: Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    proxied(state, id, headers, body, "/v1/embeddings").await
}

async fn classify(
    state: State<Arc<AppState>>,
    id: Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    proxied(state, id, headers, body, "/v1/classify").await
}

async fn proxied(
    State(state): State<Arc<AppState>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
    endpoint: &'static str,
) -> Result<Response, GatewayError> {
    let started_at = now_ms();
    let caller = state.auth.authenticate(&headers).await?;
    let bytes = axum::body::to_bytes(body, state.max_body_bytes)
        .await
        .map_err(|_| GatewayError::PayloadTooLarge(state.max_body_bytes))?;
    let call = ProxiedCall::parse(endpoint, &bytes)?;
    let ctx = CallContext {
        request_id,
        caller,
        started_at,
    };
    state.proxy.handle(ctx, call).await
}

async fn list_models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, GatewayError> {
    let caller = state.auth.authenticate(&headers).await?;
    let models = state
        .proxy
        .pool
        .models()
        .into_iter()
        .filter(|m| caller.key.allows_model(m))
        .map(|m| Model::new(m, state.started_at))
        .collect();
    Ok(Json(ModelList::new(models)).into_response())
}
