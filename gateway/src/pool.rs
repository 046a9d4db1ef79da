//! The pool of inference workers: which are healthy, which models each serves, and which
//! one takes the next request (power of two choices on outstanding requests).
//!
//! A background task polls every worker's `/health` and `/v1/models`; a request that fails
//! to reach a worker marks it unhealthy at once (passive ejection) until the next good poll.
//! Each model's `context_length`, where its workers state it, is the most tokens a call to
//! it can use: admission's bound for a chat call.
//!
//! Workers are listed as base URLs, or discovered by DNS: `dns+http://name:port` stands for
//! every address `name` resolves to (a Kubernetes headless service), re-resolved before
//! each round of health checks; workers that leave the answer leave the pool.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openai_types::ModelList;
use rand::Rng;

pub struct WorkerNode {
    pub base_url: String,
    /// Where each consumer endpoint is on the worker, parsed once.
    targets: Vec<(&'static str, Target)>,
    healthy: AtomicBool,
    outstanding: AtomicUsize,
    /// Each model it serves, with the context length it states (`None`: not stated) and
    /// what it does.
    models: RwLock<BTreeMap<String, ModelFacts>>,
}

/// A worker's rank for a prompt's affinity hash: the highest wins.
fn rendezvous(key: u64, worker: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    worker.hash(&mut h);
    h.finish()
}

/// What a worker states of a model it serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelFacts {
    pub context_length: Option<u64>,
    /// `chat` or `embedding`, where stated.
    pub kind: Option<String>,
}

/// The endpoints consumer calls are forwarded to.
pub const FORWARDED: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/classify",
];

/// Where a request for one endpoint goes on a worker, as an HTTP/1.1 connection needs it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The worker's `host:port`: which connections to use.
    pub authority: hyper::http::uri::Authority,
    /// The request target in origin form (`/v1/...`).
    pub path: hyper::Uri,
    /// The `Host` header.
    pub host: hyper::header::HeaderValue,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err("workers are reached over plain http://".into());
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| "no host in the worker address".to_owned())?;
        let path = uri
            .path_and_query()
            .map_or_else(|| hyper::Uri::from_static("/"), |p| p.clone().into());
        let host =
            hyper::header::HeaderValue::from_str(authority.as_str()).map_err(|e| format!("{e}"))?;
        Ok(Self {
            authority,
            path,
            host,
        })
    }
}

impl WorkerNode {
    /// Where `endpoint` is on this worker.
    pub fn target(&self, endpoint: &str) -> Result<Target, String> {
        match self.targets.iter().find(|(e, _)| *e == endpoint) {
            Some((_, target)) => Ok(target.clone()),
            None => Target::parse(&format!("{}{endpoint}", self.base_url)),
        }
    }

