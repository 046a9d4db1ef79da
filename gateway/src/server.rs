//! The consumer-facing HTTP server: routes, request ids, and start/stop.

use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use billing::{now_ms, Db, Ledger, Shipper, ShipperHandle, ShipperStats, Spool};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use openai_types::{Model, ModelList};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{AdminState, TokenAuthority};
use crate::auth::Authenticator;
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::limits::Admission;
use crate::listener::{self, ServeOptions};
use crate::metrics::GatewayMetrics;
use crate::pool::WorkerPool;
use crate::pricing::PriceCache;
use crate::proxy::{CallContext, ProxiedCall, Proxy, UpstreamTimeouts};
use crate::tenants::TenantStore;
use crate::upstream::Upstream;

/// The gateway's id for one request: the `x-request-id` header and the usage record's key.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The model a response was for, left on the response for the metrics layer.
#[derive(Debug, Clone)]
struct ModelLabel(String);

pub struct AppState {
    pub auth: Authenticator,
    pub proxy: Proxy,
    pub tenants: TenantStore,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub started_at: u64,
    pub metrics: Arc<GatewayMetrics>,
    pub shipper_stats: Arc<ShipperStats>,
    /// The main runtime: store calls made while serving run there.
    pub store_runtime: tokio::runtime::Handle,
}

pub struct Gateway {
    listener: TcpListener,
    metrics_listener: TcpListener,
    /// The admin API and dashboard, when a signing secret is configured.
    admin: Option<(TcpListener, Arc<AdminState>)>,
    state: Arc<AppState>,
    db: Db,
    spool: Spool,
    shipper: ShipperHandle,
    health_interval: Duration,
    price_refresh: Duration,
    serve_options: ServeOptions,
}

impl Gateway {
    /// Connects the store (running migrations), binds the listener, and checks the workers once.
    pub async fn build(config: &GatewayConfig) -> anyhow::Result<Self> {
        let db = Db::connect(&config.database_url).await?;
        Self::build_with_db(config, db).await
    }

