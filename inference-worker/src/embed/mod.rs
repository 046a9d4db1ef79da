//! Embedding models: a BERT-family folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`) run by the encoder in `bert.rs` (weights read with candle), mean-pooled
//! and L2-normalised like sentence-transformers, on one loop that batches concurrent
//! requests together.
//!
//! Owns: tokenization, dynamic batching, pooling, and the zero-shot classifier built on the
//! embeddings. Must never: block the async runtime or know who is asking.

mod bert;
mod classify;
mod dense;

use std::path::Path;
use std::sync::Arc;

use bert::{Bert, BertConfig};
use tokenizers::{Tokenizer, TruncationParams};
use tokio::sync::{mpsc, oneshot};

pub use classify::classify;
pub use dense::Kernel;

use crate::error::WorkerError;
use crate::metrics::Metrics;

/// sentence-transformers' limit for this model family.
const MAX_SEQUENCE_TOKENS: usize = 256;

/// Vectors for a job's texts, in order, with the tokens each used.
#[derive(Debug)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: Vec<usize>,
}

struct EmbedJob {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Embedded, String>>,
}

pub struct EmbeddingModel {
    pub name: String,
    pub dimensions: usize,
    submit: mpsc::Sender<EmbedJob>,
    metrics: Arc<Metrics>,
    /// Label texts' vectors and token counts: zero-shot classify embeds a label set once.
    labels: moka::sync::Cache<String, Arc<(Vec<f32>, usize)>>,
}

/// Label texts kept embedded (a few MiB at 384 dimensions).
const LABEL_CACHE_ENTRIES: u64 = 10_000;

/// Batching knobs and the dense kernels, from the worker's configuration.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_batch: usize,
    pub max_queued: usize,
    pub kernel: Kernel,
}

impl EmbeddingModel {
    pub fn load(
        name: String,
        dir: &Path,
        limits: BatchLimits,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let read = |file: &str| {
            std::fs::read(dir.join(file))
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.join(file).display()))
        };
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)?;
        let mut tokenizer =
            Tokenizer::from_bytes(read("tokenizer.json")?).map_err(anyhow::Error::msg)?;
        // The encoder packs texts without padding, so none is added here.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_SEQUENCE_TOKENS.min(config.max_position_embeddings),
                ..Default::default()
            }))
            .map_err(anyhow::Error::msg)?;
        let model = Bert::load(config, read("model.safetensors")?, limits.kernel)?;
        let dimensions = model.dimensions();

        let (submit, queue) = mpsc::channel(limits.max_queued.max(1));
        let runner = Runner {
            name: name.clone(),
            model,
            tokenizer,
            max_batch: limits.max_batch.max(1),
            metrics: metrics.clone(),
        };
        crate::math::spawn_on_own_pool(format!("embed-{name}"), move || runner.run(queue))?;
        Ok(Arc::new(Self {
            name,
            dimensions,
            submit,
            metrics,
            labels: moka::sync::Cache::new(LABEL_CACHE_ENTRIES),
        }))
    }

    /// Embeds `inputs` and `labels` in one job, taking labels embedded before from the cache:
    /// (inputs, labels), each with its vectors and token counts (a cached label still
    /// reports its tokens, so what a call is billed does not depend on the cache).
    pub async fn embed_with_labels(
        &self,
        inputs: Vec<String>,
        labels: &[String],
    ) -> Result<(Embedded, Embedded), WorkerError> {
        let cached: Vec<_> = labels.iter().map(|l| self.labels.get(l)).collect();
        let hits = cached.iter().filter(|c| c.is_some()).count();
        self.metrics
            .label_cache_hits
            .with_label_values(&[&self.name])
            .inc_by(hits as u64);
        let n = inputs.len();
        let mut texts = inputs;
        texts.extend(
            labels
                .iter()
                .zip(&cached)
                .filter(|(_, c)| c.is_none())
                .map(|(l, _)| l.clone()),
        );
        let mut out = self.embed(texts).await?;
        let fresh_vectors = out.vectors.split_off(n);
        let fresh_tokens = out.tokens.split_off(n);
        let mut fresh = fresh_vectors.into_iter().zip(fresh_tokens);
        let mut label_out = Embedded {
            vectors: Vec::with_capacity(labels.len()),
            tokens: Vec::with_capacity(labels.len()),
        };
        for (label, hit) in labels.iter().zip(cached) {
            let entry = match hit {
                Some(entry) => entry,
                None => {
                    let entry = Arc::new(fresh.next().ok_or_else(|| {
                        WorkerError::Internal("embedding engine lost a label".into())
                    })?);
                    self.labels.insert(label.clone(), entry.clone());
                    entry
                }
            };
            label_out.vectors.push(entry.0.clone());
            label_out.tokens.push(entry.1);
        }
        Ok((out, label_out))
    }

    /// Embeds `texts`, batched with whatever else is waiting.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Embedded, WorkerError> {
        let (reply, answer) = oneshot::channel();
        self.submit
            .try_send(EmbedJob { texts, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => WorkerError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    WorkerError::Internal("embedding engine stopped".into())
                }
            })?;
        answer
            .await
            .map_err(|_| WorkerError::Internal("embedding engine dropped the request".into()))?
            .map_err(WorkerError::Internal)
    }
}

