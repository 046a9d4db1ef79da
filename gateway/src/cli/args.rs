//! The command line: every subcommand with its flags and their environment variables.
//!
//! Owns: the clap tree, the one store argument the operator commands share, and turning
//! flag values into the types the commands use (limits, tiers, buckets, dimensions).
//! Must never: query the store or print; the commands do.

use clap::{Args, Parser, Subcommand};
use gateway::limits::Limits;
use gateway::GatewayConfig;

#[derive(Parser)]
#[command(
    name = "gateway",
    about = "Metering API gateway for self-hosted models"
)]
pub struct Cli {
    /// Print results as JSON (one document on stdout) for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the consumer API until SIGINT/SIGTERM.
    Serve(Box<GatewayConfig>),
    /// Create a tenant (if missing) and a key for it; prints the key once.
    CreateKey(CreateKey),
    /// Create a plan: the limits tenants on it are held to.
    CreatePlan(CreatePlan),
    /// Put a tenant (created if missing) on a plan.
    SetPlan(SetPlan),
    /// Add a price version for a model (prices are never edited; a change is a new version).
    AddPrice(AddPrice),
    /// Invoices: preview a draft, finalise a past month, list, show, trace lines to requests.
    Invoice(Invoice),
    /// Export per-call usage records (CSV or JSON), streamed; progress on stderr.
    Export(Export),
    /// Check that records, the usage API, the export and the invoices agree for a month;
    /// exits 1 on any mismatch.
    Reconcile(Reconcile),
    /// List tenants with their plans.
    ListTenants(StoreArgs),
    /// List plans and their limits.
    ListPlans(StoreArgs),
    /// List every price version.
    ListPrices(StoreArgs),
    /// List a tenant's keys (never secrets).
    ListKeys(ListKeys),
    /// Replace a key with a new one of the same settings; prints the new key once.
    RotateKey(RotateKey),
    /// Usage and spend per hour or day (UTC).
    Usage(Usage),
    /// The biggest tenants, keys or models by spend, then tokens.
    Top(Top),
    /// Print an admin API token (JWT) signed with the gateway's admin secret.
    AdminToken(AdminToken),
    /// Revoke an admin API token by its `jti`; every gateway refuses it from then on.
    RevokeAdminToken(RevokeAdminToken),
    /// Revoke a key by its public id.
    RevokeKey(RevokeKey),
    /// Train a classifier on labelled examples from a CSV (`text,label` header) or JSONL
    /// (`{"text": ..., "label": ...}` per line) file, through a gateway's consumer API with
    /// a key, showing its progress until it is ready.
    CreateClassifier(CreateClassifier),
    /// Batches, newest first, of one tenant or every tenant: status and progress.
    ListBatches(ListBatches),
    /// Apply the store's migrations and exit (once per release, before gateways start with
    /// `--skip-migrations`). On Postgres, connect directly or through a session-mode
    /// pooler: the migration holds a session lock.
    Migrate(StoreArgs),
    /// Ship the usage a stopped gateway left in its spool folder to the store, then exit:
    /// for a replica's volume after it is scaled away. Never run it on a folder a running
    /// gateway uses.
    ShipSpool(ShipSpool),
}

// The per-command structs carry no doc comment of their own: the variant's is the help.

#[derive(Args, Debug, Clone)]
pub struct CreateClassifier {
    /// The gateway's consumer API.
    #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API key of the tenant the classifier is for.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub key: String,
    /// The embedding model to train on.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub name: String,
    /// `.csv` or `.jsonl` (by extension).
    #[arg(long)]
    pub file: std::path::PathBuf,
    /// Training options as JSON (e.g. `{"hidden_units": 0, "seed": 7}`).
    #[arg(long)]
    pub options: Option<String>,
    /// Return once created, without waiting for training.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    #[arg(long, env = "DATABASE_URL", default_value = gateway::config::DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

impl StoreArgs {
    pub async fn connect(&self) -> anyhow::Result<billing::Db> {
        Ok(billing::Db::connect(&self.database_url).await?)
    }
}

#[derive(Args, Debug, Clone)]
pub struct CreateKey {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub tenant: String,
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Models the key may use (comma-separated); all if omitted.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Limits of this key alone, on top of its tenant's plan.
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Args, Debug, Clone)]
pub struct CreatePlan {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Opts the plan's tenants in to the response cache, entries living this many seconds.
    #[arg(long)]
    pub response_cache_ttl: Option<i64>,
    /// Minor units per million responses served from the response cache (0: free).
    #[arg(long, default_value_t = 0, requires = "response_cache_ttl")]
    pub cache_hit_per_mreq: i64,
}

#[derive(Args, Debug, Clone)]
pub struct SetPlan {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub tenant: String,
    #[arg(long)]
    pub plan: String,
}

