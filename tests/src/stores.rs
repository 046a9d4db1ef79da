//! Databases for one test: fresh SQLite files, fresh databases on the test Postgres
//! server, and throwaway Postgres clusters a test may stop and start.
//!
//! Owns: creating each store and removing it when dropped. Must never: touch a database
//! it did not create, nor the machine's shared Postgres server beyond one `CREATE
//! DATABASE` / `DROP DATABASE` of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::processes::workspace_root;

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
