//! `POST /v1/completions`, the legacy text completion: a prompt continued as it is, with no
//! chat template.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chat::{ChatCompletionRequest, Stop, StreamOptions};
use crate::chat_reply::FinishReason;
use crate::fields::COMPLETION_RULES;
use crate::Usage;

/// Most prompts one request may carry.
pub const MAX_PROMPTS: usize = 16;
/// Most alternatives `logprobs` may ask for per token (OpenAI's bound).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;
/// OpenAI's default completion length for this endpoint.
pub const DEFAULT_COMPLETION_TOKENS: u32 = 16;

/// A prompt: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt of a request, as text or as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPart {
    Text(String),
    Tokens(Vec<u32>),
}

impl Default for Prompt {
    fn default() -> Self {
        Self::Text(String::new())
    }
}

impl Prompt {
    /// The prompts, one per choice group.
    pub fn parts(&self) -> Vec<PromptPart> {
        match self {
            Prompt::Text(t) => vec![PromptPart::Text(t.clone())],
            Prompt::Texts(v) => v.iter().cloned().map(PromptPart::Text).collect(),
            Prompt::Tokens(t) => vec![PromptPart::Tokens(t.clone())],
            Prompt::TokenLists(v) => v.iter().cloned().map(PromptPart::Tokens).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: Prompt,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// How many alternatives to report per token (0 to 5); absent reports none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Every other field; any is refused.
    #[serde(flatten, default, skip_serializing_if = "Map::is_empty")]
    pub other: Map<String, Value>,
}

impl CompletionRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    pub fn choices(&self) -> u32 {
        self.n.unwrap_or(1)
    }

    pub fn stop_sequences(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// Checks the fields the contract bounds; `(message, param)` on the first error.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |m: &str, p: &str| Err((m.to_owned(), p.to_owned()));
        if let Some(name) = self
            .other
            .keys()
            .find(|k| COMPLETION_RULES.refusal(k).is_some())
        {
            return Err((
                COMPLETION_RULES.refusal(name).unwrap_or_default(),
                name.clone(),
            ));
        }
        let parts = self.prompt.parts();
        if parts.is_empty() || parts.len() > MAX_PROMPTS {
            return err(
                &format!("`prompt` must hold 1 to {MAX_PROMPTS} prompts"),
                "prompt",
            );
        }
        if parts.iter().any(|p| match p {
            PromptPart::Text(t) => t.is_empty(),
            PromptPart::Tokens(t) => t.is_empty(),
        }) {
            return err("a prompt must not be empty", "prompt");
        }
        if self.max_tokens == Some(0) {
            return err("`max_tokens` must be at least 1", "max_tokens");
        }
        if self.best_of.is_some_and(|b| Some(b) != self.n && b != 1) {
            return err("`best_of` other than `n` is not supported", "best_of");
        }
        if self.logprobs.is_some_and(|k| k > MAX_COMPLETION_LOGPROBS) {
            return err(
                &format!("`logprobs` must be between 0 and {MAX_COMPLETION_LOGPROBS}"),
                "logprobs",
            );
        }
        if self.echo == Some(true) && self.logprobs.is_some() {
            return err(
                "`echo` with `logprobs` is not supported: prompt tokens have no log probabilities here",
                "echo",
            );
        }
        self.sampling().validate_sampling()
    }

    /// The request's sampling fields, as the chat request the engine reads.
    pub fn sampling(&self) -> ChatCompletionRequest {
        ChatCompletionRequest {
            model: self.model.clone(),
            max_completion_tokens: Some(self.max_tokens.unwrap_or(DEFAULT_COMPLETION_TOKENS)),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
            n: self.n,
            logprobs: self.logprobs.map(|_| true),
            top_logprobs: self.logprobs,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            ..ChatCompletionRequest::default()
        }
    }
}

/// The reply of `POST /v1/completions`, and (with `object` `text_completion` and no usage
/// until the end) each of its stream chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// The legacy log probability shape: parallel lists per token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(body: &str) -> String {
        serde_json::from_str::<CompletionRequest>(body)
            .unwrap()
            .validate()
            .unwrap_err()
            .1
    }

    #[test]
    fn prompts_of_every_form_and_the_bounds() {
        for (body, parts) in [
            (r#"{"model":"m","prompt":"a"}"#, 1),
            (r#"{"model":"m","prompt":["a","b"]}"#, 2),
            (r#"{"model":"m","prompt":[1,2,3]}"#, 1),
            (r#"{"model":"m","prompt":[[1],[2,3]]}"#, 2),
        ] {
            let req: CompletionRequest = serde_json::from_str(body).unwrap();
            assert_eq!(req.validate(), Ok(()), "{body}");
            assert_eq!(req.prompt.parts().len(), parts);
        }
        assert_eq!(refusal(r#"{"model":"m","prompt":""}"#), "prompt");
        assert_eq!(refusal(r#"{"model":"m","prompt":[]}"#), "prompt");
        assert_eq!(
            refusal(r#"{"model":"m","prompt":"a","logprobs":6}"#),
            "logprobs"
        );
        assert_eq!(
            refusal(r#"{"model":"m","prompt":"a","echo":true,"logprobs":1}"#),
            "echo"
        );
        assert_eq!(
            refusal(r#"{"model":"m","prompt":"a","best_of":3}"#),
            "best_of"
        );
        assert_eq!(
            refusal(r#"{"model":"m","prompt":"a","suffix":"x"}"#),
            "suffix"
        );
        assert_eq!(
            refusal(r#"{"model":"m","prompt":"a","messages":[]}"#),
            "messages"
        );
    }
}
