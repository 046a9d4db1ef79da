//! Classifiers trained on a tenant's own examples (SPEC §12): created from labelled texts,
//! trained in the background on the examples' embeddings, served through `/v1/classify`.
//!
//! Owns: the `/v1/classifiers` API, the checks on what a tenant sends, classifying with a
//! trained head, and (in `train`, `store`, `jobs`) the optimisation, the persistence and
//! the background training. Must never: let a tenant read, use or delete another tenant's
//! classifier (every lookup is by tenant and id; another tenant's id is a 404), or ask a
//! worker anything but embeddings (workers stay tenant-blind).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use serde::Deserialize;

use crate::error::GatewayError;
use crate::pool::WorkerPool;
use crate::proxy::ProxiedCall;

pub mod jobs;
mod lbfgs;
pub mod store;
pub mod terms;
pub mod train;

pub use store::{ClassifierStore, Example, Status, Summary};

/// The most examples one classifier may be trained on.
pub const MAX_EXAMPLES: usize = 50_000;
/// The most bytes of one example's text.
pub const MAX_TEXT_BYTES: usize = 8_192;
/// The most labels of one classifier, and bytes of one label.
pub const MAX_LABELS: usize = 1_000;
pub const MAX_LABEL_BYTES: usize = 200;
/// Classifiers one tenant may have waiting for or in training.
pub const MAX_TRAINING_PER_TENANT: i64 = 3;
/// The most bytes of a `POST /v1/classifiers` body.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// `POST /v1/classifiers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClassifier {
    pub model: String,
    pub name: String,
    pub examples: Vec<Example>,
    #[serde(default)]
    pub options: train::Options,
}

impl NewClassifier {
    /// The labels, in order of first appearance, once every bound holds.
    pub fn check(&self, pool: &WorkerPool) -> Result<Vec<String>, GatewayError> {
        let bad =
            |message: String, param: &'static str| GatewayError::bad_request(message, Some(param));
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(bad("`name` must be 1 to 200 characters".into(), "name"));
        }
        match pool.facts(&self.model) {
            None => return Err(GatewayError::ModelNotFound(self.model.clone())),
            Some(f) if f.kind.as_deref() == Some("chat") => {
                return Err(bad(
                    format!(
                    "`{}` is a chat model: classifiers are trained on an embedding model's vectors",
                    self.model
                ),
                    "model",
                ))
            }
            Some(_) => {}
        }
        if self.examples.len() > MAX_EXAMPLES {
            return Err(bad(
                format!(
                    "{} examples is more than the {MAX_EXAMPLES} a classifier may have",
                    self.examples.len()
                ),
                "examples",
            ));
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut labels: Vec<String> = Vec::new();
        for (i, e) in self.examples.iter().enumerate() {
            if e.text.trim().is_empty() {
                return Err(bad(format!("examples[{i}].text is empty"), "examples"));
            }
            if e.text.len() > MAX_TEXT_BYTES {
                return Err(bad(
                    format!(
                        "examples[{i}].text is {} bytes; at most {MAX_TEXT_BYTES}",
                        e.text.len()
                    ),
                    "examples",
                ));
            }
            if e.label.trim().is_empty() || e.label.len() > MAX_LABEL_BYTES {
                return Err(bad(
                    format!("examples[{i}].label must be 1 to {MAX_LABEL_BYTES} bytes"),
                    "examples",
                ));
            }
            let count = counts.entry(&e.label).or_insert(0);
            if *count == 0 {
                labels.push(e.label.clone());
            }
            *count += 1;
        }
        if labels.len() < 2 {
            return Err(bad(
                format!(
                    "a classifier needs at least 2 labels; the examples have {}",
                    labels.len()
                ),
                "examples",
            ));
        }
        if labels.len() > MAX_LABELS {
            return Err(bad(format!("at most {MAX_LABELS} labels"), "examples"));
        }
        if let Some((label, n)) = counts.iter().find(|(_, n)| **n < 2) {
            return Err(bad(
                format!("label `{label}` has {n} example; every label needs at least 2 (one to train on, one to check)"),
                "examples",
            ));
        }
        self.options.validate().map_err(|m| bad(m, "options"))?;
        Ok(labels)
    }
}

/// `POST /v1/classify` with a `classifier` instead of `labels`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyWith {
    pub classifier: String,
    pub input: openai_types::TextInput,
    /// Ignored beyond a check: the classifier names its model.
    #[serde(default)]
    pub model: Option<String>,
}

/// Whether a `/v1/classify` body names a trained classifier.
pub fn names_classifier(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        classifier: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(body).is_ok_and(|p| p.classifier.is_some())
}

/// The embeddings call that classifying `input` with `trained` needs, replying in the shape
/// of `/v1/classify` and billed as `/v1/classify`.
pub fn classify_call(
    id: &str,
    trained: &Arc<store::Trained>,
    input: &openai_types::TextInput,
) -> Result<ProxiedCall, GatewayError> {
    let body = serde_json::json!({"model": trained.model, "input": input});
    let bytes =
        Bytes::from(serde_json::to_vec(&body).map_err(|e| GatewayError::Internal(e.to_string()))?);
    let mut call = ProxiedCall::parse("/v1/embeddings", bytes)?;
    let one = matches!(input, openai_types::TextInput::One(_));
    let (id, trained) = (id.to_owned(), trained.clone());
    let texts: Vec<String> = input.texts().into_iter().map(str::to_owned).collect();
    call.answer_as(
        "/v1/classify",
        Arc::new(move |reply: &[u8]| answer(&id, &trained, &texts, one, reply)),
    );
    Ok(call)
}

/// A worker's embeddings reply turned into a classification reply.
fn answer(
    id: &str,
    trained: &store::Trained,
    texts: &[String],
    one: bool,
    reply: &[u8],
) -> Result<Bytes, GatewayError> {
    let reply: openai_types::EmbeddingResponse = serde_json::from_slice(reply)
        .map_err(|e| GatewayError::Upstream(format!("the worker's embeddings: {e}")))?;
    let mut results: Vec<openai_types::Classification> = Vec::with_capacity(reply.data.len());
    for item in &reply.data {
        let Some(text) = texts.get(item.index as usize) else {
            return Err(GatewayError::Upstream(format!(
                "the worker's embeddings name input {} of {}",
                item.index,
                texts.len()
            )));
        };
        let openai_types::EmbeddingVector::Float(vector) = &item.embedding else {
            return Err(GatewayError::Upstream(
                "the worker's embeddings were not floats".into(),
            ));
        };
        if vector.len() != trained.head.input_width() {
            return Err(GatewayError::Upstream(format!(
                "the model's vectors have {} dimensions; the classifier was trained on {}",
                vector.len(),
                trained.head.input_width()
            )));
        }
        let probs = trained.head.probabilities(vector, text);
        let best = train::argmax(&probs);
        results.push(openai_types::Classification {
            prediction: trained.labels[best].clone(),
            confidence: probs[best],
            scores: trained.labels.iter().cloned().zip(probs).collect(),
        });
    }
    let result = if one && results.len() == 1 {
        openai_types::ClassifyResult::One(results.remove(0))
    } else {
        openai_types::ClassifyResult::Many { data: results }
    };
    let mut out = serde_json::to_value(openai_types::ClassifyResponse {
        object: "classification".into(),
        model: reply.model,
        result,
        usage: reply.usage,
    })
    .map_err(|e| GatewayError::Internal(e.to_string()))?;
    out["classifier"] = serde_json::Value::String(id.to_owned());
    serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|e| GatewayError::Internal(e.to_string()))
}
