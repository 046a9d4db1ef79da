//! The pool of inference workers: which are healthy, which models each serves, and which
//! one takes the next request (power of two choices on outstanding requests).
//!
//! A background task polls every worker's `/health` and `/v1/models`; a request that fails
//! to reach a worker marks it unhealthy at once (passive ejection) until the next good poll.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openai_types::ModelList;
use rand::Rng;

pub struct WorkerNode {
    pub base_url: String,
    healthy: AtomicBool,
    outstanding: AtomicUsize,
    models: RwLock<BTreeSet<String>>,
}

impl WorkerNode {
    fn serves(&self, model: &str) -> bool {
        self.models.read().is_ok_and(|m| m.contains(model))
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Passive ejection: stop routing here until a health check says otherwise.
    pub fn eject(&self) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(worker = %self.base_url, "worker ejected after a failed request");
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// A claim on a worker for one request; releases its slot when dropped.
pub struct Lease {
    pub node: Arc<WorkerNode>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.node.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct WorkerPool {
    nodes: Vec<Arc<WorkerNode>>,
    client: reqwest::Client,
}

impl WorkerPool {
    pub fn new(urls: &[String], client: reqwest::Client) -> Arc<Self> {
        let nodes = urls
            .iter()
            .map(|u| {
                Arc::new(WorkerNode {
                    base_url: u.trim_end_matches('/').to_owned(),
                    healthy: AtomicBool::new(false),
                    outstanding: AtomicUsize::new(0),
                    models: RwLock::new(BTreeSet::new()),
                })
            })
            .collect();
        Arc::new(Self { nodes, client })
    }

    pub fn nodes(&self) -> &[Arc<WorkerNode>] {
        &self.nodes
    }

    /// Every model some healthy worker serves.
    pub fn models(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|n| n.is_healthy())
            .filter_map(|n| n.models.read().ok().map(|m| m.clone()))
            .flatten()
            .collect()
    }

    /// Whether any worker, healthy or not, has ever reported `model`.
    pub fn knows(&self, model: &str) -> bool {
        self.nodes.iter().any(|n| n.serves(model))
    }

    /// Picks a healthy worker for `model`, skipping `exclude`: two at random, the less
    /// loaded wins.
    pub fn pick(&self, model: &str, exclude: &[String]) -> Option<Lease> {
        let candidates: Vec<&Arc<WorkerNode>> = self
            .nodes
            .iter()
            .filter(|n| n.is_healthy() && n.serves(model) && !exclude.contains(&n.base_url))
            .collect();
        let node = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            len => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..len)) % len;
                if candidates[a].outstanding() <= candidates[b].outstanding() {
                    candidates[a]
                } else {
                    candidates[b]
                }
            }
        };
        node.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Lease { node: node.clone() })
    }

    /// Polls every worker once.
    pub async fn check_all(&self) {
        let checks = self.nodes.iter().map(|n| self.check(n));
        futures::future::join_all(checks).await;
    }

    async fn check(&self, node: &WorkerNode) {
        let timeout = Duration::from_secs(2);
        let healthy = matches!(
            self.client.get(format!("{}/health", node.base_url)).timeout(timeout).send().await,
            Ok(r) if r.status().is_success()
        );
        if healthy {
            let models = async {
                self.client
                    .get(format!("{}/v1/models", node.base_url))
                    .timeout(timeout)
                    .send()
                    .await?
                    .json::<ModelList>()
                    .await
            }
            .await;
            match models {
                Ok(list) => {
                    if let Ok(mut m) = node.models.write() {
                        *m = list.data.into_iter().map(|m| m.id).collect();
                    }
                }
                Err(e) => {
                    tracing::warn!(worker = %node.base_url, error = %e, "listing models failed");
                    node.healthy.store(false, Ordering::Relaxed);
                    return;
                }
            }
        }
        let was = node.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            tracing::info!(worker = %node.base_url, healthy, "worker health changed");
        }
    }

    /// Runs health checks forever at `interval`.
    pub fn spawn_health_checks(
        self: &Arc<Self>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                pool.check_all().await;
            }
        })
    }
}
