//! One handle over either backend: SQLite (the embedded default) or Postgres (production).
//! Queries are written once with `$N` placeholders, which both accept.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL (use sqlite://PATH or postgres://...)")]
    UnsupportedUrl,
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("creating the database folder: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Schema(String),
    #[error(
        "the store's connections are pooled per transaction (PgBouncer's `pool_mode = \
         transaction` or `statement`): the gateway keeps session state (prepared statements, \
         session settings, the migration lock), so connect directly or through a pooler in \
         `pool_mode = session`"
    )]
    TransactionPooling,
}

/// The usage shipper's SQLite page cache, in KiB (SQLite's default is 2 MiB). A batch
/// inserts into four B-trees at as many places as it has tenants (and, ids arriving out of
/// order, more): in a smaller cache than those pages, every insert read and wrote them again.
const SHIPPER_CACHE_KIB: u32 = 64 * 1024;

/// SQLite checkpoints the WAL into the database once it holds this many pages (40 MiB;
/// SQLite's default is 1,000). The pages every usage batch changes (each index's newest
/// leaves) are copied back once per checkpoint, so a tenth as often. Set on every
/// connection: whichever commits past the mark does the checkpoint, and with a
/// lower mark elsewhere a serving connection would take it over.
const WAL_AUTOCHECKPOINT_PAGES: &str = "10000";

/// A pooled connection to the store, migrated to the current schema.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    /// A native pool beside the `Any` one, on Postgres only: bulk writes bind arrays,
    /// which the `Any` driver cannot.
    pg: Option<sqlx::PgPool>,
    /// A native pool beside the `Any` one, for the usage shipper on an SQLite file: its
    /// batch inserts bind tens of thousands of values, and the `Any` driver would convert
    /// each one twice (into its own value, then into SQLite's).
    sqlite: Option<sqlx::SqlitePool>,
    /// Connections for admission counters, which trade durability of the last commits for
    /// latency: a store crash may forget the last moments of counting, never a usage record.
    counters: AnyPool,
    backend: Backend,
}

/// What a handle is for, which sets its pools' sizes and whether it migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Everything a gateway or a command does; runs migrations first.
    Serve,
    /// As `Serve`, but the migrations were run beforehand (`gateway migrate`): it checks
    /// that every one has been applied instead.
    ServeMigrated,
    /// Writing usage records only (the shipper): a connection or two of its own, opened on
    /// the caller's runtime; the schema is already migrated by a serving handle.
    ShipUsage,
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres:") || url.starts_with("postgresql:")
}

fn migrator(backend: Backend) -> &'static Migrator {
    match backend {
        Backend::Sqlite => &SQLITE_MIGRATIONS,
        Backend::Postgres => &POSTGRES_MIGRATIONS,
    }
}

/// Versions of the migrations applied to the store (an error where it has none yet).
async fn applied_migrations(pool: &AnyPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
}

/// Fails where one client connection's statements reach more than one server session, or
/// two client connections share one (a pooler in transaction or statement mode): each of
/// two connections asks for its server process id three times, in turn, by the simple
/// protocol (no prepared statement to trip over).
async fn require_session_pooling(url: &str) -> Result<(), DbError> {
    use sqlx::{Connection, Row};
    async fn pids(
        a: &mut sqlx::PgConnection,
        b: &mut sqlx::PgConnection,
    ) -> Result<[Vec<i32>; 2], sqlx::Error> {
        let mut seen = [Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (conn, seen) in [&mut *a, &mut *b].into_iter().zip(seen.iter_mut()) {
                let row = sqlx::raw_sql("SELECT pg_backend_pid()")
                    .fetch_one(conn)
                    .await?;
                seen.push(row.try_get::<i32, _>(0)?);
            }
        }
        Ok(seen)
    }
    let mut a = sqlx::PgConnection::connect(url).await?;
    let mut b = sqlx::PgConnection::connect(url).await?;
    let seen = pids(&mut a, &mut b).await;
    let _ = a.close().await;
    let _ = b.close().await;
    let [a, b] = seen?;
    let steady = |v: &[i32]| v.windows(2).all(|w| w[0] == w[1]);
    match steady(&a) && steady(&b) && a[0] != b[0] {
        true => Ok(()),
        false => Err(DbError::TransactionPooling),
    }
}

