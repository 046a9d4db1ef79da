//! The price book: versioned prices per model, and exact cost arithmetic.
//!
//! Prices are integer minor units (cents for USD) per million input tokens, per million
//! output tokens and per million requests. The cost of any usage is therefore an exact
//! integer in millionths of a minor unit ([`Micros`]); nothing is rounded until an amount
//! is shown or invoiced, and then only by [`Micros::to_minor_half_even`], the one rounding
//! step of the ledger.
//!
//! A version may have volume tiers: from `from_tokens` on, tokens cost the tier's rates
//! instead of the base ones (graduated: each token at the rate of the tier its position
//! falls in). Input and output tokens climb the tiers separately. The volume is that of one
//! invoice line: a tenant's delivered usage of the model in one month under one version
//! (late usage, billed as an adjustment line, climbs from zero on its own line).

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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Price {
    pub model: String,
    /// Unix ms from which this version applies (inclusive).
    pub effective_from: i64,
    pub currency: String,
    pub input_minor_per_mtok: i64,
    pub output_minor_per_mtok: i64,
    pub request_minor_per_mreq: i64,
    /// Volume tiers above the base rates, by increasing `from_tokens`; empty: flat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<Tier>,
}

/// Rates that apply from a token volume on (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub from_tokens: i64,
    pub input_minor_per_mtok: i64,
    pub output_minor_per_mtok: i64,
}

impl Price {
    /// The exact cost of `requests` calls using `input` and `output` tokens, the tokens
    /// counted from the start of the volume (the first tokens of an invoice line).
    pub fn cost(&self, requests: i64, input: i64, output: i64) -> Micros {
        self.cost_from(0, 0, requests, input, output)
    }

    /// As [`Price::cost`], for tokens that come after `input_before` and `output_before`
    /// tokens of the same volume: each token costs the rate of the tier its position is in.
    pub fn cost_from(
        &self,
        input_before: i64,
        output_before: i64,
        requests: i64,
        input: i64,
        output: i64,
    ) -> Micros {
        let inputs = self.graduated(input_before, input, |t| t.input_minor_per_mtok);
        let outputs = self.graduated(output_before, output, |t| t.output_minor_per_mtok);
        Micros(
            inputs
                .saturating_add(outputs)
                .saturating_add(requests.saturating_mul(self.request_minor_per_mreq)),
        )
    }

    /// The highest rates of any tier: what admission reserves, so a spend cap is never
    /// under-counted whatever volume a tenant is at.
    pub fn ceiling(&self) -> Price {
        let mut top = self.clone();
        for t in &self.tiers {
            top.input_minor_per_mtok = top.input_minor_per_mtok.max(t.input_minor_per_mtok);
            top.output_minor_per_mtok = top.output_minor_per_mtok.max(t.output_minor_per_mtok);
        }
        top.tiers.clear();
        top
    }

    /// Sum over the tokens in `[before, before + quantity)` of the rate in force at each
    /// position (micros: tokens × minor per million).
    fn graduated(&self, before: i64, quantity: i64, rate: impl Fn(&Tier) -> i64) -> i64 {
        let base = Tier {
            from_tokens: 0,
            input_minor_per_mtok: self.input_minor_per_mtok,
            output_minor_per_mtok: self.output_minor_per_mtok,
        };
        let (start, end) = (before, before.saturating_add(quantity));
        let mut total = 0i64;
        let bands = std::iter::once(&base).chain(self.tiers.iter());
        let mut bands = bands.peekable();
        while let Some(t) = bands.next() {
            let band_end = bands.peek().map_or(i64::MAX, |n| n.from_tokens);
            let lo = start.max(t.from_tokens);
            let hi = end.min(band_end);
            if hi > lo {
                total = total.saturating_add((hi - lo).saturating_mul(rate(t)));
            }
        }
        total
    }

    /// Checks the price as [`add_price`] stores it.
    pub fn validate(&self) -> Result<(), PriceError> {
        if self.model.is_empty() {
            return Err(PriceError::Model);
        }
        let rates = [
            self.input_minor_per_mtok,
            self.output_minor_per_mtok,
            self.request_minor_per_mreq,
        ];
        if rates.iter().any(|r| *r < 0)
            || self
                .tiers
                .iter()
                .any(|t| t.input_minor_per_mtok < 0 || t.output_minor_per_mtok < 0)
        {
            return Err(PriceError::Negative);
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(PriceError::Currency);
        }
        let mut last = 0;
        for t in &self.tiers {
            if t.from_tokens <= last {
                return Err(PriceError::Tiers);
            }
            last = t.from_tokens;
        }
        Ok(())
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
    #[error("tiers must start above zero tokens, in increasing order")]
    Tiers,
    #[error("stored tiers of {0} are not readable")]
    StoredTiers(String),
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
             output_minor_per_mtok, request_minor_per_mreq, tiers FROM prices",
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
                tiers: match r.try_get::<Option<String>, _>("tiers")? {
                    Some(json) => serde_json::from_str(&json).map_err(|e| {
                        DbError::Sqlx(sqlx::Error::Decode(
                            format!("tiers of a price version: {e}").into(),
                        ))
                    })?,
                    None => Vec::new(),
                },
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
    price.validate()?;
    let tiers = if price.tiers.is_empty() {
        None
    } else {
        serde_json::to_string(&price.tiers).ok()
    };
    sqlx::query(
        "INSERT INTO prices (model, effective_from, currency, input_minor_per_mtok, \
         output_minor_per_mtok, request_minor_per_mreq, created_at, tiers) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&price.model)
    .bind(price.effective_from)
    .bind(&price.currency)
    .bind(price.input_minor_per_mtok)
    .bind(price.output_minor_per_mtok)
    .bind(price.request_minor_per_mreq)
    .bind(crate::now_ms())
    .bind(tiers)
    .execute(db.pool())
    .await?;
    Ok(())
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
            tiers: Vec::new(),
        }
    }

    #[test]
    fn tiers_are_graduated_and_additive() {
        // 100 per Mtok up to 1000 tokens, 60 from 1000, 10 from 5000; output flat 200.
        let p = Price {
            tiers: vec![
                Tier {
                    from_tokens: 1000,
                    input_minor_per_mtok: 60,
                    output_minor_per_mtok: 200,
                },
                Tier {
                    from_tokens: 5000,
                    input_minor_per_mtok: 10,
                    output_minor_per_mtok: 200,
                },
            ],
            output_minor_per_mtok: 200,
            ..price(0, 100)
        };
        assert_eq!(p.cost(0, 999, 0), Micros(999 * 100));
        assert_eq!(
            p.cost(0, 6000, 7),
            Micros(1000 * 100 + 4000 * 60 + 1000 * 10 + 7 * 200)
        );
        // Pricing in pieces equals pricing at once, wherever the cuts fall.
        for cut in [0, 1, 999, 1000, 1001, 4999, 5000, 5999, 6000] {
            let a = p.cost_from(0, 0, 0, cut, 0).0 + p.cost_from(cut, 0, 0, 6000 - cut, 0).0;
            assert_eq!(a, p.cost(0, 6000, 0).0, "cut at {cut}");
        }
        assert_eq!(p.ceiling().input_minor_per_mtok, 100);
        let bad = Price {
            tiers: vec![Tier {
                from_tokens: 0,
                input_minor_per_mtok: 1,
                output_minor_per_mtok: 1,
            }],
            ..price(0, 1)
        };
        assert!(matches!(bad.validate(), Err(PriceError::Tiers)));
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
}
