//! The metering API gateway: the only thing a consumer can reach.
//!
//! Owns: key authentication, admission against plans and keys' limits (rates, concurrency,
//! quota, spend cap), the worker pool and routing, forwarding OpenAI-compatible calls, and
//! turning each served call into exactly one usage event for the ledger. Must never: run a
//! model, set prices (the billing price book does; admission only reads it), or let a
//! response end successfully at the client before its usage is recorded.

pub mod admin;
mod app;
pub mod auth;
pub mod batches;
pub mod classifiers;
pub mod config;
pub mod consumer;
pub mod demo;
pub mod error;
pub mod keys;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod pricing;
pub mod proxy;
pub mod response_cache;
pub mod tenants;
pub mod upstream;

pub use app::Gateway;
pub use config::GatewayConfig;
