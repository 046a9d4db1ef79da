//! Where a prompt begins, as a hash: calls that share it are sent to the worker whose prefix
//! cache likely holds it.
//!
//! Owns: what of a body the hash reads (role and text, never the JSON's key order or
//! spacing, so the one-pass and the whole parse agree). Must never: read past the first
//! `AFFINITY_BYTES` of a prompt.

use serde_json::Value;

/// The most bytes of a prompt's start that go into its affinity hash.
const AFFINITY_BYTES: usize = 2048;

/// A prompt's first message as its affinity reads it: role and text, whatever the order
/// or spacing of its JSON.
#[derive(serde::Deserialize)]
pub(super) struct Opening<'a> {
    #[serde(borrow, default)]
    pub(super) role: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    content: Option<Value>,
}

impl Opening<'_> {
    pub(super) fn text(&self) -> String {
        self.content.as_ref().map(text_of).unwrap_or_default()
    }

    pub(super) fn hash(&self, model: &str) -> u64 {
        prompt_hash(model, &[self.role.as_deref().unwrap_or(""), &self.text()])
    }
}

/// The text of a content value: a string as it is, text parts joined, anything else as
/// compact JSON.
pub(super) fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) if parts.iter().all(|p| p.get("text").is_some()) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        other => other.to_string(),
    }
}

/// A hash of a prompt's start: the model and the first `AFFINITY_BYTES` of `parts`.
pub(super) fn prompt_hash(model: &str, parts: &[&str]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    model.hash(&mut h);
    let mut left = AFFINITY_BYTES;
    for part in parts {
        let take = part.len().min(left);
        h.write(&part.as_bytes()[..take]);
        h.write_u8(0xFF);
        left -= take;
    }
    h.finish()
}
