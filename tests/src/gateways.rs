//! Gateways serving inside the test's process, on real ports.
//!
//! Owns: the test configuration of a gateway, starting and stopping it in process, its
//! tenants and keys, and [`Stack`] (worker process, store, gateway and one key together).
//! Must never: start a gateway process (see [`crate::processes`]) or change the gateway's
//! behaviour beyond its configuration.

use std::path::Path;
use std::time::{Duration, Instant};

use gateway::pricing::PriceCache;
use gateway::tenants::{NewKey, TenantStore};
use gateway::GatewayConfig;

use crate::processes::WorkerProcess;
use crate::stores::TempSqlite;

/// The usual stack: a worker process, a fresh SQLite store, an in-process gateway on a
/// real port, and one tenant with a key.
pub struct Stack {
    pub worker: WorkerProcess,
    pub store: TempSqlite,
    pub gateway: RunningGateway,
    pub key: String,
    pub http: reqwest::Client,
}

impl Stack {
    pub async fn start(tenant: &str) -> Self {
        Self::start_with(tenant, |_, _| {}).await
    }

    /// As `start`, letting the test adjust the gateway's configuration first (the second
    /// argument is the test's temporary folder).
    pub async fn start_with(
        tenant: &str,
        configure: impl FnOnce(&mut GatewayConfig, &Path),
    ) -> Self {
        let worker = WorkerProcess::start().await;
        let store = TempSqlite::new();
        let mut config = gateway_config(&store.url, std::slice::from_ref(&worker.url));
        configure(&mut config, store.dir());
        let gateway = RunningGateway::start(config).await;
        let (key, _) = gateway.tenant_with_key(tenant, NewKey::default()).await;
        Self {
            worker,
            store,
            gateway,
            key,
            http: reqwest::Client::new(),
        }
    }

    /// A POST to the gateway with this stack's key and a JSON body.
    pub fn post(&self, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.gateway.url))
            .bearer_auth(&self.key)
            .json(&body)
    }
}

/// Gateway settings for a test: port 0, the given store and workers, a fresh spool folder.
pub fn gateway_config(database_url: &str, workers: &[String]) -> GatewayConfig {
    let spool_dir =
        std::env::temp_dir().join(format!("gw-spool-{}", uuid::Uuid::new_v4().simple()));
    let any_port = "127.0.0.1:0".parse().unwrap();
    GatewayConfig {
        listen: any_port,
        metrics_listen: any_port,
        admin_listen: any_port,
        database_url: database_url.to_owned(),
        spool_dir,
        spool_segment_bytes: 1024 * 1024,
        workers: workers.to_vec(),
        max_body_bytes: 1024 * 1024,
        upstream_timeout_secs: 300,
        health_interval_ms: 200,
        key_cache_ms: 1000,
        shutdown_grace_secs: 5,
        ..GatewayConfig::default()
    }
}

/// A gateway serving in this process on a real port.
pub struct RunningGateway {
    pub url: String,
    pub metrics_url: String,
    /// The admin listener, when the config has a signing secret.
    pub admin_url: Option<String>,
    pub admin_tokens: Option<gateway::admin::TokenAuthority>,
    pub db: billing::Db,
    pub tenants: TenantStore,
    /// The prices this gateway charges by, as it last loaded them.
    pub prices: std::sync::Arc<PriceCache>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningGateway {
    /// A tenant on a plan with `plan` limits and one key narrowed by `key`: the tenant's
    /// id and the key.
    pub async fn tenant_on_plan(
        &self,
        name: &str,
        plan: gateway::limits::Limits,
        key: gateway::limits::Limits,
    ) -> (String, String) {
        self.tenant_on_caching_plan(name, plan, key, None).await
    }

    /// As [`RunningGateway::tenant_on_plan`], the plan with a response cache.
    pub async fn tenant_on_caching_plan(
        &self,
        name: &str,
        plan: gateway::limits::Limits,
        key: gateway::limits::Limits,
        cache: Option<gateway::tenants::ResponseCachePolicy>,
    ) -> (String, String) {
        let tenant = self.tenants.create_tenant(name).await.unwrap();
        let plan = self
            .tenants
            .create_plan(&format!("{name}-plan"), plan, cache)
            .await
            .unwrap();
        self.tenants
            .set_plan(&tenant.id, Some(&plan.id))
            .await
            .unwrap();
        let new_key = NewKey {
            name: "k".into(),
            limits: key,
            ..Default::default()
        };
        let (key, _) = self.tenants.create_key(&tenant.id, &new_key).await.unwrap();
        (tenant.id, key.expose().to_owned())
    }

    pub async fn start(config: GatewayConfig) -> Self {
        // Gateway logs go to the test's output (shown when a test fails); RUST_LOG filters.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let db = billing::Db::connect(&config.database_url).await.unwrap();
        let gateway = gateway::Gateway::build_with_db(&config, db.clone())
            .await
            .unwrap();
        let url = format!("http://{}", gateway.local_addr().unwrap());
        let metrics_url = format!("http://{}/metrics", gateway.metrics_addr().unwrap());
        let admin_url = gateway.admin_addr().map(|a| format!("http://{a}"));
        let admin_tokens = gateway.admin_tokens();
        let tenants = gateway.tenants().clone();
        let prices = gateway.prices().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        Self {
            url,
            metrics_url,
            admin_url,
            admin_tokens,
            db,
            tenants,
            prices,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A new tenant with one key; returns the plaintext key.
    pub async fn tenant_with_key(&self, tenant: &str, new: NewKey) -> (String, String) {
        let t = self.tenants.create_tenant(tenant).await.unwrap();
        let (key, record) = self.tenants.create_key(&t.id, &new).await.unwrap();
        (key.expose().to_owned(), record.id)
    }

    /// Waits (up to 10 s) for the usage record of `request_id` to reach the store.
    pub async fn usage_record(&self, request_id: &str) -> Option<billing::UsageEvent> {
        let ledger = billing::Ledger::new(self.db.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(record) = ledger.get(request_id).await.unwrap() {
                if record.delivery != billing::Delivery::Unknown {
                    return Some(record);
                }
            }
            if Instant::now() > deadline {
                return ledger.get(request_id).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful shutdown; returns when the gateway has drained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}
