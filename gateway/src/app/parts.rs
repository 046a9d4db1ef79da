//! The gateway's long-lived parts, built side by side from its configuration.
//!
//! Owns: making each part (store, worker pool, admission, price cache, spool, shipper,
//! metrics, tenants, the key authenticator) once, in the order their dependencies need. Must never: start a
//! background task (the task list does) or reach one part through another.

use std::sync::Arc;
use std::time::Duration;

use billing::{Db, Ledger, Shipper, ShipperHandle, Spool};

use crate::auth::{AuthSettings, Authenticator};
use crate::config::GatewayConfig;
use crate::limits::Admission;
use crate::metrics::GatewayMetrics;
use crate::pool::WorkerPool;
use crate::pricing::PriceCache;
use crate::response_cache::ResponseCache;
use crate::tenants::TenantStore;

/// How long the health checker waits to connect to a worker.
const HEALTH_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle health-check connections are closed after this.
const HEALTH_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the shipper waits for a call's delivery outcome before storing it as unknown.
const OUTCOME_WAIT: Duration = Duration::from_secs(30);
/// A reservation outlives its request's longest possible run by this much before any
/// replica may release it.
const RESERVATION_SLACK: Duration = Duration::from_secs(60);

pub struct Parts {
    pub db: Db,
    pub pool: Arc<WorkerPool>,
    pub tenants: TenantStore,
    pub auth: Arc<Authenticator>,
    pub spool: Spool,
    pub shipper: ShipperHandle,
    pub metrics: Arc<GatewayMetrics>,
    pub admission: Arc<Admission>,
    pub prices: Arc<PriceCache>,
    pub response_cache: Option<Arc<ResponseCache>>,
}

impl Parts {
    /// Every part, the workers checked once so the first requests find them.
    pub async fn build(config: &GatewayConfig, db: Db) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(HEALTH_CONNECT_TIMEOUT)
            .pool_idle_timeout(HEALTH_IDLE_TIMEOUT)
            .build()?;
        let pool = WorkerPool::new(&config.workers, client);
        pool.check_all().await;
        let spool = open_spool(config)?;
        let shipper = if Db::is_in_memory(&config.database_url) {
            Shipper::new(&spool, Ledger::new(db.clone()), OUTCOME_WAIT).spawn()
        } else {
            Shipper::spawn_dedicated(&spool, &config.database_url, OUTCOME_WAIT)?
        };
        let metrics = Arc::new(GatewayMetrics::new()?);
        let admission = Admission::new(
            db.clone(),
            metrics.clone(),
            Duration::from_secs(config.upstream_timeout_secs) + RESERVATION_SLACK,
            config.on_store_error(),
        );
        let prices = PriceCache::load(&db).await?;
        let response_cache = match config.response_cache_bytes {
            0 => None,
            bytes => Some(Arc::new(ResponseCache::new(
                bytes,
                config.response_cache_redis.as_deref(),
                &metrics.registry,
            )?)),
        };
        let tenants = TenantStore::new(db.clone());
        Ok(Self {
            auth: Arc::new(Authenticator::new(tenants.clone(), auth_settings(config))),
            tenants,
            db,
            pool,
            spool,
            shipper,
            metrics,
            admission,
            prices,
            response_cache,
        })
    }
}

fn auth_settings(config: &GatewayConfig) -> AuthSettings {
    AuthSettings {
        ttl: Duration::from_millis(config.key_cache_ms),
        missing_ttl: Duration::from_millis(config.key_missing_cache_ms),
        cache_capacity: config.key_cache_capacity,
        failures_per_minute: config.auth_failures_per_minute,
        failure_burst: config.auth_failure_burst,
        failure_addresses: config.auth_failure_addresses,
    }
}

/// The usage spool as configured, or one that records nothing in benchmark mode.
fn open_spool(config: &GatewayConfig) -> anyhow::Result<Spool> {
    if config.benchmark_unmetered {
        tracing::warn!("benchmark mode: usage is NOT recorded; never serve customers like this");
        std::fs::create_dir_all(&config.spool_dir)?;
        return Ok(Spool::discarding(&config.spool_dir));
    }
    Ok(Spool::open_with(
        &config.spool_dir,
        billing::SpoolOptions {
            segment_bytes: config.spool_segment_bytes,
            max_linger: Duration::from_micros(config.spool_max_linger_us),
            fsync_interval: Duration::from_millis(config.spool_fsync_interval_ms),
        },
    )?)
}
