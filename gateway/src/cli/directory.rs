//! The directory commands: tenants, plans and keys.
//!
//! Owns: creating and listing them, putting tenants on plans, rotating and revoking keys,
//! and finding a tenant by name for the other commands. Must never: print a key's secret
//! except once, when it is created.

use gateway::tenants::{NewKey, TenantStore};

use super::args::{
    CreateKey, CreatePlan, ListBatches, ListKeys, RevokeKey, RotateKey, SetPlan, StoreArgs,
};
use super::output;

async fn tenants(store: &StoreArgs) -> anyhow::Result<TenantStore> {
    Ok(TenantStore::new(store.connect().await?))
}

/// The id of the tenant with this name; an error if there is none.
pub async fn tenant_id(store: &TenantStore, name: &str) -> anyhow::Result<String> {
    match store.tenant_by_name(name).await? {
        Some(t) => Ok(t.id),
        None => anyhow::bail!("no tenant named {name}"),
    }
}

/// The id of the named tenant when a name is given.
pub async fn tenant_id_if(db: &billing::Db, name: Option<&str>) -> anyhow::Result<Option<String>> {
    match name {
        Some(name) => Ok(Some(tenant_id(&TenantStore::new(db.clone()), name).await?)),
        None => Ok(None),
    }
}

pub async fn create_key(a: CreateKey, json: bool) -> anyhow::Result<()> {
    let store = tenants(&a.store).await?;
    let tenant = store.ensure_tenant(&a.tenant).await?;
    let new = NewKey {
        name: a.name,
        allowed_models: a.models,
        expires_at: None,
        limits: a.limits.into(),
    };
    let (key, record) = store.create_key(&tenant.id, &new).await?;
    if json {
        return output::json(&serde_json::json!({
            "key": key.expose(), "id": record.id, "tenant_id": tenant.id, "tenant": tenant.name,
        }));
    }
    eprintln!(
        "created key {} for tenant {} (shown once):",
        record.id, tenant.name
    );
    println!("{}", key.expose());
    Ok(())
}

pub async fn create_plan(a: CreatePlan, json: bool) -> anyhow::Result<()> {
    let store = tenants(&a.store).await?;
    if store.plan_by_name(&a.name).await?.is_some() {
        anyhow::bail!("a plan named {} exists", a.name);
    }
    let cache = a
        .response_cache_ttl
        .map(|ttl_s| gateway::tenants::ResponseCachePolicy {
            ttl_s,
            hit_minor_per_mreq: a.cache_hit_per_mreq,
        });
    let plan = store.create_plan(&a.name, a.limits.into(), cache).await?;
    if json {
        return output::json(&plan);
    }
    println!("{}", plan.id);
    Ok(())
}

pub async fn set_plan(a: SetPlan, json: bool) -> anyhow::Result<()> {
    let store = tenants(&a.store).await?;
    let Some(plan) = store.plan_by_name(&a.plan).await? else {
        anyhow::bail!("no plan named {}", a.plan);
    };
    let tenant = store.ensure_tenant(&a.tenant).await?;
    store.set_plan(&tenant.id, Some(&plan.id)).await?;
    if json {
        return output::json(&store.tenant(&tenant.id).await?);
    }
    eprintln!("tenant {} is on plan {}", tenant.name, plan.name);
    Ok(())
}

pub async fn list_tenants(a: StoreArgs, json: bool) -> anyhow::Result<()> {
    let list = tenants(&a).await?.list_tenants().await?;
    output::rows(json, &list, |t| Ok(output::tenant(t)))
}

pub async fn list_plans(a: StoreArgs, json: bool) -> anyhow::Result<()> {
    let list = tenants(&a).await?.list_plans().await?;
    output::rows(json, &list, output::plan)
}

pub async fn list_keys(a: ListKeys, json: bool) -> anyhow::Result<()> {
    let store = tenants(&a.store).await?;
    let keys = store
        .list_keys(&tenant_id(&store, &a.tenant).await?)
        .await?;
    let now = billing::now_ms();
    output::rows(json, &keys, |k| Ok(output::key(k, now)))
}

/// A batch with its tenant, as `list-batches --json` prints it.
#[derive(serde::Serialize)]
struct TenantBatch {
    tenant_id: String,
    #[serde(flatten)]
    batch: gateway::batches::BatchObject,
}

pub async fn list_batches(a: ListBatches, json: bool) -> anyhow::Result<()> {
    let db = a.store.connect().await?;
    let tenant = tenant_id_if(&db, a.tenant.as_deref()).await?;
    let batches = gateway::batches::BatchStore::new(db)
        .list_batches(tenant.as_deref(), a.limit.clamp(1, 1000))
        .await?;
    let rows: Vec<TenantBatch> = batches
        .into_iter()
        .map(|(tenant_id, batch)| TenantBatch { tenant_id, batch })
        .collect();
    output::rows(json, &rows, |r| Ok(output::batch(&r.tenant_id, &r.batch)))
}

pub async fn rotate_key(a: RotateKey, json: bool) -> anyhow::Result<()> {
    let store = tenants(&a.store).await?;
    let id = a.id;
    let Some(old) = store.key(&id).await? else {
        anyhow::bail!("no key with id {id}");
    };
    let (key, record) = store
        .rotate_key(&old.tenant_id, &id, a.grace_secs.saturating_mul(1000))
        .await?;
    if json {
        return output::json(
            &serde_json::json!({"key": key.expose(), "id": record.id, "replaced": id}),
        );
    }
    eprintln!("key {id} replaced by {} (shown once):", record.id);
    println!("{}", key.expose());
    Ok(())
}

pub async fn revoke_key(a: RevokeKey, json: bool) -> anyhow::Result<()> {
    let store = tenants(&a.store).await?;
    let id = a.id;
    if !store.revoke_key(&id).await? {
        anyhow::bail!("no active key with id {id}");
    }
    if json {
        return output::json(&store.key(&id).await?.map(|k| {
            serde_json::json!({"id": k.id, "tenant_id": k.tenant_id, "revoked_at": k.revoked_at})
        }));
    }
    eprintln!("revoked {id}");
    Ok(())
}
