//! The price book: versioned prices per model, and exact cost arithmetic.
//!
//! Prices are integer minor units (cents for USD) per million input tokens, per million
//! output tokens and per million requests. The cost of any usage is therefore an exact
//! integer in millionths of a minor unit ([`Micros`]); nothing is rounded until an amount
//! is shown or invoiced, and then only by [`Micros::to_minor_half_even`], the one rounding
//! step of the ledger.

use sqlx::Row;

use crate::{Db, DbError};

/// Millionths of a minor unit: the exact unit of every cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

impl Micros {
    pub const PER_MINOR: i64 = 1_000_000;

    pub fn from_minor(minor: i64) -> Self {
        Self(minor.saturating_mul(Self::PER_MINOR))
    }

    /// Rounds to whole minor units, half to even: the ledger's one rounding step.
    pub fn to_minor_half_even(self) -> i64 {
        let q = self.0.div_euclid(Self::PER_MINOR);
        let r = self.0.rem_euclid(Self::PER_MINOR);
        match r.cmp(&(Self::PER_MINOR / 2)) {
            std::cmp::Ordering::Less => q,
            std::cmp::Ordering::Greater => q + 1,
            std::cmp::Ordering::Equal => q + (q & 1),
        }
    }
}

/// One version of a model's price.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Price {
    pub model: String,
    /// Unix ms from which this version applies (inclusive).
    pub effective_from: i64,
    pub currency: String,
    pub input_minor_per_mtok: i64,
    pub output_minor_per_mtok: i64,
    pub request_minor_per_mreq: i64,
}

impl Price {
    /// The exact cost of `requests` calls using `input` and `output` tokens.
    pub fn cost(&self, requests: i64, input: i64, output: i64) -> Micros {
        Micros(
            input
                .saturating_mul(self.input_minor_per_mtok)
                .saturating_add(output.saturating_mul(self.output_minor_per_mtok))
                .saturating_add(requests.saturating_mul(self.request_minor_per_mreq)),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("prices must not be negative")]
    Negative,
    #[error("the currency must be a three-letter ISO 4217 code")]
    Currency,
    #[error("the model name must not be empty")]
    Model,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for PriceError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

/// All price versions, in memory: small, read on every admission, reloaded from the store.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    /// Per model, versions sorted by `effective_from`.
    versions: std::collections::HashMap<String, Vec<Price>>,
}

impl PriceBook {
    pub fn new(prices: Vec<Price>) -> Self {
        let mut versions: std::collections::HashMap<String, Vec<Price>> = Default::default();
        for p in prices {
            versions.entry(p.model.clone()).or_default().push(p);
        }
        for v in versions.values_mut() {
            v.sort_by_key(|p| p.effective_from);
        }
        Self { versions }
    }

    /// Every version in the store.
    pub async fn load(db: &Db) -> Result<Self, DbError> {
        let rows = sqlx::query(
            "SELECT model, effective_from, currency, input_minor_per_mtok, \
             output_minor_per_mtok, request_minor_per_mreq FROM prices",
        )
        .fetch_all(db.pool())
        .await?;
        let mut prices = Vec::with_capacity(rows.len());
        for r in rows {
            prices.push(Price {
                model: r.try_get("model")?,
                effective_from: r.try_get("effective_from")?,
                currency: r.try_get("currency")?,
                input_minor_per_mtok: r.try_get("input_minor_per_mtok")?,
                output_minor_per_mtok: r.try_get("output_minor_per_mtok")?,
                request_minor_per_mreq: r.try_get("request_minor_per_mreq")?,
            });
        }
        Ok(Self::new(prices))
    }

    /// The version of `model`'s price in force at `at_ms`; `None`: the model is free.
    pub fn at(&self, model: &str, at_ms: i64) -> Option<&Price> {
        let versions = self.versions.get(model)?;
        let i = versions.partition_point(|p| p.effective_from <= at_ms);
        i.checked_sub(1).map(|i| &versions[i])
    }

    pub fn all(&self) -> impl Iterator<Item = &Price> {
        self.versions.values().flatten()
    }
}

/// Adds a price version. Versions are never edited: a change is a new version.
pub async fn add_price(db: &Db, price: &Price) -> Result<(), PriceError> {
    if price.model.is_empty() {
        return Err(PriceError::Model);
    }
    if price.input_minor_per_mtok < 0
        || price.output_minor_per_mtok < 0
        || price.request_minor_per_mreq < 0
    {
        return Err(PriceError::Negative);
    }
    if price.currency.len() != 3 || !price.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(PriceError::Currency);
    }
    sqlx::query(
        "INSERT INTO prices (model, effective_from, currency, input_minor_per_mtok, \
         output_minor_per_mtok, request_minor_per_mreq, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&price.model)
    .bind(price.effective_from)
    .bind(&price.currency)
    .bind(price.input_minor_per_mtok)
    .bind(price.output_minor_per_mtok)
    .bind(price.request_minor_per_mreq)
    .bind(crate::now_ms())
    .execute(db.pool())
    .await?;
    Ok(())
}

/// The billing period (UTC calendar month, `YYYY-MM`) holding `at_ms`.
pub fn period_of(at_ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(at_ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(from: i64, input: i64) -> Price {
        Price {
            model: "m".into(),
            effective_from: from,
            currency: "USD".into(),
            input_minor_per_mtok: input,
            output_minor_per_mtok: 2 * input,
            request_minor_per_mreq: 0,
        }
    }

    #[test]
    fn the_version_in_force_is_the_latest_started() {
        let book = PriceBook::new(vec![price(2000, 20), price(1000, 10), price(3000, 30)]);
        assert!(book.at("m", 999).is_none());
        assert_eq!(book.at("m", 1000).unwrap().input_minor_per_mtok, 10);
        assert_eq!(book.at("m", 2999).unwrap().input_minor_per_mtok, 20);
        assert_eq!(book.at("m", i64::MAX).unwrap().input_minor_per_mtok, 30);
        assert!(book.at("other", 5000).is_none());
    }

    #[test]
    fn costs_are_exact_micros() {
        // 15 cents per million input tokens, 60 per million output, 1 cent per 10k requests.
        let p = Price {
            request_minor_per_mreq: 100,
            output_minor_per_mtok: 60,
            ..price(0, 15)
        };
        assert_eq!(p.cost(1, 1000, 500), Micros(15_000 + 30_000 + 100));
    }

    #[test]
    fn rounding_is_half_to_even() {
        let r = |m| Micros(m).to_minor_half_even();
        assert_eq!(r(1_499_999), 1);
        assert_eq!(r(1_500_000), 2);
        assert_eq!(r(2_500_000), 2);
        assert_eq!(r(2_500_001), 3);
        assert_eq!(r(-1_500_000), -2);
        assert_eq!(r(-2_500_000), -2);
    }

    #[test]
    fn periods_are_utc_months() {
        assert_eq!(period_of(0), "1970-01");
        // 2026-11-30T23:59:59.999Z and one millisecond later.
        assert_eq!(period_of(1_796_083_199_999), "2026-11");
        assert_eq!(period_of(1_796_083_200_000), "2026-12");
    }
}
