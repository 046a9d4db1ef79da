//! The inference worker: runs chat and embedding models with candle on this machine and
//! serves them over an OpenAI-compatible HTTP API.
//!
//! Owns: model loading, tokenization, generation, embeddings, and the worker's HTTP
//! surface. Must never: know about keys, tenants, prices, usage records or databases. It
//! reports token counts; what they cost is someone else's business.

mod chat;
mod completions;
pub mod config;
pub mod embed;
pub mod error;
pub mod http;
pub mod llm;
mod math;
pub mod metrics;
mod responses;
mod sse;

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpListener;

pub use config::WorkerConfig;
use embed::{BatchLimits, EmbeddingModel};
use llm::{ChatModel, EngineLimits};
use metrics::Metrics;

/// Every model this worker serves, by name.
#[derive(Default)]
pub struct ModelSet {
    pub chat: HashMap<String, Arc<ChatModel>>,
    pub embedding: HashMap<String, Arc<EmbeddingModel>>,
}

impl ModelSet {
    /// Loads every configured model; slow (seconds), so run it off the async runtime.
    pub fn load(config: &WorkerConfig, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        let mut set = ModelSet::default();
        let engine = EngineLimits {
            max_active: config.max_active_sequences,
            max_queued: config.max_queued,
            max_context: config.max_context,
            prefix_cache_bytes: config.prefix_cache_bytes,
        };
        // `--cpu-kernels` below AVX-512 also keeps the chat kernels off VNNI.
        llm::allow_vnni(matches!(
            config.cpu_kernels,
            config::CpuKernels::Auto | config::CpuKernels::Avx512
        ));
        for spec in &config.chat_models {
            let (name, path) = config::named_path(spec);
            tracing::info!(model = %name, path = %path.display(), "loading chat model");
            let model = ChatModel::load(name.clone(), &path, engine, metrics.clone())?;
            set.chat.insert(name, model);
        }
        let batch = BatchLimits {
            max_batch: config.embed_max_batch,
            max_queued: config.max_queued,
            kernel: embed::Kernel::choose(config.cpu_kernels)?,
        };
        for spec in &config.embedding_models {
            let (name, path) = config::named_path(spec);
            tracing::info!(model = %name, path = %path.display(), "loading embedding model");
            let model = EmbeddingModel::load(name.clone(), &path, batch, metrics.clone())?;
            set.embedding.insert(name, model);
        }
        Ok(set)
    }
}

/// Shared state of the HTTP handlers. `models` is empty until loading finishes, which is
/// what `/health` reports.
pub struct AppState {
    pub models: OnceLock<ModelSet>,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    pub started_at: u64,
}

/// A bound, not yet serving, worker.
pub struct Worker {
    listener: TcpListener,
    state: Arc<AppState>,
    config: WorkerConfig,
}

impl Worker {
    /// Binds the listener; models load once `run` starts, so `/health` answers 503 meanwhile.
    pub async fn build(config: WorkerConfig) -> anyhow::Result<Self> {
        if let Some(threads) = config.threads {
            // The global rayon pool (and with it the models' own pools, candle's CPU kernels
            // and gemm) take their size from this variable.
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
        let listener = TcpListener::bind(config.listen).await?;
        let state = Arc::new(AppState {
            models: OnceLock::new(),
            metrics: Arc::new(Metrics::new()?),
            max_body_bytes: config.max_body_bytes,
            started_at: unix_now(),
        });
        Ok(Self {
            listener,
            state,
            config,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Loads the models in the background and serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let config = self.config.clone();
        let loader = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let set = ModelSet::load(&config, &state.metrics)?;
            let _ = state.models.set(set);
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "models loaded; ready"
            );
            anyhow::Ok(())
        });
        let app = http::router(self.state.clone());
        let mut server = tokio::spawn(
            axum::serve(self.listener, app)
                .with_graceful_shutdown(shutdown)
                .into_future(),
        );
        tokio::select! {
            served = &mut server => return Ok(served??),
            loaded = loader => {
                // A model that fails to load is fatal: a worker that can never become
                // healthy should exit, not linger.
                if let Err(e) = loaded.map_err(anyhow::Error::from).and_then(|r| r) {
                    server.abort();
                    return Err(e);
                }
            }
        }
        Ok(server.await??)
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
