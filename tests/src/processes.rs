//! Worker and gateway processes: the workspace's binaries started with the real models.
//!
//! Owns: finding the workspace, its built binaries and the models; starting
//! `inference-worker` and `gateway serve` on free ports and killing them when dropped.
//! Must never: start anything in this process (see [`crate::gateways`]) or stand in for
//! the models.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait::wait_until;

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
        let chat = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut args = vec!["--chat-model", chat.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::start_embedding_at("127.0.0.1:0", &args).await
    }

    /// A worker serving the embedding model (and what `extra` adds) on `listen`.
    pub async fn start_embedding_at(listen: &str, extra: &[&str]) -> Self {
        let models = models_dir();
        let mut child = Command::new(binary("inference-worker"))
            .arg("--listen")
            .arg(listen)
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
        let health = format!("{}/health", self.url);
        wait_until("worker healthy", limit, || async {
            client
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
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
        Self::start_wrapped(&[], database_url, spool_dir, workers, extra_args).await
    }

    /// [`GatewayProcess::start_with`] run by `wrapper` (a command that ends by executing
    /// its trailing arguments, e.g. in a namespace of its own).
    pub async fn start_wrapped(
        wrapper: &[&str],
        database_url: &str,
        spool_dir: &Path,
        workers: &[String],
        extra_args: &[&str],
    ) -> Self {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary("gateway"));
                c
            }
            None => Command::new(binary("gateway")),
        };
        let mut child = command
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

/// A throwaway `redis-server` on a free loopback port, with no persistence; killed when
/// dropped. Never the machine's own server.
pub struct RedisProcess {
    child: Child,
    pub url: String,
}

impl RedisProcess {
    pub async fn start() -> Self {
        // Redis takes no port 0: take a free one from the system and hand it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting redis-server (Debian: apt-get install redis-server)");
        let server = Self {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        wait_until(
            "redis-server listening",
            Duration::from_secs(10),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        server
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
