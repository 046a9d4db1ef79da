//! The gateway's one error type, mapped to HTTP statuses and the OpenAI error shape here
//! and nowhere else.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use openai_types::ErrorBody;

/// Seconds clients are told to wait on 503.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<std::borrow::Cow<'static, str>>,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("this key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("unknown path")]
    PathNotFound,
    #[error("the request body was not received in time")]
    RequestTimeout,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("no healthy worker can serve `{0}` right now")]
    NoWorker(String),
    #[error("the upstream worker did not answer in time")]
    UpstreamTimeout,
    #[error("the upstream worker failed: {0}")]
    Upstream(String),
    #[error("usage could not be recorded; the request was not billed and can be retried")]
    Metering,
    #[error("{}", .0.message)]
    Limited(Box<crate::limits::Refusal>),
    #[error("limits cannot be checked right now; retry shortly")]
    LimitsUnavailable,
    /// Too many failed authentications from the caller's address; the seconds to wait.
    #[error("too many failed authentications from this address; retry after {0} s")]
    AuthThrottled(u64),
    /// Something the caller named does not exist for its tenant.
    #[error("{0}")]
    NotFound(String),
    /// What was asked cannot be done in the object's present state.
    #[error("{0}")]
    Conflict(String),
    /// The tenant has as much of something in progress as it may.
    #[error("{0}")]
    TooMany(String),
    #[error("internal error")]
    Internal(String),
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: param.map(std::borrow::Cow::Borrowed),
        }
    }

    /// A bad request about a field named by the request itself.
    pub fn bad_request_param(message: impl Into<String>, param: String) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(std::borrow::Cow::Owned(param)),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::ModelNotFound(_) | Self::PathNotFound | Self::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::NoWorker(_) | Self::Metering | Self::LimitsUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Limited(_) | Self::AuthThrottled(_) | Self::TooMany(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn parts(&self) -> (&'static str, Option<&str>, Option<&'static str>) {
        match self {
            Self::BadRequest { param, .. } => ("invalid_request_error", param.as_deref(), None),
            Self::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::ModelNotAllowed(_) => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_allowed"),
            ),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            Self::PathNotFound | Self::NotFound(_) => {
                ("invalid_request_error", None, Some("not_found"))
            }
            Self::Conflict(_) => ("invalid_request_error", None, Some("conflict")),
            Self::TooMany(_) => ("rate_limit_error", None, Some("too_many_in_progress")),
            Self::PayloadTooLarge(_) => ("invalid_request_error", None, Some("payload_too_large")),
            Self::RequestTimeout => ("invalid_request_error", None, Some("request_timeout")),
            Self::NoWorker(_) => ("server_error", None, Some("no_healthy_worker")),
            Self::UpstreamTimeout => ("server_error", None, Some("upstream_timeout")),
            Self::Upstream(_) => ("server_error", None, Some("upstream_error")),
            Self::Metering => ("server_error", None, Some("metering_unavailable")),
            Self::LimitsUnavailable => ("server_error", None, Some("limits_unavailable")),
            Self::Limited(r) if r.kind.is_quota() => {
                ("insufficient_quota", None, Some("insufficient_quota"))
            }
            Self::Limited(_) => ("rate_limit_error", None, Some("rate_limit_exceeded")),
            Self::AuthThrottled(_) => ("rate_limit_error", None, Some("too_many_failed_auths")),
            Self::Internal(_) => ("server_error", None, None),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let (kind, param, code) = self.parts();
        let body = ErrorBody::new(self.to_string(), kind, param, code);
        let mut response = (self.status(), axum::Json(body)).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if let Self::AuthThrottled(secs) = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        if let Self::Limited(refusal) = &self {
            let headers = response.headers_mut();
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(refusal.retry_after_secs),
            );
            refusal.headers.apply(headers);
            if refusal.kind.is_quota() {
                // A quota does not come back in seconds: SDKs should not retry.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
        response
    }
}

impl From<billing::DbError> for GatewayError {
    fn from(e: billing::DbError) -> Self {
        Self::Internal(e.to_string())
    }
}
