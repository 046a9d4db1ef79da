//! The commands a cluster rollout needs (SPEC §8): `gateway migrate` applies the schema
//! once and reports what it applied; `serve --skip-migrations` refuses a store that lacks
//! a migration and serves one that has them all; `gateway ship-spool` moves the usage a
//! `kill -9`ed replica left on its volume (calls answered while Postgres, a throwaway
//! cluster of this test, was down) into the store, each call once, and refuses the folder
//! of a gateway still running.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{
    binary, request_id, workspace_root, GatewayProcess, TempPostgres, TempSqlite,
    ThrowawayPostgres, WorkerProcess, EMBEDDING_MODEL,
};
use serde_json::{json, Value};

/// `gateway ARGS` on `db`: exit code, stdout, stderr.
fn gateway(db: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("gateway"))
        .args(args)
        .env("DATABASE_URL", db)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(db: &str, args: &[&str]) -> Value {
    let (code, stdout, stderr) = gateway(db, args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// Up migrations shipped for a backend.
fn migrations(backend: &str) -> usize {
    std::fs::read_dir(workspace_root().join("migrations").join(backend))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".sql") && !name.ends_with(".down.sql")
        })
        .count()
}

/// `gateway serve --skip-migrations` on a store that lacks migrations must exit (not
/// serve) and say what to run.
fn refuses_to_serve_unmigrated(db: &str) {
    let spool = tempdir("refused");
    let mut child = Command::new(binary("gateway"))
        .args(["serve", "--skip-migrations", "--listen", "127.0.0.1:0"])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--worker",
            "http://127.0.0.1:9",
        ])
        .arg("--spool-dir")
        .arg(&spool)
        .env("DATABASE_URL", db)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("serve --skip-migrations ran on a store without the schema");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("gateway migrate"), "{stderr}");
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gw-{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_runs_once_and_serve_can_leave_migrations_to_it() {
    let (sqlite, postgres) = (TempSqlite::new(), TempPostgres::new().await);
    for (db, backend) in [(&sqlite.url, "sqlite"), (&postgres.url, "postgres")] {
        refuses_to_serve_unmigrated(db);
        let first = json_of(db, &["--json", "migrate"]);
        let applied = first["applied"].as_array().unwrap();
        assert_eq!(applied.len(), migrations(backend), "{backend}: {first}");
        let again = json_of(db, &["--json", "migrate"]);
        assert_eq!(again["applied"], json!([]), "{backend}");
        let (code, _, stderr) = gateway(db, &["migrate"]);
        assert_eq!(code, 0);
        assert!(stderr.contains("current"), "{stderr}");
        // Migrated: it serves.
        let spool = tempdir("migrated");
        let gw = GatewayProcess::start_with(
            db,
            &spool,
            &["http://127.0.0.1:9".into()],
            &["--skip-migrations"],
        )
        .await;
        let r = reqwest::get(format!("{}/health", gw.url)).await.unwrap();
        assert!(r.status().is_success(), "{backend}");
    }
}

async fn embed(http: &reqwest::Client, url: &str, key: &str, n: usize) -> String {
    let r = http
        .post(format!("{url}/v1/embeddings"))
        .bearer_auth(key)
        .json(&json!({"model": EMBEDDING_MODEL, "input": format!("text {n}")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "call {n}");
    let id = request_id(&r);
    r.bytes().await.unwrap();
    id
}

async fn records(url: &str, ids: &[String]) -> Vec<(String, String)> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT request_id, delivery FROM usage_records WHERE request_id = ANY($1)")
            .bind(ids)
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn ship_spool_drains_a_killed_replicas_volume() {
    let pg = ThrowawayPostgres::start();
    let worker = WorkerProcess::start().await;
    json_of(&pg.url, &["--json", "migrate"]);
    let (code, key, stderr) = gateway(&pg.url, &["create-key", "--tenant", "drained"]);
    assert_eq!(code, 0, "{stderr}");
    let key = key.trim().to_owned();
    let spool = tempdir("volume");
    let mut gw = GatewayProcess::start_with(
        &pg.url,
        &spool,
        std::slice::from_ref(&worker.url),
        &["--skip-migrations"],
    )
    .await;
    let http = reqwest::Client::new();
    // Served with the store up (shipped as usual), then with it down (kept in the spool).
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(embed(&http, &gw.url, &key, n).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The folder of a running gateway is refused: one spool folder has one user.
    let (code, _, stderr) = gateway(
        &pg.url,
        &["ship-spool", "--spool-dir", spool.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("in use"), "{stderr}");
    pg.stop_server();
    for n in 3..10 {
        ids.push(embed(&http, &gw.url, &key, n).await);
    }
    // Past the delivery settle time, so the spool holds each call's outcome too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.kill();
    pg.start_server();
    let missing = ids.len() - records(&pg.url, &ids).await.len();
    assert!(missing >= 7, "the outage's calls were not in the store yet");

    let shipped = ship(&pg.url, &spool);
    assert!(shipped["segments"].as_u64().unwrap() >= 1, "{shipped}");
    assert!(shipped["events"].as_u64().unwrap() >= 7, "{shipped}");
    let found = records(&pg.url, &ids).await;
    assert_eq!(found.len(), ids.len(), "{found:?}");
    assert!(found.iter().all(|(_, d)| d == "delivered"), "{found:?}");
    // Drained: a second run finds nothing, and nothing is recorded twice (one row per id
    // is the table's key).
    let again = ship(&pg.url, &spool);
    assert_eq!(again["events"], 0, "{again}");
    assert_eq!(records(&pg.url, &ids).await.len(), ids.len());
}

fn ship(db: &str, spool: &Path) -> Value {
    json_of(
        db,
        &[
            "--json",
            "ship-spool",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--timeout-secs",
            "30",
        ],
    )
}