    pub async fn build_with_db(config: &GatewayConfig, db: Db) -> anyhow::Result<Self> {
        let serving_threads = listener::ServingThreads::start(match config.serving_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        })?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        let pool = WorkerPool::new(&config.workers, client);
        pool.check_all().await;
        let tenants = TenantStore::new(db.clone());
        let spool = if config.benchmark_unmetered {
            tracing::warn!(
                "benchmark mode: usage is NOT recorded; never serve customers like this"
            );
            std::fs::create_dir_all(&config.spool_dir)?;
            Spool::discarding(&config.spool_dir)
        } else {
            Spool::open_with(
                &config.spool_dir,
                billing::SpoolOptions {
                    segment_bytes: config.spool_segment_bytes,
                    max_linger: Duration::from_micros(config.spool_max_linger_us),
                    fsync_interval: Duration::from_millis(config.spool_fsync_interval_ms),
                },
            )?
        };
        let outcome_wait = Duration::from_secs(30);
        let shipper = if Db::is_in_memory(&config.database_url) {
            Shipper::new(&spool, Ledger::new(db.clone()), outcome_wait).spawn()
        } else {
            Shipper::spawn_dedicated(&spool, &config.database_url, outcome_wait)?
        };
        let metrics = Arc::new(GatewayMetrics::new()?);
        let admission = Admission::new(
            db.clone(),
            metrics.clone(),
            Duration::from_secs(config.upstream_timeout_secs + 60),
        );
        let prices = PriceCache::load(&db).await?;
        let state = Arc::new(AppState {
            auth: Authenticator::new(tenants.clone(), Duration::from_millis(config.key_cache_ms)),
            proxy: Proxy {
                pool,
                upstreams: (0..=serving_threads.len())
                    .map(|_| Upstream::new(Duration::from_secs(2), Duration::from_secs(60)))
                    .collect(),
                spool: spool.clone(),
                metrics: metrics.clone(),
                timeouts: UpstreamTimeouts {
                    first_byte_timeout: Duration::from_secs(
                        config.upstream_first_byte_timeout_secs,
                    ),
                    total_timeout: Duration::from_secs(config.upstream_timeout_secs),
                    max_attempts: 3,
                },
                admission,
                prices,
                default_completion_reserve: config.default_completion_reserve,
            },
            tenants,
            max_body_bytes: config.max_body_bytes,
            body_timeout: Duration::from_secs(config.body_read_timeout_secs),
            started_at: crate::unix_now(),
            metrics,
            shipper_stats: shipper.stats.clone(),
            store_runtime: tokio::runtime::Handle::current(),
        });
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(listener::tls_acceptor(cert, key)?),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        let serve_options = ServeOptions {
            header_timeout: Duration::from_secs(config.header_read_timeout_secs),
            grace: Duration::from_secs(config.shutdown_grace_secs),
            tls,
            threads: Some(serving_threads),
        };
        let listener = TcpListener::bind(config.listen).await?;
        let metrics_listener = TcpListener::bind(config.metrics_listen).await?;
        let admin = match config.admin_secret()? {
            Some(secret) => {
                let admin_state = Arc::new(AdminState {
                    tokens: TokenAuthority::new(&secret),
                    db: db.clone(),
                    tenants: state.tenants.clone(),
                    pool: state.proxy.pool.clone(),
                    metrics: state.metrics.clone(),
                });
                Some((TcpListener::bind(config.admin_listen).await?, admin_state))
            }
            None => {
                tracing::info!("no admin signing secret: the admin API and dashboard are off");
                None
            }
        };
        Ok(Self {
            listener,
            metrics_listener,
            admin,
            state,
            db,
            spool,
            shipper,
            health_interval: Duration::from_millis(config.health_interval_ms),
            price_refresh: Duration::from_millis(config.price_refresh_ms),
            serve_options,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics_listener.local_addr()
    }

    /// The admin listener's address, when the admin API is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Issues admin tokens with this gateway's secret (for launchers and tests).
    pub fn admin_tokens(&self) -> Option<TokenAuthority> {
        self.admin.as_ref().map(|(_, s)| s.tokens.clone())
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
        let sweeper = self
            .state
            .proxy
            .admission
            .spawn_sweeper(self.db.clone(), Duration::from_secs(5));
        let price_refresh = self
            .state
            .proxy
            .prices
            .spawn_refresh(self.db.clone(), self.price_refresh);
        let partitions = {
            let db = self.db.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(3600));
                every.tick().await; // the store made them at connect
                loop {
                    every.tick().await;
                    if let Err(e) = db.ensure_partitions().await {
                        tracing::warn!(error = %e, "making the usage table's next partitions failed");
                    }
                }
            })
        };
        let metrics_app = Router::new()
            .route("/metrics", get(render_metrics))
            .with_state(self.state.clone());
        let metrics_server =
            tokio::spawn(axum::serve(self.metrics_listener, metrics_app).into_future());
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let admin_server = self.admin.map(|(admin_listener, admin_state)| {
            tokio::spawn(listener::serve(
                admin_listener,
                TowerToHyperService::new(crate::admin::router(admin_state)),
                ServeOptions {
                    threads: None,
                    ..self.serve_options.clone()
                },
                stop_rx.clone(),
            ))
        });
        let serving_threads = self.serve_options.threads.clone();
        listener::serve(
            self.listener,
            ConsumerService::new(self.state.clone()),
            self.serve_options,
            stop_rx,
        )
        .await;
        if let Some(admin_server) = admin_server {
            let _ = admin_server.await;
        }
        health.abort();
        sweeper.abort();
        price_refresh.abort();
        partitions.abort();
        metrics_server.abort();
        // Streams whose clients left spool their usage from spawned tasks; let them run.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = self.spool.flush().await {
            tracing::error!(error = %e, "flushing the usage spool failed");
        }
        // Settle what finished, so this replica's reservations do not wait to expire.
        if tokio::time::timeout(Duration::from_secs(5), self.state.proxy.admission.flush())
            .await
            .is_err()
        {
            tracing::warn!("settling reservations at shutdown timed out; they will expire");
        }
        self.shipper.stop().await;
        self.db.close().await;
        // Last: anything a serving thread's event loop still drives is done with.
        if let Some(threads) = serving_threads {
            threads.stop();
        }
        Ok(())
    }
}

/// Every path of the consumer API (the OpenAPI document must list exactly these).
pub const PUBLIC_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/classify",
    "/v1/models",
    "/v1/usage",
    "/health",
];

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify))
        .route("/v1/models", get(list_models))
        .route("/v1/usage", get(own_usage))
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(|| async { GatewayError::PathNotFound })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The consumer API as the listener serves it. The three forwarded calls, nearly every
/// request, are dispatched here by method and path and go straight to [`forward_call`];
/// everything else (other paths, other methods on these paths) goes through the axum
/// [`router`], which words 404s and 405s. Both ways give a request the same id, headers
/// and metrics. The router's layers cost a route lookup, a boxed body and several boxed
/// futures per request, which the forwarded calls skip.
#[derive(Clone)]
pub struct ConsumerService {
    state: Arc<AppState>,
    router: TowerToHyperService<Router>,
}