struct Runner {
    name: String,
    model: Bert,
    tokenizer: Tokenizer,
    max_batch: usize,
    metrics: Arc<Metrics>,
}

impl Runner {
    fn run(self, mut queue: mpsc::Receiver<EmbedJob>) {
        while let Some(first) = queue.blocking_recv() {
            // Take whatever else is already waiting, up to one batch of texts.
            let mut jobs = vec![first];
            let mut count = jobs[0].texts.len();
            while count < self.max_batch {
                match queue.try_recv() {
                    Ok(job) => {
                        count += job.texts.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            let texts: Vec<&str> = jobs
                .iter()
                .flat_map(|j| j.texts.iter().map(String::as_str))
                .collect();
            let started = std::time::Instant::now();
            self.metrics
                .embedded_texts
                .with_label_values(&[&self.name])
                .inc_by(texts.len() as u64);
            let result = self.embed_all(&texts);
            self.metrics
                .embed_batch_seconds
                .with_label_values(&[&self.name])
                .observe(started.elapsed().as_secs_f64());
            let mut offset = 0;
            for job in jobs {
                let n = job.texts.len();
                let answer = match &result {
                    Ok(out) => Ok(Embedded {
                        vectors: out.vectors[offset..offset + n].to_vec(),
                        tokens: out.tokens[offset..offset + n].to_vec(),
                    }),
                    Err(e) => Err(e.clone()),
                };
                offset += n;
                let _ = job.reply.send(answer);
            }
        }
    }

    /// Embeds texts in length-sorted batches of similar texts, returning them in input order.
    fn embed_all(&self, texts: &[&str]) -> Result<Embedded, String> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut vectors = vec![Vec::new(); texts.len()];
        let mut tokens = vec![0; texts.len()];
        for chunk in order.chunks(self.max_batch) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let (vecs, counts) = self.embed_batch(&batch).map_err(|e| e.to_string())?;
            for ((&i, v), c) in chunk.iter().zip(vecs).zip(counts) {
                vectors[i] = v;
                tokens[i] = c;
            }
        }
        Ok(Embedded { vectors, tokens })
    }

    fn embed_batch(&self, texts: &[&str]) -> anyhow::Result<(Vec<Vec<f32>>, Vec<usize>)> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(anyhow::Error::msg)?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        let counts = ids.iter().map(Vec::len).collect();
        Ok((self.model.embed(&ids)?, counts))
    }
}

/// Truncates to `dimensions` and re-normalises to unit length.
pub fn truncate_dimensions(vector: &mut Vec<f32>, dimensions: usize) {
    vector.truncate(dimensions);
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}
