//! OpenAI-compatible wire types shared by the gateway and the inference worker.
//!
//! Owns: the JSON shapes of requests, responses, stream chunks and errors, exactly as the
//! official SDKs expect them, and the usage comment a worker's stream carries besides.
//! Must never: hold behaviour beyond (de)serialisation and
//! shape validation, or depend on HTTP, models, keys or storage.

use serde::{Deserialize, Serialize};

mod chat;
mod chat_reply;
mod completions;
mod embeddings;
mod error;
mod fields;
mod responses;
mod tools;
mod usage_comment;

pub use chat::*;
pub use chat_reply::*;
pub use completions::*;
pub use embeddings::*;
pub use error::*;
pub use fields::*;
pub use responses::*;
pub use tools::*;
pub use usage_comment::{parse_usage_comment, usage_comment};

/// Token accounting attached to every successful response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of the prompt tokens, how many were read from the prefix cache (chat and
    /// completions; embeddings leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u64,
}

impl Usage {
    /// The total saturates: the counts may come from another process's bytes.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
        }
    }

    /// The same, stating how many prompt tokens came from the cache.
    pub fn with_cached(mut self, cached_tokens: u64) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens });
        self
    }

    /// Prompt tokens read from the cache (0 where not stated).
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// A chat model's context window in tokens: no call to it can use more, prompt and
    /// completion together. An extension to OpenAI's shape, written by workers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    /// What the model does: `chat` (chat, completions, responses) or `embedding`
    /// (embeddings, classify). An extension to OpenAI's shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl Model {
    pub fn new(id: impl Into<String>, created: u64) -> Self {
        Self {
            id: id.into(),
            object: "model".into(),
            created,
            owned_by: "system".into(),
            context_length: None,
            kind: None,
        }
    }

    /// The same, stating what the model does.
    pub fn with_kind(mut self, kind: &str) -> Self {
        self.kind = Some(kind.to_owned());
        self
    }

    /// The same, stating the model's context window.
    pub fn with_context_length(mut self, tokens: u64) -> Self {
        self.context_length = Some(tokens);
        self
    }
}

/// The body of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<Model>,
}

impl ModelList {
    pub fn new(data: Vec<Model>) -> Self {
        Self {
            object: "list".into(),
            data,
        }
    }
}
