//! Test support: starting real worker processes and gateways, and fresh databases.
//!
//! Workers are the release or debug `inference-worker` binary with the real models,
//! gateways bind real ports, databases are real SQLite files and real Postgres databases
//! created for one test and dropped after. The one stand-in, [`stub`], answers at once
//! for tests of the gateway's own work (limits, overhead), never of the models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod gateways;
pub mod processes;
pub mod stores;
pub mod stub;
pub mod wait;

pub use client::{metric, open_stream, promtool_check, read_deltas, request_id, scrape};
pub use gateways::{gateway_config, RunningGateway, Stack};
pub use processes::{
    binary, models_dir, workspace_root, GatewayProcess, RedisProcess, WorkerProcess, CHAT_MODEL,
    EMBEDDING_MODEL,
};
pub use stores::{TempPostgres, TempSqlite, ThrowawayPostgres};
pub use wait::{wait_for, wait_until};