#[derive(Args, Debug, Clone)]
pub struct AddPrice {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub model: String,
    /// Minor units (e.g. cents) per million prompt tokens.
    #[arg(long)]
    pub input_per_mtok: i64,
    /// Minor units per million completion tokens.
    #[arg(long)]
    pub output_per_mtok: i64,
    /// Minor units per million requests.
    #[arg(long, default_value_t = 0)]
    pub request_per_mreq: i64,
    /// Minor units per million prompt tokens read from a worker's prefix cache; without it
    /// they cost the input rate.
    #[arg(long)]
    pub cached_input_per_mtok: Option<i64>,
    /// Percent taken off the charge of batch lines (1–100); without it they cost what
    /// interactive calls do.
    #[arg(long)]
    pub batch_discount_pct: Option<i64>,
    #[arg(long, default_value = "USD")]
    pub currency: String,
    /// Unix milliseconds from which this version applies; now if omitted.
    #[arg(long)]
    pub effective_from: Option<i64>,
    /// A volume tier, `FROM_TOKENS:INPUT_PER_MTOK:OUTPUT_PER_MTOK` (repeatable): from that
    /// many tokens of a month's volume on, these rates apply.
    #[arg(long = "tier", value_parser = parse_tier)]
    pub tiers: Vec<billing::Tier>,
}

#[derive(Args, Debug, Clone)]
pub struct Invoice {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(subcommand)]
    pub action: InvoiceAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum InvoiceAction {
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

#[derive(Args, Debug, Clone)]
pub struct Export {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Only this tenant (by name); every tenant if omitted.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Calendar month (UTC), YYYY-MM.
    #[arg(long)]
    pub period: String,
    #[arg(long, default_value = "csv")]
    pub format: billing::export::Format,
    /// File to write; standard output if omitted.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct Reconcile {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub period: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ListKeys {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub tenant: String,
}

#[derive(Args, Debug, Clone)]
pub struct ListBatches {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Only this tenant's (by name).
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
}

#[derive(Args, Debug, Clone)]
pub struct RotateKey {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The key's public id.
    #[arg(long)]
    pub id: String,
    /// Seconds the old key keeps working (0: revoked now).
    #[arg(long, default_value_t = 0)]
    pub grace_secs: i64,
}

#[derive(Args, Debug, Clone)]
pub struct ShipSpool {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The spool folder (a gateway's `--spool-dir`).
    #[arg(long, env = "GATEWAY_SPOOL_DIR")]
    pub spool_dir: std::path::PathBuf,
    /// How long to keep trying while the store cannot be reached, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

#[derive(Args, Debug, Clone)]
pub struct RevokeKey {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct Usage {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub filter: UsageArgs,
    #[arg(long, default_value = "day")]
    pub bucket: BucketArg,
    /// Break down by tenant, key or model.
    #[arg(long)]
    pub group_by: Option<DimensionArg>,
}

#[derive(Args, Debug, Clone)]
pub struct Top {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub filter: UsageArgs,
    #[arg(long)]
    pub by: DimensionArg,
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
}

#[derive(Args, Debug, Clone)]
pub struct AdminToken {
    #[arg(long)]
    pub role: gateway::admin::Role,
    /// Who the token is for (shown in audit logs).
    #[arg(long, default_value = "cli")]
    pub subject: String,
    /// Lifetime in seconds (at most --admin-token-max-lifetime-secs).
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
    #[arg(
        long,
        env = "GATEWAY_ADMIN_TOKEN_MAX_LIFETIME_SECS",
        default_value_t = gateway::admin::token::DEFAULT_MAX_LIFETIME_SECS
    )]
    pub admin_token_max_lifetime_secs: u64,
    #[arg(long, env = "GATEWAY_ADMIN_JWT_SECRET", hide_env_values = true)]
    pub admin_jwt_secret: Option<gateway::admin::Secret>,
    #[arg(long, env = "GATEWAY_ADMIN_JWT_SECRET_FILE")]
    pub admin_jwt_secret_file: Option<std::path::PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RevokeAdminToken {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The token's `jti` (printed by `admin-token --json`).
    #[arg(long)]
    pub jti: String,
}

#[derive(Args, Debug, Clone)]
pub struct UsageArgs {
    /// Only this tenant (by name).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this key (public id).
    #[arg(long)]
    pub key: Option<String>,
    /// Only this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Unix seconds, inclusive; default 30 days before --to.
    #[arg(long)]
    pub from: Option<i64>,
    /// Unix seconds, exclusive; default now.
    #[arg(long)]
    pub to: Option<i64>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum BucketArg {
    Hour,
    Day,
}

impl From<BucketArg> for billing::series::Bucket {
    fn from(b: BucketArg) -> Self {
        match b {
            BucketArg::Hour => Self::Hour,
            BucketArg::Day => Self::Day,
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum DimensionArg {
    Tenant,
    Key,
    Model,
    /// Batch lines apart from interactive calls.
    Batch,
}

impl From<DimensionArg> for billing::series::Dimension {
    fn from(d: DimensionArg) -> Self {
        match d {
            DimensionArg::Tenant => Self::Tenant,
            DimensionArg::Key => Self::Key,
            DimensionArg::Model => Self::Model,
            DimensionArg::Batch => Self::Batch,
        }
    }
}

/// Limits; each left out is "no limit".
#[derive(Args, Debug, Clone, Copy)]
pub struct LimitArgs {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a failure

    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn a_tier_is_three_whole_numbers() {
        let tier = super::parse_tier("1000:5:10").unwrap();
        assert_eq!(
            (
                tier.from_tokens,
                tier.input_minor_per_mtok,
                tier.output_minor_per_mtok
            ),
            (1000, 5, 10)
        );
        assert!(super::parse_tier("1000:5").is_err());
        assert!(super::parse_tier("1000:x:10").is_err());
    }
}
