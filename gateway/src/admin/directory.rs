//! Tenants, plans, prices and keys.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use super::{body, AdminError, AdminState, Permission, Principal};
use crate::limits::Limits;
use crate::tenants::{NewKey, TenantSummary};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/admin/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/admin/v1/tenants/{tenant}", get(get_tenant))
        .route("/admin/v1/tenants/{tenant}/plan", put(set_plan))
        .route("/admin/v1/plans", get(list_plans).post(create_plan))
        .route("/admin/v1/prices", get(list_prices).post(add_price))
        .route(
            "/admin/v1/tenants/{tenant}/keys",
            get(list_keys).post(create_key),
        )
        .route("/admin/v1/tenants/{tenant}/keys/{key}", get(get_key))
        .route(
            "/admin/v1/tenants/{tenant}/classifiers",
            get(list_classifiers),
        )
        .route("/admin/v1/tenants/{tenant}/batches", get(list_batches))
        .route(
            "/admin/v1/tenants/{tenant}/keys/{key}/revoke",
            post(revoke_key),
        )
        .route(
            "/admin/v1/tenants/{tenant}/keys/{key}/rotate",
            post(rotate_key),
        )
}

/// The tenant of a path, or 404.
pub(super) async fn tenant_of(
    state: &AdminState,
    tenant_id: &str,
) -> Result<TenantSummary, AdminError> {
    state
        .tenants
        .tenant(tenant_id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no tenant {tenant_id}")))
}

fn list<T: serde::Serialize>(data: Vec<T>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "data": data }))
}

