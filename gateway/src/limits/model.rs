//! What admission reasons about: the limits of a plan or key, the scopes they apply to,
//! what a request may cost, and why a request was refused.
//!
//! Owns: these plain types and their names as clients and metrics see them.
//! Must never: hold state or arithmetic over the counters.

use billing::Micros;

use super::headers::RateHeaders;

/// The most seconds a 429 tells a client to wait (SPEC §3).
pub const MAX_RETRY_AFTER_SECS: u64 = 120;

/// Limits of a plan or a key; `None` is "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<i64>,
    pub tokens_per_minute: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub monthly_tokens: Option<i64>,
    /// In minor units of the price book's currency.
    pub monthly_spend_minor: Option<i64>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
    MonthlyTokens,
    MonthlySpend,
}

impl LimitKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests_per_minute",
            Self::Tokens => "tokens_per_minute",
            Self::Concurrency => "concurrent_requests",
            Self::MonthlyTokens => "monthly_tokens",
            Self::MonthlySpend => "monthly_spend",
        }
    }

    /// Quotas answer `insufficient_quota`; rate limits `rate_limit_exceeded`.
    pub fn is_quota(self) -> bool {
        matches!(self, Self::MonthlyTokens | Self::MonthlySpend)
    }
}

/// What a request may cost at most, reserved at admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub tokens: i64,
    pub spend: Micros,
}

/// Why a request was refused, with what the client is told.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: LimitKind,
    pub retry_after_secs: u64,
    pub headers: RateHeaders,
    pub message: String,
}

/// A limited scope of one request: its counter row and the limits that apply to it.
#[derive(Debug, Clone)]
pub struct Scope {
    pub id: String,
    pub limits: Limits,
}

impl Scope {
    pub fn tenant(tenant_id: &str, limits: Limits) -> Self {
        Self {
            id: format!("t:{tenant_id}"),
            limits,
        }
    }

    pub fn key(key_id: &str, limits: Limits) -> Self {
        Self {
            id: format!("k:{key_id}"),
            limits,
        }
    }
}
