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
    /// Print results as JSON (one document on stdout) for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the consumer API until SIGINT/SIGTERM.
    Serve(Box<GatewayConfig>),
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
        /// A volume tier, `FROM_TOKENS:INPUT_PER_MTOK:OUTPUT_PER_MTOK` (repeatable): from that
        /// many tokens of a month's volume on, these rates apply.
        #[arg(long = "tier", value_parser = parse_tier)]
        tiers: Vec<billing::Tier>,
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
    /// List tenants with their plans.
    ListTenants {
        #[command(flatten)]
        store: StoreArg,
    },
    /// List plans and their limits.
    ListPlans {
        #[command(flatten)]
        store: StoreArg,
    },
    /// List every price version.
    ListPrices {
        #[command(flatten)]
        store: StoreArg,
    },
    /// List a tenant's keys (never secrets).
    ListKeys {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        tenant: String,
    },
    /// Replace a key with a new one of the same settings; prints the new key once.
    RotateKey {
        #[command(flatten)]
        store: StoreArg,
        /// The key's public id.
        #[arg(long)]
        id: String,
        /// Seconds the old key keeps working (0: revoked now).
        #[arg(long, default_value_t = 0)]
        grace_secs: i64,
    },
    /// Usage and spend per hour or day (UTC).
    Usage {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        filter: UsageArgs,
        #[arg(long, default_value = "day")]
        bucket: BucketArg,
        /// Break down by tenant, key or model.
        #[arg(long)]
        group_by: Option<DimensionArg>,
    },
    /// The biggest tenants, keys or models by spend, then tokens.
    Top {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        filter: UsageArgs,
        #[arg(long)]
        by: DimensionArg,
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// Print an admin API token (JWT) signed with the gateway's admin secret.
    AdminToken {
        #[arg(long)]
        role: gateway::admin::Role,
        /// Who the token is for (shown in audit logs).
        #[arg(long, default_value = "cli")]
        subject: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        #[arg(long, env = "GATEWAY_ADMIN_JWT_SECRET", hide_env_values = true)]
        admin_jwt_secret: Option<gateway::admin::Secret>,
        #[arg(long, env = "GATEWAY_ADMIN_JWT_SECRET_FILE")]
        admin_jwt_secret_file: Option<std::path::PathBuf>,
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
struct UsageArgs {
    /// Only this tenant (by name).
    #[arg(long)]
    tenant: Option<String>,
    /// Only this key (public id).
    #[arg(long)]
    key: Option<String>,
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Unix seconds, inclusive; default 30 days before --to.
    #[arg(long)]
    from: Option<i64>,
    /// Unix seconds, exclusive; default now.
    #[arg(long)]
    to: Option<i64>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum BucketArg {
    Hour,
    Day,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum DimensionArg {
    Tenant,
    Key,
    Model,
}

impl From<DimensionArg> for billing::series::Dimension {
    fn from(d: DimensionArg) -> Self {
        match d {
            DimensionArg::Tenant => Self::Tenant,
            DimensionArg::Key => Self::Key,
            DimensionArg::Model => Self::Model,
        }
    }
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

async fn invoice(db: billing::Db, action: InvoiceAction, json: bool) -> anyhow::Result<()> {
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
            let list = invoices.list(&tenant_id(&store, &tenant).await?).await?;
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|(id, period, total)| {
                        serde_json::json!({"id": id, "period": period, "total_minor": total})
                    })
                    .collect();
                return print_json(&rows);
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

/// The request path allocates and frees many small buffers across threads (bodies, headers,
/// JSON values); glibc's allocator spent ~13 % of the gateway's CPU in `malloc`/`free` at
/// full load, mimalloc's thread-local free lists much less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let cli = Cli::parse();
    let json = cli.json;
    let connect = |url: &str| {
        let url = url.to_owned();
        async move { billing::Db::connect(&url).await }
    };
    match cli.command {
        Command::Serve(config) => serve(*config).await,
        Command::CreateKey {
            database_url,
            tenant,
            name,
            models,
            limits,
        } => {
            let store = TenantStore::new(connect(&database_url).await?);
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
            if json {
                print_json(&serde_json::json!({
                    "key": key.expose(), "id": record.id, "tenant_id": tenant.id, "tenant": tenant.name,
                }))?;
            } else {
                eprintln!(
                    "created key {} for tenant {} (shown once):",
                    record.id, tenant.name
                );
                println!("{}", key.expose());
            }
            Ok(())
        }
        Command::CreatePlan {
            database_url,
            name,
            limits,
        } => {
            let store = TenantStore::new(connect(&database_url).await?);
            if store.plan_by_name(&name).await?.is_some() {
                anyhow::bail!("a plan named {name} exists");
            }
            let plan = store.create_plan(&name, limits.into()).await?;
            if json {
                print_json(&plan)?;
            } else {
                println!("{}", plan.id);
            }
            Ok(())
        }
        Command::SetPlan {
            database_url,
            tenant,
            plan,
        } => {
            let store = TenantStore::new(connect(&database_url).await?);
            let Some(plan) = store.plan_by_name(&plan).await? else {
                anyhow::bail!("no plan named {plan}");
            };
            let tenant = match store.tenant_by_name(&tenant).await? {
                Some(t) => t,
                None => store.create_tenant(&tenant).await?,
            };
            store.set_plan(&tenant.id, Some(&plan.id)).await?;
            if json {
                print_json(&store.tenant(&tenant.id).await?)?;
            } else {
                eprintln!("tenant {} is on plan {}", tenant.name, plan.name);
            }
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
            tiers,
        } => {
            let db = connect(&database_url).await?;
            let price = billing::Price {
                model,
                effective_from: effective_from.unwrap_or_else(billing::now_ms),
                currency,
                input_minor_per_mtok: input_per_mtok,
                output_minor_per_mtok: output_per_mtok,
                request_minor_per_mreq: request_per_mreq,
                tiers,
            };
            billing::prices::add_price(&db, &price).await?;
            if json {
                print_json(&price)?;
            } else {
                eprintln!(
                    "price of {} from {} recorded",
                    price.model, price.effective_from
                );
            }
            Ok(())
        }
        Command::Invoice { store, action } => {
            invoice(connect(&store.database_url).await?, action, json).await
        }
        Command::Export {
            store,
            tenant,
            period,
            format,
            output,
        } => {
            let db = connect(&store.database_url).await?;
            export(db, tenant, &period, format, output).await
        }
        Command::Reconcile {
            store,
            period,
            json: own_json,
        } => {
            let db = connect(&store.database_url).await?;
            let report = billing::reconcile::reconcile(&db, &period).await?;
            if json || own_json {
                print_json(&report)?;
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
        Command::ListTenants { store } => {
            let tenants = TenantStore::new(connect(&store.database_url).await?)
                .list_tenants()
                .await?;
            if json {
                return print_json(&tenants);
            }
            for t in tenants {
                println!(
                    "{}\t{}\t{}",
                    t.id,
                    t.name,
                    t.plan_name.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        Command::ListPlans { store } => {
            let plans = TenantStore::new(connect(&store.database_url).await?)
                .list_plans()
                .await?;
            if json {
                return print_json(&plans);
            }
            for p in plans {
                println!(
                    "{}\t{}\t{}",
                    p.id,
                    p.name,
                    serde_json::to_string(&p.limits)?
                );
            }
            Ok(())
        }
        Command::ListPrices { store } => {
            let book = billing::PriceBook::load(&connect(&store.database_url).await?).await?;
            let mut prices: Vec<&billing::Price> = book.all().collect();
            prices.sort_by(|a, b| (&a.model, a.effective_from).cmp(&(&b.model, b.effective_from)));
            if json {
                return print_json(&prices);
            }
            for p in prices {
                println!(
                    "{}\t{}\t{} {}/Mtok in\t{} {}/Mtok out\t{} {}/Mreq",
                    p.model,
                    p.effective_from,
                    p.input_minor_per_mtok,
                    p.currency,
                    p.output_minor_per_mtok,
                    p.currency,
                    p.request_minor_per_mreq,
                    p.currency
                );
            }
            Ok(())
        }
        Command::ListKeys { store, tenant } => {
            let store = TenantStore::new(connect(&store.database_url).await?);
            let keys = store.list_keys(&tenant_id(&store, &tenant).await?).await?;
            if json {
                return print_json(&keys);
            }
            let now = billing::now_ms();
            for k in keys {
                let state = if k.revoked_at.is_some() {
                    "revoked"
                } else if k.expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!("{}\t{}\t{}", k.id, k.name, state);
            }
            Ok(())
        }
        Command::RotateKey {
            store,
            id,
            grace_secs,
        } => {
            let store = TenantStore::new(connect(&store.database_url).await?);
            let Some(old) = store.key(&id).await? else {
                anyhow::bail!("no key with id {id}");
            };
            let (key, record) = store
                .rotate_key(&old.tenant_id, &id, grace_secs.saturating_mul(1000))
                .await?;
            if json {
                print_json(
                    &serde_json::json!({"key": key.expose(), "id": record.id, "replaced": id}),
                )?;
            } else {
                eprintln!("key {id} replaced by {} (shown once):", record.id);
                println!("{}", key.expose());
            }
            Ok(())
        }
        Command::Usage {
            store,
            filter,
            bucket,
            group_by,
        } => {
            let db = connect(&store.database_url).await?;
            let f = usage_filter(&db, filter).await?;
            let bucket = match bucket {
                BucketArg::Hour => billing::series::Bucket::Hour,
                BucketArg::Day => billing::series::Bucket::Day,
            };
            let points =
                billing::series::usage_series(&db, &f, bucket, group_by.map(Into::into)).await?;
            if json {
                return print_json(&points);
            }
            println!("start\tgroup\trequests\tprompt_tokens\tcompletion_tokens\tspend_micros");
            for p in points {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    bucket_start(p.start_ms),
                    p.group.as_deref().unwrap_or("-"),
                    p.requests,
                    p.prompt_tokens,
                    p.completion_tokens,
                    p.spend_micros
                );
            }
            Ok(())
        }
        Command::Top {
            store,
            filter,
            by,
            limit,
        } => {
            let db = connect(&store.database_url).await?;
            let f = usage_filter(&db, filter).await?;
            let top = billing::series::top(&db, &f, by.into(), limit).await?;
            if json {
                return print_json(&top);
            }
            for e in top {
                println!(
                    "{}\t{} requests\t{} tokens\t{} micros",
                    e.id,
                    e.requests,
                    e.prompt_tokens + e.completion_tokens,
                    e.spend_micros
                );
            }
            Ok(())
        }
        Command::AdminToken {
            role,
            subject,
            ttl_secs,
            admin_jwt_secret,
            admin_jwt_secret_file,
        } => {
            let Some(secret) = gateway::admin::token::resolve_secret(
                admin_jwt_secret.as_ref(),
                admin_jwt_secret_file.as_deref(),
            )
            .map_err(anyhow::Error::msg)?
            else {
                anyhow::bail!(
                    "no admin secret: set GATEWAY_ADMIN_JWT_SECRET_FILE or --admin-jwt-secret-file"
                );
            };
            let token = gateway::admin::TokenAuthority::new(&secret)
                .issue(&subject, role, ttl_secs)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                print_json(
                    &serde_json::json!({"token": token, "role": role, "expires_in": ttl_secs}),
                )?;
            } else {
                println!("{token}");
            }
            Ok(())
        }
        Command::RevokeKey { database_url, id } => {
            let store = TenantStore::new(connect(&database_url).await?);
            if store.revoke_key(&id).await? {
                if json {
                    print_json(&store.key(&id).await?.map(|k| {
                        serde_json::json!({"id": k.id, "tenant_id": k.tenant_id, "revoked_at": k.revoked_at})
                    }))?;
                } else {
                    eprintln!("revoked {id}");
                }
                Ok(())
            } else {
                anyhow::bail!("no active key with id {id}")
            }
        }
    }
}

fn parse_tier(s: &str) -> Result<billing::Tier, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [from, input, output] = parts.as_slice() else {
        return Err("a tier is FROM_TOKENS:INPUT_PER_MTOK:OUTPUT_PER_MTOK".into());
    };
    let num = |v: &str| {
        v.parse::<i64>()
            .map_err(|_| format!("`{v}` is not a whole number"))
    };
    Ok(billing::Tier {
        from_tokens: num(from)?,
        input_minor_per_mtok: num(input)?,
        output_minor_per_mtok: num(output)?,
    })
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A bucket start as `YYYY-MM-DDTHH:00Z`.
fn bucket_start(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:00Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour()
    )
}

async fn usage_filter(
    db: &billing::Db,
    a: UsageArgs,
) -> anyhow::Result<billing::series::UsageFilter> {
    let tenant_id = match a.tenant {
        Some(name) => Some(tenant_id(&TenantStore::new(db.clone()), &name).await?),
        None => None,
    };
    let to = a.to.unwrap_or(gateway::unix_now() as i64 + 1);
    let from = a.from.unwrap_or(to - 30 * 86_400);
    if to <= from || from < 0 {
        anyhow::bail!("--from must be before --to (Unix seconds)");
    }
    Ok(billing::series::UsageFilter {
        tenant_id,
        key_id: a.key,
        model: a.model,
        from_ms: from * 1000,
        to_ms: to * 1000,
    })
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