async fn list_tenants(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadDirectory)?;
    Ok(list(state.tenants.list_tenants().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
    /// A plan's name.
    plan: Option<String>,
}

async fn create_tenant(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    new: Result<Json<NewTenant>, JsonRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::ManageTenants)?;
    let new = body(new)?;
    let plan = match &new.plan {
        Some(name) => Some(
            state
                .tenants
                .plan_by_name(name)
                .await?
                .ok_or_else(|| AdminError::BadRequest(format!("no plan named {name}")))?,
        ),
        None => None,
    };
    let tenant = state.tenants.create_tenant_unique(&new.name).await?;
    if let Some(plan) = &plan {
        state.tenants.set_plan(&tenant.id, Some(&plan.id)).await?;
    }
    tracing::info!(by = %caller.0.sub, tenant = %tenant.id, "tenant created");
    let summary = tenant_of(&state, &tenant.id).await?;
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

async fn get_tenant(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
) -> Result<Json<TenantSummary>, AdminError> {
    caller.need(Permission::ReadDirectory)?;
    Ok(Json(tenant_of(&state, &tenant).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanChoice {
    /// A plan's name; `null` takes the tenant off any plan (no limits).
    plan: Option<String>,
}

async fn set_plan(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
    choice: Result<Json<PlanChoice>, JsonRejection>,
) -> Result<Json<TenantSummary>, AdminError> {
    caller.need(Permission::ManageTenants)?;
    let choice = body(choice)?;
    let tenant = tenant_of(&state, &tenant).await?;
    let plan_id = match &choice.plan {
        Some(name) => Some(
            state
                .tenants
                .plan_by_name(name)
                .await?
                .ok_or_else(|| AdminError::BadRequest(format!("no plan named {name}")))?
                .id,
        ),
        None => None,
    };
    state
        .tenants
        .set_plan(&tenant.id, plan_id.as_deref())
        .await?;
    tracing::info!(by = %caller.0.sub, tenant = %tenant.id, plan = ?choice.plan, "plan set");
    Ok(Json(tenant_of(&state, &tenant.id).await?))
}

async fn list_plans(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadDirectory)?;
    Ok(list(state.tenants.list_plans().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPlan {
    name: String,
    #[serde(default)]
    limits: Limits,
    /// Opts the plan's tenants in to the response cache.
    #[serde(default)]
    response_cache: Option<crate::tenants::ResponseCachePolicy>,
}

async fn create_plan(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    new: Result<Json<NewPlan>, JsonRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::ManageTenants)?;
    let new = body(new)?;
    if new.name.trim().is_empty() {
        return Err(AdminError::BadRequest("a plan needs a name".into()));
    }
    if state.tenants.plan_by_name(&new.name).await?.is_some() {
        return Err(AdminError::Conflict(format!(
            "a plan named {} exists",
            new.name
        )));
    }
    let plan = state
        .tenants
        .create_plan(&new.name, new.limits, new.response_cache)
        .await?;
    Ok((StatusCode::CREATED, Json(plan)).into_response())
}

async fn list_prices(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadDirectory)?;
    let book = billing::PriceBook::load(&state.db).await?;
    let mut prices: Vec<&billing::Price> = book.all().collect();
    prices.sort_by(|a, b| (&a.model, a.effective_from).cmp(&(&b.model, b.effective_from)));
    Ok(list(prices))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPrice {
    model: String,
    input_minor_per_mtok: i64,
    output_minor_per_mtok: i64,
    #[serde(default)]
    request_minor_per_mreq: i64,
    /// Rate of prompt tokens read from a worker's prefix cache; the input rate if omitted.
    #[serde(default)]
    cached_input_minor_per_mtok: Option<i64>,
    /// Percent off the charge of batch lines (1–100); none if omitted.
    #[serde(default)]
    batch_discount_pct: Option<i64>,
    #[serde(default = "usd")]
    currency: String,
    /// Unix ms; now if omitted.
    effective_from: Option<i64>,
    /// Volume tiers above the base rates.
    #[serde(default)]
    tiers: Vec<billing::Tier>,
}

fn usd() -> String {
    "USD".to_owned()
}

async fn add_price(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    new: Result<Json<NewPrice>, JsonRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::ManagePrices)?;
    let new = body(new)?;
    let price = billing::Price {
        model: new.model,
        effective_from: new.effective_from.unwrap_or_else(billing::now_ms),
        currency: new.currency,
        input_minor_per_mtok: new.input_minor_per_mtok,
        output_minor_per_mtok: new.output_minor_per_mtok,
        request_minor_per_mreq: new.request_minor_per_mreq,
        cached_input_minor_per_mtok: new.cached_input_minor_per_mtok,
        batch_discount_pct: new.batch_discount_pct,
        tiers: new.tiers,
    };
    let book = billing::PriceBook::load(&state.db).await?;
    if book
        .all()
        .any(|p| p.model == price.model && p.effective_from == price.effective_from)
    {
        return Err(AdminError::Conflict(
            "a version of this model's price starts at that instant".into(),
        ));
    }
    billing::prices::add_price(&state.db, &price).await?;
    tracing::info!(by = %caller.0.sub, model = %price.model, "price version added");
    Ok((StatusCode::CREATED, Json(price)).into_response())
}

async fn list_keys(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadDirectory)?;
    let tenant = tenant_of(&state, &tenant).await?;
    Ok(list(state.tenants.list_keys(&tenant.id).await?))
}

/// A tenant's classifiers as the tenant sees them: status, progress, metrics and loss
/// curve (never examples or weights).
async fn list_classifiers(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadDirectory)?;
    let tenant = tenant_of(&state, &tenant).await?;
    let store = crate::classifiers::ClassifierStore::new(state.db.clone());
    Ok(list(store.list(Some(&tenant.id)).await?))
}

/// A tenant's batches, newest first (the last 100), as the tenant sees them: status,
/// request counts (progress) and files.
async fn list_batches(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadDirectory)?;
    let tenant = tenant_of(&state, &tenant).await?;
    let store = crate::batches::BatchStore::new(state.db.clone());
    let batches = store.list_batches(Some(&tenant.id), 100).await?;
    Ok(list(batches.into_iter().map(|(_, b)| b).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    #[serde(default = "default_name")]
    name: String,
    /// Models the key may use; every model if omitted.
    models: Option<Vec<String>>,
    /// Unix ms after which the key stops working.
    expires_at: Option<i64>,
    #[serde(default)]
    limits: Limits,
}

fn default_name() -> String {
    "default".to_owned()
}

async fn create_key(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path(tenant): Path<String>,
    new: Result<Json<NewKeyBody>, JsonRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::ManageKeys)?;
    let new = body(new)?;
    let tenant = tenant_of(&state, &tenant).await?;
    if new.expires_at.is_some_and(|e| e <= billing::now_ms()) {
        return Err(AdminError::BadRequest("expires_at is in the past".into()));
    }
    let (key, record) = state
        .tenants
        .create_key(
            &tenant.id,
            &NewKey {
                name: new.name,
                allowed_models: new.models,
                expires_at: new.expires_at,
                limits: new.limits,
            },
        )
        .await?;
    tracing::info!(by = %caller.0.sub, key = %record.id, tenant = %tenant.id, "key created");
    let summary = state
        .tenants
        .tenant_key(&tenant.id, &record.id)
        .await?
        .ok_or_else(|| AdminError::Internal("the new key vanished".into()))?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "key": key.expose(), "record": summary })),
    )
        .into_response())
}

