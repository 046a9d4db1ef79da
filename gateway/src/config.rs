//! Gateway configuration: flags, each with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, FromArgMatches};

/// The store when none is given: an SQLite file under `data/`.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/gateway.db";

#[derive(Debug, Clone, Args)]
pub struct GatewayConfig {
    /// Address for the consumer API; port 0 picks a free port (printed at start).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address for Prometheus `/metrics` (kept off the consumer listener).
    #[arg(long, env = "GATEWAY_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,

    /// The store: `sqlite://PATH` (embedded) or `postgres://...`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// Folder of the durable usage spool (one per gateway process).
    #[arg(long, env = "GATEWAY_SPOOL_DIR", default_value = "data/spool")]
    pub spool_dir: PathBuf,

    /// Bytes after which the spool starts a new segment file.
    #[arg(long, env = "GATEWAY_SPOOL_SEGMENT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub spool_segment_bytes: u64,

    /// Under load, the longest the spool waits before an fsync so that one covers more
    /// usage events (microseconds; 0 never waits). It waits only while events arrive
    /// often enough that another is due within this time, so a quiet gateway adds nothing.
    #[arg(
        long,
        env = "GATEWAY_SPOOL_MAX_LINGER_US",
        default_value_t = billing::spool::DEFAULT_MAX_LINGER.as_micros() as u64
    )]
    pub spool_max_linger_us: u64,

    /// 0 (the default): every usage event is fsynced before its response is sent. A number
    /// of milliseconds: the event is written to the operating system before its response
    /// (kept through any crash of the gateway process, `kill -9` included) and fsynced
    /// within that time, which costs far less CPU per request; a crash of the machine
    /// itself can lose the usage of that last interval.
    #[arg(long, env = "GATEWAY_SPOOL_FSYNC_INTERVAL_MS", default_value_t = 0)]
    pub spool_fsync_interval_ms: u64,

    /// Inference worker base URLs, comma-separated; `dns+http://name:port` stands for every
    /// address `name` resolves to, re-resolved at each health check (headless services).
    #[arg(
        long = "worker",
        env = "GATEWAY_WORKERS",
        value_delimiter = ',',
        required = true
    )]
    pub workers: Vec<String>,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Seconds to wait for a worker's response head.
    #[arg(
        long,
        env = "GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT",
        default_value_t = 60
    )]
    pub upstream_first_byte_timeout_secs: u64,

    /// Seconds for a whole non-streamed upstream response.
    #[arg(long, env = "GATEWAY_UPSTREAM_TIMEOUT", default_value_t = 600)]
    pub upstream_timeout_secs: u64,

    /// Milliseconds between worker health checks.
    #[arg(long, env = "GATEWAY_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub health_interval_ms: u64,

    /// Milliseconds between reloads of the price book from the store: how soon a new
    /// price version reaches this replica's spend caps.
    #[arg(long, env = "GATEWAY_PRICE_REFRESH_MS", default_value_t = 5000)]
    pub price_refresh_ms: u64,

    /// Milliseconds between sweeps that release reservations and quota leases a crashed
    /// replica left behind, once they expire.
    #[arg(long, env = "GATEWAY_SWEEP_INTERVAL_MS", default_value_t = 5000)]
    pub sweep_interval_ms: u64,

    /// Seconds between checks that the usage table has its next months' partitions
    /// (Postgres; the store makes them at start too).
    #[arg(long, env = "GATEWAY_PARTITION_INTERVAL", default_value_t = 3600)]
    pub partition_interval_secs: u64,

    /// Workers one call may be tried on, while nothing of it has reached the client.
    #[arg(long, env = "GATEWAY_UPSTREAM_MAX_ATTEMPTS", default_value_t = 3)]
    pub upstream_max_attempts: usize,

    /// Milliseconds a key lookup is cached: the bound on revocation reaching this replica.
    #[arg(long, env = "GATEWAY_KEY_CACHE_MS", default_value_t = 500)]
    pub key_cache_ms: u64,

    /// Seconds a client has to send request headers (and finish a TLS handshake).
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", default_value_t = 10)]
    pub header_read_timeout_secs: u64,

    /// Seconds a client has to send the request body.
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT", default_value_t = 30)]
    pub body_read_timeout_secs: u64,

    /// PEM certificate chain; with --tls-key, the consumer API speaks HTTPS (HTTP/2 by ALPN).
    #[arg(long, env = "GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Seconds in-flight requests get to finish after a shutdown signal.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Milliseconds, after the last connection is served, that the usage of streams whose
    /// clients left gets to reach the spool before it is flushed.
    #[arg(long, env = "GATEWAY_SHUTDOWN_PAUSE_MS", default_value_t = 100)]
    pub shutdown_pause_ms: u64,

    /// Threads serving consumer connections, each with its own event loop and its own
    /// connections to workers, so a request never changes thread; 0: one per CPU.
    #[arg(long, env = "GATEWAY_SERVING_THREADS", default_value_t = 0)]
    pub serving_threads: usize,

    /// Completion tokens reserved against quotas for a chat call without `max_tokens`
    /// (the served models' context window).
    #[arg(
        long,
        env = "GATEWAY_DEFAULT_COMPLETION_RESERVE",
        default_value_t = 4096
    )]
    pub default_completion_reserve: i64,

    /// Address for the admin API and the operator dashboard (served only when a signing
    /// secret is set).
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN", default_value = "127.0.0.1:8090")]
    pub admin_listen: SocketAddr,

    /// HS256 secret (at least 32 bytes) that admin tokens are signed with. Prefer
    /// --admin-jwt-secret-file: a flag shows in the process list.
    #[arg(long, env = "GATEWAY_ADMIN_JWT_SECRET", hide_env_values = true)]
    pub admin_jwt_secret: Option<crate::admin::Secret>,

    /// File holding the admin signing secret.
    #[arg(long, env = "GATEWAY_ADMIN_JWT_SECRET_FILE")]
    pub admin_jwt_secret_file: Option<PathBuf>,

    /// Longest admin token lifetime accepted (`exp - iat`, seconds); longer tokens, and
    /// tokens without `iat`, are refused.
    #[arg(
        long,
        env = "GATEWAY_ADMIN_TOKEN_MAX_LIFETIME_SECS",
        default_value_t = crate::admin::token::DEFAULT_MAX_LIFETIME_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub admin_token_max_lifetime_secs: u64,

    /// Benchmarks only: serve without recording usage, to measure what metering costs.
    /// Nothing served this way is ever billed.
    #[arg(long, hide = true, env = "GATEWAY_BENCHMARK_UNMETERED")]
    pub benchmark_unmetered: bool,

    /// Create a demo tenant and key on first start and keep the key in this file (mode 0600).
    #[arg(long, env = "GATEWAY_DEMO_KEY_FILE")]
    pub demo_key_file: Option<PathBuf>,
}

