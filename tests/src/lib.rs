//! Test support: starting real worker processes and gateways, and fresh databases.
//!
//! Workers are the release or debug `inference-worker` binary with the real models,
//! gateways bind real ports, databases are real SQLite files and real Postgres databases
//! created for one test and dropped after. The one stand-in, [`stub`], answers at once
//! for tests of the gateway's own work (limits, overhead), never of the models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod stub;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;
use gateway::tenants::{NewKey, TenantStore};
use gateway::GatewayConfig;

pub const CHAT_MODEL: &str = "SmolLM2-135M-Instruct";
pub const EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where the models are (`MODELS_DIR`, else `./models`); fails loudly if they are missing.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models"));
    assert!(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists(),
        "models missing in {}: run `make models` (or `make test`, which fetches them)",
        dir.display()
    );
    dir
}

/// A binary of this workspace, built by `cargo build --bins` (as `make test` does).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// The URL a started binary prints on its first stdout line after `prefix`. The rest of its
/// stdout is drained so the process never blocks on a full pipe.
async fn announced_url(child: &mut Child, prefix: &'static str) -> String {
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        std::thread::spawn(move || for _ in reader.lines() {});
        line
    })
    .await
    .unwrap();
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected output: {line:?}"))
        .to_owned()
}

/// The text of a GET (a metrics scrape, say).
pub async fn scrape(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// The sum of a Prometheus series' samples (all label sets) at `metrics_url`.
pub async fn metric(http: &reqwest::Client, metrics_url: &str, name: &str) -> f64 {
    scrape(http, metrics_url)
        .await
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `promtool check metrics` on a scrape; panics with its complaints.
pub fn promtool_check(scrape: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install it (Debian: apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens a streamed chat completion through a gateway; returns its request id and the
/// SSE byte stream.
pub async fn open_stream(
    gateway_url: &str,
    key: &str,
    body: serde_json::Value,
) -> (String, BoxStream<'static, reqwest::Result<bytes::Bytes>>) {
    let response = reqwest::Client::new()
        .post(format!("{gateway_url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    (request_id, response.bytes_stream().boxed())
}

/// Reads until `n` content deltas (after the role delta) have arrived; returns the text read.
pub async fn read_deltas(
    stream: &mut BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    n: usize,
) -> String {
    let mut seen = String::new();
    while seen.matches("\"content\"").count() < n + 1 {
        seen.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    seen
}

/// A running `inference-worker` process, killed when dropped.
pub struct WorkerProcess {
    child: Child,
    pub url: String,
}

impl WorkerProcess {
    /// Starts a worker with both models on a free port and waits until it is healthy.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> Self {
        let models = models_dir();
        let mut child = Command::new(binary("inference-worker"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--chat-model")
            .arg(models.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
            .arg("--embedding-model")
            .arg(models.join("all-MiniLM-L6-v2"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting inference-worker");
        let url = announced_url(&mut child, "inference-worker listening on ").await;
        let worker = Self { child, url };
        worker.wait_healthy(Duration::from_secs(120)).await;
        worker
    }

    async fn wait_healthy(&self, limit: Duration) {
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                started.elapsed() < limit,
                "worker not healthy after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `gateway serve` process (the release or debug binary), killed when dropped.
pub struct GatewayProcess {
    child: Child,
    pub url: String,
}

impl GatewayProcess {
    /// Starts a gateway on a free port over `database_url`, spooling into `spool_dir`.
    pub async fn start(database_url: &str, spool_dir: &Path, workers: &[String]) -> Self {
        Self::start_with(database_url, spool_dir, workers, &[]).await
    }

    /// [`GatewayProcess::start`] with more `gateway serve` arguments.
    pub async fn start_with(
        database_url: &str,
        spool_dir: &Path,
        workers: &[String],
        extra_args: &[&str],
    ) -> Self {
        let mut child = Command::new(binary("gateway"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--database-url", database_url])
            .arg("--spool-dir")
            .arg(spool_dir)
            .args([
                "--worker",
                &workers.join(","),
                "--health-interval-ms",
                "200",
            ])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting gateway");
        let url = announced_url(&mut child, "gateway listening on ").await;
        Self { child, url }
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: no draining, no flushing.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a graceful exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh SQLite file in a temporary folder, removed when dropped.
pub struct TempSqlite {
    dir: PathBuf,
    pub url: String,
}

impl TempSqlite {
    /// The temporary folder, for other files of the same test.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("gw-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/store.db", dir.display());
        Self { dir, url }
    }
}

impl Default for TempSqlite {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempSqlite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh database on the test Postgres server (`TEST_DATABASE_URL`), dropped afterwards.
pub struct TempPostgres {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TempPostgres {
    pub async fn new() -> Self {
        let admin_url = std::env::var("TEST_DATABASE_URL").expect(
            "TEST_DATABASE_URL is not set: run the tests with `make test`, which finds or starts Postgres",
        );
        let name = format!("gw_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&admin_url)
            .await
            .expect("connecting to TEST_DATABASE_URL");
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Self {
            admin_url,
            name,
            url,
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Dropped inside a test runtime, possibly while it shuts down: use a fresh thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) =
                    <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await
                {
                    let _ = sqlx::Executor::execute(
                        &mut conn,
                        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

/// The usual stack: a worker process, a fresh SQLite store, an in-process gateway on a
/// real port, and one tenant with a key.
pub struct Stack {
    pub worker: WorkerProcess,
    pub store: TempSqlite,
    pub gateway: RunningGateway,
    pub key: String,
    pub http: reqwest::Client,
}

impl Stack {
    pub async fn start(tenant: &str) -> Self {
        Self::start_with(tenant, |_, _| {}).await
    }

    /// As `start`, letting the test adjust the gateway's configuration first (the second
    /// argument is the test's temporary folder).
    pub async fn start_with(
        tenant: &str,
        configure: impl FnOnce(&mut GatewayConfig, &Path),
    ) -> Self {
        let worker = WorkerProcess::start().await;
        let store = TempSqlite::new();
        let mut config = gateway_config(&store.url, std::slice::from_ref(&worker.url));
        configure(&mut config, store.dir());
        let gateway = RunningGateway::start(config).await;
        let (key, _) = gateway.tenant_with_key(tenant, NewKey::default()).await;
        Self {
            worker,
            store,
            gateway,
            key,
            http: reqwest::Client::new(),
        }
    }

    /// A POST to the gateway with this stack's key and a JSON body.
    pub fn post(&self, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.gateway.url))
            .bearer_auth(&self.key)
            .json(&body)
    }
}

/// A PostgreSQL cluster of the test's own (initdb + pg_ctl), for tests that stop and start
/// the server. Never the machine's shared server. Removed when dropped.
pub struct ThrowawayPostgres {
    dir: PathBuf,
    port: u16,
    pg_ctl: PathBuf,
    as_postgres_user: bool,
    pub url: String,
}

fn pg_binary(name: &str) -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
    {
        let found = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !found.is_empty() {
            return PathBuf::from(found);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|p| p.exists());
    candidates.sort();
    candidates
        .pop()
        .unwrap_or_else(|| panic!("PostgreSQL's `{name}` not found: apt-get install postgresql"))
}

impl ThrowawayPostgres {
    pub fn start() -> Self {
        let dir = workspace_root()
            .join("target")
            .join(format!("pg-throwaway-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        // The server refuses to run as root.
        let as_postgres_user = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        if as_postgres_user {
            Command::new("chown")
                .arg("-R")
                .arg("postgres")
                .arg(&dir)
                .status()
                .unwrap();
        }
        let pg = Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            pg_ctl: pg_binary("pg_ctl"),
            dir,
            port,
            as_postgres_user,
        };
        let initdb = pg_binary("initdb");
        let data = pg.dir.join("data");
        let status = pg
            .command(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        pg.start_server();
        pg
    }

    fn command(&self, program: &Path) -> Command {
        if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let status = self
            .command(&self.pg_ctl)
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &options, "-w", "start"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl start failed");
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop_server(&self) {
        let status = self
            .command(&self.pg_ctl)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl stop failed");
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = self
            .command(&self.pg_ctl)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Gateway settings for a test: port 0, the given store and workers, a fresh spool folder.
pub fn gateway_config(database_url: &str, workers: &[String]) -> GatewayConfig {
    let spool_dir =
        std::env::temp_dir().join(format!("gw-spool-{}", uuid::Uuid::new_v4().simple()));
    GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        database_url: database_url.to_owned(),
        spool_dir,
        spool_segment_bytes: 1024 * 1024,
        spool_max_linger_us: billing::spool::DEFAULT_MAX_LINGER.as_micros() as u64,
        spool_fsync_interval_ms: 0,
        workers: workers.to_vec(),
        max_body_bytes: 1024 * 1024,
        upstream_first_byte_timeout_secs: 60,
        upstream_timeout_secs: 300,
        health_interval_ms: 200,
        key_cache_ms: 1000,
        shutdown_grace_secs: 5,
        serving_threads: 0,
        header_read_timeout_secs: 10,
        body_read_timeout_secs: 30,
        tls_cert: None,
        tls_key: None,
        default_completion_reserve: 4096,
        demo_key_file: None,
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        admin_jwt_secret: None,
        admin_jwt_secret_file: None,
        benchmark_unmetered: false,
    }
}

/// A gateway serving in this process on a real port.
pub struct RunningGateway {
    pub url: String,
    pub metrics_url: String,
    /// The admin listener, when the config has a signing secret.
    pub admin_url: Option<String>,
    pub admin_tokens: Option<gateway::admin::TokenAuthority>,
    pub db: billing::Db,
    pub tenants: TenantStore,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningGateway {
    pub async fn start(config: GatewayConfig) -> Self {
        // Gateway logs go to the test's output (shown when a test fails); RUST_LOG filters.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let db = billing::Db::connect(&config.database_url).await.unwrap();
        let gateway = gateway::Gateway::build_with_db(&config, db.clone())
            .await
            .unwrap();
        let url = format!("http://{}", gateway.local_addr().unwrap());
        let metrics_url = format!("http://{}/metrics", gateway.metrics_addr().unwrap());
        let admin_url = gateway.admin_addr().map(|a| format!("http://{a}"));
        let admin_tokens = gateway.admin_tokens();
        let tenants = gateway.state().tenants.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        Self {
            url,
            metrics_url,
            admin_url,
            admin_tokens,
            db,
            tenants,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A new tenant with one key; returns the plaintext key.
    pub async fn tenant_with_key(&self, tenant: &str, new: NewKey) -> (String, String) {
        let t = self.tenants.create_tenant(tenant).await.unwrap();
        let (key, record) = self.tenants.create_key(&t.id, &new).await.unwrap();
        (key.expose().to_owned(), record.id)
    }

    /// Waits (up to 10 s) for the usage record of `request_id` to reach the store.
    pub async fn usage_record(&self, request_id: &str) -> Option<billing::UsageEvent> {
        let ledger = billing::Ledger::new(self.db.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(record) = ledger.get(request_id).await.unwrap() {
                if record.delivery != billing::Delivery::Unknown {
                    return Some(record);
                }
            }
            if Instant::now() > deadline {
                return ledger.get(request_id).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful shutdown; returns when the gateway has drained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}
