//! The Batch API (SPEC §11): files of requests uploaded per tenant, batches that run their
//! lines in the background at a lower priority than interactive calls, and the output and
//! error files they end with.
//!
//! Owns: what a batch input file may hold (checked line by line when it is uploaded, so a
//! bad file is refused naming its first bad line), the shapes of files and batches as the
//! OpenAI SDKs read them, and (in `store` and `runner`) their persistence and execution.
//! Must never: let a tenant read, use or delete another tenant's file or batch (every
//! lookup is by tenant and id), or run a line outside the admission, routing and metering
//! an interactive call goes through.

use std::collections::HashSet;

use axum::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::GatewayError;
use crate::proxy::ProxiedCall;

pub mod runner;
pub mod store;

pub use store::BatchStore;

/// The most bytes of one uploaded file.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// The most requests in one batch file.
pub const MAX_LINES: usize = 50_000;
/// The most bytes of a `custom_id`.
pub const MAX_CUSTOM_ID_BYTES: usize = 512;
/// How long an uploaded or output file is kept.
pub const FILE_RETENTION_MS: i64 = 30 * 24 * 3_600_000;
/// A batch's completion window: the only one offered, as OpenAI's.
pub const COMPLETION_WINDOW: &str = "24h";
pub const COMPLETION_WINDOW_MS: i64 = 24 * 3_600_000;
/// The endpoints a batch line may call.
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/responses",
];

/// One request of a batch input file, as checked at upload.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub custom_id: String,
    pub url: &'static str,
    /// The request body, as the file had it.
    pub body: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    custom_id: Value,
    method: Value,
    url: Value,
    body: Value,
}

/// Checks a batch input file: JSONL, each line a request with a `custom_id` unique in the
/// file, `method` POST, a `url` among [`ENDPOINTS`] and a `body` that endpoint accepts (not
/// a stream). The first bad line is named in the error, counting from 1.
pub fn parse_file(content: &[u8]) -> Result<Vec<Line>, GatewayError> {
    let text = std::str::from_utf8(content)
        .map_err(|e| bad_file(format!("the file is not UTF-8 text ({e})")))?;
    let mut seen = HashSet::new();
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let at = |message: String| bad_file(format!("line {}: {message}", i + 1));
        if lines.len() == MAX_LINES {
            return Err(at(format!(
                "a batch file holds at most {MAX_LINES} requests"
            )));
        }
        let line: RawLine = serde_json::from_str(raw).map_err(|e| {
            at(format!(
                "not a request object with `custom_id`, `method`, `url` and `body` ({e})"
            ))
        })?;
        let custom_id = match line.custom_id {
            Value::String(s) if !s.is_empty() && s.len() <= MAX_CUSTOM_ID_BYTES => s,
            _ => {
                return Err(at(format!(
                    "`custom_id` must be a string of 1 to {MAX_CUSTOM_ID_BYTES} bytes"
                )))
            }
        };
        if !seen.insert(custom_id.clone()) {
            return Err(at(format!("`custom_id` {custom_id:?} is used twice")));
        }
        if line.method != Value::String("POST".into()) {
            return Err(at("`method` must be \"POST\"".into()));
        }
        let url = ENDPOINTS
            .iter()
            .find(|e| line.url.as_str() == Some(**e))
            .copied()
            .ok_or_else(|| at(format!("`url` must be one of {}", ENDPOINTS.join(", "))))?;
        let Value::Object(body) = &line.body else {
            return Err(at("`body` must be a JSON object".into()));
        };
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            return Err(at("a batch request cannot stream".into()));
        }
        let body = serde_json::to_string(&line.body).map_err(|e| at(e.to_string()))?;
        ProxiedCall::parse(url, Bytes::from(body.clone())).map_err(|e| at(e.to_string()))?;
        lines.push(Line {
            custom_id,
            url,
            body,
        });
    }
    if lines.is_empty() {
        return Err(bad_file("the file holds no requests".into()));
    }
    Ok(lines)
}

