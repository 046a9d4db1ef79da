//! `gateway`: serves the consumer API, or runs one-off operator commands.

use clap::{Parser, Subcommand};
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
    },
    /// Revoke a key by its public id.
    RevokeKey {
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://data/gateway.db")]
        database_url: String,
        #[arg(long)]
        id: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
            };
            let (key, record) = store.create_key(&tenant.id, &new).await?;
            eprintln!(
                "created key {} for tenant {} (shown once):",
                record.id, tenant.name
            );
            println!("{}", key.expose());
            Ok(())
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
