//! The admin API and the operator dashboard, on their own listener.
//!
//! Owns: the routes operators and finance use (tenants, plans, prices, keys, usage series,
//! invoices, exports, worker health), their authentication (HS256 JWTs with a role, see
//! [`token`]; revoked `jti`s refused, see [`revocation`]), the OpenAPI document of both
//! APIs and the dashboard's static files. Every route names the one [`Permission`] it
//! needs; tenant-scoped objects are looked up within the tenant of the path, so an id
//! from another tenant is "not found". Must never: accept
//! consumer API keys, show a key's secret or hash after creation, or compute money itself
//! (billing does).

mod dashboard;
mod directory;
pub mod error;
mod finance;
mod observe;
pub mod revocation;
pub mod token;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use billing::Db;

use crate::metrics::GatewayMetrics;
use crate::pool::WorkerPool;
use crate::tenants::TenantStore;
pub use error::AdminError;
pub use token::{Claims, Permission, Role, Secret, TokenAuthority};

/// What the admin routes share.
pub struct AdminState {
    pub tokens: TokenAuthority,
    pub db: Db,
    pub tenants: TenantStore,
    pub pool: Arc<WorkerPool>,
    pub metrics: Arc<GatewayMetrics>,
    pub response_cache: Option<Arc<crate::response_cache::ResponseCache>>,
}

/// Whom an admin route acts for: the verified claims of its bearer token.
#[derive(Debug, Clone)]
pub struct Principal(pub Claims);

impl Principal {
    /// Refuses with 403 unless the caller's role grants `p`.
    pub fn need(&self, p: Permission) -> Result<(), AdminError> {
        if self.0.role.may(p) {
            Ok(())
        } else {
            Err(AdminError::Forbidden {
                role: self.0.role,
                permission: p,
            })
        }
    }
}

impl FromRequestParts<Arc<AdminState>> for Principal {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AdminError::Unauthorized(token::TokenError::Missing))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AdminError::Unauthorized(token::TokenError::Missing))?
            .trim();
        let claims = state
            .tokens
            .verify(token)
            .map_err(AdminError::Unauthorized)?;
        // Looked up on every request: a revocation holds everywhere once committed, and a
        // store error refuses the request rather than skipping the check.
        if revocation::is_revoked(&state.db, &claims.jti).await? {
            return Err(AdminError::Unauthorized(token::TokenError::Revoked));
        }
        Ok(Principal(claims))
    }
}

/// Every admin API operation as (method, path): the router and the OpenAPI document must
/// both list exactly these (a test checks).
pub const OPERATIONS: &[(&str, &str)] = &[
    ("get", "/admin/v1/whoami"),
    ("get", "/admin/v1/tenants"),
    ("post", "/admin/v1/tenants"),
    ("get", "/admin/v1/tenants/{tenant}"),
    ("put", "/admin/v1/tenants/{tenant}/plan"),
    ("get", "/admin/v1/plans"),
    ("post", "/admin/v1/plans"),
    ("get", "/admin/v1/prices"),
    ("post", "/admin/v1/prices"),
    ("get", "/admin/v1/tenants/{tenant}/keys"),
    ("post", "/admin/v1/tenants/{tenant}/keys"),
    ("get", "/admin/v1/tenants/{tenant}/keys/{key}"),
    ("get", "/admin/v1/tenants/{tenant}/classifiers"),
    ("get", "/admin/v1/tenants/{tenant}/batches"),
    ("post", "/admin/v1/tenants/{tenant}/keys/{key}/revoke"),
    ("post", "/admin/v1/tenants/{tenant}/keys/{key}/rotate"),
    ("get", "/admin/v1/usage"),
    ("get", "/admin/v1/usage/top"),
    ("get", "/admin/v1/tenants/{tenant}/invoices"),
    ("post", "/admin/v1/tenants/{tenant}/invoices"),
    ("get", "/admin/v1/tenants/{tenant}/invoices/preview"),
    ("get", "/admin/v1/tenants/{tenant}/invoices/{invoice}"),
    ("get", "/admin/v1/tenants/{tenant}/invoices/{invoice}/trace"),
    ("get", "/admin/v1/exports/usage"),
    ("get", "/admin/v1/reconcile"),
    ("get", "/admin/v1/workers"),
    ("get", "/admin/v1/traffic"),
    ("post", "/admin/v1/tokens/{jti}/revoke"),
];

pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/admin/v1/whoami", get(whoami))
        .route("/admin/v1/tokens/{jti}/revoke", post(revoke_token))
        .merge(directory::routes())
        .merge(observe::routes())
        .merge(finance::routes())
        .fallback(|| async { AdminError::NotFound("unknown admin path".into()) });
    Router::new()
        .merge(api)
        .merge(dashboard::routes())
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn whoami(caller: Principal) -> Json<serde_json::Value> {
    let c = caller.0;
    Json(serde_json::json!({
        "sub": c.sub,
        "role": c.role,
        "expires_at": c.exp,
        "permissions": c.role.permissions(),
    }))
}

/// Adds a token's `jti` to the deny-list; every replica refuses the token from then on.
async fn revoke_token(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(jti): Path<String>,
) -> Result<Json<revocation::RevokedToken>, AdminError> {
    caller.need(Permission::RevokeTokens)?;
    if jti.is_empty() || jti.len() > revocation::MAX_JTI_LEN {
        return Err(AdminError::BadRequest(format!(
            "a jti is 1 to {} bytes",
            revocation::MAX_JTI_LEN
        )));
    }
    let revoked = revocation::revoke(&state.db, &jti, &caller.0.sub).await?;
    tracing::info!(by = %caller.0.sub, jti = %jti, "admin token revoked");
    Ok(Json(revoked))
}

/// The dashboard runs with a strict policy: only its own scripts and styles, no framing.
async fn security_headers(req: axum::extract::Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    response
}

/// The value of a query string, or a 400 in the admin error shape.
pub(crate) fn query<T>(
    q: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, AdminError> {
    q.map(|axum::extract::Query(v)| v)
        .map_err(|e| AdminError::BadRequest(e.body_text()))
}

/// A JSON body, or a 400 in the admin error shape.
pub(crate) fn body<T>(
    b: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, AdminError> {
    b.map(|Json(v)| v)
        .map_err(|e| AdminError::BadRequest(e.body_text()))
}

/// Parses an optional Unix-seconds bound or gives `default`.
pub(crate) fn seconds_or(v: Option<i64>, default: i64) -> Result<i64, AdminError> {
    match v {
        Some(s) if s < 0 => Err(AdminError::BadRequest("times are Unix seconds ≥ 0".into())),
        Some(s) => Ok(s),
        None => Ok(default),
    }
}