impl Default for GatewayConfig {
    /// Every flag's default, as `gateway serve` has it with no flag and no environment
    /// variable set, and no workers: the flags above are the one place defaults are written.
    fn default() -> Self {
        let command = Self::augment_args(clap::Command::new("gateway"))
            .mut_args(|arg| arg.env(None).required(false));
        let parsed = command
            .try_get_matches_from(["gateway"])
            .and_then(|matches| Self::from_arg_matches(&matches));
        // Fails only if a flag above lacks a default while being required: a build error
        // in all but name, which the test below catches.
        #[allow(clippy::expect_used)]
        parsed.expect("every flag of GatewayConfig has a default or is optional")
    }
}

impl GatewayConfig {
    /// The admin signing secret from the flag or the file; `None`: the admin API is off.
    pub fn admin_secret(&self) -> anyhow::Result<Option<crate::admin::Secret>> {
        crate::admin::token::resolve_secret(
            self.admin_jwt_secret.as_ref(),
            self.admin_jwt_secret_file.as_deref(),
        )
        .map_err(anyhow::Error::msg)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The defaults are the binary's: what its flags parse to with only a worker given
    /// (and the environment left out, as the test's may set some).
    #[test]
    fn default_is_the_flags_defaults() {
        let matches = GatewayConfig::augment_args(clap::Command::new("gateway"))
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(["gateway", "--worker", "http://w:1"])
            .unwrap();
        let parsed = GatewayConfig::from_arg_matches(&matches).unwrap();
        let default = GatewayConfig {
            workers: vec!["http://w:1".into()],
            ..GatewayConfig::default()
        };
        assert_eq!(format!("{default:?}"), format!("{parsed:?}"));
        assert_eq!(default.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(default.price_refresh_ms, 5000);
        assert!(GatewayConfig::default().workers.is_empty());
    }
}