async fn get_key(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path((tenant, key)): Path<(String, String)>,
) -> Result<Response, AdminError> {
    caller.need(Permission::ReadDirectory)?;
    let tenant = tenant_of(&state, &tenant).await?;
    let key = state
        .tenants
        .tenant_key(&tenant.id, &key)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no key {key} in tenant {}", tenant.id)))?;
    Ok(Json(key).into_response())
}

async fn revoke_key(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path((tenant, key)): Path<(String, String)>,
) -> Result<Response, AdminError> {
    caller.need(Permission::ManageKeys)?;
    let tenant = tenant_of(&state, &tenant).await?;
    let Some(existing) = state.tenants.tenant_key(&tenant.id, &key).await? else {
        return Err(AdminError::NotFound(format!(
            "no key {key} in tenant {}",
            tenant.id
        )));
    };
    if existing.revoked_at.is_none() {
        state.tenants.revoke_tenant_key(&tenant.id, &key).await?;
        tracing::info!(by = %caller.0.sub, key = %key, "key revoked");
    }
    let summary = state
        .tenants
        .tenant_key(&tenant.id, &key)
        .await?
        .ok_or_else(|| AdminError::Internal("the key vanished".into()))?;
    Ok(Json(summary).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    /// Seconds the old key keeps working (0: revoked now).
    #[serde(default)]
    grace_seconds: i64,
}

async fn rotate_key(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    Path((tenant, key)): Path<(String, String)>,
    rotation: Result<Json<Rotation>, JsonRejection>,
) -> Result<Response, AdminError> {
    caller.need(Permission::ManageKeys)?;
    // An empty body means "no grace".
    let rotation = match rotation {
        Err(JsonRejection::MissingJsonContentType(_)) => Rotation::default(),
        other => body(other)?,
    };
    if !(0..=30 * 86_400).contains(&rotation.grace_seconds) {
        return Err(AdminError::BadRequest(
            "grace_seconds is 0 to 2592000 (30 days)".into(),
        ));
    }
    let tenant = tenant_of(&state, &tenant).await?;
    let (new_key, record) = state
        .tenants
        .rotate_key(&tenant.id, &key, rotation.grace_seconds * 1000)
        .await?;
    tracing::info!(by = %caller.0.sub, old = %key, new = %record.id, "key rotated");
    let summary = state
        .tenants
        .tenant_key(&tenant.id, &record.id)
        .await?
        .ok_or_else(|| AdminError::Internal("the new key vanished".into()))?;
    let old = state.tenants.tenant_key(&tenant.id, &key).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "key": new_key.expose(), "record": summary, "replaced": old })),
    )
        .into_response())
}