fn bad_file(message: String) -> GatewayError {
    GatewayError::bad_request(message, Some("file"))
}

/// A file as the SDKs read it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: i64,
    pub filename: String,
    pub purpose: String,
    pub status: &'static str,
}

/// A batch's request counts.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

/// Why a batch failed or what its lines met, as OpenAI lists them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorList {
    pub object: &'static str,
    pub data: Vec<BatchError>,
}

/// A batch as the SDKs read it; times in Unix seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchObject {
    pub id: String,
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<ErrorList>,
    pub input_file_id: String,
    pub completion_window: &'static str,
    pub status: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// `POST /v1/batches`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

impl CreateBatch {
    /// The endpoint, checked against the offered ones and the window.
    pub fn check(&self) -> Result<&'static str, GatewayError> {
        if self.completion_window != COMPLETION_WINDOW {
            return Err(GatewayError::bad_request(
                format!("`completion_window` must be \"{COMPLETION_WINDOW}\""),
                Some("completion_window"),
            ));
        }
        if let Some(m) = &self.metadata {
            let ok = m.len() <= 16
                && m.iter()
                    .all(|(k, v)| k.len() <= 64 && v.as_str().is_some_and(|v| v.len() <= 512));
            if !ok {
                return Err(GatewayError::bad_request(
                    "`metadata` holds at most 16 string values, keys of at most 64 bytes and values of at most 512",
                    Some("metadata"),
                ));
            }
        }
        ENDPOINTS
            .iter()
            .find(|e| **e == self.endpoint)
            .copied()
            .ok_or_else(|| {
                GatewayError::bad_request(
                    format!("`endpoint` must be one of {}", ENDPOINTS.join(", ")),
                    Some("endpoint"),
                )
            })
    }
}

/// A new id: `prefix` and 24 hex digits of a v7 UUID's randomness and time.
pub fn new_id(prefix: &str) -> String {
    let hex = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &hex[hex.len() - 24..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(content: &str) -> String {
        match parse_file(content.as_bytes()) {
            Err(GatewayError::BadRequest { message, .. }) => message,
            other => panic!("{content}: {other:?}"),
        }
    }

    #[test]
    fn a_good_file_is_read_line_by_line() {
        let file = concat!(
            r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}"#,
            "\n\n",
            r#"{"custom_id":"b","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#,
            "\n"
        );
        let lines = parse_file(file.as_bytes()).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].custom_id, "b");
        assert_eq!(lines[1].url, "/v1/chat/completions");
    }

    #[test]
    fn the_first_bad_line_is_named() {
        let good = r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}"#;
        let cases = [
            ("not json", "line 2: not a request object"),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#,
                "line 2: `custom_id` \"a\" is used twice",
            ),
            (
                r#"{"custom_id":"b","method":"GET","url":"/v1/embeddings","body":{"model":"m"}}"#,
                "line 2: `method`",
            ),
            (
                r#"{"custom_id":"b","method":"POST","url":"/v1/files","body":{"model":"m"}}"#,
                "line 2: `url` must be one of",
            ),
            (
                r#"{"custom_id":"b","method":"POST","url":"/v1/embeddings","body":[]}"#,
                "line 2: `body` must be",
            ),
            (
                r#"{"custom_id":"b","method":"POST","url":"/v1/embeddings","body":{"input":"x"}}"#,
                "line 2: `model` is required",
            ),
            (
                r#"{"custom_id":"b","method":"POST","url":"/v1/chat/completions","body":{"model":"m","stream":true}}"#,
                "line 2: a batch request cannot stream",
            ),
            (
                r#"{"custom_id":"","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#,
                "line 2: `custom_id` must be",
            ),
        ];
        for (bad, expected) in cases {
            let got = message(&format!("{good}\n{bad}\n{good}"));
            assert!(got.starts_with(expected), "{bad}: {got}");
        }
        assert!(message("").contains("no requests"));
        assert!(parse_file(b"\xff\xfe").is_err());
    }
}