    fn serves(&self, model: &str) -> bool {
        self.models.read().is_ok_and(|m| m.contains_key(model))
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

    /// The models it reported at its last health check.
    pub fn served_models(&self) -> Vec<String> {
        self.models
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// One of a worker's in-flight slots, held by one request; given back when dropped.
pub struct WorkerSlot {
    pub node: Arc<WorkerNode>,
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        self.node.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where workers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Static(String),
    /// Every address of `host`, as `scheme://addr:port`.
    Dns {
        scheme: String,
        host: String,
        port: u16,
    },
}

impl Source {
    fn parse(url: &str) -> Self {
        let url = url.trim_end_matches('/');
        if let Some(rest) = url.strip_prefix("dns+") {
            if let Some((scheme, authority)) = rest.split_once("://") {
                if let Some((host, port)) = authority.rsplit_once(':') {
                    if let Ok(port) = port.parse() {
                        return Self::Dns {
                            scheme: scheme.to_owned(),
                            host: host.to_owned(),
                            port,
                        };
                    }
                }
            }
        }
        Self::Static(url.to_owned())
    }
}

pub struct WorkerPool {
    sources: Vec<Source>,
    nodes: RwLock<Vec<Arc<WorkerNode>>>,
    client: reqwest::Client,
}

fn node(base_url: String) -> Arc<WorkerNode> {
    let targets = FORWARDED
        .iter()
        .filter_map(|e| Some((*e, Target::parse(&format!("{base_url}{e}")).ok()?)))
        .collect();
    Arc::new(WorkerNode {
        base_url,
        targets,
        healthy: AtomicBool::new(false),
        outstanding: AtomicUsize::new(0),
        models: RwLock::new(BTreeMap::new()),
    })
}

impl WorkerPool {
    pub fn new(urls: &[String], client: reqwest::Client) -> Arc<Self> {
        let sources: Vec<Source> = urls.iter().map(|u| Source::parse(u)).collect();
        let nodes = sources
            .iter()
            .filter_map(|s| match s {
                Source::Static(url) => Some(node(url.clone())),
                Source::Dns { .. } => None,
            })
            .collect();
        Arc::new(Self {
            sources,
            nodes: RwLock::new(nodes),
            client,
        })
    }

    pub fn nodes(&self) -> Vec<Arc<WorkerNode>> {
        self.nodes.read().map(|n| n.clone()).unwrap_or_default()
    }

    /// Re-resolves DNS sources; keeps the state of workers still listed.
    async fn discover(&self) {
        let mut wanted: Vec<String> = Vec::new();
        for source in &self.sources {
            match source {
                Source::Static(url) => wanted.push(url.clone()),
                Source::Dns { scheme, host, port } => {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(addrs) => {
                            for addr in addrs {
                                wanted.push(format!("{scheme}://{addr}"));
                            }
                        }
                        Err(e) => {
                            // Keep what we had: a DNS hiccup should not empty the pool.
                            tracing::warn!(%host, error = %e, "resolving workers failed");
                            let prefix = format!("{scheme}://");
                            for n in self.nodes() {
                                if n.base_url.starts_with(&prefix) {
                                    wanted.push(n.base_url.clone());
                                }
                            }
                        }
                    }
                }
            }
        }
        wanted.sort();
        wanted.dedup();
        let current = self.nodes();
        let next: Vec<Arc<WorkerNode>> = wanted
            .into_iter()
            .map(|url| {
                current
                    .iter()
                    .find(|n| n.base_url == url)
                    .cloned()
                    .unwrap_or_else(|| {
                        tracing::info!(worker = %url, "worker discovered");
                        node(url)
                    })
            })
            .collect();
        if let Ok(mut nodes) = self.nodes.write() {
            *nodes = next;
        }
    }

    /// Every model some healthy worker serves.
    pub fn models(&self) -> BTreeSet<String> {
        self.nodes()
            .iter()
            .filter(|n| n.is_healthy())
            .filter_map(|n| {
                n.models
                    .read()
                    .ok()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>())
            })
            .flatten()
            .collect()
    }

    /// The most tokens a call to `model` can use, prompt and completion together: the
    /// largest context length its workers (healthy or not) state, or `None` if any of them
    /// states none.
    pub fn context_length(&self, model: &str) -> Option<u64> {
        let mut longest = None;
        for node in self.nodes() {
            let Ok(models) = node.models.read() else {
                return None;
            };
            match models.get(model).map(|f| f.context_length) {
                None => {}
                Some(None) => return None,
                Some(Some(n)) => longest = longest.max(Some(n)),
            }
        }
        longest
    }

    /// What the workers state of `model`: its context length as [`Self::context_length`]
    /// gives it, and its kind; `None` if no healthy worker serves it.
    pub fn facts(&self, model: &str) -> Option<ModelFacts> {
        let kind = self
            .nodes()
            .iter()
            .filter(|n| n.is_healthy())
            .find_map(|n| n.models.read().ok()?.get(model).cloned())?
            .kind;
        Some(ModelFacts {
            context_length: self.context_length(model),
            kind,
        })
    }

    /// Whether any worker, healthy or not, has ever reported `model`.
    pub fn knows(&self, model: &str) -> bool {
        self.nodes().iter().any(|n| n.serves(model))
    }

    /// Picks a healthy worker for `model`, skipping `exclude`. With an `affinity` (a hash of
    /// where the prompt begins), the worker that hash ranks first (rendezvous hashing, so
    /// workers coming and going move few prompts), where its prompt's start is likely
    /// cached, unless it has more than `affinity_slack` calls in flight beyond the least
    /// loaded; otherwise two at random, the less loaded wins.
    pub fn pick(
        &self,
        model: &str,
        exclude: &[String],
        affinity: Option<u64>,
        affinity_slack: usize,
    ) -> Option<WorkerSlot> {
        let nodes = self.nodes();
        let candidates: Vec<&Arc<WorkerNode>> = nodes
            .iter()
            .filter(|n| n.is_healthy() && n.serves(model) && !exclude.contains(&n.base_url))
            .collect();
        let preferred = affinity.and_then(|key| {
            let least = candidates.iter().map(|n| n.outstanding()).min()?;
            candidates
                .iter()
                .max_by_key(|n| rendezvous(key, &n.base_url))
                .filter(|n| n.outstanding() <= least + affinity_slack)
        });
        let node = match (preferred, candidates.len()) {
            (Some(n), _) => n,
            (None, 0) => return None,
            (None, 1) => candidates[0],
            (None, len) => {
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
        Some(WorkerSlot { node: node.clone() })
    }

    /// Polls every worker once.
    pub async fn check_all(&self) {
        if self.sources.iter().any(|s| matches!(s, Source::Dns { .. })) {
            self.discover().await;
        }
        let nodes = self.nodes();
        let checks = nodes.iter().map(|n| self.check(n));
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
                        *m = list
                            .data
                            .into_iter()
                            .map(|m| {
                                let facts = ModelFacts {
                                    context_length: m.context_length,
                                    kind: m.kind,
                                };
                                (m.id, facts)
                            })
                            .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_urls_or_dns_names() {
        assert_eq!(
            Source::parse("http://10.0.0.1:8081/"),
            Source::Static("http://10.0.0.1:8081".into())
        );
        assert_eq!(
            Source::parse("dns+http://workers.ns.svc:8081"),
            Source::Dns {
                scheme: "http".into(),
                host: "workers.ns.svc".into(),
                port: 8081
            }
        );
    }

    /// A pool of healthy workers serving model `m`, without polling.
    fn pool_of(n: usize) -> Arc<WorkerPool> {
        let urls: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 9000 + i))
            .collect();
        let pool = WorkerPool::new(&urls, reqwest::Client::new());
        for node in pool.nodes() {
            node.healthy.store(true, Ordering::Relaxed);
            if let Ok(mut m) = node.models.write() {
                m.insert("m".into(), ModelFacts::default());
            }
        }
        pool
    }

    #[test]
    fn an_affinity_goes_to_one_worker_until_it_is_loaded_past_the_slack() {
        let pool = pool_of(4);
        let mut chosen = std::collections::BTreeSet::new();
        for key in 0..64u64 {
            let first = pool
                .pick("m", &[], Some(key), 2)
                .unwrap()
                .node
                .base_url
                .clone();
            for _ in 0..5 {
                let again = pool.pick("m", &[], Some(key), 2).unwrap();
                assert_eq!(again.node.base_url, first, "key {key} moved");
            }
            chosen.insert(first);
        }
        // Keys spread over the workers.
        assert_eq!(chosen.len(), 4);
        // Loaded past the slack, the preferred worker gives way; excluded, another is taken.
        let preferred = pool.pick("m", &[], Some(7), 2).unwrap();
        let held: Vec<WorkerSlot> = (0..2)
            .map(|_| pool.pick("m", &[], Some(7), 2).unwrap())
            .collect();
        assert!(held
            .iter()
            .all(|s| s.node.base_url == preferred.node.base_url));
        let elsewhere = pool.pick("m", &[], Some(7), 2).unwrap();
        assert_ne!(elsewhere.node.base_url, preferred.node.base_url);
        let excluded = pool
            .pick(
                "m",
                std::slice::from_ref(&preferred.node.base_url),
                Some(7),
                100,
            )
            .unwrap();
        assert_ne!(excluded.node.base_url, preferred.node.base_url);
    }
}
