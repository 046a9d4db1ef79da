//! The gateway through PgBouncer (SPEC §8; Debian's 1.18, a process of this test's own in
//! front of a fresh database): in session mode `gateway migrate`, `serve
//! --skip-migrations` and metering work through it; in transaction mode both refuse at
//! start and say why (the gateway keeps session state a transaction pooler would hand to
//! other clients), rather than fail later on a prepared statement.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL};
use e2e_tests::{binary, request_id, wait_for, GatewayProcess, TempPostgres};
use serde_json::json;

/// A PgBouncer in `mode` in front of `database_url`'s database; stopped when dropped.
struct PgBouncer {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl PgBouncer {
    async fn start(database_url: &str, mode: &str) -> Self {
        let (server, db) = database_url.rsplit_once('/').unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("gw-pgbouncer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (host, server_port) = server
            .rsplit_once('@')
            .map_or(server, |(_, h)| h)
            .rsplit_once(':')
            .unwrap();
        let ini = format!(
            "[databases]\ngw = host={host} port={server_port} dbname={db} user=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = any\npool_mode = {mode}\nmax_client_conn = 500\ndefault_pool_size = 20\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {log}\n",
            log = dir.join("pgbouncer.log").display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        // PgBouncer refuses to run as root.
        Command::new("chmod")
            .args(["-R", "0777", dir.to_str().unwrap()])
            .status()
            .unwrap();
        let mut command = if is_root() {
            // setpriv executes pgbouncer itself (runuser would stay its parent, and killing
            // it would leave pgbouncer running).
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "pgbouncer",
            ]);
            c
        } else {
            Command::new("pgbouncer")
        };
        let child = command
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("pgbouncer not found: apt-get install pgbouncer");
        let url = format!("postgres://postgres@127.0.0.1:{port}/gw");
        wait_for("pgbouncer to listen", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Self { child, dir, url }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn gateway(db: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("gateway"))
        .args(args)
        .env("DATABASE_URL", db)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn session_pooling_works_and_transaction_pooling_is_refused_at_start() {
    let store = TempPostgres::new().await;
    let stub = StubWorker::start().await;

    // Session mode: migrations, a key, serving and metering all through the pooler.
    let session = PgBouncer::start(&store.url, "session").await;
    let (ok, _, stderr) = gateway(&session.url, &["migrate"]);
    assert!(ok, "migrate through session pooling: {stderr}");
    let (ok, key, stderr) = gateway(&session.url, &["create-key", "--tenant", "pooled"]);
    assert!(ok, "{stderr}");
    let key = key.trim().to_owned();
    let spool = std::env::temp_dir().join(format!("gw-pooled-{}", uuid::Uuid::new_v4().simple()));
    let gw = GatewayProcess::start_with(
        &session.url,
        &spool,
        std::slice::from_ref(&stub.url),
        &["--skip-migrations"],
    )
    .await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = wait_for(
            "a chat call through the pooled gateway",
            Duration::from_secs(30),
            || async {
                let r = http
                    .post(format!("{}/v1/chat/completions", gw.url))
                    .bearer_auth(&key)
                    .json(&json!({"model": STUB_CHAT_MODEL, "max_tokens": 3 + i,
                    "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(r)
            },
        )
        .await;
        ids.push(request_id(&r));
    }
    let direct = sqlx::PgPool::connect(&store.url).await.unwrap();
    wait_for(
        "the calls' usage records",
        Duration::from_secs(30),
        || async {
            let n: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE request_id = ANY($1)")
                    .bind(&ids)
                    .fetch_one(&direct)
                    .await
                    .unwrap();
            (n == ids.len() as i64).then_some(())
        },
    )
    .await;
    direct.close().await;
    drop(gw);

    // Transaction mode: refused at start, by migrate and by serve, with the reason.
    let transaction = PgBouncer::start(&store.url, "transaction").await;
    let (ok, _, stderr) = gateway(&transaction.url, &["migrate"]);
    assert!(!ok);
    assert!(stderr.contains("pool_mode = session"), "{stderr}");
    let mut serve = Command::new(binary("gateway"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--worker", &stub.url, "--database-url", &transaction.url])
        .arg("--spool-dir")
        .arg(&spool)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = serve.kill();
            panic!("serve started through a transaction pooler");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("pooled per transaction"), "{stderr}");
    let _ = std::fs::remove_dir_all(&spool);
}
