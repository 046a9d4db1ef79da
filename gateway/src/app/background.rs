//! The gateway's background tasks, started from one list and stopped together.
//!
//! Owns: worker health checks, the expired-reservation sweeper, the price refresh, the
//! usage table's partitions, the key revocation sync, and the `/metrics` listener, each at the interval the
//! configuration gives. Must never: serve a consumer request, or hold anything that is
//! lost when a task is aborted (every task may stop at any await).

use std::future::IntoFuture;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use billing::{Db, ShipperStats, Spool};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::parts::Parts;
use crate::config::GatewayConfig;
use crate::metrics::{GatewayMetrics, LiveStats, WorkerStats};
use crate::pool::WorkerPool;

/// How often each background task runs.
#[derive(Debug, Clone, Copy)]
pub struct Intervals {
    pub health: Duration,
    pub sweep: Duration,
    pub price_refresh: Duration,
    pub partitions: Duration,
    pub key_sync: Duration,
}

impl Intervals {
    pub fn of(config: &GatewayConfig) -> Self {
        Self {
            health: Duration::from_millis(config.health_interval_ms),
            sweep: Duration::from_millis(config.sweep_interval_ms),
            price_refresh: Duration::from_millis(config.price_refresh_ms),
            partitions: Duration::from_secs(config.partition_interval_secs),
            key_sync: Duration::from_millis(config.key_revocation_sync_ms),
        }
    }
}

/// The running tasks.
pub struct Background(Vec<JoinHandle<()>>);

impl Background {
    pub fn start(parts: &Parts, every: Intervals, metrics_listener: TcpListener) -> Self {
        let scrape = Scrape {
            metrics: parts.metrics.clone(),
            pool: parts.pool.clone(),
            shipper: parts.shipper.stats.clone(),
            spool: parts.spool.clone(),
        };
        Self(vec![
            parts.pool.spawn_health_checks(every.health),
            parts.admission.spawn_sweeper(parts.db.clone(), every.sweep),
            parts
                .prices
                .spawn_refresh(parts.db.clone(), every.price_refresh),
            spawn_partitions(parts.db.clone(), every.partitions),
            parts.auth.spawn_maintenance(every.key_sync),
            spawn_metrics_server(metrics_listener, scrape),
            spawn_trainer(parts),
        ])
    }

    pub fn stop(self) {
        for task in self.0 {
            task.abort();
        }
    }
}

/// Trains classifiers waiting in the store (see `classifiers::jobs`).
fn spawn_trainer(parts: &Parts) -> JoinHandle<()> {
    let trainer = Arc::new(crate::classifiers::jobs::Trainer {
        store: crate::classifiers::ClassifierStore::new(parts.db.clone()),
        pool: parts.pool.clone(),
        http: reqwest::Client::new(),
        spool: parts.spool.clone(),
        owner: format!("gw_{}", uuid::Uuid::now_v7().simple()),
    });
    tokio::spawn(trainer.run())
}

/// Makes the usage table's next months' partitions every `every` (the store made them
/// at connect).
fn spawn_partitions(db: Db, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = db.ensure_partitions().await {
                tracing::warn!(error = %e, "making the usage table's next partitions failed");
            }
        }
    })
}

/// What `/metrics` reads besides the registry.
#[derive(Clone)]
struct Scrape {
    metrics: Arc<GatewayMetrics>,
    pool: Arc<WorkerPool>,
    shipper: Arc<ShipperStats>,
    spool: Spool,
}

fn spawn_metrics_server(listener: TcpListener, scrape: Scrape) -> JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(scrape);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).into_future().await {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    })
}

async fn render_metrics(State(scrape): State<Scrape>) -> Response {
    let spool = scrape.spool.stats();
    let live = LiveStats {
        workers: scrape
            .pool
            .nodes()
            .iter()
            .map(|node| WorkerStats {
                base_url: node.base_url.clone(),
                healthy: node.is_healthy(),
                outstanding: node.outstanding(),
            })
            .collect(),
        spool_backlog: scrape.shipper.backlog.load(Ordering::Relaxed),
        usage_shipped: scrape.shipper.shipped.load(Ordering::Relaxed),
        usage_ship_failures: scrape.shipper.failures.load(Ordering::Relaxed),
        spool_durable_appends: spool.durable_appends,
        spool_fsyncs: spool.fsyncs,
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        scrape.metrics.render_live(&live),
    )
        .into_response()
}
