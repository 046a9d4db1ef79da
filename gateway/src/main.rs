//! `gateway`: serves the consumer API, or runs one-off operator commands.

use clap::{Args, Parser, Subcommand};
use gateway::limits::Limits;
use gateway::tenants::{NewKey, TenantStore};
use gateway::{Gateway, GatewayConfig};

#[derive(Parser)]
#[command(
    name = "gateway",
    about = "Metering API gateway for self-hosted models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the consumer API until SIGINT/SIGTERM.
    Serve(GatewayConfig),
    /// Create a tenant (if missing) and a key for it; prints the key once.
    CreateKey {
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://data/gateway.db")]
        database_url: String,
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "default")]
        name: String,
        /// Models the key may use (comma-separated); all if omitted.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Limits of this key alone, on top of its tenant's plan.
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Create a plan: the limits tenants on it are held to.
    CreatePlan {
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://data/gateway.db")]
        database_url: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Put a tenant (created if missing) on a plan.
    SetPlan {
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://data/gateway.db")]
        database_url: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        plan: String,
    },
    /// Add a price version for a model (prices are never edited; a change is a new version).
    AddPrice {
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://data/gateway.db")]
        database_url: String,
        #[arg(long)]
        model: String,
        /// Minor units (e.g. cents) per million prompt tokens.
        #[arg(long)]
        input_per_mtok: i64,
        /// Minor units per million completion tokens.
        #[arg(long)]
        output_per_mtok: i64,
        /// Minor units per million requests.
        #[arg(long, default_value_t = 0)]
        request_per_mreq: i64,
        #[arg(long, default_value = "USD")]
        currency: String,
        /// Unix milliseconds from which this version applies; now if omitted.
        #[arg(long)]
        effective_from: Option<i64>,
    },
    /// Invoices: preview a draft, finalise a past month, list, show, trace lines to requests.
    Invoice {
        #[command(flatten)]
        store: StoreArg,
        #[command(subcommand)]
        action: InvoiceAction,
    },
    /// Export per-call usage records (CSV or JSON), streamed; progress on stderr.
    Export {
        #[command(flatten)]
        store: StoreArg,
        /// Only this tenant (by name); every tenant if omitted.
        #[arg(long)]
        tenant: Option<String>,
        /// Calendar month (UTC), YYYY-MM.
        #[arg(long)]
        period: String,
        #[arg(long, default_value = "csv")]
        format: billing::export::Format,
        /// File to write; standard output if omitted.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Check that records, the usage API, the export and the invoices agree for a month;
    /// exits 1 on any mismatch.
    Reconcile {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        period: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its public id.
    RevokeKey {
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://data/gateway.db")]
        database_url: String,
        #[arg(long)]
        id: String,
    },
}

#[derive(Args, Debug, Clone)]
struct StoreArg {
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://data/gateway.db")]
    database_url: String,
}

#[derive(Subcommand, Debug, Clone)]
enum InvoiceAction {
    /// The draft for a tenant and month, as JSON, from usage not yet invoiced.
    Preview {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        period: String,
    },
    /// Finalise a tenant's invoice for a past month; prints it as JSON.
    Finalise {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        period: String,
    },
    /// A tenant's finalised invoices: id, period, total in minor units.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// A finalised invoice's stored document.
    Show {
        #[arg(long)]
        id: String,
    },
    /// Every record a finalised invoice counted, with its line.
    Trace {
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "csv")]
        format: billing::export::Format,
    },
}

async fn tenant_id(store: &TenantStore, name: &str) -> anyhow::Result<String> {
    match store.tenant_by_name(name).await? {
        Some(t) => Ok(t.id),
        None => anyhow::bail!("no tenant named {name}"),
    }
}

