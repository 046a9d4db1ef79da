//! The composition root: the gateway built from its configuration, served, and stopped.
//!
//! Owns: binding the three listeners, handing each part to what uses it, and the order of
//! a stop (stop accepting, drain, flush the spool, settle reservations, stop the shipper,
//! close the store). Must never: hold request-path logic, or stop the shipper before the
//! spool is flushed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use billing::Db;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{AdminState, TokenAuthority};
use crate::config::GatewayConfig;
use crate::consumer::{ConsumerService, ConsumerState};
use crate::listener::{self, ServeOptions, ServingThreads};
use crate::pricing::PriceCache;
use crate::proxy::{Proxy, UpstreamTimeouts};
use crate::tenants::TenantStore;
use crate::upstream::Upstream;

mod background;
mod parts;

use background::{Background, Intervals};
use parts::Parts;

/// How long a worker connection may take to open.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle kept connection to a worker is closed after this.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a stop waits to settle this replica's reservations in the store.
const SETTLE_AT_STOP: Duration = Duration::from_secs(5);

pub struct Gateway {
    listener: TcpListener,
    metrics_listener: TcpListener,
    /// The admin API and dashboard, when a signing secret is configured.
    admin: Option<(TcpListener, Arc<AdminState>)>,
    consumer: Arc<ConsumerState>,
    parts: Parts,
    intervals: Intervals,
    shutdown_pause: Duration,
    batches: crate::batches::runner::RunnerSettings,
    serve_options: ServeOptions,
    admin_serve_options: ServeOptions,
}

impl Gateway {
    /// Connects the store (running migrations, or with `--skip-migrations` checking that
    /// they have run), binds the listeners, and checks the workers once.
    pub async fn build(config: &GatewayConfig) -> anyhow::Result<Self> {
        let db = match config.skip_migrations {
            false => Db::connect(&config.database_url).await?,
            true => Db::connect_migrated(&config.database_url).await?,
        };
        Self::build_with_db(config, db).await
    }

