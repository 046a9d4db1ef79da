//! Training in the background: each replica trains one classifier at a time, under a lease
//! in the store, so a tenant has at most one in training across replicas and a replica
//! that dies leaves its work to another; the arithmetic runs on a thread below the serving
//! threads' priority, and examples are embedded one batch at a time (one worker slot).
//!
//! Owns: leasing, embedding the examples through the worker pool, billing those tokens
//! (one usage record per batch, keyed by classifier and batch, so a retried batch is never
//! billed twice), and finishing with a head or an error. Must never: hold a lease it can no
//! longer renew, or bill an example twice in one pass.

use std::sync::Arc;
use std::time::Duration;

use billing::{now_ms, Delivery, Spool, UsageEvent, UsageStatus};
use tokio::sync::watch;

use super::store::{ClassifierStore, Job, Progress};
use super::train::{self, Dataset};
use crate::pool::WorkerPool;

/// Texts per embedding call.
const BATCH: usize = 64;
/// How long a lease lasts without renewal; renewed every batch and every second of training.
const LEASE_MS: i64 = 30_000;
/// How often an idle replica looks for classifiers to train.
const POLL: Duration = Duration::from_secs(1);
/// Niceness of the training thread: serving threads (0) get the CPU first.
const NICENESS: i32 = 10;
/// Tries of one batch (on other workers) before training fails.
const ATTEMPTS: usize = 3;

pub struct Trainer {
    pub store: ClassifierStore,
    pub pool: Arc<WorkerPool>,
    pub http: reqwest::Client,
    pub spool: Spool,
    /// This replica's name on leases.
    pub owner: String,
}

impl Trainer {
    /// Trains whatever is waiting, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            match self.store.lease_next(&self.owner, LEASE_MS).await {
                Ok(Some(job)) => {
                    let id = job.id.clone();
                    if let Err(e) = self.train(job).await {
                        tracing::warn!(classifier = %id, error = %e, "training stopped");
                    }
                }
                Ok(None) => tokio::time::sleep(POLL).await,
                Err(e) => {
                    tracing::warn!(error = %e, "classifier store unreachable");
                    tokio::time::sleep(POLL * 5).await;
                }
            }
        }
    }

    async fn train(&self, job: Job) -> anyhow::Result<()> {
        let total = job.examples.len();
        let (mut vectors, mut tokens) = (Vec::with_capacity(total), 0i64);
        for (n, batch) in job.examples.chunks(BATCH).enumerate() {
            let progress = Progress {
                phase: "embedding".into(),
                done: n * BATCH,
                total,
            };
            if !self
                .store
                .renew(&job.id, &self.owner, LEASE_MS, &progress)
                .await?
            {
                return Ok(()); // deleted, or another replica has it
            }
            let texts: Vec<&str> = batch.iter().map(|e| e.text.as_str()).collect();
            let (embedded, used) = match self.embed(&job.model, &texts).await {
                Ok(v) => v,
                Err(e) => {
                    let message = format!("embedding the examples failed: {e}");
                    self.store
                        .finish(&job.id, &self.owner, Err(&message), tokens)
                        .await?;
                    return Ok(());
                }
            };
            self.bill(&job, n, used).await?;
            tokens += used;
            vectors.extend(embedded);
        }
        let index = |label: &str| job.labels.iter().position(|l| l == label).unwrap_or(0);
        let data = Dataset {
            y: job.examples.iter().map(|e| index(&e.label)).collect(),
            texts: job.examples.iter().map(|e| e.text.clone()).collect(),
            x: vectors,
            classes: job.labels.len(),
        };
        let (progress_tx, mut progress_rx) = watch::channel((0usize, 0usize, 0usize));
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        let (labels, options) = (job.labels.clone(), job.options.clone());
        std::thread::Builder::new()
            .name("classifier-training".into())
            .spawn(move || {
                // Linux keeps niceness per thread.
                let _ = rustix::process::setpriority_process(None, NICENESS);
                let result = train::train(&data, &labels, &options, &mut |which, e, max| {
                    let _ = progress_tx.send((which, e, max));
                });
                let _ = done_tx.send(result);
            })?;
        let heads = train::candidates(&job.options).len();
        let (head, metrics) = loop {
            tokio::select! {
                result = &mut done_rx => break result?,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let (which, epoch, max) = *progress_rx.borrow_and_update();
                    // Candidates count alike, each in thousandths of its steps.
                    let progress = Progress {
                        phase: "training".into(),
                        done: which * 1000 + 1000 * epoch / max.max(1),
                        total: heads * 1000,
                    };
                    if !self.store.renew(&job.id, &self.owner, LEASE_MS, &progress).await? {
                        return Ok(()); // the thread finishes on its own; its result is dropped
                    }
                }
            }
        };
        self.store
            .finish(&job.id, &self.owner, Ok((&head, &metrics)), tokens)
            .await?;
        tracing::info!(classifier = %job.id, accuracy = metrics.accuracy, macro_f1 = metrics.macro_f1, architecture = %metrics.architecture, "classifier trained");
        Ok(())
    }

    /// Embeddings of `texts` and the tokens they took, from a worker serving `model`.
    async fn embed(&self, model: &str, texts: &[&str]) -> anyhow::Result<(Vec<Vec<f32>>, i64)> {
        #[derive(serde::Deserialize)]
        struct Reply {
            data: Vec<Item>,
            usage: Usage,
        }
        #[derive(serde::Deserialize)]
        struct Item {
            embedding: Vec<f32>,
        }
        #[derive(serde::Deserialize)]
        struct Usage {
            prompt_tokens: i64,
        }
        let mut tried = Vec::new();
        let mut last = anyhow::anyhow!("no healthy worker serves {model}");
        while tried.len() < ATTEMPTS {
            let Some(slot) = self.pool.pick(model, &tried, None, 0) else {
                break;
            };
            tried.push(slot.node.base_url.clone());
            let sent = self
                .http
                .post(format!("{}/v1/embeddings", slot.node.base_url))
                .json(&serde_json::json!({"model": model, "input": texts}))
                .timeout(Duration::from_secs(300))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    let reply: Reply = r.json().await?;
                    anyhow::ensure!(reply.data.len() == texts.len(), "the worker skipped inputs");
                    return Ok((
                        reply.data.into_iter().map(|i| i.embedding).collect(),
                        reply.usage.prompt_tokens,
                    ));
                }
                Ok(r) => {
                    last = anyhow::anyhow!(
                        "worker answered {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )
                }
                Err(e) => last = e.into(),
            }
        }
        Err(last)
    }

    /// One usage record for one embedded batch, keyed by classifier and batch.
    async fn bill(&self, job: &Job, batch: usize, tokens: i64) -> anyhow::Result<()> {
        let now = now_ms();
        let event = UsageEvent {
            request_id: format!("{}-embed-{batch:05}", job.id),
            tenant_id: job.tenant_id.clone(),
            key_id: job.key_id.clone(),
            model: job.model.clone(),
            endpoint: "/v1/classifiers".into(),
            prompt_tokens: tokens,
            completion_tokens: 0,
            cached_tokens: 0,
            cache_hit_minor_per_mreq: None,
            started_at: now,
            finished_at: now,
            status: UsageStatus::Success,
            delivery: Delivery::Delivered,
        };
        self.spool.append_usage(&event).await?;
        Ok(())
    }
}
