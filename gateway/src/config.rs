//! Gateway configuration: flags, each with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, FromArgMatches};

use crate::limits::{OnStoreError, StoreFailure};

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

    /// Start without running migrations, refusing to start unless the store has every
    /// one this build knows: for rollouts where `gateway migrate` runs first, once.
    #[arg(long, env = "GATEWAY_SKIP_MIGRATIONS")]
    pub skip_migrations: bool,

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

    /// Seconds to wait for a worker's response head on a streamed call (a non-streamed
    /// call's head comes with its body, bounded by `upstream_timeout_secs`).
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

    /// Send calls whose prompts begin alike to the same worker (where that start is likely
    /// in its prefix cache) while it has at most this many calls in flight beyond the least
    /// loaded worker; past that, or with `--no-prefix-affinity`, the less loaded of two.
    #[arg(long, env = "GATEWAY_PREFIX_AFFINITY_SLACK", default_value_t = 4)]
    pub prefix_affinity_slack: usize,

    /// Bytes of responses this replica keeps in memory for plans with a response cache
    /// (0: no response cache).
    #[arg(long, env = "GATEWAY_RESPONSE_CACHE_BYTES", default_value_t = 64 << 20)]
    pub response_cache_bytes: u64,

    /// Redis URL of the response cache's tier shared by replicas (e.g.
    /// `redis://127.0.0.1:6379`); memory only without it.
    #[arg(long, env = "GATEWAY_RESPONSE_CACHE_REDIS")]
    pub response_cache_redis: Option<String>,

    /// Batch lines this replica runs at once (0: it runs none, leaving them to others).
    #[arg(long, env = "GATEWAY_BATCH_CONCURRENCY", default_value_t = 2)]
    pub batch_concurrency: usize,

    /// Batch lines start only while this replica's workers carry at most this many other
    /// calls: batches use the capacity interactive traffic leaves.
    #[arg(long, env = "GATEWAY_BATCH_IDLE_BELOW", default_value_t = 0)]
    pub batch_idle_below: usize,

    /// How long, in milliseconds, a batch line stays leased to the replica running it
    /// without renewal: after a crash, its lines wait this long before another runs them.
    #[arg(long, env = "GATEWAY_BATCH_LEASE_MS", default_value_t = 60_000)]
    pub batch_lease_ms: u64,

    /// How often, in milliseconds, a replica with nothing to run looks for batch lines.
    #[arg(long, env = "GATEWAY_BATCH_POLL_MS", default_value_t = 200)]
    pub batch_poll_ms: u64,

    /// Route by load alone, ignoring where prompts are likely cached.
    #[arg(long, env = "GATEWAY_NO_PREFIX_AFFINITY")]
    pub no_prefix_affinity: bool,

    /// Workers one call may be tried on, while nothing of it has reached the client.
    #[arg(long, env = "GATEWAY_UPSTREAM_MAX_ATTEMPTS", default_value_t = 3)]
    pub upstream_max_attempts: usize,

    /// Milliseconds a key lookup is cached: the bound on revocation reaching this replica.
    #[arg(long, env = "GATEWAY_KEY_CACHE_MS", default_value_t = 500)]
    pub key_cache_ms: u64,

    /// Milliseconds an id the store does not have is answered from the cache.
    #[arg(long, env = "GATEWAY_KEY_MISSING_CACHE_MS", default_value_t = 2000)]
    pub key_missing_cache_ms: u64,

    /// Keys, and unknown ids, the key cache holds at most (each).
    #[arg(long, env = "GATEWAY_KEY_CACHE_CAPACITY", default_value_t = 100_000)]
    pub key_cache_capacity: u64,

    /// Milliseconds between syncs of key revocations into the cache: a key revoked longer
    /// than this before a store outage stays refused through it.
    #[arg(long, env = "GATEWAY_KEY_REVOCATION_SYNC_MS", default_value_t = 500)]
    pub key_revocation_sync_ms: u64,

    /// Failed authentications a client address may have per minute; past them (and the
    /// burst) it gets 429 with `retry-after`.
    #[arg(long, env = "GATEWAY_AUTH_FAILURES_PER_MINUTE", default_value_t = 60)]
    pub auth_failures_per_minute: u32,

    /// Failed authentications an address may have at once before its rate applies.
    #[arg(long, env = "GATEWAY_AUTH_FAILURE_BURST", default_value_t = 20)]
    pub auth_failure_burst: u32,

    /// Client addresses whose failed authentications are tracked at most (IPv6 by /64);
    /// addresses past them share one rate.
    #[arg(
        long,
        env = "GATEWAY_AUTH_FAILURE_ADDRESSES",
        default_value_t = 100_000
    )]
    pub auth_failure_addresses: usize,

    /// Seconds a new connection has to finish its TLS handshake, and then to send its
    /// first request's headers; also each later HTTP/1.1 request's headers.
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", default_value_t = 10)]
    pub header_read_timeout_secs: u64,

    /// Seconds a connection may sit with no request in flight (HTTP/1.1 keep-alive and
    /// HTTP/2 alike) before the gateway closes it.
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Seconds between HTTP/2 keep-alive pings; a ping unanswered for as long again
    /// closes the connection.
    #[arg(long, env = "GATEWAY_HTTP2_KEEPALIVE_INTERVAL", default_value_t = 20)]
    pub http2_keepalive_interval_secs: u64,

    /// Open connections per listener; past it a new connection is accepted and closed at
    /// once (counted in `gateway_connections_refused_total`).
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Streams one HTTP/2 connection may have open at once.
    #[arg(
        long,
        env = "GATEWAY_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 100
    )]
    pub http2_max_concurrent_streams: u32,

    /// Largest HTTP/2 header list (names and values, as the protocol counts them), in bytes.
    #[arg(long, env = "GATEWAY_MAX_HEADER_LIST_BYTES", default_value_t = 16 * 1024)]
    pub max_header_list_bytes: u32,

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

    /// Completion tokens reserved against quotas for a chat call without `max_tokens` to a
    /// model whose workers state no context length (workers that do state one bound a
    /// call by it).
    #[arg(
        long,
        env = "GATEWAY_DEFAULT_COMPLETION_RESERVE",
        default_value_t = 4096
    )]
    pub default_completion_reserve: i64,

    /// While the store cannot be reached, a request limited by a monthly token quota is
    /// refused with 503 (`fail_closed`) or admitted unchecked against it (`fail_open`).
    #[arg(long, env = "GATEWAY_QUOTA_ON_STORE_ERROR", value_enum, default_value_t = StoreFailure::FailClosed)]
    pub quota_on_store_error: StoreFailure,

    /// The same for a monthly spend cap.
    #[arg(long, env = "GATEWAY_SPEND_CAP_ON_STORE_ERROR", value_enum, default_value_t = StoreFailure::FailClosed)]
    pub spend_cap_on_store_error: StoreFailure,

    /// The same for requests and tokens per minute.
    #[arg(long, env = "GATEWAY_RATES_ON_STORE_ERROR", value_enum, default_value_t = StoreFailure::FailOpen)]
    pub rates_on_store_error: StoreFailure,

    /// The same for concurrent requests.
    #[arg(long, env = "GATEWAY_CONCURRENCY_ON_STORE_ERROR", value_enum, default_value_t = StoreFailure::FailOpen)]
    pub concurrency_on_store_error: StoreFailure,

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
    /// Each kind of limit's failure mode while the store cannot be reached.
    pub fn on_store_error(&self) -> OnStoreError {
        OnStoreError {
            quota: self.quota_on_store_error,
            spend_cap: self.spend_cap_on_store_error,
            rates: self.rates_on_store_error,
            concurrency: self.concurrency_on_store_error,
        }
    }

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