async fn invoice(db: billing::Db, action: InvoiceAction) -> anyhow::Result<()> {
    let store = TenantStore::new(db.clone());
    let invoices = billing::Invoices::new(db.clone());
    match action {
        InvoiceAction::Preview { tenant, period } => {
            let draft = invoices
                .preview(&tenant_id(&store, &tenant).await?, &period)
                .await?;
            println!("{}", serde_json::to_string_pretty(&draft)?);
        }
        InvoiceAction::Finalise { tenant, period } => {
            let invoice = invoices
                .finalise(&tenant_id(&store, &tenant).await?, &period)
                .await?;
            println!("{}", serde_json::to_string_pretty(&invoice)?);
        }
        InvoiceAction::List { tenant } => {
            for (id, period, total) in invoices.list(&tenant_id(&store, &tenant).await?).await? {
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

async fn export(
    db: billing::Db,
    tenant: Option<String>,
    period: &str,
    format: billing::export::Format,
    output: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let tenant_id = match tenant {
        Some(name) => Some(tenant_id(&TenantStore::new(db.clone()), &name).await?),
        None => None,
    };
    let (from_ms, to_ms) = billing::invoices::period_bounds(period)?;
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
    let rows = match output {
        Some(path) => {
            let file = tokio::fs::File::create(&path).await?;
            billing::export::export_usage(&db, &selection, format, file, progress).await?
        }
        None => {
            billing::export::export_usage(&db, &selection, format, tokio::io::stdout(), progress)
                .await?
        }
    };
    eprintln!(
        "\rexported {rows} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Limits; each left out is "no limit".
#[derive(Args, Debug, Clone, Copy)]
struct LimitArgs {
    #[arg(long)]
    rpm: Option<i64>,
    #[arg(long)]
    tpm: Option<i64>,
    /// Concurrent requests.
    #[arg(long)]
    concurrency: Option<i64>,
    /// Tokens per calendar month (UTC).
    #[arg(long)]
    monthly_tokens: Option<i64>,
    /// Spend per calendar month, in minor units (e.g. cents).
    #[arg(long)]
    monthly_spend: Option<i64>,
}

impl From<LimitArgs> for Limits {
    fn from(a: LimitArgs) -> Self {
        Limits {
            requests_per_minute: a.rpm,
            tokens_per_minute: a.tpm,
            max_concurrent: a.concurrency,
            monthly_tokens: a.monthly_tokens,
            monthly_spend_minor: a.monthly_spend,
        }
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        // One clear line for scripts and people; no backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(config) => serve(config).await,
        Command::CreateKey {
            database_url,
            tenant,
            name,
            models,
            limits,
        } => {
            let store = TenantStore::new(billing::Db::connect(&database_url).await?);
            let tenant = match store.tenant_by_name(&tenant).await? {
                Some(t) => t,
                None => store.create_tenant(&tenant).await?,
            };
            let new = NewKey {
                name,
                allowed_models: models,
                expires_at: None,
                limits: limits.into(),
            };
            let (key, record) = store.create_key(&tenant.id, &new).await?;
            eprintln!(
                "created key {} for tenant {} (shown once):",
                record.id, tenant.name
            );
            println!("{}", key.expose());
            Ok(())
        }
        Command::CreatePlan {
            database_url,
            name,
            limits,
        } => {
            let store = TenantStore::new(billing::Db::connect(&database_url).await?);
            let plan = store.create_plan(&name, limits.into()).await?;
            println!("{}", plan.id);
            Ok(())
        }
        Command::SetPlan {
            database_url,
            tenant,
            plan,
        } => {
            let store = TenantStore::new(billing::Db::connect(&database_url).await?);
            let Some(plan) = store.plan_by_name(&plan).await? else {
                anyhow::bail!("no plan named {plan}");
            };
            let tenant = match store.tenant_by_name(&tenant).await? {
                Some(t) => t,
                None => store.create_tenant(&tenant).await?,
            };
            store.set_plan(&tenant.id, Some(&plan.id)).await?;
            eprintln!("tenant {} is on plan {}", tenant.name, plan.name);
            Ok(())
        }
        Command::AddPrice {
            database_url,
            model,
            input_per_mtok,
            output_per_mtok,
            request_per_mreq,
            currency,
            effective_from,
        } => {
            let db = billing::Db::connect(&database_url).await?;
            let price = billing::Price {
                model,
                effective_from: effective_from.unwrap_or_else(billing::now_ms),
                currency,
                input_minor_per_mtok: input_per_mtok,
                output_minor_per_mtok: output_per_mtok,
                request_minor_per_mreq: request_per_mreq,
            };
            billing::prices::add_price(&db, &price).await?;
            eprintln!(
                "price of {} from {} recorded",
                price.model, price.effective_from
            );
            Ok(())
        }
        Command::Invoice { store, action } => {
            invoice(billing::Db::connect(&store.database_url).await?, action).await
        }
        Command::Export {
            store,
            tenant,
            period,
            format,
            output,
        } => {
            let db = billing::Db::connect(&store.database_url).await?;
            export(db, tenant, &period, format, output).await
        }
        Command::Reconcile {
            store,
            period,
            json,
        } => {
            let db = billing::Db::connect(&store.database_url).await?;
            let report = billing::reconcile::reconcile(&db, &period).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for c in &report.checks {
                    let mark = if c.ok { "ok  " } else { "FAIL" };
                    println!("{mark} {} {} ({})", c.tenant_id, c.name, c.detail);
                }
                println!(
                    "{}: {} checks, {} failed",
                    report.period,
                    report.checks.len(),
                    report.checks.iter().filter(|c| !c.ok).count()
                );
            }
            if report.ok() {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::RevokeKey { database_url, id } => {
            let store = TenantStore::new(billing::Db::connect(&database_url).await?);
            if store.revoke_key(&id).await? {
                eprintln!("revoked {id}");
                Ok(())
            } else {
                anyhow::bail!("no active key with id {id}")
            }
        }
    }
}

async fn serve(config: GatewayConfig) -> anyhow::Result<()> {
    let gateway = Gateway::build(&config).await?;
    let addr = gateway.local_addr()?;
    // Launchers and tests read this line to learn the port.
    println!("gateway listening on http://{addr}");
    if let Some(file) = &config.demo_key_file {
        let store = gateway.state().tenants.clone();
        let key = gateway::demo::ensure_demo_key(&store, file).await?;
        println!("demo key: {}", key.expose());
    }
    gateway.run(shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received; draining");
}