impl ConsumerService {
    pub fn new(state: Arc<AppState>) -> Self {
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
                    let response =
                        match forward_call(&state, id.0, &parts.headers, body, endpoint).await {
                            Ok(response) | Err(response) => response,
                        };
                    Ok(observed(&state, endpoint, started, header, response))
                })
            }
            None => Box::pin(self.router.call(req)),
        }
    }
}

impl RequestId {
    /// A new, time-ordered id: `req_` and a UUIDv7 in hex.
    fn new() -> Self {
        Self(format!("req_{}", uuid::Uuid::now_v7().simple()))
    }

    fn header(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.0).ok()
    }
}

/// Gives a consumer request the router serves its id (`x-request-id`), then counts and
/// times it by route, model and status. One layer for both: each layer costs a boxed
/// future per request.
async fn observe(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let id = RequestId::new();
    let header = id.header();
    req.extensions_mut().insert(id);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(req).await;
    observed(&state, &route, started, header, response)
}

/// Puts the request id on a response and counts and times it by route, model and status.
fn observed(
    state: &AppState,
    route: &str,
    started: Instant,
    id_header: Option<HeaderValue>,
    mut response: Response,
) -> Response {
    if let Some(value) = id_header {
        response.headers_mut().insert("x-request-id", value);
    }
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map_or("", |m| m.0.as_str());
    let status = response.status();
    let labels = [route, model, status.as_str()];
    state.metrics.requests.with_label_values(&labels).inc();
    state
        .metrics
        .request_seconds
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    for node in state.proxy.pool.nodes() {
        m.worker_up
            .with_label_values(&[&node.base_url])
            .set(i64::from(node.is_healthy()));
        m.worker_outstanding
            .with_label_values(&[&node.base_url])
            .set(node.outstanding() as i64);
    }
    let stats = &state.shipper_stats;
    let load =
        |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as i64;
    m.spool_backlog.set(load(&stats.backlog));
    m.usage_shipped.set(load(&stats.shipped));
    m.usage_ship_failures.set(load(&stats.failures));
    let spool = state.proxy.spool.stats();
    let advance = |c: &prometheus::IntCounter, to: u64| c.inc_by(to.saturating_sub(c.get()));
    advance(&m.spool_durable_appends, spool.durable_appends);
    advance(&m.spool_fsyncs, spool.fsyncs);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        m.render(),
    )
        .into_response()
}

async fn chat_completions(state: State<Arc<AppState>>, req: Request) -> Response {
    proxied(state, req, "/v1/chat/completions").await
}

async fn embeddings(state: State<Arc<AppState>>, req: Request) -> Response {
    proxied(state, req, "/v1/embeddings").await
}

async fn classify(state: State<Arc<AppState>>, req: Request) -> Response {
    proxied(state, req, "/v1/classify").await
}

/// A consumer call to forward. Takes the request whole: the headers are read where they
/// are, not copied.
async fn proxied(
    State(state): State<Arc<AppState>>,
    req: Request,
    endpoint: &'static str,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let request_id = parts
        .extensions
        .remove::<RequestId>()
        .map(|id| id.0)
        .unwrap_or_default();
    match forward_call(&state, request_id, &parts.headers, body, endpoint).await {
        Ok(response) | Err(response) => response,
    }
}

async fn forward_call<B>(
    state: &AppState,
    request_id: String,
    headers: &HeaderMap,
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
        .authenticate(headers)
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
    let call = ProxiedCall::parse(endpoint, bytes).map_err(IntoResponse::into_response)?;
    let model = ModelLabel(call.model.clone());
    let ctx = CallContext {
        request_id,
        caller,
        started_at,
    };
    let mut response = match state.proxy.handle(ctx, call).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    response.extensions_mut().insert(model);
    Ok(response)
}

/// `GET /v1/usage?start=&end=` (Unix seconds; default: the last 31 days): the
/// calling key's tenant's usage per model, and nobody else's. Records reach the store
/// through the spool, so the last fraction of a second may not be counted yet.
async fn own_usage(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    range: Result<Query<UsageRange>, QueryRejection>,
) -> Result<Response, GatewayError> {
    let caller = state.auth.authenticate(&headers).await?;
    let Query(range) =
        range.map_err(|e| GatewayError::bad_request(e.body_text(), Some("start")))?;
    let now = crate::unix_now() as i64;
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
            })
        })
        .collect();
    Ok(
        Json(serde_json::json!({"object": "usage", "start": start, "end": end, "data": data}))
            .into_response(),
    )
}

#[derive(Debug, serde::Deserialize)]
struct UsageRange {
    start: Option<i64>,
    end: Option<i64>,
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
