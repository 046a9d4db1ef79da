//! The finance commands: prices, invoices, the usage export and reconciliation.
//!
//! Owns: handing each to billing and printing what it returns. Must never: compute money
//! or edit a price or a finalised invoice; billing does the arithmetic and keeps both
//! append-only.

use gateway::tenants::TenantStore;

use super::args::{AddPrice, Export, Invoice, InvoiceAction, Reconcile, StoreArgs};
use super::directory::{tenant_id, tenant_id_if};
use super::output;

pub async fn add_price(a: AddPrice, json: bool) -> anyhow::Result<()> {
    let db = a.store.connect().await?;
    let price = billing::Price {
        model: a.model,
        effective_from: a.effective_from.unwrap_or_else(billing::now_ms),
        currency: a.currency,
        input_minor_per_mtok: a.input_per_mtok,
        output_minor_per_mtok: a.output_per_mtok,
        request_minor_per_mreq: a.request_per_mreq,
        cached_input_minor_per_mtok: a.cached_input_per_mtok,
        batch_discount_pct: a.batch_discount_pct,
        tiers: a.tiers,
    };
    billing::prices::add_price(&db, &price).await?;
    if json {
        return output::json(&price);
    }
    eprintln!(
        "price of {} from {} recorded",
        price.model, price.effective_from
    );
    Ok(())
}

/// Every price version, by model and then start.
pub async fn list_prices(a: StoreArgs, json: bool) -> anyhow::Result<()> {
    let book = billing::PriceBook::load(&a.connect().await?).await?;
    let mut prices: Vec<&billing::Price> = book.all().collect();
    prices.sort_by(|a, b| (&a.model, a.effective_from).cmp(&(&b.model, b.effective_from)));
    output::rows(json, &prices, |p| Ok(output::price(p)))
}

pub async fn invoice(a: Invoice, json: bool) -> anyhow::Result<()> {
    let db = a.store.connect().await?;
    let store = TenantStore::new(db.clone());
    let invoices = billing::Invoices::new(db.clone());
    match a.action {
        InvoiceAction::Preview { tenant, period } => {
            let draft = invoices
                .preview(&tenant_id(&store, &tenant).await?, &period)
                .await?;
            output::json(&draft)?;
        }
        InvoiceAction::Finalise { tenant, period } => {
            let invoice = invoices
                .finalise(&tenant_id(&store, &tenant).await?, &period)
                .await?;
            output::json(&invoice)?;
        }
        InvoiceAction::List { tenant } => {
            let list = invoices.list(&tenant_id(&store, &tenant).await?).await?;
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|(id, period, total)| {
                        serde_json::json!({"id": id, "period": period, "total_minor": total})
                    })
                    .collect();
                return output::json(&rows);
            }
            for (id, period, total) in list {
                println!("{id}\t{period}\t{total}");
            }
        }
        InvoiceAction::Show { id } => match invoices.document(&id).await? {
            Some(doc) => println!("{doc}"),
            None => anyhow::bail!("no finalised invoice {id}"),
        },
        InvoiceAction::Trace { id, format } => {
            let out = tokio::io::stdout();
            if billing::export::export_invoice_trace(&db, &id, format, out)
                .await?
                .is_none()
            {
                anyhow::bail!("no finalised invoice {id}");
            }
        }
    }
    Ok(())
}

pub async fn export(a: Export) -> anyhow::Result<()> {
    let db = a.store.connect().await?;
    let tenant_id = tenant_id_if(&db, a.tenant.as_deref()).await?;
    let (from_ms, to_ms) = billing::invoices::period_bounds(&a.period)?;
    let selection = billing::export::UsageSelection {
        tenant_id,
        from_ms,
        to_ms,
    };
    let started = std::time::Instant::now();
    let progress = |rows: u64| {
        eprint!(
            "\rexported {rows} records in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    };
    let rows = match a.output {
        Some(path) => {
            let file = tokio::fs::File::create(&path).await?;
            billing::export::export_usage(&db, &selection, a.format, file, progress).await?
        }
        None => {
            let out = tokio::io::stdout();
            billing::export::export_usage(&db, &selection, a.format, out, progress).await?
        }
    };
    eprintln!(
        "\rexported {rows} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints the report; exits with status 1 if any check failed.
pub async fn reconcile(a: Reconcile, json: bool) -> anyhow::Result<()> {
    let db = a.store.connect().await?;
    let report = billing::reconcile::reconcile(&db, &a.period).await?;
    if json || a.json {
        output::json(&report)?;
    } else {
        output::reconcile(&report);
    }
    if !report.ok() {
        std::process::exit(1)
    }
    Ok(())
}
