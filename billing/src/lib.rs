//! The usage ledger.
//!
//! Owns: the database handle and its migrations (`/migrations`, one folder per backend),
//! usage records and everything derived from them for finance. Must never: know about HTTP,
//! models or how a request was served. It takes usage events and gives records back; the
//! request id is the identity of a record, unique forever, enforced by the database.

pub mod db;
pub mod export;
pub mod invoices;
pub mod period;
pub mod prices;
pub mod reconcile;
pub mod sample;
pub mod series;
pub mod spool;
pub mod usage;

pub use db::{Db, DbError};
pub use invoices::{Invoice, InvoiceError, InvoiceLine, InvoiceStatus, Invoices, LineKind};
pub use period::{now_ms, period_of};
pub use prices::{Micros, Price, PriceBook, PriceError, Tier, Tokens};
pub use sample::UsageEventBuilder;
pub use spool::{
    Shipper, ShipperHandle, ShipperStats, Spool, SpoolError, SpoolOptions, SpoolStats,
};
pub use usage::{Delivery, Ledger, ModelTotals, UsageEvent, UsageStatus};
