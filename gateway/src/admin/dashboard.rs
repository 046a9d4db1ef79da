//! The dashboard's static files and the OpenAPI document, compiled into the binary so the
//! admin listener works with no internet and no files beside it.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::AdminState;

/// The OpenAPI 3.1 document of the consumer and admin APIs.
pub const OPENAPI: &str = include_str!("../../openapi.json");

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route(
            "/",
            get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX) }),
        )
        .route(
            "/assets/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    SCRIPT,
                )
            }),
        )
        .route(
            "/assets/app.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }),
        )
        .route(
            "/openapi.json",
            get(|| async {
                ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
            }),
        )
}