/// Fails unless every migration of `migrator` has been applied to the store.
async fn check_migrated(pool: &AnyPool, migrator: &Migrator) -> Result<(), DbError> {
    let run_first = "run `gateway migrate` against it first";
    let applied = applied_migrations(pool)
        .await
        .map_err(|e| DbError::Schema(format!("the store has no schema yet ({e}); {run_first}")))?;
    let missing = migrator
        .iter()
        .find(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version));
    match missing {
        Some(m) => Err(DbError::Schema(format!(
            "the store lacks migration {} ({}) and {} more after it; {run_first}",
            m.version,
            m.description,
            migrator
                .iter()
                .filter(|n| n.version > m.version && !applied.contains(&n.version))
                .count()
        ))),
        None => Ok(()),
    }
}

impl Db {
    /// Connects, creating a SQLite file (and its folder) if missing, and runs migrations.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        Self::open(url, Purpose::Serve).await
    }

    /// Connects without running migrations, after checking that every migration this build
    /// knows has been applied (a rollout never races a migration: `Db::migrate` runs once
    /// before it). A store behind is an error naming the first migration missing.
    pub async fn connect_migrated(url: &str) -> Result<Self, DbError> {
        Self::open(url, Purpose::ServeMigrated).await
    }

    /// Applies the migrations the store lacks, and returns them (`version description`).
    /// On Postgres the migrator holds a session-level advisory lock while it runs, so two
    /// at once wait for each other; that lock needs a direct connection or a pooler in
    /// session mode (a transaction-mode pooler hands the session to others).
    pub async fn migrate(url: &str) -> Result<Vec<String>, DbError> {
        if is_postgres_url(url) {
            require_session_pooling(url).await?;
        }
        let db = Self::open(url, Purpose::ShipUsage).await?;
        let migrator = migrator(db.backend);
        let before = applied_migrations(&db.pool).await.unwrap_or_default();
        migrator.run(&db.pool).await?;
        db.ensure_partitions().await?;
        let applied = migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && !before.contains(&m.version))
            .map(|m| format!("{} {}", m.version, m.description))
            .collect();
        db.close().await;
        Ok(applied)
    }

    /// Connects for writing usage records only: small pools of its own, no migrations (a
    /// handle from [`Db::connect`] must have run them). Connections are opened from the
    /// calling thread, so a store thread (SQLite's) inherits that thread's CPU priority.
    pub async fn connect_usage_writer(url: &str) -> Result<Self, DbError> {
        Self::open(url, Purpose::ShipUsage).await
    }

    /// Whether `url` names an in-memory SQLite database, which each connection sees as a
    /// database of its own (so another handle cannot share it).
    pub fn is_in_memory(url: &str) -> bool {
        url.starts_with("sqlite:") && sqlite_path(url).is_none()
    }

    async fn open(url: &str, purpose: Purpose) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if is_postgres_url(url) {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl);
        };
        if backend == Backend::Postgres && purpose != Purpose::ShipUsage {
            require_session_pooling(url).await?;
        }
        let mut url = url.to_owned();
        if backend == Backend::Sqlite {
            if let Some(path) = sqlite_path(&url) {
                if let Some(dir) = std::path::Path::new(&path).parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir)?;
                    }
                }
            }
            if !url.contains("mode=") {
                url.push_str(if url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
        }
        let options = AnyConnectOptions::from_str(&url)?;
        let counters = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 2 } else { 8 })
            .acquire_timeout(Duration::from_secs(1))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    match backend {
                        Backend::Sqlite => {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            conn.execute(&*format!(
                                "PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}"
                            ))
                            .await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                        }
                        Backend::Postgres => {
                            conn.execute("SET synchronous_commit = off").await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(options.clone());
        let pool_size = match (purpose, backend) {
            (Purpose::Serve | Purpose::ServeMigrated, Backend::Sqlite) => 4,
            (Purpose::Serve | Purpose::ServeMigrated, Backend::Postgres) => 16,
            (Purpose::ShipUsage, _) => 1,
        };
        let pool_options = AnyPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(Duration::from_secs(3))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the writer; FULL makes every commit
                        // durable before it returns, which the ledger relies on.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute(&*format!(
                            "PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}"
                        ))
                        .await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            });
        let pool = match purpose {
            Purpose::Serve | Purpose::ServeMigrated => pool_options.connect_with(options).await?,
            // The shipper writes through its native pool below; this one connects only if
            // something reads through it.
            Purpose::ShipUsage => pool_options.connect_lazy_with(options),
        };
        match purpose {
            Purpose::Serve => migrator(backend).run(&pool).await?,
            Purpose::ServeMigrated => check_migrated(&pool, migrator(backend)).await?,
            Purpose::ShipUsage => {}
        }
        let pg = match backend {
            Backend::Postgres => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(if purpose == Purpose::ShipUsage { 2 } else { 4 })
                    .acquire_timeout(Duration::from_secs(3))
                    .connect(&url)
                    .await?,
            ),
            Backend::Sqlite => None,
        };
        let sqlite = match (purpose, backend) {
            (Purpose::ShipUsage, Backend::Sqlite) if sqlite_path(&url).is_some() => {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
                    .pragma("cache_size", format!("-{}", SHIPPER_CACHE_KIB))
                    // A multi-row insert keeps a statement journal (the pages it changed, to
                    // undo it alone): in memory, not a temporary file write per page.
                    .pragma("temp_store", "memory")
                    .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES);
                Some(
                    sqlx::sqlite::SqlitePoolOptions::new()
                        .max_connections(1)
                        .acquire_timeout(Duration::from_secs(3))
                        .connect_with(options)
                        .await?,
                )
            }
            _ => None,
        };
        let db = Self {
            pool,
            pg,
            sqlite,
            counters,
            backend,
        };
        if purpose != Purpose::ShipUsage {
            db.ensure_partitions().await?;
        }
        Ok(db)
    }

    /// Postgres: makes the usage table's monthly partitions from last month to three months
    /// ahead (rows outside them go to a default partition, so this is about speed, never
    /// about accepting a record). Gateways call it at start and every hour. SQLite: nothing.
    pub async fn ensure_partitions(&self) -> Result<(), DbError> {
        if let Some(pg) = &self.pg {
            let now = crate::now_ms();
            let day = 86_400_000;
            sqlx::query("SELECT ensure_usage_partitions($1, $2)")
                .bind(now - 31 * day)
                .bind(now + 100 * day)
                .execute(pg)
                .await?;
        }
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A transaction that may read before it writes. On SQLite it takes the write lock at
    /// `BEGIN` (waiting out the busy timeout): a deferred one that read first fails at once
    /// with "database is locked" when another connection wrote meanwhile.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// Connections for admission counters (see the field's docs).
    pub fn counters(&self) -> &AnyPool {
        &self.counters
    }

    pub fn is_postgres(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// The native Postgres pool, when the store is Postgres.
    pub fn postgres(&self) -> Option<&sqlx::PgPool> {
        self.pg.as_ref()
    }

    /// The native SQLite pool of a usage writer on an SQLite file.
    pub fn sqlite(&self) -> Option<&sqlx::SqlitePool> {
        self.sqlite.as_ref()
    }

    pub async fn close(&self) {
        if let Some(pg) = &self.pg {
            pg.close().await;
        }
        if let Some(lite) = &self.sqlite {
            lite.close().await;
        }
        self.counters.close().await;
        self.pool.close().await;
    }
}

fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" {
        None
    } else {
        Some(path.to_owned())
    }
}
