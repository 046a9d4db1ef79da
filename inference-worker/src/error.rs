//! The worker's one error type and its single mapping to HTTP statuses and the OpenAI
//! error shape.
//!
//! Owns: `WorkerError`, its status codes, error bodies and `Retry-After`. Must never: log
//! or count errors (the request middleware counts responses by status).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use openai_types::ErrorBody;

/// Seconds a client is told to wait when the worker is saturated.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
    },
    #[error("{0}")]
    ContextLength(String),
    #[error("the model `{0}` does not exist on this worker")]
    ModelNotFound(String),
    #[error("the worker is at capacity; retry shortly")]
    Overloaded,
    #[error("the models are still loading")]
    NotReady,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("internal error: {0}")]
    Internal(String),
}

impl WorkerError {
    pub fn invalid(message: impl Into<String>, param: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } | Self::ContextLength(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::Overloaded | Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            Self::Invalid { param, .. } => ("invalid_request_error", param.as_deref(), None),
            Self::ContextLength(_) => (
                "invalid_request_error",
                Some("messages"),
                Some("context_length_exceeded"),
            ),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            Self::Overloaded => ("server_error", None, Some("overloaded")),
            Self::NotReady => ("server_error", None, Some("not_ready")),
            Self::PayloadTooLarge(_) => ("invalid_request_error", None, Some("payload_too_large")),
            Self::Internal(_) => ("server_error", None, None),
        };
        ErrorBody::new(self.to_string(), kind, param, code)
    }
}

impl IntoResponse for WorkerError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}
