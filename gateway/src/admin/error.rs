//! The admin API's one error type and its HTTP mapping.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::token::{Permission, Role, TokenError};
use crate::tenants::TenantError;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Unauthorized(TokenError),
    #[error("the {role:?} role may not {permission:?}")]
    Forbidden { role: Role, permission: Permission },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error")]
    Internal(String),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(TokenError::Expired) => "token_expired",
            Self::Unauthorized(TokenError::Revoked) => "token_revoked",
            Self::Unauthorized(_) => "invalid_token",
            Self::Forbidden { .. } => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::BadRequest(_) => "invalid_request",
            Self::Conflict(_) => "conflict",
            Self::Internal(_) => "internal_error",
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "admin API internal error");
        }
        let body = serde_json::json!({
            "error": {"message": self.to_string(), "code": self.code()}
        });
        let mut response = (self.status(), axum::Json(body)).into_response();
        if matches!(self, Self::Unauthorized(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<billing::DbError> for AdminError {
    fn from(e: billing::DbError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<TenantError> for AdminError {
    fn from(e: TenantError) -> Self {
        match e {
            TenantError::Invalid(m) => Self::BadRequest(m),
            TenantError::NotFound(m) => Self::NotFound(m),
            TenantError::Conflict(m) => Self::Conflict(m),
            TenantError::Db(e) => e.into(),
        }
    }
}

impl From<billing::InvoiceError> for AdminError {
    fn from(e: billing::InvoiceError) -> Self {
        use billing::InvoiceError as E;
        match e {
            E::BadPeriod(_) | E::NotEnded(_) | E::MixedCurrency(_) => {
                Self::BadRequest(e.to_string())
            }
            E::AlreadyFinal { .. } => Self::Conflict(e.to_string()),
            E::Db(e) => e.into(),
        }
    }
}

impl From<billing::series::SeriesError> for AdminError {
    fn from(e: billing::series::SeriesError) -> Self {
        match e {
            billing::series::SeriesError::Db(e) => e.into(),
            other => Self::BadRequest(other.to_string()),
        }
    }
}

impl From<billing::PriceError> for AdminError {
    fn from(e: billing::PriceError) -> Self {
        match e {
            billing::PriceError::Db(e) => e.into(),
            other => Self::BadRequest(other.to_string()),
        }
    }
}
