use serde::{Deserialize, Serialize};

/// Most inputs one embeddings or classify request may carry.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: TextInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TextInput {
    One(String),
    Many(Vec<String>),
}

impl TextInput {
    pub fn texts(&self) -> Vec<&str> {
        match self {
            TextInput::One(s) => vec![s.as_str()],
            TextInput::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }

    /// Checks count and emptiness; returns the message on error.
    pub fn validate(&self) -> Result<(), String> {
        let texts = self.texts();
        if texts.is_empty() {
            return Err("`input` must not be empty".into());
        }
        if texts.len() > MAX_EMBEDDING_INPUTS {
            return Err(format!(
                "`input` may hold at most {MAX_EMBEDDING_INPUTS} items"
            ));
        }
        if texts.iter().any(|t| t.is_empty()) {
            return Err("`input` must not contain empty strings".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Embedding {
    pub object: String,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

/// Floats, or little-endian f32 bytes in base64 (`encoding_format: "base64"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

/// `POST /v1/classify`: zero-shot classification against caller-given labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifyRequest {
    pub model: String,
    pub input: TextInput,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Classification {
    pub prediction: String,
    pub confidence: f32,
    pub scores: std::collections::BTreeMap<String, f32>,
}

/// A single object for a string input, a list for a list input; usage alongside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifyResponse {
    pub object: String,
    pub model: String,
    #[serde(flatten)]
    pub result: ClassifyResult,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClassifyResult {
    Many { data: Vec<Classification> },
    One(Classification),
}
