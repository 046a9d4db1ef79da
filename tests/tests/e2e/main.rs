//! The cross-crate suite as one test binary: real worker processes with the real models,
//! real gateways on port 0, SQLite and Postgres, chaos, the official SDK and the dashboard.
//! One binary links the gateway once instead of once per file; nextest still runs each
//! test in its own process.

mod admin_api;
mod auth_flood;
mod batch_chaos;
mod batches;
mod caching;
mod chaos_kill;
mod chaos_store_outage;
mod classifiers;
mod cli;
mod connection_flood;
mod containers;
mod dashboard;
mod deploy_commands;
mod deploy_config;
mod discovery;
mod http_server;
mod invoices;
mod key_to_usage;
mod limits;
mod limits_store_outage;
mod metric_labels;
mod openai_sdk;
mod pgbouncer;
mod prefix_affinity;
mod quota_bound;
mod revocation;
mod scale;
mod shipper_priority;
mod store_backends;
mod stream_faults;
mod upstream_timeouts;
mod worker_failover;