    pub async fn build_with_db(config: &GatewayConfig, db: Db) -> anyhow::Result<Self> {
        let threads = ServingThreads::start(match config.serving_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        })?;
        let parts = Parts::build(config, db).await?;
        let consumer = Arc::new(consumer_state(config, &parts, threads.len()));
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(listener::tls_acceptor(cert, key)?),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        // The admin API is served as the consumer API is (TLS included), on this runtime.
        let admin_serve_options = listener_options(config, &parts, "admin", tls.clone(), None);
        let serve_options = listener_options(config, &parts, "consumer", tls, Some(threads));
        let admin = match config.admin_secret()? {
            Some(secret) => {
                let admin_state = Arc::new(AdminState {
                    tokens: TokenAuthority::new(&secret)
                        .with_max_lifetime(config.admin_token_max_lifetime_secs),
                    db: parts.db.clone(),
                    tenants: parts.tenants.clone(),
                    pool: parts.pool.clone(),
                    metrics: parts.metrics.clone(),
                    response_cache: parts.response_cache.clone(),
                });
                Some((TcpListener::bind(config.admin_listen).await?, admin_state))
            }
            None => {
                tracing::info!("no admin signing secret: the admin API and dashboard are off");
                None
            }
        };
        Ok(Self {
            listener: TcpListener::bind(config.listen).await?,
            metrics_listener: TcpListener::bind(config.metrics_listen).await?,
            admin,
            consumer,
            parts,
            intervals: Intervals::of(config),
            shutdown_pause: Duration::from_millis(config.shutdown_pause_ms),
            batches: crate::batches::runner::RunnerSettings {
                concurrency: config.batch_concurrency,
                idle_below: config.batch_idle_below,
                poll: Duration::from_millis(config.batch_poll_ms.max(1)),
                lease: Duration::from_millis(config.batch_lease_ms.clamp(1_000, 3_600_000)),
            },
            serve_options,
            admin_serve_options,
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

    /// Tenants, plans and keys in this gateway's store.
    pub fn tenants(&self) -> &TenantStore {
        &self.parts.tenants
    }

    /// The price book admission reads.
    pub fn prices(&self) -> &Arc<PriceCache> {
        &self.parts.prices
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests
    /// finish (up to the grace period), makes their usage durable and closes the store.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let background = Background::start(&self.parts, self.intervals, self.metrics_listener);
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let admin_server = self.admin.map(|(admin_listener, admin_state)| {
            tokio::spawn(listener::serve(
                admin_listener,
                TowerToHyperService::new(crate::admin::router(admin_state)),
                self.admin_serve_options,
                stop_rx.clone(),
            ))
        });
        let batch_runner = (self.batches.concurrency > 0).then(|| {
            let runner = Arc::new(crate::batches::runner::Runner::new(
                crate::batches::BatchStore::new(self.parts.db.clone()),
                self.consumer.clone(),
                self.batches,
                format!("gw_{}", uuid::Uuid::now_v7().simple()),
            ));
            tokio::spawn(runner.run(stop_rx.clone()))
        });
        let threads = self.serve_options.threads.clone();
        listener::serve(
            self.listener,
            ConsumerService::new(self.consumer),
            self.serve_options,
            stop_rx,
        )
        .await;
        if let Some(admin_server) = admin_server {
            let _ = admin_server.await;
        }
        // Batch lines in flight finish (within the listeners' grace) and record their usage.
        if let Some(runner) = batch_runner {
            let grace = Duration::from_secs(5);
            if tokio::time::timeout(grace, runner).await.is_err() {
                tracing::warn!("batch lines still running at shutdown; their leases will lapse and they run again");
            }
        }
        background.stop();
        // Streams whose clients left spool their usage from spawned tasks; let them run.
        tokio::time::sleep(self.shutdown_pause).await;
        let parts = self.parts;
        if let Err(e) = parts.spool.flush().await {
            tracing::error!(error = %e, "flushing the usage spool failed");
        }
        // Settle what finished, so this replica's reservations do not wait to expire.
        if tokio::time::timeout(SETTLE_AT_STOP, parts.admission.flush())
            .await
            .is_err()
        {
            tracing::warn!("settling reservations at shutdown timed out; they will expire");
        }
        parts.shipper.stop().await;
        parts.db.close().await;
        // Last: anything a serving thread's event loop still drives is done with.
        if let Some(threads) = threads {
            threads.stop();
        }
        Ok(())
    }
}

/// How a listener serves connections: the configured deadlines and caps, and its own
/// series of the connection metrics.
fn listener_options(
    config: &GatewayConfig,
    parts: &Parts,
    listener: &str,
    tls: Option<tokio_rustls::TlsAcceptor>,
    threads: Option<Arc<ServingThreads>>,
) -> ServeOptions {
    ServeOptions {
        header_timeout: Duration::from_secs(config.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(config.idle_timeout_secs),
        http2_keepalive: Duration::from_secs(config.http2_keepalive_interval_secs),
        max_connections: config.max_connections,
        http2_max_concurrent_streams: config.http2_max_concurrent_streams,
        max_header_list_bytes: config.max_header_list_bytes,
        open_connections: parts
            .metrics
            .open_connections
            .with_label_values(&[listener]),
        refused_connections: parts
            .metrics
            .refused_connections
            .with_label_values(&[listener]),
        grace: Duration::from_secs(config.shutdown_grace_secs),
        tls,
        threads,
    }
}

/// The consumer API's state: forwarding with one set of worker connections per serving
/// thread (and one for any other thread).
fn consumer_state(config: &GatewayConfig, parts: &Parts, threads: usize) -> ConsumerState {
    let proxy = Proxy {
        pool: parts.pool.clone(),
        upstreams: (0..=threads)
            .map(|_| Upstream::new(UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_IDLE_TIMEOUT))
            .collect(),
        spool: parts.spool.clone(),
        timeouts: UpstreamTimeouts {
            first_byte_timeout: Duration::from_secs(config.upstream_first_byte_timeout_secs),
            total_timeout: Duration::from_secs(config.upstream_timeout_secs),
            max_attempts: config.upstream_max_attempts,
        },
        metrics: parts.metrics.clone(),
        admission: parts.admission.clone(),
        prices: parts.prices.clone(),
        default_completion_reserve: config.default_completion_reserve,
        affinity_slack: (!config.no_prefix_affinity).then_some(config.prefix_affinity_slack),
        response_cache: parts.response_cache.clone(),
    };
    ConsumerState {
        auth: parts.auth.clone(),
        proxy,
        pool: parts.pool.clone(),
        tenants: parts.tenants.clone(),
        max_body_bytes: config.max_body_bytes,
        body_timeout: Duration::from_secs(config.body_read_timeout_secs),
        started_at: (billing::now_ms() / 1000) as u64,
        metrics: parts.metrics.clone(),
        store_runtime: tokio::runtime::Handle::current(),
        classifiers: moka::sync::Cache::builder()
            .max_capacity(1_000)
            .time_to_live(Duration::from_secs(10))
            .build(),
    }
}
