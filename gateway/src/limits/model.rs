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

/// What admission does with a request that needs the store while the store cannot be
/// reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum StoreFailure {
    /// Admit it unchecked against this limit (counted by
    /// `gateway_admission_fail_open_total`): an outage does not stop the API, and the limit
    /// may be passed by what is admitted meanwhile.
    FailOpen,
    /// Refuse it with 503 and `retry-after` (counted by
    /// `gateway_admission_fail_closed_total`): the limit holds through an outage.
    FailClosed,
}

/// The failure mode of each kind of limit; a request is refused while the store is
/// unreachable if any limit that applies to it fails closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnStoreError {
    /// The monthly token quota.
    pub quota: StoreFailure,
    /// The monthly spend cap.
    pub spend_cap: StoreFailure,
    /// Requests and tokens per minute.
    pub rates: StoreFailure,
    /// Concurrent requests.
    pub concurrency: StoreFailure,
}

impl Default for OnStoreError {
    /// Quotas and spend caps hold through an outage; rates and concurrency give way to it.
    fn default() -> Self {
        Self {
            quota: StoreFailure::FailClosed,
            spend_cap: StoreFailure::FailClosed,
            rates: StoreFailure::FailOpen,
            concurrency: StoreFailure::FailOpen,
        }
    }
}

impl OnStoreError {
    /// Whether a request limited by `scopes` must be refused while the store is
    /// unreachable.
    pub fn refuses(&self, scopes: &[Scope]) -> bool {
        let closed = |on: bool, mode: StoreFailure| on && mode == StoreFailure::FailClosed;
        scopes.iter().any(|s| {
            let l = &s.limits;
            closed(l.monthly_tokens.is_some(), self.quota)
                || closed(l.monthly_spend_minor.is_some(), self.spend_cap)
                || closed(
                    l.requests_per_minute.is_some() || l.tokens_per_minute.is_some(),
                    self.rates,
                )
                || closed(l.max_concurrent.is_some(), self.concurrency)
        })
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone)]
pub enum NotAdmitted {
    /// A limit refused it (429).
    Limited(Refusal),
    /// The store could not be reached and a limit that applies fails closed (503).
    StoreUnavailable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_refused_in_an_outage_when_any_of_its_limits_fails_closed() {
        let scope = |limits| [Scope::tenant("t", limits)];
        let quota = scope(Limits {
            monthly_tokens: Some(1),
            ..Default::default()
        });
        let spend = scope(Limits {
            monthly_spend_minor: Some(1),
            ..Default::default()
        });
        let rpm = scope(Limits {
            requests_per_minute: Some(1),
            ..Default::default()
        });
        let slots = scope(Limits {
            max_concurrent: Some(1),
            ..Default::default()
        });
        let defaults = OnStoreError::default();
        assert!(defaults.refuses(&quota) && defaults.refuses(&spend));
        assert!(!defaults.refuses(&rpm) && !defaults.refuses(&slots));
        let mixed = [rpm[0].clone(), quota[0].clone()];
        assert!(defaults.refuses(&mixed));
        let open = OnStoreError {
            quota: StoreFailure::FailOpen,
            spend_cap: StoreFailure::FailOpen,
            ..defaults
        };
        assert!(!open.refuses(&mixed));
        let closed_rates = OnStoreError {
            rates: StoreFailure::FailClosed,
            ..open
        };
        assert!(closed_rates.refuses(&rpm) && !closed_rates.refuses(&slots));
    }
}
