//! Invoices, exports and reconciliation.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use billing::export::Format;
use serde::Deserialize;

use super::directory::tenant_of;
use super::{body, query, AdminError, AdminState, Permission, Principal};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route(
            "/admin/v1/tenants/{tenant}/invoices",
            get(list_invoices).post(finalise),
        )
        .route("/admin/v1/tenants/{tenant}/invoices/preview", get(preview))
        .route(
            "/admin/v1/tenants/{tenant}/invoices/{invoice}",
            get(get_invoice),
        )
        .route(
            "/admin/v1/tenants/{tenant}/invoices/{invoice}/trace",
            get(trace),
        )
        .route("/admin/v1/exports/usage", get(export_usage))
        .route("/admin/v1/reconcile", get(reconcile))
}

async fn list_invoices(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadInvoices)?;
    let tenant = tenant_of(&state, &tenant).await?;
    let invoices = billing::Invoices::new(state.db.clone());
    let data: Vec<serde_json::Value> = invoices
        .list(&tenant.id)
        .await?
        .into_iter()
        .map(|(id, period, total)| {
            serde_json::json!({"id": id, "period": period, "total_minor": total})
        })
        .collect();
    Ok(Json(serde_json::json!({ "data": data })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeriodQuery {
    /// `YYYY-MM` (UTC).
    period: String,
}

async fn preview(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
    q: Result<Query<PeriodQuery>, QueryRejection>,
) -> Result<Json<billing::Invoice>, AdminError> {
    caller.need(Permission::ReadInvoices)?;
    let q = query(q)?;
    let tenant = tenant_of(&state, &tenant).await?;
    let draft = billing::Invoices::new(state.db.clone())
        .preview(&tenant.id, &q.period)
        .await?;
    Ok(Json(draft))
}

async fn finalise(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
    b: Result<Json<PeriodQuery>, JsonRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::FinaliseInvoices)?;
    let b = body(b)?;
    let tenant = tenant_of(&state, &tenant).await?;
    let invoice = billing::Invoices::new(state.db.clone())
        .finalise(&tenant.id, &b.period)
        .await?;
    tracing::info!(by = %caller.0.sub, tenant = %tenant.id, period = %b.period,
        invoice = ?invoice.id, "invoice finalised");
    Ok((StatusCode::CREATED, Json(invoice)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FormatQuery {
    format: Option<Format>,
}

/// A finalised invoice of the tenant in the path, or 404.
async fn invoice_of(
    state: &AdminState,
    tenant: &str,
    invoice: &str,
) -> Result<billing::Invoice, AdminError> {
    let tenant = tenant_of(state, tenant).await?;
    let found = billing::Invoices::new(state.db.clone())
        .get(invoice)
        .await?;
    match found {
        Some(i) if i.tenant_id == tenant.id => Ok(i),
        _ => Err(AdminError::NotFound(format!(
            "no invoice {invoice} in tenant {}",
            tenant.id
        ))),
    }
}

fn attachment(content_type: &'static str, filename: &str, body: Body) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Csv => "text/csv; charset=utf-8",
        Format::Json => "application/json",
    }
}

fn extension(format: Format) -> &'static str {
    match format {
        Format::Csv => "csv",
        Format::Json => "json",
    }
}

async fn get_invoice(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path((tenant, invoice)): Path<(String, String)>,
    q: Result<Query<FormatQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::ReadInvoices)?;
    let q = query(q)?;
    let found = invoice_of(&state, &tenant, &invoice).await?;
    Ok(match q.format {
        None => Json(found).into_response(),
        Some(Format::Json) => {
            // The stored canonical document, byte for byte.
            let doc = billing::Invoices::new(state.db.clone())
                .document(&invoice)
                .await?
                .unwrap_or_default();
            attachment(
                content_type(Format::Json),
                &format!("{invoice}.json"),
                Body::from(doc),
            )
        }
        Some(Format::Csv) => attachment(
            content_type(Format::Csv),
            &format!("{invoice}.csv"),
            Body::from(billing::export::invoice_lines_csv(&found)),
        ),
    })
}

/// Streams what `write` produces into a response body through a bounded pipe, so memory
/// stays constant however large the export. A failure mid-way cuts the body short (the
/// client sees an incomplete transfer, never a silently truncated file that looks whole).
fn streamed<F, Fut>(content: &'static str, filename: &str, write: F) -> Response
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let (writer, reader) = tokio::io::duplex(256 * 1024);
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Err(e) = write(writer).await {
            tracing::error!(error = %e, "export failed mid-stream");
            let _ = fail_tx.send(());
        }
    });
    let data = pipe_stream(reader, fail_rx);
    attachment(content, filename, Body::from_stream(data))
}

/// The pipe's bytes, ending in an error if the writer failed.
fn pipe_stream(
    reader: tokio::io::DuplexStream,
    failed: tokio::sync::oneshot::Receiver<()>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    use tokio::io::AsyncReadExt;
    futures::stream::unfold(Some((reader, failed)), |state| async move {
        let (mut reader, failed) = state?;
        let mut buf = vec![0u8; 64 * 1024];
        match reader.read(&mut buf).await {
            // End of the pipe: a failure is reported on the channel before the writer
            // task ends; a success just drops the sender.
            Ok(0) => match failed.await {
                Ok(()) => Some((Err(std::io::Error::other("export failed")), None)),
                Err(_) => None,
            },
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some((reader, failed))))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

async fn trace(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path((tenant, invoice)): Path<(String, String)>,
    q: Result<Query<FormatQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::Export)?;
    let format = query(q)?.format.unwrap_or(Format::Csv);
    invoice_of(&state, &tenant, &invoice).await?;
    let db = state.db.clone();
    let id = invoice.clone();
    Ok(streamed(
        content_type(format),
        &format!("{invoice}-trace.{}", extension(format)),
        move |out| async move {
            billing::export::export_invoice_trace(&db, &id, format, out)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    period: String,
    tenant: Option<String>,
    format: Option<Format>,
}

async fn export_usage(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    q: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::Export)?;
    let q = query(q)?;
    let format = q.format.unwrap_or(Format::Csv);
    let (from_ms, to_ms) = billing::invoices::period_bounds(&q.period)?;
    if let Some(t) = &q.tenant {
        tenant_of(&state, t).await?;
    }
    let selection = billing::export::UsageSelection {
        tenant_id: q.tenant.clone(),
        from_ms,
        to_ms,
    };
    let db = state.db.clone();
    let name = format!(
        "usage-{}{}.{}",
        q.period,
        q.tenant.map(|t| format!("-{t}")).unwrap_or_default(),
        extension(format)
    );
    Ok(streamed(
        content_type(format),
        &name,
        move |out| async move {
            billing::export::export_usage(&db, &selection, format, out, |_| {})
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    ))
}

async fn reconcile(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    q: Result<Query<PeriodQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::Export)?;
    let q = query(q)?;
    let report = billing::reconcile::reconcile(&state.db, &q.period).await?;
    let ok = report.ok();
    let mut v = serde_json::to_value(&report).unwrap_or_default();
    v["ok"] = serde_json::Value::Bool(ok);
    Ok(Json(v))
}
