//! Usage over time, leader boards, worker health and traffic.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use billing::series::{Bucket, Dimension, UsageFilter};
use serde::Deserialize;

use super::{query, seconds_or, AdminError, AdminState, Permission, Principal};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/admin/v1/usage", get(usage))
        .route("/admin/v1/usage/top", get(top))
        .route("/admin/v1/workers", get(workers))
        .route("/admin/v1/traffic", get(traffic))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    /// Unix seconds, inclusive; default 30 days before `to`.
    from: Option<i64>,
    /// Unix seconds, exclusive; default now.
    to: Option<i64>,
    bucket: Option<Bucket>,
    tenant: Option<String>,
    key: Option<String>,
    model: Option<String>,
    group_by: Option<Dimension>,
}

fn filter(
    from: Option<i64>,
    to: Option<i64>,
    tenant: Option<String>,
    key: Option<String>,
    model: Option<String>,
) -> Result<UsageFilter, AdminError> {
    let to = seconds_or(to, billing::now_ms() / 1000 + 1)?;
    let from = seconds_or(from, to - 30 * 86_400)?.max(0);
    if to <= from {
        return Err(AdminError::BadRequest("`from` must be before `to`".into()));
    }
    Ok(UsageFilter {
        tenant_id: tenant,
        key_id: key,
        model,
        from_ms: from.saturating_mul(1000),
        to_ms: to.saturating_mul(1000),
    })
}

async fn usage(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadUsage)?;
    let q = query(q)?;
    let bucket = q.bucket.unwrap_or(Bucket::Day);
    let f = filter(q.from, q.to, q.tenant, q.key, q.model)?;
    let points = billing::series::usage_series(&state.db, &f, bucket, q.group_by).await?;
    let sum = |g: fn(&billing::series::Point) -> i64| points.iter().map(g).sum::<i64>();
    let totals = serde_json::json!({
        "requests": sum(|p| p.requests),
        "prompt_tokens": sum(|p| p.prompt_tokens),
        "completion_tokens": sum(|p| p.completion_tokens),
        "cached_tokens": sum(|p| p.cached_tokens),
        "cache_hits": sum(|p| p.cache_hits),
        "unbilled_requests": sum(|p| p.unbilled_requests),
        "spend_micros": sum(|p| p.spend_micros),
    });
    Ok(Json(serde_json::json!({
        "object": "usage_series",
        "bucket": bucket,
        "group_by": q.group_by,
        "from": f.from_ms / 1000,
        "to": f.to_ms / 1000,
        "data": points,
        "totals": totals,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopQuery {
    by: Dimension,
    from: Option<i64>,
    to: Option<i64>,
    tenant: Option<String>,
    limit: Option<usize>,
}

async fn top(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
    q: Result<Query<TopQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadUsage)?;
    let q = query(q)?;
    let limit = q.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(AdminError::BadRequest("limit is 1 to 100".into()));
    }
    let f = filter(q.from, q.to, q.tenant.clone(), None, None)?;
    let entries = billing::series::top(&state.db, &f, q.by, limit).await?;
    // Names for people; ids stay the identity.
    let names: HashMap<String, String> = match q.by {
        Dimension::Tenant => state
            .tenants
            .list_tenants()
            .await?
            .into_iter()
            .map(|t| (t.id, t.name))
            .collect(),
        Dimension::Key => {
            let mut names = HashMap::new();
            for e in &entries {
                if let Some(k) = state.tenants.key(&e.id).await? {
                    names.insert(e.id.clone(), k.name);
                }
            }
            names
        }
        Dimension::Model | Dimension::Batch => HashMap::new(),
    };
    let data: Vec<serde_json::Value> = entries
        .into_iter()
        .map(|e| {
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            if let Some(name) = names.get(&e.id) {
                v["name"] = serde_json::Value::String(name.clone());
            }
            v
        })
        .collect();
    Ok(Json(serde_json::json!({
        "object": "usage_top",
        "by": q.by,
        "from": f.from_ms / 1000,
        "to": f.to_ms / 1000,
        "data": data,
    })))
}

async fn workers(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadOperations)?;
    let data: Vec<serde_json::Value> = state
        .pool
        .nodes()
        .iter()
        .map(|n| {
            serde_json::json!({
                "url": n.base_url,
                "healthy": n.is_healthy(),
                "outstanding_requests": n.outstanding(),
                "models": n.served_models(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "data": data })))
}

async fn traffic(
    caller: Principal,
    State(state): State<Arc<AdminState>>,
) -> Result<Json<serde_json::Value>, AdminError> {
    caller.need(Permission::ReadOperations)?;
    Ok(Json(serde_json::json!({
        "scope": "this gateway process since it started",
        "data": state.metrics.traffic(),
        "response_cache": state.response_cache.as_ref().map(|c| c.stats()),
    })))
}
